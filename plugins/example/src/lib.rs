//! A complete gradalign scorer plugin: one scorer, declared inputs, one export line.

use gradalign_plugin_api::abi::inputs;
use gradalign_plugin_api::{export_plugin, with_grads, Inputs, Scorer};

/// Mean absolute per-sample gradient entry, averaged over samples (a toy "gradient energy").
pub struct MeanAbsGrad;

impl Scorer for MeanAbsGrad {
    const NAME: &'static str = "mean_abs_grad";
    const DESCRIPTION: &'static str = "mean |g_ij| over every sample i and column j";
    const INPUTS: u64 = inputs::PER_SAMPLE_GRADS;

    fn score(x: &Inputs) -> Result<f64, String> {
        let (n, p) = (x.n_samples(), x.n_columns());
        if n * p == 0 {
            return Err("no gradient entries".into());
        }
        let total: f64 = with_grads!(x.grads()?, |g| g.data.iter().map(|&v| (v as f64).abs()).sum());
        Ok(total / (n * p) as f64)
    }
}

export_plugin!(name: "example", scorers: [MeanAbsGrad]);

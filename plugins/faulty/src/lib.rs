//! Test fixture plugin: one scorer per failure mode, plus one that works.

use gradalign_plugin_api::abi::inputs;
use gradalign_plugin_api::{export_plugin, Inputs, Scorer};

pub struct Panics;
impl Scorer for Panics {
    const NAME: &'static str = "faulty_panics";
    const DESCRIPTION: &'static str = "panics";
    const INPUTS: u64 = inputs::LABELS;
    fn score(_: &Inputs) -> Result<f64, String> {
        panic!("deliberate panic in a scorer")
    }
}

pub struct Nan;
impl Scorer for Nan {
    const NAME: &'static str = "faulty_nan";
    const DESCRIPTION: &'static str = "returns NaN";
    const INPUTS: u64 = inputs::LABELS;
    fn score(_: &Inputs) -> Result<f64, String> {
        Ok(f64::NAN)
    }
}

pub struct Fails;
impl Scorer for Fails {
    const NAME: &'static str = "faulty_error";
    const DESCRIPTION: &'static str = "returns an error";
    const INPUTS: u64 = inputs::LABELS;
    fn score(_: &Inputs) -> Result<f64, String> {
        Err("deliberate error".into())
    }
}

pub struct Undeclared;
impl Scorer for Undeclared {
    const NAME: &'static str = "faulty_undeclared";
    const DESCRIPTION: &'static str = "reads gradients it did not declare";
    const INPUTS: u64 = inputs::LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        x.grads().map(|_| 0.0)
    }
}

pub struct CountLabels;
impl Scorer for CountLabels {
    const NAME: &'static str = "faulty_ok";
    const DESCRIPTION: &'static str = "number of labels (works)";
    const INPUTS: u64 = inputs::LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        Ok(x.labels()?.len() as f64)
    }
}

export_plugin!(
    symbol: gradalign_faulty_plugin_table,
    name: "faulty",
    scorers: [Panics, Nan, Fails, Undeclared, CountLabels, GradSum, Aborts, Segfaults],
);

/// Works, and reads every kind of input that crosses the isolation boundary.
pub struct GradSum;
impl Scorer for GradSum {
    const NAME: &'static str = "faulty_grad_sum";
    const DESCRIPTION: &'static str = "Σ per-sample gradients · label + Σ param values (works)";
    const INPUTS: u64 =
        inputs::LABELS | inputs::PER_SAMPLE_GRADS | inputs::PARAM_VALUES | inputs::RELU_CODES;
    fn score(x: &Inputs) -> Result<f64, String> {
        let labels = x.labels()?;
        let mut s = 0.0;
        gradalign_plugin_api::with_grads!(x.grads()?, |m| {
            for i in 0..m.rows {
                s += m.row(i).iter().map(|&v| v as f64).sum::<f64>() * (labels[i] + 1) as f64;
            }
        });
        s += x.param_values()?.iter().sum::<f64>();
        s += x.relu_codes()?.data.iter().map(|&c| c as f64).sum::<f64>();
        Ok(s)
    }
}

/// Kills the whole process: only `--isolate` can keep the other scorers' results.
pub struct Aborts;
impl Scorer for Aborts {
    const NAME: &'static str = "faulty_abort";
    const DESCRIPTION: &'static str = "aborts the process";
    const INPUTS: u64 = inputs::LABELS;
    fn score(_: &Inputs) -> Result<f64, String> {
        std::process::abort()
    }
}

/// Dies of SIGSEGV (a write through a null pointer, done with a volatile store so the
/// optimiser keeps it).
pub struct Segfaults;
impl Scorer for Segfaults {
    const NAME: &'static str = "faulty_segfault";
    const DESCRIPTION: &'static str = "segfaults";
    const INPUTS: u64 = inputs::LABELS | inputs::PER_SAMPLE_GRADS;
    fn score(x: &Inputs) -> Result<f64, String> {
        let p = std::hint::black_box(std::ptr::null_mut::<u64>());
        unsafe { std::ptr::write_volatile(p, x.n_samples() as u64) };
        Ok(0.0)
    }
}

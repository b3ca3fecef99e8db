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
    scorers: [Panics, Nan, Fails, Undeclared, CountLabels],
);

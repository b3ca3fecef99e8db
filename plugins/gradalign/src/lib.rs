//! GradAlign-I/II and GradSign (docs/semantics.md, Scorers) as a gradalign plugin: linked into the binary and
//! also built as `libgradalign_scorers.so`. They read packed gradient signs (`inputs::SIGNS`),
//! so they also run when the per-sample gradients exceed `--max-memory`.

pub mod math;

use gradalign_plugin_api::abi::inputs::{LABELS, SIGNS};
use gradalign_plugin_api::{export_plugin, Inputs, Scorer};

pub struct GradSign;
impl Scorer for GradSign {
    const NAME: &'static str = "gradsign";
    const DESCRIPTION: &'static str = "GradSign: Σ_k |Σ_i sign(g_ik)| over per-sample gradients";
    const INPUTS: u64 = SIGNS;
    fn score(x: &Inputs) -> Result<f64, String> {
        Ok(math::gradsign_packed(&x.signs()?.0))
    }
}

pub struct GradAlignI;
impl Scorer for GradAlignI {
    const NAME: &'static str = "gradalign-i";
    const DESCRIPTION: &'static str =
        "GradAlign-I (dot): Σ_c mean_{i∈c} ⟨sign g_i, sign ḡ_c⟩, alignment with the class-mean gradient";
    const INPUTS: u64 = SIGNS | LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        let (s, means) = x.signs()?;
        Ok(math::gradalign_i_dot_packed(&s, &means, x.labels()?))
    }
}

pub struct GradAlignICos;
impl Scorer for GradAlignICos {
    const NAME: &'static str = "gradalign-i-cos";
    const DESCRIPTION: &'static str =
        "GradAlign-I (cos): class-averaged mean cosine of sign g_i to the class-mean sign vector";
    const INPUTS: u64 = SIGNS | LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        Ok(math::gradalign_i_cos_packed(&x.signs()?.0, x.labels()?))
    }
}

pub struct GradAlignII;
impl Scorer for GradAlignII {
    const NAME: &'static str = "gradalign-ii";
    const DESCRIPTION: &'static str =
        "GradAlign-II (cos): Σ_c log det(K_c + 1e-6 I), K_c the cosine Gram of sign gradients";
    const INPUTS: u64 = SIGNS | LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        math::gradalign_ii_packed(&x.signs()?.0, x.labels()?, true)
    }
}

pub struct GradAlignIIRaw;
impl Scorer for GradAlignIIRaw {
    const NAME: &'static str = "gradalign-ii-raw";
    const DESCRIPTION: &'static str =
        "GradAlign-II (raw): Σ_c log det(S_c S_cᵀ + 1e-6 I) of the unnormalised sign Gram";
    const INPUTS: u64 = SIGNS | LABELS;
    fn score(x: &Inputs) -> Result<f64, String> {
        math::gradalign_ii_packed(&x.signs()?.0, x.labels()?, false)
    }
}

export_plugin!(
    symbol: gradalign_scorers_plugin_table,
    name: "gradalign",
    scorers: [GradAlignI, GradAlignII, GradSign, GradAlignICos, GradAlignIIRaw],
);

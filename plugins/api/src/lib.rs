//! gradalign's scorer plugin interface: a versioned C ABI ([`abi`]), a safe view of the inputs
//! and the [`Scorer`] trait ([`sdk`]), and small f64 linear-algebra helpers for scorers
//! ([`linalg`]). A scorer is one type implementing [`Scorer`]; `export_plugin!` makes the table.
//!
//! ```ignore
//! use gradalign_plugin_api::{abi::inputs, export_plugin, Inputs, Scorer};
//! pub struct MeanAbsGrad;
//! impl Scorer for MeanAbsGrad {
//!     const NAME: &'static str = "mean_abs_grad";
//!     const DESCRIPTION: &'static str = "mean |g| over the batch gradient";
//!     const INPUTS: u64 = inputs::BATCH_GRADS;
//!     fn score(x: &Inputs) -> Result<f64, String> {
//!         let g = x.batch_grads()?;
//!         Ok(g.iter().map(|v| v.abs()).sum::<f64>() / g.len().max(1) as f64)
//!     }
//! }
//! export_plugin!(name: "my-scorers", scorers: [MeanAbsGrad]);
//! ```

pub mod abi;
pub mod linalg;
pub mod sdk;
pub mod signs;

pub use sdk::{
    trampoline, BlockJacobian, FeatureCovariance, FeatureLayer, FeatureMaps, Grads, Inputs,
    LogitJacobian, Matrix, Param, PluginTableHolder, Scorer, ScorerEntry,
};
pub use signs::{PackedSigns, SignPlanes};

//! The gradient-graph builder: lowers a forward ONNX model to primitive ops with static shapes
//! (`analysis`), then differentiates it in reverse mode into standard ONNX ops that output
//! per-sample parameter gradients for the whole probe batch at once (`builder`).

pub mod analysis;
pub mod backward;
pub mod blocks;
pub mod builder;
pub mod emit;
pub mod fused;
pub mod ops;
pub mod rules;
pub mod sample_axis;
pub mod stochastic;
pub mod sweep;

use crate::onnx::{DType, HostTensor};

/// Prefix of notes that are warnings: a result the user must not take at face value.
pub const WARNING: &str = "WARNING: ";

/// How a tensor depends on the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Depends on the probe images; axis 0 is the sample axis.
    Batched,
    /// Depends on trainable parameters but not on the probe. Its gradient carries an extra
    /// leading sample axis.
    Param,
    /// Depends on neither.
    Const,
}

#[derive(Clone, Debug)]
pub struct Info {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: Kind,
    /// Known value, for folded constants.
    pub value: Option<HostTensor>,
}

impl Info {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// Normalise each sample with its own spatial statistics (PyTorch `train()`, batch of one).
    #[default]
    Sample,
    /// Normalise with the stored running statistics.
    Eval,
    /// Normalise with statistics over the whole batch and the spatial axes (PyTorch `train()` on
    /// the full batch). It mixes samples, so it is only for forward passes (TE-NAS's linear-region
    /// protocol), never for per-sample gradients, and not offered on the command line.
    #[value(skip)]
    Batch,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ParamSelect {
    /// Weights of Conv, Gemm and MatMul (the ops whose `OpDef` marks a weight slot).
    #[default]
    Weights,
    /// Every float initializer that receives a gradient (adds biases and normalisation affines).
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    #[default]
    F32,
    F64,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F64 => DType::F64,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GradOptions {
    pub bn: BnMode,
    pub params: ParamSelect,
    pub precision: Precision,
    /// Memory budget in bytes (`--max-memory`); `None`: the default budget of the
    /// computation that runs the graph (a fraction of the machine's memory).
    pub max_memory: Option<u64>,
}

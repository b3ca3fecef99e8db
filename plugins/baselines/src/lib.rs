//! The zero-cost baselines (docs/semantics.md, Scorers) as a gradalign plugin: linked into the binary and also
//! built as `libgradalign_baselines.so`. Each scorer declares exactly the inputs it reads.

pub mod aznas;
pub mod math;
pub mod vkdnw;

use gradalign_plugin_api::abi::inputs::*;
use gradalign_plugin_api::{export_plugin, with_grads, Inputs, Scorer};

macro_rules! scorer {
    ($ty:ident, $name:expr, $inputs:expr, $desc:expr, |$x:ident| $body:expr) => {
        pub struct $ty;
        impl Scorer for $ty {
            const NAME: &'static str = $name;
            const DESCRIPTION: &'static str = $desc;
            const INPUTS: u64 = $inputs;
            fn score($x: &Inputs) -> Result<f64, String> {
                $body
            }
        }
    };
}

scorer!(
    GradNorm,
    "grad_norm",
    BATCH_GRADS,
    "Σ_layers ‖∂L/∂W‖₂ of the batch gradient",
    |x| Ok(math::grad_norm(x.params(), x.batch_grads()?))
);
scorer!(
    Snip,
    "snip",
    BATCH_GRADS | PARAM_VALUES,
    "SNIP: Σ |W ⊙ ∂L/∂W|",
    |x| Ok(math::snip(x.params(), x.param_values()?, x.batch_grads()?))
);
scorer!(
    Synflow,
    "synflow",
    SYNFLOW_GRADS | PARAM_VALUES,
    "SynFlow: Σ |W ⊙ ∂R/∂W| of the BN-free |W| network on one all-ones input (f64)",
    |x| {
        let vals: Vec<f64> = x.param_values()?.iter().map(|v| v.abs()).collect();
        Ok(math::snip(x.params(), &vals, x.synflow_grads()?))
    }
);
scorer!(
    Naswot,
    "naswot",
    RELU_CODES,
    "NASWOT: log|det K| of the ReLU-code agreement kernel",
    |x| Ok(math::naswot(x.relu_codes()?))
);
scorer!(
    LinearRegions,
    "linear_regions",
    RELU_CODES,
    "number of distinct ReLU activation patterns over the probe (linear regions)",
    |x| Ok(math::linear_regions(x.relu_codes()?))
);
scorer!(
    Swap,
    "swap",
    RELU_CODES,
    "SWAP: number of distinct sample-wise activation patterns (a unit's ReLU codes over the probe)",
    |x| Ok(math::swap(x.relu_codes()?))
);
scorer!(
    Meco,
    "meco",
    FEATURE_MAPS,
    "MeCo: Σ_layers min eigenvalue of the channel correlation of each Conv output (first sample)",
    |x| math::meco(&x.feature_maps()?)
);
scorer!(
    AzExpressivity,
    "az_expressivity",
    FEATURE_COVARIANCE,
    "AZ-NAS expressivity: Σ_Conv layers entropy of the feature covariance spectrum (all samples)",
    |x| aznas::expressivity(&x.feature_covariance()?)
);
scorer!(
    AzProgressivity,
    "az_progressivity",
    FEATURE_COVARIANCE,
    "AZ-NAS progressivity: min over consecutive Conv layers of the increase in spectrum entropy",
    |x| aznas::progressivity(&x.feature_covariance()?)
);
scorer!(
    AzTrainability,
    "az_trainability",
    BLOCK_JACOBIAN,
    "AZ-NAS trainability: mean over consecutive block outputs of -s - 1/s + 2, s the spectral norm of the random-sign backward map between them",
    |x| aznas::trainability(&x.block_jacobian()?)
);
scorer!(
    JacobCov,
    "jacob_cov",
    INPUT_JACOBIAN,
    "Jacobian covariance of the per-sample input Jacobians of Σ logits",
    |x| math::jacob_cov(x.input_jacobian()?)
);
scorer!(
    Zico,
    "zico",
    PER_SAMPLE_GRADS,
    "ZiCo: Σ_layers log Σ mean|g|/std(g) over per-sample gradients",
    |x| Ok(with_grads!(x.grads()?, |g| math::zico(x.params(), g)))
);
scorer!(
    NtkCond,
    "ntk_cond",
    PER_SAMPLE_GRADS,
    "−cond(G Gᵀ), the per-sample NTK's condition number negated (TE-NAS)",
    |x| with_grads!(x.grads()?, |g| math::ntk_cond(g))
);
scorer!(
    Fisher,
    "fisher",
    PER_SAMPLE_GRADS | PARAM_VALUES | ALL_PARAMS,
    "Fisher: Σ_layers Σ_channels ½ mean_i (Σ_spatial a·∂L/∂a)²",
    |x| {
        let v = x.param_values()?;
        with_grads!(x.grads()?, |g| math::fisher(x.params(), v, g))
    }
);
scorer!(
    Grasp,
    "grasp",
    HESSIAN_GRAD_PRODUCT | PARAM_VALUES,
    "GraSP: −Σ W ⊙ (H g), H the loss Hessian, g the batch gradient",
    |x| Ok(math::grasp(
        x.params(),
        x.param_values()?,
        x.hessian_grad_product()?
    ))
);
scorer!(
    Params,
    "params",
    MODEL_INFO,
    "number of trainable parameters",
    |x| Ok(x.model_params())
);
scorer!(
    Flops,
    "flops",
    MODEL_INFO,
    "multiply-accumulates of Conv/Gemm/MatMul for one sample",
    |x| Ok(x.model_flops())
);

scorer!(
    VkdnwEntropy,
    "vkdnw_entropy",
    LOGIT_JACOBIAN,
    "VKDNW: entropy of the deciles of the Fisher spectrum over element 0 of every parameter tensor (eval BN)",
    |x| vkdnw::entropy(&x.logit_jacobian()?)
);
scorer!(
    Vkdnw,
    "vkdnw",
    LOGIT_JACOBIAN,
    "VKDNW_single: number of parameter tensors, then vkdnw_entropy (as T + entropy/3)",
    |x| vkdnw::single(&x.logit_jacobian()?)
);

export_plugin!(
    symbol: gradalign_baselines_plugin_table,
    name: "baselines",
    scorers: [GradNorm, Snip, Synflow, Naswot, LinearRegions, Swap, Meco, AzExpressivity, AzProgressivity, AzTrainability, JacobCov, Zico, NtkCond, Fisher, Grasp, Params, Flops, VkdnwEntropy, Vkdnw],
);

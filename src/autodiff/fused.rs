//! gradalign's fused kernels: a few element-wise stretches of the gradient graph that standard
//! ONNX spells out as a chain of full-tensor passes, written as single nodes of the
//! `ai.gradalign` domain instead.
//!
//! | node | inputs → outputs | standard form |
//! |---|---|---|
//! | `GaStandardize` (axes, epsilon) | x → x̂, 1/σ | ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul |
//! | `GaStandardizeGrad` (axes) | dx̂, x̂, 1/σ → dx | ReduceMean ×2, Mul ×3, Sub ×2 |
//! | `GaNormAffine` (axes, epsilon) | x, γ, β → y, mean, 1/σ | as `GaStandardize`, then Mul, Add |
//! | `GaNormAffineGrad` (axes) | dY, x, mean, 1/σ, γ → dx | Sub, Mul (x̂), Mul (dY·γ), then as `GaStandardizeGrad` |
//! | `GaReluGrad` | y = Relu(x), dY → dY·[y > 0] | Greater, Cast, Mul |
//!
//! The builder always writes the fused form (statistics over trailing axes only, one
//! contiguous row per statistic). ONNX Runtime on the CPU runs it with the kernels registered
//! from Rust (`runtime::ort`); every other consumer (tract, the CUDA execution provider,
//! `export-grad-graph`) gets [`to_standard_ops`], which writes each fused node back as the
//! standard ops in the table. Both forms compute the same formula; the kernels accumulate the
//! sums in f64, so they differ from the standard form only in the last bits.

use anyhow::{anyhow, bail, Result};

use super::emit::Emitter;
use super::ops::{elementwise, norm, norm_affine, standardize};
use crate::onnx::{pb, DType};

/// The ONNX operator domain of the fused kernels.
pub use super::emit::FUSED_DOMAIN as DOMAIN;

/// Whether any node of `model` is a fused kernel.
pub fn uses_fused(model: &pb::ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.domain == DOMAIN))
}

/// The opset import a graph holding fused nodes needs.
pub fn opset_import() -> pb::OperatorSetIdProto {
    pb::OperatorSetIdProto {
        domain: DOMAIN.into(),
        version: 1,
    }
}

fn ints(node: &pb::NodeProto, name: &str) -> Result<Vec<usize>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.iter().map(|&v| v as usize).collect())
        .ok_or_else(|| anyhow!("fused node '{}' has no attribute '{name}'", node.name))
}

fn epsilon(node: &pb::NodeProto) -> f64 {
    node.attribute
        .iter()
        .find(|a| a.name == "epsilon")
        .map_or(1e-5, |a| a.f as f64)
}

/// `model` with every fused node written out in standard ONNX ops (a copy; `model` itself when
/// it has none).
pub fn to_standard_ops(model: &pb::ModelProto, float: DType) -> Result<pb::ModelProto> {
    let mut out = model.clone();
    if !uses_fused(model) {
        return Ok(out);
    }
    let graph = out
        .graph
        .as_mut()
        .ok_or_else(|| anyhow!("empty gradient graph"))?;
    // "gx" names cannot meet the builder's ("ga…") nor a model's own.
    let mut em = Emitter::with_prefix(float, "gx");
    for node in std::mem::take(&mut graph.node) {
        if node.domain != DOMAIN {
            em.nodes.push(node);
            continue;
        }
        let input = |i: usize| -> Result<&str> {
            node.input
                .get(i)
                .map(String::as_str)
                .ok_or_else(|| anyhow!("fused node '{}' lacks input {i}", node.name))
        };
        let result = match node.op_type.as_str() {
            norm::STANDARDIZE => {
                let eps = epsilon(&node);
                let axes = ints(&node, "axes")?;
                standardize::expand_forward(
                    &mut em,
                    &node.name,
                    input(0)?,
                    &node.output,
                    &axes,
                    eps,
                );
                continue;
            }
            norm_affine::NORM_AFFINE => {
                let eps = epsilon(&node);
                let axes = ints(&node, "axes")?;
                if node.input.len() != 3 || node.output.len() != 3 {
                    bail!("fused node '{}' needs 3 inputs and 3 outputs", node.name);
                }
                norm_affine::expand_forward_affine(
                    &mut em,
                    &node.name,
                    &node.input,
                    &node.output,
                    &axes,
                    eps,
                );
                continue;
            }
            norm_affine::NORM_AFFINE_GRAD => {
                let axes = ints(&node, "axes")?;
                if node.input.len() != 5 {
                    bail!("fused node '{}' needs 5 inputs", node.name);
                }
                norm_affine::expand_backward_affine(&mut em, &node.input, &axes)
            }
            norm::STANDARDIZE_GRAD => {
                let axes = ints(&node, "axes")?;
                standardize::expand_backward(&mut em, input(0)?, input(1)?, input(2)?, &axes)
            }
            elementwise::RELU_GRAD => elementwise::expand_relu_grad(&mut em, input(0)?, input(1)?),
            other => bail!("unknown fused node {DOMAIN}.{other} ('{}')", node.name),
        };
        // The last node written produced `result`, a fresh name: it takes the fused output's.
        let last = em
            .nodes
            .last_mut()
            .filter(|n| n.output.first() == Some(&result))
            .ok_or_else(|| anyhow!("fused node '{}' expanded to nothing", node.name))?;
        last.output[0] = node.output[0].clone();
    }
    graph.node = std::mem::take(&mut em.nodes);
    graph.initializer.append(&mut em.initializers);
    out.opset_import.retain(|o| o.domain != DOMAIN);
    Ok(out)
}

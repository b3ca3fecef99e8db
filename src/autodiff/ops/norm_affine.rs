//! `GaNormAffine`: per-sample, per-channel standardisation followed by the channel affine map,
//! `y = (x − mean)·(1/σ)·γ + β` with statistics of each (sample, channel) over the trailing
//! axes. BatchNormalization with `--bn sample` and InstanceNormalization lower to it.
//!
//! Written as one node because its standard form materialises x̂ and x̂·γ as full tensors in
//! the forward and dY·γ in the backward; the fused kernel writes `y` only and the backward
//! recomputes x̂ from `x`, `mean` and `1/σ` on the fly. Outputs: `y`, then `mean` and `1/σ`
//! ([N, C, 1, …]) for the backward.

use anyhow::{bail, Result};

use super::standardize::{expand_backward, expand_forward};
use crate::autodiff::backward::Backward;
use crate::autodiff::emit::Emitter;
use crate::autodiff::rules::{arity, OpDef, OP};
use crate::onnx::{attr, Node};

/// Internal op; inputs `x`, `γ` and `β` shaped [C, 1, …]; never read from a user model.
pub const NORM_AFFINE: &str = "GaNormAffine";

/// Fused kernel: `dx` of [`NORM_AFFINE`] from `dY`, `x`, `mean`, `1/σ` and `γ`.
pub const NORM_AFFINE_GRAD: &str = "GaNormAffineGrad";

pub const OPS: &[OpDef] = &[OpDef {
    name: NORM_AFFINE,
    source: false,
    arity: arity(3, 3, 3, 3),
    infer: Some(infer),
    backward: Some(backward),
    emit: Some(emit_forward),
    ..OP
}];

fn axes_attribute(axes: &[usize]) -> crate::onnx::pb::AttributeProto {
    let a: Vec<i64> = axes.iter().map(|&v| v as i64).collect();
    attr::ints("axes", &a)
}

fn infer(node: &Node, ins: &[Option<&crate::autodiff::Info>]) -> Result<super::Shapes> {
    let x = super::input_info(node, ins, 0)?;
    let axes = super::node_axes(node);
    let r = x.shape.len();
    if axes.is_empty() || !axes.iter().copied().eq(r - axes.len()..r) || axes[0] < 2 {
        bail!(
            "{}: {NORM_AFFINE} normalises trailing spatial axes, not {axes:?} of rank {r}",
            node.describe()
        );
    }
    let kept: Vec<usize> = (0..r)
        .map(|i| if i >= axes[0] { 1 } else { x.shape[i] })
        .collect();
    Ok(vec![
        (x.shape.clone(), x.dtype),
        (kept.clone(), x.dtype),
        (kept, x.dtype),
    ])
}

/// The node for `x` → `y`, with `γ` and `β` already [C, 1, …] and fresh names for the
/// statistics.
pub fn node(base: &str, ins: [&str; 3], outs: [String; 3], axes: &[usize], eps: f64) -> Node {
    Node::new(
        format!("{base}/{NORM_AFFINE}.{}", outs[1]),
        NORM_AFFINE,
        ins.iter().map(|s| s.to_string()).collect(),
        outs.to_vec(),
    )
    .with_attr(axes_attribute(axes))
    .with_attr(attr::f("epsilon", eps as f32))
}

pub fn emit_forward(em: &mut Emitter, node: &Node) {
    let eps = node.attr_f("epsilon").unwrap_or(1e-5);
    em.fused(
        NORM_AFFINE,
        &[&node.inputs[0], &node.inputs[1], &node.inputs[2]],
        vec![
            axes_attribute(&super::node_axes(node)),
            attr::f("epsilon", eps),
        ],
        0,
    );
    let fused = em.nodes.last_mut().expect("just emitted");
    fused.output = node.outputs.clone();
    fused.name = node.name.clone();
}

/// The standard form of the fused node: standardise (also giving `mean`), then `x̂·γ + β`.
pub fn expand_forward_affine(
    em: &mut Emitter,
    name: &str,
    inputs: &[String],
    outputs: &[String],
    axes: &[usize],
    eps: f64,
) {
    let xh = em.fresh("xhat");
    let mean = expand_forward(
        em,
        name,
        &inputs[0],
        &[xh.clone(), outputs[2].clone()],
        axes,
        eps,
    );
    em.nodes.push(crate::onnx::pb::NodeProto {
        input: vec![mean],
        output: vec![outputs[1].clone()],
        name: format!("{name}/mean"),
        op_type: "Identity".into(),
        ..Default::default()
    });
    let ys = em.mul(&xh, &inputs[1]);
    em.nodes.push(crate::onnx::pb::NodeProto {
        input: vec![ys, inputs[2].clone()],
        output: vec![outputs[0].clone()],
        name: format!("{name}/affine"),
        op_type: "Add".into(),
        ..Default::default()
    });
}

/// x̂ recomputed from `x`, `mean` and `1/σ`, as the forward computes it.
fn xhat(em: &mut Emitter, x: &str, mean: &str, inv: &str) -> String {
    let xc = em.sub(x, mean);
    em.mul(&xc, inv)
}

/// The standard form of [`NORM_AFFINE_GRAD`]: `dx̂ = dY·γ`, then the standardisation's rule.
pub fn expand_backward_affine(em: &mut Emitter, inputs: &[String], axes: &[usize]) -> String {
    let (dy, x, mean, inv, scale) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
    let xh = xhat(em, x, mean, inv);
    let dxh = em.mul(dy, scale);
    expand_backward(em, &dxh, &xh, inv, axes)
}

fn backward(b: &mut Backward, node: &Node, dys: &[Option<String>]) -> Result<Vec<Option<String>>> {
    if dys[1..].iter().any(|d| d.is_some()) {
        bail!(
            "{}: gradients through the statistics are not supported",
            node.describe()
        );
    }
    let mut out = vec![None, None, None];
    let Some(dy) = dys[0].clone() else {
        return Ok(out);
    };
    let axes = super::node_axes(node);
    let (x, scale, bias) = (&node.inputs[0], &node.inputs[1], &node.inputs[2]);
    let (mean, inv) = (&node.outputs[1], &node.outputs[2]);
    if b.needs_input(node, 0) {
        let dx =
            b.em.fused(
                NORM_AFFINE_GRAD,
                &[&dy, x, mean, inv, scale],
                vec![axes_attribute(&axes)],
                1,
            )
            .pop();
        out[0] = dx;
    }
    let shape = b.shape(x);
    if b.needs_input(node, 1) {
        let xh = xhat(b.em, x, mean, inv);
        let g = b.em.mul(&dy, &xh);
        out[1] = Some(b.unbroadcast(&g, &shape, scale)?);
    }
    if b.needs_input(node, 2) {
        out[2] = Some(b.unbroadcast(&dy, &shape, bias)?);
    }
    Ok(out)
}

//! BatchNormalization and LayerNormalization, lowered to primitives (ReduceMean, Sub, Mul,
//! Sqrt, Div, Add) so that their gradients come from the primitive rules and tract never sees
//! a training-mode BN node.
//!
//! `--bn sample`: statistics of each sample over its spatial axes (biased variance), exactly
//! PyTorch's `train()` on a batch of one. `--bn eval`: the stored running statistics.

use anyhow::{bail, Result};

use super::norm_axis;
use super::standardize::{expand_backward, expand_forward};
use crate::autodiff::backward::Backward;
use crate::autodiff::emit::Emitter;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, OpDef, Slot, MANY, OP};
use crate::autodiff::{BnMode, Kind};
use crate::onnx::{attr, HostTensor, Node};

struct Seq<'l, 'a> {
    lw: &'l mut Lowering<'a>,
    base: String,
}

impl Seq<'_, '_> {
    fn op(
        &mut self,
        op: &str,
        ins: Vec<String>,
        out: Option<String>,
        attrs: Vec<crate::onnx::pb::AttributeProto>,
    ) -> Result<String> {
        self.lw.emit(&self.base, op, ins, out, attrs)
    }
    /// The node's per-channel scale (input 1) and bias (input 2) reshaped to `shape_c`.
    fn channel_params(&mut self, node: &Node, shape_c: String) -> Result<(String, String)> {
        let scale = self.op(
            "Reshape",
            vec![node.inputs[1].clone(), shape_c.clone()],
            None,
            vec![],
        )?;
        let bias = self.op(
            "Reshape",
            vec![node.inputs[2].clone(), shape_c],
            None,
            vec![],
        )?;
        Ok((scale, bias))
    }
    /// `x̂ · scale + bias` with the node's per-channel scale (input 1) and bias (input 2)
    /// reshaped to `shape_c` ([C, 1, …]), written to the node's output.
    fn channel_affine(&mut self, node: &Node, xh: String, shape_c: String) -> Result<()> {
        let (scale, bias) = self.channel_params(node, shape_c)?;
        let ys = self.op("Mul", vec![xh, scale], None, vec![])?;
        self.op("Add", vec![ys, bias], Some(node.outputs[0].clone()), vec![])?;
        Ok(())
    }
    /// `(x − mean)/σ · scale + bias` with the node's per-channel scale and bias, statistics
    /// over the trailing `axes` of each (sample, channel): one `GaNormAffine` node.
    fn standardise_affine(
        &mut self,
        node: &Node,
        axes: &[usize],
        eps: f64,
        shape_c: String,
    ) -> Result<()> {
        let (scale, bias) = self.channel_params(node, shape_c)?;
        let outs = [
            node.outputs[0].clone(),
            self.lw.fresh("mean"),
            self.lw.fresh("inv_std"),
        ];
        let n = super::norm_affine::node(
            &self.base,
            [&node.inputs[0], &scale, &bias],
            outs,
            axes,
            eps,
        );
        self.lw.add(n)
    }
    /// `(x - mean) / sqrt(var + eps)` over `axes`, as one `GaStandardize` node whose gradient
    /// is the fused formula (see [`backward`]).
    fn standardise(&mut self, x: &str, axes: &[usize], eps: f64) -> Result<String> {
        let a: Vec<i64> = axes.iter().map(|&v| v as i64).collect();
        // The fused kernels take one contiguous row per statistic: the axes must be the last
        // ones (every per-sample form is; batch statistics, over axis 0, are not).
        let rank = self.lw.info(x)?.shape.len();
        let trailing = !axes.is_empty() && axes.iter().copied().eq(rank - axes.len()..rank);
        let inv = self.lw.fresh("inv_std");
        let xh = self.lw.fresh("xhat");
        // The fresh output name keeps the node name unique even if model node names repeat.
        let mut n = Node::new(
            format!("{}/{STANDARDIZE}.{xh}", self.base),
            STANDARDIZE,
            vec![x.into()],
            vec![xh.clone(), inv],
        );
        n = n
            .with_attr(attr::ints("axes", &a))
            .with_attr(attr::f("epsilon", eps as f32))
            .with_attr(attr::i("trailing", trailing as i64));
        self.lw.add(n)?;
        Ok(xh)
    }
}

/// Internal op: standardisation over `axes` with per-(sample, channel) statistics. Outputs
/// `x̂` and `1/σ` (kept dims). Never read from a user model.
pub const STANDARDIZE: &str = "GaStandardize";

/// Fused kernel: `GaStandardize`'s input gradient from `dx̂`, `x̂` and `1/σ` (see [`backward`]).
pub const STANDARDIZE_GRAD: &str = "GaStandardizeGrad";

pub const OPS: &[OpDef] = &[
    OpDef {
        name: "BatchNormalization",
        arity: arity(5, 5, 1, 3),
        lower: Some(lower_batch_norm),
        slots: bn_slots,
        ..OP
    },
    OpDef {
        name: "LayerNormalization",
        arity: arity(2, 3, 1, 3),
        lower: Some(lower_layer_norm),
        ..OP
    },
    OpDef {
        name: "InstanceNormalization",
        arity: arity(3, 3, 1, 1),
        lower: Some(lower_instance_group_norm),
        ..OP
    },
    OpDef {
        name: "GroupNormalization",
        arity: arity(3, 3, 1, 1),
        lower: Some(lower_instance_group_norm),
        ..OP
    },
    // Internal: every normalisation lowers to this, written out as standard ops on emission.
    OpDef {
        name: STANDARDIZE,
        source: false,
        arity: arity(1, MANY, 1, 1),
        infer: Some(infer),
        backward: Some(backward),
        emit: Some(emit_forward),
        ..OP
    },
];

/// Scale and bias train; the running mean and variance are statistics.
fn bn_slots(_: &Node, slot: usize, _: usize) -> Slot {
    if slot >= 3 {
        Slot::Fixed
    } else {
        Slot::Data
    }
}

pub fn infer(node: &Node, ins: &[Option<&crate::autodiff::Info>]) -> Result<super::Shapes> {
    let x = super::input_info(node, ins, 0)?;
    let axes = super::node_axes(node);
    let kept: Vec<usize> = x
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    Ok(vec![(x.shape.clone(), x.dtype), (kept, x.dtype)])
}

fn trailing(node: &Node) -> bool {
    node.attr_i("trailing") == Some(1)
}

/// Forward of `GaStandardize`: the fused kernel where its axes are the trailing ones, else
/// standard ops.
pub fn emit_forward(em: &mut Emitter, node: &Node) {
    let eps = node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    if trailing(node) {
        let axes: Vec<i64> = super::node_axes(node).iter().map(|&a| a as i64).collect();
        em.fused(
            STANDARDIZE,
            &[&node.inputs[0]],
            vec![attr::ints("axes", &axes), attr::f("epsilon", eps as f32)],
            0,
        );
        let fused = em.nodes.last_mut().expect("just emitted");
        fused.output = node.outputs.clone();
        fused.name = node.name.clone();
        return;
    }
    expand_forward(
        em,
        &node.name,
        &node.inputs[0],
        &node.outputs,
        &super::node_axes(node),
        eps,
    );
}

/// PyTorch's fused normalisation gradient, per sample and channel:
/// `dx = (1/σ)·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`, means over the normalised axes.
pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    if dys.get(1).is_some_and(|d| d.is_some()) {
        bail!(
            "{}: gradients through 1/σ are not supported",
            node.describe()
        );
    }
    let Some(dxh) = dys[0].clone() else {
        return Ok(vec![None]);
    };
    if !b.needs_input(node, 0) {
        return Ok(vec![None]);
    }
    let axes = super::node_axes(node);
    let (xh, inv) = (node.outputs[0].clone(), node.outputs[1].clone());
    if trailing(node) {
        let a: Vec<i64> = axes.iter().map(|&v| v as i64).collect();
        let dx = b.em.fused(
            STANDARDIZE_GRAD,
            &[&dxh, &xh, &inv],
            vec![attr::ints("axes", &a)],
            1,
        );
        return Ok(vec![dx.into_iter().next()]);
    }
    Ok(vec![Some(expand_backward(b.em, &dxh, &xh, &inv, &axes))])
}

pub fn lower_batch_norm(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let r = x.shape.len();
    if r < 2 {
        bail!(
            "{}: BatchNormalization needs input [N, C, ...], got {:?}",
            node.describe(),
            x.shape
        );
    }
    let c = x.shape[1];
    for i in 1..5 {
        let s = &lw.input_info(&node, i)?.shape;
        if s != &[c] {
            bail!(
                "{}: input {i} has shape {s:?}, expected [{c}]",
                node.describe()
            );
        }
    }
    // The running-statistics outputs of a training-mode export are not produced: the probe
    // never updates them, and anything reading them fails with the tensor's name.
    let eps = node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let mut chan = vec![c];
    chan.extend(std::iter::repeat(1).take(r - 2));
    let chan64: Vec<i64> = chan.iter().map(|&d| d as i64).collect();
    let mode = lw.opts.bn;
    let mut s = Seq {
        lw,
        base: node.name.clone(),
    };
    let shape_c = s.lw.konst(HostTensor::i64_vec(&chan64));
    let xh = match mode {
        BnMode::Sample => {
            if r == 2 {
                bail!(
                    "{}: BatchNormalization on [N, C] input has no spatial axes, so per-sample statistics \
                     are undefined (PyTorch refuses a batch of one here too); use --bn eval",
                    node.describe()
                );
            }
            if x.shape[2..].iter().product::<usize>() == 1 {
                bail!(
                    "{}: BatchNormalization on a {:?} feature map: per-sample statistics over one \
                     value normalise it to the BN bias, so every gradient through it would be 0 \
                     (PyTorch refuses a batch of one here too: \"Expected more than 1 value per \
                     channel\"); feed a larger input (e.g. --data with bigger images) or use --bn eval",
                    node.describe(),
                    x.shape
                );
            }
            let axes: Vec<usize> = (2..r).collect();
            return s.standardise_affine(&node, &axes, eps, shape_c);
        }
        BnMode::Batch => {
            let mut axes = vec![0];
            axes.extend(2..r);
            s.standardise(&node.inputs[0], &axes, eps)?
        }
        BnMode::Eval => {
            let mean = s.lw.const_input(&node, 3)?.unwrap().to_f64();
            let var = s.lw.const_input(&node, 4)?.unwrap().to_f64();
            let inv = var.mapv(|v| 1.0 / (v + eps).sqrt());
            let float = s.lw.float;
            let m = s.lw.konst(
                HostTensor::F64(mean.into_shape_with_order(chan.clone())?.into_dyn()).cast(float),
            );
            let iv = s.lw.konst(
                HostTensor::F64(inv.into_shape_with_order(chan.clone())?.into_dyn()).cast(float),
            );
            let xc = s.op("Sub", vec![node.inputs[0].clone(), m], None, vec![])?;
            s.op("Mul", vec![xc, iv], None, vec![])?
        }
    };
    s.channel_affine(&node, xh, shape_c)
}

/// InstanceNormalization and GroupNormalization (scale and bias per channel, as opset 21 and
/// PyTorch define them): statistics of each sample over its spatial axes (instance) or over the
/// channels of its group and their spatial axes (group), so they never mix samples.
pub fn lower_instance_group_norm(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let r = x.shape.len();
    if r < 3 {
        bail!(
            "{}: {} needs input [N, C, spatial...], got {:?}",
            node.describe(),
            node.op,
            x.shape
        );
    }
    let c = x.shape[1];
    for i in 1..3 {
        let s = &lw.input_info(&node, i)?.shape;
        if s != &[c] {
            bail!(
                "{}: input {i} has shape {s:?}; gradalign reads per-channel scale and bias [{c}] \
                 (opset 21 GroupNormalization; re-export with opset ≥ 21)",
                node.describe()
            );
        }
    }
    let eps = node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let spatial: usize = x.shape[2..].iter().product();
    let groups = if node.op == "GroupNormalization" {
        let g = node.attr_i("num_groups").unwrap_or(0);
        if g <= 0 || c % g as usize != 0 {
            bail!(
                "{}: num_groups {g} does not divide the {c} channels",
                node.describe()
            );
        }
        g as usize
    } else {
        c
    };
    if spatial * (c / groups) == 1 {
        bail!(
            "{}: {} over a single value per group (input {:?}) normalises it to the bias, so every \
             gradient through it would be 0; feed a larger input",
            node.describe(),
            node.op,
            x.shape
        );
    }
    let mut chan = vec![c as i64];
    chan.extend(std::iter::repeat_n(1, r - 2));
    let n = x.shape[0] as i64;
    let mut s = Seq {
        lw,
        base: node.name.clone(),
    };
    let shape_c = s.lw.konst(HostTensor::i64_vec(&chan));
    let xh = if groups == c {
        let axes: Vec<usize> = (2..r).collect();
        return s.standardise_affine(&node, &axes, eps, shape_c);
    } else {
        let grouped = s.lw.konst(HostTensor::i64_vec(&[
            n,
            groups as i64,
            (c / groups * spatial) as i64,
        ]));
        let xg = s.op(
            "Reshape",
            vec![node.inputs[0].clone(), grouped],
            None,
            vec![],
        )?;
        let hg = s.standardise(&xg, &[2], eps)?;
        let back: Vec<i64> = x.shape.iter().map(|&d| d as i64).collect();
        let back = s.lw.konst(HostTensor::i64_vec(&back));
        s.op("Reshape", vec![hg, back], None, vec![])?
    };
    s.channel_affine(&node, xh, shape_c)
}

pub fn lower_layer_norm(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let r = x.shape.len();
    let axis = norm_axis(&node, node.attr_i("axis").unwrap_or(-1), r)?;
    if axis == 0 && x.kind == Kind::Batched {
        bail!(
            "{}: LayerNormalization over the sample axis mixes samples",
            node.describe()
        );
    }
    let eps = node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let axes: Vec<usize> = (axis..r).collect();
    if x.shape[axis..].iter().product::<usize>() == 1 {
        bail!(
            "{}: LayerNormalization over a single value (input {:?}, axis {axis}) normalises it to \
             the bias, so every gradient through it would be 0",
            node.describe(),
            x.shape
        );
    }
    let mut s = Seq {
        lw,
        base: node.name.clone(),
    };
    let xh = s.standardise(&node.inputs[0], &axes, eps)?;
    match node.input(2) {
        Some(bias) => {
            let ys = s.op("Mul", vec![xh, node.inputs[1].clone()], None, vec![])?;
            s.op(
                "Add",
                vec![ys, bias.to_string()],
                Some(node.outputs[0].clone()),
                vec![],
            )?;
        }
        None => {
            s.op(
                "Mul",
                vec![xh, node.inputs[1].clone()],
                Some(node.outputs[0].clone()),
                vec![],
            )?;
        }
    }
    Ok(())
}

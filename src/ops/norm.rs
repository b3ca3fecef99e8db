//! BatchNormalization and LayerNormalization, lowered to primitives (ReduceMean, Sub, Mul,
//! Sqrt, Div, Add) so that their gradients come from the primitive rules and tract never sees
//! a training-mode BN node.
//!
//! `--bn sample`: statistics of each sample over its spatial axes (biased variance), exactly
//! PyTorch's `train()` on a batch of one. `--bn eval`: the stored running statistics.

use anyhow::{bail, Result};

use super::norm_axis;
use crate::grad::analysis::Lowering;
use crate::grad::{BnMode, Kind};
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
    /// Mean and variance over `axes` (kept), then `(x - mean) / sqrt(var + eps)`.
    fn standardise(&mut self, x: &str, axes: &[usize], eps: f64) -> Result<String> {
        let a: Vec<i64> = axes.iter().map(|&v| v as i64).collect();
        let red = || vec![attr::ints("axes", &a), attr::i("keepdims", 1)];
        let mean = self.op("ReduceMean", vec![x.into()], None, red())?;
        let xc = self.op("Sub", vec![x.into(), mean], None, vec![])?;
        let e = self.lw.scalar(eps);
        let var = if self.lw.float == crate::onnx::DType::F64 {
            // tract rewrites mean(x·x) into a mean-of-squares reduction that it evaluates in
            // f32; -mean(x·(-x)) is the same number and stays in f64.
            let neg = self.op("Neg", vec![xc.clone()], None, vec![])?;
            let sq = self.op("Mul", vec![xc.clone(), neg], None, vec![])?;
            let m = self.op("ReduceMean", vec![sq], None, red())?;
            self.op("Neg", vec![m], None, vec![])?
        } else {
            let sq = self.op("Mul", vec![xc.clone(), xc.clone()], None, vec![])?;
            self.op("ReduceMean", vec![sq], None, red())?
        };
        let ve = self.op("Add", vec![var, e], None, vec![])?;
        let sd = self.op("Sqrt", vec![ve], None, vec![])?;
        self.op("Div", vec![xc, sd], None, vec![])
    }
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
            let axes: Vec<usize> = (2..r).collect();
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
    let scale = s.op(
        "Reshape",
        vec![node.inputs[1].clone(), shape_c.clone()],
        None,
        vec![],
    )?;
    let bias = s.op(
        "Reshape",
        vec![node.inputs[2].clone(), shape_c],
        None,
        vec![],
    )?;
    let ys = s.op("Mul", vec![xh, scale], None, vec![])?;
    s.op("Add", vec![ys, bias], Some(node.outputs[0].clone()), vec![])?;
    Ok(())
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

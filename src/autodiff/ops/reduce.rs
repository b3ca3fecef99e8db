//! ReduceMean, ReduceSum, Softmax, LogSoftmax: reductions over non-sample axes.
//!
//! Gradients: a reduction's `dY` is reshaped to the kept-dims shape and broadcast back (÷ count
//! for the mean); Softmax `Y·(dY − Σ dY·Y)`, LogSoftmax `dY − exp(Y)·Σ dY`.

use anyhow::{bail, Result};

use super::{input_info, norm_axis, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, fixed_after_first, OpDef, OP};
use crate::autodiff::{Info, Kind};
use crate::onnx::{attr, HostTensor, Node};

const REDUCE: OpDef = OpDef {
    arity: arity(1, 2, 1, 1),
    lower: Some(lower),
    infer: Some(infer),
    backward: Some(backward),
    slots: fixed_after_first,
    ..OP
};
const SOFTMAX: OpDef = OpDef {
    lower: Some(lower_softmax),
    infer: Some(infer),
    backward: Some(backward),
    ..OP
};

pub const OPS: &[OpDef] = &[
    OpDef {
        name: "ReduceMean",
        ..REDUCE
    },
    OpDef {
        name: "ReduceSum",
        ..REDUCE
    },
    OpDef {
        name: "Softmax",
        ..SOFTMAX
    },
    OpDef {
        name: "LogSoftmax",
        ..SOFTMAX
    },
    OpDef {
        name: "ReduceL2",
        lower: Some(lower_squares),
        infer: None,
        backward: None,
        ..REDUCE
    },
    OpDef {
        name: "ReduceSumSquare",
        lower: Some(lower_squares),
        infer: None,
        backward: None,
        ..REDUCE
    },
    // The gradient goes to the extreme entries, shared equally among ties (as PyTorch's
    // amax/amin).
    OpDef {
        name: "ReduceMax",
        ..REDUCE
    },
    OpDef {
        name: "ReduceMin",
        ..REDUCE
    },
];

pub fn lower(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let r = x.shape.len();
    let axes: Option<Vec<i64>> = match node.attr_ints("axes") {
        Some(a) => Some(a),
        None => lw
            .const_input(&node, 1)?
            .map(|t| t.as_i64_vec())
            .transpose()?,
    };
    let noop = node.attr_i("noop_with_empty_axes").unwrap_or(0) == 1;
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => {
            let mut v: Vec<usize> = a
                .iter()
                .map(|&a| norm_axis(&node, a, r))
                .collect::<Result<_>>()?;
            v.sort_unstable();
            v.dedup();
            v
        }
        _ if noop => {
            return lw.add(Node::new(
                node.name.clone(),
                "Identity",
                vec![node.inputs[0].clone()],
                node.outputs.clone(),
            ))
        }
        _ => (0..r).collect(),
    };
    if x.kind == Kind::Batched && axes.contains(&0) {
        bail!(
            "{}: reducing over the sample axis mixes samples",
            node.describe()
        );
    }
    let keep = node.attr_i("keepdims").unwrap_or(1);
    let a64: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
    let out = if node.op == "ReduceSum" {
        let ax = lw.konst(HostTensor::i64_vec(&a64));
        Node::new(
            node.name.clone(),
            "ReduceSum",
            vec![node.inputs[0].clone(), ax],
            node.outputs.clone(),
        )
    } else {
        Node::new(
            node.name.clone(),
            &node.op,
            vec![node.inputs[0].clone()],
            node.outputs.clone(),
        )
        .with_attr(attr::ints("axes", &a64))
    };
    lw.add(out.with_attr(attr::i("keepdims", keep)))
}

/// ReduceSumSquare `Σx²` and ReduceL2 `√(Σx²)` on the ReduceSum rule (same axes and keepdims).
fn lower_squares(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = node.inputs[0].clone();
    let sq = lw.emit(&node.name, "Mul", vec![x.clone(), x], None, vec![])?;
    let l2 = node.op == "ReduceL2";
    let sum_out = if l2 {
        lw.fresh("sumsq")
    } else {
        node.outputs[0].clone()
    };
    let mut inputs = node.inputs.clone();
    inputs[0] = sq;
    let mut sum = Node::new(
        format!("{}/sum", node.name),
        "ReduceSum",
        inputs,
        vec![sum_out.clone()],
    );
    sum.attrs = node.attrs.clone();
    lower(lw, sum)?;
    if l2 {
        lw.emit(
            &node.name,
            "Sqrt",
            vec![sum_out],
            Some(node.outputs[0].clone()),
            vec![],
        )?;
    }
    Ok(())
}

/// Make the softmax axis explicit: before opset 13 the default was 1 over a 2-D coercion.
pub fn lower_softmax(lw: &mut Lowering, node: Node) -> Result<()> {
    let r = lw.input_info(&node, 0)?.shape.len();
    let axis = match node.attr_i("axis") {
        Some(a) => a,
        None if lw.opset < 13 => 1,
        None => -1,
    };
    let a = norm_axis(&node, axis, r)?;
    if lw.opset < 13 && a != r - 1 {
        bail!(
            "{}: a pre-opset-13 softmax over axes {a}.. of a rank-{r} tensor is not supported",
            node.describe()
        );
    }
    lw.add(node.with_attr(attr::i("axis", a as i64)))
}

fn reduce_axes(node: &Node, ins: &[Option<&Info>]) -> Result<Vec<usize>> {
    let v = if node.op == "ReduceSum" {
        ins.get(1)
            .copied()
            .flatten()
            .and_then(|i| i.value.as_ref())
            .map(|t| t.as_i64_vec())
            .transpose()?
            .unwrap_or_default()
    } else {
        node.attr_ints("axes").unwrap_or_default()
    };
    Ok(v.iter().map(|&a| a as usize).collect())
}

fn softmax_axis(node: &Node, r: usize) -> Result<usize> {
    norm_axis(node, node.attr_i("axis").unwrap_or(-1), r)
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let x = input_info(node, ins, 0)?;
    let r = x.shape.len();
    match node.op.as_str() {
        "Softmax" | "LogSoftmax" => {
            let axis = softmax_axis(node, r)?;
            if x.kind == Kind::Batched && axis == 0 {
                bail!(
                    "{}: a softmax over the sample axis mixes samples",
                    node.describe()
                );
            }
            Ok(vec![(x.shape.clone(), x.dtype)])
        }
        _ => {
            let axes = reduce_axes(node, ins)?;
            let keep = node.attr_i("keepdims").unwrap_or(1) == 1;
            let shape = (0..r)
                .filter_map(|i| {
                    if axes.contains(&i) {
                        keep.then_some(1)
                    } else {
                        Some(x.shape[i])
                    }
                })
                .collect();
            Ok(vec![(shape, x.dtype)])
        }
    }
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let Some(dy) = dys[0].clone() else {
        return Ok(vec![]);
    };
    if !b.needs_input(node, 0) {
        return Ok(vec![None]);
    }
    let x = node.inputs[0].clone();
    let ix = b.info(&x).clone();
    let r = ix.shape.len();
    let lift = (ix.kind == Kind::Param) as usize;
    let g = match node.op.as_str() {
        "Softmax" => {
            let axis = softmax_axis(node, r)? + lift;
            let y = &node.outputs[0];
            let p = b.em.mul(&dy, y);
            let s = b.em.reduce_sum(&p, &[axis], true);
            let t = b.em.sub(&dy, &s);
            b.em.mul(y, &t)
        }
        "LogSoftmax" => {
            let axis = softmax_axis(node, r)? + lift;
            let e = b.em.op("Exp", &[&node.outputs[0]], vec![]);
            let s = b.em.reduce_sum(&dy, &[axis], true);
            let t = b.em.mul(&e, &s);
            b.em.sub(&dy, &t)
        }
        _ => {
            let ins: Vec<Option<&Info>> = node.inputs.iter().map(|s| b.infos.get(s)).collect();
            let axes = reduce_axes(node, &ins)?;
            let count: usize = axes.iter().map(|&a| ix.shape[a]).product();
            let mut kept: Vec<usize> = ix
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            let mut full = ix.shape.clone();
            if lift == 1 {
                kept.insert(0, b.n);
                full.insert(0, b.n);
            }
            let k = b.em.reshape(&dy, &kept);
            if matches!(node.op.as_str(), "ReduceMax" | "ReduceMin") {
                // dX = dY · [x = y] / #ties, with y broadcast back over the reduced axes.
                let own: Vec<usize> = kept[lift..].to_vec();
                let y = b.em.reshape(&node.outputs[0], &own);
                let hit = b.em.op("Equal", &[&x, &y], vec![]);
                let hit = b.em.cast_float(&hit);
                let ties = b.em.reduce_sum(&hit, &axes, true);
                let share = b.em.div(&hit, &ties);
                return Ok(vec![Some(b.em.mul(&k, &share))]);
            }
            let k = if node.op == "ReduceMean" {
                b.em.mul_scalar(&k, 1.0 / count as f64)
            } else {
                k
            };
            b.em.expand(&k, &full)
        }
    };
    Ok(vec![Some(g)])
}

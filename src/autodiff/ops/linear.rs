//! Gemm (lowered to MatMul, Mul, Add) and MatMul.
//!
//! Per-sample weight gradients are batched outer products: for `Y = A·W` with the sample axis
//! first, `dW_n = A_nᵀ · dY_n` as one batched `MatMul` over `[N, rows, in]` — never summed over
//! the sample axis.

use anyhow::{bail, Result};

use super::{input_info, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, OpDef, Slot, OP};
use crate::autodiff::{Info, Kind};
use crate::onnx::{attr, Node};

pub const OPS: &[OpDef] = &[
    OpDef {
        name: "Gemm",
        arity: arity(2, 3, 1, 1),
        lower: Some(lower_gemm),
        slots: gemm_slots,
        ..OP
    },
    OpDef {
        name: "MatMul",
        arity: arity(2, 2, 1, 1),
        infer: Some(infer),
        backward: Some(backward),
        slots: matmul_slots,
        macs: Some(matmul_macs),
        ..OP
    },
];

/// `Y = A·B + C` (transposed by transA/transB): output channels are B's output-feature axis.
fn gemm_slots(node: &Node, slot: usize, _: usize) -> Slot {
    let flag = |a: &str| node.attr_i(a).unwrap_or(0) != 0;
    match slot {
        0 => Slot::Weight {
            channel_axis: if flag("transA") { 1 } else { 0 },
        },
        1 => Slot::Weight {
            channel_axis: if flag("transB") { 0 } else { 1 },
        },
        2 => Slot::Bias,
        _ => Slot::Data,
    }
}

fn matmul_slots(_: &Node, _: usize, ndim: usize) -> Slot {
    Slot::Weight {
        channel_axis: ndim as i64 - 1,
    }
}

fn matmul_macs(ins: &[Option<&Info>], y: &Info) -> f64 {
    let k = ins
        .first()
        .copied()
        .flatten()
        .and_then(|a| a.shape.last().copied())
        .unwrap_or(1);
    (y.numel() * k) as f64
}

/// `Y = alpha·op(A)·op(B) + beta·C` as primitives; a transposed weight becomes a
/// parameter-only `Transpose`, whose gradient rule restores the stored layout.
pub fn lower_gemm(lw: &mut Lowering, node: Node) -> Result<()> {
    let a = lw.input_info(&node, 0)?.clone();
    let b = lw.input_info(&node, 1)?.clone();
    let alpha = node.attr_f("alpha").unwrap_or(1.0) as f64;
    let beta = node.attr_f("beta").unwrap_or(1.0) as f64;
    let (ta, tb) = (
        node.attr_i("transA").unwrap_or(0) == 1,
        node.attr_i("transB").unwrap_or(0) == 1,
    );
    if a.shape.len() != 2 || b.shape.len() != 2 {
        bail!(
            "{}: Gemm needs rank-2 inputs, got {:?} and {:?}",
            node.describe(),
            a.shape,
            b.shape
        );
    }
    if a.kind == Kind::Batched && ta {
        bail!(
            "{}: Gemm with transA=1 on the probe batch would mix samples",
            node.describe()
        );
    }
    let y = node.outputs[0].clone();
    let c = node.input(2).map(|s| s.to_string());
    let mut lhs = node.inputs[0].clone();
    if ta {
        lhs = lw.emit(
            &node.name,
            "Transpose",
            vec![lhs],
            None,
            vec![attr::ints("perm", &[1, 0])],
        )?;
    }
    let mut rhs = node.inputs[1].clone();
    if tb {
        rhs = lw.emit(
            &node.name,
            "Transpose",
            vec![rhs],
            None,
            vec![attr::ints("perm", &[1, 0])],
        )?;
    }
    let last_mm = alpha == 1.0 && c.is_none();
    let mut acc = lw.emit(
        &node.name,
        "MatMul",
        vec![lhs, rhs],
        last_mm.then(|| y.clone()),
        vec![],
    )?;
    if alpha != 1.0 {
        let s = lw.scalar(alpha);
        acc = lw.emit(
            &node.name,
            "Mul",
            vec![acc, s],
            c.is_none().then(|| y.clone()),
            vec![],
        )?;
    }
    if let Some(c) = c {
        let cb = if beta != 1.0 {
            let s = lw.scalar(beta);
            lw.emit(&node.name, "Mul", vec![c, s], None, vec![])?
        } else {
            c
        };
        lw.emit(&node.name, "Add", vec![acc, cb], Some(y), vec![])?;
    }
    Ok(())
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let a = input_info(node, ins, 0)?;
    let b = input_info(node, ins, 1)?;
    // MatMul (numpy semantics, rank >= 2 operands).
    if a.shape.len() < 2 || b.shape.len() < 2 {
        bail!(
            "{}: MatMul with rank-1 operands is not supported",
            node.describe()
        );
    }
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if a.shape[ra - 1] != b.shape[rb - 2] {
        bail!(
            "{}: cannot multiply {:?} by {:?}",
            node.describe(),
            a.shape,
            b.shape
        );
    }
    let batch = super::broadcast(node, &a.shape[..ra - 2], &b.shape[..rb - 2])?;
    let mut out = batch;
    out.push(a.shape[ra - 2]);
    out.push(b.shape[rb - 1]);
    for (x, other) in [(a, b), (b, a)] {
        if x.kind == Kind::Batched
            && (x.shape.len() != out.len()
                || (other.kind == Kind::Batched
                    && other.shape != x.shape
                    && other.shape[..other.shape.len() - 2] != x.shape[..x.shape.len() - 2]))
        {
            bail!(
                "{}: MatMul operands {:?} and {:?} would move the sample axis",
                node.describe(),
                a.shape,
                b.shape
            );
        }
    }
    if a.kind != Kind::Batched && b.kind == Kind::Batched && rb == 2 {
        bail!(
            "{}: MatMul whose probe-dependent operand is rank 2 on the right mixes samples",
            node.describe()
        );
    }
    Ok(vec![(out, a.dtype)])
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let Some(dy) = dys[0].clone() else {
        return Ok(vec![]);
    };
    matmul_backward(b, node, &dy)
}

/// Swap the last two axes.
fn t_last(r: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..r).collect();
    p.swap(r - 1, r - 2);
    p
}

fn matmul_backward(b: &mut Backward, node: &Node, dy: &str) -> Result<Vec<Option<String>>> {
    let (a, w) = (node.inputs[0].clone(), node.inputs[1].clone());
    let (ia, iw) = (b.info(&a).clone(), b.info(&w).clone());
    let out = b.shape(&node.outputs[0]);
    let r = out.len();
    let n = b.n;
    let mut dx = vec![None, None];
    match (ia.kind, iw.kind) {
        (Kind::Batched, Kind::Batched) => {
            if b.needs_input(node, 0) {
                let wt = b.em.transpose(&w, &t_last(iw.shape.len()));
                dx[0] = Some(b.em.matmul(dy, &wt));
            }
            if b.needs_input(node, 1) {
                let at = b.em.transpose(&a, &t_last(ia.shape.len()));
                dx[1] = Some(b.em.matmul(&at, dy));
            }
        }
        (Kind::Batched, _) => {
            if iw.shape.len() != 2 {
                bail!(
                    "{}: a MatMul weight must be rank 2, got {:?}",
                    node.describe(),
                    iw.shape
                );
            }
            let (k, p) = (iw.shape[0], iw.shape[1]);
            if b.needs_input(node, 0) {
                let wt = b.em.transpose(&w, &[1, 0]);
                dx[0] = Some(b.em.matmul(dy, &wt));
            }
            if b.needs_input(node, 1) {
                // Fold every axis between the sample axis and the contraction into rows.
                let rows: usize = ia.shape[1..ia.shape.len() - 1].iter().product();
                let a3 = b.em.reshape(&a, &[n, rows, k]);
                let d3 = b.em.reshape(dy, &[n, rows, p]);
                let at = b.em.transpose(&a3, &[0, 2, 1]);
                let g = b.em.matmul(&at, &d3);
                let want = b.grad_shape(&w);
                dx[1] = Some(b.em.reshape(&g, &want));
            }
        }
        (_, Kind::Batched) => {
            if ia.shape.len() != 2 {
                bail!(
                    "{}: a MatMul weight must be rank 2, got {:?}",
                    node.describe(),
                    ia.shape
                );
            }
            if b.needs_input(node, 1) {
                let at = b.em.transpose(&a, &[1, 0]);
                dx[1] = Some(b.em.matmul(&at, dy));
            }
            if b.needs_input(node, 0) {
                // dA_n = Σ_{batch axes} dY · Bᵀ
                let wt = b.em.transpose(&w, &t_last(iw.shape.len()));
                let g = b.em.matmul(dy, &wt);
                let axes: Vec<usize> = (1..r - 2).collect();
                let g = if axes.is_empty() {
                    g
                } else {
                    b.em.reduce_sum(&g, &axes, false)
                };
                let want = b.grad_shape(&a);
                dx[0] = Some(b.em.reshape(&g, &want));
            }
        }
        _ => bail!(
            "{}: MatMul between parameters is not supported",
            node.describe()
        ),
    }
    Ok(dx)
}

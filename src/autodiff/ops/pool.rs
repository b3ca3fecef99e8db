//! AveragePool (count_include_pad 0/1, ceil_mode), MaxPool, GlobalAveragePool.
//!
//! Gradients scatter `dY` back with a `ConvTranspose` whose kernel is all ones (average: after
//! dividing by the host-computed count of each window; at stride and dilation 1 a depthwise
//! all-ones `Conv` over the mirrored window does the same sum faster) or one-hot per kernel
//! offset (max: the first maximal position of each window, as PyTorch picks it: every window's
//! values from one one-hot `Conv`, `Equal` to the output, the first equal offset by `CumSum`).
//! tract has no `MaxUnpool`, so this stays in standard ops.

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

use super::window::{fit_scatter, geom_attrs, geometry, kernel_offsets, windows, ConvGeom};
use super::{input_info, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, OpDef, OP};
use crate::autodiff::Info;
use crate::onnx::{attr, Node};

const POOL: OpDef = OpDef {
    infer: Some(infer),
    backward: Some(backward),
    ..OP
};

pub const OPS: &[OpDef] = &[
    OpDef {
        name: "AveragePool",
        lower: Some(lower),
        ..POOL
    },
    OpDef {
        name: "MaxPool",
        arity: arity(1, 1, 1, 2),
        lower: Some(lower),
        ..POOL
    },
    OpDef {
        name: "GlobalAveragePool",
        ..POOL
    },
];

fn pool_geom(node: &Node, x: &Info) -> Result<ConvGeom> {
    let kernel: Vec<usize> = match node.attr_ints("kernel_shape") {
        Some(k) if k.iter().all(|&v| v >= 1) => k.iter().map(|&v| v as usize).collect(),
        _ => bail!("{}: missing or invalid kernel_shape", node.describe()),
    };
    if x.shape.len() != kernel.len() + 2 {
        bail!(
            "{}: input {:?} does not match kernel {:?}",
            node.describe(),
            x.shape,
            kernel
        );
    }
    geometry(node, &x.shape[2..], kernel, 1)
}

fn ceil_mode(node: &Node) -> bool {
    node.attr_i("ceil_mode").unwrap_or(0) == 1
}

/// Output size, with PyTorch/ONNX's rule that a ceil-mode window must start inside the input
/// or its begin padding.
fn out_dims(node: &Node, g: &ConvGeom, x: &Info) -> Result<Vec<usize>> {
    let d = g.spatial();
    let mut out = vec![];
    for i in 0..d {
        let mut o = g
            .out_dim(i, x.shape[2 + i], ceil_mode(node))
            .ok_or_else(|| {
                anyhow::anyhow!("{}: window larger than the padded input", node.describe())
            })?;
        if ceil_mode(node) && (o - 1) * g.strides[i] >= x.shape[2 + i] + g.pads[i] {
            o -= 1;
        }
        out.push(o);
    }
    Ok(out)
}

pub fn lower(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    if node.outputs.len() > 1 && !node.outputs[1].is_empty() {
        bail!(
            "{}: MaxPool's Indices output is not supported",
            node.describe()
        );
    }
    let g = pool_geom(&node, &x)?;
    let mut out = Node::new(
        node.name.clone(),
        &node.op,
        vec![node.inputs[0].clone()],
        vec![node.outputs[0].clone()],
    );
    for a in geom_attrs(&g) {
        if node.op == "AveragePool" && a.name == "dilations" && lw.opset < 19 {
            continue;
        }
        out = out.with_attr(a);
    }
    out = out.with_attr(attr::i("ceil_mode", ceil_mode(&node) as i64));
    if node.op == "AveragePool" {
        out = out.with_attr(attr::i(
            "count_include_pad",
            node.attr_i("count_include_pad").unwrap_or(0),
        ));
    }
    lw.add(out)
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let x = input_info(node, ins, 0)?;
    if x.shape.len() < 3 {
        bail!(
            "{}: pooling needs [N, C, ...] input, got {:?}",
            node.describe(),
            x.shape
        );
    }
    if node.op == "GlobalAveragePool" {
        let mut s = x.shape[..2].to_vec();
        s.extend(std::iter::repeat(1).take(x.shape.len() - 2));
        return Ok(vec![(s, x.dtype)]);
    }
    let g = pool_geom(node, x)?;
    let mut s = x.shape[..2].to_vec();
    s.extend(out_dims(node, &g, x)?);
    Ok(vec![(s, x.dtype)])
}

/// Number of input positions each window divides by.
fn window_counts(g: &ConvGeom, input: &[usize], out: &[usize], include_pad: bool) -> ArrayD<f64> {
    let d = g.spatial();
    let per_axis: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            (0..out[i])
                .map(|o| {
                    let start = (o * g.strides[i]) as i64 - g.pads[i] as i64;
                    let (lo, hi) = if include_pad {
                        (-(g.pads[i] as i64), (input[i] + g.pads[i + d]) as i64)
                    } else {
                        (0, input[i] as i64)
                    };
                    (0..g.kernel[i])
                        .filter(|&k| {
                            let p = start + (k * g.dilations[i]) as i64;
                            p >= lo && p < hi
                        })
                        .count() as f64
                })
                .collect()
        })
        .collect();
    ArrayD::from_shape_fn(IxDyn(out), |ix| {
        (0..d).map(|i| per_axis[i][ix[i]]).product()
    })
}

/// Scatter back to the input grid `[N, C, in...]`: either `[N·C, K, out...]` with one channel
/// per kernel offset (one-hot kernels, summed), or, when `kernel_ones`, `[N, C, out...]`
/// through a depthwise all-ones kernel (`k_channels` = C). The depthwise form also sidesteps a
/// tract optimiser failure on single-channel ConvTranspose.
fn scatter(
    b: &mut Backward,
    g: &ConvGeom,
    src: &str,
    k_channels: usize,
    kernel_ones: bool,
    x_shape: &[usize],
    out: &[usize],
) -> String {
    let offsets = kernel_offsets(&g.kernel);
    let mut wshape = vec![k_channels, 1];
    wshape.extend(&g.kernel);
    let w = if kernel_ones {
        ArrayD::from_elem(IxDyn(&wshape), 1.0)
    } else {
        let mut w = ArrayD::zeros(IxDyn(&wshape));
        for (j, off) in offsets.iter().enumerate() {
            let mut ix = vec![j, 0];
            ix.extend(off);
            w[IxDyn(&ix)] = 1.0;
        }
        w
    };
    let w = b.em.floats(w);
    let mut attrs = geom_attrs(&g.without_end_pads());
    if kernel_ones {
        attrs.push(attr::i("group", k_channels as i64));
    }
    let t = b.em.op("ConvTranspose", &[src, &w], attrs);
    let cur = fit_scatter(b, g, &t, &x_shape[2..], out);
    b.em.reshape(&cur, x_shape)
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
    let (n, c) = (ix.shape[0], ix.shape[1]);
    let spatial: usize = ix.shape[2..].iter().product();
    if node.op == "GlobalAveragePool" {
        let t = b.em.mul_scalar(&dy, 1.0 / spatial as f64);
        return Ok(vec![Some(b.em.expand(&t, &ix.shape))]);
    }
    let g = pool_geom(node, &ix)?;
    let out: Vec<usize> = b.shape(&node.outputs[0])[2..].to_vec();
    let mut flat = vec![n * c, 1];
    flat.extend(&out);
    if node.op == "AveragePool" {
        let include = node.attr_i("count_include_pad").unwrap_or(0) == 1;
        let counts = window_counts(&g, &ix.shape[2..], &out, include).mapv(|v| 1.0 / v);
        let inv = b.em.floats(counts);
        let scaled = b.em.mul(&dy, &inv);
        if g.strides.iter().chain(&g.dilations).all(|&v| v == 1) {
            // Stride and dilation 1: the scatter is a window sum of dY/count over the mirrored
            // window, i.e. a depthwise all-ones Conv with pads k−1−pad. ONNX Runtime runs it
            // far faster than the ConvTranspose + crop/pad below, and it sums exactly (an
            // AveragePool form would divide by K and multiply back, rounding twice).
            let d = g.spatial();
            let pads: Vec<i64> = (0..2 * d)
                .map(|i| (g.kernel[i % d] - 1 - g.pads[i]) as i64)
                .collect();
            let kernel: Vec<i64> = g.kernel.iter().map(|&v| v as i64).collect();
            let mut wshape = vec![c, 1];
            wshape.extend(&g.kernel);
            let w = b.em.floats(ArrayD::from_elem(IxDyn(&wshape), 1.0));
            let dx = b.em.op(
                "Conv",
                &[&scaled, &w],
                vec![
                    attr::ints("kernel_shape", &kernel),
                    attr::ints("pads", &pads),
                    attr::i("group", c as i64),
                ],
            );
            return Ok(vec![Some(dx)]);
        }
        return Ok(vec![Some(scatter(
            b, &g, &scaled, c, true, &ix.shape, &out,
        ))]);
    }
    // MaxPool: route dY to the first maximal position of each window.
    let d = g.spatial();
    let mut pads = vec![0i64; 2 * (d + 2)];
    for i in 0..d {
        let need = (out[i] - 1) * g.strides[i] + (g.kernel[i] - 1) * g.dilations[i] + 1;
        let have = ix.shape[2 + i] + g.pads[i] + g.pads[i + d];
        pads[2 + i] = g.pads[i] as i64;
        pads[d + 4 + i] = (g.pads[i + d] + need.saturating_sub(have)) as i64;
    }
    let lowest = if b.em.float == crate::onnx::DType::F64 {
        f64::MIN
    } else {
        f32::MIN as f64
    };
    let xp = b.em.pad(&x, &pads, lowest);
    // Every window's values side by side, [N·C, K, out...], over the input padded with the
    // lowest value (a window may not pick padding). The window Conv multiplies every value by
    // 0 or 1, and 0 · ±∞ is NaN, which would hide a whole window's maximum: infinities (e.g. an
    // exporter's −∞ padding) are clipped to the finite extremes first. A window whose maximum
    // is ±∞ itself makes the forward non-finite, which the gradient warnings report.
    let (lo, hi) = (b.em.scalar(lowest), b.em.scalar(-lowest));
    let xp = b.em.op("Clip", &[&xp, &lo, &hi], vec![]);
    let mut padded = vec![n * c, 1];
    padded
        .extend((0..d).map(|i| ix.shape[2 + i] + pads[2 + i] as usize + pads[d + 4 + i] as usize));
    let xr = b.em.reshape(&xp, &padded);
    let k = kernel_offsets(&g.kernel).len();
    let unpadded = ConvGeom {
        pads: vec![0; 2 * d],
        ..g.clone()
    };
    let values = windows(b, &xr, &unpadded);
    // The first maximal offset of each window: equal to the output, and the first such one in
    // offset order (its running count of equal offsets is 1).
    let yr = b.em.reshape(&node.outputs[0], &flat);
    let eq = b.em.op("Equal", &[&values, &yr], vec![]);
    let eqf = b.em.cast_float(&eq);
    let axis =
        b.em.konst(crate::onnx::HostTensor::I64(ndarray::arr0(1i64).into_dyn()));
    let count = b.em.op("CumSum", &[&eqf, &axis], vec![]);
    let one = b.em.scalar(1.0);
    let first = b.em.op("Equal", &[&count, &one], vec![]);
    let firstf = b.em.cast_float(&first);
    let mask = b.em.mul(&eqf, &firstf);
    let dyr = b.em.reshape(&dy, &flat);
    let stacked = b.em.mul(&mask, &dyr);
    Ok(vec![Some(scatter(
        b, &g, &stacked, k, false, &ix.shape, &out,
    ))])
}

//! Conv (any spatial rank, strides, pads incl. auto_pad, dilations, groups).
//!
//! Gradients:
//! - input: `ConvTranspose(dY, W)` with the same strides/pads/dilations/groups, zero-padded at
//!   the end for rows the forward stride skipped;
//! - weight, per sample: im2col as one convolution of every input channel with one one-hot
//!   kernel per offset, `[N, g, Cin/g·K, P]`, then one batched `MatMul` with `dY` as
//!   `[N, g, Cout/g, P]` (a samples-as-groups convolution, `Conv(Xᵀ, dY, group = N)`, measured
//!   no faster on ORT's CPU kernels, so it is not used);
//! - bias, per sample: `ReduceSum(dY)` over the spatial axes.

use anyhow::{bail, Result};

use super::window::{geom_attrs, geometry, kernel_offsets, windows, ConvGeom};
use super::{input_info, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, OpDef, Slot, OP};
use crate::autodiff::{Info, Kind};
use crate::onnx::{attr, Node};

pub const OPS: &[OpDef] = &[OpDef {
    name: "Conv",
    arity: arity(2, 3, 1, 1),
    lower: Some(lower),
    infer: Some(infer),
    backward: Some(backward),
    slots: conv_slots,
    macs: Some(conv_macs),
    ..OP
}];

fn conv_slots(_: &Node, slot: usize, _: usize) -> Slot {
    match slot {
        1 => Slot::Weight { channel_axis: 0 },
        2 => Slot::Bias,
        _ => Slot::Data,
    }
}

fn conv_macs(ins: &[Option<&Info>], y: &Info) -> f64 {
    let per_out: usize = ins
        .get(1)
        .copied()
        .flatten()
        .map_or(0, |w| w.shape[1..].iter().product());
    (y.numel() * per_out) as f64
}

pub fn lower(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let w = lw.input_info(&node, 1)?.clone();
    if x.shape.len() < 3 || w.shape.len() != x.shape.len() {
        bail!(
            "{}: Conv needs input [N, C, ...] and weight of the same rank, got {:?} and {:?}",
            node.describe(),
            x.shape,
            w.shape
        );
    }
    let group = node.attr_i("group").unwrap_or(1).max(1) as usize;
    let kernel = w.shape[2..].to_vec();
    if let Some(ks) = node.attr_ints("kernel_shape") {
        if ks.iter().map(|&k| k as usize).collect::<Vec<_>>() != kernel {
            bail!(
                "{}: kernel_shape {ks:?} disagrees with the weight shape {:?}",
                node.describe(),
                w.shape
            );
        }
    }
    let g = geometry(&node, &x.shape[2..], kernel, group)?;
    let mut out = Node::new(
        node.name.clone(),
        "Conv",
        node.inputs.clone(),
        node.outputs.clone(),
    );
    for a in geom_attrs(&g) {
        out = out.with_attr(a);
    }
    out = out.with_attr(attr::i("group", group as i64));
    lw.add(out)
}

pub fn read_geom(node: &Node, x: &Info, w: &Info) -> Result<ConvGeom> {
    geometry(
        node,
        &x.shape[2..],
        w.shape[2..].to_vec(),
        node.attr_i("group").unwrap_or(1) as usize,
    )
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let x = input_info(node, ins, 0)?;
    let w = input_info(node, ins, 1)?;
    let g = read_geom(node, x, w)?;
    let (cin, cout) = (x.shape[1], w.shape[0]);
    if cin % g.group != 0 || cout % g.group != 0 || w.shape[1] * g.group != cin {
        bail!(
            "{}: weight {:?} with group={} does not fit input channels {cin}",
            node.describe(),
            w.shape,
            g.group
        );
    }
    if w.kind == Kind::Batched {
        bail!(
            "{}: a probe-dependent Conv weight is not supported",
            node.describe()
        );
    }
    if let Some(b) = ins.get(2).copied().flatten() {
        if b.shape != [cout] {
            bail!(
                "{}: bias shape {:?} should be [{cout}]",
                node.describe(),
                b.shape
            );
        }
    }
    let mut out = vec![x.shape[0], cout];
    for i in 0..g.spatial() {
        out.push(g.out_dim(i, x.shape[2 + i], false).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: kernel larger than the padded input {:?}",
                node.describe(),
                x.shape
            )
        })?);
    }
    Ok(vec![(out, x.dtype)])
}

/// `dX` of a convolution. Stride 1 with pads no larger than the dilated kernel: a plain `Conv`
/// of `dY` with the kernel transposed per group and flipped (runtimes optimise Conv far better
/// than ConvTranspose); otherwise `ConvTranspose`, fitted to the input length.
fn input_grad(
    b: &mut Backward,
    g: &ConvGeom,
    dy: &str,
    w: &str,
    wshape: &[usize],
    xshape: &[usize],
    yshape: &[usize],
) -> String {
    let d = g.spatial();
    let reach: Vec<usize> = (0..d).map(|i| (g.kernel[i] - 1) * g.dilations[i]).collect();
    let as_conv = g.strides.iter().all(|&s| s == 1)
        && (0..d).all(|i| g.pads[i] <= reach[i] && g.pads[i + d] <= reach[i]);
    if !as_conv {
        let mut attrs = geom_attrs(&g.without_end_pads());
        attrs.push(attr::i("group", g.group as i64));
        let t = b.em.op("ConvTranspose", &[dy, w], attrs);
        return super::window::fit_scatter(b, g, &t, &xshape[2..], &yshape[2..]);
    }
    let (cout, cin_g) = (wshape[0], wshape[1]);
    let gr = g.group;
    // [Cout, Cin/g, k..] → [g, Cout/g, Cin/g, k..] → [g, Cin/g, Cout/g, k..] → [Cin, Cout/g, k..]
    let mut s5 = vec![gr, cout / gr, cin_g];
    s5.extend(&g.kernel);
    let mut perm = vec![0, 2, 1];
    perm.extend(3..3 + d);
    let mut s4 = vec![cin_g * gr, cout / gr];
    s4.extend(&g.kernel);
    // A known weight (the usual case: an initializer) is transposed and flipped here, once,
    // rather than as four graph nodes the runtime folds at every session's creation.
    let known = b.value(w).map(|v| {
        let a = v.to_f64();
        let a = a
            .into_shape_with_order(ndarray::IxDyn(&s5))
            .expect("weight of the inferred shape");
        let mut a = a
            .permuted_axes(ndarray::IxDyn(&perm))
            .as_standard_layout()
            .into_owned();
        for ax in 3..3 + d {
            a.invert_axis(ndarray::Axis(ax));
        }
        let a = a.as_standard_layout().into_owned();
        a.into_shape_with_order(ndarray::IxDyn(&s4))
            .expect("same size")
    });
    let wf = match known {
        Some(a) => {
            let name = b.em.fresh("w_flipped");
            let t = crate::onnx::HostTensor::F64(a).cast(b.em.float);
            b.em.initializer(&name, &t);
            name
        }
        None => {
            let wr = b.em.reshape(w, &s5);
            let wt = b.em.transpose(&wr, &perm);
            let wt = b.em.reshape(&wt, &s4);
            let axes: Vec<i64> = (2..2 + d as i64).collect();
            b.em.slice(&wt, &vec![-1; d], &vec![i64::MIN; d], &axes, &vec![-1; d])
        }
    };
    let mut flipped = g.clone();
    for i in 0..d {
        flipped.pads[i] = reach[i] - g.pads[i];
        flipped.pads[i + d] = reach[i] - g.pads[i + d];
    }
    let mut attrs = geom_attrs(&flipped);
    attrs.push(attr::i("group", gr as i64));
    b.em.op("Conv", &[dy, &wf], attrs)
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let Some(dy) = dys[0].clone() else {
        return Ok(vec![]);
    };
    let (x, w) = (node.inputs[0].clone(), node.inputs[1].clone());
    let (ix, iw) = (b.info(&x).clone(), b.info(&w).clone());
    if ix.kind != Kind::Batched {
        bail!("{}: Conv input must depend on the probe", node.describe());
    }
    let g = read_geom(node, &ix, &iw)?;
    let d = g.spatial();
    let y_shape = b.shape(&node.outputs[0]);
    let n = b.n;
    let mut dx = vec![None; node.inputs.len()];

    if b.needs_input(node, 0) {
        dx[0] = Some(input_grad(b, &g, &dy, &w, &iw.shape, &ix.shape, &y_shape));
    }
    if b.needs_input(node, 1) && b.first_element {
        dx[1] = Some(first_weight_grad(b, &g, &x, &dy, &y_shape));
    } else if b.needs_input(node, 1) {
        let cin = ix.shape[1];
        let cout = iw.shape[0];
        let p: usize = y_shape[2..].iter().product();
        let offsets = kernel_offsets(&g.kernel);
        let k = offsets.len();
        let trivial = k == 1 && g.strides.iter().all(|&s| s == 1) && g.pads.iter().all(|&p| p == 0);
        let cols = if trivial {
            b.em.reshape(&x, &[n, g.group, cin / g.group, p])
        } else {
            // im2col as one convolution: every input channel on its own, against one one-hot
            // kernel per offset, gives [N·Cin, K, out...] = the patches in OIHW column order.
            let mut flat = vec![n * cin, 1];
            flat.extend(&ix.shape[2..]);
            let xr = b.em.reshape(&x, &flat);
            let patches = windows(b, &xr, &g);
            b.em.reshape(&patches, &[n, g.group, cin / g.group * k, p])
        };
        let colst = b.em.transpose(&cols, &[0, 1, 3, 2]);
        let dyr = b.em.reshape(&dy, &[n, g.group, cout / g.group, p]);
        let gw = b.em.matmul(&dyr, &colst);
        let want = b.grad_shape(&w);
        dx[1] = Some(b.em.reshape(&gw, &want));
    }
    if b.needs_input(node, 2) {
        let axes: Vec<usize> = (2..2 + d).collect();
        dx[2] = Some(b.em.reduce_sum(&dy, &axes, false));
    }
    Ok(dx)
}

/// Element 0 of the per-sample weight gradient, shaped `[N, 1, 1, ...]` (weight rank + 1) so
/// that it broadcasts against a full gradient: `Σ_q dY[n, 0, q] · Xpad[n, 0, q·s]`, output
/// channel 0 against input channel 0 at kernel offset 0 (group 0 holds both).
fn first_weight_grad(
    b: &mut Backward,
    g: &ConvGeom,
    x: &str,
    dy: &str,
    yshape: &[usize],
) -> String {
    let d = g.spatial();
    let x0 = b.em.slice(x, &[0], &[1], &[1], &[1]);
    let mut pads = vec![0i64; 2 * (d + 2)];
    for i in 0..d {
        pads[2 + i] = g.pads[i] as i64;
        pads[d + 4 + i] = g.pads[i + d] as i64;
    }
    let xp = b.em.pad(&x0, &pads, 0.0);
    let axes: Vec<i64> = (2..2 + d as i64).collect();
    let ends: Vec<i64> = (0..d)
        .map(|i| ((yshape[2 + i] - 1) * g.strides[i]) as i64 + 1)
        .collect();
    let steps: Vec<i64> = g.strides.iter().map(|&s| s as i64).collect();
    let xs = b.em.slice(&xp, &vec![0; d], &ends, &axes, &steps);
    let dy0 = b.em.slice(dy, &[0], &[1], &[1], &[1]);
    let prod = b.em.mul(&dy0, &xs);
    let all: Vec<usize> = (1..2 + d).collect();
    let s = b.em.reduce_sum(&prod, &all, false);
    let mut shape = vec![b.n];
    shape.extend(std::iter::repeat_n(1, d + 2));
    b.em.reshape(&s, &shape)
}

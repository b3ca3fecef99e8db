//! Data movement: Constant, Identity/Dropout, Reshape (and Squeeze/Unsqueeze/Flatten, lowered
//! to it), Transpose, Concat, Split (lowered to Slice), Slice, Pad, Gather, Cast, Expand,
//! ConstantOfShape, Range.
//!
//! Gradients: Reshape → reshape back; Transpose → inverse permutation; Concat → slices;
//! Slice (unit steps) → zero padding; Pad → slice; Expand → sum over the broadcast axes.
//! On parameter-only tensors (`Kind::Param`) the rules shift every axis by the extra leading
//! sample axis of the gradient.

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::{input_info, norm_axis, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{all_fixed, arity, fixed_after_first, OpDef, MANY, OP};
use crate::autodiff::{Info, Kind};
use crate::onnx::{attr, DType, HostTensor, Node};

/// Shape primitives: they move values without computing on them.
const SH: OpDef = OpDef {
    infer: Some(infer),
    eval: Some(eval_def),
    backward: Some(backward),
    ..OP
};
/// Shape computations: fold to constants, carry no gradient.
const SHAPE_ONLY: OpDef = OpDef {
    differentiable: false,
    slots: all_fixed,
    ..SH
};

pub const OPS: &[OpDef] = &[
    OpDef {
        name: "Constant",
        arity: arity(0, 0, 1, 1),
        lower: Some(lower_constant),
        ..OP
    },
    OpDef {
        name: "Identity",
        lower: Some(lower_identity),
        view: true,
        ..SH
    },
    // The ratio and training-mode inputs are hyper-parameters.
    OpDef {
        name: "Dropout",
        arity: arity(1, 3, 1, 2),
        lower: Some(lower_identity),
        slots: fixed_after_first,
        ..OP
    },
    OpDef {
        name: "Reshape",
        arity: arity(2, 2, 1, 1),
        lower: Some(lower_reshape),
        slots: fixed_after_first,
        view: true,
        ..SH
    },
    OpDef {
        name: "Squeeze",
        arity: arity(1, 2, 1, 1),
        lower: Some(lower_reshape),
        slots: fixed_after_first,
        view: true,
        ..OP
    },
    OpDef {
        name: "Unsqueeze",
        arity: arity(1, 2, 1, 1),
        lower: Some(lower_reshape),
        slots: fixed_after_first,
        view: true,
        ..OP
    },
    OpDef {
        name: "Flatten",
        lower: Some(lower_reshape),
        view: true,
        ..OP
    },
    OpDef {
        name: "Split",
        arity: arity(1, 2, 1, MANY),
        lower: Some(lower_split),
        slots: fixed_after_first,
        ..OP
    },
    OpDef {
        name: "Cast",
        lower: Some(lower_cast),
        view: true,
        ..SH
    },
    OpDef {
        name: "CastLike",
        arity: arity(2, 2, 1, 1),
        lower: Some(lower_cast),
        slots: fixed_after_first,
        view: true,
        ..OP
    },
    // Opset < 10 passes starts/ends as attributes, opset < 11 the pads.
    OpDef {
        name: "Slice",
        arity: arity(1, 5, 1, 1),
        lower: Some(lower_slice),
        slots: fixed_after_first,
        ..SH
    },
    OpDef {
        name: "Pad",
        arity: arity(1, 4, 1, 1),
        lower: Some(lower_pad),
        slots: fixed_after_first,
        ..SH
    },
    OpDef {
        name: "Transpose",
        lower: Some(lower_transpose),
        view: true,
        ..SH
    },
    OpDef {
        name: "Concat",
        arity: arity(1, MANY, 1, 1),
        ..SH
    },
    OpDef {
        name: "Gather",
        arity: arity(2, 2, 1, 1),
        lower: Some(lower_gather),
        slots: fixed_after_first,
        ..SH
    },
    OpDef {
        name: "Expand",
        arity: arity(2, 2, 1, 1),
        lower: Some(lower_expand),
        slots: fixed_after_first,
        ..SH
    },
    OpDef {
        name: "ConstantOfShape",
        ..SHAPE_ONLY
    },
    OpDef {
        name: "Range",
        arity: arity(3, 3, 1, 1),
        ..SHAPE_ONLY
    },
    OpDef {
        name: "Shape",
        ..SHAPE_ONLY
    },
];

/// Gather with constant indices from a computed tensor along an axis other than the sample
/// axis (`x[:, 0]`, a ViT's class token): one Slice per index, concatenated and reshaped to
/// Gather's output shape, so the existing rules differentiate it. Constant data folds as before.
fn lower_gather(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let idx = lw.input_info(&node, 1)?.clone();
    let Some(ids) = idx.value.as_ref().filter(|_| x.value.is_none()) else {
        return lw.add(node);
    };
    let r = x.shape.len();
    let axis = norm_axis(&node, node.attr_i("axis").unwrap_or(0), r)?;
    if axis == 0 {
        return lw.add(node); // folds, or is refused with the reason
    }
    let dim = x.shape[axis] as i64;
    let ids = ids.as_i64_vec()?;
    let mut parts = vec![];
    for &k in &ids {
        let k = if k < 0 { k + dim } else { k };
        if !(0..dim).contains(&k) {
            bail!(
                "{}: index {k} is out of range for axis {axis} of size {dim}",
                node.describe()
            );
        }
        let out = lw.fresh("gather");
        let slice = Node::new(
            format!("{}/slice{k}", node.name),
            "Slice",
            vec![
                node.inputs[0].clone(),
                lw.konst(HostTensor::i64_vec(&[k])),
                lw.konst(HostTensor::i64_vec(&[k + 1])),
                lw.konst(HostTensor::i64_vec(&[axis as i64])),
            ],
            vec![out.clone()],
        );
        lower_slice(lw, slice)?;
        parts.push(out);
    }
    let joined = if parts.len() == 1 {
        parts.pop().unwrap()
    } else {
        lw.emit(
            &node.name,
            "Concat",
            parts,
            None,
            vec![attr::i("axis", axis as i64)],
        )?
    };
    let mut shape: Vec<i64> = x.shape[..axis].iter().map(|&d| d as i64).collect();
    shape.extend(idx.shape.iter().map(|&d| d as i64));
    shape.extend(x.shape[axis + 1..].iter().map(|&d| d as i64));
    let reshape = Node::new(
        format!("{}/reshape", node.name),
        "Reshape",
        vec![joined, lw.konst(HostTensor::i64_vec(&shape))],
        node.outputs.clone(),
    );
    lower_reshape(lw, reshape)
}

/// A parameter expanded along a new leading axis of the batch size (`cls_token.expand(B, -1,
/// -1)`) gives every sample its own copy: the result is per-sample, so each sample's gradient
/// flows back to the parameter on its own instead of being taken as one per-model tensor.
fn lower_expand(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let out = node.outputs[0].clone();
    lw.add(node)?;
    let n = lw.n;
    if let Some(info) = lw.infos.get_mut(&out) {
        let new_axis = x.shape.len() < info.shape.len() || x.shape.first() == Some(&1);
        if x.kind == Kind::Param && new_axis && info.shape.first() == Some(&n) {
            info.kind = Kind::Batched;
        }
    }
    Ok(())
}

fn eval_def(node: &Node, vals: &[Option<&HostTensor>]) -> Option<Result<Vec<HostTensor>>> {
    Some(eval(node, vals))
}

pub fn lower_constant(lw: &mut Lowering, node: Node) -> Result<()> {
    let t = node.constant_value()?;
    let t = if t.dtype().is_float() {
        t.cast(lw.float)
    } else {
        t
    };
    lw.set_const(&node.outputs[0], t);
    Ok(())
}

pub fn lower_identity(lw: &mut Lowering, node: Node) -> Result<()> {
    // Dropout is the identity at probe time; its optional mask output is not produced.
    let out = Node::new(
        node.name.clone(),
        "Identity",
        vec![node.inputs[0].clone()],
        vec![node.outputs[0].clone()],
    );
    lw.add(out)
}

/// Squeeze, Unsqueeze, Flatten and Reshape all become `Reshape` with a constant, fully
/// resolved target shape.
pub fn lower_reshape(lw: &mut Lowering, node: Node) -> Result<()> {
    let mut x = lw.input_info(&node, 0)?.clone();
    // A value whose samples were merged with the next axis is stored as [N, k, …]; the model
    // reshapes it as the [N·k, …] it wrote.
    let merged_in = lw.merged.get(&node.inputs[0]).copied();
    if merged_in.is_some() {
        if node.op != "Reshape" {
            bail!(
                "{}: cannot follow samples merged with another axis",
                node.describe()
            );
        }
        let (n, k) = (x.shape[0], x.shape[1]);
        x.shape.splice(0..2, [n * k]);
    }
    let r = x.shape.len();
    let axes_of = |lw: &Lowering| -> Result<Option<Vec<i64>>> {
        if let Some(a) = node.attr_ints("axes") {
            return Ok(Some(a));
        }
        Ok(match lw.const_input(&node, 1)? {
            Some(t) => Some(t.as_i64_vec()?),
            None => None,
        })
    };
    let target: Vec<usize> = match node.op.as_str() {
        "Flatten" => {
            let axis = node.attr_i("axis").unwrap_or(1);
            let a = if axis < 0 { axis + r as i64 } else { axis };
            if a < 0 || a > r as i64 {
                bail!("{}: axis {axis} out of range for rank {r}", node.describe());
            }
            let a = a as usize;
            vec![x.shape[..a].iter().product(), x.shape[a..].iter().product()]
        }
        "Squeeze" => match axes_of(lw)? {
            Some(axes) => {
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| super::norm_axis(&node, a, r))
                    .collect::<Result<_>>()?;
                for &a in &axes {
                    if x.shape[a] != 1 {
                        bail!(
                            "{}: cannot squeeze axis {a} of size {}",
                            node.describe(),
                            x.shape[a]
                        );
                    }
                }
                x.shape
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
            None => x.shape.iter().copied().filter(|&d| d != 1).collect(),
        },
        "Unsqueeze" => {
            let axes =
                axes_of(lw)?.ok_or_else(|| anyhow!("{}: Unsqueeze needs axes", node.describe()))?;
            let out_r = r + axes.len();
            let mut axes: Vec<usize> = axes
                .iter()
                .map(|&a| super::norm_axis(&node, a, out_r))
                .collect::<Result<_>>()?;
            axes.sort_unstable();
            if axes.windows(2).any(|w| w[0] == w[1]) {
                bail!("{}: Unsqueeze axes repeat", node.describe());
            }
            let mut it = x.shape.iter();
            (0..out_r)
                .map(|i| {
                    if axes.contains(&i) {
                        1
                    } else {
                        *it.next().unwrap()
                    }
                })
                .collect()
        }
        _ => {
            let spec = lw
                .const_input(&node, 1)?
                .ok_or_else(|| anyhow!("{}: Reshape needs a shape input", node.describe()))?
                .as_i64_vec()?;
            let allowzero = node.attr_i("allowzero").unwrap_or(0) == 1;
            let mut res = resolve_reshape(&node, &x.shape, &spec, allowzero)?;
            if x.kind == Kind::Batched && res.first() != Some(&lw.n) {
                // An export with a fixed batch size may have baked it into the shape constant.
                if let (Some(b), Some(&s0)) = (lw.export_batch, spec.first()) {
                    if s0 == b as i64 {
                        let mut spec2 = spec.clone();
                        spec2[0] = lw.n as i64;
                        res = resolve_reshape(&node, &x.shape, &spec2, allowzero)?;
                    }
                }
            }
            res
        }
    };
    if target.iter().product::<usize>() != x.numel() {
        bail!(
            "{}: cannot reshape {:?} to {:?}",
            node.describe(),
            x.shape,
            target
        );
    }
    let mut target = target;
    let mut merged_out = None;
    if x.kind == Kind::Batched
        && node.op == "Reshape"
        && target.len() >= 2
        && target[0] != lw.n
        && target[0] % lw.n == 0
    {
        // Axis 0 becomes N·k: rows n·k … n·k + k − 1 are sample n's, since each sample's values
        // are contiguous. Keep them as [N, k, …]; the model's later Reshape back to [N, …] (or a
        // Transpose not moving axis 0) reads the same values in the same order.
        let k = target[0] / lw.n;
        target.splice(0..1, [lw.n, k]);
        merged_out = Some(k);
    }
    if x.kind == Kind::Batched && target.first() != Some(&lw.n) {
        bail!(
            "{}: reshaping {:?} to {:?} moves the sample axis; per-sample gradients need axis 0 \
             to stay the batch{}",
            node.describe(),
            x.shape,
            target,
            if target.first().is_some_and(|&d| d % lw.n == 0) {
                " (torch's dynamo exporter writes attention this way, merging batch and heads: \
                 export with dynamo=False, see docs/exporters.md)"
            } else {
                ""
            }
        );
    }
    let shape_t: Vec<i64> = target.iter().map(|&d| d as i64).collect();
    let s = lw.konst(HostTensor::i64_vec(&shape_t));
    lw.add(Node::new(
        node.name.clone(),
        "Reshape",
        vec![node.inputs[0].clone(), s],
        vec![node.outputs[0].clone()],
    ))?;
    if let Some(k) = merged_out {
        lw.merged.insert(node.outputs[0].clone(), k);
    }
    Ok(())
}

/// Transpose, and on a value whose samples are merged with the next axis (stored as [N, k, …],
/// see [`lower_reshape`]) the same permutation of the stored axes, which must leave the merged
/// axis first.
fn lower_transpose(lw: &mut Lowering, node: Node) -> Result<()> {
    let Some(&k) = lw.merged.get(&node.inputs[0]) else {
        return lw.add(node);
    };
    let r = lw.input_info(&node, 0)?.shape.len() - 1;
    let perm = transpose_perm(&node, r)?;
    if perm.first() != Some(&0) {
        bail!(
            "{}: transposing away an axis that holds the samples merged with another mixes samples",
            node.describe()
        );
    }
    let stored: Vec<i64> = [0, 1]
        .into_iter()
        .chain(perm[1..].iter().map(|&p| p as i64 + 1))
        .collect();
    let out = Node::new(
        node.name.clone(),
        "Transpose",
        node.inputs.clone(),
        node.outputs.clone(),
    )
    .with_attr(attr::ints("perm", &stored));
    lw.add(out)?;
    lw.merged.insert(node.outputs[0].clone(), k);
    Ok(())
}

fn resolve_reshape(
    node: &Node,
    input: &[usize],
    spec: &[i64],
    allowzero: bool,
) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = vec![0usize; spec.len()];
    let mut infer_at = None;
    for (i, &s) in spec.iter().enumerate() {
        out[i] = match s {
            -1 => {
                if infer_at.replace(i).is_some() {
                    bail!("{}: more than one -1 in shape {spec:?}", node.describe());
                }
                1
            }
            0 if !allowzero => *input.get(i).ok_or_else(|| {
                anyhow!("{}: 0 in shape {spec:?} has no input dim", node.describe())
            })?,
            s if s >= 0 => s as usize,
            _ => bail!("{}: invalid shape {spec:?}", node.describe()),
        };
    }
    if let Some(i) = infer_at {
        let known: usize = out.iter().product();
        if known == 0 || total % known != 0 {
            bail!("{}: cannot reshape {input:?} to {spec:?}", node.describe());
        }
        out[i] = total / known;
    }
    Ok(out)
}

pub fn lower_split(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let axis = norm_axis(&node, node.attr_i("axis").unwrap_or(0), x.shape.len())?;
    let len = x.shape[axis];
    let k = node.outputs.len();
    let sizes: Vec<usize> = if let Some(s) = node.attr_ints("split") {
        s.iter().map(|&v| v as usize).collect()
    } else if let Some(t) = lw.const_input(&node, 1)? {
        t.as_i64_vec()?.iter().map(|&v| v as usize).collect()
    } else {
        let chunk = len.div_ceil(k);
        (0..k)
            .map(|i| chunk.min(len.saturating_sub(i * chunk)))
            .collect()
    };
    if sizes.len() != k || sizes.iter().sum::<usize>() != len {
        bail!(
            "{}: split sizes {sizes:?} do not cover axis {axis} of length {len}",
            node.describe()
        );
    }
    let mut start = 0;
    for (i, (out, size)) in node.outputs.iter().zip(sizes).enumerate() {
        if !out.is_empty() {
            let s = lw.konst(HostTensor::i64_vec(&[start as i64]));
            let e = lw.konst(HostTensor::i64_vec(&[(start + size) as i64]));
            let a = lw.konst(HostTensor::i64_vec(&[axis as i64]));
            let st = lw.konst(HostTensor::i64_vec(&[1]));
            lw.add(Node::new(
                format!("{}/{i}", node.name),
                "Slice",
                vec![node.inputs[0].clone(), s, e, a, st],
                vec![out.clone()],
            ))?;
        }
        start += size;
    }
    Ok(())
}

/// Normalised slice: for each axis, (start, end, step) with 0 <= start, positive step.
pub fn slice_params(
    node: &Node,
    shape: &[usize],
    vals: &[Option<&HostTensor>],
) -> Result<Vec<(usize, usize, usize, usize)>> {
    let get = |i: usize| -> Result<Option<Vec<i64>>> {
        vals.get(i)
            .copied()
            .flatten()
            .map(|t| t.as_i64_vec())
            .transpose()
    };
    let starts = get(1)?.ok_or_else(|| anyhow!("{}: Slice needs starts", node.describe()))?;
    let ends = get(2)?.ok_or_else(|| anyhow!("{}: Slice needs ends", node.describe()))?;
    let r = shape.len();
    let axes = get(3)?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = get(4)?.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        bail!("{}: starts/ends/axes/steps lengths differ", node.describe());
    }
    let mut out = vec![];
    for i in 0..starts.len() {
        let a = norm_axis(node, axes[i], r)?;
        let d = shape[a] as i64;
        if steps[i] <= 0 {
            bail!(
                "{}: Slice with step {} is not supported (positive steps only)",
                node.describe(),
                steps[i]
            );
        }
        let fix = |v: i64| (if v < 0 { v + d } else { v }).clamp(0, d);
        let (s, e) = (fix(starts[i]), fix(ends[i]).max(fix(starts[i])));
        out.push((a, s as usize, e as usize, steps[i] as usize));
    }
    Ok(out)
}

pub fn lower_slice(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let vals: Vec<Option<HostTensor>> = if node.has_attr("starts") {
        vec![
            None,
            node.attr_ints("starts").map(|v| HostTensor::i64_vec(&v)),
            node.attr_ints("ends").map(|v| HostTensor::i64_vec(&v)),
            node.attr_ints("axes").map(|v| HostTensor::i64_vec(&v)),
            None,
        ]
    } else {
        let mut v = vec![None];
        for i in 1..5 {
            v.push(lw.const_input(&node, i)?);
        }
        v
    };
    let refs: Vec<Option<&HostTensor>> = vals.iter().map(|v| v.as_ref()).collect();
    let sl = slice_params(&node, &x.shape, &refs)?;
    if x.kind == Kind::Batched
        && sl
            .iter()
            .any(|&(a, s, e, st)| a == 0 && (s != 0 || e != x.shape[0] || st != 1))
    {
        bail!(
            "{}: slicing the sample axis would drop or reorder probe samples",
            node.describe()
        );
    }
    let col = |f: fn(&(usize, usize, usize, usize)) -> usize| -> Vec<i64> {
        sl.iter().map(|t| f(t) as i64).collect()
    };
    let (s, e, a, st) = (col(|t| t.1), col(|t| t.2), col(|t| t.0), col(|t| t.3));
    let inputs = vec![
        node.inputs[0].clone(),
        lw.konst(HostTensor::i64_vec(&s)),
        lw.konst(HostTensor::i64_vec(&e)),
        lw.konst(HostTensor::i64_vec(&a)),
        lw.konst(HostTensor::i64_vec(&st)),
    ];
    lw.add(Node::new(
        node.name.clone(),
        "Slice",
        inputs,
        vec![node.outputs[0].clone()],
    ))
}

pub fn lower_pad(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let mode = node.attr_s("mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        bail!(
            "{}: Pad mode '{mode}' is not supported (constant only)",
            node.describe()
        );
    }
    let r = x.shape.len();
    let (mut pads, value) = if let Some(p) = node.attr_ints("pads") {
        (p, node.attr_f("value").unwrap_or(0.0) as f64)
    } else {
        let p = lw
            .const_input(&node, 1)?
            .ok_or_else(|| anyhow!("{}: Pad needs pads", node.describe()))?
            .as_i64_vec()?;
        let v = lw
            .const_input(&node, 2)?
            .and_then(|t| t.scalar_f64())
            .unwrap_or(0.0);
        (p, v)
    };
    if let Some(axes) = lw.const_input(&node, 3)? {
        let axes = axes.as_i64_vec()?;
        if pads.len() != 2 * axes.len() {
            bail!(
                "{}: {} pads for {} axes; Pad needs two per axis",
                node.describe(),
                pads.len(),
                axes.len()
            );
        }
        let mut full = vec![0i64; 2 * r];
        for (i, &a) in axes.iter().enumerate() {
            let a = norm_axis(&node, a, r)?;
            full[a] = pads[i];
            full[a + r] = pads[i + axes.len()];
        }
        pads = full;
    }
    if pads.len() != 2 * r || pads.iter().any(|&p| p < 0) {
        bail!(
            "{}: pads {pads:?} must be {} non-negative values",
            node.describe(),
            2 * r
        );
    }
    if x.kind == Kind::Batched && (pads[0] != 0 || pads[r] != 0) {
        bail!(
            "{}: padding the sample axis is not allowed",
            node.describe()
        );
    }
    let p = lw.konst(HostTensor::i64_vec(&pads));
    let v = lw.konst(HostTensor::F64(ArrayD::from_elem(IxDyn(&[]), value)).cast(x.dtype));
    let out = Node::new(
        node.name.clone(),
        "Pad",
        vec![node.inputs[0].clone(), p, v],
        vec![node.outputs[0].clone()],
    )
    .with_attr(attr::s("mode", "constant"));
    lw.add(out)
}

fn const_vals<'a>(node: &Node, ins: &[Option<&'a Info>], i: usize) -> Result<Vec<i64>> {
    ins.get(i)
        .copied()
        .flatten()
        .and_then(|x| x.value.as_ref())
        .ok_or_else(|| anyhow!("{}: input {i} must be constant", node.describe()))?
        .as_i64_vec()
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let x = input_info(node, ins, 0)?;
    let r = x.shape.len();
    Ok(match node.op.as_str() {
        "Identity" => vec![(x.shape.clone(), x.dtype)],
        "Reshape" => {
            let s = const_vals(node, ins, 1)?;
            vec![(s.iter().map(|&d| d as usize).collect(), x.dtype)]
        }
        "Transpose" => {
            let perm = transpose_perm(node, r)?;
            if perm.len() != r {
                bail!(
                    "{}: perm has {} entries for rank {r}",
                    node.describe(),
                    perm.len()
                );
            }
            if x.kind == Kind::Batched && perm[0] != 0 {
                bail!(
                    "{}: transposing away the sample axis mixes samples",
                    node.describe()
                );
            }
            vec![(perm.iter().map(|&p| x.shape[p]).collect(), x.dtype)]
        }
        "Concat" => {
            let axis = norm_axis(
                node,
                node.attr_i("axis")
                    .ok_or_else(|| anyhow!("{}: Concat needs axis", node.describe()))?,
                r,
            )?;
            if axis == 0 && super::is_batched(ins) {
                bail!(
                    "{}: concatenating along the sample axis mixes samples",
                    node.describe()
                );
            }
            let mut shape = x.shape.clone();
            shape[axis] = 0;
            for i in ins.iter().flatten() {
                if i.shape.len() != r {
                    bail!("{}: inputs have different ranks", node.describe());
                }
                shape[axis] += i.shape[axis];
            }
            vec![(shape, x.dtype)]
        }
        "Slice" => {
            let vals: Vec<Option<&HostTensor>> = ins
                .iter()
                .map(|i| i.and_then(|i| i.value.as_ref()))
                .collect();
            let mut shape = x.shape.clone();
            for (a, s, e, st) in slice_params(node, &x.shape, &vals)? {
                shape[a] = (e - s).div_ceil(st);
            }
            vec![(shape, x.dtype)]
        }
        "Pad" => {
            let p = const_vals(node, ins, 1)?;
            if p.len() != 2 * r || p.iter().any(|&v| v < 0) {
                bail!(
                    "{}: pads {p:?} must be {} non-negative values for a rank-{r} input",
                    node.describe(),
                    2 * r
                );
            }
            let dims = (0..r)
                .map(|i| {
                    x.shape[i]
                        .checked_add(p[i] as usize)?
                        .checked_add(p[i + r] as usize)
                })
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| anyhow!("{}: padded size overflows", node.describe()))?;
            vec![(dims, x.dtype)]
        }
        "Gather" => {
            if x.kind == Kind::Batched {
                let axis = norm_axis(node, node.attr_i("axis").unwrap_or(0), r)?;
                if axis == 0 {
                    bail!(
                        "{}: gathering along the sample axis mixes samples",
                        node.describe()
                    );
                }
            }
            bail!(
                "{}: Gather on a non-constant tensor is not supported",
                node.describe()
            )
        }
        "Cast" => {
            let to = node.attr_i("to").unwrap_or(1) as i32;
            let dt = DType::from_onnx(to)
                .ok_or_else(|| anyhow!("{}: unsupported cast target", node.describe()))?;
            vec![(x.shape.clone(), dt)]
        }
        "Expand" => {
            let s: Vec<usize> = const_vals(node, ins, 1)?
                .iter()
                .map(|&d| d as usize)
                .collect();
            let out = super::broadcast(node, &x.shape, &s)?;
            super::check_batched_broadcast(node, &ins[..1], &out)?;
            vec![(out, x.dtype)]
        }
        "Shape" => vec![(vec![r], DType::I64)],
        _ => bail!(
            "{}: cannot infer shapes for a non-constant {}",
            node.describe(),
            node.op
        ),
    })
}

fn to_usize(v: &[i64]) -> Vec<usize> {
    v.iter().map(|&d| d.max(0) as usize).collect()
}

/// Cast and CastLike. One float type per graph: a float-to-float cast is lowered to the run's
/// float type, so an f64 run never drops to f32 mid-graph (and an f32 run does not widen);
/// casts to or from integers and bools are kept as written.
pub fn lower_cast(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let target = if node.op == "CastLike" {
        lw.input_info(&node, 1)?.dtype
    } else {
        let to = node.attr_i("to").unwrap_or(1) as i32;
        DType::from_onnx(to)
            .ok_or_else(|| anyhow!("{}: unsupported cast target {to}", node.describe()))?
    };
    let target = if x.dtype.is_float() && target.is_float() {
        lw.float
    } else {
        target
    };
    lw.add(
        Node::new(
            node.name.clone(),
            "Cast",
            vec![node.inputs[0].clone()],
            vec![node.outputs[0].clone()],
        )
        .with_attr(attr::i("to", target.onnx_code() as i64)),
    )
}

/// Constant folding.
pub fn eval(node: &Node, vals: &[Option<&HostTensor>]) -> Result<Vec<HostTensor>> {
    let x = vals.first().copied().flatten();
    let need = || x.ok_or_else(|| anyhow!("{}: missing input", node.describe()));
    macro_rules! each {
        ($t:expr, $a:ident => $body:expr) => {
            match $t {
                HostTensor::F32($a) => HostTensor::F32($body),
                HostTensor::F64($a) => HostTensor::F64($body),
                HostTensor::I64($a) => HostTensor::I64($body),
                HostTensor::Bool($a) => HostTensor::Bool($body),
            }
        };
    }
    let out = match node.op.as_str() {
        "Identity" => need()?.clone(),
        "Shape" => HostTensor::i64_vec(
            &need()?
                .shape()
                .iter()
                .map(|&d| d as i64)
                .collect::<Vec<_>>(),
        ),
        "Reshape" => {
            let s = to_usize(&vals[1].unwrap().as_i64_vec()?);
            each!(need()?, a => a.clone().into_shape_with_order(IxDyn(&s)).context("reshape")?)
        }
        "Transpose" => {
            let t = need()?;
            let r = t.shape().len();
            let perm = transpose_perm(node, r)?;
            each!(t, a => a.clone().permuted_axes(IxDyn(&perm)).as_standard_layout().to_owned())
        }
        "Concat" => {
            let parts: Vec<&HostTensor> = vals.iter().flatten().copied().collect();
            let r = parts.first().map_or(0, |p| p.shape().len());
            if r == 0 || parts.iter().any(|p| p.shape().len() != r) {
                bail!("{}: Concat needs inputs of one rank ≥ 1", node.describe());
            }
            let axis = Axis(norm_axis(node, node.attr_i("axis").unwrap_or(0), r)?);
            let dt = parts[0].dtype();
            let cast: Vec<HostTensor> = parts.iter().map(|p| p.cast(dt)).collect();
            macro_rules! cat {
                ($v:ident) => {{
                    let views: Vec<_> = cast
                        .iter()
                        .map(|p| match p {
                            HostTensor::$v(a) => a.view(),
                            _ => unreachable!(),
                        })
                        .collect();
                    HostTensor::$v(ndarray::concatenate(axis, &views)?)
                }};
            }
            match dt {
                DType::F32 => cat!(F32),
                DType::F64 => cat!(F64),
                DType::I64 => cat!(I64),
                DType::Bool => cat!(Bool),
            }
        }
        "Slice" => {
            let t = need()?;
            let sl = slice_params(node, &t.shape(), vals)?;
            each!(t, a => {
                let mut v = a.view();
                for &(ax, s, e, st) in &sl {
                    v.slice_axis_inplace(Axis(ax), Slice::new(s as isize, Some(e as isize), st as isize));
                }
                v.to_owned()
            })
        }
        "Pad" => bail!("{}: padding a constant is not supported", node.describe()),
        "Gather" => {
            let t = need()?;
            let r = t.shape().len();
            let axis = norm_axis(node, node.attr_i("axis").unwrap_or(0), r)?;
            let idx_t = vals[1].ok_or_else(|| anyhow!("{}: missing indices", node.describe()))?;
            let d = t.shape()[axis] as i64;
            let idx: Vec<usize> = idx_t
                .as_i64_vec()?
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + d } else { i };
                    if j < 0 || j >= d {
                        bail!(
                            "{}: index {i} out of range for axis of size {d}",
                            node.describe()
                        )
                    }
                    Ok(j as usize)
                })
                .collect::<Result<_>>()?;
            let ishape = idx_t.shape();
            let mut out_shape: Vec<usize> = t.shape()[..axis].to_vec();
            out_shape.extend(&ishape);
            out_shape.extend(&t.shape()[axis + 1..]);
            each!(t, a => a.select(Axis(axis), &idx).into_shape_with_order(IxDyn(&out_shape))?)
        }
        "Cast" => {
            let to = node.attr_i("to").unwrap_or(1) as i32;
            need()?.cast(
                DType::from_onnx(to)
                    .ok_or_else(|| anyhow!("{}: unsupported cast target", node.describe()))?,
            )
        }
        "Expand" => {
            let t = need()?;
            let s = to_usize(&vals[1].unwrap().as_i64_vec()?);
            let out = super::broadcast(node, &t.shape(), &s)?;
            fold_size(node, &out)?;
            each!(t, a => a.broadcast(IxDyn(&out)).ok_or_else(|| anyhow!("{}: bad expand", node.describe()))?.to_owned())
        }
        "ConstantOfShape" => {
            let s = to_usize(&need()?.as_i64_vec()?);
            fold_size(node, &s)?;
            let v = match node.attr_t("value") {
                Some(p) => HostTensor::from_proto(p)?,
                None => HostTensor::F32(ArrayD::zeros(IxDyn(&[1]))),
            };
            each!(&v, a => ArrayD::from_elem(IxDyn(&s), a.iter().next().copied().unwrap_or_default()))
        }
        "Range" => {
            let (s, l, d) = (
                need()?.to_f64(),
                vals[1].unwrap().to_f64(),
                vals[2].unwrap().to_f64(),
            );
            let (s, l, d) = (
                s.iter().next().copied().unwrap_or(0.0),
                l.iter().next().copied().unwrap_or(0.0),
                d.iter().next().copied().unwrap_or(1.0),
            );
            let count = ((l - s) / d).ceil().max(0.0);
            if !count.is_finite() || count > FOLD_LIMIT as f64 {
                bail!(
                    "{}: Range({s}, {l}, {d}) has {count} elements; constants are limited to {FOLD_LIMIT}",
                    node.describe()
                );
            }
            let count = count as usize;
            let v: Vec<f64> = (0..count).map(|i| s + i as f64 * d).collect();
            HostTensor::F64(ArrayD::from_shape_vec(IxDyn(&[count]), v)?).cast(need()?.dtype())
        }
        _ => bail!("{}: cannot fold", node.describe()),
    };
    Ok(vec![out])
}

/// Transpose's `perm` (default: reversed axes), checked to be a permutation of `0..r`.
fn transpose_perm(node: &Node, r: usize) -> Result<Vec<usize>> {
    let perm: Vec<usize> = match node.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| norm_axis(node, a, r))
            .collect::<Result<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..r).collect::<Vec<_>>() {
        bail!(
            "{}: perm {perm:?} is not a permutation of the {r} axes",
            node.describe()
        );
    }
    Ok(perm)
}

/// The most elements a folded constant may have: shape arithmetic never needs more, and a
/// hostile model must not make gradalign allocate without bound while reading it.
pub const FOLD_LIMIT: usize = 1 << 24;

fn fold_size(node: &Node, shape: &[usize]) -> Result<()> {
    // ndarray also refuses shapes whose non-zero axes overflow isize, even with a zero axis.
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |a, &d| a.checked_mul(d));
    if nonzero.is_none_or(|n| n > isize::MAX as usize) {
        bail!(
            "{}: folding it would create a constant of shape {shape:?}, whose size overflows",
            node.describe()
        );
    }
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n <= FOLD_LIMIT => Ok(()),
        n => bail!(
            "{}: folding it would create a constant of shape {shape:?} ({}); constants are limited to {FOLD_LIMIT} elements",
            node.describe(),
            n.map_or("more than 2^64 elements".into(), |n| format!("{n} elements"))
        ),
    }
}

/// Shift axes for gradients of parameter-only tensors, which carry a leading sample axis.
fn lifted(b: &Backward, name: &str) -> bool {
    b.info(name).kind == Kind::Param
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let Some(dy) = dys[0].clone() else {
        return Ok(vec![]);
    };
    let x = node.inputs[0].clone();
    let lift = lifted(b, &x);
    let dx = match node.op.as_str() {
        "Identity" => dy,
        "Reshape" => {
            let shape = b.grad_shape(&x);
            b.em.reshape(&dy, &shape)
        }
        "Cast" => {
            if !b.info(&x).dtype.is_float() {
                return Ok(vec![None]);
            }
            dy
        }
        "Transpose" => {
            let r = b.info(&x).shape.len();
            let perm = transpose_perm(node, r)?;
            let mut inv = vec![0; r];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            let inv: Vec<usize> = if lift {
                std::iter::once(0)
                    .chain(inv.iter().map(|&p| p + 1))
                    .collect()
            } else {
                inv
            };
            b.em.transpose(&dy, &inv)
        }
        "Concat" => {
            let r = b.info(&x).shape.len();
            let axis = norm_axis(node, node.attr_i("axis").unwrap(), r)?;
            let mut outs = vec![];
            let mut start = 0i64;
            for (i, name) in node.inputs.iter().enumerate() {
                let len = b.info(name).shape[axis] as i64;
                if b.needs_input(node, i) {
                    let la = if lifted(b, name) { axis + 1 } else { axis };
                    let s =
                        b.em.slice(&dy, &[start], &[start + len], &[la as i64], &[1]);
                    // A lifted input of a batched concat gets its per-sample gradient as is.
                    outs.push(Some(s));
                } else {
                    outs.push(None);
                }
                start += len;
            }
            if node.inputs.iter().any(|n| lifted(b, n))
                && node.inputs.iter().any(|n| b.info(n).kind == Kind::Batched)
            {
                bail!(
                    "{}: concatenating parameters with activations is not supported",
                    node.describe()
                );
            }
            return Ok(outs);
        }
        "Slice" => {
            let info = b.info(&x).clone();
            let vals: Vec<Option<&HostTensor>> = node
                .inputs
                .iter()
                .map(|s| b.infos.get(s).and_then(|i| i.value.as_ref()))
                .collect();
            let sl = slice_params(node, &info.shape, &vals)?;
            if sl.iter().any(|t| t.3 != 1) {
                bail!(
                    "{}: the gradient of a strided Slice is not supported",
                    node.describe()
                );
            }
            let off = lift as usize;
            let r = info.shape.len() + off;
            let mut pads = vec![0i64; 2 * r];
            for (a, s, e, _) in sl {
                pads[a + off] = s as i64;
                pads[a + off + r] = (info.shape[a] - e) as i64;
            }
            b.em.pad(&dy, &pads, 0.0)
        }
        "Pad" => {
            let info = b.info(&x).clone();
            if lift {
                bail!("{}: padding a parameter is not supported", node.describe());
            }
            let p = b
                .info(&node.inputs[1])
                .value
                .as_ref()
                .unwrap()
                .as_i64_vec()?;
            let r = info.shape.len();
            let axes: Vec<i64> = (0..r as i64).collect();
            let starts: Vec<i64> = (0..r).map(|i| p[i]).collect();
            let ends: Vec<i64> = (0..r).map(|i| p[i] + info.shape[i] as i64).collect();
            b.em.slice(&dy, &starts, &ends, &axes, &vec![1; r])
        }
        "Expand" => {
            let out_shape = b.grad_shape(&node.outputs[0]);
            b.unbroadcast(&dy, &out_shape, &x)?
        }
        _ => bail!("no gradient rule for {}", node.describe()),
    };
    Ok(vec![Some(dx)])
}

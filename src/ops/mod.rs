//! One file per op family. Each family gives, for its ops: lowering to a normalised primitive
//! form (`lower_*`), static shape inference (`infer`), constant folding (`eval`, where it
//! makes sense) and the reverse-mode rule (`backward`) that produces per-sample gradients.

pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod shape;

use anyhow::{bail, Result};

use crate::grad::analysis::Lowering;
use crate::grad::backward::Backward;
use crate::grad::{Info, Kind};
use crate::onnx::{DType, HostTensor, Node};

pub type Shapes = Vec<(Vec<usize>, DType)>;

/// Every op type gradalign accepts in a forward model.
pub const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "Greater",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Mul",
    "Neg",
    "PRelu",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Selu",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
];

pub fn unsupported(node: &Node) -> anyhow::Error {
    if !node.domain.is_empty() {
        return anyhow::anyhow!(
            "{}: operator '{}' is in domain '{}', and the logits depend on it; gradalign \
             differentiates default-domain ONNX ops only",
            node.describe(),
            node.op,
            node.domain
        );
    }
    anyhow::anyhow!(
        "{}: operator '{}' is not supported by gradalign's gradient builder. Supported operators: {}",
        node.describe(),
        node.op,
        SUPPORTED.join(", ")
    )
}

/// (min inputs, max inputs, min outputs, max outputs) of an ONNX op as gradalign reads it;
/// empty optional inputs count as present.
fn arity(op: &str) -> (usize, usize, usize, usize) {
    match op {
        "Constant" => (0, 0, 1, 1),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Greater" | "Less" | "MatMul"
        | "PRelu" | "CastLike" => (2, 2, 1, 1),
        "Max" | "Concat" => (1, usize::MAX, 1, 1),
        "Where" => (3, 3, 1, 1),
        "Conv" | "Gemm" => (2, 3, 1, 1),
        "BatchNormalization" => (5, 5, 1, 3),
        "InstanceNormalization" | "GroupNormalization" => (3, 3, 1, 1),
        "LayerNormalization" => (2, 3, 1, 3),
        "Dropout" => (1, 3, 1, 2),
        "Split" => (1, 2, 1, usize::MAX),
        "Slice" => (1, 5, 1, 1), // opset < 10 passes starts/ends as attributes
        "Pad" => (1, 4, 1, 1),   // opset < 11 passes pads as an attribute
        "Clip" => (1, 3, 1, 1),
        "Reshape" | "Expand" => (2, 2, 1, 1),
        "Squeeze" | "Unsqueeze" => (1, 2, 1, 1),
        "Range" => (3, 3, 1, 1),
        "Gather" => (2, 2, 1, 1),
        "ReduceMean" | "ReduceSum" => (1, 2, 1, 1),
        "MaxPool" => (1, 1, 1, 2),
        _ => (1, 1, 1, 1),
    }
}

/// Error unless the node has as many inputs and outputs as its op takes.
pub fn check_arity(node: &Node) -> Result<()> {
    let (lo, hi, olo, ohi) = arity(&node.op);
    let (i, o) = (node.inputs.len(), node.outputs.len());
    if i < lo || i > hi {
        anyhow::bail!(
            "{}: has {i} inputs; {} takes {}",
            node.describe(),
            node.op,
            if lo == hi {
                lo.to_string()
            } else if hi == usize::MAX {
                format!("at least {lo}")
            } else {
                format!("{lo} to {hi}")
            }
        );
    }
    if o < olo || o > ohi {
        anyhow::bail!(
            "{}: has {o} outputs; {} makes {olo} to {ohi}",
            node.describe(),
            node.op
        );
    }
    if node.inputs.iter().take(lo).any(|n| n.is_empty()) {
        anyhow::bail!("{}: a required input is empty", node.describe());
    }
    Ok(())
}

pub fn lower(lw: &mut Lowering, node: Node) -> Result<()> {
    if !node.domain.is_empty() {
        return Err(unsupported(&node));
    }
    check_arity(&node)?;
    match node.op.as_str() {
        "Constant" => shape::lower_constant(lw, node),
        "Identity" | "Dropout" => shape::lower_identity(lw, node),
        "Squeeze" | "Unsqueeze" | "Flatten" | "Reshape" => shape::lower_reshape(lw, node),
        "Split" => shape::lower_split(lw, node),
        "Cast" | "CastLike" => shape::lower_cast(lw, node),
        "Slice" => shape::lower_slice(lw, node),
        "Pad" => shape::lower_pad(lw, node),
        "BatchNormalization" => norm::lower_batch_norm(lw, node),
        "LayerNormalization" => norm::lower_layer_norm(lw, node),
        "InstanceNormalization" | "GroupNormalization" => norm::lower_instance_group_norm(lw, node),
        "Gelu" => elementwise::lower_gelu(lw, node),
        "Sigmoid" | "Erf" => elementwise::lower_f64_fallbacks(lw, node),
        "Clip" => elementwise::lower_clip(lw, node),
        "HardSigmoid" | "HardSwish" | "Elu" | "Selu" | "PRelu" => {
            elementwise::lower_piecewise(lw, node)
        }
        "Conv" => conv::lower(lw, node),
        "Gemm" => linear::lower_gemm(lw, node),
        "AveragePool" | "MaxPool" => pool::lower(lw, node),
        "ReduceMean" | "ReduceSum" => reduce::lower(lw, node),
        "Softmax" | "LogSoftmax" => reduce::lower_softmax(lw, node),
        op if SUPPORTED.contains(&op) => lw.add(node),
        _ => Err(unsupported(&node)),
    }
}

pub fn infer(node: &Node, ins: &[Option<&Info>], n: usize) -> Result<Shapes> {
    let _ = n;
    match node.op.as_str() {
        norm::STANDARDIZE => norm::infer(node, ins),
        "Conv" => conv::infer(node, ins),
        "AveragePool" | "MaxPool" | "GlobalAveragePool" => pool::infer(node, ins),
        "MatMul" => linear::infer(node, ins),
        "ReduceMean" | "ReduceSum" | "Softmax" | "LogSoftmax" => reduce::infer(node, ins),
        op if elementwise::OPS.contains(&op) => elementwise::infer(node, ins),
        op if shape::OPS.contains(&op) => shape::infer(node, ins),
        _ => Err(unsupported(node)),
    }
}

/// Fold a node whose inputs are all known constants; `None` when the op does not fold.
pub fn eval(node: &Node, vals: &[Option<&HostTensor>]) -> Option<Result<Vec<HostTensor>>> {
    let op = node.op.as_str();
    if shape::OPS.contains(&op) {
        return Some(shape::eval(node, vals));
    }
    if elementwise::OPS.contains(&op) {
        return elementwise::eval(node, vals);
    }
    None
}

/// Emit a forward node of the training graph: internal ops expand to standard ones.
pub fn emit_forward(em: &mut crate::grad::emit::Emitter, node: &Node) {
    match node.op.as_str() {
        norm::STANDARDIZE => norm::emit_forward(em, node),
        _ => em.copy_node(node),
    }
}

/// Whether gradients flow through the node at all (comparisons and casts to int do not).
pub fn differentiable(node: &Node) -> bool {
    !matches!(
        node.op.as_str(),
        "Shape" | "Equal" | "Greater" | "Less" | "ConstantOfShape" | "Range"
    )
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    match node.op.as_str() {
        norm::STANDARDIZE => norm::backward(b, node, dys),
        "Conv" => conv::backward(b, node, dys),
        "AveragePool" | "MaxPool" | "GlobalAveragePool" => pool::backward(b, node, dys),
        "MatMul" => linear::backward(b, node, dys),
        "ReduceMean" | "ReduceSum" | "Softmax" | "LogSoftmax" => reduce::backward(b, node, dys),
        op if elementwise::OPS.contains(&op) => elementwise::backward(b, node, dys),
        op if shape::OPS.contains(&op) => shape::backward(b, node, dys),
        _ => bail!("no gradient rule for {}", node.describe()),
    }
}

// ---- helpers shared by the families ----

pub fn input_info<'a>(node: &Node, ins: &[Option<&'a Info>], i: usize) -> Result<&'a Info> {
    match ins.get(i).copied().flatten() {
        Some(x) => Ok(x),
        None => bail!("{}: required input {i} is missing", node.describe()),
    }
}

/// Normalise a possibly negative axis for a tensor of rank `r`.
pub fn norm_axis(node: &Node, axis: i64, r: usize) -> Result<usize> {
    let a = if axis < 0 { axis + r as i64 } else { axis };
    if a < 0 || a >= r as i64 {
        bail!(
            "{}: axis {axis} is out of range for rank {r}",
            node.describe()
        );
    }
    Ok(a as usize)
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(node: &Node, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!(
                "{}: shapes {a:?} and {b:?} do not broadcast",
                node.describe()
            ),
        };
    }
    Ok(out)
}

/// Error unless a batched input keeps its sample axis first and unmixed under broadcasting
/// with the other operands.
pub fn check_batched_broadcast(node: &Node, ins: &[Option<&Info>], out: &[usize]) -> Result<()> {
    for i in ins.iter().flatten() {
        let aligned0 = if i.shape.len() == out.len() && !i.shape.is_empty() {
            Some(i.shape[0])
        } else {
            None
        };
        match i.kind {
            Kind::Batched if i.shape.len() != out.len() => bail!(
                "{}: a probe-dependent operand of shape {:?} is broadcast to {:?}, which would move the sample axis",
                node.describe(),
                i.shape,
                out
            ),
            Kind::Param | Kind::Const
                if ins.iter().flatten().any(|x| x.kind == Kind::Batched) && aligned0.is_some_and(|d| d != 1) =>
            {
                bail!(
                    "{}: an operand of shape {:?} spans the sample axis of {:?}, which would mix samples",
                    node.describe(),
                    i.shape,
                    out
                )
            }
            _ => {}
        }
    }
    Ok(())
}

pub fn is_batched(ins: &[Option<&Info>]) -> bool {
    ins.iter().flatten().any(|i| i.kind == Kind::Batched)
}

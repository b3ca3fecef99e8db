//! One file per op family. Each family lists its ops' [`OpDef`]s (`OPS`): lowering to a
//! normalised primitive form, static shape inference, constant folding where it makes sense,
//! the reverse-mode rule that produces per-sample gradients, and the roles of initializer
//! slots. Adding an op means adding its definition (and its rules) to one family file.

pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod norm_affine;
pub mod pool;
pub mod reduce;
pub mod shape;
pub mod standardize;
pub mod window;

use std::sync::OnceLock;

use anyhow::{bail, Result};

use super::rules::{OpDef, Registry, Slot};
use super::{Info, Kind};
use crate::onnx::Node;

pub use super::rules::Shapes;

/// Every op gradalign knows, from the families' definition lists.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Registry::new(&[
            conv::OPS,
            elementwise::OPS,
            linear::OPS,
            norm::OPS,
            norm_affine::OPS,
            pool::OPS,
            reduce::OPS,
            shape::OPS,
        ])
    })
}

/// The definition of a node's op (internal primitives included).
pub fn def(node: &Node) -> Option<&'static OpDef> {
    registry().get(&node.op)
}

/// A default-domain op a user's model may contain.
pub fn is_supported(node: &Node) -> bool {
    registry().source(node).is_some()
}

/// The role of the initializer at input `slot` of a source node (`Data` for unknown ops).
pub fn slot_role(node: &Node, slot: usize, ndim: usize) -> Slot {
    match registry().source(node) {
        Some(def) => (def.slots)(node, slot, ndim),
        None => Slot::Data,
    }
}

/// Whether gradients flow through a primitive at all (comparisons and shape computations do not).
pub fn differentiable(node: &Node) -> bool {
    def(node).is_none_or(|d| d.differentiable)
}

/// Emit a forward primitive into the training graph: internal ops expand to standard ones.
pub fn emit_forward(em: &mut super::emit::Emitter, node: &Node) {
    match def(node).and_then(|d| d.emit) {
        Some(emit) => emit(em, node),
        None => em.copy_node(node),
    }
}

/// Input gradients of a primitive from its output gradients.
pub fn backward(
    b: &mut super::backward::Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    match def(node).and_then(|d| d.backward) {
        Some(rule) => rule(b, node, dys),
        None => bail!("no gradient rule for {}", node.describe()),
    }
}

/// Multiply-accumulates per sample of a primitive (0 for ops that do no weighted sums).
pub fn macs(node: &Node, ins: &[Option<&Info>], out: &Info) -> f64 {
    def(node).and_then(|d| d.macs).map_or(0.0, |m| m(ins, out))
}

// ---- helpers shared by the families ----

/// A node's `axes` attribute as indices (empty when absent): the standardising ops, fused and
/// standard, carry the normalised axes this way.
pub fn node_axes(node: &Node) -> Vec<usize> {
    node.attr_ints("axes")
        .unwrap_or_default()
        .iter()
        .map(|&a| a as usize)
        .collect()
}

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

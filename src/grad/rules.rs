//! What gradalign knows about one ONNX op, as one value: [`OpDef`]. Every op family file in
//! `ops/` lists its ops' definitions; everything else (the supported list, arity checks,
//! lowering, shape inference, constant folding, the backward rule, which initializer slots hold
//! weights, biases or fixed hyper-parameters, multiply-accumulate counts) is read from them, so
//! adding an op touches its family file only.
//!
//! This module and the lowering/backward/emitter contexts import no op: the families depend on
//! them, and the drivers (`analysis`, `builder`) depend on the families through [`Registry`].

use std::collections::HashMap;

use anyhow::Result;

use super::backward::Backward;
use super::emit::Emitter;
use super::lowering::Lowering;
use super::Info;
use crate::onnx::{DType, HostTensor, Node};

/// Output (shape, dtype) per output of a node.
pub type Shapes = Vec<(Vec<usize>, DType)>;

/// Rewrite a source node into primitives (`lw.add` keeps it as it is).
pub type LowerFn = fn(&mut Lowering, Node) -> Result<()>;
/// Static shapes and dtypes of a primitive's outputs.
pub type InferFn = fn(&Node, &[Option<&Info>]) -> Result<Shapes>;
/// Fold a primitive whose inputs are all known constants; `None` when it does not fold.
pub type EvalFn = fn(&Node, &[Option<&HostTensor>]) -> Option<Result<Vec<HostTensor>>>;
/// Reverse-mode rule: input gradients from output gradients, as per-sample ONNX ops.
pub type BackwardFn = fn(&mut Backward, &Node, &[Option<String>]) -> Result<Vec<Option<String>>>;
/// Write an internal primitive into the training graph as standard ops.
pub type EmitFn = fn(&mut Emitter, &Node);
/// The role of the initializer at input `slot` of a source node (rank `ndim`).
pub type SlotFn = fn(&Node, usize, usize) -> Slot;
/// Multiply-accumulates per sample of a primitive, from its input and output infos.
pub type MacsFn = fn(&[Option<&Info>], &Info) -> f64;

/// What an initializer at one input slot of an op is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// An ordinary operand: trainable when it is a float initializer.
    Data,
    /// A weight (`--params weights`) whose output channels run along `channel_axis`.
    Weight { channel_axis: i64 },
    /// A bias of a weighted op.
    Bias,
    /// A statistic, shape or hyper-parameter: never trainable.
    Fixed,
}

/// Inputs and outputs an op takes; empty optional inputs count as present.
#[derive(Clone, Copy, Debug)]
pub struct Arity {
    pub min_in: usize,
    pub max_in: usize,
    pub min_out: usize,
    pub max_out: usize,
}

pub const fn arity(min_in: usize, max_in: usize, min_out: usize, max_out: usize) -> Arity {
    Arity {
        min_in,
        max_in,
        min_out,
        max_out,
    }
}

/// Unbounded input or output count.
pub const MANY: usize = usize::MAX;

/// One op's rules. Build entries from [`OP`] with struct-update syntax.
#[derive(Clone, Copy)]
pub struct OpDef {
    pub name: &'static str,
    /// Accepted in a user's model; `false` for gradalign's internal primitives.
    pub source: bool,
    pub arity: Arity,
    /// `None`: the node is kept as a primitive as it is.
    pub lower: Option<LowerFn>,
    /// `None`: the op never survives lowering.
    pub infer: Option<InferFn>,
    pub eval: Option<EvalFn>,
    pub backward: Option<BackwardFn>,
    /// `false`: gradients stop here by definition (comparisons, shape computations). A
    /// differentiable primitive without a backward rule is an error, never a silent zero.
    pub differentiable: bool,
    /// `None`: copied into the training graph unchanged.
    pub emit: Option<EmitFn>,
    pub slots: SlotFn,
    /// A float scalar initializer feeding this op is a constant of the architecture (`x * 0.5`),
    /// not a parameter.
    pub scalar_is_constant: bool,
    /// Changes only the layout or type of its first input: a weight may reach its slot
    /// through a chain of these (`MatMul(x, Transpose(W))`).
    pub view: bool,
    pub macs: Option<MacsFn>,
}

/// Every slot an ordinary operand.
pub fn data_slots(_: &Node, _: usize, _: usize) -> Slot {
    Slot::Data
}

/// Input 0 is data; every later input (shapes, axes, pads, bounds) is fixed.
pub fn fixed_after_first(_: &Node, slot: usize, _: usize) -> Slot {
    if slot == 0 {
        Slot::Data
    } else {
        Slot::Fixed
    }
}

/// No input is trainable.
pub fn all_fixed(_: &Node, _: usize, _: usize) -> Slot {
    Slot::Fixed
}

/// The defaults: a one-input, one-output source op kept as it is, with no rules.
pub const OP: OpDef = OpDef {
    name: "",
    source: true,
    arity: arity(1, 1, 1, 1),
    lower: None,
    infer: None,
    eval: None,
    backward: None,
    differentiable: true,
    emit: None,
    slots: data_slots,
    scalar_is_constant: false,
    view: false,
    macs: None,
};

/// The op definitions by name.
pub struct Registry {
    by_name: HashMap<&'static str, &'static OpDef>,
    /// Source ops, sorted, for messages.
    supported: Vec<&'static str>,
}

impl Registry {
    /// Errors on a name defined twice: two families must not both claim an op.
    pub fn new(families: &[&'static [OpDef]]) -> Registry {
        let mut by_name = HashMap::new();
        for def in families.iter().flat_map(|f| f.iter()) {
            let old = by_name.insert(def.name, def);
            assert!(old.is_none(), "op {} is defined twice", def.name);
        }
        let mut supported: Vec<&'static str> = by_name
            .values()
            .filter(|d| d.source)
            .map(|d| d.name)
            .collect();
        supported.sort_unstable();
        Registry { by_name, supported }
    }

    /// Any op, internal ones included.
    pub fn get(&self, op: &str) -> Option<&'static OpDef> {
        self.by_name.get(op).copied()
    }

    /// An op a user's model may contain (default ONNX domain).
    pub fn source(&self, node: &Node) -> Option<&'static OpDef> {
        if !node.domain.is_empty() {
            return None;
        }
        self.get(&node.op).filter(|d| d.source)
    }

    pub fn supported(&self) -> &[&'static str] {
        &self.supported
    }
}

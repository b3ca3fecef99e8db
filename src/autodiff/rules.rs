//! What gradalign knows about one ONNX op, as one value: [`OpDef`]. Every op family file in
//! `ops/` lists its ops' definitions; everything else (the supported list, arity checks,
//! lowering, shape inference, constant folding, the backward rule, which initializer slots hold
//! weights, biases or fixed hyper-parameters, multiply-accumulate counts) is read from them, so
//! adding an op touches its family file only.
//!
//! The lowering context lives here too: source nodes go in one at a time, primitives with static
//! shapes come out, and shape computations are folded to constants on the way. It dispatches
//! through the [`Registry`] it is handed, and an [`OpDef`] names it in its lowering rule, so the
//! two are one module rather than two that import each other.
//!
//! This module and the backward/emitter contexts import no op: the families depend on them, and
//! the drivers (`analysis`, `builder`) reach the families through [`Registry`].

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};

use super::backward::Backward;
use super::emit::Emitter;
use super::{GradOptions, Info, Kind};
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

// ---- The lowering context ----

/// State while lowering: receives primitive nodes one at a time.
pub struct Lowering<'a> {
    pub infos: &'a mut HashMap<String, Info>,
    pub out: Vec<Node>,
    pub opts: GradOptions,
    pub float: DType,
    pub n: usize,
    /// Batch size fixed in the exported model's input, if any (for `Reshape` constants that
    /// baked it in).
    pub export_batch: Option<usize>,
    pub opset: i64,
    /// Values whose samples an export merged with the next axis (a Reshape to `[N·k, …]`, as
    /// torch's dynamo exporter writes `k.transpose(-2, -1)` in attention), with their `k`. Such a
    /// value is kept as `[N, k, …]`, its samples still on axis 0, and only Reshape and Transpose
    /// may read it (see `ops/shape.rs`).
    pub merged: HashMap<String, usize>,
    rules: &'static Registry,
    counter: usize,
}

impl<'a> Lowering<'a> {
    pub fn new(
        infos: &'a mut HashMap<String, Info>,
        opts: GradOptions,
        float: DType,
        n: usize,
        export_batch: Option<usize>,
        opset: i64,
        rules: &'static Registry,
    ) -> Lowering<'a> {
        Lowering {
            infos,
            out: vec![],
            opts,
            float,
            n,
            export_batch,
            opset,
            merged: HashMap::new(),
            rules,
            counter: 0,
        }
    }

    /// Lower one source node: check it is a supported op with the right arity, then rewrite it
    /// into primitives (or keep it as one).
    pub fn lower(&mut self, node: Node) -> Result<()> {
        let Some(def) = self.rules.source(&node) else {
            return Err(unsupported(self.rules, &node));
        };
        check_arity(def, &node)?;
        if let Some(m) = node.inputs.iter().find(|i| self.merged.contains_key(*i)) {
            if !matches!(node.op.as_str(), "Reshape" | "Transpose") {
                bail!(
                    "{}: its input '{m}' holds the samples merged with another axis (a Reshape \
                     to [N·k, …], as torch's dynamo exporter writes attention); gradalign follows \
                     such a value through Transpose and Reshape only, until a Reshape gives the \
                     samples their own axis again. Export with dynamo=False (docs/exporters.md)",
                    node.describe()
                );
            }
        }
        match def.lower {
            Some(lower) => lower(self, node),
            None => self.add(node),
        }
    }

    pub fn info(&self, name: &str) -> Result<&Info> {
        self.infos
            .get(name)
            .ok_or_else(|| anyhow!("tensor '{name}' has no known shape"))
    }
    pub fn input_info(&self, node: &Node, i: usize) -> Result<&Info> {
        let name = node
            .input(i)
            .ok_or_else(|| anyhow!("{}: input {i} is required but missing", node.describe()))?;
        self.info(name)
    }
    /// The constant value of input `i`, or an error saying it must be constant.
    pub fn const_input(&self, node: &Node, i: usize) -> Result<Option<HostTensor>> {
        let Some(name) = node.input(i) else {
            return Ok(None);
        };
        let info = self.info(name)?;
        match &info.value {
            Some(v) => Ok(Some(v.clone())),
            None => bail!(
                "{}: input {i} ('{name}') must be a constant (an initializer or a foldable shape \
                 computation) for gradalign to know the shapes",
                node.describe()
            ),
        }
    }
    pub fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("ga.low.{hint}.{}", self.counter)
    }
    /// Add one primitive node named after `base` (the node being lowered), with a fresh output
    /// unless `out` names it; returns the output.
    pub fn emit(
        &mut self,
        base: &str,
        op: &str,
        ins: Vec<String>,
        out: Option<String>,
        attrs: Vec<crate::onnx::pb::AttributeProto>,
    ) -> Result<String> {
        let o = out.unwrap_or_else(|| self.fresh(&op.to_ascii_lowercase()));
        self.counter += 1;
        let mut n = Node::new(
            format!("{base}/{op}.{}", self.counter),
            op,
            ins,
            vec![o.clone()],
        );
        for a in attrs {
            n = n.with_attr(a);
        }
        self.add(n)?;
        Ok(o)
    }

    /// Register a constant tensor under a fresh name.
    pub fn konst(&mut self, t: HostTensor) -> String {
        let name = self.fresh("const");
        self.infos.insert(
            name.clone(),
            Info {
                shape: t.shape(),
                dtype: t.dtype(),
                kind: Kind::Const,
                value: Some(t),
            },
        );
        name
    }
    pub fn scalar(&mut self, v: f64) -> String {
        let t =
            HostTensor::F64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), v)).cast(self.float);
        self.konst(t)
    }
    pub fn set_const(&mut self, name: &str, t: HostTensor) {
        self.infos.insert(
            name.to_string(),
            Info {
                shape: t.shape(),
                dtype: t.dtype(),
                kind: Kind::Const,
                value: Some(t),
            },
        );
    }

    /// Infer a primitive node's outputs, fold it if all its inputs are known constants, and
    /// otherwise keep it.
    pub fn add(&mut self, node: Node) -> Result<()> {
        let ins: Vec<Option<&Info>> = node
            .inputs
            .iter()
            .map(|s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    self.info(s).map(Some)
                }
            })
            .collect::<Result<_>>()?;
        let kind = if ins.iter().flatten().any(|i| i.kind == Kind::Batched) {
            Kind::Batched
        } else if ins.iter().flatten().any(|i| i.kind == Kind::Param) {
            Kind::Param
        } else {
            Kind::Const
        };
        // Shape is known statically whatever its input depends on.
        if node.op == "Shape" {
            let shape = &ins[0]
                .ok_or_else(|| anyhow!("{}: missing input", node.describe()))?
                .shape;
            let start = node.attr_i("start").unwrap_or(0);
            let end = node.attr_i("end").unwrap_or(shape.len() as i64);
            let r = shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let dims: Vec<i64> = shape[clamp(start)..clamp(end).max(clamp(start))]
                .iter()
                .map(|&d| d as i64)
                .collect();
            self.set_const(&node.outputs[0], HostTensor::i64_vec(&dims));
            return Ok(());
        }
        let def = self.rules.get(&node.op);
        let all_known = ins.iter().flatten().all(|i| i.value.is_some());
        if kind == Kind::Const && all_known {
            let vals: Vec<Option<&HostTensor>> = ins
                .iter()
                .map(|i| i.and_then(|i| i.value.as_ref()))
                .collect();
            if let Some(res) = def.and_then(|d| d.eval).and_then(|eval| eval(&node, &vals)) {
                let outs = res.with_context(|| format!("while folding {}", node.describe()))?;
                for (name, t) in node.outputs.iter().zip(outs) {
                    if !name.is_empty() {
                        self.set_const(name, t);
                    }
                }
                return Ok(());
            }
        }
        let Some(infer) = def.and_then(|d| d.infer) else {
            return Err(unsupported(self.rules, &node));
        };
        let shapes = infer(&node, &ins)?;
        for (name, (shape, dtype)) in node.outputs.iter().zip(shapes) {
            if !name.is_empty() {
                self.infos.insert(
                    name.clone(),
                    Info {
                        shape,
                        dtype,
                        kind,
                        value: None,
                    },
                );
            }
        }
        self.out.push(node);
        Ok(())
    }
}

/// The error for an op gradalign cannot lower or differentiate, naming the node.
pub fn unsupported(rules: &Registry, node: &Node) -> anyhow::Error {
    if !node.domain.is_empty() {
        return anyhow!(
            "{}: operator '{}' is in domain '{}', and the logits depend on it; gradalign \
             differentiates default-domain ONNX ops only",
            node.describe(),
            node.op,
            node.domain
        );
    }
    anyhow!(
        "{}: operator '{}' is not supported by gradalign's gradient builder. Supported operators: {}",
        node.describe(),
        node.op,
        rules.supported().join(", ")
    )
}

/// Error unless the node has as many inputs and outputs as its op takes.
pub fn check_arity(def: &OpDef, node: &Node) -> Result<()> {
    let a = def.arity;
    let (i, o) = (node.inputs.len(), node.outputs.len());
    if i < a.min_in || i > a.max_in {
        bail!(
            "{}: has {i} inputs; {} takes {}",
            node.describe(),
            node.op,
            if a.min_in == a.max_in {
                a.min_in.to_string()
            } else if a.max_in == usize::MAX {
                format!("at least {}", a.min_in)
            } else {
                format!("{} to {}", a.min_in, a.max_in)
            }
        );
    }
    if o < a.min_out || o > a.max_out {
        bail!(
            "{}: has {o} outputs; {} makes {} to {}",
            node.describe(),
            node.op,
            a.min_out,
            a.max_out
        );
    }
    if node.inputs.iter().take(a.min_in).any(|n| n.is_empty()) {
        bail!("{}: a required input is empty", node.describe());
    }
    Ok(())
}

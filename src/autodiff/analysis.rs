//! Lowering and static analysis of the forward model for a fixed probe shape: every tensor gets
//! a shape, a dtype and a [`Kind`]; shape chains are folded to constants; composite ops
//! (BatchNormalization, LayerNormalization, Gelu, Split, ...) are rewritten into primitives so
//! that the backward pass only needs rules for primitives.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};

use super::ops;
use super::rules::Lowering;
use super::rules::Slot;
use super::{GradOptions, Info, Kind, ParamSelect};
use crate::onnx::{DType, HostTensor, Model, Node};

/// A trainable parameter (a float initializer that can receive a gradient).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Param {
    pub name: String,
    /// Op type of the first node that consumes it.
    pub op_type: String,
    /// Name of that node.
    pub node: String,
    pub shape: Vec<usize>,
    /// Feeds a weight slot (`Slot::Weight`: Conv, Gemm, MatMul), possibly through views.
    #[serde(skip)]
    pub is_weight: bool,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct Analysis {
    pub n: usize,
    pub float: DType,
    pub opts: GradOptions,
    /// Primitive nodes in topological order (folded constants removed).
    pub nodes: Vec<Node>,
    pub infos: HashMap<String, Info>,
    /// Every trainable parameter, in `graph.initializer` order.
    pub params: Vec<Param>,
    /// Values of the parameters, in the graph's float type.
    pub param_values: HashMap<String, HostTensor>,
    /// Parameters whose gradients are requested (by `--params`), in initializer order.
    pub selected: Vec<usize>,
    pub input: String,
    pub logits: String,
    pub num_classes: usize,
    /// Things the user should know (stripped softmax, ignored outputs, ...).
    pub notes: Vec<String>,
}

fn trainable_params(model: &Model) -> Vec<Param> {
    let mut first_use: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut weight: HashSet<&str> = HashSet::new();
    let mut trainable_use: HashSet<&str> = HashSet::new();
    for (ni, node) in model.nodes.iter().enumerate() {
        for (slot, inp) in node.inputs.iter().enumerate() {
            first_use.entry(inp.as_str()).or_insert((ni, slot));
            let role = ops::slot_role(node, slot, 0);
            if matches!(role, Slot::Weight { .. }) {
                weight.insert(inp.as_str());
            }
            if role != Slot::Fixed {
                trainable_use.insert(inp.as_str());
            }
        }
    }
    // A weight may reach its slot through views (how the legacy exporter writes nn.Linear on
    // sequences: MatMul(x, Transpose(W))): follow view chains back from the weight slots, so
    // such a weight is not silently left out of the default columns. Nodes are in topological
    // order, so one reverse pass covers chains of any length.
    for node in model.nodes.iter().rev() {
        let view = ops::registry().source(node).is_some_and(|d| d.view);
        if view
            && node
                .outputs
                .first()
                .is_some_and(|o| weight.contains(o.as_str()))
        {
            if let Some(src) = node.inputs.first() {
                weight.insert(src.as_str());
            }
        }
    }
    let mut params = vec![];
    for (name, t) in &model.initializers {
        if !t.dtype().is_float() || !trainable_use.contains(name.as_str()) {
            continue;
        }
        let is_weight = weight.contains(name.as_str());
        // A float scalar in arithmetic is a constant of the architecture (`x * 0`), not a
        // parameter; a one-element affine of a one-channel normalisation still is one.
        let (ni, _) = first_use[name.as_str()];
        let arithmetic = ops::registry()
            .source(&model.nodes[ni])
            .is_some_and(|d| d.scalar_is_constant);
        if t.len() <= 1 && !is_weight && arithmetic {
            continue;
        }
        params.push(Param {
            name: name.clone(),
            op_type: model.nodes[ni].op.clone(),
            node: model.nodes[ni].name.clone(),
            shape: t.shape(),
            is_weight,
        });
    }
    params
}

/// Indices of the nodes `output` depends on (nodes are in topological order; names may repeat).
fn ancestors(model: &Model, output: &str) -> HashSet<usize> {
    let mut needed: HashSet<&str> = HashSet::from([output]);
    let mut live = HashSet::new();
    for (i, node) in model.nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| needed.contains(o.as_str())) {
            live.insert(i);
            needed.extend(node.inputs.iter().map(String::as_str));
        }
    }
    live
}

/// The output taken as logits: the first one computed only by supported default-domain ops (a
/// classifier's probability output rather than its ArgMax label or ML-domain head), else the
/// first (whose unsupported op the lowering then names). Returns it with its ancestor nodes.
fn choose_output(model: &Model) -> (String, HashSet<usize>) {
    for out in &model.outputs {
        let live = ancestors(model, out);
        if live.iter().all(|&i| ops::is_supported(&model.nodes[i])) {
            return (out.clone(), live);
        }
    }
    let first = model.outputs[0].clone();
    let live = ancestors(model, &first);
    (first, live)
}

/// A warning when the model looks like a network whose BatchNorm the exporter removed: no
/// normalisation node at all, at least two convolutions, and either all of them carry a bias
/// (folded into them: tf2onnx, torch's dynamo exporter) or some have none
/// (bias-free convolutions are written to precede a norm layer; torch's dynamo exporter drops
/// BatchNorm of a `train()` model unless `optimize=False`). Either way these are gradients of
/// another function than the network's.
fn folded_norm_warning(model: &Model) -> Option<String> {
    let norm = model.nodes.iter().any(|n| {
        matches!(
            n.op.as_str(),
            "BatchNormalization"
                | "LayerNormalization"
                | "InstanceNormalization"
                | "GroupNormalization"
        )
    });
    let convs: Vec<&crate::onnx::Node> = model.nodes.iter().filter(|n| n.op == "Conv").collect();
    let unbiased = convs.iter().filter(|n| n.input(2).is_none()).count();
    let what = if norm || convs.len() < 2 {
        return None;
    } else if unbiased > 0 {
        format!(
            "the model has {} convolutions, {unbiased} of them without a bias, and nothing \
             normalises their output: bias-free convolutions are written to precede BatchNorm, \
             so the exporter probably removed it (torch.onnx.export(..., dynamo=True) does this \
             for a train() model unless optimize=False)",
            convs.len()
        )
    } else {
        format!(
            "the model has {} convolutions, all with a bias, and no normalisation layer: if \
             the network was built with BatchNorm, the exporter folded it into the convolutions \
             (tf2onnx does; so does torch.onnx.export(..., dynamo=True) unless optimize=False)",
            convs.len()
        )
    };
    Some(format!(
        "{}{what}, and these are gradients of a different function. Re-export keeping \
         BatchNorm as a node (PyTorch: torch.onnx.export(..., training=torch.onnx.TrainingMode.\
         TRAINING, do_constant_folding=False, dynamo=False), or dynamo=True with optimize=False); \
         see docs/exporters.md",
        super::WARNING
    ))
}

impl Analysis {
    /// Analyse `model` for a probe of shape `input_shape` (sample axis first).
    pub fn new(model: &Model, input_shape: &[usize], opts: GradOptions) -> Result<Analysis> {
        Self::new_inner(model, input_shape, opts)
            .with_context(|| format!("cannot differentiate {}", model.source))
    }

    fn new_inner(model: &Model, input_shape: &[usize], opts: GradOptions) -> Result<Analysis> {
        let (expected, random_notes) = super::stochastic::expect_random_masks(model)?;
        let model = expected.as_ref().unwrap_or(model);
        let rewritten = super::sample_axis::sink_leading_transposes(model);
        let model = rewritten.as_ref().unwrap_or(model);
        let float = opts.precision.dtype();
        let n = input_shape[0];
        if n == 0 {
            bail!("the probe batch is empty (0 samples)");
        }
        let input = match model.inputs.as_slice() {
            [one] => one,
            [] => bail!("the model has no graph input (besides initializers)"),
            many => bail!(
                "the model has {} inputs ({}); gradalign needs exactly one image input",
                many.len(),
                many.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        if !matches!(DType::from_onnx(input.elem_type), Some(d) if d.is_float()) {
            bail!(
                "input '{}' has type {}; a float image input is required",
                input.name,
                crate::onnx::tensor::onnx_type_name(input.elem_type)
            );
        }
        // Integer weights would only surface as a runtime type error deep in the training graph.
        for node in &model.nodes {
            for (slot, inp) in node.inputs.iter().enumerate() {
                if !matches!(ops::slot_role(node, slot, 0), Slot::Weight { .. }) {
                    continue;
                }
                if let Some((_, t)) = model.initializers.iter().find(|(k, _)| k == inp) {
                    if !t.dtype().is_float() {
                        bail!(
                            "{}: weight '{inp}' is {:?}; Conv/Gemm/MatMul weights must be float (re-export the model without quantisation)",
                            node.describe(),
                            t.dtype()
                        );
                    }
                }
            }
        }
        let mut export_batch = None;
        if let Some(dims) = &input.dims {
            if dims.len() != input_shape.len() {
                bail!(
                    "input '{}' has rank {} but the probe has shape {:?}",
                    input.name,
                    dims.len(),
                    input_shape
                );
            }
            for (i, (d, &p)) in dims.iter().zip(input_shape).enumerate().skip(1) {
                if let Some(d) = d {
                    if *d as usize != p {
                        bail!(
                            "input '{}' expects dimension {i} = {d} but the probe has shape {:?}",
                            input.name,
                            input_shape
                        );
                    }
                }
            }
            if let Some(b) = dims[0] {
                if b as usize != n {
                    export_batch = Some(b as usize);
                }
            }
        }

        let params = trainable_params(model);
        let param_names: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let mut infos: HashMap<String, Info> = HashMap::new();
        for (name, t) in &model.initializers {
            let t = if t.dtype().is_float() {
                t.cast(float)
            } else {
                t.clone()
            };
            let kind = if param_names.contains(name.as_str()) {
                Kind::Param
            } else {
                Kind::Const
            };
            let value = Some(t.clone());
            infos.insert(
                name.clone(),
                Info {
                    shape: t.shape(),
                    dtype: t.dtype(),
                    kind,
                    value,
                },
            );
        }
        // Parameters are never folded: move their value out so folding stops at them.
        let mut param_values = HashMap::new();
        for p in &params {
            let v = infos.get_mut(&p.name).unwrap().value.take().unwrap();
            param_values.insert(p.name.clone(), v);
        }
        infos.insert(
            input.name.clone(),
            Info {
                shape: input_shape.to_vec(),
                dtype: float,
                kind: Kind::Batched,
                value: None,
            },
        );

        let mut lw = Lowering::new(
            &mut infos,
            opts,
            float,
            n,
            export_batch,
            model.opset,
            ops::registry(),
        );
        // Only what the chosen output needs is lowered, so an unused head (a label ArgMax, an
        // ai.onnx.ml ZipMap) neither fails the model nor costs anything.
        let (chosen, live) = choose_output(model);
        for (_, node) in model
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| live.contains(i))
        {
            lw.lower(node.clone())
                .with_context(|| format!("at {}", node.describe()))?;
        }
        if lw.merged.contains_key(&chosen) {
            bail!(
                "the output '{chosen}' holds the samples merged with another axis (a Reshape to \
                 [N·k, …]); its rows are not one per sample"
            );
        }
        let mut nodes = lw.out;

        let mut notes = random_notes;
        notes.extend(folded_norm_warning(model));
        if model.outputs.len() > 1 {
            notes.push(format!(
                "the model has {} outputs; using '{}' as logits (the first whose computation is \
                 all supported ONNX ops; the others are not computed)",
                model.outputs.len(),
                chosen
            ));
        }
        let mut logits = chosen.clone();
        // Logits are taken before a final Softmax/LogSoftmax: the loss applies its own. Exporters
        // (skl2onnx, tf2onnx) put Identity or Cast nodes after it, which change no value: look
        // through them, or the loss would silently be taken on probabilities.
        let mut cur = logits.clone();
        let mut through = vec![];
        while let Some(node) = nodes.iter().find(|n| n.outputs.first() == Some(&cur)) {
            match node.op.as_str() {
                "Identity" | "Cast" if !node.inputs.is_empty() => {
                    through.push(node.op.clone());
                    cur = node.inputs[0].clone();
                }
                "Softmax" | "LogSoftmax" => {
                    let before = node.inputs[0].clone();
                    let via = if through.is_empty() {
                        String::new()
                    } else {
                        format!(" (through {})", through.join(", "))
                    };
                    notes.push(format!(
                        "the model ends in {}{via} ({}); its input '{before}' is used as logits",
                        node.op, node.name
                    ));
                    logits = before;
                    break;
                }
                _ => break,
            }
        }
        let li = infos
            .get(&logits)
            .ok_or_else(|| anyhow!("output '{logits}' has no known shape"))?;
        if li.kind != Kind::Batched || li.shape.len() != 2 || li.shape[0] != n {
            bail!(
                "the output '{logits}' must be logits of shape [N, classes] computed from the input; got {:?}",
                li.shape
            );
        }
        if !li.dtype.is_float() {
            bail!("the output '{logits}' is not a float tensor");
        }
        let num_classes = li.shape[1];

        // Keep only what the logits need.
        let mut live: HashSet<String> = HashSet::from([logits.clone()]);
        let mut keep = vec![false; nodes.len()];
        for (i, node) in nodes.iter().enumerate().rev() {
            if node.outputs.iter().any(|o| live.contains(o)) {
                keep[i] = true;
                live.extend(node.inputs.iter().filter(|s| !s.is_empty()).cloned());
            }
        }
        let mut k = keep.into_iter();
        nodes.retain(|_| k.next().unwrap());

        let selected = params
            .iter()
            .enumerate()
            .filter(|(_, p)| opts.params == ParamSelect::All || p.is_weight)
            .map(|(i, _)| i)
            .collect();
        Ok(Analysis {
            n,
            float,
            opts,
            nodes,
            infos,
            params,
            param_values,
            selected,
            input: input.name.clone(),
            logits,
            num_classes,
            notes,
        })
    }

    pub fn info(&self, name: &str) -> &Info {
        &self.infos[name]
    }
}

//! `GradGraphBuilder`: forward model + options → an ONNX training graph whose outputs are the
//! logits and, per selected parameter, the per-sample gradients `[N, numel]` of the
//! softmax cross-entropy of each sample.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

use super::analysis::Analysis;
use super::emit::{Emitter, OPSET};
use super::ops;
use super::sweep::{expose, leads_to_logits, reverse_sweep, Exposed};
use super::Kind;
use crate::onnx::{attr, pb, value_info, DType, HostTensor};

pub const INPUT_LABELS: &str = "labels";

/// One gradient output of the training graph.
#[derive(Clone, Debug)]
pub struct GradOutput {
    /// Index into `Analysis::params`.
    pub param: usize,
    /// Graph output name, `None` when the parameter cannot reach the loss (gradient is zero).
    pub output: Option<String>,
}

pub struct GradGraph {
    pub model: pb::ModelProto,
    pub input: String,
    pub labels: String,
    pub logits: String,
    /// One entry per selected parameter, in initializer order (empty without parameter
    /// gradients).
    pub grads: Vec<GradOutput>,
    /// Output holding ∂loss/∂input `[N, D]`, when asked for.
    pub input_grad: Option<String>,
    /// Outputs holding `input > 0` (bool) of every Relu, in graph order, with units per sample.
    pub relu_codes: Vec<(String, usize)>,
    /// Outputs holding every Conv node's output `[N, C·S]`, in graph order.
    pub feature_maps: Vec<FeatureOutput>,
    /// With `block_vjps`: one output per consecutive pair of block outputs.
    pub block_vjps: Vec<super::blocks::BlockVjpOutput>,
}

/// One Conv output of a graph built with `feature_maps`.
#[derive(Clone, Debug)]
pub struct FeatureOutput {
    /// The graph output holding it, `[N, channels · spatial]` in the run's float type.
    pub output: String,
    /// The Conv node it comes from.
    pub node: String,
    pub channels: usize,
    pub spatial: usize,
    /// Whether the output can change the logits at all (see [`influences_logits`]).
    pub live: bool,
}

/// Tensors whose value can change the logits: backward reachability from the logits that does
/// not pass a multiplication by a constant all-zero tensor (NAS-Bench-201's `none` edge is
/// x · 0; a Conv feeding only such edges computes features nothing downstream sees).
pub fn influences_logits(an: &Analysis) -> HashSet<String> {
    let zero = |t: &str| {
        an.infos
            .get(t)
            .and_then(|i| i.value.as_ref())
            .or_else(|| an.param_values.get(t))
            .is_some_and(|v| v.to_f64_vec().iter().all(|&x| x == 0.0))
    };
    leads_to_logits(an, |node| {
        !(node.op == "Mul" && node.inputs.iter().any(|i| zero(i)))
    })
}

/// `onehot(labels)` as `[n, k]` floats: the labels input compared with the classes 0..k.
fn onehot_labels(em: &mut Emitter, n: usize, k: usize) -> String {
    let classes = em.konst(HostTensor::I64(
        ArrayD::from_shape_vec(IxDyn(&[1, k]), (0..k as i64).collect()).unwrap(),
    ));
    let lab2 = em.reshape(INPUT_LABELS, &[n, 1]);
    let eq = em.op("Equal", &[&lab2, &classes], vec![]);
    em.cast_float(&eq)
}

/// What the differentiated scalar is, per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Loss {
    /// Softmax cross-entropy with the sample's label (the per-sample gradient of docs/semantics.md).
    #[default]
    CrossEntropy,
    /// The sum of the sample's logits (SynFlow's R, jacob_cov's Jacobian).
    SumLogits,
    /// The logit of the sample's label, z_{i, y_i}: run once per class with every label set to
    /// it, its per-sample gradients are the rows of the logits' Jacobian (VKDNW's Fisher).
    LabelLogit,
}

/// Which outputs the training graph has besides the logits.
#[derive(Clone, Copy, Debug)]
pub struct GraphSpec {
    pub loss: Loss,
    pub param_grads: bool,
    pub input_grad: bool,
    pub relu_codes: bool,
    /// With `relu_codes`: only the Relus whose input has this rank (TE-NAS hooks 4-D ones).
    pub relu_input_rank: Option<usize>,
    /// Every Conv node's output (the layers' feature maps, before any normalisation).
    pub feature_maps: bool,
    /// AZ-NAS trainability's vector-Jacobian products between consecutive block outputs.
    pub block_vjps: bool,
    /// Every `grad:<param>` output holds element 0 of the parameter's gradient only, `[N, 1]`
    /// (VKDNW's logit Jacobian), which spares the per-sample weight gradients of Conv layers.
    pub first_element_grads: bool,
}

impl Default for GraphSpec {
    fn default() -> Self {
        GraphSpec {
            loss: Loss::CrossEntropy,
            param_grads: true,
            input_grad: false,
            relu_codes: false,
            relu_input_rank: None,
            feature_maps: false,
            block_vjps: false,
            first_element_grads: false,
        }
    }
}

pub struct GradGraphBuilder<'a> {
    an: &'a Analysis,
    spec: GraphSpec,
    /// Emit gradient outputs for these parameters only (the backward pass is still built for
    /// all of `an.selected`, so the graph, and the runtime's choice of kernels, stay the same).
    outputs_only: Option<Vec<usize>>,
}

impl<'a> GradGraphBuilder<'a> {
    pub fn new(an: &'a Analysis) -> Self {
        Self::with_spec(an, GraphSpec::default())
    }

    pub fn with_spec(an: &'a Analysis, spec: GraphSpec) -> Self {
        GradGraphBuilder {
            an,
            spec,
            outputs_only: None,
        }
    }

    /// Output only the gradients of `params` (indices into `Analysis::params`).
    pub fn outputs_only(mut self, params: Vec<usize>) -> Self {
        self.outputs_only = Some(params);
        self
    }

    /// Tensors on a path from a selected parameter (or the input, for its gradient) to the
    /// logits.
    fn needs_grad(&self) -> HashSet<String> {
        let an = self.an;
        let mut reach: HashSet<String> = HashSet::new();
        if self.spec.param_grads {
            reach.extend(an.selected.iter().map(|&i| an.params[i].name.clone()));
        }
        if self.spec.input_grad {
            reach.insert(an.input.clone());
        }
        for node in &an.nodes {
            if node.inputs.iter().any(|i| reach.contains(i)) && ops::differentiable(node) {
                reach.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
            }
        }
        // Restrict to tensors that also lead to the logits.
        let leads = leads_to_logits(an, |_| true);
        reach.retain(|t| leads.contains(t));
        reach
    }

    pub fn build(&self) -> Result<GradGraph> {
        let an = self.an;
        let mut em = Emitter::new(an.float);

        // Forward: primitives, with constants and parameters as initializers.
        let mut emitted: HashSet<String> = HashSet::new();
        for node in &an.nodes {
            for inp in node.inputs.iter().filter(|s| !s.is_empty()) {
                let info = &an.infos[inp];
                if inp != &an.input && info.kind != Kind::Batched && !emitted.contains(inp) {
                    if let Some(v) = info.value.as_ref().or_else(|| an.param_values.get(inp)) {
                        em.initializer(inp, v);
                        emitted.insert(inp.clone());
                    }
                }
            }
            ops::emit_forward(&mut em, node);
        }
        let k = an.num_classes;
        let dlogits = match self.spec.loss {
            // d CE(z_i, y_i) / d z_i = softmax(z_i) - onehot(y_i), per sample.
            Loss::CrossEntropy => {
                let onehot = onehot_labels(&mut em, an.n, k);
                let probs = em.op("Softmax", &[&an.logits], vec![attr::i("axis", 1)]);
                em.sub(&probs, &onehot)
            }
            // d z_{i, y_i} / d z_i = onehot(y_i).
            Loss::LabelLogit => onehot_labels(&mut em, an.n, k),
            // d Σ_k z_ik / d z_i = 1. The labels input stays (unused) so every graph has the
            // same two inputs.
            Loss::SumLogits => {
                let ones = em.floats(ArrayD::from_elem(IxDyn(&[an.n, k]), 1.0));
                let zero = em.cast_float(INPUT_LABELS);
                let zero = em.mul_scalar(&zero, 0.0);
                let zero = em.reshape(&zero, &[an.n, 1]);
                em.add(&ones, &zero)
            }
        };

        // Backward.
        let needs = self.needs_grad();
        let mut grads: HashMap<String, String> = HashMap::new();
        if needs.contains(&an.logits) {
            grads.insert(an.logits.clone(), dlogits);
        }
        reverse_sweep(
            &mut em,
            an,
            &needs,
            &mut grads,
            self.spec.first_element_grads,
        )?;

        // Outputs.
        let mut outputs = vec![value_info(
            &an.logits,
            an.float,
            &an.infos[&an.logits].shape,
        )];
        let mut grad_outputs = vec![];
        let selected: &[usize] = match (&self.outputs_only, self.spec.param_grads) {
            (_, false) => &[],
            (Some(only), true) => only,
            (None, true) => &an.selected,
        };
        for &pi in selected {
            let p = &an.params[pi];
            let output = match grads.get(&p.name) {
                Some(g) => {
                    let name = format!("grad:{}", p.name);
                    let (g, units) = if self.spec.first_element_grads {
                        let shape = em.i64s(&[an.n as i64, -1]);
                        let flat = em.op("Reshape", &[g, &shape], vec![]);
                        (em.slice(&flat, &[0], &[1], &[1], &[1]), 1)
                    } else {
                        (g.clone(), p.numel())
                    };
                    let out = Exposed {
                        name: &name,
                        node: &p.name,
                        dtype: an.float,
                        units,
                    };
                    expose(&mut em, &mut outputs, &g, an.n, out);
                    Some(name)
                }
                None => None,
            };
            grad_outputs.push(GradOutput { param: pi, output });
        }

        let mut input_grad = None;
        if self.spec.input_grad {
            let d: usize = an.infos[&an.input].shape[1..].iter().product();
            let g = match grads.get(&an.input) {
                Some(g) => g.clone(),
                None => em.floats(ArrayD::zeros(IxDyn(&an.infos[&an.input].shape))),
            };
            let name = "grad:input".to_string();
            let out = Exposed {
                name: &name,
                node: "input",
                dtype: an.float,
                units: d,
            };
            expose(&mut em, &mut outputs, &g, an.n, out);
            input_grad = Some(name);
        }
        let mut relu_codes = vec![];
        if self.spec.relu_codes {
            let zero = em.scalar(0.0);
            let rank_ok = |x: &String| {
                self.spec
                    .relu_input_rank
                    .is_none_or(|r| an.infos[x].shape.len() == r)
            };
            for node in an
                .nodes
                .iter()
                .filter(|n| n.op == "Relu" && rank_ok(&n.inputs[0]))
            {
                let x = &node.inputs[0];
                let units: usize = an.infos[x].shape[1..].iter().product();
                let gt = em.op("Greater", &[x, &zero], vec![]);
                let name = format!("relu:{}", relu_codes.len());
                let out = Exposed {
                    name: &name,
                    node: &name,
                    dtype: DType::Bool,
                    units,
                };
                expose(&mut em, &mut outputs, &gt, an.n, out);
                relu_codes.push((name, units));
            }
        }
        let mut feature_maps = vec![];
        if self.spec.feature_maps {
            let live = influences_logits(an);
            for node in an.nodes.iter().filter(|n| n.op == "Conv") {
                let y = &node.outputs[0];
                let shape = &an.infos[y].shape;
                if shape.len() < 3 {
                    bail!(
                        "Conv node '{}': output of rank {} has no channel and spatial axes",
                        node.name,
                        shape.len()
                    );
                }
                let (channels, spatial) = (shape[1], shape[2..].iter().product::<usize>());
                let name = format!("feat:{}", feature_maps.len());
                let out = Exposed {
                    name: &name,
                    node: &name,
                    dtype: an.float,
                    units: channels * spatial,
                };
                expose(&mut em, &mut outputs, y, an.n, out);
                feature_maps.push(FeatureOutput {
                    output: name,
                    node: if node.name.is_empty() {
                        y.clone()
                    } else {
                        node.name.clone()
                    },
                    channels,
                    spatial,
                    live: live.contains(y),
                });
            }
        }

        let block_vjps = if self.spec.block_vjps {
            super::blocks::emit_block_vjps(&mut em, an, &mut outputs)?
        } else {
            vec![]
        };

        let graph = pb::GraphProto {
            name: "gradalign_training_graph".into(),
            node: em.nodes,
            initializer: em.initializers,
            input: vec![
                value_info(&an.input, an.float, &an.infos[&an.input].shape),
                value_info(INPUT_LABELS, DType::I64, &[an.n]),
            ],
            output: outputs,
            ..Default::default()
        };
        let model = pb::ModelProto {
            ir_version: 8,
            producer_name: "gradalign".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            graph: Some(graph),
            ..Default::default()
        };
        let mut model = model;
        if super::fused::uses_fused(&model) {
            model.opset_import.push(super::fused::opset_import());
        }
        Ok(GradGraph {
            model,
            input: an.input.clone(),
            labels: INPUT_LABELS.into(),
            logits: an.logits.clone(),
            grads: grad_outputs,
            input_grad,
            relu_codes,
            feature_maps,
            block_vjps,
        })
    }
}

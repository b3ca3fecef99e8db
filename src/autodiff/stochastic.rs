//! Training-mode exports keep the randomness of stochastic depth and dropout as ops.
//! torchvision's `StochasticDepth`, for one, exports as
//! `RandomUniformLike → Less(·, keep) → Cast(float) → Div(·, keep) → Mul(x, ·)`. A per-sample
//! gradient of one random draw is not a property of the architecture, so gradalign computes the
//! deterministic eval path instead, and says so: a random value compared with a constant and cast
//! to float (a Bernoulli mask) is replaced by its expectation, the probability of the comparison
//! holding. For the inverted masks exporters write (mask / keep) that expectation is exactly 1,
//! the eval path; the replacement is a constant, so no gradient flows through it, as none flows
//! through a random draw. An ONNX `Bernoulli` op is replaced by its input probabilities, and a
//! training-mode `Dropout` (lowered as the identity) gets the same note.
//!
//! Random values used any other way (noise added to activations, say) have no such exact
//! replacement: they are refused with the node named and the remedy (an eval-mode export).

use std::collections::{HashMap, HashSet};
use std::f64::consts::SQRT_2;

use anyhow::Result;
use ndarray::{ArrayD, IxDyn};

use crate::onnx::{attr, DType, HostTensor, Model, Node};

/// The distribution of a random op's values.
enum Law {
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, scale: f64 },
}

impl Law {
    fn of(node: &Node) -> Option<Law> {
        let f = |name: &str, default: f64| node.attr_f(name).map_or(default, f64::from);
        match node.op.as_str() {
            "RandomUniformLike" | "RandomUniform" => Some(Law::Uniform {
                low: f("low", 0.0),
                high: f("high", 1.0),
            }),
            "RandomNormalLike" | "RandomNormal" => Some(Law::Normal {
                mean: f("mean", 0.0),
                scale: f("scale", 1.0),
            }),
            _ => None,
        }
    }

    /// P(value < t); the laws are continuous, so also P(value ≤ t).
    fn below(&self, t: f64) -> f64 {
        match *self {
            Law::Uniform { low, high } => ((t - low) / (high - low)).clamp(0.0, 1.0),
            Law::Normal { mean, scale } => 0.5 * libm::erfc(-(t - mean) / (scale * SQRT_2)),
        }
    }
}

/// The float dtype a `Cast` writes, if it is one gradalign computes in.
fn cast_float(node: &Node) -> Option<DType> {
    DType::from_onnx(node.attr_i("to")? as i32).filter(|d| d.is_float())
}

/// A scalar constant of the source model: an initializer or a Constant node's value.
fn scalar(model: &Model, consts: &HashMap<&str, &Node>, name: &str) -> Option<f64> {
    let t = super::sample_axis::source_const(model, consts, name)?;
    (t.len() == 1).then(|| t.to_f64_vec()[0])
}

fn refuse(node: &Node, how: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {how}. gradalign computes the deterministic eval path of a training-mode export by \
         replacing a random mask (a random op compared with a constant, then cast to float: \
         stochastic depth, dropout) with its expectation, and nothing else random can be \
         replaced exactly. Export the model in eval mode (PyTorch: model.eval() before \
         torch.onnx.export) and keep BatchNorm in training mode if needed \
         (training=torch.onnx.TrainingMode.PRESERVE)",
        node.describe()
    )
}

/// Replace every random mask of `model` by its expectation (see the module comment). Returns
/// the rewritten model (`None` when it has no random op) and the notes to show the user.
pub fn expect_random_masks(model: &Model) -> Result<(Option<Model>, Vec<String>)> {
    let mut notes = vec![];
    let consts: HashMap<&str, &Node> = model
        .nodes
        .iter()
        .filter(|n| n.op == "Constant")
        .filter_map(|n| Some((n.outputs.first()?.as_str(), n)))
        .collect();
    // Dropout's third input, `training_mode`, when it is a constant true.
    let dropouts: Vec<&Node> = model
        .nodes
        .iter()
        .filter(|n| n.op == "Dropout")
        .filter(|n| {
            n.input(2)
                .and_then(|t| scalar(model, &consts, t))
                .is_some_and(|v| v != 0.0)
        })
        .collect();
    if let Some(first) = dropouts.first() {
        notes.push(format!(
            "{} Dropout node(s) in training mode (first: {}) are computed as the identity, the \
             deterministic eval path, not one random draw",
            dropouts.len(),
            first.describe()
        ));
    }
    let random = |n: &Node| Law::of(n).is_some() || n.op == "Bernoulli";
    if !model.nodes.iter().any(random) {
        return Ok((None, notes));
    }
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in model.nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            consumers.entry(inp.as_str()).or_default().push(i);
        }
    }
    let uses = |name: &str| consumers.get(name).cloned().unwrap_or_default();
    let mut dropped: HashSet<usize> = HashSet::new();
    let mut replaced: HashMap<usize, Vec<Node>> = HashMap::new();
    let mut masks: Vec<(String, f64)> = vec![];
    for (i, node) in model.nodes.iter().enumerate() {
        if node.op == "Bernoulli" {
            // The expectation of a Bernoulli draw is its probability input.
            let to = match node.attr_i("dtype") {
                None => None,
                Some(code) => match DType::from_onnx(code as i32).filter(|d| d.is_float()) {
                    Some(d) => Some(d),
                    None => return Err(refuse(node, "its draws are not float numbers")),
                },
            };
            let out = node.outputs[0].clone();
            let mut n = Node::new(
                node.name.clone(),
                "Identity",
                vec![node.inputs[0].clone()],
                vec![out],
            );
            if let Some(d) = to {
                n = Node::new(
                    node.name.clone(),
                    "Cast",
                    n.inputs.clone(),
                    n.outputs.clone(),
                )
                .with_attr(attr::i("to", d.onnx_code() as i64));
            }
            replaced.insert(i, vec![n]);
            masks.push((node.describe(), f64::NAN));
            continue;
        }
        let Some(law) = Law::of(node) else { continue };
        dropped.insert(i);
        for c in uses(&node.outputs[0]) {
            let cmp = &model.nodes[c];
            let random_first = cmp.inputs.first() == node.outputs.first();
            let other = if random_first {
                cmp.input(1)
            } else {
                cmp.input(0)
            };
            let threshold = other.and_then(|o| scalar(model, &consts, o));
            let (Some(t), true) = (
                threshold,
                matches!(
                    cmp.op.as_str(),
                    "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual"
                ),
            ) else {
                return Err(refuse(
                    node,
                    &format!(
                        "its random values feed {}, not a comparison with a constant",
                        cmp.describe()
                    ),
                ));
            };
            let less = matches!(cmp.op.as_str(), "Less" | "LessOrEqual");
            let p = if less == random_first {
                law.below(t)
            } else {
                1.0 - law.below(t)
            };
            dropped.insert(c);
            for k in uses(&cmp.outputs[0]) {
                let cast = &model.nodes[k];
                let Some(dtype) = (cast.op == "Cast").then(|| cast_float(cast)).flatten() else {
                    return Err(refuse(
                        node,
                        &format!(
                            "its random mask {} feeds {}, not a Cast to float",
                            cmp.describe(),
                            cast.describe()
                        ),
                    ));
                };
                let out = cast.outputs[0].clone();
                let shape = format!("{out}/expected_mask_shape");
                let shape_nodes = match node.attr_ints("shape") {
                    // RandomUniform/RandomNormal carry their shape; the *Like ops take their input's.
                    Some(s) if !node.op.ends_with("Like") => vec![Node::new(
                        format!("{shape}/const"),
                        "Constant",
                        vec![],
                        vec![shape.clone()],
                    )
                    .with_attr(attr::t("value", HostTensor::i64_vec(&s).to_proto("")))],
                    // The input's shape with its first axis set to 1: the expectation is the same
                    // for every sample, and a constant spanning the sample axis would look like
                    // one that mixes samples. Broadcasting gives the consumer the same shape.
                    _ => {
                        let ints = |name: &str, v: &[i64]| {
                            Node::new(
                                format!("{shape}/{name}"),
                                "Constant",
                                vec![],
                                vec![format!("{shape}/{name}")],
                            )
                            .with_attr(attr::t("value", HostTensor::i64_vec(v).to_proto("")))
                        };
                        let of = format!("{shape}/of");
                        let rest = format!("{shape}/rest");
                        vec![
                            Node::new(
                                of.clone(),
                                "Shape",
                                vec![node.inputs[0].clone()],
                                vec![of.clone()],
                            ),
                            ints("one", &[1]),
                            ints("end", &[i64::MAX]),
                            Node::new(
                                rest.clone(),
                                "Slice",
                                vec![
                                    of,
                                    format!("{shape}/one"),
                                    format!("{shape}/end"),
                                    format!("{shape}/zero"),
                                ],
                                vec![rest.clone()],
                            ),
                            ints("zero", &[0]),
                            Node::new(
                                shape.clone(),
                                "Concat",
                                vec![format!("{shape}/one"), rest],
                                vec![shape.clone()],
                            )
                            .with_attr(attr::i("axis", 0)),
                        ]
                    }
                };
                let value = HostTensor::F64(ArrayD::from_elem(IxDyn(&[1]), p)).cast(dtype);
                let fill = Node::new(cast.name.clone(), "ConstantOfShape", vec![shape], vec![out])
                    .with_attr(attr::t("value", value.to_proto("")));
                let mut new = shape_nodes;
                // Constants first: the Slice reads "zero", defined after it above.
                new.sort_by_key(|n| n.op != "Constant");
                new.push(fill);
                replaced.insert(k, new);
            }
            masks.push((node.describe(), p));
        }
    }
    let mut m = model.clone();
    m.nodes = vec![];
    for (i, n) in model.nodes.iter().enumerate() {
        if let Some(new) = replaced.remove(&i) {
            m.nodes.extend(new);
        } else if !dropped.contains(&i) {
            m.nodes.push(n.clone());
        }
    }
    if let Some((first, _)) = masks.first() {
        let mut keep: Vec<String> = masks
            .iter()
            .map(|(_, p)| {
                if p.is_nan() {
                    "its input".to_string()
                } else {
                    format!("{p:.4}")
                }
            })
            .collect();
        keep.dedup();
        notes.push(format!(
            "{} random mask(s) (first: {first}; stochastic depth or dropout in a training-mode \
             export) are replaced by their expectation (keep probability {}): the gradients are \
             those of the deterministic eval path, not of one random draw",
            masks.len(),
            keep.join(", ")
        ));
    }
    Ok((Some(m), notes))
}

#[cfg(test)]
mod tests {
    use super::Law;

    #[test]
    fn probabilities_of_the_laws() {
        let u = Law::Uniform {
            low: 0.0,
            high: 1.0,
        };
        assert_eq!(u.below(0.8), 0.8);
        assert_eq!(u.below(-1.0), 0.0);
        assert_eq!(u.below(2.0), 1.0);
        let n = Law::Normal {
            mean: 0.0,
            scale: 1.0,
        };
        assert!((n.below(0.0) - 0.5).abs() < 1e-15);
        // Φ(1.96) = 0.9750021048517795.
        assert!((n.below(1.96) - 0.975_002_104_851_779_5).abs() < 1e-14);
    }
}

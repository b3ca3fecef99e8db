//! Source-level rewrites that keep the sample axis first. Attention blocks split q, k and v with
//! `qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)` followed by `unbind(0)`: the Transpose
//! moves the sample axis to position 1 and the selection along axis 0 that follows moves it back.
//! Taken one op at a time the Transpose would have to be refused (per-sample rules need the
//! sample axis first), but the pair is a selection on the Transpose's *input* followed by a
//! Transpose that keeps the sample axis first:
//!
//! `Squeeze₀(Slice₀(Transpose_p(x))) = Transpose_p'(Squeeze_{p₀}(Slice_{p₀}(x)))`,
//!
//! and likewise for Split and for a scalar Gather. The identity holds for any tensor, so the
//! rewrite needs no knowledge of which tensors are per-sample; it applies only when every
//! consumer of the Transpose is such a selection, and leaves everything else to the usual checks.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::onnx::{attr, HostTensor, Model, Node};

/// A constant of the source model: an initializer, or the value of a Constant node.
pub(super) fn source_const<'m>(
    model: &'m Model,
    consts: &HashMap<&str, &Node>,
    name: &str,
) -> Option<Cow<'m, HostTensor>> {
    if let Some(t) = model.initializer(name) {
        return Some(Cow::Borrowed(t));
    }
    consts.get(name)?.constant_value().ok().map(Cow::Owned)
}

fn const_ints(model: &Model, consts: &HashMap<&str, &Node>, name: &str) -> Option<Vec<i64>> {
    source_const(model, consts, name)?.as_i64_vec().ok()
}

/// Whether a constant of the source model is a scalar (rank 0).
fn is_scalar(model: &Model, consts: &HashMap<&str, &Node>, name: &str) -> bool {
    source_const(model, consts, name).is_some_and(|t| t.shape().is_empty())
}

/// How a consumer of the Transpose selects along its axis 0.
enum Selection {
    /// Split or Slice along axis 0; each output must then be squeezed on axis 0.
    Keeps(usize),
    /// Gather of one scalar index along axis 0: the axis goes away.
    Drops(usize),
}

/// The axes a Squeeze removes (attribute before opset 13, input after).
fn squeeze_axes(model: &Model, consts: &HashMap<&str, &Node>, q: &Node) -> Option<Vec<i64>> {
    match q.input(1) {
        Some(a) => const_ints(model, consts, a),
        None => q.attr_ints("axes"),
    }
}

/// Rewrite every Transpose whose consumers all select along its axis 0 (see the module
/// comment); returns the rewritten model, or `None` when nothing applies.
pub fn sink_leading_transposes(model: &Model) -> Option<Model> {
    let consts: HashMap<&str, &Node> = model
        .nodes
        .iter()
        .filter(|n| n.op == "Constant" && n.domain.is_empty())
        .filter_map(|n| Some((n.outputs.first()?.as_str(), n)))
        .collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in model.nodes.iter().enumerate() {
        for inp in &n.inputs {
            consumers.entry(inp.as_str()).or_default().push(i);
        }
    }
    let uses = |name: &str| consumers.get(name).map_or(&[][..], |v| v.as_slice());
    let squeezed_on_0 = |name: &str| {
        !model.outputs.iter().any(|o| o == name)
            && uses(name).iter().all(|&q| {
                let q = &model.nodes[q];
                q.op == "Squeeze"
                    && q.inputs.first().is_some_and(|i| i == name)
                    && squeeze_axes(model, &consts, q).as_deref() == Some(&[0][..])
            })
    };
    // (transpose index, selections)
    let mut plans: Vec<(usize, Vec<Selection>)> = vec![];
    for (ti, t) in model.nodes.iter().enumerate() {
        if t.op != "Transpose" || !t.domain.is_empty() || t.inputs.is_empty() {
            continue;
        }
        let Some(perm) = t.attr_ints("perm") else {
            continue;
        };
        let y = t.outputs[0].as_str();
        if perm.first().is_none_or(|&p| p == 0) || model.outputs.iter().any(|o| o == y) {
            continue;
        }
        let mut sels = vec![];
        let ok = !uses(y).is_empty()
            && uses(y).iter().all(|&ci| {
                let c = &model.nodes[ci];
                if c.inputs.first().map(String::as_str) != Some(y)
                    || c.inputs[1..].iter().any(|i| i == y)
                {
                    return false;
                }
                let sel = match c.op.as_str() {
                    "Split" if c.attr_i("axis").unwrap_or(0) == 0 => Selection::Keeps(ci),
                    "Slice" if c.inputs.len() >= 4 => {
                        let axes = const_ints(model, &consts, &c.inputs[3]);
                        let steps = c
                            .input(4)
                            .map_or(Some(vec![1]), |s| const_ints(model, &consts, s));
                        if axes.as_deref() != Some(&[0][..]) || steps.as_deref() != Some(&[1][..]) {
                            return false;
                        }
                        Selection::Keeps(ci)
                    }
                    "Gather" if c.attr_i("axis").unwrap_or(0) == 0 => {
                        if !is_scalar(model, &consts, &c.inputs[1]) {
                            return false;
                        }
                        Selection::Drops(ci)
                    }
                    _ => return false,
                };
                let squeezed = match sel {
                    Selection::Keeps(_) => c.outputs.iter().all(|o| squeezed_on_0(o)),
                    Selection::Drops(_) => true,
                };
                sels.push(sel);
                squeezed
            });
        if ok {
            plans.push((ti, sels));
        }
    }
    if plans.is_empty() {
        return None;
    }

    let mut m = model.clone();
    let mut fresh = 0usize;
    let mut name = |hint: &str| {
        fresh += 1;
        format!("ga.sink.{hint}.{fresh}")
    };
    // New nodes to insert after an index (kept in order), and nodes to drop.
    let mut after: HashMap<usize, Vec<Node>> = HashMap::new();
    let mut drop = vec![false; m.nodes.len()];
    for (ti, sels) in plans {
        let t = model.nodes[ti].clone();
        let perm = t.attr_ints("perm").unwrap();
        let p = perm[0];
        // The Transpose left after removing axis p: the sample axis stays first.
        let rest: Vec<i64> = perm[1..]
            .iter()
            .map(|&v| if v > p { v - 1 } else { v })
            .collect();
        let x = t.inputs[0].clone();
        drop[ti] = true;
        let axis_const = |m: &mut Model, name: &mut dyn FnMut(&str) -> String| {
            let n = name("axis");
            m.initializers.push((n.clone(), HostTensor::i64_vec(&[p])));
            n
        };
        for sel in sels {
            let (ci, keeps) = match sel {
                Selection::Keeps(ci) => (ci, true),
                Selection::Drops(ci) => (ci, false),
            };
            let c = &mut m.nodes[ci];
            c.inputs[0] = x.clone();
            match c.op.as_str() {
                "Split" | "Gather" => {
                    c.attrs.retain(|a| a.name != "axis");
                    c.attrs.push(attr::i("axis", p));
                }
                _ => {
                    let a = axis_const(&mut m, &mut name);
                    m.nodes[ci].inputs[3] = a;
                }
            }
            let c = m.nodes[ci].clone();
            if !keeps {
                // Gather dropped axis p itself: transpose what is left.
                let z = name("gather");
                m.nodes[ci].outputs[0] = z.clone();
                after.entry(ci).or_default().push(
                    Node::new(
                        format!("{}/sink", c.name),
                        "Transpose",
                        vec![z],
                        c.outputs.clone(),
                    )
                    .with_attr(attr::ints("perm", &rest)),
                );
                continue;
            }
            for o in &c.outputs {
                for &qi in uses(o) {
                    let q = model.nodes[qi].clone();
                    let z = name("squeeze");
                    let mut sq = q.clone();
                    sq.outputs = vec![z.clone()];
                    if sq.inputs.len() > 1 {
                        sq.inputs[1] = axis_const(&mut m, &mut name);
                    } else {
                        sq.attrs.retain(|a| a.name != "axes");
                        sq.attrs.push(attr::ints("axes", &[p]));
                    }
                    m.nodes[qi] = sq;
                    after.entry(qi).or_default().push(
                        Node::new(format!("{}/sink", q.name), "Transpose", vec![z], q.outputs)
                            .with_attr(attr::ints("perm", &rest)),
                    );
                }
            }
        }
    }
    let old = std::mem::take(&mut m.nodes);
    for (i, n) in old.into_iter().enumerate() {
        if !drop[i] {
            m.nodes.push(n);
        }
        m.nodes.extend(after.remove(&i).unwrap_or_default());
    }
    Some(m)
}

//! Pieces the gradient graphs share: reachability towards the logits, one reverse-mode sweep,
//! and how a per-sample tensor becomes a graph output.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};

use super::analysis::Analysis;
use super::backward::Backward;
use super::emit::Emitter;
use super::ops;
use crate::onnx::{pb, value_info, DType, Node};

/// Tensors from which the logits can be reached, walking back only through the nodes `passes`
/// accepts (nodes are in topological order, so one reverse pass suffices).
pub fn leads_to_logits(an: &Analysis, passes: impl Fn(&Node) -> bool) -> HashSet<String> {
    let mut leads: HashSet<String> = HashSet::from([an.logits.clone()]);
    for node in an.nodes.iter().rev() {
        if node.outputs.iter().any(|o| leads.contains(o)) && passes(node) {
            leads.extend(node.inputs.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    leads
}

/// Reverse mode over `an.nodes` from the cotangents in `grads` (tensor → its gradient), through
/// the tensors in `needs` only; accumulates every reached tensor's gradient into `grads`.
pub fn reverse_sweep(
    em: &mut Emitter,
    an: &Analysis,
    needs: &HashSet<String>,
    grads: &mut HashMap<String, String>,
    first_element: bool,
) -> Result<()> {
    let mut b = Backward {
        em,
        infos: &an.infos,
        params: &an.param_values,
        needs,
        n: an.n,
        first_element,
    };
    for node in an.nodes.iter().rev() {
        let dys: Vec<Option<String>> = node.outputs.iter().map(|o| grads.get(o).cloned()).collect();
        if dys.iter().all(|d| d.is_none()) {
            continue;
        }
        if !node.inputs.iter().any(|i| needs.contains(i)) {
            continue;
        }
        let dxs = ops::backward(&mut b, node, &dys)
            .with_context(|| format!("differentiating {}", node.describe()))?;
        for (i, dx) in dxs.into_iter().enumerate() {
            let (Some(dx), Some(name)) = (dx, node.input(i)) else {
                continue;
            };
            if !needs.contains(name) {
                continue;
            }
            let acc = match grads.remove(name) {
                Some(prev) => b.em.add(&prev, &dx),
                None => dx,
            };
            grads.insert(name.to_string(), acc);
        }
    }
    Ok(())
}

/// A per-sample graph output: `name`, `[N, units]` of `dtype`, written by an Identity node
/// named `ga.out.<node>`.
pub struct Exposed<'s> {
    pub name: &'s str,
    pub node: &'s str,
    pub dtype: DType,
    pub units: usize,
}

/// Reshapes `value` to `[n, units]` and makes it the graph output `out.name`.
pub fn expose(
    em: &mut Emitter,
    outputs: &mut Vec<pb::ValueInfoProto>,
    value: &str,
    n: usize,
    out: Exposed,
) {
    let flat = em.reshape(value, &[n, out.units]);
    em.nodes.push(pb::NodeProto {
        input: vec![flat],
        output: vec![out.name.to_string()],
        name: format!("ga.out.{}", out.node),
        op_type: "Identity".into(),
        ..Default::default()
    });
    outputs.push(value_info(out.name, out.dtype, &[n, out.units]));
}

//! The graph part of AZ-NAS's trainability (docs/semantics.md, Scorers): a network's *block
//! outputs* and, for each consecutive pair, a vector-Jacobian product from the later one back to
//! the earlier one, seeded with fixed random signs.
//!
//! AZ-NAS hooks the outputs of the blocks a search space is made of (NAS-Bench-201's stem, cells
//! and residual blocks). An ONNX graph has no blocks, so they are recovered from its shape: a
//! *cut* is a batched tensor every path from the input to the logits passes through (a cell's or
//! a residual block's output, every tensor of a plain chain). A *run* is a sequence of cuts each
//! made from the previous one by a single node that is not a Conv (Conv → BatchNorm → Relu is one
//! run; a cell, whose paths branch and merge, starts a new one). Each run after the first Conv
//! gives its first 4-D cut with more than one position, taken after the BatchNormalization when
//! the run starts at a Conv: on NAS-Bench-201 the stem's normalised output and every cell's and
//! residual block's output, the authors' `extract_cell_features`; on a plain chain, each
//! Conv + BatchNormalization output. An exporter that merges identical computations (PyTorch
//! computes a pooling or zero edge shared by several nodes once) can make an extra cut inside a
//! cell, and so an extra block: the blocks are the graph's, not the source modules'. The
//! seeds are ±1 from SplitMix64, fixed per pair, so a score is repeatable;
//! the authors draw new Bernoulli signs on every call.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

use super::analysis::Analysis;
use super::emit::Emitter;
use super::sweep::{expose, leads_to_logits, reverse_sweep, Exposed};
use super::{ops, Kind};
use crate::onnx::pb;

/// One pair's graph output: ∂⟨s, to⟩/∂from for the fixed signs s, `[N, units of from]`.
#[derive(Clone, Debug)]
pub struct BlockVjpOutput {
    pub output: String,
    pub from: String,
    pub to: String,
    /// `[N, C, H, W]` of each end.
    pub from_shape: Vec<usize>,
    pub to_shape: Vec<usize>,
    /// Seed of the signs at `to` (see [`rademacher`]).
    pub seed: u64,
}

/// `len` values ±1 from SplitMix64 started at `seed`: bit 63 of each output set means −1.
pub fn rademacher(seed: u64, len: usize) -> Vec<f64> {
    let mut rng = crate::rng::Rng(seed);
    (0..len).map(|_| rng.sign()).collect()
}

/// The seed of pair `k`'s signs.
pub fn pair_seed(k: usize) -> u64 {
    0x0A2_0A5 + k as u64
}

/// What a lowered BatchNormalization is made of (standardisation, then the affine map with one
/// batched operand), through which a Conv's block output is advanced.
const NORMALISATION: &[&str] = &[
    "BatchNormalization",
    super::ops::norm::STANDARDIZE,
    super::ops::norm_affine::NORM_AFFINE,
    "Mul",
    "Add",
    "Sub",
    "Div",
];

/// The block outputs of the analysed network, in graph order (see the module docs).
pub fn block_outputs(an: &Analysis) -> Vec<String> {
    let leads = leads_to_logits(an, |_| true);
    let on = |t: &str| {
        an.infos
            .get(t)
            .is_some_and(|i| i.kind == Kind::Batched && leads.contains(t))
    };
    let on_node = |n: &crate::onnx::Node| n.outputs.iter().any(|o| on(o));
    let mut remaining: HashMap<&str, usize> = HashMap::new();
    for node in an.nodes.iter().filter(|n| on_node(n)) {
        for i in node.inputs.iter().filter(|i| on(i)) {
            *remaining.entry(i.as_str()).or_default() += 1;
        }
    }
    let mut open: HashSet<&str> = HashSet::new();
    if remaining.get(an.input.as_str()).is_some_and(|&c| c > 0) {
        open.insert(&an.input);
    }
    // A run: cuts each made from the previous one by a single node that is not a Conv. The
    // input's run precedes every Conv, so it is never a block.
    let mut blocks = vec![];
    let mut prev_cut = an.input.clone();
    let (mut pick, mut run_ok, mut advancing) = (None::<String>, false, false);
    let mut conv_seen = false;
    let candidate = |t: &str| {
        let shape = &an.infos[t].shape;
        shape.len() == 4 && shape[2] * shape[3] > 1
    };
    for node in an.nodes.iter().filter(|n| on_node(n)) {
        conv_seen |= node.op == "Conv";
        for i in node.inputs.iter().filter(|i| on(i)) {
            let c = remaining.get_mut(i.as_str()).expect("counted above");
            *c -= 1;
            if *c == 0 {
                open.remove(i.as_str());
            }
        }
        for o in node.outputs.iter().filter(|o| on(o)) {
            if remaining.get(o.as_str()).is_some_and(|&c| c > 0) {
                open.insert(o);
            }
        }
        let Some(&t) = open.iter().next().filter(|_| open.len() == 1) else {
            continue;
        };
        if !node.outputs.iter().any(|o| o == t) {
            continue;
        }
        let mut from: Vec<&str> = node
            .inputs
            .iter()
            .filter(|i| on(i))
            .map(|i| i.as_str())
            .collect();
        from.dedup();
        let same_run = node.op != "Conv" && from == [prev_cut.as_str()];
        if !same_run {
            if run_ok {
                blocks.extend(pick.take());
            }
            pick = candidate(t).then(|| t.to_string());
            // A Conv's output is taken after the normalisation that follows it.
            advancing = node.op == "Conv";
            run_ok = conv_seen;
        } else if pick.is_none() && candidate(t) {
            pick = Some(t.to_string());
        } else if advancing && NORMALISATION.contains(&node.op.as_str()) && candidate(t) {
            pick = Some(t.to_string());
        } else {
            advancing = false;
        }
        prev_cut = t.to_string();
    }
    if run_ok {
        blocks.extend(pick);
    }
    blocks
}

/// Emits one reverse sweep per consecutive pair of block outputs and exposes each result.
pub(super) fn emit_block_vjps(
    em: &mut Emitter,
    an: &Analysis,
    outputs: &mut Vec<pb::ValueInfoProto>,
) -> Result<Vec<BlockVjpOutput>> {
    let blocks = block_outputs(an);
    if blocks.len() < 2 {
        bail!(
            "found {} block output(s) (4-D feature maps every path to the logits passes through, \
             one per stretch between convolutions); AZ-NAS trainability needs at least two",
            blocks.len()
        );
    }
    let mut out = vec![];
    for (k, pair) in blocks.windows(2).enumerate() {
        let (from, to) = (&pair[0], &pair[1]);
        // Tensors on a path from `from` to `to`.
        let mut reach: HashSet<String> = HashSet::from([from.clone()]);
        for node in &an.nodes {
            if node.inputs.iter().any(|i| reach.contains(i)) && ops::differentiable(node) {
                reach.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
            }
        }
        let mut lead: HashSet<String> = HashSet::from([to.clone()]);
        for node in an.nodes.iter().rev() {
            if node.outputs.iter().any(|o| lead.contains(o)) {
                lead.extend(node.inputs.iter().filter(|s| !s.is_empty()).cloned());
            }
        }
        reach.retain(|t| lead.contains(t));
        let to_shape = an.infos[to].shape.clone();
        let seed = pair_seed(k);
        let signs = rademacher(seed, to_shape.iter().product());
        let signs = em.floats(ArrayD::from_shape_vec(IxDyn(&to_shape), signs)?);
        let mut grads = HashMap::from([(to.clone(), signs)]);
        reverse_sweep(em, an, &reach, &mut grads, false)?;
        let Some(g) = grads.get(from) else {
            bail!("block output '{to}' does not depend on the earlier block output '{from}'");
        };
        let from_shape = an.infos[from].shape.clone();
        let name = format!("bvjp:{k}");
        let exposed = Exposed {
            name: &name,
            node: &name,
            dtype: an.float,
            units: from_shape[1..].iter().product(),
        };
        expose(em, outputs, g, an.n, exposed);
        out.push(BlockVjpOutput {
            output: name,
            from: from.clone(),
            to: to.clone(),
            from_shape,
            to_shape,
            seed,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rademacher_is_balanced_and_repeatable() {
        let a = rademacher(7, 10_000);
        assert_eq!(a, rademacher(7, 10_000));
        assert_ne!(a, rademacher(8, 10_000));
        assert!(a.iter().all(|&v| v == 1.0 || v == -1.0));
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        // The first SplitMix64(0) output is 0xE220A8397B1DCDAF: bit 63 set.
        assert_eq!(rademacher(0, 1), vec![-1.0]);
    }
}

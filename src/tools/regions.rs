//! Linear regions at initialisation (issue 7): the number of distinct ReLU activation patterns
//! a network produces over a set of inputs, at the stored weights and under seeded relative
//! Gaussian perturbations `w ← w·(1 + σ·ε)`, and how stable the resulting ranking of a set of
//! models is.
//!
//! Two protocols:
//! - `probe` (default): the probe images (`--data`/`--n`, shipped CIFAR-10 by default), every
//!   Relu of the graph, BatchNormalization as in the rest of the tool (`--bn sample|eval`).
//! - `tenas`: TE-NAS (Chen, Gong & Wang, ICLR 2021; VITA-Group/TENAS,
//!   `lib/procedures/linear_region_counter.py` and `prune_tenas.py`): 3 batches of 1000 random
//!   crops of the source images at the model's input size, each crop keeping a random sorted
//!   subset of the channels (`RandChannel`), BatchNormalization with the statistics of each
//!   1000-sample batch (`train()`), and only ReLUs with 4-D inputs (its forward hook's test).
//!   TE-NAS runs this on a thin network (C = 1, one cell, no stem, 1×3×3 inputs); the xtask
//!   experiment builds that network with [`crate::tools::zoo::nb201_tenas_thin`].
//!
//! A pattern is the concatenation over the selected Relus of `input > 0` for one sample; the
//! count is the number of distinct patterns (TE-NAS's Σ 1/multiplicity is the same number).

use std::collections::HashSet;

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

use crate::autodiff::analysis::Analysis;
use crate::autodiff::builder::{GraphSpec, Loss};
use crate::autodiff::{BnMode, GradOptions, ParamSelect};
use crate::inputs::engine::build_graph_with;
use crate::inputs::passes::codes_from_outputs;
use crate::onnx::{DType, HostTensor, Model};
use crate::runtime::{self, Backend, Device};
use crate::tools::zoo::Rng;

/// How inputs are drawn and patterns defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The probe images, every Relu, BatchNormalization per `--bn`.
    #[default]
    Probe,
    /// TE-NAS: 3×1000 random crops (a random channel subset of the model's width), batch-statistics
    /// BN, ReLUs on 4-D tensors.
    Tenas,
}

/// TE-NAS's sampling: `sample_batch = 3` batches of `input_size[0] = 1000`.
pub const TENAS_BATCHES: usize = 3;
pub const TENAS_BATCH: usize = 1000;

/// The number of distinct rows of an `n × units` 0/1 matrix.
/// The same count as the `linear_regions` scorer: `n` comes from the code length.
pub fn count_patterns(codes: &[u8], units: usize) -> usize {
    if units == 0 {
        return 0;
    }
    let rows = codes.len() / units;
    gradalign_baselines::math::linear_regions(gradalign_plugin_api::Matrix {
        data: codes,
        rows,
        cols: units,
    }) as usize
}

/// The inputs patterns are collected on: one or more batches, run separately (batch-statistics
/// BN normalises within a batch), with the BN mode and Relu filter of the protocol.
#[derive(Clone, Debug)]
pub struct PatternInputs {
    pub batches: Vec<ArrayD<f32>>,
    pub bn: BnMode,
    pub relu_input_rank: Option<usize>,
}

impl PatternInputs {
    /// The probe protocol: the images as one batch.
    pub fn probe(images: &ArrayD<f32>, bn: BnMode) -> PatternInputs {
        PatternInputs {
            batches: vec![images.clone()],
            bn,
            relu_input_rank: None,
        }
    }

    /// The TE-NAS protocol: `batches × per_batch` crops of `source` (N×C×H×W, normalised) of the
    /// model's `sample` shape `[c, h, w]`. Within a batch, images are drawn without replacement
    /// when the source has enough of them (TE-NAS's shuffled loader), with replacement otherwise.
    pub fn tenas(
        source: &ArrayD<f32>,
        sample: &[usize],
        batches: usize,
        per_batch: usize,
        seed: u64,
    ) -> Result<PatternInputs> {
        let (&[c, h, w], &[n, sc, sh, sw]) = (sample, source.shape()) else {
            bail!(
                "--protocol tenas needs 4-D images and a model input [N, C, H, W]; got images {:?} and model sample shape {:?}",
                source.shape(),
                sample
            );
        };
        if c > sc || h > sh || w > sw || n == 0 {
            bail!(
                "--protocol tenas crops {c}×{h}×{w} inputs out of the probe images, which are {sc}×{sh}×{sw} ({n} of them)"
            );
        }
        let mut rng = Rng(seed ^ 0x7E_4A5_0000);
        let mut out = vec![];
        for _ in 0..batches {
            let mut order: Vec<usize> = (0..n).collect();
            let mut b = ndarray::Array4::<f32>::zeros((per_batch, c, h, w));
            for s in 0..per_batch {
                let img = if n >= per_batch {
                    // Partial Fisher–Yates: distinct images within the batch.
                    let j = s + rng.below(n - s);
                    order.swap(s, j);
                    order[s]
                } else {
                    rng.below(n)
                };
                let (y0, x0) = (rng.below(sh - h + 1), rng.below(sw - w + 1));
                let mut chans: Vec<usize> = (0..sc).collect();
                for k in 0..c {
                    let j = k + rng.below(sc - k);
                    chans.swap(k, j);
                }
                let mut chans = chans[..c].to_vec();
                chans.sort_unstable();
                for (k, &ch) in chans.iter().enumerate() {
                    for y in 0..h {
                        for x in 0..w {
                            b[[s, k, y, x]] = source[[img, ch, y0 + y, x0 + x]];
                        }
                    }
                }
            }
            out.push(b.into_dyn());
        }
        Ok(PatternInputs {
            batches: out,
            bn: BnMode::Batch,
            relu_input_rank: Some(4),
        })
    }

    pub fn total(&self) -> usize {
        self.batches.iter().map(|b| b.shape()[0]).sum()
    }
}

/// The ReLU codes of `model` over every batch of `inputs`, as (total × units bytes, units).
pub fn relu_codes(
    model: &Model,
    inputs: &PatternInputs,
    backend: Backend,
    device: Device,
) -> Result<(Vec<u8>, usize)> {
    let Some(first) = inputs.batches.first() else {
        bail!("no inputs to count linear regions on");
    };
    let opts = GradOptions {
        bn: inputs.bn,
        ..Default::default()
    };
    let spec = GraphSpec {
        loss: Loss::SumLogits,
        param_grads: false,
        input_grad: false,
        relu_codes: true,
        relu_input_rank: inputs.relu_input_rank,
        ..Default::default()
    };
    let n = first.shape()[0];
    let (an, gg) = build_graph_with(model, &first.shape()[1..], n, opts, spec)?;
    let runner = runtime::load(&gg.model, backend, device, an.float == DType::F64)?;
    let labels = ndarray::Array1::<i64>::zeros(n);
    let mut all = vec![];
    let mut units = 0;
    for b in &inputs.batches {
        if b.shape() != first.shape() {
            bail!("pattern batches must share one shape");
        }
        let outs = runner.run(&HostTensor::F32(b.clone()).cast(an.float), &labels)?;
        let (codes, u) = codes_from_outputs(&gg, &outs[1..], n)?;
        units = u;
        all.extend(codes);
    }
    Ok((all, units))
}

/// The linear-region count of `model` over `inputs`.
pub fn count_regions(
    model: &Model,
    inputs: &PatternInputs,
    backend: Backend,
    device: Device,
) -> Result<usize> {
    let (codes, units) = relu_codes(model, inputs, backend, device)?;
    Ok(count_patterns(&codes, units))
}

/// A copy of `model` with every trainable float parameter (Conv/Gemm/MatMul weights, biases,
/// normalisation affines: everything `--params all` selects) multiplied elementwise by
/// `1 + σ·ε`, ε ~ N(0, 1) drawn from `seed`. σ = 0 returns the stored weights bit for bit.
pub fn perturb_weights(
    model: &Model,
    sample_shape: &[usize],
    sigma: f64,
    seed: u64,
) -> Result<Model> {
    if !sigma.is_finite() || sigma < 0.0 {
        bail!("--perturb {sigma}: σ must be a finite number ≥ 0");
    }
    let mut shape1 = vec![1];
    shape1.extend(sample_shape);
    let all = GradOptions {
        params: ParamSelect::All,
        ..Default::default()
    };
    let trainable: HashSet<String> = Analysis::new(model, &shape1, all)?
        .params
        .into_iter()
        .map(|p| p.name)
        .collect();
    let mut rng = Rng(seed);
    let mut m = model.clone();
    for (name, t) in &mut m.initializers {
        if !trainable.contains(name) {
            continue;
        }
        *t = match t {
            HostTensor::F32(a) => {
                HostTensor::F32(a.mapv(|v| (v as f64 * (1.0 + sigma * rng.normal())) as f32))
            }
            HostTensor::F64(a) => HostTensor::F64(a.mapv(|v| v * (1.0 + sigma * rng.normal()))),
            _ => continue,
        };
    }
    Ok(m)
}

/// The seed of perturbation `repeat` (0-based) of a run seeded with `seed`: the same for every
/// model of a set, so a set is perturbed by one reproducible draw per repeat.
pub fn repeat_seed(seed: u64, repeat: usize) -> u64 {
    let mut r = Rng(seed.wrapping_add(0xA5A5_0000_0000_0000 ^ repeat as u64));
    r.next_u64()
}

/// The model's input sample shape when every non-batch dimension is fixed.
pub fn fixed_sample_shape(model: &Model) -> Option<Vec<usize>> {
    let d = model.inputs.first()?.dims.clone()?;
    d.get(1..)?
        .iter()
        .map(|x| x.filter(|&v| v > 0).map(|v| v as usize))
        .collect()
}

/// One model's counts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionCounts {
    pub model: String,
    /// At the stored weights.
    pub count: usize,
    /// Under each perturbation, in repeat order.
    pub perturbed: Vec<usize>,
}

impl RegionCounts {
    pub fn mean(&self) -> f64 {
        self.perturbed.iter().sum::<usize>() as f64 / self.perturbed.len().max(1) as f64
    }
    /// Sample standard deviation (n − 1); 0 for fewer than two repeats.
    pub fn std(&self) -> f64 {
        let k = self.perturbed.len();
        if k < 2 {
            return 0.0;
        }
        let m = self.mean();
        let ss: f64 = self.perturbed.iter().map(|&v| (v as f64 - m).powi(2)).sum();
        (ss / (k - 1) as f64).sqrt()
    }
}

/// Kendall τ-b between the stored-weight ranking and each perturbed ranking of a set of
/// models (`None` where it is undefined: fewer than two models, or all counts tied).
pub fn rank_stability(counts: &[RegionCounts]) -> Vec<Option<f64>> {
    let repeats = counts.first().map_or(0, |c| c.perturbed.len());
    let base: Vec<f64> = counts.iter().map(|c| c.count as f64).collect();
    (0..repeats)
        .map(|r| {
            let p: Vec<f64> = counts.iter().map(|c| c.perturbed[r] as f64).collect();
            crate::tools::stats::kendall_tau_b(&base, &p)
        })
        .collect()
}

/// Samples given as flat rows, stacked into one `[rows, sample…]` batch.
pub fn stack_rows(rows: &[Vec<f32>], sample: &[usize]) -> Result<ArrayD<f32>> {
    let mut shape = vec![rows.len()];
    shape.extend(sample);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), flat)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_rows() {
        let codes = [1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1];
        assert_eq!(count_patterns(&codes, 3), 3);
        assert_eq!(count_patterns(&codes[..3], 3), 1);
        assert_eq!(count_patterns(&[], 3), 0);
    }

    #[test]
    fn tenas_crops_come_from_the_source() {
        // Pixel value encodes (image, channel, y, x) so each crop can be traced back.
        let src = ArrayD::from_shape_fn(IxDyn(&[5, 3, 6, 6]), |i| {
            (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32
        });
        let p = PatternInputs::tenas(&src, &[1, 3, 3], 2, 4, 9).unwrap();
        assert_eq!(p.batches.len(), 2);
        assert_eq!(p.bn, BnMode::Batch);
        for b in &p.batches {
            assert_eq!(b.shape(), &[4, 1, 3, 3]);
            let mut imgs = vec![];
            for s in 0..4 {
                let v0 = b[[s, 0, 0, 0]] as usize;
                imgs.push(v0 / 1000);
                for y in 0..3 {
                    for x in 0..3 {
                        assert_eq!(b[[s, 0, y, x]] as usize, v0 + y * 10 + x);
                    }
                }
            }
            imgs.sort();
            imgs.dedup();
            assert_eq!(imgs.len(), 4, "distinct images within a batch");
        }
        let again = PatternInputs::tenas(&src, &[1, 3, 3], 2, 4, 9).unwrap();
        assert_eq!(p.batches, again.batches);
        assert!(PatternInputs::tenas(&src, &[4, 3, 3], 1, 4, 9).is_err());
    }

    #[test]
    fn repeat_seeds_differ() {
        let s: HashSet<u64> = (0..100).map(|r| repeat_seed(3, r)).collect();
        assert_eq!(s.len(), 100);
    }
}

//! Extra passes some scorers declare (docs/semantics.md, Scorers): ReLU codes and the input Jacobian of the summed
//! logits on the probe, and SynFlow's gradients of the BN-free |W| network on one all-ones input.
//! Each builds its own graph with [`GraphSpec`]; results are mapped onto the caller's columns by
//! parameter name.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use ndarray::{ArrayD, IxDyn};

use crate::autodiff::builder::{GradGraph, GraphSpec, Loss};
use crate::autodiff::{GradOptions, ParamSelect, Precision};
use crate::inputs::engine::{build_graph_with, load_probe_graph};
use crate::inputs::probe::Probe;
use crate::onnx::{HostTensor, Model};
use crate::runtime::{self, Backend, Device};

/// ReLU codes (N × units, 0/1), the per-sample input Jacobian of Σ logits (N × D, f64) and the
/// feature maps, as requested, from one forward/backward run on the probe.
pub struct ProbePass {
    pub relu_codes: Option<(Vec<u8>, usize)>,
    pub input_jacobian: Option<(Vec<f64>, usize)>,
    pub feature_maps: Option<FeatureMaps>,
}

/// Every Conv node's output for every sample: `data` is N × `units` f64, row-major; layer k's
/// block of a row starts at `layers[k].offset`, channel-major (channels × spatial). Either part
/// is computed only when asked for: the maps (`FEATURE_MAPS`) or each layer's channel
/// covariance (`FEATURE_COVARIANCE`, Σ channels² values), which needs one layer at a time only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureMaps {
    pub data: Option<Vec<f64>>,
    pub units: usize,
    pub layers: Vec<FeatureLayer>,
    pub covariance: Option<Vec<f64>>,
}

/// One layer's place in a row: the plugin SDK's own description, so host and plugins share it.
pub use gradalign_plugin_api::FeatureLayer;

/// Which extra outputs [`probe_pass`] computes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeOutputs {
    pub relu_codes: bool,
    pub input_jacobian: bool,
    pub feature_maps: bool,
    pub feature_covariance: bool,
}

pub fn probe_pass(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    backend: Backend,
    device: Device,
    want: ProbeOutputs,
) -> Result<ProbePass> {
    let spec = GraphSpec {
        loss: Loss::SumLogits,
        param_grads: false,
        input_grad: want.input_jacobian,
        relu_codes: want.relu_codes,
        feature_maps: want.feature_maps || want.feature_covariance,
        ..Default::default()
    };
    let (an, gg, runner) = load_probe_graph(model, probe, opts, spec, backend, device)?;
    let outs = runner.run(&probe.images_tensor().cast(an.float), &probe.labels)?;
    let n = probe.len();
    let mut next = 1; // output 0: logits
    let input_jacobian = match gg.input_grad {
        Some(_) => {
            let t = &outs[next];
            next += 1;
            Some((t.to_f64_vec(), t.shape()[1]))
        }
        None => None,
    };
    let relu_codes = if want.relu_codes {
        let c = codes_from_outputs(&gg, &outs[next..], n)?;
        next += gg.relu_codes.len();
        Some(c)
    } else {
        None
    };
    let feature_maps = if want.feature_maps || want.feature_covariance {
        Some(features_from_outputs(&gg, &outs[next..], n, want)?)
    } else {
        None
    };
    Ok(ProbePass {
        relu_codes,
        input_jacobian,
        feature_maps,
    })
}

/// The Conv outputs of a graph built with `feature_maps`: as N × units f64 and/or as each
/// layer's channel covariance, as `want` says.
fn features_from_outputs(
    gg: &GradGraph,
    outs: &[HostTensor],
    n: usize,
    want: ProbeOutputs,
) -> Result<FeatureMaps> {
    if gg.feature_maps.is_empty() {
        bail!("the model has no Conv: no feature maps to compute");
    }
    let mut layers = vec![];
    let mut units = 0;
    for f in &gg.feature_maps {
        layers.push(FeatureLayer {
            node: f.node.clone(),
            channels: f.channels,
            spatial: f.spatial,
            offset: units,
            live: f.live,
        });
        units += f.channels * f.spatial;
    }
    let mut data = want.feature_maps.then(|| vec![0.0f64; n * units]);
    let mut covariance = want
        .feature_covariance
        .then(|| Vec::with_capacity(layers.iter().map(|l| l.channels * l.channels).sum()));
    for (k, l) in layers.iter().enumerate() {
        let t = outs
            .get(k)
            .ok_or_else(|| anyhow!("feature map output {k} missing"))?;
        let v = t.to_f64_vec();
        let w = l.channels * l.spatial;
        if v.len() != n * w {
            bail!(
                "feature map of {} has {} values, {} expected",
                l.node,
                v.len(),
                n * w
            );
        }
        if let Some(cov) = covariance.as_mut() {
            cov.extend(channel_covariance(&v, n, l.channels, l.spatial));
        }
        if let Some(data) = data.as_mut() {
            for i in 0..n {
                data[i * units + l.offset..i * units + l.offset + w]
                    .copy_from_slice(&v[i * w..(i + 1) * w]);
            }
        }
    }
    Ok(FeatureMaps {
        data,
        units,
        layers,
        covariance,
    })
}

/// The C × C covariance of one layer's channels over all samples and positions: `v` is
/// N × (C · S), channel-major per sample. Centred first (no cancellation), then the Gram matrix
/// of the channel rows divided by N · S — the population covariance AZ-NAS takes.
pub fn channel_covariance(v: &[f64], n: usize, c: usize, s: usize) -> Vec<f64> {
    let m = n * s;
    let mut x = vec![0.0f64; c * m];
    for i in 0..n {
        for k in 0..c {
            x[k * m + i * s..k * m + (i + 1) * s]
                .copy_from_slice(&v[i * c * s + k * s..i * c * s + (k + 1) * s]);
        }
    }
    for row in x.chunks_mut(m.max(1)) {
        let mean = row.iter().sum::<f64>() / m as f64;
        row.iter_mut().for_each(|v| *v -= mean);
    }
    gradalign_plugin_api::linalg::gram_rows(&x, c, m)
        .into_iter()
        .map(|v| v / m as f64)
        .collect()
}

/// The `input > 0` outputs of a graph built with `relu_codes` (they follow the logits and the
/// input gradient), laid out as N × units bytes.
pub(crate) fn codes_from_outputs(
    gg: &GradGraph,
    outs: &[HostTensor],
    n: usize,
) -> Result<(Vec<u8>, usize)> {
    if gg.relu_codes.is_empty() {
        bail!("the model has no Relu: no ReLU codes to compute");
    }
    let units: usize = gg.relu_codes.iter().map(|(_, u)| u).sum();
    let mut codes = vec![0u8; n * units];
    let mut col = 0;
    for (k, (_, u)) in gg.relu_codes.iter().enumerate() {
        let HostTensor::Bool(a) = &outs[k] else {
            bail!("ReLU code output has an unexpected type");
        };
        let a = a.as_standard_layout();
        let flat = a
            .as_slice()
            .ok_or_else(|| anyhow!("non-contiguous codes"))?;
        for i in 0..n {
            for (dst, &b) in codes[i * units + col..i * units + col + u]
                .iter_mut()
                .zip(&flat[i * u..(i + 1) * u])
            {
                *dst = b as u8;
            }
        }
        col += u;
    }
    Ok((codes, units))
}

/// SynFlow (zero-cost-nas): BatchNormalization removed (identity), every trainable parameter
/// replaced by its absolute value, one all-ones input, R = Σ logits, gradients in f64 on tract.
/// Returns ∂R/∂θ per parameter name (flattened row-major).
pub fn synflow_grads(model: &Model, sample_shape: &[usize]) -> Result<HashMap<String, Vec<f64>>> {
    let all = GradOptions {
        params: ParamSelect::All,
        precision: Precision::F64,
        ..Default::default()
    };
    let mut shape1 = vec![1];
    shape1.extend(sample_shape);
    let trainable: Vec<String> = crate::autodiff::analysis::Analysis::new(model, &shape1, all)?
        .params
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let mut m = model.clone();
    for node in &mut m.nodes {
        if node.op == "BatchNormalization" {
            node.op = "Identity".into();
            node.inputs.truncate(1);
            node.outputs.truncate(1);
            node.attrs.clear();
        }
    }
    for (name, t) in &mut m.initializers {
        if trainable.contains(name) {
            *t = match t.cast(crate::onnx::DType::F64) {
                HostTensor::F64(a) => HostTensor::F64(a.mapv(f64::abs)).cast(t.dtype()),
                other => other,
            };
        }
    }
    let spec = GraphSpec {
        loss: Loss::SumLogits,
        ..Default::default()
    };
    let (an, gg) = build_graph_with(&m, sample_shape, 1, all, spec)?;
    let runner = runtime::load(&gg.model, Backend::Tract, Device::Cpu, true)?;
    let ones = HostTensor::F64(ArrayD::from_elem(IxDyn(&shape1), 1.0));
    let outs = runner.run(&ones, &ndarray::Array1::zeros(1))?;
    Ok(summed_grads_by_name(&an, &gg, &outs, 1).0)
}

/// The gradient outputs of one run, summed over the samples, per parameter name (zeros where a
/// parameter cannot reach the loss), and the index of the first output after them.
fn summed_grads_by_name(
    an: &crate::autodiff::analysis::Analysis,
    gg: &crate::autodiff::builder::GradGraph,
    outs: &[HostTensor],
    n: usize,
) -> (HashMap<String, Vec<f64>>, usize) {
    let mut sums = HashMap::new();
    let mut k = 1; // output 0: logits
    for g in &gg.grads {
        let p = &an.params[g.param];
        let mut v = vec![0.0; p.numel()];
        if g.output.is_some() {
            let rows = outs[k].to_f64_vec();
            k += 1;
            for row in rows.chunks(p.numel()).take(n) {
                v.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
        }
        sums.insert(p.name.clone(), v);
    }
    (sums, k)
}

/// Per-parameter-name sums over the probe of the per-sample gradients (f64), and the ReLU codes
/// of the same run.
fn batch_grads_and_codes(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
) -> Result<(HashMap<String, Vec<f64>>, Vec<bool>)> {
    let spec = GraphSpec {
        relu_codes: true,
        ..Default::default()
    };
    let (an, gg) = build_graph_with(model, probe.sample_shape(), probe.len(), opts, spec)?;
    let runner = runtime::load(&gg.model, Backend::Tract, Device::Cpu, true)?;
    let outs = runner.run(&probe.images_tensor().cast(an.float), &probe.labels)?;
    let (sums, k) = summed_grads_by_name(&an, &gg, &outs, probe.len());
    let mut codes = vec![];
    for t in &outs[k..] {
        let HostTensor::Bool(b) = t else {
            bail!("ReLU code output has an unexpected type")
        };
        codes.extend(b.iter().copied());
    }
    Ok((sums, codes))
}

/// H·g for GraSP: the Hessian of the summed per-sample loss with respect to the weights (Conv,
/// Gemm, MatMul) times the batch gradient g, by a one-sided difference of exact
/// f64 gradients along u = g/‖g‖: Hg ≈ ‖g‖ (∇L(θ + hu) − ∇L(θ)) / h, the base run giving g
/// itself (two gradient runs per model, not three). ReLU is piecewise linear, so the difference
/// equals autograd's Hessian-vector product only when no ReLU input changes sign between θ and
/// θ + hu; the ReLU codes of both runs are compared, the other side (−h) is tried, and h is
/// reduced until they agree. h = 3e-9 first balances roundoff (≈ 1e-16/h relative) against
/// truncation (≈ h times the third derivative's scale): worst 3.4e-7 relative to PyTorch's f64
/// double-backward GraSP on the fixtures (h = 1e-8: 1.1e-6, h = 1e-9: 7.1e-7).
pub fn hessian_grad_product(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
) -> Result<HashMap<String, Vec<f64>>> {
    let f64_weights = GradOptions {
        params: ParamSelect::Weights,
        precision: Precision::F64,
        ..opts
    };
    let (g, c0) = batch_grads_and_codes(model, probe, f64_weights)?;
    let norm = g.values().flatten().map(|v| v * v).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Ok(g
            .into_iter()
            .map(|(k, v)| (k, vec![0.0; v.len()]))
            .collect());
    }
    let shifted = |h: f64| -> Model {
        let mut m = model.clone();
        for (name, t) in &mut m.initializers {
            if let Some(gv) = g.get(name) {
                let HostTensor::F64(mut a) = t.cast(crate::onnx::DType::F64) else {
                    unreachable!("cast to f64")
                };
                for (w, d) in a.iter_mut().zip(gv) {
                    *w += h * d / norm;
                }
                *t = HostTensor::F64(a);
            }
        }
        m
    };
    for h in [3e-9, 3e-10, 3e-11] {
        for step in [h, -h] {
            let (moved, codes) = batch_grads_and_codes(&shifted(step), probe, f64_weights)?;
            if codes != c0 {
                continue; // a ReLU switched inside the step: not a Hessian of one linear region
            }
            return Ok(moved
                .into_iter()
                .map(|(k, p)| {
                    let hv = p
                        .iter()
                        .zip(&g[&k])
                        .map(|(a, b)| (a - b) / step * norm)
                        .collect();
                    (k, hv)
                })
                .collect());
        }
    }
    bail!("a ReLU changes sign within every difference step down to 3e-11: H·g is not defined here")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_covariance_pools_samples_and_positions() {
        // Channel 0 = [1, -1, 2, 0.5] (mean 0.625), channel 1 = [3, 1, -2, 0] (mean 0.5), as one
        // sample with 4 positions or as two samples with 2 positions each: by hand, var 1.171875
        // and 3.25, covariance -0.8125 (population: divided by 4).
        let one = [1.0, -1.0, 2.0, 0.5, 3.0, 1.0, -2.0, 0.0];
        let two = [1.0, -1.0, 3.0, 1.0, 2.0, 0.5, -2.0, 0.0];
        let want = [1.171875, -0.8125, -0.8125, 3.25];
        for got in [
            channel_covariance(&one, 1, 2, 4),
            channel_covariance(&two, 2, 2, 2),
        ] {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-12, "{got:?}");
            }
        }
    }

    fn liveness(arch: &str) -> Vec<bool> {
        let proto = crate::tools::zoo::nb201_model(arch, 0, 4, 1).unwrap();
        let model = Model::from_proto(&proto, "nb201").unwrap();
        let spec = GraphSpec {
            loss: Loss::SumLogits,
            param_grads: false,
            feature_maps: true,
            ..Default::default()
        };
        let (_, gg) =
            build_graph_with(&model, &[3, 32, 32], 2, GradOptions::default(), spec).unwrap();
        gg.feature_maps.iter().map(|f| f.live).collect()
    }

    #[test]
    fn convs_inside_dead_edges_are_not_live() {
        // node1 = conv(node0) feeds only `none` edges: the cell's one Conv (3 cells, one per
        // stage) computes features no later layer sees. The stem and the residual blocks' Convs
        // stay live.
        let dead = liveness("|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|");
        assert_eq!(dead.iter().filter(|l| !**l).count(), 3, "{dead:?}");
        assert!(dead[0], "the stem Conv reaches the logits");
        // Here node1 reaches the output through node2's Conv: every Conv is live.
        let live = liveness(
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
        );
        assert!(live.iter().all(|l| *l), "{live:?}");
        assert_eq!(live.len(), dead.len() + 3);
    }
}

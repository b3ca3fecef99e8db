//! ONNX Runtime (CPU) against tract on 50 generated NAS-Bench-201 architectures: per-sample
//! gradients per layer and the default scores. Skipped, saying so, when the ONNX Runtime
//! library is not available (`cargo xtask fetch-ort`).

mod common;

use gradalign::autodiff::GradOptions;
use gradalign::inputs::engine::per_sample_grads_with;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::{HostTensor, Model};
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::Registry;
use gradalign::scorers::score::score_model;

const ARCHS: usize = 50;
const N: usize = 8;

fn archs() -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/nb201_accuracies.csv"
    ))
    .unwrap();
    let all: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().to_string())
        .collect();
    // A fixed stride through the table: every op mix, no RNG dependency.
    (0..ARCHS)
        .map(|k| (k * 311 % all.len(), all[k * 311 % all.len()].clone()))
        .collect()
}

fn f32s(t: &HostTensor) -> Vec<f32> {
    match t {
        HostTensor::F32(a) => a.iter().copied().collect(),
        _ => panic!("f32 expected"),
    }
}

#[test]
fn ort_cpu_equals_tract_on_50_generated_architectures() {
    if let Some(why) = gradalign::runtime::ort::unavailable_reason() {
        common::skip(&why);
        return;
    }
    let probe = Probe::shipped(N).unwrap();
    let reg = Registry::builtin();
    let scorers = reg
        .select("gradalign-i,gradalign-ii,gradsign,grad_norm,snip")
        .unwrap();
    let (mut worst_layer, mut worst_sample, mut worst_score) = (0f64, 0f64, 0f64);
    let mut layers_above = 0;
    let mut score_rels = vec![];
    let mut layers = 0;
    for (idx, arch) in archs() {
        let proto = gradalign::tools::zoo::nb201_model(&arch, idx as u64, 16, 5).unwrap();
        let m = Model::from_proto(&proto, &format!("nb201 #{idx}")).unwrap();
        let a = per_sample_grads_with(&m, &probe, GradOptions::default(), true, Backend::Tract)
            .unwrap();
        let b =
            per_sample_grads_with(&m, &probe, GradOptions::default(), true, Backend::Ort).unwrap();
        let (ga, gb) = (f32s(&a.grads), f32s(&b.grads));
        let p = ga.len() / N;
        let global = ga.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        for e in &a.layout {
            let (mut scale, mut diff) = (0f64, 0f64);
            for i in 0..N {
                for j in e.offset..e.offset + e.numel {
                    scale = scale.max(ga[i * p + j].abs() as f64);
                    diff = diff.max((ga[i * p + j] - gb[i * p + j]).abs() as f64);
                }
            }
            let rel = if scale > 1e-6 * global {
                diff / scale
            } else {
                diff / global.max(1e-30)
            };
            layers += 1;
            if rel > 1e-5 {
                layers_above += 1;
            }
            worst_layer = worst_layer.max(rel);
        }
        for i in 0..N {
            let (mut d, mut s) = (0f64, 0f64);
            for j in 0..p {
                d += ((ga[i * p + j] - gb[i * p + j]) as f64).powi(2);
                s += (ga[i * p + j] as f64).powi(2);
            }
            if s > 0.0 {
                worst_sample = worst_sample.max((d / s).sqrt());
            }
        }
        let sa = score_model(
            &m,
            &probe,
            true,
            GradOptions::default(),
            Backend::Tract,
            Device::Cpu,
            &scorers,
        )
        .unwrap();
        let sb = score_model(
            &m,
            &probe,
            true,
            GradOptions::default(),
            Backend::Ort,
            Device::Cpu,
            &scorers,
        )
        .unwrap();
        for ((n, x), (_, y)) in sa.scores.iter().zip(&sb.scores) {
            let (x, y) = (x.unwrap(), y.unwrap());
            let rel = if x.abs() < 1.0 {
                (x - y).abs()
            } else {
                (x - y).abs() / x.abs()
            };
            score_rels.push(rel);
            if rel > 1e-4 {
                eprintln!("arch {idx} {n}: tract {x} vs ort {y} (rel {rel:e})");
            }
            worst_score = worst_score.max(rel);
        }
    }
    eprintln!(
        "{ARCHS} archs: worst per-layer max|Δ|/max|g| {worst_layer:e} ({layers_above} of {layers} layers above 1e-5), \
         worst per-sample rel. L2 {worst_sample:e}, worst score rel. diff {worst_score:e}"
    );
    // f32 through per-image BatchNorm is ill-conditioned (docs/results.md, Accuracy: PyTorch's own f32
    // gradients are up to 0.19 from f64 per sample). Measured here (N = 8): about half of the
    // layers agree to 1e-5, the worst sample to 0.10 (rel. L2); scores agree to 1e-7 in the
    // median and 1.5e-3 at worst (grad_norm). ORT has no float64 Conv, so an f64 parity check
    // is not possible; these bounds leave ~2x margin over the measurement.
    score_rels.sort_by(f64::total_cmp);
    let median = score_rels[score_rels.len() / 2];
    eprintln!(
        "score rel. diff: median {median:e}, 95th percentile {:e}",
        score_rels[score_rels.len() * 95 / 100]
    );
    assert!(worst_sample <= 0.2, "per-sample rel. L2 {worst_sample:e}");
    assert!(
        layers_above * 3 <= layers * 2,
        "{layers_above} of {layers} layers above 1e-5"
    );
    assert!(median <= 1e-5, "median score difference {median:e}");
    assert!(
        worst_score <= 1e-2,
        "worst score difference {worst_score:e}"
    );
}

//! Linear regions (issue 7): counts on a hand-built 2-D ReLU net with known regions, against
//! PyTorch's TE-NAS collector on the thin NB201 network (tests/golden/linear_regions.py), the
//! zoo's thin network against the PyTorch one, σ = 0 perturbation, and the CLI.

mod common;

use std::path::PathBuf;
use std::process::Command;

use gradalign::autodiff::BnMode;
use gradalign::onnx::{attr, HostTensor, Model};
use gradalign::runtime::{Backend, Device};
use gradalign::tools::regions::{
    count_patterns, count_regions, perturb_weights, relu_codes, stack_rows, PatternInputs,
};
use ndarray::{ArrayD, Axis, IxDyn};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn golden_dir() -> PathBuf {
    root().join("tests/golden/linear_regions")
}

fn golden() -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_slice(&std::fs::read(golden_dir().join("counts.json")).unwrap()).unwrap()
}

fn golden_inputs() -> ArrayD<f32> {
    match gradalign::inputs::npy::read(&golden_dir().join("inputs.npy")).unwrap() {
        HostTensor::F32(a) => a,
        other => panic!("inputs.npy: {:?}", other.dtype()),
    }
}

/// TE-NAS's batching of the golden inputs: 2 batches of 500, batch-statistics BN, 4-D ReLUs.
fn tenas_inputs(x: &ArrayD<f32>) -> PatternInputs {
    PatternInputs {
        batches: x
            .axis_chunks_iter(Axis(0), 500)
            .map(|c| c.to_owned())
            .collect(),
        bn: BnMode::Batch,
        relu_input_rank: Some(4),
    }
}

fn count(m: &Model, inputs: &PatternInputs) -> usize {
    count_regions(m, inputs, Backend::Tract, Device::Cpu).unwrap()
}

/// h = ReLU(W x + b) with four lines in general position in the plane — x = 0, y = 0,
/// x + y = 1, x − y = 2 — which cut it into 1 + 4 + C(4, 2) = 11 regions; a dense grid over
/// [−4, 4]² meets all of them (the smallest, a triangle of area 1/4, holds ~100 grid points).
#[test]
fn two_d_relu_net_has_the_known_number_of_regions() {
    let mut g = common::GraphSpec::new(&[2], 0);
    let w = g.tensor(
        "w1",
        HostTensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[4, 2]), vec![1., 0., 0., 1., 1., 1., 1., -1.]).unwrap(),
        ),
    );
    let b = g.tensor(
        "b1",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![0., 0., -1., -2.]).unwrap()),
    );
    let h = g.node("Gemm", &["x", &w, &b], vec![attr::i("transB", 1)]);
    let r = g.node("Relu", &[&h], vec![]);
    let w2 = g.param("w2", &[3, 4], 1.0);
    let z = g.node("Gemm", &[&r, &w2], vec![attr::i("transB", 1)]);
    let model = g.model(&z);

    let steps = 161; // spacing 0.05
    let pts: Vec<Vec<f32>> = (0..steps * steps)
        .map(|k| {
            let (i, j) = (k / steps, k % steps);
            vec![-4.0 + 0.05 * i as f32, -4.0 + 0.05 * j as f32]
        })
        .collect();
    let x = stack_rows(&pts, &[2]).unwrap();
    let inputs = PatternInputs::probe(&x, BnMode::Sample);
    assert_eq!(count(&model, &inputs), 11);

    // The same count straight from the four affine functions, without the engine.
    let codes: Vec<u8> = pts
        .iter()
        .flat_map(|p| {
            let (x, y) = (p[0], p[1]);
            [x > 0.0, y > 0.0, x + y - 1.0 > 0.0, x - y - 2.0 > 0.0].map(u8::from)
        })
        .collect();
    assert_eq!(count_patterns(&codes, 4), 11);
    let (engine_codes, units) = relu_codes(&model, &inputs, Backend::Tract, Device::Cpu).unwrap();
    assert_eq!(units, 4);
    assert_eq!(engine_codes, codes);

    // The half-plane y > 0.5: a convex domain cut by k lines into 1 + k + (crossings inside)
    // regions. x = 0, x + y = 1 and x − y = 2 cross it (y = 0 does not) and only the first two
    // meet inside it, at (0, 1): 1 + 3 + 1 = 5.
    let upper: Vec<Vec<f32>> = pts.iter().filter(|p| p[1] > 0.5).cloned().collect();
    let xu = stack_rows(&upper, &[2]).unwrap();
    let hand: Vec<u8> = upper
        .iter()
        .flat_map(|p| {
            let (x, y) = (p[0], p[1]);
            [x > 0.0, y > 0.0, x + y - 1.0 > 0.0, x - y - 2.0 > 0.0].map(u8::from)
        })
        .collect();
    let expected = count_patterns(&hand, 4);
    assert_eq!(expected, 5);
    assert_eq!(count(&model, &PatternInputs::probe(&xu, BnMode::Sample)), 5);
}

#[test]
fn thin_networks_match_pytorch_te_nas_counts() {
    let x = golden_inputs();
    for (name, g) in golden() {
        let m = Model::load(&golden_dir().join(format!("{name}.onnx"))).unwrap();
        let tenas = count(&m, &tenas_inputs(&x));
        assert_eq!(
            tenas as u64,
            g["tenas_distinct"].as_u64().unwrap(),
            "{name}: TE-NAS protocol"
        );
        // TE-NAS's Σ 1/multiplicity is the distinct count.
        assert!((g["tenas"].as_f64().unwrap() - tenas as f64).abs() < 1e-6);
        let sample = count(&m, &PatternInputs::probe(&x, BnMode::Sample));
        assert_eq!(
            sample as u64,
            g["sample"].as_u64().unwrap(),
            "{name}: per-sample BN"
        );
    }
}

/// The zoo's thin network is the PyTorch one: with the exported weights loaded by name it gives
/// the same counts.
#[test]
fn zoo_thin_network_is_te_nas_thin_network() {
    let x = golden_inputs();
    for (name, g) in golden() {
        let theirs = Model::load(&golden_dir().join(format!("{name}.onnx"))).unwrap();
        let proto =
            gradalign::tools::zoo::nb201_tenas_thin(g["arch"].as_str().unwrap(), 1).unwrap();
        let mut ours = Model::from_proto(&proto, "zoo thin").unwrap();
        let mut loaded = 0;
        for (n, t) in &mut ours.initializers {
            if let Some((_, v)) = theirs.initializers.iter().find(|(k, _)| k == n) {
                assert_eq!(t.shape(), v.shape(), "{name}: {n}");
                *t = v.clone();
                loaded += 1;
            }
        }
        let named = ours
            .initializers
            .iter()
            .filter(|(n, t)| t.dtype().is_float() && !n.starts_with("ga."))
            .count();
        assert_eq!(loaded, named, "{name}: every parameter found by name");
        assert_eq!(
            count(&ours, &tenas_inputs(&x)) as u64,
            g["tenas_distinct"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn zero_perturbation_reproduces_the_count_and_the_weights() {
    let x = golden_inputs();
    let m = Model::load(&golden_dir().join("thin_random_a.onnx")).unwrap();
    let inputs = tenas_inputs(&x);
    let base = count(&m, &inputs);
    let same = perturb_weights(&m, &[1, 3, 3], 0.0, 42).unwrap();
    for ((n, a), (_, b)) in m.initializers.iter().zip(&same.initializers) {
        assert_eq!(a.to_f64_vec(), b.to_f64_vec(), "{n}");
    }
    assert_eq!(count(&same, &inputs), base);

    let p = perturb_weights(&m, &[1, 3, 3], 1e-2, 42).unwrap();
    let again = perturb_weights(&m, &[1, 3, 3], 1e-2, 42).unwrap();
    let other = perturb_weights(&m, &[1, 3, 3], 1e-2, 43).unwrap();
    let mut changed = 0;
    for (((n, a), (_, b)), ((_, c), (_, d))) in m
        .initializers
        .iter()
        .zip(&p.initializers)
        .zip(again.initializers.iter().zip(&other.initializers))
    {
        assert_eq!(b.to_f64_vec(), c.to_f64_vec(), "{n}: same seed, same draw");
        let (a, b, d) = (a.to_f64_vec(), b.to_f64_vec(), d.to_f64_vec());
        if n.contains("running") {
            assert_eq!(a, b, "{n}: running statistics are not parameters");
            continue;
        }
        if n.ends_with("weight") && a.iter().any(|v| *v != 0.0) {
            assert_ne!(a, b, "{n}");
            assert_ne!(b, d, "{n}: another seed, another draw");
            changed += 1;
            // |Δw / w| = σ|ε|: a few σ at most.
            for (u, v) in a.iter().zip(&b) {
                if *u != 0.0 {
                    assert!(((v - u) / u).abs() < 1e-2 * 6.0, "{n}: {u} → {v}");
                }
            }
        }
    }
    assert!(changed >= 3, "{changed}");
    assert!(perturb_weights(&m, &[1, 3, 3], -1.0, 0).is_err());
    assert!(perturb_weights(&m, &[1, 3, 3], f64::NAN, 0).is_err());
}

fn gradalign() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gradalign"))
}

#[test]
fn cli_reports_counts_and_rank_stability() {
    let models: Vec<PathBuf> = ["nb201_all_none", "nb201_resnet_like", "nb201_random_a"]
        .iter()
        .map(|n| root().join(format!("models/{n}.onnx")))
        .collect();
    let out = gradalign()
        .arg("linear-regions")
        .args(&models)
        .args([
            "--repeats",
            "2",
            "--n",
            "16",
            "--format",
            "json",
            "--backend",
            "tract",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ms = v["models"].as_array().unwrap();
    assert_eq!(ms.len(), 3);
    // All-`none` cells zero every feature map: one pattern. The others separate all 16 images.
    assert_eq!(ms[0]["count"], 1);
    assert_eq!(ms[1]["count"], 16);
    assert_eq!(ms[1]["perturbed"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["rank_stability"]["kendall_tau_b"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A broken model costs its own row only; exit status 2.
    let dir = std::env::temp_dir().join(format!("ga-lr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.onnx");
    std::fs::write(&broken, b"not an onnx file").unwrap();
    let out = gradalign()
        .arg("linear-regions")
        .arg(&models[0])
        .arg(&broken)
        .args(["--repeats", "1", "--n", "8", "--backend", "tract"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("nb201_all_none"), "{stdout}");
    assert!(stderr.contains("broken.onnx"), "{stderr}");

    let out = gradalign()
        .arg("linear-regions")
        .arg(&models[0])
        .arg("--perturb=-1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--perturb"));
}

#[test]
fn cli_tenas_protocol_on_the_thin_network() {
    let dir = golden_dir();
    let out = gradalign()
        .arg("linear-regions")
        .arg(dir.join("thin_all_none.onnx"))
        .arg(dir.join("thin_random_a.onnx"))
        .args(["--protocol", "tenas", "--repeats", "1", "--format", "json"])
        .args(["--backend", "tract"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ms = v["models"].as_array().unwrap();
    assert_eq!(ms[0]["count"], 1);
    let c = ms[1]["count"].as_u64().unwrap();
    // 3000 single-channel 3×3 crops: many regions, never more than the samples.
    assert!(c > 100 && c <= 3000, "{c}");
}

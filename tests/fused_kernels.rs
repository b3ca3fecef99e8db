//! gradalign's fused kernels (ONNX Runtime custom ops, `ai.gradalign`) against the standard-op
//! form of the same gradient graph: the form tract, CUDA and `export-grad-graph` use, and the
//! one that the finite-difference tests of tests/gradient_rules.rs check. Every graph output
//! (logits, per-sample gradients) must agree. Skipped, saying so, without the ONNX Runtime
//! library (`cargo xtask fetch-ort`).

mod common;
use common::*;
use gradalign::autodiff::fused::{to_standard_ops, uses_fused, DOMAIN};
use gradalign::autodiff::{BnMode, GradOptions, ParamSelect, Precision};
use gradalign::inputs::engine::build_graph;
use gradalign::onnx::{HostTensor, Model};
use gradalign::runtime::{self, Backend, Device};

const N: usize = 4;

fn head(g: &mut GraphSpec, x: &str, features: usize, classes: usize) -> String {
    let f = g.node("Flatten", &[x], vec![a_i("axis", 1)]);
    let w = g.param("head.w", &[classes, features], 0.5);
    let b = g.param("head.b", &[classes], 0.5);
    g.node("Gemm", &[&f, &w, &b], vec![a_i("transB", 1)])
}

/// Conv → `norm` → Relu → Conv → BatchNormalization → Relu → head.
fn conv_norm(norm: &str) -> (Model, Vec<usize>) {
    let mut g = GraphSpec::new(&[3, 6, 6], 31);
    let w1 = g.param("c1.w", &[4, 3, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let scale = g.param("n.scale", &[4], 1.0);
    let bias = g.param("n.bias", &[4], 1.0);
    let y = match norm {
        "GroupNormalization" => g.node(
            norm,
            &[&c1, &scale, &bias],
            vec![a_f("epsilon", 1e-5), a_i("num_groups", 2)],
        ),
        "BatchNormalization" => {
            let m = g.param("n.mean", &[4], 0.3);
            let v = g.tensor(
                "n.var",
                HostTensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 0.5)),
            );
            g.node(
                norm,
                &[&c1, &scale, &bias, &m, &v],
                vec![a_f("epsilon", 1e-5)],
            )
        }
        _ => g.node(norm, &[&c1, &scale, &bias], vec![a_f("epsilon", 1e-5)]),
    };
    let r = g.node("Relu", &[&y], vec![]);
    let w2 = g.param("c2.w", &[5, 4, 3, 3], 0.5);
    let c2 = g.node("Conv", &[&r, &w2], vec![]);
    let s2 = g.param("bn.scale", &[5], 1.0);
    let b2 = g.param("bn.bias", &[5], 1.0);
    let m2 = g.param("bn.mean", &[5], 0.3);
    let v2 = g.tensor(
        "bn.var",
        HostTensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[5]), 1.5)),
    );
    let bn = g.node(
        "BatchNormalization",
        &[&c2, &s2, &b2, &m2, &v2],
        vec![a_f("epsilon", 1e-5)],
    );
    let r2 = g.node("Relu", &[&bn], vec![]);
    let z = head(&mut g, &r2, 5 * 4 * 4, 3);
    (g.model(&z), g.input_shape.clone())
}

/// MatMul → LayerNormalization → Relu → head: no Conv, so ONNX Runtime also runs it in f64.
fn mlp_layer_norm() -> (Model, Vec<usize>) {
    let mut g = GraphSpec::new(&[7], 32);
    let w1 = g.param("fc1.w", &[7, 12], 0.5);
    let h = g.node("MatMul", &["x", &w1], vec![]);
    let s = g.param("ln.scale", &[12], 1.0);
    let b = g.param("ln.bias", &[12], 0.5);
    let ln = g.node("LayerNormalization", &[&h, &s, &b], vec![a_i("axis", -1)]);
    let r = g.node("Relu", &[&ln], vec![]);
    let z = head(&mut g, &r, 12, 4);
    (g.model(&z), g.input_shape.clone())
}

fn to_f64(t: &HostTensor) -> Vec<f64> {
    match t {
        HostTensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        HostTensor::F64(a) => a.iter().copied().collect(),
        HostTensor::Bool(a) => a.iter().map(|&v| v as u8 as f64).collect(),
        HostTensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
    }
}

/// Largest |a − b| / max|b| over the outputs, output by output.
fn worst_relative(a: &[HostTensor], b: &[HostTensor]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst: f64 = 0.0;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.shape(), y.shape());
        let (x, y) = (to_f64(x), to_f64(y));
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        for (p, q) in x.iter().zip(&y) {
            assert!(p.is_finite(), "non-finite output");
            worst = worst.max((p - q).abs() / scale);
        }
    }
    worst
}

/// Runs the fused graph on ONNX Runtime and its standard form on `reference`.
fn compare(model: &Model, sample: &[usize], precision: Precision, reference: Backend) -> f64 {
    let o = GradOptions {
        bn: BnMode::Sample,
        params: ParamSelect::All,
        precision,
        ..Default::default()
    };
    let (an, gg) = build_graph(model, sample, N, o).unwrap();
    assert!(uses_fused(&gg.model), "the graph has no fused node to test");
    let standard = to_standard_ops(&gg.model, an.float).unwrap();
    let graph = standard.graph.as_ref().unwrap();
    assert!(graph.node.iter().all(|n| n.domain != DOMAIN));
    assert!(standard.opset_import.iter().all(|o| o.domain != DOMAIN));
    let probe = random_probe(sample, N, 3, 8);
    let images = probe.images_tensor().cast(an.float);
    let f64_graph = precision == Precision::F64;
    let fused = runtime::load(&gg.model, Backend::Ort, Device::Cpu, f64_graph).unwrap();
    let plain = runtime::load(&standard, reference, Device::Cpu, f64_graph).unwrap();
    let a = fused.run(&images, &probe.labels).unwrap();
    let b = plain.run(&images, &probe.labels).unwrap();
    worst_relative(&a, &b)
}

#[test]
fn fused_kernels_equal_the_standard_ops_in_f32() {
    if let Some(why) = runtime::ort::unavailable_reason() {
        skip(&why);
        return;
    }
    for norm in [
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
    ] {
        let (m, s) = conv_norm(norm);
        let worst = compare(&m, &s, Precision::F32, Backend::Ort);
        assert!(worst < 2e-5, "{norm}: worst relative difference {worst:e}");
    }
    let (m, s) = mlp_layer_norm();
    let worst = compare(&m, &s, Precision::F32, Backend::Ort);
    assert!(worst < 2e-5, "LayerNormalization: {worst:e}");
}

/// In f64 the kernels must agree with tract's standard-op graph to rounding.
#[test]
fn fused_kernels_equal_tract_in_f64() {
    if let Some(why) = runtime::ort::unavailable_reason() {
        skip(&why);
        return;
    }
    let (m, s) = mlp_layer_norm();
    let worst = compare(&m, &s, Precision::F64, Backend::Tract);
    assert!(worst < 1e-12, "worst relative difference {worst:e}");
}

/// `rank --jobs 2` on ONNX Runtime: the first two sessions register the fused domain side by
/// side, and every later session draws from the shared arena its predecessors used. Copies of
/// one model must all be scored, each to the same numbers. (ONNX Runtime's domain registry is
/// check-then-insert; without the guard in runtime::ort about one `rank` in six lost a model to
/// it, so this test guards the path but cannot prove the race gone.)
#[test]
fn rank_with_two_jobs_scores_every_copy_identically() {
    if let Some(why) = runtime::ort::unavailable_reason() {
        skip(&why);
        return;
    }
    let d = std::env::temp_dir().join(format!("gradalign-fused-rank-{}", std::process::id()));
    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Pairs of one model: the two first ones start at the same moment and take the same time.
    let sources = [
        "nb201_all_none.onnx",
        "nb201_random_a.onnx",
        "nb201_resnet_like.onnx",
    ];
    for k in 0..6 {
        let src = sources[k / 2];
        std::fs::copy(
            root.join("models").join(src),
            models.join(format!("m{k}.onnx")),
        )
        .unwrap();
    }
    let out = d.join("results.csv");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("rank")
        .arg(&models)
        .args(["--n", "16", "--backend", "ort", "--jobs", "2", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let mut by_model: std::collections::HashMap<String, Vec<String>> = Default::default();
    for row in text
        .lines()
        .skip(1)
        .map(gradalign::results::rank::split_csv)
    {
        let k: usize = row[0].rsplit('m').next().unwrap()[..1].parse().unwrap();
        let scores = row[1..4].to_vec();
        assert!(
            scores.iter().all(|s| !s.is_empty()),
            "model {} not scored: {row:?}",
            row[0]
        );
        by_model
            .entry(sources[k / 2].to_string())
            .or_default()
            .push(scores.join(","));
    }
    assert_eq!(by_model.values().map(Vec::len).sum::<usize>(), 6);
    for (m, all) in &by_model {
        assert!(all.iter().all(|s| s == &all[0]), "model {m}: {all:?}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

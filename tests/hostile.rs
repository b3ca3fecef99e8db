//! Hostile inputs (issue 6): every broken model under models/hostile/ (written by
//! tests/golden/make_hostile.py) and every broken probe gets a clear error naming what is wrong,
//! exit status 1, and no panic; memory-bounded runs chunk the probe and give the same gradients.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hostile(name: &str) -> PathBuf {
    root().join("models/hostile").join(name)
}

fn grads(model: &str, extra: &[&str]) -> Output {
    let out = std::env::temp_dir().join(format!("ga-hostile-{}-{model}.npy", std::process::id()));
    grads_to(&hostile(model), &out, extra)
}

/// `gradalign grads MODEL` on the hostile probe (tract), gradients written to `out`.
fn grads_to(model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("grads")
        .arg(model)
        .arg("--data")
        .arg(hostile("probe_x.npy"))
        .arg("--labels")
        .arg(hostile("probe_y.npy"))
        .arg("--out")
        .arg(out)
        .args(["--backend", "tract"])
        .args(extra)
        .output()
        .unwrap()
}

/// Exit status 1, every expected fragment in stderr, and no panic.
fn expect_error(out: &Output, fragments: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for f in fragments {
        assert!(err.contains(f), "missing '{f}' in: {err}");
    }
}

#[test]
fn broken_models_get_clear_errors() {
    let cases: &[(&str, &[&str])] = &[
        ("overflow_dims.onnx", &["tensor \"w\"", "overflow"]),
        (
            "truncated_weights.onnx",
            &["tensor \"w\"", "108 elements", "10 values"],
        ),
        ("cyclic.onnx", &["cycle", "node 'a'"]),
        (
            "undefined_tensor.onnx",
            &["node 'add_ghost'", "'ghost'", "no node"],
        ),
        (
            "duplicate_outputs.onnx",
            &["tensor 'c'", "more than once", "relu_again"],
        ),
        (
            "external_traversal.onnx",
            &["../../../etc/passwd", "leaves the model's folder"],
        ),
        (
            "external_absolute.onnx",
            &["/etc/passwd", "leaves the model's folder"],
        ),
        (
            "external_missing.onnx",
            &["external_missing.weights", "cannot be opened"],
        ),
        ("opset_future.onnx", &["opset 99", "supported range"]),
        (
            "int_weights.onnx",
            &["node 'conv'", "weight 'w'", "must be float"],
        ),
        (
            "huge_activations.onnx",
            &["--max-memory", "largest tensor", "131080"],
        ),
        ("overflow_pads.onnx", &["overflows 64 bits"]),
        (
            "huge_constant.onnx",
            &["node 'zeros'", "ConstantOfShape", "constants are limited"],
        ),
    ];
    for (model, fragments) in cases {
        expect_error(&grads(model, &[]), fragments);
    }
}

#[test]
fn external_data_inside_the_folder_loads() {
    let dir = std::env::temp_dir().join(format!("ga-ext-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("valid.npy"), dir.join("external.npy"));
    let run = |model: &str, out: &PathBuf| {
        let o = grads_to(&hostile(model), out, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run("valid.onnx", &a);
    run("external_ok.onnx", &b);
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());

    // A symlink named like the expected data file but pointing out of the folder is refused.
    let tmp = dir.join("models");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(hostile("external_missing.onnx"), tmp.join("m.onnx")).unwrap();
    let _ = std::fs::remove_file(tmp.join("external_missing.weights"));
    std::os::unix::fs::symlink(
        hostile("external_ok.weights"),
        tmp.join("external_missing.weights"),
    )
    .unwrap();
    let o = grads_to(&tmp.join("m.onnx"), &dir.join("x.npy"), &[]);
    expect_error(&o, &["outside the model's folder", "refused"]);
    assert!(!dir.join("x.npy").exists());
}

#[test]
fn broken_probes_get_clear_errors() {
    let run = |x: &str, y: &str| {
        Command::new(env!("CARGO_BIN_EXE_gradalign"))
            .arg("grads")
            .arg(hostile("valid.onnx"))
            .arg("--data")
            .arg(hostile(x))
            .arg("--labels")
            .arg(hostile(y))
            .arg("--out")
            .arg(std::env::temp_dir().join("ga-never-written.npy"))
            .output()
            .unwrap()
    };
    expect_error(
        &run("probe_empty_x.npy", "probe_empty_y.npy"),
        &["probe_empty_x.npy", "0 samples"],
    );
    expect_error(
        &run("probe_x.npy", "probe_bad_y.npy"),
        &["label 4 of sample 2", "4 classes"],
    );
    expect_error(
        &run("probe_x.npy", "probe_empty_y.npy"),
        &["first axis must match"],
    );
    // A malformed flag value is a usage error: clap's exit status 2, with the flag named.
    let o = grads("valid.onnx", &["--max-memory", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-memory '12Q': unknown unit"));
}

/// A budget smaller than the whole probe needs: the engine runs it in chunks, stays within the
/// budget and gives the same gradients (bit for bit on ONNX Runtime, whose kernels do not depend
/// on the batch; tract's may round differently by batch size).
#[test]
fn memory_bounded_runs_chunk_the_probe() {
    use gradalign::autodiff::GradOptions;
    use gradalign::inputs::engine::per_sample_grads_with;
    use gradalign::inputs::probe::Probe;
    use gradalign::onnx::{HostTensor, Model};
    use gradalign::runtime::Backend;

    let m = Model::load(&root().join("models/nb201_random_a.onnx")).unwrap();
    let probe = Probe::shipped(16).unwrap();
    for backend in [Backend::Tract, Backend::Ort] {
        if backend == Backend::Ort && !gradalign::runtime::ort::available() {
            common::skip("ORT part: ONNX Runtime library not found (cargo xtask fetch-ort)");
            continue;
        }
        let full =
            per_sample_grads_with(&m, &probe, GradOptions::default(), true, backend).unwrap();
        let tight = GradOptions {
            max_memory: Some(200 << 20),
            ..Default::default()
        };
        let chunked = per_sample_grads_with(&m, &probe, tight, true, backend).unwrap();
        assert!(
            chunked.notes.iter().any(|n| n.contains("chunks of")),
            "{:?}",
            chunked.notes
        );
        let (HostTensor::F32(a), HostTensor::F32(b)) = (&full.grads, &chunked.grads) else {
            panic!()
        };
        assert_eq!(a.shape(), b.shape());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        match backend {
            Backend::Ort => assert_eq!(a, b),
            _ => assert!(diff <= 1e-5 * scale, "{diff} vs {scale}"),
        }
        assert_eq!(
            full.logits.to_f64_vec().len(),
            chunked.logits.to_f64_vec().len()
        );
    }
    // Not even one sample fits: refused before anything is allocated.
    let none = GradOptions {
        max_memory: Some(1 << 20),
        ..Default::default()
    };
    let e = per_sample_grads_with(&m, &probe, none, true, Backend::Tract)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--max-memory"), "{e}");
}

/// Scoring when the N × P gradients exceed --max-memory: the probe is streamed and only packed
/// signs are kept; the sign-based scorers and the batch-gradient ones give the unbounded scores
/// exactly (ONNX Runtime, chunks of ≥ 2 samples), and a scorer that needs the raw matrix says so.
#[test]
fn memory_bounded_scoring_streams_signs_with_identical_scores() {
    use gradalign::autodiff::GradOptions;
    use gradalign::inputs::probe::Probe;
    use gradalign::onnx::Model;
    use gradalign::runtime::{Backend, Device};
    use gradalign::scorers::plugin::Registry;
    use gradalign::scorers::score::score_model;

    if !gradalign::runtime::ort::available() {
        common::skip("ONNX Runtime library not found (cargo xtask fetch-ort)");
        return;
    }
    let m = Model::load(&root().join("models/nb201_random_a.onnx")).unwrap();
    let probe = Probe::shipped(64).unwrap();
    let reg = Registry::builtin();
    let scorers = reg
        .select("gradsign,gradalign-i,gradalign-ii,gradalign-i-cos,gradalign-ii-raw,grad_norm,snip,params,fisher")
        .unwrap();
    let run = |max: Option<u64>| {
        let o = GradOptions {
            max_memory: max,
            ..Default::default()
        };
        score_model(&m, &probe, true, o, Backend::Ort, Device::Cpu, &scorers).unwrap()
    };
    let full = run(None);
    assert!(full.errors.is_empty(), "{:?}", full.errors);
    let bounded = run(Some(130 << 20));
    assert!(
        bounded.notes.iter().any(|n| n.contains("streamed in")),
        "{:?}",
        bounded.notes
    );
    for ((name, a), (_, b)) in full.scores.iter().zip(&bounded.scores) {
        if name == "fisher" {
            assert!(b.is_none());
            assert!(bounded.errors[name].contains("full N × P per-sample gradients"));
        } else {
            assert_eq!(
                a.map(f64::to_bits),
                b.map(f64::to_bits),
                "{name}: {a:?} vs {b:?}"
            );
        }
    }
}

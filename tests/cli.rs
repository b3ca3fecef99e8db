//! The `gradalign grads` contract end to end, and clear errors (non-zero exit, named culprit)
//! for bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use gradalign::inputs::npy;
use gradalign::onnx::HostTensor;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gradalign"))
}
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradalign-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
fn run_err(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn grads_on_shipped_probe_writes_matrix_layout_and_logits() {
    let d = tmpdir("ok");
    let (g, l, z) = (d.join("G.npy"), d.join("L.json"), d.join("Z.npy"));
    let model = root().join("models/nb201_avg_pool_heavy.onnx");
    let out = bin()
        .args([
            "grads",
            model.to_str().unwrap(),
            "--n",
            "20",
            "--backend",
            "tract",
            "--out",
        ])
        .arg(&g)
        .arg("--layout")
        .arg(&l)
        .arg("--logits")
        .arg(&z)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("runtime tract") && stderr.contains("shipped CIFAR-10"),
        "{stderr}"
    );
    let HostTensor::F32(gm) = npy::read(&g).unwrap() else {
        panic!("G.npy must be float32")
    };
    let layout: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&l).unwrap()).unwrap();
    // Default --params weights: the Conv and Gemm weights only, in initializer order.
    assert!(layout
        .iter()
        .all(|e| e["op_type"] == "Conv" || e["op_type"] == "Gemm"));
    assert_eq!(layout[0]["name"], "stem.0.weight");
    assert_eq!(layout.last().unwrap()["name"], "classifier.weight");
    let mut off = 0;
    for e in &layout {
        assert_eq!(e["offset"].as_u64().unwrap(), off);
        let numel: u64 = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .product();
        assert_eq!(e["numel"].as_u64().unwrap(), numel);
        off += numel;
    }
    assert_eq!(gm.shape(), &[20, off as usize]);
    let zm = npy::read(&z).unwrap();
    assert_eq!(zm.shape(), vec![20, 10]);
    // Every sample gets a non-zero gradient.
    for i in 0..20 {
        assert!(gm.index_axis(ndarray::Axis(0), i).iter().any(|&v| v != 0.0));
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn missing_model_file_is_named() {
    let e = run_err(&["grads", "/nonexistent/model.onnx", "--out", "/tmp/x.npy"]);
    assert!(e.contains("/nonexistent/model.onnx"), "{e}");
}

#[test]
fn non_onnx_file_is_rejected() {
    let d = tmpdir("junk");
    let p = d.join("junk.onnx");
    std::fs::write(&p, b"this is not protobuf at all \xff\xff\xff").unwrap();
    let e = run_err(&[
        "grads",
        p.to_str().unwrap(),
        "--out",
        d.join("g.npy").to_str().unwrap(),
    ]);
    assert!(
        e.contains("junk.onnx") && e.contains("not a valid ONNX model"),
        "{e}"
    );
}

#[test]
fn npy_data_without_labels_names_the_flag() {
    let x = root().join("tests/golden/toy_mlp/x.npy");
    let e = run_err(&[
        "grads",
        root().join("models/toy_mlp.onnx").to_str().unwrap(),
        "--data",
        x.to_str().unwrap(),
        "--out",
        "/tmp/g.npy",
    ]);
    assert!(e.contains("--labels"), "{e}");
}

#[test]
fn shipped_probe_refused_for_a_non_cifar_model() {
    let e = run_err(&[
        "grads",
        root().join("models/toy_mlp.onnx").to_str().unwrap(),
        "--out",
        "/tmp/g.npy",
    ]);
    assert!(e.contains("--data"), "{e}");
}

#[test]
fn labels_out_of_range_are_rejected() {
    let d = tmpdir("labels");
    let y = d.join("y.npy");
    npy::write(&y, &HostTensor::i64_vec(&[0, 1, 2, 3, 4, 9])).unwrap();
    let x = root().join("tests/golden/toy_mlp/x.npy");
    let e = run_err(&[
        "grads",
        root().join("models/toy_mlp.onnx").to_str().unwrap(),
        "--data",
        x.to_str().unwrap(),
        "--labels",
        y.to_str().unwrap(),
        "--out",
        d.join("g.npy").to_str().unwrap(),
    ]);
    assert!(e.contains("label 9") && e.contains("5 classes"), "{e}");
    assert!(!d.join("g.npy").exists(), "no output on failure");
}

fn write_model(path: &Path, op: &str) {
    use gradalign::onnx::pb;
    use prost::Message;
    let node = pb::NodeProto {
        input: vec!["x".into()],
        output: vec!["y".into()],
        name: "weird_node".into(),
        op_type: op.into(),
        ..Default::default()
    };
    let vi = |n: &str| pb::ValueInfoProto {
        name: n.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            node: vec![node],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, m.encode_to_vec()).unwrap();
}

#[test]
fn unsupported_op_names_op_and_node() {
    let d = tmpdir("op");
    let p = d.join("m.onnx");
    write_model(&p, "Hardmax");
    let e = run_err(&[
        "grads",
        p.to_str().unwrap(),
        "--out",
        d.join("g.npy").to_str().unwrap(),
    ]);
    assert!(e.contains("Hardmax") && e.contains("weird_node"), "{e}");
}

#[test]
fn ort_backend_with_a_missing_library_is_a_clear_error_and_auto_falls_back_to_tract() {
    let model = root().join("models/nb201_all_none.onnx");
    let d = tmpdir("ort");
    let out = bin()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .args([
            "grads",
            model.to_str().unwrap(),
            "--n",
            "10",
            "--backend",
            "ort",
            "--out",
        ])
        .arg(d.join("g.npy"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--backend ort") && e.contains("ORT_DYLIB_PATH"),
        "{e}"
    );
    let out = bin()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .args(["grads", model.to_str().unwrap(), "--n", "10", "--out"])
        .arg(d.join("g.npy"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("runtime tract"));
}

#[test]
fn cifar10_binary_probe_file_is_balanced_and_checked() {
    let d = tmpdir("bin");
    let shipped = std::fs::read(root().join("data/cifar10_probe.bin")).unwrap();
    // Two records of each class (the shipped file holds 100 per class, in class order).
    let mut small = vec![];
    for c in 0..10 {
        let start = c * 100 * 3073;
        small.extend_from_slice(&shipped[start..start + 2 * 3073]);
    }
    let bin_path = d.join("small.bin");
    std::fs::write(&bin_path, &small).unwrap();
    let model = root().join("models/nb201_all_none.onnx");
    let out = bin()
        .args([
            "grads",
            model.to_str().unwrap(),
            "--backend",
            "tract",
            "--n",
            "20",
            "--data",
        ])
        .arg(&bin_path)
        .arg("--out")
        .arg(d.join("g.npy"))
        .arg("--logits")
        .arg(d.join("z.npy"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(npy::read(&d.join("z.npy")).unwrap().shape(), vec![20, 10]);
    let e = run_err(&[
        "grads",
        model.to_str().unwrap(),
        "--n",
        "30",
        "--data",
        bin_path.to_str().unwrap(),
        "--out",
        d.join("h.npy").to_str().unwrap(),
    ]);
    assert!(
        e.contains("class 0 has 2 images") && e.contains("needs 3"),
        "{e}"
    );
    std::fs::write(&bin_path, &small[..3073 * 3 + 7]).unwrap();
    let e = run_err(&[
        "grads",
        model.to_str().unwrap(),
        "--data",
        bin_path.to_str().unwrap(),
        "--out",
        d.join("h.npy").to_str().unwrap(),
    ]);
    assert!(
        e.contains("not a multiple of the CIFAR-10 record size"),
        "{e}"
    );
}

/// The exported training graph passes `onnx.checker` (full check) and the Python `onnxruntime`
/// computes the gradients the CLI writes. Skipped, saying so, without Python onnx/onnxruntime.
#[test]
fn exported_training_graph_passes_onnx_checker_and_python_onnxruntime() {
    let has = Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has {
        common::skip(
            "python3 with onnx + onnxruntime not available (pip install onnx onnxruntime numpy)",
        );
        return;
    }
    let d = tmpdir("export");
    let model = root().join("models/nb201_random_b.onnx");
    let (x, y) = (
        root().join("tests/golden/nb201_probe/x.npy"),
        root().join("tests/golden/nb201_probe/y.npy"),
    );
    let graph = d.join("m.grad.onnx");
    let st = bin()
        .args([
            "export-grad-graph",
            model.to_str().unwrap(),
            "--n",
            "2",
            "-o",
        ])
        .arg(&graph)
        .status()
        .unwrap();
    assert!(st.success());
    let (g, l) = (d.join("g.npy"), d.join("l.json"));
    let st = bin()
        .args([
            "grads",
            model.to_str().unwrap(),
            "--backend",
            "tract",
            "--data",
        ])
        .arg(&x)
        .arg("--labels")
        .arg(&y)
        .arg("--out")
        .arg(&g)
        .arg("--layout")
        .arg(&l)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("python3")
        .arg(root().join("tests/golden/check_export.py"))
        .args([&graph, &x, &y, &g, &l])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A channels-last model (what TensorFlow/Keras and JAX export): the same NB201 network behind
/// a Transpose from N×H×W×C. The shipped probe is fed channels last automatically and gives the
/// channels-first model's gradients exactly.
#[test]
fn channels_last_model_gets_the_probe_in_its_layout() {
    use gradalign::onnx::pb;
    use prost::Message;
    let d = tmpdir("nhwc");
    let src = root().join("models/nb201_avg_pool_heavy.onnx");
    let mut m = pb::ModelProto::decode(std::fs::read(&src).unwrap().as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let input = g.input.iter_mut().find(|i| i.name == "input").unwrap();
    let old_name = input.name.clone();
    input.name = "input_nhwc".into();
    if let Some(pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        let dims = &mut t.shape.as_mut().unwrap().dim;
        let chw: Vec<_> = dims.drain(1..).collect();
        dims.extend([chw[1].clone(), chw[2].clone(), chw[0].clone()]);
    }
    g.node.insert(
        0,
        pb::NodeProto {
            input: vec!["input_nhwc".into()],
            output: vec![old_name],
            name: "to_nchw".into(),
            op_type: "Transpose".into(),
            attribute: vec![gradalign::onnx::attr::ints("perm", &[0, 3, 1, 2])],
            ..Default::default()
        },
    );
    let nhwc = d.join("nhwc.onnx");
    std::fs::write(&nhwc, m.encode_to_vec()).unwrap();
    let grads = |model: &Path, out: &str, extra: &[&str]| {
        let o = bin()
            .args([
                "grads",
                model.to_str().unwrap(),
                "--n",
                "8",
                "--backend",
                "tract",
            ])
            .args(extra)
            .args(["--out", d.join(out).to_str().unwrap()])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, _) = grads(&src, "nchw.npy", &[]);
    assert!(ok);
    let (ok, err) = grads(&nhwc, "nhwc.npy", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("channels-last"), "the note says so: {err}");
    let read = |f: &str| npy::read(&d.join(f)).unwrap().to_f64();
    assert_eq!(read("nhwc.npy"), read("nchw.npy"));
    // Forcing channels first on it is refused with the shapes, not run on transposed pixels.
    let (ok, err) = grads(&nhwc, "forced.npy", &["--input-layout", "nchw"]);
    assert!(!ok && err.contains("32"), "{err}");
}

/// `gradalign ops` is read from the op definitions: the roles it prints are the ones the
/// parameter selection uses.
#[test]
fn ops_lists_supported_ops_with_slot_roles() {
    let out = bin().arg("ops").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |op: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(op))
            .unwrap_or_else(|| panic!("{op} missing from:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("Conv"), "Conv 2-3 rule data weight bias");
    assert_eq!(line("Gemm"), "Gemm 2-3 via its lowering weight weight bias");
    assert_eq!(
        line("BatchNormalization"),
        "BatchNormalization 5 via its lowering data data data fixed fixed"
    );
    assert_eq!(line("Shape"), "Shape 1 none (shape/compare) fixed");
    assert_eq!(
        line("Dropout"),
        "Dropout 1-3 via its lowering data fixed fixed"
    );
    assert!(!text.contains("MISSING"), "{text}");
    assert!(
        !text.contains("GaStandardize"),
        "internal ops are not listed"
    );
}

#[test]
fn unknown_output_name_is_refused_naming_it() {
    let m = root().join("models/toy_mlp.onnx");
    for cmd in ["grads", "score"] {
        let mut args = vec![cmd, m.to_str().unwrap(), "--output", "no_such_value"];
        if cmd == "grads" {
            args.extend(["--out", "/tmp/gradalign-unused.npy"]);
        }
        let err = run_err(&args);
        assert!(
            err.contains("--output no_such_value") && err.contains("toy_mlp.onnx"),
            "{err}"
        );
    }
}

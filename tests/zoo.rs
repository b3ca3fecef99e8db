//! The Rust NAS-Bench-201 generator computes the same function as the PyTorch export: with a
//! fixture's weights loaded by name into the generated graph, logits and per-sample gradients
//! agree, and the gradient layout (names, shapes, order) is identical.

use std::path::PathBuf;

use gradalign::autodiff::{GradOptions, ParamSelect};
use gradalign::inputs::engine::per_sample_grads;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::{HostTensor, Model};
use gradalign::tools::zoo::nb201_model;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn max_abs(t: &HostTensor) -> Vec<f32> {
    match t {
        HostTensor::F32(a) => a.iter().copied().collect(),
        _ => panic!("f32 expected"),
    }
}

#[test]
fn generated_nb201_equals_the_pytorch_export_with_the_same_weights() {
    let csv = std::fs::read_to_string(root().join("models/nb201_fixtures.csv")).unwrap();
    let probe = Probe::shipped(10).unwrap();
    let opts = GradOptions {
        params: ParamSelect::All,
        ..Default::default()
    };
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.splitn(3, ',').collect();
        let (name, arch) = (f[0], f[2]);
        let fixture = root().join(format!("models/{name}.onnx"));
        let theirs = Model::load(&fixture).unwrap();
        let mut proto = nb201_model(arch, 12345, 16, 5).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let mut loaded = 0;
        for t in &mut graph.initializer {
            if t.name == "ga.zero" {
                continue;
            }
            let w = theirs
                .initializer(&t.name)
                .unwrap_or_else(|| panic!("{name}: the export has no '{}'", t.name));
            assert_eq!(
                w.shape(),
                HostTensor::from_proto(t).unwrap().shape(),
                "{}",
                t.name
            );
            *t = w.to_proto(&t.name);
            loaded += 1;
        }
        // Every float tensor of the export was matched (the rest are shape constants).
        let float_inits = theirs
            .initializers
            .iter()
            .filter(|(_, t)| t.dtype().is_float() && t.len() > 1)
            .count();
        assert_eq!(loaded, float_inits, "{name}");
        let ours = Model::from_proto(&proto, "generated").unwrap();
        let a = per_sample_grads(&theirs, &probe, opts, true).unwrap();
        let b = per_sample_grads(&ours, &probe, opts, true).unwrap();
        let key = |l: &[gradalign::inputs::engine::LayoutEntry]| {
            l.iter()
                .map(|e| (e.name.clone(), e.op_type.clone(), e.shape.clone(), e.offset))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a.layout), key(&b.layout), "{name}: layouts differ");
        let (za, zb) = (max_abs(&a.logits), max_abs(&b.logits));
        let zs = za.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dz = za
            .iter()
            .zip(&zb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(dz <= 1e-5 * zs, "{name}: logits differ by {dz}");
        let (ga, gb) = (max_abs(&a.grads), max_abs(&b.grads));
        let p = ga.len() / 10;
        let global = ga.iter().fold(0f32, |m, v| m.max(v.abs()));
        for e in &a.layout {
            let (mut scale, mut diff) = (0f32, 0f32);
            for i in 0..10 {
                for j in e.offset..e.offset + e.numel {
                    scale = scale.max(ga[i * p + j].abs());
                    diff = diff.max((ga[i * p + j] - gb[i * p + j]).abs());
                }
            }
            // Layers whose gradient is analytically ~0 are judged against the global scale.
            let tol = if scale < 1e-6 * global {
                1e-6 * global
            } else {
                1e-4 * scale
            };
            assert!(diff <= tol, "{name} {}: {diff} vs {scale}", e.name);
        }
        eprintln!("{name}: {} parameters, logits max|Δ| {dz:e}", ga.len() / 10);
    }
}

/// The NB101 generator's network has NB101's own parameter count on every one of the 30,001
/// cells that carry it: the channel rule, the projections and the output concatenation are
/// NB101's.
#[test]
fn nb101_parameter_counts_equal_nb101s_own_on_all_30001_cells() {
    use gradalign::tools::zoo::nb101::Nb101Cell;
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/nb101_accuracies.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "hash,num_vertices,adjacency_rowmajor,ops,val_acc_108,test_acc_108,trainable_parameters"
    );
    let (mut checked, mut cells) = (0, 0);
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let cell = Nb101Cell::parse(f[2], f[3]).unwrap_or_else(|e| panic!("{}: {e}", f[0]));
        assert_eq!(cell.ops.len(), f[1].parse::<usize>().unwrap());
        cells += 1;
        if !f[6].is_empty() {
            assert_eq!(
                cell.trainable_parameters(),
                f[6].parse::<usize>().unwrap(),
                "{}",
                f[0]
            );
            checked += 1;
        }
    }
    assert_eq!((cells, checked), (32_338, 30_001));
}

/// The generated ONNX holds exactly the trainable parameters NB101 counts (plus BN running
/// statistics), and is accepted by the gradient builder.
#[test]
fn nb101_model_initializers_match_the_count() {
    use gradalign::tools::zoo::nb101::{nb101_model, Nb101Cell};
    // NB101 cell 000834cf…: 7 vertices, an input→output edge and a truncated summand.
    let cell = Nb101Cell::parse(
        "0100001001000000010010000101000001000000010000000",
        "input|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|output",
    )
    .unwrap();
    assert_eq!(cell.trainable_parameters(), 6_342_515);
    let proto = nb101_model(&cell, 7, 32).unwrap();
    let m = gradalign::onnx::Model::from_proto(&proto, "nb101").unwrap();
    let trainable: usize = m
        .initializers
        .iter()
        .filter(|(n, t)| !n.contains("running") && t.dtype() == gradalign::onnx::DType::F32)
        .map(|(_, t)| t.len())
        .sum();
    assert_eq!(trainable, cell.trainable_parameters());
}

//! Every scorer against the independent PyTorch reference (`tests/golden/scorers.py`, float64,
//! N = 20 shipped-probe images) on every NB201 fixture. gradalign runs in f64 here (the
//! reference-exact path); a `null` reference means the score is undefined for that model
//! (e.g. a constant Jacobian), and gradalign must then report an error instead of a number.

use std::path::PathBuf;

use gradalign::autodiff::{GradOptions, Precision};
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::Registry;
use gradalign::scorers::score::score_model;

const FIXTURES: [&str; 5] = [
    "nb201_resnet_like",
    "nb201_all_none",
    "nb201_avg_pool_heavy",
    "nb201_random_a",
    "nb201_random_b",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the ONNX graph's blocks differ from the PyTorch modules': the exporter computed the
/// all-`none` cell's shared zero edges once, so each cell's sum becomes `a + a·0`, an extra cut
/// whose pair is an exact identity (docs/semantics.md, az_trainability). Both values put the
/// network last (below -1e5); the un-merged zoo graph gives the module blocks
/// (`block_jacobian::tests`).
const GRAPH_BLOCKS_DIFFER: &[(&str, &str)] = &[("nb201_all_none", "az_trainability")];

fn check(precision: Precision, tol: f64, skip: &[&str]) {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/golden/scores.json")).unwrap())
            .unwrap();
    let n = golden["_meta"]["n"].as_u64().unwrap() as usize;
    let reg = Registry::builtin();
    let names: Vec<String> = golden[FIXTURES[0]]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !skip.contains(&k.as_str()))
        .cloned()
        .collect();
    let scorers = reg.select(&names.join(",")).unwrap();
    let probe = Probe::shipped(n).unwrap();
    let opts = GradOptions {
        precision,
        ..Default::default()
    };
    let mut worst = 0.0f64;
    for fx in FIXTURES {
        let model = Model::load(&root().join(format!("models/{fx}.onnx"))).unwrap();
        let r = score_model(
            &model,
            &probe,
            true,
            opts,
            Backend::Tract,
            Device::Cpu,
            &scorers,
        )
        .unwrap();
        for (name, ours) in &r.scores {
            let want = &golden[fx][name];
            match (want.as_f64(), ours) {
                (None, None) => assert!(r.errors.contains_key(name)),
                (None, Some(v)) => panic!("{fx} {name}: reference undefined, gradalign gave {v}"),
                (Some(w), None) => panic!("{fx} {name}: want {w}, error {:?}", r.errors.get(name)),
                (Some(w), Some(v)) if GRAPH_BLOCKS_DIFFER.contains(&(fx, name.as_str())) => {
                    assert!(w < -1e5 && *v < -1e5, "{fx} {name}: want {w}, got {v}");
                }
                (Some(w), Some(v)) => {
                    let d = (w - v).abs();
                    let rel = if w.abs() < 1.0 { d } else { d / w.abs() };
                    worst = worst.max(rel);
                    assert!(rel <= tol, "{fx} {name}: want {w}, got {v} (rel {rel:e})");
                }
            }
        }
    }
    eprintln!("{precision:?}: worst relative difference over all scorers and fixtures: {worst:e}");
}

#[test]
fn every_scorer_matches_the_pytorch_reference_in_f64() {
    // Issue #3 asks for ≤ 1e-3; f64 against f64 allows far tighter (measured ≤ 1e-11, GraSP
    // 3.4e-7: its H·g is a one-sided difference, see passes::hessian_grad_product).
    check(Precision::F64, 1e-6, &[]);
}

#[test]
fn every_scorer_is_within_1e3_of_the_reference_in_f32() {
    // The default precision. Measured worst: ntk_cond 3.8e-4 (tract), 7.6e-4 (ORT). GraSP's
    // Hessian pass always runs in f64, so it is checked once, above.
    check(Precision::F32, 1e-3, &["grasp"]);
}

//! The logit-Jacobian pass (VKDNW's input) against PyTorch: torch.func's jacrev of the eval-mode
//! logits with respect to element 0 of every named parameter, on an NB201 fixture
//! (`tests/golden/logit_jacobian.py` writes the reference; its docstring has the command).

use std::path::PathBuf;

use gradalign::autodiff::{GradOptions, Precision};
use gradalign::inputs::jacobian::logit_jacobian;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn logit_jacobian_matches_torch_func_in_f64() {
    let want = gradalign::inputs::npy::read(
        &root().join("tests/golden/logit_jacobian/nb201_random_b.npy"),
    )
    .unwrap();
    let shape = want.shape().to_vec();
    let want = want.to_f64_vec();
    let (n, c, t) = (shape[0], shape[1], shape[2]);
    let model = Model::load(&root().join("models/nb201_random_b.onnx")).unwrap();
    let probe = Probe::shipped(n).unwrap();
    let opts = GradOptions {
        precision: Precision::F64,
        ..Default::default()
    };
    let j = logit_jacobian(&model, &probe, opts, Backend::Tract, Device::Cpu).unwrap();
    assert_eq!((j.classes, j.tensors), (c, t));
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (k, (a, b)) in j.data.iter().zip(&want).enumerate() {
        let d = (a - b).abs() / scale;
        if d > worst {
            worst = d;
            eprintln!(
                "[{} {} {}] ours {a} torch {b}",
                k / (c * t),
                (k / t) % c,
                k % t
            );
        }
    }
    eprintln!("worst |difference| / max |J| = {worst:e}");
    assert!(worst < 1e-9, "{worst:e}");
}

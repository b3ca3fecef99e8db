//! Runtimes that execute a gradient graph: tract (pure Rust, always available) and ONNX Runtime
//! (loaded from the PyPI wheel's shared library when present; much faster).

pub mod ort;
pub mod tract;

use anyhow::{bail, Result};
use ndarray::Array1;

use crate::onnx::{pb, HostTensor};

/// Executes one built gradient graph on probe batches of the shape it was built for.
pub trait GraphRunner {
    /// Outputs in the graph's output order.
    fn run(&self, images: &HostTensor, labels: &Array1<i64>) -> Result<Vec<HostTensor>>;
    fn name(&self) -> &'static str;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// ONNX Runtime when its library is found, tract otherwise.
    #[default]
    Auto,
    Tract,
    Ort,
}

pub fn load(
    model: &pb::ModelProto,
    backend: Backend,
    f64_graph: bool,
) -> Result<Box<dyn GraphRunner>> {
    match backend {
        Backend::Tract => Ok(Box::new(tract::TractRunner::new(model)?)),
        Backend::Ort => Ok(Box::new(ort::OrtRunner::new(model)?)),
        Backend::Auto => {
            if !f64_graph && ort::available() {
                Ok(Box::new(ort::OrtRunner::new(model)?))
            } else {
                Ok(Box::new(tract::TractRunner::new(model)?))
            }
        }
    }
}

pub fn check_backend(backend: Backend) -> Result<()> {
    if backend == Backend::Ort {
        if let Some(why) = ort::unavailable_reason() {
            bail!("--backend ort: {why} (run `cargo xtask fetch-ort`, or set ORT_DYLIB_PATH to libonnxruntime.so 1.31.x)");
        }
    }
    Ok(())
}

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

/// Where the gradient graph runs: `cpu`, or `cuda[:N]` (ONNX Runtime's CUDA execution provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|&n| n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| format!("'{s}' is not a device: use cpu, cuda or cuda:N")),
        }
    }
}

pub fn load(
    model: &pb::ModelProto,
    backend: Backend,
    device: Device,
    f64_graph: bool,
) -> Result<Box<dyn GraphRunner>> {
    if device != Device::Cpu {
        if backend == Backend::Tract {
            bail!("--device cuda needs --backend ort (tract runs on the CPU only)");
        }
        return Ok(Box::new(ort::OrtRunner::new(model, device)?));
    }
    match backend {
        Backend::Tract => Ok(Box::new(tract::TractRunner::new(model)?)),
        Backend::Ort => Ok(Box::new(ort::OrtRunner::new(model, device)?)),
        Backend::Auto => {
            if !f64_graph && ort::available() {
                Ok(Box::new(ort::OrtRunner::new(model, device)?))
            } else {
                Ok(Box::new(tract::TractRunner::new(model)?))
            }
        }
    }
}

pub fn check_backend(backend: Backend) -> Result<()> {
    if backend == Backend::Ort {
        if let Some(why) = ort::unavailable_reason() {
            bail!("--backend ort: {why}");
        }
    }
    Ok(())
}

//! Runtimes that execute a gradient graph: tract (pure Rust, always available) and ONNX Runtime
//! (loaded from the PyPI wheel's shared library when present; much faster).

pub mod ort;
pub mod tract;

use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Models that run side by side in this process (`rank --jobs`): each runtime session gets an
/// equal share of the cores, so jobs × intra-op threads never exceeds them.
static JOBS: AtomicUsize = AtomicUsize::new(1);

pub fn set_parallel_jobs(jobs: usize) {
    JOBS.store(jobs.max(1), Ordering::Relaxed);
}

pub fn parallel_jobs() -> usize {
    JOBS.load(Ordering::Relaxed)
}

/// Intra-op threads per session: `GRADALIGN_THREADS` when set, else the cores divided among
/// the parallel jobs (at least one).
pub fn intra_threads() -> usize {
    std::env::var("GRADALIGN_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / parallel_jobs()).max(1)
        })
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

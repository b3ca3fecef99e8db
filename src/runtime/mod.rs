//! Runtimes that execute a gradient graph: tract (pure Rust, always available) and ONNX Runtime
//! (loaded from the PyPI wheel's shared library when present; much faster).

pub mod kernels;
pub mod ort;
pub mod tract;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Result};
use ndarray::Array1;

use crate::onnx::{pb, DType, HostTensor};

/// Executes one built gradient graph on probe batches of the shape it was built for.
pub trait GraphRunner {
    /// Outputs in the graph's output order.
    fn run(&self, images: &HostTensor, labels: &Array1<i64>) -> Result<Vec<HostTensor>>;
    /// Runs once and hands every output, in order, to `visit`, borrowed from the runtime's own
    /// buffers where the runtime allows it. The per-sample gradients of an 11 M-weight model
    /// are 2.7 GiB at N = 64: copying them out (and faulting in the copy's fresh pages) cost
    /// more than a second and doubled the peak memory, while the sign and class-sum readers
    /// only need to stream over them once.
    fn run_visit(
        &self,
        images: &HostTensor,
        labels: &Array1<i64>,
        visit: &mut dyn FnMut(usize, OutputRef<'_>) -> Result<()>,
    ) -> Result<()> {
        let outs = self.run(images, labels)?;
        for (k, t) in outs.iter().enumerate() {
            visit(k, OutputRef::of(t)?)?;
        }
        Ok(())
    }
    fn name(&self) -> &'static str;
}

/// A borrowed graph output: its shape and its elements in row-major order.
pub struct OutputRef<'a> {
    pub shape: Vec<usize>,
    pub data: OutputData<'a>,
}

pub enum OutputData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    Bool(&'a [bool]),
}

impl<'a> OutputRef<'a> {
    pub fn of(t: &'a HostTensor) -> Result<OutputRef<'a>> {
        fn flat<T>(a: &ndarray::ArrayD<T>) -> Result<&[T]> {
            a.as_slice()
                .ok_or_else(|| anyhow::anyhow!("graph output is not contiguous"))
        }
        let data = match t {
            HostTensor::F32(a) => OutputData::F32(flat(a)?),
            HostTensor::F64(a) => OutputData::F64(flat(a)?),
            HostTensor::Bool(a) => OutputData::Bool(flat(a)?),
            HostTensor::I64(_) => bail!("graph output of type int64 where a float was expected"),
        };
        Ok(OutputRef {
            shape: t.shape().to_vec(),
            data,
        })
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Result<HostTensor> {
        let dims = ndarray::IxDyn(&self.shape);
        Ok(match self.data {
            OutputData::F32(d) => {
                HostTensor::F32(ndarray::ArrayD::from_shape_vec(dims, d.to_vec())?)
            }
            OutputData::F64(d) => {
                HostTensor::F64(ndarray::ArrayD::from_shape_vec(dims, d.to_vec())?)
            }
            OutputData::Bool(d) => {
                HostTensor::Bool(ndarray::ArrayD::from_shape_vec(dims, d.to_vec())?)
            }
        })
    }

    /// An owned f64 array of the output's shape (for the logits, which are small).
    pub fn to_f64_array(&self) -> Result<ndarray::ArrayD<f64>> {
        Ok(ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(&self.shape),
            self.to_f64_vec(),
        )?)
    }

    /// The elements as f64 (the logits, which are small).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.data {
            OutputData::F32(d) => d.iter().map(|&v| v as f64).collect(),
            OutputData::F64(d) => d.to_vec(),
            OutputData::Bool(d) => d.iter().map(|&v| v as u8 as f64).collect(),
        }
    }
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

/// Whether CPU sessions of ONNX Runtime draw from one arena shared by the whole process.
static SHARED_ARENA: AtomicBool = AtomicBool::new(false);

/// `rank` turns the shared arena on when it scores several models without a user memory bound:
/// each session then reuses the pages its predecessors faulted in (10 NB201 models, one job:
/// 600k -> 132k page faults, 5.7-6.4 -> 5.4-5.5 s). A single model gains nothing from it, and
/// the arena keeps its peak (ResNet-18 at N = 64 went 4.1 -> 5.0 GiB, past --max-memory 4G),
/// so `score` and any run with --max-memory give each session its own non-arena allocator.
pub fn set_shared_arena(on: bool) {
    SHARED_ARENA.store(on, Ordering::Relaxed);
}

/// As set by [`set_shared_arena`]; GRADALIGN_ORT_ARENA=shared|own overrides it (to measure).
pub fn shared_arena() -> bool {
    match std::env::var("GRADALIGN_ORT_ARENA").as_deref() {
        Ok("shared") => true,
        Ok("own") => false,
        _ => SHARED_ARENA.load(Ordering::Relaxed),
    }
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

/// Whether ONNX Runtime sessions on the CPU run the fused kernels: yes unless
/// GRADALIGN_FUSED=0, which runs their standard-op form instead (for comparison, or to rule
/// the kernels out when a result looks wrong).
pub fn fused_kernels() -> bool {
    std::env::var("GRADALIGN_FUSED").map_or(true, |v| v != "0")
}

pub fn load(
    model: &pb::ModelProto,
    backend: Backend,
    device: Device,
    f64_graph: bool,
) -> Result<Box<dyn GraphRunner>> {
    // Only ONNX Runtime on the CPU has the fused kernels; everything else runs their
    // standard-op form.
    let standard = || {
        let float = if f64_graph { DType::F64 } else { DType::F32 };
        crate::autodiff::fused::to_standard_ops(model, float)
    };
    if device != Device::Cpu {
        if backend == Backend::Tract {
            bail!("--device cuda needs --backend ort (tract runs on the CPU only)");
        }
        return Ok(Box::new(ort::OrtRunner::new(&standard()?, device)?));
    }
    match backend {
        Backend::Tract => Ok(Box::new(tract::TractRunner::new(&standard()?)?)),
        Backend::Ort if fused_kernels() => Ok(Box::new(ort::OrtRunner::new(model, device)?)),
        Backend::Ort => Ok(Box::new(ort::OrtRunner::new(&standard()?, device)?)),
        Backend::Auto => {
            if !f64_graph && ort::available() {
                let graph = if fused_kernels() { model } else { &standard()? };
                Ok(Box::new(ort::OrtRunner::new(graph, device)?))
            } else {
                Ok(Box::new(tract::TractRunner::new(&standard()?)?))
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

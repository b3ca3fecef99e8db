//! ONNX Runtime (CPU), loaded dynamically from the `onnxruntime` PyPI wheel's shared library.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ndarray::Array1;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;

use super::{Device, GraphRunner, OutputData, OutputRef};
use crate::onnx::{pb, HostTensor};

/// The onnxruntime release whose C API level (24) this build uses.
pub const ORT_VERSION: &str = "1.31.0";

/// Where `cargo xtask fetch-ort [--gpu]` puts the library (`onnxruntime-<ver>` or
/// `onnxruntime-gpu-<ver>`).
pub fn cache_dir(gpu: bool) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let flavour = if gpu {
        "onnxruntime-gpu"
    } else {
        "onnxruntime"
    };
    base.join("gradalign")
        .join(format!("{flavour}-{ORT_VERSION}"))
}

/// `ORT_DYLIB_PATH`, else the fetched library in the cache folder: the GPU build (which also
/// runs on CPU) when fetched, else the CPU one.
pub fn find_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    [true, false]
        .into_iter()
        .map(|gpu| cache_dir(gpu).join(format!("libonnxruntime.so.{ORT_VERSION}")))
        .find(|p| p.exists())
}

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment() -> Result<&'static ort::environment::Environment> {
    let env = ENV.get_or_init(|| {
        let lib = find_library().ok_or_else(|| {
            "ONNX Runtime library not found: run `cargo xtask fetch-ort` or set ORT_DYLIB_PATH to a libonnxruntime.so \
             (onnxruntime 1.31.x from PyPI)"
                .to_string()
        })?;
        load(&lib).map_err(|e| format!("{e:#}"))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

fn load(lib: &Path) -> Result<ort::environment::Environment> {
    if !lib.exists() {
        bail!("ORT_DYLIB_PATH={} does not exist", lib.display());
    }
    let builder = ort::init_from(lib).map_err(|e| anyhow!("cannot load {}: {e}", lib.display()))?;
    builder
        .with_name("gradalign")
        .build()
        .map_err(|e| anyhow!("cannot start ONNX Runtime from {}: {e}", lib.display()))
}

/// Calls one ONNX Runtime C API function, turning its status into an error.
unsafe fn check(status: ort::sys::OrtStatusPtr, what: &str) -> Result<()> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    let msg = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
        .to_string_lossy()
        .into_owned();
    (api.ReleaseStatus)(status.0);
    bail!("{what}: {msg}")
}

/// One CPU arena for every session of this process (ORT's "environment allocator"). Sessions
/// run one after another in `rank`: with an allocator of their own each one faults its
/// activations in afresh, with the shared arena a model reuses the pages its predecessors
/// touched. Extends by exactly the request, so the arena's peak is the largest model's need.
fn shared_arena(env: &ort::environment::Environment) -> Result<()> {
    use ort::sys::{OrtAllocatorType, OrtMemType};
    use ort::AsPointer;
    let api = ort::api();
    unsafe {
        let mut info = std::ptr::null_mut();
        check(
            (api.CreateCpuMemoryInfo)(
                OrtAllocatorType::OrtArenaAllocator,
                OrtMemType::OrtMemTypeDefault,
                &mut info,
            ),
            "CreateCpuMemoryInfo",
        )?;
        let keys = [c"arena_extend_strategy".as_ptr()];
        let values = [1usize]; // kSameAsRequested
        let mut cfg = std::ptr::null_mut();
        let made = check(
            (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg),
            "CreateArenaCfgV2",
        );
        let registered = made.and_then(|_| {
            check(
                (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info, cfg),
                "CreateAndRegisterAllocator",
            )
        });
        if !cfg.is_null() {
            (api.ReleaseArenaCfg)(cfg);
        }
        (api.ReleaseMemoryInfo)(info);
        registered
    }
}

/// Registers [`shared_arena`] once per process, on the first session that asks for it.
fn ensure_shared_arena(env: &ort::environment::Environment) -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| shared_arena(env).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("cannot create ONNX Runtime's shared CPU arena: {e}"))
}

/// Whether ONNX Runtime can be used (for `--backend auto`).
pub fn available() -> bool {
    environment().is_ok()
}

/// Why ONNX Runtime cannot be used, if it cannot.
pub fn unavailable_reason() -> Option<String> {
    environment().err().map(|e| e.to_string())
}

/// Graph optimisation level; GRADALIGN_ORT_OPT=1|2|3|all overrides the default, 2
/// ("extended"). The layout levels add NCHWc reorders around every convolution: on
/// nb201_resnet_like (N = 64) they ran as fast (1.11–1.22 s vs 1.15–1.17 s) with 20% more
/// peak memory (713 vs 593 MiB).
fn optimization_level() -> GraphOptimizationLevel {
    match std::env::var("GRADALIGN_ORT_OPT").as_deref() {
        Ok("0") => GraphOptimizationLevel::Disable,
        Ok("1") => GraphOptimizationLevel::Level1,
        Ok("3") => GraphOptimizationLevel::Level3,
        Ok("all") => GraphOptimizationLevel::All,
        _ => GraphOptimizationLevel::Level2,
    }
}

pub struct OrtRunner {
    session: Mutex<Session>,
    input: String,
    labels: String,
    device: Device,
}

/// The CUDA execution provider for `--device cuda:N`; registration failure is an error, never a
/// silent CPU fallback.
#[cfg(feature = "cuda")]
fn cuda_providers(id: i32) -> Result<Vec<ort::ep::ExecutionProviderDispatch>> {
    use ort::ep::cuda::ConvAlgorithmSearch;
    // TF32 rounds convolution inputs to 10 mantissa bits: per-image BatchNorm amplifies that to
    // 10-60% per-layer gradient error (measured on the NB201 fixtures), so it is off unless asked.
    let tf32 = std::env::var("GRADALIGN_CUDA_TF32").is_ok_and(|v| v == "1");
    // One session per model: an exhaustive cuDNN search per convolution costs more than it saves.
    let search = match std::env::var("GRADALIGN_CUDA_CONV_SEARCH").as_deref() {
        Ok("exhaustive") => ConvAlgorithmSearch::Exhaustive,
        Ok("default") => ConvAlgorithmSearch::Default,
        _ => ConvAlgorithmSearch::Heuristic,
    };
    Ok(vec![ort::ep::CUDA::default()
        .with_device_id(id)
        .with_tf32(tf32)
        .with_conv_algorithm_search(search)
        .build()
        .error_on_failure()])
}

#[cfg(not(feature = "cuda"))]
fn cuda_providers(_id: i32) -> Result<Vec<ort::ep::ExecutionProviderDispatch>> {
    bail!(
        "--device cuda: this gradalign was built without CUDA support; rebuild with \
         `cargo build --release --features cuda` and fetch the GPU library with \
         `cargo xtask fetch-ort --gpu`"
    )
}

impl OrtRunner {
    pub fn new(model: &pb::ModelProto, device: Device) -> Result<OrtRunner> {
        let env = environment()?;
        use prost::Message;
        let bytes = model.encode_to_vec();
        let threads = super::intra_threads();
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| anyhow!("empty gradient graph"))?;
        let session = Session::builder(env)
            .map_err(|e| anyhow!("{e}"))?
            .with_optimization_level(optimization_level())
            .map_err(|e| anyhow!("{e}"))?
            .with_intra_threads(threads)
            .map_err(|e| anyhow!("{e}"))?
            // Sessions that run side by side must not burn each other's cores busy-waiting.
            .with_intra_op_spinning(super::parallel_jobs() == 1)
            .map_err(|e| anyhow!("{e}"))?;
        // Expert knob for measuring ORT session options: GRADALIGN_ORT_CONFIG="k=v;k=v" sets
        // ONNX Runtime session config entries (e.g. session.disable_prepacking=1).
        let mut session = session;
        if let Ok(cfg) = std::env::var("GRADALIGN_ORT_CONFIG") {
            for kv in cfg.split(';').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("GRADALIGN_ORT_CONFIG: `{kv}` is not key=value"))?;
                session = session
                    .with_config_entry(k.trim(), v.trim())
                    .map_err(|e| anyhow!("GRADALIGN_ORT_CONFIG {k}: {e}"))?;
            }
        }
        let session = match device {
            // Else no arena: a session runs once or a few times, so an arena only adds its growth
            // slack to the peak (ResNet-18 at N = 64: 4.72 -> 4.10 GiB for the whole process,
            // same run time; `rank` over 24 NB201 cells no slower) and breaks --max-memory.
            Device::Cpu if super::shared_arena() => {
                ensure_shared_arena(env)?;
                session.with_env_allocators().map_err(|e| anyhow!("{e}"))?
            }
            Device::Cpu => session
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()])
                .map_err(|e| anyhow!("{e}"))?,
            Device::Cuda(id) => session
                .with_execution_providers(cuda_providers(id)?)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| {
                    format!(
                        "cannot start the CUDA execution provider on GPU {id}: it needs \
                         libonnxruntime.so from the onnxruntime-gpu wheel (`cargo xtask fetch-ort --gpu`) \
                         with libonnxruntime_providers_cuda.so beside it, and the CUDA 13 / cuDNN 9 \
                         libraries on LD_LIBRARY_PATH"
                    )
                })?,
        };
        // The fused kernels run on the CPU only: a CUDA session gets the standard-op graph
        // (`runtime::load`) and no domain, so nothing silently shuttles tensors to the host.
        let session = if device == Device::Cpu && crate::autodiff::fused::uses_fused(model) {
            session
                .with_operators(super::kernels::domain().map_err(|e| anyhow!("{e}"))?)
                .map_err(|e| anyhow!("{e}"))?
        } else {
            session
        };
        let mut session = match std::env::var_os("GRADALIGN_ORT_PROFILE") {
            Some(p) => session
                .with_profiling(PathBuf::from(p))
                .map_err(|e| anyhow!("{e}"))?,
            None => session,
        };
        // ONNX Runtime adds a custom domain to its process-wide schema registry when the first
        // session using it is created, check-then-insert: two first sessions side by side
        // (`rank --jobs 2`) both insert and one fails ("domain is already exist"). The first
        // one is created alone; later ones find the domain and run side by side.
        static FIRST_FUSED: Mutex<bool> = Mutex::new(false);
        let first = if crate::autodiff::fused::uses_fused(model) && device == Device::Cpu {
            let guard = FIRST_FUSED.lock().unwrap_or_else(|p| p.into_inner());
            (!*guard).then_some(guard)
        } else {
            None
        };
        let session = session
            .commit_from_memory(&bytes)
            .map_err(|e| anyhow!("{e}"))
            .context("ONNX Runtime could not load the gradient graph")?;
        if let Some(mut done) = first {
            *done = true;
        }
        Ok(OrtRunner {
            session: Mutex::new(session),
            input: graph.input[0].name.clone(),
            labels: graph.input[1].name.clone(),
            device,
        })
    }
}

impl GraphRunner for OrtRunner {
    fn run(&self, images: &HostTensor, labels: &Array1<i64>) -> Result<Vec<HostTensor>> {
        let mut res = vec![];
        self.run_visit(images, labels, &mut |_, out| {
            res.push(out.to_owned()?);
            Ok(())
        })?;
        Ok(res)
    }
    fn run_visit(
        &self,
        images: &HostTensor,
        labels: &Array1<i64>,
        visit: &mut dyn FnMut(usize, OutputRef<'_>) -> Result<()>,
    ) -> Result<()> {
        let (img, lab) = inputs(images, labels)?;
        let mut session = self.session.lock().unwrap();
        let outs = session
            .run(ort::inputs! { self.input.as_str() => img, self.labels.as_str() => lab })
            .map_err(|e| anyhow!("{e}"))
            .context("ONNX Runtime failed running the gradient graph")?;
        for (k, (_, v)) in outs.iter().enumerate() {
            let dims = |s: &ort::value::Shape| s.iter().map(|&x| x as usize).collect();
            let out = if let Ok((s, d)) = v.try_extract_tensor::<f32>() {
                OutputRef {
                    shape: dims(s),
                    data: OutputData::F32(d),
                }
            } else if let Ok((s, d)) = v.try_extract_tensor::<bool>() {
                OutputRef {
                    shape: dims(s),
                    data: OutputData::Bool(d),
                }
            } else {
                let (s, d) = v.try_extract_tensor::<f64>().map_err(|e| anyhow!("{e}"))?;
                OutputRef {
                    shape: dims(s),
                    data: OutputData::F64(d),
                }
            };
            visit(k, out)?;
        }
        Ok(())
    }
    fn name(&self) -> &'static str {
        match self.device {
            Device::Cpu => "ort-cpu",
            Device::Cuda(_) => "ort-cuda",
        }
    }
}

/// The probe batch and its labels as ONNX Runtime tensors.
fn inputs(
    images: &HostTensor,
    labels: &Array1<i64>,
) -> Result<(ort::value::DynValue, ort::value::Tensor<i64>)> {
    let shape: Vec<i64> = images.shape().iter().map(|&d| d as i64).collect();
    let img = match images {
        HostTensor::F32(a) => Tensor::from_array((shape, a.iter().copied().collect::<Vec<f32>>()))
            .map(|t| t.into_dyn()),
        HostTensor::F64(a) => Tensor::from_array((shape, a.iter().copied().collect::<Vec<f64>>()))
            .map(|t| t.into_dyn()),
        _ => bail!("images must be float"),
    }
    .map_err(|e| anyhow!("{e}"))?;
    let lab =
        Tensor::from_array(([labels.len() as i64], labels.to_vec())).map_err(|e| anyhow!("{e}"))?;
    Ok((img, lab))
}

//! `gradalign._native`: the Python package's bindings. Thin: every computation is the
//! library's, every error message the CLI's; the Python layer (python/gradalign/) shapes the
//! API for numpy and torch users.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use pyo3::create_exception;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};

use gradalign::autodiff::GradOptions;
use gradalign::inputs::engine::{self, InputLayout};
use gradalign::inputs::probe::Probe;
use gradalign::onnx::{HostTensor, Model};
use gradalign::results::rank::{self, ResultsFile};
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::{input_names, Registry, ScorerInfo};
use gradalign::scorers::score::{score_model, ScoreReport};

create_exception!(
    _native,
    GradalignError,
    pyo3::exceptions::PyException,
    "A model, probe, option or plugin gradalign cannot use; the message says what to do."
);

fn py_err(e: anyhow::Error) -> PyErr {
    GradalignError::new_err(format!("{e:#}"))
}

/// A model given as a path (str or os.PathLike) or as serialised ONNX bytes.
enum ModelSource {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

impl ModelSource {
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<ModelSource> {
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(ModelSource::Bytes(b.as_bytes().to_vec()));
        }
        obj.extract::<PathBuf>()
            .map(ModelSource::Path)
            .map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(
                    "model must be a path, ONNX bytes or an onnx.ModelProto",
                )
            })
    }

    fn load(&self) -> Result<Model> {
        match self {
            ModelSource::Path(p) => Model::load(p),
            ModelSource::Bytes(b) => Model::from_bytes(b, "<ONNX bytes>"),
        }
    }

    fn name(&self) -> String {
        match self {
            ModelSource::Path(p) => p.display().to_string(),
            ModelSource::Bytes(_) => "<ONNX bytes>".into(),
        }
    }
}

fn parse_enum<T: clap::ValueEnum>(what: &str, v: &str) -> Result<T> {
    T::from_str(v, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|x| x.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        anyhow!("{what}={v:?}: use one of {}", names.join(", "))
    })
}

/// The options every call shares, parsed once, with the CLI's names and defaults.
struct Options {
    grad: GradOptions,
    backend: Backend,
    device: Device,
    data_path: Option<PathBuf>,
    labels_path: Option<PathBuf>,
    /// float32 images (little-endian bytes) with their shape, and int64 labels.
    data: Option<(Vec<u8>, Vec<usize>)>,
    labels: Option<Vec<i64>>,
    n: Option<usize>,
    layout: InputLayout,
    /// `--output`: the value taken as logits.
    output: Option<String>,
}

/// The option keywords `gradalign._api` passes (every one, always).
const OPTION_KEYS: &[&str] = &[
    "bn",
    "params",
    "precision",
    "backend",
    "device",
    "max_memory",
    "data_path",
    "labels_path",
    "data",
    "labels",
    "n",
    "input_layout",
    "output",
];

impl Options {
    /// From the keyword arguments of `score_report`/`grads`; a key outside [`OPTION_KEYS`] is
    /// an error, so the Python layer and this one cannot drift apart silently.
    fn from_kwargs(kw: Option<&Bound<'_, PyDict>>) -> PyResult<Options> {
        if let Some(d) = kw {
            for k in d.keys() {
                let k: String = k.extract()?;
                if !OPTION_KEYS.contains(&k.as_str()) {
                    return Err(py_err(anyhow!("unknown option '{k}'")));
                }
            }
        }
        let get = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
            Ok(match kw {
                Some(d) => d.get_item(k)?.filter(|v| !v.is_none()),
                None => None,
            })
        };
        let string = |k: &str, default: &str| -> PyResult<String> {
            Ok(match get(k)? {
                Some(v) => v.extract()?,
                None => default.to_string(),
            })
        };
        let backend: Backend =
            parse_enum("backend", &string("backend", "auto")?).map_err(py_err)?;
        gradalign::runtime::check_backend(backend).map_err(py_err)?;
        let max_memory = match get("max_memory")? {
            Some(v) => Some(
                gradalign::inputs::memory::parse_size(&v.extract::<String>()?)
                    .map_err(|e| py_err(anyhow!("max_memory: {e}")))?,
            ),
            None => None,
        };
        let grad = GradOptions {
            bn: parse_enum("bn", &string("bn", "sample")?).map_err(py_err)?,
            params: parse_enum("params", &string("params", "weights")?).map_err(py_err)?,
            precision: parse_enum("precision", &string("precision", "f32")?).map_err(py_err)?,
            max_memory,
        };
        Ok(Options {
            grad,
            backend,
            device: string("device", "cpu")?
                .parse()
                .map_err(|e: String| py_err(anyhow!("device: {e}")))?,
            data_path: get("data_path")?.map(|v| v.extract()).transpose()?,
            labels_path: get("labels_path")?.map(|v| v.extract()).transpose()?,
            data: get("data")?.map(|v| v.extract()).transpose()?,
            labels: get("labels")?.map(|v| v.extract()).transpose()?,
            n: get("n")?.map(|v| v.extract()).transpose()?,
            layout: parse_enum("input_layout", &string("input_layout", "auto")?).map_err(py_err)?,
            output: get("output")?.map(|v| v.extract()).transpose()?,
        })
    }

    /// Load the model and apply `output`.
    fn model(&self, source: &ModelSource) -> Result<Model> {
        let mut m = source.load()?;
        if let Some(o) = &self.output {
            m.select_output(o)?;
        }
        Ok(m)
    }

    /// The probe for `model`, and whether it is the shipped CIFAR-10 one.
    fn probe(&self, model: &Model, notes: &mut Vec<String>) -> Result<(Probe, bool)> {
        if let Some((bytes, shape)) = &self.data {
            if self.data_path.is_some() {
                bail!("give the probe images either as an array or as a file, not both");
            }
            let labels = self.labels.clone().ok_or_else(|| {
                anyhow!("data given as an array needs labels (int64, one per image)")
            })?;
            let floats: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let images =
                ArrayD::from_shape_vec(IxDyn(shape), floats).map_err(|e| anyhow!("data: {e}"))?;
            let len = labels.len();
            let labels = ArrayD::from_shape_vec(IxDyn(&[len]), labels)?;
            let probe = Probe::from_arrays(images, labels, self.n, "data", "labels")?;
            return Ok((probe, false));
        }
        if self.labels.is_some() {
            bail!("labels given as an array need the images as an array too (data=...)");
        }
        let (probe, shipped, note) = engine::probe_for_model(
            model,
            self.data_path.as_deref(),
            self.labels_path.as_deref(),
            self.n,
            self.layout,
        )?;
        notes.extend(note);
        Ok((probe, shipped))
    }
}

fn registry(plugins: &[PathBuf]) -> Registry {
    Registry::with_plugins(plugins)
}

/// The outcome of scoring one model: the report, or why no scorer could run.
#[pyclass(frozen, module = "gradalign._native")]
struct Report {
    model: String,
    inner: std::result::Result<ScoreReport, String>,
    /// Plugin libraries that failed to load (the built-ins and the others still ran).
    load_errors: Vec<String>,
    seconds: f64,
}

#[pymethods]
impl Report {
    #[getter]
    fn ok(&self) -> bool {
        self.inner.is_ok()
    }
    #[getter]
    fn error(&self) -> Option<String> {
        self.inner.as_ref().err().cloned()
    }
    #[getter]
    fn model(&self) -> String {
        self.model.clone()
    }
    #[getter]
    fn seconds(&self) -> f64 {
        self.seconds
    }
    /// The report as JSON: the CLI's `score --format json` object.
    fn to_json(&self) -> String {
        let v = match &self.inner {
            Ok(r) => {
                let scores: serde_json::Map<String, serde_json::Value> = r
                    .scores
                    .iter()
                    .map(|(n, v)| (n.clone(), v.map_or(serde_json::Value::Null, |v| v.into())))
                    .collect();
                let mut warnings: Vec<String> =
                    r.warnings().iter().map(|s| s.to_string()).collect();
                warnings.extend(self.load_errors.iter().cloned());
                serde_json::json!({
                    "model": self.model,
                    "scores": scores,
                    "errors": r.errors,
                    "warnings": warnings,
                    "notes": r.notes.iter().filter(|n| !n.starts_with(engine::WARNING)).collect::<Vec<_>>(),
                    "runtime": r.runtime,
                    "seconds": {"inputs": r.grad_seconds, "scorers": r.score_seconds, "total": self.seconds},
                })
            }
            Err(e) => serde_json::json!({"model": self.model, "error": e}),
        };
        v.to_string()
    }
}

#[pyfunction]
#[pyo3(signature = (model, scorers, plugins, isolate, **options))]
fn score_report(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
    scorers: &str,
    plugins: Vec<PathBuf>,
    isolate: bool,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<Report> {
    let source = ModelSource::extract(model)?;
    let opts = Options::from_kwargs(options)?;
    let reg = registry(&plugins);
    let mut selected: Vec<ScorerInfo> = reg.select(scorers).map_err(py_err)?;
    for s in &mut selected {
        s.isolated = isolate && s.library.is_some();
    }
    let name = source.name();
    let load_errors = reg.load_errors.clone();
    // Everything from here is the library's work: let other Python threads run meanwhile.
    let (inner, seconds) = py.detach(move || {
        let t = Instant::now();
        let res = (|| -> Result<ScoreReport> {
            let m = opts.model(&source)?;
            let mut notes = vec![];
            let (probe, shipped) = opts.probe(&m, &mut notes)?;
            let mut r = score_model(
                &m,
                &probe,
                shipped,
                opts.grad,
                opts.backend,
                opts.device,
                &selected,
            )?;
            r.model = source.name();
            notes.append(&mut r.notes);
            r.notes = notes;
            Ok(r)
        })();
        (res.map_err(|e| format!("{e:#}")), t.elapsed().as_secs_f64())
    });
    Ok(Report {
        model: name,
        inner,
        load_errors,
        seconds,
    })
}

/// A tensor as a Python bytearray of little-endian floats, its shape and numpy dtype: one copy,
/// which numpy then wraps without another (`np.frombuffer`), so the N × P matrix is held at
/// most twice, and only until the Rust tensor is dropped.
fn tensor_bytearray<'py>(
    py: Python<'py>,
    t: &HostTensor,
) -> PyResult<(Bound<'py, PyByteArray>, Vec<usize>, &'static str)> {
    fn fill<const W: usize>(buf: &mut [u8], vals: impl Iterator<Item = [u8; W]>) {
        for (chunk, v) in buf.chunks_exact_mut(W).zip(vals) {
            chunk.copy_from_slice(&v);
        }
    }
    let shape = t.shape();
    let n = t.len();
    let (bytes, dtype) = match t {
        HostTensor::F32(a) => (
            PyByteArray::new_with(py, n * 4, |buf| {
                fill(buf, a.iter().map(|v| v.to_le_bytes()));
                Ok(())
            })?,
            "<f4",
        ),
        HostTensor::F64(a) => (
            PyByteArray::new_with(py, n * 8, |buf| {
                fill(buf, a.iter().map(|v| v.to_le_bytes()));
                Ok(())
            })?,
            "<f8",
        ),
        other => {
            let a = other.to_f64();
            (
                PyByteArray::new_with(py, n * 8, |buf| {
                    fill(buf, a.iter().map(|v| v.to_le_bytes()));
                    Ok(())
                })?,
                "<f8",
            )
        }
    };
    Ok((bytes, shape, dtype))
}

/// Per-sample gradients: (grads bytearray, shape, dtype), (logits bytearray, shape, dtype), and
/// a JSON object with the layout, labels, notes, warnings and runtime.
#[pyfunction]
#[pyo3(signature = (model, **options))]
#[allow(clippy::type_complexity)]
fn grads<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<(
    (Bound<'py, PyByteArray>, Vec<usize>, &'static str),
    (Bound<'py, PyByteArray>, Vec<usize>, &'static str),
    String,
)> {
    let source = ModelSource::extract(model)?;
    let opts = Options::from_kwargs(options)?;
    let res = py.detach(move || -> Result<_> {
        let m = opts.model(&source)?;
        let mut notes = vec![];
        let (probe, shipped) = opts.probe(&m, &mut notes)?;
        let g =
            engine::per_sample_grads_on(&m, &probe, opts.grad, shipped, opts.backend, opts.device)
                .with_context(|| source.name())?;
        notes.extend(g.notes.iter().cloned());
        let (warnings, notes): (Vec<String>, Vec<String>) = notes
            .into_iter()
            .partition(|n| n.starts_with(engine::WARNING));
        let warnings: Vec<String> = warnings
            .into_iter()
            .map(|w| w.trim_start_matches(engine::WARNING).to_string())
            .collect();
        let meta = serde_json::json!({
            "layout": g.layout,
            "labels": g.labels.to_vec(),
            "notes": notes,
            "warnings": warnings,
            "runtime": g.runtime,
            "seconds": {"build": g.build_seconds, "run": g.run_seconds},
        });
        Ok((g.grads, g.logits, meta.to_string()))
    });
    let (grads, logits, meta) = res.map_err(py_err)?;
    let logits = tensor_bytearray(py, &logits)?;
    let grads_py = tensor_bytearray(py, &grads)?;
    drop(grads);
    Ok((grads_py, logits, meta))
}

/// `.onnx` files named directly or found (recursively, sorted) under folders, as `rank` sees them.
#[pyfunction]
fn collect_models(paths: Vec<PathBuf>) -> PyResult<Vec<String>> {
    Ok(rank::collect_models(&paths)
        .map_err(py_err)?
        .into_iter()
        .map(|p| p.display().to_string())
        .collect())
}

/// The scorers found (built-in and the given plugin libraries) as JSON, and the load errors.
#[pyfunction]
#[pyo3(signature = (plugins=Vec::new()))]
fn list_scorers(plugins: Vec<PathBuf>) -> (String, Vec<String>) {
    let reg = registry(&plugins);
    let list: Vec<serde_json::Value> = reg
        .scorers
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "origin": s.origin,
                "inputs": input_names(s.inputs),
                "description": s.description,
            })
        })
        .collect();
    (serde_json::Value::from(list).to_string(), reg.load_errors)
}

/// `rank`'s durable results file: rows appended and fsync'ed as models finish; reopening it
/// resumes (the models already in it are listed in `done`).
#[pyclass(module = "gradalign._native")]
struct ResultsCsv {
    file: Mutex<ResultsFile>,
    scorers: Vec<String>,
}

#[pymethods]
impl ResultsCsv {
    #[new]
    fn new(path: PathBuf, scorers: Vec<String>) -> PyResult<Self> {
        let file = ResultsFile::open(&path, &rank::header(&scorers)).map_err(py_err)?;
        Ok(ResultsCsv {
            file: Mutex::new(file),
            scorers,
        })
    }
    fn done(&self) -> Vec<String> {
        self.file.lock().unwrap().done.iter().cloned().collect()
    }
    fn append(&self, report: &Report) -> PyResult<()> {
        let res: Result<ScoreReport> = report.inner.clone().map_err(|e| anyhow!(e));
        self.file
            .lock()
            .unwrap()
            .append(&report.model, &self.scorers, &res, report.seconds)
            .map_err(py_err)
    }
}

/// The scorers one plugin library adds, loaded on its own (not GRADALIGN_PLUGIN_PATH's).
#[pyfunction]
fn plugin_scorers(path: PathBuf) -> PyResult<Vec<String>> {
    let mut reg = Registry::builtin();
    let before = reg.scorers.len();
    reg.load_library(&path).map_err(py_err)?;
    Ok(reg.scorers[before..]
        .iter()
        .map(|s| s.name.clone())
        .collect())
}

/// The names `select` resolves a scorer list to (`all`, comma-separated names).
#[pyfunction]
#[pyo3(signature = (scorers, plugins=Vec::new()))]
fn resolve_scorers(scorers: &str, plugins: Vec<PathBuf>) -> PyResult<Vec<String>> {
    let reg = registry(&plugins);
    Ok(reg
        .select(scorers)
        .map_err(py_err)?
        .into_iter()
        .map(|s| s.name)
        .collect())
}

/// The shipped CIFAR-10 probe as the CLI feeds it: `n` images class-balanced and normalised
/// (N×3×32×32 float32 bytes, shape) and their labels.
#[pyfunction]
#[pyo3(signature = (n=64))]
fn shipped_probe(py: Python<'_>, n: usize) -> PyResult<(Bound<'_, PyBytes>, Vec<usize>, Vec<i64>)> {
    let p = Probe::shipped(n).map_err(py_err)?;
    let bytes: Vec<u8> = p.images.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok((
        PyBytes::new(py, &bytes),
        p.images.shape().to_vec(),
        p.labels.to_vec(),
    ))
}

/// Runs one isolated plugin scorer on inputs read from stdin (the child side of
/// `isolate=True`; see gradalign/_worker.py). Returns the process exit status.
#[pyfunction]
fn scorer_worker(library: PathBuf, scorer: &str, flags: u64) -> i32 {
    gradalign::scorers::plugin::isolate::worker_main(&library, scorer, flags)
}

/// Where isolated scorers run: `python -m gradalign._worker` under this interpreter.
#[pyfunction]
fn set_worker_interpreter(python: PathBuf) {
    gradalign::scorers::plugin::isolate::set_worker_program(
        python,
        vec!["-m".into(), "gradalign._worker".into()],
    );
}

#[pyfunction]
fn ort_available() -> Option<String> {
    gradalign::runtime::check_backend(Backend::Ort)
        .err()
        .map(|e| format!("{e:#}"))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GradalignError", m.py().get_type::<GradalignError>())?;
    m.add("DEFAULT_SCORERS", "gradalign-i,gradalign-ii,gradsign")?;
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Report>()?;
    m.add_class::<ResultsCsv>()?;
    m.add_function(wrap_pyfunction!(score_report, m)?)?;
    m.add_function(wrap_pyfunction!(grads, m)?)?;
    m.add_function(wrap_pyfunction!(collect_models, m)?)?;
    m.add_function(wrap_pyfunction!(list_scorers, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_scorers, m)?)?;
    m.add_function(wrap_pyfunction!(plugin_scorers, m)?)?;
    m.add_function(wrap_pyfunction!(ort_available, m)?)?;
    m.add_function(wrap_pyfunction!(scorer_worker, m)?)?;
    m.add_function(wrap_pyfunction!(shipped_probe, m)?)?;
    m.add_function(wrap_pyfunction!(set_worker_interpreter, m)?)?;
    Ok(())
}

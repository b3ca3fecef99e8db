//! The plugin host: the scorer registry (built-ins linked statically through the same C table
//! that their cdylibs export, plus external libraries loaded with libloading) and the one place
//! that calls across the C ABI.

pub mod inputs;
pub mod isolate;

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use gradalign_plugin_api::abi::{self, GaInputs, GaPluginTable, ScoreFn, TableFn};

/// One scorer the host can call.
#[derive(Clone)]
pub struct ScorerInfo {
    pub name: String,
    pub description: String,
    pub inputs: u64,
    /// "built-in (gradalign)" or the library path.
    pub origin: String,
    score: ScoreFn,
    /// Keeps an external library mapped while its scorers exist.
    _lib: Option<Arc<libloading::Library>>,
    /// The shared library an external scorer came from.
    pub library: Option<PathBuf>,
    /// Run in a child process (`--isolate`; external scorers only).
    pub isolated: bool,
}

/// Names of the input flags, for listings and messages.
pub fn input_names(flags: u64) -> Vec<&'static str> {
    use abi::inputs::*;
    let all = [
        (PER_SAMPLE_GRADS, "per-sample-grads"),
        (LABELS, "labels"),
        (LOGITS, "logits"),
        (PARAM_VALUES, "param-values"),
        (BATCH_GRADS, "batch-grads"),
        (RELU_CODES, "relu-codes"),
        (INPUT_JACOBIAN, "input-jacobian"),
        (MODEL_INFO, "model-info"),
        (SYNFLOW_GRADS, "synflow-grads"),
        (HESSIAN_GRAD_PRODUCT, "hessian-grad-product"),
        (ALL_PARAMS, "all-params"),
    ];
    all.iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect()
}

impl ScorerInfo {
    /// Calls the scorer; a non-finite value is an error, never a score.
    pub fn call(&self, inputs: &GaInputs) -> std::result::Result<f64, String> {
        let mut out = f64::NAN;
        let mut err = vec![0 as c_char; 4096];
        // SAFETY: `inputs` follows the ABI (built by `inputs::InputData`), `err` is writable.
        let rc = unsafe { (self.score)(inputs, &mut out, err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(if msg.is_empty() {
                format!("failed with code {rc} and no message")
            } else {
                msg
            });
        }
        if !out.is_finite() {
            return Err(format!("returned {out}, not a finite score"));
        }
        Ok(out)
    }
}

#[derive(Default)]
pub struct Registry {
    pub scorers: Vec<ScorerInfo>,
    /// Libraries that could not be loaded (the run goes on without them).
    pub load_errors: Vec<String>,
}

unsafe fn cstring(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

impl Registry {
    /// The built-in scorers.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        for (table, origin) in [
            (gradalign_scorers::plugin_table(), "built-in (gradalign)"),
            (gradalign_baselines::plugin_table(), "built-in (baselines)"),
        ] {
            r.add_table(table, origin, None)
                .expect("built-in plugin tables are valid");
        }
        r
    }

    /// Built-ins plus every library named by `--plugin` and `GRADALIGN_PLUGIN_PATH`. A library
    /// that fails to load is recorded in `load_errors`; the others still load.
    pub fn with_plugins(plugins: &[PathBuf]) -> Registry {
        let mut r = Registry::builtin();
        let mut paths: Vec<PathBuf> = vec![];
        if let Some(env) = std::env::var_os("GRADALIGN_PLUGIN_PATH") {
            for entry in std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()) {
                if entry.is_dir() {
                    let mut libs: Vec<PathBuf> = std::fs::read_dir(&entry)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            p.extension()
                                .is_some_and(|e| e == std::env::consts::DLL_EXTENSION)
                        })
                        .collect();
                    libs.sort();
                    paths.extend(libs);
                } else {
                    paths.push(entry);
                }
            }
        }
        paths.extend(plugins.iter().cloned());
        for p in paths {
            if let Err(e) = r.load_library(&p) {
                r.load_errors.push(format!("{e:#}"));
            }
        }
        r
    }

    fn add_table(
        &mut self,
        table: *const GaPluginTable,
        origin: &str,
        lib: Option<Arc<libloading::Library>>,
    ) -> Result<()> {
        if table.is_null() {
            bail!("{origin}: the plugin table function returned a null pointer");
        }
        // The version is read on its own first: the rest of the layout may differ.
        let version = unsafe { std::ptr::read(table as *const u32) };
        if version != abi::ABI_VERSION {
            bail!(
                "{origin}: plugin built for gradalign plugin ABI version {version}, but this gradalign \
                 speaks version {}; rebuild it against gradalign-plugin-api {}",
                abi::ABI_VERSION,
                env!("CARGO_PKG_VERSION")
            );
        }
        let t = unsafe { &*table };
        if t.n_scorers > 0 && t.scorers.is_null() {
            bail!(
                "{origin}: the table lists {} scorers but no array",
                t.n_scorers
            );
        }
        let rows = if t.n_scorers == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(t.scorers, t.n_scorers as usize) }
        };
        let mut new = vec![];
        for (i, row) in rows.iter().enumerate() {
            let Some(name) = (unsafe { cstring(row.name) }).filter(|n| !n.is_empty()) else {
                bail!("{origin}: scorer #{i} has no name");
            };
            if row.inputs & !abi::inputs::KNOWN != 0 {
                bail!(
                    "{origin}: scorer '{name}' asks for inputs this gradalign does not know (flags {:#x})",
                    row.inputs & !abi::inputs::KNOWN
                );
            }
            if let Some(prev) = self.scorers.iter().chain(&new).find(|s| s.name == name) {
                bail!(
                    "{origin}: scorer '{name}' is already provided by {}; rename one of them",
                    prev.origin
                );
            }
            new.push(ScorerInfo {
                name,
                description: unsafe { cstring(row.description) }.unwrap_or_default(),
                inputs: row.inputs,
                origin: origin.to_string(),
                score: row.score,
                _lib: lib.clone(),
                library: lib.as_ref().map(|_| PathBuf::from(origin)),
                isolated: false,
            });
        }
        self.scorers.extend(new);
        Ok(())
    }

    /// Loads an external plugin library.
    pub fn load_library(&mut self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        if !path.is_file() {
            bail!("plugin {shown}: no such file");
        }
        // SAFETY: loading a library runs its initialisers; that is what --plugin asks for.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| anyhow::anyhow!("plugin {shown} is not a loadable shared library: {e}"))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.strip_prefix("lib").unwrap_or(s).to_string())
            .unwrap_or_default();
        let specific = format!("{stem}_plugin_table");
        let table_fn: TableFn = unsafe {
            match lib.get::<TableFn>(abi::SYMBOL.as_bytes()) {
                Ok(f) => *f,
                Err(_) => match lib.get::<TableFn>(specific.as_bytes()) {
                    Ok(f) => *f,
                    Err(_) => bail!(
                        "plugin {shown} exports neither `{}` nor `{specific}`: it is not a gradalign \
                         plugin (see plugins/api/README.md)",
                        abi::SYMBOL
                    ),
                },
            }
        };
        let table = unsafe { table_fn() };
        self.add_table(table, &shown, Some(Arc::new(lib)))
    }

    /// Resolves `--scorer a,b,…` (or `all`); an unknown name lists the available ones.
    pub fn select(&self, spec: &str) -> Result<Vec<ScorerInfo>> {
        if spec.trim() == "all" {
            return Ok(self.scorers.clone());
        }
        let mut out = vec![];
        for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match self.scorers.iter().find(|s| s.name == name) {
                Some(s) if !out.iter().any(|o: &ScorerInfo| o.name == name) => out.push(s.clone()),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = self.scorers.iter().map(|s| s.name.as_str()).collect();
                    let mut msg = format!(
                        "--scorer: unknown scorer '{name}'; available: {}",
                        known.join(", ")
                    );
                    if !self.load_errors.is_empty() {
                        msg += &format!(
                            " (some plugins failed to load: {})",
                            self.load_errors.join("; ")
                        );
                    }
                    bail!(msg);
                }
            }
        }
        if out.is_empty() {
            bail!("--scorer: no scorer named");
        }
        Ok(out)
    }
}

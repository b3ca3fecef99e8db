//! The plugin host: the scorer registry (built-ins linked statically through the same C table
//! that their cdylibs export, plus external libraries loaded with libloading) and the one place
//! that calls across the C ABI.

pub mod inputs;
pub mod isolate;

use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use gradalign_plugin_api::abi::{
    self, GaInputs, GaPluginTable, GaPluginTableV2, ScoreFn, TableFn, TeardownFn,
};

/// A loaded plugin: keeps its library mapped while any of its scorers exists, and runs its
/// `teardown` (ABI 3) once, when the last one goes.
struct LoadedPlugin {
    teardown: Option<TeardownFn>,
    user_data: *mut c_void,
    // Dropped after `teardown` ran (fields drop after `Drop::drop`).
    _lib: Option<libloading::Library>,
}

// The ABI documents that scorers may be called from several threads with the same user_data.
unsafe impl Send for LoadedPlugin {}
unsafe impl Sync for LoadedPlugin {}

impl Drop for LoadedPlugin {
    fn drop(&mut self) {
        if let Some(t) = self.teardown {
            // SAFETY: the plugin's own teardown with its own user_data, once.
            unsafe { t(self.user_data) };
        }
    }
}

/// One scorer the host can call.
#[derive(Clone)]
pub struct ScorerInfo {
    pub name: String,
    pub description: String,
    pub inputs: u64,
    /// "built-in (gradalign)" or the library path.
    pub origin: String,
    score: ScoreFn,
    /// The ABI version the plugin's table declared: its inputs are stamped with it.
    abi_version: u32,
    plugin: Option<Arc<LoadedPlugin>>,
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
        (SIGNS, "signs"),
        (FEATURE_MAPS, "feature-maps"),
        (FEATURE_COVARIANCE, "feature-covariance"),
        (LOGIT_JACOBIAN, "logit-jacobian"),
        (BLOCK_JACOBIAN, "block-jacobian"),
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
        // The plugin sees the version it was built for (ABI 2 fields are a prefix of ABI 3's).
        let mut stamped = *inputs;
        stamped.abi_version = self.abi_version;
        stamped.user_data = self
            .plugin
            .as_ref()
            .map_or(std::ptr::null_mut(), |p| p.user_data);
        // SAFETY: `inputs` follows the ABI (built by `inputs::InputData`), `err` is writable.
        let rc = unsafe { (self.score)(&stamped, &mut out, err.as_mut_ptr(), err.len()) };
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
        lib: Option<libloading::Library>,
    ) -> Result<()> {
        if table.is_null() {
            bail!("{origin}: the plugin table function returned a null pointer");
        }
        // The version is read on its own first: the rest of the layout may differ.
        let version = unsafe { std::ptr::read(table as *const u32) };
        if !(abi::OLDEST_ABI_VERSION..=abi::ABI_VERSION).contains(&version) {
            bail!(
                "{origin}: plugin built for gradalign plugin ABI version {version}, but this gradalign \
                 reads versions {} to {}; rebuild it against gradalign-plugin-api {}",
                abi::OLDEST_ABI_VERSION,
                abi::ABI_VERSION,
                env!("CARGO_PKG_VERSION")
            );
        }
        // Read exactly the prefix this version defines: an ABI-2 table ends after `scorers`.
        let t: GaPluginTableV2 = unsafe { std::ptr::read(table as *const GaPluginTableV2) };
        let (mut user_data, mut init, mut teardown) = (std::ptr::null_mut(), None, None);
        if version >= 3 {
            let size_at = std::mem::offset_of!(GaPluginTable, struct_size);
            let size = unsafe { std::ptr::read((table as *const u8).add(size_at) as *const u32) };
            if (size as usize) < std::mem::size_of::<GaPluginTable>() {
                bail!(
                    "{origin}: an ABI {version} plugin table must be at least {} bytes, it says {size} \
                     (struct_size unset? use GA_TABLE_INIT or the Rust export_plugin! macro)",
                    std::mem::size_of::<GaPluginTable>()
                );
            }
            let full = unsafe { &*table };
            (user_data, init, teardown) = (full.user_data, full.init, full.teardown);
        }
        if let Some(init) = init {
            let mut err = vec![0 as c_char; 4096];
            // SAFETY: the plugin's own init with its own user_data, once, before any scorer.
            let rc = unsafe { init(user_data, err.as_mut_ptr(), err.len()) };
            if rc != 0 {
                let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                    .to_string_lossy()
                    .into_owned();
                bail!("{origin}: the plugin's init failed (code {rc}): {msg}");
            }
        }
        // From here on, dropping the plugin runs its teardown.
        let plugin = (lib.is_some() || teardown.is_some() || !user_data.is_null()).then(|| {
            Arc::new(LoadedPlugin {
                teardown,
                user_data,
                _lib: lib,
            })
        });
        let library = plugin
            .as_ref()
            .filter(|p| p._lib.is_some())
            .map(|_| PathBuf::from(origin));
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
            let known = abi::inputs::known_in(version);
            if row.inputs & !known != 0 {
                bail!(
                    "{origin}: scorer '{name}' asks for inputs ABI version {version} does not define \
                     (flags {:#x})",
                    row.inputs & !known
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
                abi_version: version,
                plugin: plugin.clone(),
                library: library.clone(),
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
        self.add_table(table, &shown, Some(lib))
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

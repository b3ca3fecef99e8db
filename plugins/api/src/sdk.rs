//! The safe side of the ABI: a read-only view of the inputs, the `Scorer` trait and the glue
//! that turns scorers into a C table (`export_plugin!`).

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::{self, GaInputs, GaPluginTable, GaScorer};
use crate::signs::SignPlanes;

/// A row-major matrix borrowed from the host.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
}

impl<'a, T> Matrix<'a, T> {
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Columns `start..start + len` of row `i`.
    pub fn row_cols(&self, i: usize, start: usize, len: usize) -> &'a [T] {
        &self.data[i * self.cols + start..i * self.cols + start + len]
    }
}

/// Per-sample gradients in the precision they were computed in.
#[derive(Clone, Copy, Debug)]
pub enum Grads<'a> {
    F32(Matrix<'a, f32>),
    F64(Matrix<'a, f64>),
}

/// Runs `$body` with `$m` bound to the typed matrix inside a [`Grads`].
#[macro_export]
macro_rules! with_grads {
    ($grads:expr, |$m:ident| $body:expr) => {
        match $grads {
            $crate::Grads::F32($m) => $body,
            $crate::Grads::F64($m) => $body,
        }
    };
}

/// One layer of the feature maps (ABI 4): in each sample's row, channel c's map is the
/// `spatial` values from `offset + c · spatial`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureLayer {
    pub node: String,
    pub channels: usize,
    pub spatial: usize,
    pub offset: usize,
    /// ABI 5: false where every path from this output to the logits is multiplied by a
    /// constant zero (a Conv inside a dead NAS-Bench-201 edge): its features exist but nothing
    /// downstream sees them.
    pub live: bool,
}

/// Each Conv output's channel covariance over all samples and positions (ABI 5): layer l's
/// `channels × channels` matrix, centred, divided by N · spatial.
#[derive(Clone, Debug)]
pub struct FeatureCovariance<'a> {
    pub data: &'a [f64],
    pub layers: Vec<FeatureLayer>,
    starts: Vec<usize>,
}

impl<'a> FeatureCovariance<'a> {
    /// Builds the view over `data`, which must hold Σ channels² values.
    pub fn new(data: &'a [f64], layers: Vec<FeatureLayer>) -> Result<Self, String> {
        let mut starts = Vec::with_capacity(layers.len());
        let mut at = 0usize;
        for l in &layers {
            starts.push(at);
            at += l.channels * l.channels;
        }
        if at != data.len() {
            return Err(format!(
                "feature covariance has {} values, the layers need {at}",
                data.len()
            ));
        }
        Ok(FeatureCovariance {
            data,
            layers,
            starts,
        })
    }
    /// Layer `l`'s covariance, channels × channels.
    pub fn layer(&self, l: usize) -> Matrix<'a, f64> {
        let c = self.layers[l].channels;
        Matrix {
            data: &self.data[self.starts[l]..self.starts[l] + c * c],
            rows: c,
            cols: c,
        }
    }
}

/// Per sample, the Jacobian of the logits with respect to element 0 of every trainable parameter
/// tensor (ABI 6), BatchNorm at its running statistics: sample i's `classes × tensors` block
/// starts at `i · classes · tensors`, row-major; `logits` are that forward's, N × classes.
#[derive(Clone, Debug)]
pub struct LogitJacobian<'a> {
    pub data: &'a [f64],
    pub logits: Matrix<'a, f64>,
    pub samples: usize,
    pub classes: usize,
    pub tensors: usize,
}

impl<'a> LogitJacobian<'a> {
    /// Sample `i`'s Jacobian, classes × tensors.
    pub fn sample(&self, i: usize) -> Matrix<'a, f64> {
        let len = self.classes * self.tensors;
        Matrix {
            data: &self.data[i * len..(i + 1) * len],
            rows: self.classes,
            cols: self.tensors,
        }
    }
}

/// AZ-NAS's trainability input (ABI 7): for each pair of consecutive block outputs, in graph
/// order, the matrix M = Σ g_in g_outᵀ / (N · positions) of one random-sign vector-Jacobian
/// product (see docs/semantics.md), with whether the block returned the signs unchanged.
#[derive(Clone, Debug)]
pub struct BlockJacobian<'a> {
    pub data: &'a [f64],
    pub pairs: Vec<crate::abi::GaBlockPair>,
}

impl<'a> BlockJacobian<'a> {
    /// Builds the view, checking that every pair's matrix lies inside `data`.
    pub fn new(data: &'a [f64], pairs: Vec<crate::abi::GaBlockPair>) -> Result<Self, String> {
        for (k, p) in pairs.iter().enumerate() {
            let end =
                (p.offset as usize).checked_add((p.rows as usize).saturating_mul(p.cols as usize));
            if end.is_none_or(|e| e > data.len()) {
                return Err(format!(
                    "block pair {k}: a {} x {} matrix at {} does not fit in {} values",
                    p.rows,
                    p.cols,
                    p.offset,
                    data.len()
                ));
            }
        }
        Ok(BlockJacobian { data, pairs })
    }
    /// Pair `k`'s matrix, rows × cols.
    pub fn pair(&self, k: usize) -> Matrix<'a, f64> {
        let p = &self.pairs[k];
        let (o, r, c) = (p.offset as usize, p.rows as usize, p.cols as usize);
        Matrix {
            data: &self.data[o..o + r * c],
            rows: r,
            cols: c,
        }
    }
}

/// The output of every Conv node, per sample: `maps` is N × units, `layers` say where each
/// layer's block sits in a row.
#[derive(Clone, Debug)]
pub struct FeatureMaps<'a> {
    pub maps: Matrix<'a, f64>,
    pub layers: Vec<FeatureLayer>,
}

impl<'a> FeatureMaps<'a> {
    /// Layer `l` of sample `i`: channels × spatial, row-major.
    pub fn layer(&self, i: usize, l: usize) -> Matrix<'a, f64> {
        let f = &self.layers[l];
        Matrix {
            data: self.maps.row_cols(i, f.offset, f.channels * f.spatial),
            rows: f.channels,
            cols: f.spatial,
        }
    }
}

/// A parameter block of the gradient columns.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub node: String,
    pub op_type: String,
    pub role: u32,
    pub shape: Vec<usize>,
    /// Output-channel axis of a weight, if known.
    pub channel_axis: Option<usize>,
    pub offset: usize,
    pub numel: usize,
}

impl Param {
    pub fn is_weight(&self) -> bool {
        self.role == abi::role::WEIGHT
    }
    pub fn columns(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// What a scorer sees. Accessors fail with a clear message when the scorer did not declare the
/// input (the host passes a null pointer then).
pub struct Inputs<'a> {
    raw: &'a GaInputs,
    params: Vec<Param>,
}

unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T], String> {
    if p.is_null() {
        Err(format!(
            "input '{what}' was not provided (declare it in the scorer's INPUTS)"
        ))
    } else if len == 0 {
        Ok(&[])
    } else {
        Ok(std::slice::from_raw_parts(p, len))
    }
}

impl<'a> Inputs<'a> {
    /// # Safety
    /// `raw` must follow the ABI: every non-null pointer valid for the lengths it states.
    pub unsafe fn from_raw(raw: &'a GaInputs) -> Result<Self, String> {
        if raw.abi_version != abi::ABI_VERSION {
            // A host stamps the inputs with the version the plugin's table declared.
            return Err(format!(
                "host passed inputs of ABI version {}, this plugin speaks {}",
                raw.abi_version,
                abi::ABI_VERSION
            ));
        }
        if (raw.struct_size as usize) < std::mem::size_of::<GaInputs>() {
            return Err(format!(
                "host passed {}-byte inputs, ABI {} needs {}",
                raw.struct_size,
                abi::ABI_VERSION,
                std::mem::size_of::<GaInputs>()
            ));
        }
        let raw_params = slice(raw.params, raw.n_params as usize, "params")?;
        let params = raw_params
            .iter()
            .map(|p| Param {
                name: cstr(p.name),
                node: cstr(p.node),
                op_type: cstr(p.op_type),
                role: p.role,
                shape: slice(p.shape, p.ndim as usize, "shape")
                    .map(|s| s.iter().map(|&d| d as usize).collect())
                    .unwrap_or_default(),
                channel_axis: usize::try_from(p.channel_axis).ok(),
                offset: p.offset as usize,
                numel: p.numel as usize,
            })
            .collect();
        Ok(Inputs { raw, params })
    }

    pub fn n_samples(&self) -> usize {
        self.raw.n_samples as usize
    }
    pub fn n_columns(&self) -> usize {
        self.raw.n_columns as usize
    }
    pub fn n_classes(&self) -> usize {
        self.raw.n_classes as usize
    }
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    /// The table's `user_data` (null unless the plugin set one).
    pub fn user_data(&self) -> *mut std::ffi::c_void {
        self.raw.user_data
    }
    pub fn grads(&self) -> Result<Grads<'a>, String> {
        let (rows, cols) = (self.n_samples(), self.n_columns());
        unsafe {
            match self.raw.precision {
                abi::precision::F32 => Ok(Grads::F32(Matrix {
                    data: slice(
                        self.raw.grads as *const f32,
                        rows * cols,
                        "per-sample grads",
                    )?,
                    rows,
                    cols,
                })),
                abi::precision::F64 => Ok(Grads::F64(Matrix {
                    data: slice(
                        self.raw.grads as *const f64,
                        rows * cols,
                        "per-sample grads",
                    )?,
                    rows,
                    cols,
                })),
                p => Err(format!("unknown gradient precision code {p}")),
            }
        }
    }
    /// Packed signs of the per-sample gradients (N rows) and of the class-mean gradients (one
    /// row per class present, ascending labels).
    pub fn signs(&self) -> Result<(SignPlanes<'a>, SignPlanes<'a>), String> {
        let (rows, words, cols) = (
            self.n_samples(),
            self.raw.sign_words as usize,
            self.n_columns(),
        );
        let classes = self.raw.n_sign_classes as usize;
        if !self.raw.sign_pos.is_null() && words != cols.div_ceil(64) {
            return Err(format!(
                "sign planes of {words} words per row do not fit {cols} columns"
            ));
        }
        unsafe {
            Ok((
                SignPlanes {
                    pos: slice(self.raw.sign_pos, rows * words, "gradient signs")?,
                    neg: slice(self.raw.sign_neg, rows * words, "gradient signs")?,
                    rows,
                    words,
                    cols,
                },
                SignPlanes {
                    pos: slice(self.raw.class_sign_pos, classes * words, "class-mean signs")?,
                    neg: slice(self.raw.class_sign_neg, classes * words, "class-mean signs")?,
                    rows: classes,
                    words,
                    cols,
                },
            ))
        }
    }
    pub fn labels(&self) -> Result<&'a [i64], String> {
        unsafe { slice(self.raw.labels, self.n_samples(), "labels") }
    }
    pub fn logits(&self) -> Result<Matrix<'a, f64>, String> {
        let (rows, cols) = (self.n_samples(), self.n_classes());
        let data = unsafe { slice(self.raw.logits, rows * cols, "logits")? };
        Ok(Matrix { data, rows, cols })
    }
    pub fn param_values(&self) -> Result<&'a [f64], String> {
        unsafe { slice(self.raw.param_values, self.n_columns(), "param values") }
    }
    pub fn batch_grads(&self) -> Result<&'a [f64], String> {
        unsafe { slice(self.raw.batch_grads, self.n_columns(), "batch grads") }
    }
    pub fn relu_codes(&self) -> Result<Matrix<'a, u8>, String> {
        let (rows, cols) = (self.n_samples(), self.raw.n_relu_units as usize);
        let data = unsafe { slice(self.raw.relu_codes, rows * cols, "ReLU codes")? };
        Ok(Matrix { data, rows, cols })
    }
    pub fn input_jacobian(&self) -> Result<Matrix<'a, f64>, String> {
        let (rows, cols) = (self.n_samples(), self.raw.input_numel as usize);
        let data = unsafe { slice(self.raw.input_jacobian, rows * cols, "input Jacobian")? };
        Ok(Matrix { data, rows, cols })
    }
    pub fn synflow_grads(&self) -> Result<&'a [f64], String> {
        unsafe { slice(self.raw.synflow_grads, self.n_columns(), "synflow grads") }
    }
    pub fn hessian_grad_product(&self) -> Result<&'a [f64], String> {
        unsafe {
            slice(
                self.raw.hessian_grad_product,
                self.n_columns(),
                "Hessian-gradient product",
            )
        }
    }
    fn feature_layers(&self) -> Result<Vec<FeatureLayer>, String> {
        let k = self.raw.n_feature_layers as usize;
        let raw_layers = unsafe { slice(self.raw.feature_layers, k, "feature layers")? };
        let live = if self.raw.feature_live.is_null() {
            None
        } else {
            Some(unsafe { slice(self.raw.feature_live, k, "feature liveness")? })
        };
        Ok(raw_layers
            .iter()
            .enumerate()
            .map(|(i, l)| FeatureLayer {
                node: unsafe { cstr(l.node) },
                channels: l.channels as usize,
                spatial: l.spatial as usize,
                offset: l.offset as usize,
                live: live.is_none_or(|v| v[i] != 0),
            })
            .collect())
    }
    /// The feature maps (declare `FEATURE_MAPS`).
    pub fn feature_maps(&self) -> Result<FeatureMaps<'a>, String> {
        let (rows, cols) = (self.n_samples(), self.raw.n_feature_units as usize);
        let data = unsafe { slice(self.raw.feature_maps, rows * cols, "feature maps")? };
        let layers = self.feature_layers()?;
        for f in &layers {
            if f.offset + f.channels * f.spatial > cols {
                return Err(format!(
                    "feature layer {} ends at {} but rows have {cols} values",
                    f.node,
                    f.offset + f.channels * f.spatial
                ));
            }
        }
        Ok(FeatureMaps {
            maps: Matrix { data, rows, cols },
            layers,
        })
    }
    /// Each Conv output's channel covariance (declare `FEATURE_COVARIANCE`).
    pub fn feature_covariance(&self) -> Result<FeatureCovariance<'a>, String> {
        let layers = self.feature_layers()?;
        let len = layers.iter().map(|l| l.channels * l.channels).sum();
        let data = unsafe { slice(self.raw.feature_covariance, len, "feature covariance")? };
        FeatureCovariance::new(data, layers)
    }
    /// The logits' Jacobian with respect to element 0 of every parameter tensor, with the
    /// eval-BatchNorm logits of the same forward (declare `LOGIT_JACOBIAN`).
    pub fn logit_jacobian(&self) -> Result<LogitJacobian<'a>, String> {
        let (n, classes) = (self.n_samples(), self.n_classes());
        let tensors = self.raw.n_jacobian_tensors as usize;
        let data = unsafe {
            slice(
                self.raw.logit_jacobian,
                n * classes * tensors,
                "logit Jacobian",
            )?
        };
        let logits = unsafe { slice(self.raw.eval_logits, n * classes, "eval-mode logits")? };
        Ok(LogitJacobian {
            data,
            logits: Matrix {
                data: logits,
                rows: n,
                cols: classes,
            },
            samples: n,
            classes,
            tensors,
        })
    }
    /// The block-to-block matrices of AZ-NAS's trainability (declare `BLOCK_JACOBIAN`).
    pub fn block_jacobian(&self) -> Result<BlockJacobian<'a>, String> {
        let n = self.raw.n_block_pairs as usize;
        let pairs = unsafe { slice(self.raw.block_pairs, n, "block pairs")? }.to_vec();
        let len = pairs
            .iter()
            .map(|p| p.offset as usize + (p.rows * p.cols) as usize)
            .max()
            .unwrap_or(0);
        let data = unsafe { slice(self.raw.block_jacobian, len, "block Jacobian")? };
        BlockJacobian::new(data, pairs)
    }
    pub fn model_params(&self) -> f64 {
        self.raw.model_params
    }
    pub fn model_flops(&self) -> f64 {
        self.raw.model_flops
    }
}

/// One scoring strategy. Higher score = predicted better.
pub trait Scorer {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// `abi::inputs::*` flags, or-ed.
    const INPUTS: u64;
    fn score(inputs: &Inputs) -> Result<f64, String>;
}

fn write_err(msg: &str, err: *mut c_char, err_len: usize) {
    if err.is_null() || err_len == 0 {
        return;
    }
    let bytes = msg.as_bytes();
    let n = bytes.len().min(err_len - 1);
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), err as *mut u8, n);
        *err.add(n) = 0;
    }
}

/// The C entry point of scorer `S`: never unwinds into the host.
///
/// # Safety
/// Called by the host with pointers that follow the ABI.
pub unsafe extern "C" fn trampoline<S: Scorer>(
    inputs: *const GaInputs,
    out: *mut f64,
    err: *mut c_char,
    err_len: usize,
) -> i32 {
    let res = catch_unwind(AssertUnwindSafe(|| {
        if inputs.is_null() || out.is_null() {
            return Err("null inputs or output pointer".to_string());
        }
        let inputs = Inputs::from_raw(&*inputs)?;
        S::score(&inputs)
    }));
    match res {
        Ok(Ok(v)) => {
            *out = v;
            0
        }
        Ok(Err(msg)) => {
            write_err(&msg, err, err_len);
            1
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            write_err(&format!("scorer panicked: {msg}"), err, err_len);
            2
        }
    }
}

/// A scorer's table row before it is frozen into C strings.
pub struct ScorerEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub inputs: u64,
    pub score: abi::ScoreFn,
}

impl ScorerEntry {
    pub fn of<S: Scorer>() -> Self {
        ScorerEntry {
            name: S::NAME,
            description: S::DESCRIPTION,
            inputs: S::INPUTS,
            score: trampoline::<S>,
        }
    }
}

/// Owns the C strings and rows behind a [`GaPluginTable`]; lives in a `static`.
pub struct PluginTableHolder {
    table: GaPluginTable,
    _rows: Vec<GaScorer>,
    _strings: Vec<CString>,
}

// The raw pointers point into the holder's own heap data, which is never mutated.
unsafe impl Send for PluginTableHolder {}
unsafe impl Sync for PluginTableHolder {}

impl PluginTableHolder {
    pub fn new(plugin_name: &str, plugin_version: &str, entries: Vec<ScorerEntry>) -> Self {
        let mut strings = vec![];
        let mut keep = |s: &str| {
            let c = CString::new(s.replace('\0', " ")).expect("no NUL left");
            let p = c.as_ptr();
            strings.push(c);
            p
        };
        let plugin_name = keep(plugin_name);
        let plugin_version = keep(plugin_version);
        let rows: Vec<GaScorer> = entries
            .iter()
            .map(|e| GaScorer {
                name: keep(e.name),
                description: keep(e.description),
                inputs: e.inputs,
                score: e.score,
            })
            .collect();
        let table = GaPluginTable {
            abi_version: abi::ABI_VERSION,
            n_scorers: rows.len() as u32,
            plugin_name,
            plugin_version,
            scorers: rows.as_ptr(),
            struct_size: std::mem::size_of::<GaPluginTable>() as u32,
            reserved: 0,
            user_data: std::ptr::null_mut(),
            init: None,
            teardown: None,
        };
        PluginTableHolder {
            table,
            _rows: rows,
            _strings: strings,
        }
    }
    pub fn table(&self) -> &GaPluginTable {
        &self.table
    }
}

/// Exports a plugin: `export_plugin!(name: "my-scorers", scorers: [MyScorer, Other]);` defines the
/// C symbol `gradalign_plugin_table` plus a Rust function `plugin_table()` for static linking.
/// Plugins meant to be linked side by side into one binary pick a unique symbol instead:
/// `export_plugin!(symbol: libstem_plugin_table, name: …, scorers: […])`, where `liblibstem.so`
/// is the library's file name (the host looks that name up when the generic one is absent).
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, scorers: [$($s:ty),* $(,)?] $(,)?) => {
        $crate::export_plugin!(symbol: gradalign_plugin_table, name: $name, scorers: [$($s),*]);
    };
    (symbol: $sym:ident, name: $name:expr, scorers: [$($s:ty),* $(,)?] $(,)?) => {
        /// This plugin's scorer table (the same one the C symbol returns).
        pub fn plugin_table() -> &'static $crate::abi::GaPluginTable {
            static HOLDER: ::std::sync::OnceLock<$crate::PluginTableHolder> =
                ::std::sync::OnceLock::new();
            HOLDER
                .get_or_init(|| {
                    $crate::PluginTableHolder::new(
                        $name,
                        env!("CARGO_PKG_VERSION"),
                        vec![$($crate::ScorerEntry::of::<$s>()),*],
                    )
                })
                .table()
        }
        #[no_mangle]
        pub extern "C" fn $sym() -> *const $crate::abi::GaPluginTable {
            plugin_table() as *const _
        }
    };
}

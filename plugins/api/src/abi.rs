//! The stable C ABI between the gradalign host and scorer plugins (see `include/gradalign_plugin.h`).
//!
//! A plugin library exports one symbol, `gradalign_plugin_table` (or `<stem>_plugin_table`, where
//! `lib<stem>.so` is the library's file name — that form lets several plugins be linked into one
//! binary), of type [`TableFn`]. The table's first field is the ABI version, at the same offset in
//! every version, so the host can refuse a plugin it cannot read before reading anything else.
//!
//! Growth is append-only: a new version only adds fields at the end of [`GaPluginTable`] and
//! [`GaInputs`] (never to [`GaScorer`] or [`GaParam`], which sit in arrays), and records the size
//! it was built with in `struct_size`. A host accepts every version from
//! [`OLDEST_ABI_VERSION`] to [`ABI_VERSION`], reads only the prefix a plugin's version defines,
//! and passes each plugin inputs stamped with the plugin's own version.
//!
//! Threading and lifetimes: `init` runs once, right after loading, before any scorer; `teardown`
//! once, after the last call, before the library is unloaded. `score` may be called from several
//! threads at once (with the same `user_data`), so a scorer must be thread-safe. Every pointer in
//! [`GaInputs`] is valid only during that one `score` call; the table, its strings and scorer
//! rows must stay valid while the library is loaded.

use std::ffi::{c_char, c_void};

/// This ABI's version: 3 appended `struct_size`, `user_data`, `init` and `teardown` to the table
/// and `struct_size`, `user_data` to the inputs; 4 appended the feature maps to the inputs
/// (`inputs::FEATURE_MAPS`); 5 appended the per-layer channel covariance
/// (`inputs::FEATURE_COVARIANCE`) and each feature layer's liveness (`feature_live`); 6 appended
/// the logits' Jacobian with respect to one element of every parameter tensor
/// (`inputs::LOGIT_JACOBIAN`); 7 appended the block-to-block gradient matrices of AZ-NAS's
/// trainability (`inputs::BLOCK_JACOBIAN`).
pub const ABI_VERSION: u32 = 7;
/// The oldest plugin ABI this host still loads (version 2 tables are a prefix of version 3).
pub const OLDEST_ABI_VERSION: u32 = 2;
/// The generic exported symbol.
pub const SYMBOL: &str = "gradalign_plugin_table";

/// Input flags: what a scorer needs. The host computes only the union of the selected scorers'
/// flags.
pub mod inputs {
    /// Per-sample gradients, N × P (f32, or f64 under `--precision f64`), columns as the layout.
    pub const PER_SAMPLE_GRADS: u64 = 1 << 0;
    /// Probe labels, N int64.
    pub const LABELS: u64 = 1 << 1;
    /// Logits, N × classes (f64).
    pub const LOGITS: u64 = 1 << 2;
    /// Parameter values, P (f64), same columns as the gradients.
    pub const PARAM_VALUES: u64 = 1 << 3;
    /// Batch gradient (sum of the per-sample gradients), P (f64).
    pub const BATCH_GRADS: u64 = 1 << 4;
    /// Binary ReLU codes (input > 0), N × U bytes.
    pub const RELU_CODES: u64 = 1 << 5;
    /// Input Jacobian of the summed logits, N × D (f64).
    pub const INPUT_JACOBIAN: u64 = 1 << 6;
    /// `model_params` and `model_flops`.
    pub const MODEL_INFO: u64 = 1 << 7;
    /// SynFlow gradients: ∂R/∂W of the BN-free |W| network on one all-ones input, P (f64).
    pub const SYNFLOW_GRADS: u64 = 1 << 8;
    /// Hessian × batch-gradient product H·g, P (f64).
    pub const HESSIAN_GRAD_PRODUCT: u64 = 1 << 9;
    /// Gradient columns for every trainable parameter (biases, norm affines), not only weights.
    pub const ALL_PARAMS: u64 = 1 << 10;
    /// Packed signs of the per-sample gradients and of each class's mean gradient (see
    /// `GaInputs::sign_pos`). Available even when the N × P gradients exceed `--max-memory`.
    pub const SIGNS: u64 = 1 << 11;
    /// ABI 4: the output of every Conv node (the layers' pre-activation feature maps), f64, per
    /// sample; see `GaInputs::feature_maps`.
    pub const FEATURE_MAPS: u64 = 1 << 12;
    /// ABI 5: for every Conv output, the C × C covariance of its channels over all samples and
    /// positions (f64, centred, divided by N · spatial), computed by the host once for every
    /// scorer that asks; see `GaInputs::feature_covariance`. Far smaller than the maps.
    pub const FEATURE_COVARIANCE: u64 = 1 << 13;
    /// ABI 6: per sample, the Jacobian of the logits with respect to element 0 of every
    /// trainable parameter tensor, BatchNorm at its running statistics, and that forward's
    /// logits (f64); see `GaInputs::logit_jacobian`. One gradient run per class.
    pub const LOGIT_JACOBIAN: u64 = 1 << 14;
    /// ABI 7: for each pair of consecutive block outputs (the feature maps every path to the
    /// logits passes through), the matrix E[g_in g_outᵀ] of a random-sign vector-Jacobian
    /// product between them; see `GaInputs::block_jacobian`.
    pub const BLOCK_JACOBIAN: u64 = 1 << 15;
    /// Every flag this ABI version knows.
    pub const KNOWN: u64 = (1 << 16) - 1;
    /// The flags a plugin built for ABI `version` may declare.
    pub const fn known_in(version: u32) -> u64 {
        if version >= 7 {
            KNOWN
        } else if version >= 6 {
            (1 << 15) - 1
        } else if version >= 5 {
            (1 << 14) - 1
        } else if version >= 4 {
            (1 << 13) - 1
        } else {
            (1 << 12) - 1
        }
    }
}

/// One pair of consecutive block outputs (ABI 7): a `rows × cols` row-major f64 matrix starting
/// at `offset` in `GaInputs::block_jacobian`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GaBlockPair {
    /// Channels of the earlier block output times the square of the stride between the two
    /// (its positions are folded into channels when the later output is smaller).
    pub rows: u64,
    /// Channels of the later block output.
    pub cols: u64,
    pub offset: u64,
    /// 1 when the vector-Jacobian product returned the random signs unchanged (the block is
    /// an identity), else 0.
    pub identity: u64,
}

/// One layer of the feature maps: columns `offset .. offset + channels · spatial` of each
/// sample's row, channel-major (channel c's map is `spatial` values from `offset + c · spatial`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaFeatureLayer {
    /// The ONNX node whose output this is.
    pub node: *const c_char,
    pub channels: u64,
    /// Values per channel (H · W for a 2-D convolution).
    pub spatial: u64,
    pub offset: u64,
}

/// Role of a parameter block.
pub mod role {
    /// Conv / ConvTranspose / Gemm / MatMul weight.
    pub const WEIGHT: u32 = 0;
    /// The bias of such a layer.
    pub const BIAS: u32 = 1;
    /// Anything else (normalisation scale and shift, free tensors).
    pub const OTHER: u32 = 2;
}

/// Precision of `GaInputs::grads`.
pub mod precision {
    pub const F32: u32 = 0;
    pub const F64: u32 = 1;
}

/// One parameter block: columns `offset .. offset + numel` of the gradient matrix.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaParam {
    pub name: *const c_char,
    pub node: *const c_char,
    pub op_type: *const c_char,
    pub role: u32,
    pub ndim: u32,
    pub shape: *const u64,
    /// For a weight: the axis of its output channels (Conv 0, ConvTranspose 1, Gemm 0 or 1 by
    /// `transB`, MatMul last); -1 otherwise.
    pub channel_axis: i64,
    pub offset: u64,
    pub numel: u64,
}

/// Everything a scorer may read. Pointers the scorer did not ask for may be null.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaInputs {
    pub abi_version: u32,
    /// Of `grads`: `precision::F32` or `precision::F64`.
    pub precision: u32,
    pub n_samples: u64,
    pub n_columns: u64,
    pub n_classes: u64,
    pub params: *const GaParam,
    pub n_params: u64,
    /// N × n_columns, row-major.
    pub grads: *const c_void,
    pub param_values: *const f64,
    pub batch_grads: *const f64,
    pub labels: *const i64,
    /// N × n_classes.
    pub logits: *const f64,
    /// N × n_relu_units, 0 or 1.
    pub relu_codes: *const u8,
    pub n_relu_units: u64,
    /// N × input_numel.
    pub input_jacobian: *const f64,
    pub input_numel: u64,
    pub synflow_grads: *const f64,
    pub hessian_grad_product: *const f64,
    pub model_params: f64,
    pub model_flops: f64,
    /// Signs of the per-sample gradients as two bit-planes, N × `sign_words` u64 each: bit
    /// c % 64 of word c / 64 of a row is set in `sign_pos` where the gradient column c is > 0
    /// and in `sign_neg` where it is < 0 (ABI version 2).
    pub sign_pos: *const u64,
    pub sign_neg: *const u64,
    pub sign_words: u64,
    /// The same planes for the sign of each class's mean gradient: one row per class present in
    /// the labels, in ascending label order.
    pub class_sign_pos: *const u64,
    pub class_sign_neg: *const u64,
    pub n_sign_classes: u64,
    /// ABI 3: `sizeof(GaInputs)` as the host built it (fields beyond a plugin's version are
    /// never needed by that plugin).
    pub struct_size: u64,
    /// ABI 3: the plugin table's `user_data`, passed back to every scorer.
    pub user_data: *mut c_void,
    /// ABI 4: N × `n_feature_units` f64, row-major, one row per sample (`inputs::FEATURE_MAPS`).
    pub feature_maps: *const f64,
    pub n_feature_units: u64,
    /// Where each layer sits in a row, in graph order. Set with `FEATURE_MAPS` or (ABI 5)
    /// `FEATURE_COVARIANCE`.
    pub feature_layers: *const GaFeatureLayer,
    pub n_feature_layers: u64,
    /// ABI 5: the layers' channel covariances one after another, layer l's `channels²` values
    /// (row-major) starting at Σ_{j<l} channels_j² (`inputs::FEATURE_COVARIANCE`).
    pub feature_covariance: *const f64,
    /// ABI 5: `n_feature_layers` bytes, 1 where the layer's output can change the logits and 0
    /// where every path from it ends in a multiplication by a constant zero (set whenever
    /// `feature_layers` is).
    pub feature_live: *const u8,
    /// ABI 6: N × n_classes × `n_jacobian_tensors` f64, row-major: ∂ logit_c(x_i) / ∂ θ_t[0]
    /// for every trainable float initializer θ_t (initializer order; zero columns for those that
    /// cannot reach the logits), BatchNorm at its running statistics (`inputs::LOGIT_JACOBIAN`).
    pub logit_jacobian: *const f64,
    pub n_jacobian_tensors: u64,
    /// ABI 6: N × n_classes, the logits of that same eval-BatchNorm forward.
    pub eval_logits: *const f64,
    /// ABI 7: the pair matrices one after another (`inputs::BLOCK_JACOBIAN`), described by
    /// `block_pairs` in graph order (earliest pair first).
    pub block_jacobian: *const f64,
    pub block_pairs: *const GaBlockPair,
    pub n_block_pairs: u64,
}

/// Size of [`GaInputs`] up to the end of ABI version 2's fields.
pub const INPUTS_V2_SIZE: usize = std::mem::offset_of!(GaInputs, struct_size);

/// Computes one score. Returns 0 and writes `*out` on success; otherwise returns non-zero and
/// writes a NUL-terminated message of at most `err_len` bytes into `err`.
pub type ScoreFn = unsafe extern "C" fn(
    inputs: *const GaInputs,
    out: *mut f64,
    err: *mut c_char,
    err_len: usize,
) -> i32;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaScorer {
    pub name: *const c_char,
    pub description: *const c_char,
    /// `inputs::*` flags.
    pub inputs: u64,
    pub score: ScoreFn,
}

/// Called once after loading with the table's `user_data`; returns 0, or non-zero and a
/// NUL-terminated message (the plugin then fails to load with that message).
pub type InitFn =
    unsafe extern "C" fn(user_data: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
/// Called once before the library is unloaded.
pub type TeardownFn = unsafe extern "C" fn(user_data: *mut c_void);

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaPluginTable {
    /// Must stay the first field.
    pub abi_version: u32,
    pub n_scorers: u32,
    pub plugin_name: *const c_char,
    pub plugin_version: *const c_char,
    pub scorers: *const GaScorer,
    /// ABI 3: `sizeof(GaPluginTable)` as the plugin was built; the host reads no field beyond it.
    pub struct_size: u32,
    pub reserved: u32,
    /// ABI 3: handed to `init`, `teardown` and (as `GaInputs::user_data`) every scorer.
    pub user_data: *mut c_void,
    /// ABI 3, may be null.
    pub init: Option<InitFn>,
    /// ABI 3, may be null.
    pub teardown: Option<TeardownFn>,
}

/// The version 2 table: the prefix of [`GaPluginTable`] an ABI-2 plugin provides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GaPluginTableV2 {
    pub abi_version: u32,
    pub n_scorers: u32,
    pub plugin_name: *const c_char,
    pub plugin_version: *const c_char,
    pub scorers: *const GaScorer,
}

pub type TableFn = unsafe extern "C" fn() -> *const GaPluginTable;

// The layout is the contract with C plugins (the header asserts the same sizes on its side).
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<GaParam>() == 64);
    assert!(std::mem::size_of::<GaScorer>() == 32);
    assert!(std::mem::size_of::<GaPluginTableV2>() == 32);
    assert!(std::mem::offset_of!(GaPluginTable, struct_size) == 32);
    assert!(std::mem::size_of::<GaPluginTable>() == 64);
    assert!(INPUTS_V2_SIZE == 200);
    assert!(std::mem::offset_of!(GaInputs, feature_maps) == 216);
    assert!(std::mem::offset_of!(GaInputs, feature_covariance) == 248);
    assert!(std::mem::offset_of!(GaInputs, logit_jacobian) == 264);
    assert!(std::mem::offset_of!(GaInputs, block_jacobian) == 288);
    assert!(std::mem::size_of::<GaInputs>() == 312);
    assert!(std::mem::size_of::<GaBlockPair>() == 32);
    assert!(std::mem::size_of::<GaFeatureLayer>() == 32);
};

//! Owned scorer inputs and their borrowed C view (`GaInputs`).

use std::ffi::CString;

use gradalign_plugin_api::abi::{self, GaFeatureLayer, GaInputs, GaParam};
use gradalign_plugin_api::PackedSigns;

use crate::inputs::jacobian::LogitJacobian;
use crate::inputs::passes::FeatureMaps;
use crate::onnx::HostTensor;

/// A parameter block as the ABI describes it.
#[derive(Clone, Debug)]
pub struct ParamMeta {
    pub name: String,
    pub node: String,
    pub op_type: String,
    pub role: u32,
    pub shape: Vec<usize>,
    pub channel_axis: i64,
    pub offset: usize,
    pub numel: usize,
}

/// Everything computed for one model; fields stay `None` unless a selected scorer asked.
#[derive(Default)]
pub struct InputData {
    pub n: usize,
    pub classes: usize,
    pub params: Vec<ParamMeta>,
    /// `[N, P]`, F32 or F64.
    pub grads: Option<HostTensor>,
    pub param_values: Option<Vec<f64>>,
    pub batch_grads: Option<Vec<f64>>,
    pub labels: Vec<i64>,
    pub logits: Option<Vec<f64>>,
    pub relu_codes: Option<(Vec<u8>, usize)>,
    pub input_jacobian: Option<(Vec<f64>, usize)>,
    pub synflow_grads: Option<Vec<f64>>,
    pub hessian_grad_product: Option<Vec<f64>>,
    pub model_params: f64,
    pub model_flops: f64,
    /// Packed signs of the per-sample gradients and of the class-mean gradients.
    pub signs: Option<(PackedSigns, PackedSigns)>,
    /// Every Conv output per sample (ABI 4) and/or each layer's channel covariance (ABI 5).
    pub feature_maps: Option<FeatureMaps>,
    /// The logits' Jacobian with respect to element 0 of every parameter tensor (ABI 6).
    pub logit_jacobian: Option<LogitJacobian>,
    /// AZ-NAS trainability's block-to-block matrices (ABI 7).
    pub block_jacobian: Option<crate::inputs::block_jacobian::BlockJacobian>,
}

/// The C view of an [`InputData`]; owns the strings and arrays the pointers refer to.
pub struct RawInputs<'a> {
    pub inputs: GaInputs,
    _params: Vec<GaParam>,
    _strings: Vec<CString>,
    _shapes: Vec<Vec<u64>>,
    _layers: Vec<GaFeatureLayer>,
    _live: Vec<u8>,
    _data: std::marker::PhantomData<&'a InputData>,
}

fn ptr<T>(v: &Option<Vec<T>>) -> *const T {
    v.as_ref().map_or(std::ptr::null(), |v| v.as_ptr())
}

impl InputData {
    pub fn raw(&self) -> RawInputs<'_> {
        let mut strings = vec![];
        let mut keep = |s: &str| {
            let c = CString::new(s.replace('\0', " ")).expect("no NUL left");
            let p = c.as_ptr();
            strings.push(c);
            p
        };
        let shapes: Vec<Vec<u64>> = self
            .params
            .iter()
            .map(|p| p.shape.iter().map(|&d| d as u64).collect())
            .collect();
        let params: Vec<GaParam> = self
            .params
            .iter()
            .zip(&shapes)
            .map(|(p, shape)| GaParam {
                name: keep(&p.name),
                node: keep(&p.node),
                op_type: keep(&p.op_type),
                role: p.role,
                ndim: shape.len() as u32,
                shape: shape.as_ptr(),
                channel_axis: p.channel_axis,
                offset: p.offset as u64,
                numel: p.numel as u64,
            })
            .collect();
        let (layers, live): (Vec<GaFeatureLayer>, Vec<u8>) = self
            .feature_maps
            .iter()
            .flat_map(|f| &f.layers)
            .map(|l| {
                let layer = GaFeatureLayer {
                    node: keep(&l.node),
                    channels: l.channels as u64,
                    spatial: l.spatial as u64,
                    offset: l.offset as u64,
                };
                (layer, u8::from(l.live))
            })
            .unzip();
        let (precision, grads, cols) = match &self.grads {
            Some(HostTensor::F32(a)) => (
                abi::precision::F32,
                a.as_slice().expect("standard layout").as_ptr() as *const _,
                a.shape()[1],
            ),
            Some(HostTensor::F64(a)) => (
                abi::precision::F64,
                a.as_slice().expect("standard layout").as_ptr() as *const _,
                a.shape()[1],
            ),
            _ => (
                abi::precision::F32,
                std::ptr::null(),
                self.params
                    .iter()
                    .map(|p| p.offset + p.numel)
                    .max()
                    .unwrap_or(0),
            ),
        };
        let inputs = GaInputs {
            abi_version: abi::ABI_VERSION,
            precision,
            n_samples: self.n as u64,
            n_columns: cols as u64,
            n_classes: self.classes as u64,
            params: params.as_ptr(),
            n_params: params.len() as u64,
            grads,
            param_values: ptr(&self.param_values),
            batch_grads: ptr(&self.batch_grads),
            labels: self.labels.as_ptr(),
            logits: ptr(&self.logits),
            relu_codes: self
                .relu_codes
                .as_ref()
                .map_or(std::ptr::null(), |(c, _)| c.as_ptr()),
            n_relu_units: self.relu_codes.as_ref().map_or(0, |(_, u)| *u as u64),
            input_jacobian: self
                .input_jacobian
                .as_ref()
                .map_or(std::ptr::null(), |(j, _)| j.as_ptr()),
            input_numel: self.input_jacobian.as_ref().map_or(0, |(_, d)| *d as u64),
            synflow_grads: ptr(&self.synflow_grads),
            hessian_grad_product: ptr(&self.hessian_grad_product),
            model_params: self.model_params,
            model_flops: self.model_flops,
            sign_pos: self
                .signs
                .as_ref()
                .map_or(std::ptr::null(), |s| s.0.pos.as_ptr()),
            sign_neg: self
                .signs
                .as_ref()
                .map_or(std::ptr::null(), |s| s.0.neg.as_ptr()),
            sign_words: self.signs.as_ref().map_or(0, |s| s.0.words as u64),
            class_sign_pos: self
                .signs
                .as_ref()
                .map_or(std::ptr::null(), |s| s.1.pos.as_ptr()),
            class_sign_neg: self
                .signs
                .as_ref()
                .map_or(std::ptr::null(), |s| s.1.neg.as_ptr()),
            n_sign_classes: self.signs.as_ref().map_or(0, |s| s.1.rows as u64),
            struct_size: std::mem::size_of::<GaInputs>() as u64,
            // Set per plugin when the scorer is called.
            user_data: std::ptr::null_mut(),
            feature_maps: self
                .feature_maps
                .as_ref()
                .and_then(|f| f.data.as_ref())
                .map_or(std::ptr::null(), |d| d.as_ptr()),
            n_feature_units: self.feature_maps.as_ref().map_or(0, |f| f.units as u64),
            feature_layers: if self.feature_maps.is_some() {
                layers.as_ptr()
            } else {
                std::ptr::null()
            },
            n_feature_layers: layers.len() as u64,
            feature_covariance: self
                .feature_maps
                .as_ref()
                .and_then(|f| f.covariance.as_ref())
                .map_or(std::ptr::null(), |c| c.as_ptr()),
            feature_live: if self.feature_maps.is_some() {
                live.as_ptr()
            } else {
                std::ptr::null()
            },
            logit_jacobian: self
                .logit_jacobian
                .as_ref()
                .map_or(std::ptr::null(), |j| j.data.as_ptr()),
            n_jacobian_tensors: self.logit_jacobian.as_ref().map_or(0, |j| j.tensors as u64),
            eval_logits: self
                .logit_jacobian
                .as_ref()
                .map_or(std::ptr::null(), |j| j.logits.as_ptr()),
            block_jacobian: self
                .block_jacobian
                .as_ref()
                .map_or(std::ptr::null(), |b| b.data.as_ptr()),
            block_pairs: self
                .block_jacobian
                .as_ref()
                .map_or(std::ptr::null(), |b| b.pairs.as_ptr()),
            n_block_pairs: self
                .block_jacobian
                .as_ref()
                .map_or(0, |b| b.pairs.len() as u64),
        };
        RawInputs {
            inputs,
            _params: params,
            _strings: strings,
            _shapes: shapes,
            _layers: layers,
            _live: live,
            _data: std::marker::PhantomData,
        }
    }
}

/// The inputs a scorer declared and nothing else: undeclared pointers are null, so a scorer
/// cannot come to depend on something the engine only computed for another one.
pub fn masked(raw: &GaInputs, flags: u64) -> GaInputs {
    use abi::inputs::*;
    let mut m = *raw;
    let has = |f: u64| flags & f != 0;
    if !has(PER_SAMPLE_GRADS) {
        m.grads = std::ptr::null();
    }
    if !has(LABELS) {
        m.labels = std::ptr::null();
    }
    if !has(LOGITS) {
        m.logits = std::ptr::null();
    }
    if !has(PARAM_VALUES) {
        m.param_values = std::ptr::null();
    }
    if !has(BATCH_GRADS) {
        m.batch_grads = std::ptr::null();
    }
    if !has(RELU_CODES) {
        m.relu_codes = std::ptr::null();
        m.n_relu_units = 0;
    }
    if !has(INPUT_JACOBIAN) {
        m.input_jacobian = std::ptr::null();
        m.input_numel = 0;
    }
    if !has(SYNFLOW_GRADS) {
        m.synflow_grads = std::ptr::null();
    }
    if !has(HESSIAN_GRAD_PRODUCT) {
        m.hessian_grad_product = std::ptr::null();
    }
    if !has(SIGNS) {
        m.sign_pos = std::ptr::null();
        m.sign_neg = std::ptr::null();
        m.class_sign_pos = std::ptr::null();
        m.class_sign_neg = std::ptr::null();
    }
    if !has(FEATURE_MAPS) {
        m.feature_maps = std::ptr::null();
        m.n_feature_units = 0;
    }
    if !has(FEATURE_COVARIANCE) {
        m.feature_covariance = std::ptr::null();
    }
    if !has(FEATURE_MAPS) && !has(FEATURE_COVARIANCE) {
        m.feature_layers = std::ptr::null();
        m.n_feature_layers = 0;
        m.feature_live = std::ptr::null();
    }
    if !has(LOGIT_JACOBIAN) {
        m.logit_jacobian = std::ptr::null();
        m.n_jacobian_tensors = 0;
        m.eval_logits = std::ptr::null();
    }
    if !has(BLOCK_JACOBIAN) {
        m.block_jacobian = std::ptr::null();
        m.block_pairs = std::ptr::null();
        m.n_block_pairs = 0;
    }
    if !has(MODEL_INFO) {
        m.model_params = f64::NAN;
        m.model_flops = f64::NAN;
    }
    m
}

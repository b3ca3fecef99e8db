//! Scoring one model: compute exactly the inputs the selected scorers declare, then call each
//! scorer through the plugin ABI. One scorer's failure is recorded and the others still run.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use gradalign_plugin_api::abi::{inputs as flag, role};
use gradalign_plugin_api::PackedSigns;

use crate::autodiff::rules::Slot;
use crate::autodiff::{GradOptions, ParamSelect};
use crate::inputs::engine::{self, LayoutEntry, PerSampleGrads};
use crate::inputs::probe::Probe;
use crate::onnx::{HostTensor, Model};
use crate::runtime::{Backend, Device};
use crate::scorers::plugin::inputs::{InputData, ParamMeta};
use crate::scorers::plugin::ScorerInfo;

#[derive(Clone, Debug, serde::Serialize)]
pub struct ScoreReport {
    pub model: String,
    /// In the order the scorers were selected; `None` where the scorer failed.
    pub scores: Vec<(String, Option<f64>)>,
    pub errors: BTreeMap<String, String>,
    pub runtime: String,
    /// Seconds computing inputs (gradients and extra passes).
    pub grad_seconds: f64,
    /// Seconds inside scorers.
    pub score_seconds: f64,
    /// Seconds inside each scorer, in the order of `scores`.
    pub scorer_seconds: Vec<(String, f64)>,
    /// What the user should know about how the inputs were computed (chunking, streaming);
    /// entries starting with [`engine::WARNING`] are warnings.
    pub notes: Vec<String>,
    /// Where the gradient run's time went (the streamed sign path only).
    pub phases: Option<crate::inputs::stream::Phases>,
}

impl ScoreReport {
    /// The warnings among the notes, without their prefix.
    pub fn warnings(&self) -> Vec<&str> {
        self.notes
            .iter()
            .filter_map(|n| n.strip_prefix(engine::WARNING))
            .collect()
    }
}

/// Role and output-channel axis of a parameter, from the node that first consumes it.
fn role_of(model: &Model, name: &str) -> (u32, i64) {
    for node in &model.nodes {
        if let Some(slot) = node.inputs.iter().position(|i| i == name) {
            let ndim = model.initializer(name).map_or(0, |t| t.shape().len()) as i64;
            return match crate::autodiff::ops::slot_role(node, slot, ndim as usize) {
                Slot::Weight { channel_axis } => (role::WEIGHT, channel_axis),
                Slot::Bias => (role::BIAS, -1),
                Slot::Data | Slot::Fixed => (role::OTHER, -1),
            };
        }
    }
    (role::OTHER, -1)
}

fn metas(model: &Model, layout: &[LayoutEntry]) -> Vec<ParamMeta> {
    layout
        .iter()
        .map(|e| {
            let (role, channel_axis) = role_of(model, &e.name);
            ParamMeta {
                name: e.name.clone(),
                node: e.node.clone(),
                op_type: e.op_type.clone(),
                role,
                shape: e.shape.clone(),
                channel_axis,
                offset: e.offset,
                numel: e.numel,
            }
        })
        .collect()
}

fn param_values(model: &Model, metas: &[ParamMeta]) -> Vec<f64> {
    let mut v = Vec::with_capacity(metas.iter().map(|m| m.numel).sum());
    for m in metas {
        match model
            .initializer(&m.name)
            .map(|t| t.cast(crate::onnx::DType::F64))
        {
            Some(HostTensor::F64(a)) => v.extend(a.iter().copied()),
            _ => v.extend(std::iter::repeat_n(0.0, m.numel)),
        }
    }
    v
}

/// A per-name result laid out in `params`' columns; parameters it lacks get zeros.
fn columns_by_name(
    params: &[ParamMeta],
    by_name: &std::collections::HashMap<String, Vec<f64>>,
) -> Vec<f64> {
    let mut v = Vec::with_capacity(params.iter().map(|p| p.numel).sum());
    for p in params {
        match by_name.get(&p.name) {
            Some(g) => v.extend_from_slice(g),
            None => v.extend(std::iter::repeat_n(0.0, p.numel)),
        }
    }
    v
}

fn column_sums(g: &HostTensor) -> Vec<f64> {
    macro_rules! sums {
        ($a:expr) => {{
            let a = $a;
            let cols = a.shape()[1];
            let mut s = vec![0.0f64; cols];
            for row in a.as_slice().expect("standard layout").chunks(cols) {
                for (acc, &v) in s.iter_mut().zip(row) {
                    *acc += v as f64;
                }
            }
            s
        }};
    }
    match g {
        HostTensor::F32(a) => sums!(a),
        HostTensor::F64(a) => sums!(a),
        _ => unreachable!("gradients are float"),
    }
}

/// Packed signs of the rows of `g` and of its class means (classes in ascending label order,
/// sums in sample order: the same numbers the streamed path accumulates).
fn pack_signs(g: &HostTensor, labels: &[i64]) -> (PackedSigns, PackedSigns) {
    let (n, p) = (g.shape()[0], g.shape()[1]);
    let mut classes: BTreeMap<i64, usize> = BTreeMap::new();
    for &y in labels {
        let k = classes.len();
        classes.entry(y).or_insert(k);
    }
    let rank: BTreeMap<i64, usize> = classes.keys().enumerate().map(|(k, &y)| (y, k)).collect();
    let mut signs = PackedSigns::zeros(n, p);
    let mut sums = vec![0.0f64; rank.len() * p];
    macro_rules! fill {
        ($a:expr) => {{
            for (i, row) in $a
                .as_slice()
                .expect("standard layout")
                .chunks(p)
                .enumerate()
            {
                signs.set(i, 0, row);
                let c = rank[&labels[i]];
                for (s, &v) in sums[c * p..(c + 1) * p].iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
        }};
    }
    match g {
        HostTensor::F32(a) => fill!(a),
        HostTensor::F64(a) => fill!(a),
        _ => unreachable!("gradients are float"),
    }
    let mut means = PackedSigns::zeros(rank.len(), p);
    for c in 0..rank.len() {
        means.set(c, 0, &sums[c * p..(c + 1) * p]);
    }
    (signs, means)
}

/// InputData from one gradient run, restricted to the columns of `keep` (all when `None`).
fn input_data(
    model: &Model,
    g: &PerSampleGrads,
    keep: Option<&dyn Fn(&ParamMeta) -> bool>,
    flags: u64,
) -> InputData {
    let all = metas(model, &g.layout);
    let n = g.labels.len();
    let (params, grads) = match keep {
        None => (all, g.grads.clone()),
        Some(keep) => {
            let mut kept = vec![];
            let mut offset = 0;
            for m in all.iter().filter(|m| keep(m)) {
                let mut m = m.clone();
                let from = m.offset;
                m.offset = offset;
                offset += m.numel;
                kept.push((m, from));
            }
            macro_rules! select {
                ($a:expr, $variant:ident, $t:ty) => {{
                    let a = $a
                        .view()
                        .into_dimensionality::<ndarray::Ix2>()
                        .expect("2-D");
                    let mut out = ndarray::Array2::<$t>::zeros((n, offset));
                    for (m, from) in &kept {
                        out.slice_mut(ndarray::s![.., m.offset..m.offset + m.numel])
                            .assign(&a.slice(ndarray::s![.., *from..*from + m.numel]));
                    }
                    HostTensor::$variant(out.into_dyn())
                }};
            }
            let grads = match &g.grads {
                HostTensor::F64(a) => select!(a, F64, f64),
                HostTensor::F32(a) => select!(a, F32, f32),
                _ => unreachable!("gradients are float"),
            };
            (kept.into_iter().map(|(m, _)| m).collect(), grads)
        }
    };
    let signs = (flags & flag::SIGNS != 0).then(|| pack_signs(&grads, &g.labels.to_vec()));
    InputData {
        n,
        signs,
        classes: g.logits.shape().get(1).copied().unwrap_or(0),
        param_values: (flags & (flag::PARAM_VALUES) != 0).then(|| param_values(model, &params)),
        batch_grads: (flags & flag::BATCH_GRADS != 0).then(|| column_sums(&grads)),
        logits: (flags & flag::LOGITS != 0).then(|| g.logits.to_f64_vec()),
        labels: g.labels.to_vec(),
        params,
        grads: (flags & flag::PER_SAMPLE_GRADS != 0).then_some(grads),
        ..Default::default()
    }
}

/// Scores `model` with `scorers`. An error here means no scorer could run (the model or probe is
/// unusable); per-scorer failures are in the report.
pub fn score_model(
    model: &Model,
    probe: &Probe,
    shipped: bool,
    opts: GradOptions,
    backend: Backend,
    device: Device,
    scorers: &[ScorerInfo],
) -> Result<ScoreReport> {
    let t0 = Instant::now();
    let union = scorers.iter().fold(0u64, |f, s| f | s.inputs);
    let grad_flags = flag::PER_SAMPLE_GRADS
        | flag::SIGNS
        | flag::BATCH_GRADS
        | flag::LOGITS
        | flag::PARAM_VALUES
        | flag::LABELS;
    let mut errors = BTreeMap::new();
    let mut runtime = "none".to_string();
    let mut notes: Vec<String> = vec![];
    let mut phases = None;
    // `all_params` serves scorers that declare ALL_PARAMS; `selected` (the user's --params
    // columns) the others, and falls back to `all_params` when the two coincide.
    let mut all_params: Option<InputData> = None;
    let mut selected: Option<InputData> = None;
    if union & grad_flags != 0 {
        let wants_all = union & flag::ALL_PARAMS != 0;
        let run_opts = GradOptions {
            params: if wants_all {
                ParamSelect::All
            } else {
                opts.params
            },
            ..opts
        };
        // The N × P matrix is kept only for scorers that read it; everything else (signs, class
        // signs, batch gradient, logits) is accumulated block by block as the run returns it.
        let matrix_needed = wants_all || union & flag::PER_SAMPLE_GRADS != 0;
        if !matrix_needed || !crate::inputs::stream::matrix_fits(model, probe, run_opts)? {
            // Stream the columns the user selected, keeping signs (in parameter groups and
            // sample chunks when even one pass over them exceeds --max-memory).
            let sg = crate::inputs::stream::per_sample_signs(
                model,
                probe,
                shipped,
                opts,
                backend,
                device,
                union & flag::BATCH_GRADS != 0,
            )?;
            runtime = sg.runtime.to_string();
            notes.extend(sg.notes.iter().cloned());
            phases = Some(sg.phases);
            for s in scorers {
                let why = if s.inputs & flag::PER_SAMPLE_GRADS != 0 {
                    "it reads the full N × P per-sample gradients, which exceed --max-memory \
                     (scorers reading packed signs, such as gradsign and gradalign-*, still run)"
                } else if s.inputs & flag::ALL_PARAMS != 0 && opts.params != ParamSelect::All {
                    "it needs every parameter's columns: rerun with --params all"
                } else {
                    continue;
                };
                errors.insert(s.name.clone(), why.to_string());
            }
            let params = metas(model, &sg.layout);
            selected = Some(InputData {
                n: probe.len(),
                classes: sg.classes,
                param_values: (union & flag::PARAM_VALUES != 0)
                    .then(|| param_values(model, &params)),
                batch_grads: (union & flag::BATCH_GRADS != 0).then_some(sg.batch_grads),
                logits: (union & flag::LOGITS != 0).then_some(sg.logits),
                labels: probe.labels.to_vec(),
                params,
                signs: Some((sg.signs, sg.class_signs)),
                ..Default::default()
            });
        } else {
            let g = engine::per_sample_grads_on(model, probe, run_opts, shipped, backend, device)?;
            runtime = g.runtime.to_string();
            notes.extend(g.notes.iter().cloned());
            if wants_all {
                all_params = Some(input_data(model, &g, None, union));
                let plain = scorers.iter().any(|s| s.inputs & flag::ALL_PARAMS == 0);
                if plain && opts.params == ParamSelect::Weights {
                    let keep = |m: &ParamMeta| m.role == role::WEIGHT;
                    selected = Some(input_data(model, &g, Some(&keep), union));
                }
            } else {
                selected = Some(input_data(model, &g, None, union));
            }
        }
    }
    if selected.is_none() && all_params.is_none() {
        selected = Some(InputData {
            n: probe.len(),
            labels: probe.labels.to_vec(),
            ..Default::default()
        });
    }
    if union & flag::MODEL_INFO != 0 {
        match engine::model_info(model, probe.sample_shape()) {
            Ok((p, f)) => {
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.model_params = p as f64;
                    d.model_flops = f;
                }
            }
            Err(e) => {
                for s in scorers.iter().filter(|s| s.inputs & flag::MODEL_INFO != 0) {
                    errors.insert(s.name.clone(), format!("model info: {e:#}"));
                }
            }
        }
    }
    // Extra passes; a failure costs only the scorers that asked for it.
    let wants = |f: u64| scorers.iter().any(|s| s.inputs & f != 0);
    let fail = |f: u64, what: &str, e: &anyhow::Error, errors: &mut BTreeMap<String, String>| {
        for s in scorers.iter().filter(|s| s.inputs & f != 0) {
            errors.insert(s.name.clone(), format!("{what}: {e:#}"));
        }
    };
    let want = crate::inputs::passes::ProbeOutputs {
        relu_codes: wants(flag::RELU_CODES),
        input_jacobian: wants(flag::INPUT_JACOBIAN),
        feature_maps: wants(flag::FEATURE_MAPS),
        feature_covariance: wants(flag::FEATURE_COVARIANCE),
    };
    if want.relu_codes || want.input_jacobian || want.feature_maps || want.feature_covariance {
        match crate::inputs::passes::probe_pass(model, probe, opts, backend, device, want) {
            Ok(p) => {
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.relu_codes = p.relu_codes.clone();
                    d.input_jacobian = p.input_jacobian.clone();
                    d.feature_maps = p.feature_maps.clone();
                }
            }
            Err(e) => fail(
                flag::RELU_CODES
                    | flag::INPUT_JACOBIAN
                    | flag::FEATURE_MAPS
                    | flag::FEATURE_COVARIANCE,
                "probe pass",
                &e,
                &mut errors,
            ),
        }
    }
    if wants(flag::SYNFLOW_GRADS) {
        match crate::inputs::passes::synflow_grads(model, probe.sample_shape()) {
            Ok(by_name) => {
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.synflow_grads = Some(columns_by_name(&d.params, &by_name));
                }
            }
            Err(e) => fail(flag::SYNFLOW_GRADS, "SynFlow pass", &e, &mut errors),
        }
    }
    if wants(flag::HESSIAN_GRAD_PRODUCT) {
        match crate::inputs::passes::hessian_grad_product(model, probe, opts) {
            Ok(by_name) => {
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.hessian_grad_product = Some(columns_by_name(&d.params, &by_name));
                }
            }
            Err(e) => fail(
                flag::HESSIAN_GRAD_PRODUCT,
                "Hessian-gradient pass",
                &e,
                &mut errors,
            ),
        }
    }
    if wants(flag::LOGIT_JACOBIAN) {
        match crate::inputs::jacobian::logit_jacobian(model, probe, opts, backend, device) {
            Ok(j) => {
                if runtime == "none" {
                    runtime = j.runtime.to_string();
                }
                // The pass's cost grows with the classes: say what was paid.
                notes.push(format!(
                    "logit-Jacobian pass (vkdnw): {} gradient runs, one per class",
                    j.classes
                ));
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    if d.classes == 0 {
                        d.classes = j.classes;
                    }
                    d.logit_jacobian = Some(j.clone());
                }
            }
            Err(e) => fail(flag::LOGIT_JACOBIAN, "logit-Jacobian pass", &e, &mut errors),
        }
    }
    if wants(flag::BLOCK_JACOBIAN) {
        match crate::inputs::block_jacobian::block_jacobian(model, probe, opts, backend, device) {
            Ok(b) => {
                if runtime == "none" {
                    runtime = b.runtime.to_string();
                }
                for d in [selected.as_mut(), all_params.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    d.block_jacobian = Some(b.clone());
                }
            }
            Err(e) => fail(flag::BLOCK_JACOBIAN, "block-Jacobian pass", &e, &mut errors),
        }
    }
    let grad_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let raw_sel = selected.as_ref().map(|d| d.raw());
    let raw_all = all_params.as_ref().map(|d| d.raw());
    let mut scores = vec![];
    let mut scorer_seconds = vec![];
    for s in scorers {
        let started = Instant::now();
        if errors.contains_key(&s.name) {
            scores.push((s.name.clone(), None));
            continue;
        }
        let (data, raw) = match (&raw_sel, &raw_all) {
            (Some(sel), _) if s.inputs & flag::ALL_PARAMS == 0 => (selected.as_ref(), sel),
            (_, Some(all)) => (all_params.as_ref(), all),
            (Some(sel), None) => (selected.as_ref(), sel),
            (None, None) => unreachable!("one input set always exists"),
        };
        let result = match data {
            Some(d) if s.isolated && s.library.is_some() => {
                crate::scorers::plugin::isolate::call_isolated(s, d)
            }
            _ => s.call(&crate::scorers::plugin::inputs::masked(
                &raw.inputs,
                s.inputs,
            )),
        };
        match result {
            Ok(v) => scores.push((s.name.clone(), Some(v))),
            Err(e) => {
                errors.insert(s.name.clone(), e);
                scores.push((s.name.clone(), None));
            }
        }
        scorer_seconds.push((s.name.clone(), started.elapsed().as_secs_f64()));
    }
    Ok(ScoreReport {
        model: model.source.clone(),
        scores,
        errors,
        runtime,
        grad_seconds,
        score_seconds: t1.elapsed().as_secs_f64(),
        scorer_seconds,
        notes,
        phases,
    })
}

//! The gradient engine: model + probe → per-sample gradients, logits and the column layout.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::autodiff::analysis::Analysis;
use crate::autodiff::builder::{GradGraph, GradGraphBuilder, GraphSpec};
use crate::autodiff::GradOptions;
use crate::inputs::memory;
use crate::inputs::probe::Probe;
use crate::onnx::{HostTensor, Model};
use crate::runtime::{self, Backend, Device};

/// One block of gradient columns: a parameter, flattened row-major in its ONNX shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayoutEntry {
    pub name: String,
    pub op_type: String,
    pub node: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

/// Per-sample gradients of the probe: `grads` is `[N, P]` with columns described by `layout`.
pub struct PerSampleGrads {
    pub layout: Vec<LayoutEntry>,
    /// float32, or float64 under `--precision f64`.
    pub grads: HostTensor,
    pub logits: HostTensor,
    pub labels: ndarray::Array1<i64>,
    pub notes: Vec<String>,
    pub runtime: &'static str,
    pub build_seconds: f64,
    pub run_seconds: f64,
}

/// How the model lays out an image sample: channels first (N×C×H×W, ONNX's and PyTorch's
/// convention) or channels last (N×H×W×C, TensorFlow/Keras and JAX exports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InputLayout {
    /// Detect from the model's declared input: 32×32×3 is channels last, anything else first.
    #[default]
    Auto,
    Nchw,
    Nhwc,
}

fn declared_is(model: &Model, sample: [i64; 3]) -> bool {
    match model.inputs.as_slice() {
        [one] => match &one.dims {
            Some(d) => {
                d.len() == 4
                    && d[1..]
                        .iter()
                        .zip(sample)
                        .all(|(a, b)| a.is_none_or(|v| v == b))
            }
            None => true,
        },
        _ => false,
    }
}

/// The layout a CIFAR-10 probe (channels first as read) must be fed in: `Auto` picks channels
/// last only for a declared 32×32×3 input that is not also 3×32×32.
pub fn probe_layout(model: &Model, asked: InputLayout) -> InputLayout {
    match asked {
        InputLayout::Auto
            if declared_is(model, [32, 32, 3]) && !declared_is(model, [3, 32, 32]) =>
        {
            InputLayout::Nhwc
        }
        InputLayout::Auto => InputLayout::Nchw,
        other => other,
    }
}

/// Whether the shipped CIFAR-10 probe fits the model's declared input (in either layout).
pub fn model_takes_cifar10(model: &Model) -> bool {
    declared_is(model, [3, 32, 32]) || declared_is(model, [32, 32, 3])
}

/// A channels-first probe as channels last (N×C×H×W → N×H×W×C).
pub fn to_channels_last(probe: &mut Probe) {
    if probe.images.ndim() == 4 {
        probe.images = probe
            .images
            .view()
            .permuted_axes(ndarray::IxDyn(&[0, 2, 3, 1]))
            .as_standard_layout()
            .into_owned();
    }
}

pub fn build_graph(
    model: &Model,
    sample_shape: &[usize],
    n: usize,
    opts: GradOptions,
) -> Result<(Analysis, GradGraph)> {
    build_graph_with(model, sample_shape, n, opts, GraphSpec::default())
}

/// As [`build_graph`], with a chosen loss and extra outputs.
pub fn build_graph_with(
    model: &Model,
    sample_shape: &[usize],
    n: usize,
    opts: GradOptions,
    spec: GraphSpec,
) -> Result<(Analysis, GradGraph)> {
    let mut shape = vec![n];
    shape.extend(sample_shape);
    let an = Analysis::new(model, &shape, opts)?;
    let gg = build_from(&an, spec)?;
    Ok((an, gg))
}

/// The graph `spec` asks for on the probe's shape, loaded on `backend`/`device`: what every extra
/// input pass starts from.
pub fn load_probe_graph(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    spec: GraphSpec,
    backend: Backend,
    device: Device,
) -> Result<(Analysis, GradGraph, Box<dyn runtime::GraphRunner>)> {
    let (an, gg) = build_graph_with(model, probe.sample_shape(), probe.len(), opts, spec)?;
    let runner = load_runner(&an, &gg, backend, device)?;
    Ok((an, gg, runner))
}

/// A built gradient graph loaded on `backend`/`device`, in the analysis' float type.
fn load_runner(
    an: &Analysis,
    gg: &GradGraph,
    backend: Backend,
    device: Device,
) -> Result<Box<dyn runtime::GraphRunner>> {
    runtime::load(
        &gg.model,
        backend,
        device,
        an.float == crate::onnx::DType::F64,
    )
}

/// The gradient graph of an analysed model, refused when its estimate exceeds `--max-memory`.
fn build_from(an: &Analysis, spec: GraphSpec) -> Result<GradGraph> {
    let (n, opts) = (an.n, an.opts);
    if opts.bn == crate::autodiff::BnMode::Batch && (spec.param_grads || spec.input_grad) {
        bail!("batch-statistics BatchNormalization mixes samples: it serves forward passes only, not per-sample gradients");
    }
    let cols: usize = if spec.param_grads {
        an.selected.iter().map(|&i| an.params[i].numel()).sum()
    } else {
        0
    };
    let limit = opts.max_memory.unwrap_or_else(memory::default_limit);
    let fits = memory::batch_that_fits(an, cols, limit)?;
    if fits < n {
        bail!(
            "the training graph for N = {n} needs more than --max-memory {} (it fits N = {fits}); \
             lower --n or raise --max-memory",
            memory::fmt_bytes(limit)
        );
    }
    GradGraphBuilder::with_spec(an, spec).build()
}

/// The probe for `model` from the user's options (the CLI's `--data`, `--labels`, `--n`,
/// `--input-layout`): the shipped CIFAR-10 probe by default, fed channels last when the model
/// declares a 32×32×3 input. Returns the probe, whether it is the shipped one, and a note to
/// show when the layout was chosen automatically.
pub fn probe_for_model(
    model: &Model,
    data: Option<&std::path::Path>,
    labels: Option<&std::path::Path>,
    n: Option<usize>,
    layout: InputLayout,
) -> Result<(Probe, bool, Option<String>)> {
    let shipped = data.is_none();
    let mut probe = Probe::from_options(data, labels, n, model_takes_cifar10(model))?;
    let cifar = data.is_none_or(|d| d.extension().is_some_and(|e| e == "bin"));
    let mut note = None;
    if cifar && probe_layout(model, layout) == InputLayout::Nhwc {
        to_channels_last(&mut probe);
        if layout == InputLayout::Auto {
            note = Some(format!(
                "{} declares a channels-last 32×32×3 input: the CIFAR-10 probe is fed as \
                 N×H×W×C (--input-layout nchw to override)",
                model.source
            ));
        }
    }
    Ok((probe, shipped, note))
}

/// Per-sample gradients on the embedded tract runtime (deterministic, always available).
pub fn per_sample_grads(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    shipped_probe: bool,
) -> Result<PerSampleGrads> {
    per_sample_grads_with(model, probe, opts, shipped_probe, Backend::Tract)
}

pub fn per_sample_grads_with(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    shipped_probe: bool,
    backend: Backend,
) -> Result<PerSampleGrads> {
    per_sample_grads_on(model, probe, opts, shipped_probe, backend, Device::Cpu)
}

/// As [`per_sample_grads_with`], on a chosen device (`Device::Cuda` runs ONNX Runtime's CUDA
/// execution provider).
pub fn per_sample_grads_on(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    shipped_probe: bool,
    backend: Backend,
    device: Device,
) -> Result<PerSampleGrads> {
    let t0 = Instant::now();
    let n = probe.len();
    let (whole, chunk) = chunk_size(model, probe, opts)?;
    // One analysis when the whole probe runs at once; a second one for the chunk's batch else.
    let (an, gg) = if chunk == n {
        let gg = build_from(&whole, GraphSpec::default())?;
        (whole, gg)
    } else {
        build_graph(model, probe.sample_shape(), chunk, opts)?
    };
    if shipped_probe {
        check_classes(an.num_classes)?;
    }
    probe.check_labels(an.num_classes)?;
    // Not `load_probe_graph`: the analysis of the whole probe is reused when it runs at once,
    // and the class and label checks come before the (slow) session creation.
    let runner = load_runner(&an, &gg, backend, device)?;
    let build_seconds = t0.elapsed().as_secs_f64();

    let mut layout = vec![];
    let mut offset = 0;
    for g in &gg.grads {
        let p = &an.params[g.param];
        layout.push(LayoutEntry {
            name: p.name.clone(),
            op_type: p.op_type.clone(),
            node: p.node.clone(),
            shape: p.shape.clone(),
            offset,
            numel: p.numel(),
        });
        offset += p.numel();
    }
    let t1 = Instant::now();
    let images = probe.images_tensor().cast(an.float);
    // Samples are independent (per-sample or running-statistics BN), so the probe can run in
    // chunks of the graph's batch; the last chunk is padded with copies of its last sample and
    // the padding rows dropped.
    let mut logits_rows = vec![];
    macro_rules! assemble {
        ($variant:ident, $t:ty) => {{
            let HostTensor::$variant(x) = &images else {
                bail!("probe images have an unexpected type")
            };
            let mut all = ndarray::Array2::<$t>::zeros((n, offset));
            for start in (0..n).step_by(chunk) {
                let end = (start + chunk).min(n);
                let idx: Vec<usize> = (start..start + chunk).map(|i| i.min(end - 1)).collect();
                let xs = x.select(ndarray::Axis(0), &idx);
                let ys = probe.labels.select(ndarray::Axis(0), &idx);
                // The outputs are read in place: the logits, then the gradient of every selected
                // parameter that reaches the loss (the others stay zero).
                let mut blocks = gg
                    .grads
                    .iter()
                    .zip(&layout)
                    .filter(|(g, _)| g.output.is_some());
                let mut visit = |k: usize, out: crate::runtime::OutputRef<'_>| -> Result<()> {
                    if k == 0 {
                        let z = out.to_f64_array()?;
                        logits_rows.push(
                            z.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..end - start))
                                .to_owned(),
                        );
                        return Ok(());
                    }
                    let Some((_, e)) = blocks.next() else {
                        bail!("the gradient graph has more outputs than gradients")
                    };
                    let crate::runtime::OutputData::$variant(block) = out.data else {
                        bail!("gradient output has an unexpected type")
                    };
                    let block = ndarray::ArrayView2::from_shape((chunk, e.numel), block)?;
                    all.slice_mut(ndarray::s![start..end, e.offset..e.offset + e.numel])
                        .assign(&block.slice(ndarray::s![..end - start, ..]));
                    Ok(())
                };
                runner.run_visit(&HostTensor::$variant(xs), &ys, &mut visit)?;
            }
            HostTensor::$variant(all.into_dyn())
        }};
    }
    let grads = match an.float {
        crate::onnx::DType::F64 => assemble!(F64, f64),
        _ => assemble!(F32, f32),
    };
    let views: Vec<_> = logits_rows.iter().map(|a| a.view()).collect();
    let logits = HostTensor::F64(ndarray::concatenate(ndarray::Axis(0), &views)?).cast(an.float);
    let run_seconds = t1.elapsed().as_secs_f64();
    let mut notes = an.notes.clone();
    let zero = match &grads {
        HostTensor::F32(a) => zero_rows(a),
        HostTensor::F64(a) => zero_rows(a),
        _ => 0,
    };
    notes.extend(zero_gradient_warning(zero, n));
    let bad = match &grads {
        HostTensor::F32(a) => non_finite_columns(a.iter().map(|&v| v.is_finite()), offset),
        HostTensor::F64(a) => non_finite_columns(a.iter().map(|&v| v.is_finite()), offset),
        _ => 0,
    };
    notes.extend(non_finite_warning(bad, offset));
    if chunk < n {
        notes.push(format!(
            "the probe ran in chunks of {chunk} samples to stay within --max-memory"
        ));
    }
    Ok(PerSampleGrads {
        layout,
        grads,
        logits,
        labels: probe.labels.clone(),
        notes,
        runtime: runner.name(),
        build_seconds,
        run_seconds,
    })
}

pub use crate::autodiff::WARNING;

/// A warning when some per-sample gradients are exactly zero in every selected column: no
/// gradient reaches those parameters for those samples (e.g. a dead network, or a value the
/// graph detaches), so scores built on them describe nothing about training.
pub fn zero_gradient_warning(zero_rows: usize, n: usize) -> Option<String> {
    (zero_rows > 0).then(|| {
        format!(
            "{WARNING}{zero_rows} of {n} per-sample gradients are exactly zero in every selected \
             column{}: no gradient reaches these parameters from those samples (an output that \
             does not depend on them, or a graph that cuts them off), so gradient-based scores \
             are degenerate there",
            if zero_rows == n { " (all of them)" } else { "" }
        )
    })
}

/// A warning when some gradient columns hold non-finite values (an overflow in the forward or
/// backward pass): sign-based scores would read NaN as "no sign" and go on silently.
pub fn non_finite_warning(columns: usize, p: usize) -> Option<String> {
    (columns > 0).then(|| {
        format!(
            "{WARNING}{columns} of {p} gradient columns hold non-finite values (NaN or ±inf) for \
             some probe sample: the model overflows on the probe, so its scores are not \
             meaningful (try --precision f64 or check the input normalisation)"
        )
    })
}

/// Error unless the model's output fits the shipped 10-class probe.
pub fn check_classes(classes: usize) -> Result<()> {
    if classes != 10 {
        bail!(
            "the model has {classes} outputs, so the shipped 10-class CIFAR-10 probe does not fit: pass --data X.npy --labels Y.npy"
        );
    }
    Ok(())
}

/// The probe batch the gradient graph is built for: all of it when its estimate fits
/// `--max-memory` (with the assembled N × P matrix), else the largest chunk that does.
fn chunk_size(model: &Model, probe: &Probe, opts: GradOptions) -> Result<(Analysis, usize)> {
    let n = probe.len();
    let limit = opts.max_memory.unwrap_or_else(memory::default_limit);
    let mut shape = vec![n];
    shape.extend(probe.sample_shape());
    let an = Analysis::new(model, &shape, opts)?;
    let cols: usize = an.selected.iter().map(|&i| an.params[i].numel()).sum();
    let elem = if an.float == crate::onnx::DType::F64 {
        8
    } else {
        4
    };
    let matrix = (n as u64).saturating_mul(cols as u64).saturating_mul(elem);
    if matrix >= limit {
        bail!(
            "the {n} × {cols} gradient matrix alone needs {}, more than --max-memory {}; lower --n \
             or select fewer parameters",
            memory::fmt_bytes(matrix),
            memory::fmt_bytes(limit)
        );
    }
    let chunk = memory::batch_that_fits(&an, cols, limit - matrix).with_context(|| {
        format!(
            "besides the {n} × {cols} gradient matrix ({}) that `grads` returns whole",
            memory::fmt_bytes(matrix)
        )
    })?;
    Ok((an, chunk))
}

/// (trainable parameters, multiply-accumulates per sample, from each op's `OpDef::macs`).
pub fn model_info(model: &Model, sample_shape: &[usize]) -> Result<(usize, f64)> {
    let mut shape = vec![1];
    shape.extend(sample_shape);
    let opts = GradOptions {
        params: crate::autodiff::ParamSelect::All,
        ..Default::default()
    };
    let an = Analysis::new(model, &shape, opts)?;
    let params = an.params.iter().map(|p| p.numel()).sum();
    let mut macs = 0.0;
    for node in &an.nodes {
        let ins: Vec<Option<&crate::autodiff::Info>> = node
            .inputs
            .iter()
            .map(|n| (!n.is_empty()).then(|| an.info(n)))
            .collect();
        if let Some(out) = node.outputs.first() {
            macs += crate::autodiff::ops::macs(node, &ins, an.info(out));
        }
    }
    Ok((params, macs))
}

fn zero_rows<T: Copy + PartialEq + Default>(a: &ndarray::ArrayD<T>) -> usize {
    let cols = a.shape().get(1).copied().unwrap_or(0);
    match a.as_slice() {
        Some(v) if cols > 0 => v
            .chunks(cols)
            .filter(|row| row.iter().all(|&x| x == T::default()))
            .count(),
        _ => 0,
    }
}

/// Columns of a row-major `[N, cols]` matrix (given as a finiteness flag per value) that hold a
/// non-finite value in some row.
fn non_finite_columns(finite: impl Iterator<Item = bool>, cols: usize) -> usize {
    if cols == 0 {
        return 0;
    }
    let mut bad = vec![false; cols];
    for (k, ok) in finite.enumerate() {
        if !ok {
            bad[k % cols] = true;
        }
    }
    bad.iter().filter(|&&b| b).count()
}

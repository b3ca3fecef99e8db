//! `gradalign linear-regions`: linear-region counts of one or more models at the stored weights
//! and under seeded relative perturbations, with the rank stability of the set.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use gradalign::autodiff::BnMode;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::results::rank::collect_models;
use gradalign::runtime::{Backend, Device};
use gradalign::tools::regions::{
    count_regions, fixed_sample_shape, perturb_weights, rank_stability, repeat_seed, PatternInputs,
    Protocol, RegionCounts, TENAS_BATCH, TENAS_BATCHES,
};

use crate::{load_probe, ProbeArgs};

#[derive(clap::Args)]
pub struct RegionArgs {
    /// Models (.onnx files or folders of them); with two or more, the ranking's stability under
    /// perturbation is reported too.
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// `probe`: the probe images and every Relu. `tenas`: TE-NAS's protocol (3×1000 random crops
    /// of the probe images at the model's input size, batch-statistics BN, ReLUs on 4-D tensors).
    #[arg(long, value_enum, default_value_t = Protocol::Probe)]
    pub protocol: Protocol,
    /// BatchNormalization statistics for `--protocol probe` (tenas uses batch statistics).
    #[arg(long, value_enum, default_value_t = BnMode::Sample)]
    pub bn: BnMode,
    /// Relative perturbation σ: every trainable parameter w becomes w·(1 + σ·ε), ε ~ N(0, 1).
    #[arg(long, default_value_t = 1e-3)]
    pub perturb: f64,
    /// Number of perturbed copies per model.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Seed of the perturbations (and of TE-NAS's crops).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn one_model(a: &RegionArgs, path: &std::path::Path) -> Result<RegionCounts> {
    let m = Model::load(path)?;
    let (inputs, sample) = match a.protocol {
        Protocol::Probe => {
            let (p, _) = load_probe(&m, &a.probe)?;
            let sample = p.sample_shape().to_vec();
            (PatternInputs::probe(&p.images, a.bn), sample)
        }
        Protocol::Tenas => {
            let sample = fixed_sample_shape(&m).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: --protocol tenas needs the model's input dimensions (except the batch) fixed",
                    path.display()
                )
            })?;
            // The crops come from the probe images: 1000 of a CIFAR-10 source (all of the
            // shipped one) unless --n says otherwise, every row of a .npy.
            let is_npy = a
                .probe
                .data
                .as_ref()
                .is_some_and(|d| d.extension().is_none_or(|e| e != "bin"));
            let n = if is_npy {
                a.probe.n
            } else {
                a.probe.n.or(Some(1000))
            };
            let src =
                Probe::from_options(a.probe.data.as_deref(), a.probe.labels.as_deref(), n, true)?;
            let inputs =
                PatternInputs::tenas(&src.images, &sample, TENAS_BATCHES, TENAS_BATCH, a.seed)?;
            (inputs, sample)
        }
    };
    let count = count_regions(&m, &inputs, a.backend, a.device)?;
    let mut perturbed = vec![];
    for r in 0..a.repeats {
        let pm = perturb_weights(&m, &sample, a.perturb, repeat_seed(a.seed, r))?;
        perturbed.push(count_regions(&pm, &inputs, a.backend, a.device)?);
    }
    Ok(RegionCounts {
        model: path.display().to_string(),
        count,
        perturbed,
    })
}

/// Exit status 0, or 2 when some model failed (its error is printed; the others are reported).
pub fn linear_regions(a: &RegionArgs) -> Result<i32> {
    gradalign::runtime::check_backend(a.backend)?;
    if !a.perturb.is_finite() || a.perturb < 0.0 {
        anyhow::bail!("--perturb {}: σ must be a finite number ≥ 0", a.perturb);
    }
    let paths = collect_models(&a.models)?;
    let mut counts = vec![];
    let mut errors = vec![];
    for p in &paths {
        match one_model(a, p) {
            Ok(c) => counts.push(c),
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("error: {}: {msg}", p.display());
                errors.push((p.display().to_string(), msg));
            }
        }
    }
    let tau = rank_stability(&counts);
    let defined: Vec<f64> = tau.iter().flatten().copied().collect();
    let mean_tau =
        (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let models: Vec<_> = counts
                .iter()
                .map(|c| {
                    serde_json::json!({"model": c.model, "count": c.count, "perturbed": c.perturbed,
                        "mean": c.mean(), "std": c.std()})
                })
                .collect();
            let errs: Vec<_> = errors
                .iter()
                .map(|(m, e)| serde_json::json!({"model": m, "error": e}))
                .collect();
            let v = serde_json::json!({
                "protocol": a.protocol, "perturb": a.perturb, "repeats": a.repeats, "seed": a.seed,
                "models": models, "errors": errs,
                "rank_stability": {"kendall_tau_b": tau, "mean": mean_tau},
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Format::Table => {
            let w = counts
                .iter()
                .map(|c| c.model.len())
                .max()
                .unwrap_or(5)
                .max(5);
            writeln!(
                out,
                "{:<w$}  {:>8}  {:>22}  perturbed (σ = {:e})",
                "model",
                "regions",
                format!("mean ± std of {}", a.repeats),
                a.perturb
            )?;
            for c in &counts {
                let list: Vec<String> = c.perturbed.iter().map(|v| v.to_string()).collect();
                writeln!(
                    out,
                    "{:<w$}  {:>8}  {:>22}  {}",
                    c.model,
                    c.count,
                    format!("{:.1} ± {:.1}", c.mean(), c.std()),
                    list.join(" ")
                )?;
            }
            if counts.len() >= 2 && a.repeats > 0 {
                let shown: Vec<String> = tau
                    .iter()
                    .map(|t| t.map_or("undefined".into(), |t| format!("{t:.3}")))
                    .collect();
                writeln!(
                    out,
                    "rank stability (Kendall τ-b, stored vs perturbed ranking of {} models): {} — mean {}",
                    counts.len(),
                    shown.join(" "),
                    mean_tau.map_or("undefined".into(), |t| format!("{t:.3}"))
                )?;
            }
        }
    }
    Ok(if errors.is_empty() { 0 } else { 2 })
}

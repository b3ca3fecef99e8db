//! The `gradalign` command line: a thin layer over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod cli;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use gradalign::autodiff::{BnMode, GradOptions, ParamSelect, Precision};
use gradalign::inputs::engine;
use gradalign::inputs::npy;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};

#[derive(Parser)]
#[command(
    name = "gradalign",
    version,
    about = "Exact per-sample gradients of ONNX models at initialisation, for training-free NAS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct ProbeArgs {
    /// Probe images: a CIFAR-10 binary file (.bin) or a float32 N×C×H×W .npy (already normalised).
    /// Default: the shipped CIFAR-10 probe, for models taking 3×32×32 images with 10 outputs.
    #[arg(long)]
    data: Option<PathBuf>,
    /// int64 labels (.npy), one per image; required with --data X.npy.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Number of probe samples (class-balanced for CIFAR-10; the first N rows of a .npy).
    /// Default: 64 for CIFAR-10, every row of a .npy.
    #[arg(long)]
    n: Option<usize>,
    /// Layout the CIFAR-10 probe (shipped or --data X.bin) is fed in; auto: channels last when
    /// the model declares a 32×32×3 input. A .npy probe is always used as stored.
    #[arg(long, value_enum, default_value_t = engine::InputLayout::Auto)]
    input_layout: engine::InputLayout,
}

#[derive(Args, Clone)]
pub struct GradArgs {
    /// BatchNormalization statistics: per sample (PyTorch train() with a batch of one) or the
    /// stored running statistics.
    #[arg(long, value_enum, default_value_t = BnMode::Sample)]
    pub bn: BnMode,
    /// Which parameters get gradient columns.
    #[arg(long, value_enum, default_value_t = ParamSelect::Weights)]
    pub params: ParamSelect,
    /// Arithmetic of the gradient graph; f64 gives reference-exact gradients (slower).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Runtime: ONNX Runtime when its library is found (`cargo xtask fetch-ort`), else tract.
    /// f64 graphs run on tract under `auto`.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// `cpu`, or `cuda[:N]` for ONNX Runtime's CUDA execution provider (build with
    /// `--features cuda`, library from `cargo xtask fetch-ort --gpu`).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Memory budget (e.g. 4G, 512M): graphs whose estimate exceeds it are refused, and the
    /// probe runs in chunks when that fits. Default: three quarters of physical memory.
    #[arg(long, value_parser = gradalign::inputs::memory::parse_size)]
    pub max_memory: Option<u64>,
    /// The model output (or any value it computes) taken as the logits. Default: the first
    /// output computed only by supported ops. Only what it depends on is computed.
    #[arg(long, value_name = "NAME")]
    pub output: Option<String>,
}

impl GradArgs {
    /// Load a model and apply `--output`.
    pub fn load_model(&self, path: &Path) -> Result<Model> {
        let mut m = Model::load(path)?;
        if let Some(name) = &self.output {
            m.select_output(name)?;
        }
        Ok(m)
    }
    pub fn options(&self) -> GradOptions {
        GradOptions {
            bn: self.bn,
            params: self.params,
            precision: self.precision,
            max_memory: self.max_memory,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-sample gradients of the softmax cross-entropy, one row per probe sample.
    Grads {
        /// The model, exported to ONNX at initialisation.
        model: PathBuf,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        grad: GradArgs,
        /// Where to write the N×P gradient matrix (.npy, float32; float64 with --precision f64).
        #[arg(long)]
        out: PathBuf,
        /// Where to write the column layout (JSON list of {name, op_type, node, shape, offset, numel}).
        #[arg(long)]
        layout: Option<PathBuf>,
        /// Where to write the N×classes logits (.npy).
        #[arg(long)]
        logits: Option<PathBuf>,
    },
    /// Write the training graph (per-sample gradients as outputs) as a standalone ONNX file.
    ExportGradGraph {
        model: PathBuf,
        /// Output file.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        /// Probe batch size the graph is built for.
        #[arg(long, default_value_t = 64)]
        n: usize,
        #[command(flatten)]
        grad: GradArgs,
    },
    /// Score a model with the selected scorers (built-in and plugins).
    Score {
        model: PathBuf,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        grad: GradArgs,
        /// Comma-separated scorer names, or `all` (see `gradalign plugins`).
        #[arg(long, default_value = cli::score::DEFAULT_SCORERS)]
        scorer: String,
        /// An external scorer plugin (shared library); repeatable. GRADALIGN_PLUGIN_PATH
        /// (colon-separated files or folders) adds more.
        #[arg(long)]
        plugin: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = cli::score::Format::Table)]
        format: cli::score::Format,
        /// Run each external plugin scorer in its own child process, so that one that aborts or
        /// segfaults loses only its own result.
        #[arg(long)]
        isolate: bool,
    },
    /// Score many models (files or folders of .onnx) into a resumable CSV, then print the ranking.
    Rank {
        #[arg(required = true)]
        models: Vec<PathBuf>,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        grad: GradArgs,
        #[arg(long, default_value = cli::score::DEFAULT_SCORERS)]
        scorer: String,
        #[arg(long)]
        plugin: Vec<PathBuf>,
        /// Results CSV: rows are appended and fsync'ed as models finish; models already in it
        /// are skipped, so an interrupted run resumes.
        #[arg(long)]
        out: PathBuf,
        /// Models scored in parallel (default: one per core, at most 8). Each job's runtime gets
        /// cores / jobs intra-op threads, and, without --max-memory, 1/jobs of the default
        /// memory bound; a given --max-memory bounds each model.
        #[arg(long)]
        jobs: Option<usize>,
        /// Run each external plugin scorer in its own child process (see `score --isolate`).
        #[arg(long)]
        isolate: bool,
        /// Score only shard I of N (e.g. 3/16, a job-array index): a model belongs to the shard
        /// its path (as given, e.g. models/a.onnx) hashes to, so every machine and rerun that
        /// names the models the same way agrees; `count:I/N` deals the sorted list round-robin
        /// instead (even sizes; every task must see the same list). Combine the shards' CSVs
        /// with `gradalign merge`.
        #[arg(long)]
        shard: Option<gradalign::results::rank::Shard>,
        /// Also rank the models by an ensemble of scorers (AZ-NAS's log-rank sum; default
        /// members gradalign-i,gradalign-ii,swap,flops, or name them): the members are scored
        /// with the rest, and the ensemble is written to RESULTS.ensemble.csv and sorts the table.
        #[arg(long, num_args = 0..=1, default_missing_value = gradalign::results::ensemble::DEFAULT_MEMBERS, value_name = "MEMBERS")]
        ensemble: Option<String>,
    },
    /// Combine the results CSVs of a sharded `rank` sweep into one: every model exactly once,
    /// failures kept; refuses overlapping shards and files scored with different scorers. Exit
    /// status 2 when the result is incomplete: models that --models names but no shard holds,
    /// missing shard-I-of-N.csv files, or a shard's torn last row.
    Merge {
        /// The merged CSV to write (a new file: written whole, then renamed into place).
        out: PathBuf,
        /// The shards' results CSVs.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// The sweep's models (files or folders, as given to `rank`): report any that no shard
        /// holds yet, and exit 2 if some are missing.
        #[arg(long, num_args = 1..)]
        models: Vec<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Rank the merged models by an ensemble of their scorers' columns (see `rank --ensemble`),
        /// written to OUT.ensemble.csv.
        #[arg(long, num_args = 0..=1, default_missing_value = gradalign::results::ensemble::DEFAULT_MEMBERS, value_name = "MEMBERS")]
        ensemble: Option<String>,
    },
    /// Internal: runs one isolated plugin scorer on inputs read from stdin.
    #[command(name = "__scorer-worker", hide = true)]
    ScorerWorker {
        library: PathBuf,
        scorer: String,
        flags: u64,
    },
    /// Count linear regions (distinct ReLU activation patterns) at the stored weights and under
    /// seeded weight perturbations; with several models, how stable their ranking is.
    LinearRegions(cli::regions::RegionArgs),
    /// List the ONNX ops gradalign differentiates: inputs taken, how gradients pass, and which
    /// initializer slots are weights, biases or fixed.
    Ops,
    /// List every scorer found: built-in and external, with its inputs and origin.
    Plugins {
        #[arg(long)]
        plugin: Vec<PathBuf>,
    },
}

pub fn load_probe(model: &Model, p: &ProbeArgs) -> Result<(Probe, bool)> {
    let (probe, shipped, note) = engine::probe_for_model(
        model,
        p.data.as_deref(),
        p.labels.as_deref(),
        p.n,
        p.input_layout,
    )?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok((probe, shipped))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let tmp = path.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn grads(
    model: &Path,
    probe: &ProbeArgs,
    grad: &GradArgs,
    out: &Path,
    layout: Option<&Path>,
    logits: Option<&Path>,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let m = grad.load_model(model)?;
    let (probe, shipped) = load_probe(&m, probe)?;
    gradalign::runtime::check_backend(grad.backend)?;
    let t1 = std::time::Instant::now();
    let g = engine::per_sample_grads_on(
        &m,
        &probe,
        grad.options(),
        shipped,
        grad.backend,
        grad.device,
    )?;
    let t2 = std::time::Instant::now();
    cli::score::print_notes(&g.notes);
    npy::write(out, &g.grads)?;
    if let Some(l) = layout {
        write_json(l, &g.layout)?;
    }
    if let Some(z) = logits {
        npy::write(z, &g.logits)?;
    }
    let p: usize = g.layout.iter().map(|e| e.numel).sum();
    let peak = gradalign::inputs::memory::peak_rss_mib()
        .map(|m| format!(", peak RSS {m:.0} MiB"))
        .unwrap_or_default();
    eprintln!(
        "wrote {} ({} samples × {} parameters, {} tensors) — runtime {}, probe {}, load {:.2}s, build {:.2}s, run {:.2}s, assemble {:.2}s, write {:.2}s{peak}",
        out.display(),
        probe.len(),
        p,
        g.layout.len(),
        g.runtime,
        probe.source,
        (t1 - t0).as_secs_f64(),
        g.build_seconds,
        g.run_seconds,
        (t2 - t1).as_secs_f64() - g.build_seconds - g.run_seconds,
        t2.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn export(model: &Path, out: &Path, n: usize, grad: &GradArgs) -> Result<()> {
    let m = grad.load_model(model)?;
    let sample: Vec<usize> = match m.inputs.first().and_then(|i| i.dims.clone()) {
        Some(d) if d[1..].iter().all(|x| x.is_some()) => {
            d[1..].iter().map(|x| x.unwrap() as usize).collect()
        }
        _ => anyhow::bail!(
            "{}: the input's non-batch dimensions must be fixed to export a training graph",
            model.display()
        ),
    };
    let (an, gg) = engine::build_graph(&m, &sample, n, grad.options())?;
    // Standard ONNX only: the fused kernels exist inside gradalign's own sessions.
    let graph = gradalign::autodiff::fused::to_standard_ops(&gg.model, an.float)?;
    use prost::Message;
    let tmp = out.with_extension("onnx.partial");
    std::fs::write(&tmp, graph.encode_to_vec())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out)?;
    eprintln!(
        "wrote {} (inputs '{}', '{}'; outputs '{}' and {} gradients)",
        out.display(),
        gg.input,
        gg.labels,
        gg.logits,
        gg.grads.iter().filter(|g| g.output.is_some()).count()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res: Result<i32> = match &cli.cmd {
        Cmd::Grads {
            model,
            probe,
            grad,
            out,
            layout,
            logits,
        } => grads(
            model,
            probe,
            grad,
            out,
            layout.as_deref(),
            logits.as_deref(),
        )
        .map(|_| 0),
        Cmd::ExportGradGraph {
            model,
            out,
            n,
            grad,
        } => export(model, out, *n, grad).map(|_| 0),
        Cmd::Score {
            model,
            probe,
            grad,
            scorer,
            plugin,
            format,
            isolate,
        } => cli::score::score(model, probe, grad, scorer, plugin, *format, *isolate),
        Cmd::Rank {
            models,
            probe,
            grad,
            scorer,
            plugin,
            out,
            jobs,
            isolate,
            shard,
            ensemble,
        } => cli::score::rank(
            models,
            probe,
            grad,
            scorer,
            plugin,
            out,
            *jobs,
            *isolate,
            *shard,
            ensemble.as_deref(),
        ),
        Cmd::Merge {
            out,
            shards,
            models,
            force,
            ensemble,
        } => cli::score::merge(out, shards, models, *force, ensemble.as_deref()),
        Cmd::ScorerWorker {
            library,
            scorer,
            flags,
        } => Ok(gradalign::scorers::plugin::isolate::worker_main(
            library, scorer, *flags,
        )),
        Cmd::LinearRegions(a) => cli::regions::linear_regions(a),
        Cmd::Plugins { plugin } => cli::score::plugins(plugin),
        Cmd::Ops => cli::ops::list(),
    };
    match res {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

//! `cargo xtask bench nb101`: NAS-Bench-101 networks generated in Rust (src/tools/zoo/nb101.rs),
//! each scored by its own `gradalign score` process, so that the time *and the peak memory* of
//! every architecture are measured on their own (NB101 networks reach 49 M weights; the
//! memory-bounded streaming path is the normal one). Resumable: scores.csv is keyed by cell
//! hash and a rerun scores only what is missing. Correlations against 108-epoch validation
//! accuracy (30,001 cells) and test accuracy (2,500 cells), from data/nb101_accuracies.csv.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gradalign::tools::stats::{kendall_tau_b, spearman};
use prost::Message;

use crate::nb201::{
    append_with_header, commit_rows, plot_scatter, resume_rows, run_jobs, sample, weight_seed,
};

pub struct Cell {
    pub hash: String,
    pub vertices: usize,
    pub adjacency: String,
    pub ops: String,
    pub val: Option<f64>,
    pub test: Option<f64>,
}

pub fn load_cells(root: &Path) -> Result<Vec<Cell>> {
    let text = std::fs::read_to_string(root.join("data/nb101_accuracies.csv"))
        .context("data/nb101_accuracies.csv")?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 7 {
            bail!(
                "data/nb101_accuracies.csv line {}: {} fields, 7 expected",
                i + 1,
                f.len()
            );
        }
        out.push(Cell {
            hash: f[0].to_string(),
            vertices: f[1].parse()?,
            adjacency: f[2].to_string(),
            ops: f[3].to_string(),
            val: f[4].parse().ok(),
            test: f[5].parse().ok(),
        });
    }
    Ok(out)
}

pub struct Options {
    /// `test`: the 2,500 cells with test accuracy; `val`: the 30,001 with validation accuracy.
    pub pool: String,
    pub sample: usize,
    pub seed: u64,
    pub n: usize,
    pub scorers: String,
    pub backend: String,
    pub jobs: usize,
    pub max_memory: Option<String>,
    pub out: PathBuf,
    pub report_only: bool,
}

impl Options {
    fn command(&self) -> String {
        format!(
            "cargo xtask bench nb101 --pool {} --sample {} --seed {} --n {} --scorers {} --backend {} --jobs {}{}",
            self.pool,
            self.sample,
            self.seed,
            self.n,
            self.scorers,
            self.backend,
            self.jobs,
            self.max_memory.as_ref().map(|m| format!(" --max-memory {m}")).unwrap_or_default()
        )
    }
}

/// The cell columns of a score table after its hash: the vertex count, the adjacency matrix
/// (row-major bits) and the ops (`|`-separated), as in `data/nb101_accuracies.csv`.
pub const ARCH_COLUMNS: &str = "vertices,adjacency,ops";

/// The score tables of `bench nb101`: the gradient run and the later feature-map run over the
/// same sampled cells and weights.
pub const SCORE_TABLES: [&str; 2] = [
    "docs/results/nb101/scores.csv",
    "docs/results/nb101/features/scores.csv",
];

/// The committed NB101 score tables joined by cell hash.
pub struct Nb101Scores {
    /// Every scorer column, in the order the tables first name them.
    pub columns: Vec<String>,
    /// Cell hashes in the first table's row order.
    pub order: Vec<String>,
    /// hash → scorer → value (finite values only; a failed scorer has no entry).
    pub scores: BTreeMap<String, BTreeMap<String, f64>>,
    /// hash → (108-epoch validation, test) accuracy.
    pub acc: BTreeMap<String, (Option<f64>, Option<f64>)>,
}

/// None when the first (gradient) table does not exist. A line with the wrong number of fields
/// (the torn last line of a run in progress) is skipped.
pub fn load_scores(root: &Path) -> Result<Option<Nb101Scores>> {
    let mut out = Nb101Scores {
        columns: vec![],
        order: vec![],
        scores: BTreeMap::new(),
        acc: BTreeMap::new(),
    };
    for (t, table) in SCORE_TABLES.iter().enumerate() {
        let path = root.join(table);
        let Ok(text) = std::fs::read_to_string(&path) else {
            if t == 0 {
                return Ok(None);
            }
            continue;
        };
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().context("empty table")?.split(',').collect();
        let k = head.len();
        let first = 1 + ARCH_COLUMNS.split(',').count();
        if k < first + 2 || head[1..first].join(",") != ARCH_COLUMNS || head[k - 1] != "test_acc" {
            bail!("{table}: expected hash,{ARCH_COLUMNS},<scorers…>,val_acc,test_acc");
        }
        let scorers = &head[first..k - 2];
        for s in scorers {
            if !out.columns.iter().any(|c| c == s) {
                out.columns.push(s.to_string());
            }
        }
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() != k {
                continue;
            }
            if t == 0 {
                out.order.push(f[0].to_string());
            }
            let row = out.scores.entry(f[0].to_string()).or_default();
            for (j, s) in scorers.iter().enumerate() {
                if let Some(v) = f[j + first].parse::<f64>().ok().filter(|v| v.is_finite()) {
                    // The first table to hold a scorer wins.
                    row.entry(s.to_string()).or_insert(v);
                }
            }
            out.acc
                .entry(f[0].to_string())
                .or_insert((f[k - 2].parse().ok(), f[k - 1].parse().ok()));
        }
    }
    Ok(Some(out))
}

/// The cells a run covers, in sampled order.
fn pick<'c>(cells: &'c [Cell], o: &Options) -> Result<Vec<&'c Cell>> {
    let pool: Vec<&Cell> = match o.pool.as_str() {
        "test" => cells.iter().filter(|c| c.test.is_some()).collect(),
        "val" => cells.iter().filter(|c| c.val.is_some()).collect(),
        other => bail!("--pool {other}: use test (2,500 cells) or val (30,001 cells)"),
    };
    Ok(sample(pool.len(), o.sample, o.seed)
        .into_iter()
        .map(|i| pool[i])
        .collect())
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let cells = load_cells(root)?;
    std::fs::create_dir_all(&o.out)?;
    if !o.report_only {
        std::fs::write(o.out.join("command.txt"), format!("{}\n", o.command()))?;
    }
    let names: Vec<String> = o.scorers.split(',').map(|s| s.trim().to_string()).collect();
    let header = format!("hash,{ARCH_COLUMNS},{},val_acc,test_acc", names.join(","));
    let scores_path = o.out.join("scores.csv");
    if !o.report_only {
        let done: HashSet<String> = resume_rows(&scores_path, &header)?
            .iter()
            .filter_map(|l| l.split(',').next().map(String::from))
            .collect();
        let todo: Vec<&Cell> = pick(&cells, o)?
            .into_iter()
            .filter(|c| !done.contains(&c.hash))
            .collect();
        eprintln!(
            "nb101: {} cells to score from the {} pool ({} already in {}), N = {}, {} job(s)",
            todo.len(),
            o.pool,
            done.len(),
            scores_path.display(),
            o.n,
            o.jobs
        );
        let exe = std::env::current_exe()?.with_file_name("gradalign");
        if !exe.exists() {
            bail!(
                "{} not found: build it with cargo build --release",
                exe.display()
            );
        }
        let tmp = o.out.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut scores_file = append_with_header(&scores_path, &header)?;
        let mut times_file = append_with_header(
            o.out.join("timings.csv"),
            "hash,params,inputs_seconds,scorers_seconds,process_seconds,peak_rss_mib",
        )?;
        let mut errors_file = append_with_header(o.out.join("errors.csv"), "hash,scorer,error")?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads_per_job = (cores / o.jobs.max(1)).max(1);
        let work = |k: usize| -> Result<(String, String, String)> {
            let c = todo[k];
            let cell = gradalign::tools::zoo::nb101::Nb101Cell::parse(&c.adjacency, &c.ops)?;
            let wseed = weight_seed(o.seed, u64::from_str_radix(&c.hash[..12], 16)? as usize);
            let proto = gradalign::tools::zoo::nb101::nb101_model(&cell, wseed, 32)?;
            let path = tmp.join(format!("{}.onnx", c.hash));
            std::fs::write(&path, proto.encode_to_vec())?;
            let t = Instant::now();
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("score")
                .arg(&path)
                .args(["--scorer", &o.scorers, "--n", &o.n.to_string()])
                .args(["--backend", &o.backend, "--format", "json"]);
            if let Some(m) = &o.max_memory {
                cmd.args(["--max-memory", m]);
            }
            // Each `score` process alone would take every core (and spin on them): side by
            // side they share them, as `rank --jobs` does.
            if std::env::var_os("GRADALIGN_THREADS").is_none() {
                cmd.env("GRADALIGN_THREADS", threads_per_job.to_string());
            }
            let out = cmd.output();
            std::fs::remove_file(&path).ok();
            let out = out?;
            let secs = t.elapsed().as_secs_f64();
            if !out.status.success() {
                bail!(
                    "cell {}: {}",
                    c.hash,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("cell {}: gradalign score printed no JSON", c.hash))?;
            let vals: Vec<String> = names
                .iter()
                .map(|n| {
                    v["scores"][n]
                        .as_f64()
                        .map(|x| format!("{x:?}"))
                        .unwrap_or_default()
                })
                .collect();
            let errs: String = v["errors"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, e)| {
                    format!(
                        "{},{k},\"{}\"\n",
                        c.hash,
                        e.as_str().unwrap_or("").replace('"', "'")
                    )
                })
                .collect();
            let opt = |x: Option<f64>| x.map(|a| a.to_string()).unwrap_or_default();
            Ok((
                format!(
                    "{},{},{},{},{},{},{}\n",
                    c.hash,
                    c.vertices,
                    c.adjacency,
                    c.ops,
                    vals.join(","),
                    opt(c.val),
                    opt(c.test)
                ),
                format!(
                    "{},{},{:.3},{:.3},{:.3},{}\n",
                    c.hash,
                    cell.trainable_parameters(),
                    v["seconds"]["inputs"].as_f64().unwrap_or(f64::NAN),
                    v["seconds"]["scorers"].as_f64().unwrap_or(f64::NAN),
                    secs,
                    v["peak_rss_mib"]
                        .as_f64()
                        .map(|m| format!("{m:.0}"))
                        .unwrap_or_default()
                ),
                errs,
            ))
        };
        let commit = commit_rows(&mut scores_file, &mut times_file, &mut errors_file);
        run_jobs(todo.len(), o.jobs, work, commit)?;
    }
    report(o, &names)
}

fn report(o: &Options, names: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(o.out.join("scores.csv")).context("scores.csv")?;
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let col = |row: &[&str], j: usize| {
        row.get(j)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|x| x.is_finite())
    };
    let first = 1 + ARCH_COLUMNS.split(',').count();
    let (val_j, test_j) = (first + names.len(), first + 1 + names.len());
    // The command that produced the scores (written by the last scoring run).
    let command = std::fs::read_to_string(o.out.join("command.txt"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| o.command());
    let mut md = format!(
        "# NAS-Bench-101: training-free scores vs ground truth\n\n\
         Run: `{command}` — {} cells scored, each by its own `gradalign score` process, with the \
         shipped CIFAR-10 probe, per-sample BatchNorm, f32. Networks: the Rust NB101 generator \
         (stem, 3 stacks × 3 cells, 128 stem channels, 32×32 input), weights seeded per cell. \
         Ground truth: `data/nb101_accuracies.csv` (108-epoch validation accuracy of one \
         training run; test accuracy where known). A rerun of the command scores only the cells \
         not yet in `scores.csv`; `cargo xtask bench nb101 --report-only` recomputes this report \
         from the committed CSVs.\n\n",
        rows.len(),
    );
    md += "| scorer | cells (val) | τ-b val | ρ val | cells (test) | τ-b test | ρ test |\n|---|---|---|---|---|---|---|\n";
    for (j, name) in names.iter().enumerate() {
        let mut cells = vec![];
        let mut scatter: Option<(Vec<f64>, Vec<f64>)> = None;
        for acc_j in [val_j, test_j] {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((col(r, first + j)?, col(r, acc_j)?)))
                .collect();
            let (s, a): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
            cells.push(s.len().to_string());
            cells.push(kendall_tau_b(&s, &a).map_or("—".into(), |v| format!("{v:.3}")));
            cells.push(spearman(&s, &a).map_or("—".into(), |v| format!("{v:.3}")));
            if s.len() >= 2 && scatter.as_ref().is_none_or(|p| p.0.len() < s.len()) {
                scatter = Some((s, a));
            }
        }
        md += &format!("| {name} | {} |\n", cells.join(" | "));
        if let Some((s, a)) = scatter {
            plot_scatter(&o.out.join(format!("scatter_{name}.svg")), name, &s, &a)?;
        }
    }
    let times = std::fs::read_to_string(o.out.join("timings.csv")).unwrap_or_default();
    let t: Vec<Vec<f64>> = times
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .skip(1)
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .filter(|v: &Vec<f64>| v.len() == 5)
        .collect();
    let stat = |j: usize| {
        let v: Vec<f64> = t.iter().map(|r| r[j]).filter(|x| x.is_finite()).collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        (mean, v.iter().copied().fold(f64::NAN, f64::max))
    };
    let by_size: BTreeMap<u64, usize> = t.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry((r[0] / 1e6).round() as u64).or_default() += 1;
        m
    });
    let ((pm, pmax), (im, _), (sm, _), (wm, wmax), (rm, rmax)) =
        (stat(0), stat(1), stat(2), stat(3), stat(4));
    md += &format!(
        "\nPer cell ({} timed; this machine): {:.1} M weights on average (largest {:.1} M); \
         inputs (gradients and extra passes) {im:.2} s, scorers {sm:.3} s, whole process \
         {wm:.2} s on average and {wmax:.1} s at most; peak resident memory {rm:.0} MiB on \
         average, {rmax:.0} MiB at most. Cells by size (millions of weights: count): {}.\n\n\
         Plots: `scatter_<scorer>.svg` (accuracy against the score's rank percentile, for the accuracy \
         known on more of the scored cells).\n",
        t.len(),
        pm / 1e6,
        pmax / 1e6,
        by_size.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    );
    std::fs::write(o.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

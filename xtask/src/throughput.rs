//! `cargo xtask bench throughput [--count 24] [--seed 0] [--n 64] [--threads T] [--out FILE]`
//!
//! End-to-end seconds per architecture for what a user runs to rank NB201 candidates with the
//! default scorers (gradalign-i, gradalign-ii, gradsign), in one run on the same machine:
//! `gradalign rank` (default options, and `--jobs 1`), and PyTorch's batch-of-one loop,
//! torch.func vmap and batched train() step (`tests/golden/torch_throughput.py`). The
//! architectures are exported from PyTorch by `tests/golden/export_archs.py`, so both sides
//! score the same networks with the same weights; the report also compares their scores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub struct Options {
    pub count: usize,
    pub seed: u64,
    pub n: usize,
    pub threads: usize,
    pub out: PathBuf,
}

const SCORERS: [&str; 3] = ["gradalign-i", "gradalign-ii", "gradsign"];

fn python(root: &Path, args: &[String]) -> Result<String> {
    let out = Command::new("python3")
        .args(args)
        .current_dir(root)
        .output()
        .with_context(|| format!("cannot run python3 {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "python3 {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wall seconds of one `gradalign rank` over `dir`, and its scores by model file name.
fn rank(
    bin: &Path,
    dir: &Path,
    n: usize,
    jobs: Option<usize>,
    tmp: &Path,
) -> Result<(f64, BTreeMap<String, Vec<f64>>)> {
    let csv = tmp.join(format!(
        "rank-{}.csv",
        jobs.map_or("default".into(), |j| j.to_string())
    ));
    let _ = std::fs::remove_file(&csv);
    let mut cmd = Command::new(bin);
    cmd.arg("rank")
        .arg(dir)
        .arg("--out")
        .arg(&csv)
        .args(["--n", &n.to_string()]);
    if let Some(j) = jobs {
        cmd.args(["--jobs", &j.to_string()]);
    }
    let t = Instant::now();
    let out = cmd.output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "gradalign rank failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&csv)?;
    let mut lines = text.lines();
    let header = gradalign::results::rank::split_csv(lines.next().unwrap_or_default());
    let col = |name: &str| header.iter().position(|h| h == name);
    let cols: Vec<usize> = SCORERS
        .iter()
        .map(|s| col(s).with_context(|| format!("rank CSV lacks column {s}")))
        .collect::<Result<_>>()?;
    let mut scores = BTreeMap::new();
    for line in lines {
        let f = gradalign::results::rank::split_csv(line);
        let name = Path::new(&f[0])
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let v: Vec<f64> = cols
            .iter()
            .map(|&c| f[c].parse().unwrap_or(f64::NAN))
            .collect();
        scores.insert(name, v);
    }
    Ok((secs, scores))
}

#[derive(Default)]
struct Phases {
    wall: f64,
    prepare: f64,
    session: f64,
    run: f64,
    assemble: f64,
    scorers: f64,
}

/// Per-model phases from `gradalign score --format json`, one process per model, averaged.
fn phases(bin: &Path, models: &[PathBuf], n: usize) -> Result<Phases> {
    let mut p = Phases::default();
    for m in models {
        let t = Instant::now();
        let out = Command::new(bin)
            .arg("score")
            .arg(m)
            .args(["--n", &n.to_string(), "--format", "json"])
            .output()?;
        p.wall += t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "gradalign score {} failed:\n{}",
                m.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let s = &v["seconds"];
        let ph = &s["phases"];
        let get = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        p.prepare += get(&ph["prepare"]);
        p.session += get(&ph["session"]);
        p.run += get(&ph["run"]);
        p.assemble += get(&ph["assemble"]);
        p.scorers += get(&s["scorers"]);
    }
    let k = models.len() as f64;
    for f in [
        &mut p.wall,
        &mut p.prepare,
        &mut p.session,
        &mut p.run,
        &mut p.assemble,
        &mut p.scorers,
    ] {
        *f /= k;
    }
    Ok(p)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let status = Command::new("cargo")
        .args(["build", "--release", "--bin", "gradalign"])
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("building gradalign failed");
    }
    let bin = root.join("target/release/gradalign");
    let work = root.join("target/bench-throughput");
    let dir = work.join(format!("archs-{}-{}", o.count, o.seed));
    let models = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    if models(&dir).len() != o.count {
        eprintln!(
            "exporting {} NB201 architectures from PyTorch to {}",
            o.count,
            dir.display()
        );
        python(
            root,
            &[
                "tests/golden/export_archs.py".into(),
                "--count".into(),
                o.count.to_string(),
                "--seed".into(),
                o.seed.to_string(),
                "--out".into(),
                dir.display().to_string(),
            ],
        )?;
    }
    let archs = models(&dir);
    let k = archs.len() as f64;
    std::fs::create_dir_all(&work)?;

    eprintln!("gradalign rank (default options)");
    let (rank_default, ours) = rank(&bin, &dir, o.n, None, &work)?;
    eprintln!("gradalign rank --jobs 1");
    let (rank_one, _) = rank(&bin, &dir, o.n, Some(1), &work)?;
    eprintln!("gradalign score, one process per model (phases)");
    let ph = phases(&bin, &archs, o.n)?;
    eprintln!("PyTorch: loop, vmap, batched step");
    let torch_out = python(
        root,
        &[
            "tests/golden/torch_throughput.py".into(),
            "--count".into(),
            o.count.to_string(),
            "--seed".into(),
            o.seed.to_string(),
            "--n".into(),
            o.n.to_string(),
            "--threads".into(),
            o.threads.to_string(),
        ],
    )?;
    let mut summary = serde_json::Value::Null;
    let mut worst: BTreeMap<&str, (f64, String)> = BTreeMap::new();
    for line in torch_out.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v.get("summary").is_some() {
            summary = v;
            continue;
        }
        let name = format!("arch_{:04}", v["index"].as_u64().unwrap_or(0));
        let Some(mine) = ours.get(&name) else {
            bail!("{name} is missing from gradalign's ranking");
        };
        for (i, s) in SCORERS.iter().enumerate() {
            let theirs = v["vmap_scores"][s].as_f64().unwrap_or(f64::NAN);
            let r = rel(mine[i], theirs);
            let e = worst.entry(s).or_insert((0.0, String::new()));
            if !(r <= e.0) {
                *e = (r, name.clone());
            }
        }
    }
    let t = |w: &str| summary["summary"][w].as_f64().unwrap_or(f64::NAN);
    let (loop_s, vmap_s, batched_s) = (t("loop"), t("vmap"), t("batched"));
    let per_default = rank_default / k;
    let per_one = rank_one / k;
    let fixed = ph.wall - ph.run;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());

    let mut md = String::new();
    md += &format!(
        "# Throughput: ranking {} NB201 architectures with the default scorers\n\n\
         Machine: {cpu}, {cores} cores. N = {}, float32, CPU. One run of \
         `cargo xtask bench throughput --count {} --seed {} --n {} --threads {}` \
         (PyTorch {}, ONNX Runtime {}).\n\n",
        o.count,
        o.n,
        o.count,
        o.seed,
        o.n,
        o.threads,
        summary["torch"].as_str().unwrap_or("?"),
        gradalign::runtime::ort::ORT_VERSION
    );
    md += "Architectures: seeded random NB201 cells exported from PyTorch by \
           `tests/golden/export_archs.py` (training-mode export, BatchNorm kept). gradalign: \
           whole `gradalign rank DIR` process, wall clock / architectures. PyTorch \
           (`tests/golden/torch_throughput.py`, same architectures and weights, \
           `--threads` intra-op threads): model construction + per-sample gradients of the \
           Conv/Linear weights + the three scores, per architecture, after one warm-up.\n\n";
    md += "| way | seconds per architecture | gradalign rank (default) is faster by |\n|---|---|---|\n";
    for (name, s) in [
        ("`gradalign rank` (default options)", per_default),
        ("`gradalign rank --jobs 1`", per_one),
        ("PyTorch batch-of-one loop", loop_s),
        ("PyTorch torch.func vmap (per-sample BN)", vmap_s),
        (
            "PyTorch batched train() step (summed gradient only: the bound)",
            batched_s,
        ),
    ] {
        md += &format!("| {name} | {s:.3} | {:.2}× |\n", s / per_default);
    }
    md += &format!(
        "\n## Where one model's time goes\n\n`gradalign score MODEL --format json`, one process \
         per architecture, mean over the {} architectures ({} intra-op threads):\n\n\
         | phase | seconds |\n|---|---|\n\
         | whole process (wall) | {:.3} |\n\
         | prepare (load checks, analysis, gradient graph) | {:.3} |\n\
         | runtime session creation | {:.3} |\n\
         | graph run | {:.3} |\n\
         | assemble (signs, class sums, batch gradient) | {:.3} |\n\
         | scorers | {:.3} |\n\
         | **fixed per-model cost** (wall − run) | **{:.3}** ({:.0} % of the model's time) |\n\n\
         Session run vs PyTorch's batched train() step on the same batch: {:.2}×.\n",
        o.count,
        gradalign::runtime::intra_threads(),
        ph.wall,
        ph.prepare,
        ph.session,
        ph.run,
        ph.assemble,
        ph.scorers,
        fixed,
        100.0 * fixed / ph.wall,
        ph.run / batched_s,
    );
    md += "\n## Same numbers on both sides\n\nLargest relative difference between gradalign's \
           scores (float32 gradients, ONNX Runtime) and PyTorch vmap's (float32) over the \
           architectures; sign-based scores differ where a float32 gradient entry is within \
           rounding of zero and its sign flips.\n\n| scorer | max relative difference | at |\n|---|---|---|\n";
    for (s, (r, at)) in &worst {
        md += &format!("| {s} | {r:.2e} | {at} |\n");
    }
    if let Some(parent) = o.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&o.out, &md)?;
    print!("{md}");
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

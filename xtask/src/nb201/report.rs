//! The `bench nb201` report: τ-b with bootstrap intervals and ρ per dataset, top-k hits,
//! agreement with the committed sample run, the published values beside ours (full space),
//! PyTorch's loop time, and the SVG plots.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{Context, Result};
use gradalign::tools::stats::{kendall_tau_b, spearman};

use super::{Arch, Options};

pub(super) struct Table {
    pub(super) names: Vec<String>,
    pub(super) rows: Vec<(usize, Vec<Option<f64>>)>,
}

pub(super) fn read_scores(path: &Path) -> Result<Table> {
    let mut text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    // A last line without its newline may be a row still being written: not read.
    if !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    }
    let mut lines = text.lines();
    let names: Vec<String> = lines
        .next()
        .context("empty scores.csv")?
        .split(',')
        .skip(2)
        .map(String::from)
        .collect();
    let mut rows = vec![];
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != names.len() + 2 {
            continue;
        }
        let vals = f[2..]
            .iter()
            .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect();
        let Ok(index) = f[0].parse() else { continue };
        rows.push((index, vals));
    }
    Ok(Table { names, rows })
}

const BOOTSTRAP_REPS: usize = 1000;

/// τ-b with its bootstrap 95 % interval (percentiles of `reps` resamples of the architectures).
pub fn tau_ci(score: &[f64], acc: &[f64], reps: usize, seed: u64) -> Option<(f64, f64, f64)> {
    let tau = kendall_tau_b(score, acc)?;
    let mut rng = gradalign::rng::Rng(seed);
    let n = score.len();
    let mut taus: Vec<f64> = (0..reps)
        .filter_map(|_| {
            let idx: Vec<usize> = (0..n)
                .map(|_| (rng.next_u64() % n as u64) as usize)
                .collect();
            let s: Vec<f64> = idx.iter().map(|&i| score[i]).collect();
            let a: Vec<f64> = idx.iter().map(|&i| acc[i]).collect();
            kendall_tau_b(&s, &a)
        })
        .collect();
    taus.sort_by(f64::total_cmp);
    if taus.is_empty() {
        return None;
    }
    let q = |p: f64| taus[((p * (taus.len() - 1) as f64).round() as usize).min(taus.len() - 1)];
    Some((tau, q(0.025), q(0.975)))
}

/// Fraction of the scorer's top k that is in the ground truth's top k.
pub fn hit_rate(score: &[f64], acc: &[f64], k: usize) -> f64 {
    let top = |v: &[f64]| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        i.truncate(k);
        i.into_iter().collect::<HashSet<_>>()
    };
    let (a, b) = (top(score), top(acc));
    a.intersection(&b).count() as f64 / k as f64
}

/// What a scoring run was, as recorded in `run.json` beside its scores, so that `--report-only`
/// describes that run rather than the flags of the command that rewrote the report.
struct RunInfo {
    desc: String,
    n: usize,
    backend: String,
    init: gradalign::tools::zoo::Init,
    seed: u64,
    peak: Option<f64>,
}

fn init_name(init: gradalign::tools::zoo::Init) -> &'static str {
    match init {
        gradalign::tools::zoo::Init::PyTorch => "pytorch",
        gradalign::tools::zoo::Init::KaimingNormalFanIn => "kaiming-normal",
    }
}

/// Records the run's flags and peak memory for later `--report-only` reports.
pub(super) fn write_run_info(o: &Options, peak: Option<f64>) -> Result<()> {
    let v = serde_json::json!({
        "command": o.sample_desc,
        "n": o.n,
        "backend": format!("{:?}", o.backend),
        "init": init_name(o.init),
        "seed": o.seed,
        "peak_rss_mib": peak,
    });
    let path = o.out.join("run.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| path.display().to_string())
}

fn run_info(o: &Options, peak: Option<f64>) -> RunInfo {
    let from_flags = RunInfo {
        desc: o.sample_desc.clone(),
        n: o.n,
        backend: format!("{:?}", o.backend),
        init: o.init,
        seed: o.seed,
        peak,
    };
    if !o.report_only {
        return from_flags;
    }
    let recorded = std::fs::read_to_string(o.out.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let Some(v) = recorded else {
        return RunInfo {
            desc: format!(
                "{} (no run.json beside the scores: the flags of the --report-only command, \
                 which may differ from the run's)",
                o.sample_desc
            ),
            ..from_flags
        };
    };
    RunInfo {
        desc: format!(
            "{} (report rewritten by --report-only)",
            v["command"].as_str().unwrap_or("?")
        ),
        n: v["n"].as_u64().map_or(o.n, |n| n as usize),
        backend: v["backend"].as_str().unwrap_or("?").to_string(),
        init: match v["init"].as_str() {
            Some("kaiming-normal") => gradalign::tools::zoo::Init::KaimingNormalFanIn,
            _ => gradalign::tools::zoo::Init::PyTorch,
        },
        seed: v["seed"].as_u64().unwrap_or(o.seed),
        peak: v["peak_rss_mib"].as_f64(),
    }
}

pub(super) fn report(root: &Path, o: &Options, archs: &[Arch], peak: Option<f64>) -> Result<()> {
    let info = run_info(o, peak);
    let peak = info.peak;
    let t = read_scores(&o.out.join("scores.csv"))?;
    let times = std::fs::read_to_string(o.out.join("timings.csv"))?;
    let mut tg = vec![];
    let mut ts = vec![];
    for l in times.lines().skip(1) {
        let f: Vec<f64> = l.split(',').filter_map(|v| v.parse().ok()).collect();
        if f.len() == 4 {
            tg.push(f[1]);
            ts.push(f[2]);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let by_index: BTreeMap<usize, &Arch> = archs.iter().map(|a| (a.index, a)).collect();
    let mut md = format!(
        "# NAS-Bench-201: training-free scores vs ground truth\n\n\
         Run: `cargo xtask bench nb201` with {} — {} architectures, N = {} CIFAR-10 probe \
         images (the shipped class-balanced test-set probe; the same CIFAR-10 probe is used for all \
         three datasets' rankings), per-sample BatchNorm, f32, backend `{}`, weights: Rust \
         generator ({}) seeded {}. Ground truth: \
         `data/nb201_accuracies.csv` (200-epoch test accuracy).\n\n",
        info.desc,
        t.rows.len(),
        info.n,
        info.backend,
        match info.init {
            gradalign::tools::zoo::Init::PyTorch => "PyTorch default initialisation distributions",
            gradalign::tools::zoo::Init::KaimingNormalFanIn =>
                "Kaiming-normal fan-in weights, zero Linear bias: the re-initialisation of VKDNW's and AZ-NAS's code",
        },
        info.seed
    );
    md += "| scorer | archs | τ-b C10 [95 % CI] | ρ C10 | τ-b C100 [95 % CI] | ρ C100 | τ-b IN16 [95 % CI] | ρ IN16 | top-10 hit (C10) | top-1% hit (C10) |\n|---|---|---|---|---|---|---|---|---|---|\n";
    let mut taus = vec![];
    let mut ours: Vec<(String, usize, [Option<f64>; 6])> = vec![];
    for (j, name) in t.names.iter().enumerate() {
        let pts: Vec<(f64, &Arch)> = t
            .rows
            .iter()
            .filter_map(|(i, v)| Some((v[j]?, *by_index.get(i)?)))
            .collect();
        let s: Vec<f64> = pts.iter().map(|p| p.0).collect();
        let mut cells = vec![];
        let mut point = [None; 6];
        for d in 0..3 {
            let acc: Vec<f64> = pts.iter().map(|p| p.1.acc[d]).collect();
            let tau = tau_ci(&s, &acc, BOOTSTRAP_REPS, info.seed.wrapping_add(d as u64));
            if d == 0 {
                taus.push((name.clone(), tau.map_or(f64::NAN, |t| t.0)));
            }
            cells.push(tau.map_or("—".into(), |(t, lo, hi)| {
                format!("{t:.3} [{lo:.3}, {hi:.3}]")
            }));
            let rho = spearman(&s, &acc);
            cells.push(rho.map_or("—".into(), |v| format!("{v:.3}")));
            point[2 * d] = tau.map(|t| t.0);
            point[2 * d + 1] = rho;
        }
        ours.push((name.clone(), s.len(), point));
        let acc10: Vec<f64> = pts.iter().map(|p| p.1.acc[0]).collect();
        let k1 = (s.len() as f64 * 0.01).ceil().max(1.0) as usize;
        md += &format!(
            "| {name} | {} | {} | {:.2} | {:.2} |\n",
            s.len(),
            cells.join(" | "),
            if s.len() >= 10 {
                hit_rate(&s, &acc10, 10)
            } else {
                f64::NAN
            },
            hit_rate(&s, &acc10, k1.min(s.len().max(1)))
        );
        plot_scatter(&o.out.join(format!("scatter_{name}.svg")), name, &s, &acc10)?;
    }
    plot_bars(&o.out.join("kendall_tau.svg"), &taus)?;
    md += &format!(
        "\n[lo, hi]: bootstrap 95 % interval of τ-b ({BOOTSTRAP_REPS} resamples of the \
         architectures, seed {} + dataset). Top-k hit rate: fraction of the scorer's k best \
         architectures that are among the k most accurate ones (k = 10, and k = 1% of the \
         architectures scored).\n\n\
         Seconds per architecture (mean, this machine): inputs (graph generation, gradients and \
         extra passes) {:.3} s, scorers {:.3} s. Peak resident memory of the benchmark process: {}.\n\n",
        info.seed,
        mean(&tg),
        mean(&ts),
        peak.map_or("—".into(), |m| format!("{m:.0} MiB"))
    );
    md += &agreement(root, o, &info, &t)?;
    md += &published(root, &ours)?;
    md += &torch_comparison(root, o, &t, archs, mean(&tg) + mean(&ts));
    md += "\nPlots: `kendall_tau.svg` (τ-b against CIFAR-10 test accuracy per scorer) and \
           `scatter_<scorer>.svg` (CIFAR-10 test accuracy against the score's rank percentile).\n";
    std::fs::write(o.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// The committed 1,000-architecture sample gives each architecture the same weights as any
/// other run (`weight_seed`), so the rows both runs scored must agree up to f32 arithmetic:
/// a check that the engine's changes between the runs did not move the scores.
fn agreement(root: &Path, o: &Options, info: &RunInfo, t: &Table) -> Result<String> {
    let reference = root.join("docs/results/nb201/scores.csv");
    let same_dir = std::fs::canonicalize(&o.out).ok()
        == reference
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok());
    if same_dir || !reference.exists() {
        return Ok(String::new());
    }
    // The committed sample is seed 0, PyTorch initialisation, N = 64: other runs gave the same
    // architecture other weights or images, and a difference would not mean anything.
    if info.seed != 0 || info.n != 64 || !matches!(info.init, gradalign::tools::zoo::Init::PyTorch)
    {
        return Ok(
            "Agreement with the committed 1,000-architecture sample: not compared (this run's \
             seed, N or initialisation differs from that run's seed 0, N = 64, PyTorch \
             initialisation).\n\n"
                .into(),
        );
    }
    let r = read_scores(&reference)?;
    let theirs: BTreeMap<usize, &Vec<Option<f64>>> = r.rows.iter().map(|(i, v)| (*i, v)).collect();
    let mut lines = vec![];
    for (j, name) in t.names.iter().enumerate() {
        let Some(k) = r.names.iter().position(|n| n == name) else {
            continue;
        };
        let pairs: Vec<(f64, f64)> = t
            .rows
            .iter()
            .filter_map(|(i, v)| Some((v[j]?, theirs.get(i)?[k]?)))
            .collect();
        if pairs.len() < 10 {
            continue;
        }
        let rel: Vec<f64> = pairs
            .iter()
            .map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE))
            .collect();
        let mut sorted = rel.clone();
        sorted.sort_by(f64::total_cmp);
        let (a, b): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
        lines.push(format!(
            "| {name} | {} | {:.1e} | {:.1e} | {} |",
            pairs.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            kendall_tau_b(&a, &b).map_or("—".into(), |v| format!("{v:.4}"))
        ));
    }
    if lines.is_empty() {
        return Ok(String::new());
    }
    Ok(format!(
        "Agreement with the committed 1,000-architecture sample (`docs/results/nb201/scores.csv`, \
         same weights per architecture, scored by an earlier build): relative difference of each \
         score (|a − b| / max(|a|, |b|)) on the architectures both runs scored, and τ-b between \
         the two columns.\n\n\
         | scorer | archs in both | median rel. diff | max rel. diff | τ-b between runs |\n\
         |---|---|---|---|---|\n{}\n\n",
        lines.join("\n")
    ))
}

/// The published correlations of the same scorers (data/published_nb201.csv) beside ours, and
/// the published rankings this run does not have (e.g. the aggregates an ensemble is compared
/// with). The sources differ in protocol and sometimes in the architectures they correlate
/// over; the `architectures` column says which.
fn published(root: &Path, ours: &[(String, usize, [Option<f64>; 6])]) -> Result<String> {
    let path = root.join("data/published_nb201.csv");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(String::new());
    };
    let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
    // Published values are shown as their sources print them (0.46 stays 0.46).
    let mut rows: Vec<(String, String, String, Vec<String>)> = vec![];
    // A bad line is named in the report and left out rather than failing a report that may
    // come at the end of an hours-long run.
    let mut bad = vec![];
    for (k, l) in text.lines().enumerate().skip(1) {
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != 9 {
            bad.push(format!("line {}: {} fields, not 9", k + 1, f.len()));
            continue;
        }
        let v: Vec<String> = f[3..]
            .iter()
            .map(|x| match x.trim() {
                "" => "—".to_string(),
                x => x.to_string(),
            })
            .collect();
        if let Some(x) = v.iter().find(|x| *x != "—" && x.parse::<f64>().is_err()) {
            bad.push(format!("line {}: '{x}' is not a number", k + 1));
            continue;
        }
        rows.push((f[0].into(), f[1].into(), f[2].into(), v));
    }
    let head =
        "| scorer | source | architectures | τ C10 | ρ C10 | τ C100 | ρ C100 | τ IN16 | ρ IN16 |\n\
                |---|---|---|---|---|---|---|---|---|\n";
    let mut md = format!(
        "## Published values beside ours\n\n\
         From `data/published_nb201.csv` (sources and provenance in `data/README.md`). Our rows \
         are this run's τ-b and ρ; a published τ is Kendall's τ as its source computed it (scipy's \
         default is τ-b). Protocols differ (batch statistics, probe, initialisation; see \
         docs/semantics.md for ours), so a gap is a difference of definition or protocol as much \
         as of implementation.\n\n{head}"
    );
    for (name, n, v) in ours {
        let theirs: Vec<_> = rows.iter().filter(|r| &r.0 == name).collect();
        if theirs.is_empty() {
            continue;
        }
        md += &format!(
            "| **{name}** | this run | {n} scored | {} |\n",
            v.map(cell).join(" | ")
        );
        for (_, src, archs, pv) in theirs {
            md += &format!("| | {src} | {archs} | {} |\n", pv.join(" | "));
        }
    }
    let mut others: Vec<_> = rows
        .iter()
        .filter(|r| !ours.iter().any(|o| o.0 == r.0))
        .collect();
    others.sort_by(|a, b| a.0.cmp(&b.0));
    if !others.is_empty() {
        md += &format!("\nPublished rankings this run did not score:\n\n{head}");
        for (name, src, archs, pv) in others {
            md += &format!("| {name} | {src} | {archs} | {} |\n", pv.join(" | "));
        }
    }
    if !bad.is_empty() {
        md += &format!(
            "\nWARNING: {} left out of this section: {}.\n",
            path.display(),
            bad.join("; ")
        );
    }
    Ok(md + "\n")
}

/// PyTorch's batch-of-one loop on the first three architectures of the run, when torch is
/// importable (tests/golden/torch_loop.py), next to our mean time.
fn torch_comparison(root: &Path, o: &Options, t: &Table, archs: &[Arch], ours: f64) -> String {
    let script = root.join("tests/golden/torch_loop.py");
    let mut secs = vec![];
    for (i, _) in t.rows.iter().take(3) {
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&archs[*i].arch)
            .args(["--n", &o.n.to_string()])
            .output();
        let Ok(out) = out else { break };
        if !out.status.success() {
            break;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if let Some(s) = v["seconds"].as_f64() {
                secs.push(s);
            }
        }
    }
    if secs.is_empty() {
        return "PyTorch loop: not measured (torch not importable; `pip install torch==2.8.0 numpy`).\n".into();
    }
    let m = secs.iter().sum::<f64>() / secs.len() as f64;
    format!(
        "PyTorch batch-of-one loop (per-sample gradients only, N = {}, same machine, first {} \
         architectures of this run): {m:.2} s per architecture, against {ours:.2} s for \
         gradalign's whole per-architecture pipeline (generation, gradients, scoring) — {:.2}×.\n",
        o.n,
        secs.len(),
        m / ours
    )
}

/// Most points a scatter plot draws: beyond it every k-th point is drawn (ranks and τ are still
/// over all of them), so the full space's plots stay ~200 KB instead of ~1.7 MB each.
const MAX_SCATTER_POINTS: usize = 2000;

pub fn plot_scatter(path: &Path, name: &str, score: &[f64], acc: &[f64]) -> Result<()> {
    use plotters::prelude::*;
    let ranks = gradalign::tools::stats::average_ranks(score);
    let n = score.len().max(1) as f64;
    let step = score.len().div_ceil(MAX_SCATTER_POINTS).max(1);
    let root = SVGBackend::new(path, (480, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{name} (τ-b {:.3}){}",
                kendall_tau_b(score, acc).unwrap_or(f64::NAN),
                if step > 1 {
                    format!(", 1 in {step} of {} drawn", score.len())
                } else {
                    String::new()
                }
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..1f64, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("score rank percentile")
        .y_desc("CIFAR-10 test accuracy (%)")
        .draw()?;
    chart.draw_series(
        ranks
            .iter()
            .zip(acc)
            .step_by(step)
            .map(|(r, a)| Circle::new((r / n, *a), 2, BLUE.mix(0.4).filled())),
    )?;
    root.present()?;
    Ok(())
}

pub fn plot_bars(path: &Path, taus: &[(String, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 40 + 28 * taus.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Kendall τ-b vs CIFAR-10 test accuracy", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(130)
        .build_cartesian_2d(-1f64..1f64, (0..taus.len()).into_segmented())?;
    let labels: Vec<String> = taus.iter().map(|t| t.0.clone()).collect();
    // One label per bar: a segmented axis puts each name at its bar's centre.
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(taus.len() + 1)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(taus.iter().enumerate().map(|(i, (_, t))| {
        let t = if t.is_finite() { *t } else { 0.0 };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (t, SegmentValue::Exact(i + 1)),
            ],
            BLUE.mix(0.6).filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        bar
    }))?;
    root.present()?;
    Ok(())
}

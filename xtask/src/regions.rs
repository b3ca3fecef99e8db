//! `cargo xtask bench linear-regions`: does a tiny relative perturbation of the weights change
//! the linear-region ranking of NAS-Bench-201 architectures (the GradAlign paper's argument), and
//! how do gradalign-i/ii and gradsign fare under the same perturbations?
//!
//! Per architecture and per (σ, repeat), including the stored weights (σ = 0):
//! - `tenas_regions`: TE-NAS's protocol on its thin network (C = 1, one cell, no stem; 3×1000
//!   random single-channel 3×3 crops of the shipped CIFAR-10 images, batch-statistics BN);
//! - `probe_regions`, gradalign-i, gradalign-ii, gradsign: the full network (C = 16, N = 5) on
//!   the N-image probe, per-sample BN, as `gradalign score` computes them.
//!
//! Both networks get `w ← w·(1 + σ·ε)` with the same repeat seed for every architecture.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gradalign::autodiff::GradOptions;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::Registry;
use gradalign::tools::regions::{
    count_regions, perturb_weights, repeat_seed, PatternInputs, TENAS_BATCH, TENAS_BATCHES,
};
use gradalign::tools::stats::kendall_tau_b;

use crate::nb201::{append_with_header, load_archs, run_jobs, weight_seed, Arch};

pub struct Options {
    pub indices: Vec<usize>,
    pub seed: u64,
    pub n: usize,
    pub repeats: usize,
    pub sigmas: Vec<f64>,
    pub backend: Backend,
    pub jobs: usize,
    pub out: PathBuf,
    pub desc: String,
}

const SCORERS: [&str; 3] = ["gradalign-i", "gradalign-ii", "gradsign"];
const METRICS: [&str; 5] = [
    "tenas_regions",
    "probe_regions",
    "gradalign-i",
    "gradalign-ii",
    "gradsign",
];

/// (σ, repeat) pairs of one architecture: the stored weights first.
fn settings(o: &Options) -> Vec<(f64, usize)> {
    let mut v = vec![(0.0, 0)];
    for &s in &o.sigmas {
        v.extend((0..o.repeats).map(|r| (s, r)));
    }
    v
}

fn arch_rows(
    a: &Arch,
    o: &Options,
    tenas: &PatternInputs,
    probe: &Probe,
    scorers: &[gradalign::scorers::plugin::ScorerInfo],
) -> Result<String> {
    let ws = weight_seed(o.seed, a.index);
    let thin = Model::from_proto(
        &gradalign::tools::zoo::nb201_tenas_thin(&a.arch, ws)?,
        &format!("nb201 thin #{}", a.index),
    )?;
    let full = Model::from_proto(
        &gradalign::tools::zoo::nb201_model(&a.arch, ws, 16, 5)?,
        &format!("nb201 #{}", a.index),
    )?;
    let mut rows = String::new();
    for (sigma, r) in settings(o) {
        let rs = repeat_seed(o.seed, r);
        let thin_p = perturb_weights(&thin, &[1, 3, 3], sigma, rs)?;
        let full_p = perturb_weights(&full, &[3, 32, 32], sigma, rs)?;
        let t = count_regions(&thin_p, tenas, o.backend, Device::Cpu)?;
        let rep = gradalign::scorers::score::score_model(
            &full_p,
            probe,
            true,
            GradOptions::default(),
            o.backend,
            Device::Cpu,
            scorers,
        )?;
        let get = |n: &str| {
            rep.scores
                .iter()
                .find(|(k, _)| k == n)
                .and_then(|(_, v)| *v)
                .map(|v| format!("{v:?}"))
                .unwrap_or_default()
        };
        rows += &format!(
            "{},{},{sigma:e},{r},{t},{},{},{},{}\n",
            a.index,
            a.arch,
            get("linear_regions"),
            get(SCORERS[0]),
            get(SCORERS[1]),
            get(SCORERS[2])
        );
    }
    Ok(rows)
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let archs = load_archs(root)?;
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("counts.csv");
    let header = format!("index,arch_str,sigma,repeat,{}", METRICS.join(","));
    let mut done: HashSet<usize> = HashSet::new();
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let mut lines = text[..complete].lines();
        if lines.next().is_some_and(|h| h != header) {
            bail!("{} has other columns; use another --out", path.display());
        }
        // An architecture's rows are written in one append: count it only when all are there.
        let mut per: BTreeMap<usize, usize> = BTreeMap::new();
        for l in lines {
            if let Some(i) = l.split(',').next().and_then(|v| v.parse().ok()) {
                *per.entry(i).or_default() += 1;
            }
        }
        let want = settings(o).len();
        done.extend(per.into_iter().filter(|&(_, c)| c == want).map(|(i, _)| i));
        if complete < text.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(complete as u64)?;
        }
    }
    let file = append_with_header(&path, &header)?;
    let todo: Vec<usize> = o
        .indices
        .iter()
        .copied()
        .filter(|i| !done.contains(i))
        .collect();
    eprintln!(
        "linear-regions: {} architectures ({} done), σ ∈ {:?}, {} repeats, N = {}, {} job(s)",
        o.indices.len(),
        o.indices.len() - todo.len(),
        o.sigmas,
        o.repeats,
        o.n,
        o.jobs
    );
    let src = Probe::shipped(1000)?;
    let tenas = PatternInputs::tenas(&src.images, &[1, 3, 3], TENAS_BATCHES, TENAS_BATCH, o.seed)?;
    let probe = Probe::shipped(o.n)?;
    let reg = Registry::builtin();
    let scorers = reg.select(&format!("linear_regions,{}", SCORERS.join(",")))?;
    let mut file = file;
    run_jobs(
        todo.len(),
        o.jobs,
        |k| {
            let a = &archs[todo[k]];
            arch_rows(a, o, &tenas, &probe, &scorers)
                .map_err(|e| anyhow::anyhow!("arch {}: {e:#}", a.index))
        },
        |rows: String| {
            file.write_all(rows.as_bytes())?;
            file.sync_data()?;
            Ok(())
        },
    )?;
    report(o, &archs)
}

/// values[(σ bits, repeat)][metric] → per-architecture values in index order.
type Grid = BTreeMap<(u64, usize), Vec<Vec<f64>>>;

fn read_counts(path: &Path, indices: &[usize]) -> Result<(Vec<usize>, Grid)> {
    let text = std::fs::read_to_string(path).context("counts.csv")?;
    let wanted: HashSet<usize> = indices.iter().copied().collect();
    // (index) → (σ, r) → metrics
    let mut by_arch: BTreeMap<usize, BTreeMap<(u64, usize), Vec<f64>>> = BTreeMap::new();
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        if f.len() != 4 + METRICS.len() {
            continue;
        }
        let i: usize = f[0].parse()?;
        if !wanted.contains(&i) {
            continue;
        }
        let sigma: f64 = f[2].parse()?;
        let r: usize = f[3].parse()?;
        let vals = f[4..]
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
            .collect();
        by_arch
            .entry(i)
            .or_default()
            .insert((sigma.to_bits(), r), vals);
    }
    let keys: HashSet<(u64, usize)> = by_arch.values().flat_map(|m| m.keys().copied()).collect();
    // Only architectures with every setting and every value finite enter the comparison.
    let complete: Vec<usize> = by_arch
        .iter()
        .filter(|(_, m)| {
            keys.iter()
                .all(|k| m.get(k).is_some_and(|v| v.iter().all(|x| x.is_finite())))
        })
        .map(|(i, _)| *i)
        .collect();
    let mut grid: Grid = BTreeMap::new();
    for k in keys {
        let cols: Vec<Vec<f64>> = (0..METRICS.len())
            .map(|m| complete.iter().map(|i| by_arch[i][&k][m]).collect())
            .collect();
        grid.insert(k, cols);
    }
    Ok((complete, grid))
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("undefined".into(), |v| format!("{v:.3}"))
}

fn mean_defined(v: &[Option<f64>]) -> Option<f64> {
    let d: Vec<f64> = v.iter().flatten().copied().collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

pub fn report(o: &Options, archs: &[Arch]) -> Result<()> {
    let (complete, grid) = read_counts(&o.out.join("counts.csv"), &o.indices)?;
    let by_index: BTreeMap<usize, &Arch> = archs.iter().map(|a| (a.index, a)).collect();
    let acc: Vec<f64> = complete.iter().map(|i| by_index[i].acc[0]).collect();
    let base = grid
        .get(&(0f64.to_bits(), 0))
        .context("no stored-weight rows")?;
    let mut md = format!(
        "# Linear regions under weight perturbation (NAS-Bench-201)\n\n\
         Run: `cargo xtask bench linear-regions {}` — {} architectures (every one with all \
         settings finite), σ ∈ {:?}, {} perturbed copies per σ (`w ← w·(1 + σ·ε)` on every \
         trainable parameter, ε ~ N(0, 1), one seed per repeat shared by all architectures), \
         backend `{:?}`, weight seed {}. Accuracy: CIFAR-10 test (200 epochs, \
         `data/nb201_accuracies.csv`).\n\n\
         - `tenas_regions`: TE-NAS's linear-region count (its protocol: thin network C = 1, one \
         cell, no stem; 3 batches of 1000 random 1×3×3 crops of the shipped CIFAR-10 images; \
         batch-statistics BatchNorm; ReLUs on 4-D tensors).\n\
         - `probe_regions`: distinct ReLU patterns of the full network (C = 16, N = 5) over the N = {} \
         probe images, per-sample BatchNorm (the `linear_regions` scorer).\n\
         - gradalign-i, gradalign-ii, gradsign: the full network on the same probe.\n\n\
         τ is Kendall τ-b; *stability* is τ between the ranking at the stored weights and the \
         ranking of the perturbed copy (1 = unchanged); *vs accuracy* is τ with CIFAR-10 test \
         accuracy. Means over the repeats, with the minimum in brackets. *Changed* is the median \
         over architectures of |perturbed − stored| / |stored|.\n\n",
        o.desc,
        complete.len(),
        o.sigmas,
        o.repeats,
        o.backend,
        o.seed,
        o.n
    );
    md += "| metric | τ vs accuracy (stored) | distinct values (stored) |\n|---|---|---|\n";
    for (m, name) in METRICS.iter().enumerate() {
        let distinct: HashSet<u64> = base[m].iter().map(|v| v.to_bits()).collect();
        md += &format!(
            "| {name} | {} | {} |\n",
            fmt(kendall_tau_b(&base[m], &acc)),
            distinct.len()
        );
    }
    md += "\n| σ | metric | stability τ | τ vs accuracy | changed (median rel.) |\n|---|---|---|---|---|\n";
    let mut curves: Vec<Vec<(f64, f64, f64)>> = vec![vec![]; METRICS.len()];
    for &s in &o.sigmas {
        for (m, name) in METRICS.iter().enumerate() {
            let mut stab = vec![];
            let mut vacc = vec![];
            let mut changed = vec![];
            for r in 0..o.repeats {
                let Some(g) = grid.get(&(s.to_bits(), r)) else {
                    continue;
                };
                stab.push(kendall_tau_b(&base[m], &g[m]));
                vacc.push(kendall_tau_b(&g[m], &acc));
                for (b, p) in base[m].iter().zip(&g[m]) {
                    if *b != 0.0 {
                        changed.push(((p - b) / b).abs());
                    }
                }
            }
            changed.sort_by(f64::total_cmp);
            let med = changed.get(changed.len() / 2).copied();
            let min = |v: &[Option<f64>]| v.iter().flatten().copied().reduce(f64::min);
            md += &format!(
                "| {s:e} | {name} | {} ({}) | {} ({}) | {} |\n",
                fmt(mean_defined(&stab)),
                fmt(min(&stab)),
                fmt(mean_defined(&vacc)),
                fmt(min(&vacc)),
                med.map_or("—".into(), |v| format!("{v:.2e}"))
            );
            curves[m].push((
                s,
                mean_defined(&stab).unwrap_or(f64::NAN),
                mean_defined(&vacc).unwrap_or(f64::NAN),
            ));
        }
    }
    plot(&o.out.join("stability.svg"), &curves, &o.sigmas)?;
    md += "\n![stability and accuracy correlation against σ](stability.svg)\n";
    std::fs::write(o.out.join("report.md"), md)?;
    eprintln!("wrote {}", o.out.join("report.md").display());
    Ok(())
}

fn plot(path: &Path, curves: &[Vec<(f64, f64, f64)>], sigmas: &[f64]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(480);
    let lo = sigmas.iter().copied().fold(f64::MAX, f64::min).log10() - 0.3;
    let hi = sigmas.iter().copied().fold(f64::MIN, f64::max).log10() + 0.3;
    let colours = [RED, BLUE, GREEN, MAGENTA, BLACK];
    for (panel, title, pick) in [
        (&left, "stability: τ(stored, perturbed)", 1usize),
        (&right, "τ with CIFAR-10 accuracy", 2usize),
    ] {
        // Zoom on the values: stability sits just under 1, where a fixed [−1, 1] axis hides it.
        let vals: Vec<f64> = curves
            .iter()
            .flatten()
            .map(|p| if pick == 1 { p.1 } else { p.2 })
            .filter(|v| v.is_finite())
            .collect();
        let vmin = vals.iter().copied().fold(1.0, f64::min);
        let vmax = vals.iter().copied().fold(-1.0, f64::max);
        let (ylo, yhi) = if pick == 1 {
            (((vmin - 0.02) * 50.0).floor() / 50.0, 1.002)
        } else {
            (
                ((vmin - 0.05) * 20.0).floor() / 20.0,
                ((vmax + 0.05) * 20.0).ceil() / 20.0,
            )
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, ylo..yhi)?;
        chart
            .configure_mesh()
            .x_desc("log10 σ")
            .y_desc("Kendall τ-b")
            .draw()?;
        for (m, c) in curves.iter().enumerate() {
            let col = colours[m % colours.len()];
            let pts: Vec<(f64, f64)> = c
                .iter()
                .map(|p| (p.0.log10(), if pick == 1 { p.1 } else { p.2 }))
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
                .label(if pts.is_empty() {
                    format!("{} (undefined: all tied)", METRICS[m])
                } else {
                    METRICS[m].to_string()
                })
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, col.filled())))?;
        }
        // One legend (left panel) serves both: the colours are the same.
        if pick == 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerLeft)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

//! `cargo xtask bench nb201`: NAS-Bench-201 architectures generated in Rust, scored in process,
//! correlated with the ground truth (data/nb201_accuracies.csv), written as a resumable
//! scores.csv, a report and SVG plots.

use std::collections::{BTreeMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use gradalign::autodiff::GradOptions;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::Registry;
use gradalign::tools::stats::spearman;

mod report;
pub use report::{plot_scatter, tau_ci};
use report::{read_scores, report};

pub struct Arch {
    pub index: usize,
    pub arch: String,
    /// cifar10_test, cifar100_test, imagenet16_120_test
    pub acc: [f64; 3],
}

pub fn load_archs(root: &Path) -> Result<Vec<Arch>> {
    let text = std::fs::read_to_string(root.join("data/nb201_accuracies.csv"))
        .context("data/nb201_accuracies.csv")?;
    let mut out = vec![];
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        out.push(Arch {
            index: f[0].parse()?,
            arch: f[1].to_string(),
            acc: [f[2].parse()?, f[3].parse()?, f[4].parse()?],
        });
    }
    Ok(out)
}

/// Seeded sample of `k` distinct indices (Fisher–Yates with SplitMix64), in sampled order.
pub fn sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = gradalign::rng::Rng(seed);
    let mut next = || rng.next_u64();
    let mut v: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (next() % (n - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(k.min(n));
    v
}

pub struct Options {
    pub indices: Vec<usize>,
    pub seed: u64,
    pub n: usize,
    pub scorers: String,
    pub backend: Backend,
    pub jobs: usize,
    pub out: PathBuf,
    pub sample_desc: String,
    /// How the generator draws the weights (`--init pytorch|kaiming-normal`).
    pub init: gradalign::tools::zoo::Init,
    /// Write the report from the scores already in `out` without scoring anything.
    pub report_only: bool,
}

/// The progress line: bar, count, seconds per architecture and ETA.
pub fn progress(k: usize, total: usize, t0: Instant) {
    let el = t0.elapsed().as_secs_f64();
    let eta = el / k as f64 * (total - k) as f64;
    let bar = (30 * k) / total.max(1);
    eprint!(
        "\r[{}{}] {k}/{total} {:.2}s/arch ETA {:.0}m{:02.0}s\x1b[K",
        "#".repeat(bar),
        " ".repeat(30 - bar),
        el / k as f64,
        (eta / 60.0).floor(),
        eta % 60.0
    );
}

/// Runs `work(k)` for every k < `count` on `jobs` threads and hands each result to `commit`
/// (one at a time, in completion order) with a progress line. The first error stops every
/// thread and is returned; what was committed before it stays.
pub fn run_jobs<R>(
    count: usize,
    jobs: usize,
    work: impl Fn(usize) -> Result<R> + Sync,
    commit: impl FnMut(R) -> Result<()> + Send,
) -> Result<()> {
    // In-process sweeps: the runtime gives each job its share of the cores (no spinning
    // workers fighting over them) and every session draws from one shared arena, as `rank`
    // does.
    gradalign::runtime::set_parallel_jobs(jobs.max(1));
    gradalign::runtime::set_shared_arena(true);
    let commit = Mutex::new(commit);
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= count || failure.lock().unwrap().is_some() {
                    break;
                }
                if let Err(e) = work(k).and_then(|r| (commit.lock().unwrap())(r)) {
                    *failure.lock().unwrap() = Some(e);
                    break;
                }
                progress(finished.fetch_add(1, Ordering::SeqCst) + 1, count, t0);
            });
        }
    });
    eprintln!();
    failure.into_inner().unwrap().map_or(Ok(()), Err)
}

/// Appends one result (scores row, timings row, error rows) to its three files. The scores row
/// goes last and is synced: a row in scores.csv means its errors and timings are in.
pub fn commit_rows<'f>(
    scores: &'f mut std::fs::File,
    times: &'f mut std::fs::File,
    errors: &'f mut std::fs::File,
) -> impl FnMut((String, String, String)) -> Result<()> + Send + 'f {
    move |(row, t, errs)| {
        errors.write_all(errs.as_bytes())?;
        times.write_all(t.as_bytes())?;
        scores.write_all(row.as_bytes())?;
        scores.sync_data()?;
        Ok(())
    }
}

/// Open `path` for appending, writing `header` first when the file is new or empty.
pub fn append_with_header(path: impl AsRef<Path>, header: &str) -> Result<std::fs::File> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    if f.metadata()?.len() == 0 {
        writeln!(f, "{header}")?;
    }
    Ok(f)
}

/// The data rows of a resumable scores CSV: a torn last row (from a killed run) is cut off the
/// file, and a header other than `header` is refused.
pub fn resume_rows(path: &Path, header: &str) -> Result<Vec<String>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path)?;
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(complete as u64)?;
    }
    let mut lines = text[..complete].lines();
    if let Some(h) = lines.next() {
        if h != header {
            bail!(
                "{} has other columns ({h}); use the same --scorers or another --out",
                path.display()
            );
        }
    }
    Ok(lines.map(str::to_string).collect())
}

/// Each named scorer's value as a scores CSV holds it (`{:?}`, reads back exactly; empty when
/// the scorer failed).
pub fn score_fields(names: &[String], r: &gradalign::scorers::score::ScoreReport) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            r.scores
                .iter()
                .find(|(k, _)| k == n)
                .and_then(|(_, v)| *v)
                .map(|v| format!("{v:?}"))
                .unwrap_or_default()
        })
        .collect()
}

/// Weight seed of architecture `index` in a run seeded `seed`.
pub fn weight_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(index as u64)
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let archs = load_archs(root)?;
    if o.report_only {
        return report(root, o, &archs, None);
    }
    std::fs::create_dir_all(&o.out)?;
    let reg = Registry::builtin();
    let scorers = reg.select(&o.scorers)?;
    let names: Vec<String> = scorers.iter().map(|s| s.name.clone()).collect();
    let scores_path = o.out.join("scores.csv");
    let times_path = o.out.join("timings.csv");
    let header = format!("index,arch_str,{}", names.join(","));
    let done: HashSet<usize> = resume_rows(&scores_path, &header)?
        .iter()
        .filter_map(|l| l.split(',').next()?.parse::<usize>().ok())
        .collect();
    let scores_file = append_with_header(&scores_path, &header)?;
    let errors_file = append_with_header(o.out.join("errors.csv"), "index,scorer,error")?;
    let times_file = append_with_header(
        &times_path,
        "index,grad_seconds,score_seconds,total_seconds",
    )?;
    let todo: Vec<usize> = o
        .indices
        .iter()
        .copied()
        .filter(|i| !done.contains(i))
        .collect();
    eprintln!(
        "nb201: {} architectures ({} already in {}), N = {}, scorers {}, {} job(s)",
        o.indices.len(),
        o.indices.len() - todo.len(),
        scores_path.display(),
        o.n,
        names.join(","),
        o.jobs
    );
    let probe = Probe::shipped(o.n)?;
    let (mut scores_file, mut times_file, mut errors_file) = (scores_file, times_file, errors_file);
    let work = |k: usize| -> Result<(String, String, String)> {
        let a = &archs[todo[k]];
        let t = Instant::now();
        let r = (|| -> Result<gradalign::scorers::score::ScoreReport> {
            let proto = gradalign::tools::zoo::nb201_model_init(
                &a.arch,
                weight_seed(o.seed, a.index),
                16,
                5,
                o.init,
            )?;
            let model = Model::from_proto(&proto, &format!("nb201 #{}", a.index))?;
            gradalign::scorers::score::score_model(
                &model,
                &probe,
                true,
                GradOptions::default(),
                o.backend,
                Device::Cpu,
                &scorers,
            )
        })()
        .map_err(|e| anyhow::anyhow!("arch {}: {e:#}", a.index))?;
        let total = t.elapsed().as_secs_f64();
        let vals = score_fields(&names, &r);
        let errs: String = r
            .errors
            .iter()
            .map(|(k, e)| format!("{},{k},\"{}\"\n", a.index, e.replace('"', "'")))
            .collect();
        Ok((
            format!("{},{},{}\n", a.index, a.arch, vals.join(",")),
            format!(
                "{},{:.4},{:.4},{:.4}\n",
                a.index, r.grad_seconds, r.score_seconds, total
            ),
            errs,
        ))
    };
    let commit = commit_rows(&mut scores_file, &mut times_file, &mut errors_file);
    run_jobs(todo.len(), o.jobs, work, commit)?;
    let peak = gradalign::inputs::memory::peak_rss_mib();
    report::write_run_info(o, peak)?;
    report(root, o, &archs, peak)
}

/// `bench naslib-check`: our baselines against NAS-Bench-Suite-Zero's precomputed values on the
/// CIFAR-10 architectures of data/nb201_zc_naslib_subset.csv (Spearman across architectures),
/// and each one's Spearman with NASLib's `val_accuracy`, side by side.
pub fn naslib_check(root: &Path, o: &Options) -> Result<()> {
    const PAIRS: [(&str, &str); 9] = [
        ("synflow", "synflow"),
        ("snip", "snip"),
        ("grad_norm", "grad_norm"),
        ("naswot", "nwot"),
        ("jacob_cov", "jacov"),
        ("fisher", "fisher"),
        ("grasp", "grasp"),
        ("params", "params"),
        ("flops", "flops"),
    ];
    let text = std::fs::read_to_string(root.join("data/nb201_zc_naslib_subset.csv"))?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines
        .next()
        .context("empty NASLib file")?
        .split(',')
        .collect();
    let col = |name: &str| {
        head.iter()
            .position(|h| *h == name)
            .with_context(|| format!("no column {name}"))
    };
    let (c_ds, c_idx, c_val) = (col("dataset")?, col("index")?, col("val_accuracy")?);
    let mut theirs: BTreeMap<usize, (f64, Vec<f64>)> = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        if f[c_ds] != "cifar10" {
            continue;
        }
        let vals = PAIRS
            .iter()
            .map(|(_, t)| col(t).map(|c| f[c].parse::<f64>().unwrap_or(f64::NAN)))
            .collect::<Result<Vec<_>>>()?;
        theirs.insert(f[c_idx].parse()?, (f[c_val].parse()?, vals));
    }
    if let Ok(limit) = std::env::var("NASLIB_CHECK_LIMIT") {
        // Smoke tests: only the first architectures.
        let limit: usize = limit.parse()?;
        theirs = theirs.into_iter().take(limit).collect();
    }
    let ours_scorers: Vec<&str> = PAIRS
        .iter()
        .map(|p| p.0)
        .filter(|n| *n != "grasp")
        .collect();
    let run_opts = Options {
        indices: theirs.keys().copied().collect(),
        scorers: ours_scorers.join(","),
        out: o.out.clone(),
        seed: o.seed,
        n: o.n,
        backend: o.backend,
        jobs: o.jobs,
        sample_desc: o.sample_desc.clone(),
        init: o.init,
        report_only: o.report_only,
    };
    run(root, &run_opts)?;
    let t = read_scores(&o.out.join("scores.csv"))?;
    let mut md = format!(
        "# naslib-check: our baselines vs NAS-Bench-Suite-Zero (NB201, CIFAR-10)\n\n\
         {} architectures of `data/nb201_zc_naslib_subset.csv` (dataset `cifar10`), scored by \
         `cargo xtask bench naslib-check` ({}; N = {}, shipped CIFAR-10 probe, per-sample \
         BatchNorm, our own seeded weights). Spearman ρ across architectures.\n\n\
         | scorer (ours / NASLib) | ρ(ours, NASLib) | ρ(ours, val_accuracy) | ρ(NASLib, val_accuracy) | archs |\n|---|---|---|---|---|\n",
        theirs.len(),
        o.sample_desc,
        o.n
    );
    for (k, (ours_name, their_name)) in PAIRS.iter().enumerate() {
        let j = t.names.iter().position(|n| n == ours_name);
        let mut a = vec![];
        let mut b = vec![];
        let mut acc = vec![];
        let mut tb = vec![];
        let mut tacc = vec![];
        for (i, (va, vals)) in &theirs {
            if vals[k].is_finite() {
                tb.push(vals[k]);
                tacc.push(*va);
            }
            let Some(j) = j else { continue };
            let Some((_, row)) = t.rows.iter().find(|(x, _)| x == i) else {
                continue;
            };
            if let (Some(ours), true) = (row[j], vals[k].is_finite()) {
                a.push(ours);
                b.push(vals[k]);
                acc.push(*va);
            }
        }
        let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.3}"));
        md += &format!(
            "| {ours_name} / {their_name} | {} | {} | {} | {} |\n",
            if j.is_some() {
                f(spearman(&a, &b))
            } else {
                "not computed".into()
            },
            if j.is_some() {
                f(spearman(&a, &acc))
            } else {
                "—".into()
            },
            f(spearman(&tb, &tacc)),
            a.len()
        );
    }
    std::fs::write(o.out.join("naslib-check.md"), &md)?;
    println!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{sample, tau_ci};

    #[test]
    fn bootstrap_interval_brackets_tau() {
        // A perfect ranking stays perfect under any resample.
        let x: Vec<f64> = (0..200).map(f64::from).collect();
        assert_eq!(tau_ci(&x, &x, 200, 0), Some((1.0, 1.0, 1.0)));
        // A noisy one: the interval holds the point estimate, has width, and narrows with n.
        let mut rng = gradalign::rng::Rng(3);
        let noisy = |n: usize, rng: &mut gradalign::rng::Rng| -> (Vec<f64>, Vec<f64>) {
            let a: Vec<f64> = (0..n).map(|i| i as f64).collect();
            let s = a
                .iter()
                .map(|v| v + n as f64 * (rng.next_u64() as f64 / u64::MAX as f64))
                .collect();
            (s, a)
        };
        let (s, a) = noisy(300, &mut rng);
        let (t, lo, hi) = tau_ci(&s, &a, 500, 1).unwrap();
        assert!(lo < t && t < hi && hi - lo > 0.02, "{lo} {t} {hi}");
        let (s4, a4) = noisy(1200, &mut rng);
        let (_, lo4, hi4) = tau_ci(&s4, &a4, 500, 1).unwrap();
        assert!(hi4 - lo4 < 0.75 * (hi - lo), "{} vs {}", hi4 - lo4, hi - lo);
    }

    #[test]
    fn sample_is_the_committed_draw() {
        // Partial Fisher–Yates on SplitMix64, as an independent Python transcription computes
        // it; the committed NB201 tables (seed 0) hold these among their first rows.
        assert_eq!(sample(15625, 5, 0), [13785, 9109, 6148, 6545, 4481]);
        assert_eq!(sample(100, 4, 7), [87, 34, 58, 70]);
        // A smaller draw is a prefix of a larger one with the same seed.
        assert_eq!(sample(15625, 300, 0)[..], sample(15625, 1000, 0)[..300]);
    }
}

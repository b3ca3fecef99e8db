//! `gradalign score`, `gradalign rank` and `gradalign plugins`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use gradalign::results::ensemble::EnsembleScore;
use gradalign::results::rank::{self, ResultsFile};
use gradalign::scorers::plugin::{input_names, Registry, ScorerInfo};
use gradalign::scorers::score::{score_model, ScoreReport};

use crate::{load_probe, GradArgs, ProbeArgs};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// With `--isolate`, external scorers run in a child process each (built-ins stay in process:
/// they are part of gradalign).
fn isolated(mut scorers: Vec<ScorerInfo>, isolate: bool) -> Vec<ScorerInfo> {
    for s in &mut scorers {
        s.isolated = isolate && s.library.is_some();
    }
    scorers
}

pub const DEFAULT_SCORERS: &str = "gradalign-i,gradalign-ii,gradsign";

fn registry(plugins: &[PathBuf]) -> Registry {
    let r = Registry::with_plugins(plugins);
    for e in &r.load_errors {
        eprintln!("warning: {e}");
    }
    r
}

fn score_one(
    path: &Path,
    probe: &ProbeArgs,
    grad: &GradArgs,
    scorers: &[ScorerInfo],
) -> Result<ScoreReport> {
    let m = grad.load_model(path)?;
    let (p, shipped) = load_probe(&m, probe)?;
    let mut r = score_model(
        &m,
        &p,
        shipped,
        grad.options(),
        grad.backend,
        grad.device,
        scorers,
    )?;
    r.model = path.display().to_string();
    Ok(r)
}

/// Exit status: 0 when every scorer produced a value, 2 when some failed (their errors are
/// printed and, with --format json, listed under "errors").
pub fn score(
    model: &Path,
    probe: &ProbeArgs,
    grad: &GradArgs,
    scorer: &str,
    plugins: &[PathBuf],
    format: Format,
    isolate: bool,
) -> Result<i32> {
    let reg = registry(plugins);
    let scorers = isolated(reg.select(scorer)?, isolate);
    gradalign::runtime::check_backend(grad.backend)?;
    let r = score_one(model, probe, grad, &scorers)?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let scores: serde_json::Map<String, serde_json::Value> = r
                .scores
                .iter()
                .map(|(n, v)| (n.clone(), v.map_or(serde_json::Value::Null, |v| v.into())))
                .collect();
            let v = serde_json::json!({
                "model": r.model,
                "scores": scores,
                "errors": r.errors,
                "warnings": r.warnings(),
                "notes": r.notes,
                "runtime": r.runtime,
                // The process's high-water resident memory so far (Linux; null elsewhere).
                "peak_rss_mib": gradalign::inputs::memory::peak_rss_mib(),
                "seconds": {
                    "inputs": r.grad_seconds,
                    "scorers": r.score_seconds,
                    "per_scorer": r.scorer_seconds.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                    "phases": r.phases,
                },
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Format::Csv => {
            let names: Vec<&str> = r.scores.iter().map(|(n, _)| n.as_str()).collect();
            writeln!(out, "model,{}", names.join(","))?;
            let vals: Vec<String> = r.scores.iter().map(|(_, v)| rank::fmt_score(*v)).collect();
            writeln!(out, "{},{}", rank::csv_field(&r.model), vals.join(","))?;
        }
        Format::Table => {
            let w = r
                .scores
                .iter()
                .map(|(n, _)| n.len())
                .max()
                .unwrap_or(5)
                .max(6);
            writeln!(out, "{:<w$}  score", "scorer")?;
            for (n, v) in &r.scores {
                let shown = v.map_or("—".to_string(), |v| format!("{v:.6e}"));
                writeln!(out, "{n:<w$}  {shown}")?;
            }
        }
    }
    print_notes(&r.notes);
    for (n, e) in &r.errors {
        eprintln!("error: scorer '{n}': {e}");
    }
    eprintln!(
        "scored {} — runtime {}, inputs {:.2}s, scorers {:.2}s",
        r.model, r.runtime, r.grad_seconds, r.score_seconds
    );
    Ok(if r.errors.is_empty() { 0 } else { 2 })
}

/// Notes on stderr, warnings marked as such.
pub fn print_notes(notes: &[String]) {
    for note in notes {
        match note.strip_prefix(gradalign::inputs::engine::WARNING) {
            Some(w) => eprintln!("warning: {w}"),
            None => eprintln!("note: {note}"),
        }
    }
}

pub fn plugins(plugins: &[PathBuf]) -> Result<i32> {
    let reg = registry(plugins);
    let w = reg.scorers.iter().map(|s| s.name.len()).max().unwrap_or(4);
    println!(
        "{:<w$}  {:<22}  {:<40}  description",
        "name", "origin", "inputs"
    );
    for s in &reg.scorers {
        println!(
            "{:<w$}  {:<22}  {:<40}  {}",
            s.name,
            s.origin,
            input_names(s.inputs).join(","),
            s.description
        );
    }
    Ok(if reg.load_errors.is_empty() { 0 } else { 1 })
}

#[allow(clippy::too_many_arguments)]
pub fn rank(
    models: &[PathBuf],
    probe: &ProbeArgs,
    grad: &GradArgs,
    scorer: &str,
    plugins: &[PathBuf],
    out: &Path,
    jobs: Option<usize>,
    isolate: bool,
    shard: Option<rank::Shard>,
    ensemble: Option<&str>,
) -> Result<i32> {
    let reg = registry(plugins);
    let members = ensemble.map(super::ensemble::members).transpose()?;
    let scorer = match &members {
        Some(m) => super::ensemble::with_members(scorer, m),
        None => scorer.to_string(),
    };
    let scorers = isolated(reg.select(&scorer)?, isolate);
    gradalign::runtime::check_backend(grad.backend)?;
    let names: Vec<String> = scorers.iter().map(|s| s.name.clone()).collect();
    let mut all = rank::collect_models(models)?;
    if all.is_empty() {
        bail!("no .onnx models found in the given paths");
    }
    if let Some(sh) = shard {
        let total = all.len();
        let keys: Vec<String> = all.iter().map(|p| p.display().to_string()).collect();
        let mine: std::collections::HashSet<&String> = sh.select(&keys).into_iter().collect();
        all.retain(|p| mine.contains(&p.display().to_string()));
        eprintln!("shard {sh}: {} of {total} models", all.len());
        if all.is_empty() {
            // Not an error: with more shards than models some are legitimately empty. The
            // header is still written so that `merge` sees every shard's scorer list.
            ResultsFile::open(out, &rank::header(&names))?;
            return Ok(0);
        }
    }
    let results = ResultsFile::open(out, &rank::header(&names))?;
    let todo: Vec<PathBuf> = all
        .iter()
        .filter(|p| !results.done.contains(&p.display().to_string()))
        .cloned()
        .collect();
    let skipped = all.len() - todo.len();
    if skipped > 0 {
        eprintln!(
            "resuming: {skipped} of {} models already in {}",
            all.len(),
            out.display()
        );
    }
    // Building a model's gradient graph and session is mostly serial work, so models side by
    // side (one intra-op thread each by default) keep the cores busier than one model at a time.
    // Capped at 8 by default: on a many-core host each job keeps a useful share of the memory
    // bound and several intra-op threads.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = jobs.unwrap_or(cores.min(8)).max(1).min(todo.len().max(1));
    gradalign::runtime::set_parallel_jobs(jobs);
    gradalign::runtime::set_shared_arena(grad.max_memory.is_none() && todo.len() > 1);
    let mut grad = grad.clone();
    if grad.max_memory.is_none() && jobs > 1 {
        grad.max_memory = Some(gradalign::inputs::memory::default_limit() / jobs as u64);
    }
    let grad = &grad;
    let results = Mutex::new(results);
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let t0 = Instant::now();
    let write_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= todo.len() || write_error.lock().unwrap().is_some() {
                    break;
                }
                let path = &todo[i];
                let t = Instant::now();
                let res = score_one(path, probe, grad, &scorers);
                match &res {
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => {
                        for w in r.warnings() {
                            eprintln!("warning: {}: {w}", path.display());
                        }
                    }
                }
                let secs = t.elapsed().as_secs_f64();
                if let Err(e) =
                    results
                        .lock()
                        .unwrap()
                        .append(&path.display().to_string(), &names, &res, secs)
                {
                    *write_error.lock().unwrap() = Some(e);
                    break;
                }
                let k = finished.fetch_add(1, Ordering::SeqCst) + 1;
                let eta = t0.elapsed().as_secs_f64() / k as f64 * (todo.len() - k) as f64;
                let line = format!(
                    "[{k}/{}] {:.0}% ETA {eta:.0}s  {}",
                    todo.len(),
                    100.0 * k as f64 / todo.len() as f64,
                    path.display()
                );
                // A live line on a terminal; in logs, one line per tenth of the run.
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else if (k * 10 / todo.len()) != ((k - 1) * 10 / todo.len()) {
                    eprintln!("{line}");
                }
            });
        }
    });
    if tty {
        eprintln!();
    }
    if let Some(e) = write_error.into_inner().unwrap() {
        return Err(e);
    }
    let ens = match &members {
        Some(m) if shard.is_none() => Some(super::ensemble::write(out, m)?),
        _ => None,
    };
    if members.is_some() && shard.is_some() {
        eprintln!(
            "note: --ensemble ranks the whole set of models: run `gradalign merge --ensemble` \
             over all the shards"
        );
    }
    print_ranking(out, &names, ens.as_ref())?;
    let failed = failed.load(Ordering::SeqCst);
    if failed > 0 {
        eprintln!(
            "{failed} model(s) failed; their errors are in {}",
            out.display()
        );
    }
    Ok(if failed > 0 { 2 } else { 0 })
}

/// `gradalign merge`: exit 0 when the merged file is complete, 2 when `--models` names models
/// that no shard holds (the merged file is still written).
pub fn merge(
    out: &Path,
    shards: &[PathBuf],
    models: &[PathBuf],
    force: bool,
    ensemble: Option<&str>,
) -> Result<i32> {
    let members = ensemble.map(super::ensemble::members).transpose()?;
    // `gradalign merge shards/shard-*.csv` (output forgotten) would otherwise replace shard 0
    // with the merge of the others.
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    };
    if let Some(s) = shards.iter().find(|s| same(s, out)) {
        bail!(
            "the output {} is also one of the shard files ({}): give the merged file a new name \
             first, e.g. `gradalign merge results.csv shards/shard-*.csv`",
            out.display(),
            s.display()
        );
    }
    if out.exists() && !force {
        bail!(
            "{} exists: merge writes a new file; remove it or pass --force to replace it",
            out.display()
        );
    }
    let m = rank::merge(shards)?;
    for t in &m.torn {
        eprintln!(
            "warning: {} ends with a row torn by a kill; that model is not merged — rerun the \
             shard (it resumes) and merge again",
            t.display()
        );
    }
    let mut incomplete = false;
    if let Some((n, absent)) = rank::missing_shard_files(shards) {
        if !absent.is_empty() {
            eprintln!(
                "error: {} of the {n} shard files are missing (shard {}): those tasks have not \
                 written anything yet",
                absent.len(),
                absent
                    .iter()
                    .map(|i| format!("{i}/{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            incomplete = true;
        }
    }
    let mut missing = vec![];
    if !models.is_empty() {
        let have: std::collections::HashSet<&str> = m.rows.iter().map(|r| r.0.as_str()).collect();
        for p in rank::collect_models(models)? {
            let key = p.display().to_string();
            if !have.contains(key.as_str()) {
                missing.push(key);
            }
        }
    }
    m.write(out)?;
    let names: Vec<String> = {
        let h = rank::split_csv(&m.header);
        h[1..h.len() - 2].to_vec()
    };
    let ens = match &members {
        Some(m) => Some(super::ensemble::write(out, m)?),
        None => None,
    };
    print_ranking(out, &names, ens.as_ref())?;
    eprintln!(
        "merged {} models from {} files into {} ({} failed, errors kept in the CSV)",
        m.rows.len(),
        shards.len(),
        out.display(),
        m.failed
    );
    if !missing.is_empty() {
        eprintln!(
            "error: {} model(s) are in no shard yet (first: {}); rerun the shards that hold them",
            missing.len(),
            missing[..missing.len().min(5)].join(", ")
        );
        return Ok(2);
    }
    Ok(if m.torn.is_empty() && !incomplete {
        0
    } else {
        2
    })
}

/// The final table: every row of the results file, sorted by the ensemble when there is one,
/// else by the first scorer (best first).
fn print_ranking(
    out: &Path,
    names: &[String],
    ensemble: Option<&(PathBuf, HashMap<String, EnsembleScore>)>,
) -> Result<()> {
    let text = std::fs::read_to_string(out)?;
    let mut rows: Vec<Vec<String>> = text.lines().skip(1).map(rank::split_csv).collect();
    let ens = |r: &Vec<String>| match ensemble.and_then(|(_, m)| m.get(&r[0])) {
        Some(EnsembleScore::Score(s)) => Some(*s),
        _ => None,
    };
    let key = |r: &Vec<String>| match ensemble {
        Some(_) => ens(r),
        None => r.get(1).and_then(|v| v.parse::<f64>().ok()),
    };
    rows.sort_by(|a, b| match (key(a), key(b)) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a[0].cmp(&b[0]),
    });
    let w = rows.iter().map(|r| r[0].len()).max().unwrap_or(5).max(5);
    let mut head = format!("{:>4}  {:<w$}", "rank", "model");
    if ensemble.is_some() {
        head += &format!("  {:>14}", "ensemble");
    }
    for n in names {
        head += &format!("  {n:>14}");
    }
    println!("{head}");
    if let Some((path, _)) = ensemble {
        eprintln!("ensemble written to {}", path.display());
    }
    for (i, r) in rows.iter().enumerate() {
        let mut line = format!("{:>4}  {:<w$}", i + 1, r[0]);
        if ensemble.is_some() {
            line += &format!(
                "  {:>14}",
                ens(r).map_or("—".into(), |v| format!("{v:.6e}"))
            );
        }
        for j in 0..names.len() {
            let v = r.get(j + 1).and_then(|v| v.parse::<f64>().ok());
            line += &format!("  {:>14}", v.map_or("—".into(), |v| format!("{v:.6e}")));
        }
        println!("{line}");
    }
    Ok(())
}

//! `cargo xtask ensemble`: the `ensemble` ranking (src/results/ensemble.rs) on the committed
//! NB201 score tables: τ-b and ρ against CIFAR-10/100 and ImageNet16-120 accuracy with bootstrap
//! 95 % intervals, beside each member alone on the same architectures and the ensemble without
//! each member in turn. Nothing is scored and nothing is fitted here: the members are the
//! default ones (chosen before looking at these tables, docs/semantics.md#ensemble) unless
//! `--members` names others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gradalign::results::ensemble::{log_rank_sum, EnsembleScore, DEFAULT_MEMBERS};
use gradalign::tools::stats::spearman;

use crate::nb201::{load_archs, tau_ci};

pub struct Options {
    pub members: String,
    pub reps: usize,
    pub seed: u64,
    pub out: PathBuf,
    /// How the members were chosen, when not the default set (said in the report's header).
    pub provenance: Option<String>,
    /// Score tables to join instead of the committed 1,000-architecture ones (`--tables`),
    /// e.g. the full-space run's `docs/results/nb201-all/scores.csv`.
    pub tables: Option<Vec<String>>,
}

/// The score tables the NB201 benchmark committed, joined by architecture index: the main run
/// and the later runs of added scorers on the same architectures and weights.
pub const TABLES: [&str; 5] = [
    "docs/results/nb201/scores.csv",
    "docs/results/nb201/swap/scores.csv",
    "docs/results/nb201/features/scores.csv",
    "docs/results/nb201/vkdnw/scores.csv",
    "docs/results/nb201/trainability/scores.csv",
];

/// index → scorer → value (None where the scorer failed).
pub type Scores = BTreeMap<usize, BTreeMap<String, Option<f64>>>;

/// The committed NB201 score tables joined by architecture index.
pub struct NbScores {
    /// Every scorer column, in the order the tables first name them.
    pub columns: Vec<String>,
    /// The architecture indices in the first (main) table's row order.
    pub order: Vec<usize>,
    pub by_index: Scores,
}

pub fn load_scores(root: &Path) -> Result<NbScores> {
    load_tables(root, &TABLES)
}

pub fn load_tables(root: &Path, tables: &[impl AsRef<str>]) -> Result<NbScores> {
    let mut out = NbScores {
        columns: vec![],
        order: vec![],
        by_index: BTreeMap::new(),
    };
    for (k, t) in tables.iter().enumerate() {
        let t = t.as_ref();
        let path = root.join(t);
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().context("empty table")?.split(',').collect();
        if head.first() != Some(&"index") || head.get(1) != Some(&"arch_str") {
            bail!(
                "{t}: expected index,arch_str,<scorers…>, found {}",
                head.join(",")
            );
        }
        for name in head.iter().skip(2) {
            if !out.columns.iter().any(|c| c == name) {
                out.columns.push(name.to_string());
            }
        }
        for (ln, l) in lines.enumerate() {
            let f: Vec<&str> = l.split(',').collect();
            if l.trim().is_empty() {
                continue;
            }
            // A short line is a row still being written (or torn): not read, rather than
            // taken as "not scored" by the members it lacks.
            if f.len() != head.len() {
                eprintln!(
                    "{t}:{}: {} fields where the header has {}: line skipped",
                    ln + 2,
                    f.len(),
                    head.len()
                );
                continue;
            }
            let index: usize = f[0]
                .parse()
                .with_context(|| format!("{t}:{}: index '{}' is not a number", ln + 2, f[0]))?;
            if k == 0 {
                out.order.push(index);
            }
            let row = out.by_index.entry(index).or_default();
            for (j, name) in head.iter().enumerate().skip(2) {
                // The first table to hold a scorer wins (a later run repeats some as a check).
                row.entry(name.to_string())
                    .or_insert_with(|| f.get(j).and_then(|v| v.parse::<f64>().ok()));
            }
        }
    }
    Ok(out)
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let members: Vec<String> = o
        .members
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let tables: Vec<String> = o
        .tables
        .clone()
        .unwrap_or_else(|| TABLES.map(String::from).to_vec());
    let scores = load_tables(root, &tables)?.by_index;
    let acc: BTreeMap<usize, [f64; 3]> = load_archs(root)?
        .into_iter()
        .map(|a| (a.index, a.acc))
        .collect();
    for m in &members {
        if !scores.values().any(|r| r.contains_key(m)) {
            bail!(
                "no NB201 score table has a '{m}' column (tables: {})",
                tables.join(", ")
            );
        }
    }
    // The architectures every member scored: the ensemble and every row below use exactly these.
    let idx: Vec<usize> = scores
        .iter()
        .filter(|(i, r)| {
            acc.contains_key(i)
                && members
                    .iter()
                    .all(|m| r.get(m).copied().flatten().is_some_and(f64::is_finite))
        })
        .map(|(&i, _)| i)
        .collect();
    let column = |m: &str| -> Vec<Option<f64>> {
        idx.iter()
            .map(|i| scores[i].get(m).copied().flatten())
            .collect()
    };
    let ensemble_of = |ms: &[String]| -> Result<Vec<f64>> {
        let cols: Vec<Vec<Option<f64>>> = ms.iter().map(|m| column(m)).collect();
        log_rank_sum(ms, &cols)?
            .into_iter()
            .map(|e| match e {
                EnsembleScore::Score(s) => Ok(s),
                EnsembleScore::Missing(why) => bail!("{why}"),
            })
            .collect()
    };
    let datasets = ["CIFAR-10", "CIFAR-100", "ImageNet16-120"];
    let mut rows: Vec<(String, Vec<f64>)> = vec![(
        format!("ensemble ({})", members.join(", ")),
        ensemble_of(&members)?,
    )];
    if members.len() > 1 {
        for k in 0..members.len() {
            let rest: Vec<String> = members
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != k)
                .map(|(_, m)| m.clone())
                .collect();
            rows.push((
                format!("ensemble without {}", members[k]),
                ensemble_of(&rest)?,
            ));
        }
    }
    for m in &members {
        rows.push((
            m.clone(),
            column(m)
                .into_iter()
                .map(|v| v.unwrap_or(f64::NAN))
                .collect(),
        ));
    }
    let mut md = format!(
        "# The `ensemble` ranking on NAS-Bench-201\n\n\
         {} {} (those every member \
         scored), N = 64 shipped CIFAR-10 probe, per-sample BatchNorm, f32. Ensemble: \
         Σ_members ln(rank / M) over these M architectures ([semantics.md]({}#ensemble)), \
         members `{}`, {}. τ-b and \
         Spearman ρ against 200-epoch test accuracy; [lo, hi] = bootstrap 95 % interval of τ-b \
         ({} resamples of the architectures, seed {}). Every number is recomputed from the \
         score tables ({}) by `cargo xtask ensemble{}{} --reps {} --seed {}`.\n\n\
         | ranking |",
        idx.len(),
        if o.tables.is_some() {
            "architectures of the score tables named below"
        } else {
            "of the 1,000 sampled architectures of [report.md](report.md)"
        },
        docs_link(root, &o.out, "semantics.md"),
        members.join(","),
        o.provenance
            .as_deref()
            .unwrap_or("chosen before these tables were read and not fitted to them"),
        o.reps,
        o.seed,
        tables
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", "),
        if o.members == default_members() {
            String::new()
        } else {
            format!(" --members {}", o.members)
        },
        o.tables
            .as_ref()
            .map_or(String::new(), |t| format!(" --tables {}", t.join(","))),
        o.reps,
        o.seed
    );
    for d in datasets {
        md += &format!(" τ-b {d} [95 % CI] | ρ {d} |");
    }
    md += "\n|---|";
    md += &"---|---|".repeat(datasets.len());
    md += "\n";
    for (name, s) in &rows {
        md += &format!("| {name} |");
        for (d, _) in datasets.iter().enumerate() {
            let a: Vec<f64> = idx.iter().map(|i| acc[i][d]).collect();
            let t = tau_ci(s, &a, o.reps, o.seed.wrapping_add(d as u64));
            let r = spearman(s, &a);
            md += &match t {
                Some((t, lo, hi)) => format!(" {t:.3} [{lo:.3}, {hi:.3}] |"),
                None => " — |".into(),
            };
            md += &r.map_or(" — |".into(), |r| format!(" {r:.3} |"));
        }
        md += "\n";
    }
    std::fs::write(&o.out, &md).with_context(|| o.out.display().to_string())?;
    println!("{md}");
    Ok(())
}

/// A relative link from the report at `out` to `docs/<file>` (reports are written at several
/// depths under docs/results/).
fn docs_link(root: &Path, out: &Path, file: &str) -> String {
    let docs = root.join("docs");
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = out.parent().map(abs).unwrap_or_default();
    match dir.strip_prefix(abs(&docs)) {
        Ok(rel) => format!("{}{file}", "../".repeat(rel.components().count())),
        Err(_) => docs.join(file).display().to_string(),
    }
}

pub fn default_members() -> String {
    DEFAULT_MEMBERS.to_string()
}

//! `cargo xtask ensemble-tune`: choose the `ensemble`'s members on NAS-Bench-101 and test them on
//! NAS-Bench-201, so that no member choice ever reads NB201's accuracies.
//!
//! Greedy forward selection: start empty, and at each step add the candidate scorer whose
//! log-rank-sum ensemble has the highest Kendall τ-b with NB101 test accuracy on the committed
//! NB101 cells; stop when no candidate raises τ by at least `--min-gain`, or at `--max-members`.
//! Candidates are the scorers both benchmarks' committed tables hold. The chosen set is then
//! handed, unchanged, to `cargo xtask ensemble` on the NB201 tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gradalign::results::ensemble::{log_rank_sum, EnsembleScore};
use gradalign::tools::stats::kendall_tau_b;

use crate::ensemble;

pub struct Options {
    /// Comma-separated candidate scorers; empty = every scorer both benchmarks hold.
    pub candidates: String,
    pub max_members: usize,
    pub min_gain: f64,
    pub reps: usize,
    pub seed: u64,
    /// The NB101 selection record (markdown).
    pub out: PathBuf,
    /// The NB201 evaluation of the chosen set (markdown, written by `ensemble`).
    pub nb201_out: PathBuf,
}

fn ensemble_tau(members: &[String], cols: &BTreeMap<String, Vec<f64>>, acc: &[f64]) -> Result<f64> {
    let m: Vec<Vec<Option<f64>>> = members
        .iter()
        .map(|s| cols[s].iter().map(|&v| Some(v)).collect())
        .collect();
    let s: Vec<f64> = log_rank_sum(members, &m)?
        .into_iter()
        .map(|e| match e {
            EnsembleScore::Score(s) => s,
            EnsembleScore::Missing(_) => f64::NAN,
        })
        .collect();
    kendall_tau_b(&s, acc).context("τ undefined: constant scores")
}

/// One step's trials: (members after the step, every candidate with its ensemble's τ, best first).
type Step = (usize, Vec<(String, f64)>);

/// Greedy forward selection: the chosen members, their ensemble's τ, and every step's trials.
fn greedy(
    candidates: &[String],
    cols: &BTreeMap<String, Vec<f64>>,
    acc: &[f64],
    max_members: usize,
    min_gain: f64,
) -> Result<(Vec<String>, f64, Vec<Step>)> {
    let mut chosen: Vec<String> = vec![];
    let mut best = f64::NEG_INFINITY;
    let mut steps: Vec<Step> = vec![];
    while chosen.len() < max_members {
        let mut trials: Vec<(String, f64)> = vec![];
        for c in candidates.iter().filter(|c| !chosen.contains(c)) {
            let mut m = chosen.clone();
            m.push(c.clone());
            trials.push((c.clone(), ensemble_tau(&m, cols, acc)?));
        }
        if trials.is_empty() {
            break;
        }
        trials.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (top, t) = trials[0].clone();
        let gain = t - best;
        steps.push((chosen.len() + 1, trials));
        if !chosen.is_empty() && gain < min_gain {
            break;
        }
        chosen.push(top);
        best = t;
    }
    Ok((chosen, best, steps))
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let nb101 = crate::nb101::load_scores(root)?.with_context(|| {
        format!(
            "no NB101 score table ({}): run cargo xtask bench nb101 first",
            crate::nb101::SCORE_TABLES[0]
        )
    })?;
    let nb201 = ensemble::load_scores(root)?;
    let candidates: Vec<String> = if o.candidates.trim().is_empty() {
        nb101
            .columns
            .iter()
            .filter(|c| nb201.columns.contains(c))
            .cloned()
            .collect()
    } else {
        o.candidates
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    for c in &candidates {
        if !nb101.columns.contains(c) || !nb201.columns.contains(c) {
            bail!("candidate '{c}' is not in both the NB101 and the NB201 committed tables");
        }
    }
    if candidates.is_empty() {
        bail!("no scorer is in both the NB101 and the NB201 committed tables");
    }
    // One fixed set of cells for every step: those every candidate scored, with test accuracy.
    let cells: Vec<&String> = nb101
        .order
        .iter()
        .filter(|h| {
            nb101.acc[*h].1.is_some() && candidates.iter().all(|c| nb101.scores[*h].contains_key(c))
        })
        .collect();
    if cells.len() < 30 {
        bail!(
            "only {} NB101 cells hold every candidate: too few to choose members on",
            cells.len()
        );
    }
    let acc: Vec<f64> = cells.iter().filter_map(|h| nb101.acc[*h].1).collect();
    let cols: BTreeMap<String, Vec<f64>> = candidates
        .iter()
        .map(|c| {
            (
                c.clone(),
                cells.iter().map(|h| nb101.scores[*h][c]).collect(),
            )
        })
        .collect();

    let (chosen, best, steps) = greedy(&candidates, &cols, &acc, o.max_members, o.min_gain)?;

    let mut md = format!(
        "# Choosing the ensemble's members on NAS-Bench-101\n\n\
         Greedy forward selection on {} NB101 cells (the committed `bench nb101` cells that every \
         candidate scored; tables {}): at each step, add the candidate whose log-rank-sum \
         ensemble has the highest Kendall τ-b with 108-epoch **test** accuracy; stop when the best \
         addition gains less than {} or at {} members. NAS-Bench-201's accuracies are not read \
         here. Recomputed by `cargo xtask ensemble-tune --max-members {} --min-gain {} --reps {} \
         --seed {}`{}.\n\n\
         **Chosen: `{}`** (NB101 τ-b {:.3}). Its test on NB201: [nb201/ensemble-tuned.md](nb201/ensemble-tuned.md).\n\n\
         | step | best addition (τ-b of the ensemble with it) | runner-up | third |\n|---|---|---|---|\n",
        cells.len(),
        crate::nb101::SCORE_TABLES
            .iter()
            .filter(|t| root.join(t).exists())
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", "),
        o.min_gain,
        o.max_members,
        o.max_members,
        o.min_gain,
        o.reps,
        o.seed,
        if o.candidates.trim().is_empty() {
            String::new()
        } else {
            format!(" --candidates {}", o.candidates)
        },
        chosen.join(","),
        best,
    );
    for (k, trials) in &steps {
        let cell = |i: usize| {
            trials
                .get(i)
                .map(|(c, t)| format!("{c} ({t:.3})"))
                .unwrap_or_else(|| "—".into())
        };
        md += &format!("| {k} | {} | {} | {} |\n", cell(0), cell(1), cell(2));
    }
    md += "\nEach candidate alone on these cells (τ-b with test accuracy):\n\n| scorer | τ-b |\n|---|---|\n";
    let mut alone: Vec<(String, f64)> = candidates
        .iter()
        .map(|c| (c.clone(), kendall_tau_b(&cols[c], &acc).unwrap_or(f64::NAN)))
        .collect();
    alone.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (c, t) in alone {
        md += &format!("| {c} | {t:.3} |\n");
    }
    std::fs::write(&o.out, &md).with_context(|| o.out.display().to_string())?;
    println!("{md}");
    ensemble::run(
        root,
        &ensemble::Options {
            members: chosen.join(","),
            reps: o.reps,
            seed: o.seed,
            out: o.nb201_out.clone(),
            provenance: Some(format!(
                "chosen on NAS-Bench-101 by greedy forward selection ([../ensemble-tune.md](../ensemble-tune.md), \
                 {} cells), never on these tables",
                cells.len()
            )),
            tables: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_best_member_then_stops_when_nothing_helps() {
        // 'perfect' ranks exactly like the accuracy; 'noise' is unrelated; 'reversed' is its
        // opposite. The first step must take 'perfect' (τ = 1) and the second gain nothing.
        let acc: Vec<f64> = (0..40).map(f64::from).collect();
        let noise: Vec<f64> = (0..40).map(|i| ((i * 17) % 40) as f64).collect();
        let cols: BTreeMap<String, Vec<f64>> = [
            ("noise".to_string(), noise),
            ("perfect".to_string(), acc.clone()),
            ("reversed".to_string(), acc.iter().map(|v| -v).collect()),
        ]
        .into_iter()
        .collect();
        let names: Vec<String> = cols.keys().cloned().collect();
        let (chosen, tau, steps) = greedy(&names, &cols, &acc, 3, 0.005).unwrap();
        assert_eq!(chosen, vec!["perfect".to_string()]);
        assert!((tau - 1.0).abs() < 1e-12);
        assert_eq!(steps.len(), 2, "one step taken, one tried and refused");
        assert_eq!(steps[0].1[0].0, "perfect");
        assert!(
            steps[0].1[2].1 < -0.99,
            "reversed ranks last: {:?}",
            steps[0].1
        );
        // With no floor on the gain it keeps adding up to the cap.
        let (all, _, _) = greedy(&names, &cols, &acc, 3, f64::NEG_INFINITY).unwrap();
        assert_eq!(all.len(), 3);
    }
}

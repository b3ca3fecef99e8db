//! `cargo xtask select`: top-architecture selection (NASWOT's protocol) from the committed score
//! tables. Draw K scored architectures at random, keep the one each scorer ranks first, record
//! its accuracy; repeat; report mean ± std per scorer beside a random choice from the same draw
//! and the best architecture in it. Nothing is scored here: every number comes from
//! the NB201 score tables `cargo xtask ensemble` joins (accuracies from data/nb201_accuracies.csv) and
//! the NB101 score tables `bench nb101` writes (accuracies in their own columns).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::nb201::{load_archs, sample};

pub struct Options {
    pub reps: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// One benchmark's scored architectures: per scorer a score per row, and per dataset an accuracy
/// per row (`None` where unknown).
struct Table {
    scorers: Vec<String>,
    scores: Vec<Vec<Option<f64>>>,
    datasets: Vec<(String, Vec<Option<f64>>)>,
}

/// Every committed NB201 score table (the main run and the later runs of added scorers on the
/// same architectures), rows in the main table's order.
fn nb201_table(root: &Path) -> Result<Table> {
    let joined = crate::ensemble::load_scores(root)?;
    let acc: HashMap<usize, [f64; 3]> = load_archs(root)?
        .into_iter()
        .map(|a| (a.index, a.acc))
        .collect();
    let mut scores = vec![vec![]; joined.columns.len()];
    let mut datasets: Vec<(String, Vec<Option<f64>>)> = ["CIFAR-10", "CIFAR-100", "ImageNet16-120"]
        .iter()
        .map(|d| (d.to_string(), vec![]))
        .collect();
    for i in &joined.order {
        let a = acc
            .get(i)
            .with_context(|| format!("index {i} not in data/nb201_accuracies.csv"))?;
        let row = &joined.by_index[i];
        for (s, name) in scores.iter_mut().zip(&joined.columns) {
            s.push(row.get(name).copied().flatten().filter(|x| x.is_finite()));
        }
        for (d, (_, v)) in datasets.iter_mut().enumerate() {
            v.push(Some(a[d]));
        }
    }
    Ok(Table {
        scorers: joined.columns,
        scores,
        datasets,
    })
}

fn nb101_table(root: &Path) -> Result<Option<Table>> {
    let Some(nb) = crate::nb101::load_scores(root)? else {
        return Ok(None);
    };
    let scores = nb
        .columns
        .iter()
        .map(|c| {
            nb.order
                .iter()
                .map(|h| nb.scores[h].get(c).copied())
                .collect()
        })
        .collect();
    let datasets = vec![
        (
            "validation".to_string(),
            nb.order.iter().map(|h| nb.acc[h].0).collect(),
        ),
        (
            "test".to_string(),
            nb.order.iter().map(|h| nb.acc[h].1).collect(),
        ),
    ];
    Ok(Some(Table {
        scorers: nb.columns,
        scores,
        datasets,
    }))
}

struct Stat {
    mean: f64,
    std: f64,
}

fn stat(v: &[f64]) -> Stat {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Stat {
        mean,
        std: var.sqrt(),
    }
}

/// Selection results for one dataset: rows "random", "best in draw", then each scorer; one
/// column per K. Draws come from the rows with a known accuracy.
fn select(
    t: &Table,
    acc: &[Option<f64>],
    ks: &[usize],
    reps: usize,
    seed: u64,
) -> (Vec<String>, Vec<Vec<Option<Stat>>>) {
    let known: Vec<usize> = (0..acc.len()).filter(|&i| acc[i].is_some()).collect();
    let mut names = vec!["random choice".to_string(), "best in the draw".to_string()];
    names.extend(t.scorers.iter().cloned());
    let mut cols = vec![];
    for &k in ks {
        if k > known.len() {
            cols.push((0..names.len()).map(|_| None).collect());
            continue;
        }
        let mut picked: Vec<Vec<f64>> = vec![vec![]; names.len()];
        for r in 0..reps {
            let draw: Vec<usize> = sample(
                known.len(),
                k,
                seed.wrapping_add(r as u64 * 7919 + k as u64),
            )
            .into_iter()
            .map(|i| known[i])
            .collect();
            let a = |i: usize| acc[i].unwrap();
            picked[0].push(a(draw[0]));
            picked[1].push(draw.iter().map(|&i| a(i)).fold(f64::MIN, f64::max));
            for (j, s) in t.scores.iter().enumerate() {
                // The scorer's first choice; ties go to the earliest drawn.
                let mut best: Option<(f64, usize)> = None;
                for &i in &draw {
                    if let Some(v) = s[i] {
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, i));
                        }
                    }
                }
                if let Some((_, i)) = best {
                    picked[2 + j].push(a(i));
                }
            }
        }
        cols.push(
            picked
                .iter()
                .map(|v| (v.len() == reps).then(|| stat(v)))
                .collect(),
        );
    }
    (names, cols)
}

fn section(md: &mut String, title: &str, t: &Table, ks: &[usize], o: &Options) {
    for (dataset, acc) in &t.datasets {
        let n = acc.iter().filter(|a| a.is_some()).count();
        *md +=
            &format!("\n### {title}, {dataset} ({n} scored architectures with this accuracy)\n\n");
        let head: Vec<String> = ks
            .iter()
            .map(|&k| {
                if k == n {
                    format!("K = {k} (all)")
                } else {
                    format!("K = {k}")
                }
            })
            .collect();
        *md += &format!(
            "| selected by | {} |\n|---|{}\n",
            head.join(" | "),
            "---|".repeat(ks.len())
        );
        let (names, cols) = select(t, acc, ks, o.reps, o.seed);
        for (j, name) in names.iter().enumerate() {
            let cells: Vec<String> = cols
                .iter()
                .map(|c| match &c[j] {
                    Some(s) => format!("{:.2} ± {:.2}", s.mean, s.std),
                    None => "—".into(),
                })
                .collect();
            *md += &format!("| {name} | {} |\n", cells.join(" | "));
        }
    }
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let ks = [10, 100, 1000];
    let mut md = format!(
        "# Top-architecture selection\n\n\
         NASWOT's protocol: draw K architectures at random from the scored ones, keep the one each \
         scorer ranks first, record its accuracy (%); {} draws per K, mean ± std. Beside the \
         scorers: a random choice from the same draw, and the best architecture in it (the \
         ceiling). Computed from the committed score tables by `cargo xtask select --reps {} \
         --seed {}`; no architecture is scored here.\n\n\
         The tables cover the architectures scored so far, not the whole search spaces: NB201's \
         is the 1,000-architecture seeded sample of `docs/results/nb201/`, so K = 1000 there is \
         the whole sample (every draw holds the same architectures; only the random choice and \
         ties vary); NB101's is what `docs/results/nb101/scores.csv` \
         holds. A draw is made only from architectures whose accuracy is known for that column.\n",
        o.reps, o.reps, o.seed
    );
    md += "\n## NAS-Bench-201 (200-epoch test accuracy)\n";
    section(&mut md, "NB201", &nb201_table(root)?, &ks, o);
    md += "\n## NAS-Bench-101 (108-epoch accuracy)\n";
    match nb101_table(root)? {
        Some(t) => section(&mut md, "NB101", &t, &ks, o),
        None => md += "\nNo NB101 scores committed yet (`cargo xtask bench nb101`).\n",
    }
    std::fs::write(&o.out, &md).with_context(|| o.out.display().to_string())?;
    println!("{md}");
    Ok(())
}

//! `rank --ensemble` and `merge --ensemble`: the ensemble ranking over a finished results file
//! (docs/semantics.md, Ensemble), written beside it as `<results>.ensemble.csv`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gradalign::results::ensemble::{average_ranks, log_rank_sum, EnsembleScore};
use gradalign::results::rank::{csv_field, fmt_score, split_csv};

/// The member names of an `--ensemble` value (comma-separated, duplicates dropped).
pub fn members(spec: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = vec![];
    for m in spec.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        if m == "ensemble" {
            bail!("--ensemble {spec}: an ensemble cannot be its own member");
        }
        if !out.iter().any(|o| o == m) {
            out.push(m.to_string());
        }
    }
    if out.is_empty() {
        bail!("--ensemble '{spec}': name at least one member scorer, e.g. --ensemble gradalign-i,swap");
    }
    Ok(out)
}

/// The `--scorer` list with every member appended that it does not already name.
pub fn with_members(scorers: &str, members: &[String]) -> String {
    let mut all: Vec<&str> = scorers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for m in members {
        if !all.contains(&m.as_str()) {
            all.push(m);
        }
    }
    all.join(",")
}

/// Where the ensemble of results file `out` goes: `results.csv` → `results.ensemble.csv`.
pub fn path_for(out: &Path) -> PathBuf {
    out.with_extension("ensemble.csv")
}

/// Computes the ensemble over every model in the results file `out` and writes it (whole, then
/// renamed into place): model, ensemble score, each member's rank, and why a model has no score.
/// Returns the file written and each model's result.
pub fn write(out: &Path, members: &[String]) -> Result<(PathBuf, HashMap<String, EnsembleScore>)> {
    let text =
        std::fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    let mut lines = text.lines();
    let head = split_csv(lines.next().unwrap_or_default());
    let cols = members
        .iter()
        .map(|m| {
            head.iter().position(|h| h == m).with_context(|| {
                format!(
                    "{}: no column '{m}' for the ensemble (its columns: {}); score the models \
                     with --scorer including {m}",
                    out.display(),
                    head.join(",")
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rows: Vec<Vec<String>> = lines.map(split_csv).collect();
    let values: Vec<Vec<Option<f64>>> = cols
        .iter()
        .map(|&c| {
            rows.iter()
                .map(|r| r.get(c).and_then(|v| v.parse::<f64>().ok()))
                .collect()
        })
        .collect();
    let scores = log_rank_sum(members, &values)?;
    // Members' ranks among the models the ensemble ranks (so a reader can see who objected).
    let complete: Vec<usize> = (0..rows.len())
        .filter(|&i| matches!(scores[i], EnsembleScore::Score(_)))
        .collect();
    let ranks: Vec<Vec<f64>> = values
        .iter()
        .map(|v| {
            average_ranks(
                &complete
                    .iter()
                    .map(|&i| v[i].unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut csv = String::from("model,ensemble");
    for m in members {
        csv += &format!(",{}", csv_field(&format!("rank:{m}")));
    }
    csv += ",note\n";
    let mut by_model = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let model = r.first().cloned().unwrap_or_default();
        let (score, note) = match &scores[i] {
            EnsembleScore::Score(s) => (Some(*s), String::new()),
            EnsembleScore::Missing(why) => (None, why.clone()),
        };
        csv += &format!("{},{}", csv_field(&model), fmt_score(score));
        let k = complete.iter().position(|&j| j == i);
        for rk in &ranks {
            csv += &format!(",{}", k.map(|k| rk[k].to_string()).unwrap_or_default());
        }
        csv += &format!(",{}\n", csv_field(&note));
        by_model.insert(model, scores[i].clone());
    }
    let path = path_for(out);
    let tmp = path.with_extension("csv.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(csv.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    let missing = scores
        .iter()
        .filter(|s| matches!(s, EnsembleScore::Missing(_)))
        .count();
    if missing > 0 {
        eprintln!(
            "warning: {missing} model(s) have no ensemble score (a member failed on them; the \
             note column of {} says which)",
            path.display()
        );
    }
    Ok((path, by_model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_scorer_lists() {
        assert_eq!(members("a, b,a").unwrap(), vec!["a", "b"]);
        assert!(members(" , ").is_err());
        assert!(members("a,ensemble").is_err());
        let m = members("gradalign-i,swap").unwrap();
        assert_eq!(
            with_members("gradalign-i,gradsign", &m),
            "gradalign-i,gradsign,swap"
        );
        assert_eq!(
            path_for(Path::new("out/results.csv")),
            Path::new("out/results.ensemble.csv")
        );
    }
}

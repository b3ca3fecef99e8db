//! The `ensemble` ranking: several scorers' opinions of a set of models combined into one, by
//! AZ-NAS's non-linear rank aggregation (Lee & Ham, CVPR 2024): every member ranks the models
//! (1 = worst, ties averaged), and a model's ensemble score is Σ_members ln(rank / M) over the M
//! models. The logarithm punishes a model that any member places near the bottom far more than
//! it rewards a top place, so the ensemble prefers models no member objects to.
//!
//! It is a property of a *set* of models, not of one, so it is computed from a results file
//! after the models are scored (`rank --ensemble`, `merge --ensemble`), never per model.

use anyhow::{bail, Result};

/// The default members: GradAlign's two readings of per-sample gradient agreement (how well a
/// network will train) plus the two cheapest signals that measure something else — SWAP, the
/// diversity of the activation patterns (expressivity, one forward pass), and FLOPs (capacity,
/// free). Chosen from that division of labour (AZ-NAS's trainability / expressivity /
/// complexity), not by fitting any benchmark's accuracies.
pub const DEFAULT_MEMBERS: &str = "gradalign-i,gradalign-ii,swap,flops";

/// Ranks 1..n, ties get their average rank.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j < n && x[idx[j]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        for &k in &idx[i..j] {
            r[k] = avg;
        }
        i = j;
    }
    r
}

/// One model's ensemble result: the score, or why it has none.
#[derive(Clone, Debug, PartialEq)]
pub enum EnsembleScore {
    Score(f64),
    /// A member has no value for this model (it failed there); the model is left out of the
    /// ranking rather than given a made-up rank.
    Missing(String),
}

/// `members[m][i]`: member m's score of model i (None where it failed). Models where every
/// member has a value are ranked among themselves; the rest are `Missing`, naming the first
/// member without a value.
pub fn log_rank_sum(names: &[String], members: &[Vec<Option<f64>>]) -> Result<Vec<EnsembleScore>> {
    if members.is_empty() {
        bail!("an ensemble needs at least one member scorer");
    }
    let n = members[0].len();
    if members.iter().any(|m| m.len() != n) {
        bail!("ensemble members have different numbers of models");
    }
    let complete: Vec<usize> = (0..n)
        .filter(|&i| members.iter().all(|m| m[i].is_some_and(f64::is_finite)))
        .collect();
    let mut out: Vec<EnsembleScore> = (0..n)
        .map(|i| {
            let (k, _) = members
                .iter()
                .enumerate()
                .find(|(_, m)| !m[i].is_some_and(f64::is_finite))
                .unwrap_or((0, &members[0]));
            EnsembleScore::Missing(format!("member {} has no value", names[k]))
        })
        .collect();
    let total = complete.len() as f64;
    let mut sum = vec![0.0f64; complete.len()];
    for m in members {
        let vals: Vec<f64> = complete.iter().map(|&i| m[i].unwrap_or(f64::NAN)).collect();
        for (s, r) in sum.iter_mut().zip(average_ranks(&vals)) {
            *s += (r / total).ln();
        }
    }
    for (&i, s) in complete.iter().zip(sum) {
        out[i] = EnsembleScore::Score(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn average_ranks_share_ties() {
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
    }

    #[test]
    fn log_rank_sum_by_hand() {
        // Three models. m0 ranks them 1,2,3; m1 ranks them 3,1,2 (scores 9, 1, 5).
        let m0 = vec![Some(0.1), Some(0.2), Some(0.3)];
        let m1 = vec![Some(9.0), Some(1.0), Some(5.0)];
        let got = log_rank_sum(&names(2), &[m0, m1]).unwrap();
        let l = |a: f64, b: f64| (a / 3.0).ln() + (b / 3.0).ln();
        assert_eq!(
            got,
            vec![
                EnsembleScore::Score(l(1.0, 3.0)),
                EnsembleScore::Score(l(2.0, 1.0)),
                EnsembleScore::Score(l(3.0, 2.0)),
            ]
        );
        // Model 2 (ranks 3 and 2) wins; model 1 (2 and 1) loses to model 0 (1 and 3) under
        // the rank *sum* but not under the log: ln(1/3)+ln(3/3) = -1.10 > ln(2/3)+ln(1/3) = -1.50.
        let s: Vec<f64> = got
            .iter()
            .map(|e| match e {
                EnsembleScore::Score(v) => *v,
                _ => unreachable!(),
            })
            .collect();
        assert!(s[2] > s[0] && s[0] > s[1]);
    }

    #[test]
    fn a_model_with_a_failed_member_is_left_out_and_named() {
        let m0 = vec![Some(1.0), Some(2.0), Some(3.0)];
        let m1 = vec![Some(1.0), None, Some(f64::NAN)];
        let got = log_rank_sum(&names(2), &[m0, m1]).unwrap();
        // Only model 0 is complete: ranked 1 of 1 by both, ln(1) + ln(1) = 0.
        assert_eq!(got[0], EnsembleScore::Score(0.0));
        assert_eq!(
            got[1],
            EnsembleScore::Missing("member m1 has no value".into())
        );
        assert_eq!(
            got[2],
            EnsembleScore::Missing("member m1 has no value".into())
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(log_rank_sum(&[], &[]).is_err());
        assert!(log_rank_sum(&names(2), &[vec![Some(1.0)], vec![]]).is_err());
    }
}

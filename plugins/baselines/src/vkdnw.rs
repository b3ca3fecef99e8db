//! VKDNW (Tybl & Neumann, CVPR 2025, ondratybl/VKDNW `compute_vkdnw_score.py`): the spread of
//! the empirical Fisher information's spectrum, taken over one weight of every parameter tensor.
//!
//! Per sample i with logits z_i (eval-mode BatchNorm): p = softmax(z_i)(1 − α) + α/C with
//! α = 0.05; L_i is the lower-triangular factor the authors build from p (Theorem 1 of
//! Tanabe & Sagae 1992, so that L Lᵀ = diag(p) − p pᵀ); A_i = L_i J_i with J_i the C × T
//! Jacobian of the logits with respect to element 0 of each of the T tensors;
//! F = mean_i A_iᵀ A_i. The nine deciles λ_k of F's singular values (torch.quantile, linear)
//! are normalised to sum 1 and the score is their entropy −Σ λ̃_k log(λ̃_k + 1e-10).
//! `vkdnw` ranks as the paper's VKDNW_single: by the number of parameter tensors first, then by
//! the entropy (entropy ≤ ln 9 < 3, so `T + entropy / 3` orders exactly as the pair).

use gradalign_plugin_api::linalg::symmetric_eigenvalues_ql;
use gradalign_plugin_api::LogitJacobian;

/// The authors' label smoothing of the probabilities before the covariance factor.
pub const ALPHA: f64 = 0.05;

/// The lower-triangular L with L Lᵀ = diag(p) − p pᵀ, row-major C × C, as the authors build it.
pub fn covariance_factor(p: &[f64]) -> Vec<f64> {
    let c = p.len();
    let mut q = vec![0.0; c];
    let mut acc = 0.0;
    for j in 0..c {
        acc += p[j];
        q[j] = 1.0 - acc;
    }
    if c > 0 {
        q[c - 1] = 0.0;
    }
    let mut l = vec![0.0; c * c];
    for j in 0..c {
        let q_shift = if j == 0 { 1.0 } else { q[j - 1] };
        let d = (p[j] * q[j] / q_shift).sqrt();
        let d = if d.is_finite() { d } else { 0.0 };
        l[j * c + j] = d;
        for i in j + 1..c {
            // −p_i / q_j; the authors zero the −∞ of q_j = 0 (their nan_to_num).
            let v = -p[i] / q[j];
            l[i * c + j] = if v.is_finite() { v * d } else { 0.0 };
        }
    }
    l
}

fn smoothed_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let c = z.len() as f64;
    e.iter()
        .map(|v| v / s * (1.0 - ALPHA) + ALPHA / c)
        .collect()
}

/// F = mean_i (L_i J_i)ᵀ (L_i J_i), T × T row-major.
pub fn fisher(j: &LogitJacobian) -> Vec<f64> {
    let (c, t) = (j.classes, j.tensors);
    let mut f = vec![0.0; t * t];
    let mut a = vec![0.0; c * t];
    for i in 0..j.samples {
        let l = covariance_factor(&smoothed_softmax(j.logits.row(i)));
        let ji = j.sample(i);
        a.iter_mut().for_each(|v| *v = 0.0);
        for r in 0..c {
            for k in 0..=r {
                let w = l[r * c + k];
                if w != 0.0 {
                    let src = ji.row(k);
                    for (dst, s) in a[r * t..(r + 1) * t].iter_mut().zip(src) {
                        *dst += w * s;
                    }
                }
            }
        }
        for r in 0..c {
            let row = &a[r * t..(r + 1) * t];
            for u in 0..t {
                let au = row[u];
                if au == 0.0 {
                    continue;
                }
                for (fv, &av) in f[u * t..(u + 1) * t].iter_mut().zip(row) {
                    *fv += au * av;
                }
            }
        }
    }
    let n = j.samples.max(1) as f64;
    f.iter_mut().for_each(|v| *v /= n);
    f
}

/// torch.quantile's default (linear) of sorted `v` at `q`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The entropy of the normalised deciles of F's singular values.
pub fn entropy(j: &LogitJacobian) -> Result<f64, String> {
    if j.tensors == 0 || j.samples == 0 || j.classes == 0 {
        return Err("no parameter tensors, samples or classes".into());
    }
    let f = fisher(j);
    // F is symmetric positive semi-definite: its singular values are |eigenvalues|.
    let mut s: Vec<f64> = symmetric_eigenvalues_ql(&f, j.tensors)
        .into_iter()
        .map(f64::abs)
        .collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let deciles: Vec<f64> = (1..10).map(|k| quantile(&s, k as f64 / 10.0)).collect();
    let total: f64 = deciles.iter().map(|v| v.abs()).sum::<f64>() + 1e-10;
    let h = -deciles
        .iter()
        .map(|v| {
            let p = v / total;
            p * (p + 1e-10).ln()
        })
        .sum::<f64>();
    if h.is_finite() {
        Ok(h)
    } else {
        Err(format!("the Fisher spectrum's entropy is {h}"))
    }
}

/// VKDNW_single as one number: tensors first, entropy second.
pub fn single(j: &LogitJacobian) -> Result<f64, String> {
    Ok(j.tensors as f64 + entropy(j)? / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covariance_factor_reproduces_the_softmax_covariance() {
        let p = smoothed_softmax(&[0.3, -1.2, 2.0, 0.0, 0.7]);
        let c = p.len();
        let l = covariance_factor(&p);
        for i in 0..c {
            for k in 0..c {
                let llt: f64 = (0..c).map(|j| l[i * c + j] * l[k * c + j]).sum();
                let cov = if i == k { p[i] } else { 0.0 } - p[i] * p[k];
                assert!((llt - cov).abs() < 1e-14, "({i},{k}): {llt} vs {cov}");
            }
        }
    }

    #[test]
    fn fisher_and_entropy_of_a_known_spectrum() {
        // Ten samples, two classes, zero logits (p = ½, ½ survives the smoothing), so
        // L = [[½, 0], [−½, 0]] and sample i adds ½ J_0ᵀ J_0 / N. With J_0 of sample i equal to
        // √(2 N λ_i) e_i, F = diag(λ) with λ = 1 … 10: deciles 1 + 0.9 k, k = 1 … 9.
        let (n, t) = (10, 10);
        let mut data = vec![0.0; n * 2 * t];
        for i in 0..n {
            data[i * 2 * t + i] = (2.0 * n as f64 * (i + 1) as f64).sqrt();
            data[i * 2 * t + t + i] = 7.0; // class 1's row: L's second column is 0
        }
        let logits = vec![0.0; n * 2];
        let j = LogitJacobian {
            data: &data,
            logits: gradalign_plugin_api::Matrix {
                data: &logits,
                rows: n,
                cols: 2,
            },
            samples: n,
            classes: 2,
            tensors: t,
        };
        let f = fisher(&j);
        for u in 0..t {
            for v in 0..t {
                let want = if u == v { (u + 1) as f64 } else { 0.0 };
                assert!(
                    (f[u * t + v] - want).abs() < 1e-12,
                    "F[{u},{v}] = {}",
                    f[u * t + v]
                );
            }
        }
        let deciles: Vec<f64> = (1..10).map(|k| 1.0 + 0.9 * k as f64).collect();
        let total: f64 = deciles.iter().sum::<f64>() + 1e-10;
        let want: f64 = -deciles
            .iter()
            .map(|d| d / total * (d / total + 1e-10).ln())
            .sum::<f64>();
        let h = entropy(&j).unwrap();
        assert!((h - want).abs() < 1e-12, "{h} vs {want}");
        assert!(h < (9f64).ln());
        assert_eq!(single(&j).unwrap(), 10.0 + h / 3.0);
    }
}

//! Small dense f64 linear algebra for the N×N matrices scorers build (N = probe size, ≤ a few
//! hundred). Hand-written rather than a LAPACK binding so the default build needs no system
//! packages (DESIGN §9); each routine is the textbook algorithm, tested below against
//! closed-form values. Matrices are row-major `Vec<f64>` of length n·n.

/// log det(A) of a symmetric positive-definite A by Cholesky; an error names the failing pivot.
pub fn cholesky_logdet(a: &[f64], n: usize) -> Result<f64, String> {
    assert_eq!(a.len(), n * n);
    let mut l = vec![0.0f64; n * n];
    let mut logdet = 0.0;
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(format!(
                "matrix is not positive definite (Cholesky pivot {j} = {d:e})"
            ));
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        logdet += 2.0 * d.ln();
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = s / d;
        }
    }
    Ok(logdet)
}

/// (sign, log|det A|) by LU with partial pivoting; sign 0 and -inf for a singular matrix.
pub fn slogdet(a: &[f64], n: usize) -> (f64, f64) {
    assert_eq!(a.len(), n * n);
    let mut m = a.to_vec();
    let mut sign = 1.0;
    let mut logabs = 0.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&x, &y| m[x * n + c].abs().total_cmp(&m[y * n + c].abs()))
            .unwrap();
        let piv = m[p * n + c];
        if piv == 0.0 {
            return (0.0, f64::NEG_INFINITY);
        }
        if p != c {
            for k in 0..n {
                m.swap(p * n + k, c * n + k);
            }
            sign = -sign;
        }
        if piv < 0.0 {
            sign = -sign;
        }
        logabs += piv.abs().ln();
        for r in c + 1..n {
            let f = m[r * n + c] / piv;
            if f != 0.0 {
                for k in c..n {
                    m[r * n + k] -= f * m[c * n + k];
                }
            }
        }
    }
    (sign, logabs)
}

/// Eigenvalues of a symmetric matrix (ascending) by the cyclic Jacobi method, accurate to
/// working precision relative to ‖A‖ for the small matrices used here.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n);
    let mut m = a.to_vec();
    let off = |m: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    s += m[i * n + j] * m[i * n + j];
                }
            }
        }
        s
    };
    let total: f64 = m.iter().map(|v| v * v).sum();
    for _sweep in 0..100 {
        if off(&m) <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = m[k * n + p];
                    let akq = m[k * n + q];
                    m[k * n + p] = c * akp - s * akq;
                    m[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = m[p * n + k];
                    let aqk = m[q * n + k];
                    m[p * n + k] = c * apk - s * aqk;
                    m[q * n + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut ev: Vec<f64> = (0..n).map(|i| m[i * n + i]).collect();
    ev.sort_by(f64::total_cmp);
    ev
}

/// Pearson correlation matrix of the rows of an r×c matrix (numpy `corrcoef`); a constant row
/// gives NaN entries, as numpy does.
pub fn corrcoef_rows(x: &[f64], r: usize, c: usize) -> Vec<f64> {
    let mut centred = x.to_vec();
    for i in 0..r {
        let row = &mut centred[i * c..(i + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        row.iter_mut().for_each(|v| *v -= mean);
    }
    let mut cov = vec![0.0; r * r];
    for i in 0..r {
        for j in i..r {
            let d: f64 = centred[i * c..(i + 1) * c]
                .iter()
                .zip(&centred[j * c..(j + 1) * c])
                .map(|(a, b)| a * b)
                .sum();
            cov[i * r + j] = d;
            cov[j * r + i] = d;
        }
    }
    let mut out = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            out[i * r + j] = cov[i * r + j] / (cov[i * r + i] * cov[j * r + j]).sqrt();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_logdet_of_known_spd_matrix() {
        // det [[4,2],[2,3]] = 8
        let v = cholesky_logdet(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        assert!((v - 8f64.ln()).abs() < 1e-14);
        let e = cholesky_logdet(&[1.0, 2.0, 2.0, 1.0], 2).unwrap_err();
        assert!(e.contains("pivot 1"), "{e}");
    }

    #[test]
    fn slogdet_handles_sign_and_singularity() {
        let (s, l) = slogdet(&[0.0, 2.0, 3.0, 0.0], 2); // det = -6
        assert_eq!(s, -1.0);
        assert!((l - 6f64.ln()).abs() < 1e-14);
        let (s, l) = slogdet(&[1.0, 2.0, 2.0, 4.0], 2);
        assert_eq!(s, 0.0);
        assert_eq!(l, f64::NEG_INFINITY);
    }

    #[test]
    fn jacobi_eigenvalues_match_closed_form() {
        // [[2,1],[1,2]] → 1, 3; a 3×3 with known spectrum 0, 1, 3 (path-graph Laplacian).
        let ev = symmetric_eigenvalues(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((ev[0] - 1.0).abs() < 1e-13 && (ev[1] - 3.0).abs() < 1e-13);
        let lap = [1.0, -1.0, 0.0, -1.0, 2.0, -1.0, 0.0, -1.0, 1.0];
        let ev = symmetric_eigenvalues(&lap, 3);
        for (a, b) in ev.iter().zip([0.0, 1.0, 3.0]) {
            assert!((a - b).abs() < 1e-12, "{ev:?}");
        }
    }

    #[test]
    fn corrcoef_matches_numpy() {
        // np.corrcoef([[1,2,3],[1,2,4]])[0,1] = 0.9819805060619657
        let c = corrcoef_rows(&[1.0, 2.0, 3.0, 1.0, 2.0, 4.0], 2, 3);
        assert!((c[1] - 0.9819805060619657).abs() < 1e-14);
        assert!((c[0] - 1.0).abs() < 1e-14);
    }
}

//! Baseline formulas (DESIGN §4; zero-cost-nas conventions, batch gradient = Σ per-sample
//! gradients) on plain slices, each tested on hand-computed values.

use gradalign_plugin_api::linalg::{corrcoef_rows, slogdet, symmetric_eigenvalues};
use gradalign_plugin_api::{Matrix, Param};

/// Σ over weight blocks of ‖g_block‖₂.
pub fn grad_norm(params: &[Param], batch_grads: &[f64]) -> f64 {
    params
        .iter()
        .filter(|p| p.is_weight())
        .map(|p| {
            batch_grads[p.columns()]
                .iter()
                .map(|g| g * g)
                .sum::<f64>()
                .sqrt()
        })
        .sum()
}

/// Σ over weights of |w ⊙ g|.
pub fn snip(params: &[Param], values: &[f64], grads: &[f64]) -> f64 {
    params
        .iter()
        .filter(|p| p.is_weight())
        .flat_map(|p| p.columns())
        .map(|j| (values[j] * grads[j]).abs())
        .sum()
}

/// Σ over weights of −w · (H g).
pub fn grasp(params: &[Param], values: &[f64], hg: &[f64]) -> f64 {
    -params
        .iter()
        .filter(|p| p.is_weight())
        .flat_map(|p| p.columns())
        .map(|j| values[j] * hg[j])
        .sum::<f64>()
}

/// Fisher (zero-cost-nas): per layer and output channel k, ½·mean_i (Σ_spatial a·∂L/∂a)², where
/// a is the layer's pre-activation output. Since a = W∗x + b, Σ_spatial a_k·δ_k equals
/// ⟨W_k, ∂L_i/∂W_k⟩ + b_k·∂L_i/∂b_k, so per-sample parameter gradients suffice.
pub fn fisher<T: Copy + Into<f64>>(
    params: &[Param],
    values: &[f64],
    g: Matrix<T>,
) -> Result<f64, String> {
    let mut total = 0.0;
    for w in params.iter().filter(|p| p.is_weight()) {
        let axis = w
            .channel_axis
            .ok_or_else(|| format!("weight '{}' has no known output-channel axis", w.name))?;
        let channels = w.shape[axis];
        let stride: usize = w.shape[axis + 1..].iter().product();
        let bias = params
            .iter()
            .find(|p| p.role == gradalign_plugin_api::abi::role::BIAS && p.node == w.node);
        let mut sq = vec![0.0f64; channels];
        let mut t = vec![0.0f64; channels];
        for i in 0..g.rows {
            t.iter_mut().for_each(|v| *v = 0.0);
            let row = g.row_cols(i, w.offset, w.numel);
            for (j, &gv) in row.iter().enumerate() {
                t[(j / stride) % channels] += values[w.offset + j] * gv.into();
            }
            if let Some(b) = bias {
                if b.numel != channels {
                    return Err(format!("bias '{}' does not match '{}'", b.name, w.name));
                }
                let brow = g.row_cols(i, b.offset, b.numel);
                for k in 0..channels {
                    t[k] += values[b.offset + k] * brow[k].into();
                }
            }
            for k in 0..channels {
                sq[k] += t[k] * t[k];
            }
        }
        total += sq.iter().map(|s| 0.5 * s / g.rows as f64).sum::<f64>();
    }
    Ok(total)
}

/// ZiCo: Σ over weight blocks of log Σ_j mean_i|g_ij| / std_i(g_ij) (population std; columns
/// with zero std skipped, blocks with a zero sum skipped).
pub fn zico<T: Copy + Into<f64>>(params: &[Param], g: Matrix<T>) -> f64 {
    let n = g.rows as f64;
    let mut total = 0.0;
    for w in params.iter().filter(|p| p.is_weight()) {
        let mut sum = vec![0.0f64; w.numel];
        let mut sum_abs = vec![0.0f64; w.numel];
        for i in 0..g.rows {
            for (j, &v) in g.row_cols(i, w.offset, w.numel).iter().enumerate() {
                let v: f64 = v.into();
                sum[j] += v;
                sum_abs[j] += v.abs();
            }
        }
        let mut var = vec![0.0f64; w.numel];
        for i in 0..g.rows {
            for (j, &v) in g.row_cols(i, w.offset, w.numel).iter().enumerate() {
                let d = v.into() - sum[j] / n;
                var[j] += d * d;
            }
        }
        let mut s = 0.0;
        for j in 0..w.numel {
            let std = (var[j] / n).sqrt();
            if std != 0.0 {
                s += (sum_abs[j] / n) / std;
            }
        }
        if s != 0.0 {
            total += s.ln();
        }
    }
    total
}

/// −cond(G Gᵀ) (TE-NAS NTK condition number; lower is better, so negated).
pub fn ntk_cond<T: Copy + Into<f64>>(g: Matrix<T>) -> Result<f64, String> {
    let n = g.rows;
    let mut k = vec![0.0f64; n * n];
    for a in 0..n {
        for b in a..n {
            let d: f64 = g
                .row(a)
                .iter()
                .zip(g.row(b))
                .map(|(&x, &y)| x.into() * y.into())
                .sum();
            k[a * n + b] = d;
            k[b * n + a] = d;
        }
    }
    let ev = symmetric_eigenvalues(&k, n);
    let (lo, hi) = (ev[0], ev[n - 1]);
    if lo <= 0.0 {
        return Err(format!(
            "the NTK is singular (smallest eigenvalue {lo:e}): condition number undefined"
        ));
    }
    Ok(-(hi / lo))
}

/// NASWOT: log|det K|, K = C Cᵀ + (1−C)(1−C)ᵀ over binary ReLU codes (K_ij = units where i, j
/// agree).
pub fn naswot(codes: Matrix<u8>) -> f64 {
    let n = codes.rows;
    let mut k = vec![0.0f64; n * n];
    for a in 0..n {
        for b in a..n {
            let agree = codes
                .row(a)
                .iter()
                .zip(codes.row(b))
                .filter(|(x, y)| x == y)
                .count() as f64;
            k[a * n + b] = agree;
            k[b * n + a] = agree;
        }
    }
    slogdet(&k, n).1
}

/// Linear regions: the number of distinct ReLU activation patterns (rows of the code matrix)
/// over the probe.
pub fn linear_regions(codes: Matrix<u8>) -> f64 {
    if codes.cols == 0 {
        return (codes.rows > 0) as usize as f64;
    }
    let rows: std::collections::HashSet<&[u8]> = codes.data.chunks_exact(codes.cols).collect();
    rows.len() as f64
}

/// Jacobian covariance: −Σ_v (ln(v + 1e-5) + 1/(v + 1e-5)) over the eigenvalues of the
/// correlation matrix of the per-sample input Jacobians.
pub fn jacob_cov(j: Matrix<f64>) -> Result<f64, String> {
    let c = corrcoef_rows(j.data, j.rows, j.cols);
    if c.iter().any(|v| !v.is_finite()) {
        return Err("a per-sample input Jacobian is constant: its correlation is undefined".into());
    }
    let k = 1e-5;
    Ok(-symmetric_eigenvalues(&c, j.rows)
        .iter()
        .map(|v| (v + k).ln() + 1.0 / (v + k))
        .sum::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradalign_plugin_api::abi::role;

    fn param(
        name: &str,
        node: &str,
        role: u32,
        shape: &[usize],
        offset: usize,
        axis: Option<usize>,
    ) -> Param {
        Param {
            name: name.into(),
            node: node.into(),
            op_type: "Gemm".into(),
            role,
            shape: shape.to_vec(),
            channel_axis: axis,
            offset,
            numel: shape.iter().product(),
        }
    }

    // A 2×2 Gemm weight (columns 0..4) and its bias (columns 4..6); two samples.
    fn layer() -> Vec<Param> {
        vec![
            param("w", "fc", role::WEIGHT, &[2, 2], 0, Some(0)),
            param("b", "fc", role::BIAS, &[2], 4, None),
        ]
    }
    const W: [f64; 6] = [1.0, -2.0, 0.5, 3.0, 0.1, -1.0];
    const G: [f64; 12] = [
        1.0, 1.0, -1.0, 2.0, 0.5, 1.0, //
        3.0, -1.0, 0.0, 1.0, -0.5, 2.0,
    ];

    fn gm() -> Matrix<'static, f64> {
        Matrix {
            data: &G,
            rows: 2,
            cols: 6,
        }
    }

    #[test]
    fn grad_norm_snip_grasp_by_hand() {
        let batch = [4.0, 0.0, -1.0, 3.0, 0.0, 3.0];
        assert!((grad_norm(&layer(), &batch) - 26f64.sqrt()).abs() < 1e-14);
        // |1·4| + 0 + |0.5·−1| + |3·3| = 13.5 (bias excluded)
        assert_eq!(snip(&layer(), &W, &batch), 13.5);
        assert_eq!(grasp(&layer(), &W, &batch), -(4.0 - 0.5 + 9.0));
    }

    #[test]
    fn fisher_by_hand() {
        // sample 0: ch0 = 1·1 + (−2)·1 + 0.1·0.5 = −0.95; ch1 = 0.5·(−1) + 3·2 + (−1)·1 = 4.5
        // sample 1: ch0 = 3 + 2 − 0.05 = 4.95;             ch1 = 0 + 3 − 2 = 1
        let want =
            0.5 * (0.95f64.powi(2) + 4.95f64.powi(2)) / 2.0 + 0.5 * (4.5f64.powi(2) + 1.0) / 2.0;
        assert!((fisher(&layer(), &W, gm()).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn zico_by_hand() {
        // weight columns: (1,3) mean|g|=2 std=1 → 2; (1,−1) 1/1 → 1; (−1,0) 0.5/0.5 → 1;
        // (2,1) 1.5/0.5 → 3. Σ = 7 → ln 7.
        assert!((zico(&layer(), gm()) - 7f64.ln()).abs() < 1e-14);
        // an all-zero block contributes nothing
        let z = [0.0f64; 12];
        assert_eq!(
            zico(
                &layer(),
                Matrix {
                    data: &z,
                    rows: 2,
                    cols: 6
                }
            ),
            0.0
        );
    }

    #[test]
    fn ntk_cond_by_hand() {
        // rows (1,0), (1,1): K = [[1,1],[1,2]] → eigenvalues (3 ∓ √5)/2
        let g = [1.0f64, 0.0, 1.0, 1.0];
        let want = -((3.0 + 5f64.sqrt()) / (3.0 - 5f64.sqrt()));
        assert!(
            (ntk_cond(Matrix {
                data: &g,
                rows: 2,
                cols: 2
            })
            .unwrap()
                - want)
                .abs()
                < 1e-10
        );
        let zero_row = [1.0f64, 0.0, 0.0, 0.0];
        assert!(ntk_cond(Matrix {
            data: &zero_row,
            rows: 2,
            cols: 2
        })
        .is_err());
    }

    #[test]
    fn linear_regions_by_hand() {
        let data = [1u8, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1];
        let m = |rows| Matrix {
            data: &data[..rows * 3],
            rows,
            cols: 3,
        };
        assert_eq!(linear_regions(m(4)), 3.0);
        assert_eq!(linear_regions(m(2)), 1.0);
    }

    #[test]
    fn naswot_by_hand() {
        // codes (1,0,1), (1,1,1): agreements [[3,2],[2,3]] → log det = ln 5
        let c = [1u8, 0, 1, 1, 1, 1];
        assert!(
            (naswot(Matrix {
                data: &c,
                rows: 2,
                cols: 3
            }) - 5f64.ln())
            .abs()
                < 1e-14
        );
    }

    #[test]
    fn jacob_cov_by_hand() {
        // rows (1,2,3), (1,2,4): correlation r = 0.98198…, eigenvalues 1 ± r
        let j = [1.0, 2.0, 3.0, 1.0, 2.0, 4.0];
        let r = 0.9819805060619657f64;
        let k = 1e-5;
        let want = -[1.0 - r, 1.0 + r]
            .iter()
            .map(|v| (v + k).ln() + 1.0 / (v + k))
            .sum::<f64>();
        assert!(
            (jacob_cov(Matrix {
                data: &j,
                rows: 2,
                cols: 3
            })
            .unwrap()
                - want)
                .abs()
                < 1e-9
        );
    }
}

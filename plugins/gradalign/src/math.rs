//! The formulas of docs/semantics.md (Scorers) on plain matrices, so each can be tested on hand-computed values.
//! s_i = sign(g_i) elementwise (0 stays 0); classes come from the labels.

use std::collections::BTreeMap;

use gradalign_plugin_api::linalg::cholesky_logdet;
use gradalign_plugin_api::{Matrix, PackedSigns, SignPlanes};

/// Ridge added to every per-class Gram matrix before the log-determinant.
pub const GRAM_EPS: f64 = 1e-6;

#[inline]
pub fn sign(x: f64) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

/// Sample indices per class, in label order.
pub fn classes(labels: &[i64]) -> BTreeMap<i64, Vec<usize>> {
    let mut m: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &y) in labels.iter().enumerate() {
        m.entry(y).or_default().push(i);
    }
    m
}

fn sign_row<T: Copy + Into<f64>>(row: &[T]) -> Vec<i8> {
    row.iter().map(|&v| sign(v.into())).collect()
}

/// GradSign: Σ_k |Σ_i s_ik|.
pub fn gradsign<T: Copy + Into<f64>>(g: Matrix<T>) -> f64 {
    let mut acc = vec![0i32; g.cols];
    for i in 0..g.rows {
        for (a, &v) in acc.iter_mut().zip(g.row(i)) {
            *a += sign(v.into()) as i32;
        }
    }
    acc.iter().map(|&a| a.unsigned_abs() as f64).sum()
}

/// GradAlign-I (`dot`): Σ_c (1/n_c) Σ_{i∈c} ⟨s_i, sign(ḡ_c)⟩, ḡ_c the class-mean raw gradient.
pub fn gradalign_i_dot<T: Copy + Into<f64>>(g: Matrix<T>, labels: &[i64]) -> f64 {
    let mut total = 0.0;
    for idx in classes(labels).values() {
        let mut mean = vec![0.0f64; g.cols];
        for &i in idx {
            for (m, &v) in mean.iter_mut().zip(g.row(i)) {
                *m += v.into();
            }
        }
        let ref_sign: Vec<i8> = mean.iter().map(|&m| sign(m)).collect();
        let mut sum = 0i64;
        for &i in idx {
            sum += g
                .row(i)
                .iter()
                .zip(&ref_sign)
                .map(|(&v, &r)| (sign(v.into()) * r) as i64)
                .sum::<i64>();
        }
        total += sum as f64 / idx.len() as f64;
    }
    total
}

/// GradAlign-I (`cos`): per class, the mean over i of cos(s_i, s̄_c) with s̄_c the class mean of
/// the sign vectors; averaged over classes. A zero vector has cosine 0.
pub fn gradalign_i_cos<T: Copy + Into<f64>>(g: Matrix<T>, labels: &[i64]) -> f64 {
    let cls = classes(labels);
    let mut total = 0.0;
    for idx in cls.values() {
        let signs: Vec<Vec<i8>> = idx.iter().map(|&i| sign_row(g.row(i))).collect();
        let mut mean = vec![0.0f64; g.cols];
        for s in &signs {
            for (m, &v) in mean.iter_mut().zip(s) {
                *m += v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= idx.len() as f64);
        let mean_norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
        let mut acc = 0.0;
        for s in &signs {
            let nnz = s.iter().filter(|&&v| v != 0).count() as f64;
            if nnz == 0.0 || mean_norm == 0.0 {
                continue;
            }
            let dot: f64 = s.iter().zip(&mean).map(|(&a, &b)| a as f64 * b).sum();
            acc += dot / (nnz.sqrt() * mean_norm);
        }
        total += acc / idx.len() as f64;
    }
    total / cls.len().max(1) as f64
}

/// Integer Gram matrix ⟨s_i, s_j⟩ of the given rows' sign vectors.
fn sign_gram<T: Copy + Into<f64>>(g: Matrix<T>, idx: &[usize]) -> Vec<i64> {
    let signs: Vec<Vec<i8>> = idx.iter().map(|&i| sign_row(g.row(i))).collect();
    let n = idx.len();
    let mut k = vec![0i64; n * n];
    for a in 0..n {
        for b in a..n {
            let d: i64 = signs[a]
                .iter()
                .zip(&signs[b])
                .map(|(&x, &y)| (x as i32 * y as i32) as i64)
                .sum();
            k[a * n + b] = d;
            k[b * n + a] = d;
        }
    }
    k
}

/// GradAlign-II: Σ_c log det(K_c + εI), K_c the cosine (`normalise`) or raw Gram matrix of the
/// class's sign vectors; a zero row stays zero. Cholesky in f64.
pub fn gradalign_ii<T: Copy + Into<f64>>(
    g: Matrix<T>,
    labels: &[i64],
    normalise: bool,
) -> Result<f64, String> {
    let mut total = 0.0;
    for (c, idx) in classes(labels) {
        let k = sign_gram(g, &idx);
        total += gram_logdet(&k, idx.len(), normalise).map_err(|e| format!("class {c}: {e}"))?;
    }
    Ok(total)
}

// The scorers' own implementations, on packed signs (what the host supplies, streamed when the
// gradients exceed --max-memory). The matrix functions above define the same quantities
// directly and serve as the reference in the tests below.

/// Gram matrix ⟨s_i, s_j⟩ of the rows `idx` of `s`.
fn packed_gram(s: &SignPlanes, idx: &[usize]) -> Vec<i64> {
    let n = idx.len();
    let mut k = vec![0i64; n * n];
    for a in 0..n {
        for b in a..n {
            let d = s.dot(idx[a], idx[b]);
            k[a * n + b] = d;
            k[b * n + a] = d;
        }
    }
    k
}

/// GradSign on packed signs: Σ_k |p_k − m_k|, p_k and m_k the numbers of rows with a positive
/// and a negative sign in column k. Counted eight columns to a u64 add: a table spreads each
/// byte of a plane word over the eight bytes of a u64 (column 8q + j of a word → byte j of
/// counter q), and byte counters hold up to 255 rows before they are flushed.
pub fn gradsign_packed(s: &SignPlanes) -> f64 {
    let words = s.words;
    let mut pos = vec![0u64; words * 8];
    let mut neg = vec![0u64; words * 8];
    let mut sums = vec![0i64; words * 64];
    for first in (0..s.rows).step_by(255) {
        for i in first..s.rows.min(first + 255) {
            let (p, n) = s.row(i);
            for ((pc, nc), (&pw, &nw)) in pos
                .chunks_exact_mut(8)
                .zip(neg.chunks_exact_mut(8))
                .zip(p.iter().zip(n))
            {
                for q in 0..8 {
                    pc[q] += SPREAD[(pw >> (8 * q)) as usize & 0xff];
                    nc[q] += SPREAD[(nw >> (8 * q)) as usize & 0xff];
                }
            }
        }
        for ((sc, &pc), &nc) in sums.chunks_exact_mut(8).zip(&pos).zip(&neg) {
            for (j, v) in sc.iter_mut().enumerate() {
                *v += ((pc >> (8 * j)) & 0xff) as i64 - ((nc >> (8 * j)) & 0xff) as i64;
            }
        }
        pos.fill(0);
        neg.fill(0);
    }
    sums.iter().map(|&a| a.unsigned_abs() as f64).sum()
}

/// Byte b spread over a u64: bit j of b → bit 0 of byte j.
static SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            if (b >> j) & 1 == 1 {
                t[b] |= 1 << (8 * j);
            }
            j += 1;
        }
        b += 1;
    }
    t
};

/// GradAlign-I (`dot`) on packed signs; `class_means` has one row per class in ascending label
/// order (the sign of that class's mean gradient).
pub fn gradalign_i_dot_packed(s: &SignPlanes, class_means: &SignPlanes, labels: &[i64]) -> f64 {
    let mut total = 0.0;
    for (c, idx) in classes(labels).values().enumerate() {
        let sum: i64 = idx.iter().map(|&i| s.dot_with(i, class_means, c)).sum();
        total += sum as f64 / idx.len() as f64;
    }
    total
}

/// GradAlign-I (`cos`) on packed signs: with K the class's sign Gram matrix,
/// ⟨s_i, s̄_c⟩ = Σ_j K_ij / n_c, ‖s̄_c‖ = √(Σ_jk K_jk) / n_c and nnz(s_i) = K_ii.
pub fn gradalign_i_cos_packed(s: &SignPlanes, labels: &[i64]) -> f64 {
    let cls = classes(labels);
    let mut total = 0.0;
    for idx in cls.values() {
        let n = idx.len();
        let k = packed_gram(s, idx);
        let nc = n as f64;
        let mean_norm = (k.iter().sum::<i64>() as f64).sqrt() / nc;
        let mut acc = 0.0;
        for a in 0..n {
            let nnz = k[a * n + a] as f64;
            if nnz == 0.0 || mean_norm == 0.0 {
                continue;
            }
            let dot = k[a * n..(a + 1) * n].iter().sum::<i64>() as f64 / nc;
            acc += dot / (nnz.sqrt() * mean_norm);
        }
        total += acc / nc;
    }
    total / cls.len().max(1) as f64
}

/// GradAlign-II on packed signs.
pub fn gradalign_ii_packed(s: &SignPlanes, labels: &[i64], normalise: bool) -> Result<f64, String> {
    let mut total = 0.0;
    for (c, idx) in classes(labels) {
        let n = idx.len();
        let k = packed_gram(s, &idx);
        total += gram_logdet(&k, n, normalise).map_err(|e| format!("class {c}: {e}"))?;
    }
    Ok(total)
}

/// log det(K + εI) of a sign Gram matrix, cosine-normalised or raw; a zero row stays zero.
fn gram_logdet(k: &[i64], n: usize, normalise: bool) -> Result<f64, String> {
    let mut kf = vec![0.0f64; n * n];
    for a in 0..n {
        for b in 0..n {
            let v = k[a * n + b] as f64;
            kf[a * n + b] = if normalise {
                let d = ((k[a * n + a] * k[b * n + b]) as f64).sqrt();
                if d == 0.0 {
                    0.0
                } else {
                    v / d
                }
            } else {
                v
            };
        }
        kf[a * n + a] += GRAM_EPS;
    }
    cholesky_logdet(&kf, n)
}

/// Pack `g` and the signs of its class means, as the host does.
pub fn pack<T: Copy + Into<f64>>(g: Matrix<T>, labels: &[i64]) -> (PackedSigns, PackedSigns) {
    let all = PackedSigns::from_matrix(g.data, g.rows, g.cols);
    let cls = classes(labels);
    let mut means = PackedSigns::zeros(cls.len(), g.cols);
    for (c, idx) in cls.values().enumerate() {
        let mut m = vec![0.0f64; g.cols];
        for &i in idx {
            for (a, &v) in m.iter_mut().zip(g.row(i)) {
                *a += v.into();
            }
        }
        means.set(c, 0, &m);
    }
    (all, means)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every packed implementation equals its matrix reference.
    fn packed_equals_reference(g: Matrix<f32>, y: &[i64]) {
        let (s, m) = pack(g, y);
        let (s, m) = (s.planes(), m.planes());
        assert_eq!(gradsign_packed(&s), gradsign(g));
        assert_eq!(gradalign_i_dot_packed(&s, &m, y), gradalign_i_dot(g, y));
        let (a, b) = (gradalign_i_cos_packed(&s, y), gradalign_i_cos(g, y));
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} {b}");
        for norm in [true, false] {
            let (a, b) = (
                gradalign_ii_packed(&s, y, norm).unwrap(),
                gradalign_ii(g, y, norm).unwrap(),
            );
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} {b}");
        }
    }

    #[test]
    fn packed_scorers_equal_the_matrix_definitions() {
        packed_equals_reference(m(&G, 3), &Y);
        // 12 samples × 150 columns of pseudo-random values with zeros, 3 classes.
        let mut st = 7u64;
        let data: Vec<f32> = (0..12 * 150)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((st >> 33) % 7) as f32 - 3.0;
                v * 0.1
            })
            .collect();
        let y: Vec<i64> = (0..12).map(|i| (i % 3) as i64).collect();
        packed_equals_reference(m(&data, 12), &y);
    }

    /// Timing of the packed scorers on NB201-size signs (64 × 368,432, 10 classes):
    /// `cargo test --release -p gradalign-scorers bench_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_packed_scorers() {
        use std::time::Instant;
        let (n, p) = (64usize, 368_432usize);
        let mut st = 42u64;
        let data: Vec<f32> = (0..n * p)
            .map(|_| {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = (st >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                if v.abs() < 0.1 {
                    0.0
                } else {
                    (v * 1e-3) as f32
                }
            })
            .collect();
        let y: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
        let g = Matrix {
            data: &data[..],
            rows: n,
            cols: p,
        };
        let t = Instant::now();
        let (s, means) = pack(g, &y);
        println!(
            "pack (host side)         {:>10.2} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let (s, means) = (s.planes(), means.planes());
        fn time<R>(name: &str, mut f: impl FnMut() -> R) -> R {
            let mut best = f64::INFINITY;
            let mut out = None;
            for _ in 0..3 {
                let t = Instant::now();
                out = Some(std::hint::black_box(f()));
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!("{name:<24} {:>10.2} ms", best * 1e3);
            out.unwrap()
        }
        let r = [
            time("gradsign", || gradsign_packed(&s)),
            time("gradalign-i", || gradalign_i_dot_packed(&s, &means, &y)),
            time("gradalign-i-cos", || gradalign_i_cos_packed(&s, &y)),
            time("gradalign-ii", || {
                gradalign_ii_packed(&s, &y, true).unwrap()
            }),
            time("gradalign-ii-raw", || {
                gradalign_ii_packed(&s, &y, false).unwrap()
            }),
        ];
        println!("scores: {r:?}");
    }

    #[test]
    fn packed_gradsign_equals_the_definition_at_awkward_sizes() {
        // Rows 1, 7, 64 and 300 (more than one 255-row group of byte counters); columns not a
        // multiple of 8 or 64.
        for rows in [1usize, 7, 64, 300] {
            for cols in [1usize, 7, 63, 65, 130, 1000] {
                let mut st = (rows * 1000 + cols) as u64;
                let data: Vec<f32> = (0..rows * cols)
                    .map(|_| {
                        st = st
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        // mostly positive, so column sums reach ±rows
                        [1.0, 0.5, 2.0, -1.0, 0.0][((st >> 33) % 5) as usize]
                    })
                    .collect();
                let g = m(&data, rows);
                let p = PackedSigns::from_matrix(g.data, rows, cols);
                let want: f64 = p
                    .planes()
                    .column_sums()
                    .iter()
                    .map(|&a| a.unsigned_abs() as f64)
                    .sum();
                assert_eq!(gradsign_packed(&p.planes()), want, "{rows}x{cols}");
                assert_eq!(gradsign_packed(&p.planes()), gradsign(g), "{rows}x{cols}");
            }
        }
        // All rows agreeing: every column sum is ±rows.
        let data = vec![-1.0f32; 300 * 70];
        let p = PackedSigns::from_matrix(&data, 300, 70);
        assert_eq!(gradsign_packed(&p.planes()), 300.0 * 70.0);
    }

    fn m(data: &[f32], rows: usize) -> Matrix<'_, f32> {
        Matrix {
            data,
            rows,
            cols: data.len() / rows,
        }
    }

    // Three samples, four columns. Class 0 = rows 0, 1; class 1 = row 2 (a class of one).
    const G: [f32; 12] = [
        0.5, -2.0, 0.0, 1.0, //
        1.5, 3.0, -1.0, 2.0, //
        -0.1, 0.2, 0.3, 0.0,
    ];
    const Y: [i64; 3] = [0, 0, 1];

    #[test]
    fn gradsign_by_hand() {
        // column sign sums: (1+1-1) (−1+1+1) (0−1+1) (1+1+0) → |1|+|1|+|0|+|2| = 4
        assert_eq!(gradsign(m(&G, 3)), 4.0);
    }

    #[test]
    fn gradalign_i_dot_by_hand() {
        // class 0: ḡ = (1.0, 0.5, −0.5, 1.5) → sign (1,1,−1,1); s_0 = (1,−1,0,1) → 1;
        // s_1 = (1,1,−1,1) → 4; A_0 = 2.5. Class 1: ⟨s,s⟩ = 3. Total 5.5.
        assert_eq!(gradalign_i_dot(m(&G, 3), &Y), 5.5);
    }

    #[test]
    fn gradalign_i_cos_by_hand() {
        // class 0: s̄ = (1, 0, −0.5, 1), ‖s̄‖ = 1.5; cos(s_0) = 2/(√3·1.5), cos(s_1) = 2.5/(2·1.5).
        // class 1 (one sample): cos = 1.
        let c0 = (2.0 / (3f64.sqrt() * 1.5) + 2.5 / 3.0) / 2.0;
        let want = (c0 + 1.0) / 2.0;
        assert!((gradalign_i_cos(m(&G, 3), &Y) - want).abs() < 1e-14);
    }

    #[test]
    fn gradalign_ii_by_hand() {
        // class 0: ⟨s0,s1⟩ = 1, ‖s0‖² = 3, ‖s1‖² = 4 → K = [[1, 1/√12],[1/√12, 1]] (+ε).
        // class 1: K = [1 + ε].
        let r = 1.0 / 12f64.sqrt();
        let det0 = (1.0 + GRAM_EPS).powi(2) - r * r;
        let want = det0.ln() + (1.0 + GRAM_EPS).ln();
        assert!((gradalign_ii(m(&G, 3), &Y, true).unwrap() - want).abs() < 1e-13);
        // raw: K0 = [[3,1],[1,4]] → det ≈ 11, K1 = [3]
        let raw_det0 = (3.0 + GRAM_EPS) * (4.0 + GRAM_EPS) - 1.0;
        let want = raw_det0.ln() + (3.0 + GRAM_EPS).ln();
        assert!((gradalign_ii(m(&G, 3), &Y, false).unwrap() - want).abs() < 1e-13);
    }

    #[test]
    fn all_zero_gradient_row_stays_zero() {
        // Row 1 all zero: its Gram row/column is zero, so det(K + εI) = (1+ε)·ε for class 0.
        let g: [f32; 6] = [1.0, -1.0, 0.0, 0.0, 0.0, 0.0];
        let y = [0, 0];
        let want = ((1.0 + GRAM_EPS) * GRAM_EPS).ln();
        assert!((gradalign_ii(m(&g, 2), &y, true).unwrap() - want).abs() < 1e-12);
        assert_eq!(gradsign(m(&g, 2)), 2.0);
        // mean over class of cos: 1 for row 0, 0 for the zero row.
        assert!((gradalign_i_cos(m(&g, 2), &y) - 0.5).abs() < 1e-14);
        // ḡ sign = (1, −1, 0): row 0 gives 2, zero row 0 → 1.
        assert_eq!(gradalign_i_dot(m(&g, 2), &y), 1.0);
    }
}

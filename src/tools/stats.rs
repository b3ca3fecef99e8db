//! Rank correlations for benchmark reports: Kendall τ-b in O(n log n) (Knight's algorithm:
//! sort by x, count discordant pairs as inversions in y with a merge sort, ties corrected) and
//! Spearman ρ with average ranks for ties.

/// Kendall τ-b of paired samples; `None` when either side is constant or fewer than 2 points.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len());
    let n = x.len();
    if n < 2 {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(y[a].total_cmp(&y[b])));
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    // Ties in x, and joint ties in (x, y), over runs of the sorted order.
    let (mut tx, mut txy) = (0u64, 0u64);
    let (mut i, mut j) = (0, 0);
    while i < n {
        let mut k = i;
        while k < n && x[idx[k]] == x[idx[i]] {
            k += 1;
        }
        tx += pairs((k - i) as u64);
        j = j.max(i);
        let mut a = i;
        while a < k {
            let mut b = a;
            while b < k && y[idx[b]] == y[idx[a]] {
                b += 1;
            }
            txy += pairs((b - a) as u64);
            a = b;
        }
        i = k;
    }
    // Discordant pairs = inversions of y in this order (ties in y are not inversions).
    let mut ys: Vec<f64> = idx.iter().map(|&k| y[k]).collect();
    let mut buf = ys.clone();
    let swaps = merge_count(&mut ys, &mut buf);
    // Ties in y over the now-sorted ys.
    let mut ty = 0u64;
    let mut a = 0;
    while a < n {
        let mut b = a;
        while b < n && ys[b] == ys[a] {
            b += 1;
        }
        ty += pairs((b - a) as u64);
        a = b;
    }
    let n0 = pairs(n as u64);
    // concordant − discordant = n0 − tx − ty + txy − 2·discordant
    let num = n0 as f64 - tx as f64 - ty as f64 + txy as f64 - 2.0 * swaps as f64;
    let den = ((n0 - tx) as f64 * (n0 - ty) as f64).sqrt();
    (den > 0.0).then(|| num / den)
}

/// Sorts `v` ascending, returning the number of strict inversions.
fn merge_count(v: &mut [f64], buf: &mut [f64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut count = {
        let (l, r) = v.split_at_mut(mid);
        let (bl, br) = buf.split_at_mut(mid);
        merge_count(l, bl) + merge_count(r, br)
    };
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if v[j] < v[i] {
            buf[k] = v[j];
            count += (mid - i) as u64;
            j += 1;
        } else {
            buf[k] = v[i];
            i += 1;
        }
        k += 1;
    }
    buf[k..k + mid - i].copy_from_slice(&v[i..mid]);
    k += mid - i;
    buf[k..k + n - j].copy_from_slice(&v[j..n]);
    v.copy_from_slice(&buf[..n]);
    count
}

pub use crate::results::ensemble::average_ranks;

/// Spearman ρ (Pearson correlation of average ranks); `None` for constant input.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len());
    pearson(&average_ranks(x), &average_ranks(y))
}

pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct O(n²) τ-b, the definition.
    fn tau_b_naive(x: &[f64], y: &[f64]) -> f64 {
        let (mut c, mut d, mut tx, mut ty) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..x.len() {
            for j in i + 1..x.len() {
                let (a, b) = ((x[i] - x[j]).signum(), (y[i] - y[j]).signum());
                let (a, b) = (
                    if x[i] == x[j] { 0.0 } else { a },
                    if y[i] == y[j] { 0.0 } else { b },
                );
                if a == 0.0 && b != 0.0 {
                    tx += 1.0;
                } else if b == 0.0 && a != 0.0 {
                    ty += 1.0;
                } else if a * b > 0.0 {
                    c += 1.0;
                } else if a * b < 0.0 {
                    d += 1.0;
                }
            }
        }
        (c - d) / ((c + d + tx) * (c + d + ty) as f64).sqrt()
    }

    #[test]
    fn matches_scipy_on_tied_data() {
        // scipy.stats.kendalltau / spearmanr (scipy 1.16)
        let x = [1., 2., 2., 3., 4., 4., 4., 5., 6., 7.];
        let y = [2., 1., 3., 3., 5., 4., 6., 6., 9., 8.];
        assert!((kendall_tau_b(&x, &y).unwrap() - 0.8335696394016967).abs() < 1e-14);
        assert!((spearman(&x, &y).unwrap() - 0.93812095999547).abs() < 1e-13);
        let x = [3., 1., 4., 1., 5., 9., 2., 6., 5., 3., 5.];
        let y = [2., 7., 1., 8., 2., 8., 1., 8., 2., 8., 4.];
        assert!((kendall_tau_b(&x, &y).unwrap() - 0.14757295747452434).abs() < 1e-14);
        assert!((spearman(&x, &y).unwrap() - 0.1384567651467695).abs() < 1e-13);
    }

    #[test]
    fn agrees_with_the_quadratic_definition_and_edge_cases() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 7) as f64 // many ties
        };
        for _ in 0..20 {
            let x: Vec<f64> = (0..57).map(|_| rnd()).collect();
            let y: Vec<f64> = (0..57).map(|_| rnd()).collect();
            let (a, b) = (kendall_tau_b(&x, &y).unwrap(), tau_b_naive(&x, &y));
            assert!((a - b).abs() < 1e-12, "{a} {b}");
        }
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[3., 2., 1.]), Some(-1.0));
        assert_eq!(kendall_tau_b(&[1., 1., 1.], &[3., 2., 1.]), None);
        assert_eq!(spearman(&[1., 2., 3.], &[10., 20., 35.]), Some(1.0));
        assert_eq!(average_ranks(&[10., 20., 10.]), vec![1.5, 3.0, 1.5]);
    }
}

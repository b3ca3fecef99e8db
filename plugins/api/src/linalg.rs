//! Small dense f64 linear algebra for the N×N matrices scorers build (N = probe size, ≤ a few
//! hundred). Hand-written rather than a LAPACK binding so the default build needs no system
//! packages (docs/architecture.md, Dependencies); each routine is the textbook algorithm, tested below against
//! closed-form values, except [`gram_rows`] (the N×N Gram matrix of N long rows), a blocked
//! SIMD kernel tested against the textbook loop. Matrices are row-major `Vec<f64>` of length n·n.

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

/// Eigenvalues of a symmetric matrix (ascending): Householder reduction to tridiagonal form
/// (4/3 n³ flops), then the implicit QL algorithm with Wilkinson shifts (O(n²)). Accurate to
/// working precision relative to ‖A‖, as LAPACK's `syev` is — enough wherever the eigenvalues
/// are used relative to their sum or maximum (AZ-NAS's spectrum entropy), and an order of
/// magnitude faster than [`symmetric_eigenvalues`] at n = 64. Jacobi stays the choice where a
/// tiny eigenvalue must be accurate relative to itself (a condition number).
pub fn symmetric_eigenvalues_ql(a: &[f64], n: usize) -> Vec<f64> {
    // QL converges in a few iterations per eigenvalue on any symmetric matrix; should it ever
    // not, the slower method gives the answer rather than a partial one.
    ql(a, n).unwrap_or_else(|| symmetric_eigenvalues(a, n))
}

/// The QL iteration of [`symmetric_eigenvalues_ql`]; None if some eigenvalue took over 100
/// iterations.
fn ql(a: &[f64], n: usize) -> Option<Vec<f64>> {
    assert_eq!(a.len(), n * n);
    match n {
        0 => return Some(vec![]),
        1 => return Some(vec![a[0]]),
        _ => {}
    }
    let (mut d, sub) = tridiagonal(a, n);
    // e[i] couples d[i] and d[i + 1]; e[n − 1] = 0.
    let mut e = sub;
    e.push(0.0);
    // A coupling below ε‖T‖ is dropped: that moves no eigenvalue by more than ε‖A‖, the accuracy
    // promised, and without it a cluster of tiny eigenvalues (a rank-deficient covariance) can
    // keep the relative test below from ever deflating.
    let norm = (0..n)
        .map(|i| d[i].abs() + e[i].abs() + if i > 0 { e[i - 1].abs() } else { 0.0 })
        .fold(0.0f64, f64::max);
    let floor = f64::EPSILON * norm;
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m < n - 1 {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd || e[m].abs() <= floor {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 100 {
                return None;
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut deflated = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    d.sort_by(f64::total_cmp);
    Some(d)
}

/// The smallest eigenvalue of a symmetric matrix: Householder reduction to tridiagonal form
/// (4/3 n³ flops), then bisection on the Sturm sequence count to working precision. Far cheaper
/// than [`symmetric_eigenvalues`] when only λ_min is wanted (MeCo asks it of every layer).
pub fn smallest_symmetric_eigenvalue(a: &[f64], n: usize) -> f64 {
    assert_eq!(a.len(), n * n);
    match n {
        0 => return f64::NAN,
        1 => return a[0],
        _ => {}
    }
    let (d, e) = tridiagonal(a, n);
    // Gershgorin interval of the tridiagonal matrix.
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in 0..n {
        let r = if i > 0 { e[i - 1].abs() } else { 0.0 } + if i + 1 < n { e[i].abs() } else { 0.0 };
        lo = lo.min(d[i] - r);
        hi = hi.max(d[i] + r);
    }
    let scale = lo.abs().max(hi.abs()).max(f64::MIN_POSITIVE);
    // Eigenvalues below x: the negative terms of the Sturm sequence (LDLᵀ of T − xI).
    let below = |x: f64| {
        let mut count = 0;
        let mut q = 1.0f64;
        for i in 0..n {
            let sub = if i > 0 { e[i - 1] * e[i - 1] / q } else { 0.0 };
            q = d[i] - x - sub;
            if q == 0.0 {
                q = -f64::EPSILON * scale;
            }
            if q < 0.0 {
                count += 1;
            }
        }
        count
    };
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if hi - lo <= 2.0 * f64::EPSILON * scale || mid <= lo || mid >= hi {
            break;
        }
        if below(mid) >= 1 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Householder tridiagonalisation of a symmetric matrix: the diagonal (n) and the sub-diagonal
/// (n − 1) of an orthogonally similar tridiagonal matrix.
fn tridiagonal(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut m = a.to_vec();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n.saturating_sub(1)];
    let mut v = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        // Reflect x = m[k+1.., k] onto alpha · e1.
        let norm = (k + 1..n)
            .map(|i| m[i * n + k] * m[i * n + k])
            .sum::<f64>()
            .sqrt();
        d[k] = m[k * n + k];
        let x0 = m[(k + 1) * n + k];
        let alpha = if x0 > 0.0 { -norm } else { norm };
        e[k] = alpha;
        for i in k + 1..n {
            v[i] = m[i * n + k];
        }
        v[k + 1] -= alpha;
        let vn = (k + 1..n).map(|i| v[i] * v[i]).sum::<f64>().sqrt();
        if vn == 0.0 {
            continue;
        }
        for i in k + 1..n {
            v[i] /= vn;
        }
        // m ← H m H on the trailing block, H = I − 2vvᵀ: with p = m v and w = p − (vᵀp) v,
        // H m H = m − 2 v wᵀ − 2 w vᵀ.
        for i in k + 1..n {
            p[i] = (k + 1..n).map(|j| m[i * n + j] * v[j]).sum();
        }
        let vp: f64 = (k + 1..n).map(|i| v[i] * p[i]).sum();
        for i in k + 1..n {
            p[i] -= vp * v[i];
        }
        for i in k + 1..n {
            for j in k + 1..n {
                m[i * n + j] -= 2.0 * (v[i] * p[j] + p[i] * v[j]);
            }
        }
    }
    d[n - 2] = m[(n - 2) * n + n - 2];
    d[n - 1] = m[(n - 1) * n + n - 1];
    e[n - 2] = m[(n - 1) * n + n - 2];
    (d, e)
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

/// Rows per tile of [`gram_rows`]: every tile is a 4×4 block of K.
const GRAM_TILE: usize = 4;
/// Columns of a block are padded with zeros to a multiple of this (the widest SIMD width used).
const GRAM_LANES: usize = 16;
/// f64 values in one converted column block (256 KiB: stays in L2 while its tiles are formed).
const GRAM_BLOCK_F64: usize = 32 * 1024;
/// Extra f64 between the rows of a converted block: one cache line, so that rows are not a
/// multiple of 4 KiB apart and the eight rows of a tile do not compete for the same L1 sets.
const GRAM_SKEW: usize = 8;

/// K = X Xᵀ for the rows of a row-major r×c matrix, accumulated in f64: row-major r×r and
/// symmetric, `K[a][b] = Σ_k x_ak · x_bk`.
///
/// The textbook double loop over row pairs reads the whole matrix r/2 times from memory and
/// keeps one accumulator busy; here the columns go in blocks, each converted to f64 once
/// (256 KiB, so it stays in L2) and multiplied in 4×4 tiles of the upper triangle, with
/// AVX-512F or AVX2+FMA where the CPU has them (runtime detection; a portable kernel
/// otherwise), while the next block is prefetched a few cache lines per tile. Zero padding
/// adds exact zeros. Matrices of a million entries or more are cut into four column parts, each
/// accumulated on its own thread where there are cores for it and added in a fixed order (the
/// same bits on any machine). The products of f32 inputs are exact in f64 (24 + 24 significant
/// bits), so only the order of the f64 additions differs from the textbook loop.
pub fn gram_rows<T: Copy + Into<f64> + Sync>(x: &[T], r: usize, c: usize) -> Vec<f64> {
    gram_rows_with(x, r, c, GramKernels::detect())
}

/// A block kernel: adds the products of a converted column block to every upper-triangle 4×4
/// tile of `acc` (rp × rp), prefetching `next` as it goes. `buf` holds rp rows of `wp` f64,
/// `stride` apart (64-byte aligned, for speed only); rp is a multiple of 4 and wp of
/// [`GRAM_LANES`].
type GramKernel = fn(&[f64], usize, usize, usize, &mut [f64], &NextBlock);

/// The block kernel and f64 conversion this CPU runs best.
#[derive(Clone, Copy)]
struct GramKernels {
    kernel: GramKernel,
    /// Convert with 512-bit instructions (the CPU has AVX-512F).
    wide: bool,
}

impl GramKernels {
    fn detect() -> GramKernels {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return GramKernels {
                    kernel: gram_block_avx512,
                    wide: true,
                };
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return GramKernels {
                    kernel: gram_block_avx2,
                    wide: false,
                };
            }
        }
        GramKernels {
            kernel: gram_block_portable,
            wide: false,
        }
    }
}

/// Column parts of a large Gram, each accumulated on its own (on up to this many threads) and
/// added in a fixed order, so the bits do not depend on how many cores ran them.
const GRAM_PARTS: usize = 4;
/// Matrices with fewer entries than this run as one part (a thread costs more than it saves).
const GRAM_SPLIT_MIN: usize = 1 << 20;

fn gram_rows_with<T: Copy + Into<f64> + Sync>(
    x: &[T],
    r: usize,
    c: usize,
    k: GramKernels,
) -> Vec<f64> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    gram_rows_on(x, r, c, k, cores)
}

fn gram_rows_on<T: Copy + Into<f64> + Sync>(
    x: &[T],
    r: usize,
    c: usize,
    k: GramKernels,
    cores: usize,
) -> Vec<f64> {
    assert_eq!(x.len(), r * c);
    let mut out = vec![0.0f64; r * r];
    if r == 0 || c == 0 {
        return out;
    }
    let rp = r.div_ceil(GRAM_TILE) * GRAM_TILE;
    let parts = if r * c >= GRAM_SPLIT_MIN && c >= GRAM_PARTS * GRAM_LANES {
        GRAM_PARTS
    } else {
        1
    };
    let bounds: Vec<(usize, usize)> = (0..parts)
        .map(|p| (p * c / parts, (p + 1) * c / parts))
        .collect();
    let workers = cores.clamp(1, parts);
    let mut accs: Vec<Vec<f64>> = vec![vec![]; parts];
    if workers == 1 {
        for (acc, &(lo, hi)) in accs.iter_mut().zip(&bounds) {
            *acc = gram_part(x, r, c, lo, hi, k);
        }
    } else {
        // Worker w takes parts w, w + workers, …; the results land in their part's slot.
        let done: Vec<Vec<(usize, Vec<f64>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..workers)
                .map(|w| {
                    let bounds = &bounds;
                    s.spawn(move || {
                        (w..parts)
                            .step_by(workers)
                            .map(|p| (p, gram_part(x, r, c, bounds[p].0, bounds[p].1, k)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mine: Vec<_> = (0..parts)
                .step_by(workers)
                .map(|p| (p, gram_part(x, r, c, bounds[p].0, bounds[p].1, k)))
                .collect();
            let mut all = vec![mine];
            for h in handles {
                all.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            }
            all
        });
        for (p, acc) in done.into_iter().flatten() {
            accs[p] = acc;
        }
    }
    let mut acc = accs.swap_remove(0);
    for part in &accs {
        acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    for a in 0..r {
        for b in a..r {
            let v = acc[a * rp + b];
            out[a * r + b] = v;
            out[b * r + a] = v;
        }
    }
    out
}

/// The upper-triangle tiles (rp × rp, rp = r rounded up to the tile) of the Gram of columns
/// `lo..hi` of the row-major r×c matrix `x`.
fn gram_part<T: Copy + Into<f64>>(
    x: &[T],
    r: usize,
    c: usize,
    lo: usize,
    hi: usize,
    k: GramKernels,
) -> Vec<f64> {
    let rp = r.div_ceil(GRAM_TILE) * GRAM_TILE;
    let bw = (GRAM_BLOCK_F64 / rp).clamp(GRAM_LANES, 4096) / GRAM_LANES * GRAM_LANES;
    let mut store = vec![0.0f64; rp * (bw + GRAM_SKEW) + 8];
    let lead = store.as_ptr().align_offset(64).min(8);
    let buf = &mut store[lead..];
    let mut acc = vec![0.0f64; rp * rp];
    let size = std::mem::size_of::<T>();
    let mut c0 = lo;
    while c0 < hi {
        let w = bw.min(hi - c0);
        let wp = w.div_ceil(GRAM_LANES) * GRAM_LANES;
        let stride = wp + GRAM_SKEW;
        for i in 0..r {
            let dst = &mut buf[i * stride..i * stride + wp];
            to_f64(&mut dst[..w], &x[i * c + c0..i * c + c0 + w], k.wide);
            dst[w..].fill(0.0);
        }
        buf[r * stride..rp * stride].fill(0.0);
        let next_w = bw.min(hi - c0 - w);
        let next = NextBlock {
            base: x[(c0 + w).min(x.len())..].as_ptr() as *const u8,
            row_stride: c * size,
            row_lines: if next_w == 0 {
                0
            } else {
                (next_w * size).div_ceil(64) + 1
            },
            rows: r,
        };
        (k.kernel)(&buf[..rp * stride], rp, wp, stride, &mut acc, &next);
        c0 += w;
    }
    acc
}

/// The cache lines of the next column block (`rows` segments of `row_lines` lines,
/// `row_stride` bytes apart from `base`), prefetched into L2 a few per tile: the conversion of
/// that block then reads from cache, without stalling the FMAs on memory.
struct NextBlock {
    base: *const u8,
    row_stride: usize,
    row_lines: usize,
    rows: usize,
}

impl NextBlock {
    fn lines(&self) -> usize {
        self.rows * self.row_lines
    }
    /// Prefetch lines `from..to` of the `lines()`.
    #[inline(always)]
    fn fetch(&self, from: usize, to: usize) {
        for l in from..to {
            let (i, j) = (l / self.row_lines, l % self.row_lines);
            let p = self.base.wrapping_add(i * self.row_stride + j * 64);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint; it never faults, whatever the address.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(p as *const i8);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = p;
        }
    }
    /// Spreads the prefetches over the `tiles` tiles of a block: the share of tile `q`.
    #[inline(always)]
    fn fetch_share(&self, q: usize, tiles: usize) {
        let n = self.lines();
        if n > 0 {
            self.fetch(q * n / tiles, (q + 1) * n / tiles);
        }
    }
}

/// `dst[k] = src[k] as f64`, with 512-bit conversions when `wide` (the CPU has AVX-512F).
#[inline]
fn to_f64<T: Copy + Into<f64>>(dst: &mut [f64], src: &[T], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    if wide && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above; the check is a cached load).
        return unsafe { to_f64_avx512(dst, src) };
    }
    let _ = wide;
    to_f64_portable(dst, src)
}

#[inline(always)]
fn to_f64_portable<T: Copy + Into<f64>>(dst: &mut [f64], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.into();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn to_f64_avx512<T: Copy + Into<f64>>(dst: &mut [f64], src: &[T]) {
    to_f64_portable(dst, src)
}

/// The shape contract of a [`GramKernel`], which the SIMD kernels' unchecked loads rely on.
fn check_block(buf: &[f64], rp: usize, wp: usize, stride: usize, acc: &[f64]) {
    assert!(rp % GRAM_TILE == 0 && wp % GRAM_LANES == 0 && wp <= stride && rp > 0);
    assert!(buf.len() >= (rp - 1) * stride + wp && acc.len() >= rp * rp);
}

/// Number of upper-triangle tiles of an rp × rp matrix.
fn tile_count(rp: usize) -> usize {
    let t = rp / GRAM_TILE;
    t * (t + 1) / 2
}

/// Portable kernel: each 4×4 tile as two 4×2 halves with two lanes per accumulator.
fn gram_block_portable(
    buf: &[f64],
    rp: usize,
    wp: usize,
    stride: usize,
    acc: &mut [f64],
    next: &NextBlock,
) {
    check_block(buf, rp, wp, stride, acc);
    let row = |i: usize| &buf[i * stride..i * stride + wp];
    let (tiles, mut q) = (tile_count(rp), 0);
    for ti in (0..rp).step_by(GRAM_TILE) {
        let x = [row(ti), row(ti + 1), row(ti + 2), row(ti + 3)];
        for tj in (ti..rp).step_by(GRAM_TILE) {
            next.fetch_share(q, tiles);
            q += 1;
            for h in [0, 2] {
                let y = [row(tj + h), row(tj + h + 1)];
                let mut s = [[[0.0f64; 2]; 2]; 4];
                for k in (0..wp).step_by(2) {
                    for i in 0..4 {
                        for j in 0..2 {
                            for l in 0..2 {
                                s[i][j][l] += x[i][k + l] * y[j][k + l];
                            }
                        }
                    }
                }
                for i in 0..4 {
                    for j in 0..2 {
                        acc[(ti + i) * rp + tj + h + j] += s[i][j][0] + s[i][j][1];
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn gram_block_avx2(
    buf: &[f64],
    rp: usize,
    wp: usize,
    stride: usize,
    acc: &mut [f64],
    next: &NextBlock,
) {
    check_block(buf, rp, wp, stride, acc);
    // A safe function must not rely on its caller for the CPU feature (one cached load per
    // 256 KiB block).
    assert!(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));
    // SAFETY: the CPU has AVX2 and FMA (checked above); check_block bounds every load.
    unsafe { gram_block_avx2_inner(buf, rp, wp, stride, acc, next) }
}

/// AVX2 + FMA: each 4×4 tile as two 4×2 halves (8 accumulators + 6 loads in 16 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gram_block_avx2_inner(
    buf: &[f64],
    rp: usize,
    wp: usize,
    stride: usize,
    acc: &mut [f64],
    next: &NextBlock,
) {
    use std::arch::x86_64::*;
    let row = |i: usize| buf.as_ptr().add(i * stride);
    let (tiles, mut q) = (tile_count(rp), 0);
    for ti in (0..rp).step_by(GRAM_TILE) {
        let x = [row(ti), row(ti + 1), row(ti + 2), row(ti + 3)];
        for tj in (ti..rp).step_by(GRAM_TILE) {
            next.fetch_share(q, tiles);
            q += 1;
            for h in [0, 2] {
                let y = [row(tj + h), row(tj + h + 1)];
                let mut s = [[_mm256_setzero_pd(); 2]; 4];
                for k in (0..wp).step_by(4) {
                    let b = [_mm256_loadu_pd(y[0].add(k)), _mm256_loadu_pd(y[1].add(k))];
                    for i in 0..4 {
                        let a = _mm256_loadu_pd(x[i].add(k));
                        for j in 0..2 {
                            s[i][j] = _mm256_fmadd_pd(a, b[j], s[i][j]);
                        }
                    }
                }
                for i in 0..4 {
                    for j in 0..2 {
                        let v = s[i][j];
                        let h2 = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
                        acc[(ti + i) * rp + tj + h + j] +=
                            _mm_cvtsd_f64(_mm_add_sd(h2, _mm_unpackhi_pd(h2, h2)));
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn gram_block_avx512(
    buf: &[f64],
    rp: usize,
    wp: usize,
    stride: usize,
    acc: &mut [f64],
    next: &NextBlock,
) {
    check_block(buf, rp, wp, stride, acc);
    assert!(std::is_x86_feature_detected!("avx512f"));
    // SAFETY: the CPU has AVX-512F (checked above); check_block bounds every load.
    unsafe { gram_block_avx512_inner(buf, rp, wp, stride, acc, next) }
}

/// AVX-512F: a whole 4×4 tile at once (16 accumulators + 8 loads in 32 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gram_block_avx512_inner(
    buf: &[f64],
    rp: usize,
    wp: usize,
    stride: usize,
    acc: &mut [f64],
    next: &NextBlock,
) {
    use std::arch::x86_64::*;
    let row = |i: usize| buf.as_ptr().add(i * stride);
    let (tiles, mut q) = (tile_count(rp), 0);
    for ti in (0..rp).step_by(GRAM_TILE) {
        let x = [row(ti), row(ti + 1), row(ti + 2), row(ti + 3)];
        for tj in (ti..rp).step_by(GRAM_TILE) {
            next.fetch_share(q, tiles);
            q += 1;
            let y = [row(tj), row(tj + 1), row(tj + 2), row(tj + 3)];
            let mut s = [[_mm512_setzero_pd(); 4]; 4];
            for k in (0..wp).step_by(8) {
                let b = [
                    _mm512_loadu_pd(y[0].add(k)),
                    _mm512_loadu_pd(y[1].add(k)),
                    _mm512_loadu_pd(y[2].add(k)),
                    _mm512_loadu_pd(y[3].add(k)),
                ];
                for i in 0..4 {
                    let a = _mm512_loadu_pd(x[i].add(k));
                    for j in 0..4 {
                        s[i][j] = _mm512_fmadd_pd(a, b[j], s[i][j]);
                    }
                }
            }
            for i in 0..4 {
                for j in 0..4 {
                    acc[(ti + i) * rp + tj + j] += _mm512_reduce_add_pd(s[i][j]);
                }
            }
        }
    }
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

    /// splitmix64 → uniform in [-1, 1), with about one value in eight exactly zero.
    fn random(len: usize, seed: u64) -> Vec<f64> {
        let mut st = seed;
        (0..len)
            .map(|_| {
                st = st.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = st;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                if z % 8 == 0 {
                    0.0
                } else {
                    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
                }
            })
            .collect()
    }

    /// The textbook definition: one dot product per pair of rows, in column order.
    fn gram_reference<T: Copy + Into<f64>>(x: &[T], r: usize, c: usize) -> Vec<f64> {
        let mut k = vec![0.0f64; r * r];
        for a in 0..r {
            for b in a..r {
                let d: f64 = x[a * c..(a + 1) * c]
                    .iter()
                    .zip(&x[b * c..(b + 1) * c])
                    .map(|(&p, &q)| p.into() * q.into())
                    .sum();
                k[a * r + b] = d;
                k[b * r + a] = d;
            }
        }
        k
    }

    /// Entry by entry within 1e-12 of the entry's scale √(K_aa·K_bb), which bounds Σ_k |x_ak·x_bk|
    /// and so the rounding of any summation order: an off-diagonal entry that nearly cancels
    /// is only as accurate as that, in the textbook order too. Diagonal entries (no
    /// cancellation) within 1e-12 of themselves.
    fn assert_gram_close(got: &[f64], want: &[f64], r: usize, what: &str) {
        for a in 0..r {
            for b in 0..r {
                let (x, y) = (got[a * r + b], want[a * r + b]);
                let scale = (want[a * r + a] * want[b * r + b]).sqrt();
                assert!(
                    (x - y).abs() <= 1e-12 * scale,
                    "{what} entry ({a}, {b}): {x} vs {y} (scale {scale})"
                );
                assert_eq!(x, got[b * r + a], "{what}: not symmetric");
            }
        }
    }

    /// R + Rᵀ for a seeded uniform R.
    fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
        let r = random(n * n, seed);
        (0..n * n).map(|k| r[k] + r[(k % n) * n + k / n]).collect()
    }

    #[test]
    fn ql_eigenvalues_equal_jacobi() {
        for n in [1, 2, 3, 5, 16, 40, 64, 70] {
            for seed in 0..3u64 {
                let a = random_symmetric(n, 57 * n as u64 + seed);
                let want = symmetric_eigenvalues(&a, n);
                let got = symmetric_eigenvalues_ql(&a, n);
                let scale = a.iter().map(|v| v.abs()).fold(1.0, f64::max) * n as f64;
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-12 * scale, "n {n}: {got:?} vs {want:?}");
                }
            }
        }
        // Repeated and zero eigenvalues: a rank-one covariance (spectrum {‖v‖², 0, 0, 0}), a
        // diagonal and the zero matrix.
        let v = [1.0, -2.0, 0.5, 3.0];
        let outer: Vec<f64> = (0..16).map(|k| v[k / 4] * v[k % 4]).collect();
        let ev = symmetric_eigenvalues_ql(&outer, 4);
        assert!(
            ev[..3].iter().all(|x| x.abs() < 1e-14) && (ev[3] - 14.25).abs() < 1e-13,
            "{ev:?}"
        );
        assert_eq!(
            symmetric_eigenvalues_ql(&[3.0, 0.0, 0.0, -1.0], 2),
            vec![-1.0, 3.0]
        );
        assert_eq!(symmetric_eigenvalues_ql(&[0.0; 9], 3), vec![0.0; 3]);
        // A rank-deficient covariance (64 channels, 16 positions: 48 eigenvalues that are zero
        // up to rounding) converges without the Jacobi fallback.
        let x = random(64 * 16, 9);
        let cov: Vec<f64> = gram_rows(&x, 64, 16).iter().map(|v| v / 16.0).collect();
        let ev = ql(&cov, 64).expect("converges");
        let want = symmetric_eigenvalues(&cov, 64);
        let scale = want[63] * 64.0;
        for (g, w) in ev.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * scale, "{g} vs {w}");
        }
        assert!(ev[..48].iter().all(|v| v.abs() <= 1e-12 * scale));
    }

    #[test]
    fn smallest_eigenvalue_equals_jacobi() {
        for n in [1, 2, 3, 5, 16, 40, 64] {
            for seed in 0..3u64 {
                let a = random_symmetric(n, 31 * n as u64 + seed);
                let want = symmetric_eigenvalues(&a, n)[0];
                let got = smallest_symmetric_eigenvalue(&a, n);
                let scale = a.iter().map(|v| v.abs()).fold(1.0, f64::max) * n as f64;
                assert!(
                    (got - want).abs() <= 1e-12 * scale,
                    "n {n}: {got} vs {want}"
                );
            }
        }
        // A rank-deficient correlation-like matrix: λ_min = 0 exactly in theory.
        let x: Vec<f64> = random(6 * 4, 5);
        let c = corrcoef_rows(&x, 6, 4);
        assert!(smallest_symmetric_eigenvalue(&c, 6).abs() < 1e-12);
        let diag = smallest_symmetric_eigenvalue(&[2.0, 0.0, 0.0, -3.0], 2);
        assert!((diag + 3.0).abs() < 1e-12, "{diag}");
    }

    #[test]
    fn gram_rows_bits_do_not_depend_on_the_number_of_threads() {
        let (r, c) = (64, 20_011);
        let x: Vec<f32> = random(r * c, 7).iter().map(|&v| v as f32).collect();
        for (name, kernel) in gram_kernels() {
            let one = gram_rows_on(&x, r, c, kernel, 1);
            for cores in [2, 3, 4, 16] {
                assert_eq!(
                    gram_rows_on(&x, r, c, kernel, cores),
                    one,
                    "{name} on {cores} cores"
                );
            }
        }
    }

    /// Every kernel this CPU can run.
    fn gram_kernels() -> Vec<(&'static str, GramKernels)> {
        let mut v = vec![(
            "portable",
            GramKernels {
                kernel: gram_block_portable,
                wide: false,
            },
        )];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push((
                    "avx2",
                    GramKernels {
                        kernel: gram_block_avx2,
                        wide: false,
                    },
                ));
            }
            if std::is_x86_feature_detected!("avx512f") {
                v.push((
                    "avx512",
                    GramKernels {
                        kernel: gram_block_avx512,
                        wide: true,
                    },
                ));
            }
        }
        v
    }

    #[test]
    fn gram_rows_equals_the_textbook_loop() {
        // Awkward sizes: rows not a multiple of the 4-row tile, columns not a multiple of the
        // SIMD width, and wide enough to span several column blocks (4096 columns per block
        // at 1 row, 512 at 64 rows).
        for (r, c) in [
            (1, 1),
            (1, 5000),
            (2, 3),
            (7, 1),
            (7, 45),
            (7, 4700),
            (13, 2500),
            (64, 1),
            (64, 100),
            (64, 1037),
            // Over a million entries: four column parts, on threads where there are cores.
            (64, 20_011),
            (5, 300_000),
            (0, 5),
            (5, 0),
        ] {
            let x = random(r * c, (r * 1000 + c) as u64);
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            // Small integers: every partial sum is exact, so any order gives the same bits.
            let ints: Vec<f32> = x.iter().map(|&v| (v * 4.0).round() as f32).collect();
            for (name, kernel) in gram_kernels() {
                let want = gram_reference(&x32, r, c);
                let got = gram_rows_with(&x32, r, c, kernel);
                assert_eq!(got.len(), r * r);
                assert_gram_close(&got, &want, r, &format!("{name} f32 {r}x{c}"));
                let want = gram_reference(&x, r, c);
                let got = gram_rows_with(&x, r, c, kernel);
                assert_gram_close(&got, &want, r, &format!("{name} f64 {r}x{c}"));
                assert_eq!(
                    gram_rows_with(&ints, r, c, kernel),
                    gram_reference(&ints, r, c),
                    "{name} integers {r}x{c}"
                );
            }
            assert_eq!(gram_rows(&ints, r, c), gram_reference(&ints, r, c));
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

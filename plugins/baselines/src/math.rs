//! Baseline formulas (docs/semantics.md, Scorers; zero-cost-nas conventions, batch gradient = Σ per-sample
//! gradients) on plain slices, each tested on hand-computed values.

use gradalign_plugin_api::linalg::{
    corrcoef_rows, gram_rows, slogdet, smallest_symmetric_eigenvalue, symmetric_eigenvalues,
};
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
        let vals = &values[w.columns()];
        let mut sq = vec![0.0f64; channels];
        let mut t = vec![0.0f64; channels];
        for i in 0..g.rows {
            t.iter_mut().for_each(|v| *v = 0.0);
            let row = g.row_cols(i, w.offset, w.numel);
            // Column j belongs to channel (j / stride) % channels: runs of `stride` columns
            // cycle through the channels (a weight with no elements has none).
            if w.numel > 0 {
                if stride == 1 {
                    for (gc, vc) in row.chunks(channels).zip(vals.chunks(channels)) {
                        for ((tk, &v), &gv) in t.iter_mut().zip(vc).zip(gc) {
                            *tk += v * gv.into();
                        }
                    }
                } else {
                    let mut k = 0;
                    for (gc, vc) in row.chunks(stride).zip(vals.chunks(stride)) {
                        t[k] += dot(vc, gc);
                        k += 1;
                        if k == channels {
                            k = 0;
                        }
                    }
                }
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
    zico_with(params, g, Simd::detect())
}

fn zico_with<T: Copy + Into<f64>>(params: &[Param], g: Matrix<T>, simd: Simd) -> f64 {
    // Columns in chunks whose rows stay in cache between the two passes over them; every
    // column's sums, and the sum over columns, are formed in the same order as over whole
    // blocks, so the result is the same to the last bit.
    let chunk = (ZICO_CHUNK_BYTES / (g.rows.max(1) * std::mem::size_of::<T>())).max(64);
    let mut bufs = ZicoChunk {
        sum: vec![0.0; chunk],
        sum_abs: vec![0.0; chunk],
        mean: vec![0.0; chunk],
        var: vec![0.0; chunk],
    };
    let mut total = 0.0;
    for w in params.iter().filter(|p| p.is_weight()) {
        let mut s = 0.0;
        for c0 in (0..w.numel).step_by(chunk) {
            let len = chunk.min(w.numel - c0);
            s = bufs.add(simd, g, w.offset + c0, len, s);
        }
        if s != 0.0 {
            total += s.ln();
        }
    }
    total
}

/// Bytes of one column chunk of the per-sample gradients in [`zico`] (all rows).
const ZICO_CHUNK_BYTES: usize = 256 * 1024;

/// Per-column work space of [`zico`].
struct ZicoChunk {
    sum: Vec<f64>,
    sum_abs: Vec<f64>,
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl ZicoChunk {
    /// s + Σ over columns `start..start + len` of mean|g| / std(g), columns in order.
    fn add<T: Copy + Into<f64>>(
        &mut self,
        simd: Simd,
        g: Matrix<T>,
        start: usize,
        len: usize,
        s: f64,
    ) -> f64 {
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Simd::detect chose this level because the CPU has it.
            Simd::Avx512 => unsafe { self.add_avx512(g, start, len, s) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Simd::Avx2 => unsafe { self.add_avx2(g, start, len, s) },
            _ => self.add_any(g, start, len, s),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_avx512<T: Copy + Into<f64>>(
        &mut self,
        g: Matrix<T>,
        start: usize,
        len: usize,
        s: f64,
    ) -> f64 {
        self.add_any(g, start, len, s)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_avx2<T: Copy + Into<f64>>(
        &mut self,
        g: Matrix<T>,
        start: usize,
        len: usize,
        s: f64,
    ) -> f64 {
        self.add_any(g, start, len, s)
    }

    /// The arithmetic (elementwise in the columns, so any vector width gives the same bits).
    #[inline(always)]
    fn add_any<T: Copy + Into<f64>>(
        &mut self,
        g: Matrix<T>,
        start: usize,
        len: usize,
        mut s: f64,
    ) -> f64 {
        let n = g.rows as f64;
        let (sum, sum_abs) = (&mut self.sum[..len], &mut self.sum_abs[..len]);
        let (mean, var) = (&mut self.mean[..len], &mut self.var[..len]);
        sum.fill(0.0);
        sum_abs.fill(0.0);
        var.fill(0.0);
        for i in 0..g.rows {
            let row = g.row_cols(i, start, len);
            for ((a, b), &v) in sum.iter_mut().zip(sum_abs.iter_mut()).zip(row) {
                let v: f64 = v.into();
                *a += v;
                *b += v.abs();
            }
        }
        for (m, &a) in mean.iter_mut().zip(sum.iter()) {
            *m = a / n;
        }
        // While this chunk is in cache, the next one is fetched from memory, row by row.
        let next = (start + len).min(g.cols);
        let next_len = len.min(g.cols - next);
        for i in 0..g.rows {
            prefetch(g.row_cols(i, next, next_len));
            let row = g.row_cols(i, start, len);
            for ((q, &m), &v) in var.iter_mut().zip(mean.iter()).zip(row) {
                let d = v.into() - m;
                *q += d * d;
            }
        }
        for (&q, &b) in var.iter().zip(sum_abs.iter()) {
            let std = (q / n).sqrt();
            if std != 0.0 {
                s += (b / n) / std;
            }
        }
        s
    }
}

/// Asks for every cache line of `s` to be brought into L2 (a hint; nothing on other CPUs).
#[inline(always)]
fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let step = (64 / std::mem::size_of::<T>().max(1)).max(1);
        for k in (0..s.len()).step_by(step) {
            // SAFETY: a prefetch never faults; the address is inside `s`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(s.as_ptr().add(k) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// The widest x86 vector extension the CPU has, for loops whose arithmetic is elementwise
/// (so every width gives the same bits); detected at run time, the build targets baseline
/// x86-64.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Simd {
    Any,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Any
    }
}

/// Σ_k v_k · g_k in f64 with eight partial sums (so the compiler vectorises it).
fn dot<T: Copy + Into<f64>>(v: &[f64], g: &[T]) -> f64 {
    const L: usize = 8;
    let mut acc = [0.0f64; L];
    let (vc, gc) = (v.chunks_exact(L), g.chunks_exact(L));
    let (vr, gr) = (vc.remainder(), gc.remainder());
    for (a, b) in vc.zip(gc) {
        for l in 0..L {
            acc[l] += a[l] * b[l].into();
        }
    }
    let mut tail = 0.0;
    for (&a, &b) in vr.iter().zip(gr) {
        tail += a * b.into();
    }
    acc.iter().sum::<f64>() + tail
}

/// −cond(G Gᵀ) (TE-NAS NTK condition number; lower is better, so negated).
pub fn ntk_cond<T: Copy + Into<f64> + Sync>(g: Matrix<T>) -> Result<f64, String> {
    let n = g.rows;
    let k = gram_rows(&g.data[..n * g.cols], n, g.cols);
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
    let k: Vec<f64> = agreements(codes).into_iter().map(|a| a as f64).collect();
    slogdet(&k, codes.rows).1
}

/// K_ij = the number of units where the codes of samples i and j are equal (n×n, row-major).
/// 0/1 codes (what the host supplies) are packed 64 to a word, so K_ij = units −
/// popcount(c_i xor c_j); any other byte value falls back to comparing bytes.
fn agreements(codes: Matrix<u8>) -> Vec<u64> {
    let (n, units) = (codes.rows, codes.cols);
    let Some((bits, words)) = pack_binary_codes(codes) else {
        return byte_agreements(codes);
    };
    let mut k = hamming_gram(&bits, n, words);
    k.iter_mut().for_each(|d| *d = units as u64 - *d);
    k
}

/// The definition, byte by byte; used for codes that are not all 0 or 1.
fn byte_agreements(codes: Matrix<u8>) -> Vec<u64> {
    let n = codes.rows;
    let mut k = vec![0u64; n * n];
    for a in 0..n {
        for b in a..n {
            let agree = codes
                .row(a)
                .iter()
                .zip(codes.row(b))
                .filter(|(x, y)| x == y)
                .count() as u64;
            k[a * n + b] = agree;
            k[b * n + a] = agree;
        }
    }
    k
}

/// Packs each row of 0/1 bytes into ⌈units/64⌉ words (rows × words), or None if a byte is
/// neither 0 nor 1. Within a whole 64-unit chunk, byte q of its m-th 8-byte group goes to bit
/// 8q + m (eight shifts and ors per word instead of 64); the tail uses bit t for unit t. Any
/// bijection of the units within a word will do, since only xor-popcounts of rows are taken.
fn pack_binary_codes(codes: Matrix<u8>) -> Option<(Vec<u64>, usize)> {
    let (n, units) = (codes.rows, codes.cols);
    let words = units.div_ceil(64);
    let mut bits = vec![0u64; n * words];
    let mut seen = 0u64;
    for i in 0..n {
        let out = &mut bits[i * words..(i + 1) * words];
        let mut chunks = codes.row(i).chunks_exact(64);
        for (o, chunk) in out.iter_mut().zip(&mut chunks) {
            let mut w = 0u64;
            for (m, group) in chunk.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(group.try_into().unwrap());
                seen |= v;
                w |= v << m;
            }
            *o = w;
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let mut w = 0u64;
            for (t, &b) in tail.iter().enumerate() {
                seen |= b as u64;
                w |= ((b & 1) as u64) << t;
            }
            out[words - 1] = w;
        }
    }
    (seen & !0x0101_0101_0101_0101 == 0).then_some((bits, words))
}

/// D_ij = popcount(x_i xor x_j) over rows of `words` u64 each (n×n, row-major, symmetric),
/// with the POPCNT instruction where the CPU has it.
fn hamming_gram(bits: &[u64], n: usize, words: usize) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has POPCNT.
        return unsafe { hamming_gram_popcnt(bits, n, words) };
    }
    hamming_gram_portable(bits, n, words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn hamming_gram_popcnt(bits: &[u64], n: usize, words: usize) -> Vec<u64> {
    hamming_gram_portable(bits, n, words)
}

#[inline(always)]
fn hamming_gram_portable(bits: &[u64], n: usize, words: usize) -> Vec<u64> {
    assert_eq!(bits.len(), n * words);
    let mut d = vec![0u64; n * n];
    for a in 0..n {
        let x = &bits[a * words..(a + 1) * words];
        for b in a + 1..n {
            let y = &bits[b * words..(b + 1) * words];
            let v: u64 = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p ^ q).count_ones() as u64)
                .sum();
            d[a * n + b] = v;
            d[b * n + a] = v;
        }
    }
    d
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

/// SWAP (Peng et al., ICLR 2024): the number of distinct *sample-wise* activation patterns, i.e.
/// of distinct columns of the code matrix: unit u's pattern is the vector of its codes over the
/// probe's samples. 0/1 codes (what the host supplies) are packed 64 samples to a word, one key
/// per unit; any other byte value falls back to comparing the columns' bytes.
pub fn swap(codes: Matrix<u8>) -> f64 {
    let (n, units) = (codes.rows, codes.cols);
    if units == 0 {
        return 0.0;
    }
    if codes.data[..n * units].iter().any(|&b| b > 1) {
        let cols: std::collections::HashSet<Vec<u8>> = (0..units)
            .map(|u| (0..n).map(|i| codes.data[i * units + u]).collect())
            .collect();
        return cols.len() as f64;
    }
    let words = n.div_ceil(64).max(1);
    let mut keys = vec![0u64; units * words];
    if words == 1 {
        // Branch-free shifts and ors, which the compiler vectorises.
        for i in 0..n {
            for (k, &b) in keys.iter_mut().zip(codes.row(i)) {
                *k |= (b as u64) << i;
            }
        }
    } else {
        for i in 0..n {
            let (w, shift) = (i / 64, i % 64);
            for (u, &b) in codes.row(i).iter().enumerate() {
                keys[u * words + w] |= (b as u64) << shift;
            }
        }
    }
    if words == 1 {
        keys.sort_unstable();
        keys.dedup();
        return keys.len() as f64;
    }
    let cols: std::collections::HashSet<&[u64]> = keys.chunks_exact(words).collect();
    cols.len() as f64
}

/// MeCo (Jiang et al., NeurIPS 2023): Σ_layers λ_min(P_l), P_l the Pearson correlation matrix
/// of layer l's channel maps for the probe's first sample (channels × spatial). As the authors'
/// code does (`torch.corrcoef`, then NaN and ±inf entries set to 0): entries are clamped to
/// [−1, 1], and a constant channel's undefined correlations count as 0.
pub fn meco(f: &gradalign_plugin_api::FeatureMaps) -> Result<f64, String> {
    if f.maps.rows == 0 {
        return Err("MeCo needs at least one sample".into());
    }
    if f.layers.is_empty() {
        return Err("the model has no Conv layer: no feature maps for MeCo".into());
    }
    let mut total = 0.0;
    for l in 0..f.layers.len() {
        let m = f.layer(0, l);
        // The NaN → 0 rule is for constant channels; a non-finite feature is a broken network.
        if m.data.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "layer {} has non-finite features",
                f.layers[l].node
            ));
        }
        let c = channel_correlation(m.data, m.rows, m.cols);
        total += smallest_symmetric_eigenvalue(&c, m.rows);
    }
    Ok(total)
}

/// `torch.corrcoef` of the rows, with MeCo's NaN/inf → 0.
fn channel_correlation(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    corrcoef_rows(x, rows, cols)
        .into_iter()
        .map(|v| {
            if v.is_finite() {
                v.clamp(-1.0, 1.0)
            } else {
                0.0
            }
        })
        .collect()
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
    fn swap_counts_distinct_unit_patterns() {
        // 3 samples × 5 units; columns (unit patterns over the samples): 101, 010, 101, 000, 111.
        let data = [1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1];
        let m = |d: &[u8], rows, cols| Matrix {
            data: d.to_vec().leak(),
            rows,
            cols,
        };
        assert_eq!(swap(m(&data, 3, 5)), 4.0);
        // The byte fallback gives the same count for the same patterns written as 0/2.
        let twos: Vec<u8> = data.iter().map(|b| b * 2).collect();
        assert_eq!(swap(m(&twos, 3, 5)), 4.0);
        // 130 samples (three words per key): unit u is active on sample u only, unit 200 on
        // sample 129 only, units 130..200 never: 130 + 1 distinct patterns.
        let (rows, cols) = (130, 201);
        let mut big = vec![0u8; rows * cols];
        for i in 0..rows {
            big[i * cols + i] = 1;
        }
        big[129 * cols + 200] = 1; // same pattern as unit 129
        assert_eq!(swap(m(&big, rows, cols)), 131.0);
    }

    #[test]
    fn meco_by_hand() {
        use gradalign_plugin_api::{FeatureLayer, FeatureMaps};
        // One sample, two layers. Layer 0: two perfectly anti-correlated channels, P = [[1, −1],
        // [−1, 1]], eigenvalues 0 and 2. Layer 1: channels [1, −1, 1, −1] and [1, 1, 1, −1]
        // (r = 1/√3) and a constant channel, whose undefined correlations count 0.
        let l0 = [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        let l1 = [
            1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 5.0, 5.0, 5.0, 5.0,
        ];
        let data: Vec<f64> = l0.iter().chain(&l1).copied().collect();
        let f = FeatureMaps {
            maps: Matrix {
                data: &data,
                rows: 1,
                cols: 20,
            },
            layers: vec![
                FeatureLayer {
                    node: "a".into(),
                    channels: 2,
                    spatial: 4,
                    offset: 0,
                    live: true,
                },
                FeatureLayer {
                    node: "b".into(),
                    channels: 3,
                    spatial: 4,
                    offset: 8,
                    live: true,
                },
            ],
        };
        // Layer 1: P = [[1, r, 0], [r, 1, 0], [0, 0, 0]], eigenvalues 1 − r, 1 + r and 0: both
        // layers' λ_min is 0.
        let r = 1.0 / 3f64.sqrt();
        let p1 = channel_correlation(&l1, 3, 4);
        let want = [1.0, r, 0.0, r, 1.0, 0.0, 0.0, 0.0, 0.0];
        for (a, b) in p1.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{p1:?}");
        }
        assert!(meco(&f).unwrap().abs() < 1e-12);
        // Without the constant channel layer 1 has λ_min = 1 − r; layer 0 adds 0.
        let f2 = FeatureMaps {
            layers: vec![
                f.layers[0].clone(),
                FeatureLayer {
                    channels: 2,
                    ..f.layers[1].clone()
                },
            ],
            ..f.clone()
        };
        assert!((meco(&f2).unwrap() - (1.0 - r)).abs() < 1e-12);
        assert!(meco(&FeatureMaps {
            layers: vec![],
            ..f.clone()
        })
        .is_err());
        let mut bad = data.clone();
        bad[9] = f64::NAN;
        let e = meco(&FeatureMaps {
            maps: Matrix {
                data: &bad,
                rows: 1,
                cols: 20,
            },
            ..f.clone()
        })
        .unwrap_err();
        assert!(e.contains("layer b has non-finite features"), "{e}");
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

    // ---- The fast routines against the straightforward definitions they replaced ----

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
                if z.is_multiple_of(8) {
                    0.0
                } else {
                    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
                }
            })
            .collect()
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    /// The former `ntk_cond` Gram matrix: one dot product per pair of rows.
    fn ntk_gram_reference<T: Copy + Into<f64>>(g: Matrix<T>) -> Vec<f64> {
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
        k
    }

    /// The former `fisher`: channel (j / stride) % channels of every column, in column order.
    fn fisher_reference<T: Copy + Into<f64>>(
        params: &[Param],
        values: &[f64],
        g: Matrix<T>,
    ) -> f64 {
        let mut total = 0.0;
        for w in params.iter().filter(|p| p.is_weight()) {
            let axis = w.channel_axis.unwrap();
            let channels = w.shape[axis];
            let stride: usize = w.shape[axis + 1..].iter().product();
            let bias = params
                .iter()
                .find(|p| p.role == role::BIAS && p.node == w.node);
            let mut sq = vec![0.0f64; channels];
            let mut t = vec![0.0f64; channels];
            for i in 0..g.rows {
                t.iter_mut().for_each(|v| *v = 0.0);
                let row = g.row_cols(i, w.offset, w.numel);
                for (j, &gv) in row.iter().enumerate() {
                    t[(j / stride) % channels] += values[w.offset + j] * gv.into();
                }
                if let Some(b) = bias {
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
        total
    }

    /// The former `zico`: two passes over whole weight blocks.
    fn zico_reference<T: Copy + Into<f64>>(params: &[Param], g: Matrix<T>) -> f64 {
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

    /// Every vector width this CPU runs.
    fn simd_levels() -> Vec<Simd> {
        let mut v = vec![Simd::Any];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                v.push(Simd::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                v.push(Simd::Avx512);
            }
        }
        v
    }

    /// Weights of every channel layout the scorers meet, back to back from column 0: Conv
    /// (axis 0, stride 3·3·in), ConvTranspose (axis 1: runs of k·k cycling through the
    /// channels), Gemm with transB = 0 (axis 1, stride 1) and its bias, a MatMul weight of
    /// awkward size, a normalisation scale (not a weight) and a weight wider than a ZiCo chunk.
    fn mixed_layout() -> Vec<Param> {
        let mut out = Vec::new();
        let mut off = 0;
        for (name, node, r, shape, axis) in [
            ("conv", "conv", role::WEIGHT, vec![5, 3, 3, 3], Some(0)),
            ("convt", "convt", role::WEIGHT, vec![3, 4, 2, 2], Some(1)),
            ("convt.b", "convt", role::BIAS, vec![4], None),
            ("bn", "bn", role::OTHER, vec![5], None),
            ("gemm", "gemm", role::WEIGHT, vec![7, 3], Some(1)),
            ("gemm.b", "gemm", role::BIAS, vec![3], None),
            ("mm", "mm", role::WEIGHT, vec![13, 11], Some(1)),
            ("wide", "wide", role::WEIGHT, vec![3, 1371], Some(0)),
        ] {
            out.push(param(name, node, r, &shape, off, axis));
            off += shape.iter().product::<usize>();
        }
        out
    }

    #[test]
    fn fast_scorers_equal_the_straightforward_definitions() {
        let params = mixed_layout();
        let cols: usize = params.iter().map(|p| p.numel).sum();
        let values = random(cols, 1);
        for rows in [1, 7, 64] {
            let data = random(rows * cols, rows as u64);
            let d32: Vec<f32> = data.iter().map(|&v| v as f32).collect();
            let g64 = Matrix {
                data: &data[..],
                rows,
                cols,
            };
            let g32 = Matrix {
                data: &d32[..],
                rows,
                cols,
            };
            // zico: the same sums in the same order, so the same bits, at every vector width.
            for simd in simd_levels() {
                let z = zico_with(&params, g64, simd);
                assert_eq!(z, zico_reference(&params, g64), "zico {rows} {simd:?}");
                let z = zico_with(&params, g32, simd);
                assert_eq!(z, zico_reference(&params, g32), "zico {rows} {simd:?}");
            }
            // fisher: per-channel dot products in eight partial sums.
            let (a, b) = (
                fisher(&params, &values, g64).unwrap(),
                fisher_reference(&params, &values, g64),
            );
            assert!(close(a, b, 1e-12), "fisher f64 {rows}: {a} vs {b}");
            let (a, b) = (
                fisher(&params, &values, g32).unwrap(),
                fisher_reference(&params, &values, g32),
            );
            assert!(close(a, b, 1e-12), "fisher f32 {rows}: {a} vs {b}");
            // ntk_cond: the Gram matrix entry by entry, then the score.
            for width in [1, 45, 1037, cols] {
                let sub: Vec<f32> = (0..rows)
                    .flat_map(|i| d32[i * cols..i * cols + width].to_vec())
                    .collect();
                let m = Matrix {
                    data: &sub[..],
                    rows,
                    cols: width,
                };
                let want = ntk_gram_reference(m);
                let got = gram_rows(m.data, rows, width);
                // Within 1e-12 of the entry's scale √(K_aa·K_bb) ≥ Σ_k |g_ak·g_bk|: an entry
                // that nearly cancels is no more accurate than that in the old order either.
                for a in 0..rows {
                    for b in 0..rows {
                        let (x, y) = (got[a * rows + b], want[a * rows + b]);
                        let scale = (want[a * rows + a] * want[b * rows + b]).sqrt();
                        assert!(
                            (x - y).abs() <= 1e-12 * scale,
                            "ntk gram {rows}x{width} ({a}, {b}): {x} vs {y}"
                        );
                    }
                }
            }
            if rows <= 7 {
                let want = symmetric_eigenvalues(&ntk_gram_reference(g64), rows);
                let (a, b) = (ntk_cond(g64).unwrap(), -(want[rows - 1] / want[0]));
                assert!(close(a, b, 1e-9), "ntk_cond {rows}: {a} vs {b}");
            }
        }
        // Larger per-sample matrices than a ZiCo chunk holds (64 rows × 1024 f64 columns).
        let wide = [param("w", "w", role::WEIGHT, &[2, 2500], 0, Some(0))];
        let data = random(64 * 5000, 9);
        let g = Matrix {
            data: &data[..],
            rows: 64,
            cols: 5000,
        };
        assert_eq!(zico(&wide, g), zico_reference(&wide, g));
    }

    /// The former `naswot` kernel: bytes compared one by one.
    fn agreements_reference(codes: Matrix<u8>) -> Vec<u64> {
        let n = codes.rows;
        let mut k = vec![0u64; n * n];
        for a in 0..n {
            for b in 0..n {
                k[a * n + b] = codes
                    .row(a)
                    .iter()
                    .zip(codes.row(b))
                    .filter(|(x, y)| x == y)
                    .count() as u64;
            }
        }
        k
    }

    #[test]
    fn packed_naswot_equals_the_byte_definition() {
        for rows in [1, 7, 64] {
            for units in [0, 1, 7, 63, 64, 65, 200, 1000] {
                let r = random(rows * units, (rows * 7919 + units) as u64);
                // Mostly 0/1 with long runs, so some rows agree often.
                let codes: Vec<u8> = r.iter().map(|&v| (v > -0.3) as u8).collect();
                let m = Matrix {
                    data: &codes[..],
                    rows,
                    cols: units,
                };
                let want = agreements_reference(m);
                assert_eq!(agreements(m), want, "{rows}x{units}");
                assert!(pack_binary_codes(m).is_some());
                let k: Vec<f64> = want.iter().map(|&a| a as f64).collect();
                let (a, b) = (naswot(m), slogdet(&k, rows).1);
                assert!(a == b || (a.is_infinite() && b.is_infinite()), "{a} vs {b}");
                // Codes other than 0/1 fall back to comparing bytes.
                if rows * units > 0 {
                    let mut other = codes.clone();
                    other[rows * units / 2] = 2;
                    let m = Matrix {
                        data: &other[..],
                        rows,
                        cols: units,
                    };
                    assert!(pack_binary_codes(m).is_none());
                    assert_eq!(
                        agreements(m),
                        agreements_reference(m),
                        "{rows}x{units} non-binary"
                    );
                }
            }
        }
        // Both hamming kernels agree with each other.
        let r = random(7 * 300, 3);
        let codes: Vec<u8> = r.iter().map(|&v| (v > 0.0) as u8).collect();
        let m = Matrix {
            data: &codes[..],
            rows: 7,
            cols: 300,
        };
        let (bits, words) = pack_binary_codes(m).unwrap();
        assert_eq!(
            hamming_gram(&bits, 7, words),
            hamming_gram_portable(&bits, 7, words)
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

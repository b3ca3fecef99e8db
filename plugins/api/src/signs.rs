//! Packed gradient signs (`inputs::SIGNS`): two bit-planes per row, `pos` (g > 0) and `neg`
//! (g < 0), `words` u64 words per row, column c at bit c % 64 of word c / 64. 2 bits per value
//! instead of 32 lets the host stream gradients that do not fit in memory, and the sign-based
//! scorers (GradSign, GradAlign) need nothing more: every quantity they use is an integer sum
//! over columns, so block-wise packing gives the same result as the whole matrix.

/// Borrowed planes: `rows × words` each.
#[derive(Clone, Copy, Debug)]
pub struct SignPlanes<'a> {
    pub pos: &'a [u64],
    pub neg: &'a [u64],
    pub rows: usize,
    pub words: usize,
    pub cols: usize,
}

impl<'a> SignPlanes<'a> {
    pub fn row(&self, i: usize) -> (&'a [u64], &'a [u64]) {
        let r = i * self.words..(i + 1) * self.words;
        (&self.pos[r.clone()], &self.neg[r])
    }
    /// ⟨s_i, t_j⟩ for row i of `self` and row j of `other` (same columns).
    pub fn dot_with(&self, i: usize, other: &SignPlanes, j: usize) -> i64 {
        let ((ap, an), (bp, bn)) = (self.row(i), other.row(j));
        let mut same = 0u64;
        let mut diff = 0u64;
        for w in 0..self.words {
            same += ((ap[w] & bp[w]) | (an[w] & bn[w])).count_ones() as u64;
            diff += ((ap[w] & bn[w]) | (an[w] & bp[w])).count_ones() as u64;
        }
        same as i64 - diff as i64
    }
    pub fn dot(&self, i: usize, j: usize) -> i64 {
        self.dot_with(i, self, j)
    }
    /// Σ_i s_ik for every column k.
    pub fn column_sums(&self) -> Vec<i64> {
        let mut acc = vec![0i64; self.cols];
        for i in 0..self.rows {
            let (p, n) = self.row(i);
            for w in 0..self.words {
                let (mut pw, mut nw) = (p[w], n[w]);
                while pw != 0 {
                    acc[w * 64 + pw.trailing_zeros() as usize] += 1;
                    pw &= pw - 1;
                }
                while nw != 0 {
                    acc[w * 64 + nw.trailing_zeros() as usize] -= 1;
                    nw &= nw - 1;
                }
            }
        }
        acc
    }
}

/// Owned planes, filled row by row or block by block.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedSigns {
    pub pos: Vec<u64>,
    pub neg: Vec<u64>,
    pub rows: usize,
    pub words: usize,
    pub cols: usize,
}

impl PackedSigns {
    pub fn zeros(rows: usize, cols: usize) -> PackedSigns {
        let words = cols.div_ceil(64);
        PackedSigns {
            pos: vec![0; rows * words],
            neg: vec![0; rows * words],
            rows,
            words,
            cols,
        }
    }
    /// Set columns `start .. start + values.len()` of row `i` from raw values (NaN and zero
    /// leave both planes clear).
    pub fn set<T: Copy + Into<f64>>(&mut self, i: usize, start: usize, values: &[T]) {
        let base = i * self.words;
        let end = start + values.len();
        assert!(
            end <= self.cols,
            "columns {start}..{end} beyond {}",
            self.cols
        );
        let mut c = start;
        let mut vals = values;
        // Bit by bit up to the first word boundary, whole words after it, bit by bit at the end.
        while c % 64 != 0 && !vals.is_empty() {
            self.set_bit(base, c, vals[0].into());
            c += 1;
            vals = &vals[1..];
        }
        let mut chunks = vals.chunks_exact(64);
        for chunk in &mut chunks {
            let (mut pw, mut nw) = (0u64, 0u64);
            for (j, &v) in chunk.iter().enumerate() {
                let v: f64 = v.into();
                pw |= ((v > 0.0) as u64) << j;
                nw |= ((v < 0.0) as u64) << j;
            }
            let w = base + c / 64;
            self.pos[w] = pw;
            self.neg[w] = nw;
            c += 64;
        }
        for &v in chunks.remainder() {
            self.set_bit(base, c, v.into());
            c += 1;
        }
    }
    fn set_bit(&mut self, base: usize, c: usize, v: f64) {
        let (w, b) = (base + c / 64, 1u64 << (c % 64));
        self.pos[w] &= !b;
        self.neg[w] &= !b;
        if v > 0.0 {
            self.pos[w] |= b;
        } else if v < 0.0 {
            self.neg[w] |= b;
        }
    }
    /// Pack a row-major `rows × cols` matrix.
    pub fn from_matrix<T: Copy + Into<f64>>(data: &[T], rows: usize, cols: usize) -> PackedSigns {
        let mut p = PackedSigns::zeros(rows, cols);
        for i in 0..rows {
            p.set(i, 0, &data[i * cols..(i + 1) * cols]);
        }
        p
    }
    pub fn planes(&self) -> SignPlanes<'_> {
        SignPlanes {
            pos: &self.pos,
            neg: &self.neg,
            rows: self.rows,
            words: self.words,
            cols: self.cols,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_column_sums_match_the_definition() {
        // 3 rows × 70 columns (two words), values in {-1, 0, 1} × scale.
        let mut data = vec![0.0f64; 3 * 70];
        for (k, v) in data.iter_mut().enumerate() {
            *v = [(1.5), (-0.25), (0.0)][(k * 7 + k / 3) % 3];
        }
        let p = PackedSigns::from_matrix(&data, 3, 70);
        let s = |v: f64| v.signum() as i64 * (v != 0.0) as i64;
        for i in 0..3 {
            for j in 0..3 {
                let want: i64 = (0..70)
                    .map(|k| s(data[i * 70 + k]) * s(data[j * 70 + k]))
                    .sum();
                assert_eq!(p.planes().dot(i, j), want);
            }
        }
        let sums = p.planes().column_sums();
        for k in 0..70 {
            assert_eq!(sums[k], (0..3).map(|i| s(data[i * 70 + k])).sum::<i64>());
        }
        // Block-wise filling equals whole-row packing.
        let mut q = PackedSigns::zeros(3, 70);
        for i in 0..3 {
            q.set(i, 40, &data[i * 70 + 40..(i + 1) * 70]);
            q.set(i, 0, &data[i * 70..i * 70 + 40]);
        }
        assert_eq!(p, q);
        // Word-at-a-time packing equals the bit-by-bit definition, for blocks starting and
        // ending anywhere, overwriting earlier values, with NaN read as no sign.
        let cols = 300;
        let vals: Vec<f32> = (0..cols)
            .map(|k| match (k * 13 + k / 7) % 4 {
                0 => 0.5,
                1 => -2.0,
                2 => 0.0,
                _ => f32::NAN,
            })
            .collect();
        for (a, b) in [(0, 300), (3, 64), (63, 129), (64, 256), (100, 300), (5, 6)] {
            let mut fast = PackedSigns::from_matrix(&vec![1.0f32; cols], 1, cols);
            fast.set(0, a, &vals[a..b]);
            let mut slow = PackedSigns::from_matrix(&vec![1.0f32; cols], 1, cols);
            for c in a..b {
                slow.set_bit(0, c, vals[c] as f64);
            }
            assert_eq!(fast, slow, "block {a}..{b}");
        }
    }
}

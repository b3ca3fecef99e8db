//! The kernels' arithmetic on one row (or stretch) of a tensor, in pure Rust: sums in f64 over
//! eight independent lanes, so that they vectorise, and element-wise steps in the row's type in
//! the order the standard-op form computes them.

use ort::value::TensorElementType;

/// The float types the kernels run in.
pub trait Float: Copy + Send + Sync + PartialOrd + 'static {
    const TYPE: TensorElementType;
    const ZERO: Self;
    const ONE: Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn add(self, o: Self) -> Self;
}

impl Float for f32 {
    const TYPE: TensorElementType = TensorElementType::Float32;
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn sub(self, o: f32) -> f32 {
        self - o
    }
    fn mul(self, o: f32) -> f32 {
        self * o
    }
    fn add(self, o: f32) -> f32 {
        self + o
    }
}

impl Float for f64 {
    const TYPE: TensorElementType = TensorElementType::Float64;
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn sub(self, o: f64) -> f64 {
        self - o
    }
    fn mul(self, o: f64) -> f64 {
        self * o
    }
    fn add(self, o: f64) -> f64 {
        self + o
    }
}

const LANES: usize = 8;

/// Σ f(i) over `0..n` in f64, in eight interleaved partial sums.
#[inline(always)]
fn sum_f64(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += LANES;
    }
    let mut tail = 0.0;
    for j in full..n {
        tail += f(j);
    }
    acc.iter().sum::<f64>() + tail
}

/// One row of `GaStandardize`: writes `x̂` and returns `1/σ`. Mean and biased variance in f64
/// (two passes); `x̂ = (x − mean)·(1/σ)` in the row's type, as the standard form computes it.
pub fn standardize_row<T: Float>(x: &[T], eps: f64, xh: &mut [T]) -> T {
    let (m, inv) = row_stats(x, eps);
    for (o, &v) in xh.iter_mut().zip(x) {
        *o = v.sub(m).mul(inv);
    }
    inv
}

/// One row of `GaStandardizeGrad`: `dx = (1/σ)·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`.
pub fn standardize_grad_row<T: Float>(dxh: &[T], xh: &[T], inv: T, dx: &mut [T]) {
    let n = dxh.len();
    let m1 = T::from_f64(sum_f64(n, |i| dxh[i].to_f64()) / n as f64);
    let m2 = T::from_f64(sum_f64(n, |i| dxh[i].to_f64() * xh[i].to_f64()) / n as f64);
    for ((o, &g), &h) in dx.iter_mut().zip(dxh).zip(xh) {
        *o = g.sub(m1).sub(h.mul(m2)).mul(inv);
    }
}

/// Mean and `1/σ` of a row in f64 (two passes, biased variance), returned in the row's type.
fn row_stats<T: Float>(x: &[T], eps: f64) -> (T, T) {
    let n = x.len();
    let mean = sum_f64(n, |i| x[i].to_f64()) / n as f64;
    let var = sum_f64(n, |i| {
        let d = x[i].to_f64() - mean;
        d * d
    }) / n as f64;
    (T::from_f64(mean), T::from_f64(1.0 / (var + eps).sqrt()))
}

/// One row of `GaNormAffine`: `y = ((x − mean)·(1/σ))·γ + β`; returns `(mean, 1/σ)`.
pub fn norm_affine_row<T: Float>(x: &[T], eps: f64, g: T, b: T, y: &mut [T]) -> (T, T) {
    let (m, inv) = row_stats(x, eps);
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.sub(m).mul(inv).mul(g).add(b);
    }
    (m, inv)
}

/// One row of `GaNormAffineGrad`: with `dx̂ = dY·γ` and `x̂ = (x − mean)·(1/σ)` recomputed,
/// `dx = (1/σ)·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`.
pub fn norm_affine_grad_row<T: Float>(dy: &[T], x: &[T], m: T, inv: T, g: T, dx: &mut [T]) {
    let n = dy.len();
    let dxh = |i: usize| dy[i].mul(g);
    let xh = |i: usize| x[i].sub(m).mul(inv);
    let m1 = T::from_f64(sum_f64(n, |i| dxh(i).to_f64()) / n as f64);
    let m2 = T::from_f64(sum_f64(n, |i| dxh(i).to_f64() * xh(i).to_f64()) / n as f64);
    for (i, o) in dx.iter_mut().enumerate() {
        *o = dxh(i).sub(m1).sub(xh(i).mul(m2)).mul(inv);
    }
}

/// `GaReluGrad` on a stretch: `dY · [y > 0]` with `y = Relu(x)` (a product, so a non-finite dY
/// stays non-finite).
pub fn relu_grad<T: Float>(y: &[T], dy: &[T], out: &mut [T]) {
    for ((o, &v), &g) in out.iter_mut().zip(y).zip(dy) {
        *o = g.mul(if v > T::ZERO { T::ONE } else { T::ZERO });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardize_row_matches_the_definition() {
        let x: Vec<f64> = (0..19).map(|i| ((i * 7) % 11) as f64 * 0.3 - 1.0).collect();
        let mut xh = vec![0.0; x.len()];
        let inv = standardize_row(&x, 1e-5, &mut xh);
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!((inv - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-12);
        for (a, v) in xh.iter().zip(&x) {
            assert!((a - (v - mean) * inv).abs() < 1e-12);
        }
    }

    #[test]
    fn standardize_grad_row_is_the_vjp_of_standardize() {
        // Finite differences of Σ w·x̂(x) against the kernel's dx for dx̂ = w.
        let x: Vec<f64> = (0..13).map(|i| ((i * 5) % 7) as f64 * 0.4 - 0.9).collect();
        let w: Vec<f64> = (0..13).map(|i| ((i * 3) % 5) as f64 - 2.0).collect();
        let f = |x: &[f64]| {
            let mut xh = vec![0.0; x.len()];
            standardize_row(x, 1e-5, &mut xh);
            xh.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut xh = vec![0.0; x.len()];
        let inv = standardize_row(&x, 1e-5, &mut xh);
        let mut dx = vec![0.0; x.len()];
        standardize_grad_row(&w, &xh, inv, &mut dx);
        for i in 0..x.len() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += 1e-6;
            m[i] -= 1e-6;
            let fd = (f(&p) - f(&m)) / 2e-6;
            assert!((fd - dx[i]).abs() < 1e-6, "x[{i}]: {fd} vs {}", dx[i]);
        }
    }

    #[test]
    fn norm_affine_grad_row_is_the_vjp_of_norm_affine() {
        let x: Vec<f64> = (0..11).map(|i| ((i * 4) % 9) as f64 * 0.3 - 1.1).collect();
        let w: Vec<f64> = (0..11).map(|i| ((i * 7) % 5) as f64 - 1.5).collect();
        let (g, b) = (1.7, -0.4);
        let f = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            norm_affine_row(x, 1e-5, g, b, &mut y);
            y.iter().zip(&w).map(|(a, c)| a * c).sum::<f64>()
        };
        let mut y = vec![0.0; x.len()];
        let (m, inv) = norm_affine_row(&x, 1e-5, g, b, &mut y);
        let mut xh = vec![0.0; x.len()];
        standardize_row(&x, 1e-5, &mut xh);
        for (yi, h) in y.iter().zip(&xh) {
            assert!((yi - (h * g + b)).abs() < 1e-12);
        }
        let mut dx = vec![0.0; x.len()];
        norm_affine_grad_row(&w, &x, m, inv, g, &mut dx);
        for i in 0..x.len() {
            let (mut p, mut q) = (x.clone(), x.clone());
            p[i] += 1e-6;
            q[i] -= 1e-6;
            let fd = (f(&p) - f(&q)) / 2e-6;
            assert!((fd - dx[i]).abs() < 1e-6, "x[{i}]: {fd} vs {}", dx[i]);
        }
    }

    #[test]
    fn relu_grad_masks_by_the_input_and_keeps_non_finite_gradients() {
        let x = [1.0f32, 0.0, -2.0, 3.0];
        let dy = [0.5f32, 0.5, f32::INFINITY, f32::NAN];
        let mut out = [9.0f32; 4];
        relu_grad(&x, &dy, &mut out);
        assert_eq!(&out[..2], &[0.5, 0.0]);
        assert!(out[2].is_nan(), "∞·0 must stay visible as NaN");
        assert!(out[3].is_nan());
    }
}

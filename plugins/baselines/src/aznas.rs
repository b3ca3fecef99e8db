//! AZ-NAS's feature-map components (Lee & Ham, CVPR 2024; the authors' `compute_az_nas_score.py`):
//! expressivity and progressivity, from the channel covariance of every Conv output over all
//! probe samples and positions (`FEATURE_COVARIANCE`: the host computes it once, one layer at a
//! time, for every scorer that asks).
//!
//! For one layer, the features of all samples and positions are the rows of an (N·H·W) × C
//! matrix; its column-centred covariance Σ = FᵀF / (N·H·W) has eigenvalues s, and the layer's
//! expressivity is the entropy of p = s / Σ s, −Σ p ln(p + 1e-8). Expressivity sums the layers;
//! progressivity is the smallest increase of that entropy from one layer to the next (graph order).
//! The spectrum comes from tridiagonal QL (accurate relative to ‖Σ‖, which is all an entropy of
//! s / Σ s needs; LAPACK's `eigvalsh` in the reference is the same kind of method).
//!
//! Two kinds of layer are left out, because the authors measure block outputs, where neither can
//! appear: a layer with constant features (zero covariance: a Conv fed only by a path that carries
//! zeros), and a layer whose output cannot reach the logits (`live` false: every path from it is
//! multiplied by a constant zero, a Conv inside a dead NAS-Bench-201 edge). Counting the second
//! kind made progressivity rank networks whose only "progress" happens in dead cells.

use gradalign_plugin_api::linalg::symmetric_eigenvalues_ql;
use gradalign_plugin_api::{BlockJacobian, FeatureCovariance, Matrix};

/// A block whose backward pass returns its input unchanged scores −∞ in the authors' code; a
/// score must be finite here, so it counts as this (below any real pair's value, which is at
/// least about −1e6 for a vanishing Jacobian).
pub const IDENTITY_BLOCK: f64 = -1e12;

/// The entropy of each live layer's normalised covariance spectrum, in graph order.
pub fn layer_expressivity(f: &FeatureCovariance) -> Result<Vec<f64>, String> {
    if f.layers.is_empty() {
        return Err("the model has no Conv layer: no feature maps for AZ-NAS".into());
    }
    let mut out = Vec::with_capacity(f.layers.len());
    for (l, layer) in f.layers.iter().enumerate() {
        if !layer.live {
            continue;
        }
        let s = symmetric_eigenvalues_ql(f.layer(l).data, layer.channels);
        let total: f64 = s.iter().sum();
        if !total.is_finite() {
            return Err(format!("layer {} has non-finite features", layer.node));
        }
        if total <= 0.0 {
            continue;
        }
        let h: f64 = s
            .iter()
            .map(|v| {
                let p = v / total;
                -p * (p + 1e-8).ln()
            })
            .sum();
        out.push(h);
    }
    if out.is_empty() {
        return Err(
            "every Conv output is constant over the probe or cannot reach the logits: no feature \
             spectrum"
                .into(),
        );
    }
    Ok(out)
}

/// Σ over layers of the spectrum entropy.
pub fn expressivity(f: &FeatureCovariance) -> Result<f64, String> {
    Ok(layer_expressivity(f)?.iter().sum())
}

/// min over consecutive layers of (entropy of layer l+1 − entropy of layer l).
pub fn progressivity(f: &FeatureCovariance) -> Result<f64, String> {
    let e = layer_expressivity(f)?;
    if e.len() < 2 {
        return Err(
            "progressivity needs at least two live Conv layers with non-constant outputs".into(),
        );
    }
    Ok(e.windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min))
}

/// The largest singular value of `m`, from the eigenvalues of its smaller Gram matrix.
pub fn largest_singular_value(m: &Matrix<f64>) -> f64 {
    let (r, c) = (m.rows, m.cols);
    let k = r.min(c);
    let mut gram = vec![0.0f64; k * k];
    if c <= r {
        // MᵀM, c × c.
        for row in m.data.chunks_exact(c) {
            for i in 0..c {
                let v = row[i];
                if v != 0.0 {
                    for j in 0..c {
                        gram[i * c + j] += v * row[j];
                    }
                }
            }
        }
    } else {
        // MMᵀ, r × r.
        for i in 0..r {
            for j in 0..r {
                let (a, b) = (&m.data[i * c..(i + 1) * c], &m.data[j * c..(j + 1) * c]);
                gram[i * r + j] = a.iter().zip(b).map(|(x, y)| x * y).sum();
            }
        }
    }
    let top = symmetric_eigenvalues_ql(&gram, k)
        .into_iter()
        .fold(0.0f64, f64::max);
    top.max(0.0).sqrt()
}

/// AZ-NAS trainability: over consecutive block outputs, the mean of −σ − 1/(σ + 1e-6) + 2, σ the
/// largest singular value of the pair's E[g_in g_outᵀ] (0 at σ = 1: the block neither shrinks
/// nor amplifies the backward signal).
pub fn trainability(b: &BlockJacobian) -> Result<f64, String> {
    if b.pairs.is_empty() {
        return Err("no pair of block outputs for AZ-NAS trainability".into());
    }
    let mut sum = 0.0;
    for (k, p) in b.pairs.iter().enumerate() {
        sum += if p.identity != 0 {
            IDENTITY_BLOCK
        } else {
            let s = largest_singular_value(&b.pair(k));
            if !s.is_finite() {
                return Err(format!("block pair {k} has non-finite gradients"));
            }
            -s - 1.0 / (s + 1e-6) + 2.0
        };
    }
    Ok(sum / b.pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradalign_plugin_api::abi::GaBlockPair;
    use gradalign_plugin_api::FeatureLayer;

    #[test]
    fn trainability_by_hand() {
        // Pair 0: diag(3, 1) → σ = 3, score −3 − 1/3 + 2 (to 1e-6). Pair 1: a 3 × 2 rank-one
        // matrix u vᵀ with |u| = 2, |v| = 1 → σ = 2. Pair 2: an identity block.
        let data = [3.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let pair = |rows, cols, offset, identity| GaBlockPair {
            rows,
            cols,
            offset,
            identity,
        };
        let two = BlockJacobian::new(&data, vec![pair(2, 2, 0, 0), pair(3, 2, 4, 0)]).unwrap();
        let want0 = -3.0 - 1.0 / (3.0 + 1e-6) + 2.0;
        let want1 = -2.0 - 1.0 / (2.0 + 1e-6) + 2.0;
        let got = trainability(&two).unwrap();
        assert!((got - (want0 + want1) / 2.0).abs() < 1e-12, "{got}");
        // The wide orientation (2 × 3, MMᵀ) gives the same σ.
        let wide = [0.0, 2.0, 0.0, 0.0, 0.0, 0.0];
        let w = BlockJacobian::new(&wide, vec![pair(2, 3, 0, 0)]).unwrap();
        assert!((largest_singular_value(&w.pair(0)) - 2.0).abs() < 1e-12);
        let with_id = BlockJacobian::new(&data, vec![pair(2, 2, 0, 0), pair(2, 2, 0, 1)]).unwrap();
        assert_eq!(
            trainability(&with_id).unwrap(),
            (want0 + IDENTITY_BLOCK) / 2.0
        );
        assert!(BlockJacobian::new(&data, vec![pair(3, 3, 4, 0)]).is_err());
    }

    fn layer(channels: usize, live: bool) -> FeatureLayer {
        FeatureLayer {
            node: format!("conv{channels}{live}"),
            channels,
            spatial: 4,
            offset: 0,
            live,
        }
    }

    #[test]
    fn by_hand_two_channel_layers() {
        // Layer 0: two identical channels → Σ = [[a, a], [a, a]], spectrum {2a, 0}, p = {1, 0}:
        // entropy −ln(1 + 1e-8) ≈ −1e-8. Layer 1: two uncorrelated channels of equal variance →
        // p = {½, ½}: entropy ln 2.
        let cov = [1.25, 1.25, 1.25, 1.25, 1.0, 0.0, 0.0, 1.0];
        let f = FeatureCovariance::new(&cov, vec![layer(2, true), layer(2, true)]).unwrap();
        let e = layer_expressivity(&f).unwrap();
        let want0 = -(1.0f64 + 1e-8).ln();
        let want1 = -(0.5f64 + 1e-8).ln();
        assert!((e[0] - want0).abs() < 1e-12, "{e:?}");
        assert!((e[1] - want1).abs() < 1e-12, "{e:?}");
        assert!((expressivity(&f).unwrap() - (want0 + want1)).abs() < 1e-12);
        assert!((progressivity(&f).unwrap() - (want1 - want0)).abs() < 1e-12);
    }

    #[test]
    fn dead_and_constant_layers_are_left_out() {
        // Layer 0 constant (zero covariance), layer 1 live with entropy ln 2, layer 2 the same
        // spectrum but unable to reach the logits: only layer 1 counts.
        let mut cov = vec![0.0; 4];
        cov.extend([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        let f = FeatureCovariance::new(&cov, vec![layer(2, true), layer(2, true), layer(2, false)])
            .unwrap();
        let ln2 = -(0.5f64 + 1e-8).ln();
        let e = layer_expressivity(&f).unwrap();
        assert!(e.len() == 1 && (e[0] - ln2).abs() < 1e-12, "{e:?}");
        assert!(progressivity(&f)
            .unwrap_err()
            .contains("two live Conv layers"));
        // The same covariances, all live: three layers, progressivity defined.
        let f = FeatureCovariance::new(&cov, vec![layer(2, true); 3]).unwrap();
        assert_eq!(layer_expressivity(&f).unwrap().len(), 2);
        assert!(progressivity(&f).unwrap().abs() < 1e-12);
        let z = [0.0; 8];
        let f = FeatureCovariance::new(&z, vec![layer(2, true), layer(2, true)]).unwrap();
        assert!(expressivity(&f)
            .unwrap_err()
            .contains("every Conv output is constant"));
        let nan = [f64::NAN; 4];
        let f = FeatureCovariance::new(&nan, vec![layer(2, true)]).unwrap();
        assert!(expressivity(&f).unwrap_err().contains("conv2true"));
        assert!(FeatureCovariance::new(&nan, vec![layer(3, true)]).is_err());
    }
}

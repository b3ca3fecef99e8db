//! AZ-NAS's feature-map components (Lee & Ham, CVPR 2024; the authors' `compute_az_nas_score.py`):
//! expressivity and progressivity, computed on the Conv outputs of every probe sample.
//!
//! For one layer, the features of all samples and positions are the rows of an (N·H·W) × C
//! matrix; its column-centred covariance Σ = FᵀF / (N·H·W) has eigenvalues s, and the layer's
//! expressivity is the entropy of p = s / Σ s, −Σ p ln(p + 1e-8). Expressivity sums the layers;
//! progressivity is the smallest increase of that entropy from one layer to the next (graph order).
//! A layer with constant features (zero covariance) is left out.

use gradalign_plugin_api::linalg::{gram_rows, symmetric_eigenvalues};
use gradalign_plugin_api::FeatureMaps;

/// The entropy of each live layer's normalised covariance spectrum, in graph order.
pub fn layer_expressivity(f: &FeatureMaps) -> Result<Vec<f64>, String> {
    let n = f.maps.rows;
    if n == 0 {
        return Err("AZ-NAS needs at least one sample".into());
    }
    if f.layers.is_empty() {
        return Err("the model has no Conv layer: no feature maps for AZ-NAS".into());
    }
    let mut out = Vec::with_capacity(f.layers.len());
    for (l, layer) in f.layers.iter().enumerate() {
        let (c, hw) = (layer.channels, layer.spatial);
        let m = (n * hw) as f64;
        // Channel-major copy of every sample's map: row k holds channel k over (sample, position).
        let mut x = vec![0.0f64; c * n * hw];
        for i in 0..n {
            let s = f.layer(i, l);
            for k in 0..c {
                x[k * n * hw + i * hw..k * n * hw + (i + 1) * hw]
                    .copy_from_slice(&s.data[k * hw..(k + 1) * hw]);
            }
        }
        // Centre first (as the authors do), so the covariance carries no cancellation.
        for row in x.chunks_mut(n * hw) {
            let mean = row.iter().sum::<f64>() / m;
            row.iter_mut().for_each(|v| *v -= mean);
        }
        let sigma: Vec<f64> = gram_rows(&x, c, n * hw).iter().map(|v| v / m).collect();
        let s = symmetric_eigenvalues(&sigma, c);
        let total: f64 = s.iter().sum();
        if !total.is_finite() {
            return Err(format!("layer {} has non-finite features", layer.node));
        }
        // Features constant over every sample and position (a Conv fed only by a path that
        // carries zeros) have no spectrum and take no part in the network's function: the layer
        // is left out, as the authors' block outputs never show a Conv inside a dead path.
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
        return Err("every Conv output is constant over the probe: no feature spectrum".into());
    }
    Ok(out)
}

/// Σ over layers of the spectrum entropy.
pub fn expressivity(f: &FeatureMaps) -> Result<f64, String> {
    Ok(layer_expressivity(f)?.iter().sum())
}

/// min over consecutive layers of (entropy of layer l+1 − entropy of layer l).
pub fn progressivity(f: &FeatureMaps) -> Result<f64, String> {
    let e = layer_expressivity(f)?;
    if e.len() < 2 {
        return Err(
            "progressivity needs at least two Conv layers with non-constant outputs".into(),
        );
    }
    Ok(e.windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gradalign_plugin_api::{FeatureLayer, Matrix};

    fn maps<'a>(data: &'a [f64], n: usize, layers: Vec<FeatureLayer>) -> FeatureMaps<'a> {
        let cols = data.len() / n;
        FeatureMaps {
            maps: Matrix {
                data,
                rows: n,
                cols,
            },
            layers,
        }
    }

    fn layer(channels: usize, spatial: usize, offset: usize) -> FeatureLayer {
        FeatureLayer {
            node: format!("conv{offset}"),
            channels,
            spatial,
            offset,
        }
    }

    #[test]
    fn by_hand_two_channel_layers() {
        // Layer 0: two channels with identical centred values → covariance [[a, a], [a, a]],
        // spectrum {2a, 0}, p = {1, 0}: entropy −ln(1 + 1e-8) ≈ −1e-8.
        // Layer 1: two uncorrelated channels of equal variance → p = {½, ½}: entropy ln 2.
        // One sample, spatial 4 per channel.
        let l0 = [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        let l1 = [1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0];
        let data: Vec<f64> = l0.iter().chain(l1.iter()).copied().collect();
        let f = maps(&data, 1, vec![layer(2, 4, 0), layer(2, 4, 8)]);
        let e = layer_expressivity(&f).unwrap();
        let want0 = -(1.0f64 + 1e-8).ln() - 0.0 * (1e-8f64).ln();
        let want1 = -(0.5f64 + 1e-8).ln();
        assert!((e[0] - want0).abs() < 1e-12, "{e:?}");
        assert!((e[1] - want1).abs() < 1e-12, "{e:?}");
        assert!((expressivity(&f).unwrap() - (want0 + want1)).abs() < 1e-12);
        assert!((progressivity(&f).unwrap() - (want1 - want0)).abs() < 1e-12);
    }

    #[test]
    fn samples_pool_into_one_covariance() {
        // The same four positions split over two samples give the same spectrum as one sample.
        let one = [1.0, -1.0, 2.0, 0.5, 3.0, 1.0, -2.0, 0.0];
        let f1 = maps(&one, 1, vec![layer(2, 4, 0)]);
        // Sample 0: positions 0, 1; sample 1: positions 2, 3 (channel-major within a sample).
        let two = [1.0, -1.0, 3.0, 1.0, 2.0, 0.5, -2.0, 0.0];
        let f2 = maps(&two, 2, vec![layer(2, 2, 0)]);
        let (a, b) = (expressivity(&f1).unwrap(), expressivity(&f2).unwrap());
        assert!((a - b).abs() < 1e-12, "{a} {b}");
    }

    #[test]
    fn constant_layers_are_left_out_and_single_layer_is_an_error() {
        // Layer 0 constant (zero covariance): left out; layer 1 as above, ln 2.
        let mut d = vec![3.0; 8];
        d.extend([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0]);
        let f = maps(&d, 1, vec![layer(2, 4, 0), layer(2, 4, 8)]);
        let ln2 = -(0.5f64 + 1e-8).ln();
        let e = layer_expressivity(&f).unwrap();
        assert!(e.len() == 1 && (e[0] - ln2).abs() < 1e-12, "{e:?}");
        assert!(progressivity(&f).unwrap_err().contains("two Conv layers"));
        let z = [0.0; 16];
        let f = maps(&z, 1, vec![layer(2, 4, 0), layer(2, 4, 8)]);
        assert!(expressivity(&f)
            .unwrap_err()
            .contains("every Conv output is constant"));
        let nan = [f64::NAN; 8];
        let f = maps(&nan, 1, vec![layer(2, 4, 0)]);
        assert!(expressivity(&f).unwrap_err().contains("conv0"));
        let one = [1.0, -1.0, 2.0, 0.5, 3.0, 1.0, -2.0, 0.0];
        let f = maps(&one, 1, vec![layer(2, 4, 0)]);
        assert!(progressivity(&f).unwrap_err().contains("two Conv layers"));
    }
}

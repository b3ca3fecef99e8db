//! AZ-NAS trainability's input (docs/semantics.md, Scorers): for each pair of consecutive block
//! outputs (see `autodiff::blocks`), the vector-Jacobian product g_in = (∂to/∂from)ᵀ s of fixed
//! random signs s, reduced on the host to the matrix M = Σ g_in s_outᵀ / (N · positions) over
//! samples and output positions, after folding each stride × stride patch of the earlier
//! output into channels when the later one is smaller (PyTorch's `pixel_unshuffle` order). One
//! graph run computes every pair.

use anyhow::{bail, Result};
use ndarray::Array2;

use crate::autodiff::blocks::{rademacher, BlockVjpOutput};
use crate::autodiff::builder::{GraphSpec, Loss};
use crate::autodiff::GradOptions;
use crate::inputs::engine::load_probe_graph;
use crate::inputs::probe::Probe;
use crate::onnx::Model;
use crate::runtime::{Backend, Device};

pub use gradalign_plugin_api::abi::GaBlockPair as BlockPair;

/// The pair matrices one after another (`pairs[k].offset`), with the block outputs' names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockJacobian {
    pub data: Vec<f64>,
    pub pairs: Vec<BlockPair>,
    /// (earlier, later) block output of each pair.
    pub names: Vec<(String, String)>,
    /// The runtime that ran the graph.
    pub runtime: &'static str,
}

pub fn block_jacobian(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    backend: Backend,
    device: Device,
) -> Result<BlockJacobian> {
    let spec = GraphSpec {
        loss: Loss::SumLogits,
        param_grads: false,
        block_vjps: true,
        ..Default::default()
    };
    let (an, gg, runner) = load_probe_graph(model, probe, opts, spec, backend, device)?;
    let images = probe.images_tensor().cast(an.float);
    let mut out = BlockJacobian {
        runtime: runner.name(),
        ..Default::default()
    };
    runner.run_visit(&images, &probe.labels, &mut |k, o| {
        if k == 0 {
            return Ok(());
        }
        let Some(b) = gg.block_vjps.get(k - 1) else {
            bail!("the block graph has more outputs than block pairs");
        };
        let g = o.to_f64_vec();
        let (m, pair) = pair_matrix(b, &g)?;
        out.pairs.push(BlockPair {
            offset: out.data.len() as u64,
            ..pair
        });
        out.data.extend(m);
        out.names.push((b.from.clone(), b.to.clone()));
        Ok(())
    })?;
    if out.pairs.len() != gg.block_vjps.len() {
        bail!(
            "the block graph returned {} of {} pair outputs",
            out.pairs.len(),
            gg.block_vjps.len()
        );
    }
    Ok(out)
}

/// M for one pair from g_in (`[N, C_in, H_in, W_in]`, flat) and the pair's signs.
pub fn pair_matrix(b: &BlockVjpOutput, g: &[f64]) -> Result<(Vec<f64>, BlockPair)> {
    let [n, ci, hi, wi] = dims(&b.from_shape, &b.from)?;
    let [n2, co, ho, wo] = dims(&b.to_shape, &b.to)?;
    if n != n2 || g.len() != n * ci * hi * wi {
        bail!(
            "block pair {} -> {}: gradient of {} values for shape {:?}",
            b.from,
            b.to,
            g.len(),
            b.from_shape
        );
    }
    let st = hi / ho;
    if st == 0 || hi != st * ho || wi != st * wo {
        bail!(
            "block pair {} -> {}: the spatial sizes {hi}x{wi} and {ho}x{wo} differ by no whole \
             stride, so the earlier map cannot be folded onto the later one",
            b.from,
            b.to
        );
    }
    let signs = rademacher(b.seed, n * co * ho * wo);
    let identity = b.from_shape == b.to_shape && g == signs.as_slice();
    // Rows (sample, output position), columns channels: the folded g_in and the signs; then
    // M = Aᵀ S as one matrix product (ndarray's GEMM: a layer of NB101 is ~1 G multiply-adds).
    let (positions, rows) = (n * ho * wo, ci * st * st);
    let mut a = Array2::<f64>::zeros((positions, rows));
    for i in 0..n {
        for c in 0..ci {
            for y in 0..hi {
                for x in 0..wi {
                    let row = c * st * st + (y % st) * st + x % st;
                    let at = i * ho * wo + (y / st) * wo + x / st;
                    a[[at, row]] = g[((i * ci + c) * hi + y) * wi + x];
                }
            }
        }
    }
    let mut s = Array2::<f64>::zeros((positions, co));
    for i in 0..n {
        for c in 0..co {
            for p in 0..ho * wo {
                s[[i * ho * wo + p, c]] = signs[(i * co + c) * ho * wo + p];
            }
        }
    }
    let m = a.t().dot(&s);
    let m: Vec<f64> = m.iter().copied().collect();
    let scale = 1.0 / (n * ho * wo) as f64;
    let m: Vec<f64> = m.into_iter().map(|v| v * scale).collect();
    let pair = BlockPair {
        rows: rows as u64,
        cols: co as u64,
        offset: 0,
        identity: identity as u64,
    };
    Ok((m, pair))
}

fn dims(shape: &[usize], name: &str) -> Result<[usize; 4]> {
    match shape {
        &[a, b, c, d] => Ok([a, b, c, d]),
        _ => bail!("block output {name} has shape {shape:?}, not [N, C, H, W]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(from: [usize; 4], to: [usize; 4]) -> BlockVjpOutput {
        BlockVjpOutput {
            output: String::new(),
            from: "a".into(),
            to: "b".into(),
            from_shape: from.to_vec(),
            to_shape: to.to_vec(),
            seed: 3,
        }
    }

    fn nb201_blocks(arch: &str) -> BlockJacobian {
        let proto = crate::tools::zoo::nb201_model(arch, 0, 4, 1).unwrap();
        let model = Model::from_proto(&proto, "nb201").unwrap();
        let probe = Probe::shipped(2).unwrap();
        let opts = GradOptions {
            precision: crate::autodiff::Precision::F64,
            ..Default::default()
        };
        block_jacobian(&model, &probe, opts, Backend::Tract, Device::Cpu).unwrap()
    }

    #[test]
    fn nb201_blocks_are_stem_cells_residual_blocks_and_the_last_activation() {
        // One cell per stage: stem, cell 1, residual block 1, cell 2, residual block 2, cell 3:
        // five pairs. The cells of this architecture are identities (node 3 = node 0 + 0 + 0):
        // their backward returns the signs unchanged; no other block does.
        let b = nb201_blocks("|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|");
        let flags: Vec<u64> = b.pairs.iter().map(|p| p.identity).collect();
        assert_eq!(flags, vec![1, 0, 1, 0, 1], "{:?}", b.names);
        // Residual blocks halve the map: the pair into each folds 2 x 2 patches.
        let shape: Vec<(u64, u64)> = b.pairs.iter().map(|p| (p.rows, p.cols)).collect();
        assert_eq!(shape, vec![(4, 4), (16, 8), (8, 8), (32, 16), (16, 16)]);
        assert!(b.names[0].0.contains("batchnormalization"), "{:?}", b.names);
        // A convolutional cell is no identity and its matrix is not the identity.
        // All `none`: every cell outputs zeros, so no block is an identity and the pairs into
        // and out of the cells are zero matrices (σ = 0), as in the authors' module view.
        let z = nb201_blocks("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|");
        assert_eq!(z.pairs.len(), 5);
        assert!(z.pairs.iter().all(|p| p.identity == 0));
        let c =
            nb201_blocks("|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|none~2|");
        assert_eq!(c.pairs.len(), 5);
        assert_eq!(c.pairs[0].identity, 0);
    }

    #[test]
    fn identity_block_gives_the_identity_matrix_and_the_flag() {
        let b = pair([2, 3, 2, 2], [2, 3, 2, 2]);
        let g = rademacher(3, 24);
        let (m, p) = pair_matrix(&b, &g).unwrap();
        assert_eq!((p.rows, p.cols, p.identity), (3, 3, 1));
        // E[s sᵀ] over 8 (sample, position) pairs: diagonal exactly 1.
        for c in 0..3 {
            assert_eq!(m[c * 3 + c], 1.0);
        }
        let (_, p) = pair_matrix(&b, &g.iter().map(|v| 2.0 * v).collect::<Vec<_>>()).unwrap();
        assert_eq!(p.identity, 0);
    }

    #[test]
    fn strided_pairs_fold_patches_into_channels_in_pixel_unshuffle_order() {
        // One sample, one input channel 2x2, one output channel 1x1: every input position is
        // its own row, in (y, x) order, each equal to g · s.
        let b = pair([1, 1, 2, 2], [1, 1, 1, 1]);
        let s = rademacher(3, 1)[0];
        let (m, p) = pair_matrix(&b, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!((p.rows, p.cols), (4, 1));
        assert_eq!(m, vec![s, 2.0 * s, 3.0 * s, 4.0 * s]);
        assert!(pair_matrix(&pair([1, 1, 3, 3], [1, 1, 2, 2]), &[0.0; 9]).is_err());
    }
}

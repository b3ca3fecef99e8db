//! Sliding-window geometry shared by Conv and the pooling ops: kernel, strides, pads (incl.
//! auto_pad), dilations and groups as one normalised value, the kernel offsets that im2col and
//! the window scatters enumerate, and the fitting of a ConvTranspose result to the input grid.

use anyhow::{bail, Result};

use crate::autodiff::backward::Backward;
use crate::onnx::{attr, Node};

#[derive(Clone, Debug)]
pub struct ConvGeom {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Begin pads then end pads, one per spatial axis.
    pub pads: Vec<usize>,
    pub group: usize,
}

impl ConvGeom {
    pub fn without_end_pads(&self) -> ConvGeom {
        let d = self.spatial();
        let mut g = self.clone();
        for i in 0..d {
            g.pads[i + d] = 0;
        }
        g
    }
    pub fn spatial(&self) -> usize {
        self.kernel.len()
    }
    pub fn out_dim(&self, i: usize, input: usize, ceil: bool) -> Option<usize> {
        let d = self.spatial();
        let eff = (self.kernel[i] - 1) * self.dilations[i] + 1;
        let padded = input + self.pads[i] + self.pads[i + d];
        if padded < eff {
            return None;
        }
        let q = padded - eff;
        let s = self.strides[i];
        Some(if ceil { q.div_ceil(s) } else { q / s } + 1)
    }
}

/// Read (and normalise) the geometry of a Conv or pooling node with `kernel` spatial sizes.
pub fn geometry(
    node: &Node,
    input_spatial: &[usize],
    kernel: Vec<usize>,
    group: usize,
) -> Result<ConvGeom> {
    let d = kernel.len();
    if input_spatial.len() != d {
        bail!(
            "{}: kernel has {d} spatial dims but the input has {}",
            node.describe(),
            input_spatial.len()
        );
    }
    let get = |name: &str, default: usize| -> Result<Vec<usize>> {
        match node.attr_ints(name) {
            Some(v) if v.len() == d && v.iter().all(|&x| x >= 1) => {
                Ok(v.iter().map(|&x| x as usize).collect())
            }
            Some(v) => bail!(
                "{}: attribute {name}={v:?} is invalid for {d} spatial dims",
                node.describe()
            ),
            None => Ok(vec![default; d]),
        }
    };
    let strides = get("strides", 1)?;
    let dilations = get("dilations", 1)?;
    let auto_pad = node.attr_s("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let pads: Vec<usize> = match auto_pad.as_str() {
        "NOTSET" | "" => match node.attr_ints("pads") {
            Some(p) if p.len() == 2 * d && p.iter().all(|&x| x >= 0) => {
                p.iter().map(|&x| x as usize).collect()
            }
            Some(p) => bail!(
                "{}: pads {p:?} invalid for {d} spatial dims",
                node.describe()
            ),
            None => vec![0; 2 * d],
        },
        "VALID" => vec![0; 2 * d],
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut p = vec![0; 2 * d];
            for i in 0..d {
                let out = input_spatial[i].div_ceil(strides[i]);
                let eff = (kernel[i] - 1) * dilations[i] + 1;
                let total = ((out - 1) * strides[i] + eff).saturating_sub(input_spatial[i]);
                let (small, big) = (total / 2, total - total / 2);
                if auto_pad == "SAME_UPPER" {
                    p[i] = small;
                    p[i + d] = big;
                } else {
                    p[i] = big;
                    p[i + d] = small;
                }
            }
            p
        }
        other => bail!("{}: unknown auto_pad '{other}'", node.describe()),
    };
    Ok(ConvGeom {
        kernel,
        strides,
        dilations,
        pads,
        group,
    })
}

pub fn geom_attrs(g: &ConvGeom) -> Vec<crate::onnx::pb::AttributeProto> {
    let v = |x: &[usize]| x.iter().map(|&d| d as i64).collect::<Vec<_>>();
    vec![
        attr::ints("kernel_shape", &v(&g.kernel)),
        attr::ints("strides", &v(&g.strides)),
        attr::ints("dilations", &v(&g.dilations)),
        attr::ints("pads", &v(&g.pads)),
    ]
}

/// Every window of every row side by side: `x` as `[M, 1, spatial...]`, convolved under `g`'s
/// strides, dilations and pads with one one-hot kernel per offset (in [`kernel_offsets`]
/// order), gives `[M, K, out...]`. Each value is copied exactly: one product by 1, the rest
/// by 0. im2col for the per-sample Conv weight gradient and the windows of MaxPool's backward.
pub fn windows(b: &mut crate::autodiff::backward::Backward, x: &str, g: &ConvGeom) -> String {
    let offsets = kernel_offsets(&g.kernel);
    let mut wshape = vec![offsets.len(), 1];
    wshape.extend(&g.kernel);
    let mut onehot = ndarray::ArrayD::<f64>::zeros(ndarray::IxDyn(&wshape));
    for (j, off) in offsets.iter().enumerate() {
        let mut idx = vec![j, 0];
        idx.extend(off);
        onehot[ndarray::IxDyn(&idx)] = 1.0;
    }
    let wk = b.em.floats(onehot);
    b.em.op("Conv", &[x, &wk], geom_attrs(g))
}

/// All kernel offsets in row-major order.
pub fn kernel_offsets(kernel: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for &k in kernel {
        out = out
            .into_iter()
            .flat_map(|p| (0..k).map(move |i| [p.clone(), vec![i]].concat()))
            .collect();
    }
    out
}

/// A `ConvTranspose` built with no end padding covers input positions
/// `0 .. s·(out−1) + (k−1)·d + 1 − pad_begin`; crop or zero-pad each spatial axis to the
/// input length. (Cropping the end padding inside ConvTranspose would drop rows that a window
/// reaches when the forward's end padding goes partly unused.)
pub fn fit_scatter(
    b: &mut Backward,
    g: &ConvGeom,
    t: &str,
    input: &[usize],
    out: &[usize],
) -> String {
    let d = g.spatial();
    let produced: Vec<i64> = (0..d)
        .map(|i| {
            (g.strides[i] * (out[i] - 1) + (g.kernel[i] - 1) * g.dilations[i] + 1) as i64
                - g.pads[i] as i64
        })
        .collect();
    let mut cur = t.to_string();
    let over: Vec<usize> = (0..d).filter(|&i| produced[i] > input[i] as i64).collect();
    if !over.is_empty() {
        let axes: Vec<i64> = over.iter().map(|&i| 2 + i as i64).collect();
        let ends: Vec<i64> = over.iter().map(|&i| input[i] as i64).collect();
        cur = b.em.slice(
            &cur,
            &vec![0; axes.len()],
            &ends,
            &axes,
            &vec![1; axes.len()],
        );
    }
    let mut pads = vec![0i64; 2 * (d + 2)];
    for i in 0..d {
        pads[d + 4 + i] = (input[i] as i64 - produced[i]).max(0);
    }
    b.em.pad(&cur, &pads, 0.0)
}

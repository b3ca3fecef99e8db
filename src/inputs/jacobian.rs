//! The logits' Jacobian with respect to one element of every trainable parameter tensor, per
//! sample, with BatchNorm at its stored running statistics: the input of VKDNW's Fisher
//! information (docs/semantics.md, Scorers). One graph whose differentiated scalar is the logit
//! of the sample's label ([`Loss::LabelLogit`]) is built once and run once per class with every
//! label set to that class: run c's per-sample gradients are row c of every sample's Jacobian.
//! Only element 0 of each parameter's gradient is output (`first_element_grads`), and Conv
//! weights compute just that element instead of their whole per-sample gradient.

use anyhow::{bail, Result};
use ndarray::Array1;

use crate::autodiff::builder::{GraphSpec, Loss};
use crate::autodiff::{BnMode, GradOptions, ParamSelect};
use crate::inputs::engine::load_probe_graph;
use crate::inputs::probe::Probe;
use crate::onnx::Model;
use crate::runtime::{Backend, Device, OutputData};

/// `data[(i · classes + c) · tensors + t]` = ∂ logit_c(x_i) / ∂ θ_t[0], where θ_t is the t-th
/// trainable float initializer in the model's initializer order (a parameter that cannot reach
/// the logits has a zero column: it still counts as a tensor). `logits` are the same
/// eval-BatchNorm forward's, N × classes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogitJacobian {
    pub data: Vec<f64>,
    pub logits: Vec<f64>,
    pub classes: usize,
    pub tensors: usize,
    pub names: Vec<String>,
    /// The runtime that ran the graph.
    pub runtime: &'static str,
}

pub fn logit_jacobian(
    model: &Model,
    probe: &Probe,
    opts: GradOptions,
    backend: Backend,
    device: Device,
) -> Result<LogitJacobian> {
    let opts = GradOptions {
        bn: BnMode::Eval,
        params: ParamSelect::All,
        ..opts
    };
    let spec = GraphSpec {
        loss: Loss::LabelLogit,
        first_element_grads: true,
        ..Default::default()
    };
    let n = probe.len();
    let (an, gg, runner) = load_probe_graph(model, probe, opts, spec, backend, device)?;
    let images = probe.images_tensor().cast(an.float);
    let classes = an.num_classes;
    // Output k ≥ 1 is the gradient block of the (k-1)-th reachable parameter.
    let mut column_of_output = vec![];
    for (t, g) in gg.grads.iter().enumerate() {
        if g.output.is_some() {
            // Element 0 of the parameter's gradient only (`first_element_grads`).
            column_of_output.push((t, 1));
        }
    }
    let tensors = gg.grads.len();
    let names = gg
        .grads
        .iter()
        .map(|g| an.params[g.param].name.clone())
        .collect();
    let mut data = vec![0.0f64; n * classes * tensors];
    let mut logits = vec![];
    for c in 0..classes {
        let labels = Array1::from_elem(n, c as i64);
        runner.run_visit(&images, &labels, &mut |k, out| {
            if k == 0 {
                if c == 0 {
                    logits = out.to_f64_vec();
                }
                return Ok(());
            }
            let Some(&(t, numel)) = column_of_output.get(k - 1) else {
                bail!("the Jacobian graph has more outputs than parameters");
            };
            let first = |i: usize| i * numel;
            match out.data {
                OutputData::F32(b) if b.len() == n * numel => {
                    for i in 0..n {
                        data[(i * classes + c) * tensors + t] = b[first(i)] as f64;
                    }
                }
                OutputData::F64(b) if b.len() == n * numel => {
                    for i in 0..n {
                        data[(i * classes + c) * tensors + t] = b[first(i)];
                    }
                }
                _ => bail!(
                    "gradient output {k} has shape {:?}, expected [{n}, {numel}]",
                    out.shape
                ),
            }
            Ok(())
        })?;
    }
    if logits.len() != n * classes {
        bail!(
            "the Jacobian graph's logits have {} values, expected {n} × {classes}",
            logits.len()
        );
    }
    Ok(LogitJacobian {
        data,
        logits,
        classes,
        tensors,
        names,
        runtime: runner.name(),
    })
}

//! What a gradient rule sees: the emitter, static infos, which tensors need gradients, and the
//! broadcasting helpers every elementwise rule shares.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

use super::emit::Emitter;
use super::{Info, Kind};
use crate::onnx::Node;

pub struct Backward<'a> {
    pub em: &'a mut Emitter,
    pub infos: &'a HashMap<String, Info>,
    /// Values of the model's parameters (the initializers being differentiated).
    pub params: &'a HashMap<String, crate::onnx::HostTensor>,
    /// Tensors through which a selected parameter reaches the loss.
    pub needs: &'a HashSet<String>,
    /// Probe batch size.
    pub n: usize,
    /// Only element 0 of each parameter's gradient will be read (`GraphSpec::first_element_grads`):
    /// a rule may return a gradient whose element 0 is right and which broadcasts against the
    /// full shape instead of the full gradient, where that is much cheaper (Conv weights).
    pub first_element: bool,
}

impl<'a> Backward<'a> {
    pub fn info(&self, name: &str) -> &Info {
        &self.infos[name]
    }
    /// The value of `name` when it is known while building: a folded constant or a parameter's
    /// initial value (the graph is built for these values and never sees others).
    pub fn value(&self, name: &str) -> Option<&crate::onnx::HostTensor> {
        self.infos
            .get(name)
            .and_then(|i| i.value.as_ref())
            .or_else(|| self.params.get(name))
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.infos[name].shape.clone()
    }
    /// Does input `i` of `node` need a gradient?
    pub fn needs_input(&self, node: &Node, i: usize) -> bool {
        node.input(i).is_some_and(|s| self.needs.contains(s))
    }
    /// Shape of the gradient of `name`: its own shape for batched tensors, an extra leading
    /// sample axis for parameters.
    pub fn grad_shape(&self, name: &str) -> Vec<usize> {
        let info = self.info(name);
        match info.kind {
            Kind::Param => std::iter::once(self.n)
                .chain(info.shape.iter().copied())
                .collect(),
            _ => info.shape.clone(),
        }
    }

    /// Reduce `g` (a gradient shaped like the broadcast result `out_shape`, sample axis first)
    /// to the gradient of operand `target`: summed over broadcast axes, but never over the
    /// sample axis, so a parameter operand gets one gradient per sample.
    pub fn unbroadcast(&mut self, g: &str, out_shape: &[usize], target: &str) -> Result<String> {
        let info = self.info(target).clone();
        let r = out_shape.len();
        let s = info.shape.len();
        if s > r {
            bail!("operand '{target}' has higher rank than the broadcast result");
        }
        let aligned: Vec<usize> = std::iter::repeat(1)
            .take(r - s)
            .chain(info.shape.iter().copied())
            .collect();
        let first = match info.kind {
            Kind::Batched => {
                if s != r {
                    bail!("batched operand '{target}' does not keep the sample axis first under broadcasting");
                }
                0
            }
            _ => 1,
        };
        let axes: Vec<usize> = (first..r)
            .filter(|&i| aligned[i] == 1 && out_shape[i] != 1)
            .collect();
        let want = self.grad_shape(target);
        let reduced = if axes.is_empty() {
            g.to_string()
        } else {
            self.em.reduce_sum(g, &axes, true)
        };
        let mut reduced_shape = out_shape.to_vec();
        for &a in &axes {
            reduced_shape[a] = 1;
        }
        if reduced_shape == want {
            Ok(reduced)
        } else {
            Ok(self.em.reshape(&reduced, &want))
        }
    }
}

//! Runtimes that execute a gradient graph. tract is pure Rust and always available.

pub mod tract;

use anyhow::Result;
use ndarray::Array1;

use crate::onnx::{pb, HostTensor};

/// Executes one built gradient graph on probe batches of the shape it was built for.
pub trait GraphRunner {
    /// Outputs in the graph's output order.
    fn run(&self, images: &HostTensor, labels: &Array1<i64>) -> Result<Vec<HostTensor>>;
    fn name(&self) -> &'static str;
}

pub fn load(model: &pb::ModelProto) -> Result<Box<dyn GraphRunner>> {
    Ok(Box::new(tract::TractRunner::new(model)?))
}

//! The embedded runtime: tract, pure Rust.

use std::sync::{Arc, Once};

use anyhow::{anyhow, Context, Result};
use ndarray::Array1;
use tract_onnx::prelude::*;

use super::GraphRunner;
use crate::onnx::{pb, HostTensor};

pub struct TractRunner {
    plan: Arc<TypedRunnableModel>,
    /// Kept to rebuild an unoptimised plan when tract's optimiser produced one that cannot run
    /// (seen: a 'Dummy' op left in place of a float64 Conv).
    proto: Option<pb::ModelProto>,
}

static THREADS: Once = Once::new();

/// tract's matrix products can run on several cores once an executor is installed. Measured on
/// NB201 gradient graphs (2 cores) it did not help (5.2 s on one thread, 5.7 s on two): the
/// time goes to memory-bound ops, so one thread is the default; GRADALIGN_THREADS overrides.
fn init_threads() {
    THREADS.call_once(|| {
        let n: usize = std::env::var("GRADALIGN_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        if n > 1 {
            tract_linalg::multithread::set_default_executor(
                tract_linalg::multithread::Executor::multithread(n),
            );
        }
    });
}

impl TractRunner {
    pub fn new(model: &pb::ModelProto) -> Result<TractRunner> {
        let level = std::env::var("GRADALIGN_TRACT_OPT").unwrap_or_default();
        let plan = Self::plan(model, &level)?;
        Ok(TractRunner {
            plan,
            proto: (level != "declutter" && level != "none").then(|| model.clone()),
        })
    }

    fn plan(model: &pb::ModelProto, level: &str) -> Result<Arc<TypedRunnableModel>> {
        init_threads();
        let typed = tract_onnx::onnx()
            .model_for_proto_model(model)
            .map_err(|e| anyhow!("{e:#}"))
            .context("tract could not load the gradient graph")?
            .into_typed()
            .map_err(|e| anyhow!("{e:#}"))
            .context("tract could not type the gradient graph")?;
        let typed = match level {
            "none" => typed,
            "declutter" => typed.into_decluttered().map_err(|e| anyhow!("{e:#}"))?,
            _ => typed
                .into_optimized()
                .map_err(|e| anyhow!("{e:#}"))
                .context("tract could not optimise the gradient graph")?,
        };
        typed.into_runnable().map_err(|e| anyhow!("{e:#}"))
    }
}

fn to_tract(t: &HostTensor) -> Tensor {
    match t {
        HostTensor::F32(a) => a.clone().into_tensor(),
        HostTensor::F64(a) => a.clone().into_tensor(),
        HostTensor::I64(a) => a.clone().into_tensor(),
        HostTensor::Bool(a) => a.clone().into_tensor(),
    }
}

fn from_tract(t: &Tensor) -> Result<HostTensor> {
    Ok(match t.datum_type() {
        DatumType::F32 => HostTensor::F32(
            t.to_plain_array_view::<f32>()
                .map_err(|e| anyhow!("{e}"))?
                .to_owned(),
        ),
        DatumType::F64 => HostTensor::F64(
            t.to_plain_array_view::<f64>()
                .map_err(|e| anyhow!("{e}"))?
                .to_owned(),
        ),
        DatumType::I64 => HostTensor::I64(
            t.to_plain_array_view::<i64>()
                .map_err(|e| anyhow!("{e}"))?
                .to_owned(),
        ),
        DatumType::Bool => HostTensor::Bool(
            t.to_plain_array_view::<bool>()
                .map_err(|e| anyhow!("{e}"))?
                .to_owned(),
        ),
        other => return Err(anyhow!("unexpected output type {other:?}")),
    })
}

impl GraphRunner for TractRunner {
    fn run(&self, images: &HostTensor, labels: &Array1<i64>) -> Result<Vec<HostTensor>> {
        let inputs: TVec<TValue> = tvec![
            to_tract(images).into(),
            labels.clone().into_dyn().into_tensor().into()
        ];
        let outs = match self.plan.run(inputs.clone()) {
            Ok(o) => o,
            Err(e) if self.proto.is_some() && format!("{e:#}").contains("Dummy") => {
                // tract's planner occasionally leaves a placeholder op behind; the decluttered
                // plan usually avoids it, the plain typed graph has avoided it in every case met so far (slower, same math).
                let proto = self.proto.as_ref().unwrap();
                let decluttered = Self::plan(proto, "declutter")?;
                match decluttered.run(inputs.clone()) {
                    Ok(o) => o,
                    Err(e) if format!("{e:#}").contains("Dummy") => Self::plan(proto, "none")?
                        .run(inputs)
                        .map_err(|e| anyhow!("{e:#}"))
                        .context("tract failed running the (unoptimised) gradient graph")?,
                    Err(e) => {
                        return Err(anyhow!("{e:#}"))
                            .context("tract failed running the (decluttered) gradient graph")
                    }
                }
            }
            Err(e) => {
                return Err(anyhow!("{e:#}")).context("tract failed running the gradient graph")
            }
        };
        outs.iter().map(|t| from_tract(t)).collect()
    }
    fn name(&self) -> &'static str {
        "tract"
    }
}

//! gradalign: exact per-sample gradients of ONNX models at initialisation, for training-free
//! neural architecture search.
//!
//! The modules follow the data flow, and each imports only the ones listed before it:
//!
//! 1. [`onnx`]: decoding, validating and writing ONNX models;
//! 2. [`autodiff`]: the per-sample gradient graph, built from one definition per op;
//! 3. [`runtime`]: ONNX Runtime and tract sessions that run a graph;
//! 4. [`inputs`]: the probe batch, and what the scorers consume (per-sample gradients, signs,
//!    extra passes), computed within a memory budget;
//! 5. [`scorers`]: the scorer plugins (C ABI) and the planning of their inputs;
//! 6. [`results`]: ranking many models, with resumable result files.
//!
//! [`tools`] holds what benchmarks and tests use beside the pipeline (generated NB201/NB101
//! networks, statistics, the fuzzer, the linear-regions experiment); the pipeline never imports
//! it. `tests/layering.rs` checks this order.

pub mod autodiff;
pub mod inputs;
pub mod onnx;
pub mod results;
pub mod rng;
pub mod runtime;
pub mod scorers;
pub mod tools;

#[cfg(test)]
mod layering;

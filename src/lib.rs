//! gradalign: exact per-sample gradients of ONNX models at initialisation, for training-free
//! neural architecture search.

pub mod engine;
pub mod fuzz;
pub mod grad;
pub mod memory;
pub mod npy;
pub mod onnx;
pub mod passes;
pub mod plugin;
pub mod probe;
pub mod rank;
pub mod regions;
pub mod runtime;
pub mod score;
pub mod stats;
pub mod stream;
pub mod zoo;

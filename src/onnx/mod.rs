//! ONNX front end: decoding, validation and host tensors. Knows nothing about gradients.

pub mod external;
pub mod model;
pub mod tensor;

/// Pre-generated ONNX protobuf types (shipped by tract-onnx, so no protoc is needed).
pub use tract_onnx::pb;

pub use model::{attr, GraphInput, Model, Node};
pub use tensor::{value_info, DType, HostTensor};

//! What the scorers consume, computed from a model and the probe batch: the probe itself
//! ([`probe`], [`npy`]), per-sample gradients and their packed signs ([`engine`], [`stream`]),
//! the memory plan that bounds them ([`memory`]), and forward-only or extra gradient passes
//! ([`passes`], [`jacobian`], [`block_jacobian`]).

pub mod block_jacobian;
pub mod engine;
pub mod jacobian;
pub mod memory;
pub mod npy;
pub mod passes;
pub mod probe;
pub mod stream;

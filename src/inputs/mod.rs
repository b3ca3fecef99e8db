//! What the scorers consume, computed from a model and the probe batch: the probe itself
//! ([`probe`], [`npy`]), per-sample gradients and their packed signs ([`engine`], [`stream`]),
//! the memory plan that bounds them ([`memory`]), and forward-only or extra gradient passes
//! ([`passes`]).

pub mod npy;
pub mod probe;
pub mod memory;
pub mod engine;
pub mod stream;
pub mod passes;

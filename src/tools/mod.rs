//! Tooling beside the scoring pipeline, used by `cargo xtask`, the tests and the
//! `linear-regions` command: seeded NB201/NB101 networks ([`zoo`]), rank statistics ([`stats`]),
//! the ONNX-aware fuzzer ([`fuzz`]) and the linear-region experiment ([`regions`]). Nothing in the
//! pipeline modules imports this one.

pub mod fuzz;
pub mod regions;
pub mod stats;
pub mod zoo;

pub mod ensemble;
pub mod ops;
pub mod regions;
pub mod score;

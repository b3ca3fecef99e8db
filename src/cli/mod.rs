pub mod regions;
pub mod score;

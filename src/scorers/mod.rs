//! Scorers: the plugin host (C ABI, [`plugin`]) and scoring one model ([`score`]), which
//! computes once what the selected scorers declare they need and hands it to each of them.

pub mod plugin;
pub mod score;

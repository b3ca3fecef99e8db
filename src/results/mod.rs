//! Results over many models: ranking a folder or a list, resumable, sharded across workers.

pub mod ensemble;
pub mod rank;

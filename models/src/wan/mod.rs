//! Wan2.1 video diffusion models: DiT, schedulers' consumers and the stage pipelines.

pub mod config;
pub mod pipeline;
pub mod rope;
pub mod transformer;

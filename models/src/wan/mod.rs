//! Wan2.1 video models: the diffusion transformer with its configuration and 3D RoPE, and the DiT
//! stage pipeline.

pub mod config;
pub mod pipeline;
pub mod rope;
pub mod transformer;
pub mod transformer_keys;

//! Wan2.1 video models: the diffusion transformer with its configuration and 3D RoPE, the VAE,
//! the UMT5 text encoder with its tokenizer, the CLIP image encoder, and the stage pipelines.

pub mod config;
pub mod image_encoder;
pub mod pipeline;
pub mod rope;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod transformer_keys;
pub mod vae;
mod vae_blocks;

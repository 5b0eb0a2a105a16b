//! Wan2.1 video models: the diffusion transformer with its configuration and 3D RoPE, the VAE,
//! the UMT5 text encoder with its tokenizer, the CLIP image encoder, the stage pipelines, and a
//! tiny random demo model written from Rust ([`demo`]).

pub mod config;
pub mod demo;
pub mod image_encoder;
pub mod lora;
pub mod pipeline;
pub mod rope;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod transformer_keys;
pub mod vae;

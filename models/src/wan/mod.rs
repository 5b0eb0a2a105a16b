//! Wan2.1 model components.

pub mod image_encoder;
pub mod text_encoder;
pub mod tokenizer;
pub mod vae;
mod vae_blocks;

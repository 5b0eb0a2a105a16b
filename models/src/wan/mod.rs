//! Wan2.1 model components.

pub mod vae;
mod vae_blocks;

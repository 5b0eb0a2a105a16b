//! Qwen-Image vae (being written).

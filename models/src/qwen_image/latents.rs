//! Qwen-Image latents (being written).

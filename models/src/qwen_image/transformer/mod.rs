//! Qwen-Image transformer (being written).

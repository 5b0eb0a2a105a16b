//! Qwen-Image text_encoder (being written).

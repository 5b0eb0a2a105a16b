//! Qwen-Image processor (being written).

//! Qwen-Image pipeline (being written).

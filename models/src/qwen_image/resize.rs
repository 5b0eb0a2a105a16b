//! Qwen-Image resize (being written).

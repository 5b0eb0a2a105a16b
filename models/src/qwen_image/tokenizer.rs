//! Qwen-Image tokenizer (being written).

//! The Qwen-Image demo model's sizes and the JSON configs diffusers and transformers write beside
//! the weights (the layout of `tools/fixtures/qwen_pipeline.py`).

use serde_json::{Value, json};

use super::vocab::DemoVocab;
use crate::qwen_image::pipeline::Variant;
use crate::qwen_image::text_encoder::{TextEncoderConfig, VisionConfig};
use crate::qwen_image::transformer::TransformerConfig;
use crate::qwen_image::vae::QwenImageVaeConfig;
use crate::schedulers::FlowMatchDynamicConfig;

/// Text-encoder width (the DiT's `joint_attention_dim`).
pub(super) const TEXT_DIM: i64 = 32;
/// The `diffusers` version the configs claim.
pub(super) const DIFFUSERS_VERSION: &str = "0.42.1";
/// The `transformers` version the text encoder's config claims.
const TRANSFORMERS_VERSION: &str = "5.24.0";

/// Qwen2.5-VL: text width 32 (2 heads of 16, one key/value head, 2 layers) and a vision tower of
/// width 32 (2 blocks, the second attending over the whole image), with the tokenizer's ids.
pub(super) fn text_encoder_config(vocab: &DemoVocab) -> TextEncoderConfig {
    TextEncoderConfig {
        vocab_size: vocab.size,
        hidden_size: TEXT_DIM,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        mrope_section: vec![2, 3, 3],
        image_token_id: vocab.id("<|image_pad|>"),
        video_token_id: vocab.id("<|video_pad|>"),
        vision_start_token_id: vocab.id("<|vision_start|>"),
        vision_end_token_id: vocab.id("<|vision_end|>"),
        vision_config: VisionConfig {
            depth: 2,
            hidden_size: 32,
            intermediate_size: 64,
            num_heads: 2,
            out_hidden_size: TEXT_DIM,
            fullatt_block_indexes: vec![1],
            ..VisionConfig::default()
        },
        ..TextEncoderConfig::qwen2_5_vl_7b()
    }
}

/// `text_encoder/config.json` as transformers 5 saves `Qwen2_5_VLForConditionalGeneration`.
pub(super) fn text_encoder_json(cfg: &TextEncoderConfig, vocab: &DemoVocab) -> Value {
    let v = &cfg.vision_config;
    json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "dtype": "float32",
        "image_token_id": cfg.image_token_id,
        "model_type": "qwen2_5_vl",
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": null,
            "eos_token_id": vocab.id("<|im_end|>"),
            "hidden_act": cfg.hidden_act,
            "hidden_size": cfg.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": 32768,
            "model_type": "qwen2_5_vl_text",
            "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "pad_token_id": vocab.id("<|endoftext|>"),
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_parameters": {
                "mrope_section": cfg.mrope_section,
                "rope_theta": cfg.rope_theta,
                "rope_type": cfg.rope_type,
            },
            "use_cache": true,
            "use_sliding_window": cfg.use_sliding_window,
            "vocab_size": cfg.vocab_size,
        },
        "tie_word_embeddings": false,
        "transformers_version": TRANSFORMERS_VERSION,
        "video_token_id": cfg.video_token_id,
        "vision_config": {
            "depth": v.depth,
            "fullatt_block_indexes": v.fullatt_block_indexes,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "in_channels": v.in_channels,
            "initializer_range": 0.02,
            "intermediate_size": v.intermediate_size,
            "model_type": "qwen2_5_vl_vision",
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "tokens_per_second": 2,
            "window_size": v.window_size,
        },
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
    })
}

/// The DiT: 2 heads × 32, 2 blocks.
pub(super) fn transformer_config() -> TransformerConfig {
    TransformerConfig {
        num_layers: 2,
        attention_head_dim: 32,
        num_attention_heads: 2,
        joint_attention_dim: TEXT_DIM,
        axes_dims_rope: [8, 12, 12],
        ..TransformerConfig::qwen_image()
    }
}

/// The VAE: base width 4, one residual block per stage, the released latent statistics.
pub(super) fn vae_config() -> QwenImageVaeConfig {
    QwenImageVaeConfig { base_dim: 4, num_res_blocks: 1, ..QwenImageVaeConfig::qwen_image() }
}

pub(super) fn vae_json(cfg: &QwenImageVaeConfig) -> Value {
    json!({
        "_class_name": "AutoencoderKLQwenImage",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attn_scales": cfg.attn_scales,
        "base_dim": cfg.base_dim,
        "dim_mult": cfg.dim_mult,
        "dropout": cfg.dropout,
        "input_channels": cfg.input_channels,
        "latents_mean": cfg.latents_mean,
        "latents_std": cfg.latents_std,
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": cfg.temperal_downsample,
        "z_dim": cfg.z_dim,
    })
}

/// The published Qwen-Image scheduler (`FlowMatchEulerDiscreteScheduler`, dynamic shifting).
pub(super) fn scheduler_config() -> Value {
    let mut config = serde_json::to_value(FlowMatchDynamicConfig::qwen_image())
        .expect("the scheduler config serialises");
    config["_class_name"] = "FlowMatchEulerDiscreteScheduler".into();
    config["_diffusers_version"] = DIFFUSERS_VERSION.into();
    config
}

/// `processor/preprocessor_config.json` as published with Qwen-Image-Edit (Qwen2.5-VL's).
pub(super) fn processor_config() -> Value {
    json!({
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "max_pixels": 12845056,
        "merge_size": 2,
        "min_pixels": 3136,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "temporal_patch_size": 2,
    })
}

pub(super) fn model_index(variant: Variant) -> Value {
    let mut index = json!({
        "_class_name": variant.class_name(),
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    });
    if variant.is_edit() {
        index["processor"] = json!(["transformers", "Qwen2VLProcessor"]);
    }
    index
}

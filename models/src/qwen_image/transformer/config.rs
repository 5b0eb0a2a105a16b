//! Qwen-Image DiT configuration: the fields of diffusers' `QwenImageTransformer2DModel`
//! `config.json` (`transformer/config.json` in the published repositories), with the published
//! defaults as a preset.

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::Component;

/// Positions per sign covered by the reference's RoPE tables (`QwenEmbedRope`: `arange(4096)`).
pub const ROPE_POSITIONS: i64 = 4096;

/// Hyper-parameters of a Qwen-Image diffusion transformer (diffusers field names; unknown keys
/// such as `_class_name` or `pooled_projection_dim` are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    /// Side of the square latent patch packed into one token (2: a token holds 2×2×16 values).
    pub patch_size: i64,
    /// Channels of one packed latent token (`patch_size² · latent channels` = 64).
    pub in_channels: i64,
    /// Latent channels per output pixel (16); `null` means `in_channels`.
    pub out_channels: Option<i64>,
    /// Dual-stream transformer blocks (60).
    pub num_layers: i64,
    /// Channels per attention head (128).
    pub attention_head_dim: i64,
    /// Attention heads (24); `inner_dim = num_attention_heads · attention_head_dim`.
    pub num_attention_heads: i64,
    /// Hidden size of the text encoder's output (Qwen2.5-VL-7B: 3584).
    pub joint_attention_dim: i64,
    /// Guidance-distilled variant with a guidance embedding; not implemented (must be false).
    pub guidance_embeds: bool,
    /// RoPE channels per axis (frame, height, width); they sum to `attention_head_dim`.
    pub axes_dims_rope: [i64; 3],
    /// Edit-2511 style zero timestep for the condition images; not implemented (must be false).
    pub zero_cond_t: bool,
    /// Additional learned timestep condition (Qwen-Image-Layered); not implemented.
    pub use_additional_t_cond: bool,
    /// Layered 3D RoPE (Qwen-Image-Layered); not implemented.
    pub use_layer3d_rope: bool,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self::qwen_image()
    }
}

impl TransformerConfig {
    /// `Qwen/Qwen-Image` (and the Edit / Edit-2509 releases): 60 layers, 24×128 heads.
    pub fn qwen_image() -> Self {
        TransformerConfig {
            patch_size: 2,
            in_channels: 64,
            out_channels: Some(16),
            num_layers: 60,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 3584,
            guidance_embeds: false,
            axes_dims_rope: [16, 56, 56],
            zero_cond_t: false,
            use_additional_t_cond: false,
            use_layer3d_rope: false,
        }
    }

    /// Model width: `num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Latent channels per output pixel (`out_channels or in_channels`).
    pub fn output_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Channels of one output token: `patch_size² · output_channels`.
    pub fn output_dim(&self) -> i64 {
        self.patch_size * self.patch_size * self.output_channels()
    }
}

impl ModelConfig for TransformerConfig {
    const COMPONENT: Component = Component::Transformer;

    fn validate(&self) -> Result<(), String> {
        let unsupported = [
            ("guidance_embeds", self.guidance_embeds),
            ("zero_cond_t", self.zero_cond_t),
            ("use_additional_t_cond", self.use_additional_t_cond),
            ("use_layer3d_rope", self.use_layer3d_rope),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!(
                "{name} = true is not supported by x2v (only the Qwen-Image, Edit and Edit-2509 \
                 transformers, which set it false)"
            ));
        }
        let sizes = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.output_channels()),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{name} = {v} must be positive"));
        }
        let axes = self.axes_dims_rope;
        if axes.iter().any(|d| *d < 2 || d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope = {axes:?}: every axis needs a positive even size"
            ));
        }
        if axes.iter().sum::<i64>() != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope = {axes:?} sums to {}, but attention_head_dim is {}",
                axes.iter().sum::<i64>(),
                self.attention_head_dim
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_config_parses_to_the_preset() {
        let json = r#"{"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.34.0.dev0",
            "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": false,
            "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
            "num_layers": 60, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768}"#;
        let cfg: TransformerConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, TransformerConfig::qwen_image());
        assert_eq!(cfg.inner_dim(), 3072);
        assert_eq!(cfg.output_dim(), 64);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unsupported_flags_are_named() {
        let cfg = TransformerConfig { zero_cond_t: true, ..TransformerConfig::qwen_image() };
        assert!(cfg.validate().unwrap_err().contains("zero_cond_t = true is not supported"));
        let cfg =
            TransformerConfig { axes_dims_rope: [16, 56, 48], ..TransformerConfig::qwen_image() };
        assert!(cfg.validate().unwrap_err().contains("sums to 120"));
    }
}

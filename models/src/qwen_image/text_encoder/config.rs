//! The config of Qwen2.5-VL (`Qwen2_5_VLConfig`, transformers
//! `models/qwen2_5_vl/configuration_qwen2_5_vl.py`) as x2v reads it from `config.json`.
//!
//! Saves differ in where the text parameters live: transformers 5 nests them under `text_config`
//! with the rotary settings in `rope_parameters` (`rope_theta`, `mrope_section`); older saves
//! (the published Qwen2.5-VL-7B-Instruct) keep them at the top level with `rope_theta` and
//! `rope_scaling: {type: "mrope", mrope_section}`, and name the vision input channels `in_chans`.
//! [`TextEncoderConfig::select`](crate::config::ModelConfig::select) folds both into one flat
//! object: top-level keys, overridden by `text_config`, rotary settings lifted out of whichever
//! of `rope_parameters` / `rope_scaling` is present.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::ModelConfig;
use crate::error::{Component, Error};

/// The vision tower (`Qwen2_5_VLVisionConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: i64,
    /// Width of the blocks.
    pub hidden_size: i64,
    /// SwiGLU inner size.
    pub intermediate_size: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Image channels.
    #[serde(alias = "in_chans")]
    pub in_channels: i64,
    /// Spatial patch side in pixels.
    pub patch_size: i64,
    /// Frames per patch (a still image is repeated to fill them).
    pub temporal_patch_size: i64,
    /// Side of the patch block merged into one language-model token.
    pub spatial_merge_size: i64,
    /// Side of the attention windows in pixels.
    pub window_size: i64,
    /// Output width of the merger (the language model's hidden size).
    pub out_hidden_size: i64,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<i64>,
    /// MLP activation; only `silu`.
    pub hidden_act: String,
    /// Base of the 2D rotary embedding (`rope_parameters.rope_theta`, 10000 when absent).
    pub rope_theta: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            depth: 32,
            hidden_size: 1280,
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            window_size: 112,
            out_hidden_size: 3584,
            fullatt_block_indexes: vec![7, 15, 23, 31],
            hidden_act: "silu".into(),
            rope_theta: 10000.0,
        }
    }
}

impl VisionConfig {
    /// Per-head size.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// Values of one flattened patch: `in_channels · temporal_patch_size · patch_size²`.
    pub fn patch_values(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("depth", self.depth),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("temporal_patch_size", self.temporal_patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("out_hidden_size", self.out_hidden_size),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("vision_config.{name} = {v} must be positive"));
        }
        if self.hidden_act != "silu" {
            return Err(format!("vision_config.hidden_act = {:?}; only \"silu\"", self.hidden_act));
        }
        if self.hidden_size % self.num_heads != 0 || self.head_dim() % 4 != 0 {
            return Err(format!(
                "vision_config.hidden_size {} over {} heads must give a head size divisible by 4",
                self.hidden_size, self.num_heads
            ));
        }
        let unit = self.spatial_merge_size * self.patch_size;
        if self.window_size < unit || self.window_size % unit != 0 {
            return Err(format!(
                "vision_config.window_size = {} must be a positive multiple of spatial_merge_size · patch_size = {unit}",
                self.window_size
            ));
        }
        if let Some(i) = self.fullatt_block_indexes.iter().find(|&&i| i < 0 || i >= self.depth) {
            return Err(format!(
                "vision_config.fullatt_block_indexes holds {i}, outside the {} blocks",
                self.depth
            ));
        }
        Ok(())
    }
}

/// Qwen2.5-VL as Qwen-Image's text encoder: the text decoder's parameters (flattened from
/// `text_config` or the top level), the special token ids and the vision tower.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TextEncoderConfig {
    /// Embedding rows.
    pub vocab_size: i64,
    /// Hidden size of the decoder.
    pub hidden_size: i64,
    /// SwiGLU inner size.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: i64,
    /// MLP activation; only `silu`.
    pub hidden_act: String,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// `rope_type` (`rope_parameters.rope_type`, or `type` of `rope_scaling`): `default` or
    /// `mrope`, which are the same here.
    pub rope_type: String,
    /// Rotary frequencies given to the (temporal, height, width) positions, in order; sums to
    /// `head_dim / 2`.
    pub mrope_section: Vec<i64>,
    /// Sliding-window attention; x2v supports only `false` (the release).
    pub use_sliding_window: bool,
    /// `<|image_pad|>`: one per merged image patch; replaced by the vision embeddings.
    pub image_token_id: i64,
    /// `<|video_pad|>` (videos are not supported).
    pub video_token_id: i64,
    /// `<|vision_start|>`, before each image's pad tokens.
    pub vision_start_token_id: i64,
    /// `<|vision_end|>`, after them.
    pub vision_end_token_id: i64,
    /// The vision tower.
    pub vision_config: VisionConfig,
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        Self::qwen2_5_vl_7b()
    }
}

impl TextEncoderConfig {
    /// Qwen2.5-VL-7B-Instruct, the text encoder of every Qwen-Image release (8.29 B parameters).
    pub fn qwen2_5_vl_7b() -> Self {
        TextEncoderConfig {
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            hidden_act: "silu".into(),
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_type: "default".into(),
            mrope_section: vec![16, 24, 24],
            use_sliding_window: false,
            image_token_id: 151_655,
            video_token_id: 151_656,
            vision_start_token_id: 151_652,
            vision_end_token_id: 151_653,
            vision_config: VisionConfig::default(),
        }
    }

    /// Reads and validates a `config.json` of either layout.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        crate::config::read_config_file(path)
    }

    /// Per-head size of the decoder.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    fn validate_text(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("{name} = {v} must be positive"));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act = {:?}; only \"silu\"", self.hidden_act));
        }
        if self.hidden_size % self.num_attention_heads != 0 || self.head_dim() % 2 != 0 {
            return Err(format!(
                "hidden_size {} over {} heads must give an even head size",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }

    fn validate_rope(&self) -> Result<(), String> {
        if !matches!(self.rope_type.as_str(), "default" | "mrope") {
            return Err(format!(
                "rope_type = {:?}; only the default multimodal rotary embedding is supported",
                self.rope_type
            ));
        }
        let sum: i64 = self.mrope_section.iter().sum();
        if self.mrope_section.len() != 3
            || self.mrope_section.iter().any(|&s| s < 0)
            || sum != self.head_dim() / 2
        {
            return Err(format!(
                "mrope_section = {:?} must be three sizes summing to head_dim / 2 = {}",
                self.mrope_section,
                self.head_dim() / 2
            ));
        }
        if self.use_sliding_window {
            return Err("use_sliding_window = true is not supported".into());
        }
        Ok(())
    }
}

impl ModelConfig for TextEncoderConfig {
    const COMPONENT: Component = Component::TextEncoder;

    fn validate(&self) -> Result<(), String> {
        self.validate_text()?;
        self.validate_rope()?;
        if !(0..self.vocab_size).contains(&self.image_token_id) {
            return Err(format!(
                "image_token_id = {} lies outside the vocabulary of {}",
                self.image_token_id, self.vocab_size
            ));
        }
        self.vision_config.validate()?;
        if self.vision_config.out_hidden_size != self.hidden_size {
            return Err(format!(
                "vision_config.out_hidden_size = {} differs from hidden_size = {}",
                self.vision_config.out_hidden_size, self.hidden_size
            ));
        }
        Ok(())
    }

    fn select(json: Value) -> Value {
        let Value::Object(mut top) = json else { return json };
        let text = top.remove("text_config");
        let vision = top.remove("vision_config");
        let mut flat = top;
        if let Some(Value::Object(text)) = text {
            flat.extend(text);
        }
        lift_rope(&mut flat);
        if let Some(Value::Object(mut vision)) = vision {
            lift_rope(&mut vision);
            vision.retain(|k, _| k != "mrope_section" && k != "rope_type");
            flat.insert("vision_config".into(), Value::Object(vision));
        }
        flat.retain(|_, v| !v.is_null());
        Value::Object(flat)
    }
}

/// Copies `rope_theta`, `mrope_section` and the rope type out of `rope_parameters`
/// (transformers 5) or `rope_scaling` (older saves) onto `obj` itself.
fn lift_rope(obj: &mut Map<String, Value>) {
    let rope = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_object).cloned());
    let Some(rope) = rope else { return };
    for (from, to) in
        [("rope_theta", "rope_theta"), ("mrope_section", "mrope_section"), ("type", "rope_type")]
    {
        if let Some(v) = rope.get(from) {
            obj.insert(to.into(), v.clone());
        }
    }
    // transformers 5 writes both `type: "mrope"` and `rope_type: "default"`; the latter decides.
    if let Some(v) = rope.get("rope_type") {
        obj.insert("rope_type".into(), v.clone());
    }
    // transformers reads `mrope` as `default`: M-RoPE is this model's default rotary embedding.
    if obj.get("rope_type").and_then(Value::as_str) == Some("mrope") {
        obj.insert("rope_type".into(), "default".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: Value) -> Result<TextEncoderConfig, String> {
        let cfg: TextEncoderConfig =
            serde_json::from_value(TextEncoderConfig::select(json)).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn the_preset_is_valid_and_both_layouts_parse_alike() {
        let preset = TextEncoderConfig::qwen2_5_vl_7b();
        preset.validate().unwrap();
        assert_eq!(preset.head_dim(), 128);
        let flat = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "rope_theta": 100.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "image_token_id": 298, "pad_token_id": null,
            "vision_config": {"depth": 4, "hidden_size": 32, "num_heads": 2, "in_chans": 3,
                "intermediate_size": 64, "out_hidden_size": 64, "window_size": 56,
                "fullatt_block_indexes": [1, 3]},
        });
        let nested = serde_json::json!({
            "image_token_id": 298,
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                "rope_parameters": {"rope_theta": 100.0, "mrope_section": [2, 3, 3],
                    "rope_type": "default", "type": "mrope"}},
            "vision_config": {"depth": 4, "hidden_size": 32, "num_heads": 2, "in_channels": 3,
                "intermediate_size": 64, "out_hidden_size": 64, "window_size": 56,
                "fullatt_block_indexes": [1, 3],
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}},
        });
        let (a, b) = (parse(flat).unwrap(), parse(nested).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.mrope_section, [2, 3, 3]);
        assert_eq!(a.rope_theta, 100.0);
        assert_eq!(a.vision_config.window_size, 56);
    }

    #[test]
    fn unsupported_values_are_named() {
        let bad = serde_json::json!({"text_config": {"rope_parameters": {"mrope_section": [16, 24, 23]}}});
        assert!(parse(bad).unwrap_err().contains("mrope_section"));
        let bad = serde_json::json!({"vision_config": {"window_size": 100}});
        assert!(parse(bad).unwrap_err().contains("window_size"));
        let bad = serde_json::json!({"rope_scaling": {"rope_type": "yarn", "mrope_section": [16, 24, 24]}});
        assert!(parse(bad).unwrap_err().contains("yarn"));
    }
}

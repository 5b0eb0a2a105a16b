//! Wan2.1 DiT configuration: diffusers' `WanTransformer3DModel` `config.json` (the x2v native
//! form), the original release's `WanModel` `config.json`, and named presets.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Component, Error};

/// Hyper-parameters of a Wan2.1 diffusion transformer (diffusers field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Patch size over (frames, height, width) of the latent; Wan2.1 uses (1, 2, 2).
    #[serde(default = "default_patch")]
    pub patch_size: [i64; 3],
    /// Attention heads; `dim = num_attention_heads · attention_head_dim`.
    pub num_attention_heads: i64,
    /// Channels per head (128 in every Wan2.1 model).
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: i64,
    /// Latent channels in: 16 (T2V) or 36 (I2V: noise 16 + mask 4 + condition 16).
    pub in_channels: i64,
    /// Latent channels out (16).
    #[serde(default = "default_out")]
    pub out_channels: i64,
    /// Text-encoder hidden size (UMT5-XXL: 4096).
    #[serde(default = "default_text_dim")]
    pub text_dim: i64,
    /// Channels of the sinusoidal timestep embedding (256).
    #[serde(default = "default_freq_dim")]
    pub freq_dim: i64,
    /// Hidden size of the feed-forward layers.
    pub ffn_dim: i64,
    /// Transformer blocks.
    pub num_layers: i64,
    /// Whether cross-attention has an affine LayerNorm on its input (`blocks.N.norm2`); Wan2.1: true.
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    /// q/k normalisation: only `"rms_norm_across_heads"` exists in Wan2.1.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    /// Epsilon of the block norms (1e-6).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// CLIP feature size for I2V (1280); `None` for T2V.
    #[serde(default)]
    pub image_dim: Option<i64>,
    /// Input size of the image key/value projections in cross-attention (I2V: `dim`).
    #[serde(default)]
    pub added_kv_proj_dim: Option<i64>,
    /// Positions per axis covered by the RoPE tables (1024).
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: i64,
    /// Learned image position embedding (Wan2.1 FLF2V only); unsupported when set.
    #[serde(default)]
    pub pos_embed_seq_len: Option<i64>,
}

fn default_patch() -> [i64; 3] {
    [1, 2, 2]
}
fn default_head_dim() -> i64 {
    128
}
fn default_out() -> i64 {
    16
}
fn default_text_dim() -> i64 {
    4096
}
fn default_freq_dim() -> i64 {
    256
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> i64 {
    1024
}

/// The original release's `WanModel` config (`Wan-AI/Wan2.1-*` repositories).
#[derive(Debug, Clone, Deserialize)]
struct OriginalConfig {
    #[serde(default = "default_model_type")]
    model_type: String,
    #[serde(default = "default_patch")]
    patch_size: [i64; 3],
    #[serde(default = "default_text_dim")]
    text_dim: i64,
    in_dim: i64,
    dim: i64,
    ffn_dim: i64,
    #[serde(default = "default_freq_dim")]
    freq_dim: i64,
    #[serde(default = "default_out")]
    out_dim: i64,
    num_heads: i64,
    num_layers: i64,
    #[serde(default = "default_true")]
    cross_attn_norm: bool,
    #[serde(default = "default_eps")]
    eps: f64,
}

fn default_model_type() -> String {
    "t2v".into()
}

/// Which key layout a checkpoint directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// diffusers `transformer/` (`WanTransformer3DModel` keys).
    Diffusers,
    /// The original Wan release (`WanModel` keys, remapped on load).
    Original,
}

impl Config {
    /// Wan2.1-T2V-1.3B.
    pub fn wan21_t2v_1_3b() -> Self {
        Config { num_attention_heads: 12, ffn_dim: 8960, num_layers: 30, ..Self::wan21_t2v_14b() }
    }

    /// Wan2.1-T2V-14B.
    pub fn wan21_t2v_14b() -> Self {
        Config {
            patch_size: default_patch(),
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: default_qk_norm(),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }

    /// Wan2.1-I2V-14B (480P and 720P share the architecture).
    pub fn wan21_i2v_14b() -> Self {
        Config {
            in_channels: 36,
            image_dim: Some(1280),
            added_kv_proj_dim: Some(5120),
            ..Self::wan21_t2v_14b()
        }
    }

    /// Model width.
    pub fn dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Whether the model takes CLIP image features (Wan2.1 I2V). Wan2.2's I2V experts condition on
    /// the image latents alone (`in_channels` 36, no image attention).
    pub fn takes_image_embeds(&self) -> bool {
        self.added_kv_proj_dim.is_some()
    }

    /// The same model without the CLIP image attention: an original-layout `model_type = "i2v"`
    /// config of Wan2.2, whose checkpoint has no `img_emb` (the config file cannot tell the two
    /// releases apart).
    pub fn without_image_attention(self) -> Self {
        Config { image_dim: None, added_kv_proj_dim: None, ..self }
    }

    /// Reads `config.json` in either layout and says which one it is.
    pub fn from_file(path: &Path) -> Result<(Self, Layout), Error> {
        let bad = |message: String| Error::config(Component::Transformer, Some(path), message);
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let class = json.get("_class_name").and_then(|v| v.as_str()).unwrap_or_default();
        let original = class == "WanModel" || (class.is_empty() && json.get("dim").is_some());
        let (config, layout) = if original {
            let o: OriginalConfig = serde_json::from_value(json).map_err(|e| bad(e.to_string()))?;
            (Self::from_original(o).map_err(bad)?, Layout::Original)
        } else {
            let c: Config = serde_json::from_value(json).map_err(|e| bad(e.to_string()))?;
            (c, Layout::Diffusers)
        };
        config.validate().map_err(bad)?;
        Ok((config, layout))
    }

    fn from_original(o: OriginalConfig) -> Result<Self, String> {
        if o.num_heads <= 0 || o.dim % o.num_heads != 0 {
            return Err(format!("dim {} is not divisible by num_heads {}", o.dim, o.num_heads));
        }
        let head_dim = o.dim / o.num_heads;
        let i2v = match o.model_type.as_str() {
            // TI2V-5B conditions on the first frame's latents, with no image attention.
            "t2v" | "ti2v" => false,
            "i2v" => true,
            other => return Err(format!("model_type `{other}` is not supported (t2v, i2v, ti2v)")),
        };
        Ok(Config {
            patch_size: o.patch_size,
            num_attention_heads: o.num_heads,
            attention_head_dim: head_dim,
            in_channels: o.in_dim,
            out_channels: o.out_dim,
            text_dim: o.text_dim,
            freq_dim: o.freq_dim,
            ffn_dim: o.ffn_dim,
            num_layers: o.num_layers,
            cross_attn_norm: o.cross_attn_norm,
            qk_norm: default_qk_norm(),
            eps: o.eps,
            image_dim: i2v.then_some(1280),
            added_kv_proj_dim: i2v.then_some(o.dim),
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        })
    }

    /// Rejects configurations this implementation does not cover.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("num_layers", self.num_layers),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("{name} must be positive, got {v}"));
        }
        if self.patch_size.iter().any(|&p| p <= 0) {
            return Err(format!("patch_size must be positive, got {:?}", self.patch_size));
        }
        if self.attention_head_dim % 2 != 0 || self.attention_head_dim < 6 {
            return Err(format!(
                "attention_head_dim must be even and ≥ 6, got {}",
                self.attention_head_dim
            ));
        }
        if self.freq_dim % 2 != 0 {
            return Err(format!("freq_dim must be even, got {}", self.freq_dim));
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return Err(format!(
                "qk_norm must be \"rms_norm_across_heads\", got {:?}",
                self.qk_norm
            ));
        }
        if self.image_dim.is_some() != self.added_kv_proj_dim.is_some() {
            return Err(
                "image_dim and added_kv_proj_dim must be set together (I2V) or both unset".into()
            );
        }
        if self.pos_embed_seq_len.is_some() {
            return Err("pos_embed_seq_len (FLF2V) is not supported".into());
        }
        Ok(())
    }
}

impl ModelConfig for Config {
    const COMPONENT: Component = Component::Transformer;

    fn validate(&self) -> Result<(), String> {
        Config::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_published_sizes() {
        let c = Config::wan21_t2v_1_3b();
        assert_eq!((c.dim(), c.ffn_dim, c.num_layers), (1536, 8960, 30));
        assert_eq!(Config::wan21_t2v_14b().dim(), 5120);
        let i2v = Config::wan21_i2v_14b();
        assert!(i2v.takes_image_embeds() && i2v.in_channels == 36);
        for c in [Config::wan21_t2v_1_3b(), Config::wan21_t2v_14b(), i2v] {
            c.validate().unwrap();
        }
    }

    #[test]
    fn reads_both_layouts_and_rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"_class_name":"WanModel","model_type":"i2v","dim":5120,"ffn_dim":13824,"in_dim":36,
                "num_heads":40,"num_layers":40,"out_dim":16,"eps":1e-6,"freq_dim":256,"text_len":512}"#,
        )
        .unwrap();
        let (c, layout) = Config::from_file(&p).unwrap();
        assert_eq!((layout, c), (Layout::Original, Config::wan21_i2v_14b()));

        let mut d = serde_json::to_value(Config::wan21_t2v_1_3b()).unwrap();
        d["_class_name"] = "WanTransformer3DModel".into();
        std::fs::write(&p, d.to_string()).unwrap();
        assert_eq!(Config::from_file(&p).unwrap(), (Config::wan21_t2v_1_3b(), Layout::Diffusers));

        d["num_layers"] = 0.into();
        std::fs::write(&p, d.to_string()).unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("num_layers must be positive"), "{err}");
    }
}

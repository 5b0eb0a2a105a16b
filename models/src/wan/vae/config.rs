//! `AutoencoderKLWan` configuration (diffusers `vae/config.json`) and the Wan2.1 preset.

use std::path::Path;

use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{Component, Error};

/// `AutoencoderKLWan` config, read from the diffusers `vae/config.json` (unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Channels of the first encoder stage (`dim` in the original code).
    pub base_dim: i64,
    /// Decoder base channels; `None` means `base_dim`.
    pub decoder_base_dim: Option<i64>,
    /// Latent channels.
    pub z_dim: i64,
    /// Channel multiplier per stage.
    pub dim_mult: Vec<i64>,
    /// Residual blocks per encoder stage (the decoder has one more).
    pub num_res_blocks: i64,
    /// Stage scales with attention; Wan2.1 uses none, and none is all this port supports.
    pub attn_scales: Vec<f64>,
    /// Whether each encoder downsampling also halves time (the decoder mirrors it).
    pub temperal_downsample: Vec<bool>,
    /// Per-channel latent mean used by [`AutoencoderKLWan::normalize_latents`].
    pub latents_mean: Vec<f64>,
    /// Per-channel latent std used by [`AutoencoderKLWan::normalize_latents`].
    pub latents_std: Vec<f64>,
    /// Wan2.2 residual up/down blocks; not supported (Wan2.1 is `false`).
    pub is_residual: bool,
    /// Video channels in.
    pub in_channels: i64,
    /// Video channels out.
    pub out_channels: i64,
    /// Wan2.2 pixel patchification; not supported (Wan2.1 is `None`).
    pub patch_size: Option<i64>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self::wan21()
    }
}

impl VaeConfig {
    /// The Wan2.1 VAE (also Qwen-Image's VAE): 126.9 M parameters.
    pub fn wan21() -> Self {
        VaeConfig {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
        }
    }

    /// Reads a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        crate::config::read_config_file(path)
    }

    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(m);
        if self.is_residual {
            return bad("is_residual = true (Wan2.2 VAE) is not supported".into());
        }
        if let Some(p) = self.patch_size {
            return bad(format!("patch_size = {p} (Wan2.2 VAE) is not supported"));
        }
        if !self.attn_scales.is_empty() {
            return bad(format!("attn_scales = {:?}; only [] is supported", self.attn_scales));
        }
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return bad(format!(
                "temperal_downsample has {} entries, dim_mult {}: expected one fewer",
                self.temperal_downsample.len(),
                self.dim_mult.len()
            ));
        }
        let z = self.z_dim as usize;
        if self.latents_mean.len() != z || self.latents_std.len() != z {
            return bad(format!(
                "latents_mean/latents_std have {}/{} entries, z_dim is {z}",
                self.latents_mean.len(),
                self.latents_std.len()
            ));
        }
        if self.base_dim <= 0 || self.z_dim <= 0 || self.num_res_blocks <= 0 {
            return bad(format!(
                "base_dim {}, z_dim {}, num_res_blocks {} must be positive",
                self.base_dim, self.z_dim, self.num_res_blocks
            ));
        }
        Ok(())
    }

    /// Frames in per latent frame after the first (4 for Wan2.1).
    pub fn temporal_factor(&self) -> i64 {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Pixels per latent pixel along H and W (8 for Wan2.1).
    pub fn spatial_factor(&self) -> i64 {
        1 << (self.dim_mult.len() - 1)
    }
}

impl ModelConfig for VaeConfig {
    const COMPONENT: Component = Component::Vae;

    fn validate(&self) -> Result<(), String> {
        VaeConfig::validate(self)
    }
}

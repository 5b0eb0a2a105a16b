//! `AutoencoderKLWan` configuration (diffusers `vae/config.json`) and the Wan2.1 and Wan2.2 presets.

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
    /// Stage scales with attention; the Wan VAEs use none, and none is all this port supports.
    pub attn_scales: Vec<f64>,
    /// Whether each encoder downsampling also halves time (the decoder mirrors it).
    pub temperal_downsample: Vec<bool>,
    /// Per-channel latent mean used by [`AutoencoderKLWan::normalize_latents`].
    pub latents_mean: Vec<f64>,
    /// Per-channel latent std used by [`AutoencoderKLWan::normalize_latents`].
    pub latents_std: Vec<f64>,
    /// Wan2.2: residual down/up blocks (an averaging or duplicating shortcut around each stage,
    /// upsamplers that keep the channel count, no halving between decoder stages).
    pub is_residual: bool,
    /// Channels the encoder takes: the video's, times `patch_size²` when it is patchified.
    pub in_channels: i64,
    /// Channels the decoder gives, patchified as `in_channels`.
    pub out_channels: i64,
    /// Wan2.2: pixels are folded `p×p` into channels before encoding and unfolded after decoding.
    pub patch_size: Option<i64>,
    /// Pixels per latent pixel as the pipelines read it; checked against the network's.
    pub scale_factor_spatial: Option<i64>,
    /// Frames per latent frame after the first, as the pipelines read it; checked likewise.
    pub scale_factor_temporal: Option<i64>,
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
            scale_factor_spatial: None,
            scale_factor_temporal: None,
        }
    }

    /// The Wan2.2 VAE of TI2V-5B (`Wan2.2_VAE.pth`): 48 latent channels, 16× spatial compression
    /// (2×2 patchify, then 8×), residual blocks.
    pub fn wan22() -> Self {
        VaeConfig {
            base_dim: 160,
            decoder_base_dim: Some(256),
            z_dim: 48,
            latents_mean: vec![
                -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382,
                0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207,
                -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109,
                0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
                -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573,
                -0.0548, -0.1681, -0.0667,
            ],
            latents_std: vec![
                0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
                0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
                0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
                0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
            ],
            is_residual: true,
            in_channels: 12,
            out_channels: 12,
            patch_size: Some(2),
            scale_factor_spatial: Some(16),
            scale_factor_temporal: Some(4),
            ..Self::wan21()
        }
    }

    /// The preset of an original-release VAE file: `Wan2.2_VAE.pth` is the Wan2.2 VAE, anything
    /// else the Wan2.1 one.
    pub fn for_original_file(path: &Path) -> Self {
        let wan22 = path.file_name().is_some_and(|n| n == "Wan2.2_VAE.pth");
        if wan22 { Self::wan22() } else { Self::wan21() }
    }

    /// Reads a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        crate::config::read_config_file(path)
    }

    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(m);
        let p2 = self.patch() * self.patch();
        if self.patch() < 1 {
            return bad(format!("patch_size must be at least 1, got {}", self.patch()));
        }
        for (name, c) in [("in_channels", self.in_channels), ("out_channels", self.out_channels)] {
            if c <= 0 || c % p2 != 0 {
                return bad(format!(
                    "{name} = {c} must be a positive multiple of patch_size² = {p2}"
                ));
            }
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
        let given = [
            ("scale_factor_spatial", self.scale_factor_spatial, self.spatial_factor()),
            ("scale_factor_temporal", self.scale_factor_temporal, self.temporal_factor()),
        ];
        for (name, given, network) in given {
            if let Some(g) = given
                && g != network
            {
                return bad(format!("{name} = {g}, but the network compresses by {network}"));
            }
        }
        Ok(())
    }

    /// The patchify factor (1 without patchification).
    pub fn patch(&self) -> i64 {
        self.patch_size.unwrap_or(1)
    }

    /// Channels of the video itself (3 for RGB), before patchification.
    pub fn video_channels(&self) -> i64 {
        self.in_channels / (self.patch() * self.patch())
    }

    /// Frames in per latent frame after the first (4 for the Wan VAEs).
    pub fn temporal_factor(&self) -> i64 {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Pixels per latent pixel along H and W (8 for Wan2.1, 16 for Wan2.2).
    pub fn spatial_factor(&self) -> i64 {
        (1 << (self.dim_mult.len() - 1)) * self.patch()
    }
}

impl ModelConfig for VaeConfig {
    const COMPONENT: Component = Component::Vae;

    fn validate(&self) -> Result<(), String> {
        VaeConfig::validate(self)
    }
}

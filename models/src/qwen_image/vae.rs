//! Qwen-Image's VAE, diffusers `AutoencoderKLQwenImage`
//! (`models/autoencoders/autoencoder_kl_qwenimage.py`): the Wan2.1 VAE architecture with the
//! same state-dict keys and Qwen's own weights, so it runs on [`AutoencoderKLWan`]. This file adds
//! its config file and the image-level entry points of the Qwen-Image pipelines:
//!
//! - [`QwenImageVae::encode_image`]: `[B, 3, H, W]` in `[-1, 1]` → normalised latents
//!   `[B, 16, 1, H/8, W/8]`, as `QwenImageEditPipeline._encode_vae_image` computes
//!   `image_latents` (`retrieve_latents(…, sample_mode="argmax")` = the posterior mode, then
//!   `(z − mean) / std`).
//! - [`QwenImageVae::decode_image`]: normalised latents → `uint8 [B, H, W, 3]`, as the pipeline's
//!   decode (`z / (1/std) + mean`, first frame) followed by `VaeImageProcessor.postprocess` and
//!   `numpy_to_pil` (`round(clamp(x·0.5 + 0.5, 0, 1)·255)`, half to even).
//!
//! Arithmetic follows the pipeline's dtype flow: the normalisation runs in the latents' dtype
//! with the statistics cast to it, the `[0, 1]` mapping in the VAE's dtype, the `·255` in fp32.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, read_config};
use crate::error::{Component, Error};
use crate::wan::vae::{AutoencoderKLWan, VaeConfig, VaeParts};

/// `AutoencoderKLQwenImage`'s `vae/config.json` (unknown keys ignored; missing ones take the
/// class defaults, which are the released model's values).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct QwenImageVaeConfig {
    /// Channels of the first encoder stage.
    pub base_dim: i64,
    /// Latent channels.
    pub z_dim: i64,
    /// Channel multiplier per stage.
    pub dim_mult: Vec<i64>,
    /// Residual blocks per encoder stage (the decoder has one more).
    pub num_res_blocks: i64,
    /// Stage scales with attention; only `[]` is supported.
    pub attn_scales: Vec<f64>,
    /// Whether each encoder downsampling also halves time.
    pub temperal_downsample: Vec<bool>,
    /// Training dropout (unused at inference).
    pub dropout: f64,
    /// Image channels in and out.
    pub input_channels: i64,
    /// Per-channel latent mean.
    pub latents_mean: Vec<f64>,
    /// Per-channel latent std.
    pub latents_std: Vec<f64>,
}

impl Default for QwenImageVaeConfig {
    fn default() -> Self {
        Self::qwen_image()
    }
}

impl QwenImageVaeConfig {
    /// The released Qwen-Image VAE (126.9 M parameters; the Wan2.1 shapes and statistics).
    pub fn qwen_image() -> Self {
        let wan = VaeConfig::wan21();
        QwenImageVaeConfig {
            base_dim: wan.base_dim,
            z_dim: wan.z_dim,
            dim_mult: wan.dim_mult,
            num_res_blocks: wan.num_res_blocks,
            attn_scales: wan.attn_scales,
            temperal_downsample: wan.temperal_downsample,
            dropout: 0.0,
            input_channels: 3,
            latents_mean: wan.latents_mean,
            latents_std: wan.latents_std,
        }
    }

    /// The same network as a Wan VAE config.
    pub fn to_wan(&self) -> VaeConfig {
        VaeConfig {
            base_dim: self.base_dim,
            decoder_base_dim: None,
            z_dim: self.z_dim,
            dim_mult: self.dim_mult.clone(),
            num_res_blocks: self.num_res_blocks,
            attn_scales: self.attn_scales.clone(),
            temperal_downsample: self.temperal_downsample.clone(),
            latents_mean: self.latents_mean.clone(),
            latents_std: self.latents_std.clone(),
            is_residual: false,
            in_channels: self.input_channels,
            out_channels: self.input_channels,
            patch_size: None,
            scale_factor_spatial: None,
            scale_factor_temporal: None,
        }
    }
}

impl ModelConfig for QwenImageVaeConfig {
    const COMPONENT: Component = Component::Vae;

    fn validate(&self) -> Result<(), String> {
        if self.input_channels != 3 {
            return Err(format!("input_channels = {}; images have 3", self.input_channels));
        }
        self.to_wan().validate()
    }
}

/// The Qwen-Image VAE: an [`AutoencoderKLWan`] loaded from a diffusers `vae/` directory, with the
/// pipelines' image-level encode and decode.
#[derive(Debug)]
pub struct QwenImageVae {
    vae: AutoencoderKLWan,
    /// The weights' dtype and device.
    kind: Kind,
    device: Device,
}

impl QwenImageVae {
    /// Loads encoder and decoder from a diffusers `vae/` directory (`config.json` +
    /// `diffusion_pytorch_model.safetensors`), weights in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, Error> {
        Self::load_parts(dir, device, kind, VaeParts::Full)
    }

    /// [`QwenImageVae::load`] for one half: [`VaeParts::Encoder`] for the edit pipelines'
    /// condition images, [`VaeParts::Decoder`] for the decode stage.
    pub fn load_parts(
        dir: &Path,
        device: Device,
        kind: Kind,
        parts: VaeParts,
    ) -> Result<Self, Error> {
        let cfg: QwenImageVaeConfig = read_config(dir, QwenImageVaeConfig::qwen_image)?;
        let vae = AutoencoderKLWan::load_parts(dir, Some(cfg.to_wan()), device, kind, parts)?;
        Ok(QwenImageVae { vae, kind, device })
    }

    /// The underlying Wan VAE (raw encode/decode of videos).
    pub fn inner(&self) -> &AutoencoderKLWan {
        &self.vae
    }

    /// Per-channel `(mean, std)` as `[1, z, 1, 1, 1]` in `kind` on `device`: fp32 values of the
    /// config's numbers (`torch.tensor(list)`), then cast.
    fn stats(&self, kind: Kind, device: Device) -> (Tensor, Tensor) {
        let cfg = self.vae.config();
        let t = |v: &[f64]| {
            Tensor::from_slice(v)
                .to_kind(Kind::Float)
                .view([1, cfg.z_dim, 1, 1, 1])
                .to_device(device)
                .to_kind(kind)
        };
        (t(&cfg.latents_mean), t(&cfg.latents_std))
    }

    /// `_encode_vae_image`: images `[B, 3, H, W]` in `[-1, 1]` (H, W multiples of 8) → normalised
    /// posterior modes `[B, 16, 1, H/8, W/8]` in the VAE's dtype.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor, Error> {
        let size = image.size();
        if size.len() != 4 {
            return Err(Error::input(
                Component::Vae,
                format!("image must be [B, 3, H, W], got shape {size:?}"),
            ));
        }
        let image = image.to_device(self.device).to_kind(self.kind);
        let z = self.vae.encode(&image.unsqueeze(2))?;
        let (mean, std) = self.stats(z.kind(), z.device());
        Ok((z - mean) / std)
    }

    /// The pipeline's decode: normalised latents `[B, 16, 1, h, w]` → `[B, 3, 8h, 8w]` in
    /// `[-1, 1]` (the VAE output's first frame, in the VAE's dtype).
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor, Error> {
        let size = latents.size();
        if size.len() != 5 || size[2] != 1 {
            return Err(Error::input(
                Component::Vae,
                format!("latents must be [B, 16, 1, h, w], got shape {size:?}"),
            ));
        }
        let z = latents.to_device(self.device).to_kind(self.kind);
        let (mean, std) = self.stats(self.kind, self.device);
        // diffusers divides by the reciprocal of std rather than multiplying by std.
        let z = z / std.reciprocal() + mean;
        Ok(self.vae.decode(&z)?.select(2, 0))
    }

    /// [`QwenImageVae::decode_latents`] then the pipeline's `postprocess` + `numpy_to_pil` rule:
    /// `uint8 [B, H, W, 3]`.
    pub fn decode_image(&self, latents: &Tensor) -> Result<Tensor, Error> {
        Ok(image_u8(&self.decode_latents(latents)?))
    }
}

/// `numpy_to_pil(postprocess(x))` for images `[B, 3, H, W]` in `[-1, 1]`: `clamp(x·0.5 + 0.5, 0, 1)`
/// in `x`'s dtype, then fp32 `·255`, rounded half to even, as `uint8 [B, H, W, 3]`.
pub fn image_u8(images: &Tensor) -> Tensor {
    let unit = (images * 0.5 + 0.5).clamp(0.0, 1.0);
    (unit.permute([0, 2, 3, 1]).to_kind(Kind::Float) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .to_device(Device::Cpu)
        .contiguous()
}

//! The Wan video VAEs (`AutoencoderKLWan`): causal 3D convolutional encoder/decoder with 4× temporal
//! compression, run chunk by chunk with a feature cache. Wan2.1's (16 latent channels) compresses
//! 8× in space; Wan2.2's (TI2V-5B, 48 channels) folds 2×2 pixel patches into channels first and
//! wraps each stage in a parameter-free shortcut, for 16× in space.
//!
//! Reference: diffusers `models/autoencoders/autoencoder_kl_wan.py` (key names follow its
//! state dict); the original release is `Wan-Video/Wan2.1` `wan/modules/vae.py`, whose
//! `Wan2.1_VAE.pth` keys (and Wan2.2's `Wan2.2_VAE.pth`) are mapped by [`original_key_table`].
//!
//! Boundary shapes: video `[B, 3, 1+4k, H, W]` in `[-1, 1]` ↔ latents `[B, z_dim, 1+k, H/s, W/s]`,
//! `s` the spatial factor (8 or 16).
//! Encoding runs the frame chunks `[0], [1:5], [5:9], …`; decoding runs one latent frame at a
//! time (the first yields one frame, each later one four) and clamps to `[-1, 1]`.
//!
//! A stage that needs one direction only builds and loads that half ([`VaeParts`]): the decoder
//! stage `decoder.*` + `post_quant_conv`, the I2V encoder `encoder.*` + `quant_conv`; both keep
//! the latent statistics.

mod blocks;
mod coders;
mod config;
mod keys;
mod quantize;

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use crate::config::{checked, read_config};
use crate::error::{Component, Error};
use crate::nn::Builder;
use crate::weights::{self, Checkpoint, LoadOptions};
use blocks::{CausalConv3d, FeatCache, patchify, unpatchify};
use coders::{Decoder, Encoder};
pub use config::VaeConfig;
pub use keys::{original_key_table, remap_key};
pub use quantize::{Quantize, frames_u8};

/// Which halves of the VAE are built and loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeParts {
    /// Encoder and decoder.
    #[default]
    Full,
    /// `encoder.*` + `quant_conv`: video → latents (the I2V conditioning).
    Encoder,
    /// `decoder.*` + `post_quant_conv`: latents → video.
    Decoder,
}

impl VaeParts {
    pub fn name(self) -> &'static str {
        match self {
            VaeParts::Full => "Full",
            VaeParts::Encoder => "Encoder",
            VaeParts::Decoder => "Decoder",
        }
    }

    pub fn has_encoder(self) -> bool {
        self != VaeParts::Decoder
    }

    pub fn has_decoder(self) -> bool {
        self != VaeParts::Encoder
    }

    /// Whether checkpoint key `key` (diffusers name) belongs to a half this selection leaves
    /// out; such keys are skipped on load rather than reported as unexpected.
    pub fn skips(self, key: &str) -> bool {
        let encoder = key.starts_with("encoder.") || key.starts_with("quant_conv.");
        let decoder = key.starts_with("decoder.") || key.starts_with("post_quant_conv.");
        (encoder && !self.has_encoder()) || (decoder && !self.has_decoder())
    }
}

/// A Wan VAE with diffusers module paths (`encoder.*`, `decoder.*`, `quant_conv`,
/// `post_quant_conv`), whole or one half of it ([`VaeParts`]).
#[derive(Debug)]
pub struct AutoencoderKLWan {
    cfg: VaeConfig,
    parts: VaeParts,
    /// `encoder` and `quant_conv`.
    encoder: Option<(Encoder, CausalConv3d)>,
    /// `decoder` and `post_quant_conv`.
    decoder: Option<(Decoder, CausalConv3d)>,
    latents_mean: Tensor,
    latents_std: Tensor,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

impl AutoencoderKLWan {
    /// The modules of `parts` for `cfg`, with empty parameters in `kind` on `device`.
    pub fn build(
        cfg: &VaeConfig,
        parts: VaeParts,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let cfg = checked(cfg.clone())?;
        let vs = nn::VarStore::new(device);
        let p = Builder::new(&vs, kind, &[]);
        let z = cfg.z_dim;
        let stats =
            |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, z, 1, 1, 1]).to(device);
        Ok(AutoencoderKLWan {
            parts,
            encoder: parts.has_encoder().then(|| {
                let quant_conv = CausalConv3d::cube(&p / "quant_conv", 2 * z, 2 * z, 1);
                (Encoder::new(&p / "encoder", &cfg), quant_conv)
            }),
            decoder: parts.has_decoder().then(|| {
                let post_quant_conv = CausalConv3d::cube(&p / "post_quant_conv", z, z, 1);
                (Decoder::new(&p / "decoder", &cfg), post_quant_conv)
            }),
            latents_mean: stats(&cfg.latents_mean),
            latents_std: stats(&cfg.latents_std),
            cfg,
            vs,
        })
    }

    /// Loads a VAE from a diffusers `vae/` directory (`config.json` + safetensors), a single
    /// safetensors file, or the original `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`. The key layout is
    /// detected from the checkpoint; `cfg` defaults to the directory's `config.json`, else the
    /// preset of the file's name ([`VaeConfig::for_original_file`]).
    /// `kind` is the weights' dtype (fp32, or bf16).
    pub fn load(
        path: &Path,
        cfg: Option<VaeConfig>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        Self::load_parts(path, cfg, device, kind, VaeParts::Full)
    }

    /// [`AutoencoderKLWan::load`] for the halves in `parts`: the keys of a half left out are
    /// skipped, those of a loaded half are checked strictly (a missing one is an error).
    pub fn load_parts(
        path: &Path,
        cfg: Option<VaeConfig>,
        device: Device,
        kind: Kind,
        parts: VaeParts,
    ) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let cfg = match cfg {
            Some(c) => c,
            None => read_config(path, || VaeConfig::for_original_file(path))?,
        };
        let ckpt = Checkpoint::open(path)?;
        let table = ckpt.contains("encoder.conv1.weight").then(|| original_key_table(&cfg));
        let ckpt = ckpt.remap(|k| {
            let k = table.as_ref().map_or_else(|| k.to_owned(), |t| remap_key(t, k));
            (!parts.skips(&k)).then_some(k)
        });
        let model = Self::build(&cfg, parts, device, kind)?;
        weights::load_into(&model.vs, &ckpt, &LoadOptions::strict())?;
        weights::log_loaded(Component::Vae, &ckpt, &model.vs, kind, started);
        Ok(model)
    }

    /// Its parameters, by checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Which halves are built.
    pub fn parts(&self) -> VaeParts {
        self.parts
    }

    /// A parameter of whichever half is built (all share one dtype and device).
    fn any_weight(&self) -> &Tensor {
        match (&self.encoder, &self.decoder) {
            (_, Some((_, post_quant_conv))) => post_quant_conv.weight(),
            (Some((_, quant_conv)), None) => quant_conv.weight(),
            (None, None) => unreachable!("VaeParts always selects a half"),
        }
    }

    /// The parameters' dtype (all share one).
    fn kind(&self) -> Kind {
        self.any_weight().kind()
    }

    fn device(&self) -> Device {
        self.any_weight().device()
    }

    fn check_5d(&self, x: &Tensor, what: &str, channels: i64) -> Result<[i64; 5], Error> {
        let size = x.size();
        let Ok(s): Result<[i64; 5], _> = size.clone().try_into() else {
            return Err(Error::input(
                Component::Vae,
                format!("{what} must be [B, C, T, H, W], got shape {size:?}"),
            ));
        };
        if s[1] != channels {
            return Err(Error::input(
                Component::Vae,
                format!("{what} must have {channels} channels, got shape {size:?}"),
            ));
        }
        if s.contains(&0) {
            return Err(Error::input(
                Component::Vae,
                format!("{what} has an empty dimension: shape {size:?}"),
            ));
        }
        Ok(s)
    }

    /// The posterior parameters `[B, 2·z_dim, T', H/s, W/s]` (mean, then log-variance) of a video
    /// `[B, 3, 1+4k, H, W]` in `[-1, 1]`; H and W must be multiples of the spatial factor `s`.
    pub fn encode_moments(&self, video: &Tensor) -> Result<Tensor, Error> {
        let Some((encoder, quant_conv)) = &self.encoder else {
            return Err(Error::NotLoaded("encoder", self.parts.name()));
        };
        let s = self.check_5d(video, "video", self.cfg.video_channels())?;
        let (tf, sf) = (self.cfg.temporal_factor(), self.cfg.spatial_factor());
        if (s[2] - 1) % tf != 0 {
            return Err(Error::input(
                Component::Vae,
                format!("video has {} frames; the VAE takes 1 + {tf}·k frames", s[2]),
            ));
        }
        if s[3] % sf != 0 || s[4] % sf != 0 {
            return Err(Error::input(
                Component::Vae,
                format!("video is {}×{} (H×W); both must be multiples of {sf}", s[3], s[4]),
            ));
        }
        let _guard = tch::no_grad_guard();
        let x = patchify(&video.to_device(self.device()).to_kind(self.kind()), self.cfg.patch());
        let mut cache = FeatCache::new();
        let mut outs = Vec::new();
        let mut start = 0;
        while start < s[2] {
            let len = if start == 0 { 1 } else { tf };
            cache.start_chunk();
            outs.push(encoder.forward(&x.narrow(2, start, len), &mut cache));
            start += len;
        }
        let h = Tensor::cat(&outs, 2);
        Ok(quant_conv.forward(&h, None))
    }

    /// `encode(video).latent_dist.mode()`: the posterior mean `[B, z_dim, T', H/s, W/s]`.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor, Error> {
        Ok(self.encode_moments(video)?.narrow(1, 0, self.cfg.z_dim))
    }

    /// Decodes raw (un-normalised) latents `[B, z_dim, T', h, w]` to a video
    /// `[B, 3, 1+4(T'−1), s·h, s·w]` clamped to `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, Error> {
        let Some((decoder, post_quant_conv)) = &self.decoder else {
            return Err(Error::NotLoaded("decoder", self.parts.name()));
        };
        let s = self.check_5d(z, "latents", self.cfg.z_dim)?;
        let _guard = tch::no_grad_guard();
        let x = post_quant_conv.forward(&z.to_device(self.device()).to_kind(self.kind()), None);
        let mut cache = FeatCache::new();
        let mut outs = Vec::with_capacity(s[2] as usize);
        for i in 0..s[2] {
            cache.start_chunk();
            outs.push(decoder.forward(&x.narrow(2, i, 1), &mut cache, i == 0));
        }
        Ok(unpatchify(&Tensor::cat(&outs, 2), self.cfg.patch()).clamp_(-1.0, 1.0))
    }

    /// The Wan I2V conditioning tensor `y` `[B, 4 + z_dim, T', H/8, W/8]` (diffusers
    /// `WanImageToVideoPipeline.prepare_latents`, no last image): the first frame `image`
    /// `[B, 3, H, W]` in `[-1, 1]` (already resized) followed by `num_frames − 1` zero frames is
    /// VAE-encoded (mode) and normalised; in front go 4 mask channels, all ones in latent frame 0
    /// and zeros after (the first pixel frame repeated ×4, then folded 4 frames per latent frame).
    pub fn i2v_condition(&self, image: &Tensor, num_frames: i64) -> Result<Tensor, Error> {
        let size = image.size();
        let [b, c, h, w] = size[..] else {
            return Err(Error::input(
                Component::Vae,
                format!("image must be [B, 3, H, W], got shape {size:?}"),
            ));
        };
        if c != self.cfg.video_channels() {
            return Err(Error::input(
                Component::Vae,
                format!(
                    "image must have {} channels, got shape {size:?}",
                    self.cfg.video_channels()
                ),
            ));
        }
        let tf = self.cfg.temporal_factor();
        if num_frames < 1 || (num_frames - 1) % tf != 0 {
            return Err(Error::input(
                Component::Vae,
                format!("num_frames = {num_frames}; I2V takes 1 + {tf}·k frames"),
            ));
        }
        let image = image.to_device(self.device()).to_kind(self.kind()).unsqueeze(2);
        let video = Tensor::cat(
            &[
                image.shallow_clone(),
                image.new_zeros([b, c, num_frames - 1, h, w], (image.kind(), image.device())),
            ],
            2,
        );
        let cond = self.encode_normalized(&video)?;
        let s = cond.size();
        let (t, lh, lw) = (s[2], s[3], s[4]);
        let mask = Tensor::zeros([b, tf, t, lh, lw], (Kind::Float, cond.device()));
        let _ = mask.narrow(2, 0, 1).fill_(1.0);
        Ok(Tensor::cat(&[mask, cond], 1))
    }

    /// The posterior mode of `video` (as [`AutoencoderKLWan::encode`]) normalised as diffusers' Wan
    /// I2V and V2V pipelines normalise it, `(mu − mean) · (1/std)` in fp32 (one rounding more
    /// than [`AutoencoderKLWan::normalize_latents`]' division).
    pub fn encode_normalized(&self, video: &Tensor) -> Result<Tensor, Error> {
        let mu = self.encode(video)?.to_kind(Kind::Float);
        let inv_std = self.latents_std.to_device(mu.device()).reciprocal();
        Ok((mu - self.latents_mean.to_device(inv_std.device())) * inv_std)
    }

    /// `(mu − mean) / std` per channel: the latents the DiT sees.
    pub fn normalize_latents(&self, mu: &Tensor) -> Result<Tensor, Error> {
        self.check_5d(mu, "latents", self.cfg.z_dim)?;
        let (m, s) =
            (self.latents_mean.to_device(mu.device()), self.latents_std.to_device(mu.device()));
        Ok(((mu.to_kind(Kind::Float) - m) / s).to_kind(mu.kind()))
    }

    /// `z · std + mean` per channel: DiT latents back to the VAE's raw latent space.
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor, Error> {
        self.check_5d(z, "latents", self.cfg.z_dim)?;
        let (m, s) =
            (self.latents_mean.to_device(z.device()), self.latents_std.to_device(z.device()));
        Ok((z.to_kind(Kind::Float) * s + m).to_kind(z.kind()))
    }
}

/// Parameter counts by top-level module, for reports.
pub fn parameter_counts(vs: &nn::VarStore) -> HashMap<String, i64> {
    let mut counts = HashMap::new();
    for (k, v) in vs.variables() {
        let top = k.split('.').next().unwrap_or_default().to_owned();
        *counts.entry(top).or_insert(0) += v.numel() as i64;
    }
    counts
}

//! Wan2.1 video VAE (`AutoencoderKLWan`): causal 3D convolutional encoder/decoder with 4× temporal
//! and 8× spatial compression, run chunk by chunk with a feature cache.
//!
//! Reference: diffusers `models/autoencoders/autoencoder_kl_wan.py` (key names follow its
//! state dict); the original release is `Wan-Video/Wan2.1` `wan/modules/vae.py`, whose
//! `Wan2.1_VAE.pth` keys are mapped by [`original_key_table`].
//!
//! Boundary shapes: video `[B, 3, 1+4k, H, W]` in `[-1, 1]` ↔ latents `[B, z_dim, 1+k, H/8, W/8]`.
//! Encoding runs the frame chunks `[0], [1:5], [5:9], …`; decoding runs one latent frame at a
//! time (the first yields one frame, each later one four) and clamps to `[-1, 1]`.
//!
//! A stage that needs one direction only builds and loads that half ([`VaeParts`]): the decoder
//! stage `decoder.*` + `post_quant_conv`, the I2V encoder `encoder.*` + `quant_conv`; both keep
//! the latent statistics.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use super::vae_blocks::{
    AttentionBlock, CausalConv3d, FeatCache, Resample, ResampleMode, ResidualBlock, RmsNorm,
};
use crate::weights::{self, Checkpoint, LoadOptions, WeightsError};

/// Why a VAE could not be built, loaded or run. Every variant names the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("unsupported VAE config: {0}")]
    Config(String),
    #[error("cannot read VAE config {path}: {message}")]
    ConfigFile { path: String, message: String },
    #[error("bad VAE input: {0}")]
    Input(String),
    #[error("this VAE was loaded without its {0} (VaeParts::{1:?})")]
    NotLoaded(&'static str, VaeParts),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl VaeError {
    pub fn kind(&self) -> x2v_core::ErrorKind {
        match self {
            VaeError::Input(_) => x2v_core::ErrorKind::InvalidRequest,
            VaeError::Weights(e) => e.kind(),
            _ => x2v_core::ErrorKind::Internal,
        }
    }
}

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
    pub fn from_file(path: &Path) -> Result<Self, VaeError> {
        let err =
            |message: String| VaeError::ConfigFile { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: VaeConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), VaeError> {
        let bad = |m: String| Err(VaeError::Config(m));
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

#[derive(Debug)]
enum DownLayer {
    Res(ResidualBlock),
    Resample(Resample),
}

#[derive(Debug)]
struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(p: nn::Path, dim: i64) -> Self {
        MidBlock {
            res0: ResidualBlock::new(&p / "resnets" / 0, dim, dim),
            attn: AttentionBlock::new(&p / "attentions" / 0, dim),
            res1: ResidualBlock::new(&p / "resnets" / 1, dim, dim),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.res0.forward(x, cache);
        let x = self.attn.forward(&x);
        self.res1.forward(&x, cache)
    }
}

/// `WanEncoder3d`.
#[derive(Debug)]
struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let dims: Vec<i64> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| m * cfg.base_dim)
            .collect();
        let conv_in = CausalConv3d::cube(&p / "conv_in", cfg.in_channels, dims[0], 3);
        let mut down_blocks = Vec::new();
        let last = cfg.dim_mult.len() - 1;
        for i in 0..cfg.dim_mult.len() {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let q = &p / "down_blocks" / down_blocks.len();
                down_blocks.push(DownLayer::Res(ResidualBlock::new(q, c_in, c_out)));
                c_in = c_out;
            }
            if i != last {
                let mode = if cfg.temperal_downsample[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                let q = &p / "down_blocks" / down_blocks.len();
                down_blocks.push(DownLayer::Resample(Resample::new(q, c_out, mode)));
            }
        }
        let top = dims[dims.len() - 1];
        Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(&p / "mid_block", top),
            norm_out: RmsNorm::new(&p / "norm_out", top, 3),
            conv_out: CausalConv3d::cube(&p / "conv_out", top, 2 * cfg.z_dim, 3),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut x = self.conv_in.forward_cached(x, cache);
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Res(r) => r.forward(&x, cache),
                DownLayer::Resample(r) => r.forward(&x, cache),
            };
        }
        let x = self.mid_block.forward(&x, cache);
        let x = self.norm_out.forward(&x).silu_();
        self.conv_out.forward_cached(&x, cache)
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

/// `WanDecoder3d`.
#[derive(Debug)]
struct Decoder {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let n = cfg.dim_mult.len();
        let dims: Vec<i64> = std::iter::once(cfg.dim_mult[n - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| m * base)
            .collect();
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for i in 0..n {
            // Wan2.1: every stage after the first receives the halved output of the upsampler.
            let mut c_in = if i > 0 { dims[i] / 2 } else { dims[i] };
            let c_out = dims[i + 1];
            let q = &p / "up_blocks" / i;
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(&q / "resnets" / j, c_in, c_out));
                c_in = c_out;
            }
            let upsampler = (i != n - 1).then(|| {
                let mode = if temporal_up[i] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                };
                Resample::new(&q / "upsamplers" / 0, c_out, mode)
            });
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let out = dims[n];
        Decoder {
            conv_in: CausalConv3d::cube(&p / "conv_in", cfg.z_dim, dims[0], 3),
            mid_block: MidBlock::new(&p / "mid_block", dims[0]),
            up_blocks,
            norm_out: RmsNorm::new(&p / "norm_out", out, 3),
            conv_out: CausalConv3d::cube(&p / "conv_out", out, cfg.out_channels, 3),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.conv_in.forward_cached(x, cache);
        let mut x = self.mid_block.forward(&x, cache);
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, cache);
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(&x, cache);
            }
        }
        let x = self.norm_out.forward(&x).silu_();
        self.conv_out.forward_cached(&x, cache)
    }
}

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

/// The Wan2.1 VAE with diffusers module paths (`encoder.*`, `decoder.*`, `quant_conv`,
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
}

/// How [`frames_u8`] turns `[-1, 1]` floats into bytes. Both start from
/// `v = clamp(x/2 + 0.5, 0, 1)` in fp32 (diffusers `VideoProcessor.postprocess_video`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// `uint8(v · 255)`, truncating: diffusers `export_to_video` on the pipeline's default
    /// `output_type="np"` frames (what the Wan examples write to MP4).
    #[default]
    Truncate,
    /// `uint8(round(v · 255))`: diffusers `numpy_to_pil` (`output_type="pil"`).
    Round,
}

impl AutoencoderKLWan {
    /// Builds the modules under `p` (parameters uninitialised until loaded).
    pub fn new(p: &nn::Path, cfg: &VaeConfig) -> Result<Self, VaeError> {
        Self::new_parts(p, cfg, VaeParts::Full)
    }

    /// Builds only the modules of `parts` under `p`.
    pub fn new_parts(p: &nn::Path, cfg: &VaeConfig, parts: VaeParts) -> Result<Self, VaeError> {
        cfg.validate()?;
        let dev = p.device();
        let z = cfg.z_dim;
        let stats =
            |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, z, 1, 1, 1]).to(dev);
        Ok(AutoencoderKLWan {
            cfg: cfg.clone(),
            parts,
            encoder: parts.has_encoder().then(|| {
                let quant_conv = CausalConv3d::cube(p / "quant_conv", 2 * z, 2 * z, 1);
                (Encoder::new(p / "encoder", cfg), quant_conv)
            }),
            decoder: parts.has_decoder().then(|| {
                let post_quant_conv = CausalConv3d::cube(p / "post_quant_conv", z, z, 1);
                (Decoder::new(p / "decoder", cfg), post_quant_conv)
            }),
            latents_mean: stats(&cfg.latents_mean),
            latents_std: stats(&cfg.latents_std),
        })
    }

    /// Loads a VAE from a diffusers `vae/` directory (`config.json` + safetensors), a single
    /// safetensors file, or the original `Wan2.1_VAE.pth`. The key layout is detected from the
    /// checkpoint; `cfg` defaults to the directory's `config.json`, else the Wan2.1 preset.
    /// `dtype` casts the weights (e.g. bf16); `None` keeps fp32.
    pub fn load(
        path: &Path,
        cfg: Option<VaeConfig>,
        device: Device,
        dtype: Option<Kind>,
    ) -> Result<(nn::VarStore, Self), VaeError> {
        Self::load_parts(path, cfg, device, dtype, VaeParts::Full)
    }

    /// [`AutoencoderKLWan::load`] for the halves in `parts`: the keys of a half left out are
    /// skipped, those of a loaded half are checked strictly (a missing one is an error).
    pub fn load_parts(
        path: &Path,
        cfg: Option<VaeConfig>,
        device: Device,
        dtype: Option<Kind>,
        parts: VaeParts,
    ) -> Result<(nn::VarStore, Self), VaeError> {
        let cfg = match cfg {
            Some(c) => c,
            None if path.join("config.json").is_file() => {
                VaeConfig::from_file(&path.join("config.json"))?
            }
            None => VaeConfig::wan21(),
        };
        let ckpt = Checkpoint::open(path)?;
        let table = ckpt.get("encoder.conv1.weight").is_some().then(|| original_key_table(&cfg));
        let ckpt = ckpt.remap(|k| {
            let k = table.as_ref().map_or_else(|| k.to_owned(), |t| remap_key(t, k));
            (!parts.skips(&k)).then_some(k)
        });
        let vs = nn::VarStore::new(device);
        let model = Self::new_parts(&vs.root(), &cfg, parts)?;
        weights::load_into(&vs, &ckpt, &LoadOptions { strict: true, dtype, keep_f32: &[] })?;
        Ok((vs, model))
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

    fn check_5d(&self, x: &Tensor, what: &str, channels: i64) -> Result<[i64; 5], VaeError> {
        let size = x.size();
        let Ok(s): Result<[i64; 5], _> = size.clone().try_into() else {
            return Err(VaeError::Input(format!(
                "{what} must be [B, C, T, H, W], got shape {size:?}"
            )));
        };
        if s[1] != channels {
            return Err(VaeError::Input(format!(
                "{what} must have {channels} channels, got shape {size:?}"
            )));
        }
        if s.contains(&0) {
            return Err(VaeError::Input(format!("{what} has an empty dimension: shape {size:?}")));
        }
        Ok(s)
    }

    /// The posterior parameters `[B, 2·z_dim, T', H/8, W/8]` (mean, then log-variance) of a video
    /// `[B, 3, 1+4k, H, W]` in `[-1, 1]`; H and W must be multiples of 8.
    pub fn encode_moments(&self, video: &Tensor) -> Result<Tensor, VaeError> {
        let Some((encoder, quant_conv)) = &self.encoder else {
            return Err(VaeError::NotLoaded("encoder", self.parts));
        };
        let s = self.check_5d(video, "video", self.cfg.in_channels)?;
        let (tf, sf) = (self.cfg.temporal_factor(), self.cfg.spatial_factor());
        if (s[2] - 1) % tf != 0 {
            return Err(VaeError::Input(format!(
                "video has {} frames; the VAE takes 1 + {tf}·k frames",
                s[2]
            )));
        }
        if s[3] % sf != 0 || s[4] % sf != 0 {
            return Err(VaeError::Input(format!(
                "video is {}×{} (H×W); both must be multiples of {sf}",
                s[3], s[4]
            )));
        }
        let _guard = tch::no_grad_guard();
        let x = video.to_device(self.device()).to_kind(self.kind());
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

    /// `encode(video).latent_dist.mode()`: the posterior mean `[B, z_dim, T', H/8, W/8]`.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor, VaeError> {
        Ok(self.encode_moments(video)?.narrow(1, 0, self.cfg.z_dim))
    }

    /// Decodes raw (un-normalised) latents `[B, z_dim, T', h, w]` to a video
    /// `[B, 3, 1+4(T'−1), 8h, 8w]` clamped to `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        let Some((decoder, post_quant_conv)) = &self.decoder else {
            return Err(VaeError::NotLoaded("decoder", self.parts));
        };
        let s = self.check_5d(z, "latents", self.cfg.z_dim)?;
        let _guard = tch::no_grad_guard();
        let x = post_quant_conv.forward(&z.to_device(self.device()).to_kind(self.kind()), None);
        let mut cache = FeatCache::new();
        let mut outs = Vec::with_capacity(s[2] as usize);
        for i in 0..s[2] {
            cache.start_chunk();
            outs.push(decoder.forward(&x.narrow(2, i, 1), &mut cache));
        }
        Ok(Tensor::cat(&outs, 2).clamp_(-1.0, 1.0))
    }

    /// The Wan I2V conditioning tensor `y` `[B, 4 + z_dim, T', H/8, W/8]` (diffusers
    /// `WanImageToVideoPipeline.prepare_latents`, no last image): the first frame `image`
    /// `[B, 3, H, W]` in `[-1, 1]` (already resized) followed by `num_frames − 1` zero frames is
    /// VAE-encoded (mode) and normalised; in front go 4 mask channels, all ones in latent frame 0
    /// and zeros after (the first pixel frame repeated ×4, then folded 4 frames per latent frame).
    pub fn i2v_condition(&self, image: &Tensor, num_frames: i64) -> Result<Tensor, VaeError> {
        let size = image.size();
        let [b, c, h, w] = size[..] else {
            return Err(VaeError::Input(format!("image must be [B, 3, H, W], got shape {size:?}")));
        };
        if c != self.cfg.in_channels {
            return Err(VaeError::Input(format!(
                "image must have {} channels, got shape {size:?}",
                self.cfg.in_channels
            )));
        }
        let tf = self.cfg.temporal_factor();
        if num_frames < 1 || (num_frames - 1) % tf != 0 {
            return Err(VaeError::Input(format!(
                "num_frames = {num_frames}; I2V takes 1 + {tf}·k frames"
            )));
        }
        let image = image.to_device(self.device()).to_kind(self.kind()).unsqueeze(2);
        let video = Tensor::cat(
            &[
                image.shallow_clone(),
                image.new_zeros([b, c, num_frames - 1, h, w], (image.kind(), image.device())),
            ],
            2,
        );
        let mu = self.encode(&video)?.to_kind(Kind::Float);
        let inv_std = self.latents_std.to_device(mu.device()).reciprocal();
        // diffusers multiplies by 1/std here.
        let cond = (mu - self.latents_mean.to_device(inv_std.device())) * inv_std;
        let s = cond.size();
        let (t, lh, lw) = (s[2], s[3], s[4]);
        let mask = Tensor::zeros([b, tf, t, lh, lw], (Kind::Float, cond.device()));
        let _ = mask.narrow(2, 0, 1).fill_(1.0);
        Ok(Tensor::cat(&[mask, cond], 1))
    }

    /// `(mu − mean) / std` per channel: the latents the DiT sees.
    pub fn normalize_latents(&self, mu: &Tensor) -> Result<Tensor, VaeError> {
        self.check_5d(mu, "latents", self.cfg.z_dim)?;
        let (m, s) =
            (self.latents_mean.to_device(mu.device()), self.latents_std.to_device(mu.device()));
        Ok(((mu.to_kind(Kind::Float) - m) / s).to_kind(mu.kind()))
    }

    /// `z · std + mean` per channel: DiT latents back to the VAE's raw latent space.
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        self.check_5d(z, "latents", self.cfg.z_dim)?;
        let (m, s) =
            (self.latents_mean.to_device(z.device()), self.latents_std.to_device(z.device()));
        Ok((z.to_kind(Kind::Float) * s + m).to_kind(z.kind()))
    }
}

/// One decoded video `[3, F, H, W]` in `[-1, 1]` as `uint8 [F, H, W, 3]`, by `rule`.
pub fn frames_u8(video: &Tensor, rule: Quantize) -> Result<Tensor, VaeError> {
    let size = video.size();
    if size.len() != 4 || size[0] != 3 {
        return Err(VaeError::Input(format!(
            "frames_u8 takes one video [3, F, H, W], got shape {size:?}"
        )));
    }
    let v = (video.to_kind(Kind::Float).permute([1, 2, 3, 0]) * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
    let v = match rule {
        Quantize::Truncate => v,
        Quantize::Round => v.round(),
    };
    Ok(v.to_kind(Kind::Uint8).contiguous())
}

/// Original `WanVAE_` key prefixes → diffusers prefixes for `cfg` (models.md §2.5). The
/// decoder's flat `upsamples.i` list groups into `up_blocks.b.{resnets.j, upsamplers.0}`.
pub fn original_key_table(cfg: &VaeConfig) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> =
        vec![("conv1.".into(), "quant_conv.".into()), ("conv2.".into(), "post_quant_conv.".into())];
    let res = [
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    let res_block = |t: &mut Vec<(String, String)>, orig: &str, new: &str| {
        for (a, b) in res {
            t.push((format!("{orig}{a}"), format!("{new}{b}")));
        }
    };
    for part in ["encoder", "decoder"] {
        t.push((format!("{part}.conv1."), format!("{part}.conv_in.")));
        t.push((format!("{part}.head.0."), format!("{part}.norm_out.")));
        t.push((format!("{part}.head.2."), format!("{part}.conv_out.")));
        res_block(&mut t, &format!("{part}.middle.0."), &format!("{part}.mid_block.resnets.0."));
        res_block(&mut t, &format!("{part}.middle.2."), &format!("{part}.mid_block.resnets.1."));
        t.push((format!("{part}.middle.1."), format!("{part}.mid_block.attentions.0.")));
    }
    let stages = cfg.dim_mult.len();
    let nrb = cfg.num_res_blocks as usize;
    let mut i = 0;
    for s in 0..stages {
        for _ in 0..nrb {
            res_block(
                &mut t,
                &format!("encoder.downsamples.{i}."),
                &format!("encoder.down_blocks.{i}."),
            );
            i += 1;
        }
        if s != stages - 1 {
            t.push((format!("encoder.downsamples.{i}."), format!("encoder.down_blocks.{i}.")));
            i += 1;
        }
    }
    let mut i = 0;
    for b in 0..stages {
        for j in 0..=nrb {
            res_block(
                &mut t,
                &format!("decoder.upsamples.{i}."),
                &format!("decoder.up_blocks.{b}.resnets.{j}."),
            );
            i += 1;
        }
        if b != stages - 1 {
            t.push((
                format!("decoder.upsamples.{i}."),
                format!("decoder.up_blocks.{b}.upsamplers.0."),
            ));
            i += 1;
        }
    }
    t
}

/// Applies the longest matching prefix of `table` to `key` (unmatched keys pass through, so a
/// strict load reports them as unexpected).
pub fn remap_key(table: &[(String, String)], key: &str) -> String {
    table
        .iter()
        .filter(|(orig, _)| key.starts_with(orig.as_str()))
        .max_by_key(|(orig, _)| orig.len())
        .map(|(orig, new)| format!("{new}{}", &key[orig.len()..]))
        .unwrap_or_else(|| key.to_owned())
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

//! The Wan stage pipeline (Wan2.1, Wan2.2 A14B and TI2V-5B; text-, image- and video-to-video): the
//! encoder stage ([`WanEncoder`]), the payload it
//! sends the DiT stage (Phase1), the denoising loop ([`denoise()`]) with the DiT loader
//! ([`load_dit`]: one transformer or two experts),
//! the payload the DiT stage hands the decoder stage (Phase2), and the decoder stage
//! ([`WanDecoder`]). Model directories are located by [`ModelDir`] in either published layout.

pub mod decode;
pub mod denoise;
pub mod dit;
pub mod encode;
pub mod model_dir;

use tch::Tensor;

pub use decode::WanDecoder;
pub use denoise::{DenoiseSettings, Progress, SchedulerChoice, denoise, initial_noise};
pub use dit::{Expert, LowNoiseExpert, WanDit};
pub use encode::{Task, WanEncoder, resize_frames};
pub use model_dir::{DitDirs, Layout, ModelDir, load_dit};

use crate::wan::vae::VaeConfig;

/// Latent channels of the Wan2.1 VAE.
pub const LATENT_CHANNELS: i64 = 16;

/// The latent layout of a Wan model's VAE: what the DiT denoises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentSpec {
    /// Latent channels (`z_dim`).
    pub channels: i64,
    /// Pixels per latent pixel along H and W.
    pub spatial: i64,
}

impl LatentSpec {
    /// The Wan2.1 VAE's: 16 channels, 8× (Wan2.1 and Wan2.2 A14B).
    pub const WAN21: LatentSpec = LatentSpec { channels: LATENT_CHANNELS, spatial: 8 };
    /// The Wan2.2 VAE's: 48 channels, 16× (TI2V-5B).
    pub const WAN22: LatentSpec = LatentSpec { channels: 48, spatial: 16 };

    /// The layout a VAE config produces.
    pub fn of_vae(cfg: &VaeConfig) -> Self {
        LatentSpec { channels: cfg.z_dim, spatial: cfg.spatial_factor() }
    }
}
/// Text rows the DiT's cross-attention sees (shorter prompt embeddings are zero-padded).
pub const TEXT_LEN: i64 = 512;

/// Output video geometry in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Frames, `4k + 1`.
    pub frames: i64,
    /// Height, a multiple of 16.
    pub height: i64,
    /// Width, a multiple of 16.
    pub width: i64,
}

impl Geometry {
    /// [`Geometry::validate_for`] the Wan2.1 VAE.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_for(LatentSpec::WAN21)
    }

    /// Checks the constraints of the VAE (4× time, `spec.spatial`× space) and the DiT patch (2×
    /// space): H and W multiples of 16 for Wan2.1's VAE, 32 for Wan2.2's.
    pub fn validate_for(&self, spec: LatentSpec) -> Result<(), String> {
        if self.frames < 1 || (self.frames - 1) % 4 != 0 {
            return Err(format!("frames must be 4k+1 (1, 5, 9, …, 81), got {}", self.frames));
        }
        let m = 2 * spec.spatial;
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if v < m || v % m != 0 {
                return Err(format!("{name} must be a positive multiple of {m}, got {v}"));
            }
        }
        Ok(())
    }

    /// `[1, 16, (F−1)/4+1, H/8, W/8]`: [`Geometry::latent_shape_for`] the Wan2.1 VAE.
    pub fn latent_shape(&self) -> [i64; 5] {
        self.latent_shape_for(LatentSpec::WAN21)
    }

    /// `[1, C, (F−1)/4+1, H/s, W/s]` for the VAE's channels `C` and spatial factor `s`.
    pub fn latent_shape_for(&self, spec: LatentSpec) -> [i64; 5] {
        let s = spec.spatial;
        [1, spec.channels, (self.frames - 1) / 4 + 1, self.height / s, self.width / s]
    }
}

/// What the encoder stage sends the DiT stage.
#[derive(Debug)]
pub struct Phase1 {
    pub geometry: Geometry,
    /// `[1, L ≤ 512, text_dim]` prompt embeddings, `L` the prompt's token count (`</s>`
    /// included); [`denoise()`] zero-pads them to [`TEXT_LEN`] rows as diffusers does.
    pub prompt_embeds: Tensor,
    /// `[1, L ≤ 512, text_dim]`; required when guidance is on.
    pub negative_prompt_embeds: Option<Tensor>,
    /// I2V: CLIP features `[1, 257, 1280]`.
    pub image_embeds: Option<Tensor>,
    /// I2V: `y = cat(mask 4, VAE latent 16)`, `[1, 20, T, H/8, W/8]`; for TI2V-5B the first
    /// frame's normalised VAE latents `[1, 48, 1, H/16, W/16]`, which the DiT keeps as latent
    /// frame 0.
    pub condition: Option<Tensor>,
    /// Video-to-video: the input video's normalised VAE latents (posterior mode),
    /// `[1, 16, T, H/8, W/8]` fp32, which the DiT noises to the strength's timestep.
    pub video_latents: Option<Tensor>,
}

impl Phase1 {
    /// The tensor names used on the wire.
    pub const NAMES: [&'static str; 5] =
        ["prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition", "video_latents"];
}

/// What the DiT stage sends the decoder stage.
#[derive(Debug)]
pub struct Phase2 {
    pub geometry: Geometry,
    /// Final latents `[1, 16, T, H/8, W/8]`, fp32 (unnormalised by the VAE statistics).
    pub latents: Tensor,
}

impl Phase2 {
    /// The tensor names used on the wire.
    pub const NAMES: [&'static str; 1] = ["latents"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rules_and_latent_shape() {
        let g = Geometry { frames: 81, height: 480, width: 832 };
        g.validate().unwrap();
        assert_eq!(g.latent_shape(), [1, 16, 21, 60, 104]);
        assert!(Geometry { frames: 80, ..g }.validate().unwrap_err().contains("4k+1"));
        assert!(Geometry { height: 472, ..g }.validate().unwrap_err().contains("height"));
        let g = Geometry { frames: 121, height: 704, width: 1280 };
        g.validate_for(LatentSpec::WAN22).unwrap();
        assert_eq!(g.latent_shape_for(LatentSpec::WAN22), [1, 48, 31, 44, 80]);
        let err = Geometry { height: 720, ..g }.validate_for(LatentSpec::WAN22).unwrap_err();
        assert!(err.contains("multiple of 32"), "{err}");
    }
}

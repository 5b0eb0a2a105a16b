//! The Wan decoder stage: final DiT latents → video frames, as diffusers' pipelines decode
//! (`latents / (1/std) + mean`, `vae.decode`) and `export_to_video` quantises the default
//! `output_type="np"` frames (`uint8(clamp(x/2 + 0.5, 0, 1) · 255)`, truncating).
//!
//! Boundary: [`Phase2`] latents `[1, C, T, H/s, W/s]` (the VAE's layout: 16 channels at 1/8, or
//! Wan2.2's 48 at 1/16) → `uint8 [F, H, W, 3]` on the CPU.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::model_dir::ModelDir;
use super::{LatentSpec, Phase2};
use crate::error::{Component, Error};
use crate::wan::vae::{AutoencoderKLWan, Quantize, VaeParts, frames_u8};
use crate::weights;

/// Why the decoder stage failed.
/// The decoder stage's model: the decoder half of the VAE.
#[derive(Debug)]
pub struct WanDecoder {
    vae: AutoencoderKLWan,
}

impl WanDecoder {
    /// Loads the decoder half of the VAE of a model directory (either layout: the encoder's
    /// weights are skipped) in `kind`.
    pub fn load(model_dir: &Path, device: Device, kind: Kind) -> Result<Self, Error> {
        let path = ModelDir::open(model_dir)?.vae()?;
        let vae = AutoencoderKLWan::load_parts(&path, None, device, kind, VaeParts::Decoder)?;
        Ok(WanDecoder { vae })
    }

    /// Bytes held by the loaded parameters.
    pub fn parameter_bytes(&self) -> u64 {
        weights::parameter_bytes(self.vae.var_store())
    }

    /// The video of `phase2` as `uint8 [F, H, W, 3]` (CPU, contiguous).
    pub fn decode(&self, phase2: &Phase2) -> Result<Tensor, Error> {
        let g = phase2.geometry;
        let spec = LatentSpec::of_vae(self.vae.config());
        g.validate_for(spec).map_err(|m| Error::input(Component::Decode, m))?;
        if phase2.latents.size() != g.latent_shape_for(spec) {
            return Err(Error::input(
                Component::Decode,
                format!(
                    "latents must be {:?} for {}×{}×{} frames, got {:?}",
                    g.latent_shape_for(spec),
                    g.frames,
                    g.height,
                    g.width,
                    phase2.latents.size()
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        let z = self.vae.denormalize_latents(&phase2.latents.to_kind(Kind::Float))?;
        let video = self.vae.decode(&z)?;
        let frames = frames_u8(&video.get(0), Quantize::Truncate)?.to_device(Device::Cpu);
        let want = [g.frames, g.height, g.width, 3];
        if frames.size() != want {
            return Err(Error::input(
                Component::Decode,
                format!("the VAE decoded {:?}, expected {want:?}", frames.size()),
            ));
        }
        Ok(frames)
    }
}

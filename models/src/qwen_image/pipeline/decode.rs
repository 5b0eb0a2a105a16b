//! The Qwen-Image decoder stage: final latents → image, as the diffusers pipelines decode
//! (`latents / (1/std) + mean`, `vae.decode`, frame 0) and post-process
//! (`VaeImageProcessor.postprocess`).
//!
//! Boundary: [`Phase2`] latents `[1, 16, 1, H/8, W/8]` → `uint8 [H, W, 3]` on the CPU.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::Phase2;
use super::model_dir::ModelDir;
use crate::error::{Component, Error};
use crate::qwen_image::vae::QwenImageVae;
use crate::wan::vae::VaeParts;
use crate::weights;

/// The decoder stage's model: the decoder half of the VAE.
#[derive(Debug)]
pub struct QwenDecoder {
    vae: QwenImageVae,
}

impl QwenDecoder {
    /// Loads the decoder half of the VAE of a model directory (the encoder's weights are
    /// skipped) in `kind`.
    pub fn load(model_dir: &Path, device: Device, kind: Kind) -> Result<Self, Error> {
        let path = ModelDir::open(model_dir)?.vae()?;
        Ok(QwenDecoder { vae: QwenImageVae::load_parts(&path, device, kind, VaeParts::Decoder)? })
    }

    /// Bytes held by the loaded parameters.
    pub fn parameter_bytes(&self) -> u64 {
        weights::parameter_bytes(self.vae.inner().var_store())
    }

    /// The image of `phase2` as `uint8 [H, W, 3]` (CPU, contiguous).
    pub fn decode(&self, phase2: &Phase2) -> Result<Tensor, Error> {
        let g = phase2.geometry;
        g.validate().map_err(|m| Error::input(Component::Decode, m))?;
        if phase2.latents.size() != g.latent_shape() {
            return Err(Error::input(
                Component::Decode,
                format!(
                    "latents must be {:?} for {}×{}, got {:?}",
                    g.latent_shape(),
                    g.width,
                    g.height,
                    phase2.latents.size()
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        let image = self.vae.decode_image(&phase2.latents)?;
        Ok(image.get(0).to_device(Device::Cpu).contiguous())
    }
}

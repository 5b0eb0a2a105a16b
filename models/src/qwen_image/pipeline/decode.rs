//! The Qwen-Image decoder stage: final latents → image, as the diffusers pipelines decode
//! (`latents / (1/std) + mean`, `vae.decode`, frame 0) and post-process
//! (`VaeImageProcessor.postprocess`).
//!
//! Boundary: [`Phase2`] latents `[n, 16, 1, H/8, W/8]` → `uint8 [n, H, W, 3]` on the CPU, one
//! image decoded at a time (the VAE's activations are held for one image only).

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

    /// The images of `phase2` as `uint8 [n, H, W, 3]` (CPU, contiguous).
    pub fn decode(&self, phase2: &Phase2) -> Result<Tensor, Error> {
        let g = phase2.geometry;
        g.validate().map_err(|m| Error::input(Component::Decode, m))?;
        let size = phase2.latents.size();
        if size.len() != 5 || size[0] < 1 || size[1..] != g.latent_shape()[1..] {
            return Err(Error::input(
                Component::Decode,
                format!(
                    "latents must be [n, {:?}] for {}×{}, got {size:?}",
                    &g.latent_shape()[1..],
                    g.width,
                    g.height,
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        let images = (0..size[0])
            .map(|i| {
                let image = self.vae.decode_image(&phase2.latents.narrow(0, i, 1))?;
                Ok(image.to_device(Device::Cpu))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Tensor::cat(&images, 0).contiguous())
    }
}

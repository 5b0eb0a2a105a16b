//! The Qwen-Image stage pipeline: the encoder stage ([`QwenEncoder`]: prompts and input images),
//! the payload it sends the DiT stage ([`Phase1`]), the denoising loop ([`denoise()`]), the
//! payload the DiT stage hands the decoder stage ([`Phase2`]), and the decoder stage
//! ([`QwenDecoder`]). [`ModelDir`] locates the components of a diffusers model directory and says
//! which pipeline it was published for ([`Variant`]).
//!
//! Reference: diffusers `QwenImagePipeline`, `QwenImageEditPipeline` and
//! `QwenImageEditPlusPipeline` (one prompt; `num_images_per_prompt` images of it).

pub mod decode;
pub mod denoise;
pub mod encode;
pub mod model_dir;

use tch::Tensor;

pub use decode::QwenDecoder;
pub use denoise::{
    DenoiseSettings, MAX_IMAGES, MAX_PREVIEWS, Preview, denoise, denoise_with_previews,
    load_transformer, preview_steps,
};
pub use encode::QwenEncoder;
pub use model_dir::{ModelDir, Variant};

/// Latent channels of the Qwen-Image VAE.
pub const LATENT_CHANNELS: i64 = 16;
/// Pixels per packed latent token along each axis (VAE 8× times the 2×2 packing).
pub const PIXELS_PER_TOKEN: i64 = 16;
/// Input images an edit job may carry (the DiT sequence grows with each).
pub const MAX_INPUT_IMAGES: usize = 8;
/// Longest output side x2v accepts, in pixels.
pub const MAX_SIDE: i64 = 4096;

/// Output image size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGeometry {
    /// A multiple of 16.
    pub height: i64,
    /// A multiple of 16.
    pub width: i64,
}

impl ImageGeometry {
    /// Checks the VAE (8×) and packing (2×) constraints.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if !(PIXELS_PER_TOKEN..=MAX_SIDE).contains(&v) || v % PIXELS_PER_TOKEN != 0 {
                return Err(format!(
                    "{name} must be a multiple of {PIXELS_PER_TOKEN} from {PIXELS_PER_TOKEN} to {MAX_SIDE}, got {v}"
                ));
            }
        }
        Ok(())
    }

    /// The size the pipelines use for a requested one: each side floored to a multiple of 16
    /// (diffusers warns and floors).
    pub fn floored(width: i64, height: i64) -> Self {
        let f = |v: i64| v / PIXELS_PER_TOKEN * PIXELS_PER_TOKEN;
        ImageGeometry { height: f(height), width: f(width) }
    }

    /// Unpacked latents `[1, 16, 1, H/8, W/8]`.
    pub fn latent_shape(&self) -> [i64; 5] {
        [1, LATENT_CHANNELS, 1, self.height / 8, self.width / 8]
    }

    /// The packed-token grid `(1, H/16, W/16)` the transformer's RoPE takes.
    pub fn token_grid(&self) -> (i64, i64, i64) {
        (1, self.height / PIXELS_PER_TOKEN, self.width / PIXELS_PER_TOKEN)
    }

    /// Packed tokens of the image (the scheduler's `image_seq_len`).
    pub fn tokens(&self) -> i64 {
        (self.height / PIXELS_PER_TOKEN) * (self.width / PIXELS_PER_TOKEN)
    }
}

/// What the encoder stage sends the DiT stage.
#[derive(Debug)]
pub struct Phase1 {
    pub geometry: ImageGeometry,
    /// `[1, L, joint_attention_dim]`: the prompt's last hidden states without the template prefix.
    pub prompt_embeds: Tensor,
    /// `[1, L]` int64 (1 valid, 0 padding); `None` when every row is valid (always, at batch 1).
    pub prompt_mask: Option<Tensor>,
    /// Present when true CFG is on.
    pub negative_prompt_embeds: Option<Tensor>,
    pub negative_prompt_mask: Option<Tensor>,
    /// Edit: one normalised VAE latent `[1, 16, 1, h/8, w/8]` per input image, in order (its
    /// size is the latent's: each image is encoded at its own ~1 MP size).
    pub image_latents: Vec<Tensor>,
}

impl Phase1 {
    /// The fixed tensor names used on the wire; input image `i` travels as `image_latents.i`.
    pub const NAMES: [&'static str; 4 + MAX_INPUT_IMAGES] = [
        "prompt_embeds",
        "prompt_mask",
        "negative_prompt_embeds",
        "negative_prompt_mask",
        "image_latents.0",
        "image_latents.1",
        "image_latents.2",
        "image_latents.3",
        "image_latents.4",
        "image_latents.5",
        "image_latents.6",
        "image_latents.7",
    ];
}

/// What the DiT stage sends the decoder stage.
#[derive(Debug)]
pub struct Phase2 {
    pub geometry: ImageGeometry,
    /// Final latents `[n, 16, 1, H/8, W/8]`, one per image (unpacked, still normalised by the
    /// VAE statistics).
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
    fn geometry_rules() {
        let g = ImageGeometry { height: 1024, width: 1024 };
        g.validate().unwrap();
        assert_eq!(g.latent_shape(), [1, 16, 1, 128, 128]);
        assert_eq!(g.token_grid(), (1, 64, 64));
        assert_eq!(g.tokens(), 4096);
        assert!(ImageGeometry { height: 1000, ..g }.validate().unwrap_err().contains("height"));
        assert!(ImageGeometry { width: 8192, ..g }.validate().unwrap_err().contains("width"));
        assert_eq!(ImageGeometry::floored(1000, 1030), ImageGeometry { height: 1024, width: 992 });
        assert_eq!(Phase1::NAMES.len(), 4 + MAX_INPUT_IMAGES);
    }
}

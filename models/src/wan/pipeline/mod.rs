//! The Wan2.1 stage pipeline: the encoder stage ([`WanEncoder`]), the payload it sends the DiT
//! stage (Phase1), the denoising loop ([`denoise()`]) with the DiT loader ([`load_transformer`]),
//! the payload the DiT stage hands the decoder stage (Phase2), and the decoder stage
//! ([`WanDecoder`]). Model directories are located by [`ModelDir`] in either published layout;
//! [`payload`] converts both payloads to and from the named tensors `x2v-transfer` moves.

pub mod decode;
pub mod denoise;
pub mod encode;
pub mod model_dir;
pub mod payload;

use std::collections::HashMap;

use tch::Tensor;

pub use decode::WanDecoder;
pub use denoise::{DenoiseSettings, Progress, SchedulerChoice, denoise, initial_noise};
pub use encode::{Task, WanEncoder};
pub use model_dir::{Layout, ModelDir, load_transformer};
pub use payload::{Part, PayloadError, tensor_from_part, tensor_to_part};

/// Latent channels of the Wan2.1 VAE.
pub const LATENT_CHANNELS: i64 = 16;
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
    /// Checks the constraints of the VAE (4× time, 8× space) and the DiT patch (2× space).
    pub fn validate(&self) -> Result<(), String> {
        if self.frames < 1 || (self.frames - 1) % 4 != 0 {
            return Err(format!("frames must be 4k+1 (1, 5, 9, …, 81), got {}", self.frames));
        }
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if v < 16 || v % 16 != 0 {
                return Err(format!("{name} must be a positive multiple of 16, got {v}"));
            }
        }
        Ok(())
    }

    /// `[1, 16, (F−1)/4+1, H/8, W/8]`.
    pub fn latent_shape(&self) -> [i64; 5] {
        [1, LATENT_CHANNELS, (self.frames - 1) / 4 + 1, self.height / 8, self.width / 8]
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
    /// I2V: `y = cat(mask 4, VAE latent 16)`, `[1, 20, T, H/8, W/8]`.
    pub condition: Option<Tensor>,
}

impl Phase1 {
    /// The tensor names used on the wire.
    pub const NAMES: [&'static str; 4] =
        ["prompt_embeds", "negative_prompt_embeds", "image_embeds", "condition"];

    /// Builds a payload from named tensors (names as in [`Phase1::NAMES`]).
    pub fn from_named(
        geometry: Geometry,
        mut named: HashMap<String, Tensor>,
    ) -> Result<Self, String> {
        if let Some(unknown) = named.keys().find(|k| !Self::NAMES.contains(&k.as_str())) {
            return Err(format!("unknown Phase1 tensor `{unknown}` (expected {:?})", Self::NAMES));
        }
        let prompt_embeds = named.remove("prompt_embeds").ok_or("Phase1 lacks `prompt_embeds`")?;
        Ok(Phase1 {
            geometry,
            prompt_embeds,
            negative_prompt_embeds: named.remove("negative_prompt_embeds"),
            image_embeds: named.remove("image_embeds"),
            condition: named.remove("condition"),
        })
    }

    /// The tensors by name (shallow handles).
    pub fn named(&self) -> Vec<(&'static str, Tensor)> {
        let opt = [
            ("negative_prompt_embeds", &self.negative_prompt_embeds),
            ("image_embeds", &self.image_embeds),
            ("condition", &self.condition),
        ];
        let mut out = vec![("prompt_embeds", self.prompt_embeds.shallow_clone())];
        out.extend(opt.into_iter().filter_map(|(n, t)| t.as_ref().map(|t| (n, t.shallow_clone()))));
        out
    }
}

/// What the DiT stage sends the decoder stage.
#[derive(Debug)]
pub struct Phase2 {
    pub geometry: Geometry,
    /// Final latents `[1, 16, T, H/8, W/8]`, fp32 (unnormalised by the VAE statistics).
    pub latents: Tensor,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn geometry_rules_and_latent_shape() {
        let g = Geometry { frames: 81, height: 480, width: 832 };
        g.validate().unwrap();
        assert_eq!(g.latent_shape(), [1, 16, 21, 60, 104]);
        assert!(Geometry { frames: 80, ..g }.validate().unwrap_err().contains("4k+1"));
        assert!(Geometry { height: 472, ..g }.validate().unwrap_err().contains("height"));
    }

    #[test]
    fn named_tensors_round_trip() {
        let g = Geometry { frames: 5, height: 64, width: 64 };
        let t = || Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        let named: HashMap<String, Tensor> =
            [("prompt_embeds".to_string(), t()), ("image_embeds".to_string(), t())]
                .into_iter()
                .collect();
        let p = Phase1::from_named(g, named).unwrap();
        let names: Vec<&str> = p.named().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["prompt_embeds", "image_embeds"]);
        let bad: HashMap<String, Tensor> = [("prompt".to_string(), t())].into_iter().collect();
        assert!(Phase1::from_named(g, bad).unwrap_err().contains("unknown Phase1 tensor `prompt`"));
    }
}

//! The DiT a Wan model denoises with: one transformer (Wan2.1), or Wan2.2 A14B's two experts, the
//! high-noise `transformer` for the steps with `t ≥ boundary_ratio · 1000` and the low-noise
//! `transformer_2` for the rest, each with its own guidance scale (diffusers' `WanPipeline`).
//!
//! Wan2.2 TI2V-5B is one transformer over the Wan2.2 VAE's latents that takes a timestep per token
//! ([`WanDit::ti2v`]).
//!
//! Both experts live in one DiT stage: a job switches expert once, between two steps, without
//! leaving the process (the README's design notes say why one rank holds both).

use std::rc::Rc;

use tch::Device;

use super::LatentSpec;
use crate::error::{Component, Error};
use crate::lora::LoraAdapter;
use crate::wan::lora;
use crate::wan::transformer::WanTransformer3DModel;

/// Train timesteps of every Wan scheduler: the boundary timestep is `boundary_ratio` of these.
const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

/// Wan2.2 A14B's low-noise expert and where it takes over.
#[derive(Debug)]
pub struct LowNoiseExpert {
    /// `transformer_2` (`low_noise_model/`).
    pub model: WanTransformer3DModel,
    /// Steps with `t < boundary_ratio · 1000` run on this expert.
    pub boundary_ratio: f64,
}

/// Which expert evaluates a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expert {
    /// `transformer`: every step of a one-transformer model, the high-noise steps of Wan2.2 A14B.
    High,
    /// `transformer_2`: the low-noise steps of Wan2.2 A14B.
    Low,
}

/// One transformer, or two experts that share config, device and dtype.
#[derive(Debug)]
pub struct WanDit {
    high: WanTransformer3DModel,
    low: Option<LowNoiseExpert>,
    /// The latents it denoises.
    latents: LatentSpec,
    /// TI2V-5B: per-token timesteps, the conditioning frame held clean.
    expand_timesteps: bool,
}

impl From<WanTransformer3DModel> for WanDit {
    fn from(model: WanTransformer3DModel) -> Self {
        WanDit { high: model, low: None, latents: LatentSpec::WAN21, expand_timesteps: false }
    }
}

impl WanDit {
    /// Pairs two experts; they must take the same inputs on the same device.
    pub fn new(high: WanTransformer3DModel, low: Option<LowNoiseExpert>) -> Result<Self, Error> {
        if let Some(l) = &low {
            let bad = |m: String| Error::config(Component::Transformer, None, m);
            if !(l.boundary_ratio > 0.0 && l.boundary_ratio < 1.0) {
                return Err(bad(format!(
                    "boundary_ratio must lie in (0, 1), got {}",
                    l.boundary_ratio
                )));
            }
            let (h, lc) = (high.config(), l.model.config());
            let same = (h.in_channels, h.out_channels, h.text_dim, h.patch_size)
                == (lc.in_channels, lc.out_channels, lc.text_dim, lc.patch_size)
                && h.takes_image_embeds() == lc.takes_image_embeds();
            if !same {
                return Err(bad(
                    "the two experts differ in their inputs (in/out channels, text_dim, patch \
                     size or image attention)"
                        .into(),
                ));
            }
            if high.device() != l.model.device() {
                return Err(bad("the two experts are on different devices".into()));
            }
        }
        Ok(WanDit { high, low, latents: LatentSpec::WAN21, expand_timesteps: false })
    }

    /// This transformer as Wan2.2 TI2V-5B's over latents laid out as `latents`: every token gets
    /// its own timestep, and an image-to-video job's first latent frame stays the image's.
    pub fn ti2v(self, latents: LatentSpec) -> Result<Self, Error> {
        let c = self.high.config();
        if self.low.is_some() || c.in_channels != latents.channels || c.takes_image_embeds() {
            return Err(Error::config(
                Component::Transformer,
                None,
                format!(
                    "a TI2V model is one transformer taking the VAE's {} latent channels without \
                     image attention; this one takes {} channels",
                    latents.channels, c.in_channels
                ),
            ));
        }
        Ok(WanDit { latents, expand_timesteps: true, ..self })
    }

    /// The latents it denoises.
    pub fn latent_spec(&self) -> LatentSpec {
        self.latents
    }

    /// Whether it takes per-token timesteps (TI2V-5B).
    pub fn expands_timesteps(&self) -> bool {
        self.expand_timesteps
    }

    /// The transformer of [`Expert::High`] (the only one of a one-transformer model).
    pub fn high(&self) -> &WanTransformer3DModel {
        &self.high
    }

    pub fn low(&self) -> Option<&LowNoiseExpert> {
        self.low.as_ref()
    }

    /// The boundary timestep `boundary_ratio · 1000`, when there are two experts.
    pub fn boundary_timestep(&self) -> Option<f64> {
        self.low.as_ref().map(|l| l.boundary_ratio * NUM_TRAIN_TIMESTEPS)
    }

    /// Which expert evaluates timestep `t` (diffusers: `t >= boundary_timestep` is high noise).
    pub fn expert_at(&self, t: f64) -> Expert {
        match self.boundary_timestep() {
            Some(b) if t < b => Expert::Low,
            _ => Expert::High,
        }
    }

    pub fn expert(&self, which: Expert) -> &WanTransformer3DModel {
        match (which, &self.low) {
            (Expert::Low, Some(l)) => &l.model,
            _ => &self.high,
        }
    }

    pub fn device(&self) -> Device {
        self.high.device()
    }

    /// Bytes of every expert's parameters.
    pub fn parameter_bytes(&self) -> u64 {
        self.high.parameter_bytes() + self.low.as_ref().map_or(0, |l| l.model.parameter_bytes())
    }

    /// Every expert, high noise first.
    pub fn experts(&self) -> impl Iterator<Item = &WanTransformer3DModel> {
        std::iter::once(&self.high).chain(self.low.as_ref().map(|l| &l.model))
    }

    /// Applies `adapters` (each with its weight) to every expert, in place of whatever was
    /// active; all are checked against every expert first, so on an error nothing changes.
    /// x2v applies an adapter to both experts of a two-expert model (diffusers loads into
    /// `transformer` alone unless told `load_into_transformer_2`).
    pub fn set_loras(&self, adapters: &[(Rc<LoraAdapter>, f64)]) -> Result<(), Error> {
        for (adapter, _) in adapters {
            self.check_fits(adapter)?;
        }
        for expert in self.experts() {
            lora::set_loras(expert, adapters)?;
        }
        Ok(())
    }

    /// Checks that `adapter` fits every expert (each of its layers lands on one with matching
    /// sizes), without applying it.
    pub fn check_fits(&self, adapter: &LoraAdapter) -> Result<(), Error> {
        self.experts().try_for_each(|expert| lora::check_fits(expert, adapter))
    }

    /// Removes every adapter: the experts compute with their own weights alone again.
    pub fn clear_loras(&self) {
        self.experts().for_each(lora::clear_loras);
    }

    /// The component names of the loaded experts (diffusers folder names).
    pub fn components(&self) -> &'static [&'static str] {
        if self.low.is_some() { &["transformer", "transformer_2"] } else { &["transformer"] }
    }
}

//! The denoising loop of diffusers' Qwen-Image pipelines (from the initial noise to the final
//! latents), with progress reporting and cancellation between steps.
//!
//! Per step, as the reference: the model input is the packed noise tokens followed by every
//! input image's packed latent tokens (`img_shapes` lists their grids in the same order); the
//! timestep is `t` cast to the latent dtype, then `/ 1000`; the output is cut to the noise tokens;
//! true CFG runs the negative prompt as a second forward and rescales the combination to the
//! conditional prediction's per-token norm; the Euler step adds in fp32 and casts back.
//! Latents stay in the model dtype (bf16 on GPU, as the reference).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::model_dir::ModelDir;
use super::{ImageGeometry, LATENT_CHANNELS, Phase1, Phase2};
use crate::error::{Component, Error};
use crate::qwen_image::latents::{initial_noise, pack, timestep_input, true_cfg, unpack};
use crate::qwen_image::transformer::QwenImageTransformer;
use crate::schedulers::{FlowMatchDynamicConfig, FlowMatchEulerScheduler, Scheduler};
use crate::wan::pipeline::Progress;

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoiseSettings {
    /// Denoising steps.
    pub steps: usize,
    /// True-CFG scale; guidance is on when > 1 (and needs the negative prompt's embeddings).
    pub true_cfg_scale: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// The scheduler's dynamic-shift settings (`scheduler/scheduler_config.json`).
    pub scheduler: FlowMatchDynamicConfig,
}

/// Loads the DiT of a Qwen-Image model directory in `kind`.
pub fn load_transformer(
    model_dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<QwenImageTransformer, Error> {
    let path = ModelDir::open(model_dir)?.transformer()?;
    QwenImageTransformer::load(&path, None, device, kind)
}

/// One prompt's conditioning, checked and on the DiT's device in its dtype.
struct Text {
    embeds: Tensor,
    mask: Option<Tensor>,
}

impl Text {
    fn check(
        dit: &QwenImageTransformer,
        embeds: &Tensor,
        mask: Option<&Tensor>,
        what: &str,
    ) -> Result<Self, Error> {
        let dim = dit.config().joint_attention_dim;
        let s = embeds.size();
        if s.len() != 3 || s[0] != 1 || s[1] < 1 || s[2] != dim {
            return Err(Error::input(
                Component::Denoise,
                format!("{what} must be [1, L ≥ 1, {dim}], got {s:?}"),
            ));
        }
        if let Some(m) = mask
            && m.size() != [1, s[1]]
        {
            return Err(Error::input(
                Component::Denoise,
                format!("the mask of {what} must be [1, {}], got {:?}", s[1], m.size()),
            ));
        }
        let (device, kind) = (dit.device(), dit.kind());
        Ok(Text {
            embeds: embeds.to_device(device).to_kind(kind),
            mask: mask.map(|m| m.to_device(device).to_kind(Kind::Int64)),
        })
    }
}

/// The packed input images and the RoPE grids of the whole image sequence.
struct Images {
    /// `[1, ΣL_i, 64]`, absent for text to image.
    tokens: Option<Tensor>,
    /// The output's grid first, then each input image's.
    shapes: Vec<(i64, i64, i64)>,
}

impl Images {
    fn check(
        dit: &QwenImageTransformer,
        geometry: ImageGeometry,
        latents: &[Tensor],
    ) -> Result<Self, Error> {
        let device = dit.device();
        let mut shapes = vec![geometry.token_grid()];
        let mut packed = Vec::with_capacity(latents.len());
        for (i, l) in latents.iter().enumerate() {
            let s = l.size();
            if s.len() != 5 || s[..3] != [1, LATENT_CHANNELS, 1] || s[3] % 2 != 0 || s[4] % 2 != 0 {
                return Err(Error::input(
                    Component::Denoise,
                    format!("image_latents.{i} must be [1, 16, 1, h, w] with even h, w, got {s:?}"),
                ));
            }
            shapes.push((1, s[3] / 2, s[4] / 2));
            packed.push(pack(&l.to_device(device).to_kind(dit.kind()))?);
        }
        let tokens = (!packed.is_empty()).then(|| Tensor::cat(&packed, 1));
        Ok(Images { tokens, shapes })
    }
}

/// Runs the sampling loop and returns the final (unpacked) latents.
///
/// `progress` is called after every step; `cancelled` is polled before every step and stops the
/// loop with [`Error::Cancelled`].
pub fn denoise(
    dit: &QwenImageTransformer,
    phase1: &Phase1,
    settings: &DenoiseSettings,
    mut progress: impl FnMut(Progress),
    cancelled: impl Fn() -> bool,
) -> Result<Phase2, Error> {
    let _guard = tch::no_grad_guard();
    let geometry = phase1.geometry;
    geometry.validate().map_err(|m| Error::input(Component::Denoise, m))?;
    if !settings.true_cfg_scale.is_finite() {
        return Err(Error::input(Component::Denoise, "true_cfg_scale must be finite"));
    }
    let cond = Text::check(dit, &phase1.prompt_embeds, phase1.prompt_mask.as_ref(), "prompt")?;
    let uncond = match (&phase1.negative_prompt_embeds, settings.true_cfg_scale > 1.0) {
        (Some(e), true) => {
            Some(Text::check(dit, e, phase1.negative_prompt_mask.as_ref(), "negative prompt")?)
        }
        (None, true) => {
            return Err(Error::input(
                Component::Denoise,
                "true_cfg_scale > 1 needs negative_prompt_embeds",
            ));
        }
        (_, false) => None,
    };
    let images = Images::check(dit, geometry, &phase1.image_latents)?;
    let mut scheduler = FlowMatchEulerScheduler::dynamic(
        &settings.scheduler,
        settings.steps,
        geometry.tokens() as usize,
    )?;
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    let (device, kind) = (dit.device(), dit.kind());
    let mut latents = initial_noise(settings.seed, geometry.height, geometry.width, kind, device)?;
    let noise_tokens = latents.size()[1];
    let forward = |input: &Tensor, t: &Tensor, text: &Text| -> Result<Tensor, Error> {
        let out = dit.forward(input, &text.embeds, text.mask.as_ref(), t, &images.shapes)?;
        Ok(out.narrow(1, 0, noise_tokens))
    };
    for (i, &t) in timesteps.iter().enumerate() {
        if cancelled() {
            return Err(Error::Cancelled { completed: i, total });
        }
        let input = match &images.tokens {
            Some(img) => Tensor::cat(&[&latents, img], 1),
            None => latents.shallow_clone(),
        };
        let timestep = timestep_input(t, 1, kind, device);
        let v = forward(&input, &timestep, &cond)?;
        let v = match &uncond {
            Some(u) => true_cfg(&v, &forward(&input, &timestep, u)?, settings.true_cfg_scale)?,
            None => v,
        };
        latents = scheduler.step(&v, &latents)?;
        progress(Progress { step: i + 1, total, timestep: t });
    }
    Ok(Phase2 { geometry, latents: unpack(&latents, geometry.height, geometry.width)? })
}

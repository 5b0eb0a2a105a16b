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
use crate::wan::pipeline::{Expert, Progress};

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
    /// Images of the prompt (`num_images_per_prompt`): their noise is one draw `[n, …]` from
    /// `seed`, as diffusers draws it.
    pub num_images: usize,
    /// Images per transformer forward: `num_images` (or more) runs them as one batch, 1 runs
    /// them back to back. The noise, and so the result, is the same either way.
    pub max_batch: usize,
    /// How many previews of each image to report ([`Preview`]), at evenly spaced steps.
    pub previews: usize,
}

impl DenoiseSettings {
    /// One image, no previews.
    pub fn single(
        steps: usize,
        true_cfg_scale: f64,
        seed: u64,
        scheduler: FlowMatchDynamicConfig,
    ) -> Self {
        DenoiseSettings {
            steps,
            true_cfg_scale,
            seed,
            scheduler,
            num_images: 1,
            max_batch: 1,
            previews: 0,
        }
    }
}

/// Most images one request may ask for.
pub const MAX_IMAGES: usize = 10;
/// Most previews per image.
pub const MAX_PREVIEWS: usize = 3;

/// The 1-based steps after which each of `previews` previews is taken: evenly spaced over the
/// run, never the last step (the final image follows it), each step at most once.
pub fn preview_steps(steps: usize, previews: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (1..=previews)
        .map(|k| (k * steps).div_ceil(previews + 1))
        .filter(|&s| s >= 1 && s < steps)
        .collect();
    out.dedup();
    out
}

/// A look at an image being denoised: the x0 prediction `x_t − σ_t·v` after a step, in the
/// normalised latent space of [`Phase2`], `[1, 16, 1, h, w]` fp32.
#[derive(Debug)]
pub struct Preview {
    /// Which of the request's images (0-based).
    pub image: usize,
    /// Which preview of that image (0-based, `partial_image_index`).
    pub index: usize,
    /// The step (1-based) it follows.
    pub step: usize,
    pub latents: Tensor,
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

    /// The conditioning of a batch of `b` images of the one prompt (`repeat`, as
    /// `num_images_per_prompt` does).
    fn repeat(&self, b: i64) -> Text {
        if b == 1 {
            return Text {
                embeds: self.embeds.shallow_clone(),
                mask: self.mask.as_ref().map(Tensor::shallow_clone),
            };
        }
        Text {
            embeds: self.embeds.repeat([b, 1, 1]),
            mask: self.mask.as_ref().map(|m| m.repeat([b, 1])),
        }
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

/// Runs the sampling loop and returns the final (unpacked) latents `[n, 16, 1, h, w]`.
///
/// `progress` is called after every step (steps of all images count: back to back, `total` is
/// the steps times the batches); `cancelled` is polled before every step and stops the loop with
/// [`Error::Cancelled`].
pub fn denoise(
    dit: &QwenImageTransformer,
    phase1: &Phase1,
    settings: &DenoiseSettings,
    progress: impl FnMut(Progress),
    cancelled: impl Fn() -> bool,
) -> Result<Phase2, Error> {
    denoise_with_previews(dit, phase1, settings, progress, |_| {}, cancelled)
}

/// [`denoise()`], calling `preview` with the x0 prediction of every image at
/// [`preview_steps`] (`settings.previews` per image).
pub fn denoise_with_previews(
    dit: &QwenImageTransformer,
    phase1: &Phase1,
    settings: &DenoiseSettings,
    mut progress: impl FnMut(Progress),
    mut preview: impl FnMut(Preview),
    cancelled: impl Fn() -> bool,
) -> Result<Phase2, Error> {
    let _guard = tch::no_grad_guard();
    let geometry = phase1.geometry;
    geometry.validate().map_err(|m| Error::input(Component::Denoise, m))?;
    if !settings.true_cfg_scale.is_finite() {
        return Err(Error::input(Component::Denoise, "true_cfg_scale must be finite"));
    }
    let n = settings.num_images;
    if !(1..=MAX_IMAGES).contains(&n) {
        return Err(Error::input(
            Component::Denoise,
            format!("the number of images must be from 1 to {MAX_IMAGES}, got {n}"),
        ));
    }
    if settings.previews > MAX_PREVIEWS {
        return Err(Error::input(
            Component::Denoise,
            format!("at most {MAX_PREVIEWS} previews per image, got {}", settings.previews),
        ));
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
    // The grid (and its step count checked) before any noise is drawn; every batch starts a copy.
    let schedule = FlowMatchEulerScheduler::dynamic(
        &settings.scheduler,
        settings.steps,
        geometry.tokens() as usize,
    )?;
    let (device, kind) = (dit.device(), dit.kind());
    let noise =
        initial_noise(settings.seed, n as i64, geometry.height, geometry.width, kind, device)?;
    let batch = settings.max_batch.clamp(1, n);
    let batches = n.div_ceil(batch);
    let run = Run {
        dit,
        settings,
        schedule,
        geometry,
        cond: &cond,
        uncond: uncond.as_ref(),
        images: &images,
        preview_at: preview_steps(settings.steps, settings.previews),
    };
    let mut done = Vec::with_capacity(batches);
    for (b, first) in (0..n).step_by(batch).enumerate() {
        let size = batch.min(n - first);
        let latents = noise.narrow(0, first as i64, size as i64);
        let report = |step: usize, t: f64| Progress {
            step: b * settings.steps + step,
            total: batches * settings.steps,
            timestep: t,
            // One transformer.
            expert: Expert::High,
        };
        let out =
            run.batch(latents, first, &mut |s, t| progress(report(s, t)), &mut preview, || {
                cancelled()
            });
        match out {
            Err(Error::Cancelled { completed, .. }) => {
                return Err(Error::Cancelled {
                    completed: b * settings.steps + completed,
                    total: batches * settings.steps,
                });
            }
            other => done.push(other?),
        }
    }
    let latents = Tensor::cat(&done, 0);
    Ok(Phase2 { geometry, latents: unpack(&latents, geometry.height, geometry.width)? })
}

/// What every batch of one request shares.
struct Run<'a> {
    dit: &'a QwenImageTransformer,
    settings: &'a DenoiseSettings,
    /// The sampling grid, not stepped yet.
    schedule: FlowMatchEulerScheduler,
    geometry: ImageGeometry,
    cond: &'a Text,
    uncond: Option<&'a Text>,
    images: &'a Images,
    preview_at: Vec<usize>,
}

impl Run<'_> {
    /// Denoises `latents` `[b, seq, 64]` (images `first..first + b` of the request) through every
    /// step; returns the packed final latents.
    fn batch(
        &self,
        mut latents: Tensor,
        first: usize,
        progress: &mut dyn FnMut(usize, f64),
        preview: &mut dyn FnMut(Preview),
        cancelled: impl Fn() -> bool,
    ) -> Result<Tensor, Error> {
        let (dit, geometry) = (self.dit, self.geometry);
        let mut scheduler = self.schedule.clone();
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let (device, kind) = (dit.device(), dit.kind());
        let b = latents.size()[0];
        let noise_tokens = latents.size()[1];
        let cond = self.cond.repeat(b);
        let uncond = self.uncond.map(|u| u.repeat(b));
        let image_tokens = self.images.tokens.as_ref().map(|t| t.repeat([b, 1, 1]));
        let shapes = &self.images.shapes;
        let forward = |input: &Tensor, t: &Tensor, text: &Text| -> Result<Tensor, Error> {
            let out = dit.forward(input, &text.embeds, text.mask.as_ref(), t, shapes)?;
            Ok(out.narrow(1, 0, noise_tokens))
        };
        for (i, &t) in timesteps.iter().enumerate() {
            if cancelled() {
                return Err(Error::Cancelled { completed: i, total });
            }
            let input = match &image_tokens {
                Some(img) => Tensor::cat(&[&latents, img], 1),
                None => latents.shallow_clone(),
            };
            let timestep = timestep_input(t, b, kind, device);
            let v = forward(&input, &timestep, &cond)?;
            let v = match &uncond {
                Some(u) => {
                    true_cfg(&v, &forward(&input, &timestep, u)?, self.settings.true_cfg_scale)?
                }
                None => v,
            };
            if let Some(index) = self.preview_at.iter().position(|&s| s == i + 1) {
                let sigma = scheduler.sigmas()[i];
                let x0 = latents.to_kind(Kind::Float) - v.to_kind(Kind::Float) * sigma;
                let x0 = unpack(&x0, geometry.height, geometry.width)?;
                for j in 0..b {
                    preview(Preview {
                        image: first + j as usize,
                        index,
                        step: i + 1,
                        latents: x0.narrow(0, j, 1),
                    });
                }
            }
            latents = scheduler.step(&v, &latents)?;
            progress(i + 1, t);
        }
        Ok(latents)
    }
}

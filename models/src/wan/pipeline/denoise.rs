//! The denoising loop of diffusers' `WanPipeline` / `WanImageToVideoPipeline` (from latents
//! initialisation to the final latents), with progress reporting and cancellation between steps.
//!
//! Initial noise: fp32 `randn([1, 16, (F−1)/4+1, H/8, W/8])` from a CPU generator seeded with the
//! job seed, as the reference draws it with `torch.Generator("cpu").manual_seed(seed)`.
//! Guidance: `v = v_u + g·(v_c − v_u)` in the model dtype, cond and uncond run as one batch of 2.
//! Video-to-video (`WanVideoToVideoPipeline`): of the `steps`-step grid the last
//! `int(steps·strength)` steps run; the initial latents are the input video's latents noised to the
//! first of them, `sigma·noise + (1 − sigma)·latents` (UniPC's `add_noise`, Euler's `scale_noise`).
//! Wan2.2 TI2V-5B (`expand_timesteps`): the noise has the Wan2.2 VAE's 48 channels at 1/16 of the
//! pixels, and the DiT takes one timestep per token; given an image, latent frame 0 is the image's
//! latents in every model input (its tokens at timestep 0) and in the final latents, as diffusers'
//! `WanImageToVideoPipeline` holds it with `first_frame_mask`.
//! Wan2.2 A14B: each step runs on the expert its timestep falls to ([`WanDit::expert_at`]), with
//! `guidance_scale` on the high-noise expert and `guidance_scale_2` on the low-noise one; whether
//! guidance runs at all follows `guidance_scale` alone, as in diffusers.

use tch::{Device, Kind, Tensor};

use super::dit::{Expert, WanDit};
use super::{Geometry, Phase1, Phase2, TEXT_LEN};
use crate::error::{Component, Error};
use crate::schedulers::{
    FlowMatchEulerConfig, FlowMatchEulerScheduler, Scheduler, StepDistillConfig,
    StepDistillScheduler, UniPcConfig, UniPcScheduler, index_for_timestep,
};
use crate::wan::transformer::{PreparedContext, WanTransformer3DModel};

/// Which sampler to run.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerChoice {
    /// Flow UniPC (the Wan default).
    UniPc(UniPcConfig),
    /// Flow-matching Euler (e.g. step-distilled models).
    Euler(FlowMatchEulerConfig),
    /// A step-distilled model's fixed timesteps (LightX2V's distillations); the step count must
    /// equal the list's length.
    StepDistill(StepDistillConfig),
}

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoiseSettings {
    /// Denoising steps (model evaluations per branch).
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is on when > 1.
    pub guidance_scale: f64,
    /// Wan2.2 A14B: the low-noise expert's guidance scale; `None` takes `guidance_scale`.
    /// Refused for a one-transformer model.
    pub guidance_scale_2: Option<f64>,
    /// Seed of the initial noise.
    pub seed: u64,
    pub scheduler: SchedulerChoice,
    /// Run cond and uncond as one batch of 2 (faster) rather than two forwards.
    pub batch_cfg: bool,
    /// Video-to-video only (required there, refused otherwise): how far the input video is
    /// noised, in (0, 1]; the last `int(steps·strength)` steps of the grid run.
    pub strength: Option<f64>,
}

impl DenoiseSettings {
    /// diffusers' `WanPipeline` defaults: 50 UniPC steps, guidance 5, the given shift.
    pub fn wan_default(seed: u64, flow_shift: f64) -> Self {
        DenoiseSettings {
            steps: 50,
            guidance_scale: 5.0,
            guidance_scale_2: None,
            seed,
            scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(flow_shift)),
            batch_cfg: true,
            strength: None,
        }
    }
}

/// Reported after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps completed (1-based).
    pub step: usize,
    /// Steps this run takes (for video-to-video, those its strength leaves).
    pub total: usize,
    /// The timestep the step evaluated.
    pub timestep: f64,
    /// The expert that evaluated it ([`Expert::High`] on one-transformer models).
    pub expert: Expert,
}

/// How the conditioning is evaluated per step.
enum Guidance {
    /// CFG with cond and uncond as one batch of 2 (cond first).
    Batched(PreparedContext),
    /// CFG with two forwards: (cond, uncond).
    Separate(PreparedContext, PreparedContext),
    /// No guidance: cond only.
    Off(PreparedContext),
}

/// The reference pipeline's initial latents: `randn(shape)` fp32 from a CPU generator seeded with
/// `seed` (identical to `torch.Generator("cpu").manual_seed(seed)`), moved to `device`.
pub fn initial_noise(geometry: &Geometry, seed: u64, device: Device) -> Tensor {
    crate::device::with_cpu_seed(seed, || {
        Tensor::randn(geometry.latent_shape(), (Kind::Float, Device::Cpu))
    })
    .to_device(device)
}

fn pad_text(t: &Tensor, text_dim: i64, what: &str) -> Result<Tensor, Error> {
    let s = t.size();
    if s.len() != 3 || s[0] != 1 || s[1] < 1 || s[1] > TEXT_LEN || s[2] != text_dim {
        return Err(Error::input(
            Component::Denoise,
            format!("{what} must be [1, 1..={TEXT_LEN}, {text_dim}], got {s:?}"),
        ));
    }
    Ok(t.to_kind(Kind::Float).constant_pad_nd([0, 0, 0, TEXT_LEN - s[1]]))
}

/// The per-job conditioning of a DiT, checked against its config and moved to its device.
struct Conditioning {
    /// `[1, 512, text_dim]` fp32.
    cond: Tensor,
    /// Present when guidance is on.
    uncond: Option<Tensor>,
    /// I2V CLIP features.
    image: Option<Tensor>,
    /// I2V `y`, concatenated to the latents on the channel axis.
    y: Option<Tensor>,
    /// TI2V-5B image-to-video: the image's latents `[1, C, 1, h, w]`, latent frame 0 throughout.
    first_frame: Option<Tensor>,
    /// V2V: the input video's latents, fp32 on the device.
    video: Option<Tensor>,
}

impl Conditioning {
    fn check(
        dit: &WanTransformer3DModel,
        phase1: &Phase1,
        guided: bool,
        latent_shape: [i64; 5],
        expand_timesteps: bool,
    ) -> Result<Self, Error> {
        let cfg = dit.config();
        let dev = dit.device();
        let bad = |m: String| Error::input(Component::Denoise, m);
        let cond = pad_text(&phase1.prompt_embeds, cfg.text_dim, "prompt_embeds")?;
        let uncond = if guided {
            let neg = phase1.negative_prompt_embeds.as_ref().ok_or_else(|| {
                Error::input(Component::Denoise, "guidance_scale > 1 needs negative_prompt_embeds")
            })?;
            Some(pad_text(neg, cfg.text_dim, "negative_prompt_embeds")?.to_device(dev))
        } else {
            None
        };
        let image = match (cfg.takes_image_embeds(), &phase1.image_embeds) {
            (true, Some(img)) => Some(img.to_device(dev)),
            (true, None) => return Err(bad("this I2V model needs image_embeds".into())),
            (false, Some(_)) => return Err(bad("this T2V model takes no image_embeds".into())),
            (false, None) => None,
        };
        let [_, c, t, h, w] = latent_shape;
        if expand_timesteps {
            let first_frame = match &phase1.condition {
                Some(y) if y.size() != [1, c, 1, h, w] => {
                    let want = [1, c, 1, h, w];
                    return Err(bad(format!(
                        "the first frame's latents must be {want:?}, got {:?}",
                        y.size()
                    )));
                }
                Some(y) => Some(y.to_device(dev).to_kind(Kind::Float)),
                None => None,
            };
            if phase1.video_latents.is_some() {
                return Err(bad("video-to-video is not offered on a TI2V model".into()));
            }
            let cond = cond.to_device(dev);
            return Ok(Conditioning { cond, uncond, image, y: None, first_frame, video: None });
        }
        let y = match &phase1.condition {
            Some(y) => {
                let want = [1, cfg.in_channels - c, t, h, w];
                if y.size() != want {
                    return Err(bad(format!("condition must be {want:?}, got {:?}", y.size())));
                }
                Some(y.to_device(dev).to_kind(Kind::Float))
            }
            None if cfg.in_channels != c => {
                return Err(bad(format!(
                    "this model takes {} input channels and needs a condition tensor",
                    cfg.in_channels
                )));
            }
            None => None,
        };
        let video = match &phase1.video_latents {
            Some(v) if v.size() != latent_shape => {
                return Err(bad(format!(
                    "video_latents must be {latent_shape:?}, got {:?}",
                    v.size()
                )));
            }
            Some(v) => Some(v.to_device(dev).to_kind(Kind::Float)),
            None => None,
        };
        Ok(Conditioning { cond: cond.to_device(dev), uncond, image, y, first_frame: None, video })
    }

    /// The DiT's input at a step: the latents, with I2V's `y` concatenated or TI2V's image
    /// latents as frame 0.
    fn model_input(&self, latents: &Tensor) -> Tensor {
        match (&self.y, &self.first_frame) {
            (Some(y), _) => Tensor::cat(&[latents, y], 1),
            (None, Some(f)) => hold_first_frame(latents, f),
            (None, None) => latents.shallow_clone(),
        }
    }
}

/// `latents` with latent frame 0 replaced by `first` (diffusers: `(1 − mask)·condition +
/// mask·latents`, the mask 0 on frame 0 and 1 elsewhere).
fn hold_first_frame(latents: &Tensor, first: &Tensor) -> Tensor {
    let t = latents.size()[2];
    Tensor::cat(&[first.to_kind(latents.kind()), latents.narrow(2, 1, t - 1)], 2)
}

/// TI2V-5B's per-token timesteps `[1, F'·H'·W']` fp32: `t`, or 0 on the tokens of a held first
/// frame (diffusers: `(mask[0][0][:, ::2, ::2] · t).flatten()`).
fn token_timesteps(
    latent_shape: [i64; 5],
    patch: [i64; 3],
    t: f32,
    first_frame: bool,
    dev: Device,
) -> Tensor {
    let [_, _, f, h, w] = latent_shape;
    let (f, per_frame) = (f / patch[0], (h / patch[1]) * (w / patch[2]));
    let ts = Tensor::full([f, per_frame], f64::from(t), (Kind::Float, dev));
    if first_frame {
        let _ = ts.get(0).fill_(0.0);
    }
    ts.view([1, f * per_frame])
}

impl Guidance {
    /// Projects the conditioning once: it is the same at every step.
    fn prepare(
        dit: &WanTransformer3DModel,
        c: &Conditioning,
        batch_cfg: bool,
    ) -> Result<Self, Error> {
        let image = c.image.as_ref();
        Ok(match &c.uncond {
            Some(u) if batch_cfg => {
                let image2 = image.map(|i| Tensor::cat(&[i, i], 0));
                let both = Tensor::cat(&[&c.cond, u], 0);
                Guidance::Batched(dit.prepare_context(&both, image2.as_ref())?)
            }
            Some(u) => Guidance::Separate(
                dit.prepare_context(&c.cond, image)?,
                dit.prepare_context(u, image)?,
            ),
            None => Guidance::Off(dit.prepare_context(&c.cond, image)?),
        })
    }

    /// The guided velocity for the model input `input` at `timestep`: `[1]`, or `[1, L]` per
    /// token.
    fn velocity(
        &self,
        dit: &WanTransformer3DModel,
        input: &Tensor,
        timestep: &Tensor,
        scale: f64,
    ) -> Result<Tensor, Error> {
        Ok(match self {
            Guidance::Batched(both) => {
                let input2 = Tensor::cat(&[input, input], 0);
                let ts = Tensor::cat(&[timestep, timestep], 0);
                let out = dit.forward_prepared(&input2, &ts, both)?;
                let (v_c, v_u) = (out.get(0).unsqueeze(0), out.get(1).unsqueeze(0));
                &v_u + (v_c - &v_u) * scale
            }
            Guidance::Separate(c, u) => {
                let v_c = dit.forward_prepared(input, timestep, c)?;
                let v_u = dit.forward_prepared(input, timestep, u)?;
                &v_u + (v_c - &v_u) * scale
            }
            Guidance::Off(c) => dit.forward_prepared(input, timestep, c)?,
        })
    }
}

/// The run's sampler; `fresh` holds the noise a re-noising sampler draws after the initial noise.
fn scheduler(settings: &DenoiseSettings, fresh: Vec<Tensor>) -> Result<Box<dyn Scheduler>, Error> {
    Ok(match &settings.scheduler {
        SchedulerChoice::UniPc(c) => Box::new(UniPcScheduler::new(c, settings.steps)?),
        SchedulerChoice::Euler(c) => Box::new(FlowMatchEulerScheduler::new(c, settings.steps)?),
        SchedulerChoice::StepDistill(c) => {
            if settings.steps != c.denoising_steps.len() {
                return Err(Error::input(
                    Component::Scheduler,
                    format!(
                        "this step-distilled model samples {} steps (timesteps {:?}), not {}",
                        c.denoising_steps.len(),
                        c.denoising_steps,
                        settings.steps
                    ),
                ));
            }
            Box::new(StepDistillScheduler::new(c, fresh)?)
        }
    })
}

/// Noise tensors of the latents' shape: the initial noise, then `fresh` more, drawn in turn from
/// one CPU generator seeded with `seed` (as `torch.Generator("cpu").manual_seed(seed)` draws them).
fn draw_noise(shape: [i64; 5], seed: u64, fresh: usize, device: Device) -> Vec<Tensor> {
    crate::device::with_cpu_seed(seed, || {
        (0..=fresh).map(|_| Tensor::randn(shape, (Kind::Float, Device::Cpu))).collect::<Vec<_>>()
    })
    .into_iter()
    .map(|t| t.to_device(device))
    .collect()
}

/// Runs the sampling loop and returns the final latents.
///
/// `progress` is called after every step; `cancelled` is polled before every step and stops the
/// loop with [`Error::Cancelled`].
pub fn denoise(
    dit: &WanDit,
    phase1: &Phase1,
    settings: &DenoiseSettings,
    mut progress: impl FnMut(Progress),
    cancelled: impl Fn() -> bool,
) -> Result<Phase2, Error> {
    let _guard = tch::no_grad_guard();
    let geometry = phase1.geometry;
    let spec = dit.latent_spec();
    geometry.validate_for(spec).map_err(|m| Error::input(Component::Denoise, m))?;
    let shape = geometry.latent_shape_for(spec);
    let scale_2 = guidance_scale_2(dit, settings)?;
    let guided = settings.guidance_scale > 1.0;
    let expand = dit.expands_timesteps();
    let conditioning = Conditioning::check(dit.high(), phase1, guided, shape, expand)?;
    let fresh = match &settings.scheduler {
        SchedulerChoice::StepDistill(c) => c.fresh_noises(),
        _ => 0,
    };
    let mut noises = draw_noise(shape, settings.seed, fresh, dit.device());
    let noise = noises.remove(0);
    let mut scheduler = scheduler(settings, noises)?;
    let (first, mut latents) = match (&conditioning.video, settings.strength) {
        (None, None) => (0, noise),
        (Some(video), Some(strength)) => {
            let first = first_step(settings.steps, strength)?;
            let start = start_index(scheduler.as_mut(), first)?;
            let sigma = scheduler.sigmas()[start];
            (first, noised(video, &noise, sigma))
        }
        (None, Some(_)) => {
            return Err(Error::input(
                Component::Denoise,
                "strength applies to video-to-video (video_latents) only",
            ));
        }
        (Some(_), None) => {
            return Err(Error::input(Component::Denoise, "video-to-video needs a strength"));
        }
    };
    let timesteps = scheduler.timesteps()[first..].to_vec();
    let total = timesteps.len();
    // Each expert projects the conditioning with its own weights, once, when it first runs.
    let mut prepared: [Option<Guidance>; 2] = [None, None];

    for (i, &t) in timesteps.iter().enumerate() {
        if cancelled() {
            return Err(Error::Cancelled { completed: i, total });
        }
        let expert = dit.expert_at(t);
        let (model, scale) = match expert {
            Expert::High => (dit.high(), settings.guidance_scale),
            Expert::Low => (dit.expert(Expert::Low), scale_2),
        };
        let guidance = match &mut prepared[expert as usize] {
            Some(g) => g,
            slot => slot.insert(Guidance::prepare(model, &conditioning, settings.batch_cfg)?),
        };
        let input = conditioning.model_input(&latents);
        let timestep = if expand {
            let held = conditioning.first_frame.is_some();
            token_timesteps(shape, model.config().patch_size, t as f32, held, model.device())
        } else {
            Tensor::from_slice(&[t as f32]).to_device(model.device())
        };
        let v = guidance.velocity(model, &input, &timestep, scale)?;
        latents = scheduler.step(&v, &latents)?.to_kind(Kind::Float);
        progress(Progress { step: i + 1, total, timestep: t, expert });
    }
    if let Some(first) = &conditioning.first_frame {
        latents = hold_first_frame(&latents, first);
    }
    Ok(Phase2 { geometry, latents })
}

/// `get_timesteps`: the grid index of the first step a video-to-video run takes, `steps −
/// min(int(steps·strength), steps)`; at least one step must remain.
pub fn first_step(steps: usize, strength: f64) -> Result<usize, Error> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::input(
            Component::Denoise,
            format!("strength must be in (0, 1], got {strength}"),
        ));
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(Error::input(
            Component::Denoise,
            format!(
                "strength {strength} leaves none of the {steps} steps to run (steps × strength < 1)"
            ),
        ));
    }
    Ok(steps - run)
}

/// Starts `scheduler` at the step of the grid's `first` timestep, found as diffusers finds it
/// (`index_for_timestep`), and returns that index.
fn start_index(scheduler: &mut dyn Scheduler, first: usize) -> Result<usize, Error> {
    let index = index_for_timestep(scheduler.timesteps(), scheduler.timesteps()[first]);
    scheduler.start_at(index)?;
    Ok(index)
}

/// `(1 − sigma)·latents + sigma·noise` in fp32 (`alpha_t` and `sigma_t` fp32 tensors in diffusers).
fn noised(latents: &Tensor, noise: &Tensor, sigma: f64) -> Tensor {
    let sigma = sigma as f32;
    let alpha = 1.0f32 - sigma;
    latents * f64::from(alpha) + noise * f64::from(sigma)
}

/// The low-noise expert's scale: `guidance_scale_2`, else `guidance_scale` (diffusers' rule).
fn guidance_scale_2(dit: &WanDit, settings: &DenoiseSettings) -> Result<f64, Error> {
    let bad = |m: &str| Err(Error::input(Component::Denoise, m));
    if settings.guidance_scale.is_nan() || settings.guidance_scale_2.is_some_and(f64::is_nan) {
        return bad("guidance_scale is NaN");
    }
    match settings.guidance_scale_2 {
        Some(_) if dit.low().is_none() => bad(
            "guidance_scale_2 applies to the low-noise expert of a two-expert model (Wan2.2 A14B); \
             this model has one transformer",
        ),
        Some(g) => Ok(g),
        None => Ok(settings.guidance_scale),
    }
}

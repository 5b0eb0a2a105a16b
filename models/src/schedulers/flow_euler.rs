//! Flow-matching Euler (diffusers `FlowMatchEulerDiscreteScheduler`):
//! `x ← (x.float() + (sigma_{i+1} − sigma_i)·v).to(v.dtype)`.
//!
//! Grid with a fixed shift ([`FlowMatchEulerScheduler::new`], Wan): the training sigmas `t/1000`
//! (t = 1000…1) are shifted once (fp32) to get `sigma_max` and `sigma_min`;
//! `linspace(sigma_max, sigma_min, N)` is then shifted **again** (fp64), stored as fp32, and
//! timesteps are `1000·sigma` in fp32. Grid with dynamic shifting
//! ([`FlowMatchEulerScheduler::dynamic`], Qwen-Image): see [`super::dynamic_shift`].

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::dynamic_shift::{FlowMatchDynamicConfig, default_sigmas, shifted_sigmas};
use super::{Error, Scheduler, check_shift_and_steps, np_linspace, shift_sigma};

/// Settings of [`FlowMatchEulerScheduler`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowMatchEulerConfig {
    /// Time shift `S` (3.0 for Wan 480p).
    pub shift: f64,
    /// Training timesteps (1000).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
}

fn default_train_steps() -> usize {
    1000
}

/// One sampling run of flow-matching Euler: its sigma/timestep grid and the step counter.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
}

impl FlowMatchEulerScheduler {
    /// The fixed-shift grid of `steps` steps (`set_timesteps(steps)` without sigmas or `mu`).
    pub fn new(config: &FlowMatchEulerConfig, steps: usize) -> Result<Self, Error> {
        check_shift_and_steps(config.shift, steps)?;
        let n_train = config.num_train_timesteps as f32;
        let shift32 = config.shift as f32;
        let train_shift = |s: f32| shift32 * s / (1.0 + (shift32 - 1.0) * s);
        let sigma_max = f64::from(train_shift(1.0)); // t = 1000: sigma = 1000/1000
        let sigma_min = f64::from(train_shift(1.0 / n_train));
        let n = f64::from(n_train);
        let mut sigmas: Vec<f64> = np_linspace(sigma_max * n, sigma_min * n, steps)
            .into_iter()
            .map(|t| f64::from(shift_sigma(config.shift, t / n) as f32))
            .collect();
        let timesteps = sigmas.iter().map(|&s| f64::from(s as f32 * n_train)).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEulerScheduler { timesteps, sigmas, index: 0 })
    }

    /// The Qwen-Image pipelines' grid: `steps` default sigmas `linspace(1, 1/steps, steps)`
    /// shifted for `image_seq_len` packed noise tokens (`mu = cfg.mu(image_seq_len)`).
    pub fn dynamic(
        cfg: &FlowMatchDynamicConfig,
        steps: usize,
        image_seq_len: usize,
    ) -> Result<Self, Error> {
        if steps == 0 || steps > 1000 {
            return Err(Error::input(
                crate::error::Component::Scheduler,
                format!("steps must be in 1..=1000, got {steps}"),
            ));
        }
        Self::from_sigmas(cfg, &default_sigmas(steps), cfg.mu(image_seq_len))
    }

    /// `set_timesteps(sigmas=sigmas, mu=mu)`: the grid from caller-given sigmas in (0, 1].
    pub fn from_sigmas(
        cfg: &FlowMatchDynamicConfig,
        sigmas: &[f64],
        mu: f64,
    ) -> Result<Self, Error> {
        let cfg = crate::config::checked(cfg.clone())?;
        let shifted = shifted_sigmas(&cfg, sigmas, mu)?;
        let n_train = cfg.num_train_timesteps as f32;
        let timesteps = shifted.iter().map(|&s| f64::from(s * n_train)).collect();
        let mut sigmas: Vec<f64> = shifted.into_iter().map(f64::from).collect();
        sigmas.push(0.0);
        Ok(FlowMatchEulerScheduler { timesteps, sigmas, index: 0 })
    }
}

impl Scheduler for FlowMatchEulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn step_index(&self) -> usize {
        self.index
    }

    fn start_at(&mut self, index: usize) -> Result<(), Error> {
        super::check_start(self.index, index, self.timesteps.len())?;
        self.index = index;
        Ok(())
    }

    /// `sample` may be fp32 or the model dtype: the update runs in fp32 (`dt·v` in `v`'s dtype,
    /// as torch computes it) and the result has `model_output`'s dtype.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor, Error> {
        let i = self.index;
        if i >= self.timesteps.len() {
            return Err(Error::SchedulerFinished(self.timesteps.len()));
        }
        let dt = self.sigmas[i + 1] as f32 - self.sigmas[i] as f32;
        self.index += 1;
        // diffusers computes `dt * v` with `dt` a 0-dim fp32 CPU tensor as the FIRST operand:
        // libtorch then casts it to `v`'s dtype (bf16 rounds it), which it does not do for a
        // scalar second operand. Same operands, same order here.
        let dt = Tensor::scalar_tensor(f64::from(dt), (Kind::Float, tch::Device::Cpu));
        let out = sample.to_kind(Kind::Float) + dt * model_output;
        Ok(out.to_kind(model_output.kind()))
    }
}

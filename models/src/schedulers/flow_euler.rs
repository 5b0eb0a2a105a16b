//! Flow-matching Euler (diffusers `FlowMatchEulerDiscreteScheduler`, fixed shift, no dynamic
//! shifting): `x ← x + (sigma_{i+1} − sigma_i)·v`.
//!
//! Grid: the training sigmas `t/1000` (t = 1000…1) are shifted once (fp32) to get `sigma_max`
//! and `sigma_min`; `linspace(sigma_max, sigma_min, N)` is then shifted **again** (fp64), stored as
//! fp32, and timesteps are `1000·sigma` in fp32.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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

#[derive(Debug)]
pub struct FlowMatchEulerScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
}

impl FlowMatchEulerScheduler {
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

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor, Error> {
        let i = self.index;
        if i >= self.timesteps.len() {
            return Err(Error::SchedulerFinished(self.timesteps.len()));
        }
        let dt = self.sigmas[i + 1] as f32 - self.sigmas[i] as f32;
        self.index += 1;
        let out = sample.to_kind(Kind::Float) + model_output * f64::from(dt);
        Ok(out.to_kind(model_output.kind()))
    }
}

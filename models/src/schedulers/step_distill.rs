//! The sampler of step-distilled Wan models (LightX2V's 4-step distillations, as a merged
//! checkpoint or a LoRA): a fixed list of training timesteps instead of a step count.
//!
//! The grid is the 1000 training sigmas `linspace(1, 0, 1001)[:-1]` (fp32, libtorch's), time-shifted
//! by `shift`;
//! `denoising_steps` (e.g. `[1000, 750, 500, 250]`) picks entries `1000 − t` of it. Each step
//! predicts `x0 = x − sigma_i·v` and then
//! - `renoise` (Wan2.1 distillations): draws fresh noise and re-noises `x0` to the next sigma,
//!   `(1 − sigma_{i+1})·x0 + sigma_{i+1}·noise`;
//! - otherwise (Wan2.2 distillations): moves along the prediction, `x0 + sigma_{i+1}·v`;
//!
//! and the last step returns `x0`. The fresh noise comes from the same CPU generator as the initial
//! noise, drawn after it, step by step (the caller draws it and hands it over).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{Error, Scheduler};
use crate::error::Component;

/// Training timesteps of the grid.
const TRAIN_STEPS: u32 = 1000;

/// A step-distilled model's sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDistillConfig {
    /// Training timesteps to evaluate, descending, each in `1..=1000`.
    pub denoising_steps: Vec<u32>,
    /// Time shift of the sigmas (`sample_shift`).
    pub shift: f64,
    /// Re-noise the prediction with fresh noise between steps (Wan2.1 distillations) rather
    /// than move along it (Wan2.2 distillations).
    pub renoise: bool,
}

impl StepDistillConfig {
    /// LightX2V's Wan2.1 4-step distillation: timesteps 1000, 750, 500, 250, shift 5, re-noised.
    pub fn wan21_4step() -> Self {
        StepDistillConfig { denoising_steps: vec![1000, 750, 500, 250], shift: 5.0, renoise: true }
    }

    /// Fresh noise tensors a run draws after the initial noise: one per step but the last, when
    /// re-noising.
    pub fn fresh_noises(&self) -> usize {
        if self.renoise { self.denoising_steps.len().saturating_sub(1) } else { 0 }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::input(Component::Scheduler, m));
        let s = &self.denoising_steps;
        if s.is_empty() || s.len() > TRAIN_STEPS as usize {
            return bad(format!("denoising_steps must list 1 to 1000 timesteps, got {}", s.len()));
        }
        if let Some(t) = s.iter().find(|t| !(1..=TRAIN_STEPS).contains(*t)) {
            return bad(format!("denoising_steps must lie in 1..=1000, got {t}"));
        }
        if s.windows(2).any(|w| w[1] >= w[0]) {
            return bad(format!("denoising_steps must be strictly descending, got {s:?}"));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return bad(format!("shift must be positive, got {}", self.shift));
        }
        Ok(())
    }
}

/// One run of the step-distill sampler.
#[derive(Debug)]
pub struct StepDistillScheduler {
    renoise: bool,
    timesteps: Vec<f64>,
    /// One per step, then 0.
    sigmas: Vec<f64>,
    /// Fresh noise for steps `0..n−1` (re-noising only).
    noises: Vec<Tensor>,
    index: usize,
}

impl StepDistillScheduler {
    /// `noises`: [`StepDistillConfig::fresh_noises`] tensors of the latents' shape, in step order.
    pub fn new(config: &StepDistillConfig, noises: Vec<Tensor>) -> Result<Self, Error> {
        config.validate()?;
        if noises.len() != config.fresh_noises() {
            return Err(Error::input(
                Component::Scheduler,
                format!(
                    "{} fresh noise tensors given, {} needed",
                    noises.len(),
                    config.fresh_noises()
                ),
            ));
        }
        // The fp32 grid as libtorch computes it (its linspace kernel fuses multiply and add),
        // shifted with Python-float scalars on the fp32 tensor.
        let s = Tensor::linspace(1.0, 0.0, i64::from(TRAIN_STEPS) + 1, (Kind::Float, Device::Cpu))
            .narrow(0, 0, i64::from(TRAIN_STEPS));
        let shifted = (&s * config.shift) / ((&s * (config.shift - 1.0)) + 1.0);
        let grid = Vec::<f32>::try_from(&shifted)
            .map_err(|e| Error::input(Component::Scheduler, e.to_string()))?;
        let mut sigmas = Vec::with_capacity(config.denoising_steps.len() + 1);
        let mut timesteps = Vec::with_capacity(config.denoising_steps.len());
        for &t in &config.denoising_steps {
            let sigma = grid[(TRAIN_STEPS - t) as usize];
            sigmas.push(f64::from(sigma));
            timesteps.push(f64::from(sigma * TRAIN_STEPS as f32));
        }
        sigmas.push(0.0);
        Ok(StepDistillScheduler { renoise: config.renoise, timesteps, sigmas, noises, index: 0 })
    }
}

impl Scheduler for StepDistillScheduler {
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

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor, Error> {
        let (i, n) = (self.index, self.timesteps.len());
        if i >= n {
            return Err(Error::SchedulerFinished(n));
        }
        self.index += 1;
        let v = model_output.to_kind(Kind::Float);
        let x0 = sample.to_kind(Kind::Float) - &v * self.sigmas[i];
        if i + 1 == n {
            return Ok(x0);
        }
        let next = self.sigmas[i + 1];
        Ok(if self.renoise { x0 * (1.0 - next) + &self.noises[i] * next } else { x0 + v * next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_4step_grid_picks_shifted_training_sigmas() {
        let s = StepDistillScheduler::new(
            &StepDistillConfig { renoise: false, ..StepDistillConfig::wan21_4step() },
            vec![],
        )
        .unwrap();
        // t = 1000 → s = 1 → sigma 1; t = 750 → s = 0.75 → 5·0.75 / (1 + 4·0.75) = 0.9375.
        let want = [1.0, 0.9375, 5.0 * 0.5 / 3.0, 5.0 * 0.25 / 2.0, 0.0];
        for (got, want) in s.sigmas().iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", s.sigmas());
        }
        assert!((s.timesteps()[1] - 937.5).abs() < 1e-3, "{:?}", s.timesteps());
    }

    #[test]
    fn settings_are_checked() {
        let base = StepDistillConfig::wan21_4step();
        for (cfg, needle) in [
            (StepDistillConfig { denoising_steps: vec![], ..base.clone() }, "1 to 1000"),
            (StepDistillConfig { denoising_steps: vec![1001, 500], ..base.clone() }, "1..=1000"),
            (StepDistillConfig { denoising_steps: vec![500, 750], ..base.clone() }, "descending"),
            (StepDistillConfig { shift: 0.0, ..base.clone() }, "shift"),
        ] {
            let e = StepDistillScheduler::new(&cfg, vec![]).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let e = StepDistillScheduler::new(&base, vec![]).unwrap_err().to_string();
        assert!(e.contains("0 fresh noise tensors given, 3 needed"), "{e}");
    }
}

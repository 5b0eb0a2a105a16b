//! Flow-matching schedulers with diffusers' semantics: multistep UniPC (Wan's default) and
//! Euler, with a fixed shift or with Qwen-Image's dynamic shift; and the step-distill sampler of
//! LightX2V's distilled Wan models. A scheduler owns its timestep grid and the multistep history of one sampling run.
//!
//! Convention: the model predicts the flow velocity `v ≈ noise − x0`; `sigma` goes from ≈1
//! (pure noise) to 0, and `sigma_N = 0` is appended to the grid.

pub mod dynamic_shift;
pub mod flow_euler;
pub mod step_distill;
pub mod unipc;

use tch::Tensor;

pub use dynamic_shift::{FlowMatchDynamicConfig, calculate_shift, default_sigmas};
pub use flow_euler::{FlowMatchEulerConfig, FlowMatchEulerScheduler};
pub use step_distill::{StepDistillConfig, StepDistillScheduler};
pub use unipc::{UniPcConfig, UniPcScheduler};

/// Why a scheduler could not be built or stepped.
use crate::error::Error;

/// One sampling run's schedule and solver state.
pub trait Scheduler {
    /// Timesteps fed to the model, one per step (UniPC: integers; Euler: fp32 values).
    fn timesteps(&self) -> &[f64];

    /// The noise levels, one per step plus the final 0; values are fp32-rounded.
    fn sigmas(&self) -> &[f64];

    /// Advances `sample` (fp32) by one step given the model's velocity prediction.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor, Error>;

    /// Steps taken so far (the grid index of the next step).
    fn step_index(&self) -> usize;

    /// Image/video-to-video: the run starts at grid index `index` instead of 0, before any step
    /// (the multistep history starts empty there, as diffusers' does).
    fn start_at(&mut self, index: usize) -> Result<(), Error>;

    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
}

/// diffusers' `index_for_timestep`: the grid index of timestep `t`; where `t` occurs more than
/// once, the second occurrence (so that a run started mid-grid skips no sigma), and the last index
/// where it does not occur.
pub fn index_for_timestep(timesteps: &[f64], t: f64) -> usize {
    let mut hits = timesteps.iter().enumerate().filter(|(_, v)| **v == t).map(|(i, _)| i);
    match (hits.next(), hits.next()) {
        (_, Some(second)) => second,
        (Some(first), None) => first,
        (None, None) => timesteps.len().saturating_sub(1),
    }
}

/// The check shared by the schedulers' [`Scheduler::start_at`].
pub(crate) fn check_start(taken: usize, index: usize, steps: usize) -> Result<(), Error> {
    if taken != 0 {
        return Err(Error::input(
            crate::error::Component::Scheduler,
            format!("a run can only be started mid-grid before its first step ({taken} taken)"),
        ));
    }
    if index >= steps {
        return Err(Error::input(
            crate::error::Component::Scheduler,
            format!("start index {index} is outside the {steps}-step grid"),
        ));
    }
    Ok(())
}

/// `shift·s / (1 + (shift − 1)·s)`: the flow-matching time shift.
pub(crate) fn shift_sigma(shift: f64, s: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// numpy's `linspace(start, stop, num)` element by element (the same rounding).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

pub(crate) fn check_shift_and_steps(shift: f64, steps: usize) -> Result<(), Error> {
    if steps == 0 || steps > 1000 {
        return Err(crate::error::Error::input(
            crate::error::Component::Scheduler,
            format!("steps must be in 1..=1000, got {steps}"),
        ));
    }
    if !(shift.is_finite() && shift > 0.0) {
        return Err(crate::error::Error::input(
            crate::error::Component::Scheduler,
            format!("shift must be positive, got {shift}"),
        ));
    }
    Ok(())
}

//! FlowMatchEuler configured by a diffusers `scheduler_config.json` with resolution-dependent
//! ("dynamic") time shifting, as the Qwen-Image pipelines use it (diffusers
//! `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…, mu=…)` called from
//! `pipelines/qwenimage/pipeline_qwenimage.py`).
//!
//! ```text
//! s     = linspace(1, 1/N, N)                      fp64, then fp32 (the pipeline's default sigmas)
//! mu    = calculate_shift(image_seq_len)           fp64, linear in the packed noise tokens
//! sigma = e^mu / (e^mu + (1/s − 1))                fp32 ("exponential"; "linear": mu / (mu + …))
//! sigma = 1 − (1 − sigma) / ((1 − sigma[-1]) / (1 − shift_terminal))   fp32, if shift_terminal
//! t     = 1000·sigma (fp32); sigma_N = 0
//! ```
//! Every fp32 operation is done in `f32` in the order numpy does it, so the grid is bit-identical.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, read_config_file};
use crate::error::{Component, Error};

/// diffusers `FlowMatchEulerDiscreteScheduler` config as published in a pipeline's
/// `scheduler/scheduler_config.json`; missing keys take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchDynamicConfig {
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// Fixed time shift, used when `use_dynamic_shifting` is false.
    pub shift: f64,
    /// Shift by `mu` from [`calculate_shift`] (the image size) rather than by `shift`.
    pub use_dynamic_shifting: bool,
    /// `mu` at `base_image_seq_len` tokens.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len` tokens (extrapolated linearly beyond).
    pub max_shift: f64,
    /// Token count where `mu = base_shift`.
    pub base_image_seq_len: usize,
    /// Token count where `mu = max_shift`.
    pub max_image_seq_len: usize,
    /// Last sigma before 0 after the stretch (`None`: no stretch).
    pub shift_terminal: Option<f64>,
    /// `"exponential"` or `"linear"`.
    pub time_shift_type: String,
    /// Not supported (must be false).
    pub invert_sigmas: bool,
    /// Not supported (must be false).
    pub stochastic_sampling: bool,
    /// Not supported (must be false).
    pub use_karras_sigmas: bool,
    /// Not supported (must be false).
    pub use_exponential_sigmas: bool,
    /// Not supported (must be false).
    pub use_beta_sigmas: bool,
}

impl Default for FlowMatchDynamicConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        FlowMatchDynamicConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            shift_terminal: None,
            time_shift_type: "exponential".into(),
            invert_sigmas: false,
            stochastic_sampling: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
        }
    }
}

impl FlowMatchDynamicConfig {
    /// `Qwen/Qwen-Image` (and the Edit releases) `scheduler/scheduler_config.json`.
    pub fn qwen_image() -> Self {
        FlowMatchDynamicConfig {
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 0.9,
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            shift_terminal: Some(0.02),
            ..Self::default()
        }
    }

    /// Reads and validates a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        read_config_file(path)
    }

    /// Reads `dir/scheduler_config.json` (a pipeline's `scheduler/` directory).
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        Self::from_file(&dir.join("scheduler_config.json"))
    }

    /// `mu` for `image_seq_len` packed noise tokens (the pipeline's `calculate_shift` call).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )
    }

    fn exponential(&self) -> bool {
        self.time_shift_type == "exponential"
    }
}

impl ModelConfig for FlowMatchDynamicConfig {
    const COMPONENT: Component = Component::Scheduler;

    fn validate(&self) -> Result<(), String> {
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!("{name} = true is not supported"));
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(format!(
                "time_shift_type must be \"exponential\" or \"linear\", got {:?}",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 || self.max_image_seq_len == self.base_image_seq_len {
            return Err(format!(
                "num_train_timesteps {} must be positive and max_image_seq_len {} differ from \
                 base_image_seq_len {}",
                self.num_train_timesteps, self.max_image_seq_len, self.base_image_seq_len
            ));
        }
        if let Some(t) = self.shift_terminal
            && !(t.is_finite() && t > 0.0 && t < 1.0)
        {
            return Err(format!("shift_terminal must be in (0, 1), got {t}"));
        }
        Ok(())
    }
}

/// diffusers' `calculate_shift`: `mu` linear in the token count, through
/// `(base_seq_len, base_shift)` and `(max_seq_len, max_shift)` (fp64, as Python computes it).
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// The pipeline's default sigmas: `numpy.linspace(1, 1/steps, steps)`.
pub fn default_sigmas(steps: usize) -> Vec<f64> {
    super::np_linspace(1.0, 1.0 / steps as f64, steps)
}

/// `set_timesteps(sigmas=sigmas, mu=mu)`: the shifted (and stretched) sigmas, fp32, without the
/// final 0. `mu` is ignored unless `use_dynamic_shifting`.
pub(crate) fn shifted_sigmas(
    cfg: &FlowMatchDynamicConfig,
    sigmas: &[f64],
    mu: f64,
) -> Result<Vec<f32>, Error> {
    let bad = |m: String| Error::input(Component::Scheduler, m);
    if sigmas.is_empty() || sigmas.len() > 1000 {
        return Err(bad(format!("between 1 and 1000 sigmas are needed, got {}", sigmas.len())));
    }
    if let Some(s) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0 && **s <= 1.0)) {
        return Err(bad(format!("sigmas must be in (0, 1], got {s}")));
    }
    if !mu.is_finite() {
        return Err(bad(format!("mu must be finite, got {mu}")));
    }
    let s32 = sigmas.iter().map(|&s| s as f32);
    let shifted: Vec<f32> = if cfg.use_dynamic_shifting {
        // Python float scalars meet fp32 arrays as fp32 (numpy's promotion rules).
        let (e, exponential) = (mu.exp() as f32, cfg.exponential());
        let m = mu as f32;
        s32.map(|s| {
            let r = 1.0f32 / s - 1.0f32;
            if exponential { e / (e + r) } else { m / (m + r) }
        })
        .collect()
    } else {
        let (shift, shift_m1) = (cfg.shift as f32, (cfg.shift - 1.0) as f32);
        s32.map(|s| shift * s / (1.0f32 + shift_m1 * s)).collect()
    };
    match cfg.shift_terminal {
        Some(terminal) => stretch_to_terminal(&shifted, terminal),
        None => Ok(shifted),
    }
}

/// `stretch_shift_to_terminal`: rescales `1 − sigma` so that the last sigma is `terminal` (fp32).
fn stretch_to_terminal(sigmas: &[f32], terminal: f64) -> Result<Vec<f32>, Error> {
    let last = 1.0f32 - sigmas[sigmas.len() - 1];
    if last <= 0.0 {
        return Err(Error::input(
            Component::Scheduler,
            "the last sigma is 1: it cannot be stretched to shift_terminal (use more steps)",
        ));
    }
    let scale = last / (1.0 - terminal) as f32;
    Ok(sigmas.iter().map(|&s| 1.0f32 - (1.0f32 - s) / scale).collect())
}

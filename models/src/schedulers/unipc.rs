//! UniPC multistep solver for flow matching (diffusers `UniPCMultistepScheduler` with
//! `prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `predict_x0=True`,
//! `solver_type="bh2"`, `final_sigmas_type="zero"`): the Wan pipelines' default.
//!
//! Paper: "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"
//! (Zhao et al., 2023). Grid: `s = linspace(1, 1/1000, N+1)[:-1]`, `sigma = shift·s/(1+(shift−1)s)`,
//! `sigma_0 −= 1e-6`, integer timesteps `trunc(1000·sigma)`, then `sigma_N = 0`. (The original Wan
//! code uses a different grid; this follows diffusers.)

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{Error, Scheduler, check_shift_and_steps, np_linspace, shift_sigma};
use crate::error::Component;

/// Settings of [`UniPcScheduler`] that vary between deployments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UniPcConfig {
    /// Flow shift `S` (`flow_shift`; Wan: 3.0 at 480p, 5.0 at 720p).
    pub flow_shift: f64,
    /// Multistep order, 1 or 2 (Wan: 2).
    #[serde(default = "default_order")]
    pub solver_order: usize,
    /// Use order 1 on the last step (Wan: true).
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// Training timesteps (1000).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
}

fn default_order() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_train_steps() -> usize {
    1000
}

impl UniPcConfig {
    /// The Wan2.1 diffusers scheduler config with the given shift.
    pub fn wan(flow_shift: f64) -> Self {
        UniPcConfig {
            flow_shift,
            solver_order: 2,
            lower_order_final: true,
            num_train_timesteps: 1000,
        }
    }
}

#[derive(Debug)]
pub struct UniPcScheduler {
    config: UniPcConfig,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
    /// Converted (x0) model outputs, oldest first, at most `solver_order`.
    history: Vec<Tensor>,
    /// The sample the last predictor started from (the corrector's `last_sample`).
    last_sample: Option<Tensor>,
    /// Order used by the last predictor (the next corrector uses it too).
    this_order: usize,
    lower_order_nums: usize,
}

/// `lambda = log(alpha) − log(sigma)` with `alpha = 1 − sigma`; `+inf` at sigma 0.
fn lambda(sigma: f64) -> f64 {
    (1.0 - sigma).ln() - sigma.ln()
}

impl UniPcScheduler {
    pub fn new(config: &UniPcConfig, steps: usize) -> Result<Self, Error> {
        check_shift_and_steps(config.flow_shift, steps)?;
        if !(1..=2).contains(&config.solver_order) {
            return Err(Error::input(
                Component::Scheduler,
                format!("solver_order must be 1 or 2, got {}", config.solver_order),
            ));
        }
        let n_train = config.num_train_timesteps as f64;
        let s = np_linspace(1.0, 1.0 / n_train, steps + 1);
        let mut sigmas: Vec<f64> =
            s[..steps].iter().map(|&s| shift_sigma(config.flow_shift, s)).collect();
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6; // keeps log(alpha) finite on the first steps
        }
        let timesteps = sigmas.iter().map(|&s| (s * n_train).trunc()).collect();
        let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        sigmas.push(0.0);
        Ok(UniPcScheduler {
            config: config.clone(),
            timesteps,
            sigmas,
            index: 0,
            history: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    /// UniC: recomputes the sample at sigma_i from `last_sample` (at sigma_{i−1}) using the new x0
    /// `model_t`; replaces the predictor's estimate.
    fn corrector(&self, model_t: &Tensor, last_sample: &Tensor) -> Tensor {
        let i = self.index;
        let order = self.this_order;
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let alpha_t = 1.0 - sigma_t;
        let (lambda_t, lambda_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = lambda_t - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let m0 = self.history.last().expect("corrector runs after a predictor");
        let x_t_ = last_sample * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1);
        let d1_t = model_t - m0;
        let correction = if order == 1 {
            d1_t * 0.5
        } else {
            let mi = &self.history[self.history.len() - 2];
            let rk = (lambda(self.sigmas[i - 2]) - lambda_s0) / h;
            let d1 = (mi - m0) / rk;
            // Solve [[1, 1], [rk, 1]]·rho = b.
            let h_phi_k1 = h_phi_1 / hh - 1.0;
            let h_phi_k2 = h_phi_k1 / hh - 0.5;
            let (b1, b2) = (h_phi_k1 / b_h, h_phi_k2 * 2.0 / b_h);
            let det = 1.0 - rk;
            let rho0 = (b1 - b2) / det;
            let rho1 = (b2 - rk * b1) / det;
            d1 * rho0 + d1_t * rho1
        };
        x_t_ - correction * (alpha_t * b_h)
    }

    /// UniP (bh2): predicts the sample at sigma_{i+1} from `sample` at sigma_i.
    fn predictor(&self, sample: &Tensor, order: usize) -> Tensor {
        let i = self.index;
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let m0 = self.history.last().expect("predictor runs after a model output");
        let x_t_ = sample * (sigma_t / sigma_s0) - m0 * (alpha_t * h_phi_1);
        if order == 1 {
            return x_t_;
        }
        let mi = &self.history[self.history.len() - 2];
        let rk = (lambda(self.sigmas[i - 1]) - lambda_s0) / h;
        let d1 = (mi - m0) / rk;
        x_t_ - d1 * (0.5 * alpha_t * b_h) // rhos_p = [0.5] for order 2
    }
}

impl Scheduler for UniPcScheduler {
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
        let n = self.timesteps.len();
        if self.index >= n {
            return Err(Error::SchedulerFinished(n));
        }
        let sigma = self.sigmas[self.index];
        let x0 = sample - model_output * sigma; // flow_prediction: x0 = x − sigma·v
        let sample = match (&self.last_sample, self.index > 0) {
            (Some(last), true) => self.corrector(&x0, last),
            _ => sample.shallow_clone(),
        };
        let order = self.config.solver_order;
        if self.history.len() == order {
            drop(self.history.remove(0));
        }
        self.history.push(x0);
        let this_order =
            if self.config.lower_order_final { order.min(n - self.index) } else { order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample, self.this_order).to_kind(sample.kind());
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Ok(prev)
    }
}

//! x2v-dit: the DiT stage. Receives a job's Phase1 tensors by job id, draws the initial noise as
//! diffusers' Wan pipelines do (CPU generator seeded with the job seed), runs the sampling loop
//! with a progress report and a cancellation check at every step, and sends the final latents.
//!
//! Only the transformer is loaded: the encoders and the VAE stay on disk.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use tch::{Device, Kind};
use x2v_core::JobErrorCode;
use x2v_models::schedulers::{FlowMatchEulerConfig, UniPcConfig};
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, Phase1, SchedulerChoice, denoise, load_transformer,
};
use x2v_models::wan::transformer::WanTransformer3DModel;
use x2v_queue::{JobRecord, Stage};
use x2v_stage::StageConfig;
use x2v_stage::config::Scheduler;
use x2v_stage::exchange::Inputs;
use x2v_stage::runner::{Finished, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;
use x2v_transfer::Payload;

/// Which sampler the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sampler {
    UniPc,
    Euler,
}

/// The DiT stage of one served model.
pub struct DitRunner {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    sampler: Sampler,
}

impl DitRunner {
    /// Checks the config; loads nothing yet (loading happens on the device thread).
    pub fn new(config: &StageConfig) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let sampler = match config.scheduler {
            Scheduler::Unipc => Sampler::UniPc,
            Scheduler::Euler => Sampler::Euler,
        };
        if config.model_dir.is_empty() {
            return Err("model_dir must name the model directory this DiT loads".into());
        }
        Ok(DitRunner {
            model: config.model.clone(),
            model_dir: config.model_dir.clone().into(),
            device,
            kind,
            sampler,
        })
    }
}

impl StageRunner for DitRunner {
    type Model = WanTransformer3DModel;
    type Output = Vec<(String, x2v_transfer::Dtype, Vec<u64>, bytes::Bytes)>;

    fn stage(&self) -> Stage {
        Stage::Dit
    }

    fn load(&self) -> Result<(WanTransformer3DModel, Vec<LoadedModel>), StageError> {
        let dit = load_transformer(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let loaded = LoadedModel {
            name: self.model.clone(),
            components: vec!["transformer".into()],
            device: format!("{:?}", self.device),
            dtype: format!("{:?}", self.kind),
            parameter_bytes: dit.parameter_bytes(),
        };
        Ok((dit, vec![loaded]))
    }

    fn run(
        &self,
        dit: &mut WanTransformer3DModel,
        job: &JobRecord,
        inputs: Option<Inputs>,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Self::Output, StageError> {
        let spec = &job.spec;
        let geometry = Geometry {
            frames: i64::from(spec.num_frames),
            height: i64::from(spec.size.height),
            width: i64::from(spec.size.width),
        };
        let inputs = inputs
            .ok_or_else(|| StageError::new(JobErrorCode::InternalError, "no Phase1 inputs"))?;
        let phase1 = Phase1::from_parts(geometry, inputs.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(inputs);
        let shift = f64::from(spec.shift);
        let settings = DenoiseSettings {
            steps: spec.num_inference_steps as usize,
            guidance_scale: f64::from(spec.guidance_scale),
            seed: spec.seed,
            scheduler: match self.sampler {
                Sampler::UniPc => SchedulerChoice::UniPc(UniPcConfig::wan(shift)),
                Sampler::Euler => SchedulerChoice::Euler(FlowMatchEulerConfig {
                    shift,
                    num_train_timesteps: 1000,
                }),
            },
            batch_cfg: true,
        };
        let progress = &mut *ctx.progress;
        let cancelled = ctx.cancelled;
        let phase2 = denoise(
            dit,
            &phase1,
            &settings,
            |p| progress(p.step as u32, p.total as u32),
            cancelled,
        )
        .map_err(|e| match e {
            x2v_models::Error::Cancelled { .. } => StageError::cancelled(),
            e => StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e),
        })?;
        phase2.to_parts().map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))
    }

    fn finish(&self, _: &JobRecord, parts: Self::Output) -> Result<Finished, StageError> {
        let payload = Payload::new(parts)
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        Ok(Finished::Payload(payload))
    }
}

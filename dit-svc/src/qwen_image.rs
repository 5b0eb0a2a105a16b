//! The Qwen-Image DiT stage: rebuilds Phase1 from the encoder's payload (prompt embeddings and,
//! for edits, one latent per input image), draws the initial noise as diffusers' Qwen-Image
//! pipelines do (CPU generator seeded with the job seed), denoises with flow-match Euler on the
//! dynamically shifted sigmas of the model's `scheduler/scheduler_config.json`, and sends the
//! final latents as Phase2.

use std::path::PathBuf;

use tch::{Device, Kind};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, ImageGeometry, ModelDir, Phase1, denoise, load_transformer,
};
use x2v_models::qwen_image::transformer::QwenImageTransformer;
use x2v_models::schedulers::FlowMatchDynamicConfig;
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The Qwen-Image DiT stage of one served model.
pub struct Dit {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    /// The model's scheduler settings, read once at start-up.
    scheduler: FlowMatchDynamicConfig,
}

impl Dit {
    /// Reads the scheduler config of the model directory; the `scheduler` setting of the stage
    /// config does not apply (Qwen-Image samples with its own flow-match Euler schedule).
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let dir = ModelDir::open(&model_dir).map_err(|e| e.to_string())?;
        let path = dir.scheduler_config().map_err(|e| e.to_string())?;
        let scheduler = FlowMatchDynamicConfig::from_file(&path).map_err(|e| e.to_string())?;
        Ok(Dit { model: config.model.clone(), model_dir, device, kind, scheduler })
    }

    pub fn load(&self) -> Result<(QwenImageTransformer, Vec<LoadedModel>), StageError> {
        let dit = load_transformer(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let loaded = LoadedModel::new(
            &self.model,
            &["transformer"],
            &self.device,
            &self.kind,
            x2v_models::weights::parameter_bytes(dit.var_store()),
        );
        Ok((dit, vec![loaded]))
    }

    pub fn run(
        &self,
        dit: &mut QwenImageTransformer,
        job: &JobRecord,
        mut inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let payload = inputs.take_payload("Phase1")?;
        let phase1 = Phase1::from_parts(geometry(job), payload.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(payload);
        let settings = self.settings(job);
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

    /// The sampling settings `job` asks for (its guidance scale is the true-CFG scale).
    fn settings(&self, job: &JobRecord) -> DenoiseSettings {
        let spec = &job.spec;
        DenoiseSettings {
            steps: spec.num_inference_steps as usize,
            true_cfg_scale: f64::from(spec.guidance_scale),
            seed: spec.seed,
            scheduler: self.scheduler.clone(),
        }
    }
}

/// The output size of `job` as the encoder stage computed it (each side floored to 16 pixels).
pub fn geometry(job: &JobRecord) -> ImageGeometry {
    let JobGeometry { height, width, .. } = JobGeometry::of(job);
    ImageGeometry::floored(width, height)
}

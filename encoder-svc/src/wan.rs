//! The Wan encoder stage: UMT5 for the prompt and negative prompt and, for image-to-video, the VAE
//! encoder (and for Wan2.1 CLIP) for the uploaded first frame; sends the Phase1 tensors. The
//! transformer and the VAE decoder stay on disk.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::wan::pipeline::{Geometry, Task, WanEncoder};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The upload an image-to-video job starts from.
const FIRST_FRAME: &str = "input_reference";

/// The Wan encoder stage of one served model.
pub struct Encoder {
    model: String,
    model_dir: PathBuf,
    task: Task,
    device: Device,
    kind: Kind,
}

impl Encoder {
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let task = if config.tasks.contains(&x2v_queue::Task::I2v) { Task::I2v } else { Task::T2v };
        Ok(Encoder { model: config.model.clone(), model_dir, task, device, kind })
    }

    pub fn upload_roles(&self) -> &'static [&'static str] {
        match self.task {
            Task::I2v => &[FIRST_FRAME],
            Task::T2v => &[],
        }
    }

    pub fn load(&self) -> Result<(WanEncoder, Vec<LoadedModel>), StageError> {
        let enc = WanEncoder::load(&self.model_dir, self.task, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let loaded = LoadedModel::new(
            &self.model,
            &enc.components(),
            &self.device,
            &self.kind,
            enc.parameter_bytes(),
        );
        Ok((enc, vec![loaded]))
    }

    pub fn run(
        &self,
        enc: &mut WanEncoder,
        job: &JobRecord,
        inputs: &JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let spec = &job.spec;
        let image = match self.task {
            Task::I2v => Some(first_frame(inputs)?),
            Task::T2v => None,
        };
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let phase1 = enc
            .encode(
                &spec.prompt,
                Some(spec.negative_prompt.as_deref().unwrap_or("")),
                image.as_ref(),
                geometry(job),
                f64::from(spec.guidance_scale),
            )
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        let parts = phase1
            .to_parts()
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        (ctx.progress)(1, 1);
        Ok(parts)
    }
}

/// The job's output geometry in the Wan pipeline's terms.
fn geometry(job: &JobRecord) -> Geometry {
    let JobGeometry { frames, height, width } = JobGeometry::of(job);
    Geometry { frames, height, width }
}

/// The uploaded first frame of an image-to-video job as RGB `uint8 [H, W, 3]`.
fn first_frame(inputs: &JobInputs) -> Result<Tensor, StageError> {
    let upload = inputs.upload(FIRST_FRAME).ok_or_else(|| {
        StageError::new(
            JobErrorCode::InvalidRequest,
            "image-to-video needs an `input_reference` image",
        )
    })?;
    let img = image::load_from_memory(&upload.bytes)
        .map_err(|e| {
            StageError::new(
                JobErrorCode::InvalidImage,
                format!("`input_reference` is not a readable image: {e}"),
            )
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw()).view([i64::from(h), i64::from(w), 3]))
}

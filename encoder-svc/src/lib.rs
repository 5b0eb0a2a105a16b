//! x2v-encoder: the encoder stage. Tokenizes and encodes the prompt and negative prompt with UMT5
//! and, for image-to-video, the uploaded first frame with CLIP and the VAE encoder; sends the
//! Phase1 tensors (exact sizes, the model's dtype) to whichever DiT rank takes the job.
//!
//! Only the encoders are loaded: the transformer and the VAE decoder stay on disk.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_models::wan::pipeline::{Geometry, Phase1, Task, WanEncoder};
use x2v_queue::storage::Storage;
use x2v_queue::{JobRecord, Stage};
use x2v_stage::StageConfig;
use x2v_stage::exchange::Inputs;
use x2v_stage::runner::{Finished, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;
use x2v_transfer::Payload;

/// The encoder stage of one served model.
pub struct EncoderRunner {
    model: String,
    model_dir: PathBuf,
    task: Task,
    device: Device,
    kind: Kind,
    storage: Storage,
    rt: tokio::runtime::Handle,
}

impl EncoderRunner {
    /// Checks the config; loads nothing yet (loading happens on the device thread).
    pub fn new(config: &StageConfig, storage: Storage) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let task = if config.tasks.contains(&x2v_queue::Task::I2v) { Task::I2v } else { Task::T2v };
        if config.model_dir.is_empty() {
            return Err("model_dir must name the model directory this encoder loads".into());
        }
        Ok(EncoderRunner {
            model: config.model.clone(),
            model_dir: config.model_dir.clone().into(),
            task,
            device,
            kind,
            storage,
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// The uploaded first frame of an image-to-video job as RGB `uint8 [H, W, 3]`.
    fn first_frame(&self, job: &JobRecord) -> Result<Tensor, StageError> {
        let input =
            job.spec.inputs.iter().find(|i| i.role == "input_reference").ok_or_else(|| {
                StageError::new(
                    JobErrorCode::InvalidRequest,
                    "image-to-video needs an `input_reference` image",
                )
            })?;
        let bytes = self.rt.block_on(self.storage.get(&input.key)).map_err(|e| {
            StageError::new(
                JobErrorCode::InputUnavailable,
                format!("reading input {}: {e}", input.key),
            )
        })?;
        let img = image::load_from_memory(&bytes)
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
}

/// A job's output geometry.
fn geometry(job: &JobRecord) -> Geometry {
    Geometry {
        frames: i64::from(job.spec.num_frames),
        height: i64::from(job.spec.size.height),
        width: i64::from(job.spec.size.width),
    }
}

impl StageRunner for EncoderRunner {
    type Model = WanEncoder;
    type Output = Vec<(String, x2v_transfer::Dtype, Vec<u64>, bytes::Bytes)>;

    fn stage(&self) -> Stage {
        Stage::Encoder
    }

    fn load(&self) -> Result<(WanEncoder, Vec<LoadedModel>), StageError> {
        let enc = WanEncoder::load(&self.model_dir, self.task, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let mut components = vec!["tokenizer".to_string(), "text_encoder".to_string()];
        if self.task == Task::I2v {
            components.extend(["image_encoder".to_string(), "vae.encoder".to_string()]);
        }
        let loaded = LoadedModel {
            name: self.model.clone(),
            components,
            device: format!("{:?}", self.device),
            dtype: format!("{:?}", self.kind),
            parameter_bytes: enc.parameter_bytes(),
        };
        Ok((enc, vec![loaded]))
    }

    fn run(
        &self,
        enc: &mut WanEncoder,
        job: &JobRecord,
        _inputs: Option<Inputs>,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Self::Output, StageError> {
        let spec = &job.spec;
        let image = match self.task {
            Task::I2v => Some(self.first_frame(job)?),
            Task::T2v => None,
        };
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let phase1: Phase1 = enc
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

    fn finish(&self, _: &JobRecord, parts: Self::Output) -> Result<Finished, StageError> {
        let payload = Payload::new(parts)
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        Ok(Finished::Payload(payload))
    }
}

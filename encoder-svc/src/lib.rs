//! x2v-encoder: the encoder stage. Encodes a job's prompt (and, where the task has one, its
//! uploaded images) into the payload the DiT stage denoises from, and sends it (exact sizes, the
//! model's dtype) to whichever DiT rank takes the job. Only the encoders are loaded.
//!
//! One runner per model family ([`wan`], [`qwen_image`]); [`EncoderRunner`] picks it from the model directory.
#![forbid(unsafe_code)]

pub mod qwen_image;
pub mod wan;

use x2v_core::JobErrorCode;
use x2v_models::qwen_image::pipeline::QwenEncoder;
use x2v_models::wan::pipeline::WanEncoder;
use x2v_queue::{JobRecord, Stage};
use x2v_stage::StageConfig;
use x2v_stage::family::ModelFamily;
use x2v_stage::job::JobInputs;
use x2v_stage::runner::{Finished, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The encoder stage of one served model, for its family.
pub enum EncoderRunner {
    Wan(wan::Encoder),
    QwenImage(qwen_image::Encoder),
}

/// The loaded encoders of one family (boxed: the two differ much in size).
pub enum EncoderModel {
    Wan(Box<WanEncoder>),
    QwenImage(Box<QwenEncoder>),
}

impl EncoderRunner {
    /// Checks the config and tells the family; loads nothing yet (that happens on the device
    /// thread).
    pub fn new(config: &StageConfig) -> Result<Self, String> {
        match ModelFamily::of(config, "encoder")? {
            (ModelFamily::Wan, dir) => Ok(EncoderRunner::Wan(wan::Encoder::new(config, dir)?)),
            (ModelFamily::QwenImage, dir) => {
                Ok(EncoderRunner::QwenImage(qwen_image::Encoder::new(config, dir)?))
            }
        }
    }
}

impl StageRunner for EncoderRunner {
    type Model = EncoderModel;
    type Output = Vec<TensorPart>;

    fn stage(&self) -> Stage {
        Stage::Encoder
    }

    fn upload_roles(&self) -> &'static [&'static str] {
        match self {
            EncoderRunner::Wan(r) => r.upload_roles(),
            EncoderRunner::QwenImage(r) => r.upload_roles(),
        }
    }

    fn prepare(&self, job: &JobRecord, inputs: &mut JobInputs) -> Result<(), StageError> {
        match self {
            EncoderRunner::Wan(r) => r.prepare(job, inputs),
            EncoderRunner::QwenImage(_) => Ok(()),
        }
    }

    fn load(&self) -> Result<(EncoderModel, Vec<LoadedModel>), StageError> {
        match self {
            EncoderRunner::Wan(r) => {
                r.load().map(|(m, loaded)| (EncoderModel::Wan(Box::new(m)), loaded))
            }
            EncoderRunner::QwenImage(r) => {
                r.load().map(|(m, loaded)| (EncoderModel::QwenImage(Box::new(m)), loaded))
            }
        }
    }

    fn run(
        &self,
        model: &mut EncoderModel,
        job: &JobRecord,
        inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let out = match (self, model) {
            (EncoderRunner::Wan(r), EncoderModel::Wan(m)) => r.run(m, job, &inputs, ctx),
            (EncoderRunner::QwenImage(r), EncoderModel::QwenImage(m)) => {
                r.run(m, job, &inputs, ctx)
            }
            _ => Err(StageError::new(
                JobErrorCode::InternalError,
                "the loaded model is of another family than the runner",
            )),
        };
        // The job's activations go back to the kernel, not into the allocator's free lists.
        x2v_models::weights::release_free_heap();
        out
    }

    fn finish(&self, _: &JobRecord, parts: Vec<TensorPart>) -> Result<Finished, StageError> {
        Finished::payload(parts)
    }
}

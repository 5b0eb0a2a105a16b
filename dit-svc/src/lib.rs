//! x2v-dit: the DiT stage. Receives a job's encoder payload by job id, runs the family's sampling
//! loop with a progress report and a cancellation check at every step, and sends the final
//! latents. Only the transformer is loaded.
//!
//! One runner per model family ([`wan`], [`qwen_image`]); [`DitRunner`] picks it from the model directory.
#![forbid(unsafe_code)]

pub mod qwen_image;
pub mod wan;

use x2v_core::JobErrorCode;
use x2v_queue::{JobRecord, Stage};
use x2v_stage::StageConfig;
use x2v_stage::family::ModelFamily;
use x2v_stage::job::JobInputs;
use x2v_stage::runner::{Artifact, Finished, PreviewImage, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The DiT stage of one served model, for its family.
pub enum DitRunner {
    Wan(wan::Dit),
    QwenImage(qwen_image::Dit),
}

/// The loaded transformer of one family. One value per process, kept on the device thread, so the
/// size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum DitModel {
    Wan(wan::WanModel),
    QwenImage(qwen_image::QwenDit),
}

/// A sampling loop's error as the job's: cancellation stops the job, a bad input is the client's
/// fault (`invalid_request`), anything else is internal.
fn denoise_error(e: x2v_models::Error) -> StageError {
    match e {
        x2v_models::Error::Cancelled { .. } => StageError::cancelled(),
        e => StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e),
    }
}

impl DitRunner {
    /// Checks the config and tells the family; loads nothing yet (that happens on the device
    /// thread).
    pub fn new(config: &StageConfig) -> Result<Self, String> {
        match ModelFamily::of(config, "DiT")? {
            (ModelFamily::Wan, dir) => Ok(DitRunner::Wan(wan::Dit::new(config, dir)?)),
            (ModelFamily::QwenImage, dir) => {
                Ok(DitRunner::QwenImage(qwen_image::Dit::new(config, dir)?))
            }
        }
    }
}

impl StageRunner for DitRunner {
    type Model = DitModel;
    type Output = Vec<TensorPart>;

    fn stage(&self) -> Stage {
        Stage::Dit
    }

    fn load(&self) -> Result<(DitModel, Vec<LoadedModel>), StageError> {
        match self {
            DitRunner::Wan(r) => r.load().map(|(m, loaded)| (DitModel::Wan(m), loaded)),
            DitRunner::QwenImage(r) => r.load().map(|(m, loaded)| (DitModel::QwenImage(m), loaded)),
        }
    }

    fn run(
        &self,
        model: &mut DitModel,
        job: &JobRecord,
        inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let out = match (self, model) {
            (DitRunner::Wan(r), DitModel::Wan(m)) => r.run(m, job, inputs, ctx),
            (DitRunner::QwenImage(r), DitModel::QwenImage(m)) => r.run(m, job, inputs, ctx),
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

    fn encode_preview(&self, job: &JobRecord, p: PreviewImage) -> Result<Artifact, StageError> {
        qwen_image::Dit::encode_preview(job, p)
    }
}

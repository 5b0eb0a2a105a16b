//! What a stage service supplies to the runtime: how to load its model (on the device thread), run
//! one job on it, and turn the result into a payload for the next stage or stored files.

use bytes::Bytes;
use x2v_core::metrics::Metrics;
use x2v_core::{ErrorKind, JobErrorCode};
use x2v_queue::{JobError, JobRecord, Stage};
use x2v_transfer::{Payload, TensorPart};

use crate::job::JobInputs;
use crate::state::LoadedModel;

/// Why a stage did not produce its output; recorded as the job's `error`, whose `kind` decides how
/// the gateway answers the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StageError {
    pub kind: ErrorKind,
    pub code: JobErrorCode,
    pub message: String,
}

impl StageError {
    /// A failure of the kind `code` implies.
    pub fn new(code: JobErrorCode, message: impl Into<String>) -> Self {
        StageError { kind: code.kind(), code, message: message.into() }
    }

    /// An internal failure (`internal_error`).
    pub fn internal(e: impl std::fmt::Display) -> Self {
        StageError::new(JobErrorCode::InternalError, e.to_string())
    }

    /// The run stopped at a step boundary because the job was cancelled (or the worker drains).
    pub fn cancelled() -> Self {
        StageError::new(JobErrorCode::Cancelled, "stopped at a step boundary")
    }

    /// A model error: the client's fault (`code_for_input`) when `kind` says invalid request,
    /// else `internal_error`.
    pub fn from_kind(
        kind: ErrorKind,
        code_for_input: JobErrorCode,
        e: impl std::fmt::Display,
    ) -> Self {
        match kind {
            ErrorKind::InvalidRequest => {
                StageError { kind, code: code_for_input, message: e.to_string() }
            }
            _ => StageError::internal(e),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.code == JobErrorCode::Cancelled
    }

    /// The record the queue stores for the failed job.
    pub fn to_job_error(&self) -> JobError {
        JobError { kind: self.kind, code: self.code, message: self.message.clone() }
    }
}

/// Hooks the stage calls while it runs on the device thread.
pub struct RunCtx<'a> {
    /// Reports step `step` of `total`. Never waits for the queue: the newest step is reported
    /// from async code, which trips [`RunCtx::cancelled`] when the queue says the job is cancelled.
    pub progress: &'a mut dyn FnMut(u32, u32),
    /// True once the job is cancelled or the worker must give it back; check between steps.
    pub cancelled: &'a dyn Fn() -> bool,
    /// Hands over a look at an output being made (an image being denoised). Never waits: the
    /// runtime encodes it with [`StageRunner::encode_preview`], stores it and records it in the
    /// job from async code, in the order given, before the stage completes.
    pub preview: &'a mut dyn FnMut(PreviewImage),
}

/// A preview of output image `image` (0-based), the `index`-th of that image, as RGB.
#[derive(Debug, Clone)]
pub struct PreviewImage {
    pub image: u32,
    pub index: u32,
    /// `uint8 [height, width, 3]`.
    pub rgb: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

pub use x2v_queue::{MAX_PREVIEWS, PREVIEW_VARIANT, preview_of};

impl PreviewImage {
    /// The output index the preview is recorded under ([`x2v_queue::preview_index`]).
    pub fn output_index(&self) -> u32 {
        x2v_queue::preview_index(self.image, self.index)
    }
}

/// A file a stage produced for the client (video, thumbnail, spritesheet, image).
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `video`, `thumbnail`, `spritesheet` or `image`.
    pub variant: String,
    pub index: u32,
    /// File extension without the dot (`mp4`, `webp`, `jpg`, `png`).
    pub extension: String,
    pub content_type: String,
    pub bytes: Bytes,
    /// The decoder backend that made it (recorded in the job's outputs).
    pub decoded_by: Option<String>,
}

impl Artifact {
    /// The first (`index` 0) file of `variant`.
    pub fn new(variant: &str, extension: &str, content_type: &str, bytes: Vec<u8>) -> Self {
        Artifact {
            variant: variant.into(),
            index: 0,
            extension: extension.into(),
            content_type: content_type.into(),
            bytes: Bytes::from(bytes),
            decoded_by: None,
        }
    }
}

/// A finished stage's result.
pub enum Finished {
    /// Named tensors for the next stage.
    Payload(Payload),
    /// Files to store; the job completes once they are stored.
    Artifacts(Vec<Artifact>),
}

impl Finished {
    /// A payload of `parts` for the next stage. Its chunked SHA-256 is computed while the next stage
    /// pulls it, on every core and overlapping the bytes moving, not before the first byte moves.
    pub fn payload(parts: Vec<TensorPart>) -> Result<Self, StageError> {
        Payload::deferred_parts(parts).map(Finished::Payload).map_err(StageError::internal)
    }
}

/// One stage's model work.
pub trait StageRunner: Send + Sync + 'static {
    /// The loaded model; built on, and never leaving, the device thread.
    type Model: 'static;
    /// What `run` hands to `finish` (tensors moved to the CPU, frames).
    type Output: Send + 'static;

    fn stage(&self) -> Stage;

    /// Registers the runner's own metric families in the service's registry (called once,
    /// before [`StageRunner::load`]).
    fn register_metrics(&self, metrics: &Metrics) {
        let _ = metrics;
    }

    /// Loads the model (called once, on the device thread) and describes what was loaded.
    fn load(&self) -> Result<(Self::Model, Vec<LoadedModel>), StageError>;

    /// The roles of the job's uploads (`spec.inputs`) that `run` reads; the runtime fetches them
    /// from storage while receiving, so that the device thread never waits on storage.
    fn upload_roles(&self) -> &'static [&'static str] {
        &[]
    }

    /// CPU work on a job's inputs before it reaches the device thread (decoding an uploaded
    /// video, say), on a blocking thread; what it makes goes into [`JobInputs::prepared`]. The
    /// default does nothing.
    fn prepare(&self, job: &JobRecord, inputs: &mut JobInputs) -> Result<(), StageError> {
        let _ = (job, inputs);
        Ok(())
    }

    /// Runs one job on the device thread. `inputs` holds the previous stage's payload (none for
    /// the encoder stage), the uploads of [`StageRunner::upload_roles`] and what
    /// [`StageRunner::prepare`] made of them.
    fn run(
        &self,
        model: &mut Self::Model,
        job: &JobRecord,
        inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Self::Output, StageError>;

    /// Serialises or encodes `out` on a blocking thread, off the device thread and the executor.
    fn finish(&self, job: &JobRecord, out: Self::Output) -> Result<Finished, StageError>;

    /// Encodes a preview that `run` handed over (on a blocking thread) as the file the client
    /// gets; the artifact's `variant` and `index` are set by the runtime. Runners that hand
    /// over no previews keep this default, which refuses.
    fn encode_preview(
        &self,
        job: &JobRecord,
        preview: PreviewImage,
    ) -> Result<Artifact, StageError> {
        let _ = (job, preview);
        Err(StageError::internal(format!("the {} stage makes no previews", self.stage())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_errors_are_the_clients_fault_only_when_their_kind_says_so() {
        let bad =
            StageError::from_kind(ErrorKind::InvalidRequest, JobErrorCode::InvalidRequest, "x");
        assert_eq!((bad.kind, bad.code), (ErrorKind::InvalidRequest, JobErrorCode::InvalidRequest));
        let oom = StageError::from_kind(ErrorKind::Overloaded, JobErrorCode::InvalidRequest, "x");
        assert_eq!((oom.kind, oom.code), (ErrorKind::Internal, JobErrorCode::InternalError));
        let rec = StageError::new(JobErrorCode::InvalidImage, "not a PNG").to_job_error();
        assert_eq!(rec, JobError::new(JobErrorCode::InvalidImage, "not a PNG"));
        assert!(StageError::cancelled().is_cancelled());
    }
}

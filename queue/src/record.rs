//! The stored job record, its status machine, outputs and the events published as it changes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use x2v_core::{ErrorKind, JobErrorCode, JobId};

use crate::spec::{JobSpec, Ranks, Resource, Stage};

/// Where a job is in its life. `Completed`, `Failed` and `Cancelled` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a stage worker to claim it (only until the first stage is claimed).
    Queued,
    /// Some stage has claimed it at least once.
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::InProgress, Self::Completed, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// Why a job failed, as reported by the stage that failed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredJobError")]
pub struct JobError {
    /// Decides how the gateway renders the failure (HTTP status, OpenAI error `type`).
    pub kind: ErrorKind,
    pub code: JobErrorCode,
    pub message: String,
}

impl JobError {
    /// A failure of the kind `code` implies.
    pub fn new(code: JobErrorCode, message: impl Into<String>) -> Self {
        JobError { kind: code.kind(), code, message: message.into() }
    }

    /// A failure read back from storage. Records written before `kind` was stored derive it from
    /// the code; a code this build does not know is an internal error.
    pub fn stored(code: &str, kind: Option<&str>, message: String) -> Self {
        let code = JobErrorCode::parse(code).unwrap_or(JobErrorCode::InternalError);
        let kind = kind
            .and_then(|k| ErrorKind::ALL.into_iter().find(|known| known.as_str() == k))
            .unwrap_or_else(|| code.kind());
        JobError { kind, code, message }
    }
}

/// The serialised form: `kind` is optional so that older records still parse.
#[derive(Deserialize)]
struct StoredJobError {
    code: String,
    #[serde(default)]
    kind: Option<String>,
    message: String,
}

impl From<StoredJobError> for JobError {
    fn from(s: StoredJobError) -> Self {
        JobError::stored(&s.code, s.kind.as_deref(), s.message)
    }
}

/// One stored output of a finished job. Bytes live in output storage under `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    /// `video`, `thumbnail`, `spritesheet`, or `image` (with `index` for `n > 1`).
    pub variant: String,
    pub index: u32,
    pub key: String,
    pub content_type: String,
    pub size: u64,
    /// What made the file, where it matters to an operator: the decoder's backend (`tensorrt`,
    /// `onnx_cuda`, `onnx_cpu`, `torch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded_by: Option<String>,
}

/// The full state of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub resource: Resource,
    pub spec: JobSpec,
    pub status: JobStatus,
    /// The stage the job is waiting for or running in; `None` once terminal.
    pub stage: Option<Stage>,
    /// Overall progress in percent (stage-weighted, from per-step reports).
    pub progress: u8,
    pub step: u32,
    pub total_steps: u32,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub error: Option<JobError>,
    pub outputs: Vec<OutputRef>,
    /// Assigned engine ranks (`None`: any live worker of the stage).
    pub ranks: Ranks,
    /// W3C trace context of the request that created the job.
    pub trace: HashMap<String, String>,
    /// Stage claims so far, including redeliveries after expired leases.
    pub attempts: u32,
    pub cancel_requested: bool,
}

impl JobRecord {
    /// The prefixed public id, e.g. `video_0190...`.
    pub fn public_id(&self) -> String {
        self.id.with_prefix(self.resource.as_str())
    }

    /// The output for `variant` (first index).
    pub fn output(&self, variant: &str, index: u32) -> Option<&OutputRef> {
        self.outputs.iter().find(|o| o.variant == variant && o.index == index)
    }
}

/// The output variant of previews: images recorded while they are being made.
pub const PREVIEW_VARIANT: &str = "partial_image";
/// Previews per image at most (the OpenAI API's `partial_images` is 0 to 3).
pub const MAX_PREVIEWS: u32 = 3;

/// The output index of preview `index` of image `image`: `image · MAX_PREVIEWS + index`.
pub fn preview_index(image: u32, index: u32) -> u32 {
    image * MAX_PREVIEWS + index
}

/// Which image and which of its previews the output index of a preview names.
pub fn preview_of(output_index: u32) -> (u32, u32) {
    (output_index / MAX_PREVIEWS, output_index % MAX_PREVIEWS)
}

/// A change to a job, published to subscribers (`GET /v1/videos/{id}/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// `status` on a status or stage change, `progress` on a step report, `partial` when a
    /// stage recorded a file before finishing (an image being denoised).
    #[serde(rename = "type")]
    pub kind: String,
    pub status: JobStatus,
    pub stage: Option<Stage>,
    pub progress: u8,
    pub step: u32,
    pub total_steps: u32,
}

impl JobEvent {
    pub fn of(kind: &str, rec: &JobRecord) -> Self {
        JobEvent {
            kind: kind.to_owned(),
            status: rec.status,
            stage: rec.stage,
            progress: rec.progress,
            step: rec.step,
            total_steps: rec.total_steps,
        }
    }
}

/// Overall percent for `step` of `total` inside `stage`'s span.
pub fn stage_progress(stage: Stage, step: u32, total: u32) -> u8 {
    let (lo, hi) = stage.progress_span();
    let frac = if total == 0 { 0.0 } else { f64::from(step.min(total)) / f64::from(total) };
    (f64::from(lo) + frac * f64::from(hi - lo)).floor() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_errors_keep_the_code_string_and_add_the_kind() {
        let e = JobError::new(JobErrorCode::InvalidImage, "not a PNG");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "invalid_request", "code": "invalid_image", "message": "not a PNG"})
        );
        assert_eq!(serde_json::from_value::<JobError>(v).unwrap(), e);
    }

    #[test]
    fn records_without_a_kind_derive_it_from_the_code() {
        let old = serde_json::json!({"code": "invalid_request", "message": "m"});
        let e: JobError = serde_json::from_value(old).unwrap();
        assert_eq!((e.kind, e.code), (ErrorKind::InvalidRequest, JobErrorCode::InvalidRequest));
        let unknown = serde_json::json!({"code": "out_of_memory", "message": "m"});
        let e: JobError = serde_json::from_value(unknown).unwrap();
        assert_eq!((e.kind, e.code), (ErrorKind::Internal, JobErrorCode::InternalError));
        let stored = JobError::stored("storage_failed", Some("overloaded"), "m".into());
        assert_eq!(
            (stored.kind, stored.code),
            (ErrorKind::Overloaded, JobErrorCode::StorageFailed)
        );
    }
}

//! What a runner reads from a claimed job besides its spec: the output geometry, and the inputs the
//! runtime gathered while receiving (the previous stage's payload, the client's uploads).

use bytes::Bytes;
use x2v_core::JobErrorCode;
use x2v_queue::JobRecord;

use crate::exchange::Inputs;
use crate::runner::StageError;

/// The output a job asks for, in pixels (one frame for an image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobGeometry {
    pub frames: i64,
    pub height: i64,
    pub width: i64,
}

impl JobGeometry {
    pub fn of(job: &JobRecord) -> Self {
        let spec = &job.spec;
        JobGeometry {
            frames: i64::from(spec.num_frames),
            height: i64::from(spec.size.height),
            width: i64::from(spec.size.width),
        }
    }
}

/// An uploaded file (reference image, edit image, mask), read from storage while receiving.
#[derive(Debug, Clone)]
pub struct Upload {
    /// `input_reference`, `image`, `mask`.
    pub role: String,
    /// Storage key.
    pub key: String,
    pub content_type: String,
    pub bytes: Bytes,
}

/// Everything a stage's `run` gets besides the job record, fetched before the device is asked.
#[derive(Default)]
pub struct JobInputs {
    /// The previous stage's payload (none for the first stage).
    pub payload: Option<Inputs>,
    /// The uploads of the roles the runner asked for that the job has, in job order.
    pub uploads: Vec<Upload>,
}

impl JobInputs {
    /// The first upload of `role`.
    pub fn upload(&self, role: &str) -> Option<&Upload> {
        self.uploads.iter().find(|u| u.role == role)
    }

    /// Takes the previous stage's payload (`what` names it in the error when it is absent).
    pub fn take_payload(&mut self, what: &str) -> Result<Inputs, StageError> {
        self.payload.take().ok_or_else(|| {
            StageError::new(JobErrorCode::InternalError, format!("no {what} inputs"))
        })
    }
}

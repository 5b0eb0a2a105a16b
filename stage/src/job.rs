//! What a runner reads from a claimed job besides its spec: the output geometry, and the inputs the
//! runtime gathered while receiving (the previous stage's payload, the client's uploads, and what
//! the runner's `prepare` made of them off the device thread).

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

/// An uploaded file (reference image, edit image, mask, input video), read from storage while
/// receiving.
#[derive(Debug, Clone)]
pub struct Upload {
    /// `input_reference`, `image`, `mask`, `video`.
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
    /// What the runner's `prepare` made of them off the device thread (decoded frames, say).
    pub prepared: Option<Box<dyn std::any::Any + Send>>,
}

impl JobInputs {
    /// The first upload of `role`.
    pub fn upload(&self, role: &str) -> Option<&Upload> {
        self.uploads.iter().find(|u| u.role == role)
    }

    /// Takes what `prepare` made, as the type it made.
    pub fn take_prepared<T: 'static>(&mut self) -> Option<T> {
        let boxed = self.prepared.take()?;
        match boxed.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(other) => {
                self.prepared = Some(other);
                None
            }
        }
    }

    /// Takes the previous stage's payload (`what` names it in the error when it is absent).
    pub fn take_payload(&mut self, what: &str) -> Result<Inputs, StageError> {
        self.payload.take().ok_or_else(|| {
            StageError::new(JobErrorCode::InternalError, format!("no {what} inputs"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_data_is_taken_as_its_type_only() {
        let mut inputs = JobInputs { prepared: Some(Box::new(7u32)), ..JobInputs::default() };
        assert_eq!(inputs.take_prepared::<String>(), None);
        assert!(inputs.prepared.is_some(), "a wrong type leaves it in place");
        assert_eq!(inputs.take_prepared::<u32>(), Some(7));
        assert_eq!(inputs.take_prepared::<u32>(), None);
    }
}

//! The Wan encoder stage: UMT5 for the prompt and negative prompt; for image-to-video the VAE
//! encoder (and for Wan2.1 CLIP) for the uploaded first frame (a Wan2.2 TI2V-5B worker set to i2v
//! serves text-only jobs as well); for video-to-video the VAE encoder
//! for the input video (decoded from its MP4 at the job's frame rate); sends the Phase1 tensors.
//! The transformer and the VAE decoder stay on disk.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_media::DecodedVideo;
use x2v_models::wan::pipeline::{Geometry, Task, WanEncoder};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The upload an image-to-video job starts from.
const FIRST_FRAME: &str = "input_reference";
/// The upload a video-to-video job edits.
const INPUT_VIDEO: &str = "video";

/// The Wan encoder stage of one served model.
pub struct Encoder {
    model: String,
    model_dir: PathBuf,
    task: Task,
    /// Whether this worker serves video-to-video (`v2v` in its tasks): it loads the VAE encoder.
    video_to_video: bool,
    device: Device,
    kind: Kind,
}

impl Encoder {
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let task = if config.tasks.contains(&x2v_queue::Task::I2v) { Task::I2v } else { Task::T2v };
        let video_to_video = config.tasks.contains(&x2v_queue::Task::V2v);
        if video_to_video && task == Task::I2v {
            return Err(
                "tasks: v2v runs on a text-to-video model; this worker is set to i2v".into()
            );
        }
        Ok(Encoder { model: config.model.clone(), model_dir, task, video_to_video, device, kind })
    }

    pub fn upload_roles(&self) -> &'static [&'static str] {
        match (self.task, self.video_to_video) {
            // A video extension starts from the last kept frame of its input video.
            (Task::I2v, _) => &[FIRST_FRAME, INPUT_VIDEO],
            (Task::T2v, true) => &[INPUT_VIDEO],
            (Task::T2v, false) => &[],
        }
    }

    pub fn load(&self) -> Result<(WanEncoder, Vec<LoadedModel>), StageError> {
        let enc = WanEncoder::load_with(
            &self.model_dir,
            self.task,
            self.video_to_video,
            self.device,
            self.kind,
        )
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

    /// Decodes the job's input video off the device thread: a video edit's frames at the job's
    /// fps, or an extension's last kept frame.
    pub fn prepare(&self, job: &JobRecord, inputs: &mut JobInputs) -> Result<(), StageError> {
        let spec = &job.spec;
        let decoded = match (self.task, spec.task, spec.extend_frames) {
            (Task::I2v, _, Some(kept)) => Some(last_kept_frame(inputs, spec.fps, kept)?),
            (Task::T2v, x2v_queue::Task::V2v, _) => Some(input_video(inputs, spec)?),
            _ => None,
        };
        inputs.prepared = decoded.map(|d| Box::new(d) as Box<dyn std::any::Any + Send>);
        Ok(())
    }

    pub fn run(
        &self,
        enc: &mut WanEncoder,
        job: &JobRecord,
        inputs: &JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let spec = &job.spec;
        let decoded = || {
            let video = inputs.prepared.as_ref().and_then(|p| p.downcast_ref::<DecodedVideo>());
            video.ok_or_else(|| StageError::internal("the job's video was not decoded"))
        };
        // A TI2V-5B worker serves text-to-video jobs too: those have no first frame.
        let image = match (self.task, spec.task, spec.extend_frames) {
            (Task::I2v, _, Some(_)) => Some(frames_tensor(decoded()?).squeeze_dim(0)),
            (Task::I2v, x2v_queue::Task::T2v, None) if enc.is_ti2v() => None,
            (Task::I2v, _, None) => Some(first_frame(inputs)?),
            (Task::T2v, _, _) => None,
        };
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let video = match spec.task {
            x2v_queue::Task::V2v => Some(frames_tensor(decoded()?)),
            _ => None,
        };
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let invalid =
            |e: x2v_models::Error| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e);
        let mut phase1 = enc
            .encode(
                &spec.prompt,
                Some(spec.negative_prompt.as_deref().unwrap_or("")),
                image.as_ref(),
                geometry(job),
                f64::from(spec.guidance_scale),
            )
            .map_err(invalid)?;
        if let Some(video) = video {
            phase1.video_latents = Some(enc.encode_video(&video, geometry(job)).map_err(invalid)?);
        }
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

/// The input video of a video-to-video job as RGB `uint8 [F, H, W, 3]`: its first `num_frames`
/// frames as shown at the job's frame rate (the gateway sized the job from the video's header).
fn input_video(inputs: &JobInputs, spec: &x2v_queue::JobSpec) -> Result<DecodedVideo, StageError> {
    let upload = inputs.upload(INPUT_VIDEO).ok_or_else(|| {
        StageError::new(JobErrorCode::InvalidRequest, "video-to-video needs a `video` input")
    })?;
    x2v_media::decode_mp4_exact(&upload.bytes, spec.fps, spec.num_frames as usize).map_err(|e| {
        StageError::new(JobErrorCode::InvalidVideo, format!("`video` cannot be decoded: {e}"))
    })
}

/// Decoded frames as RGB `uint8 [F, H, W, 3]`.
fn frames_tensor(v: &DecodedVideo) -> Tensor {
    Tensor::from_slice(&v.data).view([v.frames as i64, v.height as i64, v.width as i64, 3])
}

/// A video extension's first frame: the last of the `kept` frames of its input video at `fps`
/// (what the decoder stage puts before the generated frames), as a one-frame video.
fn last_kept_frame(inputs: &JobInputs, fps: u32, kept: u32) -> Result<DecodedVideo, StageError> {
    let upload = inputs.upload(INPUT_VIDEO).ok_or_else(|| {
        StageError::new(JobErrorCode::InvalidRequest, "a video extension needs a `video` input")
    })?;
    let index = (kept as usize).saturating_sub(1);
    x2v_media::decode_mp4_frame(&upload.bytes, fps, index).map_err(|e| {
        StageError::new(JobErrorCode::InvalidVideo, format!("`video` cannot be decoded: {e}"))
    })
}

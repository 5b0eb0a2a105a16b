//! The Wan decoder stage: rebuilds Phase2 from the DiT's payload and decodes the latents with the
//! Wan VAE decoder into `uint8` frames. A video extension's frames follow the kept frames of its
//! input video (decoded from the MP4 at the job's frame rate, resized to the job's size).

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::wan::pipeline::{Geometry, Phase2, WanDecoder, resize_frames};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::config::DtypeChoice;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;

use x2v_trt::{Backend, Fallback};

use crate::Decoded;
use crate::vae::VaeDecodes;

/// The upload a video extension continues.
const INPUT_VIDEO: &str = "video";

/// The Wan decoder stage of one served model.
pub struct Decoder {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    vae: VaeDecodes,
}

impl Decoder {
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let vae = &config.vae;
        if !vae.engines.is_empty()
            || matches!(
                vae.backend,
                x2v_trt::BackendChoice::Tensorrt | x2v_trt::BackendChoice::Onnx
            )
        {
            return Err(format!(
                "vae.engines / vae.backend: exported engines serve Qwen-Image's image decoder; the \
                 Wan video decoder runs on libtorch (leave vae.engines empty, vae.backend auto or \
                 torch); got engines `{}`, backend {:?}",
                vae.engines, vae.backend
            ));
        }
        Ok(Decoder {
            vae: VaeDecodes::torch("the Wan video decoder has no exported engine"),
            model: config.model.clone(),
            model_dir,
            device,
            // The VAE decodes in fp32 unless bf16 is asked for explicitly.
            kind: if config.dtype == DtypeChoice::Auto { Kind::Float } else { kind },
        })
    }

    pub fn register_metrics(&self, metrics: &x2v_core::metrics::Metrics) {
        self.vae.register_metrics(metrics);
    }

    pub fn load(&self) -> Result<(WanDecoder, Vec<LoadedModel>), StageError> {
        let dec = WanDecoder::load(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let loaded = LoadedModel::new(
            &self.model,
            &["vae.decoder"],
            &self.device,
            &self.kind,
            dec.parameter_bytes(),
        );
        Ok((dec, vec![loaded]))
    }

    /// A video extension's input video, whose kept frames come first.
    pub fn upload_roles(&self) -> &'static [&'static str] {
        &[INPUT_VIDEO]
    }

    /// Decodes a video extension's kept frames off the device thread.
    pub fn prepare(&self, job: &JobRecord, inputs: &mut JobInputs) -> Result<(), StageError> {
        let Some(kept) = job.spec.extend_frames else { return Ok(()) };
        let upload = inputs.upload(INPUT_VIDEO).ok_or_else(|| {
            StageError::new(JobErrorCode::InvalidRequest, "a video extension needs a `video` input")
        })?;
        let v = x2v_media::decode_mp4_exact(&upload.bytes, job.spec.fps, kept as usize).map_err(
            |e| {
                StageError::new(
                    JobErrorCode::InvalidVideo,
                    format!("`video` cannot be decoded: {e}"),
                )
            },
        )?;
        inputs.prepared = Some(Box::new(v));
        Ok(())
    }

    pub fn run(
        &self,
        dec: &mut WanDecoder,
        job: &JobRecord,
        mut inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Decoded, StageError> {
        let JobGeometry { frames, height, width } = JobGeometry::of(job);
        let geometry = Geometry { frames, height, width };
        let payload = inputs.take_payload("Phase2")?;
        let phase2 = Phase2::from_parts(geometry, payload.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(payload);
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let started = std::time::Instant::now();
        let frames: Tensor = dec
            .decode(&phase2)
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        self.vae.record(Backend::Torch, Some(Fallback::NotConfigured), started.elapsed());
        let frames = match inputs.take_prepared::<x2v_media::DecodedVideo>() {
            Some(kept) => after_kept_frames(&kept, &frames)?,
            None if job.spec.extend_frames.is_some() => {
                return Err(StageError::internal("the extension's input video was not decoded"));
            }
            None => frames,
        };
        let decoded = Decoded::new(&frames, vec![Backend::Torch])?;
        (ctx.progress)(1, 1);
        Ok(decoded)
    }
}

/// The extension's output: its input video's kept frames (decoded by `prepare` at the job's frame
/// rate), resized to the generated frames' size, then the generated frames without the first (the
/// conditioning frame, the last kept one, again).
fn after_kept_frames(
    kept: &x2v_media::DecodedVideo,
    generated: &Tensor,
) -> Result<Tensor, StageError> {
    let shape = [kept.frames as i64, kept.height as i64, kept.width as i64, 3];
    let source = Tensor::from_slice(&kept.data).view(shape);
    let [n, h, w, _] = generated.size()[..] else {
        return Err(StageError::internal("decoded frames are not [F, H, W, 3]"));
    };
    let source = resize_frames(&source, h, w);
    Ok(Tensor::cat(&[source, generated.narrow(0, 1, n - 1)], 0))
}

//! x2v-decoder: the decoder stage. Receives a job's final latents by job id, decodes them with the
//! VAE decoder on the device thread, then (off the device thread) encodes what the client
//! downloads: an H.264 MP4 at the job's fps, a WebP thumbnail and a JPEG spritesheet for videos, or
//! a PNG/JPEG/WebP image. The runtime stores the files before the job is marked completed.
//!
//! Only the VAE decoder is loaded.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use bytes::Bytes;
use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_media::{Frames, ImageFormat, Mp4Options, SpriteOptions};
use x2v_models::wan::pipeline::{Geometry, Phase2, WanDecoder};
use x2v_queue::{JobRecord, Resource, Stage};
use x2v_stage::StageConfig;
use x2v_stage::config::DtypeChoice;
use x2v_stage::exchange::Inputs;
use x2v_stage::runner::{Artifact, Finished, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;

/// Longest side of a video's thumbnail.
const THUMBNAIL_SIDE: u32 = 512;

/// The decoder stage of one served model.
pub struct DecoderRunner {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
}

/// Decoded frames, `uint8 [F, H, W, 3]`, on the CPU.
pub struct Decoded {
    data: Vec<u8>,
    frames: usize,
    height: usize,
    width: usize,
}

impl DecoderRunner {
    /// Checks the config; loads nothing yet (loading happens on the device thread).
    pub fn new(config: &StageConfig) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        if config.model_dir.is_empty() {
            return Err("model_dir must name the model directory this decoder loads".into());
        }
        Ok(DecoderRunner {
            model: config.model.clone(),
            model_dir: config.model_dir.clone().into(),
            device,
            // The VAE decodes in fp32 unless bf16 is asked for explicitly.
            kind: if config.dtype == DtypeChoice::Auto { Kind::Float } else { kind },
        })
    }
}

fn internal(e: impl std::fmt::Display) -> StageError {
    StageError::new(JobErrorCode::InternalError, e.to_string())
}

fn media(e: x2v_media::MediaError) -> StageError {
    StageError::new(JobErrorCode::MediaEncodingFailed, e.to_string())
}

/// The media files of a decoded job.
pub fn encode_outputs(job: &JobRecord, d: &Decoded) -> Result<Vec<Artifact>, StageError> {
    let frames = Frames::new(&d.data, d.frames, d.height, d.width).map_err(media)?;
    let artifact = |variant: &str, extension: &str, content_type: &str, bytes: Vec<u8>| Artifact {
        variant: variant.into(),
        index: 0,
        extension: extension.into(),
        content_type: content_type.into(),
        bytes: Bytes::from(bytes),
    };
    let spec = &job.spec;
    match spec.task.resource() {
        Resource::Video => {
            let mp4 =
                x2v_media::encode_mp4(&frames, spec.fps, &Mp4Options::default()).map_err(media)?;
            let thumb = x2v_media::thumbnail_webp(&frames, THUMBNAIL_SIDE).map_err(media)?;
            let sprite =
                x2v_media::spritesheet_jpeg(&frames, &SpriteOptions::default()).map_err(media)?;
            Ok(vec![
                artifact("video", "mp4", "video/mp4", mp4),
                artifact("thumbnail", "webp", "image/webp", thumb),
                artifact("spritesheet", "jpg", "image/jpeg", sprite),
            ])
        }
        Resource::Image => {
            let format: ImageFormat = spec.output_format.parse().map_err(|_| {
                StageError::new(
                    JobErrorCode::InvalidRequest,
                    format!(
                        "output_format must be png, jpeg or webp; got `{}`",
                        spec.output_format
                    ),
                )
            })?;
            let bytes = x2v_media::encode_image(
                frames.frame(0),
                d.width,
                d.height,
                format,
                spec.output_compression,
            )
            .map_err(media)?;
            Ok(vec![artifact("image", format.extension(), format.content_type(), bytes)])
        }
    }
}

impl StageRunner for DecoderRunner {
    type Model = WanDecoder;
    type Output = Decoded;

    fn stage(&self) -> Stage {
        Stage::Decoder
    }

    fn load(&self) -> Result<(WanDecoder, Vec<LoadedModel>), StageError> {
        let dec = WanDecoder::load(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let loaded = LoadedModel {
            name: self.model.clone(),
            components: vec!["vae.decoder".into()],
            device: format!("{:?}", self.device),
            dtype: format!("{:?}", self.kind),
            parameter_bytes: dec.parameter_bytes(),
        };
        Ok((dec, vec![loaded]))
    }

    fn run(
        &self,
        dec: &mut WanDecoder,
        job: &JobRecord,
        inputs: Option<Inputs>,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Decoded, StageError> {
        let spec = &job.spec;
        let geometry = Geometry {
            frames: i64::from(spec.num_frames),
            height: i64::from(spec.size.height),
            width: i64::from(spec.size.width),
        };
        let inputs = inputs.ok_or_else(|| internal("no Phase2 inputs"))?;
        let phase2: Phase2 = Phase2::from_parts(geometry, inputs.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(inputs);
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let frames: Tensor = dec
            .decode(&phase2)
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        let size = frames.size();
        let data = Vec::<u8>::try_from(&frames.contiguous().view([-1])).map_err(internal)?;
        (ctx.progress)(1, 1);
        Ok(Decoded {
            data,
            frames: size[0] as usize,
            height: size[1] as usize,
            width: size[2] as usize,
        })
    }

    fn finish(&self, job: &JobRecord, d: Decoded) -> Result<Finished, StageError> {
        Ok(Finished::Artifacts(encode_outputs(job, &d)?))
    }
}

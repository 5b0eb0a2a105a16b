//! x2v-decoder: the decoder stage. Receives a job's final latents by job id, decodes them with the
//! family's VAE decoder on the device thread, then (off the device thread) encodes what the client
//! downloads: an H.264 MP4 at the job's fps, a WebP thumbnail and a JPEG spritesheet for videos, or
//! a PNG/JPEG/WebP image. The runtime stores the files before the job is marked completed.
//!
//! One runner per model family ([`wan`], [`qwen_image`]); [`DecoderRunner`] picks it from the model directory.
//! Only the VAE decoder is loaded. Images decode on TensorRT / ONNX Runtime engines when the
//! config's `[vae]` catalog has one for their size, else on libtorch ([`vae`]).
#![forbid(unsafe_code)]

pub mod qwen_image;
pub mod vae;
pub mod wan;

use tch::Tensor;
use x2v_core::JobErrorCode;
use x2v_core::metrics::Metrics;
use x2v_media::{Frames, ImageFormat, Mp4Options, SpriteOptions};
use x2v_models::wan::pipeline::WanDecoder;
use x2v_queue::{JobRecord, Resource, Stage};
use x2v_stage::StageConfig;
use x2v_stage::family::ModelFamily;
use x2v_stage::job::JobInputs;
use x2v_stage::runner::{Artifact, Finished, RunCtx, StageError, StageRunner};
use x2v_stage::state::LoadedModel;
use x2v_trt::Backend;

/// Longest side of a video's thumbnail.
const THUMBNAIL_SIDE: u32 = 512;

/// The decoder stage of one served model, for its family.
pub enum DecoderRunner {
    Wan(wan::Decoder),
    QwenImage(qwen_image::Decoder),
}

/// The loaded VAE decoder of one family.
pub enum DecoderModel {
    Wan(WanDecoder),
    QwenImage(qwen_image::Loaded),
}

/// Decoded frames, `uint8 [F, H, W, 3]`, on the CPU.
pub struct Decoded {
    data: Vec<u8>,
    frames: usize,
    height: usize,
    width: usize,
    /// What decoded each image (one entry for a video).
    backends: Vec<Backend>,
}

impl Decoded {
    /// `uint8 [F, H, W, 3]` frames (or images) and what decoded each (one entry for a video).
    fn new(frames: &Tensor, backends: Vec<Backend>) -> Result<Self, StageError> {
        let size = frames.size();
        let data = Vec::<u8>::try_from(&frames.contiguous().view([-1]))
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        Ok(Decoded {
            data,
            frames: size[0] as usize,
            height: size[1] as usize,
            width: size[2] as usize,
            backends,
        })
    }
}

impl DecoderRunner {
    /// Checks the config and tells the family; loads nothing yet (that happens on the device
    /// thread).
    pub fn new(config: &StageConfig) -> Result<Self, String> {
        match ModelFamily::of(config, "decoder")? {
            (ModelFamily::Wan, dir) => Ok(DecoderRunner::Wan(wan::Decoder::new(config, dir)?)),
            (ModelFamily::QwenImage, dir) => {
                Ok(DecoderRunner::QwenImage(qwen_image::Decoder::new(config, dir)?))
            }
        }
    }
}

fn media(e: x2v_media::MediaError) -> StageError {
    StageError::new(JobErrorCode::MediaEncodingFailed, e.to_string())
}

/// The media files of a decoded job.
pub fn encode_outputs(job: &JobRecord, d: &Decoded) -> Result<Vec<Artifact>, StageError> {
    let frames = Frames::new(&d.data, d.frames, d.height, d.width).map_err(media)?;
    let spec = &job.spec;
    let decoded_by = |i: usize| d.backends.get(i).map(|b| b.as_str().to_owned());
    match spec.task.resource() {
        Resource::Video => {
            let decoded_by = decoded_by(0);
            let mp4 =
                x2v_media::encode_mp4(&frames, spec.fps, &Mp4Options::default()).map_err(media)?;
            let thumb = x2v_media::thumbnail_webp(&frames, THUMBNAIL_SIDE).map_err(media)?;
            let sprite =
                x2v_media::spritesheet_jpeg(&frames, &SpriteOptions::default()).map_err(media)?;
            Ok(vec![
                Artifact { decoded_by, ..Artifact::new("video", "mp4", "video/mp4", mp4) },
                Artifact::new("thumbnail", "webp", "image/webp", thumb),
                Artifact::new("spritesheet", "jpg", "image/jpeg", sprite),
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
            // One file per image of the request (frame i is image i).
            (0..d.frames)
                .map(|i| {
                    let bytes = x2v_media::encode_image(
                        frames.frame(i),
                        d.width,
                        d.height,
                        format,
                        spec.output_compression,
                    )
                    .map_err(media)?;
                    let mut file =
                        Artifact::new("image", format.extension(), format.content_type(), bytes);
                    file.index = i as u32;
                    file.decoded_by = decoded_by(i);
                    Ok(file)
                })
                .collect()
        }
    }
}

impl StageRunner for DecoderRunner {
    type Model = DecoderModel;
    type Output = Decoded;

    fn stage(&self) -> Stage {
        Stage::Decoder
    }

    fn upload_roles(&self) -> &'static [&'static str] {
        match self {
            DecoderRunner::Wan(r) => r.upload_roles(),
            DecoderRunner::QwenImage(_) => &[],
        }
    }

    fn prepare(&self, job: &JobRecord, inputs: &mut JobInputs) -> Result<(), StageError> {
        match self {
            DecoderRunner::Wan(r) => r.prepare(job, inputs),
            DecoderRunner::QwenImage(_) => Ok(()),
        }
    }

    fn register_metrics(&self, metrics: &Metrics) {
        match self {
            DecoderRunner::Wan(r) => r.register_metrics(metrics),
            DecoderRunner::QwenImage(r) => r.register_metrics(metrics),
        }
    }

    fn load(&self) -> Result<(DecoderModel, Vec<LoadedModel>), StageError> {
        match self {
            DecoderRunner::Wan(r) => r.load().map(|(m, loaded)| (DecoderModel::Wan(m), loaded)),
            DecoderRunner::QwenImage(r) => {
                r.load().map(|(m, loaded)| (DecoderModel::QwenImage(m), loaded))
            }
        }
    }

    fn run(
        &self,
        model: &mut DecoderModel,
        job: &JobRecord,
        inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Decoded, StageError> {
        let out = match (self, model) {
            (DecoderRunner::Wan(r), DecoderModel::Wan(m)) => r.run(m, job, inputs, ctx),
            (DecoderRunner::QwenImage(r), DecoderModel::QwenImage(m)) => r.run(m, job, inputs, ctx),
            _ => Err(StageError::new(
                JobErrorCode::InternalError,
                "the loaded model is of another family than the runner",
            )),
        };
        // The job's activations go back to the kernel, not into the allocator's free lists.
        x2v_models::weights::release_free_heap();
        out
    }

    fn finish(&self, job: &JobRecord, d: Decoded) -> Result<Finished, StageError> {
        Ok(Finished::Artifacts(encode_outputs(job, &d)?))
    }
}

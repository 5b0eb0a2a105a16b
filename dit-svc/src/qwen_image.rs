//! The Qwen-Image DiT stage: rebuilds Phase1 from the encoder's payload (prompt embeddings and,
//! for edits, one latent per input image), draws the initial noise as diffusers' Qwen-Image
//! pipelines do (CPU generator seeded with the job seed), denoises with flow-match Euler on the
//! dynamically shifted sigmas of the model's `scheduler/scheduler_config.json`, and sends the
//! final latents as Phase2: the `n` images of a request drawn from its one seed, batched per
//! forward up to `image_batch`.
//!
//! Previews: a streamed request asks for `partial_images` looks at each image while it is being
//! denoised. At evenly spaced steps the x0 prediction (what the image would be if denoising stopped
//! there) is decoded by the VAE decoder, which this stage holds for that purpose (`previews` in
//! the stage config; a small fraction of the transformer's size), and handed to the runtime, which
//! encodes, stores and announces it while the next steps run.

use std::path::PathBuf;

use tch::{Device, Kind};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_media::ImageFormat;
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, ImageGeometry, ModelDir, Phase1, Phase2, QwenDecoder, denoise_with_previews,
    load_transformer,
};
use x2v_models::qwen_image::transformer::QwenImageTransformer;
use x2v_models::schedulers::FlowMatchDynamicConfig;
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{Artifact, PREVIEW_VARIANT, PreviewImage, RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The Qwen-Image DiT stage of one served model.
pub struct Dit {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    /// The model's scheduler settings, read once at start-up.
    scheduler: FlowMatchDynamicConfig,
    /// Images per forward (0: all of a request's).
    image_batch: u32,
    /// Whether to hold the VAE decoder for previews.
    previews: bool,
}

/// The loaded DiT stage: the transformer and, for previews, the VAE decoder.
pub struct QwenDit {
    transformer: QwenImageTransformer,
    previews: Option<QwenDecoder>,
}

impl Dit {
    /// Reads the scheduler config of the model directory; the `scheduler` setting of the stage
    /// config does not apply (Qwen-Image samples with its own flow-match Euler schedule).
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        if !config.lora.dir.is_empty() {
            return Err("lora.dir: LoRA adapters are served for Wan models only".into());
        }
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let dir = ModelDir::open(&model_dir).map_err(|e| e.to_string())?;
        let path = dir.scheduler_config().map_err(|e| e.to_string())?;
        let scheduler = FlowMatchDynamicConfig::from_file(&path).map_err(|e| e.to_string())?;
        Ok(Dit {
            model: config.model.clone(),
            model_dir,
            device,
            kind,
            scheduler,
            image_batch: config.image_batch,
            previews: config.previews,
        })
    }

    /// The transformer and, with previews on, the VAE decoder.
    pub fn load(&self) -> Result<(QwenDit, Vec<LoadedModel>), StageError> {
        let failed =
            |e: x2v_models::Error| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string());
        let transformer =
            load_transformer(&self.model_dir, self.device, self.kind).map_err(failed)?;
        let mut bytes = x2v_models::weights::parameter_bytes(transformer.var_store());
        let previews = if self.previews {
            let decoder =
                QwenDecoder::load(&self.model_dir, self.device, self.kind).map_err(failed)?;
            bytes += decoder.parameter_bytes();
            Some(decoder)
        } else {
            None
        };
        let components: &[&str] =
            if self.previews { &["transformer", "vae.decoder"] } else { &["transformer"] };
        let loaded = LoadedModel::new(&self.model, components, &self.device, &self.kind, bytes);
        Ok((QwenDit { transformer, previews }, vec![loaded]))
    }

    pub fn run(
        &self,
        model: &mut QwenDit,
        job: &JobRecord,
        mut inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let payload = inputs.take_payload("Phase1")?;
        let phase1 = Phase1::from_parts(geometry(job), payload.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(payload);
        let mut settings = self.settings(job);
        if model.previews.is_none() {
            settings.previews = 0;
        }
        let geometry = phase1.geometry;
        let progress = &mut *ctx.progress;
        let hand_over = &mut *ctx.preview;
        let cancelled = ctx.cancelled;
        let decoder = model.previews.as_ref();
        let mut preview = |p: x2v_models::qwen_image::pipeline::Preview| {
            let Some(decoder) = decoder else { return };
            let x0 = Phase2 { geometry, latents: p.latents };
            let rgb = decoder
                .decode(&x0)
                .map_err(|e| e.to_string())
                .and_then(|t| Vec::<u8>::try_from(&t.view([-1])).map_err(|e| e.to_string()));
            match rgb {
                Ok(rgb) => hand_over(PreviewImage {
                    image: p.image as u32,
                    index: p.index as u32,
                    rgb,
                    height: geometry.height as usize,
                    width: geometry.width as usize,
                }),
                Err(e) => tracing::warn!(error = %e, "making a preview failed"),
            }
        };
        let phase2 = denoise_with_previews(
            &model.transformer,
            &phase1,
            &settings,
            |p| progress(p.step as u32, p.total as u32),
            &mut preview,
            cancelled,
        )
        .map_err(crate::denoise_error)?;
        phase2.to_parts().map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))
    }

    /// The sampling settings `job` asks for (its guidance scale is the true-CFG scale).
    fn settings(&self, job: &JobRecord) -> DenoiseSettings {
        let spec = &job.spec;
        let n = spec.n.max(1) as usize;
        DenoiseSettings {
            num_images: n,
            max_batch: if self.image_batch == 0 { n } else { self.image_batch as usize },
            previews: spec.partial_images as usize,
            ..DenoiseSettings::single(
                spec.num_inference_steps as usize,
                f64::from(spec.guidance_scale),
                spec.seed,
                self.scheduler.clone(),
            )
        }
    }

    /// A preview in the job's output format (as its final image will be).
    pub fn encode_preview(job: &JobRecord, p: PreviewImage) -> Result<Artifact, StageError> {
        let spec = &job.spec;
        let format: ImageFormat = spec.output_format.parse().unwrap_or(ImageFormat::Png);
        let bytes =
            x2v_media::encode_image(&p.rgb, p.width, p.height, format, spec.output_compression)
                .map_err(|e| StageError::new(JobErrorCode::MediaEncodingFailed, e.to_string()))?;
        Ok(Artifact::new(PREVIEW_VARIANT, format.extension(), format.content_type(), bytes))
    }
}

/// The output size of `job` as the encoder stage computed it (each side floored to 16 pixels).
pub fn geometry(job: &JobRecord) -> ImageGeometry {
    let JobGeometry { height, width, .. } = JobGeometry::of(job);
    ImageGeometry::floored(width, height)
}

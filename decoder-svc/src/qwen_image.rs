//! The Qwen-Image decoder stage: rebuilds Phase2 from the DiT's payload and decodes the latents
//! with the Qwen-Image VAE decoder into the request's `n` `uint8` images, one at a time.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::qwen_image::pipeline::{ImageGeometry, Phase2, QwenDecoder};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;

use crate::Decoded;

/// The Qwen-Image decoder stage of one served model.
pub struct Decoder {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
}

impl Decoder {
    /// The VAE decodes in the stage's dtype (bf16 on CUDA, fp32 on the CPU), as the reference
    /// pipelines and `x2v generate --task t2i|edit` do.
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        Ok(Decoder { model: config.model.clone(), model_dir, device, kind })
    }

    pub fn load(&self) -> Result<(QwenDecoder, Vec<LoadedModel>), StageError> {
        let dec = QwenDecoder::load(&self.model_dir, self.device, self.kind)
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

    pub fn run(
        &self,
        dec: &mut QwenDecoder,
        job: &JobRecord,
        mut inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Decoded, StageError> {
        let JobGeometry { height, width, .. } = JobGeometry::of(job);
        let geometry = ImageGeometry::floored(width, height);
        let payload = inputs.take_payload("Phase2")?;
        let phase2 = Phase2::from_parts(geometry, payload.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(payload);
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let n = phase2.latents.size()[0];
        if n != i64::from(job.spec.n.max(1)) {
            return Err(StageError::new(
                JobErrorCode::InvalidPayload,
                format!("Phase2 holds {n} images; the job asks for {}", job.spec.n),
            ));
        }
        let images: Tensor = dec
            .decode(&phase2)
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        let size = images.size();
        let data = Vec::<u8>::try_from(&images.contiguous().view([-1]))
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        (ctx.progress)(1, 1);
        Ok(Decoded {
            data,
            frames: size[0] as usize,
            height: size[1] as usize,
            width: size[2] as usize,
        })
    }
}

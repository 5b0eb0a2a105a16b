//! The Wan2.1 decoder stage: rebuilds Phase2 from the DiT's payload and decodes the latents with
//! the Wan VAE decoder into `uint8` frames.

use std::path::PathBuf;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::wan::pipeline::{Geometry, Phase2, WanDecoder};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::config::DtypeChoice;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;

use x2v_trt::{Backend, Fallback};

use crate::Decoded;
use crate::vae::VaeDecodes;

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
        let decoded = Decoded::new(&frames, vec![Backend::Torch])?;
        (ctx.progress)(1, 1);
        Ok(decoded)
    }
}

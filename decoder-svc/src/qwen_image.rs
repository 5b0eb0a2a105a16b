//! The Qwen-Image decoder stage: rebuilds Phase2 from the DiT's payload and decodes the latents
//! into the request's `n` `uint8` images, one at a time: on an engine of the configured catalog
//! (TensorRT / ONNX Runtime) when one serves the size, else with the libtorch VAE decoder.
//! With engines configured, the libtorch decoder loads only when a decode first falls back.

use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use x2v_core::JobErrorCode;
use x2v_core::metrics::Metrics;
use x2v_handoff::Handoff;
use x2v_models::qwen_image::pipeline::{ImageGeometry, ModelDir, Phase2, QwenDecoder};
use x2v_models::qwen_image::vae::image_u8;
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_trt::{Backend, Size, VaeEngines};

use crate::Decoded;
use crate::vae::VaeDecodes;

/// The Qwen-Image decoder stage of one served model.
pub struct Decoder {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    vae: VaeDecodes,
}

/// The loaded decoders: libtorch's once loaded (at start without engines, else on the first
/// fallback).
pub struct Loaded {
    torch: Option<QwenDecoder>,
}

impl Decoder {
    /// The VAE decodes in the stage's dtype (bf16 on CUDA, fp32 on the CPU), as the reference
    /// pipelines and `x2v generate --task t2i|edit` do.
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let vae_dir = ModelDir::open(&model_dir).and_then(|d| d.vae()).ok();
        let engines = crate::vae::engines(&config.vae, device, vae_dir.as_deref())?;
        Ok(Decoder {
            model: config.model.clone(),
            model_dir,
            device,
            kind,
            vae: VaeDecodes::new(engines),
        })
    }

    pub fn register_metrics(&self, metrics: &Metrics) {
        self.vae.register_metrics(metrics);
    }

    fn load_torch(&self) -> Result<QwenDecoder, StageError> {
        QwenDecoder::load(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))
    }

    pub fn load(&self) -> Result<(Loaded, Vec<LoadedModel>), StageError> {
        let (torch, bytes, what) = match self.vae.engines.backend() {
            None => {
                let dec = self.load_torch()?;
                let bytes = dec.parameter_bytes();
                (Some(dec), bytes, "vae.decoder")
            }
            // Engines load on their first request; libtorch on the first fallback.
            Some(_) => (None, 0, "vae.decoder (engines)"),
        };
        let loaded = LoadedModel::new(&self.model, &[what], &self.device, &self.kind, bytes);
        Ok((Loaded { torch }, vec![loaded]))
    }

    pub fn run(
        &self,
        loaded: &mut Loaded,
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
        let n = phase2.latents.size()[0];
        if n != i64::from(job.spec.n.max(1)) {
            return Err(StageError::new(
                JobErrorCode::InvalidPayload,
                format!("Phase2 holds {n} images; the job asks for {}", job.spec.n),
            ));
        }
        let mut images = Vec::with_capacity(n as usize);
        let mut backends = Vec::with_capacity(n as usize);
        for i in 0..n {
            if (ctx.cancelled)() {
                return Err(StageError::cancelled());
            }
            let one = Phase2 { geometry, latents: phase2.latents.narrow(0, i, 1) };
            let (image, backend) = self.decode_one(loaded, &one)?;
            images.push(image);
            backends.push(backend);
            (ctx.progress)(i as u32 + 1, n as u32);
        }
        Decoded::new(&Tensor::cat(&images, 0), backends)
    }

    /// One image, `uint8 [1, H, W, 3]` on the CPU, and what decoded it.
    fn decode_one(
        &self,
        loaded: &mut Loaded,
        one: &Phase2,
    ) -> Result<(Tensor, Backend), StageError> {
        let g = one.geometry;
        let started = Instant::now();
        let miss = match self.engine_decode(one) {
            Ok((image, backend)) => {
                let image = image_u8(&Tensor::from_slice(&image).view([1, 3, g.height, g.width]));
                self.vae.record(backend, None, started.elapsed());
                return Ok((image, backend));
            }
            Err(miss) => miss,
        };
        let started = Instant::now();
        let torch = match &mut loaded.torch {
            Some(t) => t,
            slot => slot.insert(self.load_torch()?),
        };
        let image = torch
            .decode(one)
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        self.vae.record(Backend::Torch, Some(miss.reason), started.elapsed());
        Ok((image, Backend::Torch))
    }

    /// The engine's decode of `one` (`[1, 3, H, W]` in about `[-1, 1]`) and its backend, or why
    /// there is none.
    fn engine_decode(&self, one: &Phase2) -> Result<(Vec<f32>, Backend), x2v_trt::Miss> {
        if let VaeEngines::Torch(miss) = &self.vae.engines {
            return Err(miss.clone());
        }
        let g = one.geometry;
        let latents = one.latents.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let latents = Vec::<f32>::try_from(&latents.view([-1])).map_err(|e| {
            x2v_trt::Miss::new(x2v_trt::Fallback::RunFailed, format!("reading the latents: {e}"))
        })?;
        let size = Size::new(g.height as u32, g.width as u32);
        self.vae.engines.decode(size, &latents)
    }
}

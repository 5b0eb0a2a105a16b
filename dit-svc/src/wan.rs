//! The Wan DiT stage (Wan2.1, and Wan2.2 A14B with both experts): rebuilds Phase1 from the
//! encoder's payload, draws the initial noise as diffusers' Wan pipelines do (CPU generator seeded
//! with the job seed), denoises with UniPC or flow-match Euler, and sends the final latents as
//! Phase2.

use std::path::PathBuf;
use std::rc::Rc;

use tch::{Device, Kind};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::lora::{LoraAdapter, LoraStore};
use x2v_models::schedulers::{FlowMatchEulerConfig, StepDistillConfig, UniPcConfig};
use x2v_models::wan::lora::load_adapter;
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, Phase1, SchedulerChoice, WanDit, denoise, load_dit,
};
use x2v_queue::JobRecord;
use x2v_stage::StageConfig;
use x2v_stage::config::Scheduler;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// Takes a job's adapters off the DiT when dropped.
struct ClearLoras<'a>(&'a WanDit);

impl Drop for ClearLoras<'_> {
    fn drop(&mut self) {
        self.0.clear_loras();
    }
}

/// Which sampler the worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sampler {
    UniPc,
    Euler,
    /// The fixed timesteps and the update rule of a step-distilled model.
    StepDistill {
        denoising_steps: Vec<u32>,
        renoise: bool,
    },
}

/// The Wan DiT stage of one served model.
pub struct Dit {
    model: String,
    model_dir: PathBuf,
    device: Device,
    kind: Kind,
    sampler: Sampler,
    /// The adapter directory jobs may name adapters of (`lora.dir`) and the bytes of adapters
    /// kept in memory.
    loras: Option<(PathBuf, u64)>,
}

/// The loaded DiT and the adapters in memory, on the device thread.
pub struct WanModel {
    dit: WanDit,
    loras: Option<LoraStore>,
}

impl Dit {
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let sampler = match config.scheduler {
            Scheduler::Unipc => Sampler::UniPc,
            Scheduler::Euler => Sampler::Euler,
            Scheduler::StepDistill => {
                let s = &config.step_distill;
                let check = StepDistillConfig {
                    denoising_steps: s.denoising_steps.clone(),
                    shift: 5.0,
                    renoise: s.renoise,
                };
                check.validate().map_err(|e| format!("step_distill: {e}"))?;
                Sampler::StepDistill {
                    denoising_steps: s.denoising_steps.clone(),
                    renoise: s.renoise,
                }
            }
        };
        let loras = match config.lora.dir.as_str() {
            "" => None,
            dir if !std::path::Path::new(dir).is_dir() => {
                return Err(format!("lora.dir: {dir} is not a directory"));
            }
            dir => Some((PathBuf::from(dir), config.lora.cache_mib.saturating_mul(1 << 20))),
        };
        Ok(Dit { model: config.model.clone(), model_dir, device, kind, sampler, loras })
    }

    /// Loads the transformer, or both experts of Wan2.2 A14B: one rank holds both, so a job
    /// switches expert between two steps without leaving the process.
    pub fn load(&self) -> Result<(WanModel, Vec<LoadedModel>), StageError> {
        let dit = load_dit(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let mut loaded = LoadedModel::new(
            &self.model,
            dit.components(),
            &self.device,
            &self.kind,
            dit.parameter_bytes(),
        );
        let loras = match &self.loras {
            None => None,
            Some((dir, budget)) => Some(
                LoraStore::new(dir, *budget, load_adapter)
                    .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?,
            ),
        };
        if let Some(store) = &loras {
            loaded.unfit_loras = unfit_adapters(&dit, store);
        }
        Ok((WanModel { dit, loras }, vec![loaded]))
    }

    pub fn run(
        &self,
        model: &mut WanModel,
        job: &JobRecord,
        mut inputs: JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let JobGeometry { frames, height, width } = JobGeometry::of(job);
        let geometry = Geometry { frames, height, width };
        let payload = inputs.take_payload("Phase1")?;
        let phase1 = Phase1::from_parts(geometry, payload.tensors(), self.device)
            .map_err(|e| StageError::new(JobErrorCode::InvalidPayload, e.to_string()))?;
        drop(payload);
        let settings = self.settings(job);
        let adapters = self.adapters(model.loras.as_ref(), job)?;
        let dit = &model.dit;
        dit.set_loras(&adapters).map_err(crate::denoise_error)?;
        if !adapters.is_empty() {
            let names: Vec<String> =
                adapters.iter().map(|(a, s)| format!("{}:{s}", a.name())).collect();
            tracing::info!(job = %job.id, loras = ?names, "LoRA adapters applied");
        }
        // The adapters come off again whatever happens: the next job sees the base weights.
        let _clear = ClearLoras(dit);
        let progress = &mut *ctx.progress;
        let cancelled = ctx.cancelled;
        let phase2 = denoise(
            dit,
            &phase1,
            &settings,
            |p| progress(p.step as u32, p.total as u32),
            cancelled,
        )
        .map_err(crate::denoise_error)?;
        phase2.to_parts().map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))
    }

    /// The adapters `job` asks for, with their weights.
    fn adapters(
        &self,
        store: Option<&LoraStore>,
        job: &JobRecord,
    ) -> Result<Vec<(Rc<LoraAdapter>, f64)>, StageError> {
        let wanted = &job.spec.loras;
        if wanted.is_empty() {
            return Ok(vec![]);
        }
        let store = store.ok_or_else(|| {
            StageError::new(
                JobErrorCode::InvalidRequest,
                format!("model `{}` has no LoRA adapters here (lora.dir is unset)", self.model),
            )
        })?;
        wanted
            .iter()
            .map(|l| Ok((store.get(&l.name).map_err(crate::denoise_error)?, f64::from(l.scale))))
            .collect()
    }

    /// The sampling settings `job` asks for.
    fn settings(&self, job: &JobRecord) -> DenoiseSettings {
        let spec = &job.spec;
        let shift = f64::from(spec.shift);
        DenoiseSettings {
            steps: spec.num_inference_steps as usize,
            guidance_scale: f64::from(spec.guidance_scale),
            guidance_scale_2: spec.guidance_scale_2.map(f64::from),
            seed: spec.seed,
            scheduler: match &self.sampler {
                Sampler::UniPc => SchedulerChoice::UniPc(UniPcConfig::wan(shift)),
                Sampler::Euler => SchedulerChoice::Euler(FlowMatchEulerConfig {
                    shift,
                    num_train_timesteps: 1000,
                }),
                Sampler::StepDistill { denoising_steps, renoise } => {
                    SchedulerChoice::StepDistill(StepDistillConfig {
                        denoising_steps: denoising_steps.clone(),
                        shift,
                        renoise: *renoise,
                    })
                }
            },
            batch_cfg: true,
            strength: spec.strength,
        }
    }
}

/// The adapters of `store`'s directory that cannot serve on `dit` (unreadable, or made for another
/// model), each with the reason; each is read once here and not kept.
fn unfit_adapters(dit: &WanDit, store: &LoraStore) -> std::collections::BTreeMap<String, String> {
    let mut unfit = std::collections::BTreeMap::new();
    for name in store.names() {
        let path = store.dir().join(format!("{name}.safetensors"));
        let checked = load_adapter(&name, &path).and_then(|adapter| dit.check_fits(&adapter));
        if let Err(e) = checked {
            tracing::warn!(adapter = %name, error = %e, "LoRA adapter does not fit the model");
            unfit.insert(name, e.to_string());
        }
    }
    unfit
}

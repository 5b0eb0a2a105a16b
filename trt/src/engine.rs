//! One exported decoder graph as an ONNX Runtime session on one execution provider.
//!
//! The graph's interface (written by `tools/export_vae_onnx.py`): input `latents`, normalised
//! latents `[1, 16, 1, H/8, W/8]`; output `image`, `[1, 3, H, W]` in about `[-1, 1]` (the
//! pipeline's de-normalisation and VAE decode, first frame). Both fp32, or both fp16 for a graph
//! exported in half precision. Metadata `x2v.weights_sha256` names the weights it came from.

use std::path::PathBuf;

use half::f16;
use ort::ep;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{Tensor, TensorElementType, TensorRef, ValueType};

use crate::catalog::{Coverage, EngineSpec, Precision, Size};
use crate::fallback::{Backend, Fallback};
use crate::manager::{Loader, Miss};
use crate::runtime::{OnnxRuntime, Provider};

/// The graph kind `tools/export_vae_onnx.py` writes into `x2v.graph`.
pub const GRAPH_KIND: &str = "qwen-image-vae-decoder";
pub const INPUT: &str = "latents";
pub const OUTPUT: &str = "image";

/// Loads catalog graphs as sessions on one provider.
pub struct OrtLoader {
    runtime: &'static OnnxRuntime,
    provider: Provider,
    /// CUDA device ordinal (TensorRT and CUDA providers).
    device: usize,
    precision: Precision,
    /// TensorRT engine and timing caches.
    cache_dir: PathBuf,
    /// SHA-256 of the VAE weights the model serves; graphs stamped with other weights are stale.
    weights_sha256: Option<String>,
}

impl OrtLoader {
    pub fn new(
        runtime: &'static OnnxRuntime,
        provider: Provider,
        device: usize,
        precision: Precision,
        cache_dir: PathBuf,
        weights_sha256: Option<String>,
    ) -> Self {
        OrtLoader { runtime, provider, device, precision, cache_dir, weights_sha256 }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn backend(&self) -> Backend {
        match self.provider {
            Provider::TensorRt => Backend::TensorRt,
            Provider::Cuda => Backend::OnnxCuda,
            Provider::Cpu => Backend::OnnxCpu,
        }
    }

    fn providers(&self, spec: &EngineSpec) -> Vec<ep::ExecutionProviderDispatch> {
        let device = self.device as i32;
        match self.provider {
            Provider::Cpu => vec![],
            Provider::Cuda => {
                vec![ep::CUDA::default().with_device_id(device).build().error_on_failure()]
            }
            Provider::TensorRt => {
                let stem = spec
                    .path
                    .file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                let cache = self.cache_dir.display().to_string();
                let mut trt = ep::TensorRT::default()
                    .with_device_id(device)
                    .with_fp16(self.precision == Precision::Fp16)
                    .with_bf16(self.precision == Precision::Bf16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(&cache)
                    .with_engine_cache_prefix(&stem)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&cache);
                if let Coverage::Profiles { min, max, opt } = &spec.coverage {
                    // One optimisation profile per opt size, all spanning min..=max.
                    let shapes = |s: &[Size]| {
                        s.iter()
                            .map(|s| {
                                let d = s.latent_shape().map(|d| d.to_string());
                                format!("{INPUT}:{}", d.join("x"))
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    trt = trt
                        .with_profile_min_shapes(shapes(&vec![*min; opt.len()]))
                        .with_profile_opt_shapes(shapes(opt))
                        .with_profile_max_shapes(shapes(&vec![*max; opt.len()]));
                }
                // Nodes TensorRT does not take run on CUDA.
                vec![
                    trt.build().error_on_failure(),
                    ep::CUDA::default().with_device_id(device).build().fail_silently(),
                ]
            }
        }
    }

    fn builder(&self, spec: &EngineSpec) -> Result<SessionBuilder, Miss> {
        let unavailable = |e: String| Miss::new(Fallback::ProviderUnavailable, e);
        let builder =
            Session::builder(self.runtime.environment()).map_err(|e| unavailable(e.to_string()))?;
        builder
            .with_execution_providers(self.providers(spec))
            .map_err(|e| unavailable(format!("{}: {e}", self.provider.ep_name())))
    }
}

impl Loader for OrtLoader {
    type Engine = OrtEngine;

    fn load(&self, spec: &EngineSpec) -> Result<OrtEngine, Miss> {
        if !spec.path.is_file() {
            return Err(Miss::new(
                Fallback::EngineMissing,
                format!("{} does not exist", spec.path.display()),
            ));
        }
        if self.provider == Provider::TensorRt {
            std::fs::create_dir_all(&self.cache_dir).map_err(|e| {
                Miss::new(
                    Fallback::EngineLoadFailed,
                    format!("cache dir {}: {e}", self.cache_dir.display()),
                )
            })?;
        }
        let failed = |e: String| {
            Miss::new(Fallback::EngineLoadFailed, format!("{}: {e}", spec.path.display()))
        };
        let session =
            self.builder(spec)?.commit_from_file(&spec.path).map_err(|e| failed(e.to_string()))?;
        let mut engine = OrtEngine::checked(session, spec, self.weights_sha256.as_deref())?;
        if self.provider == Provider::TensorRt {
            // TensorRT builds (or reads from its cache) at the first run: do it now, so the cost
            // is a load's and a failed build is a failed load.
            let size = match &spec.coverage {
                Coverage::Static(s) => *s,
                Coverage::Profiles { opt, .. } => opt[0],
            };
            let zeros = vec![0.0f32; size.latent_shape().iter().product::<i64>() as usize];
            engine
                .run(size, &zeros)
                .map_err(|e| failed(format!("first run (engine build): {e}")))?;
        }
        Ok(engine)
    }
}

/// A loaded decoder graph.
pub struct OrtEngine {
    session: Session,
    half: bool,
}

impl OrtEngine {
    /// Checks the session against the interface and the weights stamp.
    fn checked(session: Session, spec: &EngineSpec, weights: Option<&str>) -> Result<Self, Miss> {
        let bad = |m: String| {
            Miss::new(Fallback::EngineLoadFailed, format!("{}: {m}", spec.path.display()))
        };
        let (Some(input), Some(output)) = (session.inputs().first(), session.outputs().first())
        else {
            return Err(bad("the graph has no input or no output".into()));
        };
        if session.inputs().len() != 1 || input.name() != INPUT || output.name() != OUTPUT {
            return Err(bad(format!(
                "expected one input `{INPUT}` and output `{OUTPUT}`, got inputs {:?} and outputs {:?}",
                session.inputs().iter().map(|o| o.name()).collect::<Vec<_>>(),
                session.outputs().iter().map(|o| o.name()).collect::<Vec<_>>()
            )));
        }
        let tensor = |t: &ValueType| match t {
            ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.to_vec())),
            _ => None,
        };
        let (Some((ty, shape)), Some((out_ty, out_shape))) =
            (tensor(input.dtype()), tensor(output.dtype()))
        else {
            return Err(bad("input and output must be tensors".into()));
        };
        let half = match (ty, out_ty) {
            (TensorElementType::Float32, TensorElementType::Float32) => false,
            (TensorElementType::Float16, TensorElementType::Float16) => true,
            _ => {
                return Err(bad(format!(
                    "input and output must both be float32 or float16, got {ty:?} and {out_ty:?}"
                )));
            }
        };
        if shape.len() != 5 || out_shape.len() != 4 {
            return Err(bad(format!(
                "`{INPUT}` must be 5-d and `{OUTPUT}` 4-d, got {shape:?} and {out_shape:?}"
            )));
        }
        if let Coverage::Static(size) = spec.coverage
            && shape != size.latent_shape()
        {
            return Err(bad(format!(
                "`{INPUT}` is {shape:?}; the catalog says {size}, which needs {:?}",
                size.latent_shape()
            )));
        }
        let metadata = session.metadata().map_err(|e| bad(e.to_string()))?;
        if let Some(kind) = metadata.custom("x2v.graph")
            && kind != GRAPH_KIND
        {
            return Err(bad(format!("the graph is a `{kind}`, not a `{GRAPH_KIND}`")));
        }
        if let (Some(want), Some(got)) = (weights, metadata.custom("x2v.weights_sha256"))
            && !got.eq_ignore_ascii_case(want)
        {
            return Err(Miss::new(
                Fallback::EngineStale,
                format!(
                    "{} was exported from weights {got}; the model's are {want}",
                    spec.path.display()
                ),
            ));
        }
        drop(metadata);
        Ok(OrtEngine { session, half })
    }

    /// Decodes normalised latents `[1, 16, 1, H/8, W/8]` of an image of `size` into
    /// `[1, 3, H, W]` in about `[-1, 1]`.
    pub fn run(&mut self, size: Size, latents: &[f32]) -> Result<Vec<f32>, String> {
        let shape = size.latent_shape();
        let want = shape.iter().product::<i64>() as usize;
        if latents.len() != want {
            return Err(format!("{} latent values for {size}; expected {want}", latents.len()));
        }
        let outputs = if self.half {
            let data: Vec<f16> = latents.iter().map(|&v| f16::from_f32(v)).collect();
            let input = Tensor::from_array((shape, data)).map_err(|e| e.to_string())?;
            self.session.run(ort::inputs![INPUT => input])
        } else {
            let input = TensorRef::from_array_view((shape, latents)).map_err(|e| e.to_string())?;
            self.session.run(ort::inputs![INPUT => input])
        }
        .map_err(|e| e.to_string())?;
        let image = &outputs[OUTPUT];
        let (got, data) = if self.half {
            let (s, d) = image.try_extract_tensor::<f16>().map_err(|e| e.to_string())?;
            (s.to_vec(), d.iter().map(|v| v.to_f32()).collect())
        } else {
            let (s, d) = image.try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
            (s.to_vec(), d.to_vec())
        };
        if got != size.image_shape() {
            return Err(format!("`{OUTPUT}` came out {got:?}; expected {:?}", size.image_shape()));
        }
        Ok(data)
    }
}

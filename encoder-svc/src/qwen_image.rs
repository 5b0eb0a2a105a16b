//! The Qwen-Image encoder stage: Qwen2.5-VL for the prompt and negative prompt and, for the edit
//! models, the vision tower and the VAE encoder for every uploaded input image; sends the Phase1
//! tensors (image `i` as `image_latents.i`). The transformer and the VAE decoder stay on disk.
//!
//! The model directory's pipeline class decides what a job may ask: `QwenImagePipeline` text to
//! image only, `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` edits only.

use std::path::PathBuf;

use tch::{Device, Kind};
use x2v_core::JobErrorCode;
use x2v_handoff::Handoff;
use x2v_models::qwen_image::pipeline::{ModelDir, QwenEncoder, Variant};
use x2v_models::qwen_image::resize::RgbImage;
use x2v_queue::{JobRecord, Task};
use x2v_stage::StageConfig;
use x2v_stage::job::{JobGeometry, JobInputs};
use x2v_stage::runner::{RunCtx, StageError};
use x2v_stage::state::LoadedModel;
use x2v_transfer::TensorPart;

/// The upload role of an edit's input images (`image`, or several as `image[]`).
const IMAGE: &str = "image";

/// The negative prompt when the job has none, as the Qwen-Image examples.
const DEFAULT_NEGATIVE_PROMPT: &str = " ";

/// The Qwen-Image encoder stage of one served model.
pub struct Encoder {
    model: String,
    model_dir: PathBuf,
    variant: Variant,
    device: Device,
    kind: Kind,
}

impl Encoder {
    /// Reads which pipeline the model directory holds and checks the configured tasks against it.
    pub fn new(config: &StageConfig, model_dir: PathBuf) -> Result<Self, String> {
        let device = x2v_models::device::parse_device(&config.device.to_string())?;
        let kind = x2v_models::device::parse_dtype(config.dtype.as_str(), device)?;
        let variant = ModelDir::open(&model_dir).map_err(|e| e.to_string())?.variant();
        for task in &config.tasks {
            check_task(variant, *task)
                .map_err(|m| format!("tasks: {m}; set tasks to what the model does"))?;
        }
        Ok(Encoder { model: config.model.clone(), model_dir, variant, device, kind })
    }

    pub fn upload_roles(&self) -> &'static [&'static str] {
        if self.variant.is_edit() { &[IMAGE] } else { &[] }
    }

    pub fn load(&self) -> Result<(QwenEncoder, Vec<LoadedModel>), StageError> {
        let enc = QwenEncoder::load(&self.model_dir, self.device, self.kind)
            .map_err(|e| StageError::new(JobErrorCode::ModelLoadFailed, e.to_string()))?;
        let components: &[&str] = if self.variant.is_edit() {
            &["tokenizer", "text_encoder", "processor", "vae.encoder"]
        } else {
            &["tokenizer", "text_encoder"]
        };
        let loaded = LoadedModel::new(
            &self.model,
            components,
            &self.device,
            &self.kind,
            enc.parameter_bytes(),
        );
        Ok((enc, vec![loaded]))
    }

    pub fn run(
        &self,
        enc: &mut QwenEncoder,
        job: &JobRecord,
        inputs: &JobInputs,
        ctx: &mut RunCtx<'_>,
    ) -> Result<Vec<TensorPart>, StageError> {
        let spec = &job.spec;
        check_task(self.variant, spec.task)
            .map_err(|m| StageError::new(JobErrorCode::InvalidRequest, m))?;
        if spec.inputs.iter().any(|i| i.role == "mask") {
            return Err(StageError::new(
                JobErrorCode::InvalidRequest,
                format!(
                    "`mask` is not supported by {}: Qwen-Image edits follow the prompt over the \
                     whole image (inpainting is not served); send the edit without a mask",
                    spec.model
                ),
            ));
        }
        let images = if self.variant.is_edit() { input_images(inputs)? } else { Vec::new() };
        if (ctx.cancelled)() {
            return Err(StageError::cancelled());
        }
        let JobGeometry { height, width, .. } = JobGeometry::of(job);
        let phase1 = enc
            .encode(
                &spec.prompt,
                Some(spec.negative_prompt.as_deref().unwrap_or(DEFAULT_NEGATIVE_PROMPT)),
                &images,
                Some((width, height)),
                f64::from(spec.guidance_scale),
            )
            .map_err(|e| StageError::from_kind(e.kind(), JobErrorCode::InvalidRequest, e))?;
        let parts = phase1
            .to_parts()
            .map_err(|e| StageError::new(JobErrorCode::InternalError, e.to_string()))?;
        (ctx.progress)(1, 1);
        Ok(parts)
    }
}

/// Whether a model published for `variant` does `task`; the message says why not.
pub fn check_task(variant: Variant, task: Task) -> Result<(), String> {
    let does = match task {
        Task::T2i => !variant.is_edit(),
        Task::Edit => variant.is_edit(),
        Task::T2v | Task::I2v | Task::V2v => false,
    };
    if does {
        return Ok(());
    }
    let what = if variant.is_edit() { "edits images" } else { "generates images from text" };
    Err(format!(
        "task `{}` is not served by this model: it is a {} model, which {what} (task `{}`)",
        task.as_str(),
        variant.class_name(),
        if variant.is_edit() { "edit" } else { "t2i" },
    ))
}

/// Every uploaded input image of an edit job, in job order, as RGB.
fn input_images(inputs: &JobInputs) -> Result<Vec<RgbImage>, StageError> {
    let uploads: Vec<_> = inputs.uploads.iter().filter(|u| u.role == IMAGE).collect();
    if uploads.is_empty() {
        return Err(StageError::new(
            JobErrorCode::InvalidRequest,
            "an edit needs an `image` upload (several as `image[]`)",
        ));
    }
    let count = uploads.len();
    uploads
        .into_iter()
        .enumerate()
        .map(|(i, upload)| {
            let which =
                if count == 1 { "`image`".to_owned() } else { format!("`image` {}", i + 1) };
            let invalid =
                |m: String| StageError::new(JobErrorCode::InvalidImage, format!("{which} {m}"));
            let img = image::load_from_memory(&upload.bytes)
                .map_err(|e| invalid(format!("is not a readable image: {e}")))?
                .to_rgb8();
            let (w, h) = img.dimensions();
            RgbImage::new(w as usize, h as usize, img.into_raw())
                .map_err(|e| invalid(format!("cannot be used: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_serves_only_its_task() {
        check_task(Variant::TextToImage, Task::T2i).unwrap();
        check_task(Variant::Edit, Task::Edit).unwrap();
        check_task(Variant::EditPlus, Task::Edit).unwrap();
        let err = check_task(Variant::TextToImage, Task::Edit).unwrap_err();
        assert!(err.contains("task `edit` is not served") && err.contains("QwenImagePipeline"));
        let err = check_task(Variant::EditPlus, Task::T2i).unwrap_err();
        assert!(err.contains("task `t2i`") && err.contains("QwenImageEditPlusPipeline"), "{err}");
        assert!(check_task(Variant::Edit, Task::T2v).is_err());
        assert!(check_task(Variant::TextToImage, Task::I2v).is_err());
    }
}

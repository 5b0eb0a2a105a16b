//! Where each Qwen-Image component lives in a diffusers model directory (`model_index.json` with
//! `transformer/`, `text_encoder/`, `tokenizer/`, `processor/` (edit models), `vae/` and
//! `scheduler/`), and which pipeline the directory was published for.

use std::path::{Path, PathBuf};

use crate::error::{Component, Error};

/// The pipeline a Qwen-Image model directory was published for (`model_index.json`'s
/// `_class_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `QwenImagePipeline`: text to image.
    TextToImage,
    /// `QwenImageEditPipeline` (Qwen-Image-Edit): one input image, ~1 MP for both paths.
    Edit,
    /// `QwenImageEditPlusPipeline` (Edit-2509/2511): several input images, 384² for the
    /// vision-language input and ~1 MP for the VAE.
    EditPlus,
}

impl Variant {
    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Variant::TextToImage => "QwenImagePipeline",
            Variant::Edit => "QwenImageEditPipeline",
            Variant::EditPlus => "QwenImageEditPlusPipeline",
        }
    }

    fn from_class_name(name: &str) -> Option<Self> {
        [Variant::TextToImage, Variant::Edit, Variant::EditPlus]
            .into_iter()
            .find(|v| v.class_name() == name)
    }

    /// Whether the model edits input images (and so needs at least one).
    pub fn is_edit(self) -> bool {
        self != Variant::TextToImage
    }

    /// The most input images a job of this variant takes.
    pub fn max_images(self) -> usize {
        match self {
            Variant::TextToImage => 0,
            Variant::Edit => 1,
            Variant::EditPlus => super::MAX_INPUT_IMAGES,
        }
    }
}

/// A located Qwen-Image model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    variant: Variant,
}

impl ModelDir {
    /// Reads `model_index.json` and checks it names a Qwen-Image pipeline.
    pub fn open(root: &Path) -> Result<Self, Error> {
        if !root.is_dir() {
            return Err(Error::NotADirectory(root.to_owned()));
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::MissingPart {
                dir: root.to_owned(),
                what: "diffusers model index",
                expected: "model_index.json".into(),
            });
        }
        let bad = |m: String| Error::config(Component::Encode, Some(&index), m);
        let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let class = json.get("_class_name").and_then(|v| v.as_str()).unwrap_or_default();
        let variant = Variant::from_class_name(class).ok_or_else(|| {
            bad(format!(
                "`_class_name` is `{class}`, not a Qwen-Image pipeline (QwenImagePipeline, \
                 QwenImageEditPipeline or QwenImageEditPlusPipeline)"
            ))
        })?;
        Ok(ModelDir { root: root.to_owned(), variant })
    }

    /// Whether `root` holds a Qwen-Image model (a `model_index.json` naming one of its pipelines).
    pub fn is_qwen_image(root: &Path) -> bool {
        ModelDir::open(root).is_ok()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    fn folder(&self, what: &'static str, name: &str) -> Result<PathBuf, Error> {
        let p = self.root.join(name);
        if p.is_dir() {
            Ok(p)
        } else {
            Err(Error::MissingPart { dir: self.root.clone(), what, expected: format!("{name}/") })
        }
    }

    pub fn transformer(&self) -> Result<PathBuf, Error> {
        self.folder("transformer", "transformer")
    }

    pub fn text_encoder(&self) -> Result<PathBuf, Error> {
        self.folder("text encoder", "text_encoder")
    }

    /// `tokenizer/tokenizer.json`.
    pub fn tokenizer(&self) -> Result<PathBuf, Error> {
        let p = self.folder("tokenizer", "tokenizer")?.join("tokenizer.json");
        if p.is_file() { Ok(p) } else { Err(Error::MissingFile(p)) }
    }

    /// `processor/` (the Qwen2-VL processor of the edit models).
    pub fn processor(&self) -> Result<PathBuf, Error> {
        self.folder("image processor", "processor")
    }

    pub fn vae(&self) -> Result<PathBuf, Error> {
        self.folder("VAE", "vae")
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> Result<PathBuf, Error> {
        let p = self.folder("scheduler", "scheduler")?.join("scheduler_config.json");
        if p.is_file() { Ok(p) } else { Err(Error::MissingFile(p)) }
    }
}

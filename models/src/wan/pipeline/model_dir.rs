//! Where each Wan2.1 component lives in a model directory, in both published layouts:
//!
//! - diffusers (`model_index.json`): `tokenizer/`, `text_encoder/`, `transformer/`, `vae/`,
//!   `image_encoder/`, `image_processor/` (I2V), each a `save_pretrained` folder;
//! - the original release: `models_t5_umt5-xxl-enc-bf16.pth`, tokenizer folder `google/umt5-xxl/`,
//!   `config.json` + safetensors for the DiT at the top level, `Wan2.1_VAE.pth`, and
//!   `models_clip_*.pth` (I2V).

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::error::Error;
use crate::wan::transformer::WanTransformer3DModel;

/// Which layout a model directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `model_index.json` with one folder per component.
    Diffusers,
    /// The original Wan release files.
    Original,
}

/// Why a component could not be located.
/// A located model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    layout: Layout,
}

impl ModelDir {
    /// Detects the layout: `model_index.json` means diffusers, anything else the original one.
    pub fn open(root: &Path) -> Result<Self, Error> {
        if !root.is_dir() {
            return Err(Error::NotADirectory(root.to_owned()));
        }
        let layout = if root.join("model_index.json").is_file() {
            Layout::Diffusers
        } else {
            Layout::Original
        };
        Ok(ModelDir { root: root.to_owned(), layout })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn missing(&self, what: &'static str, expected: String) -> Error {
        Error::MissingPart { dir: self.root.clone(), what, expected }
    }

    /// A diffusers component folder, or the first existing original file among `names`.
    fn component(
        &self,
        what: &'static str,
        folder: &str,
        originals: &[&str],
    ) -> Result<PathBuf, Error> {
        match self.layout {
            Layout::Diffusers => {
                let p = self.root.join(folder);
                if p.is_dir() { Ok(p) } else { Err(self.missing(what, format!("{folder}/"))) }
            }
            Layout::Original => originals
                .iter()
                .map(|n| self.root.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| self.missing(what, originals.join(" or "))),
        }
    }

    /// `tokenizer.json` of the UMT5 tokenizer.
    pub fn tokenizer(&self) -> Result<PathBuf, Error> {
        let dir = self.component("tokenizer", "tokenizer", &["google/umt5-xxl"])?;
        let file = dir.join("tokenizer.json");
        if file.is_file() {
            Ok(file)
        } else {
            Err(self.missing("tokenizer", file.display().to_string()))
        }
    }

    /// The UMT5 encoder folder or checkpoint.
    pub fn text_encoder(&self) -> Result<PathBuf, Error> {
        self.component("text encoder", "text_encoder", &["models_t5_umt5-xxl-enc-bf16.pth"])
    }

    /// The VAE folder or checkpoint.
    pub fn vae(&self) -> Result<PathBuf, Error> {
        self.component("VAE", "vae", &["Wan2.1_VAE.pth"])
    }

    /// The CLIP vision folder or checkpoint (I2V).
    pub fn image_encoder(&self) -> Result<PathBuf, Error> {
        if self.layout == Layout::Original {
            let found = std::fs::read_dir(&self.root).ok().and_then(|entries| {
                let mut names: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("models_clip_") && n.ends_with(".pth"))
                    })
                    .collect();
                names.sort();
                names.into_iter().next()
            });
            return found.ok_or_else(|| self.missing("image encoder", "models_clip_*.pth".into()));
        }
        self.component("image encoder", "image_encoder", &[])
    }

    /// `image_processor/preprocessor_config.json` when present (diffusers layout only).
    pub fn image_processor(&self) -> Option<PathBuf> {
        let p = self.root.join("image_processor/preprocessor_config.json");
        (self.layout == Layout::Diffusers && p.is_file()).then_some(p)
    }

    /// The DiT folder: `transformer/` (diffusers) or the top level (original, `config.json`).
    pub fn transformer(&self) -> Result<PathBuf, Error> {
        let dir = match self.layout {
            Layout::Diffusers => self.root.join("transformer"),
            Layout::Original => self.root.clone(),
        };
        if dir.join("config.json").is_file() {
            Ok(dir)
        } else {
            Err(self.missing("DiT", dir.join("config.json").display().to_string()))
        }
    }
}

/// Loads only the DiT of a model directory (either layout) in `kind`.
pub fn load_transformer(
    model_dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<WanTransformer3DModel, Error> {
    let dir = ModelDir::open(model_dir)?.transformer()?;
    WanTransformer3DModel::load(&dir, device, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_components_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = ModelDir::open(&tmp.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        let orig = ModelDir::open(tmp.path()).unwrap();
        assert_eq!(orig.layout(), Layout::Original);
        let err = orig.text_encoder().unwrap_err().to_string();
        assert!(err.contains("models_t5_umt5-xxl-enc-bf16.pth"), "{err}");
        let err = orig.image_encoder().unwrap_err().to_string();
        assert!(err.contains("models_clip_*.pth"), "{err}");
        std::fs::write(tmp.path().join("models_clip_vit.pth"), b"").unwrap();
        assert!(orig.image_encoder().unwrap().ends_with("models_clip_vit.pth"));
        let err = orig.tokenizer().unwrap_err().to_string();
        assert!(err.contains("google/umt5-xxl"), "{err}");

        std::fs::write(tmp.path().join("model_index.json"), b"{}").unwrap();
        let diff = ModelDir::open(tmp.path()).unwrap();
        assert_eq!(diff.layout(), Layout::Diffusers);
        let err = diff.vae().unwrap_err().to_string();
        assert!(err.contains("VAE") && err.contains("vae/"), "{err}");
        let err = diff.transformer().unwrap_err().to_string();
        assert!(err.contains("transformer/config.json"), "{err}");
    }
}

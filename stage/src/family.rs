//! Which model family a stage serves, told by its model directory: a diffusers
//! `model_index.json` names its pipeline class (`Wan*Pipeline`, or one of the three Qwen-Image
//! pipelines); the original Wan release has no index.
//! Each stage service keeps one runner per family and picks it here.

use std::path::{Path, PathBuf};

use crate::config::StageConfig;

/// The model families the stage services know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Wan2.1 and Wan2.2 A14B text- and image-to-video (diffusers `Wan*Pipeline`, or the
    /// original release).
    Wan,
    /// Qwen-Image text to image and image editing (diffusers `QwenImagePipeline`,
    /// `QwenImageEditPipeline`, `QwenImageEditPlusPipeline`).
    QwenImage,
}

/// The diffusers pipeline classes of the Qwen-Image family.
const QWEN_IMAGE_CLASSES: [&str; 3] =
    ["QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline"];

impl ModelFamily {
    /// The family and directory of `config.model_dir`; `what` names the stage in errors (`DiT`).
    pub fn of(config: &StageConfig, what: &str) -> Result<(Self, PathBuf), String> {
        if config.model_dir.is_empty() {
            return Err(format!("model_dir must name the model directory this {what} loads"));
        }
        let dir = PathBuf::from(&config.model_dir);
        Ok((Self::detect(&dir)?, dir))
    }

    /// The family of the model in `dir`. A directory without `model_index.json` (or one that does
    /// not exist yet, which loading then reports) is taken for the original Wan release.
    pub fn detect(dir: &Path) -> Result<Self, String> {
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Ok(ModelFamily::Wan);
        }
        let text = std::fs::read_to_string(&index)
            .map_err(|e| format!("reading {}: {e}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", index.display()))?;
        match json.get("_class_name").and_then(|c| c.as_str()) {
            None => Ok(ModelFamily::Wan),
            Some(class) if class.starts_with("Wan") => Ok(ModelFamily::Wan),
            Some(class) if QWEN_IMAGE_CLASSES.contains(&class) => Ok(ModelFamily::QwenImage),
            Some(class) => Err(format!(
                "{}: pipeline `{class}` is not served by x2v (served: Wan*Pipeline, {})",
                index.display(),
                QWEN_IMAGE_CLASSES.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_names_the_family() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ModelFamily::detect(dir.path()), Ok(ModelFamily::Wan), "original layout");
        let index = dir.path().join("model_index.json");
        std::fs::write(&index, r#"{"_class_name": "WanImageToVideoPipeline"}"#).unwrap();
        assert_eq!(ModelFamily::detect(dir.path()), Ok(ModelFamily::Wan));
        for class in QWEN_IMAGE_CLASSES {
            std::fs::write(&index, format!(r#"{{"_class_name": "{class}"}}"#)).unwrap();
            assert_eq!(ModelFamily::detect(dir.path()), Ok(ModelFamily::QwenImage), "{class}");
        }
        std::fs::write(&index, r#"{"_class_name": "FluxPipeline"}"#).unwrap();
        let err = ModelFamily::detect(dir.path()).unwrap_err();
        assert!(err.contains("`FluxPipeline` is not served"), "{err}");
        assert!(err.contains("Wan*Pipeline, QwenImagePipeline, QwenImageEditPipeline"), "{err}");
        std::fs::write(&index, "{").unwrap();
        assert!(ModelFamily::detect(dir.path()).unwrap_err().contains("parsing"));
    }

    #[test]
    fn an_empty_model_dir_is_refused_by_stage_name() {
        let config = StageConfig { model_dir: String::new(), ..StageConfig::default() };
        let err = ModelFamily::of(&config, "DiT").unwrap_err();
        assert_eq!(err, "model_dir must name the model directory this DiT loads");
    }
}

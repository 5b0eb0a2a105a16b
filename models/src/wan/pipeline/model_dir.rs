//! Where each Wan2.1 component lives in a model directory, in both published layouts:
//!
//! - diffusers (`model_index.json`): `tokenizer/`, `text_encoder/`, `transformer/`, `vae/`,
//!   `image_encoder/`, `image_processor/` (I2V), each a `save_pretrained` folder;
//! - the original release: `models_t5_umt5-xxl-enc-bf16.pth`, tokenizer folder `google/umt5-xxl/`,
//!   `config.json` + safetensors for the DiT at the top level, `Wan2.1_VAE.pth`, and
//!   `models_clip_*.pth` (I2V).
//!
//! Wan2.2 A14B splits the DiT into two experts: `transformer/` (high noise) and `transformer_2/`
//! (low noise) with `boundary_ratio` in `model_index.json` (diffusers), or `high_noise_model/` and
//! `low_noise_model/` (original release, whose boundary is fixed per task: 0.875 for T2V, 0.9 for
//! I2V). Its I2V model conditions on the image latents alone: no CLIP image encoder.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::error::{Component, Error};
use crate::wan::transformer::WanTransformer3DModel;

use super::LatentSpec;
use super::dit::{LowNoiseExpert, WanDit};
use crate::wan::vae::VaeConfig;

/// The `model_index.json` fields that shape a Wan pipeline.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
struct ModelIndex {
    /// Wan2.2 A14B: `transformer_2` takes over below `boundary_ratio · 1000`.
    #[serde(default)]
    boundary_ratio: Option<f64>,
    /// Wan2.2 TI2V-5B: per-token timesteps with the first frame kept clean.
    #[serde(default)]
    expand_timesteps: bool,
}

/// The published Wan2.2 A14B boundaries of the original release (its `wan/configs/`).
const ORIGINAL_BOUNDARY_T2V: f64 = 0.875;
const ORIGINAL_BOUNDARY_I2V: f64 = 0.9;

/// The original release's Wan2.2 VAE file (TI2V-5B).
const WAN22_VAE: &str = "Wan2.2_VAE.pth";

/// Where a model's DiT weights are: one transformer, or Wan2.2 A14B's two experts.
#[derive(Debug, Clone, PartialEq)]
pub struct DitDirs {
    /// `transformer/` (or the top level / `high_noise_model/` of the original release): every step,
    /// or with a low-noise expert the steps with `t ≥ boundary_ratio · 1000`.
    pub high: PathBuf,
    /// `transformer_2/` (`low_noise_model/`) and the boundary ratio where it takes over.
    pub low: Option<(PathBuf, f64)>,
}

/// Which layout a model directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `model_index.json` with one folder per component.
    Diffusers,
    /// The original Wan release files.
    Original,
}

/// A located model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    layout: Layout,
    /// `model_index.json` (diffusers layout).
    index: ModelIndex,
}

impl ModelDir {
    /// Detects the layout: `model_index.json` means diffusers, anything else the original one.
    pub fn open(root: &Path) -> Result<Self, Error> {
        if !root.is_dir() {
            return Err(Error::NotADirectory(root.to_owned()));
        }
        let index_path = root.join("model_index.json");
        let (layout, index) = if index_path.is_file() {
            let bad =
                |message: String| Error::config(Component::Transformer, Some(&index_path), message);
            let text = std::fs::read_to_string(&index_path).map_err(|e| bad(e.to_string()))?;
            let index: ModelIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            if let Some(r) = index.boundary_ratio
                && !(r > 0.0 && r < 1.0)
            {
                return Err(bad(format!("boundary_ratio must lie in (0, 1), got {r}")));
            }
            if index.expand_timesteps && index.boundary_ratio.is_some() {
                return Err(bad(
                    "expand_timesteps (TI2V-5B) and boundary_ratio (A14B) exclude each other"
                        .into(),
                ));
            }
            (Layout::Diffusers, index)
        } else {
            (Layout::Original, ModelIndex::default())
        };
        Ok(ModelDir { root: root.to_owned(), layout, index })
    }

    /// Whether this is the original release of Wan2.2 A14B (two expert folders).
    fn original_experts(&self) -> bool {
        self.layout == Layout::Original && self.root.join("high_noise_model/config.json").is_file()
    }

    /// Whether the I2V path encodes the image with CLIP. A one-transformer model is Wan2.1, whose
    /// I2V always does (a directory without `image_encoder/` is then incomplete); a two-expert
    /// model follows its DiT's config as diffusers does (`image_dim` set: CLIP attention), and
    /// Wan2.2 A14B has none: it conditions on the image latents alone.
    pub fn uses_clip(&self) -> Result<bool, Error> {
        if self.original_experts() || self.ti2v() {
            return Ok(false);
        }
        if self.index.boundary_ratio.is_none() {
            return Ok(true);
        }
        let config = self.dits()?.high.join("config.json");
        Ok(crate::wan::config::Config::from_file(&config)?.0.takes_image_embeds())
    }

    /// Whether this is Wan2.2 TI2V-5B: per-token timesteps, and for image-to-video the first
    /// latent frame held at the image's latents (diffusers' `expand_timesteps`).
    pub fn ti2v(&self) -> bool {
        match self.layout {
            Layout::Diffusers => self.index.expand_timesteps,
            Layout::Original => self.root.join(WAN22_VAE).is_file(),
        }
    }

    /// The VAE's config: `vae/config.json`, or the preset of the original VAE file.
    pub fn vae_config(&self) -> Result<VaeConfig, Error> {
        let path = self.vae()?;
        crate::config::read_config(&path, || VaeConfig::for_original_file(&path))
    }

    /// The latents the DiT denoises, as the VAE lays them out.
    pub fn latent_spec(&self) -> Result<LatentSpec, Error> {
        Ok(LatentSpec::of_vae(&self.vae_config()?))
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
        self.component("VAE", "vae", &["Wan2.1_VAE.pth", WAN22_VAE])
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
    /// For Wan2.2 A14B this is the high-noise expert; [`ModelDir::dits`] names both.
    pub fn transformer(&self) -> Result<PathBuf, Error> {
        Ok(self.dits()?.high)
    }

    /// The DiT folders: one, or Wan2.2 A14B's high- and low-noise experts with their boundary.
    pub fn dits(&self) -> Result<DitDirs, Error> {
        let config_in = |folder: &str| -> Result<PathBuf, Error> {
            let dir = if folder.is_empty() { self.root.clone() } else { self.root.join(folder) };
            if dir.join("config.json").is_file() {
                Ok(dir)
            } else {
                Err(self.missing("DiT", dir.join("config.json").display().to_string()))
            }
        };
        match self.layout {
            Layout::Diffusers => Ok(DitDirs {
                high: config_in("transformer")?,
                low: match self.index.boundary_ratio {
                    Some(ratio) => Some((config_in("transformer_2")?, ratio)),
                    None => None,
                },
            }),
            Layout::Original if self.original_experts() => {
                let high = config_in("high_noise_model")?;
                let low = config_in("low_noise_model")?;
                let (config, _) = crate::wan::config::Config::from_file(&high.join("config.json"))?;
                let ratio = if config.in_channels == config.out_channels {
                    ORIGINAL_BOUNDARY_T2V
                } else {
                    ORIGINAL_BOUNDARY_I2V
                };
                Ok(DitDirs { high, low: Some((low, ratio)) })
            }
            Layout::Original => Ok(DitDirs { high: config_in("")?, low: None }),
        }
    }
}

/// Loads only the DiT of a model directory (either layout) in `kind`: one transformer, or both
/// experts of Wan2.2 A14B; TI2V-5B's reads the VAE's latent layout from its config.
pub fn load_dit(model_dir: &Path, device: Device, kind: Kind) -> Result<WanDit, Error> {
    let dir = ModelDir::open(model_dir)?;
    let ti2v = dir.ti2v().then(|| dir.latent_spec()).transpose()?;
    let dirs = dir.dits()?;
    let high = WanTransformer3DModel::load(&dirs.high, device, kind)?;
    let low = match dirs.low {
        None => None,
        Some((dir, boundary_ratio)) => {
            let model = WanTransformer3DModel::load(&dir, device, kind)?;
            Some(LowNoiseExpert { model, boundary_ratio })
        }
    };
    let dit = WanDit::new(high, low)?;
    Ok(match ti2v {
        Some(spec) => dit.ti2v(spec)?,
        None => dit,
    })
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

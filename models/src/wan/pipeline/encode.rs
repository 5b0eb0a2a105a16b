//! The Wan encoder stage: prompt → UMT5 embeddings, and for I2V the first frame → CLIP
//! features and the VAE conditioning tensor, as diffusers' `WanPipeline` /
//! `WanImageToVideoPipeline` compute them before denoising.
//!
//! Boundary: `encode(prompt, negative, image uint8 [H, W, 3]?, geometry, guidance)` → [`Phase1`]
//! with `prompt_embeds [1, L, text_dim]` fp32 (`L` ≤ 512 the prompt's tokens, `</s>` included: no
//! padding travels to the DiT stage, which zero-pads to 512 rows), the negative the same only when
//! guidance is on (> 1), and for I2V `condition [1, 20, T, H/8, W/8]` fp32 with, for Wan2.1,
//! `image_embeds [1, N, clip_dim]` fp32 (Wan2.2 A14B's I2V experts take no CLIP features).
//! A Wan2.2 TI2V-5B model encodes text alone or, loaded for I2V, text and an optional first frame,
//! whose normalised VAE latents `[1, 48, 1, H/16, W/16]` are the `condition`.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::model_dir::ModelDir;
use super::{Geometry, LatentSpec, Phase1};
use crate::error::{Component, Error};
use crate::wan::image_encoder::{ClipPreprocess, ClipVisionModel};
use crate::wan::text_encoder::UMT5EncoderModel;
use crate::wan::tokenizer::T5Tokenizer;
use crate::wan::vae::{AutoencoderKLWan, VaeParts};
use crate::weights;

/// Which Wan task a model directory serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Text to video.
    T2v,
    /// Image (first frame) to video.
    I2v,
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "t2v" => Ok(Task::T2v),
            "i2v" => Ok(Task::I2v),
            other => Err(format!("unknown task `{other}` (expected t2v or i2v)")),
        }
    }
}

/// The encoder stage's models: tokenizer + UMT5, plus the VAE encoder (and for Wan2.1 CLIP) for
/// I2V, and the VAE encoder for video-to-video.
#[derive(Debug)]
pub struct WanEncoder {
    task: Task,
    tokenizer: T5Tokenizer,
    text_encoder: UMT5EncoderModel,
    /// Wan2.1 I2V's CLIP features; T2V models and Wan2.2 A14B I2V have none.
    clip: Option<(ClipVisionModel, ClipPreprocess)>,
    /// The VAE's encoder half: I2V's conditioning and V2V's input latents.
    vae: Option<AutoencoderKLWan>,
    /// Wan2.2 TI2V-5B: the image is optional and conditions through latent frame 0.
    ti2v: bool,
    /// The VAE's latent layout (the geometry rules follow its spatial factor).
    latents: LatentSpec,
}

/// `CLIPImageProcessor`'s `preprocessor_config.json` fields the Wan path uses.
#[derive(Debug, serde::Deserialize)]
struct ProcessorConfig {
    size: Option<serde_json::Value>,
    crop_size: Option<serde_json::Value>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
}

fn edge(v: &Option<serde_json::Value>, keys: &[&str]) -> Option<i64> {
    let v = v.as_ref()?;
    v.as_i64().or_else(|| keys.iter().find_map(|k| v.get(k).and_then(|x| x.as_i64())))
}

fn read_processor(path: &Path) -> Result<ClipPreprocess, Error> {
    let bad = |message: String| Error::config(Component::ImageProcessor, Some(path), message);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let c: ProcessorConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let d = ClipPreprocess::default();
    Ok(ClipPreprocess {
        shortest_edge: edge(&c.size, &["shortest_edge"]).unwrap_or(d.shortest_edge),
        crop: edge(&c.crop_size, &["height"]).unwrap_or(d.crop),
        mean: c.image_mean.unwrap_or(d.mean),
        std: c.image_std.unwrap_or(d.std),
    })
}

impl WanEncoder {
    /// Loads the encoder-stage components of `task` from a model directory (either layout).
    /// `kind` is the weights' dtype (fp32, or bf16/fp16 with the components' fp32 keep-lists).
    pub fn load(model_dir: &Path, task: Task, device: Device, kind: Kind) -> Result<Self, Error> {
        Self::load_with(model_dir, task, false, device, kind)
    }

    /// [`WanEncoder::load`], and with `video_to_video` the VAE encoder for
    /// [`WanEncoder::encode_video`] whatever the task (an I2V model loads it anyway).
    pub fn load_with(
        model_dir: &Path,
        task: Task,
        video_to_video: bool,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let dir = ModelDir::open(model_dir)?;
        let ti2v = dir.ti2v();
        if ti2v && video_to_video {
            return Err(Error::config(
                Component::Encode,
                Some(model_dir),
                "video-to-video is not offered on a TI2V model (diffusers has no such pipeline)",
            ));
        }
        let latents = dir.latent_spec()?;
        // Locate every file first, so that a missing one is reported before any loading.
        let tok_path = dir.tokenizer()?;
        let te_path = dir.text_encoder()?;
        let clip_path = match task {
            Task::I2v if dir.uses_clip()? => Some(dir.image_encoder()?),
            _ => None,
        };
        let vae_path = if task == Task::I2v || video_to_video { Some(dir.vae()?) } else { None };
        let tokenizer = T5Tokenizer::from_file(&tok_path)?;
        let text_encoder = UMT5EncoderModel::load(&te_path, None, device, kind)?;
        let clip = match clip_path {
            None => None,
            Some(path) => {
                let preprocess = match dir.image_processor() {
                    Some(p) => read_processor(&p)?,
                    None => ClipPreprocess::default(),
                };
                Some((ClipVisionModel::load(&path, None, device, kind)?, preprocess))
            }
        };
        let vae = match vae_path {
            None => None,
            Some(path) => {
                Some(AutoencoderKLWan::load_parts(&path, None, device, kind, VaeParts::Encoder)?)
            }
        };
        Ok(WanEncoder { task, tokenizer, text_encoder, clip, vae, ti2v, latents })
    }

    /// Whether the model is Wan2.2 TI2V-5B (text-to-video, and image-to-video when loaded for it).
    pub fn is_ti2v(&self) -> bool {
        self.ti2v
    }

    pub fn task(&self) -> Task {
        self.task
    }

    /// The loaded components, by their diffusers folder names.
    pub fn components(&self) -> Vec<&'static str> {
        let mut names = vec!["tokenizer", "text_encoder"];
        if self.clip.is_some() {
            names.push("image_encoder");
        }
        if self.vae.is_some() {
            names.push("vae.encoder");
        }
        names
    }

    /// Bytes held by the loaded parameters (UMT5, plus CLIP and the VAE encoder when loaded).
    pub fn parameter_bytes(&self) -> u64 {
        std::iter::once(self.text_encoder.var_store())
            .chain(self.clip.iter().map(|(clip, _)| clip.var_store()))
            .chain(self.vae.iter().map(|vae| vae.var_store()))
            .map(weights::parameter_bytes)
            .sum()
    }

    /// Builds the DiT stage's input. `negative_prompt` defaults to `""` and is encoded only when
    /// `guidance_scale > 1`. `image` (I2V only, required there) is an RGB `uint8 [H, W, 3]`; an
    /// image of another size than `geometry` is resized with antialiased bicubic
    /// interpolation, which may differ slightly from PIL's resampling.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        image: Option<&Tensor>,
        geometry: Geometry,
        guidance_scale: f64,
    ) -> Result<Phase1, Error> {
        geometry.validate_for(self.latents).map_err(|m| Error::input(Component::Encode, m))?;
        if guidance_scale.is_nan() {
            return Err(Error::input(Component::Encode, "guidance_scale is NaN"));
        }
        let _guard = tch::no_grad_guard();
        let embed = |text: &str| -> Result<Tensor, Error> {
            let rows = self.text_encoder.prompt_embeds_trimmed(&self.tokenizer, &[text])?;
            let e = rows.into_iter().next().expect("one prompt in, one row set out");
            Ok(e.to_kind(Kind::Float).unsqueeze(0))
        };
        let prompt_embeds = embed(prompt)?;
        let negative_prompt_embeds =
            if guidance_scale > 1.0 { Some(embed(negative_prompt.unwrap_or(""))?) } else { None };
        let (image_embeds, condition) = match (self.task, image) {
            _ if self.ti2v => (None, self.ti2v_condition(image, geometry)?),
            (Task::T2v, None) => (None, None),
            (Task::T2v, Some(_)) => {
                return Err(Error::input(Component::Encode, "a T2V model takes no image"));
            }
            (Task::I2v, None) => {
                return Err(Error::input(Component::Encode, "an I2V model needs an image"));
            }
            (Task::I2v, Some(img)) => {
                let (embeds, cond) = self.encode_image(img, geometry)?;
                (embeds, Some(cond))
            }
        };
        Ok(Phase1 {
            geometry,
            prompt_embeds,
            negative_prompt_embeds,
            image_embeds,
            condition,
            video_latents: None,
        })
    }

    /// Video-to-video's input latents (`WanVideoToVideoPipeline.prepare_latents` before the
    /// noise): `video` RGB `uint8 [F, H, W, 3]` with `F = geometry.frames`, each frame resized to
    /// the geometry as [`WanEncoder::encode`] resizes an image, scaled to `[-1, 1]`, VAE-encoded
    /// (posterior mode) and normalised by the VAE's latent statistics: `[1, 16, T, H/8, W/8]` fp32.
    /// Needs the VAE encoder ([`WanEncoder::load_with`]).
    pub fn encode_video(&self, video: &Tensor, geometry: Geometry) -> Result<Tensor, Error> {
        geometry.validate().map_err(|m| Error::input(Component::Encode, m))?;
        let vae = self.vae.as_ref().ok_or_else(|| {
            Error::input(Component::Encode, "this encoder was loaded without video-to-video")
        })?;
        let size = video.size();
        if size.len() != 4 || size[3] != 3 || video.kind() != Kind::Uint8 || size.contains(&0) {
            return Err(Error::input(
                Component::Encode,
                format!(
                    "the video must be RGB uint8 [F, H, W, 3], got {:?} {size:?}",
                    video.kind()
                ),
            ));
        }
        if size[0] != geometry.frames {
            return Err(Error::input(
                Component::Encode,
                format!("the video has {} frames, the job {}", size[0], geometry.frames),
            ));
        }
        let _guard = tch::no_grad_guard();
        let x = resized(&video.permute([0, 3, 1, 2]), geometry);
        let x = (x / 255.0 * 2.0 - 1.0).permute([1, 0, 2, 3]).unsqueeze(0);
        vae.encode_normalized(&x)
    }

    /// TI2V-5B's conditioning: the first frame's normalised VAE latents (posterior mode, the
    /// image alone encoded as a one-frame video), or none without an image.
    fn ti2v_condition(&self, image: Option<&Tensor>, g: Geometry) -> Result<Option<Tensor>, Error> {
        let Some(image) = image else { return Ok(None) };
        let vae = self.vae.as_ref().ok_or_else(|| {
            Error::input(
                Component::Encode,
                "this TI2V encoder was loaded for text-to-video; load it for i2v to take an image",
            )
        })?;
        check_image(image)?;
        let x = resized(&image.permute([2, 0, 1]).unsqueeze(0), g) / 255.0 * 2.0 - 1.0;
        Ok(Some(vae.encode_normalized(&x.unsqueeze(2))?))
    }

    fn encode_image(
        &self,
        image: &Tensor,
        geometry: Geometry,
    ) -> Result<(Option<Tensor>, Tensor), Error> {
        let vae = self.vae.as_ref().expect("an I2V encoder holds the VAE encoder");
        check_image(image)?;
        // encode_image: CLIPImageProcessor → CLIPVisionModel hidden_states[-2].
        let image_embeds = match &self.clip {
            Some((clip, preprocess)) => {
                Some(clip.penultimate(&preprocess.apply(image)?)?.to_kind(Kind::Float))
            }
            None => None,
        };
        // VideoProcessor.preprocess(image, height, width): [1, 3, H, W] in [-1, 1].
        let x = resized(&image.permute([2, 0, 1]).unsqueeze(0), geometry) / 255.0 * 2.0 - 1.0;
        let condition = vae.i2v_condition(&x, geometry.frames)?.to_kind(Kind::Float);
        Ok((image_embeds, condition))
    }
}

/// An input image must be RGB `uint8 [H, W, 3]`.
fn check_image(image: &Tensor) -> Result<(), Error> {
    let size = image.size();
    if size.len() != 3 || size[2] != 3 || image.kind() != Kind::Uint8 || size.contains(&0) {
        return Err(Error::input(
            Component::Encode,
            format!("the image must be RGB uint8 [H, W, 3], got {:?} {size:?}", image.kind()),
        ));
    }
    Ok(())
}

/// RGB frames `uint8 [N, h, w, 3]` at `height`×`width`, resized as the encoder resizes an input
/// image or video (antialiased bicubic, rounded); unchanged when they have that size. A video
/// extension resizes the frames it keeps with it, so that they meet the generated ones.
pub fn resize_frames(frames: &Tensor, height: i64, width: i64) -> Tensor {
    let geometry = Geometry { frames: 1, height, width };
    let _guard = tch::no_grad_guard();
    resized(&frames.permute([0, 3, 1, 2]), geometry).to_kind(Kind::Uint8).permute([0, 2, 3, 1])
}

/// `uint8 [N, 3, h, w]` images as fp32 `[N, 3, H, W]` in `[0, 255]` at the geometry's size:
/// unchanged when they have it, else resized with antialiased bicubic interpolation and rounded.
fn resized(images: &Tensor, geometry: Geometry) -> Tensor {
    let (h, w) = (geometry.height, geometry.width);
    let size = images.size();
    let x = images.to_kind(Kind::Float);
    if (size[2], size[3]) == (h, w) {
        x
    } else {
        x.internal_upsample_bicubic2d_aa([h, w], false, None, None).round().clamp(0.0, 255.0)
    }
}

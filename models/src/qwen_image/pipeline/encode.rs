//! The Qwen-Image encoder stage: prompts (and, for the edit models, input images) → the DiT
//! stage's input, as diffusers' pipelines compute it before denoising.
//!
//! - Text to image: the T2I template, the tokenizer (at most 1024 + 34 tokens), Qwen2.5-VL's last
//!   hidden states without the 34 template tokens, cut to 512 rows.
//! - Edit / EditPlus: each input image is resized (PIL Lanczos) to its condition sizes; the
//!   vision-language copies go through the Qwen2-VL processor and the vision tower, their
//!   `<|image_pad|>` tokens placed in the Edit (one image) or EditPlus ("Picture i:") template;
//!   the hidden states drop the first 64 tokens and are not cut. The VAE copies are encoded to
//!   normalised latents (`mode()`), one per image. The negative prompt is encoded with the same
//!   images. Text positions use the trained 3D M-RoPE (see the README).
//!
//! Boundary: `encode(prompt, negative, images, size, true_cfg_scale)` → [`Phase1`] with the
//! embeddings in the text encoder's dtype.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::model_dir::{ModelDir, Variant};
use super::{ImageGeometry, MAX_INPUT_IMAGES, Phase1};
use crate::config::read_config_file;
use crate::error::{Component, Error};
use crate::qwen_image::processor::{
    EditVariant, ProcessorConfig, VlImages, default_output_size, edit_inputs, process_images,
};
use crate::qwen_image::resize::RgbImage;
use crate::qwen_image::text_encoder::QwenVlTextEncoder;
use crate::qwen_image::tokenizer::{
    MAX_SEQUENCE_LENGTH, PromptTemplate, QwenTokenizer, prompt_embeds,
};
use crate::qwen_image::vae::QwenImageVae;
use crate::wan::vae::VaeParts;
use crate::weights;

/// The edit models' image path: the Qwen2-VL processor settings and the VAE encoder.
#[derive(Debug)]
struct ImageBranch {
    processor: ProcessorConfig,
    vae: QwenImageVae,
}

/// The encoder stage's models: tokenizer and Qwen2.5-VL, plus the VAE encoder for edits.
#[derive(Debug)]
pub struct QwenEncoder {
    variant: Variant,
    tokenizer: QwenTokenizer,
    text_encoder: QwenVlTextEncoder,
    image: Option<ImageBranch>,
}

/// One prompt's embeddings and mask.
type Embedded = (Tensor, Option<Tensor>);

/// What an edit's prompts are encoded with: the input images through the Qwen2-VL processor and
/// the pipeline's template.
struct EditPrompts {
    vl: VlImages,
    template: PromptTemplate,
    merge: i64,
}

impl QwenEncoder {
    /// Loads the encoder-stage components of a Qwen-Image model directory in `kind`.
    pub fn load(model_dir: &Path, device: Device, kind: Kind) -> Result<Self, Error> {
        let dir = ModelDir::open(model_dir)?;
        // Locate every part first, so that a missing one is reported before any loading.
        let tok_path = dir.tokenizer()?;
        let te_path = dir.text_encoder()?;
        let image_paths = match dir.variant().is_edit() {
            true => Some((dir.processor()?, dir.vae()?)),
            false => None,
        };
        let tokenizer = QwenTokenizer::from_file(&tok_path)?;
        let text_encoder = QwenVlTextEncoder::load(&te_path, None, device, kind)?;
        let image = match image_paths {
            None => None,
            Some((proc_dir, vae_path)) => Some(ImageBranch {
                processor: read_config_file(&proc_dir.join("preprocessor_config.json"))?,
                vae: QwenImageVae::load_parts(&vae_path, device, kind, VaeParts::Encoder)?,
            }),
        };
        Ok(QwenEncoder { variant: dir.variant(), tokenizer, text_encoder, image })
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Bytes held by the loaded parameters.
    pub fn parameter_bytes(&self) -> u64 {
        let vae = self.image.iter().map(|b| b.vae.inner().var_store());
        std::iter::once(self.text_encoder.var_store())
            .chain(vae)
            .map(weights::parameter_bytes)
            .sum()
    }

    /// The output size of a job: `size` floored to multiples of 16 when given, else (edits) the
    /// ~1 MP size at the aspect of the first (Edit) or last (EditPlus) input image. Text to image
    /// needs a size.
    pub fn geometry(
        &self,
        size: Option<(i64, i64)>,
        images: &[RgbImage],
    ) -> Result<ImageGeometry, Error> {
        let g = match (size, self.edit_variant()) {
            (Some((w, h)), _) => ImageGeometry::floored(w, h),
            (None, Some(v)) => {
                let (w, h) = default_output_size(v, images, super::PIXELS_PER_TOKEN)?;
                ImageGeometry { height: h, width: w }
            }
            (None, None) => {
                return Err(Error::input(Component::Encode, "text to image needs an output size"));
            }
        };
        g.validate().map_err(|m| Error::input(Component::Encode, m))?;
        Ok(g)
    }

    fn edit_variant(&self) -> Option<EditVariant> {
        match self.variant {
            Variant::TextToImage => None,
            Variant::Edit => Some(EditVariant::Edit),
            Variant::EditPlus => Some(EditVariant::EditPlus),
        }
    }

    fn check_images(&self, images: &[RgbImage]) -> Result<(), Error> {
        let max = self.variant.max_images();
        let n = images.len();
        let msg = match self.variant {
            Variant::TextToImage if n > 0 => "a text-to-image model takes no input image".into(),
            Variant::Edit | Variant::EditPlus if n == 0 => "an edit needs an input image".into(),
            _ if n > max => {
                format!("{} takes at most {max} input image(s), got {n}", self.variant.class_name())
            }
            _ => return Ok(()),
        };
        Err(Error::input(Component::Encode, msg))
    }

    /// Builds the DiT stage's input. `negative_prompt` (default `" "`, as the Qwen-Image
    /// examples) is encoded only when `true_cfg_scale > 1`. `images` are the edit inputs, in
    /// order; `size` is `(width, height)`.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        images: &[RgbImage],
        size: Option<(i64, i64)>,
        true_cfg_scale: f64,
    ) -> Result<Phase1, Error> {
        if !true_cfg_scale.is_finite() {
            return Err(Error::input(Component::Encode, "true_cfg_scale must be finite"));
        }
        self.check_images(images)?;
        debug_assert!(images.len() <= MAX_INPUT_IMAGES);
        let geometry = self.geometry(size, images)?;
        let _guard = tch::no_grad_guard();
        let (prompts, image_latents) = self.prepare_images(images)?;
        let embed = |text: &str| match &prompts {
            Some(p) => {
                self.embed(text, p.template, Some((&p.vl.pixel_values, &p.vl.grid_thw)), p.merge)
            }
            None => self.embed(text, PromptTemplate::TextToImage, None, 2),
        };
        let (prompt_embeds, prompt_mask) = embed(prompt)?;
        let (negative_prompt_embeds, negative_prompt_mask) = if true_cfg_scale > 1.0 {
            let (e, m) = embed(negative_prompt.unwrap_or(" "))?;
            (Some(e), m)
        } else {
            (None, None)
        };
        Ok(Phase1 {
            geometry,
            prompt_embeds,
            prompt_mask,
            negative_prompt_embeds,
            negative_prompt_mask,
            image_latents,
        })
    }

    /// Edits: the vision-language inputs every prompt is encoded with, and each input image's
    /// normalised VAE latent. Text to image: neither.
    fn prepare_images(
        &self,
        images: &[RgbImage],
    ) -> Result<(Option<EditPrompts>, Vec<Tensor>), Error> {
        let (Some(branch), Some(variant)) = (&self.image, self.edit_variant()) else {
            return Ok((None, Vec::new()));
        };
        let inputs = edit_inputs(variant, images)?;
        let vl = process_images(&inputs.vl_images, &branch.processor)?;
        let latents = inputs
            .vae_images
            .iter()
            .map(|x| branch.vae.encode_image(x))
            .collect::<Result<Vec<_>, _>>()?;
        let template = match variant {
            EditVariant::Edit => PromptTemplate::Edit,
            EditVariant::EditPlus => PromptTemplate::EditPlus { images: images.len() },
        };
        Ok((Some(EditPrompts { vl, template, merge: branch.processor.merge_size }), latents))
    }

    /// One prompt through the template, the tokenizer and the text encoder.
    fn embed(
        &self,
        text: &str,
        template: PromptTemplate,
        images: Option<(&Tensor, &Vec<[i64; 3]>)>,
        merge: i64,
    ) -> Result<Embedded, Error> {
        let grids: &[[i64; 3]] = images.map(|(_, g)| g.as_slice()).unwrap_or(&[]);
        let batch = self.tokenizer.encode(&[text.to_owned()], template, grids, merge)?;
        let device = self.text_encoder.var_store().device();
        let ids = batch.input_ids.to_device(device);
        let mask = batch.attention_mask.to_device(device);
        let vision = images.map(|(p, g)| (p.to_device(device), g.as_slice()));
        let hidden =
            self.text_encoder.forward(&ids, &mask, vision.as_ref().map(|(p, g)| (p, *g)))?;
        let max_len = match template {
            PromptTemplate::TextToImage => MAX_SEQUENCE_LENGTH,
            _ => i64::MAX,
        };
        Ok(prompt_embeds(&hidden, &mask, template.drop_idx(), max_len))
    }
}

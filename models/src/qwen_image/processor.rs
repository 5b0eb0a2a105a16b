//! The image side of Qwen-Image's inputs: the Qwen2-VL image processor (vision-tower
//! `pixel_values` and `image_grid_thw`), the edit pipelines' condition-image sizes and the VAE
//! input images.
//!
//! References:
//! - transformers `models/qwen2_vl/image_processing_pil_qwen2_vl.py` (`smart_resize`,
//!   `Qwen2VLImageProcessorPil`): the backend `Qwen2VLProcessor.from_pretrained` resolves to when
//!   torchvision is not installed. Each image is resized with Pillow (bicubic) to the
//!   `smart_resize` size, rescaled in float64 then cast to float32, normalised with the CLIP mean
//!   and std in float32, and cut into `patch x patch` patches, repeated `temporal_patch_size`
//!   times, in merge-window order.
//! - diffusers `pipelines/qwenimage/pipeline_qwenimage_edit.py` and
//!   `pipeline_qwenimage_edit_plus.py` (`calculate_dimensions`, `CONDITION_IMAGE_SIZE`,
//!   `VAE_IMAGE_SIZE`) and `image_processor.py` (`VaeImageProcessor`: Lanczos resize, `x / 255`,
//!   `2x - 1`).

use serde::Deserialize;
use tch::Tensor;

use crate::config::ModelConfig;
use crate::error::{Component, Error};

use super::resize::{Filter, RgbImage, resize};

/// `processor/preprocessor_config.json` (the Qwen2-VL image processor's settings).
///
/// `min_pixels` / `max_pixels` win over `size.shortest_edge` / `size.longest_edge`, as in
/// transformers; missing fields take transformers' class defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "RawProcessorConfig")]
pub struct ProcessorConfig {
    pub min_pixels: i64,
    pub max_pixels: i64,
    pub patch_size: i64,
    pub temporal_patch_size: i64,
    pub merge_size: i64,
    pub image_mean: Vec<f64>,
    pub image_std: Vec<f64>,
    pub rescale_factor: f64,
    /// A `PIL.Image.Resampling` number (3: bicubic).
    pub resample: i64,
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<i64>,
    longest_edge: Option<i64>,
}

#[derive(Deserialize)]
struct RawProcessorConfig {
    min_pixels: Option<i64>,
    max_pixels: Option<i64>,
    size: Option<RawSize>,
    patch_size: Option<i64>,
    temporal_patch_size: Option<i64>,
    merge_size: Option<i64>,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    rescale_factor: Option<f64>,
    resample: Option<i64>,
}

/// OpenAI CLIP's normalisation constants (transformers' `OPENAI_CLIP_MEAN` / `_STD`).
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl From<RawProcessorConfig> for ProcessorConfig {
    fn from(r: RawProcessorConfig) -> Self {
        let size = r.size.unwrap_or(RawSize { shortest_edge: None, longest_edge: None });
        ProcessorConfig {
            min_pixels: r.min_pixels.or(size.shortest_edge).unwrap_or(56 * 56),
            max_pixels: r.max_pixels.or(size.longest_edge).unwrap_or(28 * 28 * 1280),
            patch_size: r.patch_size.unwrap_or(14),
            temporal_patch_size: r.temporal_patch_size.unwrap_or(2),
            merge_size: r.merge_size.unwrap_or(2),
            image_mean: r.image_mean.unwrap_or_else(|| CLIP_MEAN.to_vec()),
            image_std: r.image_std.unwrap_or_else(|| CLIP_STD.to_vec()),
            rescale_factor: r.rescale_factor.unwrap_or(1.0 / 255.0),
            resample: r.resample.unwrap_or(3),
        }
    }
}

impl Default for ProcessorConfig {
    /// The published Qwen2.5-VL / Qwen-Image settings.
    fn default() -> Self {
        ProcessorConfig {
            min_pixels: 3136,
            max_pixels: 12845056,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN.to_vec(),
            image_std: CLIP_STD.to_vec(),
            rescale_factor: 1.0 / 255.0,
            resample: 3,
        }
    }
}

impl ModelConfig for ProcessorConfig {
    const COMPONENT: Component = Component::ImageProcessor;

    fn validate(&self) -> Result<(), String> {
        if self.patch_size < 1 || self.merge_size < 1 || self.temporal_patch_size < 1 {
            return Err("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        if self.min_pixels < 1 || self.max_pixels < self.min_pixels {
            return Err(format!("bad pixel range {}..{}", self.min_pixels, self.max_pixels));
        }
        if self.image_mean.len() != 3 || self.image_std.len() != 3 {
            return Err("image_mean and image_std need 3 values (RGB)".into());
        }
        if Filter::from_pil(self.resample).is_none() {
            return Err(format!(
                "unsupported resample {} (x2v has bilinear, bicubic, Lanczos)",
                self.resample
            ));
        }
        Ok(())
    }
}

fn input_err(message: String) -> Error {
    Error::Input { component: Component::ImageProcessor, message }
}

/// transformers' `smart_resize`: the `(height, width)` nearest to the image's, both multiples of
/// `factor`, with the pixel count within `[min_pixels, max_pixels]`. Python's `round` (ties to
/// even) is kept.
pub fn smart_resize(
    height: i64,
    width: i64,
    factor: i64,
    min_pixels: i64,
    max_pixels: i64,
) -> Result<(i64, i64), Error> {
    if height < 1 || width < 1 || factor < 1 {
        return Err(input_err(format!("cannot resize a {width}x{height} image")));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(input_err(format!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as i64 * factor;
    let mut w_bar = (w / f).round_ties_even() as i64 * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as i64 * factor);
        w_bar = factor.max((w / beta / f).floor() as i64 * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() as i64 * factor;
        w_bar = (w * beta / f).ceil() as i64 * factor;
    }
    Ok((h_bar, w_bar))
}

/// The vision tower's image inputs.
#[derive(Debug)]
pub struct VlImages {
    /// `[N, 3 * temporal_patch_size * patch_size²]` float32: every image's patches, concatenated.
    pub pixel_values: Tensor,
    /// `(t, h, w)` in patches, one per image.
    pub grid_thw: Vec<[i64; 3]>,
}

/// Rescaled and normalised `CHW` float32 values of an RGB image, as the PIL backend computes
/// them (`(u8 as f64 * rescale) as f32`, then `(x - mean) / std` in float32).
fn normalized_chw(image: &RgbImage, cfg: &ProcessorConfig) -> Vec<f32> {
    let plane = image.width * image.height;
    let mut out = vec![0f32; 3 * plane];
    for c in 0..3 {
        let mean = cfg.image_mean[c] as f32;
        let std = cfg.image_std[c] as f32;
        for (i, px) in image.data.chunks_exact(3).enumerate() {
            let x = (f64::from(px[c]) * cfg.rescale_factor) as f32;
            out[c * plane + i] = (x - mean) / std;
        }
    }
    out
}

/// Appends one image's patches: rows in `(h / merge, w / merge, merge_h, merge_w)` order, each
/// row `(channel, temporal copy, patch_y, patch_x)`.
fn push_patches(
    out: &mut Vec<f32>,
    chw: &[f32],
    height: usize,
    width: usize,
    cfg: &ProcessorConfig,
) {
    let (p, m, t) =
        (cfg.patch_size as usize, cfg.merge_size as usize, cfg.temporal_patch_size as usize);
    let (gh, gw) = (height / p, width / p);
    let plane = height * width;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for c in 0..3 {
                        for _ in 0..t {
                            for py in 0..p {
                                let row = c * plane + (y0 + py) * width + x0;
                                out.extend_from_slice(&chw[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The Qwen2-VL image processor on RGB images: `pixel_values` and `image_grid_thw`.
pub fn process_images(images: &[RgbImage], cfg: &ProcessorConfig) -> Result<VlImages, Error> {
    if images.is_empty() {
        return Err(input_err("no images to process".into()));
    }
    let filter = Filter::from_pil(cfg.resample)
        .ok_or_else(|| input_err(format!("unsupported resample {}", cfg.resample)))?;
    let factor = cfg.patch_size * cfg.merge_size;
    let row_len = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    let mut values = Vec::new();
    let mut grid_thw = Vec::with_capacity(images.len());
    for image in images {
        let (h, w) = smart_resize(
            image.height as i64,
            image.width as i64,
            factor,
            cfg.min_pixels,
            cfg.max_pixels,
        )?;
        let resized = resize(image, w as usize, h as usize, filter)?;
        let chw = normalized_chw(&resized, cfg);
        push_patches(&mut values, &chw, h as usize, w as usize, cfg);
        grid_thw.push([1, h / cfg.patch_size, w / cfg.patch_size]);
    }
    let rows = values.len() as i64 / row_len;
    Ok(VlImages { pixel_values: Tensor::from_slice(&values).view([rows, row_len]), grid_thw })
}

/// diffusers' `calculate_dimensions` (both edit pipelines): the `(width, height)`, multiples of
/// 32 (Python `round`, ties to even), of about `target_area` pixels at `ratio = width / height`.
pub fn calculate_dimensions(target_area: f64, ratio: f64) -> (i64, i64) {
    let width = (target_area * ratio).sqrt();
    let height = width / ratio;
    ((width / 32.0).round_ties_even() as i64 * 32, (height / 32.0).round_ties_even() as i64 * 32)
}

/// Pixel area of the vision-language condition image in `QwenImageEditPlusPipeline`.
pub const CONDITION_IMAGE_SIZE: f64 = 384.0 * 384.0;
/// Pixel area of the VAE condition image (both edit pipelines) and of the default output.
pub const VAE_IMAGE_SIZE: f64 = 1024.0 * 1024.0;

/// Which edit pipeline's condition-image rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditVariant {
    /// `QwenImageEditPipeline`: one image, 1024² area for both the VL and the VAE input.
    Edit,
    /// `QwenImageEditPlusPipeline`: 384² area for the VL input, 1024² for the VAE input.
    EditPlus,
}

/// `(width, height)` of one condition image for the vision-language encoder and for the VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditSizes {
    pub vl: (i64, i64),
    pub vae: (i64, i64),
}

/// The sizes an edit pipeline resizes an input image of `width x height` to.
pub fn edit_condition_sizes(variant: EditVariant, width: usize, height: usize) -> EditSizes {
    let ratio = width as f64 / height as f64;
    let vae = calculate_dimensions(VAE_IMAGE_SIZE, ratio);
    let vl = match variant {
        EditVariant::Edit => vae,
        EditVariant::EditPlus => calculate_dimensions(CONDITION_IMAGE_SIZE, ratio),
    };
    EditSizes { vl, vae }
}

/// The output `(width, height)` when the caller gives none: 1024² area at the aspect of the
/// first (Edit) or last (EditPlus) input image, floored to a multiple of `multiple_of`
/// (`vae_scale_factor * 2`, 16).
pub fn default_output_size(
    variant: EditVariant,
    images: &[RgbImage],
    multiple_of: i64,
) -> Result<(i64, i64), Error> {
    let image = match variant {
        EditVariant::Edit => images.first(),
        EditVariant::EditPlus => images.last(),
    }
    .ok_or_else(|| input_err("an edit needs an input image".into()))?;
    let (w, h) = calculate_dimensions(VAE_IMAGE_SIZE, image.width as f64 / image.height as f64);
    Ok((w / multiple_of * multiple_of, h / multiple_of * multiple_of))
}

/// `VaeImageProcessor.preprocess` of a PIL image: Lanczos resize to `width x height` (none when
/// the size already matches), `x / 255` and `2x - 1` in float32; `[1, 3, height, width]`.
pub fn vae_input(image: &RgbImage, width: usize, height: usize) -> Result<Tensor, Error> {
    let resized = resize(image, width, height, Filter::Lanczos)?;
    let plane = width * height;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = f32::from(px[c]) / 255.0f32;
            out[c * plane + i] = 2.0f32 * x - 1.0f32;
        }
    }
    Ok(Tensor::from_slice(&out).view([1, 3, height as i64, width as i64]))
}

/// An edit pipeline's condition inputs: the images the vision-language encoder sees (before the
/// Qwen2-VL processor's own resize) and the VAE input tensors.
#[derive(Debug)]
pub struct EditInputs {
    pub vl_images: Vec<RgbImage>,
    /// `[1, 3, H, W]` float32 in `[-1, 1]`, one per image.
    pub vae_images: Vec<Tensor>,
}

/// The condition inputs an edit pipeline derives from its input images (Edit takes exactly one).
/// Edit feeds the VAE the already-resized image; EditPlus resizes the original twice.
pub fn edit_inputs(variant: EditVariant, images: &[RgbImage]) -> Result<EditInputs, Error> {
    if images.is_empty() || (variant == EditVariant::Edit && images.len() != 1) {
        return Err(input_err(format!(
            "{variant:?} takes {} image(s), got {}",
            if variant == EditVariant::Edit { "1" } else { "1 or more" },
            images.len()
        )));
    }
    let mut out = EditInputs { vl_images: Vec::new(), vae_images: Vec::new() };
    for image in images {
        let sizes = edit_condition_sizes(variant, image.width, image.height);
        let (vw, vh) = (sizes.vl.0 as usize, sizes.vl.1 as usize);
        let vl = resize(image, vw, vh, Filter::Lanczos)?;
        let (aw, ah) = (sizes.vae.0 as usize, sizes.vae.1 as usize);
        let vae_source = if variant == EditVariant::Edit { &vl } else { image };
        out.vae_images.push(vae_input(vae_source, aw, ah)?);
        out.vl_images.push(vl);
    }
    Ok(out)
}

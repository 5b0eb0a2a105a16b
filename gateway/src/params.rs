//! The typed bodies of the create endpoints, read from a [`Form`] (a JSON object or a multipart
//! form). Each field is read with the type and the bounds that hold whatever model serves the
//! request; the served model's own limits (sizes, steps, frames, images per request) are checked
//! by [`crate::validate`]. The derived schemas are the request bodies of `/openapi.json`, and the
//! document's tests hold its bounds to the constants read here.

use utoipa::ToSchema;
use x2v_queue::MAX_PREVIEWS;

use crate::error::ApiError;
use crate::request::{Form, Upload, choice_enum, decode_data_url};

/// Most characters of a prompt or a negative prompt.
pub const MAX_PROMPT_CHARS: usize = 32_000;
/// Largest seed, 2^53 - 1: clients that read JSON numbers as doubles see every seed exactly.
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// Largest engine rank a request may pin.
pub const MAX_ENGINE_RANK: u64 = 1 << 20;
/// Bounds of `guidance_scale`.
pub const GUIDANCE_SCALE: (f64, f64) = (0.0, 30.0);
/// Bounds of `shift`.
pub const SHIFT: (f64, f64) = (0.01, 100.0);
/// Largest `fps`.
pub const MAX_FPS: u64 = 120;
/// Input images of one edit at most (the OpenAI API's bound; models may allow fewer).
pub const MAX_EDIT_IMAGES: usize = 16;
/// Largest `output_compression` (percent).
pub const MAX_COMPRESSION: u64 = 100;
const IMAGE_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];

/// x2v's sampling extensions, accepted by every create endpoint.
#[derive(Debug, Clone, Default, ToSchema)]
pub struct Sampling {
    /// What the output should not show.
    #[schema(max_length = 32000)]
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise; drawn at random when absent.
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    pub seed: Option<u64>,
    /// Denoising steps, from the model's `min_steps` to its `max_steps`.
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<u64>,
    /// Classifier-free guidance scale (of the high-noise expert on two-expert models).
    #[schema(minimum = 0, maximum = 30)]
    pub guidance_scale: Option<f64>,
    /// Two-expert models (Wan2.2 A14B): the low-noise expert's guidance scale; absent, the
    /// model's default. Refused by one-transformer models.
    #[schema(minimum = 0, maximum = 30)]
    pub guidance_scale_2: Option<f64>,
    /// Shift of the flow-matching noise schedule.
    #[schema(minimum = 0.01, maximum = 100)]
    pub shift: Option<f64>,
    /// LoRA adapters of the model to apply, in order: `[{"name": "style", "scale": 0.8}]`
    /// (`scale` 1 when absent); names are listed by `/v1/models` (`x2v.loras`).
    #[schema(value_type = Option<Vec<LoraParam>>, max_items = 8)]
    pub lora: Option<Vec<x2v_core::lora::LoraRef>>,
    /// Text-encoder engine rank to run on (a live worker's).
    #[schema(minimum = 0, maximum = 1048576)]
    pub encoder_engine_rank: Option<u32>,
    /// Denoising (DiT) engine rank to run on (a live worker's).
    #[schema(minimum = 0, maximum = 1048576)]
    pub dit_engine_rank: Option<u32>,
    /// Decoder engine rank to run on (a live worker's).
    #[schema(minimum = 0, maximum = 1048576)]
    pub decoder_engine_rank: Option<u32>,
}

impl Sampling {
    fn read(form: &Form) -> Result<Self, ApiError> {
        let rank = |key: &str| -> Result<Option<u32>, ApiError> {
            Ok(form.int(key, 0, MAX_ENGINE_RANK)?.map(|r| r as u32))
        };
        Ok(Sampling {
            negative_prompt: prompt(form, "negative_prompt", false)?,
            seed: form.int("seed", 0, MAX_SEED)?,
            num_inference_steps: form.int_from("num_inference_steps", 1)?,
            guidance_scale: form.float("guidance_scale", GUIDANCE_SCALE.0, GUIDANCE_SCALE.1)?,
            guidance_scale_2: form.float("guidance_scale_2", GUIDANCE_SCALE.0, GUIDANCE_SCALE.1)?,
            shift: form.float("shift", SHIFT.0, SHIFT.1)?,
            lora: loras(form)?,
            encoder_engine_rank: rank("encoder_engine_rank")?,
            dit_engine_rank: rank("dit_engine_rank")?,
            decoder_engine_rank: rank("decoder_engine_rank")?,
        })
    }
}

/// One LoRA adapter of a request.
#[derive(Debug, Clone, ToSchema)]
#[allow(dead_code)]
pub struct LoraParam {
    /// An adapter of the model (`/v1/models`: `x2v.loras`).
    #[schema(min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]*$")]
    pub name: String,
    /// Its weight; 1 when absent.
    #[schema(minimum = -10, maximum = 10)]
    pub scale: Option<f64>,
}

/// `lora`: a list of `{"name", "scale"}` objects, each name once.
fn loras(form: &Form) -> Result<Option<Vec<x2v_core::lora::LoraRef>>, ApiError> {
    use x2v_core::lora::{LoraRef, MAX_LORAS, SCALE, check_name};
    let bad = |m: String| ApiError::invalid("lora", m);
    let Some(value) = form.json("lora")? else { return Ok(None) };
    let serde_json::Value::Array(items) = value else {
        return Err(bad("`lora` must be a list of {\"name\", \"scale\"} objects.".into()));
    };
    if items.len() > MAX_LORAS {
        return Err(bad(format!(
            "`lora` takes at most {MAX_LORAS} adapters; got {}.",
            items.len()
        )));
    }
    let mut out: Vec<LoraRef> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let serde_json::Value::Object(o) = item else {
            return Err(bad(format!("`lora[{i}]` must be an object {{\"name\", \"scale\"}}.")));
        };
        if let Some(k) = o.keys().find(|k| !matches!(k.as_str(), "name" | "scale")) {
            return Err(bad(format!("`lora[{i}]` has an unknown field `{k}` (name, scale).")));
        }
        let name = o
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| bad(format!("`lora[{i}].name` must be a string.")))?;
        check_name(name).map_err(|e| bad(format!("`lora[{i}].name`: {e}.")))?;
        let scale = match o.get("scale") {
            None | Some(serde_json::Value::Null) => 1.0,
            // Multipart forms carry numbers as text.
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_str().and_then(|t| t.trim().parse().ok()))
                .filter(|s: &f64| s.is_finite() && (SCALE.0..=SCALE.1).contains(s))
                .ok_or_else(|| {
                    bad(format!(
                        "`lora[{i}].scale` must be a number from {} to {}; got {v}.",
                        SCALE.0, SCALE.1
                    ))
                })?,
        };
        if out.iter().any(|l| l.name == name) {
            return Err(bad(format!("`lora` names `{name}` twice.")));
        }
        out.push(LoraRef { name: name.to_owned(), scale: scale as f32 });
    }
    Ok(Some(out))
}

/// `POST /v1/videos` and `POST /v1/videos/{video_id}/remix` (where absent fields take the
/// source video's settings).
#[derive(Debug, Clone, Default, ToSchema)]
pub struct CreateVideoRequest {
    /// What to generate.
    #[schema(min_length = 1, max_length = 32000, pattern = r"\S")]
    pub prompt: String,
    /// A served model; absent, the first configured model for the task.
    pub model: Option<String>,
    /// Clip length in whole seconds, as text (as OpenAI clients send it) or a number; at most
    /// what the model's `max_frames` hold at its frame rate.
    #[schema(value_type = Option<String>, pattern = "^[0-9]+$")]
    pub seconds: Option<u64>,
    /// `WIDTHxHEIGHT`, one of the model's sizes; absent, its first.
    pub size: Option<String>,
    /// A reference image (PNG, JPEG or WebP) for image to video: a file part, or in JSON
    /// `{"image_url": "data:image/png;base64,..."}`.
    #[schema(value_type = Option<String>, format = Binary)]
    pub input_reference: Option<Upload>,
    /// Frames per second; absent, the model's.
    #[schema(minimum = 1, maximum = 120)]
    pub fps: Option<u64>,
    /// Frames to generate, `4k+1` and at most the model's `max_frames`; wins over `seconds`.
    #[schema(minimum = 1)]
    pub num_frames: Option<u64>,
    #[serde(flatten)]
    #[schema(inline)]
    pub sampling: Sampling,
}

impl CreateVideoRequest {
    pub fn read(form: &Form) -> Result<Self, ApiError> {
        let prompt = prompt(form, "prompt", true)?.unwrap_or_default();
        let mut reference = form.uploads("input_reference").cloned().collect::<Vec<_>>();
        if let Some(url) = form.nested("input_reference", "image_url")? {
            reference.push(decode_data_url("input_reference", &url)?);
        }
        if form.nested("input_reference", "file_id")?.is_some() {
            return Err(ApiError::invalid(
                "input_reference",
                "`input_reference.file_id` is not supported; upload the image or send a data URL.",
            ));
        }
        if reference.len() > 1 {
            return Err(ApiError::invalid(
                "input_reference",
                format!("At most one `input_reference` is allowed; got {}.", reference.len()),
            ));
        }
        Ok(CreateVideoRequest {
            prompt,
            model: form.str("model")?,
            seconds: form.int_from("seconds", 1)?,
            size: form.str("size")?,
            input_reference: reference.pop().map(|u| image("input_reference", u)).transpose()?,
            fps: form.int("fps", 1, MAX_FPS)?,
            num_frames: form.int_from("num_frames", 1)?,
            sampling: Sampling::read(form)?,
        })
    }
}

/// Bounds of `strength` (video-to-video): above 0, at most 1.
pub const STRENGTH: (f64, f64) = (0.0, 1.0);
/// `strength` when a video edit gives none (diffusers' `WanVideoToVideoPipeline` default).
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The input video of an edit: an uploaded MP4, or a completed video of this gateway by id.
#[derive(Debug, Clone)]
pub enum VideoSource {
    Upload(Upload),
    Id(String),
}

/// `POST /v1/videos/edits`: video-to-video, the input video noised to `strength`, then denoised
/// toward the prompt. The output keeps the input's length (at the model's frame rate, up to its
/// `max_frames`) and, absent `size`, the model size nearest the input's aspect.
#[derive(Debug, Clone, ToSchema)]
pub struct EditVideoRequest {
    /// What the edited video should show.
    #[schema(min_length = 1, max_length = 32000, pattern = r"\S")]
    pub prompt: String,
    /// The video to edit: an H.264 MP4 file part, or `{"id": "video_..."}` of a completed video
    /// (multipart: `video[id]`).
    #[schema(value_type = Object)]
    pub video: VideoSource,
    /// A served model that does video-to-video; absent, the first configured one.
    pub model: Option<String>,
    /// `WIDTHxHEIGHT`, one of the model's sizes; absent, the one nearest the input's aspect.
    pub size: Option<String>,
    /// Length to keep from the start of the input, in whole seconds; absent, all of it (up to the
    /// model's `max_frames`).
    #[schema(value_type = Option<String>, pattern = "^[0-9]+$")]
    pub seconds: Option<u64>,
    /// How far the input is noised before denoising, in (0, 1]: low keeps it, 1 redraws it; the
    /// last `int(num_inference_steps · strength)` steps run. Absent: 0.8.
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub strength: Option<f64>,
    #[serde(flatten)]
    #[schema(inline)]
    pub sampling: Sampling,
}

/// The `video` of an edit or extension: one MP4 file part, or `{"id"}` (multipart `video[id]`).
fn video_source(form: &Form) -> Result<VideoSource, ApiError> {
    let mut files: Vec<Upload> = form.uploads("video").cloned().collect();
    match (files.len(), form.nested("video", "id")?) {
        (0, Some(id)) => Ok(VideoSource::Id(id)),
        (1, None) => {
            let up = files.pop().expect("one upload");
            if up.media_type != Some("video/mp4") {
                return Err(ApiError::invalid(
                    "video",
                    format!(
                        "`video` must be an MP4 (H.264); got {}.",
                        up.media_type
                            .map_or("bytes of an unknown format".into(), |t| format!("a {t} file"))
                    ),
                ));
            }
            Ok(VideoSource::Upload(up))
        }
        (0, None) => Err(ApiError::invalid(
            "video",
            "`video` is required: an MP4 file part, or {\"id\": \"video_...\"} of a completed \
             video.",
        )),
        _ => Err(ApiError::invalid(
            "video",
            "Send one `video`: a single MP4 file part or one `{\"id\"}`, not both.",
        )),
    }
}

impl EditVideoRequest {
    pub fn read(form: &Form) -> Result<Self, ApiError> {
        let prompt = prompt(form, "prompt", true)?.unwrap_or_default();
        let video = video_source(form)?;
        let strength = form.float("strength", STRENGTH.0, STRENGTH.1)?;
        if strength == Some(0.0) {
            return Err(ApiError::invalid(
                "strength",
                "`strength` must be above 0 and at most 1; got 0.",
            ));
        }
        Ok(EditVideoRequest {
            prompt,
            video,
            model: form.str("model")?,
            size: form.str("size")?,
            seconds: form.int_from("seconds", 1)?,
            strength,
            sampling: Sampling::read(form)?,
        })
    }
}

/// `POST /v1/videos/extensions`: continues a video with image-to-video from its last frame; the
/// answer is the whole video, the input's frames (at the model's frame rate, resized to the
/// output size) then the new ones, and its `seconds` is the total.
#[derive(Debug, Clone, ToSchema)]
pub struct ExtendVideoRequest {
    /// What happens next.
    #[schema(min_length = 1, max_length = 32000, pattern = r"\S")]
    pub prompt: String,
    /// Seconds to add, as text or a number; absent, the model's default clip length.
    #[schema(value_type = Option<String>, pattern = "^[0-9]+$")]
    pub seconds: Option<u64>,
    /// The video to continue: an H.264 MP4 file part, or `{"id": "video_..."}` of a completed
    /// video (multipart: `video[id]`).
    #[schema(value_type = Object)]
    pub video: VideoSource,
    /// A served image-to-video model; absent, the first configured one.
    pub model: Option<String>,
    /// `WIDTHxHEIGHT`, one of the model's sizes; absent, the one nearest the input's aspect.
    pub size: Option<String>,
    #[serde(flatten)]
    #[schema(inline)]
    pub sampling: Sampling,
}

impl ExtendVideoRequest {
    pub fn read(form: &Form) -> Result<Self, ApiError> {
        let prompt = prompt(form, "prompt", true)?.unwrap_or_default();
        Ok(ExtendVideoRequest {
            prompt,
            seconds: form.int_from("seconds", 1)?,
            video: video_source(form)?,
            model: form.str("model")?,
            size: form.str("size")?,
            sampling: Sampling::read(form)?,
        })
    }
}

choice_enum!(
    /// How finished images are answered.
    ResponseFormat {
        /// The image bytes, base64, in the answer.
        B64Json = "b64_json",
        /// A URL on this gateway to fetch the image from.
        Url = "url",
    }
);
choice_enum!(
    /// Encoding of the made images.
    OutputFormat { Png = "png", Jpeg = "jpeg", Webp = "webp" }
);
choice_enum!(
    /// Accepted for OpenAI compatibility; x2v's quality is set by `num_inference_steps`.
    Quality { Auto = "auto", Low = "low", Medium = "medium", High = "high", Standard = "standard", Hd = "hd" }
);
choice_enum!(
    /// Accepted for OpenAI compatibility.
    Background { Auto = "auto", Transparent = "transparent", Opaque = "opaque" }
);
choice_enum!(
    /// Accepted for OpenAI compatibility.
    Moderation { Auto = "auto", Low = "low" }
);
choice_enum!(
    /// Accepted for OpenAI compatibility.
    InputFidelity { High = "high", Low = "low" }
);

/// `POST /v1/images/generations` (and the fields of an edit besides its images).
#[derive(Debug, Clone, ToSchema)]
pub struct CreateImageRequest {
    /// What to generate.
    #[schema(min_length = 1, max_length = 32000, pattern = r"\S")]
    pub prompt: String,
    /// A served model; absent, the first configured model for the task.
    pub model: Option<String>,
    /// Images to make, up to the model's `max_n`.
    #[schema(minimum = 1)]
    pub n: Option<u64>,
    /// `WIDTHxHEIGHT`, one of the model's sizes, or `auto`.
    pub size: Option<String>,
    /// Absent: `b64_json`.
    pub response_format: Option<ResponseFormat>,
    /// Absent: `png`.
    pub output_format: Option<OutputFormat>,
    /// Compression of `jpeg` and `webp` output, in percent.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Answer as server-sent events: previews while denoising, then each image.
    pub stream: Option<bool>,
    /// Previews per image when streaming.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u32>,
    pub quality: Option<Quality>,
    pub background: Option<Background>,
    pub moderation: Option<Moderation>,
    pub input_fidelity: Option<InputFidelity>,
    #[serde(flatten)]
    #[schema(inline)]
    pub sampling: Sampling,
}

impl CreateImageRequest {
    pub fn read(form: &Form) -> Result<Self, ApiError> {
        Ok(CreateImageRequest {
            prompt: prompt(form, "prompt", true)?.unwrap_or_default(),
            model: form.str("model")?,
            n: form.int_from("n", 1)?,
            size: form.str("size")?,
            response_format: form.choice("response_format")?,
            output_format: form.choice("output_format")?,
            output_compression: form
                .int("output_compression", 0, MAX_COMPRESSION)?
                .map(|c| c as u8),
            stream: form.bool("stream")?,
            partial_images: form
                .int("partial_images", 0, u64::from(MAX_PREVIEWS))?
                .map(|p| p as u32),
            quality: form.choice("quality")?,
            background: form.choice("background")?,
            moderation: form.choice("moderation")?,
            input_fidelity: form.choice("input_fidelity")?,
            sampling: Sampling::read(form)?,
        })
    }
}

/// `POST /v1/images/edits`: a multipart form with the images to edit.
#[derive(Debug, Clone, ToSchema)]
pub struct EditImageRequest {
    /// The images to edit (PNG, JPEG or WebP): one `image` part, or up to 16 as `image[]`
    /// (models may take fewer). The output's size follows the last one.
    #[schema(schema_with = image_parts)]
    pub image: Vec<Upload>,
    /// A PNG whose transparent pixels mark what to change.
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Upload>,
    #[serde(flatten)]
    #[schema(inline)]
    pub edit: CreateImageRequest,
}

impl EditImageRequest {
    pub fn read(form: &Form) -> Result<Self, ApiError> {
        let edit = CreateImageRequest::read(form)?;
        let images: Vec<Upload> = form.uploads("image").cloned().collect();
        if images.is_empty() {
            return Err(ApiError::invalid(
                "image",
                "`image` is required: upload one image as `image` or up to 16 as `image[]`.",
            )
            .code("missing_required_parameter"));
        }
        if images.len() > MAX_EDIT_IMAGES {
            return Err(ApiError::invalid(
                "image",
                format!(
                    "At most {MAX_EDIT_IMAGES} input images are allowed per edit; got {}.",
                    images.len()
                ),
            ));
        }
        let image = images.into_iter().map(|u| image("image", u)).collect::<Result<_, _>>()?;
        let mask = match form.uploads("mask").next() {
            Some(mask) if mask.media_type != Some("image/png") => {
                return Err(ApiError::invalid(
                    "mask",
                    "`mask` must be a PNG image with an alpha channel.",
                ));
            }
            mask => mask.cloned(),
        };
        Ok(EditImageRequest { image, mask, edit })
    }
}

/// One to [`MAX_EDIT_IMAGES`] file parts.
fn image_parts() -> utoipa::openapi::Array {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
    let file = ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)));
    utoipa::openapi::ArrayBuilder::new()
        .items(file)
        .min_items(Some(1))
        .max_items(Some(MAX_EDIT_IMAGES))
        .build()
}

fn prompt(form: &Form, key: &str, required: bool) -> Result<Option<String>, ApiError> {
    let p = form.str(key)?;
    match &p {
        None if required => Err(ApiError::invalid(key, format!("`{key}` is required."))
            .code("missing_required_parameter")),
        Some(s) if required && s.trim().is_empty() => {
            Err(ApiError::invalid(key, format!("`{key}` must not be empty.")))
        }
        Some(s) if s.len() > MAX_PROMPT_CHARS && s.chars().count() > MAX_PROMPT_CHARS => {
            Err(ApiError::invalid(
                key,
                format!(
                    "`{key}` must be at most {MAX_PROMPT_CHARS} characters; got {}.",
                    s.chars().count()
                ),
            ))
        }
        _ => Ok(p),
    }
}

/// `up` if it is a PNG, JPEG or WebP image (by its bytes).
fn image(param: &str, up: Upload) -> Result<Upload, ApiError> {
    match up.media_type {
        Some(t) if IMAGE_TYPES.contains(&t) => Ok(up),
        other => Err(ApiError::invalid(
            param,
            format!(
                "`{param}` must be a PNG, JPEG or WebP image; got {}.",
                other.map_or("bytes of an unknown format".into(), |t| format!("a {t} file"))
            ),
        )),
    }
}

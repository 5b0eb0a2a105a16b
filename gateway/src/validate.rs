//! Validation at the edge: a [`Form`] plus the served model's limits become a typed [`JobSpec`], or a
//! 400 whose message says what is allowed and what was given. Nothing is stored before this passes.

use x2v_queue::{JobSpec, Ranks, Size, Task};

use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::request::{Form, Upload, decode_data_url};

const MAX_PROMPT_CHARS: usize = 32_000;
const IMAGE_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];

/// A validated request: the spec plus the uploads to store as its inputs (role, upload).
pub struct Validated {
    pub spec: JobSpec,
    pub inputs: Vec<(String, Upload)>,
    pub model: ModelConfig,
    /// Whether the client chose the seed (else `spec.seed` was drawn at random, and a retry of
    /// the same request draws another: the idempotency fingerprint then leaves it out).
    pub seed_given: bool,
}

/// Whether the request sets `seed` (a number, not null).
fn seed_given(form: &Form) -> bool {
    matches!(form.int("seed", 0, u64::MAX >> 11), Ok(Some(_)))
}

/// Picks the model: the named one if it serves `task`, else the first configured model that does.
pub fn model_for<'a>(
    models: &'a [ModelConfig],
    name: Option<&str>,
    task: Task,
) -> Result<&'a ModelConfig, ApiError> {
    let serving: Vec<&str> =
        models.iter().filter(|m| m.tasks.contains(&task)).map(|m| m.name.as_str()).collect();
    match name {
        Some(n) => match models.iter().find(|m| m.name == n) {
            Some(m) if m.tasks.contains(&task) => Ok(m),
            Some(_) => Err(ApiError::invalid(
                "model",
                format!(
                    "Model '{n}' does not serve {}; models that do: {}.",
                    task.as_str(),
                    list(&serving)
                ),
            )),
            None => Err(ApiError::invalid(
                "model",
                format!(
                    "Model '{n}' is not served here; served models for {}: {}.",
                    task.as_str(),
                    list(&serving)
                ),
            )
            .code("model_not_found")),
        },
        None => models.iter().find(|m| m.tasks.contains(&task)).ok_or_else(|| {
            ApiError::invalid("model", format!("No served model supports {}.", task.as_str()))
        }),
    }
}

fn list(items: &[&str]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

fn prompt(form: &Form, key: &str, required: bool) -> Result<Option<String>, ApiError> {
    let p = form.str(key)?;
    match &p {
        None if required => Err(ApiError::invalid(key, format!("`{key}` is required."))
            .code("missing_required_parameter")),
        Some(s) if required && s.trim().is_empty() => {
            Err(ApiError::invalid(key, format!("`{key}` must not be empty.")))
        }
        Some(s) if s.chars().count() > MAX_PROMPT_CHARS => Err(ApiError::invalid(
            key,
            format!(
                "`{key}` must be at most {MAX_PROMPT_CHARS} characters; got {}.",
                s.chars().count()
            ),
        )),
        _ => Ok(p),
    }
}

/// The size a model entry lists as `auto`: an edit without a size (or with `auto`) gets about
/// 1 MP at its last input image's aspect, as diffusers' Qwen-Image edit pipelines choose it.
const AUTO_SIZE: &str = "auto";

/// The output size: the request's, one of the model's `sizes`; absent or `auto`, the first of
/// them, or for an edit (`last_image`) from a model listing `auto`, the size of the input.
fn size(form: &Form, model: &ModelConfig, last_image: Option<&Upload>) -> Result<Size, ApiError> {
    let allowed = || format!("{} (model '{}')", model.sizes.join(", "), model.name);
    let given = form.str("size")?.filter(|s| s != AUTO_SIZE);
    if given.is_none()
        && let Some(image) = last_image
        && model.sizes.iter().any(|s| s == AUTO_SIZE)
    {
        return auto_edit_size(image);
    }
    let first = model.sizes.iter().find(|s| *s != AUTO_SIZE).cloned().unwrap_or_default();
    let text = given.unwrap_or(first);
    if !model.sizes.contains(&text) || text == AUTO_SIZE {
        return Err(ApiError::invalid(
            "size",
            format!("`size` must be one of {}; got \"{text}\".", allowed()),
        ));
    }
    text.parse().map_err(|e: String| ApiError::invalid("size", e))
}

/// About 1024² pixels at `image`'s aspect, each side a multiple of 32 (diffusers'
/// `calculate_dimensions(1024 * 1024, width / height)`, Python's round half to even).
fn auto_edit_size(image: &Upload) -> Result<Size, ApiError> {
    let unreadable = |e: String| {
        ApiError::invalid("image", format!("`image` has no readable size ({e}); send `size`."))
    };
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(&image.bytes[..]))
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?
        .into_dimensions()
        .map_err(|e| unreadable(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(unreadable(format!("{w}x{h}")));
    }
    let ratio = f64::from(w) / f64::from(h);
    let width = (1024.0 * 1024.0 * ratio).sqrt();
    let height = width / ratio;
    let side = |v: f64| ((v / 32.0).round_ties_even() as u32 * 32).max(32);
    format!("{}x{}", side(width), side(height))
        .parse()
        .map_err(|e: String| ApiError::invalid("size", e))
}

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

/// Sampling parameters shared by videos and images (x2v extensions).
fn common(
    form: &Form,
    model: &ModelConfig,
    task: Task,
    size: Size,
    prompt: String,
) -> Result<JobSpec, ApiError> {
    let seed = match form.int("seed", 0, u64::MAX >> 11)? {
        Some(s) => s,
        None => rand::random::<u64>() >> 11,
    };
    let pins = Ranks {
        encoder: form.int("encoder_engine_rank", 0, 1 << 20)?.map(|r| r as u32),
        dit: form.int("dit_engine_rank", 0, 1 << 20)?.map(|r| r as u32),
        decoder: form.int("decoder_engine_rank", 0, 1 << 20)?.map(|r| r as u32),
    };
    Ok(JobSpec {
        model: model.name.clone(),
        task,
        prompt,
        negative_prompt: self::prompt(form, "negative_prompt", false)?,
        size,
        num_frames: 1,
        fps: 0,
        seconds: 0,
        num_inference_steps: form
            .int("num_inference_steps", 1, u64::from(model.max_steps))?
            .map_or(model.default_steps, |s| s as u32),
        guidance_scale: form
            .float("guidance_scale", 0.0, 30.0)?
            .map_or(model.default_guidance_scale, |g| g as f32),
        shift: form.float("shift", 0.01, 100.0)?.map_or(model.default_shift, |s| s as f32),
        seed,
        n: 1,
        output_format: "mp4".into(),
        output_compression: None,
        inputs: vec![],
        pins,
        remixed_from: None,
        partial_images: 0,
    })
}

/// `POST /v1/videos` (and the base of a remix).
pub fn video(form: &Form, models: &[ModelConfig]) -> Result<Validated, ApiError> {
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
    let task = if reference.is_empty() { Task::T2v } else { Task::I2v };
    let model = model_for(models, form.str("model")?.as_deref(), task)?;
    let size = size(form, model, None)?;
    let fps = form.int("fps", 1, 120)?.map_or(model.fps, |f| f as u32).max(1);
    let max_seconds = (model.max_frames.saturating_sub(1) / fps).max(1);
    let frames = match (
        form.int("num_frames", 1, u64::from(model.max_frames))?,
        form.int("seconds", 1, u64::from(max_seconds))?,
    ) {
        (Some(f), _) if f % 4 != 1 => {
            return Err(ApiError::invalid(
                "num_frames",
                format!(
                    "`num_frames` must be 4k+1 (e.g. 17, 33, 49, 81) and at most {}; got {f}.",
                    model.max_frames
                ),
            ));
        }
        (Some(f), _) => f as u32,
        (None, s) => {
            let s = s.map_or(model.default_seconds, |s| s as u32).min(max_seconds);
            ((s * fps).div_ceil(4) * 4 + 1).min(model.max_frames)
        }
    };
    let seconds = form
        .int("seconds", 1, u64::from(max_seconds))?
        .map_or_else(|| (frames - 1).div_ceil(fps).max(1), |s| s as u32);
    let mut spec = common(form, model, task, size, prompt)?;
    spec.num_frames = frames;
    spec.fps = fps;
    spec.seconds = seconds;
    let inputs = reference
        .into_iter()
        .map(|u| Ok(("input_reference".to_owned(), image("input_reference", u)?)))
        .collect::<Result<_, ApiError>>()?;
    Ok(Validated { spec, inputs, model: model.clone(), seed_given: seed_given(form) })
}

/// Image-specific answer options.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub response_format: String,
    pub stream: bool,
    pub partial_images: u32,
}

/// `POST /v1/images/generations` (`edit = false`) and `POST /v1/images/edits`.
pub fn image_request(
    form: &Form,
    models: &[ModelConfig],
    edit: bool,
) -> Result<(Validated, ImageOptions), ApiError> {
    let prompt = prompt(form, "prompt", true)?.unwrap_or_default();
    let task = if edit { Task::Edit } else { Task::T2i };
    let model = model_for(models, form.str("model")?.as_deref(), task)?;
    let mut inputs = vec![];
    if edit {
        let images: Vec<Upload> = form.uploads("image").cloned().collect();
        if images.is_empty() {
            return Err(ApiError::invalid(
                "image",
                "`image` is required: upload one image as `image` or up to 16 as `image[]`.",
            )
            .code("missing_required_parameter"));
        }
        let max = model.max_input_images.min(16);
        if images.len() > max as usize {
            return Err(ApiError::invalid(
                "image",
                format!(
                    "`{}` takes at most {max} input image(s) per edit; got {}.",
                    model.name,
                    images.len()
                ),
            ));
        }
        for up in images {
            inputs.push(("image".to_owned(), image("image", up)?));
        }
        if let Some(mask) = form.uploads("mask").next() {
            if mask.media_type != Some("image/png") {
                return Err(ApiError::invalid(
                    "mask",
                    "`mask` must be a PNG image with an alpha channel.",
                ));
            }
            inputs.push(("mask".to_owned(), mask.clone()));
        }
    }
    let last_image = inputs.iter().rev().find(|(role, _)| role == "image").map(|(_, up)| up);
    let size = size(form, model, last_image)?;
    let mut spec = common(form, model, task, size, prompt)?;
    spec.n = form.int("n", 1, u64::from(model.max_n.max(1)))?.map_or(1, |n| n as u32);
    spec.output_format =
        form.choice("output_format", &["png", "jpeg", "webp"])?.unwrap_or_else(|| "png".into());
    spec.output_compression = form.int("output_compression", 0, 100)?.map(|c| c as u8);
    for (key, allowed) in [
        ("quality", &["auto", "low", "medium", "high", "standard", "hd"][..]),
        ("background", &["auto", "transparent", "opaque"][..]),
        ("moderation", &["auto", "low"][..]),
        ("input_fidelity", &["high", "low"][..]),
    ] {
        form.choice(key, allowed)?;
    }
    let options = ImageOptions {
        response_format: form
            .choice("response_format", &["b64_json", "url"])?
            .unwrap_or_else(|| "b64_json".into()),
        stream: form.bool("stream")?.unwrap_or(false),
        partial_images: form.int("partial_images", 0, 3)?.unwrap_or(0) as u32,
    };
    // Previews are made only for a client that streams; `partial_images` alone changes nothing.
    spec.partial_images = if options.stream { options.partial_images } else { 0 };
    Ok((Validated { spec, inputs, model: model.clone(), seed_given: seed_given(form) }, options))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::GatewayConfig;

    fn form(json: &str) -> Form {
        Form::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn video_defaults_come_from_the_model() {
        let models = GatewayConfig::default().models;
        let v = video(&form(r#"{"prompt": "a cat"}"#), &models).unwrap();
        assert_eq!(v.spec.model, "wan2.1-t2v-1.3b");
        assert_eq!(
            (v.spec.size.to_string(), v.spec.num_frames, v.spec.fps, v.spec.seconds),
            ("832x480".into(), 81, 16, 5)
        );
        assert_eq!(v.spec.num_inference_steps, 50);
    }

    fn png(width: u32, height: u32) -> Upload {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(width, height).write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let bytes = Bytes::from(bytes.into_inner());
        Upload { field: "image".into(), media_type: crate::request::sniff(&bytes), bytes }
    }

    #[test]
    fn an_edit_without_a_size_gets_about_one_megapixel_at_its_images_aspect() {
        let model =
            ModelConfig { sizes: vec!["auto".into(), "64x64".into()], ..ModelConfig::qwen_image() };
        // diffusers' calculate_dimensions(1024 * 1024, 96 / 64) = (1248, 832).
        let wide = png(96, 64);
        for body in [r#"{"prompt": "x"}"#, r#"{"prompt": "x", "size": "auto"}"#] {
            let got = size(&form(body), &model, Some(&wide)).unwrap();
            assert_eq!(got.to_string(), "1248x832", "{body}");
        }
        assert_eq!(
            size(&form(r#"{"prompt": "x"}"#), &model, Some(&png(50, 100))).unwrap().to_string(),
            "736x1440"
        );
        // An explicit size still wins; text to image takes the first listed size.
        assert_eq!(
            size(&form(r#"{"size": "64x64"}"#), &model, Some(&wide)).unwrap().to_string(),
            "64x64"
        );
        assert_eq!(size(&form("{}"), &model, None).unwrap().to_string(), "64x64");
        // Without `auto` in the list, an edit gets the first size too.
        let fixed = ModelConfig { sizes: vec!["64x64".into()], ..model.clone() };
        assert_eq!(size(&form("{}"), &fixed, Some(&wide)).unwrap().to_string(), "64x64");
        let err = size(&form(r#"{"size": "96x96"}"#), &model, Some(&wide)).unwrap_err();
        assert!(err.to_string().contains("auto, 64x64"), "{err}");
    }

    #[test]
    fn limits_are_named_with_what_was_given() {
        let models = GatewayConfig::default().models;
        let cases = [
            (r#"{"prompt": "x", "size": "1280x720"}"#, "size", "832x480, 480x832"),
            (r#"{"prompt": "x", "seconds": "12"}"#, "seconds", "from 1 to 5; got 12"),
            (r#"{"prompt": "x", "num_frames": 80}"#, "num_frames", "4k+1"),
            (
                r#"{"prompt": "x", "num_inference_steps": 1000}"#,
                "num_inference_steps",
                "from 1 to 100; got 1000",
            ),
            (r#"{"prompt": "x", "model": "sora-2"}"#, "model", "wan2.1-t2v-1.3b"),
            (r#"{"prompt": ""}"#, "prompt", "must not be empty"),
            (r#"{}"#, "prompt", "required"),
        ];
        for (body, param, says) in cases {
            let e = video(&form(body), &models).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn seconds_and_frames_agree() {
        let models = GatewayConfig::default().models;
        let v = video(
            &form(r#"{"prompt": "x", "seconds": "2", "seed": 7, "dit_engine_rank": 3}"#),
            &models,
        )
        .unwrap();
        assert_eq!(
            (v.spec.num_frames, v.spec.seconds, v.spec.seed, v.spec.pins.dit),
            (33, 2, 7, Some(3))
        );
        let v = video(&form(r#"{"prompt": "x", "num_frames": 49}"#), &models).unwrap();
        assert_eq!((v.spec.num_frames, v.spec.seconds), (49, 3));
    }

    #[test]
    fn images_validate_options_and_n() {
        let models = GatewayConfig::default().models;
        let (v, o) = image_request(&form(r#"{"prompt": "x", "n": 2, "response_format": null, "size": "auto", "output_format": "webp"}"#), &models, false).unwrap();
        assert_eq!(
            (v.spec.n, v.spec.output_format.as_str(), o.response_format.as_str()),
            (2, "webp", "b64_json")
        );
        assert!(image_request(&form(r#"{"prompt": "x", "n": 9}"#), &models, false).is_err());
        assert!(
            image_request(&form(r#"{"prompt": "x", "output_format": "gif"}"#), &models, false)
                .is_err()
        );
        assert_eq!(
            image_request(&form(r#"{"prompt": "x"}"#), &models, true)
                .err()
                .unwrap()
                .param
                .as_deref(),
            Some("image")
        );
    }
}

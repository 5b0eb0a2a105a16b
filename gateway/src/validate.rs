//! Validation at the edge: a typed request body ([`crate::params`]) plus the served model's limits
//! become a typed [`JobSpec`], or a 400 whose message says what is allowed and what was given.
//! Nothing is stored before this passes.

use x2v_core::ErrorKind;
use x2v_core::lora::LoraRef;
use x2v_queue::{JobSpec, Ranks, Size, Task};

use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::params::{
    CreateImageRequest, CreateVideoRequest, DEFAULT_STRENGTH, EditImageRequest, EditVideoRequest,
    ExtendVideoRequest, OutputFormat, ResponseFormat, Sampling,
};
use crate::request::{Choice, Upload, check_int};

/// A validated request: the spec plus the uploads to store as its inputs (role, upload).
pub struct Validated {
    pub spec: JobSpec,
    pub inputs: Vec<(String, Upload)>,
    /// Whether the client chose the seed (else `spec.seed` was drawn at random, and a retry of
    /// the same request draws another: the idempotency fingerprint then leaves it out).
    pub seed_given: bool,
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

/// `value` within `min..=max`, a bound the served model sets.
fn within(key: &str, value: Option<u64>, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    value
        .map(|v| check_int(key, v as f64, min, max, || format!("an integer from {min} to {max}")))
        .transpose()
}

/// The size a model entry lists as `auto`: an edit without a size (or with `auto`) gets about
/// 1 MP at its last input image's aspect, as diffusers' Qwen-Image edit pipelines choose it.
const AUTO_SIZE: &str = "auto";

/// The output size: the request's, one of the model's `sizes`; absent or `auto`, the first of
/// them, or for an edit (`last_image`) from a model listing `auto`, the size of the input.
fn size(
    given: Option<&str>,
    model: &ModelConfig,
    last_image: Option<&Upload>,
) -> Result<Size, ApiError> {
    let allowed = || format!("{} (model '{}')", model.sizes.join(", "), model.name);
    let given = given.filter(|s| *s != AUTO_SIZE);
    if given.is_none()
        && let Some(image) = last_image
        && model.sizes.iter().any(|s| s == AUTO_SIZE)
    {
        return auto_edit_size(image);
    }
    let first = model.sizes.iter().find(|s| *s != AUTO_SIZE).map_or("", String::as_str);
    let text = given.unwrap_or(first);
    if text == AUTO_SIZE || !model.sizes.iter().any(|s| s == text) {
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

/// The adapters a job runs with: the model's `base_loras`, then the request's, each once, every one
/// an adapter of the model's `lora_dir`.
fn loras(model: &ModelConfig, asked: Vec<LoraRef>) -> Result<Vec<LoraRef>, ApiError> {
    if asked.is_empty() && model.base_loras.is_empty() {
        return Ok(vec![]);
    }
    if !asked.is_empty() && model.lora_dir.is_empty() {
        return Err(ApiError::invalid(
            "lora",
            format!("`{}` serves no LoRA adapters.", model.name),
        ));
    }
    let known = model.loras();
    if let Some(l) = model.base_loras.iter().find(|l| !known.contains(&l.name)) {
        return Err(ApiError::new(
            ErrorKind::Internal,
            format!(
                "`{}` is configured with the base adapter `{}`, which its lora_dir lacks.",
                model.name, l.name
            ),
        ));
    }
    if let Some(l) = asked.iter().find(|l| model.base_loras.iter().any(|b| b.name == l.name)) {
        return Err(ApiError::invalid(
            "lora",
            format!(
                "`{}` is one of `{}`'s base adapters, which every job has.",
                l.name, model.name
            ),
        ));
    }
    if let Some(l) = asked.iter().find(|l| !known.contains(&l.name)) {
        return Err(ApiError::invalid(
            "lora",
            format!(
                "`{}` has no LoRA adapter `{}`; it has: {}.",
                model.name,
                l.name,
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ),
        ));
    }
    Ok(model.base_loras.iter().cloned().chain(asked).collect())
}

/// The spec of a job: sampling parameters shared by videos and images, with the model's defaults.
fn common(
    sampling: Sampling,
    model: &ModelConfig,
    task: Task,
    size: Size,
    prompt: String,
) -> Result<JobSpec, ApiError> {
    let steps = within(
        "num_inference_steps",
        sampling.num_inference_steps,
        model.min_steps.into(),
        model.max_steps.into(),
    )?;
    let guidance_scale_2 = match (sampling.guidance_scale_2, model.default_guidance_scale_2) {
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "guidance_scale_2",
                format!(
                    "`guidance_scale_2` is the low-noise expert's guidance scale of two-expert \
                     models (Wan2.2 A14B); `{}` has one transformer.",
                    model.name
                ),
            ));
        }
        (Some(g), Some(_)) => Some(g as f32),
        (None, default) => default,
    };
    let loras = loras(model, sampling.lora.unwrap_or_default())?;
    Ok(JobSpec {
        loras,
        model: model.name.clone(),
        task,
        prompt,
        negative_prompt: sampling.negative_prompt,
        size,
        num_frames: 1,
        fps: 0,
        seconds: 0,
        num_inference_steps: steps.map_or(model.default_steps, |s| s as u32),
        guidance_scale: sampling.guidance_scale.map_or(model.default_guidance_scale, |g| g as f32),
        guidance_scale_2,
        shift: sampling.shift.map_or(model.default_shift, |s| s as f32),
        seed: sampling.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
        n: 1,
        output_format: "mp4".into(),
        output_compression: None,
        inputs: vec![],
        pins: Ranks {
            encoder: sampling.encoder_engine_rank,
            dit: sampling.dit_engine_rank,
            decoder: sampling.decoder_engine_rank,
        },
        remixed_from: None,
        partial_images: 0,
        strength: None,
        extend_frames: None,
    })
}

/// The `seconds` a request may ask for at `fps` (whole seconds the model's `max_frames` hold,
/// at least 1), checked.
fn clip_seconds(
    model: &ModelConfig,
    fps: u32,
    given: Option<u64>,
) -> Result<(u32, Option<u32>), ApiError> {
    let max_seconds = (model.max_frames.saturating_sub(1) / fps).max(1);
    let seconds = within("seconds", given, 1, max_seconds.into())?;
    Ok((max_seconds, seconds.map(|s| s as u32)))
}

/// The `4k+1` frames of a clip of `seconds` (the model's default when absent) at `fps`, up to the
/// model's `max_frames`.
fn clip_frames(model: &ModelConfig, fps: u32, max_seconds: u32, seconds: Option<u32>) -> u32 {
    let s = seconds.unwrap_or(model.default_seconds).min(max_seconds);
    ((s * fps).div_ceil(4) * 4 + 1).min(model.max_frames)
}

/// `POST /v1/videos` (and a remix).
pub fn video(req: CreateVideoRequest, models: &[ModelConfig]) -> Result<Validated, ApiError> {
    let task = if req.input_reference.is_none() { Task::T2v } else { Task::I2v };
    let model = model_for(models, req.model.as_deref(), task)?;
    let size = size(req.size.as_deref(), model, None)?;
    let fps = req.fps.map_or(model.fps, |f| f as u32).max(1);
    let (max_seconds, seconds) = clip_seconds(model, fps, req.seconds)?;
    let frames = match within("num_frames", req.num_frames, 1, model.max_frames.into())? {
        Some(f) if f % 4 != 1 => {
            return Err(ApiError::invalid(
                "num_frames",
                format!(
                    "`num_frames` must be 4k+1 (e.g. 17, 33, 49, 81) and at most {}; got {f}.",
                    model.max_frames
                ),
            ));
        }
        Some(f) => f as u32,
        None => clip_frames(model, fps, max_seconds, seconds),
    };
    let seconds = seconds.unwrap_or_else(|| (frames - 1).div_ceil(fps).max(1));
    let seed_given = req.sampling.seed.is_some();
    let mut spec = common(req.sampling, model, task, size, req.prompt)?;
    spec.num_frames = frames;
    spec.fps = fps;
    spec.seconds = seconds;
    let inputs =
        req.input_reference.into_iter().map(|u| ("input_reference".to_owned(), u)).collect();
    Ok(Validated { spec, inputs, seed_given })
}

/// The input video of an edit, read: its bytes (stored as the job's `video` input) and header.
pub struct SourceVideo {
    pub upload: Upload,
    pub info: x2v_media::VideoInfo,
}

/// An edit's or extension's size: the request's (one of the model's), else the model size
/// nearest the input's aspect ratio (the first of equals).
fn input_video_size(
    given: Option<&str>,
    model: &ModelConfig,
    info: &x2v_media::VideoInfo,
) -> Result<Size, ApiError> {
    if given.is_some() {
        return size(given, model, None);
    }
    let aspect = (f64::from(info.width) / f64::from(info.height)).ln();
    model
        .sizes
        .iter()
        .filter_map(|s| s.parse::<Size>().ok())
        .min_by(|a, b| {
            let d = |s: &Size| ((f64::from(s.width) / f64::from(s.height)).ln() - aspect).abs();
            d(a).total_cmp(&d(b))
        })
        .ok_or_else(|| {
            ApiError::new(ErrorKind::Internal, format!("`{}` lists no video sizes.", model.name))
        })
}

/// `POST /v1/videos/edits`: the output keeps the input's length at the model's frame rate (or the
/// first `seconds` of it), as `4k+1` frames up to the model's `max_frames`.
pub fn video_edit(
    req: EditVideoRequest,
    source: SourceVideo,
    models: &[ModelConfig],
) -> Result<Validated, ApiError> {
    let model = model_for(models, req.model.as_deref(), Task::V2v)?;
    let size = input_video_size(req.size.as_deref(), model, &source.info)?;
    let fps = model.fps.max(1);
    let (_, seconds) = clip_seconds(model, fps, req.seconds)?;
    let mut available = source.info.frames_at(fps).min(model.max_frames);
    if let Some(s) = seconds {
        available = available.min(s * fps + 1);
    }
    let frames = (available.max(1) - 1) / 4 * 4 + 1;
    let strength = req.strength.unwrap_or(DEFAULT_STRENGTH);
    let seed_given = req.sampling.seed.is_some();
    let mut spec = common(req.sampling, model, Task::V2v, size, req.prompt)?;
    if (f64::from(spec.num_inference_steps) * strength) < 1.0 {
        return Err(ApiError::invalid(
            "strength",
            format!(
                "`strength` {strength} leaves none of the {} steps to run; raise `strength` or \
                 `num_inference_steps` (steps × strength ≥ 1).",
                spec.num_inference_steps
            ),
        ));
    }
    spec.num_frames = frames;
    spec.fps = fps;
    spec.seconds = (frames - 1).div_ceil(fps).max(1);
    spec.strength = Some(strength);
    Ok(Validated { spec, inputs: vec![("video".to_owned(), source.upload)], seed_given })
}

/// Most frames a video extension may have in all (input and new), in the model's `max_frames`.
pub const MAX_EXTENDED_CLIPS: u32 = 4;

/// `POST /v1/videos/extensions`: an image-to-video job from the input's last frame at the model's
/// frame rate; the answer's `seconds` is the whole video's.
pub fn video_extension(
    req: ExtendVideoRequest,
    source: SourceVideo,
    models: &[ModelConfig],
) -> Result<Validated, ApiError> {
    let model = model_for(models, req.model.as_deref(), Task::I2v)?;
    let size = input_video_size(req.size.as_deref(), model, &source.info)?;
    let fps = model.fps.max(1);
    let (max_seconds, seconds) = clip_seconds(model, fps, req.seconds)?;
    let new_frames = clip_frames(model, fps, max_seconds, seconds);
    let kept = source.info.frames_at(fps);
    let total = u64::from(kept) + u64::from(new_frames) - 1;
    let most = u64::from(model.max_frames) * u64::from(MAX_EXTENDED_CLIPS);
    if total > most {
        return Err(ApiError::invalid(
            "video",
            format!(
                "The extended video would have {total} frames ({kept} of `video` at {fps} fps, then \
                 {}); `{}` extends videos to at most {most}.",
                new_frames - 1,
                model.name
            ),
        ));
    }
    let seed_given = req.sampling.seed.is_some();
    let mut spec = common(req.sampling, model, Task::I2v, size, req.prompt)?;
    spec.num_frames = new_frames;
    spec.fps = fps;
    spec.seconds = ((total - 1) as u32).div_ceil(fps).max(1);
    spec.extend_frames = Some(kept);
    Ok(Validated { spec, inputs: vec![("video".to_owned(), source.upload)], seed_given })
}

/// Image-specific answer options.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub response_format: ResponseFormat,
    pub stream: bool,
    pub partial_images: u32,
}

/// `POST /v1/images/generations`.
pub fn image_generation(
    req: CreateImageRequest,
    models: &[ModelConfig],
) -> Result<(Validated, ImageOptions), ApiError> {
    image(req, vec![], models, Task::T2i)
}

/// `POST /v1/images/edits`.
pub fn image_edit(
    req: EditImageRequest,
    models: &[ModelConfig],
) -> Result<(Validated, ImageOptions), ApiError> {
    let mut inputs: Vec<(String, Upload)> =
        req.image.into_iter().map(|u| ("image".to_owned(), u)).collect();
    inputs.extend(req.mask.map(|m| ("mask".to_owned(), m)));
    image(req.edit, inputs, models, Task::Edit)
}

fn image(
    req: CreateImageRequest,
    inputs: Vec<(String, Upload)>,
    models: &[ModelConfig],
    task: Task,
) -> Result<(Validated, ImageOptions), ApiError> {
    let model = model_for(models, req.model.as_deref(), task)?;
    let images = inputs.iter().filter(|(role, _)| role == "image").count();
    let max = model.max_input_images.min(16) as usize;
    if task == Task::Edit && images > max {
        return Err(ApiError::invalid(
            "image",
            format!("`{}` takes at most {max} input image(s) per edit; got {images}.", model.name),
        ));
    }
    let last_image = inputs.iter().rev().find(|(role, _)| role == "image").map(|(_, up)| up);
    let size = size(req.size.as_deref(), model, last_image)?;
    let n = within("n", req.n, 1, model.max_n.max(1).into())?;
    let seed_given = req.sampling.seed.is_some();
    let mut spec = common(req.sampling, model, task, size, req.prompt)?;
    spec.n = n.map_or(1, |n| n as u32);
    spec.output_format = req.output_format.unwrap_or(OutputFormat::Png).as_str().to_owned();
    spec.output_compression = req.output_compression;
    let options = ImageOptions {
        response_format: req.response_format.unwrap_or(ResponseFormat::B64Json),
        stream: req.stream.unwrap_or(false),
        partial_images: req.partial_images.unwrap_or(0),
    };
    // Previews are made only for a client that streams; `partial_images` alone changes nothing.
    spec.partial_images = if options.stream { options.partial_images } else { 0 };
    Ok((Validated { spec, inputs, seed_given }, options))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::GatewayConfig;
    use crate::request::Form;

    fn form(json: &str) -> Form {
        Form::from_json(json.as_bytes()).unwrap()
    }

    fn video_of(json: &str, models: &[ModelConfig]) -> Result<Validated, ApiError> {
        video(CreateVideoRequest::read(&form(json))?, models)
    }

    fn size_of(
        json: &str,
        model: &ModelConfig,
        last_image: Option<&Upload>,
    ) -> Result<Size, ApiError> {
        size(form(json).str("size")?.as_deref(), model, last_image)
    }

    fn image_of(
        json: &str,
        models: &[ModelConfig],
        edit: bool,
    ) -> Result<(Validated, ImageOptions), ApiError> {
        let form = form(json);
        if edit {
            image_edit(EditImageRequest::read(&form)?, models)
        } else {
            image_generation(CreateImageRequest::read(&form)?, models)
        }
    }

    #[test]
    fn video_defaults_come_from_the_model() {
        let models = GatewayConfig::default().models;
        let v = video_of(r#"{"prompt": "a cat"}"#, &models).unwrap();
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
            let got = size_of(body, &model, Some(&wide)).unwrap();
            assert_eq!(got.to_string(), "1248x832", "{body}");
        }
        assert_eq!(
            size_of(r#"{"prompt": "x"}"#, &model, Some(&png(50, 100))).unwrap().to_string(),
            "736x1440"
        );
        // An explicit size still wins; text to image takes the first listed size.
        assert_eq!(
            size_of(r#"{"size": "64x64"}"#, &model, Some(&wide)).unwrap().to_string(),
            "64x64"
        );
        assert_eq!(size_of("{}", &model, None).unwrap().to_string(), "64x64");
        // Without `auto` in the list, an edit gets the first size too.
        let fixed = ModelConfig { sizes: vec!["64x64".into()], ..model.clone() };
        assert_eq!(size_of("{}", &fixed, Some(&wide)).unwrap().to_string(), "64x64");
        let err = size_of(r#"{"size": "96x96"}"#, &model, Some(&wide)).unwrap_err();
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
            let e = video_of(body, &models).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn guidance_scale_2_is_for_two_expert_models() {
        let mut models = GatewayConfig::default().models;
        // One transformer: refused, naming the parameter and the model.
        let e = video_of(r#"{"prompt": "x", "guidance_scale_2": 3}"#, &models).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("guidance_scale_2"));
        assert!(e.message.contains("wan2.1-t2v-1.3b") && e.message.contains("one transformer"));
        assert_eq!(video_of(r#"{"prompt": "x"}"#, &models).unwrap().spec.guidance_scale_2, None);

        // Two experts: the request's scale, else the model's default; bounds as guidance_scale.
        models[0].default_guidance_scale_2 = Some(3.0);
        let v = video_of(r#"{"prompt": "x", "guidance_scale": 4}"#, &models).unwrap();
        assert_eq!((v.spec.guidance_scale, v.spec.guidance_scale_2), (4.0, Some(3.0)));
        let v = video_of(r#"{"prompt": "x", "guidance_scale_2": 1.5}"#, &models).unwrap();
        assert_eq!(v.spec.guidance_scale_2, Some(1.5));
        let e = video_of(r#"{"prompt": "x", "guidance_scale_2": 31}"#, &models).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("guidance_scale_2"));
    }

    #[test]
    fn lora_names_are_checked_against_the_models_adapters() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["style.safetensors", "motion.safetensors"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let mut models = GatewayConfig::default().models;
        let body =
            r#"{"prompt": "x", "lora": [{"name": "style", "scale": 0.5}, {"name": "motion"}]}"#;
        let e = video_of(body, &models).err().unwrap();
        assert!(e.message.contains("serves no LoRA adapters"), "{}", e.message);

        models[0].lora_dir = dir.path().display().to_string();
        let v = video_of(body, &models).unwrap();
        let got: Vec<(&str, f32)> =
            v.spec.loras.iter().map(|l| (l.name.as_str(), l.scale)).collect();
        assert_eq!(got, [("style", 0.5), ("motion", 1.0)]);
        assert!(video_of(r#"{"prompt": "x"}"#, &models).unwrap().spec.loras.is_empty());
        let cases = [
            (r#"[{"name": "sketch"}]"#, "no LoRA adapter `sketch`; it has: motion, style"),
            (r#"[{"name": "style"}, {"name": "style"}]"#, "names `style` twice"),
            (r#"[{"name": "style", "scale": 11}]"#, "from -10 to 10"),
            (r#"[{"name": "style", "weight": 1}]"#, "unknown field `weight`"),
            (r#"[{"name": "../style"}]"#, "must be"),
            (r#"[{"scale": 1}]"#, "`lora[0].name` must be a string"),
            (r#"{"name": "style"}"#, "must be a list"),
            (
                r#"[{"name":"a"},{"name":"b"},{"name":"c"},{"name":"d"},{"name":"e"},{"name":"f"},{"name":"g"},{"name":"h"},{"name":"i"}]"#,
                "at most 8",
            ),
        ];
        for (lora, says) in cases {
            let body = format!(r#"{{"prompt": "x", "lora": {lora}}}"#);
            let e = video_of(&body, &models).err().unwrap_or_else(|| panic!("{lora} accepted"));
            assert_eq!(e.param.as_deref(), Some("lora"), "{lora}");
            assert!(e.message.contains(says), "{lora}: {}", e.message);
        }

        // Base adapters (a step-distillation LoRA): first in every job, not to be asked again.
        models[0].base_loras = vec![LoraRef { name: "motion".into(), scale: 1.0 }];
        let v = video_of(r#"{"prompt": "x", "lora": [{"name": "style"}]}"#, &models).unwrap();
        let names: Vec<&str> = v.spec.loras.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["motion", "style"]);
        let v = video_of(r#"{"prompt": "x"}"#, &models).unwrap();
        assert_eq!(v.spec.loras, [LoraRef { name: "motion".into(), scale: 1.0 }]);
        let e =
            video_of(r#"{"prompt": "x", "lora": [{"name": "motion"}]}"#, &models).err().unwrap();
        assert!(e.message.contains("base adapters"), "{}", e.message);
        models[0].base_loras = vec![LoraRef { name: "gone".into(), scale: 1.0 }];
        let e = video_of(r#"{"prompt": "x"}"#, &models).err().unwrap();
        assert_eq!(e.http_status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn seconds_and_frames_agree() {
        let models = GatewayConfig::default().models;
        let v = video_of(
            r#"{"prompt": "x", "seconds": "2", "seed": 7, "dit_engine_rank": 3}"#,
            &models,
        )
        .unwrap();
        assert_eq!(
            (v.spec.num_frames, v.spec.seconds, v.spec.seed, v.spec.pins.dit),
            (33, 2, 7, Some(3))
        );
        let v = video_of(r#"{"prompt": "x", "num_frames": 49}"#, &models).unwrap();
        assert_eq!((v.spec.num_frames, v.spec.seconds), (49, 3));
    }

    #[test]
    fn images_validate_options_and_n() {
        let models = GatewayConfig::default().models;
        let (v, o) = image_of(r#"{"prompt": "x", "n": 2, "response_format": null, "size": "auto", "output_format": "webp"}"#, &models, false).unwrap();
        assert_eq!(
            (v.spec.n, v.spec.output_format.as_str(), o.response_format.as_str()),
            (2, "webp", "b64_json")
        );
        assert!(image_of(r#"{"prompt": "x", "n": 9}"#, &models, false).is_err());
        assert!(image_of(r#"{"prompt": "x", "output_format": "gif"}"#, &models, false).is_err());
        assert_eq!(
            image_of(r#"{"prompt": "x"}"#, &models, true).err().unwrap().param.as_deref(),
            Some("image")
        );
    }
}

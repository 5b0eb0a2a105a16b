//! `x2v generate`: one Wan video (`--task t2v|i2v|ti2v|v2v`) or one Qwen-Image image
//! (`--task t2i|edit`, [`crate::generate_image`]) in this process — encoder, DiT and decoder
//! stages in turn. A video is written as an H.264 MP4 (the decoder service's encoder, so the
//! bytes match a served job's) or losslessly as `uint8 [F, H, W, 3]` to a `.npy` file.
//!
//! Every argument is validated before any model is loaded; errors name the value at fault.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tch::{Device, Kind, Tensor};
use x2v_models::schedulers::{FlowMatchEulerConfig, StepDistillConfig, UniPcConfig};
use x2v_models::wan::lora::load_adapter;
use x2v_models::wan::pipeline::denoise::first_step;
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, ModelDir, SchedulerChoice, Task, WanDecoder, WanEncoder, denoise,
    load_dit,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory: Wan2.1 or Wan2.2 (diffusers or original layout) for t2v/i2v/v2v, Wan2.2
    /// TI2V-5B for ti2v, Qwen-Image (diffusers layout) for t2i/edit.
    #[arg(long)]
    pub(crate) model_dir: PathBuf,
    /// `t2v` (text to video), `i2v` (first frame + text to video), `ti2v` (text, and an optional
    /// first frame, to video on a Wan2.2 TI2V-5B model), `v2v` (input video + text to video, on
    /// a text-to-video model), `t2i` (text to image) or `edit` (input images + text to image).
    #[arg(long, default_value = "t2v", value_parser = parse_task)]
    pub(crate) task: CliTask,
    /// The prompt.
    #[arg(long)]
    pub(crate) prompt: String,
    /// Negative prompt, used when guidance > 1 (default: `""` for Wan, `" "` for Qwen-Image).
    #[arg(long)]
    pub(crate) negative_prompt: Option<String>,
    /// Input image (png, jpeg or webp): the first frame for i2v (and optionally ti2v); for edit,
    /// repeat it for
    /// several images (Qwen-Image-Edit-2509 and later).
    #[arg(long)]
    pub(crate) image: Vec<PathBuf>,
    /// v2v: the input video, an H.264 MP4; its first `--frames` frames as shown at `--fps` are
    /// edited (resized to `--size`).
    #[arg(long)]
    pub(crate) video: Option<PathBuf>,
    /// v2v: how far the input video is noised, in (0, 1]; the last `int(steps × strength)` steps
    /// run.
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Output size `WxH`, both multiples of 16, of 32 on TI2V-5B (default: 832x480 video,
    /// 1280x704 on TI2V-5B, 1024x1024 t2i, the ~1 MP size at the last input image's aspect for
    /// edit).
    #[arg(long)]
    pub(crate) size: Option<String>,
    /// Frames, `4k+1` (video).
    #[arg(long, default_value_t = 81)]
    frames: i64,
    /// Denoising steps (default 50; with `--sampler step-distill`, the count of
    /// `--denoising-steps`).
    #[arg(long)]
    steps: Option<usize>,
    /// Wan sampler: `unipc` (the default), `euler` (flow-matching Euler), or `step-distill`
    /// (LightX2V's step-distilled models: the fixed `--denoising-steps`, no CFG by default).
    #[arg(long, default_value = "unipc", value_parser = ["unipc", "euler", "step-distill"])]
    sampler: String,
    /// `--sampler step-distill`: the training timesteps evaluated, descending.
    #[arg(long, value_delimiter = ',', default_value = "1000,750,500,250")]
    denoising_steps: Vec<u32>,
    /// `--sampler step-distill`: move along the prediction between steps (Wan2.2
    /// distillations) instead of re-noising it (Wan2.1 distillations).
    #[arg(long)]
    no_renoise: bool,
    /// Guidance scale, off at ≤ 1: classifier-free guidance for Wan (default 5, 1 with
    /// `--sampler step-distill`), true CFG with norm rescale for Qwen-Image (default 4).
    #[arg(long)]
    pub(crate) guidance: Option<f64>,
    /// Wan2.2 A14B: guidance scale of the low-noise expert (default: `--guidance`).
    #[arg(long)]
    pub(crate) guidance_2: Option<f64>,
    /// Flow shift of the UniPC sampler; default: the model's `scheduler/scheduler_config.json`,
    /// else 3.0 up to 480p and 5.0 above.
    #[arg(long)]
    shift: Option<f64>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Images of the prompt (t2i/edit), drawn from the one seed as a served request's `n`;
    /// with more than one, image `i` is written to `OUT-i.png` (or `.npy`).
    #[arg(long, default_value_t = 1)]
    pub(crate) n: usize,
    /// Frames per second of an `.mp4` output.
    #[arg(long, default_value_t = 16)]
    fps: u32,
    /// A LoRA adapter on the Wan DiT, `NAME[:SCALE]` (scale 1 by default): `NAME.safetensors` in
    /// `--lora-dir`, or a path to a `.safetensors` file. Repeat to compose several, applied in
    /// order.
    #[arg(long = "lora", value_name = "NAME[:SCALE]")]
    pub(crate) loras: Vec<String>,
    /// Where `--lora NAME` adapters are (default: `loras/` in `--model-dir`).
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// Output file: a video as `.mp4` (H.264) or `.npy` (`uint8 [F, H, W, 3]`, lossless); an
    /// image as `.png` or `.npy` (`uint8 [H, W, 3]`).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

impl Args {
    /// `--task` as given.
    fn task_name(&self) -> &'static str {
        match self.task {
            CliTask::Video(Task::I2v) => "i2v",
            CliTask::TextImageToVideo => "ti2v",
            _ => "t2v",
        }
    }

    /// `--steps`, or its default.
    pub(crate) fn steps(&self) -> usize {
        match (self.steps, self.sampler.as_str()) {
            (Some(s), _) => s,
            (None, "step-distill") => self.denoising_steps.len(),
            (None, _) => 50,
        }
    }

    /// The Wan sampler the arguments name, with `shift`.
    fn scheduler(&self, shift: f64) -> Result<SchedulerChoice> {
        Ok(match self.sampler.as_str() {
            "euler" => {
                SchedulerChoice::Euler(FlowMatchEulerConfig { shift, num_train_timesteps: 1000 })
            }
            "step-distill" => {
                let c = StepDistillConfig {
                    denoising_steps: self.denoising_steps.clone(),
                    shift,
                    renoise: !self.no_renoise,
                };
                c.validate().map_err(|e| anyhow::anyhow!("--denoising-steps: {e}"))?;
                if self.steps() != c.denoising_steps.len() {
                    bail!(
                        "--steps {}: --sampler step-distill runs one step per --denoising-steps \
                         timestep ({})",
                        self.steps(),
                        c.denoising_steps.len()
                    );
                }
                SchedulerChoice::StepDistill(c)
            }
            _ => SchedulerChoice::UniPc(UniPcConfig::wan(shift)),
        })
    }
}

/// What `x2v generate` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliTask {
    /// A Wan video from text or a first frame.
    Video(Task),
    /// A Wan2.2 TI2V-5B video from text and, when given, a first frame.
    TextImageToVideo,
    /// A Wan video from an input video (video-to-video on a text-to-video model).
    VideoToVideo,
    /// Qwen-Image text to image.
    TextToImage,
    /// Qwen-Image edit (one or more input images).
    Edit,
}

fn parse_task(s: &str) -> Result<CliTask, String> {
    match s {
        "t2v" => Ok(CliTask::Video(Task::T2v)),
        "i2v" => Ok(CliTask::Video(Task::I2v)),
        "ti2v" => Ok(CliTask::TextImageToVideo),
        "v2v" => Ok(CliTask::VideoToVideo),
        "t2i" => Ok(CliTask::TextToImage),
        "edit" => Ok(CliTask::Edit),
        other => Err(format!("unknown task `{other}` (expected t2v, i2v, ti2v, v2v, t2i or edit)")),
    }
}

/// `NAME[:SCALE]` (scale 1 when absent) of the command-line flag `flag`.
pub(crate) fn lora_name_and_scale<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, f64)> {
    match spec.rsplit_once(':') {
        Some((name, scale)) => {
            let s: f64 = scale.parse().ok().filter(|s: &f64| s.is_finite()).with_context(|| {
                format!("{flag} {spec}: scale `{scale}` is not a finite number")
            })?;
            Ok((name, s))
        }
        None => Ok((spec, 1.0)),
    }
}

/// `--lora NAME[:SCALE]` → (file, name, scale).
fn parse_lora(spec: &str, a: &Args) -> Result<(PathBuf, String, f64)> {
    let (name, scale) = lora_name_and_scale("--lora", spec)?;
    if name.ends_with(".safetensors") || name.contains('/') {
        let path = PathBuf::from(name);
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or(name).to_owned();
        return Ok((path, stem, scale));
    }
    x2v_models::lora::check_name(name).map_err(|e| anyhow::anyhow!("--lora {spec}: {e}"))?;
    let dir = a.lora_dir.clone().unwrap_or_else(|| a.model_dir.join("loras"));
    let path = dir.join(format!("{name}.safetensors"));
    if !path.is_file() {
        let known = x2v_models::lora::list_names(&dir);
        bail!(
            "--lora {spec}: no adapter `{name}` in {} (available: {})",
            dir.display(),
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        );
    }
    Ok((path, name.to_owned(), scale))
}

/// `WxH` → (width, height).
pub(crate) fn parse_size(s: &str) -> Result<(i64, i64)> {
    let bad = || anyhow::anyhow!("--size must be WxH (e.g. 832x480), got `{s}`");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?))
}

/// Everything checked, nothing loaded yet.
struct Job {
    scheduler: SchedulerChoice,
    task: Task,
    geometry: Geometry,
    guidance: f64,
    guidance_2: Option<f64>,
    /// `(file, adapter name, scale)` per `--lora`.
    loras: Vec<(PathBuf, String, f64)>,
    image: Option<Tensor>,
    /// v2v: the input video `uint8 [F, H, W, 3]` and the strength.
    video: Option<(Tensor, f64)>,
}

fn validate(a: &Args, cli_task: CliTask) -> Result<Job> {
    let ti2v = cli_task == CliTask::TextImageToVideo;
    let task = match cli_task {
        CliTask::Video(task) => task,
        // TI2V-5B: with a first frame its encoder also loads the VAE encoder.
        CliTask::TextImageToVideo if !a.image.is_empty() => Task::I2v,
        _ => Task::T2v,
    };
    let v2v = cli_task == CliTask::VideoToVideo;
    let dir = ModelDir::open(&a.model_dir).with_context(|| "--model-dir".to_string())?;
    if ti2v && !dir.ti2v() {
        bail!(
            "--task ti2v needs a Wan2.2 TI2V-5B model (`expand_timesteps` in model_index.json, or \
             Wan2.2_VAE.pth); --model-dir {} is not one",
            a.model_dir.display()
        );
    }
    let default_size = if dir.ti2v() { "1280x704" } else { "832x480" };
    let size = a.size.as_deref().unwrap_or(default_size);
    let (width, height) = parse_size(size)?;
    for (name, v) in [("width", width), ("height", height)] {
        if v < 16 || v % 16 != 0 {
            bail!("--size {size}: {name} {v} is not a positive multiple of 16");
        }
    }
    if a.frames < 1 || (a.frames - 1) % 4 != 0 {
        bail!("--frames {}: the frame count must be 4k+1 (1, 5, 9, …, 81)", a.frames);
    }
    let geometry = Geometry { frames: a.frames, height, width };
    let latents = dir.latent_spec().with_context(|| "--model-dir".to_string())?;
    geometry.validate_for(latents).map_err(|e| anyhow::anyhow!("--size {size}: {e}"))?;
    if a.steps() == 0 {
        bail!("--steps must be at least 1, got 0");
    }
    let distilled = a.sampler == "step-distill";
    let guidance = a.guidance.unwrap_or(if distilled { 1.0 } else { 5.0 });
    if !guidance.is_finite() {
        bail!("--guidance must be a finite number, got {guidance}");
    }
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if !ext.eq_ignore_ascii_case("npy") && !ext.eq_ignore_ascii_case("mp4") {
        bail!("--out {}: the output must be a .mp4 or .npy file", a.out.display());
    }
    if a.fps == 0 || a.fps > x2v_media::MAX_FPS {
        bail!("--fps must be from 1 to {}, got {}", x2v_media::MAX_FPS, a.fps);
    }
    let video = match (v2v, &a.video) {
        (true, None) => bail!("--task v2v needs --video FILE (an H.264 MP4)"),
        (false, Some(p)) => bail!("--video {} is only used with --task v2v", p.display()),
        (true, Some(p)) => Some((read_video(p, a.fps, a.frames)?, check_strength(a)?)),
        (false, None) => None,
    };
    let image = match (task, a.image.as_slice()) {
        (Task::I2v, []) => bail!("--task i2v needs --image FILE (the first frame)"),
        (Task::T2v, [p, ..]) => {
            bail!("--image {} is only used with --task i2v, ti2v and edit", p.display())
        }
        (Task::I2v, [p]) => Some(read_image(p)?),
        (Task::I2v, _) => {
            bail!("--task {} takes one --image, got {}", a.task_name(), a.image.len())
        }
        (Task::T2v, []) => None,
    };
    let shift = match a.shift {
        Some(s) if s.is_finite() && s > 0.0 => s,
        Some(s) => bail!("--shift must be a positive number, got {s}"),
        None if distilled => 5.0,
        None => configured_shift(dir.root()).unwrap_or(if height * width <= 480 * 832 {
            3.0
        } else {
            5.0
        }),
    };
    if let Some(g) = a.guidance_2.filter(|g| !g.is_finite()) {
        bail!("--guidance-2 must be a finite number, got {g}");
    }
    let loras = a.loras.iter().map(|spec| parse_lora(spec, a)).collect::<Result<_>>()?;
    let scheduler = a.scheduler(shift)?;
    Ok(Job { scheduler, task, geometry, guidance, guidance_2: a.guidance_2, loras, image, video })
}

/// `--strength`, checked by the denoising loop's own rule (in (0, 1], at least one step left).
fn check_strength(a: &Args) -> Result<f64> {
    first_step(a.steps(), a.strength).map_err(|e| anyhow::anyhow!("--strength: {e}"))?;
    Ok(a.strength)
}

/// The first `frames` frames of an MP4 as shown at `fps`, RGB `uint8 [F, H, W, 3]`.
fn read_video(path: &Path, fps: u32, frames: i64) -> Result<Tensor> {
    let bytes =
        std::fs::read(path).with_context(|| format!("--video {}: cannot read", path.display()))?;
    let v = x2v_media::decode_mp4_exact(&bytes, fps.max(1), frames.max(1) as usize)
        .with_context(|| format!("--video {} (--frames {frames}, --fps {fps})", path.display()))?;
    Ok(Tensor::from_slice(&v.data).view([v.frames as i64, v.height as i64, v.width as i64, 3]))
}

/// `flow_shift` of a diffusers `scheduler/scheduler_config.json`, if any.
fn configured_shift(root: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(root.join("scheduler/scheduler_config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("flow_shift")?.as_f64()
}

/// An image file as RGB `uint8 [H, W, 3]`.
fn read_image(path: &Path) -> Result<Tensor> {
    let img = read_rgb(path)?;
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw()).view([i64::from(h), i64::from(w), 3]))
}

/// An image file decoded to RGB; errors name the `--image` value.
pub(crate) fn read_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("--image {}: cannot read the image", path.display()))?
        .to_rgb8())
}

/// Writes a `uint8` tensor as a NumPy `.npy` file (format 1.0, C order).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    if t.kind() != Kind::Uint8 {
        bail!("write_npy takes uint8 tensors, got {:?}", t.kind());
    }
    let shape: Vec<String> = t.size().iter().map(i64::to_string).collect();
    let shape = if shape.len() == 1 { format!("{},", shape[0]) } else { shape.join(", ") };
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({shape}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let data: Vec<u8> = Vec::try_from(&t.contiguous().view([-1]))?;
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&u16::try_from(header.len())?.to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(&data)?;
    f.flush()?;
    Ok(())
}

/// Encodes `uint8 [F, H, W, 3]` frames as an H.264 MP4 at `fps`.
fn write_mp4(path: &Path, t: &Tensor, fps: u32) -> Result<()> {
    let size = t.size();
    let data: Vec<u8> = Vec::try_from(&t.contiguous().view([-1]))?;
    let frames =
        x2v_media::Frames::new(&data, size[0] as usize, size[1] as usize, size[2] as usize)?;
    let mp4 = x2v_media::encode_mp4(&frames, fps, &x2v_media::Mp4Options::default())?;
    std::fs::write(path, mp4).with_context(|| format!("cannot write {}", path.display()))
}

fn generate(a: &Args, job: Job) -> Result<()> {
    x2v_models::weights::map_large_allocations();
    // CPU runs fp32; on CUDA the encoders and the DiT run in bf16, the VAE decoder in fp32.
    let (device, kind) = device_and_kind();
    eprintln!("x2v generate: {:?} on {device:?}", job.geometry);
    let phase1 = {
        let v2v = job.video.is_some();
        let encoder = WanEncoder::load_with(&a.model_dir, job.task, v2v, device, kind)?;
        let mut phase1 = encoder.encode(
            &a.prompt,
            a.negative_prompt.as_deref(),
            job.image.as_ref(),
            job.geometry,
            job.guidance,
        )?;
        if let Some((video, _)) = &job.video {
            phase1.video_latents = Some(encoder.encode_video(video, job.geometry)?);
        }
        phase1
    };
    let phase2 = {
        let dit = load_dit(&a.model_dir, device, kind)?;
        let adapters = job
            .loras
            .iter()
            .map(|(path, name, scale)| Ok((Rc::new(load_adapter(name, path)?), *scale)))
            .collect::<Result<Vec<_>>>()?;
        dit.set_loras(&adapters)?;
        let settings = DenoiseSettings {
            steps: a.steps(),
            guidance_scale: job.guidance,
            guidance_scale_2: job.guidance_2,
            seed: a.seed,
            scheduler: job.scheduler.clone(),
            batch_cfg: true,
            strength: job.video.as_ref().map(|(_, s)| *s),
        };
        let bar = progress_bar(match settings.strength {
            Some(s) => (a.steps() as f64 * s) as usize,
            None => a.steps(),
        });
        let out = denoise(&dit, &phase1, &settings, |_| bar.inc(1), || false);
        bar.finish();
        out?
    };
    let frames = WanDecoder::load(&a.model_dir, device, Kind::Float)?.decode(&phase2)?;
    let is_mp4 = a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("mp4"));
    if is_mp4 {
        write_mp4(&a.out, &frames, a.fps)?;
    } else {
        write_npy(&a.out, &frames)?;
    }
    eprintln!("x2v generate: wrote {:?} uint8 frames to {}", frames.size(), a.out.display());
    Ok(())
}

/// The denoising progress bar on stderr.
pub(crate) fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("denoise {bar:30} {pos}/{len} steps [{elapsed}<{eta}]")
            .expect("a valid template"),
    );
    bar
}

/// The device of a one-shot run and the weights' dtype there: fp32 on the CPU, bf16 on CUDA.
pub(crate) fn device_and_kind() -> (Device, Kind) {
    let device = Device::cuda_if_available();
    (device, if device == Device::Cpu { Kind::Float } else { Kind::BFloat16 })
}

pub fn run(a: &Args) -> ExitCode {
    match a.task {
        CliTask::Video(_) | CliTask::TextImageToVideo | CliTask::VideoToVideo => {
            finish(validate(a, a.task), |job| generate(a, job))
        }
        CliTask::TextToImage | CliTask::Edit => crate::generate_image::run(a),
    }
}

/// The exit status of one `x2v generate`: 2 for arguments that failed validation (nothing was
/// loaded), 1 for a failed generation; either error is printed.
pub(crate) fn finish<J>(validated: Result<J>, generate: impl FnOnce(J) -> Result<()>) -> ExitCode {
    let report = |e: anyhow::Error, code: u8| {
        eprintln!("x2v generate: {e:#}");
        ExitCode::from(code)
    };
    match validated.map(generate) {
        Err(e) => report(e, 2),
        Ok(Err(e)) => report(e, 1),
        Ok(Ok(())) => ExitCode::SUCCESS,
    }
}

//! `x2v generate --task t2i|edit`: Qwen-Image images (`--n`, one by default) in this process — encoder, DiT and
//! decoder stages in turn — written as a PNG or losslessly as `uint8 [H, W, 3]` to a `.npy` file.
//!
//! Every argument is validated before any model is loaded; errors name the value at fault.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};
use x2v_models::qwen_image::pipeline::{
    DenoiseSettings, MAX_IMAGES, ModelDir, QwenDecoder, QwenEncoder, Variant, denoise,
    load_transformer,
};
use x2v_models::qwen_image::resize::RgbImage;
use x2v_models::schedulers::FlowMatchDynamicConfig;

use crate::generate::{
    Args, CliTask, device_and_kind, finish, parse_size, progress_bar, read_rgb, write_npy,
};

/// Output as PNG or as NumPy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Npy,
}

/// Everything checked, nothing loaded yet.
struct Job {
    size: Option<(i64, i64)>,
    guidance: f64,
    images: Vec<RgbImage>,
    scheduler: FlowMatchDynamicConfig,
    format: Format,
}

fn validate(a: &Args) -> Result<Job> {
    let dir = ModelDir::open(&a.model_dir).with_context(|| "--model-dir".to_string())?;
    match (a.task, dir.variant()) {
        (CliTask::TextToImage, Variant::TextToImage)
        | (CliTask::Edit, Variant::Edit | Variant::EditPlus) => {}
        (_, v) => bail!(
            "--model-dir {} holds a {} model, which does not do --task {}",
            a.model_dir.display(),
            v.class_name(),
            if a.task == CliTask::Edit { "edit" } else { "t2i" }
        ),
    }
    let size = match (&a.size, dir.variant()) {
        (Some(s), _) => Some(parse_size(s)?),
        (None, Variant::TextToImage) => Some((1024, 1024)),
        (None, _) => None,
    };
    if let (Some((w, h)), Some(s)) = (size, &a.size) {
        for (name, v) in [("width", w), ("height", h)] {
            if !(16..=4096).contains(&v) {
                bail!("--size {s}: {name} {v} is not from 16 to 4096");
            }
        }
    }
    if a.steps() == 0 || a.steps() > 1000 {
        bail!("--steps must be from 1 to 1000, got {}", a.steps());
    }
    if !(1..=MAX_IMAGES).contains(&a.n) {
        bail!("--n must be from 1 to {MAX_IMAGES}, got {}", a.n);
    }
    let guidance = a.guidance.unwrap_or(4.0);
    if !a.loras.is_empty() {
        bail!("--lora applies to the Wan DiT; Qwen-Image adapters are not supported yet");
    }
    if a.guidance_2.is_some() {
        bail!("--guidance-2 is the low-noise expert's scale of Wan2.2 A14B; Qwen-Image has one");
    }
    if !guidance.is_finite() {
        bail!("--guidance must be a finite number, got {guidance}");
    }
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let format = match ext.as_str() {
        "png" => Format::Png,
        "npy" => Format::Npy,
        _ => bail!("--out {}: an image is written as a .png or .npy file", a.out.display()),
    };
    let max = dir.variant().max_images();
    match (dir.variant(), a.image.len()) {
        (Variant::TextToImage, 0) => {}
        (Variant::TextToImage, _) => {
            bail!("--image {} is only used with --task edit", a.image[0].display())
        }
        (_, 0) => bail!("--task edit needs --image FILE (repeat it for several images)"),
        (v, n) if n > max => bail!("{} takes at most {max} --image, got {n}", v.class_name()),
        _ => {}
    }
    let images = a.image.iter().map(|p| rgb_image(p)).collect::<Result<Vec<_>>>()?;
    let scheduler = FlowMatchDynamicConfig::from_dir(&dir.root().join("scheduler"))
        .context("--model-dir: scheduler")?;
    Ok(Job { size, guidance, images, scheduler, format })
}

/// An image file as an RGB buffer.
fn rgb_image(path: &Path) -> Result<RgbImage> {
    let img = read_rgb(path)?;
    let (w, h) = img.dimensions();
    RgbImage::new(w as usize, h as usize, img.into_raw())
        .with_context(|| format!("--image {}", path.display()))
}

/// Writes `uint8 [H, W, 3]` as a PNG.
fn write_png(path: &Path, t: &Tensor) -> Result<()> {
    let size = t.size();
    let data: Vec<u8> = Vec::try_from(&t.contiguous().view([-1]))?;
    let img = image::RgbImage::from_raw(size[1] as u32, size[0] as u32, data)
        .context("an RGB image buffer of the decoded size")?;
    img.save(path).with_context(|| format!("cannot write {}", path.display()))
}

fn generate(a: &Args, job: Job) -> Result<()> {
    x2v_models::weights::map_large_allocations();
    // CPU runs fp32; on CUDA every component runs in bf16, as the reference pipelines.
    let (device, kind) = device_and_kind();
    let phase1 = {
        let encoder = QwenEncoder::load(&a.model_dir, device, kind)?;
        encoder.encode(
            &a.prompt,
            a.negative_prompt.as_deref(),
            &job.images,
            job.size,
            job.guidance,
        )?
    };
    let g = phase1.geometry;
    eprintln!("x2v generate: {}x{} image on {device:?}", g.width, g.height);
    let phase2 = {
        let dit = load_transformer(&a.model_dir, device, kind)?;
        let settings = DenoiseSettings {
            num_images: a.n,
            max_batch: a.n,
            ..DenoiseSettings::single(a.steps(), job.guidance, a.seed, job.scheduler.clone())
        };
        let bar = progress_bar(a.steps());
        let out = denoise(&dit, &phase1, &settings, |_| bar.inc(1), || false);
        bar.finish();
        out?
    };
    let images = QwenDecoder::load(&a.model_dir, device, kind)?.decode(&phase2)?;
    debug_assert_eq!(images.kind(), Kind::Uint8);
    for i in 0..a.n {
        let path = output_path(&a.out, i, a.n);
        let image = images.get(i as i64);
        match job.format {
            Format::Png => write_png(&path, &image)?,
            Format::Npy => write_npy(&path, &image)?,
        }
        eprintln!("x2v generate: wrote {:?} uint8 image to {}", image.size(), path.display());
    }
    Ok(())
}

/// Where image `i` of `n` goes: `out` itself for one image, else `STEM-i.EXT` beside it.
fn output_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
    let ext = out.extension().map(|e| e.to_string_lossy()).unwrap_or_default();
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

pub fn run(a: &Args) -> ExitCode {
    finish(validate(a), |job| generate(a, job))
}

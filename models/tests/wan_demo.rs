//! The demo model written from Rust: x2v's three stage loaders accept it strictly, a short
//! encode → denoise → decode run produces frames of the requested shape that are not constant,
//! and one seed always writes the same bytes.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::schedulers::UniPcConfig;
use x2v_models::wan::demo::{DemoOptions, write_demo_model};
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, SchedulerChoice, Task, WanDecoder, WanEncoder, denoise, load_dit,
};
use x2v_models::wan::vae::AutoencoderKLWan;
use x2v_models::weights::parameter_bytes;

/// Runs the three stages on `dir` (2 UniPC steps, guidance 5) and returns `uint8 [F, H, W, 3]`.
fn generate(dir: &Path, task: Task, g: Geometry, image: Option<&Tensor>) -> Tensor {
    let encoder = WanEncoder::load(dir, task, Device::Cpu, Kind::Float).unwrap();
    let phase1 = encoder.encode("A cat walks on the grass.", None, image, g, 5.0).unwrap();
    let dit = load_dit(dir, Device::Cpu, Kind::Float).unwrap();
    let settings = DenoiseSettings {
        steps: 2,
        guidance_scale: 5.0,
        guidance_scale_2: None,
        seed: 1,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(3.0)),
        batch_cfg: true,
        strength: None,
    };
    let phase2 = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap();
    let decoder = WanDecoder::load(dir, Device::Cpu, Kind::Float).unwrap();
    assert!(encoder.parameter_bytes() > 0 && dit.parameter_bytes() > 0);
    assert!(decoder.parameter_bytes() > 0);
    decoder.decode(&phase2).unwrap()
}

#[track_caller]
fn assert_varied_frames(frames: &Tensor, g: Geometry) {
    assert_eq!(frames.size(), [g.frames, g.height, g.width, 3]);
    assert_eq!(frames.kind(), Kind::Uint8);
    let f = frames.to_kind(Kind::Double);
    let std = f.std(true).double_value(&[]);
    let (lo, hi) = (f.min().double_value(&[]), f.max().double_value(&[]));
    eprintln!("frames: std {std:.1}, range [{lo}, {hi}]");
    assert!(
        std > 5.0 && hi - lo > 50.0,
        "frames are nearly constant: std {std}, range [{lo}, {hi}]"
    );
}

#[test]
fn t2v_demo_runs_through_the_three_stages() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo_model(
        tmp.path(),
        &DemoOptions { seed: 0, i2v: false, two_experts: false, ti2v: false },
    )
    .unwrap();
    let g = Geometry { frames: 9, height: 64, width: 96 };
    assert_varied_frames(&generate(tmp.path(), Task::T2v, g, None), g);
    // A T2V directory has no image encoder.
    let err = WanEncoder::load(tmp.path(), Task::I2v, Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("image_encoder/"), "{err}");

    // The decoder stage holds the decoder half of the VAE only.
    let decoder = WanDecoder::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let full =
        AutoencoderKLWan::load(&tmp.path().join("vae"), None, Device::Cpu, Kind::Float).unwrap();
    assert!(decoder.parameter_bytes() < parameter_bytes(full.var_store()));
}

#[test]
fn ti2v_demo_runs_text_and_image_to_video_through_the_three_stages() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo_model(
        tmp.path(),
        &DemoOptions { seed: 2, i2v: false, two_experts: false, ti2v: true },
    )
    .unwrap();
    let g = Geometry { frames: 5, height: 64, width: 96 };
    assert_varied_frames(&generate(tmp.path(), Task::T2v, g, None), g);
    let image = Tensor::randint(256, [64, 96, 3], (Kind::Uint8, Device::Cpu));
    let frames = generate(tmp.path(), Task::I2v, g, Some(&image));
    assert_varied_frames(&frames, g);
    // The VAE is Wan2.2's (48 channels, 16×): 64×96 is 4×6 latents.
    let vae =
        AutoencoderKLWan::load(&tmp.path().join("vae"), None, Device::Cpu, Kind::Float).unwrap();
    assert_eq!((vae.config().z_dim, vae.config().spatial_factor()), (48, 16));
    assert!(!tmp.path().join("image_encoder").exists());
}

#[test]
fn i2v_demo_runs_through_the_three_stages() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo_model(
        tmp.path(),
        &DemoOptions { seed: 5, i2v: true, two_experts: false, ti2v: false },
    )
    .unwrap();
    let g = Geometry { frames: 5, height: 64, width: 64 };
    let ramp = Tensor::arange(64 * 64 * 3, (Kind::Int64, Device::Cpu)).remainder(251);
    let image = ramp.to_kind(Kind::Uint8).view([64, 64, 3]);
    assert_varied_frames(&generate(tmp.path(), Task::I2v, g, Some(&image)), g);
}

#[test]
fn one_seed_writes_identical_files() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let opts = DemoOptions { seed: 11, i2v: true, two_experts: false, ti2v: false };
    write_demo_model(a.path(), &opts).unwrap();
    write_demo_model(b.path(), &opts).unwrap();
    let (fa, fb) = (
        x2v_models::testing::files_by_path(a.path()),
        x2v_models::testing::files_by_path(b.path()),
    );
    let names: Vec<&str> = fa.keys().map(String::as_str).collect();
    for want in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "image_processor/preprocessor_config.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert_eq!(fa, fb, "same seed, different files");

    write_demo_model(c.path(), &DemoOptions { seed: 12, ..opts }).unwrap();
    let fc = x2v_models::testing::files_by_path(c.path());
    let weights = "transformer/diffusion_pytorch_model.safetensors";
    assert_ne!(fa[weights], fc[weights], "another seed gives other weights");
    assert_eq!(fa["transformer/config.json"], fc["transformer/config.json"]);
}

//! Wan2.2 TI2V-5B parity on a tiny random model (`tools/fixtures/wan_ti2v.py`): the Wan2.2 VAE
//! against diffusers `AutoencoderKLWan` (`is_residual`, `patch_size` 2, 48 latent channels) in both
//! published key layouts, and x2v's encode → denoise → decode stages against diffusers'
//! `WanPipeline` (text only) and `WanImageToVideoPipeline` (text and first frame) with
//! `expand_timesteps`.

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::schedulers::UniPcConfig;
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, LatentSpec, ModelDir, Phase1, SchedulerChoice, Task, WanDecoder,
    WanEncoder, denoise, load_dit,
};
use x2v_models::wan::transformer::WanTransformer3DModel;
use x2v_models::wan::vae::{AutoencoderKLWan, VaeConfig, VaeParts};

use common::{
    PipelineSettings as Settings, assert_frames_match, frame_agreement, pipeline_settings,
};

/// fp32 CPU; relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, TOL);
}

fn check_vae(what: &str, vae: &AutoencoderKLWan, io: &std::collections::HashMap<String, Tensor>) {
    let mode = vae.encode(&io["video"]).unwrap();
    assert_eq!(mode.size(), [1, 48, 2, 2, 4]);
    close(&format!("{what} latent mode"), &mode, &io["latent_mode_raw"]);
    let decoded = vae.decode(&io["latents"]).unwrap();
    assert_eq!(decoded.size(), [1, 3, 5, 32, 64]);
    close(&format!("{what} decoded"), &decoded, &io["decoded"]);
}

#[test]
fn wan22_vae_matches_diffusers_in_both_layouts() {
    let fx = common::fixture("wan_ti2v");
    let io = common::tensors(&fx.join("vae_io.safetensors"));
    let vae = AutoencoderKLWan::load(&fx.join("ti2v/vae"), None, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(LatentSpec::of_vae(vae.config()), LatentSpec::WAN22);
    check_vae("diffusers layout", &vae, &io);

    // The original file's keys, with the config read from the directory (the tiny model is not
    // the published preset).
    let cfg = vae.config().clone();
    let original = fx.join("ti2v_original/Wan2.2_VAE.pth");
    let vae = AutoencoderKLWan::load(&original, Some(cfg), Device::Cpu, Kind::Float).unwrap();
    check_vae("original layout", &vae, &io);

    // Each half loads alone and agrees with the whole.
    let dec = AutoencoderKLWan::load_parts(
        &fx.join("ti2v/vae"),
        None,
        Device::Cpu,
        Kind::Float,
        VaeParts::Decoder,
    )
    .unwrap();
    assert!(dec.decode(&io["latents"]).unwrap().equal(&vae.decode(&io["latents"]).unwrap()));

    // The check can fail: the frames flipped left to right encode to other latents.
    let flipped = vae.encode(&io["video"].flip([4])).unwrap();
    let (diff, _) = common::max_abs_diff(&flipped, &io["latent_mode_raw"]);
    assert!(diff > 1e-2, "a flipped video encodes alike ({diff})");
}

#[test]
fn wan22_vae_preset_and_config_rules() {
    let cfg = VaeConfig::wan22();
    cfg.validate().unwrap();
    assert_eq!((cfg.spatial_factor(), cfg.temporal_factor(), cfg.video_channels()), (16, 4, 3));
    assert_eq!(LatentSpec::of_vae(&cfg), LatentSpec::WAN22);
    // The published Wan2.2 VAE's encoder half (diffusers counts 149,637,088 parameters with
    // `quant_conv`, 704,688,668 in all), built empty.
    let vae = AutoencoderKLWan::build(&cfg, VaeParts::Encoder, Device::Cpu, Kind::Float).unwrap();
    let params: i64 = vae.var_store().variables().values().map(|v| v.numel() as i64).sum();
    assert_eq!(params, 149_637_088);
    assert!(VaeConfig::for_original_file(Path::new("/m/Wan2.2_VAE.pth")).is_residual);
    assert!(!VaeConfig::for_original_file(Path::new("/m/Wan2.1_VAE.pth")).is_residual);
    let bad = VaeConfig { in_channels: 10, ..VaeConfig::wan22() };
    assert!(bad.validate().unwrap_err().contains("in_channels = 10"));
    let bad = VaeConfig { scale_factor_spatial: Some(8), ..VaeConfig::wan22() };
    assert!(bad.validate().unwrap_err().contains("scale_factor_spatial = 8"));
}

fn geometry(s: &Settings) -> Geometry {
    Geometry { frames: s.frames, height: s.height, width: s.width }
}

fn settings(s: &Settings) -> DenoiseSettings {
    DenoiseSettings {
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        guidance_scale_2: None,
        seed: s.seed,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(s.shift)),
        batch_cfg: true,
        strength: None,
    }
}

fn encode(dir: &Path, task: Task, s: &Settings, image: Option<&Tensor>) -> Phase1 {
    let encoder = WanEncoder::load(dir, task, Device::Cpu, Kind::Float).unwrap();
    assert!(encoder.is_ti2v());
    encoder
        .encode(&s.prompt, Some(&s.negative_prompt), image, geometry(s), s.guidance_scale)
        .unwrap()
}

/// The three x2v stages on `dir`: frames `uint8 [F, H, W, 3]`.
fn generate(dir: &Path, task: Task, s: &Settings, image: Option<&Tensor>) -> Tensor {
    let phase1 = encode(dir, task, s, image);
    let dit = load_dit(dir, Device::Cpu, Kind::Float).unwrap();
    assert!(dit.expands_timesteps());
    let phase2 = denoise(&dit, &phase1, &settings(s), |_| {}, || false).unwrap();
    assert_eq!(phase2.latents.size(), geometry(s).latent_shape_for(LatentSpec::WAN22));
    let frames = WanDecoder::load(dir, Device::Cpu, Kind::Float).unwrap().decode(&phase2).unwrap();
    assert_eq!(frames.size(), [s.frames, s.height, s.width, 3]);
    frames
}

#[test]
fn ti2v_text_to_video_matches_wan_pipeline() {
    let fx = common::fixture("wan_ti2v");
    let s = pipeline_settings(&fx, "t2v");
    let want = common::tensors(&fx.join("t2v.safetensors"));
    let dir = fx.join("ti2v");
    // A TI2V encoder loaded for I2V takes text alone too.
    for task in [Task::T2v, Task::I2v] {
        let frames = generate(&dir, task, &s, None);
        assert_frames_match("ti2v t2v frames", &frames, &want["frames_u8"]);
    }
}

#[test]
fn ti2v_image_to_video_matches_wan_image_to_video_pipeline() {
    let fx = common::fixture("wan_ti2v");
    let s = pipeline_settings(&fx, "i2v");
    let want = common::tensors(&fx.join("i2v.safetensors"));
    let dir = fx.join("ti2v");
    let phase1 = encode(&dir, Task::I2v, &s, Some(&want["image"]));
    assert!(phase1.image_embeds.is_none());
    assert_eq!(phase1.condition.as_ref().unwrap().size(), [1, 48, 1, 4, 4]);
    let frames = generate(&dir, Task::I2v, &s, Some(&want["image"]));
    assert_frames_match("ti2v i2v frames", &frames, &want["frames_u8"]);

    // The check can fail: the same job without the image gives other frames.
    let other = generate(&dir, Task::I2v, &s, None);
    let (_, within) = frame_agreement(&other, &want["frames_u8"]);
    assert!(within < common::MIN_MATCH, "the image changes nothing ({within})");
}

#[test]
fn ti2v_original_layout_loads_as_the_diffusers_one() {
    let fx = common::fixture("wan_ti2v");
    let dir = ModelDir::open(&fx.join("ti2v_original")).unwrap();
    assert!(dir.ti2v());
    assert!(!dir.uses_clip().unwrap());
    assert!(dir.vae().unwrap().ends_with("Wan2.2_VAE.pth"));
    // Without a config beside it the original file takes the published preset.
    assert_eq!(dir.latent_spec().unwrap(), LatentSpec::WAN22);

    let s = pipeline_settings(&fx, "t2v");
    let phase1 = encode(&fx.join("ti2v"), Task::T2v, &s, None);
    let diffusers = load_dit(&fx.join("ti2v"), Device::Cpu, Kind::Float).unwrap();
    let original = load_dit(&fx.join("ti2v_original"), Device::Cpu, Kind::Float).unwrap();
    assert!(original.expands_timesteps());
    assert_eq!(original.latent_spec(), LatentSpec::WAN22);
    let run = |dit| denoise(dit, &phase1, &settings(&s), |_| {}, || false).unwrap().latents;
    assert!(run(&diffusers).equal(&run(&original)));
}

#[test]
fn per_token_timesteps_equal_one_timestep_when_they_agree() {
    let fx = common::fixture("wan_ti2v");
    let dit = WanTransformer3DModel::load(&fx.join("ti2v/transformer"), Device::Cpu, Kind::Float)
        .unwrap();
    let _guard = tch::no_grad_guard();
    let x = Tensor::randn([2, 48, 2, 4, 6], (Kind::Float, Device::Cpu));
    let text = Tensor::randn([2, 512, 48], (Kind::Float, Device::Cpu));
    let one = dit.forward(&x, &Tensor::from_slice(&[700f32, 300.0]), &text, None).unwrap();
    let rows = Tensor::from_slice(&[700f32, 300.0]).view([2, 1]).expand([2, 12], true);
    let per_token = dit.forward(&x, &rows, &text, None).unwrap();
    common::assert_close("per-token timesteps", &per_token, &one, 1e-5);
    // Tokens of frame 0 at 0 change frame 0's velocity.
    let held = rows.copy();
    let _ = held.narrow(1, 0, 6).fill_(0.0);
    let out = dit.forward(&x, &held, &text, None).unwrap();
    assert!(!out.narrow(2, 0, 1).allclose(&one.narrow(2, 0, 1), 1e-3, 1e-3, false));
    let err = dit.forward(&x, &rows.narrow(1, 0, 5), &text, None).unwrap_err().to_string();
    assert!(err.contains("per token [2, 12]"), "{err}");
}

#[test]
fn ti2v_inputs_are_checked() {
    let fx = common::fixture("wan_ti2v");
    let dir = fx.join("ti2v");
    let s = pipeline_settings(&fx, "i2v");
    let image = &common::tensors(&fx.join("i2v.safetensors"))["image"];
    // H and W must be multiples of 32 (16× VAE, 2× patch).
    let t2v = WanEncoder::load(&dir, Task::T2v, Device::Cpu, Kind::Float).unwrap();
    let g = Geometry { frames: 5, height: 48, width: 64 };
    let err = t2v.encode("a", None, None, g, 1.0).unwrap_err().to_string();
    assert!(err.contains("height must be a positive multiple of 32"), "{err}");
    // Loaded for text-to-video, it has no VAE encoder for an image.
    let err = t2v.encode("a", None, Some(image), geometry(&s), 1.0).unwrap_err().to_string();
    assert!(err.contains("load it for i2v"), "{err}");
    // No video-to-video on TI2V.
    let err = WanEncoder::load_with(&dir, Task::T2v, true, Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("video-to-video"), "{err}");
    // A first frame of the wrong shape reaches the DiT: named.
    let mut phase1 = encode(&dir, Task::T2v, &s, None);
    phase1.condition = Some(Tensor::zeros([1, 48, 2, 4, 4], (Kind::Float, Device::Cpu)));
    let dit = load_dit(&dir, Device::Cpu, Kind::Float).unwrap();
    let err = denoise(&dit, &phase1, &settings(&s), |_| {}, || false).unwrap_err().to_string();
    assert!(err.contains("first frame's latents must be [1, 48, 1, 4, 4]"), "{err}");
}

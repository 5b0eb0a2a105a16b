//! x2v's denoise stage against diffusers' `WanPipeline` on the tiny T2V DiT: same seed, same
//! prompt embeddings, UniPC with CFG, `output_type="latent"` (`tools/fixtures/wan_dit.py`).

mod common;

use std::cell::Cell;

use tch::{Device, Kind};
use x2v_models::schedulers::{FlowMatchEulerConfig, UniPcConfig};
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, Phase1, SchedulerChoice, WanDit, denoise, initial_noise,
};
use x2v_models::wan::transformer::WanTransformer3DModel;

/// Final-latent tolerance, relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Settings {
    frames: i64,
    height: i64,
    width: i64,
    steps: usize,
    guidance_scale: f64,
    seed: u64,
    #[serde(default)]
    shift: Option<f64>,
}

fn setup() -> (WanDit, Phase1, DenoiseSettings, std::collections::HashMap<String, tch::Tensor>) {
    let fx = common::fixture("wan_dit");
    let s: Settings =
        serde_json::from_str(&std::fs::read_to_string(fx.join("denoise_t2v.json")).unwrap())
            .unwrap();
    let want = common::tensors(&fx.join("denoise_t2v.safetensors"));
    let dit = WanDit::from(
        WanTransformer3DModel::load(&fx.join("t2v_diffusers"), Device::Cpu, Kind::Float).unwrap(),
    );
    let geometry = Geometry { frames: s.frames, height: s.height, width: s.width };
    let phase1 = Phase1 {
        geometry,
        prompt_embeds: want["prompt_embeds"].shallow_clone(),
        negative_prompt_embeds: Some(want["negative_prompt_embeds"].shallow_clone()),
        image_embeds: None,
        condition: None,
        video_latents: None,
    };
    let settings = DenoiseSettings {
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        guidance_scale_2: None,
        seed: s.seed,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(3.0)),
        batch_cfg: true,
        strength: None,
    };
    (dit, phase1, settings, want)
}

#[test]
fn initial_noise_matches_a_seeded_torch_cpu_generator() {
    let (_, phase1, settings, want) = setup();
    let noise = initial_noise(&phase1.geometry, settings.seed, Device::Cpu);
    assert_eq!(noise.kind(), Kind::Float);
    common::assert_close("initial noise", &noise, &want["noise"], 0.0);
}

#[test]
fn t2v_denoise_matches_wan_pipeline() {
    let (dit, phase1, settings, want) = setup();
    for batch_cfg in [true, false] {
        let settings = DenoiseSettings { batch_cfg, ..settings.clone() };
        let mut seen = Vec::new();
        let out = denoise(&dit, &phase1, &settings, |p| seen.push(p.step), || false).unwrap();
        assert_eq!(seen, (1..=settings.steps).collect::<Vec<_>>());
        let (diff, scale) = common::max_abs_diff(&out.latents, &want["latents"]);
        eprintln!(
            "denoise (batch_cfg {batch_cfg}): max |diff| {diff:.3e} (reference scale {scale:.3e})"
        );
        common::assert_close("final latents", &out.latents, &want["latents"], TOL);
        assert_eq!(out.geometry, phase1.geometry);
    }
}

#[test]
fn i2v_denoise_matches_wan_image_to_video_pipeline() {
    let fx = common::fixture("wan_dit");
    let s: Settings =
        serde_json::from_str(&std::fs::read_to_string(fx.join("denoise_i2v.json")).unwrap())
            .unwrap();
    let want = common::tensors(&fx.join("denoise_i2v.safetensors"));
    let dit = WanDit::from(
        WanTransformer3DModel::load(&fx.join("i2v_original"), Device::Cpu, Kind::Float).unwrap(),
    );
    let phase1 = Phase1 {
        geometry: Geometry { frames: s.frames, height: s.height, width: s.width },
        prompt_embeds: want["prompt_embeds"].shallow_clone(),
        negative_prompt_embeds: Some(want["negative_prompt_embeds"].shallow_clone()),
        image_embeds: Some(want["image_embeds"].shallow_clone()),
        condition: Some(want["condition"].shallow_clone()),
        video_latents: None,
    };
    let settings = DenoiseSettings {
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        guidance_scale_2: None,
        seed: s.seed,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(s.shift.unwrap())),
        batch_cfg: true,
        strength: None,
    };
    common::assert_close(
        "i2v initial noise",
        &initial_noise(&phase1.geometry, s.seed, Device::Cpu),
        &want["noise"],
        0.0,
    );
    let out = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap();
    let (diff, scale) = common::max_abs_diff(&out.latents, &want["latents"]);
    eprintln!("i2v denoise: max |diff| {diff:.3e} (reference scale {scale:.3e})");
    common::assert_close("i2v final latents", &out.latents, &want["latents"], TOL);

    let mut no_image = phase1;
    no_image.image_embeds = None;
    let err = denoise(&dit, &no_image, &settings, |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("needs image_embeds"), "{err}");
}

#[test]
fn step_distilled_euler_without_guidance_matches_wan_pipeline() {
    let fx = common::fixture("wan_dit");
    let s: Settings =
        serde_json::from_str(&std::fs::read_to_string(fx.join("denoise_t2v_euler4.json")).unwrap())
            .unwrap();
    let want = common::tensors(&fx.join("denoise_t2v_euler4.safetensors"));
    let dit = WanDit::from(
        WanTransformer3DModel::load(&fx.join("t2v_diffusers"), Device::Cpu, Kind::Float).unwrap(),
    );
    let phase1 = Phase1 {
        geometry: Geometry { frames: s.frames, height: s.height, width: s.width },
        prompt_embeds: want["prompt_embeds"].shallow_clone(),
        negative_prompt_embeds: None,
        image_embeds: None,
        condition: None,
        video_latents: None,
    };
    let settings = DenoiseSettings {
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        guidance_scale_2: None,
        seed: s.seed,
        scheduler: SchedulerChoice::Euler(FlowMatchEulerConfig {
            shift: s.shift.unwrap(),
            num_train_timesteps: 1000,
        }),
        batch_cfg: true,
        strength: None,
    };
    let out = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap();
    let (diff, scale) = common::max_abs_diff(&out.latents, &want["latents"]);
    eprintln!("euler 4-step denoise: max |diff| {diff:.3e} (reference scale {scale:.3e})");
    common::assert_close("euler final latents", &out.latents, &want["latents"], TOL);
}

#[test]
fn cancellation_stops_between_steps() {
    let (dit, phase1, settings, _) = setup();
    let polls = Cell::new(0);
    let err = denoise(
        &dit,
        &phase1,
        &settings,
        |_| {},
        || {
            polls.set(polls.get() + 1);
            polls.get() > 2
        },
    )
    .unwrap_err();
    assert!(matches!(err, x2v_models::Error::Cancelled { completed: 2, total: 6 }), "{err}");
    assert_eq!(err.kind(), x2v_core::ErrorKind::Cancelled);
}

#[test]
fn bad_requests_are_rejected() {
    let (dit, mut phase1, settings, _) = setup();
    phase1.geometry.frames = 6;
    let err = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("frames must be 4k+1"), "{err}");
    phase1.geometry.frames = 5;
    phase1.geometry.width = 72;
    let err = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("width must be a positive multiple of 16"), "{err}");
    phase1.geometry.width = 64;
    phase1.negative_prompt_embeds = None;
    let err = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap_err();
    assert!(err.to_string().contains("needs negative_prompt_embeds"), "{err}");
}

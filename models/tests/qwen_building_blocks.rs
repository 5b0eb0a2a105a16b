//! Qwen-Image sampling building blocks against diffusers: latent packing, the initial noise, true
//! CFG (`tools/fixtures/qwen_latents.py`) and the VAE's image encode/decode
//! (`tools/fixtures/qwen_vae.py`), then the same blocks on the intermediates of the whole tiny
//! pipeline runs (`tools/fixtures/qwen_pipeline.py`).

mod common;

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::latents;
use x2v_models::qwen_image::vae::{QwenImageVae, QwenImageVaeConfig};
use x2v_models::schedulers::{FlowMatchDynamicConfig, FlowMatchEulerScheduler, Scheduler};

/// fp32 parity bound, relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct NoiseCase {
    seed: u64,
    height: i64,
    width: i64,
    dtype: String,
}

#[test]
fn pack_and_unpack_match_diffusers() {
    let io = common::tensors(&common::fixture("qwen_latents").join("io.safetensors"));
    let packed = latents::pack(&io["latents"]).unwrap();
    assert!(packed.equal(&io["packed"]), "pack");
    for (h, w) in [(48, 80), (63, 95)] {
        let unpacked = latents::unpack(&io["packed"], h, w).unwrap();
        assert!(unpacked.equal(&io[&format!("unpacked_{h}x{w}")]), "unpack {h}x{w}");
    }
    assert!(latents::unpack(&packed, 64, 80).is_err(), "a size that does not fit the tokens");
}

#[test]
fn initial_noise_matches_diffusers() {
    let fx = common::fixture("qwen_latents");
    let io = common::tensors(&fx.join("io.safetensors"));
    let cases: Vec<NoiseCase> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 6);
    for (i, c) in cases.iter().enumerate() {
        let kind = match c.dtype.as_str() {
            "float32" => Kind::Float,
            "bfloat16" => Kind::BFloat16,
            other => panic!("unknown dtype {other}"),
        };
        let got = latents::initial_noise(c.seed, 1, c.height, c.width, kind, Device::Cpu).unwrap();
        let want = &io[&format!("noise_{i}")];
        assert_eq!(got.kind(), want.kind(), "noise {i} dtype");
        assert!(got.equal(want), "noise {i}: seed {} {}x{} {}", c.seed, c.height, c.width, c.dtype);
    }
}

#[test]
fn true_cfg_matches_diffusers() {
    let io = common::tensors(&common::fixture("qwen_latents").join("io.safetensors"));
    let got = latents::true_cfg(&io["cfg_cond"], &io["cfg_uncond"], 4.0).unwrap();
    let (diff, _) = common::max_abs_diff(&got, &io["cfg_out"]);
    eprintln!("true CFG fp32: max |diff| {diff:.3e}");
    common::assert_close("true CFG fp32", &got, &io["cfg_out"], 1e-6);
    let got = latents::true_cfg(&io["cfg_cond_bf16"], &io["cfg_uncond_bf16"], 4.0).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    assert!(got.equal(&io["cfg_out_bf16"]), "true CFG bf16 is bit-identical on the CPU");
}

fn load_vae(dir: &Path) -> QwenImageVae {
    QwenImageVae::load(dir, Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let fx = common::fixture("qwen_vae");
    let io = common::tensors(&fx.join("io.safetensors"));
    let cfg: QwenImageVaeConfig =
        serde_json::from_str(&std::fs::read_to_string(fx.join("vae/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg.base_dim, 8);
    assert_ne!(cfg.latents_mean, QwenImageVaeConfig::qwen_image().latents_mean);
    let vae = load_vae(&fx.join("vae"));

    let z = vae.encode_image(&io["image"]).unwrap();
    let (diff, scale) = common::max_abs_diff(&z, &io["image_latents"]);
    eprintln!("encode_image: max |diff| {diff:.3e} (reference scale {scale:.3e})");
    common::assert_close("encode_image", &z, &io["image_latents"], TOL);

    let decoded = vae.decode_latents(&io["latents"]).unwrap();
    let (diff, scale) = common::max_abs_diff(&decoded, &io["decoded"]);
    eprintln!("decode_latents: max |diff| {diff:.3e} (reference scale {scale:.3e})");
    common::assert_close("decode_latents", &decoded, &io["decoded"], TOL);

    let u8 = vae.decode_image(&io["latents"]).unwrap();
    assert_eq!(u8.kind(), Kind::Uint8);
    common::assert_frames_match("decode_image", &u8, &io["image_u8"]);
}

#[test]
fn vae_rejects_bad_shapes() {
    let vae = load_vae(&common::fixture("qwen_vae").join("vae"));
    let x = Tensor::zeros([1, 3, 1, 32, 32], (Kind::Float, Device::Cpu));
    assert!(vae.encode_image(&x).is_err(), "5-D input to encode_image");
    assert!(vae.encode_image(&x.squeeze_dim(2).narrow(3, 0, 30)).is_err(), "width not /8");
    let z = Tensor::zeros([1, 16, 2, 4, 4], (Kind::Float, Device::Cpu));
    assert!(vae.decode_image(&z).is_err(), "two latent frames");
}

/// Settings of one `qwen_pipeline` case (`<case>.json`).
#[derive(serde::Deserialize)]
struct PipelineCase {
    height: i64,
    width: i64,
    steps: usize,
    seed: u64,
    true_cfg_scale: f64,
    /// Edit condition images as the VAE sees them (`vae_image_<i>` tensors).
    #[serde(default)]
    num_images: usize,
}

fn pipeline_case(fx: &Path, name: &str) -> (PipelineCase, HashMap<String, Tensor>) {
    let case: PipelineCase =
        serde_json::from_str(&std::fs::read_to_string(fx.join(format!("{name}.json"))).unwrap())
            .unwrap();
    (case, common::tensors(&fx.join(format!("{name}.safetensors"))))
}

/// The pipeline intermediates that the building blocks alone reproduce: noise, sigmas and
/// timesteps, the condition images' latents, the final decode.
#[test]
fn building_blocks_reproduce_the_pipeline_runs() {
    let fx = common::fixture("qwen_pipeline");
    let sched_cfg = FlowMatchDynamicConfig::from_dir(&fx.join("edit_plus/scheduler")).unwrap();
    assert_eq!(sched_cfg, FlowMatchDynamicConfig::qwen_image());
    let vae = load_vae(&fx.join("edit_plus/vae"));
    for name in ["t2i", "edit", "edit_plus"] {
        let (c, io) = pipeline_case(&fx, name);
        let noise =
            latents::initial_noise(c.seed, 1, c.height, c.width, Kind::Float, Device::Cpu).unwrap();
        assert!(noise.equal(&io["noise"]), "{name}: initial noise");
        let seq = latents::image_seq_len(c.height, c.width).unwrap();
        let mut sched = FlowMatchEulerScheduler::dynamic(&sched_cfg, c.steps, seq).unwrap();
        let want_t = Vec::<f64>::try_from(&io["timesteps"].to_kind(Kind::Double)).unwrap();
        assert_eq!(sched.timesteps(), want_t.as_slice(), "{name}: timesteps");
        let want_s: Vec<f64> = Vec::<f64>::try_from(&io["sigmas"].to_kind(Kind::Double)).unwrap();
        assert_eq!(sched.sigmas(), want_s.as_slice(), "{name}: sigmas");
        let t0 = latents::timestep_input(sched.timesteps()[0], 1, Kind::Float, Device::Cpu);
        assert!(t0.equal(&io["timestep_0"]), "{name}: the transformer's timestep input");
        // Step 0 from the reference transformer outputs: true CFG, then the Euler step.
        assert!(c.true_cfg_scale > 1.0);
        let guided =
            latents::true_cfg(&io["noise_pred_0"], &io["neg_noise_pred_0"], c.true_cfg_scale)
                .unwrap();
        let latents_1 = sched.step(&guided, &noise).unwrap();
        common::assert_close(&format!("{name}: latents_1"), &latents_1, &io["latents_1"], 1e-6);
        for i in 0..c.num_images {
            let z = vae.encode_image(&io[&format!("vae_image_{i}")]).unwrap();
            let packed = latents::pack(&z).unwrap();
            let want = &io[&format!("image_latents_{i}")];
            common::assert_close(&format!("{name}: image_latents_{i}"), &packed, want, TOL);
        }
        let final_latents = latents::unpack(&io["final_latents"], c.height, c.width).unwrap();
        let u8 = vae.decode_image(&final_latents).unwrap();
        common::assert_frames_match(&format!("{name}: decoded image"), &u8, &io["image_u8"]);
        let (max, _) = common::frame_agreement(&u8, &io["image_u8"]);
        assert!(max <= 1, "{name}: decoded image differs by {max} levels");
    }
}

//! Whole-pipeline parity: x2v's encode → denoise → decode stages on tiny complete Wan2.1 model
//! directories (diffusers layout) against diffusers' `WanPipeline` / `WanImageToVideoPipeline`
//! run end to end with the same prompts, seed and settings (`tools/fixtures/wan_pipeline.py`).

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::schedulers::UniPcConfig;
use x2v_models::wan::pipeline::{
    DenoiseSettings, Geometry, SchedulerChoice, Task, WanDecoder, WanEncoder, denoise,
    load_transformer,
};
use x2v_models::wan::tokenizer::T5Tokenizer;

use common::{
    PipelineSettings as Settings, assert_frames_match, frame_agreement, pipeline_settings,
};

/// Runs the three x2v stages on `dir` and returns the frames `uint8 [F, H, W, 3]`.
fn generate(dir: &Path, task: Task, s: &Settings, image: Option<&Tensor>) -> Tensor {
    let geometry = Geometry { frames: s.frames, height: s.height, width: s.width };
    let encoder = WanEncoder::load(dir, task, Device::Cpu, Kind::Float).unwrap();
    let phase1 = encoder
        .encode(&s.prompt, Some(&s.negative_prompt), image, geometry, s.guidance_scale)
        .unwrap();
    assert_eq!(phase1.prompt_embeds.kind(), Kind::Float);
    // Exact-length embeddings: one row per token (`</s>` included), no padding to 512.
    let tokenizer = T5Tokenizer::from_file(&dir.join("tokenizer")).unwrap();
    for (text, embeds) in [
        (&s.prompt, &phase1.prompt_embeds),
        (&s.negative_prompt, phase1.negative_prompt_embeds.as_ref().unwrap()),
    ] {
        let len = tokenizer.encode(text).unwrap().len() as i64;
        assert_eq!(embeds.size(), [1, len, 48], "{text:?}");
    }
    let dit = load_transformer(dir, Device::Cpu, Kind::Float).unwrap();
    let settings = DenoiseSettings {
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        seed: s.seed,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(s.shift)),
        batch_cfg: true,
    };
    let phase2 = denoise(&dit, &phase1, &settings, |_| {}, || false).unwrap();
    let frames = WanDecoder::load(dir, Device::Cpu, Kind::Float).unwrap().decode(&phase2).unwrap();
    assert_eq!(frames.kind(), Kind::Uint8);
    assert_eq!(frames.size(), [s.frames, s.height, s.width, 3]);
    frames
}

#[test]
fn t2v_frames_match_wan_pipeline() {
    let fx = common::fixture("wan_pipeline");
    let s = pipeline_settings(&fx, "t2v");
    let want = common::tensors(&fx.join("t2v.safetensors"));
    let frames = generate(&fx.join("t2v"), Task::T2v, &s, None);
    assert_frames_match("t2v frames", &frames, &want["frames_u8"]);

    // The check can fail: another seed gives other frames.
    let other = generate(&fx.join("t2v"), Task::T2v, &Settings { seed: s.seed + 1, ..s }, None);
    let (_, within) = frame_agreement(&other, &want["frames_u8"]);
    assert!(within < common::MIN_MATCH, "a different seed still matches ({within})");
}

#[test]
fn i2v_frames_match_wan_image_to_video_pipeline() {
    let fx = common::fixture("wan_pipeline");
    let s = pipeline_settings(&fx, "i2v");
    let want = common::tensors(&fx.join("i2v.safetensors"));
    let frames = generate(&fx.join("i2v"), Task::I2v, &s, Some(&want["image"]));
    assert_frames_match("i2v frames", &frames, &want["frames_u8"]);
}

#[test]
fn encoder_rejects_mismatched_inputs() {
    let fx = common::fixture("wan_pipeline");
    let g = Geometry { frames: 5, height: 64, width: 64 };
    let t2v = WanEncoder::load(&fx.join("t2v"), Task::T2v, Device::Cpu, Kind::Float).unwrap();
    let no_cfg = t2v.encode("a cat", None, None, g, 1.0).unwrap();
    assert!(no_cfg.negative_prompt_embeds.is_none() && no_cfg.image_embeds.is_none());
    let img = Tensor::zeros([64, 64, 3], (Kind::Uint8, Device::Cpu));
    let err = t2v.encode("a cat", None, Some(&img), g, 5.0).unwrap_err();
    assert!(err.to_string().contains("takes no image"), "{err}");
    let err = t2v.encode("a cat", None, None, Geometry { frames: 6, ..g }, 5.0).unwrap_err();
    assert!(err.to_string().contains("4k+1"), "{err}");

    // The T2V directory has no image encoder: loading it for I2V names what is missing.
    let err = WanEncoder::load(&fx.join("t2v"), Task::I2v, Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("image_encoder/"), "{err}");
    let i2v = WanEncoder::load(&fx.join("i2v"), Task::I2v, Device::Cpu, Kind::Float).unwrap();
    let err = i2v.encode("a cat", None, None, g, 5.0).unwrap_err();
    assert!(err.to_string().contains("needs an image"), "{err}");
}

//! CLIP vision (Wan I2V image encoder) parity with transformers `CLIPVisionModel`
//! `hidden_states[-2]` on a tiny random model, from the transformers layouts (with and without the
//! `vision_model.` prefix) and the original Wan `visual.*` keys; and `CLIPImageProcessor` parity.

mod common;

use tch::{Device, Kind, Tensor};
use x2v_models::wan::image_encoder::{ClipPreprocess, ClipVisionConfig, ClipVisionModel};

/// fp32 CPU; relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[test]
fn penultimate_hidden_states_match_transformers_from_all_layouts() {
    let dir = common::fixture("clip");
    let io = common::tensors(&dir.join("io.safetensors"));
    let cfg = ClipVisionConfig::from_file(&dir.join("image_encoder/config.json")).unwrap();
    for path in [
        dir.join("image_encoder"),
        dir.join("image_encoder_prefixed.safetensors"),
        dir.join("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
    ] {
        let model =
            ClipVisionModel::load(&path, Some(cfg.clone()), Device::Cpu, Kind::Float).unwrap();
        let got = model.penultimate(&io["pixel_values"]).unwrap();
        assert_eq!(got.size(), vec![2, 17, 64]);
        let (diff, scale) = common::max_abs_diff(&got, &io["penultimate"]);
        eprintln!("{}: max |diff| {diff:.2e} (scale {scale:.2e})", path.display());
        common::assert_close("penultimate", &got, &io["penultimate"], TOL);
    }
}

#[test]
fn bad_pixel_values_are_named() {
    let dir = common::fixture("clip");
    let model =
        ClipVisionModel::load(&dir.join("image_encoder"), None, Device::Cpu, Kind::Float).unwrap();
    let err =
        model.penultimate(&Tensor::zeros([1, 3, 32, 56], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("[1, 3, 32, 56]"), "{err}");
}

/// PIL resizes in two 8-bit passes; libtorch's antialiased bicubic in one float pass. Measured on
/// these images (one upscaled, one downscaled): about 79% of values agree exactly and none differ
/// by more than one 8-bit level (0.0150 after normalisation); crop and normalisation are exact.
const PIXEL_TOL: f64 = 1.0 / 255.0 / 0.26130258 + 1e-5;

#[test]
fn preprocessing_matches_clip_image_processor() {
    let dir = common::fixture("clip");
    let io = common::tensors(&dir.join("io.safetensors"));
    let pre = ClipPreprocess::default();
    for (img, want) in [("image_u8", "processed"), ("image2_u8", "processed2")] {
        let got = pre.apply(&io[img]).unwrap();
        assert_eq!(got.size(), vec![1, 3, 224, 224]);
        let diff = (&got - &io[want]).abs();
        let max = diff.max().double_value(&[]);
        let exact = diff.lt(1e-5).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        eprintln!("{img}: max |diff| {max:.3e}, {exact:.4} of values within 1e-5");
        assert!(max <= PIXEL_TOL, "{img}: max |diff| {max} > {PIXEL_TOL}");
        assert!(exact >= 0.70, "{img}: only {exact} of values match");
    }
    let err = pre.apply(&Tensor::zeros([4, 4, 3], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("uint8"), "{err}");
}

//! Qwen-Image input-side parity with Pillow, transformers and diffusers (`qwen_inputs` fixture):
//! PIL resampling bit for bit, `smart_resize`, the Qwen2-VL image processor, the edit pipelines'
//! condition sizes and resizes, the VAE input, the prompt templates and token ids of the three
//! pipelines and the `prompt_embeds` post-processing.

mod common;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};
use x2v_models::config::read_config_file;
use x2v_models::qwen_image::processor::{
    EditVariant, ProcessorConfig, calculate_dimensions, edit_condition_sizes, edit_inputs,
    process_images, smart_resize, vae_input,
};
use x2v_models::qwen_image::resize::{Filter, RgbImage, resize};
use x2v_models::qwen_image::tokenizer::{PromptTemplate, QwenTokenizer, prompt_embeds};

/// Float outputs (pixel values, VAE inputs, prompt embeddings).
const TOL: f64 = 1e-6;

struct Fixture {
    dir: std::path::PathBuf,
    meta: Value,
    t: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let dir = common::fixture("qwen_inputs");
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let t = common::tensors(&dir.join("io.safetensors"));
    Fixture { dir, meta, t }
}

fn to_image(t: &Tensor) -> RgbImage {
    let size = t.size();
    let data = Vec::<u8>::try_from(t.flatten(0, -1)).unwrap();
    RgbImage::new(size[1] as usize, size[0] as usize, data).unwrap()
}

fn image_tensor(img: &RgbImage) -> Tensor {
    Tensor::from_slice(&img.data).view([img.height as i64, img.width as i64, 3])
}

/// The fixture's checksum: `sum(byte[i] * (i % 65521 + 1))` over the `HWC` bytes.
fn checksum(bytes: &[u8]) -> i64 {
    bytes.iter().enumerate().map(|(i, &b)| i64::from(b) * ((i % 65521) as i64 + 1)).sum()
}

fn filter(name: &str) -> Filter {
    match name {
        "lanczos" => Filter::Lanczos,
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        other => panic!("unknown filter {other}"),
    }
}

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, TOL);
}

fn as_i64(v: &Value) -> i64 {
    v.as_i64().unwrap()
}

#[test]
fn resize_matches_pillow_bit_for_bit() {
    let fx = fixture();
    for (i, case) in fx.meta["resizes"].as_array().unwrap().iter().enumerate() {
        let src = to_image(&fx.t[&format!("images.{}", case["src"].as_str().unwrap())]);
        let (w, h) = (as_i64(&case["width"]) as usize, as_i64(&case["height"]) as usize);
        let got = resize(&src, w, h, filter(case["filter"].as_str().unwrap())).unwrap();
        let want = &fx.t[&format!("resize.{i}.out")];
        let diff = (image_tensor(&got).to_kind(Kind::Int64) - want.to_kind(Kind::Int64)).abs();
        let max = diff.max().int64_value(&[]);
        assert_eq!(max, 0, "resize {case}: max |diff| {max} levels");
    }
}

#[test]
fn smart_resize_and_calculate_dimensions_match() {
    let fx = fixture();
    for case in fx.meta["smart_resize"].as_array().unwrap() {
        let got = smart_resize(
            as_i64(&case["h"]),
            as_i64(&case["w"]),
            28,
            as_i64(&case["min"]),
            as_i64(&case["max"]),
        )
        .unwrap();
        assert_eq!([got.0, got.1], [as_i64(&case["out"][0]), as_i64(&case["out"][1])], "{case}");
    }
    for case in fx.meta["calculate_dimensions"].as_array().unwrap() {
        let ratio = as_i64(&case["w"]) as f64 / as_i64(&case["h"]) as f64;
        let got = calculate_dimensions(as_i64(&case["area"]) as f64, ratio);
        assert_eq!([got.0, got.1], [as_i64(&case["out"][0]), as_i64(&case["out"][1])], "{case}");
    }
}

fn processor_config(dir: &Path) -> ProcessorConfig {
    let cfg: ProcessorConfig =
        read_config_file(&dir.join("processor/preprocessor_config.json")).unwrap();
    assert_eq!(cfg, ProcessorConfig::default());
    cfg
}

fn grids(t: &Tensor) -> Vec<[i64; 3]> {
    let flat = Vec::<i64>::try_from(t.flatten(0, -1)).unwrap();
    flat.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

#[test]
fn image_processor_matches_transformers() {
    let fx = fixture();
    let cfg = processor_config(&fx.dir);
    let images: Vec<RgbImage> =
        ["a", "b", "c"].iter().map(|k| to_image(&fx.t[&format!("images.{k}")])).collect();
    let got = process_images(&images, &cfg).unwrap();
    assert_eq!(got.grid_thw, grids(&fx.t["vl.image_grid_thw"]));
    close("pixel_values", &got.pixel_values, &fx.t["vl.pixel_values"]);
}

#[test]
fn edit_condition_images_match_diffusers() {
    let fx = fixture();
    for (i, case) in fx.meta["edits"].as_array().unwrap().iter().enumerate() {
        let variant = match case["variant"].as_str().unwrap() {
            "Edit" => EditVariant::Edit,
            _ => EditVariant::EditPlus,
        };
        let src = to_image(&fx.t[&format!("images.{}", case["image"].as_str().unwrap())]);
        let sizes = edit_condition_sizes(variant, src.width, src.height);
        let pair = |v: &Value| (as_i64(&v[0]), as_i64(&v[1]));
        assert_eq!(sizes.vl, pair(&case["vl_size"]), "{case}");
        assert_eq!(sizes.vae, pair(&case["vae_size"]), "{case}");
        let inputs = edit_inputs(variant, std::slice::from_ref(&src)).unwrap();
        let vl = &inputs.vl_images[0];
        match fx.t.get(&format!("edit.{i}.vl")) {
            Some(want) => assert!(image_tensor(vl).equal(want), "condition image {case}"),
            None => assert_eq!(checksum(&vl.data), as_i64(&case["vl_checksum"]), "{case}"),
        }
        // Back to bytes: the VAE input is exactly 2 * (byte / 255) - 1.
        let vae = &inputs.vae_images[0];
        let bytes = ((vae.get(0) + 1.0) * 127.5).round().clamp(0.0, 255.0).to_kind(Kind::Uint8);
        let hwc =
            Vec::<u8>::try_from(bytes.permute([1, 2, 0]).contiguous().flatten(0, -1)).unwrap();
        assert_eq!(checksum(&hwc), as_i64(&case["vae_checksum"]), "VAE input {case}");
    }
    let small = vae_input(&to_image(&fx.t["images.a"]), 80, 48).unwrap();
    close("vae_small", &small, &fx.t["vae_small"]);
}

fn template(case: &Value) -> PromptTemplate {
    match case["template"].as_str().unwrap() {
        "TextToImage" => PromptTemplate::TextToImage,
        "Edit" => PromptTemplate::Edit,
        _ => PromptTemplate::EditPlus { images: case["images"].as_array().unwrap().len() },
    }
}

#[test]
fn prompt_tokens_and_embeds_match_the_pipelines() {
    let fx = fixture();
    let tok = QwenTokenizer::from_file(&fx.dir.join("tokenizer")).unwrap();
    let cfg = processor_config(&fx.dir);
    for (i, case) in fx.meta["cases"].as_array().unwrap().iter().enumerate() {
        let key = |k: &str| format!("case.{i}.{k}");
        let prompts: Vec<String> = case["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        let images: Vec<RgbImage> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| to_image(&fx.t[&format!("images.{}", n.as_str().unwrap())]))
            .collect();
        let template = template(case);
        assert_eq!(template.drop_idx(), as_i64(&case["drop_idx"]));
        let grid_thw = if images.is_empty() {
            Vec::new()
        } else {
            let vl = process_images(&images, &cfg).unwrap();
            assert_eq!(vl.grid_thw, grids(&fx.t[&key("image_grid_thw")]), "case {i}");
            close(&format!("case {i} pixel_values"), &vl.pixel_values, &fx.t[&key("pixel_values")]);
            vl.grid_thw
        };
        let batch = tok.encode(&prompts, template, &grid_thw, cfg.merge_size).unwrap();
        assert!(batch.input_ids.equal(&fx.t[&key("input_ids")]), "case {i} input_ids {case}");
        assert!(
            batch.attention_mask.equal(&fx.t[&key("attention_mask")]),
            "case {i} attention_mask"
        );
        let max_len = as_i64(&case["max_sequence_length"]);
        let (embeds, mask) = prompt_embeds(
            &fx.t[&key("hidden")],
            &batch.attention_mask,
            template.drop_idx(),
            max_len,
        );
        close(&format!("case {i} prompt_embeds"), &embeds, &fx.t[&key("prompt_embeds")]);
        match (mask, fx.t.get(&key("prompt_embeds_mask"))) {
            (None, None) => {}
            (Some(got), Some(want)) => assert!(got.equal(want), "case {i} prompt mask"),
            (got, want) => panic!("case {i}: mask {got:?}, reference {want:?}"),
        }
    }
}

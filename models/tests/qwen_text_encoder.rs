//! Qwen2.5-VL (Qwen-Image's text encoder) parity with transformers
//! `Qwen2_5_VLForConditionalGeneration` on a tiny random model: the last hidden state of text-only
//! and image prompts (with the trained 3D M-RoPE positions), the vision tower's merged embeddings,
//! the positions themselves, both checkpoint key layouts and strict loading.

mod common;

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::Error;
use x2v_models::qwen_image::text_encoder::{QwenVlTextEncoder, TextEncoderConfig, rope_index};

/// fp32 CPU; relative to max(1, max|reference|).
const TOL: f64 = 1e-4;

#[track_caller]
fn close(what: &str, got: &Tensor, want: &Tensor) {
    common::assert_close(what, got, want, TOL);
}

fn load(dir: &Path) -> QwenVlTextEncoder {
    QwenVlTextEncoder::load(dir, None, Device::Cpu, Kind::Float).unwrap()
}

fn grids(t: &Tensor) -> Vec<[i64; 3]> {
    let v = Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    v.chunks(3).map(|g| [g[0], g[1], g[2]]).collect()
}

fn io() -> (std::path::PathBuf, HashMap<String, Tensor>) {
    let dir = common::fixture("qwen2_5_vl");
    let io = common::tensors(&dir.join("io.safetensors"));
    (dir, io)
}

#[test]
fn text_only_padded_batch_matches_transformers() {
    let (dir, io) = io();
    let model = load(&dir.join("text_encoder"));
    let got = model.forward(&io["text.input_ids"], &io["text.attention_mask"], None).unwrap();
    close("text.hidden", &got, &io["text.hidden"]);
}

#[test]
fn rope_index_matches_get_rope_index() {
    let (dir, io) = io();
    let cfg = TextEncoderConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
    for case in ["one", "two"] {
        let got = rope_index(
            &io[&format!("{case}.input_ids")],
            &io[&format!("{case}.attention_mask")],
            &grids(&io[&format!("{case}.grid_thw")]),
            cfg.image_token_id,
            cfg.vision_config.spatial_merge_size,
        )
        .unwrap();
        assert!(got.equal(&io[&format!("{case}.position_ids")]), "{case} positions");
    }
}

#[test]
fn vision_tower_matches_transformers() {
    let (dir, io) = io();
    let model = load(&dir.join("text_encoder"));
    for case in ["one", "two", "video"] {
        let pv = &io[&format!("{case}.pixel_values")];
        let got = model.encode_images(pv, &grids(&io[&format!("{case}.grid_thw")])).unwrap();
        close(&format!("{case}.image_embeds"), &got, &io[&format!("{case}.image_embeds")]);
    }
}

#[test]
fn image_prompts_match_transformers_with_3d_positions() {
    let (dir, io) = io();
    let model = load(&dir.join("text_encoder"));
    for case in ["one", "two"] {
        let t = |k: &str| &io[&format!("{case}.{k}")];
        let g = grids(t("grid_thw"));
        let got = model
            .forward(t("input_ids"), t("attention_mask"), Some((t("pixel_values"), &g)))
            .unwrap();
        close(&format!("{case}.hidden"), &got, t("hidden"));
        let (gap, _) = common::max_abs_diff(&got, t("hidden_sequential"));
        assert!(gap > 0.1, "{case}: plain positions must give another result (gap {gap:.2e})");
    }
}

#[test]
fn both_key_and_config_layouts_load_the_same_model() {
    let (dir, io) = io();
    let (a, b) = (load(&dir.join("text_encoder")), load(&dir.join("text_encoder_v4")));
    assert_eq!(a.config(), b.config());
    assert!(a.var_store().variables().keys().all(|k| !k.starts_with("lm_head")));
    let t = |k: &str| &io[&format!("two.{k}")];
    let g = grids(t("grid_thw"));
    let got =
        b.forward(t("input_ids"), t("attention_mask"), Some((t("pixel_values"), &g))).unwrap();
    close("two.hidden (transformers 4.52 layout)", &got, t("hidden"));
}

#[test]
fn strict_loading_names_a_missing_key() {
    let (dir, _) = io();
    let src = dir.join("text_encoder");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            tensors.extend(Tensor::read_safetensors(&path).unwrap());
        }
    }
    tensors.retain(|(k, _)| k != "visual.merger.ln_q.weight");
    Tensor::write_safetensors(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let err = QwenVlTextEncoder::load(tmp.path(), None, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        matches!(&err, Error::MissingKey { key, .. } if key == "visual.merger.ln_q.weight"),
        "{err}"
    );
}

#[test]
fn image_token_and_grid_mismatches_are_input_errors() {
    let (dir, io) = io();
    let model = load(&dir.join("text_encoder"));
    let t = |k: &str| &io[&format!("one.{k}")];
    let err = model.forward(t("input_ids"), t("attention_mask"), None).unwrap_err();
    assert!(matches!(err, Error::Input { .. }) && err.to_string().contains("no images"), "{err}");
    let two = &io["two.pixel_values"];
    let err = model
        .forward(t("input_ids"), t("attention_mask"), Some((two, &grids(&io["two.grid_thw"]))))
        .unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
    let err = model.encode_images(two, &[[1, 8, 12]]).unwrap_err();
    assert!(err.to_string().contains("pixel_values has shape"), "{err}");
}

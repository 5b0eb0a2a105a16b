//! Parity of x2v's Qwen-Image DiT with diffusers' `QwenImageTransformer2DModel` on a tiny random
//! checkpoint in the published sharded layout (`tools/fixtures/qwen_dit.py`): text-to-image with
//! a padding mask, and an edit-like sequence of three image grids; plus strict loading and config
//! validation.

mod common;

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::Error;
use x2v_models::qwen_image::transformer::{QwenImageTransformer, TransformerConfig};

/// fp32 tolerance, relative to max(1, max|reference|).
const FP32_TOL: f64 = 1e-4;
/// bf16 tolerance on the relative L2 error against diffusers' own bf16 forward.
const BF16_REL_L2: f64 = 1e-2;

fn img_shapes(io: &HashMap<String, Tensor>) -> Vec<(i64, i64, i64)> {
    let flat: Vec<i64> = io["img_shapes"].reshape([-1]).try_into().unwrap();
    flat.chunks(3).map(|c| (c[0], c[1], c[2])).collect()
}

fn run(model: &QwenImageTransformer, io: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(
            &io["hidden_states"],
            &io["encoder_hidden_states"],
            io.get("encoder_hidden_states_mask"),
            &io["timestep"],
            &img_shapes(io),
        )
        .unwrap()
        .to_kind(Kind::Float)
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    let num = (got - want).square().sum(Kind::Double).sqrt().double_value(&[]);
    num / want.square().sum(Kind::Double).sqrt().double_value(&[])
}

fn parity(name: &str) {
    let fx = common::fixture("qwen_dit");
    let io = common::tensors(&fx.join(format!("{name}_io.safetensors")));
    let dir = fx.join("transformer");
    let model = QwenImageTransformer::load(&dir, None, Device::Cpu, Kind::Float).unwrap();
    let got = run(&model, &io);
    let (diff, scale) = common::max_abs_diff(&got, &io["output"]);
    eprintln!("{name} fp32: max |diff| {diff:.3e} (reference scale {scale:.3e})");
    common::assert_close(&format!("{name} fp32"), &got, &io["output"], FP32_TOL);
    // The cached RoPE tables give the same result on a second call.
    common::assert_close(&format!("{name} fp32 again"), &run(&model, &io), &got, 0.0);

    let model = QwenImageTransformer::load(&dir, None, Device::Cpu, Kind::BFloat16).unwrap();
    let got = run(&model, &io);
    let err = rel_l2(&got, &io["output_bf16"]);
    let err_fp32 = rel_l2(&io["output_bf16"], &io["output"]);
    eprintln!(
        "{name} bf16: rel-L2 vs diffusers bf16 {err:.3e} (diffusers bf16 vs fp32: {err_fp32:.3e})"
    );
    assert!(err <= BF16_REL_L2, "{name} bf16 rel-L2 {err:.3e} exceeds {BF16_REL_L2:e}");
}

#[test]
fn t2i_with_padding_mask_matches_diffusers() {
    parity("t2i");
}

#[test]
fn edit_with_three_images_matches_diffusers() {
    parity("edit");
}

#[test]
fn all_valid_mask_equals_no_mask() {
    let fx = common::fixture("qwen_dit");
    let io = common::tensors(&fx.join("edit_io.safetensors"));
    let model = QwenImageTransformer::load(&fx.join("transformer"), None, Device::Cpu, Kind::Float)
        .unwrap();
    let ones = Tensor::ones([1, 7], (Kind::Int64, Device::Cpu));
    let (x, c, t) = (&io["hidden_states"], &io["encoder_hidden_states"], &io["timestep"]);
    let with = model.forward(x, c, Some(&ones), t, &img_shapes(&io)).unwrap();
    common::assert_close("all-valid mask", &with, &io["output"], FP32_TOL);
}

/// Copies the fixture's checkpoint into a temporary directory as one file, less `key`.
fn checkpoint_without(fx: &Path, key: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fx.join("transformer/config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = HashMap::new();
    for entry in std::fs::read_dir(fx.join("transformer")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            tensors.extend(common::tensors(&path));
        }
    }
    drop(tensors.remove(key).unwrap());
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&tensors, dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    dir
}

#[test]
fn incomplete_checkpoint_names_the_missing_key() {
    let fx = common::fixture("qwen_dit");
    let key = "transformer_blocks.1.attn.norm_added_k.weight";
    let dir = checkpoint_without(&fx, key);
    let err = QwenImageTransformer::load(dir.path(), None, Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(&err, Error::MissingKey { key: k, .. } if k == key), "{err}");
    assert!(err.to_string().contains(key), "{err}");

    // One layer less in the config: the second block's keys are unexpected.
    let cfg = TransformerConfig {
        num_layers: 1,
        ..serde_json::from_str(
            &std::fs::read_to_string(fx.join("transformer/config.json")).unwrap(),
        )
        .unwrap()
    };
    let err =
        QwenImageTransformer::load(&fx.join("transformer"), Some(cfg), Device::Cpu, Kind::Float)
            .unwrap_err();
    assert!(matches!(&err, Error::UnexpectedKey { .. }), "{err}");
    assert!(err.to_string().contains("unexpected key `transformer_blocks.1."), "{err}");
}

#[test]
fn unsupported_config_flags_are_rejected_with_a_message() {
    let fx = common::fixture("qwen_dit");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fx.join("transformer/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["zero_cond_t"] = true.into();
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    let err = QwenImageTransformer::load(dir.path(), None, Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("zero_cond_t = true is not supported"),
        "{msg}"
    );

    let cfg = TransformerConfig { guidance_embeds: true, ..TransformerConfig::qwen_image() };
    let err = QwenImageTransformer::build(cfg, Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        err.to_string().contains("DiT config: guidance_embeds = true is not supported"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_rejected_with_a_message() {
    let fx = common::fixture("qwen_dit");
    let model = QwenImageTransformer::load(&fx.join("transformer"), None, Device::Cpu, Kind::Float)
        .unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::zeros([1, 48, 64], opts);
    let c = Tensor::zeros([1, 5, 48], opts);
    let t = Tensor::from_slice(&[0.5f32]);
    let shapes = [(1, 6, 8)];
    let err = |r: Result<Tensor, Error>| r.unwrap_err().to_string();
    assert!(
        err(model.forward(&x, &c, None, &t, &[(1, 6, 7)]))
            .contains("hidden_states must be [B, 42, 64]")
    );
    assert!(err(model.forward(&x, &c, None, &t, &[])).contains("at least one image"));
    let bad_c = Tensor::zeros([1, 5, 40], opts);
    assert!(
        err(model.forward(&x, &bad_c, None, &t, &shapes))
            .contains("encoder_hidden_states must be [1, L, 48]")
    );
    let mask = Tensor::ones([1, 4], (Kind::Int64, Device::Cpu));
    assert!(
        err(model.forward(&x, &c, Some(&mask), &t, &shapes))
            .contains("encoder_mask must be [1, 5]")
    );
    let t2 = Tensor::from_slice(&[0.5f32, 0.2, 0.1]);
    assert!(err(model.forward(&x, &c, None, &t2, &shapes)).contains("timestep must be"));
    let long = Tensor::zeros([1, 4093, 48], opts);
    assert!(err(model.forward(&x, &long, None, &t, &shapes)).contains("RoPE positions"));
}

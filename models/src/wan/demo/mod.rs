//! A tiny random-initialised Wan model directory (Wan2.1, or Wan2.2 A14B's or TI2V-5B's shape) in
//! the diffusers layout, written without
//! Python: for demos, smoke tests and service tests where no real checkpoint is at hand. Its videos
//! are noise by design; what it exercises is every loader, every stage and the wire between them.
//!
//! Layout (as `WanPipeline.save_pretrained` writes it): `model_index.json`, `tokenizer/`
//! (`tokenizer.json`: Unigram + Metaspace, `<pad>` 0, `</s>` 1 appended, `<unk>` 2),
//! `text_encoder/` (UMT5), `transformer/`, `vae/`, `scheduler/`, and for I2V `image_encoder/`
//! (CLIP vision) and `image_processor/`. Weights are fp32 safetensors with the reference key
//! names, drawn from a generator seeded by [`DemoOptions::seed`] alone (not libtorch's global
//! one), so one seed always gives byte-identical files. diffusers' `WanPipeline` /
//! `WanImageToVideoPipeline.from_pretrained` load it too.
//!
//! Sizes: DiT width 64 (2 heads × 32) and 2 blocks, text width 32 (2 layers), CLIP width 32 at
//! 64×64, VAE encoder base width 4 and decoder base width 2. Encoding and denoising take well
//! under a second on a CPU; a 17×256×256 decode takes seconds, nearly all of it libtorch's CPU
//! `conv3d` at full resolution (diffusers is no faster on the same model).

mod configs;
mod vocab;

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind};

use super::image_encoder::{ClipVisionConfig, ClipVisionModel};
use super::text_encoder::{UMT5Config, UMT5EncoderModel};
use super::transformer::WanTransformer3DModel;
use super::vae::{AutoencoderKLWan, VaeConfig, VaeParts};
use crate::demo::{build_err, create_dir, shapes_of, write_component, write_json};
use crate::error::Error;
use configs::{
    CLIP_DIM, CLIP_SIZE, DIFFUSERS_VERSION, TEXT_DIM, model_index, processor_config,
    scheduler_config, transformer_config,
};
use vocab::write_tokenizer;

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DemoOptions {
    /// Seed of every weight.
    pub seed: u64,
    /// Write an image-to-video model (a 36-channel DiT; with one transformer also
    /// `image_encoder/` and `image_processor/`, as Wan2.1 I2V).
    pub i2v: bool,
    /// Write Wan2.2 A14B's shape: a high-noise `transformer/` and a low-noise `transformer_2/`
    /// (other weights) with `boundary_ratio` in `model_index.json`, and no CLIP for I2V.
    pub two_experts: bool,
    /// Write Wan2.2 TI2V-5B's shape: the Wan2.2 VAE (48 channels, 16×), a 48-channel DiT and
    /// `expand_timesteps` in `model_index.json`; it serves text- and image-to-video.
    pub ti2v: bool,
}

/// Writes the demo model into `dir` (created if needed; files already there are overwritten).
pub fn write_demo_model(dir: &Path, opts: &DemoOptions) -> Result<(), Error> {
    create_dir(dir)?;
    let vocab = write_tokenizer(&dir.join("tokenizer"))?;
    write_text_encoder(&dir.join("text_encoder"), vocab, opts.seed)?;
    write_transformer(&dir.join("transformer"), opts, opts.seed)?;
    if opts.two_experts {
        write_transformer(&dir.join("transformer_2"), opts, opts.seed.wrapping_add(1))?;
    }
    write_vae(&dir.join("vae"), opts.seed, opts.ti2v)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    if opts.i2v && !opts.two_experts && !opts.ti2v {
        write_image_encoder(&dir.join("image_encoder"), opts.seed)?;
        write_json(&dir.join("image_processor/preprocessor_config.json"), &processor_config())?;
    }
    // Last: its presence is what marks the directory as a diffusers model.
    write_json(&dir.join("model_index.json"), &model_index(opts))
}

fn write_text_encoder(dir: &Path, vocab_size: i64, seed: u64) -> Result<(), Error> {
    let cfg = UMT5Config {
        vocab_size,
        d_model: TEXT_DIM,
        d_kv: 8,
        d_ff: 64,
        num_layers: 2,
        num_heads: 4,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
    };
    let model = UMT5EncoderModel::build(&cfg, Device::Cpu, Kind::Float)
        .map_err(|e| build_err("text encoder")(e.to_string()))?;
    let config = json!({
        "architectures": ["UMT5EncoderModel"],
        "model_type": "umt5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn": "gelu_new",
        "is_gated_act": true,
        "is_encoder_decoder": true,
        "scalable_attention": true,
        "tie_word_embeddings": false,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    });
    write_component(dir, &config, "model.safetensors", &shapes_of(model.var_store()), seed)
}

fn write_transformer(dir: &Path, opts: &DemoOptions, seed: u64) -> Result<(), Error> {
    let cfg = transformer_config(opts);
    cfg.validate().map_err(build_err("transformer"))?;
    let mut config = serde_json::to_value(&cfg).expect("the DiT config serialises");
    config["_class_name"] = "WanTransformer3DModel".into();
    config["_diffusers_version"] = DIFFUSERS_VERSION.into();
    let shapes = WanTransformer3DModel::parameter_shapes(&cfg);
    write_component(dir, &config, "diffusion_pytorch_model.safetensors", &shapes, seed)
}

fn write_vae(dir: &Path, seed: u64, ti2v: bool) -> Result<(), Error> {
    // Full-resolution work dominates decoding: the decoder runs narrower than the encoder.
    let cfg = VaeConfig {
        base_dim: 4,
        decoder_base_dim: Some(2),
        num_res_blocks: 1,
        ..if ti2v { VaeConfig::wan22() } else { VaeConfig::wan21() }
    };
    let model = AutoencoderKLWan::build(&cfg, VaeParts::Full, Device::Cpu, Kind::Float)
        .map_err(|e| build_err("VAE")(e.to_string()))?;
    let config = json!({
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": DIFFUSERS_VERSION,
        "base_dim": cfg.base_dim,
        "decoder_base_dim": cfg.decoder_base_dim,
        "z_dim": cfg.z_dim,
        "dim_mult": cfg.dim_mult,
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": cfg.attn_scales,
        "temperal_downsample": cfg.temperal_downsample,
        "dropout": 0.0,
        "latents_mean": cfg.latents_mean,
        "latents_std": cfg.latents_std,
        "is_residual": cfg.is_residual,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "patch_size": cfg.patch_size,
        "scale_factor_temporal": cfg.temporal_factor(),
        "scale_factor_spatial": cfg.spatial_factor(),
    });
    let shapes = shapes_of(model.var_store());
    write_component(dir, &config, "diffusion_pytorch_model.safetensors", &shapes, seed)
}

/// The CLIP vision tower with every layer and the post-LayerNorm, as transformers saves it
/// (x2v's loader drops the last layer and the post-LN, which `hidden_states[-2]` never uses).
fn write_image_encoder(dir: &Path, seed: u64) -> Result<(), Error> {
    let cfg = ClipVisionConfig {
        hidden_size: CLIP_DIM,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        image_size: CLIP_SIZE,
        patch_size: 16,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: "gelu".into(),
    };
    // A tower one layer deeper holds layers 0..num_hidden_layers: all of them.
    let all_layers =
        ClipVisionConfig { num_hidden_layers: cfg.num_hidden_layers + 1, ..cfg.clone() };
    let model = ClipVisionModel::build(&all_layers, Device::Cpu, Kind::Float)
        .map_err(|e| build_err("image encoder")(e.to_string()))?;
    let mut shapes = shapes_of(model.var_store());
    for part in ["weight", "bias"] {
        shapes.push((format!("vision_model.post_layernorm.{part}"), vec![cfg.hidden_size]));
    }
    shapes.sort();
    let config = json!({
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "projection_dim": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    });
    write_component(dir, &config, "model.safetensors", &shapes, seed)
}

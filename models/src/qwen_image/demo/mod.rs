//! A tiny random-initialised Qwen-Image model in the diffusers layout, written without Python:
//! for demos, smoke tests and service tests where no real checkpoint is at hand. Its images are
//! noise by design; what it exercises is every loader, every stage and the wire between them.
//!
//! [`write_demo_models`] writes two directories under one parent, the same weights published for
//! two pipelines: `t2i/` (`QwenImagePipeline`, text to image) and `edit/`
//! (`QwenImageEditPlusPipeline`, edits with one or more input images). Each holds (as
//! `save_pretrained` writes it) `model_index.json`, `tokenizer/` (a byte-level BPE Qwen2
//! tokenizer with the Qwen2.5-VL special tokens), `text_encoder/` (Qwen2.5-VL with its vision
//! tower), `transformer/`, `vae/`, `scheduler/` (the published dynamic-shift
//! `FlowMatchEulerDiscreteScheduler`), and for edits `processor/` (the tokenizer files and the
//! Qwen2-VL image processor's settings). Weights are fp32 safetensors with the reference key
//! names, drawn from a generator seeded by [`DemoOptions::seed`] alone, so one seed always gives
//! byte-identical files. diffusers' `QwenImagePipeline` / `QwenImageEditPlusPipeline
//! .from_pretrained` load them too.
//!
//! Sizes: DiT width 64 (2 heads × 32) and 2 blocks, text width 32 (2 layers), a vision tower of
//! width 32 (2 blocks), VAE base width 4 with one residual block per stage.

mod configs;
mod vocab;

use std::path::Path;

use tch::{Device, Kind};

use super::pipeline::Variant;
use super::text_encoder::QwenVlTextEncoder;
use super::transformer::QwenImageTransformer;
use crate::demo::{build_err, create_dir, shapes_of, write_component, write_json};
use crate::error::Error;
use crate::wan::vae::{AutoencoderKLWan, VaeParts};
use configs::{
    DIFFUSERS_VERSION, model_index, processor_config, scheduler_config, text_encoder_config,
    text_encoder_json, transformer_config, vae_config, vae_json,
};
use vocab::{DemoVocab, write_tokenizer};

/// The text-to-image model's directory under the parent [`write_demo_models`] writes.
pub const T2I_DIR: &str = "t2i";
/// The edit model's directory under that parent.
pub const EDIT_DIR: &str = "edit";

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DemoOptions {
    /// Seed of every weight.
    pub seed: u64,
}

/// Writes the text-to-image model into `dir/t2i` and the edit model into `dir/edit` (created if
/// needed; files already there are overwritten).
pub fn write_demo_models(dir: &Path, opts: &DemoOptions) -> Result<(), Error> {
    write_demo_model(&dir.join(T2I_DIR), Variant::TextToImage, opts)?;
    write_demo_model(&dir.join(EDIT_DIR), Variant::EditPlus, opts)
}

/// Writes the demo model published for `variant` into `dir`.
pub fn write_demo_model(dir: &Path, variant: Variant, opts: &DemoOptions) -> Result<(), Error> {
    create_dir(dir)?;
    let vocab = write_tokenizer(&dir.join("tokenizer"))?;
    write_text_encoder(&dir.join("text_encoder"), &vocab, opts.seed)?;
    write_transformer(&dir.join("transformer"), opts.seed)?;
    write_vae(&dir.join("vae"), opts.seed)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    if variant.is_edit() {
        let processor = dir.join("processor");
        write_tokenizer(&processor)?;
        write_json(&processor.join("preprocessor_config.json"), &processor_config())?;
    }
    // Last: its presence is what marks the directory as a diffusers model.
    write_json(&dir.join("model_index.json"), &model_index(variant))
}

/// Qwen2.5-VL with its `lm_head` (which transformers saves and x2v skips).
fn write_text_encoder(dir: &Path, vocab: &DemoVocab, seed: u64) -> Result<(), Error> {
    let cfg = text_encoder_config(vocab);
    let model = QwenVlTextEncoder::build(&cfg, Device::Cpu, Kind::Float)
        .map_err(|e| build_err("text encoder")(e.to_string()))?;
    let mut shapes = shapes_of(model.var_store());
    shapes.push(("lm_head.weight".into(), vec![cfg.vocab_size, cfg.hidden_size]));
    shapes.sort();
    let config = text_encoder_json(&cfg, vocab);
    write_component(dir, &config, "model.safetensors", &shapes, seed)
}

fn write_transformer(dir: &Path, seed: u64) -> Result<(), Error> {
    let cfg = transformer_config();
    let model = QwenImageTransformer::build(cfg.clone(), Device::Cpu, Kind::Float)
        .map_err(|e| build_err("transformer")(e.to_string()))?;
    let mut config = serde_json::to_value(&cfg).expect("the DiT config serialises");
    config["_class_name"] = "QwenImageTransformer2DModel".into();
    config["_diffusers_version"] = DIFFUSERS_VERSION.into();
    let shapes = shapes_of(model.var_store());
    write_component(dir, &config, "diffusion_pytorch_model.safetensors", &shapes, seed)
}

fn write_vae(dir: &Path, seed: u64) -> Result<(), Error> {
    let cfg = vae_config();
    let model = AutoencoderKLWan::build(&cfg.to_wan(), VaeParts::Full, Device::Cpu, Kind::Float)
        .map_err(|e| build_err("VAE")(e.to_string()))?;
    let shapes = shapes_of(model.var_store());
    write_component(dir, &vae_json(&cfg), "diffusion_pytorch_model.safetensors", &shapes, seed)
}

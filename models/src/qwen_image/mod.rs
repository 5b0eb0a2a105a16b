//! Qwen-Image: text-to-image, edit and multi-image edit. diffusers is the reference (the
//! original release has no model code of its own): `QwenImagePipeline`,
//! `QwenImageEditPipeline`, `QwenImageEditPlusPipeline`.
//!
//! - [`transformer`]: the dual-stream MMDiT (`QwenImageTransformer2DModel`) with its 3D RoPE.
//! - [`text_encoder`]: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the text decoder with
//!   multimodal RoPE and the vision tower with window attention and patch merger.
//! - [`processor`]: the Qwen2-VL image processor (smart resize, normalisation, patching);
//!   [`resize`]: PIL-exact resampling; [`tokenizer`]: the chat templates and special tokens.
//! - [`latents`]: 2×2 latent packing, the initial noise, norm-rescaled true CFG.
//! - [`vae`]: `AutoencoderKLQwenImage` (the Wan VAE code with Qwen's weights).
//! - [`pipeline`]: the stage functions (encode, denoise with previews of the images being made,
//!   decode).
//! - [`demo`]: a tiny random-initialised model of both pipelines, written without Python.

pub mod demo;
pub mod latents;
pub mod pipeline;
pub mod processor;
pub mod resize;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod vae;

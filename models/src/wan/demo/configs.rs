//! The demo model's sizes and the JSON configs diffusers writes beside the weights.

use serde_json::{Value, json};

use super::DemoOptions;
use crate::wan::config::Config;
use crate::wan::image_encoder::ClipPreprocess;

/// Text-encoder width (the DiT's `text_dim`).
pub(super) const TEXT_DIM: i64 = 32;
/// CLIP vision width (the DiT's `image_dim`).
pub(super) const CLIP_DIM: i64 = 32;
/// CLIP input resolution (patch 16: 16 patches + CLS).
pub(super) const CLIP_SIZE: i64 = 64;
/// `flow_shift` of the scheduler config (the Wan 480p value).
pub(super) const FLOW_SHIFT: f64 = 3.0;
/// The `diffusers` version the configs claim.
pub(super) const DIFFUSERS_VERSION: &str = "0.35.1";

/// The DiT: 2 heads × 32, 2 blocks; I2V adds the CLIP projection and 20 condition channels;
/// TI2V-5B's takes the Wan2.2 VAE's 48 channels.
pub(super) fn transformer_config(opts: &DemoOptions) -> Config {
    let clip = opts.i2v && !opts.two_experts && !opts.ti2v;
    let latent = if opts.ti2v { 48 } else { 16 };
    Config {
        patch_size: [1, 2, 2],
        num_attention_heads: 2,
        attention_head_dim: 32,
        in_channels: if opts.i2v && !opts.ti2v { 36 } else { latent },
        out_channels: latent,
        text_dim: TEXT_DIM,
        freq_dim: 32,
        ffn_dim: 128,
        num_layers: 2,
        cross_attn_norm: true,
        qk_norm: Some("rms_norm_across_heads".into()),
        eps: 1e-6,
        image_dim: clip.then_some(CLIP_DIM),
        added_kv_proj_dim: clip.then_some(64),
        rope_max_seq_len: 1024,
        pos_embed_seq_len: None,
    }
}

pub(super) fn processor_config() -> Value {
    let d = ClipPreprocess::default();
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": { "shortest_edge": CLIP_SIZE },
        "resample": 3,
        "do_center_crop": true,
        "crop_size": { "height": CLIP_SIZE, "width": CLIP_SIZE },
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": d.mean,
        "image_std": d.std,
        "do_convert_rgb": true,
    })
}

pub(super) fn scheduler_config() -> Value {
    json!({
        "_class_name": "UniPCMultistepScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": null,
        "solver_order": 2,
        "prediction_type": "flow_prediction",
        "thresholding": false,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": true,
        "solver_type": "bh2",
        "lower_order_final": true,
        "disable_corrector": [],
        "solver_p": null,
        "use_karras_sigmas": false,
        "use_exponential_sigmas": false,
        "use_beta_sigmas": false,
        "use_flow_sigmas": true,
        "flow_shift": FLOW_SHIFT,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": false,
    })
}

/// Where the demo's low-noise expert takes over: Wan2.2 T2V A14B's published boundary.
const DEMO_BOUNDARY_RATIO: f64 = 0.875;

pub(super) fn model_index(opts: &DemoOptions) -> Value {
    let (i2v, two_experts) = (opts.i2v && !opts.ti2v, opts.two_experts);
    let mut index = json!({
        "_class_name": if i2v { "WanImageToVideoPipeline" } else { "WanPipeline" },
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    });
    if opts.ti2v {
        index["expand_timesteps"] = json!(true);
    } else if two_experts {
        index["transformer_2"] = json!(["diffusers", "WanTransformer3DModel"]);
        index["boundary_ratio"] = json!(DEMO_BOUNDARY_RATIO);
    } else if i2v {
        index["image_encoder"] = json!(["transformers", "CLIPVisionModel"]);
        index["image_processor"] = json!(["transformers", "CLIPImageProcessor"]);
    }
    index
}

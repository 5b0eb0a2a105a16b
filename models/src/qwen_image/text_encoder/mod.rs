//! Qwen-Image's text encoder: Qwen2.5-VL-7B-Instruct (`Qwen2_5_VLForConditionalGeneration`,
//! transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py`) without its `lm_head`.
//!
//! - [`decoder`]: the text decoder with multimodal RoPE; its last hidden state (after the final
//!   RMSNorm) is what diffusers' Qwen-Image pipelines take as `hidden_states[-1]`.
//! - [`vision`]: the vision tower (window attention, 2×2 patch merger) whose embeddings replace
//!   the `<|image_pad|>` tokens of edit prompts.
//! - [`rope`]: the 3D positions ([`rope_index`]) and the rotary embeddings.
//! - [`config`]: [`TextEncoderConfig`] from either `config.json` layout.
//!
//! Positions are the trained 3D M-RoPE whenever images are given (diffusers 0.42.1's edit
//! pipelines lose them under transformers 5 by not passing `mm_token_type_ids`; x2v keeps them).
//! Text-only prompts get `0..L` on all three axes, as transformers gives them.
//!
//! Boundary: `input_ids`/`attention_mask` `[B, L]` (+ `pixel_values` `[N, 3·2·14·14]`, grids)
//! → `[B, L, 3584]` in the model dtype.

pub mod config;
mod decoder;
pub mod rope;
mod vision;

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

pub use config::{TextEncoderConfig, VisionConfig};
pub use rope::rope_index;

use crate::config::{checked, read_config};
use crate::error::{Component, Error};
use crate::nn::Builder;
use crate::weights::{self, Checkpoint, LoadOptions};
use decoder::TextDecoder;
use vision::VisionTower;

/// Nothing stays fp32: transformers loads every Qwen2.5-VL parameter in the requested dtype.
pub const KEEP_F32: &[&str] = &[];

/// A checkpoint key in x2v's layout (the original one, which transformers 5 also saves:
/// `model.*` for the decoder, `visual.*`), or `None` for keys the encoder does not use.
/// transformers 4.52-4.57 saves `model.language_model.*` and `model.visual.*`.
pub fn remap_key(key: &str) -> Option<String> {
    if key.starts_with("lm_head.") {
        return None;
    }
    if let Some(rest) = key.strip_prefix("model.language_model.") {
        return Some(format!("model.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("model.visual.") {
        return Some(format!("visual.{rest}"));
    }
    Some(key.to_owned())
}

/// Qwen2.5-VL as a text (and image) encoder.
#[derive(Debug)]
pub struct QwenVlTextEncoder {
    cfg: TextEncoderConfig,
    decoder: TextDecoder,
    visual: VisionTower,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

impl QwenVlTextEncoder {
    /// The model for `cfg` with empty parameters in `kind` on `device`.
    pub fn build(cfg: &TextEncoderConfig, device: Device, kind: Kind) -> Result<Self, Error> {
        let cfg = checked(cfg.clone())?;
        let vs = nn::VarStore::new(device);
        let p = Builder::new(&vs, kind, KEEP_F32);
        Ok(QwenVlTextEncoder {
            decoder: TextDecoder::new(&p / "model", &cfg),
            visual: VisionTower::new(&p / "visual", &cfg.vision_config),
            cfg,
            vs,
        })
    }

    /// Loads the `text_encoder/` directory (`config.json` + sharded safetensors + index) in
    /// either key layout ([`remap_key`]); `lm_head.*` is skipped. `cfg` defaults to the
    /// directory's `config.json`, else the 7B preset.
    pub fn load(
        dir: &Path,
        cfg: Option<TextEncoderConfig>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let cfg = match cfg {
            Some(c) => c,
            None => read_config(dir, TextEncoderConfig::qwen2_5_vl_7b)?,
        };
        let ckpt = Checkpoint::open(dir)?.remap(remap_key);
        let model = Self::build(&cfg, device, kind)?;
        weights::load_into(&model.vs, &ckpt, &LoadOptions::strict())?;
        weights::log_loaded(Component::TextEncoder, &ckpt, &model.vs, kind, started);
        Ok(model)
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.cfg
    }

    /// Its parameters, by checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The vision tower on the processor's flattened patches `pixel_values`
    /// `[N, 3·temporal_patch·patch²]` of all images, `grid_thw` one `[t, h, w]` (in patches) per
    /// image: merged embeddings `[N / merge², hidden]` in the model dtype.
    pub fn encode_images(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[i64; 3]],
    ) -> Result<Tensor, Error> {
        let _guard = tch::no_grad_guard();
        self.visual.forward(pixel_values, grid_thw)
    }

    /// The last hidden state after the final norm, `[B, L, hidden]` in the model dtype, of
    /// `input_ids`/`attention_mask` `[B, L]`. `images`: `(pixel_values, grid_thw)` of all images
    /// of the batch, in order, when the prompts hold `<|image_pad|>` tokens; their embeddings
    /// replace those tokens and the positions are the 3D ones of [`rope_index`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        images: Option<(&Tensor, &[[i64; 3]])>,
    ) -> Result<Tensor, Error> {
        let (b, l) = self.check_ids(input_ids, attention_mask)?;
        let _guard = tch::no_grad_guard();
        let device = self.vs.device();
        let ids = input_ids.to_kind(Kind::Int64).to_device(device);
        let mut embeds = self.decoder.embed_tokens.forward(&ids);
        let is_image = ids.eq(self.cfg.image_token_id);
        let image_tokens = is_image.sum(Kind::Int64).int64_value(&[]);
        let positions = match images {
            Some((pixel_values, grids)) => {
                let feats = self.visual.forward(pixel_values, grids)?;
                if feats.size()[0] != image_tokens {
                    return Err(Error::input(
                        Component::TextEncoder,
                        format!(
                            "the prompts hold {image_tokens} image tokens but the images give {} embeddings",
                            feats.size()[0]
                        ),
                    ));
                }
                embeds =
                    embeds.masked_scatter(&is_image.unsqueeze(-1), &feats.to_kind(embeds.kind()));
                let merge = self.cfg.vision_config.spatial_merge_size;
                rope_index(&ids, attention_mask, grids, self.cfg.image_token_id, merge)?
            }
            None if image_tokens > 0 => {
                return Err(Error::input(
                    Component::TextEncoder,
                    format!(
                        "the prompts hold {image_tokens} image tokens but no images were given"
                    ),
                ));
            }
            None => {
                Tensor::arange(l, (Kind::Int64, device)).view([1, 1, l]).expand([3, b, l], false)
            }
        };
        Ok(self.decoder.forward(&embeds, &positions, attention_mask))
    }

    /// Checks the ids and mask shapes and the id range; returns `(B, L)`.
    fn check_ids(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(i64, i64), Error> {
        let bad = |m: String| Error::input(Component::TextEncoder, m);
        let size = input_ids.size();
        let [b, l] = size[..] else {
            return Err(bad(format!("input_ids must be [B, L], got shape {size:?}")));
        };
        if attention_mask.size() != size {
            return Err(bad(format!(
                "attention_mask shape {:?} differs from input_ids shape {size:?}",
                attention_mask.size()
            )));
        }
        if b == 0 || l == 0 {
            return Err(bad(format!("empty input_ids: shape {size:?}")));
        }
        let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            return Err(bad(format!(
                "token ids span [{lo}, {hi}]; the vocabulary has {} entries",
                self.cfg.vocab_size
            )));
        }
        Ok((b, l))
    }
}

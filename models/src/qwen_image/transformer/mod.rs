//! Qwen-Image diffusion transformer: a dual-stream MMDiT over packed latent tokens and
//! Qwen2.5-VL text features, with a 3D RoPE over the joint sequence.
//!
//! Paper: "Qwen-Image Technical Report" (Qwen Team, 2025). Reference: diffusers
//! `models/transformers/transformer_qwenimage.py` (`QwenImageTransformer2DModel`, 0.42.1); the
//! var-store paths equal its state-dict keys.
//!
//! Boundary: packed latent tokens `[B, L_img, in_channels]` (the noise tokens, then each
//! condition image's), text features `[B, L_txt, joint_attention_dim]` with an optional padding
//! mask `[B, L_txt]`, sigma `[B]`, one `(frames, rows, cols)` token grid per image →
//! `[B, L_img, patch_size²·out_channels]` in the model dtype. Everything runs in the model dtype
//! except the sinusoidal timestep projection and the rotary embedding (fp32, as in diffusers).

mod block;
pub mod config;
pub mod rope;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor, nn};

use self::block::Block;
use self::config::ROPE_POSITIONS;
pub use self::config::TransformerConfig;
pub use self::rope::RopeTables;
use crate::config::{checked, read_config};
use crate::error::{Component, Error};
use crate::nn::{Builder, Linear, RmsNorm};
use crate::weights::{self, Checkpoint, LoadOptions, load_into};

/// Parameters that stay fp32 in a bf16/fp16 model: none (`QwenImageTransformer2DModel` has no
/// `_keep_in_fp32_modules`).
pub const KEEP_F32: &[&str] = &[];

/// Channels of the sinusoidal timestep projection (`Timesteps(256, ...)`).
const TIME_CHANNELS: i64 = 256;

/// RoPE tables kept per token layout; a server sees few distinct resolutions.
const ROPE_CACHE_ENTRIES: usize = 8;

/// A token layout: the image grids and the text length.
type RopeKey = (Vec<(i64, i64, i64)>, i64);

/// The Qwen-Image DiT (see the module docs for shapes).
#[derive(Debug)]
pub struct QwenImageTransformer {
    config: TransformerConfig,
    kind: Kind,
    device: Device,
    /// `time_text_embed.timestep_embedder.linear_1` / `linear_2`.
    time_1: Linear,
    time_2: Linear,
    txt_norm: RmsNorm,
    img_in: Linear,
    txt_in: Linear,
    blocks: Vec<Block>,
    /// `norm_out.linear`: (scale, shift) of the output head.
    norm_out: Linear,
    proj_out: Linear,
    rope: RefCell<HashMap<RopeKey, RopeTables>>,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

impl QwenImageTransformer {
    /// An empty model for `cfg` (validated): parameters made in `kind` on `device`, unset.
    pub fn build(cfg: TransformerConfig, device: Device, kind: Kind) -> Result<Self, Error> {
        let config = checked(cfg)?;
        let vs = nn::VarStore::new(device);
        let root = Builder::new(&vs, kind, KEEP_F32);
        let cfg = &config;
        let dim = cfg.inner_dim();
        let te = &root / "time_text_embed" / "timestep_embedder";
        let blocks = (0..cfg.num_layers).map(|i| Block::new(&root / "transformer_blocks" / i, cfg));
        Ok(QwenImageTransformer {
            kind,
            device,
            time_1: Linear::new(&te / "linear_1", TIME_CHANNELS, dim),
            time_2: Linear::new(&te / "linear_2", dim, dim),
            txt_norm: RmsNorm::new(&root / "txt_norm", cfg.joint_attention_dim, 1e-6),
            img_in: Linear::new(&root / "img_in", cfg.in_channels, dim),
            txt_in: Linear::new(&root / "txt_in", cfg.joint_attention_dim, dim),
            blocks: blocks.collect(),
            norm_out: Linear::new(&root / "norm_out" / "linear", dim, 2 * dim),
            proj_out: Linear::new(&root / "proj_out", dim, cfg.output_dim()),
            rope: RefCell::new(HashMap::new()),
            config,
            vs,
        })
    }

    /// Loads the DiT from `path`: the `transformer/` directory (its `config.json` and a
    /// safetensors file or shard index) or one safetensors file. `cfg` overrides the directory's
    /// `config.json`; without either the [`TransformerConfig::qwen_image`] preset applies.
    /// Loading is strict: a missing or unexpected key is an error naming it.
    pub fn load(
        path: &Path,
        cfg: Option<TransformerConfig>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let started = Instant::now();
        let cfg = match cfg {
            Some(c) => c,
            None => read_config(path, TransformerConfig::qwen_image)?,
        };
        let ckpt = Checkpoint::open(path)?;
        let mut model = Self::build(cfg, device, kind)?;
        load_into(&model.vs, &ckpt, &LoadOptions::strict())?;
        for block in &mut model.blocks {
            block.fuse();
        }
        weights::log_loaded(Component::Transformer, &ckpt, &model.vs, kind, started);
        Ok(model)
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// Its parameters, by checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The model dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Predicts the flow velocity of the packed latent tokens.
    ///
    /// `hidden_states [B, L_img, in_channels]`: the noise tokens first, then each condition
    /// image's tokens, in the order of `img_shapes`; `encoder_hidden_states [B, L_txt,
    /// joint_attention_dim]`; `encoder_mask [B, L_txt]` (nonzero = valid, `None` = all valid);
    /// `timestep [B]` (or one value) = sigma (t/1000); `img_shapes`: `(frames, rows, cols)` of
    /// packed tokens per image (latent H/2, W/2), the same for every batch row. Returns
    /// `[B, L_img, patch_size²·out_channels]` in the model dtype.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_mask: Option<&Tensor>,
        timestep: &Tensor,
        img_shapes: &[(i64, i64, i64)],
    ) -> Result<Tensor, Error> {
        let _guard = tch::no_grad_guard();
        let (b, l_txt) = self.check_inputs(
            hidden_states,
            encoder_hidden_states,
            encoder_mask,
            timestep,
            img_shapes,
        )?;
        let (kind, dev) = (self.kind, self.device);
        let img = self.img_in.forward(&hidden_states.to_device(dev).to_kind(kind));
        let txt = encoder_hidden_states.to_device(dev).to_kind(kind);
        let mut txt = self.txt_in.forward(&self.txt_norm.forward(&txt));
        let temb = self.time_embedding(&timestep.to_device(dev).reshape([-1]).expand([b], false));
        let mask = joint_mask(encoder_mask, img.size()[1], dev);
        let temb_act = temb.silu();

        let mut cache = self.rope.borrow_mut();
        let key = (img_shapes.to_vec(), l_txt);
        if !cache.contains_key(&key) && cache.len() >= ROPE_CACHE_ENTRIES {
            cache.clear();
        }
        let axes = self.config.axes_dims_rope;
        let rope =
            cache.entry(key).or_insert_with(|| RopeTables::new(axes, img_shapes, l_txt, dev));

        let mut img = img;
        for block in &self.blocks {
            (img, txt) = block.forward(&img, &txt, &temb_act, mask.as_ref(), rope);
        }
        // AdaLayerNormContinuous: (scale, shift).
        let m = self.norm_out.forward(&temb_act).unsqueeze(1).chunk(2, -1);
        let dim = self.config.inner_dim();
        let normed = img.layer_norm([dim], None::<Tensor>, None::<Tensor>, 1e-6, false);
        Ok(self.proj_out.forward(&m[1].addcmul(&normed, &(&m[0] + 1.0))))
    }

    /// `time_text_embed`: sigma `[B]` → `[B, dim]` in the model dtype. The sinusoid runs in fp32
    /// on sigma rounded to the model dtype (diffusers casts the timestep to the model dtype, then
    /// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` with
    /// `embeddings.get_timestep_embedding`, whose frequencies stay fp32).
    fn time_embedding(&self, sigma: &Tensor) -> Tensor {
        let (kind, dev) = (self.kind, self.device);
        let half = TIME_CHANNELS / 2;
        let exponent = Tensor::arange(half, (Kind::Float, dev)) * (-(10000f64.ln())) / half as f64;
        let freqs = exponent.exp();
        let t = sigma.to_kind(kind).to_kind(Kind::Float);
        let args = t.unsqueeze(1) * freqs.unsqueeze(0) * 1000.0;
        let proj = Tensor::cat(&[args.cos(), args.sin()], 1).to_kind(kind); // flip_sin_to_cos
        self.time_2.forward(&self.time_1.forward(&proj).silu())
    }

    /// Validates the inputs; returns the batch size and the text length.
    fn check_inputs(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_mask: Option<&Tensor>,
        timestep: &Tensor,
        img_shapes: &[(i64, i64, i64)],
    ) -> Result<(i64, i64), Error> {
        let cfg = &self.config;
        let bad = |m: String| Err(Error::input(Component::Transformer, m));
        let tokens =
            check_img_shapes(img_shapes).map_err(|m| Error::input(Component::Transformer, m))?;
        let s = hidden_states.size();
        if s.len() != 3 || s[2] != cfg.in_channels || s[1] != tokens {
            return bad(format!(
                "hidden_states must be [B, {tokens}, {}] (tokens of img_shapes {img_shapes:?}), got {s:?}",
                cfg.in_channels
            ));
        }
        let b = s[0];
        let c = encoder_hidden_states.size();
        if c.len() != 3 || c[0] != b || c[1] < 1 || c[2] != cfg.joint_attention_dim {
            return bad(format!(
                "encoder_hidden_states must be [{b}, L, {}], got {c:?}",
                cfg.joint_attention_dim
            ));
        }
        if let Some(m) = encoder_mask
            && m.size() != [b, c[1]]
        {
            return bad(format!("encoder_mask must be [{b}, {}], got {:?}", c[1], m.size()));
        }
        let tn = timestep.numel() as i64;
        if timestep.dim() > 1 || (tn != b && tn != 1) {
            return bad(format!("timestep must be one value or [{b}], got {:?}", timestep.size()));
        }
        let text_start = img_shapes.iter().map(|&(_, h, w)| (h / 2).max(w / 2)).max().unwrap_or(0);
        if text_start + c[1] > ROPE_POSITIONS {
            return bad(format!(
                "{} text tokens after image position {text_start} exceed the {ROPE_POSITIONS} RoPE positions",
                c[1]
            ));
        }
        Ok((b, c[1]))
    }
}

/// Checks the image grids against the RoPE range; returns their total token count.
fn check_img_shapes(img_shapes: &[(i64, i64, i64)]) -> Result<i64, String> {
    if img_shapes.is_empty() {
        return Err("img_shapes must name at least one image".into());
    }
    let mut tokens = 0;
    for (i, &(f, h, w)) in img_shapes.iter().enumerate() {
        if f < 1 || h < 1 || w < 1 {
            return Err(format!("img_shapes[{i}] = {:?} must be positive", (f, h, w)));
        }
        if i as i64 + f > ROPE_POSITIONS || h.max(w) > ROPE_POSITIONS {
            return Err(format!(
                "img_shapes[{i}] = {:?} exceeds the {ROPE_POSITIONS} RoPE positions",
                (f, h, w)
            ));
        }
        tokens += f * h * w;
    }
    Ok(tokens)
}

/// The joint attention mask `[B, 1, 1, L_txt + L_img]` (true = attend; image tokens always),
/// or `None` when every text token is valid (the attention is then the same without it).
fn joint_mask(mask: Option<&Tensor>, l_img: i64, dev: Device) -> Option<Tensor> {
    let m = mask?.to_device(dev).to_kind(Kind::Bool);
    if m.all().int64_value(&[]) != 0 {
        return None;
    }
    let b = m.size()[0];
    let img = Tensor::ones([b, l_img], (Kind::Bool, dev));
    Some(Tensor::cat(&[m, img], 1).view([b, 1, 1, -1]))
}

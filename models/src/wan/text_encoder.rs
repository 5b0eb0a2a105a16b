//! UMT5 encoder (`UMT5EncoderModel`), Wan's text encoder (UMT5-XXL: 24 layers, d_model 4096).
//!
//! Reference: transformers `models/umt5/modeling_umt5.py` (module paths follow its state dict);
//! the original release is `Wan-Video/Wan2.1` `wan/modules/t5.py` (`T5Encoder`), whose
//! `models_t5_umt5-xxl-enc-bf16.pth` keys are mapped by [`ORIGINAL_KEYS`]. T5 semantics: RMS
//! layer norm without mean subtraction, **no** `1/sqrt(d)` attention scaling, a relative position
//! bias in **every** layer (UMT5), gated GELU (tanh) feed-forward.
//!
//! Boundary shapes: token ids `[B, L]` + mask `[B, L]` → hidden states `[B, L, d_model]`;
//! the Wan prompt path ([`UMT5EncoderModel::prompt_embeds`]) returns `[B, 512, d_model]` with rows
//! past each prompt's length set to zero.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use super::tokenizer::T5Tokenizer;
use crate::config::{ModelConfig, checked, read_config};
use crate::error::{Component, Error};
use crate::nn::{Builder, Embedding, Linear};
use crate::weights::{self, Checkpoint, LoadOptions};

/// `UMT5Config` fields the encoder uses (transformers `config.json`; unknown keys ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UMT5Config {
    /// Embedding rows.
    pub vocab_size: i64,
    /// Hidden size.
    pub d_model: i64,
    /// Per-head size.
    pub d_kv: i64,
    /// Feed-forward inner size.
    pub d_ff: i64,
    /// Encoder layers.
    pub num_layers: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Relative position buckets (half per direction).
    pub relative_attention_num_buckets: i64,
    /// Distances at or beyond this share the last bucket.
    pub relative_attention_max_distance: i64,
    /// RMS norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Must be `gated-gelu` (UMT5).
    pub feed_forward_proj: String,
}

impl Default for UMT5Config {
    fn default() -> Self {
        Self::umt5_xxl()
    }
}

impl UMT5Config {
    /// `google/umt5-xxl` encoder as used by Wan2.1 (5.68 B parameters).
    pub fn umt5_xxl() -> Self {
        UMT5Config {
            vocab_size: 256_384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        crate::config::read_config_file(path)
    }
}

impl ModelConfig for UMT5Config {
    const COMPONENT: Component = Component::TextEncoder;

    fn validate(&self) -> Result<(), String> {
        if self.feed_forward_proj != "gated-gelu" {
            return Err(format!(
                "feed_forward_proj = {:?}; only \"gated-gelu\" (UMT5) is supported",
                self.feed_forward_proj
            ));
        }
        if self.relative_attention_num_buckets < 4 || self.relative_attention_num_buckets % 2 != 0 {
            return Err(format!(
                "relative_attention_num_buckets = {} must be even and at least 4",
                self.relative_attention_num_buckets
            ));
        }
        Ok(())
    }
}

/// Original Wan `T5Encoder` key fragments → transformers fragments (models.md §3.1). Applied in
/// order to each key after `blocks.` → `encoder.block.`.
pub const ORIGINAL_KEYS: &[(&str, &str)] = &[
    ("norm1.", "layer.0.layer_norm."),
    ("attn.", "layer.0.SelfAttention."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm2.", "layer.1.layer_norm."),
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."),
    ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."),
    ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
];

/// Renames one original Wan T5 key to its transformers name.
pub fn remap_original_key(key: &str) -> String {
    match key {
        "token_embedding.weight" => return "shared.weight".into(),
        "norm.weight" => return "encoder.final_layer_norm.weight".into(),
        _ => {}
    }
    let Some(rest) = key.strip_prefix("blocks.") else { return key.to_owned() };
    let Some((idx, tail)) = rest.split_once('.') else { return key.to_owned() };
    let tail = ORIGINAL_KEYS
        .iter()
        .find_map(|(a, b)| tail.strip_prefix(a).map(|t| format!("{b}{t}")))
        .unwrap_or_else(|| tail.to_owned());
    format!("encoder.block.{idx}.{tail}")
}

/// Parameters that transformers keeps in fp32 when the model is loaded in half precision
/// (`_keep_in_fp32_modules = ["wo"]`).
pub const KEEP_F32: &[&str] = &["DenseReluDense.wo."];

/// T5's RMS norm: `w · x / sqrt(mean(x²) + eps)`, variance in fp32.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(b: Builder, dim: i64, eps: f64) -> Self {
        T5LayerNorm { weight: b.param("weight", &[dim]), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let var = x.to_kind(Kind::Float).square().mean_dim(-1, true, Kind::Float);
        let mut h = x * (var + self.eps).rsqrt();
        if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
            h = h.to_kind(self.weight.kind());
        }
        &self.weight * h
    }
}

#[derive(Debug)]
struct Block {
    norm1: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Embedding,
    norm2: T5LayerNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl Block {
    fn new(p: Builder, cfg: &UMT5Config) -> Self {
        let inner = cfg.num_heads * cfg.d_kv;
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        let a = &p / "layer" / 0;
        let sa = &a / "SelfAttention";
        let f = &p / "layer" / 1;
        let ff = &f / "DenseReluDense";
        Block {
            norm1: T5LayerNorm::new(&a / "layer_norm", d, eps),
            q: Linear::no_bias(&sa / "q", d, inner),
            k: Linear::no_bias(&sa / "k", d, inner),
            v: Linear::no_bias(&sa / "v", d, inner),
            o: Linear::no_bias(&sa / "o", inner, d),
            relative_attention_bias: Embedding::new(
                &sa / "relative_attention_bias",
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
            ),
            norm2: T5LayerNorm::new(&f / "layer_norm", d, eps),
            wi_0: Linear::no_bias(&ff / "wi_0", d, cfg.d_ff),
            wi_1: Linear::no_bias(&ff / "wi_1", d, cfg.d_ff),
            wo: Linear::no_bias(&ff / "wo", cfg.d_ff, d),
        }
    }

    /// `buckets`: `[L, L]` relative position buckets; `mask`: additive `[B, 1, 1, L]`.
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor, heads: i64) -> Tensor {
        let [b, l, _] = x.size()[..] else { unreachable!("3-D hidden states") };
        let n = self.norm1.forward(x);
        let split = |t: Tensor| t.view([b, l, heads, -1]).transpose(1, 2);
        let (q, k, v) =
            (split(self.q.forward(&n)), split(self.k.forward(&n)), split(self.v.forward(&n)));
        // [L, L, H] -> [1, H, L, L], plus the padding mask.
        let bias = self.relative_attention_bias.forward(buckets).permute([2, 0, 1]).unsqueeze(0);
        let bias = (bias + mask).to_kind(q.kind());
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&bias),
            0.0,
            false,
            Some(1.0),
            false,
        );
        let a = a.transpose(1, 2).reshape([b, l, -1]);
        let x = x + self.o.forward(&a);
        let n = self.norm2.forward(&x);
        let h = self.wi_0.forward(&n).gelu("tanh") * self.wi_1.forward(&n);
        let h = h.to_kind(self.wo.weight.kind());
        let y = self.wo.forward(&h).to_kind(x.kind());
        x + y
    }
}

/// The UMT5 encoder stack with transformers module paths (`shared`, `encoder.block.N.*`,
/// `encoder.final_layer_norm`).
#[derive(Debug)]
pub struct UMT5EncoderModel {
    cfg: UMT5Config,
    shared: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

impl UMT5EncoderModel {
    /// The model for `cfg` with empty parameters in `kind` on `device` ([`KEEP_F32`] stays fp32).
    pub fn build(cfg: &UMT5Config, device: Device, kind: Kind) -> Result<Self, Error> {
        let cfg = checked(cfg.clone())?;
        let vs = nn::VarStore::new(device);
        let p = Builder::new(&vs, kind, KEEP_F32);
        let e = &p / "encoder";
        Ok(UMT5EncoderModel {
            shared: Embedding::new(&p / "shared", cfg.vocab_size, cfg.d_model),
            blocks: (0..cfg.num_layers).map(|i| Block::new(&e / "block" / i, &cfg)).collect(),
            final_layer_norm: T5LayerNorm::new(
                &e / "final_layer_norm",
                cfg.d_model,
                cfg.layer_norm_epsilon,
            ),
            cfg,
            vs,
        })
    }

    /// Loads from a transformers `text_encoder/` directory (`config.json` + safetensors), a
    /// safetensors file, or the original `models_t5_umt5-xxl-enc-bf16.pth` (layout detected from
    /// the keys). `cfg` defaults to the directory's `config.json`, else the UMT5-XXL preset.
    /// In half precision `wo` stays fp32 as in transformers.
    pub fn load(
        path: &Path,
        cfg: Option<UMT5Config>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let cfg = match cfg {
            Some(c) => c,
            None => read_config(path, UMT5Config::umt5_xxl)?,
        };
        let ckpt = Checkpoint::open(path)?;
        let has_shared = ckpt.contains("shared.weight");
        let ckpt = ckpt.remap(|k| match k {
            // The tied input embedding is stored under either name (or both).
            "encoder.embed_tokens.weight" if has_shared => None,
            "encoder.embed_tokens.weight" => Some("shared.weight".into()),
            _ => Some(remap_original_key(k)),
        });
        let model = Self::build(&cfg, device, kind)?;
        weights::load_into(&model.vs, &ckpt, &LoadOptions::strict())?;
        weights::log_loaded(Component::TextEncoder, &ckpt, &model.vs, kind, started);
        Ok(model)
    }

    /// Its parameters, by checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn config(&self) -> &UMT5Config {
        &self.cfg
    }

    /// T5 bidirectional relative position buckets `[L, L]` (key position minus query position).
    fn position_buckets(&self, len: i64, device: Device) -> Tensor {
        let nb = self.cfg.relative_attention_num_buckets / 2;
        let max_exact = nb / 2;
        let pos = Tensor::arange(len, (Kind::Int64, device));
        let rel = pos.unsqueeze(0) - pos.unsqueeze(1);
        let sign_bucket = rel.gt(0).to_kind(Kind::Int64) * nb;
        let rel = rel.abs();
        let is_small = rel.lt(max_exact);
        let ratio = (rel.to_kind(Kind::Float) / max_exact as f64).log()
            / (self.cfg.relative_attention_max_distance as f64 / max_exact as f64).ln()
            * (nb - max_exact) as f64;
        let large = (ratio.to_kind(Kind::Int64) + max_exact).clamp_max(nb - 1);
        sign_bucket + rel.where_self(&is_small, &large)
    }

    /// `UMT5EncoderModel(input_ids, attention_mask).last_hidden_state`: `[B, L, d_model]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, Error> {
        let size = input_ids.size();
        let [b, l] = size[..] else {
            return Err(Error::input(
                Component::TextEncoder,
                format!("input_ids must be [B, L], got shape {size:?}"),
            ));
        };
        if attention_mask.size() != size {
            return Err(Error::input(
                Component::TextEncoder,
                format!(
                    "attention_mask shape {:?} differs from input_ids shape {size:?}",
                    attention_mask.size()
                ),
            ));
        }
        if b == 0 || l == 0 {
            return Err(Error::input(
                Component::TextEncoder,
                format!("empty input_ids: shape {size:?}"),
            ));
        }
        let ids = input_ids.to_kind(Kind::Int64);
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            return Err(Error::input(
                Component::TextEncoder,
                format!(
                    "token ids span [{lo}, {hi}]; the vocabulary has {} entries",
                    self.cfg.vocab_size
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        let device = self.shared.weight.device();
        let ids = ids.to_device(device);
        let mut x = self.shared.forward(&ids);
        let min = f64::from(f32::MIN);
        let keep = attention_mask.to_device(device).to_kind(Kind::Float).view([b, 1, 1, l]);
        let mask = (keep.ones_like() - keep) * min;
        let buckets = self.position_buckets(l, device);
        for block in &self.blocks {
            x = block.forward(&x, &buckets, &mask, self.cfg.num_heads);
        }
        Ok(self.final_layer_norm.forward(&x))
    }

    /// Wan's prompt embeddings (diffusers `_get_t5_prompt_embeds`): clean, tokenize (≤ 512 with
    /// `</s>`), encode, keep each prompt's real rows and zero the rest: `[B, 512, d_model]`.
    pub fn prompt_embeds<S: AsRef<str>>(
        &self,
        tokenizer: &T5Tokenizer,
        prompts: &[S],
    ) -> Result<Tensor, Error> {
        let trimmed = self.prompt_embeds_trimmed(tokenizer, prompts)?;
        let max = tokenizer.max_length() as i64;
        let rows: Vec<Tensor> =
            trimmed.iter().map(|t| t.constant_pad_nd([0, 0, 0, max - t.size()[0]])).collect();
        Ok(Tensor::stack(&rows, 0))
    }

    /// The real rows only, one `[seq_len, d_model]` tensor per prompt (`</s>` included).
    pub fn prompt_embeds_trimmed<S: AsRef<str>>(
        &self,
        tokenizer: &T5Tokenizer,
        prompts: &[S],
    ) -> Result<Vec<Tensor>, Error> {
        let batch = tokenizer.encode_batch(prompts, self.shared.weight.device())?;
        // Padding past the longest prompt changes nothing for the real rows (masked keys,
        // relative positions), so the batch is encoded at its own length.
        let hidden = self.forward(&batch.input_ids, &batch.attention_mask)?;
        Ok(batch
            .seq_lens
            .iter()
            .enumerate()
            .map(|(i, &n)| hidden.get(i as i64).narrow(0, 0, n as i64))
            .collect())
    }
}

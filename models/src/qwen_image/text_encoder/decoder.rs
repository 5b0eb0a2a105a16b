//! The Qwen2.5-VL text decoder (`Qwen2_5_VLTextModel`, transformers
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py`): pre-norm layers of grouped-query causal attention
//! with M-RoPE (q/k/v biases, no output bias) and a SwiGLU MLP, then the final RMSNorm.
//!
//! Boundary: input embeddings `[B, L, hidden]`, positions `[3, B, L]`, mask `[B, L]` → the last
//! hidden state after the final norm `[B, L, hidden]`.

use tch::{Device, Kind, Tensor};

use super::config::TextEncoderConfig;
use super::rope::{MRope, apply_rotary};
use crate::nn::{Builder, Embedding, Linear};

/// `Qwen2_5_VLRMSNorm`: normalise in fp32, cast back to the input dtype, then scale.
#[derive(Debug)]
pub(super) struct QwenRmsNorm {
    weight: Tensor,
    eps: f64,
}

impl QwenRmsNorm {
    pub fn new(b: Builder, dim: i64, eps: f64) -> Self {
        QwenRmsNorm { weight: b.param("weight", &[dim]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.to_kind(Kind::Float);
        let var = h.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (h * (var + self.eps).rsqrt()).to_kind(x.kind())
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: QwenRmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: QwenRmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: i64,
    kv_heads: i64,
}

impl Layer {
    fn new(b: Builder, cfg: &TextEncoderConfig) -> Self {
        let (d, hd, eps) = (cfg.hidden_size, cfg.head_dim(), cfg.rms_norm_eps);
        let kv = cfg.num_key_value_heads * hd;
        let (attn, mlp) = (&b / "self_attn", &b / "mlp");
        Layer {
            input_layernorm: QwenRmsNorm::new(&b / "input_layernorm", d, eps),
            q_proj: Linear::new(&attn / "q_proj", d, cfg.num_attention_heads * hd),
            k_proj: Linear::new(&attn / "k_proj", d, kv),
            v_proj: Linear::new(&attn / "v_proj", d, kv),
            o_proj: Linear::no_bias(&attn / "o_proj", cfg.num_attention_heads * hd, d),
            post_attention_layernorm: QwenRmsNorm::new(&b / "post_attention_layernorm", d, eps),
            gate_proj: Linear::no_bias(&mlp / "gate_proj", d, cfg.intermediate_size),
            up_proj: Linear::no_bias(&mlp / "up_proj", d, cfg.intermediate_size),
            down_proj: Linear::no_bias(&mlp / "down_proj", cfg.intermediate_size, d),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
        }
    }

    /// `cos`/`sin` `[B, 1, L, head_dim]`; `mask` boolean `[B, 1, L, L]` (true = attend), or
    /// `None` for a plain causal batch.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, l, _) = x.size3().expect("[B, L, D]");
        let n = self.input_layernorm.forward(x);
        let split = |t: Tensor| t.view([b, l, -1, cos.size()[3]]).transpose(1, 2);
        let q = apply_rotary(&split(self.q_proj.forward(&n)), cos, sin);
        let k = apply_rotary(&split(self.k_proj.forward(&n)), cos, sin);
        let v = split(self.v_proj.forward(&n));
        let rep = self.heads / self.kv_heads;
        let repeat = |t: Tensor| {
            let s = t.size();
            t.unsqueeze(2).expand([s[0], s[1], rep, s[2], s[3]], false).reshape([
                s[0],
                s[1] * rep,
                s[2],
                s[3],
            ])
        };
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &repeat(k),
            &repeat(v),
            mask,
            0.0,
            mask.is_none(),
            None,
            false,
        );
        let x = x + self.o_proj.forward(&a.transpose(1, 2).reshape([b, l, -1]));
        let h = self.post_attention_layernorm.forward(&x);
        let h = self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h);
        &x + self.down_proj.forward(&h)
    }
}

/// `embed_tokens`, the decoder layers and the final norm under `model.*`.
#[derive(Debug)]
pub(super) struct TextDecoder {
    pub embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: QwenRmsNorm,
    rope: MRope,
}

impl TextDecoder {
    pub fn new(b: Builder, cfg: &TextEncoderConfig) -> Self {
        TextDecoder {
            embed_tokens: Embedding::new(&b / "embed_tokens", cfg.vocab_size, cfg.hidden_size),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::new(&b / "layers" / i, cfg))
                .collect(),
            norm: QwenRmsNorm::new(&b / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            rope: MRope::new(cfg.rope_theta, cfg.head_dim(), &cfg.mrope_section, b.device()),
        }
    }

    /// Last hidden state `[B, L, hidden]` of `embeds` at `positions` `[3, B, L]` under
    /// `attention_mask` `[B, L]` (1 = token, 0 = padding).
    pub fn forward(&self, embeds: &Tensor, positions: &Tensor, attention_mask: &Tensor) -> Tensor {
        let device = embeds.device();
        let (cos, sin) = self.rope.cos_sin(&positions.to_device(device), embeds.kind());
        let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
        let mask = attention_mask_4d(attention_mask, device);
        let mut x = embeds.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, mask.as_ref());
        }
        self.norm.forward(&x)
    }
}

/// Causal mask with padded keys removed, `[B, 1, L, L]` boolean, or `None` when nothing is padded.
/// A query that would see no key at all (left padding) is given its own key, so no row is empty.
fn attention_mask_4d(attention_mask: &Tensor, device: Device) -> Option<Tensor> {
    let keep = attention_mask.to_device(device).ne(0);
    if keep.all().int64_value(&[]) != 0 {
        return None;
    }
    let (b, l) = keep.size2().expect("[B, L]");
    let causal = Tensor::ones([l, l], (Kind::Bool, device)).tril(0);
    let mask = causal.logical_and(&keep.view([b, 1, 1, l]));
    let empty = mask.any_dim(-1, true).logical_not();
    let eye = Tensor::eye(l, (Kind::Bool, device));
    Some(mask.logical_or(&eye.logical_and(&empty)))
}

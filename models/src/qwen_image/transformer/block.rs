//! One dual-stream (MMDiT) block of the Qwen-Image DiT: image and text streams with their own
//! weights, joined in one attention over `[text, image]`.
//!
//! Reference: diffusers `transformer_qwenimage.py`, `QwenImageTransformerBlock` and
//! `QwenDoubleStreamAttnProcessor2_0`. Streams are `[B, L, dim]`; the modulation of each stream is
//! `Linear(SiLU(temb))` split into (shift1, scale1, gate1, shift2, scale2, gate2).

use tch::{Kind, Tensor};

use super::config::TransformerConfig;
use super::rope::RopeTables;
use crate::nn::{Builder, FeedForward, Gelu, Linear, RmsNorm};

/// Epsilon of the block LayerNorms and the per-head q/k RMSNorms.
const EPS: f64 = 1e-6;

/// The q, k, v projections of one stream and its per-head q/k RMSNorms (weights `[head_dim]`).
#[derive(Debug)]
struct StreamQkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// `q|k|v` as one projection, built after loading.
    fused: Option<Linear>,
}

impl StreamQkv {
    fn new(p: &Builder, names: [&str; 5], dim: i64, head_dim: i64) -> Self {
        StreamQkv {
            q: Linear::new(p / names[0], dim, dim),
            k: Linear::new(p / names[1], dim, dim),
            v: Linear::new(p / names[2], dim, dim),
            norm_q: RmsNorm::new(p / names[3], head_dim, EPS),
            norm_k: RmsNorm::new(p / names[4], head_dim, EPS),
            fused: None,
        }
    }

    /// `[q, k, v]`, each `[B, L, heads, head_dim]`, q and k normalised.
    fn project(&self, x: &Tensor, heads: i64) -> [Tensor; 3] {
        let (b, l, _) = x.size3().expect("stream is [B, L, dim]");
        let [q, k, v] = match &self.fused {
            Some(qkv) => {
                let t = qkv.forward(x).view([b, l, 3, heads, -1]);
                [t.select(2, 0), t.select(2, 1), t.select(2, 2)]
            }
            None => [&self.q, &self.k, &self.v].map(|p| p.forward(x).view([b, l, heads, -1])),
        };
        [self.norm_q.forward(&q), self.norm_k.forward(&k), v]
    }
}

/// diffusers' `Attention` with `QwenDoubleStreamAttnProcessor2_0`: keys under `attn.`.
#[derive(Debug)]
struct JointAttention {
    img: StreamQkv,
    txt: StreamQkv,
    to_out: Linear,
    to_add_out: Linear,
    heads: i64,
}

impl JointAttention {
    fn new(p: Builder, cfg: &TransformerConfig) -> Self {
        let (dim, hd) = (cfg.inner_dim(), cfg.attention_head_dim);
        JointAttention {
            img: StreamQkv::new(&p, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], dim, hd),
            txt: StreamQkv::new(
                &p,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                dim,
                hd,
            ),
            to_out: Linear::new(&p / "to_out" / 0, dim, dim),
            to_add_out: Linear::new(&p / "to_add_out", dim, dim),
            heads: cfg.num_attention_heads,
        }
    }

    fn fuse(&mut self) {
        for s in [&mut self.img, &mut self.txt] {
            s.fused = Some(Linear::fuse(&[&s.q, &s.k, &s.v]));
        }
    }

    /// Joint attention of the modulated streams; returns `(img, txt)` outputs `[B, L, dim]`.
    /// `mask`: `[B, 1, 1, L_txt + L_img]` bool (true = attend), or `None` for all valid.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mask: Option<&Tensor>,
        rope: &RopeTables,
    ) -> (Tensor, Tensor) {
        let [tq, tk, tv] = self.txt.project(txt, self.heads);
        let [iq, ik, iv] = self.img.project(img, self.heads);
        let (b, lt, dim) = txt.size3().expect("text stream is [B, L, dim]");
        // Joint order: [text, image].
        let q = rope.apply(&Tensor::cat(&[tq, iq], 1)).transpose(1, 2);
        let k = rope.apply(&Tensor::cat(&[tk, ik], 1)).transpose(1, 2);
        let v = Tensor::cat(&[tv, iv], 1).transpose(1, 2);
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let l = out.size()[2];
        let out = out.transpose(1, 2).reshape([b, l, dim]);
        let img_out = self.to_out.forward(&out.narrow(1, lt, l - lt));
        let txt_out = self.to_add_out.forward(&out.narrow(1, 0, lt));
        (img_out, txt_out)
    }
}

/// `LayerNorm(x) · (1 + scale) + shift` (no affine LayerNorm, in the model dtype).
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    let dim = *x.size().last().expect("stream has a channel dim");
    let normed = x.layer_norm([dim], None::<Tensor>, None::<Tensor>, EPS, false);
    shift.addcmul(&normed, &(scale + 1.0))
}

/// `QwenImageTransformerBlock` (keys under `transformer_blocks.N.`).
#[derive(Debug)]
pub(super) struct Block {
    img_mod: Linear,
    txt_mod: Linear,
    attn: JointAttention,
    img_mlp: FeedForward,
    txt_mlp: FeedForward,
}

impl Block {
    pub(super) fn new(p: Builder, cfg: &TransformerConfig) -> Self {
        let dim = cfg.inner_dim();
        Block {
            img_mod: Linear::new(&p / "img_mod" / 1, dim, 6 * dim),
            txt_mod: Linear::new(&p / "txt_mod" / 1, dim, 6 * dim),
            attn: JointAttention::new(&p / "attn", cfg),
            img_mlp: FeedForward::new(&p / "img_mlp", dim, 4 * dim, dim, Gelu::Tanh),
            txt_mlp: FeedForward::new(&p / "txt_mlp", dim, 4 * dim, dim, Gelu::Tanh),
        }
    }

    /// Fuses each stream's q/k/v projections (after loading).
    pub(super) fn fuse(&mut self) {
        self.attn.fuse();
    }

    /// One block: `img [B, L_img, dim]`, `txt [B, L_txt, dim]`, `temb_act = SiLU(temb) [B, dim]`.
    /// Returns the new `(img, txt)`.
    pub(super) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_act: &Tensor,
        mask: Option<&Tensor>,
        rope: &RopeTables,
    ) -> (Tensor, Tensor) {
        // (shift1, scale1, gate1, shift2, scale2, gate2), each [B, 1, dim].
        let im = self.img_mod.forward(temb_act).unsqueeze(1).chunk(6, -1);
        let tm = self.txt_mod.forward(temb_act).unsqueeze(1).chunk(6, -1);
        let (img_attn, txt_attn) = self.attn.forward(
            &modulate(img, &im[0], &im[1]),
            &modulate(txt, &tm[0], &tm[1]),
            mask,
            rope,
        );
        let img = img.addcmul(&im[2], &img_attn);
        let txt = txt.addcmul(&tm[2], &txt_attn);
        let img = img.addcmul(&im[5], &self.img_mlp.forward(&modulate(&img, &im[3], &im[4])));
        let txt = txt.addcmul(&tm[5], &self.txt_mlp.forward(&modulate(&txt, &tm[3], &tm[4])));
        if img.kind() == Kind::Half {
            // The reference clips both streams to the fp16 range after every block.
            return (img.clamp(-65504.0, 65504.0), txt.clamp(-65504.0, 65504.0));
        }
        (img, txt)
    }
}

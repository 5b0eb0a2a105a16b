//! The Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`, transformers
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py` and the window helpers in `vision_utils.py`).
//!
//! Input: the image processor's flattened patches `[N, C·T·P·P]` for all images, in the
//! processor's order (per image and frame, 2×2 merge blocks row-major, the patches of a block
//! row-major), and one `[t, h, w]` grid (in patches) per image. Output: one embedding per merge
//! block, `[N / merge², out_hidden_size]`, in the same order.
//!
//! Tokens are regrouped window by window (windows of `window_size` pixels, whole merge blocks)
//! before the blocks; blocks in `fullatt_block_indexes` attend over each frame, the others within
//! each window; the merger (`ln_q`, then an MLP on the concatenated 2×2 block) runs last and its
//! output is put back in processor order.

use tch::{Kind, Tensor};

use super::config::VisionConfig;
use super::decoder::QwenRmsNorm;
use super::rope::{VisionRope, apply_rotary};
use crate::error::{Component, Error};
use crate::nn::{Builder, Linear};

/// Where the windows and frames of a batch of images lie once tokens are in window order.
#[derive(Debug, PartialEq)]
pub(super) struct Layout {
    /// Merge-block indices in window order (the permutation applied before the blocks).
    pub window_index: Vec<i64>,
    /// Tokens (patches) per window, in window order.
    pub windows: Vec<i64>,
    /// Tokens per frame (the full-attention segments).
    pub frames: Vec<i64>,
    /// Each patch's (row, column) in its image, in processor order.
    pub positions: Vec<[i64; 2]>,
}

impl Layout {
    /// `get_vision_window_index` + `get_vision_position_ids` + `get_vision_cu_seqlens`.
    pub fn new(grids: &[[i64; 3]], cfg: &VisionConfig) -> Self {
        let m = cfg.spatial_merge_size;
        let side = cfg.window_size / m / cfg.patch_size; // window side in merge blocks
        let mut layout =
            Layout { window_index: vec![], windows: vec![], frames: vec![], positions: vec![] };
        let mut base = 0;
        for &[t, h, w] in grids {
            let (gh, gw) = (h / m, w / m);
            for f in 0..t {
                layout.frames.push(h * w);
                for wr in (0..gh).step_by(side as usize) {
                    for wc in (0..gw).step_by(side as usize) {
                        let rows = wr..(wr + side).min(gh);
                        let cols = wc..(wc + side).min(gw);
                        let blocks_in = (rows.end - rows.start) * (cols.end - cols.start);
                        layout.windows.push(blocks_in * m * m);
                        for r in rows {
                            for c in cols.clone() {
                                layout.window_index.push(base + f * gh * gw + r * gw + c);
                            }
                        }
                    }
                }
                for (br, bc, ir, ic) in blocks(gh, gw, m) {
                    layout.positions.push([br * m + ir, bc * m + ic]);
                }
            }
            base += t * gh * gw;
        }
        layout
    }
}

/// (block row, block column, row in block, column in block) in processor order.
fn blocks(gh: i64, gw: i64, m: i64) -> impl Iterator<Item = (i64, i64, i64, i64)> {
    (0..gh).flat_map(move |br| {
        (0..gw)
            .flat_map(move |bc| (0..m).flat_map(move |ir| (0..m).map(move |ic| (br, bc, ir, ic))))
    })
}

/// Attention within consecutive segments of `lens` tokens: q/k/v `[H, N, D]` → `[H, N, D]`.
/// Runs of equal-length segments go through one batched call.
fn segmented_attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[i64]) -> Tensor {
    let (h, _, d) = q.size3().expect("[H, N, D]");
    let mut outs = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < lens.len() {
        let len = lens[i];
        let count = lens[i..].iter().take_while(|&&l| l == len).count() as i64;
        let part = |t: &Tensor| {
            t.narrow(1, start, count * len).reshape([h, count, len, d]).transpose(0, 1)
        };
        let o = Tensor::scaled_dot_product_attention(
            &part(q),
            &part(k),
            &part(v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        outs.push(o.transpose(0, 1).reshape([h, count * len, d]));
        start += count * len;
        i += count as usize;
    }
    Tensor::cat(&outs, 1)
}

#[derive(Debug)]
struct Block {
    norm1: QwenRmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: QwenRmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: i64,
}

impl Block {
    fn new(b: Builder, cfg: &VisionConfig) -> Self {
        let (d, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let (attn, mlp) = (&b / "attn", &b / "mlp");
        Block {
            norm1: QwenRmsNorm::new(&b / "norm1", d, 1e-6),
            qkv: Linear::new(&attn / "qkv", d, 3 * d),
            proj: Linear::new(&attn / "proj", d, d),
            norm2: QwenRmsNorm::new(&b / "norm2", d, 1e-6),
            gate_proj: Linear::new(&mlp / "gate_proj", d, inner),
            up_proj: Linear::new(&mlp / "up_proj", d, inner),
            down_proj: Linear::new(&mlp / "down_proj", inner, d),
            heads: cfg.num_heads,
        }
    }

    /// `x` `[N, D]` in window order; `cos`/`sin` fp32 `[N, 1, head_dim]`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[i64]) -> Tensor {
        let (n, d) = x.size2().expect("[N, D]");
        let qkv = self.qkv.forward(&self.norm1.forward(x)).view([n, 3, self.heads, -1]);
        let rotate = |t: Tensor| apply_rotary(&t.to_kind(Kind::Float), cos, sin).to_kind(x.kind());
        let q = rotate(qkv.select(1, 0)).transpose(0, 1);
        let k = rotate(qkv.select(1, 1)).transpose(0, 1);
        let v = qkv.select(1, 2).transpose(0, 1);
        let a = segmented_attention(&q, &k, &v, segments).transpose(0, 1).reshape([n, d]);
        let x = x + self.proj.forward(&a);
        let h = self.norm2.forward(&x);
        let h = self.gate_proj.forward(&h).silu() * self.up_proj.forward(&h);
        &x + self.down_proj.forward(&h)
    }
}

/// `Qwen2_5_VLPatchMerger`: RMSNorm per patch, then an MLP over each 2×2 block.
#[derive(Debug)]
struct Merger {
    ln_q: QwenRmsNorm,
    fc1: Linear,
    fc2: Linear,
    width: i64,
}

impl Merger {
    fn new(b: Builder, cfg: &VisionConfig) -> Self {
        let width = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let mlp = &b / "mlp";
        Merger {
            ln_q: QwenRmsNorm::new(&b / "ln_q", cfg.hidden_size, 1e-6),
            fc1: Linear::new(&mlp / 0, width, width),
            fc2: Linear::new(&mlp / 2, width, cfg.out_hidden_size),
            width,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.ln_q.forward(x).view([-1, self.width]);
        self.fc2.forward(&self.fc1.forward(&h).gelu("none"))
    }
}

/// The vision tower under `visual.*`.
#[derive(Debug)]
pub(super) struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Tensor,
    rope: VisionRope,
    blocks: Vec<Block>,
    merger: Merger,
}

impl VisionTower {
    pub fn new(b: Builder, cfg: &VisionConfig) -> Self {
        let (t, p) = (cfg.temporal_patch_size, cfg.patch_size);
        let patch_embed = (&b / "patch_embed" / "proj")
            .param("weight", &[cfg.hidden_size, cfg.in_channels, t, p, p]);
        VisionTower {
            patch_embed,
            rope: VisionRope::new(cfg.rope_theta, cfg.head_dim(), b.device()),
            blocks: (0..cfg.depth).map(|i| Block::new(&b / "blocks" / i, cfg)).collect(),
            merger: Merger::new(&b / "merger", cfg),
            cfg: cfg.clone(),
        }
    }

    fn check(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<(), Error> {
        let bad = |m: String| Error::input(Component::TextEncoder, m);
        let m = self.cfg.spatial_merge_size;
        if let Some(g) =
            grids.iter().find(|g| g.iter().any(|&v| v <= 0) || g[1] % m + g[2] % m != 0)
        {
            return Err(bad(format!(
                "image grid {g:?} must be positive with h and w multiples of {m}"
            )));
        }
        let patches: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let want = [patches, self.cfg.patch_values()];
        if pixel_values.size() != want {
            return Err(bad(format!(
                "pixel_values has shape {:?}; the grids {grids:?} need {want:?}",
                pixel_values.size()
            )));
        }
        Ok(())
    }

    /// Merged embeddings `[N / merge², out_hidden_size]` for patches `[N, C·T·P·P]`.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Tensor, Error> {
        self.check(pixel_values, grids)?;
        let device = self.patch_embed.device();
        let layout = Layout::new(grids, &self.cfg);
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let order = Tensor::from_slice(&layout.window_index).to_device(device);
        let permute = |t: &Tensor| {
            let s = t.size();
            t.view([s[0] / unit, unit, -1]).index_select(0, &order).view([s[0], -1])
        };
        let kind = self.patch_embed.kind();
        let pixels = pixel_values.to_device(device).to_kind(kind);
        // Conv3d with kernel = stride = the patch over one flattened patch: a matrix product.
        let weight = self.patch_embed.view([self.cfg.hidden_size, -1]);
        let mut x = permute(&pixels.matmul(&weight.tr()));
        let flat: Vec<i64> = layout.positions.iter().flatten().copied().collect();
        let positions = Tensor::from_slice(&flat).view([-1, 2]).to_device(device);
        let (cos, sin) = self.rope.cos_sin(&positions);
        let (cos, sin) = (permute(&cos).unsqueeze(1), permute(&sin).unsqueeze(1));
        for (i, block) in self.blocks.iter().enumerate() {
            let full = self.cfg.fullatt_block_indexes.contains(&(i as i64));
            let segments = if full { &layout.frames } else { &layout.windows };
            x = block.forward(&x, &cos, &sin, segments);
        }
        let merged = self.merger.forward(&x);
        Ok(merged.index_select(0, &order.argsort(0, false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_whole_merge_blocks_and_split_at_the_edges() {
        // 112 px windows of 14 px patches merged 2×2: 4×4 blocks per window.
        let cfg = VisionConfig::default();
        // 3×5 merge blocks: windows of 3×4 and 3×1 blocks.
        let layout = Layout::new(&[[1, 6, 10]], &cfg);
        assert_eq!(layout.windows, [48, 12]);
        assert_eq!(layout.frames, [60]);
        assert_eq!(&layout.window_index[..5], &[0, 1, 2, 3, 5]);
        assert_eq!(&layout.window_index[12..], &[4, 9, 14]);
        assert_eq!(&layout.positions[..5], &[[0, 0], [0, 1], [1, 0], [1, 1], [0, 2]]);
        // Two images: the second's blocks come after the first's.
        let layout = Layout::new(&[[1, 2, 2], [2, 2, 2]], &cfg);
        assert_eq!(layout.window_index, [0, 1, 2]);
        assert_eq!(layout.windows, [4, 4, 4]);
        assert_eq!(layout.frames, [4, 4, 4]);
    }
}

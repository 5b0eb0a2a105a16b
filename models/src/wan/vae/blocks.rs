//! Building blocks of the Wan VAE: causal 3D convolution with the chunk feature cache, the
//! L2 "RMS" norm, residual and attention blocks, and the spatial/temporal resamplers.
//!
//! Reference: diffusers `models/autoencoders/autoencoder_kl_wan.py` (`WanCausalConv3d`,
//! `WanRMS_norm`, `WanResidualBlock`, `WanAttentionBlock`, `WanResample`). Activations are
//! `[B, C, T, H, W]` throughout.

use tch::{Kind, Tensor};

use crate::nn::{Builder, Conv2d};

/// Frames of history a causal convolution keeps between chunks (`CACHE_T`).
const CACHE_T: i64 = 2;

/// The state one cached convolution carries from one chunk to the next.
#[derive(Debug, Default)]
enum Slot {
    /// First chunk: nothing seen yet.
    #[default]
    Empty,
    /// Temporal upsampler after the first chunk (diffusers' `"Rep"` marker): the time conv was
    /// skipped, so the next chunk zero-fills the missing history.
    Skipped,
    /// The last (up to two) input frames of the previous chunk.
    Frames(Tensor),
}

/// One slot per cached convolution, visited in a fixed order on every chunk.
#[derive(Debug, Default)]
pub(crate) struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

impl FeatCache {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Call before running the network on the next chunk.
    pub(crate) fn start_chunk(&mut self) {
        self.idx = 0;
    }

    fn next(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }
}

/// Last `CACHE_T` frames of `x`; with a single frame, the previous chunk's last frame goes first.
fn history(x: &Tensor, prev: &Slot) -> Tensor {
    let t = x.size()[2];
    let keep = x.narrow(2, (t - CACHE_T).max(0), t.min(CACHE_T));
    match prev {
        Slot::Frames(p) if t < CACHE_T => {
            let last = p.size()[2] - 1;
            Tensor::cat(&[p.narrow(2, last, 1), keep], 2)
        }
        _ => keep.contiguous(),
    }
}

/// `WanCausalConv3d`: zero padding `(W: p, p, H: p, p, T: 2p, 0)`; cached frames replace the
/// leading zero frames. Spatial padding is done by the convolution itself (same zeros, no copy).
#[derive(Debug)]
pub(crate) struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    stride: [i64; 3],
    pad: [i64; 3],
}

impl CausalConv3d {
    pub(crate) fn new(
        p: Builder,
        c_in: i64,
        c_out: i64,
        kernel: [i64; 3],
        stride: [i64; 3],
        pad: [i64; 3],
    ) -> Self {
        let weight = p.param("weight", &[c_out, c_in, kernel[0], kernel[1], kernel[2]]);
        let bias = p.param("bias", &[c_out]);
        CausalConv3d { weight, bias, stride, pad }
    }

    /// `k×k×k` convolution with "same" spatial padding and causal time padding.
    pub(crate) fn cube(p: Builder, c_in: i64, c_out: i64, k: i64) -> Self {
        let pad = (k - 1) / 2;
        Self::new(p, c_in, c_out, [k; 3], [1; 3], [pad; 3])
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Runs on `x`, with `cache` (frames preceding `x`) in place of leading zero frames.
    pub(crate) fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Tensor {
        let front = 2 * self.pad[0];
        let padded;
        let x = if front > 0 {
            let cached = cache.map_or(0, |c| c.size()[2]);
            let zeros = front - cached;
            let mut parts: Vec<Tensor> = Vec::with_capacity(3);
            if zeros > 0 {
                let s = x.size();
                parts.push(Tensor::zeros([s[0], s[1], zeros, s[3], s[4]], (x.kind(), x.device())));
            }
            if let Some(c) = cache {
                parts.push(c.shallow_clone());
            }
            parts.push(x.shallow_clone());
            padded = Tensor::cat(&parts, 2);
            &padded
        } else {
            x
        };
        x.conv3d(
            &self.weight,
            Some(&self.bias),
            self.stride,
            [0, self.pad[1], self.pad[2]],
            [1, 1, 1],
            1,
        )
    }

    /// Runs on one chunk, reading and updating this convolution's cache slot.
    pub(crate) fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let slot = cache.next();
        let keep = history(x, slot);
        let out = match slot {
            Slot::Frames(prev) => self.forward(x, Some(prev)),
            _ => self.forward(x, None),
        };
        *slot = Slot::Frames(keep);
        out
    }
}

/// `WanRMS_norm`: `F.normalize(x, dim=1) · sqrt(C) · gamma`, an L2 normalisation (eps 1e-12) over
/// channels; half-precision inputs are normalised in fp32 as in diffusers.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    /// `spatial_dims`: 3 for `[B,C,T,H,W]` activations, 2 for per-frame `[N,C,H,W]`.
    pub(crate) fn new(p: Builder, dim: i64, spatial_dims: usize) -> Self {
        let mut shape = vec![dim];
        shape.extend(std::iter::repeat_n(1, spatial_dims));
        RmsNorm { gamma: p.param("gamma", &shape), scale: (dim as f64).sqrt() }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let half = matches!(x.kind(), Kind::Half | Kind::BFloat16);
        let xf = if half { x.to_kind(Kind::Float) } else { x.shallow_clone() };
        let norm = xf.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
        let normalized = (xf / norm).to_kind(x.kind()); // F.normalize(x, dim=1)
        normalized * (&self.gamma * self.scale)
    }
}

/// `WanResidualBlock`: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
#[derive(Debug)]
pub(crate) struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub(crate) fn new(p: Builder, c_in: i64, c_out: i64) -> Self {
        ResidualBlock {
            norm1: RmsNorm::new(&p / "norm1", c_in, 3),
            conv1: CausalConv3d::cube(&p / "conv1", c_in, c_out, 3),
            norm2: RmsNorm::new(&p / "norm2", c_out, 3),
            conv2: CausalConv3d::cube(&p / "conv2", c_out, c_out, 3),
            shortcut: (c_in != c_out)
                .then(|| CausalConv3d::cube(&p / "conv_shortcut", c_in, c_out, 1)),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None),
            None => x.shallow_clone(),
        };
        let y = self.norm1.forward(x).silu_();
        let y = self.conv1.forward_cached(&y, cache);
        let y = self.norm2.forward(&y).silu_();
        let y = self.conv2.forward_cached(&y, cache);
        y + h
    }
}

/// `WanAttentionBlock`: single-head self-attention over the `H·W` positions of each frame.
#[derive(Debug)]
pub(crate) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    pub(crate) fn new(p: Builder, dim: i64) -> Self {
        AttentionBlock {
            norm: RmsNorm::new(&p / "norm", dim, 2),
            to_qkv: Conv2d::new(&p / "to_qkv", dim, 3 * dim, 1, 1, true),
            proj: Conv2d::new(&p / "proj", dim, dim, 1, 1, true),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let [b, c, t, h, w] = x.size()[..] else { unreachable!("5-D activations") };
        let frames = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        let qkv = self.to_qkv.forward(&self.norm.forward(&frames));
        // [N, 3C, H, W] -> [N, 1, H·W, 3C] -> q, k, v: [N, 1, H·W, C]
        let qkv = qkv.reshape([b * t, 1, 3 * c, h * w]).permute([0, 1, 3, 2]);
        let [q, k, v] = &qkv.chunk(3, -1)[..] else { unreachable!("three chunks") };
        let a =
            Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, None, false);
        let a = a.squeeze_dim(1).permute([0, 2, 1]).reshape([b * t, c, h, w]);
        let out = self.proj.forward(&a).view([b, t, c, h, w]).permute([0, 2, 1, 3, 4]);
        out + x
    }
}

/// The resampling flavours of `WanResample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResampleMode {
    Downsample2d,
    Downsample3d,
    Upsample2d,
    Upsample3d,
}

/// `WanResample`: per-frame 2× spatial down/upsampling (as a `1×3×3` 3D convolution over all
/// frames at once), plus the temporal `time_conv` of the 3D modes.
#[derive(Debug)]
pub(crate) struct Resample {
    mode: ResampleMode,
    /// `resample.1`: a `Conv2d` weight `[C_out, C_in, 3, 3]`.
    weight: Tensor,
    bias: Tensor,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    /// The Wan2.1 resampler: upsampling halves the channels.
    pub(crate) fn new(p: Builder, dim: i64, mode: ResampleMode) -> Self {
        Self::with_upsample_out(p, dim, mode, dim / 2)
    }

    /// A resampler whose upsampling gives `up_out` channels (Wan2.2's keep `dim`).
    pub(crate) fn with_upsample_out(p: Builder, dim: i64, mode: ResampleMode, up_out: i64) -> Self {
        let c_out = match mode {
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => dim,
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => up_out,
        };
        let r = &p / "resample" / 1;
        let weight = r.param("weight", &[c_out, dim, 3, 3]);
        let bias = r.param("bias", &[c_out]);
        let time_conv = match mode {
            ResampleMode::Downsample3d => {
                Some(CausalConv3d::new(&p / "time_conv", dim, dim, [3, 1, 1], [2, 1, 1], [0; 3]))
            }
            ResampleMode::Upsample3d => Some(CausalConv3d::new(
                &p / "time_conv",
                dim,
                2 * dim,
                [3, 1, 1],
                [1; 3],
                [1, 0, 0],
            )),
            _ => None,
        };
        Resample { mode, weight, bias, time_conv }
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut x = x.shallow_clone();
        if self.mode == ResampleMode::Upsample3d {
            x = self.upsample_time(&x, cache);
        }
        let w = self.weight.unsqueeze(2);
        x = match self.mode {
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                // ZeroPad2d((0, 1, 0, 1)) then a stride-2 3×3 conv, frame by frame.
                x.constant_pad_nd([0, 1, 0, 1]).conv3d(
                    &w,
                    Some(&self.bias),
                    [1, 2, 2],
                    [0, 0, 0],
                    [1, 1, 1],
                    1,
                )
            }
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                // nearest-exact ×2 equals nearest ×2.
                let s = x.size();
                x.upsample_nearest3d([s[2], 2 * s[3], 2 * s[4]], None, None, None).conv3d(
                    &w,
                    Some(&self.bias),
                    [1, 1, 1],
                    [0, 1, 1],
                    [1, 1, 1],
                    1,
                )
            }
        };
        if self.mode == ResampleMode::Downsample3d {
            x = self.downsample_time(&x, cache);
        }
        x
    }

    /// Stride-2 causal time conv over `cat(previous chunk's last frame, x)`; skipped on the
    /// first chunk.
    fn downsample_time(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let conv = self.time_conv.as_ref().expect("downsample3d has a time conv");
        let slot = cache.next();
        let t = x.size()[2];
        let (out, keep) = match slot {
            Slot::Frames(prev) => {
                let last = prev.size()[2] - 1;
                let input = Tensor::cat(&[prev.narrow(2, last, 1), x.shallow_clone()], 2);
                (conv.forward(&input, None), x.narrow(2, t - 1, 1).contiguous())
            }
            _ => (x.shallow_clone(), x.shallow_clone()),
        };
        *slot = Slot::Frames(keep);
        out
    }

    /// Time conv to `2C` channels whose halves interleave into twice the frames; skipped on the
    /// first chunk (whose history the next chunk treats as zeros).
    fn upsample_time(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let conv = self.time_conv.as_ref().expect("upsample3d has a time conv");
        let slot = cache.next();
        if matches!(slot, Slot::Empty) {
            *slot = Slot::Skipped;
            return x.shallow_clone();
        }
        let mut keep = history(x, slot);
        if keep.size()[2] < CACHE_T && matches!(slot, Slot::Skipped) {
            keep = Tensor::cat(&[keep.zeros_like(), keep.shallow_clone()], 2);
        }
        let y = match slot {
            Slot::Frames(prev) => conv.forward(x, Some(prev)),
            _ => conv.forward(x, None),
        };
        *slot = Slot::Frames(keep);
        let [b, c, t, h, w] = x.size()[..] else { unreachable!("5-D activations") };
        // [B, 2, C, T, H, W] -> stack on dim 3 -> [B, C, 2T, H, W] (frame halves interleaved)
        y.reshape([b, 2, c, t, h, w]).permute([0, 2, 3, 1, 4, 5]).reshape([b, c, 2 * t, h, w])
    }
}

/// `AvgDown3D`: the Wan2.2 encoder stages' parameter-free shortcut. Time is zero-padded in front
/// to a multiple of `factor_t`; each `factor_t×factor_s×factor_s` cell is folded into channels,
/// and consecutive groups of those channels are averaged down to `c_out`.
#[derive(Debug)]
pub(crate) struct AvgDown {
    c_out: i64,
    factor_t: i64,
    factor_s: i64,
}

impl AvgDown {
    pub(crate) fn new(c_in: i64, c_out: i64, factor_t: i64, factor_s: i64) -> Self {
        debug_assert_eq!(c_in * factor_t * factor_s * factor_s % c_out, 0);
        AvgDown { c_out, factor_t, factor_s }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let pad_t = (ft - x.size()[2] % ft) % ft;
        let x =
            if pad_t > 0 { x.constant_pad_nd([0, 0, 0, 0, pad_t, 0]) } else { x.shallow_clone() };
        let [b, c, t, h, w] = x.size()[..] else { unreachable!("5-D activations") };
        let (t, h, w) = (t / ft, h / fs, w / fs);
        let folded = x
            .view([b, c, t, ft, h, fs, w, fs].as_slice())
            .permute([0, 1, 3, 5, 7, 2, 4, 6])
            .reshape([b, self.c_out, c * ft * fs * fs / self.c_out, t, h, w]);
        folded.mean_dim([2i64].as_slice(), false, None)
    }
}

/// `DupUp3D`: the Wan2.2 decoder stages' parameter-free shortcut. Channels are repeated, then
/// unfolded into `factor_t×factor_s×factor_s` cells; on the first chunk the leading
/// `factor_t − 1` frames are dropped, as the causal time upsampler yields one frame there.
#[derive(Debug)]
pub(crate) struct DupUp {
    c_out: i64,
    repeats: i64,
    factor_t: i64,
    factor_s: i64,
}

impl DupUp {
    pub(crate) fn new(c_in: i64, c_out: i64, factor_t: i64, factor_s: i64) -> Self {
        let repeats = c_out * factor_t * factor_s * factor_s / c_in;
        DupUp { c_out, repeats, factor_t, factor_s }
    }

    pub(crate) fn forward(&self, x: &Tensor, first_chunk: bool) -> Tensor {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let [b, _, t, h, w] = x.size()[..] else { unreachable!("5-D activations") };
        let y = x
            .repeat_interleave_self_int(self.repeats, 1, None)
            .view([b, self.c_out, ft, fs, fs, t, h, w].as_slice())
            .permute([0, 1, 5, 2, 6, 3, 7, 4])
            .reshape([b, self.c_out, t * ft, h * fs, w * fs]);
        if first_chunk && ft > 1 { y.narrow(2, ft - 1, t * ft - (ft - 1)) } else { y }
    }
}

/// Wan2.2's `patchify`: `[B, C, F, H, W]` → `[B, C·p², F, H/p, W/p]`, the channel of pixel
/// `(i, j)` in its patch being `c·p² + j·p + i`.
pub(crate) fn patchify(x: &Tensor, p: i64) -> Tensor {
    if p == 1 {
        return x.shallow_clone();
    }
    let [b, c, f, h, w] = x.size()[..] else { unreachable!("5-D video") };
    x.view([b, c, f, h / p, p, w / p, p].as_slice()).permute([0, 1, 6, 4, 2, 3, 5]).reshape([
        b,
        c * p * p,
        f,
        h / p,
        w / p,
    ])
}

/// The inverse of [`patchify`].
pub(crate) fn unpatchify(x: &Tensor, p: i64) -> Tensor {
    if p == 1 {
        return x.shallow_clone();
    }
    let [b, cp, f, h, w] = x.size()[..] else { unreachable!("5-D video") };
    let c = cp / (p * p);
    x.view([b, c, p, p, f, h, w].as_slice()).permute([0, 1, 4, 5, 3, 6, 2]).reshape([
        b,
        c,
        f,
        h * p,
        w * p,
    ])
}

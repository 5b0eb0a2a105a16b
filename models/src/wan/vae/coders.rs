//! The two networks of the Wan VAE: `WanEncoder3d` (video → posterior moments) and
//! `WanDecoder3d` (latents → video), built from [`super::blocks`], run chunk by chunk with the
//! feature cache.

use tch::Tensor;

use super::blocks::{
    AttentionBlock, AvgDown, CausalConv3d, DupUp, FeatCache, Resample, ResampleMode, ResidualBlock,
    RmsNorm,
};
use super::config::VaeConfig;
use crate::nn::Builder;

#[derive(Debug)]
enum DownLayer {
    Res(ResidualBlock),
    Resample(Resample),
    /// Wan2.2: a whole stage with its averaging shortcut.
    Stage(ResidualDownBlock),
}

/// `WanResidualDownBlock` (Wan2.2): residual blocks and the downsampler, plus [`AvgDown`] of the
/// stage's input.
#[derive(Debug)]
struct ResidualDownBlock {
    resnets: Vec<ResidualBlock>,
    downsampler: Option<Resample>,
    shortcut: AvgDown,
}

impl ResidualDownBlock {
    fn new(p: Builder, cfg: &VaeConfig, c_in: i64, c_out: i64, stage: usize) -> Self {
        let last = stage == cfg.dim_mult.len() - 1;
        let temporal = !last && cfg.temperal_downsample[stage];
        let mut resnets = Vec::new();
        let mut c = c_in;
        for j in 0..cfg.num_res_blocks {
            resnets.push(ResidualBlock::new(&p / "resnets" / j, c, c_out));
            c = c_out;
        }
        let downsampler = (!last).then(|| {
            let mode =
                if temporal { ResampleMode::Downsample3d } else { ResampleMode::Downsample2d };
            Resample::new(&p / "downsampler", c_out, mode)
        });
        let (ft, fs) = (if temporal { 2 } else { 1 }, if last { 1 } else { 2 });
        ResidualDownBlock { resnets, downsampler, shortcut: AvgDown::new(c_in, c_out, ft, fs) }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, cache);
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, cache);
        }
        h + self.shortcut.forward(x)
    }
}

#[derive(Debug)]
struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(p: Builder, dim: i64) -> Self {
        MidBlock {
            res0: ResidualBlock::new(&p / "resnets" / 0, dim, dim),
            attn: AttentionBlock::new(&p / "attentions" / 0, dim),
            res1: ResidualBlock::new(&p / "resnets" / 1, dim, dim),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.res0.forward(x, cache);
        let x = self.attn.forward(&x);
        self.res1.forward(&x, cache)
    }
}

/// `WanEncoder3d`.
#[derive(Debug)]
pub(super) struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    pub(super) fn new(p: Builder, cfg: &VaeConfig) -> Self {
        let dims: Vec<i64> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| m * cfg.base_dim)
            .collect();
        let conv_in = CausalConv3d::cube(&p / "conv_in", cfg.in_channels, dims[0], 3);
        let mut down_blocks = Vec::new();
        let last = cfg.dim_mult.len() - 1;
        for i in 0..cfg.dim_mult.len() {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            if cfg.is_residual {
                let q = &p / "down_blocks" / i;
                down_blocks.push(DownLayer::Stage(ResidualDownBlock::new(q, cfg, c_in, c_out, i)));
                continue;
            }
            for _ in 0..cfg.num_res_blocks {
                let q = &p / "down_blocks" / down_blocks.len();
                down_blocks.push(DownLayer::Res(ResidualBlock::new(q, c_in, c_out)));
                c_in = c_out;
            }
            if i != last {
                let mode = if cfg.temperal_downsample[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                let q = &p / "down_blocks" / down_blocks.len();
                down_blocks.push(DownLayer::Resample(Resample::new(q, c_out, mode)));
            }
        }
        let top = dims[dims.len() - 1];
        Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(&p / "mid_block", top),
            norm_out: RmsNorm::new(&p / "norm_out", top, 3),
            conv_out: CausalConv3d::cube(&p / "conv_out", top, 2 * cfg.z_dim, 3),
        }
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut x = self.conv_in.forward_cached(x, cache);
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Res(r) => r.forward(&x, cache),
                DownLayer::Resample(r) => r.forward(&x, cache),
                DownLayer::Stage(s) => s.forward(&x, cache),
            };
        }
        let x = self.mid_block.forward(&x, cache);
        let x = self.norm_out.forward(&x).silu_();
        self.conv_out.forward_cached(&x, cache)
    }
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
    /// Wan2.2 (`WanResidualUpBlock`): the duplicating shortcut around the stage.
    shortcut: Option<DupUp>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, cache);
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, cache);
        }
        match &self.shortcut {
            Some(s) => h + s.forward(x, first_chunk),
            None => h,
        }
    }
}

/// `WanDecoder3d`.
#[derive(Debug)]
pub(super) struct Decoder {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    pub(super) fn new(p: Builder, cfg: &VaeConfig) -> Self {
        let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let n = cfg.dim_mult.len();
        let dims: Vec<i64> = std::iter::once(cfg.dim_mult[n - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| m * base)
            .collect();
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for i in 0..n {
            // Wan2.1: every stage after the first receives the halved output of the upsampler.
            let stage_in = if i > 0 && !cfg.is_residual { dims[i] / 2 } else { dims[i] };
            let mut c_in = stage_in;
            let c_out = dims[i + 1];
            let q = &p / "up_blocks" / i;
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(&q / "resnets" / j, c_in, c_out));
                c_in = c_out;
            }
            let up = i != n - 1;
            let temporal = up && temporal_up[i];
            let mode = if temporal { ResampleMode::Upsample3d } else { ResampleMode::Upsample2d };
            let (upsampler, shortcut) = match (up, cfg.is_residual) {
                (false, _) => (None, None),
                (true, false) => (Some(Resample::new(&q / "upsamplers" / 0, c_out, mode)), None),
                (true, true) => {
                    let ft = if temporal { 2 } else { 1 };
                    (
                        Some(Resample::with_upsample_out(&q / "upsampler", c_out, mode, c_out)),
                        Some(DupUp::new(stage_in, c_out, ft, 2)),
                    )
                }
            };
            up_blocks.push(UpBlock { resnets, upsampler, shortcut });
        }
        let out = dims[n];
        Decoder {
            conv_in: CausalConv3d::cube(&p / "conv_in", cfg.z_dim, dims[0], 3),
            mid_block: MidBlock::new(&p / "mid_block", dims[0]),
            up_blocks,
            norm_out: RmsNorm::new(&p / "norm_out", out, 3),
            conv_out: CausalConv3d::cube(&p / "conv_out", out, cfg.out_channels, 3),
        }
    }

    /// Decodes one latent frame; `first_chunk` marks the first (Wan2.2's shortcuts need it).
    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Tensor {
        let x = self.conv_in.forward_cached(x, cache);
        let mut x = self.mid_block.forward(&x, cache);
        for block in &self.up_blocks {
            x = block.forward(&x, cache, first_chunk);
        }
        let x = self.norm_out.forward(&x).silu_();
        self.conv_out.forward_cached(&x, cache)
    }
}

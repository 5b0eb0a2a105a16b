//! Decoded video floats to bytes, by the rule of the diffusers output path being matched.

use tch::{Kind, Tensor};

use crate::error::{Component, Error};

/// How [`frames_u8`] turns `[-1, 1]` floats into bytes. Both start from
/// `v = clamp(x/2 + 0.5, 0, 1)` in fp32 (diffusers `VideoProcessor.postprocess_video`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// `uint8(v · 255)`, truncating: diffusers `export_to_video` on the pipeline's default
    /// `output_type="np"` frames (what the Wan examples write to MP4).
    #[default]
    Truncate,
    /// `uint8(round(v · 255))`: diffusers `numpy_to_pil` (`output_type="pil"`).
    Round,
}

/// One decoded video `[3, F, H, W]` in `[-1, 1]` as `uint8 [F, H, W, 3]`, by `rule`.
pub fn frames_u8(video: &Tensor, rule: Quantize) -> Result<Tensor, Error> {
    let size = video.size();
    if size.len() != 4 || size[0] != 3 {
        return Err(Error::input(
            Component::Vae,
            format!("frames_u8 takes one video [3, F, H, W], got shape {size:?}"),
        ));
    }
    let v = (video.to_kind(Kind::Float).permute([1, 2, 3, 0]) * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
    let v = match rule {
        Quantize::Truncate => v,
        Quantize::Round => v.round(),
    };
    Ok(v.to_kind(Kind::Uint8).contiguous())
}

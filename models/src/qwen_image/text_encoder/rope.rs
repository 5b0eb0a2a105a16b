//! Qwen2.5-VL's rotary embeddings (transformers `models/qwen2_5_vl/modeling_qwen2_5_vl.py`):
//!
//! - [`rope_index`]: the decoder's 3D positions (`Qwen2_5_VLModel.get_rope_index`): text tokens
//!   count up on all three axes; an image's tokens take their (frame, row, column) grid position
//!   offset by the position the image starts at; text after an image continues from that start
//!   plus `max(h, w) / merge`.
//! - [`MRope`]: M-RoPE (`Qwen2_5_VLRotaryEmbedding`): `mrope_section` splits the `head_dim / 2`
//!   frequencies between the temporal, height and width positions; rotate-half layout.
//! - [`VisionRope`]: the vision tower's 2D rotary embedding (`Qwen2_5_VLVisionRotaryEmbedding`):
//!   half the frequencies follow the patch row, half the column.

use tch::{Device, Kind, Tensor};

use crate::error::{Component, Error};

/// `[x1, x2] → [−x2, x1]` over the last dim.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// `x·cos + rotate_half(x)·sin`.
pub(super) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

/// `1 / theta^(arange(0, dim, 2) / dim)` in fp32, as transformers computes it.
fn inverse_frequencies(theta: f64, dim: i64, device: Device) -> Tensor {
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / dim as f64;
    Tensor::pow_scalar(theta, &exponent).reciprocal()
}

/// The decoder's multimodal rotary embedding.
#[derive(Debug)]
pub struct MRope {
    inv_freq: Tensor,
    section: Vec<i64>,
}

impl MRope {
    /// For heads of `head_dim` with base `theta`; `section` sums to `head_dim / 2`.
    pub fn new(theta: f64, head_dim: i64, section: &[i64], device: Device) -> Self {
        MRope { inv_freq: inverse_frequencies(theta, head_dim, device), section: section.to_vec() }
    }

    /// `(cos, sin)` `[B, L, head_dim]` in `kind` for positions `[3, B, L]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let parts = freqs.split_with_sizes(self.section.as_slice(), -1);
        let picked: Vec<Tensor> =
            parts.iter().enumerate().map(|(i, p)| p.get(i as i64 % 3)).collect();
        let freqs = Tensor::cat(&picked, -1);
        let freqs = Tensor::cat(&[&freqs, &freqs], -1);
        (freqs.cos().to_kind(kind), freqs.sin().to_kind(kind))
    }
}

/// The vision tower's 2D rotary embedding.
#[derive(Debug)]
pub struct VisionRope {
    inv_freq: Tensor,
}

impl VisionRope {
    /// For heads of `head_dim`: `head_dim / 4` frequencies per axis.
    pub fn new(theta: f64, head_dim: i64, device: Device) -> Self {
        VisionRope { inv_freq: inverse_frequencies(theta, head_dim / 2, device) }
    }

    /// fp32 `(cos, sin)` `[N, head_dim]` for patch positions `[N, 2]` (row, column).
    pub fn cos_sin(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let n = positions.size()[0];
        let freqs = freqs.view([n, -1]); // cat([freqs_h, freqs_w], -1)
        let freqs = Tensor::cat(&[&freqs, &freqs], -1);
        (freqs.cos(), freqs.sin())
    }
}

/// Row-major values of an integer tensor, on the CPU.
fn values(t: &Tensor) -> Result<Vec<i64>, Error> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1]))
        .map_err(|e| Error::input(Component::TextEncoder, e.to_string()))
}

/// The 3D positions of one prompt's valid tokens (`[3][n]`), consuming one grid per image.
fn prompt_positions(
    ids: &[i64],
    image_token_id: i64,
    grids: &mut std::slice::Iter<'_, [i64; 3]>,
    merge: i64,
) -> Result<[Vec<i64>; 3], Error> {
    let mut pos: [Vec<i64>; 3] = Default::default();
    let mut current = 0;
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            pos.iter_mut().for_each(|axis| axis.push(current));
            current += 1;
            i += 1;
            continue;
        }
        let Some(&[t, h, w]) = grids.next() else {
            return Err(Error::input(
                Component::TextEncoder,
                "the prompts hold more images (runs of image tokens) than image grids were given",
            ));
        };
        let (gh, gw) = (h / merge, w / merge);
        let n = (t * gh * gw) as usize;
        if i + n > ids.len() || ids[i..i + n].iter().any(|&id| id != image_token_id) {
            return Err(Error::input(
                Component::TextEncoder,
                format!("an image of grid [{t}, {h}, {w}] needs {n} consecutive image tokens"),
            ));
        }
        for ft in 0..t {
            for r in 0..gh {
                for c in 0..gw {
                    pos[0].push(current + ft);
                    pos[1].push(current + r);
                    pos[2].push(current + c);
                }
            }
        }
        current += gh.max(gw); // max(grid_thw[1], grid_thw[2]) // spatial_merge_size
        i += n;
    }
    Ok(pos)
}

/// transformers' `get_rope_index` for images: the trained 3D M-RoPE positions `[3, B, L]` (int64,
/// on the CPU) of `input_ids` `[B, L]`.
///
/// Image tokens are those equal to `image_token_id`; the images of the whole batch take the
/// grids `image_grid_thw` (`[t, h, w]` in patches) in order, each covering
/// `t·h·w / spatial_merge_size²` consecutive tokens. Positions count valid tokens only
/// (`attention_mask` 1); masked tokens get position 0, as in transformers.
pub fn rope_index(
    input_ids: &Tensor,
    attention_mask: &Tensor,
    image_grid_thw: &[[i64; 3]],
    image_token_id: i64,
    spatial_merge_size: i64,
) -> Result<Tensor, Error> {
    let size = input_ids.size();
    let [b, l] = size[..] else {
        return Err(Error::input(
            Component::TextEncoder,
            format!("input_ids must be [B, L], got {size:?}"),
        ));
    };
    if attention_mask.size() != size {
        return Err(Error::input(
            Component::TextEncoder,
            format!(
                "attention_mask shape {:?} differs from input_ids {size:?}",
                attention_mask.size()
            ),
        ));
    }
    let (ids, mask) = (values(input_ids)?, values(attention_mask)?);
    let (b, l) = (b as usize, l as usize);
    let mut out = vec![0i64; 3 * b * l];
    let mut grids = image_grid_thw.iter();
    for row in 0..b {
        let span = row * l..(row + 1) * l;
        let valid: Vec<usize> = span.clone().filter(|&j| mask[j] != 0).collect();
        let row_ids: Vec<i64> = valid.iter().map(|&j| ids[j]).collect();
        let pos = prompt_positions(&row_ids, image_token_id, &mut grids, spatial_merge_size)?;
        for (axis, p) in pos.iter().enumerate() {
            for (&j, &v) in valid.iter().zip(p) {
                out[axis * b * l + j] = v;
            }
        }
    }
    if grids.next().is_some() {
        return Err(Error::input(
            Component::TextEncoder,
            format!(
                "{} image grids were given but the prompts hold fewer images",
                image_grid_thw.len()
            ),
        ));
    }
    Ok(Tensor::from_slice(&out).view([3, b as i64, l as i64]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tokens_take_grid_positions_and_text_continues_after_the_largest_side() {
        // text, 2×3 merged image (grid 1×4×6), text; then padding.
        let ids = Tensor::from_slice(&[5i64, 9, 9, 9, 9, 9, 9, 6, 7, 0]).view([1, 10]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 0]).view([1, 10]);
        let pos = rope_index(&ids, &mask, &[[1, 4, 6]], 9, 2).unwrap();
        let rows: Vec<Vec<i64>> = (0..3).map(|a| values(&pos.get(a)).unwrap()).collect();
        assert_eq!(rows[0], [0, 1, 1, 1, 1, 1, 1, 4, 5, 0]);
        assert_eq!(rows[1], [0, 1, 1, 1, 2, 2, 2, 4, 5, 0]);
        assert_eq!(rows[2], [0, 1, 2, 3, 1, 2, 3, 4, 5, 0]);
    }

    #[test]
    fn grid_and_token_counts_must_agree() {
        let ids = Tensor::from_slice(&[5i64, 9, 9, 6]).view([1, 4]);
        let mask = ids.ones_like();
        assert!(rope_index(&ids, &mask, &[], 9, 2).is_err());
        assert!(rope_index(&ids, &mask, &[[1, 4, 4]], 9, 2).is_err());
        assert!(rope_index(&ids, &mask, &[[1, 2, 4], [1, 2, 2]], 9, 2).is_err());
        assert!(rope_index(&ids, &mask, &[[1, 2, 4]], 9, 2).is_ok());
    }
}

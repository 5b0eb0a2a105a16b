//! Qwen-Image's 3D rotary position embedding over the joint `[text, image]` sequence.
//!
//! Reference: diffusers `transformer_qwenimage.py`, `QwenEmbedRope` (with `scale_rope=True`) and
//! `apply_rotary_emb_qwen(use_real=False)`. The head's channels split into three axes (frame,
//! height, width; `axes_dims_rope`). Image `i` of `img_shapes` takes frame positions `i..i+F`
//! and centred row/column positions `-(H - H/2) .. H/2 - 1` (the reference's negative table).
//! Text token `j` takes position `m + j` on every axis, `m = max over images of max(H/2, W/2)`.
//! Each channel pair `(x₂ₖ, x₂ₖ₊₁)` is rotated as the complex number `x₂ₖ + i·x₂ₖ₊₁`, in fp32.

use tch::{Device, Kind, Tensor};

/// cos/sin of the rotation angles for one token layout, `[L_txt + L_img, 1, head_dim/2]` fp32
/// (text rows first, as in the joint attention).
#[derive(Debug)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// `1 / 10000^(2k/dim)` for `k < dim/2`, in fp32 like the reference's `rope_params`.
fn inverse_frequencies(dim: i64, device: Device) -> Tensor {
    let k = Tensor::arange_start_step(0, dim, 2, (Kind::Float, device)) / dim as f64;
    Tensor::pow_scalar(10000.0, &k).reciprocal()
}

/// Angles `[n, dim/2]` of the fp32 positions `pos [n]` on one axis.
fn angles(pos: &Tensor, inv: &Tensor) -> Tensor {
    pos.unsqueeze(1) * inv.unsqueeze(0)
}

/// The centred positions of `n` rows: `-(n - n/2) ..= n/2 - 1`.
fn centred(n: i64, device: Device) -> Tensor {
    Tensor::arange(n, (Kind::Float, device)) - (n - n / 2) as f64
}

impl RopeTables {
    /// Tables for `txt_len` text tokens followed by the images `img_shapes` (`(frames, rows,
    /// cols)` of packed tokens each, in sequence order). `axes` sums to the head dim.
    pub fn new(
        axes: [i64; 3],
        img_shapes: &[(i64, i64, i64)],
        txt_len: i64,
        device: Device,
    ) -> Self {
        let inv: Vec<Tensor> = axes.iter().map(|&d| inverse_frequencies(d, device)).collect();
        let half: i64 = axes.iter().sum::<i64>() / 2;
        let mut rows = Vec::with_capacity(img_shapes.len() + 1);
        let text_start = img_shapes.iter().map(|&(_, h, w)| (h / 2).max(w / 2)).max().unwrap_or(0);
        let text_pos = Tensor::arange(txt_len, (Kind::Float, device)) + text_start as f64;
        rows.push(Tensor::cat(&inv.iter().map(|i| angles(&text_pos, i)).collect::<Vec<_>>(), 1));
        for (index, &(f, h, w)) in img_shapes.iter().enumerate() {
            let frames = Tensor::arange(f, (Kind::Float, device)) + index as f64;
            let axis = |pos: Tensor, inv: &Tensor, shape: [i64; 3]| {
                let a = angles(&pos, inv);
                let n = a.size()[1];
                a.view([shape[0], shape[1], shape[2], n]).expand([f, h, w, n], false)
            };
            let grid = Tensor::cat(
                &[
                    axis(frames, &inv[0], [f, 1, 1]),
                    axis(centred(h, device), &inv[1], [1, h, 1]),
                    axis(centred(w, device), &inv[2], [1, 1, w]),
                ],
                3,
            );
            rows.push(grid.reshape([f * h * w, half]));
        }
        let angle = Tensor::cat(&rows, 0).unsqueeze(1);
        RopeTables { cos: angle.cos(), sin: angle.sin() }
    }

    /// Tokens covered (text plus image).
    pub fn len(&self) -> i64 {
        self.cos.size()[0]
    }

    /// Whether the tables cover no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates `x [B, L, heads, head_dim]` (L = [`Self::len`]); computed in fp32 and returned in
    /// `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let pairs = x.to_kind(Kind::Float).view([s[0], s[1], s[2], s[3] / 2, 2]);
        let re = pairs.select(4, 0);
        let im = pairs.select(4, 1);
        let out_re = &re * &self.cos - &im * &self.sin; // (a + ib)(c + is)
        let out_im = re * &self.sin + im * &self.cos;
        Tensor::stack(&[out_re, out_im], 4).view([s[0], s[1], s[2], s[3]]).to_kind(x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_reference_layout() {
        // Axes 2/2/2: one frequency per axis, so the angle is the position itself.
        let t = RopeTables::new([2, 2, 2], &[(1, 3, 4), (1, 2, 2)], 2, Device::Cpu);
        assert_eq!(t.len(), 2 + 12 + 4);
        let angle = |row: i64| -> Vec<f64> {
            let (c, s) = (t.cos.get(row).get(0), t.sin.get(row).get(0));
            let a = s.atan2(&c);
            (0..3).map(|k| (a.double_value(&[k]) * 1e4).round() / 1e4).collect()
        };
        // Text starts after max(3/2, 4/2, 2/2, 2/2) = 2.
        assert_eq!(angle(0), [2.0, 2.0, 2.0]);
        assert_eq!(angle(1), [3.0, 3.0, 3.0]);
        // First image, 3 rows (-2, -1, 0) × 4 cols (-2, -1, 0, 1), frame 0.
        assert_eq!(angle(2), [0.0, -2.0, -2.0]);
        assert_eq!(angle(2 + 4 * 2 + 3), [0.0, 0.0, 1.0]);
        // Second image: frame 1, rows/cols (-1, 0).
        assert_eq!(angle(14), [1.0, -1.0, -1.0]);
        assert_eq!(angle(17), [1.0, 0.0, 0.0]);
    }

    #[test]
    fn rotation_is_complex_multiplication_of_interleaved_pairs() {
        let t = RopeTables::new([2, 2, 2], &[(1, 1, 1)], 1, Device::Cpu);
        let x =
            Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([1, 1, 1, 6]).repeat([1, 2, 1, 1]);
        let got = t.apply(&x);
        // Text token: angle 0 text start (= max(0, 0)), so the identity.
        let text: Vec<f32> = got.get(0).get(0).get(0).try_into().unwrap();
        assert_eq!(text, [1., 2., 3., 4., 5., 6.]);
        // Image token at (0, -1, -1): the height/width pairs rotate by -1 rad.
        let img: Vec<f32> = got.get(0).get(1).get(0).try_into().unwrap();
        let (c, s) = ((-1f32).cos(), (-1f32).sin());
        assert!((img[2] - (3. * c - 4. * s)).abs() < 1e-6);
        assert!((img[3] - (3. * s + 4. * c)).abs() < 1e-6);
        assert_eq!(&img[..2], &[1., 2.]);
    }
}

//! Wan2.1's 3D rotary position embedding (diffusers `WanRotaryPosEmbed`).
//!
//! The head dim `d` is split into a frame part `d − 4·(d/6)` and row/column parts `2·(d/6)` each
//! (44/42/42 for d = 128). Each axis has its own frequencies `10000^(−2j/axis_dim)` and rotates
//! interleaved pairs `(x[2j], x[2j+1])`. Tables are computed in fp64 and stored as fp32
//! `[L, d/2]` per latent grid, `L = F·H·W` tokens in frame-major order.

use tch::{Device, Kind, Tensor};

/// cos/sin tables for one token grid.
#[derive(Debug)]
pub struct RopeTables {
    /// `[1, L, 1, d/2]`, fp32.
    cos: Tensor,
    /// `[1, L, 1, d/2]`, fp32.
    sin: Tensor,
}

impl RopeTables {
    /// Tables for a `frames × rows × cols` token grid and head dim `head_dim`.
    pub fn new(head_dim: i64, grid: [i64; 3], device: Device) -> Self {
        let hw = 2 * (head_dim / 6);
        let axes = [head_dim - 2 * hw, hw, hw];
        let opts = (Kind::Double, Device::Cpu);
        let mut angles = Vec::with_capacity(3);
        for (axis, (&axis_dim, &n)) in axes.iter().zip(grid.iter()).enumerate() {
            let j = Tensor::arange_start_step(0, axis_dim, 2, opts);
            let inv_freq = (j / axis_dim as f64 * 10000f64.ln()).exp().reciprocal();
            let pos = Tensor::arange(n, opts);
            let a = pos.outer(&inv_freq); // [n, axis_dim/2]
            let mut shape = vec![1i64, 1, 1, axis_dim / 2];
            shape[axis] = n;
            angles.push(
                a.view(shape.as_slice()).expand([grid[0], grid[1], grid[2], axis_dim / 2], false),
            );
        }
        let angle =
            Tensor::cat(&angles, 3).reshape([1, grid.iter().product::<i64>(), 1, head_dim / 2]);
        let to = |t: Tensor| t.to_kind(Kind::Float).to_device(device).contiguous();
        RopeTables { cos: to(angle.cos()), sin: to(angle.sin()) }
    }

    /// Rotates `x [B, L, heads, d]`; computed in fp32 and returned in `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let pairs = x.to_kind(Kind::Float).view([s[0], s[1], s[2], s[3] / 2, 2]);
        let x1 = pairs.select(4, 0);
        let x2 = pairs.select(4, 1);
        let re = &x1 * &self.cos - &x2 * &self.sin;
        let im = x1 * &self.sin + x2 * &self.cos;
        Tensor::stack(&[re, im], 4).view([s[0], s[1], s[2], s[3]]).to_kind(x.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_matches_complex_multiplication() {
        let t = RopeTables::new(12, [2, 3, 2], Device::Cpu);
        let x = Tensor::randn([1, 12, 1, 12], (Kind::Float, Device::Cpu));
        let got = t.apply(&x);
        // Token (f=1, r=2, c=1) is index 1·6 + 2·2 + 1 = 11. Axis dims: 4 (frame), 4, 4.
        let xs: Vec<f32> = x.get(0).get(11).get(0).try_into().unwrap();
        let gs: Vec<f32> = got.get(0).get(11).get(0).try_into().unwrap();
        let freqs = [
            (1.0, 4.0, 0),
            (1.0, 4.0, 2),
            (2.0, 4.0, 0),
            (2.0, 4.0, 2),
            (1.0, 4.0, 0),
            (1.0, 4.0, 2),
        ];
        for (p, &(pos, axis_dim, j)) in freqs.iter().enumerate() {
            let a = pos * 10000f64.powf(-(j as f64) / axis_dim);
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x1, x2) = (xs[2 * p], xs[2 * p + 1]);
            assert!((gs[2 * p] - (x1 * c - x2 * s)).abs() < 1e-5, "pair {p}");
            assert!((gs[2 * p + 1] - (x1 * s + x2 * c)).abs() < 1e-5, "pair {p}");
        }
    }
}

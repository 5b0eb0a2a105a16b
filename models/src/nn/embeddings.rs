//! Timestep embeddings.

use tch::{Kind, Tensor};

/// diffusers' `Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)`: for `t [B]`
/// returns fp32 `[B, channels]` = `[cos(t·ω_i), sin(t·ω_i)]`, `ω_i = 10000^(−i/(channels/2))`.
pub fn timestep_sinusoid(t: &Tensor, channels: i64) -> Tensor {
    let half = channels / 2;
    let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()));
    let exponent = exponent / half as f64; // exponent / (half_dim - downscale_freq_shift)
    let args = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

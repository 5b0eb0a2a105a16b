//! Qwen-Image latent plumbing around the transformer (diffusers
//! `pipelines/qwenimage/pipeline_qwenimage.py`): 2×2 packing of the VAE latents into tokens, the
//! initial noise, the timestep the transformer is fed, and norm-rescaled true CFG.
//!
//! Shapes: VAE latents `[B, 16, 1, h, w]` with `h = 2·(H // 16)`, `w = 2·(W // 16)` for a
//! `H×W` image ↔ tokens `[B, (h/2)·(w/2), 64]`, channel index `c·4 + dy·2 + dx`.

use tch::{Device, Kind, Tensor};

use crate::error::{Component, Error};

pub use crate::schedulers::calculate_shift;

/// Pixels per latent pixel (`vae_scale_factor`).
pub const VAE_SCALE: i64 = 8;
/// Latent channels (`z_dim`).
pub const LATENT_CHANNELS: i64 = 16;
/// Channels of a packed token (`in_channels` of the transformer).
pub const PACKED_CHANNELS: i64 = LATENT_CHANNELS * 4;

/// The latent height and width `(2·(H // 16), 2·(W // 16))` of an `H×W` image, as the pipeline
/// derives them (sizes that are not multiples of 16 are floored).
pub fn latent_size(height: i64, width: i64) -> Result<(i64, i64), Error> {
    let step = VAE_SCALE * 2;
    if height < step || width < step {
        return Err(Error::input(
            Component::Denoise,
            format!("image size {height}×{width} (H×W) is below the minimum {step}×{step}"),
        ));
    }
    Ok((2 * (height / step), 2 * (width / step)))
}

/// Packed noise tokens of an `H×W` image: `(H // 16)·(W // 16)` (the `image_seq_len` that sets
/// the scheduler's `mu`; edit condition images do not count).
pub fn image_seq_len(height: i64, width: i64) -> Result<usize, Error> {
    let (h, w) = latent_size(height, width)?;
    Ok(((h / 2) * (w / 2)) as usize)
}

/// `_pack_latents`: `[B, C, 1, h, w]` (h, w even) → `[B, (h/2)·(w/2), 4C]`.
pub fn pack(latents: &Tensor) -> Result<Tensor, Error> {
    let size = latents.size();
    let [b, c, 1, h, w] = size[..] else {
        return Err(Error::input(
            Component::Denoise,
            format!("latents to pack must be [B, C, 1, h, w], got {size:?}"),
        ));
    };
    if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
        return Err(Error::input(
            Component::Denoise,
            format!("latents to pack need an even, non-zero height and width, got {size:?}"),
        ));
    }
    Ok(latents.view([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([
        b,
        (h / 2) * (w / 2),
        c * 4,
    ]))
}

/// `_unpack_latents(tokens, height, width, 8)`: `[B, (h/2)·(w/2), 4C]` → `[B, C, 1, h, w]` for an
/// image of `height×width` pixels.
pub fn unpack(tokens: &Tensor, height: i64, width: i64) -> Result<Tensor, Error> {
    let (h, w) = latent_size(height, width)?;
    let size = tokens.size();
    let [b, n, c4] = size[..] else {
        return Err(Error::input(
            Component::Denoise,
            format!("tokens to unpack must be [B, N, 4C], got {size:?}"),
        ));
    };
    if n != (h / 2) * (w / 2) || c4 % 4 != 0 {
        return Err(Error::input(
            Component::Denoise,
            format!(
                "tokens {size:?} do not fit a {height}×{width} image: expected [B, {}, 4C]",
                (h / 2) * (w / 2)
            ),
        ));
    }
    Ok(tokens.view([b, h / 2, w / 2, c4 / 4, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([
        b,
        c4 / 4,
        1,
        h,
        w,
    ]))
}

/// The pipeline's initial noise for `count` images of `height×width`, packed `[count, seq, 64]`
/// on `device`: `randn((count, 1, 16, h, w), dtype=kind)` from
/// `torch.Generator("cpu").manual_seed(seed)`, as `prepare_latents` draws it for
/// `num_images_per_prompt = count` (one draw for the whole batch, in the prompt dtype: bf16 noise
/// is drawn in bf16, which is not fp32 noise rounded).
pub fn initial_noise(
    seed: u64,
    count: i64,
    height: i64,
    width: i64,
    kind: Kind,
    device: Device,
) -> Result<Tensor, Error> {
    let (h, w) = latent_size(height, width)?;
    if count < 1 {
        return Err(Error::input(
            Component::Denoise,
            format!("the number of images must be at least 1, got {count}"),
        ));
    }
    let noise = {
        crate::device::with_cpu_seed(seed, || {
            Tensor::randn([count, 1, LATENT_CHANNELS, h, w], (kind, Device::Cpu))
        })
    };
    // [n, 1, 16, h, w] has the memory layout of [n, 16, 1, h, w].
    Ok(pack(&noise.view([count, LATENT_CHANNELS, 1, h, w]))?.to_device(device))
}

/// The transformer's `timestep` input for scheduler timestep `t`: `t.expand(batch).to(kind) / 1000`
/// (the cast comes before the division, in `kind`'s arithmetic).
pub fn timestep_input(t: f64, batch: i64, kind: Kind, device: Device) -> Tensor {
    Tensor::from_slice(&[t as f32]).expand([batch], false).to_kind(kind).to_device(device) / 1000.0
}

/// Norm-rescaled true CFG: `comb = uncond + scale·(cond − uncond)`, returned as
/// `comb · ‖cond‖ / ‖comb‖` with L2 norms over the last (channel) axis, per token, in the
/// inputs' dtype.
pub fn true_cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor, Error> {
    if cond.size() != uncond.size() || cond.kind() != uncond.kind() {
        return Err(Error::input(
            Component::Denoise,
            format!(
                "cond {:?} {:?} and uncond {:?} {:?} predictions differ in shape or dtype",
                cond.size(),
                cond.kind(),
                uncond.size(),
                uncond.kind()
            ),
        ));
    }
    let comb = uncond + (cond - uncond) * scale;
    // `torch.norm(x, dim=-1, keepdim=True)` is `linalg.vector_norm(x, 2, -1, keepdim=True)`.
    let norm = |x: &Tensor| x.linalg_norm(2.0, [-1i64].as_slice(), true, None::<Kind>);
    let ratio = norm(cond) / norm(&comb);
    Ok(comb * ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip() {
        let x = Tensor::randn([2, 16, 1, 6, 10], (Kind::Float, Device::Cpu));
        let t = pack(&x).unwrap();
        assert_eq!(t.size(), [2, 15, 64]);
        // Token (row 1, col 2), channel c·4 + dy·2 + dx.
        let (c, dy, dx) = (5, 1, 0);
        let want = x.double_value(&[1, c, 0, 2 + dy, 4 + dx]);
        assert_eq!(t.double_value(&[1, 5 + 2, c * 4 + dy * 2 + dx]), want);
        assert!(unpack(&t, 48, 80).unwrap().equal(&x));
        // Sizes are floored to multiples of 16, as the pipeline does.
        assert!(unpack(&t, 63, 95).unwrap().equal(&x));
        assert!(unpack(&t, 64, 80).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(latent_size(1328, 1328).unwrap(), (166, 166));
        assert_eq!(image_seq_len(1024, 1024).unwrap(), 4096);
        assert_eq!(image_seq_len(928, 1664).unwrap(), 6032);
        assert_eq!(image_seq_len(70, 100).unwrap(), 4 * 6);
        assert!(image_seq_len(8, 64).is_err());
        let odd = Tensor::zeros([1, 16, 1, 3, 4], (Kind::Float, Device::Cpu));
        assert!(pack(&odd).is_err());
    }

    #[test]
    fn true_cfg_rescales_to_the_cond_norm() {
        let cond = Tensor::randn([1, 7, 64], (Kind::Float, Device::Cpu));
        let uncond = Tensor::randn([1, 7, 64], (Kind::Float, Device::Cpu));
        let out = true_cfg(&cond, &uncond, 4.0).unwrap();
        let n = |x: &Tensor| x.square().sum_dim_intlist([-1i64].as_slice(), false, Kind::Float);
        assert!(n(&out).allclose(&n(&cond), 1e-5, 1e-5, false));
        assert!(true_cfg(&cond, &uncond.narrow(1, 0, 3), 4.0).is_err());
    }
}

//! PIL-exact resampling of 8-bit RGB images, as `PIL.Image.resize` does it.
//!
//! Reference: Pillow `src/libImaging/Resample.c` (`ImagingResample` for 8-bit images): the
//! filter's support is widened by the downscale factor, per-output-pixel coefficients are
//! computed in double precision, normalised to sum 1, converted to fixed point with
//! [`PRECISION_BITS`] fraction bits, and the image is filtered in two separable passes —
//! horizontal first, then vertical — each rounding and clipping to 8 bits. A pass whose size does
//! not change is skipped; resizing to the same size returns a copy. Both the Qwen2-VL image
//! processor (bicubic) and diffusers' `VaeImageProcessor` (Lanczos) resize through Pillow, so the
//! exact integer arithmetic matters for bit-identical inputs.

use crate::error::{Component, Error};

/// Fraction bits of the fixed-point coefficients (`32 - 8 - 2`: 8 bits of result, 2 for overflow
/// and sign).
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`HWC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps an `HWC` RGB buffer, checking its length.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, Error> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(Error::Input {
                component: Component::ImageProcessor,
                message: format!(
                    "RGB image {width}x{height} needs {} bytes, got {}",
                    width * height * 3,
                    data.len()
                ),
            });
        }
        Ok(Self { width, height, data })
    }
}

/// Pillow's resampling filters (the ones x2v uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle filter, support 1 (`Image.BILINEAR`).
    Bilinear,
    /// Keys cubic with `a = -0.5`, support 2 (`Image.BICUBIC`).
    Bicubic,
    /// Truncated sinc windowed by sinc, `a = 3` (`Image.LANCZOS`).
    Lanczos,
}

impl Filter {
    /// The filter for a `PIL.Image.Resampling` number (2 bilinear, 3 bicubic, 1 Lanczos).
    pub fn from_pil(resample: i64) -> Option<Self> {
        match resample {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fixed-point coefficients of one pass: for output pixel `i`, `len[i]` taps starting at input
/// pixel `start[i]`, weights `weights[i * ksize ..]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc` for resampling `in_size`
/// pixels (the whole line) to `out_size`.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        ksize,
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        weights: vec![0; out_size * ksize],
    };
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let n = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut c.weights[xx * ksize..(xx + 1) * ksize];
        for (dst, &w) in row.iter_mut().zip(&k).take(n) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *dst = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        c.start.push(xmin as usize);
        c.len.push(n);
    }
    c
}

/// Pillow's `clip8`: drops the fraction bits and clamps to `0..=255`.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Filters along one axis. `lines` lines of `in_len` pixels (stride `in_step` bytes between
/// neighbouring pixels, `in_line` bytes between lines) become lines of `out_len` pixels.
fn pass(
    src: &[u8],
    in_step: usize,
    in_line: usize,
    lines: usize,
    c: &Coeffs,
    out_step: usize,
    out_line: usize,
) -> Vec<u8> {
    let out_len = c.start.len();
    let mut out = vec![0u8; lines * out_len * 3];
    let round = 1i32 << (PRECISION_BITS - 1);
    for line in 0..lines {
        for o in 0..out_len {
            let w = &c.weights[o * c.ksize..o * c.ksize + c.len[o]];
            let mut acc = [round; 3];
            for (t, &wt) in w.iter().enumerate() {
                let base = line * in_line + (c.start[o] + t) * in_step;
                for (ch, a) in acc.iter_mut().enumerate() {
                    *a += i32::from(src[base + ch]) * wt;
                }
            }
            let base = line * out_line + o * out_step;
            for (ch, a) in acc.iter().enumerate() {
                out[base + ch] = clip8(*a);
            }
        }
    }
    out
}

/// `PIL.Image.resize((width, height), resample=filter)` of an RGB image.
pub fn resize(
    image: &RgbImage,
    width: usize,
    height: usize,
    filter: Filter,
) -> Result<RgbImage, Error> {
    if width == 0 || height == 0 {
        return Err(Error::Input {
            component: Component::ImageProcessor,
            message: format!("cannot resize to {width}x{height}"),
        });
    }
    let mut cur = image.clone();
    if width != cur.width {
        let c = coeffs(cur.width, width, filter);
        let data = pass(&cur.data, 3, cur.width * 3, cur.height, &c, 3, width * 3);
        cur = RgbImage { width, height: cur.height, data };
    }
    if height != cur.height {
        let c = coeffs(cur.height, height, filter);
        // Vertical: the "lines" are columns; neighbouring taps are one row apart.
        let row = cur.width * 3;
        let data = pass(&cur.data, row, 3, cur.width, &c, row, 3);
        cur = RgbImage { width: cur.width, height, data };
    }
    Ok(cur)
}

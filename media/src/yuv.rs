//! RGB to YUV 4:2:0 (I420) in BT.601 limited range, the matrix H.264 decoders assume when a
//! stream says nothing else (the SPS also signals it explicitly, see `h264.rs`).
//!
//! Integer arithmetic only, so the same frame gives the same bytes on every machine. Chroma is the
//! mean of each 2x2 block.

// Coefficients scaled by 2^16 / 255 from the BT.601 studio-swing equations:
//   Y  = 16  + ( 65.481 R + 128.553 G +  24.966 B) / 255
//   Cb = 128 + (-37.797 R -  74.203 G + 112.000 B) / 255
//   Cr = 128 + (112.000 R -  93.786 G -  18.214 B) / 255
// Each chroma row sums to zero so grey stays exactly 128.
const YR: i32 = 16829;
const YG: i32 = 33039;
const YB: i32 = 6416;
const UR: i32 = -9714;
const UG: i32 = -19070;
const UB: i32 = 28784;
const VR: i32 = 28784;
const VG: i32 = -24103;
const VB: i32 = -4681;

/// Converts one RGB frame (`height * width * 3` bytes) to a planar I420 buffer
/// (`Y` then `U` then `V`, `width * height * 3 / 2` bytes). Sides must be even.
pub(crate) fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    debug_assert!(width.is_multiple_of(2) && height.is_multiple_of(2));
    debug_assert_eq!(rgb.len(), width * height * 3);
    let luma_len = width * height;
    let chroma_len = luma_len / 4;
    let mut out = vec![0u8; luma_len + 2 * chroma_len];
    let (y_plane, chroma) = out.split_at_mut(luma_len);
    let (u_plane, v_plane) = chroma.split_at_mut(chroma_len);

    let row_len = width * 3;
    for cy in 0..height / 2 {
        let top = &rgb[2 * cy * row_len..(2 * cy + 1) * row_len];
        let bottom = &rgb[(2 * cy + 1) * row_len..(2 * cy + 2) * row_len];
        let (y_top, y_bottom) = y_plane[2 * cy * width..(2 * cy + 2) * width].split_at_mut(width);
        let u_row = &mut u_plane[cy * width / 2..(cy + 1) * width / 2];
        let v_row = &mut v_plane[cy * width / 2..(cy + 1) * width / 2];
        for cx in 0..width / 2 {
            let (mut rs, mut gs, mut bs) = (0, 0, 0);
            for (row, y_row) in [(top, &mut *y_top), (bottom, &mut *y_bottom)] {
                for x in [2 * cx, 2 * cx + 1] {
                    let (r, g, b) =
                        (row[3 * x] as i32, row[3 * x + 1] as i32, row[3 * x + 2] as i32);
                    y_row[x] = luma(r, g, b);
                    rs += r;
                    gs += g;
                    bs += b;
                }
            }
            u_row[cx] = chroma_of_sums(UR, UG, UB, rs, gs, bs);
            v_row[cx] = chroma_of_sums(VR, VG, VB, rs, gs, bs);
        }
    }
    out
}

fn luma(r: i32, g: i32, b: i32) -> u8 {
    // Always within 16..=235, so the cast cannot wrap.
    ((YR * r + YG * g + YB * b + (16 << 16) + (1 << 15)) >> 16) as u8
}

/// Chroma from the sums of a 2x2 block: the sums carry a factor 4, hence the shift by 18.
fn chroma_of_sums(cr: i32, cg: i32, cb: i32, rs: i32, gs: i32, bs: i32) -> u8 {
    // Always within 16..=240 (the offset keeps the sum positive), so the cast cannot wrap.
    ((cr * rs + cg * gs + cb * bs + (128 << 18) + (1 << 17)) >> 18) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: usize, height: usize, rgb: [u8; 3]) -> Vec<u8> {
        rgb.iter().copied().cycle().take(width * height * 3).collect()
    }

    fn planes(yuv: &[u8], width: usize, height: usize) -> (&[u8], &[u8], &[u8]) {
        let (y, c) = yuv.split_at(width * height);
        let (u, v) = c.split_at(width * height / 4);
        (y, u, v)
    }

    #[test]
    fn reference_colours_match_bt601_limited_range() {
        // (RGB, Y, Cb, Cr) from the BT.601 equations, rounded.
        let cases = [
            ([0, 0, 0], 16, 128, 128),
            ([255, 255, 255], 235, 128, 128),
            ([128, 128, 128], 126, 128, 128),
            ([255, 0, 0], 81, 90, 240),
            ([0, 255, 0], 145, 54, 34),
            ([0, 0, 255], 41, 240, 110),
        ];
        for (rgb, y, u, v) in cases {
            let yuv = rgb_to_i420(&solid(4, 2, rgb), 4, 2);
            let (yp, up, vp) = planes(&yuv, 4, 2);
            assert!(yp.iter().all(|&s| s == y), "{rgb:?}: Y {yp:?} want {y}");
            assert!(up.iter().all(|&s| s == u), "{rgb:?}: U {up:?} want {u}");
            assert!(vp.iter().all(|&s| s == v), "{rgb:?}: V {vp:?} want {v}");
        }
    }

    #[test]
    fn chroma_is_the_mean_of_each_block() {
        // Left block red, right block blue: each chroma sample sees only its own block.
        let mut rgb = Vec::new();
        for _ in 0..2 {
            rgb.extend_from_slice(&[255, 0, 0, 255, 0, 0, 0, 0, 255, 0, 0, 255]);
        }
        let yuv = rgb_to_i420(&rgb, 4, 2);
        let (_, u, v) = planes(&yuv, 4, 2);
        assert_eq!(u, &[90, 240]);
        assert_eq!(v, &[240, 110]);
    }
}

//! `encode_mp4`: RGB frames to an H.264 MP4.

use crate::{Frames, MediaError, h264, mux};

/// The highest frame rate [`encode_mp4`] accepts.
pub const MAX_FPS: u32 = 240;

/// Bits per pixel per frame for the default bitrate: enough that smooth generated video shows no
/// blocking at x2v's sizes (about 1.6 Mbit/s for 832x480 at 16 fps).
const DEFAULT_BITS_PER_PIXEL: f64 = 0.25;
const MIN_DEFAULT_BITRATE: u32 = 200_000;

/// How [`encode_mp4`] encodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mp4Options {
    /// Target bitrate in bits per second. `None`: 0.25 bits per pixel per frame
    /// (`width * height * fps / 4`), at least 200 kbit/s.
    pub bitrate_bps: Option<u32>,
    /// Frames from one IDR picture (a seek point) to the next. `None`: two seconds of frames.
    pub keyframe_interval: Option<u32>,
}

impl Mp4Options {
    /// The bitrate used for a `width x height` video at `fps`.
    pub fn bitrate_for(&self, width: usize, height: usize, fps: u32) -> u32 {
        self.bitrate_bps.unwrap_or_else(|| {
            let bits = width as f64 * height as f64 * f64::from(fps) * DEFAULT_BITS_PER_PIXEL;
            (bits.round() as u32).max(MIN_DEFAULT_BITRATE)
        })
    }
}

/// Encodes `frames` as H.264 (constrained baseline, BT.601 limited range, 4:2:0) in an MP4 file
/// with `moov` first, at a constant `fps`.
///
/// Every frame becomes exactly one sample of duration `1/fps`, so the file lasts
/// `frames / fps` seconds. The output is a pure function of the input: the same frames and
/// options give the same bytes. Width and height must be even (x2v sizes are multiples of 16);
/// openh264 encodes at most 3840x2160 (or 2160x3840).
pub fn encode_mp4(frames: &Frames, fps: u32, opts: &Mp4Options) -> Result<Vec<u8>, MediaError> {
    if fps == 0 || fps > MAX_FPS {
        return Err(MediaError::Fps { fps, max: MAX_FPS });
    }
    let (width, height) = (frames.width, frames.height);
    if !width.is_multiple_of(2) || !height.is_multiple_of(2) {
        return Err(MediaError::OddSize { width, height });
    }
    let bitrate_bps = opts.bitrate_for(width, height, fps);
    if bitrate_bps == 0 {
        return Err(MediaError::Option {
            option: "bitrate_bps",
            value: "0".into(),
            allowed: "at least 1 (or unset for the default)",
        });
    }
    let keyframe_interval = opts.keyframe_interval.unwrap_or(2 * fps);
    if keyframe_interval == 0 {
        return Err(MediaError::Option {
            option: "keyframe_interval",
            value: "0".into(),
            allowed: "at least 1 (or unset for two seconds)",
        });
    }
    // Frames::new bounds both sides by MAX_SIDE, far below u16::MAX.
    let (w16, h16) = (width as u16, height as u16);

    let stream = h264::encode(frames, h264::Settings { fps, bitrate_bps, keyframe_interval })?;
    mux::mp4(&stream, w16, h16, fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(f: usize, h: usize, w: usize) -> Vec<u8> {
        vec![128; f * h * w * 3]
    }

    #[test]
    fn fps_zero_and_too_high_are_rejected() {
        let data = grey(1, 16, 16);
        let frames = Frames::new(&data, 1, 16, 16).unwrap();
        for fps in [0, MAX_FPS + 1] {
            let err = encode_mp4(&frames, fps, &Mp4Options::default()).unwrap_err();
            assert!(matches!(err, MediaError::Fps { .. }), "{err:?}");
            assert!(err.to_string().contains(&format!("got {fps}")), "{err}");
        }
    }

    #[test]
    fn odd_sides_are_rejected_with_both_values() {
        for (h, w) in [(16, 17), (15, 16)] {
            let data = grey(1, h, w);
            let frames = Frames::new(&data, 1, h, w).unwrap();
            let err = encode_mp4(&frames, 16, &Mp4Options::default()).unwrap_err();
            assert!(matches!(err, MediaError::OddSize { .. }), "{err:?}");
            assert!(err.to_string().contains(&format!("width={w} height={h}")), "{err}");
            assert!(err.is_invalid_input());
        }
    }

    #[test]
    fn zero_bitrate_and_keyframe_interval_are_rejected() {
        let data = grey(1, 16, 16);
        let frames = Frames::new(&data, 1, 16, 16).unwrap();
        let opts = Mp4Options { bitrate_bps: Some(0), ..Mp4Options::default() };
        let err = encode_mp4(&frames, 16, &opts).unwrap_err();
        assert!(err.to_string().contains("bitrate_bps"), "{err}");
        let opts = Mp4Options { keyframe_interval: Some(0), ..Mp4Options::default() };
        let err = encode_mp4(&frames, 16, &opts).unwrap_err();
        assert!(err.to_string().contains("keyframe_interval"), "{err}");
    }

    #[test]
    fn default_bitrate_scales_with_pixels_per_second() {
        let opts = Mp4Options::default();
        assert_eq!(opts.bitrate_for(832, 480, 16), 1_597_440);
        assert_eq!(opts.bitrate_for(16, 16, 16), MIN_DEFAULT_BITRATE);
        let fixed = Mp4Options { bitrate_bps: Some(123), ..Mp4Options::default() };
        assert_eq!(fixed.bitrate_for(832, 480, 16), 123);
    }
}

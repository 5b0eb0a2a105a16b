//! A borrowed, validated view of decoded RGB frames.

use crate::MediaError;

/// The largest height or width x2v encodes; H.264 levels and the `image` codecs stop well before
/// sizes where `usize` to `u32` conversions could overflow.
pub const MAX_SIDE: usize = 16384;

/// RGB frames, `uint8 [frames, height, width, 3]`, C order.
#[derive(Debug, Clone, Copy)]
pub struct Frames<'a> {
    /// `frames * height * width * 3` bytes.
    pub data: &'a [u8],
    /// Number of frames, at least 1.
    pub frames: usize,
    /// Rows per frame, at least 1.
    pub height: usize,
    /// Columns per frame, at least 1.
    pub width: usize,
}

impl<'a> Frames<'a> {
    /// Checks that every size is non-zero and at most [`MAX_SIDE`], and that `data` holds exactly
    /// `frames * height * width * 3` bytes.
    pub fn new(
        data: &'a [u8],
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<Self, MediaError> {
        check_size(frames, height, width)?;
        let expected = frames * frame_len(height, width);
        if data.len() != expected {
            return Err(MediaError::DataLength {
                actual: data.len(),
                expected,
                frames,
                height,
                width,
            });
        }
        Ok(Self { data, frames, height, width })
    }

    /// Frame `i` as `height * width * 3` bytes.
    ///
    /// # Panics
    /// When `i >= self.frames`.
    pub fn frame(&self, i: usize) -> &'a [u8] {
        assert!(i < self.frames, "frame index {i} out of range for {} frames", self.frames);
        let len = frame_len(self.height, self.width);
        &self.data[i * len..(i + 1) * len]
    }
}

/// Bytes in one RGB frame.
pub(crate) fn frame_len(height: usize, width: usize) -> usize {
    height * width * 3
}

/// Rejects zero sizes and sides over [`MAX_SIDE`].
pub(crate) fn check_size(frames: usize, height: usize, width: usize) -> Result<(), MediaError> {
    if frames == 0 || height == 0 || width == 0 {
        return Err(MediaError::ZeroSize { frames, height, width });
    }
    if height > MAX_SIDE || width > MAX_SIDE {
        return Err(MediaError::TooLarge { height, width, max: MAX_SIDE });
    }
    // MAX_SIDE bounds one frame; the frame count must not overflow the total either.
    if frames.checked_mul(frame_len(height, width)).is_none() {
        return Err(MediaError::TooLarge { height, width, max: MAX_SIDE });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_slices_are_in_order() {
        let data: Vec<u8> = (0..2 * 2 * 4 * 3).map(|v| v as u8).collect();
        let frames = Frames::new(&data, 2, 2, 4).unwrap();
        assert_eq!(frames.frame(0), &data[..24]);
        assert_eq!(frames.frame(1), &data[24..]);
    }

    #[test]
    fn wrong_length_names_both_lengths() {
        let err = Frames::new(&[0; 10], 1, 2, 2).unwrap_err();
        assert!(matches!(err, MediaError::DataLength { actual: 10, expected: 12, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("10 bytes") && msg.contains("needs 12"), "{msg}");
    }

    #[test]
    fn zero_sizes_are_rejected() {
        for (f, h, w) in [(0, 2, 2), (1, 0, 2), (1, 2, 0)] {
            let err = Frames::new(&[], f, h, w).unwrap_err();
            assert!(matches!(err, MediaError::ZeroSize { .. }), "{err:?}");
            assert!(err.to_string().contains(&format!("frames={f} height={h} width={w}")), "{err}");
            assert!(err.is_invalid_input());
        }
    }

    #[test]
    fn oversized_sides_are_rejected() {
        let err = Frames::new(&[], 1, 2, MAX_SIDE + 2).unwrap_err();
        assert!(matches!(err, MediaError::TooLarge { .. }), "{err:?}");
        assert!(err.to_string().contains(&(MAX_SIDE + 2).to_string()), "{err}");
    }
}

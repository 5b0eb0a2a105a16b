//! Previews of a video: a WebP thumbnail and a JPEG spritesheet.

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb, RgbImage};

use crate::still::{ImageFormat, encode_image};
use crate::{Frames, MediaError};

/// How [`spritesheet_jpeg`] lays out its grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpriteOptions {
    /// Most tiles per row.
    pub max_columns: usize,
    /// Most tiles in the sheet; frames are picked evenly from first to last.
    pub max_tiles: usize,
    /// Most pixels per tile row; frames narrower than this keep their width (never scaled up).
    pub tile_width: usize,
    /// JPEG quality, 1-100.
    pub quality: u8,
}

impl Default for SpriteOptions {
    /// Up to 10 columns x 2 rows of tiles at most 160 pixels wide, JPEG quality 80.
    fn default() -> Self {
        Self { max_columns: 10, max_tiles: 20, tile_width: 160, quality: 80 }
    }
}

/// The size of a grid drawn by [`spritesheet_jpeg`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpriteGrid {
    pub columns: usize,
    pub rows: usize,
    pub tiles: usize,
    pub tile_width: usize,
    pub tile_height: usize,
}

impl SpriteGrid {
    /// The grid for `frames` of `height x width` under `opts`.
    pub fn new(frames: &Frames, opts: &SpriteOptions) -> Result<Self, MediaError> {
        let positive = |option, value: usize| {
            if value == 0 {
                Err(MediaError::Option { option, value: "0".into(), allowed: "at least 1" })
            } else {
                Ok(())
            }
        };
        positive("max_columns", opts.max_columns)?;
        positive("max_tiles", opts.max_tiles)?;
        positive("tile_width", opts.tile_width)?;
        if !(1..=100).contains(&opts.quality) {
            return Err(MediaError::Option {
                option: "quality",
                value: opts.quality.to_string(),
                allowed: "1 to 100",
            });
        }
        let tiles = frames.frames.min(opts.max_tiles);
        let columns = tiles.min(opts.max_columns);
        let (tile_width, tile_height) =
            fit(frames.width, frames.height, opts.tile_width.min(frames.width));
        Ok(Self { columns, rows: tiles.div_ceil(columns), tiles, tile_width, tile_height })
    }

    /// Width and height of the whole sheet in pixels.
    pub fn size(&self) -> (usize, usize) {
        (self.columns * self.tile_width, self.rows * self.tile_height)
    }

    /// Which frame tile `i` shows: evenly spaced, first and last included.
    pub fn frame_of_tile(&self, i: usize, frames: usize) -> usize {
        if self.tiles == 1 { 0 } else { i * (frames - 1) / (self.tiles - 1) }
    }
}

/// The first frame as lossless WebP, scaled down (never up) so that its longer side is at most
/// `max_side`, keeping the aspect ratio.
pub fn thumbnail_webp(frames: &Frames, max_side: u32) -> Result<Vec<u8>, MediaError> {
    if max_side == 0 {
        return Err(MediaError::Option {
            option: "max_side",
            value: "0".into(),
            allowed: "at least 1",
        });
    }
    let longer = frames.width.max(frames.height);
    let target = longer.min(max_side as usize);
    let (width, height) = if frames.width >= frames.height {
        fit(frames.width, frames.height, target)
    } else {
        let (h, w) = fit(frames.height, frames.width, target);
        (w, h)
    };
    if (width, height) == (frames.width, frames.height) {
        return encode_image(frames.frame(0), width, height, ImageFormat::Webp, None);
    }
    let scaled = imageops::resize(
        &frame_image(frames, 0),
        width as u32,
        height as u32,
        FilterType::Triangle,
    );
    encode_image(scaled.as_raw(), width, height, ImageFormat::Webp, None)
}

/// A JPEG grid of evenly spaced frames, left to right then top to bottom; see [`SpriteOptions`]
/// and [`SpriteGrid`] for the layout. Cells past the last tile stay black.
pub fn spritesheet_jpeg(frames: &Frames, opts: &SpriteOptions) -> Result<Vec<u8>, MediaError> {
    let grid = SpriteGrid::new(frames, opts)?;
    let (sheet_width, sheet_height) = grid.size();
    let mut sheet = RgbImage::new(sheet_width as u32, sheet_height as u32);
    for i in 0..grid.tiles {
        let frame = frame_image(frames, grid.frame_of_tile(i, frames.frames));
        let tile = imageops::resize(
            &frame,
            grid.tile_width as u32,
            grid.tile_height as u32,
            FilterType::Triangle,
        );
        let (x, y) = ((i % grid.columns) * grid.tile_width, (i / grid.columns) * grid.tile_height);
        imageops::replace(&mut sheet, &tile, x as i64, y as i64);
    }
    let compression = 100 - opts.quality;
    encode_image(sheet.as_raw(), sheet_width, sheet_height, ImageFormat::Jpeg, Some(compression))
}

/// `(along, across)` scaled so that `along` becomes `target`, `across` rounded and at least 1.
fn fit(along: usize, across: usize, target: usize) -> (usize, usize) {
    let scaled = (across * target + along / 2) / along;
    (target, scaled.max(1))
}

/// Frame `i` as an image borrowing the frame's bytes.
fn frame_image<'a>(frames: &Frames<'a>, i: usize) -> ImageBuffer<Rgb<u8>, &'a [u8]> {
    // Frames::new checked the length and bounded both sides by MAX_SIDE.
    ImageBuffer::from_raw(frames.width as u32, frames.height as u32, frames.frame(i))
        .expect("a frame holds width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(f: usize, h: usize, w: usize, data: &[u8]) -> Frames<'_> {
        Frames::new(data, f, h, w).unwrap()
    }

    #[test]
    fn grid_for_a_wan_clip() {
        let data = vec![0; 81 * 48 * 83 * 3];
        let grid =
            SpriteGrid::new(&frames_of(81, 48, 83, &data), &SpriteOptions::default()).unwrap();
        assert_eq!((grid.columns, grid.rows, grid.tiles), (10, 2, 20));
        assert_eq!(
            (grid.tile_width, grid.tile_height),
            (83, 48),
            "narrow frames are not scaled up"
        );
        assert_eq!(grid.frame_of_tile(0, 81), 0);
        assert_eq!(grid.frame_of_tile(19, 81), 80);
    }

    #[test]
    fn short_clips_use_every_frame() {
        let data = vec![0; 3 * 480 * 832 * 3];
        let grid =
            SpriteGrid::new(&frames_of(3, 480, 832, &data), &SpriteOptions::default()).unwrap();
        assert_eq!((grid.columns, grid.rows, grid.tiles), (3, 1, 3));
        assert_eq!((grid.tile_width, grid.tile_height), (160, 92));
        assert_eq!((0..3).map(|i| grid.frame_of_tile(i, 3)).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn bad_options_name_the_option() {
        let data = vec![0; 2 * 2 * 3];
        let frames = frames_of(1, 2, 2, &data);
        let opts = SpriteOptions { tile_width: 0, ..SpriteOptions::default() };
        let err = SpriteGrid::new(&frames, &opts).unwrap_err();
        assert!(err.to_string().contains("tile_width"), "{err}");
        let opts = SpriteOptions { quality: 0, ..SpriteOptions::default() };
        assert!(SpriteGrid::new(&frames, &opts).unwrap_err().to_string().contains("quality"));
        let err = thumbnail_webp(&frames, 0).unwrap_err();
        assert!(err.to_string().contains("max_side"), "{err}");
    }

    #[test]
    fn fit_keeps_the_aspect_ratio() {
        assert_eq!(fit(832, 480, 160), (160, 92));
        assert_eq!(fit(1000, 1, 10), (10, 1));
    }
}

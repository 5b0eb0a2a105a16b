//! Single images: PNG, JPEG and WebP for image generation responses.

use std::fmt;
use std::str::FromStr;

use image::ExtendedColorType;
use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;

use crate::MediaError;
use crate::frames::{check_size, frame_len};

/// JPEG quality when the request sets no `output_compression`.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// An image file format x2v writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// The MIME type, e.g. `image/png`.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The usual file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The name used in requests (`output_format`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = MediaError;

    /// Accepts `png`, `jpeg`, `jpg` and `webp`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(ImageFormat::Png),
            "jpeg" | "jpg" => Ok(ImageFormat::Jpeg),
            "webp" => Ok(ImageFormat::Webp),
            _ => Err(MediaError::UnknownImageFormat(s.to_owned())),
        }
    }
}

/// Encodes one RGB image (`height * width * 3` bytes, C order).
///
/// `compression` is OpenAI's `output_compression`, 0-100, where higher means smaller files:
/// - JPEG: quality `100 - compression`, at least 1; `None` gives quality 90.
/// - PNG: zlib level `ceil(compression * 9 / 100)` (0 stores uncompressed); `None` gives the
///   encoder's balanced default. PNG stays lossless at every level.
/// - WebP: the pure-Rust encoder writes lossless WebP only, so `compression` is ignored.
pub fn encode_image(
    rgb: &[u8],
    width: usize,
    height: usize,
    format: ImageFormat,
    compression: Option<u8>,
) -> Result<Vec<u8>, MediaError> {
    check_size(1, height, width)?;
    let expected = frame_len(height, width);
    if rgb.len() != expected {
        return Err(MediaError::DataLength {
            actual: rgb.len(),
            expected,
            frames: 1,
            height,
            width,
        });
    }
    if let Some(c) = compression.filter(|&c| c > 100) {
        return Err(MediaError::Option {
            option: "output_compression",
            value: c.to_string(),
            allowed: "0 to 100",
        });
    }
    // check_size bounds both sides by MAX_SIDE.
    let (w, h) = (width as u32, height as u32);
    let mut out = Vec::new();
    let result = match format {
        ImageFormat::Png => {
            let level = compression
                .map_or(CompressionType::Default, |c| CompressionType::Level(png_level(c)));
            PngEncoder::new_with_quality(&mut out, level, FilterType::Adaptive).write_image(
                rgb,
                w,
                h,
                ExtendedColorType::Rgb8,
            )
        }
        ImageFormat::Jpeg => {
            let quality = compression.map_or(DEFAULT_JPEG_QUALITY, jpeg_quality);
            JpegEncoder::new_with_quality(&mut out, quality).write_image(
                rgb,
                w,
                h,
                ExtendedColorType::Rgb8,
            )
        }
        ImageFormat::Webp => {
            WebPEncoder::new_lossless(&mut out).write_image(rgb, w, h, ExtendedColorType::Rgb8)
        }
    };
    result.map_err(|source| MediaError::Image { format: format.as_str(), source })?;
    Ok(out)
}

/// JPEG quality for an `output_compression` of 0-100.
pub(crate) fn jpeg_quality(compression: u8) -> u8 {
    100u8.saturating_sub(compression).max(1)
}

/// zlib level 0-9 for an `output_compression` of 0-100.
fn png_level(compression: u8) -> u8 {
    (u16::from(compression.min(100)) * 9).div_ceil(100) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_parse_case_insensitively() {
        assert_eq!("png".parse::<ImageFormat>().unwrap(), ImageFormat::Png);
        assert_eq!("JPG".parse::<ImageFormat>().unwrap(), ImageFormat::Jpeg);
        assert_eq!("jpeg".parse::<ImageFormat>().unwrap(), ImageFormat::Jpeg);
        assert_eq!("WebP".parse::<ImageFormat>().unwrap(), ImageFormat::Webp);
        let err = "gif".parse::<ImageFormat>().unwrap_err();
        assert!(err.to_string().contains("\"gif\""), "{err}");
    }

    #[test]
    fn formats_name_their_mime_type_and_extension() {
        assert_eq!(ImageFormat::Jpeg.content_type(), "image/jpeg");
        assert_eq!(ImageFormat::Jpeg.extension(), "jpg");
        assert_eq!(ImageFormat::Webp.content_type(), "image/webp");
        assert_eq!(ImageFormat::Png.to_string(), "png");
    }

    #[test]
    fn compression_maps_to_quality_and_level() {
        assert_eq!(jpeg_quality(0), 100);
        assert_eq!(jpeg_quality(10), 90);
        assert_eq!(jpeg_quality(100), 1);
        assert_eq!(png_level(0), 0);
        assert_eq!(png_level(1), 1);
        assert_eq!(png_level(50), 5);
        assert_eq!(png_level(100), 9);
    }

    #[test]
    fn compression_over_100_is_rejected() {
        let err = encode_image(&[0; 12], 2, 2, ImageFormat::Jpeg, Some(101)).unwrap_err();
        assert!(err.to_string().contains("got 101"), "{err}");
    }

    #[test]
    fn wrong_length_is_rejected() {
        let err = encode_image(&[0; 11], 2, 2, ImageFormat::Png, None).unwrap_err();
        assert!(matches!(err, MediaError::DataLength { actual: 11, expected: 12, .. }), "{err:?}");
    }
}

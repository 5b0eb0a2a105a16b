//! The one error type of x2v-media.

/// Why a media encode (or an input video's decode) failed.
///
/// Every variant names the value that was wrong. [`MediaError::is_invalid_input`] tells callers
/// whether the request (sizes, fps, options) was at fault or the encoder itself failed, which is
/// how a service maps it to `InvalidRequest` or `Internal`.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// A size was zero.
    #[error(
        "frames, height and width must all be non-zero, got frames={frames} height={height} width={width}"
    )]
    ZeroSize { frames: usize, height: usize, width: usize },

    /// A side is beyond what x2v encodes.
    #[error("height and width must be at most {max}, got {height}x{width} (height x width)")]
    TooLarge { height: usize, width: usize, max: usize },

    /// The buffer does not hold `frames * height * width * 3` bytes.
    #[error(
        "RGB data has {actual} bytes, but frames={frames} height={height} width={width} needs {expected} (frames*height*width*3)"
    )]
    DataLength { actual: usize, expected: usize, frames: usize, height: usize, width: usize },

    /// H.264 with 4:2:0 chroma needs even sides.
    #[error("H.264 needs an even width and height, got width={width} height={height}")]
    OddSize { width: usize, height: usize },

    /// The frame rate is outside what the MP4 writer accepts.
    #[error("fps must be between 1 and {max}, got {fps}")]
    Fps { fps: u32, max: u32 },

    /// An option is out of its range.
    #[error("{option} must be {allowed}, got {value}")]
    Option { option: &'static str, value: String, allowed: &'static str },

    /// An image format name that x2v does not write.
    #[error("unknown image format {0:?}; expected one of png, jpeg, jpg, webp")]
    UnknownImageFormat(String),

    /// openh264 reported an error.
    #[error("H.264 encoder failed at frame {frame}: {message}")]
    H264 { frame: usize, message: String },

    /// openh264 produced no picture for a frame, which would shorten the video.
    #[error("H.264 encoder dropped frame {frame} (output had {nals} NAL units, none a picture)")]
    DroppedFrame { frame: usize, nals: usize },

    /// The encoded stream does not fit a 32-bit MP4 (over 4 GiB or too many ticks).
    #[error("encoded video is too large for the MP4 writer: {what} = {value}")]
    Mp4TooLarge { what: &'static str, value: u64 },

    /// An input video is not an MP4 with a readable H.264 track.
    #[error("{message}")]
    Mp4 { message: String },

    /// openh264 could not decode an input video's frame.
    #[error("H.264 decoding failed at frame {frame}: {message}")]
    H264Decode { frame: u32, message: String },

    /// The `image` crate failed to write an image.
    #[error("{format} encoding failed: {source}")]
    Image {
        format: &'static str,
        #[source]
        source: image::ImageError,
    },
}

impl MediaError {
    /// True when the caller's input or options caused the error, false when an encoder failed.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            MediaError::ZeroSize { .. }
            | MediaError::TooLarge { .. }
            | MediaError::DataLength { .. }
            | MediaError::OddSize { .. }
            | MediaError::Fps { .. }
            | MediaError::Option { .. }
            | MediaError::UnknownImageFormat(_)
            | MediaError::Mp4 { .. }
            | MediaError::H264Decode { .. } => true,
            MediaError::H264 { .. }
            | MediaError::DroppedFrame { .. }
            | MediaError::Mp4TooLarge { .. }
            | MediaError::Image { .. } => false,
        }
    }
}

//! x2v-media: turns decoded frames (`uint8 [F, H, W, 3]` RGB) into what clients download, and
//! clients' H.264 MP4s back into frames.
//!
//! - [`encode_mp4`]: H.264 in MP4, encoded by openh264 built from its bundled source and written
//!   by a small in-crate MP4 writer, so no system FFmpeg is needed. The output is deterministic:
//!   a disaggregated run and a single-process run of the same frames give the same file.
//! - [`thumbnail_webp`] and [`spritesheet_jpeg`]: previews of a video.
//! - [`encode_image`]: PNG, JPEG or WebP for image responses.
//! - [`probe_mp4`] and [`decode_mp4`]: an H.264 MP4 back to RGB frames (video-to-video inputs).
//!
//! Everything here is CPU-bound and synchronous; async callers run it on a blocking thread.
#![forbid(unsafe_code)]

mod decode;
mod error;
mod frames;
mod h264;
mod mux;
mod preview;
mod still;
mod video;
mod yuv;

pub use decode::{
    DecodedVideo, VideoInfo, decode_last_frame, decode_mp4, decode_mp4_exact, decode_mp4_frame,
    probe_mp4,
};
pub use error::MediaError;
pub use frames::{Frames, MAX_SIDE};
pub use preview::{SpriteGrid, SpriteOptions, spritesheet_jpeg, thumbnail_webp};
pub use still::{DEFAULT_JPEG_QUALITY, ImageFormat, encode_image};
pub use video::{MAX_FPS, Mp4Options, encode_mp4};

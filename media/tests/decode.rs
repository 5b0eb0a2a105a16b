//! `decode_mp4` / `probe_mp4` against ffmpeg: x2v's own MP4s and libx264 ones (High profile,
//! B-frames, another frame rate), decoded by both, and malformed inputs refused with a reason.

mod common;

use std::process::Command;

use common::{decode_rgb, moving_gradient, psnr};
use x2v_media::{Frames, MediaError, Mp4Options, decode_mp4, encode_mp4, probe_mp4};

fn x2v_mp4(frames: usize, height: usize, width: usize, fps: u32) -> Vec<u8> {
    let data = moving_gradient(frames, height, width);
    encode_mp4(&Frames::new(&data, frames, height, width).unwrap(), fps, &Mp4Options::default())
        .unwrap()
}

/// An MP4 from ffmpeg's libx264: `testsrc2` at `fps`, High profile with B-frames.
fn x264_mp4(frames: usize, width: usize, height: usize, fps: u32) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.mp4");
    let src = format!("testsrc2=size={width}x{height}:rate={fps}");
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "lavfi", "-i", &src, "-frames:v", &frames.to_string()])
        .args(["-c:v", "libx264", "-profile:v", "high", "-bf", "2", "-pix_fmt", "yuv420p"])
        .arg(&path)
        .output()
        .expect("run ffmpeg");
    assert!(out.status.success(), "ffmpeg failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&path).unwrap()
}

fn frame(data: &[u8], i: usize, h: usize, w: usize) -> &[u8] {
    &data[i * h * w * 3..(i + 1) * h * w * 3]
}

#[test]
fn x2v_videos_decode_like_ffmpeg_decodes_them() {
    let mp4 = x2v_mp4(17, 96, 128, 16);
    let info = probe_mp4(&mp4).unwrap();
    assert_eq!((info.width, info.height, info.frames), (128, 96, 17));
    assert!((info.duration_s - 17.0 / 16.0).abs() < 1e-3, "{info:?}");
    let ours = decode_mp4(&mp4, 16, 100).unwrap();
    assert_eq!((ours.frames, ours.height, ours.width), (17, 96, 128));
    let db = psnr(&ours.data, &decode_rgb(&mp4));
    assert!(db >= 40.0, "against ffmpeg's decode: PSNR {db:.2} dB");
    // The frames are the input's, not one repeated: the source's PSNR holds frame by frame.
    let src = moving_gradient(17, 96, 128);
    for i in [0, 8, 16] {
        let db = psnr(frame(&ours.data, i, 96, 128), frame(&src, i, 96, 128));
        assert!(db >= 30.0, "frame {i}: PSNR {db:.2} dB against the source");
    }
    // At most max_frames, from the start.
    let first = decode_mp4(&mp4, 16, 5).unwrap();
    assert_eq!(first.frames, 5);
    assert_eq!(&first.data[..], &ours.data[..first.data.len()]);
}

#[test]
fn libx264_b_frames_and_other_rates_are_resampled() {
    // 24 fps, 1 s, B-frames: the pictures come back in presentation order.
    let mp4 = x264_mp4(24, 96, 64, 24);
    let ffmpeg = decode_rgb(&mp4);
    let all = decode_mp4(&mp4, 24, 100).unwrap();
    assert_eq!(all.frames, 24);
    let db = psnr(&all.data, &ffmpeg);
    assert!(db >= 35.0, "against ffmpeg's decode: PSNR {db:.2} dB");
    // At 12 fps: every other frame; at 16 fps: the frame on screen at j/16 s.
    let half = decode_mp4(&mp4, 12, 100).unwrap();
    assert_eq!(half.frames, 12);
    for j in 0..12 {
        assert_eq!(frame(&half.data, j, 64, 96), frame(&all.data, 2 * j, 64, 96), "frame {j}");
    }
    let sixteen = decode_mp4(&mp4, 16, 100).unwrap();
    assert_eq!(sixteen.frames, 16);
    for j in 0..16 {
        let source = (j * 24) / 16; // the last frame starting at or before j/16 s
        assert_eq!(frame(&sixteen.data, j, 64, 96), frame(&all.data, source, 64, 96), "{j}");
    }
}

#[test]
fn what_is_not_an_h264_mp4_is_refused_with_a_reason() {
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("empty", vec![], "not a readable MP4"),
        ("text", b"hello, this is not a video at all".to_vec(), "MP4"),
        (
            "png",
            {
                let mut png = Vec::new();
                image::RgbImage::new(4, 4)
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .unwrap();
                png
            },
            "MP4",
        ),
    ];
    for (name, bytes, needle) in cases {
        let err = probe_mp4(&bytes).unwrap_err();
        assert!(matches!(err, MediaError::Mp4 { .. }), "{name}: {err:?}");
        assert!(err.is_invalid_input(), "{name}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
    // A truncated file: the header may still parse, the frames may not; either way an error.
    let mp4 = x2v_mp4(9, 64, 64, 8);
    for cut in [mp4.len() / 3, mp4.len() - 40] {
        let err = decode_mp4(&mp4[..cut], 8, 100).unwrap_err();
        assert!(err.is_invalid_input(), "cut at {cut}: {err:?}");
    }
    let err = decode_mp4(&mp4, 0, 10).unwrap_err();
    assert!(err.to_string().contains("positive"), "{err}");
}

#[test]
fn the_last_frame_is_the_last_shown() {
    for mp4 in [x2v_mp4(17, 64, 96, 16), x264_mp4(24, 96, 64, 24)] {
        let all = decode_mp4(&mp4, 1000, 10_000).unwrap();
        let info = probe_mp4(&mp4).unwrap();
        let (h, w) = (info.height as usize, info.width as usize);
        let last = x2v_media::decode_last_frame(&mp4).unwrap();
        assert_eq!((last.frames, last.height, last.width), (1, h, w));
        assert_eq!(&last.data[..], frame(&all.data, all.frames - 1, h, w));
    }
}

#[test]
fn one_frame_at_a_rate_is_that_frame_of_the_whole() {
    let mp4 = x264_mp4(24, 96, 64, 24);
    let at16 = decode_mp4(&mp4, 16, 100).unwrap();
    for i in [0, 5, 15] {
        let one = x2v_media::decode_mp4_frame(&mp4, 16, i).unwrap();
        assert_eq!(one.frames, 1);
        assert_eq!(&one.data[..], frame(&at16.data, i, 64, 96), "frame {i}");
    }
    let err = x2v_media::decode_mp4_frame(&mp4, 16, 16).unwrap_err();
    assert!(err.to_string().contains("16 frames at 16 fps, not frame 16"), "{err}");
}

#[test]
fn exactly_the_frames_needed_or_an_error_saying_how_many_there_are() {
    let mp4 = x2v_mp4(9, 64, 64, 8);
    let v = x2v_media::decode_mp4_exact(&mp4, 8, 9).unwrap();
    assert_eq!(v, decode_mp4(&mp4, 8, 9).unwrap());
    let err = x2v_media::decode_mp4_exact(&mp4, 8, 10).unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert!(err.to_string().contains("has 9 frames at 8 fps, fewer than the 10 needed"), "{err}");
}

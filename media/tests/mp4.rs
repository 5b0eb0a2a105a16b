//! `encode_mp4` checked from outside: ffprobe reads the container, ffmpeg decodes the pictures.

mod common;

use common::{decode_rgb, moving_gradient, probe_stream, psnr};
use x2v_media::{Frames, Mp4Options, encode_mp4};

fn encode(frames: usize, height: usize, width: usize, fps: u32) -> (Vec<u8>, Vec<u8>) {
    let data = moving_gradient(frames, height, width);
    let mp4 = encode_mp4(
        &Frames::new(&data, frames, height, width).unwrap(),
        fps,
        &Mp4Options::default(),
    )
    .unwrap();
    (data, mp4)
}

#[test]
fn ffprobe_sees_every_frame_at_the_requested_rate() {
    for (frames, height, width, fps) in
        [(17, 96, 128, 16), (9, 480, 832, 24), (1, 16, 16, 16), (33, 64, 48, 24)]
    {
        let (_, mp4) = encode(frames, height, width, fps);
        let file = tempfile::Builder::new().suffix(".mp4").tempfile().unwrap();
        std::fs::write(file.path(), &mp4).unwrap();
        let s = probe_stream(file.path());
        let case = format!("{frames} frames {width}x{height} at {fps} fps: {s:#}");
        assert_eq!(s["codec_name"], "h264", "{case}");
        assert_eq!(s["width"], width, "{case}");
        assert_eq!(s["height"], height, "{case}");
        assert_eq!(s["pix_fmt"], "yuv420p", "{case}");
        // BT.601 limited range, signalled in the SPS.
        assert_eq!(s["color_range"], "tv", "{case}");
        assert_eq!(s["color_space"], "smpte170m", "{case}");
        assert_eq!(s["profile"], "Constrained Baseline", "{case}");
        assert_eq!(s["nb_frames"], frames.to_string(), "{case}");
        assert_eq!(s["nb_read_frames"], frames.to_string(), "{case}");
        assert_eq!(s["r_frame_rate"], format!("{fps}/1"), "{case}");
        assert_eq!(s["avg_frame_rate"], format!("{fps}/1"), "{case}");
        let duration = frames as f64 / fps as f64;
        for d in [&s["duration"], &s["format"]["duration"]] {
            let d: f64 = d.as_str().unwrap().parse().unwrap();
            assert!((d - duration).abs() < 1e-3, "duration {d}, want {duration}: {case}");
        }
    }
}

#[test]
fn ffmpeg_decodes_close_to_the_input() {
    for (frames, height, width) in [(17, 96, 128), (5, 480, 832)] {
        let (data, mp4) = encode(frames, height, width, 16);
        let decoded = decode_rgb(&mp4);
        assert_eq!(decoded.len(), data.len(), "{width}x{height}: decoded size");
        let db = psnr(&data, &decoded);
        println!("{frames} frames {width}x{height}: {} bytes, PSNR {db:.2} dB", mp4.len());
        assert!(db >= 30.0, "{width}x{height}: PSNR {db:.2} dB < 30");
    }
}

#[test]
fn same_frames_give_the_same_bytes() {
    let (_, a) = encode(12, 96, 128, 16);
    let (_, b) = encode(12, 96, 128, 16);
    assert!(a == b, "two encodes of the same frames differ");
}

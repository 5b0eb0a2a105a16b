//! The MP4 layout read back with the `mp4` crate's parser; needs no ffmpeg.

mod common;

use std::io::Cursor;

use common::moving_gradient;
use x2v_media::{Frames, Mp4Options, encode_mp4};

fn read(mp4: &[u8]) -> mp4::Mp4Reader<Cursor<&[u8]>> {
    mp4::Mp4Reader::read_header(Cursor::new(mp4), mp4.len() as u64).expect("parse MP4")
}

/// NAL unit types of a length-prefixed sample; fails if the lengths do not tile the sample.
fn nal_types(sample: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at < sample.len() {
        let len = u32::from_be_bytes(sample[at..at + 4].try_into().unwrap()) as usize;
        types.push(sample[at + 4] & 0x1f);
        at += 4 + len;
    }
    assert_eq!(at, sample.len(), "NAL lengths overrun the sample");
    types
}

#[test]
fn samples_are_length_prefixed_with_idr_sync_points() {
    let (frames, height, width, fps) = (40, 64, 96, 16);
    let data = moving_gradient(frames, height, width);
    let opts = Mp4Options { keyframe_interval: Some(16), ..Mp4Options::default() };
    let mp4 = encode_mp4(&Frames::new(&data, frames, height, width).unwrap(), fps, &opts).unwrap();
    assert_eq!(&mp4[4..8], b"ftyp");
    let moov_at = u32::from_be_bytes(mp4[0..4].try_into().unwrap()) as usize;
    assert_eq!(&mp4[moov_at + 4..moov_at + 8], b"moov", "moov must precede mdat");

    let mut reader = read(&mp4);
    assert_eq!(reader.tracks().len(), 1);
    let track = &reader.tracks()[&1];
    assert_eq!(track.track_type().unwrap(), mp4::TrackType::Video);
    assert_eq!(track.box_type().unwrap().to_string(), "avc1");
    assert_eq!((track.width(), track.height()), (width as u16, height as u16));
    assert_eq!(track.timescale(), fps * 1000);
    assert_eq!(track.sample_count(), frames as u32);
    assert_eq!(track.sequence_parameter_set().unwrap()[0] & 0x1f, 7);
    assert_eq!(track.picture_parameter_set().unwrap()[0] & 0x1f, 8);

    for i in 0..frames as u32 {
        let sample = reader.read_sample(1, i + 1).unwrap().expect("sample");
        assert_eq!(sample.start_time, u64::from(i) * 1000, "sample {i}");
        assert_eq!(sample.duration, 1000, "sample {i}");
        assert_eq!(sample.rendering_offset, 0, "sample {i}");
        let types = nal_types(&sample.bytes);
        assert!(
            !types.iter().any(|t| matches!(t, 7 | 8)),
            "sample {i}: parameter sets in band: {types:?}"
        );
        assert_eq!(
            sample.is_sync,
            types.contains(&5),
            "sample {i}: sync flag vs NAL types {types:?}"
        );
        assert_eq!(sample.is_sync, i % 16 == 0, "sample {i}: IDR every 16 frames");
    }
}

#[test]
fn hard_content_at_a_tiny_bitrate_drops_no_frame() {
    let (frames, height, width) = (12, 96, 128);
    // Fresh noise every frame: the rate controller would love to skip frames here.
    let mut state = 0x2545_f491_u32;
    let data: Vec<u8> = (0..frames * height * width * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let opts = Mp4Options { bitrate_bps: Some(20_000), ..Mp4Options::default() };
    let mp4 = encode_mp4(&Frames::new(&data, frames, height, width).unwrap(), 24, &opts).unwrap();
    assert_eq!(read(&mp4).tracks()[&1].sample_count(), frames as u32);
}

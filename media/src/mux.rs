//! A minimal ISO BMFF (MP4) writer for one H.264 video track.
//!
//! The `moov` box goes before `mdat` ("fast start") so that browsers can play while downloading,
//! all samples form one chunk, and no clock values are written (creation and modification
//! times are zero), so equal streams give equal files. Layout:
//!
//! ```text
//! ftyp
//! moov: mvhd, trak: tkhd, mdia: mdhd, hdlr, minf: vmhd, dinf/dref, stbl: stsd/avc1/avcC, stts, stss, stsc, stsz, stco
//! mdat
//! ```

use crate::MediaError;
use crate::h264::Stream;

/// Ticks per frame; the track's timescale is `fps * TICKS_PER_FRAME`, so every duration is exact.
const TICKS_PER_FRAME: u32 = 1000;

const UNITY_MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// Wraps an encoded stream of `width x height` pictures at `fps` into an MP4 file.
pub(crate) fn mp4(
    stream: &Stream,
    width: u16,
    height: u16,
    fps: u32,
) -> Result<Vec<u8>, MediaError> {
    let too_large = |what, value: u64| MediaError::Mp4TooLarge { what, value };
    let timescale = fps * TICKS_PER_FRAME;
    let ticks = stream.sample_sizes.len() as u64 * u64::from(TICKS_PER_FRAME);
    let duration = u32::try_from(ticks).map_err(|_| too_large("duration in ticks", ticks))?;
    let track = Track { stream, width, height, timescale, duration };

    let ftyp = ftyp();
    // The chunk offset depends on the size of `moov`, which does not depend on the offset.
    let moov_len = moov(&track, 0).len();
    let offset = ftyp.len() + moov_len + 8;
    let mdat_len = 8 + stream.payload.len();
    let end = (offset + stream.payload.len()) as u64;
    if end > u64::from(u32::MAX) {
        return Err(too_large("file bytes", end));
    }
    let moov = moov(&track, offset as u32);

    let mut out = Vec::with_capacity(offset + stream.payload.len());
    out.extend_from_slice(&ftyp);
    out.extend_from_slice(&moov);
    out.extend_from_slice(&(mdat_len as u32).to_be_bytes());
    out.extend_from_slice(b"mdat");
    out.extend_from_slice(&stream.payload);
    Ok(out)
}

struct Track<'a> {
    stream: &'a Stream,
    width: u16,
    height: u16,
    timescale: u32,
    duration: u32,
}

/// Builds a box: appends size and type, lets `body` write the payload, then fills in the size.
fn write_box(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(kind);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// A "full box": a box whose payload starts with a version byte and 24 bits of flags.
fn write_full_box(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    write_box(out, kind, |out| {
        out.extend_from_slice(&((u32::from(version) << 24) | flags).to_be_bytes());
        body(out);
    });
}

fn u16s(out: &mut Vec<u8>, values: &[u16]) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_be_bytes()));
}

fn u32s(out: &mut Vec<u8>, values: &[u32]) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_be_bytes()));
}

fn ftyp() -> Vec<u8> {
    let mut out = Vec::new();
    write_box(&mut out, b"ftyp", |out| {
        out.extend_from_slice(b"isom");
        u32s(out, &[0x200]);
        out.extend_from_slice(b"isomiso2avc1mp41");
    });
    out
}

fn moov(track: &Track, chunk_offset: u32) -> Vec<u8> {
    let mut out = Vec::new();
    write_box(&mut out, b"moov", |out| {
        // The movie uses the track's timescale, so its duration is exact too.
        write_full_box(out, b"mvhd", 0, 0, |out| {
            u32s(out, &[0, 0, track.timescale, track.duration, 0x0001_0000]);
            u16s(out, &[0x0100, 0]);
            u32s(out, &[0, 0]);
            u32s(out, &UNITY_MATRIX);
            u32s(out, &[0; 6]);
            u32s(out, &[2]); // next track id
        });
        write_box(out, b"trak", |out| trak(out, track, chunk_offset));
    });
    out
}

fn trak(out: &mut Vec<u8>, track: &Track, chunk_offset: u32) {
    // Flags: enabled, in movie.
    write_full_box(out, b"tkhd", 0, 0x3, |out| {
        u32s(out, &[0, 0, 1, 0, track.duration, 0, 0]);
        u16s(out, &[0, 0, 0, 0]); // layer, alternate group, volume, reserved
        u32s(out, &UNITY_MATRIX);
        u32s(out, &[u32::from(track.width) << 16, u32::from(track.height) << 16]);
    });
    write_box(out, b"mdia", |out| {
        write_full_box(out, b"mdhd", 0, 0, |out| {
            u32s(out, &[0, 0, track.timescale, track.duration]);
            u16s(out, &[language_code(b"und"), 0]);
        });
        write_full_box(out, b"hdlr", 0, 0, |out| {
            u32s(out, &[0]);
            out.extend_from_slice(b"vide");
            u32s(out, &[0; 3]);
            out.extend_from_slice(b"VideoHandler\0");
        });
        write_box(out, b"minf", |out| {
            write_full_box(out, b"vmhd", 0, 0x1, |out| u16s(out, &[0; 4]));
            write_box(out, b"dinf", |out| {
                write_full_box(out, b"dref", 0, 0, |out| {
                    u32s(out, &[1]);
                    // Flag 1: the media is in this file.
                    write_full_box(out, b"url ", 0, 0x1, |_| {});
                });
            });
            write_box(out, b"stbl", |out| stbl(out, track, chunk_offset));
        });
    });
}

fn stbl(out: &mut Vec<u8>, track: &Track, chunk_offset: u32) {
    let stream = track.stream;
    let count = stream.sample_sizes.len() as u32;
    write_full_box(out, b"stsd", 0, 0, |out| {
        u32s(out, &[1]);
        write_box(out, b"avc1", |out| {
            out.extend_from_slice(&[0; 6]);
            u16s(out, &[1]); // data reference index
            u32s(out, &[0; 4]);
            u16s(out, &[track.width, track.height]);
            u32s(out, &[0x0048_0000, 0x0048_0000, 0]); // 72 dpi, 72 dpi, reserved
            u16s(out, &[1]); // frames per sample
            out.extend_from_slice(&[0; 32]); // compressor name
            u16s(out, &[0x0018, 0xffff]); // depth, pre-defined -1
            write_box(out, b"avcC", |out| avcc(out, &stream.sps, &stream.pps));
        });
    });
    // Constant frame rate: one run of equal durations.
    write_full_box(out, b"stts", 0, 0, |out| u32s(out, &[1, count, TICKS_PER_FRAME]));
    write_full_box(out, b"stss", 0, 0, |out| {
        let sync: Vec<u32> =
            (1..=count).zip(&stream.sync).filter(|(_, s)| **s).map(|(n, _)| n).collect();
        u32s(out, &[sync.len() as u32]);
        u32s(out, &sync);
    });
    // All samples in chunk 1.
    write_full_box(out, b"stsc", 0, 0, |out| u32s(out, &[1, 1, count, 1]));
    write_full_box(out, b"stsz", 0, 0, |out| {
        u32s(out, &[0, count]);
        u32s(out, &stream.sample_sizes);
    });
    write_full_box(out, b"stco", 0, 0, |out| u32s(out, &[1, chunk_offset]));
}

/// `AVCDecoderConfigurationRecord` (ISO/IEC 14496-15) with one SPS and one PPS.
fn avcc(out: &mut Vec<u8>, sps: &[u8], pps: &[u8]) {
    // SPS bytes 1..4 are profile_idc, the constraint flags and level_idc.
    out.extend_from_slice(&[1, sps[1], sps[2], sps[3]]);
    out.push(0xfc | 3); // 4-byte NAL lengths
    out.push(0xe0 | 1); // one SPS
    u16s(out, &[sps.len() as u16]);
    out.extend_from_slice(sps);
    out.push(1); // one PPS
    u16s(out, &[pps.len() as u16]);
    out.extend_from_slice(pps);
    if matches!(sps[1], 100 | 110 | 122 | 144) {
        // High profiles add chroma format 4:2:0, 8-bit luma and chroma, no SPS extensions.
        out.extend_from_slice(&[0xfc | 1, 0xf8, 0xf8, 0]);
    }
}

/// ISO 639-2/T code packed as three 5-bit letters.
fn language_code(code: &[u8; 3]) -> u16 {
    code.iter().fold(0, |acc, &c| (acc << 5) | u16::from(c - 0x60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Stream {
        Stream {
            sps: vec![0x67, 66, 0xc0, 30, 0xda],
            pps: vec![0x68, 0xce],
            payload: vec![0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x41],
            sample_sizes: vec![6, 5],
            sync: vec![true, false],
        }
    }

    /// Top-level boxes as (type, offset, size).
    fn top_level(file: &[u8]) -> Vec<(String, usize, usize)> {
        let mut boxes = Vec::new();
        let mut at = 0;
        while at < file.len() {
            let size = u32::from_be_bytes(file[at..at + 4].try_into().unwrap()) as usize;
            boxes.push((String::from_utf8_lossy(&file[at + 4..at + 8]).into_owned(), at, size));
            at += size;
        }
        assert_eq!(at, file.len(), "box sizes must tile the file");
        boxes
    }

    #[test]
    fn moov_comes_first_and_the_chunk_offset_points_at_the_samples() {
        let stream = stream();
        let file = mp4(&stream, 64, 48, 16).unwrap();
        let boxes = top_level(&file);
        let kinds: Vec<&str> = boxes.iter().map(|b| b.0.as_str()).collect();
        assert_eq!(kinds, ["ftyp", "moov", "mdat"]);

        let stco = file.windows(4).position(|w| w == b"stco").unwrap();
        let offset = u32::from_be_bytes(file[stco + 12..stco + 16].try_into().unwrap()) as usize;
        assert_eq!(&file[offset..], &stream.payload[..]);
    }

    #[test]
    fn language_und_packs_like_other_muxers() {
        assert_eq!(language_code(b"und"), 0x55c4);
    }

    #[test]
    fn only_idr_samples_are_sync_samples() {
        let file = mp4(&stream(), 64, 48, 24).unwrap();
        let stss = file.windows(4).position(|w| w == b"stss").unwrap();
        let body: Vec<u32> = file[stss + 8..stss + 16]
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(body, [1, 1], "one sync sample, sample 1");
    }
}

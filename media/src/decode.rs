//! H.264 MP4 in, RGB frames out: the input of video-to-video jobs and video extensions.
//!
//! The `mp4` crate reads the container (the first H.264 track, its `avcC` parameter sets and its
//! samples); each sample's length-prefixed NAL units become Annex B for openh264's decoder, which
//! returns pictures in presentation order. [`probe_mp4`] reads the header alone (a gateway's check
//! of an upload); [`decode_mp4`] decodes the frames a job needs, resampled to its frame rate.

use std::io::Cursor;

use openh264::OpenH264API;
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::formats::YUVSource;

use crate::{MAX_SIDE, MediaError};

/// What an MP4's H.264 track holds, from the container's header (nothing decoded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    pub width: u32,
    pub height: u32,
    /// Samples (pictures) in the track.
    pub frames: u32,
    /// The track's duration.
    pub duration_s: f64,
}

impl VideoInfo {
    /// Frames `fps` sampling yields from the start of the video: one at every `j / fps` seconds
    /// before its end (at least 1).
    pub fn frames_at(&self, fps: u32) -> u32 {
        let n = (self.duration_s * f64::from(fps) - 1e-6).ceil().max(1.0);
        n.min(f64::from(u32::MAX)) as u32
    }
}

/// RGB frames, `uint8 [frames, height, width, 3]`, C order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedVideo {
    pub data: Vec<u8>,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

fn bad(message: impl Into<String>) -> MediaError {
    MediaError::Mp4 { message: message.into() }
}

/// The container, with its first H.264 track's id and presentation times.
struct Track {
    reader: mp4::Mp4Reader<Cursor<Vec<u8>>>,
    id: u32,
    info: VideoInfo,
    /// Bytes before each NAL unit in a sample (1, 2 or 4).
    length_size: usize,
    /// Annex B parameter sets, given to the decoder first.
    parameter_sets: Vec<u8>,
}

fn annex_b(out: &mut Vec<u8>, nal: &[u8]) {
    out.extend_from_slice(&[0, 0, 0, 1]);
    out.extend_from_slice(nal);
}

fn open(bytes: &[u8]) -> Result<Track, MediaError> {
    // The mp4 crate trusts box sizes in places; a malformed file must be an error, not a crash.
    let owned = bytes.to_vec();
    let size = owned.len() as u64;
    let reader =
        std::panic::catch_unwind(move || mp4::Mp4Reader::read_header(Cursor::new(owned), size))
            .map_err(|_| bad("the MP4 container is malformed"))?
            .map_err(|e| bad(format!("not a readable MP4: {e}")))?;
    let track = reader
        .tracks()
        .values()
        .filter(|t| t.media_type().is_ok_and(|m| m == mp4::MediaType::H264))
        .min_by_key(|t| t.track_id())
        .ok_or_else(|| bad("the MP4 has no H.264 video track"))?;
    let avc1 = track.trak.mdia.minf.stbl.stsd.avc1.as_ref().expect("an H.264 track has avc1");
    let avcc = &avc1.avcc;
    let length_size = usize::from(avcc.length_size_minus_one & 3) + 1;
    if length_size == 3 {
        return Err(bad("the H.264 track's NAL length size is 3 bytes, which MP4 does not allow"));
    }
    let mut parameter_sets = Vec::new();
    for nal in avcc.sequence_parameter_sets.iter().chain(&avcc.picture_parameter_sets) {
        annex_b(&mut parameter_sets, &nal.bytes);
    }
    if avcc.sequence_parameter_sets.is_empty() || avcc.picture_parameter_sets.is_empty() {
        return Err(bad("the H.264 track has no SPS/PPS in its avcC box"));
    }
    let (width, height) = (u32::from(avc1.width), u32::from(avc1.height));
    if width == 0 || height == 0 || width as usize > MAX_SIDE || height as usize > MAX_SIDE {
        return Err(bad(format!("the video is {width}x{height}; sides must be 1..={MAX_SIDE}")));
    }
    let frames = track.sample_count();
    if frames == 0 {
        return Err(bad("the H.264 track has no frames"));
    }
    let info = VideoInfo { width, height, frames, duration_s: track.duration().as_secs_f64() };
    let id = track.track_id();
    Ok(Track { reader, id, info, length_size, parameter_sets })
}

/// The header of an H.264 MP4: its size, frame count and duration. Fails, naming why, when the
/// bytes are not an MP4 with an H.264 track.
pub fn probe_mp4(bytes: &[u8]) -> Result<VideoInfo, MediaError> {
    Ok(open(bytes)?.info)
}

impl Track {
    fn sample(&mut self, id: u32) -> Result<mp4::Mp4Sample, MediaError> {
        self.reader
            .read_sample(self.id, id)
            .map_err(|e| bad(format!("frame {id}: {e}")))?
            .ok_or_else(|| bad(format!("frame {id} is missing")))
    }

    /// Presentation times (track ticks) of every sample, in decode order.
    fn presentation_times(&mut self) -> Result<Vec<i64>, MediaError> {
        let mut times = Vec::with_capacity(self.info.frames as usize);
        for id in 1..=self.info.frames {
            let s = self.sample(id)?;
            times.push(s.start_time as i64 + i64::from(s.rendering_offset));
        }
        Ok(times)
    }

    /// A sample's NAL units in Annex B.
    fn annex_b(&self, sample: &[u8], id: u32) -> Result<Vec<u8>, MediaError> {
        let mut out = Vec::with_capacity(sample.len() + 16);
        let mut rest = sample;
        while !rest.is_empty() {
            if rest.len() < self.length_size {
                return Err(bad(format!("frame {id}: truncated NAL length")));
            }
            let len = rest[..self.length_size].iter().fold(0usize, |n, b| n << 8 | usize::from(*b));
            rest = &rest[self.length_size..];
            if len > rest.len() {
                return Err(bad(format!("frame {id}: a NAL unit runs past the sample")));
            }
            annex_b(&mut out, &rest[..len]);
            rest = &rest[len..];
        }
        Ok(out)
    }
}

/// For output frame `j` shown at `j / fps` seconds, the index (in presentation order) of the source
/// frame on screen then: the last one that starts at or before it.
fn pick_frames(sorted_times_s: &[f64], duration_s: f64, fps: u32, max_frames: usize) -> Vec<usize> {
    let start = sorted_times_s[0];
    let mut picks = Vec::new();
    let mut source = 0;
    for j in 0..max_frames {
        let t = start + j as f64 / f64::from(fps);
        if j > 0 && t >= start + duration_s - 1e-6 {
            break;
        }
        while source + 1 < sorted_times_s.len() && sorted_times_s[source + 1] <= t + 1e-6 {
            source += 1;
        }
        picks.push(source);
    }
    picks
}

/// Decodes an H.264 MP4 and returns its frames as shown at `fps` frames per second from its start,
/// at most `max_frames` (a source frame repeats when the source rate is lower, frames are skipped
/// when it is higher). The frames keep the video's size.
pub fn decode_mp4(bytes: &[u8], fps: u32, max_frames: usize) -> Result<DecodedVideo, MediaError> {
    if fps == 0 || max_frames == 0 {
        return Err(MediaError::Option {
            option: "fps and max_frames",
            value: format!("{fps}, {max_frames}"),
            allowed: "positive",
        });
    }
    decode_picked(bytes, |sorted, duration_s| pick_frames(sorted, duration_s, fps, max_frames))
}

/// [`decode_mp4`], refusing a video that has fewer than `frames` frames at `fps`.
pub fn decode_mp4_exact(bytes: &[u8], fps: u32, frames: usize) -> Result<DecodedVideo, MediaError> {
    let v = decode_mp4(bytes, fps, frames)?;
    if v.frames < frames {
        return Err(bad(format!(
            "the video has {} frames at {fps} fps, fewer than the {frames} needed",
            v.frames
        )));
    }
    Ok(v)
}

/// Frame `index` of an H.264 MP4 as shown at `fps` (frame `index` of [`decode_mp4`]'s answer),
/// as a one-frame video, decoding no further than that frame.
pub fn decode_mp4_frame(bytes: &[u8], fps: u32, index: usize) -> Result<DecodedVideo, MediaError> {
    if fps == 0 {
        return Err(MediaError::Option { option: "fps", value: "0".into(), allowed: "positive" });
    }
    let mut shown = 0;
    let out = decode_picked(bytes, |sorted, duration_s| {
        let picks = pick_frames(sorted, duration_s, fps, index + 1);
        shown = picks.len();
        vec![picks[picks.len() - 1]]
    })?;
    if shown <= index {
        return Err(bad(format!("the video has {shown} frames at {fps} fps, not frame {index}")));
    }
    Ok(out)
}

/// The last frame an H.264 MP4 shows (in presentation order), as a one-frame video.
pub fn decode_last_frame(bytes: &[u8]) -> Result<DecodedVideo, MediaError> {
    decode_picked(bytes, |sorted, _| vec![sorted.len() - 1])
}

/// Decodes the pictures `pick` chooses: given the presentation times in seconds (sorted) and the
/// duration, it returns presentation indices, ascending, repeats allowed.
fn decode_picked(
    bytes: &[u8],
    pick: impl FnOnce(&[f64], f64) -> Vec<usize>,
) -> Result<DecodedVideo, MediaError> {
    let mut track = open(bytes)?;
    let timescale = f64::from(track.reader.tracks()[&track.id].timescale().max(1));
    let times = track.presentation_times()?;
    let mut sorted: Vec<f64> = times.iter().map(|&t| t as f64 / timescale).collect();
    sorted.sort_by(f64::total_cmp);
    let picks = pick(&sorted, track.info.duration_s);
    let last_needed = *picks.last().expect("at least one frame is picked");

    let (w, h) = (track.info.width as usize, track.info.height as usize);
    let frame_len = w * h * 3;
    let mut data = vec![0u8; picks.len() * frame_len];
    // No flush after each picture: a stream with B-frames must keep its pictures for reordering
    // (flushing mid-stream breaks it); the rest comes out with `flush_remaining` at the end.
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| MediaError::H264Decode { frame: 0, message: e.to_string() })?;
    let mut shown = 0usize; // pictures out of the decoder so far, in presentation order
    let mut rgb = vec![0u8; frame_len];
    let mut take = |picture: &dyn YUVSource, shown: &mut usize| -> Result<(), MediaError> {
        if picture.dimensions() != (w, h) {
            return Err(bad(format!(
                "a picture is {}x{}, the track says {w}x{h}",
                picture.dimensions().0,
                picture.dimensions().1
            )));
        }
        if picks.contains(shown) {
            write_rgb(picture, &mut rgb);
            for (slot, _) in picks.iter().enumerate().filter(|(_, p)| **p == *shown) {
                data[slot * frame_len..(slot + 1) * frame_len].copy_from_slice(&rgb);
            }
        }
        *shown += 1;
        Ok(())
    };
    let headers = track.parameter_sets.clone();
    decoder
        .decode(&headers)
        .map_err(|e| MediaError::H264Decode { frame: 0, message: e.to_string() })?;
    for id in 1..=track.info.frames {
        if shown > last_needed {
            break;
        }
        let sample = track.sample(id)?;
        let nals = track.annex_b(&sample.bytes, id)?;
        let err = |e: openh264::Error| MediaError::H264Decode { frame: id, message: e.to_string() };
        if let Some(picture) = decoder.decode(&nals).map_err(err)? {
            take(&picture, &mut shown)?;
        }
    }
    if shown <= last_needed {
        let err = |e: openh264::Error| MediaError::H264Decode {
            frame: track.info.frames,
            message: e.to_string(),
        };
        for picture in decoder.flush_remaining().map_err(err)? {
            take(&picture, &mut shown)?;
        }
    }
    if shown <= last_needed {
        return Err(bad(format!(
            "the decoder returned {shown} pictures of the {} frames the video lists",
            track.info.frames
        )));
    }
    Ok(DecodedVideo { data, frames: picks.len(), height: h, width: w })
}

/// I420 → packed RGB, BT.601 limited range (how x2v's encoder tags its streams).
fn write_rgb(picture: &dyn YUVSource, out: &mut [u8]) {
    let (w, h) = picture.dimensions();
    let (sy, su, sv) = picture.strides();
    let (y, u, v) = (picture.y(), picture.u(), picture.v());
    for row in 0..h {
        for col in 0..w {
            let yy = f32::from(y[row * sy + col]) - 16.0;
            let cb = f32::from(u[(row / 2) * su + col / 2]) - 128.0;
            let cr = f32::from(v[(row / 2) * sv + col / 2]) - 128.0;
            let px = &mut out[(row * w + col) * 3..][..3];
            let c = |x: f32| x.round().clamp(0.0, 255.0) as u8;
            px[0] = c(1.164 * yy + 1.596 * cr);
            px[1] = c(1.164 * yy - 0.392 * cb - 0.813 * cr);
            px[2] = c(1.164 * yy + 2.017 * cb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_picked_at_the_output_rate() {
        // 10 frames at 10 fps (1 s), sampled at 5 fps: every other frame.
        let t: Vec<f64> = (0..10).map(|i| i as f64 / 10.0).collect();
        assert_eq!(pick_frames(&t, 1.0, 5, 100), [0, 2, 4, 6, 8]);
        // Sampled at 20 fps: each frame twice.
        assert_eq!(pick_frames(&t, 1.0, 20, 100).len(), 20);
        assert_eq!(pick_frames(&t, 1.0, 20, 6), [0, 0, 1, 1, 2, 2]);
        // The same rate: every frame once.
        assert_eq!(pick_frames(&t, 1.0, 10, 100), (0..10).collect::<Vec<_>>());
        let info = VideoInfo { width: 2, height: 2, frames: 10, duration_s: 1.0 };
        assert_eq!((info.frames_at(5), info.frames_at(10), info.frames_at(16)), (5, 10, 16));
    }
}

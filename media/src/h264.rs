//! RGB frames to an H.264 elementary stream with openh264 (built from its bundled source).
//!
//! openh264 emits Annex-B NAL units; MP4 wants each picture as one sample of length-prefixed NAL
//! units and the parameter sets out of band in the `avcC` box, so this module splits them apart.

use openh264::OpenH264API;
use openh264::Timestamp;
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, RateControlMode,
    UsageType, VuiConfig,
};
use openh264::formats::YUVBuffer;

use crate::{Frames, MediaError, yuv};

const NAL_SLICE: u8 = 1;
const NAL_IDR_SLICE: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;

/// What the encoder is asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub fps: u32,
    pub bitrate_bps: u32,
    /// Frames between IDR pictures.
    pub keyframe_interval: u32,
}

/// An encoded video: one sample per input frame, back to back in `payload`.
#[derive(Debug)]
pub(crate) struct Stream {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    /// Samples in decode (= presentation) order, each NAL unit prefixed by its 4-byte length.
    pub payload: Vec<u8>,
    pub sample_sizes: Vec<u32>,
    /// Whether each sample is an IDR picture (an MP4 sync sample).
    pub sync: Vec<bool>,
}

pub(crate) fn encode(frames: &Frames, settings: Settings) -> Result<Stream, MediaError> {
    let (width, height) = (frames.width, frames.height);
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(settings.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(settings.fps as f32))
        .rate_control_mode(RateControlMode::Quality)
        // Every input frame must become exactly one sample. The bitrate then becomes a target rather
        // than a cap, and openh264 logs a warning saying so on stderr when it initialises.
        .skip_frames(false)
        .usage_type(UsageType::CameraVideoRealTime)
        .intra_frame_period(IntraFramePeriod::from_num_frames(settings.keyframe_interval))
        // One thread keeps the output a pure function of the input.
        .num_threads(1)
        .vui(VuiConfig::bt601());
    let h264_err =
        |frame: usize| move |e: openh264::Error| MediaError::H264 { frame, message: e.to_string() };
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(h264_err(0))?;

    let mut stream = Stream {
        sps: Vec::new(),
        pps: Vec::new(),
        payload: Vec::new(),
        sample_sizes: Vec::with_capacity(frames.frames),
        sync: Vec::with_capacity(frames.frames),
    };
    for i in 0..frames.frames {
        let yuv =
            YUVBuffer::from_vec(yuv::rgb_to_i420(frames.frame(i), width, height), width, height);
        let millis = i as u64 * 1000 / u64::from(settings.fps);
        let bitstream =
            encoder.encode_at(&yuv, Timestamp::from_millis(millis)).map_err(h264_err(i))?;
        if matches!(bitstream.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Err(MediaError::DroppedFrame { frame: i, nals: 0 });
        }

        let start = stream.payload.len();
        let (mut nals, mut picture, mut idr) = (0, false, false);
        for layer in (0..bitstream.num_layers()).filter_map(|l| bitstream.layer(l)) {
            for nal in
                (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)).map(strip_start_code)
            {
                let Some(&header) = nal.first() else { continue };
                nals += 1;
                match header & 0x1f {
                    NAL_SPS => keep_parameter_set(&mut stream.sps, nal, "SPS", i)?,
                    NAL_PPS => keep_parameter_set(&mut stream.pps, nal, "PPS", i)?,
                    NAL_AUD => {}
                    kind => {
                        picture |= kind == NAL_SLICE || kind == NAL_IDR_SLICE;
                        idr |= kind == NAL_IDR_SLICE;
                        let len =
                            u32::try_from(nal.len()).map_err(|_| MediaError::Mp4TooLarge {
                                what: "NAL unit bytes",
                                value: nal.len() as u64,
                            })?;
                        stream.payload.extend_from_slice(&len.to_be_bytes());
                        stream.payload.extend_from_slice(nal);
                    }
                }
            }
        }
        if !picture {
            return Err(MediaError::DroppedFrame { frame: i, nals });
        }
        let size = stream.payload.len() - start;
        stream.sample_sizes.push(
            u32::try_from(size).map_err(|_| MediaError::Mp4TooLarge {
                what: "sample bytes",
                value: size as u64,
            })?,
        );
        stream.sync.push(idr);
    }
    if stream.sps.is_empty() || stream.pps.is_empty() {
        return Err(MediaError::H264 { frame: 0, message: "encoder emitted no SPS/PPS".into() });
    }
    Ok(stream)
}

/// Drops the Annex-B start code (`00 00 01` or `00 00 00 01`) in front of a NAL unit.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) { &nal[zeros + 1..] } else { nal }
}

/// Records the first SPS or PPS; openh264 repeats them before every IDR and, with its default
/// constant-id strategy, they must not change (the `avcC` box holds exactly one of each).
fn keep_parameter_set(
    slot: &mut Vec<u8>,
    nal: &[u8],
    name: &str,
    frame: usize,
) -> Result<(), MediaError> {
    if slot.is_empty() {
        slot.extend_from_slice(nal);
        Ok(())
    } else if slot == nal {
        Ok(())
    } else {
        Err(MediaError::H264 { frame, message: format!("{name} changed mid-stream") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_codes_are_stripped() {
        assert_eq!(strip_start_code(&[0, 0, 0, 1, 0x67, 9]), &[0x67, 9]);
        assert_eq!(strip_start_code(&[0, 0, 1, 0x68]), &[0x68]);
        assert_eq!(strip_start_code(&[0x65, 0, 0, 1]), &[0x65, 0, 0, 1]);
    }

    #[test]
    fn every_frame_is_one_sample_and_the_first_is_idr() {
        let (f, h, w) = (5, 32, 48);
        let data: Vec<u8> = (0..f * h * w * 3).map(|i| (i * 7 % 251) as u8).collect();
        let frames = Frames::new(&data, f, h, w).unwrap();
        let stream =
            encode(&frames, Settings { fps: 16, bitrate_bps: 500_000, keyframe_interval: 4 })
                .unwrap();
        assert_eq!(stream.sample_sizes.len(), f);
        assert_eq!(stream.sync, [true, false, false, false, true]);
        assert_eq!(
            stream.sample_sizes.iter().map(|&s| s as usize).sum::<usize>(),
            stream.payload.len()
        );
        assert_eq!(stream.sps[0] & 0x1f, NAL_SPS);
        assert_eq!(stream.pps[0] & 0x1f, NAL_PPS);
    }
}

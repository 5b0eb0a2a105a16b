//! The typed job spec a validated request becomes, and the pipeline stages it moves through.
//!
//! The gateway validates requests against the served model's limits before building a [`JobSpec`];
//! the stage services read the same struct back from the job record. Fields are plain data so the spec
//! round-trips through JSON unchanged (the Redis backend stores it as one opaque string).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a job produces and from which inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Text to video.
    T2v,
    /// Image (plus text) to video.
    I2v,
    /// Video (plus text) to video: an input video noised to a strength, then denoised.
    V2v,
    /// Text to image.
    T2i,
    /// Image edit (input images plus text to image).
    Edit,
}

impl Task {
    /// Stable label, as used in configs and `/v1/models`.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::T2v => "t2v",
            Task::I2v => "i2v",
            Task::V2v => "v2v",
            Task::T2i => "t2i",
            Task::Edit => "edit",
        }
    }

    /// The API resource the job is exposed as.
    pub fn resource(self) -> Resource {
        match self {
            Task::T2v | Task::I2v | Task::V2v => Resource::Video,
            Task::T2i | Task::Edit => Resource::Image,
        }
    }
}

/// The API resource a job belongs to; lists and id prefixes are per resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Video,
    Image,
}

impl Resource {
    /// The id prefix (`video_...`, `image_...`) and index name.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Video => "video",
            Resource::Image => "image",
        }
    }
}

/// A pipeline stage; every job visits each in order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Encoder,
    Dit,
    Decoder,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 3] = [Stage::Encoder, Stage::Dit, Stage::Decoder];

    /// Stable label (queue key component, metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Encoder => "encoder",
            Stage::Dit => "dit",
            Stage::Decoder => "decoder",
        }
    }

    /// The stage after this one, if any.
    pub fn next(self) -> Option<Stage> {
        match self {
            Stage::Encoder => Some(Stage::Dit),
            Stage::Dit => Some(Stage::Decoder),
            Stage::Decoder => None,
        }
    }

    /// The share of overall progress (percent) before this stage starts and once it ends. The DiT
    /// loop dominates run time, so it owns most of the bar.
    pub fn progress_span(self) -> (u8, u8) {
        match self {
            Stage::Encoder => (0, 5),
            Stage::Dit => (5, 95),
            Stage::Decoder => (95, 99),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage `{s}`"))
    }
}

/// Output geometry in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (w, h) = s.split_once('x').ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT"))?;
        let parse = |v: &str| v.parse::<u32>().ok().filter(|v| *v > 0);
        match (parse(w), parse(h)) {
            (Some(width), Some(height)) => Ok(Size { width, height }),
            _ => Err(format!("`{s}` is not WIDTHxHEIGHT with positive integers")),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Engine ranks per stage: client pins on the way in, the assignment once admitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ranks {
    pub encoder: Option<u32>,
    pub dit: Option<u32>,
    pub decoder: Option<u32>,
}

impl Ranks {
    pub fn get(&self, stage: Stage) -> Option<u32> {
        match stage {
            Stage::Encoder => self.encoder,
            Stage::Dit => self.dit,
            Stage::Decoder => self.decoder,
        }
    }

    pub fn set(&mut self, stage: Stage, rank: Option<u32>) {
        match stage {
            Stage::Encoder => self.encoder = rank,
            Stage::Dit => self.dit = rank,
            Stage::Decoder => self.decoder = rank,
        }
    }
}

/// An uploaded input (reference image, edit image, mask, input video) held in output storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    /// Role of the input: `input_reference`, `image`, `mask`, `video`.
    pub role: String,
    /// Storage key.
    pub key: String,
    /// Media type sniffed from the bytes.
    pub content_type: String,
}

/// Everything a stage needs to run a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Served model name.
    pub model: String,
    pub task: Task,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub size: Size,
    /// Frames to generate (1 for images).
    pub num_frames: u32,
    /// Frames per second of the encoded video (0 for images).
    pub fps: u32,
    /// Requested clip length in seconds, echoed as the video's `seconds` (0 for images).
    pub seconds: u32,
    pub num_inference_steps: u32,
    pub guidance_scale: f32,
    /// Wan2.2 A14B: the low-noise expert's guidance scale; absent, `guidance_scale` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale_2: Option<f32>,
    pub shift: f32,
    pub seed: u64,
    /// Images to produce (1 for videos).
    pub n: u32,
    /// Output media format: `mp4` for videos, `png`/`jpeg`/`webp` for images.
    pub output_format: String,
    pub output_compression: Option<u8>,
    pub inputs: Vec<InputRef>,
    /// Client rank pins; honoured by assignment.
    pub pins: Ranks,
    /// The video this one remixes.
    pub remixed_from: Option<String>,
    /// LoRA adapters of the served model's adapter directory to apply, in order, with weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<x2v_core::lora::LoraRef>,
    /// Previews per image to record while the image is denoised (a streamed image request's
    /// `partial_images`, 0 to 3).
    #[serde(default)]
    pub partial_images: u32,
    /// Video-to-video: how far the input video is noised, in (0, 1]; the last
    /// `int(num_inference_steps · strength)` steps run. Absent for other tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// A video extension (image-to-video from the last of them): the first frames of the `video`
    /// input, as shown at `fps`, that the output starts with; the generated `num_frames` follow,
    /// the first of them (the conditioning frame again) dropped. Absent for other jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend_frames: Option<u32>,
}

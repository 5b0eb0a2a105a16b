//! Job specs and new jobs as the gateway would create them, for queue, gateway and stage tests.
//! Tests change what they care about with struct update syntax:
//! `JobSpec { seed: 7, ..jobs::t2v("a cat") }`.

use x2v_core::JobId;
use x2v_queue::{JobSpec, NewJob, Ranks, Task};

/// The served model of [`t2v`].
pub const T2V_MODEL: &str = "wan2.1-t2v-1.3b";

/// A Wan2.1 T2V 1.3B video at its defaults: 832x480, 81 frames (5 s at 16 fps), 50 steps.
pub fn t2v(prompt: &str) -> JobSpec {
    JobSpec {
        model: T2V_MODEL.into(),
        task: Task::T2v,
        prompt: prompt.into(),
        negative_prompt: None,
        size: "832x480".parse().expect("a valid size"),
        num_frames: 81,
        fps: 16,
        seconds: 5,
        num_inference_steps: 50,
        guidance_scale: 5.0,
        guidance_scale_2: None,
        shift: 5.0,
        seed: 1,
        n: 1,
        output_format: "mp4".into(),
        output_compression: None,
        inputs: vec![],
        pins: Ranks::default(),
        remixed_from: None,
        partial_images: 0,
        loras: vec![],
        strength: None,
        extend_frames: None,
    }
}

/// One 64x64 PNG image of model `m` in 2 steps.
pub fn t2i(prompt: &str) -> JobSpec {
    JobSpec {
        model: "m".into(),
        task: Task::T2i,
        size: "64x64".parse().expect("a valid size"),
        num_frames: 1,
        fps: 0,
        seconds: 0,
        num_inference_steps: 2,
        guidance_scale: 4.0,
        guidance_scale_2: None,
        shift: 3.0,
        output_format: "png".into(),
        ..t2v(prompt)
    }
}

/// A new job of `spec`: a fresh id, no rank assignment, trace context or idempotency key.
pub fn new_job(spec: JobSpec) -> NewJob {
    NewJob {
        id: JobId::new(),
        spec,
        ranks: Ranks::default(),
        trace: Default::default(),
        idempotency: None,
    }
}

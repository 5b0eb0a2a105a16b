//! Gateway configuration: one serde struct, loaded by `x2v_core::config::load` (defaults, then a
//! TOML/JSON file, then `X2V_*` variables), and the served-model registry with per-model limits.

use serde::{Deserialize, Serialize};
use x2v_core::telemetry::TelemetryConfig;
use x2v_core::{Secret, SecretUrl};
use x2v_queue::storage::StorageConfig;
use x2v_queue::{QueueBackend, Task};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: String,
    /// Base URL clients reach this gateway at, for image `url` responses (empty: from the `Host` header).
    pub public_url: String,
    pub queue: QueueConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    /// Served models and their limits.
    pub models: Vec<ModelConfig>,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// `redis` or `memory` (embedded single-process mode).
    pub backend: QueueBackend,
    /// May carry a password; logs show it redacted.
    pub redis_url: SecretUrl,
    /// Key prefix in Redis.
    pub prefix: String,
    /// Seconds finished jobs (and their outputs' records) are kept.
    pub finished_ttl_s: u64,
    /// Seconds an `Idempotency-Key` maps to its job.
    pub idempotency_ttl_s: u64,
    /// Period of lease-expiry / dead-rank maintenance, in milliseconds.
    pub maintain_interval_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer keys; empty disables authentication.
    pub api_keys: Vec<Secret>,
    /// Sustained requests per second per key (0: unlimited).
    pub rate_limit_per_s: f64,
    /// Burst size per key.
    pub rate_limit_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest request body in bytes (uploads included).
    pub max_body_bytes: usize,
    /// Allowed CORS origins (`*` for any); empty disables CORS.
    pub cors_origins: Vec<String>,
    /// `openai-poll-after-ms` sent with video status responses.
    pub poll_after_ms: u64,
    /// How long a synchronous image request waits for its job, in seconds.
    pub image_timeout_s: u64,
    /// API requests handled at once, image requests aside; beyond it a request is answered 429
    /// (`server_overloaded`, `retry-after`) at once. 0: no bound.
    pub max_concurrent_requests: usize,
    /// Synchronous image requests (`/v1/images/generations|edits`, which wait for their image)
    /// held at once; beyond it, 429 as above. 0: no bound.
    pub max_image_requests: usize,
    /// Deadline of an API request other than an image request, in milliseconds (a download's body
    /// and an event stream continue past it: only the answer's start counts). 0: none.
    pub request_timeout_ms: u64,
}

/// One served model: what it does and what it allows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub tasks: Vec<Task>,
    /// Allowed output sizes, `WIDTHxHEIGHT`; the first is the default. `auto` (for edits): an
    /// edit that asks for no size gets about 1 MP at its last input image's aspect, as the
    /// Qwen-Image edit pipelines choose it (the first `WIDTHxHEIGHT` stays the default otherwise).
    pub sizes: Vec<String>,
    /// Frames per second of generated video.
    pub fps: u32,
    /// Most frames per video; frame counts must be `4k+1`.
    pub max_frames: u32,
    pub default_seconds: u32,
    pub default_steps: u32,
    /// Fewest steps a request may ask for (a step-distilled model's sampler runs a fixed count:
    /// `min_steps = max_steps = default_steps`, its `[step_distill]` timesteps' count).
    pub min_steps: u32,
    pub max_steps: u32,
    pub default_guidance_scale: f32,
    /// Two-expert models (Wan2.2 A14B): the low-noise expert's guidance scale when a request
    /// gives no `guidance_scale_2`. Set, the model accepts `guidance_scale_2`; unset, a request
    /// that sends one is refused (the model has one transformer).
    pub default_guidance_scale_2: Option<f32>,
    pub default_shift: f32,
    /// The model's LoRA adapters: a directory of `NAME.safetensors` files, the same one its DiT
    /// stage reads (`lora.dir`). Requests may name them in `lora`; `/v1/models` lists them.
    /// Empty: the model serves no adapters.
    pub lora_dir: String,
    /// Adapters in `lora_dir` that every job of the model runs with, before the request's own
    /// `lora`: e.g. a step-distillation LoRA (LightX2V's 4-step Wan LoRAs), served with
    /// `min_steps = max_steps = default_steps = 4`, `default_guidance_scale = 1`,
    /// `default_shift = 5` and the DiT's `scheduler = "step_distill"`.
    #[schema(value_type = Vec<Object>)]
    pub base_loras: Vec<x2v_core::lora::LoraRef>,
    /// Most images per request.
    pub max_n: u32,
    /// Most input images of an edit (`image` / `image[]`); the API allows 16.
    pub max_input_images: u32,
    /// Most jobs of this model waiting for or in its DiT ranks (their outstanding work, as rank
    /// assignment reads it); a create beyond it is answered 429 `model_queue_full` with
    /// `retry-after`, so clients back off instead of queueing work nobody will serve in time.
    /// Jobs waiting for any rank (no live DiT worker) are not counted. 0: no bound.
    pub max_queued_jobs: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:8000".into(),
            public_url: String::new(),
            queue: QueueConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            models: vec![
                ModelConfig::wan21_t2v_1_3b(),
                ModelConfig::wan21_i2v_14b_480p(),
                ModelConfig::qwen_image(),
            ],
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            backend: QueueBackend::Redis,
            redis_url: "redis://127.0.0.1:6379/".into(),
            prefix: "x2v".into(),
            finished_ttl_s: 7 * 24 * 3600,
            idempotency_ttl_s: 24 * 3600,
            maintain_interval_ms: 1000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 64 << 20,
            cors_origins: vec![],
            poll_after_ms: 2000,
            image_timeout_s: 600,
            max_concurrent_requests: 1024,
            max_image_requests: 256,
            request_timeout_ms: 60_000,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::wan21_t2v_1_3b()
    }
}

impl ModelConfig {
    /// The adapter names in [`ModelConfig::lora_dir`] (none without one).
    pub fn loras(&self) -> Vec<String> {
        if self.lora_dir.is_empty() {
            return vec![];
        }
        x2v_core::lora::list_names(std::path::Path::new(&self.lora_dir))
    }

    /// Wan2.1 text-to-video 1.3B: 480p, 16 fps, up to 81 frames (5 s).
    pub fn wan21_t2v_1_3b() -> Self {
        ModelConfig {
            name: "wan2.1-t2v-1.3b".into(),
            tasks: vec![Task::T2v, Task::V2v],
            sizes: vec!["832x480".into(), "480x832".into()],
            fps: 16,
            max_frames: 81,
            default_seconds: 5,
            default_steps: 50,
            min_steps: 1,
            max_steps: 100,
            default_guidance_scale: 5.0,
            default_guidance_scale_2: None,
            default_shift: 5.0,
            lora_dir: String::new(),
            base_loras: vec![],
            max_n: 1,
            max_input_images: 0,
            max_queued_jobs: 0,
        }
    }

    /// Wan2.1 image-to-video 14B at 480p.
    pub fn wan21_i2v_14b_480p() -> Self {
        ModelConfig {
            name: "wan2.1-i2v-14b-480p".into(),
            tasks: vec![Task::I2v],
            default_shift: 3.0,
            ..Self::wan21_t2v_1_3b()
        }
    }

    /// Wan2.2 text-to-video A14B (two experts): the original release's defaults, 40 steps, guidance
    /// 4.0 on the high-noise and 3.0 on the low-noise expert, shift 12; 480p and 720p.
    pub fn wan22_t2v_a14b() -> Self {
        ModelConfig {
            name: "wan2.2-t2v-a14b".into(),
            sizes: vec!["1280x720".into(), "720x1280".into(), "832x480".into(), "480x832".into()],
            default_steps: 40,
            default_guidance_scale: 4.0,
            default_guidance_scale_2: Some(3.0),
            default_shift: 12.0,
            ..Self::wan21_t2v_1_3b()
        }
    }

    /// Wan2.2 image-to-video A14B (two experts): 40 steps, guidance 3.5 on both experts, shift 5.
    pub fn wan22_i2v_a14b() -> Self {
        ModelConfig {
            name: "wan2.2-i2v-a14b".into(),
            tasks: vec![Task::I2v],
            default_guidance_scale: 3.5,
            default_guidance_scale_2: Some(3.5),
            default_shift: 5.0,
            ..Self::wan22_t2v_a14b()
        }
    }

    /// Wan2.2 TI2V-5B: text-to-video and image-to-video in one model, 720p (1280x704) at 24 fps,
    /// up to 121 frames (5 s), 50 steps, guidance 5, shift 5.
    pub fn wan22_ti2v_5b() -> Self {
        ModelConfig {
            name: "wan2.2-ti2v-5b".into(),
            tasks: vec![Task::T2v, Task::I2v],
            sizes: vec!["1280x704".into(), "704x1280".into()],
            fps: 24,
            max_frames: 121,
            ..Self::wan21_t2v_1_3b()
        }
    }

    /// Qwen-Image text-to-image and edit.
    pub fn qwen_image() -> Self {
        ModelConfig {
            name: "qwen-image".into(),
            tasks: vec![Task::T2i, Task::Edit],
            sizes: vec![
                "1328x1328".into(),
                "1664x928".into(),
                "928x1664".into(),
                "1472x1140".into(),
                "1140x1472".into(),
                "1024x1024".into(),
            ],
            fps: 0,
            max_frames: 1,
            default_seconds: 0,
            default_steps: 50,
            min_steps: 1,
            max_steps: 100,
            default_guidance_scale: 4.0,
            default_guidance_scale_2: None,
            default_shift: 3.0,
            lora_dir: String::new(),
            base_loras: vec![],
            max_n: 4,
            max_input_images: 3,
            max_queued_jobs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<GatewayConfig, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        x2v_core::config::load_from::<GatewayConfig, _>(None, env)
            .map(|(c, _)| c)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_bad_queue_backend_lists_the_allowed_ones() {
        assert_eq!(
            load(&[("X2V_QUEUE__BACKEND", "memory")]).unwrap().queue.backend,
            QueueBackend::Memory
        );
        let err = load(&[("X2V_QUEUE__BACKEND", "kafka")]).unwrap_err();
        for part in ["queue.backend:", "kafka", "redis", "memory"] {
            assert!(err.contains(part), "`{part}` missing from {err}");
        }
        let err = load(&[("X2V_STORAGE__KIND", "gcs")]).unwrap_err();
        for part in ["storage.kind:", "gcs", "local", "s3"] {
            assert!(err.contains(part), "`{part}` missing from {err}");
        }
    }

    #[test]
    fn debug_output_hides_keys_and_passwords() {
        let c = load(&[
            ("X2V_AUTH__API_KEYS", r#"["sk-live-a","sk-live-b"]"#),
            ("X2V_QUEUE__REDIS_URL", "redis://app:hunter2@redis:6379/0"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in ["sk-live-a", "sk-live-b", "hunter2"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("redis://app:[redacted]@redis:6379/0"), "{shown}");
    }
}

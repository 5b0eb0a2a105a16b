//! The configuration of one stage service (`x2v encoder|dit|decoder --config FILE`): one serde
//! struct loaded by `x2v_core::config::load` (defaults, then a TOML/JSON file from `configs/`, then
//! `X2V_<SECTION>__<FIELD>` variables).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x2v_core::telemetry::TelemetryConfig;
use x2v_core::{Secret, SecretUrl};
use x2v_queue::storage::StorageConfig;
use x2v_queue::{QueueBackend, Task};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// Engine rank of this worker within its stage (unique per stage).
    pub rank: u32,
    /// Served model name, as clients send it in `model` (must match the gateway's `[[models]]`).
    pub model: String,
    /// Local model directory (Wan2.1, diffusers or original layout). Empty: none configured.
    pub model_dir: String,
    /// Tasks this worker runs (`t2v`, `i2v`, `t2i`).
    pub tasks: Vec<Task>,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceChoice,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `f32` or `bf16`.
    pub dtype: DtypeChoice,
    /// Jobs this worker holds at once (they share the one device thread; more than 1 overlaps
    /// transfers and media encoding with compute).
    pub capacity: u32,
    /// Sampler for the DiT stage: `unipc` (the Wan default), `euler`, or `step_distill` (the
    /// fixed timesteps of `[step_distill]`, for LightX2V's step-distilled models).
    pub scheduler: Scheduler,
    /// `scheduler = "step_distill"`: the timesteps and update rule; the shift is the job's.
    pub step_distill: StepDistillSection,
    /// Images of one request (`n`) the DiT stage runs per transformer forward: 0 runs all of
    /// them as one batch, 1 runs them back to back (the images are the same either way).
    pub image_batch: u32,
    /// DiT stage of an image model: also hold the VAE decoder, to decode the previews a streamed
    /// request asks for (`partial_images`) from the images being denoised. Off: such requests
    /// get their final images only.
    pub previews: bool,
    /// Decoder stage: where the VAE decode runs (TensorRT / ONNX Runtime engines from a catalog,
    /// or libtorch) and the engines' memory budget.
    pub vae: x2v_trt::EngineConfig,
    /// DiT stage of a Wan model: the LoRA adapters jobs may ask for.
    pub lora: LoraSection,
    pub queue: QueueSection,
    pub transfer: TransferSection,
    pub storage: StorageConfig,
    pub worker: WorkerSection,
    pub grpc: ListenSection,
    pub http: ListenSection,
    pub telemetry: TelemetryConfig,
}

/// The device a stage runs its model on. Spelled `auto`, `cpu`, `cuda` or `cuda:N` (serde has no
/// derive for `cuda:N`, hence the hand-written impls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    Auto,
    Cpu,
    /// `cuda` is device 0.
    Cuda(usize),
}

impl DeviceChoice {
    const EXPECTED: &str = "auto, cpu, cuda or cuda:N";

    /// Whether this choice runs on CUDA: `None` for `auto`, which depends on the host.
    pub fn wants_cuda(self) -> Option<bool> {
        match self {
            DeviceChoice::Auto => None,
            DeviceChoice::Cpu => Some(false),
            DeviceChoice::Cuda(_) => Some(true),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("expected {}; got `{s}`", Self::EXPECTED)),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The compute dtype; the aliases are the spellings `x2v_models::device::parse_dtype` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DtypeChoice {
    /// bf16 on CUDA, fp32 on the CPU.
    Auto,
    #[serde(alias = "fp32", alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl DtypeChoice {
    /// The canonical spelling (what `parse_dtype` takes).
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
        }
    }
}

/// The DiT's sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// UniPC multistep, the Wan default.
    Unipc,
    /// Flow-matching Euler, for step-distilled models.
    Euler,
    /// The fixed timesteps of LightX2V's step-distilled Wan models (`[step_distill]`).
    StepDistill,
}

/// How payloads reach the next stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportChoice {
    /// Shared memory on the same host, else TCP.
    Auto,
    Shm,
    Tcp,
    Rdma,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    /// `redis` (multi-process) or `memory` (only inside `x2v up`).
    pub backend: QueueBackend,
    /// May carry a password; logs show it redacted.
    pub redis_url: SecretUrl,
    /// Key prefix in Redis (the gateway's `queue.prefix`).
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSection {
    /// Address the transfer engine listens on.
    pub listen: String,
    /// Address other stages reach this engine at (empty: the bound address).
    pub advertise: String,
    /// The deployment secret shared by every stage (or `secret_file`).
    pub secret: Secret,
    /// File holding the secret (wins over `secret` when set).
    pub secret_file: String,
    /// Largest payload accepted (or payloads held at once), in MiB: the receive pool's size. The pool
    /// costs memory only for payloads being received or held, plus released pages kept warm for a
    /// second after the last transfer, not for this size.
    pub pool_mib: usize,
    /// `auto` (shm on the same host, else TCP), `shm`, `tcp` or `rdma`.
    pub transport: TransportChoice,
    /// Seconds a published payload stays available to the next stage (redeliveries pull again).
    pub retain_s: u64,
    /// Seconds one fetch of a payload may take (connect, bytes, verification).
    pub timeout_s: u64,
    /// Per-chunk CRC32 on TCP on top of SHA-256.
    pub chunk_crc: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Lease length in milliseconds; a worker that stops extending loses the job after this.
    pub lease_ms: u64,
    /// A worker counts as live this long after a heartbeat, in milliseconds.
    pub heartbeat_ttl_ms: u64,
    /// Longest pause between claims while idle, in milliseconds.
    pub max_poll_ms: u64,
    /// Longest a job may run in this stage, in seconds; then it fails with `deadline_exceeded`.
    pub job_timeout_s: u64,
    /// On SIGTERM, how long in-flight jobs may run before they are released, in seconds.
    pub drain_timeout_s: u64,
}

/// The step-distill sampler of a DiT stage (`scheduler = "step_distill"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepDistillSection {
    /// Training timesteps evaluated, descending (LightX2V's `denoising_step_list`); a job's
    /// `num_inference_steps` must be their count.
    pub denoising_steps: Vec<u32>,
    /// Re-noise the prediction with fresh noise between steps (Wan2.1 distillations); false
    /// moves along the prediction (Wan2.2 distillations).
    pub renoise: bool,
}

impl Default for StepDistillSection {
    fn default() -> Self {
        StepDistillSection { denoising_steps: vec![1000, 750, 500, 250], renoise: true }
    }
}

/// The DiT stage's LoRA adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// Directory of `NAME.safetensors` adapters (diffusers/PEFT or original Wan key format), the
    /// same one as the gateway's `lora_dir` for the model. Empty: no adapters.
    pub dir: String,
    /// Adapters kept in memory after use, MiB (least recently used first out); an adapter is read
    /// again from its file when it is asked for after eviction.
    pub cache_mib: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection { dir: String::new(), cache_mib: 2048 }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSection {
    /// Listen address (port 0 picks a free port); empty disables the endpoint.
    pub listen: String,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            rank: 0,
            model: "wan2.1-t2v-1.3b".into(),
            model_dir: String::new(),
            tasks: vec![Task::T2v],
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            capacity: 1,
            scheduler: Scheduler::Unipc,
            image_batch: 0,
            previews: true,
            vae: x2v_trt::EngineConfig::default(),
            lora: LoraSection::default(),
            step_distill: StepDistillSection::default(),
            queue: QueueSection::default(),
            transfer: TransferSection::default(),
            storage: StorageConfig::default(),
            worker: WorkerSection::default(),
            grpc: ListenSection { listen: "127.0.0.1:0".into() },
            http: ListenSection { listen: "127.0.0.1:0".into() },
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            backend: QueueBackend::Redis,
            redis_url: "redis://127.0.0.1:6379/".into(),
            prefix: "x2v".into(),
        }
    }
}

impl Default for TransferSection {
    fn default() -> Self {
        TransferSection {
            listen: "127.0.0.1:0".into(),
            advertise: String::new(),
            secret: Secret::default(),
            secret_file: String::new(),
            pool_mib: 256,
            transport: TransportChoice::Auto,
            retain_s: 600,
            timeout_s: 60,
            chunk_crc: false,
        }
    }
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            lease_ms: 30_000,
            heartbeat_ttl_ms: 15_000,
            max_poll_ms: 500,
            job_timeout_s: 3600,
            drain_timeout_s: 60,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<StageConfig, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        x2v_core::config::load_from::<StageConfig, _>(None, env)
            .map(|(c, _)| c)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn closed_choices_parse_from_their_spellings() {
        let c = load(&[
            ("X2V_DEVICE", "cuda"),
            ("X2V_DTYPE", "bfloat16"),
            ("X2V_SCHEDULER", "euler"),
            ("X2V_TRANSFER__TRANSPORT", "shm"),
            ("X2V_QUEUE__BACKEND", "memory"),
        ])
        .unwrap();
        assert_eq!(c.device, DeviceChoice::Cuda(0));
        assert_eq!(c.dtype, DtypeChoice::Bf16);
        assert_eq!(c.scheduler, Scheduler::Euler);
        assert_eq!(c.transfer.transport, TransportChoice::Shm);
        assert_eq!(c.queue.backend, QueueBackend::Memory);
        for (text, device) in [("auto", DeviceChoice::Auto), ("cpu", DeviceChoice::Cpu)] {
            assert_eq!(load(&[("X2V_DEVICE", text)]).unwrap().device, device);
        }
        assert_eq!(load(&[("X2V_DEVICE", "cuda:3")]).unwrap().device, DeviceChoice::Cuda(3));
        let cuda = |text| load(&[("X2V_DEVICE", text)]).unwrap().device.wants_cuda();
        assert_eq!((cuda("cpu"), cuda("auto"), cuda("cuda:1")), (Some(false), None, Some(true)));
        for alias in ["f32", "fp32", "float32"] {
            assert_eq!(load(&[("X2V_DTYPE", alias)]).unwrap().dtype, DtypeChoice::F32);
        }
        // Defaults serialise to the spellings the config files use.
        let tree = serde_json::to_value(StageConfig::default()).unwrap();
        assert_eq!(
            (&tree["device"], &tree["dtype"], &tree["scheduler"]),
            (&"auto".into(), &"auto".into(), &"unipc".into())
        );
        assert_eq!(tree["transfer"]["transport"], "auto");
        assert_eq!(tree["queue"]["backend"], "redis");
    }

    #[test]
    fn a_bad_choice_names_the_field_and_the_allowed_values() {
        let cases = [
            ("X2V_DEVICE", "gpu0", "device", &["auto", "cpu", "cuda:N"][..]),
            ("X2V_DEVICE", "cuda:x", "device", &["cuda:N"]),
            ("X2V_DTYPE", "fp16", "dtype", &["auto", "f32", "bf16"]),
            ("X2V_SCHEDULER", "ddim", "scheduler", &["unipc", "euler", "step_distill"]),
            ("X2V_TRANSFER__TRANSPORT", "udp", "transfer.transport", &["auto", "shm", "tcp"]),
            ("X2V_QUEUE__BACKEND", "sqlite", "queue.backend", &["redis", "memory"]),
        ];
        for (var, value, field, allowed) in cases {
            let err = load(&[(var, value)]).unwrap_err();
            assert!(err.contains(&format!("{field}:")), "{var}: {err}");
            assert!(err.contains(value), "{var}: {err}");
            for a in allowed {
                assert!(err.contains(a), "{var}: `{a}` missing from {err}");
            }
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = load(&[
            ("X2V_TRANSFER__SECRET", "s3cr3t-transfer"),
            ("X2V_QUEUE__REDIS_URL", "redis://:hunter2@10.0.0.7:6379/0"),
            ("X2V_STORAGE__SECRET_ACCESS_KEY", "aws-s3cr3t"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in ["s3cr3t-transfer", "hunter2", "aws-s3cr3t"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("10.0.0.7:6379"), "{shown}");
        assert_eq!(c.transfer.secret.expose(), "s3cr3t-transfer");
    }
}

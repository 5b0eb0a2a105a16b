//! `x2v up`: the whole system in one process — the gateway and the encoder, DiT and decoder stages
//! on the embedded job queue, with payloads handed over in process and outputs in a local
//! directory. No Redis, no second process. With no `--model-dir` it writes and serves two tiny
//! random-initialised demo models (their videos and images are noise) so that the API can be
//! tried at once: `x2v-demo` (Wan2.1: videos, and images as one-frame videos) and
//! `x2v-demo-image` (Qwen-Image: images and edits, one stage set per pipeline under one name).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use x2v_gateway::GatewayConfig;
use x2v_gateway::config::ModelConfig;
use x2v_models::qwen_image::demo::{EDIT_DIR, T2I_DIR};
use x2v_models::qwen_image::pipeline::{ModelDir as QwenModelDir, Variant};
use x2v_queue::storage::Storage;
use x2v_queue::{MemoryQueue, Queue, Retention, Task};
use x2v_stage::StageConfig;
use x2v_stage::config::DeviceChoice;
use x2v_stage::exchange::InProcess;
use x2v_stage::family::ModelFamily;
use x2v_stage::runner::StageRunner;
use x2v_stage::service::Shared;

/// Name the video demo model is served under.
pub const DEMO_MODEL: &str = "x2v-demo";
/// Name the image demo model is served under (text to image and edits).
pub const DEMO_IMAGE_MODEL: &str = "x2v-demo-image";
/// Images per request the image demo model allows (as the gateway's `qwen-image` entry).
const DEMO_IMAGE_MAX_N: u32 = 4;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory to serve: Wan2.1 (diffusers or original layout) or Qwen-Image (diffusers
    /// layout, text to image or edit). Without it, two tiny random-initialised demo models are
    /// generated under the data directory and served.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Model name clients pass as `model` (default: `wan2.1-t2v` / `wan2.1-i2v` from the Wan
    /// transformer's config, `qwen-image` / `qwen-image-edit` from the Qwen-Image pipeline).
    #[arg(long)]
    model: Option<String>,
    /// Address the OpenAI-compatible API listens on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Directory for outputs and the demo model.
    #[arg(long, default_value = "./x2v-data")]
    data_dir: PathBuf,
    /// Gateway config file (auth, limits, telemetry); the queue, storage and served model are
    /// set by `x2v up` itself.
    #[arg(long, env = "X2V_CONFIG")]
    config: Option<PathBuf>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Serve a step-distilled Wan model (LightX2V's distillations, merged, or with
    /// `--base-lora`): its DiT samples the fixed `--denoising-steps` and requests default to
    /// them, no CFG (guidance 1) and shift 5.
    #[arg(long)]
    step_distill: bool,
    /// `--step-distill`: the training timesteps evaluated, descending.
    #[arg(long, value_delimiter = ',', default_value = "1000,750,500,250")]
    denoising_steps: Vec<u32>,
    /// `--step-distill`: move along the prediction between steps (Wan2.2 distillations) rather
    /// than re-noise it (Wan2.1 distillations).
    #[arg(long)]
    no_renoise: bool,
    /// An adapter of the model's `loras/` that every job runs with, `NAME[:SCALE]` (e.g. a
    /// step-distillation LoRA); repeatable.
    #[arg(long = "base-lora", value_name = "NAME[:SCALE]")]
    base_loras: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct DemoModelArgs {
    /// Directory to write (created; an existing model there is overwritten). A Qwen-Image demo
    /// model is written as two directories under it: `t2i/` and `edit/`.
    #[arg(long)]
    out: PathBuf,
    /// `wan` (video, as `x2v-demo`) or `qwen-image` (images and edits, as `x2v-demo-image`).
    #[arg(long, value_enum, default_value_t = Family::Wan)]
    family: Family,
    /// A Wan image-to-video model (36-channel DiT, and a CLIP image encoder unless
    /// `--two-experts`) instead of text-to-video.
    #[arg(long)]
    i2v: bool,
    /// A Wan2.2 A14B-shaped model: high- and low-noise experts (`transformer/`,
    /// `transformer_2/`) switched at `boundary_ratio`.
    #[arg(long)]
    two_experts: bool,
    /// A Wan2.2 TI2V-5B-shaped model: the Wan2.2 VAE (48 latent channels, 16×) and one DiT that
    /// serves text- and image-to-video.
    #[arg(long, conflicts_with_all = ["i2v", "two_experts"])]
    ti2v: bool,
    /// Seed of every weight: the same seed writes the same model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The model family of a demo model.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Wan,
    QwenImage,
}

/// `x2v demo-model`: writes a demo model that `x2v up` serves.
pub fn demo_model(args: &DemoModelArgs) -> ExitCode {
    let written = match args.family {
        Family::Wan => {
            let options = x2v_models::wan::demo::DemoOptions {
                seed: args.seed,
                i2v: args.i2v,
                two_experts: args.two_experts,
                ti2v: args.ti2v,
            };
            let task = match (args.i2v, args.two_experts) {
                _ if args.ti2v => "ti2v",
                (false, false) => "t2v",
                (true, false) => "i2v",
                (false, true) => "two-expert t2v",
                (true, true) => "two-expert i2v",
            };
            x2v_models::wan::demo::write_demo_model(&args.out, &options)
                .map(|()| format!("the {task} demo model"))
        }
        Family::QwenImage if args.i2v || args.two_experts || args.ti2v => {
            let flag = match (args.i2v, args.two_experts) {
                (true, _) => "--i2v",
                (_, true) => "--two-experts",
                _ => "--ti2v",
            };
            eprintln!(
                "x2v demo-model: {flag} is for --family wan; --family qwen-image writes a \
                 text-to-image and an edit model"
            );
            return ExitCode::from(2);
        }
        Family::QwenImage => {
            let options = x2v_models::qwen_image::demo::DemoOptions { seed: args.seed };
            x2v_models::qwen_image::demo::write_demo_models(&args.out, &options).map(|()| {
                format!("the Qwen-Image demo models ({T2I_DIR}/: text to image, {EDIT_DIR}/: edit)")
            })
        }
    };
    match written {
        Ok(what) => {
            println!("wrote {what} to {}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("x2v demo-model: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(args: &Args) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(up(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("x2v up: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the model directory's transformer takes image embeddings (image-to-video).
fn is_i2v(model_dir: &Path) -> Result<bool> {
    let dir = x2v_models::wan::pipeline::ModelDir::open(model_dir)?;
    let (config, _) =
        x2v_models::wan::config::Config::from_file(&dir.transformer()?.join("config.json"))?;
    // Image to video concatenates the mask and the image latents to the noise (36 channels in).
    Ok(config.in_channels != config.out_channels)
}

/// Whether the model is Wan2.2 TI2V-5B (text- and image-to-video in one).
fn is_ti2v(model_dir: &Path) -> Result<bool> {
    Ok(x2v_models::wan::pipeline::ModelDir::open(model_dir)?.ti2v())
}

/// Whether the model has Wan2.2 A14B's two experts.
fn has_two_experts(model_dir: &Path) -> Result<bool> {
    Ok(x2v_models::wan::pipeline::ModelDir::open(model_dir)?.dits()?.low.is_some())
}

/// What the gateway allows for the video demo model: small sizes, short clips, few steps.
fn demo_model_config() -> ModelConfig {
    ModelConfig {
        name: DEMO_MODEL.into(),
        tasks: vec![Task::T2v, Task::V2v, Task::T2i],
        sizes: vec!["256x256".into(), "320x192".into(), "192x320".into()],
        fps: 8,
        max_frames: 33,
        default_seconds: 2,
        default_steps: 4,
        min_steps: 1,
        max_steps: 50,
        default_guidance_scale: 5.0,
        default_guidance_scale_2: None,
        default_shift: 3.0,
        lora_dir: String::new(),
        base_loras: vec![],
        max_n: 1,
        max_input_images: 0,
        max_queued_jobs: 0,
    }
}

/// What the gateway allows for the image demo model: small sizes, few steps.
fn demo_image_model_config() -> ModelConfig {
    ModelConfig {
        name: DEMO_IMAGE_MODEL.into(),
        tasks: vec![Task::T2i, Task::Edit],
        sizes: vec!["256x256".into(), "320x192".into(), "192x320".into()],
        default_steps: 4,
        min_steps: 1,
        max_steps: 50,
        max_n: DEMO_IMAGE_MAX_N,
        ..ModelConfig::qwen_image()
    }
}

/// One set of encoder, DiT and decoder stages: a model directory served as `name` for `tasks`,
/// on `rank` of each stage (ranks are per stage and distinct across the sets of one process).
struct StageSet {
    dir: PathBuf,
    name: String,
    tasks: Vec<Task>,
    rank: u32,
}

impl StageSet {
    /// `loras/` in a Wan model directory: its LoRA adapters, served when present.
    fn lora_dir(&self) -> Option<PathBuf> {
        let dir = self.dir.join("loras");
        let wan = matches!(ModelFamily::detect(&self.dir), Ok(ModelFamily::Wan));
        (wan && dir.is_dir()).then_some(dir)
    }
}

/// What `x2v up` serves: the stage sets and the served model names.
struct Served {
    sets: Vec<StageSet>,
    names: Vec<String>,
}

async fn up(args: &Args) -> Result<()> {
    let (mut gateway, warnings): (GatewayConfig, _) =
        x2v_core::config::load(args.config.as_deref())?;
    let telemetry = x2v_core::telemetry::init("x2v", &gateway.telemetry)?;
    for w in warnings {
        tracing::warn!("{}", w.0);
    }
    x2v_models::weights::map_large_allocations();
    x2v_models::device::load_cuda_for(args.device.wants_cuda()).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("--data-dir {}", args.data_dir.display()))?;
    let served = choose_models(args, &mut gateway)?;
    let (queue, storage) = embed(args, &mut gateway)?;
    let shared = Shared {
        queue: queue.clone(),
        exchange: Arc::new(InProcess::new(Duration::from_secs(600))),
        storage: storage.clone(),
    };

    let shutdown = crate::serve::shutdown_on_signals();
    let configs: Vec<StageConfig> = served.sets.iter().map(|s| stage_config(args, s)).collect();
    let mut stages = start_stages(&configs, shared, &shutdown).await?;

    let listener = tokio::net::TcpListener::bind(&gateway.listen)
        .await
        .with_context(|| format!("--listen {}", gateway.listen))?;
    let addr = listener.local_addr()?;
    if args.model_dir.is_none() {
        eprintln!(
            "x2v up: serving the demo models `{DEMO_MODEL}` (videos) and `{DEMO_IMAGE_MODEL}` \
             (images and edits): tiny and random-initialised, so their videos and images are \
             noise. Pass --model-dir DIR to serve real Wan2.1 or Qwen-Image weights."
        );
    }
    let names: Vec<String> = served.names.iter().map(|n| format!("`{n}`")).collect();
    println!(
        "x2v up: serving {} at http://{addr}/v1 (OpenAI base_url); Ctrl-C stops",
        names.join(" and ")
    );
    let state = x2v_gateway::AppState::new(gateway, queue, storage);
    let served = x2v_gateway::serve(state, listener, shutdown.clone()).await;
    shutdown.cancel();
    while let Some(r) = stages.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "stage stopped with an error");
        }
    }
    telemetry.shutdown();
    Ok(served?)
}

/// The models to serve (`--model-dir`, or the demo models, written on first use); sets the
/// gateway's served models to match.
fn choose_models(args: &Args, gateway: &mut GatewayConfig) -> Result<Served> {
    if let Some(name) = &args.model
        && args.model_dir.is_none()
    {
        bail!(
            "--model {name} needs --model-dir (the demo models are always served as {DEMO_MODEL} \
             and {DEMO_IMAGE_MODEL})"
        );
    }
    let Some(dir) = &args.model_dir else {
        if args.step_distill || !args.base_loras.is_empty() {
            bail!("--step-distill and --base-lora apply to a served --model-dir");
        }
        return demo_models(args, gateway);
    };
    let family = ModelFamily::detect(dir)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--model-dir {}", dir.display()))?;
    let (name, tasks, base) = match family {
        ModelFamily::Wan => {
            let context = || format!("--model-dir {}", dir.display());
            let ti2v = is_ti2v(dir).with_context(context)?;
            match (is_i2v(dir).with_context(context)?, has_two_experts(dir).with_context(context)?)
            {
                _ if ti2v => {
                    ("wan2.2-ti2v", vec![Task::T2v, Task::I2v], ModelConfig::wan22_ti2v_5b())
                }
                (true, false) => ("wan2.1-i2v", vec![Task::I2v], ModelConfig::wan21_i2v_14b_480p()),
                (false, false) => (
                    "wan2.1-t2v",
                    vec![Task::T2v, Task::V2v, Task::T2i],
                    ModelConfig::wan21_t2v_1_3b(),
                ),
                (true, true) => ("wan2.2-i2v", vec![Task::I2v], ModelConfig::wan22_i2v_a14b()),
                (false, true) => (
                    "wan2.2-t2v",
                    vec![Task::T2v, Task::V2v, Task::T2i],
                    ModelConfig::wan22_t2v_a14b(),
                ),
            }
        }
        ModelFamily::QwenImage => {
            let variant = QwenModelDir::open(dir)
                .with_context(|| format!("--model-dir {}", dir.display()))?
                .variant();
            match variant {
                Variant::TextToImage => ("qwen-image", vec![Task::T2i], ModelConfig::qwen_image()),
                Variant::Edit | Variant::EditPlus => {
                    ("qwen-image-edit", vec![Task::Edit], ModelConfig::qwen_image())
                }
            }
        }
    };
    let name = args.model.clone().unwrap_or_else(|| name.into());
    let set = StageSet { dir: dir.clone(), name: name.clone(), tasks: tasks.clone(), rank: 0 };
    let lora_dir = set.lora_dir().map(|d| d.display().to_string()).unwrap_or_default();
    let mut model = ModelConfig { name: name.clone(), tasks, lora_dir, ..base };
    if args.step_distill {
        if family != ModelFamily::Wan {
            bail!("--step-distill: {} is not a Wan model", dir.display());
        }
        let steps = args.denoising_steps.len() as u32;
        model.default_steps = steps;
        model.min_steps = steps;
        model.max_steps = steps;
        model.default_guidance_scale = 1.0;
        model.default_guidance_scale_2 = model.default_guidance_scale_2.map(|_| 1.0);
        model.default_shift = 5.0;
    }
    model.base_loras =
        args.base_loras.iter().map(|spec| base_lora(spec, &model)).collect::<Result<_>>()?;
    gateway.models = vec![model];
    Ok(Served { sets: vec![set], names: vec![name] })
}

/// `--base-lora NAME[:SCALE]`, an adapter of the model's `loras/`.
fn base_lora(spec: &str, model: &ModelConfig) -> Result<x2v_core::lora::LoraRef> {
    let (name, scale) = crate::generate::lora_name_and_scale("--base-lora", spec)?;
    let scale = scale as f32;
    if !scale.is_finite() {
        bail!("--base-lora {spec}: scale {scale} is out of range");
    }
    let known = model.loras();
    if !known.iter().any(|k| k == name) {
        bail!(
            "--base-lora {spec}: the model's loras/ has no adapter `{name}` (available: {})",
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        );
    }
    Ok(x2v_core::lora::LoraRef { name: name.to_owned(), scale })
}

/// The demo models under the data directory, written on first use: the Wan model on rank 0, the
/// Qwen-Image text-to-image and edit models (one name, a task each) on ranks 1 and 2.
fn demo_models(args: &Args, gateway: &mut GatewayConfig) -> Result<Served> {
    let wan = args.data_dir.join("demo-model");
    if !wan.join("model_index.json").exists() {
        eprintln!("x2v up: writing the video demo model to {}", wan.display());
        x2v_models::wan::demo::write_demo_model(
            &wan,
            &x2v_models::wan::demo::DemoOptions {
                seed: 0,
                i2v: false,
                two_experts: false,
                ti2v: false,
            },
        )
        .context("writing the video demo model")?;
    }
    let image = args.data_dir.join("demo-image-model");
    let (t2i, edit) = (image.join(T2I_DIR), image.join(EDIT_DIR));
    if !(t2i.join("model_index.json").exists() && edit.join("model_index.json").exists()) {
        eprintln!("x2v up: writing the image demo model to {}", image.display());
        x2v_models::qwen_image::demo::write_demo_models(&image, &Default::default())
            .context("writing the image demo model")?;
    }
    gateway.models = vec![demo_model_config(), demo_image_model_config()];
    let set = |dir: PathBuf, name: &str, tasks: Vec<Task>, rank| StageSet {
        dir,
        name: name.into(),
        tasks,
        rank,
    };
    Ok(Served {
        sets: vec![
            set(wan, DEMO_MODEL, vec![Task::T2v, Task::V2v, Task::T2i], 0),
            set(t2i, DEMO_IMAGE_MODEL, vec![Task::T2i], 1),
            set(edit, DEMO_IMAGE_MODEL, vec![Task::Edit], 2),
        ],
        names: vec![DEMO_MODEL.into(), DEMO_IMAGE_MODEL.into()],
    })
}

/// The embedded queue and the local output storage, set in the gateway's config as well.
fn embed(args: &Args, gateway: &mut GatewayConfig) -> Result<(Arc<dyn Queue>, Storage)> {
    gateway.queue.backend = x2v_queue::QueueBackend::Memory;
    gateway.storage.kind = x2v_queue::storage::StorageKind::Local;
    gateway.storage.path = args.data_dir.join("outputs").display().to_string();
    gateway.listen = args.listen.clone();
    let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new(Retention {
        finished_ttl: Duration::from_secs(gateway.queue.finished_ttl_s),
        idempotency_ttl: Duration::from_secs(gateway.queue.idempotency_ttl_s),
        ..Retention::default()
    }));
    let storage = Storage::from_config(&gateway.storage).context("storage")?;
    Ok((queue, storage))
}

/// One config for the three stages of a set: its rank, model and tasks, no admin listeners.
fn stage_config(args: &Args, set: &StageSet) -> StageConfig {
    let (scheduler, step_distill) = if args.step_distill {
        let s = x2v_stage::config::StepDistillSection {
            denoising_steps: args.denoising_steps.clone(),
            renoise: !args.no_renoise,
        };
        (x2v_stage::config::Scheduler::StepDistill, s)
    } else {
        (x2v_stage::config::Scheduler::Unipc, Default::default())
    };
    StageConfig {
        scheduler,
        step_distill,
        rank: set.rank,
        model: set.name.clone(),
        model_dir: set.dir.display().to_string(),
        tasks: set.tasks.clone(),
        device: args.device,
        lora: x2v_stage::config::LoraSection {
            dir: set.lora_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            ..Default::default()
        },
        grpc: Default::default(),
        http: Default::default(),
        ..StageConfig::default()
    }
}

type Stages = JoinSet<Result<()>>;

/// Starts the encoder, DiT and decoder stages of every config and waits until all of them serve.
async fn start_stages(
    configs: &[StageConfig],
    shared: Shared,
    shutdown: &CancellationToken,
) -> Result<Stages> {
    let mut stages = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    for config in configs {
        let start = Start { config, shared: &shared, shutdown, ready: &ready_tx };
        start.spawn(&mut stages, "encoder", x2v_encoder::EncoderRunner::new(config))?;
        start.spawn(&mut stages, "dit", x2v_dit::DitRunner::new(config))?;
        start.spawn(&mut stages, "decoder", x2v_decoder::DecoderRunner::new(config))?;
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < 3 * configs.len() {
        tokio::select! {
            Some(_) = ready_rx.recv() => ready += 1,
            Some(r) = stages.join_next() => {
                r.context("a stage task panicked")??;
                bail!("a stage stopped while starting");
            }
        }
    }
    Ok(stages)
}

/// What every stage of `x2v up` starts with.
struct Start<'a> {
    config: &'a StageConfig,
    shared: &'a Shared,
    shutdown: &'a CancellationToken,
    ready: &'a tokio::sync::mpsc::UnboundedSender<&'static str>,
}

impl Start<'_> {
    /// Runs stage `name` with `runner` as a task of `stages`; it sends `name` once it serves.
    fn spawn<R: StageRunner>(
        &self,
        stages: &mut Stages,
        name: &'static str,
        runner: Result<R, String>,
    ) -> Result<()> {
        let what = format!("{name} stage of `{}` ({})", self.config.model, self.config.model_dir);
        let runner = runner.map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let (config, shared, stop, tx) =
            (self.config.clone(), self.shared.clone(), self.shutdown.clone(), self.ready.clone());
        stages.spawn(async move {
            let on_ready = move |_: &x2v_stage::service::Endpoints| {
                let _ = tx.send(name);
            };
            x2v_stage::service::run(config, runner, Some(shared), stop, on_ready)
                .await
                .context(what)
        });
        Ok(())
    }
}

//! `x2v gateway` and `x2v encoder|dit|decoder`: one service per process, against Redis, with
//! payloads moved by x2v-transfer. Each reads its config file (`--config` or `X2V_CONFIG`), then
//! `X2V_*` overrides, and stops on SIGTERM or Ctrl-C (stage services drain first).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use x2v_gateway::GatewayConfig;
use x2v_stage::StageConfig;
use x2v_stage::service::Endpoints;

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// TOML or JSON config file (then `X2V_*` variables override it).
    #[arg(long, env = "X2V_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address; overrides `listen` from the config.
    #[arg(long)]
    listen: Option<String>,
    /// Print `listening on ADDR` once bound (for scripts that start it on port 0).
    #[arg(long)]
    print_addr: bool,
}

#[derive(clap::Args, Debug)]
pub struct StageArgs {
    /// TOML or JSON config file (see `configs/`; then `X2V_*` variables override it).
    #[arg(long, env = "X2V_CONFIG")]
    config: Option<PathBuf>,
    /// Print `ready grpc=… http=… transfer=…` once the model is loaded and the rank registered.
    #[arg(long)]
    print_addr: bool,
}

/// Which stage service to run.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    Encoder,
    Dit,
    Decoder,
}

/// Cancels the token on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

fn exit(name: &str, r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("x2v {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn gateway(args: &GatewayArgs) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    exit("gateway", rt.block_on(run_gateway(args)))
}

async fn run_gateway(args: &GatewayArgs) -> Result<()> {
    let (mut config, warnings): (GatewayConfig, _) =
        x2v_core::config::load(args.config.as_deref())?;
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    let telemetry = x2v_core::telemetry::init("gateway", &config.telemetry)?;
    for w in warnings {
        tracing::warn!("{}", w.0);
    }
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    if args.print_addr {
        println!("listening on {}", listener.local_addr()?);
    }
    let result = x2v_gateway::run(config, listener, shutdown_on_signals()).await;
    telemetry.shutdown();
    Ok(result?)
}

pub fn stage(which: Which, args: &StageArgs) -> ExitCode {
    let name = match which {
        Which::Encoder => "encoder",
        Which::Dit => "dit",
        Which::Decoder => "decoder",
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    exit(name, rt.block_on(run_stage(which, name, args)))
}

/// Prints the endpoints of a ready stage service.
pub fn announce(name: &str, e: &Endpoints) {
    let show = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
    println!(
        "{name} ready grpc={} http={} transfer={}",
        show(e.admin.grpc),
        show(e.admin.http),
        if e.transfer.is_empty() { "-" } else { &e.transfer }
    );
}

async fn run_stage(which: Which, name: &str, args: &StageArgs) -> Result<()> {
    let (config, warnings): (StageConfig, _) = x2v_core::config::load(args.config.as_deref())?;
    let telemetry = x2v_core::telemetry::init(name, &config.telemetry)?;
    for w in warnings {
        tracing::warn!("{}", w.0);
    }
    x2v_models::weights::map_large_allocations();
    x2v_models::device::load_cuda_for(config.device.wants_cuda()).map_err(anyhow::Error::msg)?;
    let shutdown = shutdown_on_signals();
    let print = args.print_addr;
    let on_ready = move |e: &Endpoints| {
        if print {
            announce(name, e);
        }
    };
    let bad = |e: String| {
        anyhow::anyhow!(
            "{}: {e}",
            args.config.as_ref().map_or("config".into(), |p| p.display().to_string())
        )
    };
    let result = match which {
        Which::Encoder => {
            let runner = x2v_encoder::EncoderRunner::new(&config).map_err(bad)?;
            x2v_stage::service::run(config, runner, None, shutdown, on_ready).await
        }
        Which::Dit => {
            let runner = x2v_dit::DitRunner::new(&config).map_err(bad)?;
            x2v_stage::service::run(config, runner, None, shutdown, on_ready).await
        }
        Which::Decoder => {
            let runner = x2v_decoder::DecoderRunner::new(&config).map_err(bad)?;
            x2v_stage::service::run(config, runner, None, shutdown, on_ready).await
        }
    };
    telemetry.shutdown();
    result
}

//! `x2v-gateway`: parse flags, load config, init telemetry, bind, [`x2v_gateway::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use x2v_gateway::GatewayConfig;

#[derive(Parser)]
#[command(about = "x2v OpenAI-compatible gateway")]
struct Args {
    /// TOML or JSON config file (then `X2V_*` variables override it).
    #[arg(long, env = "X2V_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address; overrides `listen` from the config.
    #[arg(long)]
    listen: Option<String>,
    /// Print the local address after binding (tests start the gateway on port 0).
    #[arg(long)]
    print_addr: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mut config, warnings): (GatewayConfig, _) =
        x2v_core::config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let telemetry = x2v_core::telemetry::init("gateway", &config.telemetry)?;
    for w in warnings {
        tracing::warn!("{}", w.0);
    }
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    if args.print_addr {
        println!("listening on {}", listener.local_addr()?);
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        trigger.cancel();
    });
    let result = x2v_gateway::run(config, listener, shutdown).await;
    telemetry.shutdown();
    Ok(result?)
}

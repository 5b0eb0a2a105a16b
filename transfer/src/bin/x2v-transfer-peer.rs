//! A standalone transfer peer for multi-process and multi-host tests: it publishes one payload for
//! pulling, optionally waits for one pushed payload, and reports on stdout.
//!
//! ```text
//! X2V_TRANSFER_SECRET=... x2v-transfer-peer --listen 0.0.0.0:0 --publish-bytes 33554432 [--expect-push JOB]
//! READY addr=<listening address> job=<published job id>
//! RECEIVED job=<job> bytes=<n> transport=<tcp|shm>      (with --expect-push)
//! ```
//! `--push-to ADDR --push-job JOB --push-bytes N [--transport tcp|shm|auto]` pushes a payload instead
//! and prints `PUSHED ...`. Otherwise it serves until stdin closes.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use x2v_core::JobId;
use x2v_transfer::{
    Dtype, Engine, EngineConfig, Opts, Payload, Secret, TransportChoice, TransportKind,
};

/// The bytes every peer publishes, so tests can check content without shipping it around.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(9)).collect::<Vec<u8>>().into()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let secret = std::env::var("X2V_TRANSFER_SECRET").context("X2V_TRANSFER_SECRET is not set")?;
    let mut cfg = EngineConfig::new(Secret::new(secret.into_bytes())?);
    let (mut publish, mut expect) = (0usize, None);
    let (mut push_to, mut push_job, mut push_bytes) = (None, None, 0usize);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => cfg.listen = value.parse().context("--listen")?,
            "--publish-bytes" => publish = value.parse().context("--publish-bytes")?,
            "--pool-bytes" => cfg.pool_bytes = value.parse().context("--pool-bytes")?,
            "--expect-push" => {
                expect = Some(
                    value.parse::<JobId>().map_err(|e| anyhow::anyhow!("--expect-push: {e}"))?,
                )
            }
            "--push-to" => {
                push_to = Some(value.parse::<std::net::SocketAddr>().context("--push-to")?)
            }
            "--push-job" => {
                push_job =
                    Some(value.parse::<JobId>().map_err(|e| anyhow::anyhow!("--push-job: {e}"))?)
            }
            "--push-bytes" => push_bytes = value.parse().context("--push-bytes")?,
            "--transport" => {
                cfg.transport = match value.as_str() {
                    "tcp" => TransportChoice::Force(TransportKind::Tcp),
                    "shm" => TransportChoice::Force(TransportKind::Shm),
                    "auto" => TransportChoice::Auto,
                    other => bail!("--transport takes tcp, shm or auto, got {other}"),
                }
            }
            other => bail!("unknown flag {other}; see the file header for usage"),
        }
    }
    let engine = Engine::start(cfg)?;
    let job = JobId::new();
    if publish > 0 {
        let data = pattern(publish);
        let payload =
            Payload::build(vec![("latents".into(), Dtype::U8, vec![publish as u64], data)]).await?;
        engine.publish(job, payload)?;
    }
    println!("READY addr={} job={job}", engine.local_addr());
    std::io::stdout().flush()?;
    if let (Some(to), Some(job)) = (push_to, push_job) {
        let payload = Payload::build(vec![(
            "latents".into(),
            Dtype::U8,
            vec![push_bytes as u64],
            pattern(push_bytes),
        )])
        .await?;
        let r = engine.push(to, job, &payload, Opts::timeout(Duration::from_secs(300))).await?;
        println!("PUSHED job={job} bytes={} transport={}", r.bytes, r.transport);
        return Ok(());
    }
    if let Some(want) = expect {
        let got = engine.recv(want, Opts::timeout(Duration::from_secs(300))).await?;
        println!("RECEIVED job={want} bytes={} transport={}", got.total_bytes(), got.transport());
        return Ok(());
    }
    tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count()).await?;
    Ok(())
}

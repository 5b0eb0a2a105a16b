//! Gateway throughput: job creation (`POST /v1/videos`) and status polls (`GET /v1/videos/{id}`)
//! against the in-process gateway on a real `redis-server` (AOF, `appendfsync everysec`), next to
//! `redis-benchmark`'s rate for the same Redis command in the same run (the create script via
//! EVALSHA; HGETALL for a poll). Everything shares this machine's cores.
//!
//! `cargo run --release -p x2v-gateway --example bench -- [seconds=5] [connections=32]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;
use x2v_gateway::{AppState, GatewayConfig};
use x2v_queue::storage::Storage;
use x2v_queue::{Queue, RedisQueue, Retention};
use x2v_testkit::redis::RedisServer;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

async fn load<F>(client: &HttpClient, seconds: u64, connections: usize, make: F) -> Run
where
    F: Fn(usize) -> hyper::Request<Full<Bytes>> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = vec![];
    for c in 0..connections {
        let (client, make) = (client.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut i) = (Vec::new(), 0usize, c);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.request(make(i)).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if ok { lat.push(t.elapsed()) } else { errors += 1 }
                    }
                    Err(_) => errors += 1,
                }
                i += connections;
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Run { rate: all.len() as f64 / elapsed, p50_ms: pct(0.50), p99_ms: pct(0.99), errors }
}

/// `redis-benchmark` requests/s for one command line, or why there is no figure.
fn redis_benchmark(port: u16, connections: usize, args: &[&str]) -> Result<f64, String> {
    let out = std::process::Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-c", &connections.to_string(), "-n", "100000", "--csv"])
        .args(args)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            // The test name (the command line) may itself hold commas: count from the end.
            .and_then(|l| l.rsplit(',').nth(6))
            .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            .ok_or_else(|| "?".to_owned()),
        Ok(o) => Err(format!("failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Err(format!("not run: {e}")),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let queue: Arc<dyn Queue> =
        Arc::new(RedisQueue::connect(&redis.url(), "x2v", Retention::default()).await?);
    let dir = tempfile::tempdir()?;
    let mut config = GatewayConfig::default();
    config.queue.redis_url = redis.url().into();
    let state = AppState::new(config, queue, Storage::local(dir.path())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(x2v_gateway::serve(state, listener, shutdown.clone()));
    let client: HttpClient =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build_http();

    let create = move |_| {
        hyper::Request::post(format!("http://{addr}/v1/videos"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"prompt":"a benchmark cat","seconds":"2"}"#)))
            .expect("request")
    };
    let creates = load(&client, seconds, connections, create).await;

    let resp = client.request(create(0)).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let id = serde_json::from_slice::<serde_json::Value>(&body)?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let poll_uri = format!("http://{addr}/v1/videos/{id}");
    let polls = load(&client, seconds, connections, move |_| {
        hyper::Request::get(&poll_uri).body(Full::default()).expect("request")
    })
    .await;
    let health_uri = format!("http://{addr}/healthz");
    let health = load(&client, seconds, connections, move |_| {
        hyper::Request::get(&health_uri).body(Full::default()).expect("request")
    })
    .await;
    shutdown.cancel();
    let _ = server.await;

    let raw_id = id.trim_start_matches("video_");
    let mut conn = redis::Client::open(redis.url())?.get_multiplexed_async_connection().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(x2v_queue::redis_queue::CREATE_LUA)
        .query_async(&mut conn)
        .await?;
    let spec: String = redis::cmd("HGET")
        .arg(format!("x2v:job:{raw_id}"))
        .arg("spec")
        .query_async(&mut conn)
        .await?;
    let redis_create = redis_benchmark(
        redis.port(),
        connections,
        &[
            "EVALSHA",
            &sha,
            "0",
            "bench",
            "1",
            "__rand_int__",
            "video",
            &spec,
            "{}",
            "",
            "",
            "",
            "",
            "",
            "1000",
        ],
    );
    let redis_poll =
        redis_benchmark(redis.port(), connections, &["HGETALL", &format!("x2v:job:{raw_id}")]);

    println!(
        "x2v gateway benchmark: {seconds} s per phase, {connections} connections, gateway + load generator + redis-server on this machine"
    );
    println!(
        "| operation | gateway req/s | p50 ms | p99 ms | errors | redis-benchmark req/s (same Redis command) | gateway / redis-benchmark |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r, ceiling) in [
        ("create (POST /v1/videos)", &creates, Some(redis_create)),
        ("status poll (GET /v1/videos/{id})", &polls, Some(redis_poll)),
        ("HTTP floor (GET /healthz, no Redis)", &health, None),
    ] {
        let (ceiling, ratio) = match ceiling {
            Some(Ok(c)) => (format!("{c:.0}"), format!("{:.0}%", 100.0 * r.rate / c)),
            Some(Err(why)) => (why, "-".to_owned()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {ceiling} | {ratio} |",
            r.rate, r.p50_ms, r.p99_ms, r.errors
        );
    }
    Ok(())
}

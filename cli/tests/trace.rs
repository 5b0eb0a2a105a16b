//! One job, one trace: the real `x2v gateway`, `x2v encoder`, `x2v dit` and `x2v decoder`
//! processes on a real `redis-server`, exporting spans over OTLP/gRPC to a collector inside this
//! test. A video job created through the HTTP API must leave spans of all four services under a
//! single trace id: the gateway's request span, and the `stage` span of each stage service, which
//! restores its parent from the `trace` field of the job record.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::{Value, json};

/// The demo model's name, as the gateway serves it and the stages register it.
const MODEL: &str = "x2v-demo";
/// The stage services, by subcommand; each exports under this `service.name` (the default of
/// `x2v_core::telemetry::init` for the subcommand, as the configs here set no `service_name`).
const STAGES: [&str; 3] = ["encoder", "dit", "decoder"];
/// How long a service may take to load its model and announce itself.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the job may take from creation to completion.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a service may take to drain, flush its spans and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn one_trace_spans_gateway_and_every_stage_of_a_job() {
    let tmp = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let collector = Collector::start();

    let model_dir = tmp.path().join("demo-model");
    let out = Command::new(env!("CARGO_BIN_EXE_x2v"))
        .arg("demo-model")
        .arg("--out")
        .arg(&model_dir)
        .output()
        .expect("x2v runs");
    assert!(
        out.status.success(),
        "x2v demo-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let storage = tmp.path().join("outputs");
    let (gateway_config, stage_config) =
        write_configs(tmp.path(), &redis.url(), &storage, &model_dir);
    let env = [
        ("X2V_TELEMETRY__OTLP_ENDPOINT", collector.endpoint.as_str()),
        // The spans are INFO spans: a quieter filter inherited from the caller would drop them.
        ("RUST_LOG", "info"),
    ];

    // Everything starts at once; the gateway is only called once every stage is registered.
    let mut stages: Vec<Service> = STAGES
        .iter()
        .map(|name| {
            Service::spawn(name, &["--config", path_str(&stage_config), "--print-addr"], &env)
        })
        .collect();
    let mut gateway = Service::spawn(
        "gateway",
        &["--config", path_str(&gateway_config), "--print-addr", "--listen", "127.0.0.1:0"],
        &env,
    );
    let api = gateway.wait_for_line("listening on ", START_TIMEOUT).trim().to_owned();
    for stage in &stages {
        let line = stage.wait_for_line(&format!("{} ready ", stage.name), START_TIMEOUT);
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .unwrap_or_else(|| panic!("no http= address in {line:?}"));
        // `ready` is printed once the model is loaded; `/readyz` passes once the rank is
        // registered in Redis, which the gateway needs to assign the job to it.
        wait_until(START_TIMEOUT, &format!("{} /readyz", stage.name), || {
            matches!(http(admin, "GET", "/readyz", None), Ok((200, _)))
        });
    }

    let request = json!({
        "prompt": "a lighthouse at dusk, traced end to end",
        "model": MODEL,
        "size": "256x256",
        "num_frames": 5,
        "num_inference_steps": 2,
        "seed": 7,
    });
    let (status, body) = http(&api, "POST", "/v1/videos", Some(&request.to_string()))
        .expect("POST /v1/videos reaches the gateway");
    assert_eq!(status, 200, "POST /v1/videos: {body}");
    let video: Value = serde_json::from_str(&body).unwrap();
    let video_id = video["id"].as_str().unwrap_or_else(|| panic!("no id in {body}")).to_owned();

    let started = Instant::now();
    let last = loop {
        let (status, body) =
            http(&api, "GET", &format!("/v1/videos/{video_id}"), None).expect("GET the video");
        assert_eq!(status, 200, "GET /v1/videos/{video_id}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        match v["status"].as_str() {
            Some("completed") => break v,
            Some("failed") => panic!("the job failed: {v:#}"),
            _ => {}
        }
        assert!(
            started.elapsed() < JOB_TIMEOUT,
            "the job did not complete in {JOB_TIMEOUT:?}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{video_id} completed in {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(last["model"], MODEL, "{last:#}");

    // SIGTERM makes every service stop serving, shut its telemetry down and so flush its spans.
    for service in stages.iter_mut().chain([&mut gateway]) {
        service.signal_term();
    }
    for service in stages.iter_mut().chain([&mut gateway]) {
        let status = service.wait_exit(STOP_TIMEOUT);
        assert!(status.success(), "{} exited with {status} after SIGTERM", service.name);
    }

    // The spans arrive before each process exits; the short poll only covers the collector's side.
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        spans = collector.spans();
        if job_trace(&spans, &video_id).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    for name in ["gateway"].iter().chain(&STAGES) {
        assert!(
            services.contains(name),
            "no spans from service `{name}` (got {services:?})\n{}",
            describe(&spans)
        );
    }
    let trace = job_trace(&spans, &video_id)
        .unwrap_or_else(|why| panic!("{why}\nspans received:\n{}", describe(&spans)));
    eprintln!("{video_id}: trace {trace} spans gateway, {}", STAGES.join(", "));
}

/// The trace id that the gateway's `POST /v1/videos` request span and the encoder, DiT and decoder
/// `stage` spans of `video_id` share, each stage span being a child of a gateway span; or why
/// there is none.
fn job_trace(spans: &[SpanRecord], video_id: &str) -> Result<String, String> {
    let stage_spans: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| {
            s.name == "stage" && s.attributes.get("job").map(String::as_str) == Some(video_id)
        })
        .collect();
    for stage in STAGES {
        if !stage_spans.iter().any(|s| s.service == stage) {
            return Err(format!("no `stage` span of {video_id} from service `{stage}`"));
        }
    }
    if let Some(s) = stage_spans.iter().find(|s| STAGES.iter().all(|st| *st != s.service)) {
        return Err(format!("a `stage` span of {video_id} from an unexpected service: {s:?}"));
    }
    let traces: BTreeSet<&str> = stage_spans.iter().map(|s| s.trace_id.as_str()).collect();
    if traces.len() != 1 {
        return Err(format!("the `stage` spans of {video_id} are in several traces: {traces:?}"));
    }
    let trace = *traces.first().expect("one trace");
    let gateway: Vec<&SpanRecord> =
        spans.iter().filter(|s| s.service == "gateway" && s.trace_id == trace).collect();
    let creates_the_job = |g: &SpanRecord| {
        g.name == "http"
            && g.attributes.get("method").map(String::as_str) == Some("POST")
            && g.attributes.get("route").map(String::as_str) == Some("/v1/videos")
    };
    if !gateway.iter().any(|g| creates_the_job(g)) {
        return Err(format!(
            "no gateway `http` span of POST /v1/videos in trace {trace} of {video_id}'s stage spans"
        ));
    }
    for s in &stage_spans {
        if !gateway.iter().any(|g| g.span_id == s.parent_span_id) {
            return Err(format!(
                "the {} `stage` span's parent {} is not a gateway span of trace {trace}",
                s.service, s.parent_span_id
            ));
        }
    }
    Ok(trace.to_owned())
}

/// The gateway and stage configs (JSON): one Redis and prefix, one output store, the demo model.
fn write_configs(
    dir: &Path,
    redis_url: &str,
    storage: &Path,
    model_dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let prefix = "x2v-trace-test";
    let storage = json!({ "kind": "local", "path": storage });
    let gateway = json!({
        "queue": { "backend": "redis", "redis_url": redis_url, "prefix": prefix },
        "storage": storage,
        "http": { "poll_after_ms": 100 },
        // The limits of `x2v up`'s demo model, with few frames and steps.
        "models": [{
            "name": MODEL,
            "tasks": ["t2v"],
            "sizes": ["256x256"],
            "fps": 8,
            "max_frames": 33,
            "default_seconds": 1,
            "default_steps": 2,
            "max_steps": 8,
            "default_guidance_scale": 5.0,
            "default_shift": 3.0,
            "max_n": 1,
        }],
        "telemetry": { "sample_ratio": 1.0 },
    });
    // One file for the three stages: each subcommand runs its own stage of the same rank 0.
    let stage = json!({
        "rank": 0,
        "model": MODEL,
        "model_dir": model_dir,
        "tasks": ["t2v"],
        "device": "cpu",
        "queue": { "backend": "redis", "redis_url": redis_url, "prefix": prefix },
        // TCP rather than shared memory: the payloads are tiny, and a container's /dev/shm may
        // be too small for the receive pools.
        "transfer": {
            "listen": "127.0.0.1:0",
            "secret": "x2v-trace-test-transfer-secret",
            "transport": "tcp",
            "pool_mib": 16,
            "timeout_s": 30,
        },
        "storage": storage,
        "worker": { "max_poll_ms": 50, "job_timeout_s": 120, "drain_timeout_s": 10 },
        "grpc": { "listen": "127.0.0.1:0" },
        "http": { "listen": "127.0.0.1:0" },
        "telemetry": { "sample_ratio": 1.0 },
    });
    let (gateway_path, stage_path) = (dir.join("gateway.json"), dir.join("stage.json"));
    std::fs::write(&gateway_path, serde_json::to_vec_pretty(&gateway).unwrap()).unwrap();
    std::fs::write(&stage_path, serde_json::to_vec_pretty(&stage).unwrap()).unwrap();
    (gateway_path, stage_path)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// Calls `done` every 50 ms until it holds; panics after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.0 request (so the answer is never chunked and ends with the connection); returns
/// the status code and the body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// A `redis-server` on a free port, without persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        // A free port can be taken between probing and binding: then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            let mut redis = Redis { child, port };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if redis.child.try_wait().unwrap().is_some() {
                    break;
                }
                if redis.ping() {
                    return redis;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not start");
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 5];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && reply == *b"+PONG"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `x2v` service process. Its stdout lines are handed to [`Service::wait_for_line`]; stdout
/// and stderr are both kept, and printed when the test fails. Killed on drop if still running.
struct Service {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Service {
    fn spawn(name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_x2v"))
            .arg(name)
            .args(args)
            .env_remove("X2V_CONFIG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("x2v runs");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        // Both pipes are drained until the process exits, so it never blocks on a full pipe.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stdout_log = log.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                stdout_log.lock().unwrap().push_str(&format!("[stdout] {line}\n"));
                let _ = tx.send(line);
            }
        });
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let stderr_log = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                stderr_log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Service { name, child, lines, log }
    }

    /// The rest of the first stdout line starting with `prefix`.
    fn wait_for_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{} printed no `{prefix}` line in {timeout:?}", self.name)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{} exited before printing `{prefix}`", self.name)
                }
            }
        }
    }

    fn signal_term(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: `kill` has no memory-safety preconditions; the pid is our own unreaped child.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to {}: {}", self.name, std::io::Error::last_os_error());
    }

    /// Waits for the process to exit; panics (and the drop kills it) after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running {timeout:?} after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            // The tail is where a failure shows; the start is model loading.
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!("----- x2v {} output (last {} lines) -----", self.name, tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// An OTLP/gRPC trace receiver on `127.0.0.1`, on its own tokio runtime.
struct Collector {
    endpoint: String,
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    // Serves the receiver until the test ends.
    _runtime: tokio::runtime::Runtime,
}

/// The `TraceService` of the collector: keeps every export request.
#[derive(Clone, Default)]
struct TraceSink {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the collector");
        let addr = listener.local_addr().unwrap();
        let receiver = TraceSink::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        runtime.spawn(server);
        Collector {
            endpoint: format!("http://{addr}"),
            requests: receiver.requests,
            _runtime: runtime,
        }
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<SpanRecord> {
        let requests = self.requests.lock().unwrap();
        let mut spans = Vec::new();
        for rs in requests.iter().flat_map(|r| &r.resource_spans) {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                spans.push(SpanRecord {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                });
            }
        }
        spans
    }
}

/// The parts of an exported span the assertions look at.
#[derive(Debug)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    attributes: BTreeMap<String, String>,
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line per span, grouped by trace, for failure messages.
fn describe(spans: &[SpanRecord]) -> String {
    let mut sorted: Vec<&SpanRecord> = spans.iter().collect();
    sorted.sort_by(|a, b| (&a.trace_id, &a.service).cmp(&(&b.trace_id, &b.service)));
    let mut out = format!("{} spans\n", spans.len());
    for s in sorted {
        let shown: BTreeMap<&str, &str> = s
            .attributes
            .iter()
            .filter(|(k, _)| !k.starts_with("code.") && !k.starts_with("thread."))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        out.push_str(&format!(
            "  trace={} span={} parent={:16} {:8} {:20} {shown:?}\n",
            s.trace_id, s.span_id, s.parent_span_id, s.service, s.name
        ));
    }
    out
}

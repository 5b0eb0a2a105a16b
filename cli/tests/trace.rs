//! One job, one trace: the real `x2v gateway`, `x2v encoder`, `x2v dit` and `x2v decoder`
//! processes on a real `redis-server`, exporting spans over OTLP/gRPC to a collector inside this
//! test. A video job created through the HTTP API must leave spans of all four services under a
//! single trace id: the gateway's request span, and the `stage` span of each stage service, which
//! restores its parent from the `trace` field of the job record.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use x2v_testkit::config::{self, Deployment};
use x2v_testkit::otlp::{SpanRecord, TraceReceiver, describe};
use x2v_testkit::redis::RedisServer;

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
    let redis = RedisServer::ephemeral();
    let collector = TraceReceiver::start();

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

    let deployment = Deployment {
        redis_url: redis.url(),
        prefix: "x2v-trace-test".into(),
        storage: tmp.path().join("outputs"),
    };
    let gateway_config = config::write(
        tmp.path().join("gateway.json"),
        &deployment.gateway(&[config::served_model(MODEL, &["t2v"], &["256x256"])]),
    );
    // One file for the three stages: each subcommand runs its own stage of the same rank 0.
    let stage_config = config::write(
        tmp.path().join("stage.json"),
        &deployment.stage(0, MODEL, &model_dir, &["t2v"]),
    );
    let env = [
        ("X2V_TELEMETRY__OTLP_ENDPOINT", collector.endpoint()),
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

//! `x2v doctor`: what this host offers x2v, and whether anything required is missing.
//!
//! Every check yields ok, warn (usable, but worth knowing) or fail (x2v cannot work as configured);
//! any failure makes the exit code non-zero.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, ExitCode};
use std::time::Duration;

use serde::Serialize;
use x2v_models::cuda_driver;
use x2v_models::device::LibtorchInfo;

#[derive(clap::Args)]
pub struct Args {
    /// Redis to check (`redis://host:port`); also read from X2V_REDIS_URL. Required when given.
    #[arg(long, env = "X2V_REDIS_URL")]
    redis_url: Option<String>,
    /// Fail unless libtorch can use at least one CUDA device.
    #[arg(long)]
    require_gpu: bool,
    /// A VAE engine catalog (`engines.toml`) to check: each engine's graph must exist and load
    /// (on ONNX Runtime's CPU provider). Also read from X2V_VAE__ENGINES.
    #[arg(long, env = "X2V_VAE__ENGINES")]
    engines: Option<std::path::PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
}

mod engines;

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check { name, status, detail: detail.into() }
}

pub fn run(args: &Args) -> ExitCode {
    let checks = collect(args);
    if args.json {
        let failed = checks.iter().any(|c| c.status == Status::Fail);
        let out = serde_json::json!({ "ok": !failed, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&out).expect("serializable"));
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("[{tag}] {:<10} {}", c.name, c.detail);
        }
    }
    if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn collect(args: &Args) -> Vec<Check> {
    let torch = LibtorchInfo::query();
    let mut checks = vec![libtorch_check(&torch), cpu_check(&torch)];
    checks.extend(cuda_checks(&torch, args.require_gpu));
    checks.extend(engines::checks(args.engines.as_deref()));
    checks.push(redis_check(args.redis_url.as_deref()));
    checks.push(ffmpeg_check());
    checks.push(glibc_check());
    checks
}

fn libtorch_check(t: &LibtorchInfo) -> Check {
    let lib = t.library.as_ref().map_or("not mapped".to_owned(), |p| p.display().to_string());
    let runtime = t.runtime_version.as_deref().unwrap_or("unknown");
    let detail = format!("built against {}, loaded {runtime} from {lib}", t.build_version);
    match t.version_matches() {
        Some(true) => check("libtorch", Status::Ok, detail),
        Some(false) => check(
            "libtorch",
            Status::Fail,
            format!(
                "{detail}: version mismatch (rebuild or point LD_LIBRARY_PATH at torch {})",
                t.build_version
            ),
        ),
        None => check("libtorch", Status::Warn, format!("{detail}: loaded version unknown")),
    }
}

fn cpu_check(t: &LibtorchInfo) -> Check {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let features = [("mkl", t.has_mkl), ("mkldnn", t.has_mkldnn), ("openmp", t.has_openmp)]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(",");
    check(
        "cpu",
        Status::Ok,
        format!(
            "{cores} cores, libtorch {} intra-op / {} inter-op threads, [{features}]",
            t.cpu_threads, t.interop_threads
        ),
    )
}

fn cuda_checks(t: &LibtorchInfo, require_gpu: bool) -> Vec<Check> {
    let driver = cuda_driver::query();
    let mut checks = Vec::new();
    match &driver {
        Ok(info) => {
            let (major, minor) = (info.driver_version / 1000, (info.driver_version % 1000) / 10);
            for d in &info.devices {
                checks.push(check(
                    "gpu",
                    Status::Ok,
                    format!(
                        "cuda:{} {} (compute capability {}.{}, {:.1} GiB), driver CUDA {major}.{minor}",
                        d.index,
                        d.name,
                        d.capability.0,
                        d.capability.1,
                        d.total_memory_bytes as f64 / (1u64 << 30) as f64
                    ),
                ));
            }
            if info.devices.is_empty() {
                checks.push(check(
                    "gpu",
                    Status::Warn,
                    format!("NVIDIA driver (CUDA {major}.{minor}) present but no devices"),
                ));
            }
        }
        Err(e) => checks.push(check("gpu", Status::Ok, format!("no NVIDIA GPU: {e}"))),
    }
    let driver_gpus = driver.as_ref().map_or(0, |i| i.devices.len());
    let torch_loaded =
        if t.torch_cuda_loaded { "libtorch_cuda loaded" } else { "libtorch_cuda not loaded" };
    let cudnn = match t.cudnn_version {
        Some(v) => format!(", cuDNN {}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
        None => String::new(),
    };
    let detail =
        format!("{} device(s) visible to libtorch ({torch_loaded}{cudnn})", t.cuda_device_count);
    let status = if t.cuda_available {
        Status::Ok
    } else if driver_gpus > 0 || require_gpu {
        // GPUs the driver sees but libtorch cannot use is the silent-CPU-fallback failure.
        Status::Fail
    } else {
        Status::Ok
    };
    checks.push(check("cuda", status, detail));
    checks
}

fn redis_check(url: Option<&str>) -> Check {
    let Some(url) = url else {
        let server = which("redis-server")
            .map_or("redis-server not on PATH".to_owned(), |p| format!("redis-server at {p}"));
        return check("redis", Status::Ok, format!("none configured (embedded queue); {server}"));
    };
    match redis_ping(url) {
        Ok(()) => check("redis", Status::Ok, format!("{url} answers PING")),
        Err(e) => check("redis", Status::Fail, format!("{url}: {e}")),
    }
}

/// A RESP `PING` over a plain socket (x2v-core needs no Redis client for this).
fn redis_ping(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| "expected a redis://host:port URL".to_owned())?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port =
        if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:6379") };
    let addr =
        host_port.to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or("no address")?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        Err(format!("unexpected reply {:?}", reply.trim()))
    }
}

fn ffmpeg_check() -> Check {
    match Command::new("ffmpeg").arg("-version").output() {
        Ok(out) if out.status.success() => {
            let first =
                String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned();
            check("ffmpeg", Status::Ok, first)
        }
        // Media encoding is built in; ffmpeg/ffprobe only verify outputs in tests.
        _ => check("ffmpeg", Status::Warn, "not on PATH (only the tests' media checks use it)"),
    }
}

/// The C library this process runs on, against the newest `GLIBC_2.x` symbol version the binary asks for.
fn glibc_check() -> Check {
    let runtime = glibc_runtime_version();
    let required = std::fs::read("/proc/self/exe").ok().and_then(|bytes| max_glibc_tag(&bytes));
    match (runtime, required) {
        (Some(rt), Some(req)) => {
            let ok = version_tuple(&rt) >= version_tuple(&req);
            let status = if ok { Status::Ok } else { Status::Fail };
            check("glibc", status, format!("runtime {rt}, binary needs symbols up to GLIBC_{req}"))
        }
        (rt, req) => check("glibc", Status::Warn, format!("runtime {rt:?}, binary needs {req:?}")),
    }
}

fn glibc_runtime_version() -> Option<String> {
    let out = Command::new("ldd").arg("--version").output().ok()?;
    let first = String::from_utf8_lossy(&out.stdout).lines().next()?.to_owned();
    first.split_whitespace().last().map(str::to_owned)
}

fn max_glibc_tag(bytes: &[u8]) -> Option<String> {
    let tag = b"GLIBC_2.";
    memchr::memmem::find_iter(bytes, tag)
        .filter_map(|i| {
            let rest = &bytes[i + tag.len() - 2..];
            let end =
                rest.iter().position(|b| !(b.is_ascii_digit() || *b == b'.')).unwrap_or(rest.len());
            std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
        })
        .max_by_key(|v| version_tuple(v))
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').filter_map(|p| p.parse().ok()).collect()
}

fn which(program: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_newest_glibc_tag() {
        let blob = b"\0GLIBC_2.2.5\0GLIBC_2.34\0GLIBC_2.17\0GLIBC_PRIVATE\0";
        assert_eq!(max_glibc_tag(blob).as_deref(), Some("2.34"));
        assert!(version_tuple("2.36") >= version_tuple("2.34"));
        assert!(version_tuple("2.9") < version_tuple("2.17"));
    }

    #[test]
    fn redis_urls_are_validated() {
        assert!(redis_ping("http://localhost:6379").unwrap_err().contains("redis://"));
        // Port 1 on loopback is never a Redis server.
        assert!(redis_ping("redis://127.0.0.1:1").is_err());
    }
}

//! `x2v build-engines`: loads every engine of a VAE engine catalog once, on the provider a decoder
//! stage with the same settings would use. On the TensorRT provider that builds each engine (with
//! its optimisation profiles) and stores it in the cache directory, so a deployment's first
//! requests load a built engine instead of waiting for a build; elsewhere it proves the graphs
//! load. Prints one row per engine with its load time and the host memory the loaded engine holds
//! (the process's RSS while it is loaded minus before; each engine is dropped before the next).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use x2v_trt::catalog::Coverage;
use x2v_trt::manager::Loader;
use x2v_trt::{BackendChoice, EngineConfig, Target, VaeEngines};

#[derive(clap::Args)]
pub struct Args {
    /// The engine catalog (`engines.toml`).
    #[arg(long)]
    engines: PathBuf,
    /// `auto`, `tensorrt` or `onnx`, as the decoder's `vae.backend`.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendChoice,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = parse_target)]
    device: Target,
    /// TensorRT engine and timing caches (the decoder's `vae.cache_dir`). Default: `trt-cache/`
    /// beside the catalog.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    match s {
        "auto" => Ok(BackendChoice::Auto),
        "tensorrt" => Ok(BackendChoice::Tensorrt),
        "onnx" => Ok(BackendChoice::Onnx),
        _ => Err(format!("`{s}`: expected auto, tensorrt or onnx")),
    }
}

fn parse_target(s: &str) -> Result<Target, String> {
    match s {
        "cpu" => Ok(Target::Cpu),
        "cuda" => Ok(Target::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Target::Cuda)
            .ok_or_else(|| format!("`{s}`: expected cpu, cuda or cuda:N")),
    }
}

/// Resident set size of this process, MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn run(args: &Args) -> ExitCode {
    let config = EngineConfig {
        backend: args.backend,
        engines: args.engines.display().to_string(),
        cache_dir: args.cache_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        ..EngineConfig::default()
    };
    let manager = match VaeEngines::new(&config, args.device, None) {
        Ok(VaeEngines::Engines(m)) => m,
        Ok(VaeEngines::Torch(miss)) => {
            eprintln!("x2v build-engines: no engine can load here ({miss})");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("x2v build-engines: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend = manager.loader().backend();
    println!("| engine | serves | backend | load s | +host MiB | result |");
    println!("|---|---|---|---:|---:|---|");
    let mut failed = false;
    for spec in &manager.catalog().engines {
        let serves = match &spec.coverage {
            Coverage::Static(s) => s.to_string(),
            Coverage::Profiles { min, max, opt } => {
                let opt: Vec<String> = opt.iter().map(ToString::to_string).collect();
                format!("{min} .. {max} (opt {})", opt.join(", "))
            }
        };
        let before = rss_mib();
        let started = Instant::now();
        let result = manager.loader().load(spec);
        let seconds = started.elapsed().as_secs_f64();
        let held = rss_mib() - before;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(miss) => {
                failed = true;
                miss.to_string()
            }
        };
        println!(
            "| {} | {serves} | {backend} | {seconds:.2} | {held:.0} | {outcome} |",
            spec.name()
        );
        drop(result);
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

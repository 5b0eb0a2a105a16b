//! `x2v build-engines`: loads every engine of a VAE engine catalog once, on the provider a decoder
//! stage with the same settings would use. On the TensorRT provider that builds each engine (with
//! its optimisation profiles) and stores it in the cache directory, so a deployment's first
//! requests load a built engine instead of waiting for a build; elsewhere it proves the graphs
//! load. Prints one row per engine with its load time and the host memory the loaded engine holds
//! (the process's RSS while it is loaded minus before; each engine is dropped before the next).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use x2v_stage::config::DeviceChoice;
use x2v_trt::manager::Loader;
use x2v_trt::{BackendChoice, EngineConfig, Target, VaeEngines};

#[derive(clap::Args)]
pub struct Args {
    /// The engine catalog (`engines.toml`).
    #[arg(long)]
    engines: PathBuf,
    /// `auto`, `tensorrt` or `onnx`, as the decoder's `vae.backend`.
    #[arg(long, default_value = "auto", value_parser = BackendChoice::parse_engine)]
    backend: BackendChoice,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (cuda:0 when the NVIDIA driver reports a device).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// TensorRT engine and timing caches (the decoder's `vae.cache_dir`). Default: `trt-cache/`
    /// beside the catalog.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// The engine target `device` names on this host.
fn target(device: DeviceChoice) -> Target {
    match device {
        DeviceChoice::Cpu => Target::Cpu,
        DeviceChoice::Cuda(i) => Target::Cuda(i),
        DeviceChoice::Auto => {
            let gpu = x2v_models::cuda_driver::query().is_ok_and(|d| !d.devices.is_empty());
            if gpu { Target::Cuda(0) } else { Target::Cpu }
        }
    }
}

pub fn run(args: &Args) -> ExitCode {
    let config = EngineConfig {
        backend: args.backend,
        engines: args.engines.display().to_string(),
        cache_dir: args.cache_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        ..EngineConfig::default()
    };
    let manager = match VaeEngines::new(&config, target(args.device), None) {
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
        let before = x2v_models::weights::resident_mib();
        let started = Instant::now();
        let result = manager.loader().load(spec);
        let seconds = started.elapsed().as_secs_f64();
        let held = x2v_models::weights::resident_mib() - before;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(miss) => {
                failed = true;
                miss.to_string()
            }
        };
        println!(
            "| {} | {} | {backend} | {seconds:.2} | {held:.0} | {outcome} |",
            spec.name(),
            spec.coverage
        );
        drop(result);
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

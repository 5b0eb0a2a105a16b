//! VAE decode per backend on the same latents: the libtorch decoder against the exported engines
//! of a catalog (ONNX Runtime, the provider `--backend` picks), one size at a time. Prints a table:
//! first-load cost of each engine, the host memory it added, the median decode, the ratio to
//! libtorch, and the largest difference between the two images.
//!
//! cargo run --release -p x2v-decoder --example bench_vae -- \
//!     --vae-dir DIR/vae --engines DIR/engines/engines.toml --sizes 256x256,512x512 --runs 3

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use x2v_models::qwen_image::vae::QwenImageVae;
use x2v_models::wan::vae::VaeParts;
use x2v_trt::{BackendChoice, EngineConfig, Size, VaeEngines};

struct Args {
    vae_dir: PathBuf,
    engines: PathBuf,
    sizes: Vec<Size>,
    runs: usize,
    backend: BackendChoice,
    device: Device,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        vae_dir: PathBuf::new(),
        engines: PathBuf::new(),
        sizes: vec![Size::new(256, 256)],
        runs: 3,
        backend: BackendChoice::Onnx,
        device: Device::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--vae-dir" => args.vae_dir = value()?.into(),
            "--engines" => args.engines = value()?.into(),
            "--sizes" => {
                args.sizes = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?
            }
            "--runs" => {
                let v = value()?;
                args.runs = v.parse().map_err(|_| format!("--runs: `{v}` is not a count"))?
            }
            "--backend" => {
                args.backend =
                    BackendChoice::parse_engine(&value()?).map_err(|e| format!("--backend {e}"))?
            }
            "--device" => {
                let v = value()?;
                args.device = x2v_models::device::parse_device(&v)?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.vae_dir.as_os_str().is_empty() || args.engines.as_os_str().is_empty() {
        return Err("--vae-dir and --engines are required".into());
    }
    Ok(args)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("bench_vae: {e}");
        std::process::exit(2)
    });
    let _guard = tch::no_grad_guard();
    let kind = if args.device == Device::Cpu { Kind::Float } else { Kind::BFloat16 };
    let before = x2v_models::weights::resident_mib();
    let started = Instant::now();
    let vae = QwenImageVae::load_parts(&args.vae_dir, args.device, kind, VaeParts::Decoder)
        .unwrap_or_else(|e| panic!("loading {}: {e}", args.vae_dir.display()));
    let torch_load = started.elapsed();
    let torch_mib = x2v_models::weights::resident_mib() - before;
    let target = x2v_decoder::vae::target(args.device);
    let config = EngineConfig {
        backend: args.backend,
        engines: args.engines.display().to_string(),
        ..EngineConfig::default()
    };
    let engines = VaeEngines::new(&config, target, None).unwrap_or_else(|e| panic!("{e}"));
    let Some(backend) = engines.backend() else {
        let VaeEngines::Torch(miss) = &engines else { unreachable!() };
        panic!("no engine backend here: {miss}");
    };
    println!(
        "libtorch decoder ({kind:?} on {:?}): loaded in {:.2} s, +{torch_mib:.0} MiB host",
        args.device,
        torch_load.as_secs_f64()
    );
    println!(
        "| size | backend | first load s | +host MiB | decode s (median of {}) | speed-up over libtorch | max abs diff |",
        args.runs
    );
    println!("|---|---|---|---|---|---|---|");
    for size in &args.sizes {
        let shape = size.latent_shape();
        let latents = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let flat = Vec::<f32>::try_from(&latents.view([-1])).unwrap();

        let decode_torch = || {
            let t = Instant::now();
            let out =
                vae.decode_latents(&latents).unwrap().to_kind(Kind::Float).to_device(Device::Cpu);
            (out, t.elapsed())
        };
        let (reference, _) = decode_torch(); // warm-up
        let torch = median((0..args.runs).map(|_| decode_torch().1).collect());

        let before = x2v_models::weights::resident_mib();
        let t = Instant::now();
        let first = engines.decode(*size, &flat).unwrap_or_else(|m| panic!("{size}: {m}"));
        let first_time = t.elapsed();
        let added = x2v_models::weights::resident_mib() - before;
        let runs: Vec<Duration> = (0..args.runs)
            .map(|_| {
                let t = Instant::now();
                engines.decode(*size, &flat).unwrap();
                t.elapsed()
            })
            .collect();
        let engine = median(runs);
        let image = Tensor::from_slice(&first.0).view(size.image_shape());
        let diff = (&image - &reference).abs().max().double_value(&[]);
        // The first decode is the load plus one decode.
        let load = first_time.saturating_sub(engine);
        println!("| {size} | torch | - | - | {:.3} | 1.00 | - |", torch.as_secs_f64());
        println!(
            "| {size} | {backend} | {:.2} | {added:.0} | {:.3} | {:.2}x | {diff:.2e} |",
            load.as_secs_f64(),
            engine.as_secs_f64(),
            torch.as_secs_f64() / engine.as_secs_f64()
        );
    }
}

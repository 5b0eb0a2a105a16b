//! Wan VAE decode benchmark: x2v vs diffusers on the same random weights and latents, same CPU
//! thread count, in one run. Prints a table; run with `--release`.
//!
//! `cargo run --release -p x2v-models --bin x2v-bench-vae -- --base-dim 32 --latent 3,16,16 --runs 5`

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor};
use x2v_models::bench::median;
use x2v_models::wan::vae::AutoencoderKLWan;

struct Args {
    base_dim: i64,
    latent: String,
    runs: usize,
    threads: i32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { base_dim: 32, latent: "3,16,16".into(), runs: 5, threads: 2 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--base-dim" => a.base_dim = value()?.parse()?,
            "--latent" => a.latent = value()?,
            "--runs" => a.runs = value()?.parse()?,
            "--threads" => a.threads = value()?.parse()?,
            "-h" | "--help" => {
                println!("x2v-bench-vae [--base-dim N] [--latent T,H,W] [--runs N] [--threads N]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other:?} (try --help)"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

fn python() -> PathBuf {
    std::env::var_os("X2V_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".cache/x2v/venv/bin/python")
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/bench/wan_vae_decode.py");
    let dir = std::env::temp_dir().join(format!("x2v-bench-vae-{}", std::process::id()));
    let result = run(&args, &script, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, script: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    eprintln!("running diffusers ({} runs)...", args.runs);
    let out = Command::new(python())
        .arg(script)
        .arg("--out")
        .arg(dir)
        .args(["--base-dim", &args.base_dim.to_string(), "--latent", &args.latent])
        .args(["--runs", &args.runs.to_string(), "--threads", &args.threads.to_string()])
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed:\n{}", script.display(), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("no output from the Python timer")?;
    let py: serde_json::Value = serde_json::from_str(line)?;
    let py_times: Vec<f64> =
        py["times_s"].as_array().context("times_s")?.iter().filter_map(|v| v.as_f64()).collect();

    eprintln!("running x2v ({} runs)...", args.runs);
    tch::set_num_threads(args.threads);
    let vae = AutoencoderKLWan::load(&dir.join("vae"), None, Device::Cpu, Kind::Float)?;
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("io.safetensors"))?.into_iter().collect();
    let z = &io["z"];
    let mut decoded = vae.decode(z)?; // warm-up
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        decoded = vae.decode(z)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let diff = (&decoded - &io["decoded"]).abs().max().double_value(&[]);
    let (x2v, dif) = (median(&mut times.clone()), median(&mut py_times.clone()));
    let s = decoded.size();
    println!(
        "Wan VAE decode, CPU fp32, {} threads, base_dim {}, latent 1×16×{} -> video {}×{}×{}",
        args.threads,
        args.base_dim,
        args.latent.replace(',', "×"),
        s[2],
        s[3],
        s[4]
    );
    let fmt = |v: &[f64]| v.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(" ");
    println!("| impl      | median s | runs (s) |");
    println!("|-----------|----------|----------|");
    println!("| diffusers | {dif:8.3} | {} |", fmt(&py_times));
    println!("| x2v       | {x2v:8.3} | {} |", fmt(&times));
    println!("x2v / diffusers = {:.3}; max |x2v - diffusers| = {diff:.2e}", x2v / dif);
    Ok(())
}

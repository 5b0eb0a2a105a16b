//! The Wan2.2 A14B denoising loop on the CPU, x2v against diffusers on the same random experts and
//! embeddings: two transformers (high noise, then low noise below `boundary_ratio` 0.875), CFG
//! with a guidance scale per expert (4 and 3), UniPC with shift 12, fp32, same thread count. Prints
//! a table (median of several loops, per step); not a test.
//!
//! `cargo run --release -p x2v-models --bin x2v-bench-wan22 -- [--heads 12] [--layers 2]
//! [--ffn 8960] [--frames 5] [--size 256 256] [--steps 4] [--runs 2] [--rounds 2] [--threads 2]`;
//! needs `$X2V_PYTHON` with diffusers.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use x2v_models::bench::{median, parse_flags};
use x2v_models::schedulers::UniPcConfig;
use x2v_models::wan::pipeline::{
    DenoiseSettings, Expert, Geometry, Phase1, SchedulerChoice, denoise, load_dit,
};

struct Args {
    heads: i64,
    layers: i64,
    ffn: i64,
    frames: i64,
    size: [i64; 2],
    steps: i64,
    runs: i64,
    rounds: i64,
    threads: i64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        heads: 12,
        layers: 2,
        ffn: 8960,
        frames: 5,
        size: [256, 256],
        steps: 4,
        runs: 2,
        rounds: 2,
        threads: 2,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    parse_flags(
        &argv,
        &mut [
            ("--heads", std::slice::from_mut(&mut a.heads)),
            ("--layers", std::slice::from_mut(&mut a.layers)),
            ("--ffn", std::slice::from_mut(&mut a.ffn)),
            ("--frames", std::slice::from_mut(&mut a.frames)),
            ("--size", &mut a.size[..]),
            ("--steps", std::slice::from_mut(&mut a.steps)),
            ("--runs", std::slice::from_mut(&mut a.runs)),
            ("--rounds", std::slice::from_mut(&mut a.rounds)),
            ("--threads", std::slice::from_mut(&mut a.threads)),
        ],
    )?;
    if [a.runs, a.rounds, a.threads, a.steps].iter().any(|v| *v < 1) {
        return Err("--runs, --rounds, --threads and --steps must be positive".into());
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let python =
        std::env::var_os("X2V_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let dir = std::env::temp_dir().join(format!("x2v-bench-wan22-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let n = |v: i64| v.to_string();
    // Rounds alternate diffusers and x2v so that load from other processes hits both alike.
    let diffusers = |load: bool| -> Result<(Vec<f64>, String), Box<dyn Error>> {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("tools/bench/wan22_loop_diffusers.py"))
            .arg("--out")
            .arg(&dir)
            .args(["--heads", &n(args.heads), "--layers", &n(args.layers), "--ffn", &n(args.ffn)])
            .args(["--frames", &n(args.frames), "--size", &n(args.size[0]), &n(args.size[1])])
            .args(["--steps", &n(args.steps), "--runs", &n(args.runs)])
            .args(["--threads", &n(args.threads)]);
        if load {
            cmd.arg("--load");
        }
        if !cmd.status()?.success() {
            return Err("the diffusers timing script failed".into());
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("times.json"))?)?;
        let times = json["times"].as_array().ok_or("times.json lacks `times`")?;
        Ok((
            times.iter().filter_map(|t| t.as_f64()).collect(),
            json["torch"].as_str().unwrap_or("?").into(),
        ))
    };
    let (mut ref_times, torch) = diffusers(false)?;

    tch::set_num_threads(args.threads as i32);
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("io.safetensors"))?.into_iter().collect();
    let dit = load_dit(&dir.join("model"), Device::Cpu, Kind::Float)?;
    let phase1 = Phase1 {
        geometry: Geometry { frames: args.frames, height: args.size[0], width: args.size[1] },
        prompt_embeds: io["prompt_embeds"].shallow_clone(),
        negative_prompt_embeds: Some(io["negative_prompt_embeds"].shallow_clone()),
        image_embeds: None,
        condition: None,
        video_latents: None,
    };
    let settings = DenoiseSettings {
        steps: args.steps as usize,
        guidance_scale: 4.0,
        guidance_scale_2: Some(3.0),
        seed: 7,
        scheduler: SchedulerChoice::UniPc(UniPcConfig::wan(12.0)),
        batch_cfg: true,
        strength: None,
    };
    let mut experts = vec![];
    let out = denoise(&dit, &phase1, &settings, |p| experts.push(p.expert), || false)?; // warm-up
    let mut times = vec![];
    for round in 0..args.rounds {
        if round > 0 {
            ref_times.extend(diffusers(true)?.0);
        }
        for _ in 0..args.runs {
            let t0 = Instant::now();
            drop(denoise(&dit, &phase1, &settings, |_| {}, || false)?);
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let diff = (&out.latents - &io["latents"]).abs().max().double_value(&[]);
    let scale = io["latents"].abs().max().double_value(&[]);
    let _ = std::fs::remove_dir_all(&dir);

    let steps = args.steps as f64;
    let (x2v, reference) = (median(&mut times) / steps, median(&mut ref_times) / steps);
    let high = experts.iter().filter(|e| **e == Expert::High).count();
    println!(
        "Wan2.2 A14B denoising loop, CPU fp32: two experts of dim {} ({} heads), {} layers, ffn {}; \
         {} frames {}x{} ({} video tokens + 512 text), {} UniPC steps ({high} high-noise, {} \
         low-noise), CFG batched, {} threads; per step, median of {} loops in {} alternating rounds",
        args.heads * 128,
        args.heads,
        args.layers,
        args.ffn,
        args.frames,
        args.size[1],
        args.size[0],
        ((args.frames - 1) / 4 + 1) * (args.size[0] / 16) * (args.size[1] / 16),
        args.steps,
        experts.len() - high,
        args.threads,
        args.runs * args.rounds,
        args.rounds
    );
    println!("| implementation | s per step |");
    println!("|---|---|");
    println!("| diffusers `WanPipeline` with `transformer_2` (torch {torch}) | {reference:.3} |");
    println!("| x2v `denoise` with two experts | {x2v:.3} |");
    println!(
        "x2v / diffusers = {:.3}; final latents max |diff| {diff:.2e} (reference max |x| {scale:.2e})",
        x2v / reference
    );
    Ok(())
}

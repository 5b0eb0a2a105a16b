//! One Qwen-Image DiT forward on the CPU, x2v against diffusers on the same random weights and
//! inputs, fp32, same thread count. Prints a table (median of several runs); not a test.
//!
//! `cargo run --release -p x2v-models --bin x2v-bench-qwen-dit -- [--heads 12] [--layers 2]
//! [--grid H W] [--text 256] [--runs 3] [--rounds 2] [--threads 2]`; needs `$X2V_PYTHON` with
//! diffusers. The image is one `H×W` grid of packed tokens (default 32×32 = 1024 tokens).
//!
//! `--n N` adds a second table: one step's forward for `N` images of a request (`n` of the images
//! API) as one batch against `N` forwards back to back, alternating, x2v only.

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use x2v_models::bench::{median, min, parse_flags};
use x2v_models::qwen_image::transformer::QwenImageTransformer;

struct Args {
    heads: i64,
    layers: i64,
    grid: [i64; 2],
    text: i64,
    runs: i64,
    rounds: i64,
    threads: i64,
    n: i64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        heads: 12,
        layers: 2,
        grid: [32, 32],
        text: 256,
        runs: 3,
        rounds: 2,
        threads: 2,
        n: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    parse_flags(
        &argv,
        &mut [
            ("--heads", std::slice::from_mut(&mut a.heads)),
            ("--layers", std::slice::from_mut(&mut a.layers)),
            ("--grid", &mut a.grid[..]),
            ("--text", std::slice::from_mut(&mut a.text)),
            ("--runs", std::slice::from_mut(&mut a.runs)),
            ("--rounds", std::slice::from_mut(&mut a.rounds)),
            ("--threads", std::slice::from_mut(&mut a.threads)),
            ("--n", std::slice::from_mut(&mut a.n)),
        ],
    )?;
    if a.runs < 1 || a.rounds < 1 || a.threads < 1 {
        return Err("--runs, --rounds and --threads must be positive".into());
    }
    Ok(a)
}

/// Runs the diffusers timing script; returns its times and torch version.
fn diffusers(args: &Args, dir: &Path, load: bool) -> Result<(Vec<f64>, String), Box<dyn Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let python =
        std::env::var_os("X2V_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let n = |v: i64| v.to_string();
    let mut cmd = Command::new(python);
    cmd.arg(root.join("tools/bench/qwen_dit_diffusers.py"))
        .arg("--out")
        .arg(dir)
        .args(["--heads", &n(args.heads), "--layers", &n(args.layers), "--text", &n(args.text)])
        .args(["--runs", &n(args.runs), "--threads", &n(args.threads)])
        .args(["--grid", &n(args.grid[0]), &n(args.grid[1])]);
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
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse()?;
    let dir = std::env::temp_dir().join(format!("x2v-bench-qwen-dit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (mut ref_times, torch) = diffusers(&args, &dir, false)?;

    tch::set_num_threads(args.threads as i32);
    let io: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("io.safetensors"))?.into_iter().collect();
    let model =
        QwenImageTransformer::load(&dir.join("transformer"), None, Device::Cpu, Kind::Float)?;
    let (x, c, t) = (&io["hidden_states"], &io["encoder_hidden_states"], &io["timestep"]);
    let shapes = [(1, args.grid[0], args.grid[1])];
    let out = model.forward(x, c, None, t, &shapes)?; // warm-up, as on the Python side
    let mut x2v_times = Vec::new();
    // Rounds alternate diffusers and x2v so that load from other processes hits both alike.
    for round in 0..args.rounds {
        if round > 0 {
            ref_times.extend(diffusers(&args, &dir, true)?.0);
        }
        for _ in 0..args.runs {
            let t0 = Instant::now();
            drop(model.forward(x, c, None, t, &shapes)?);
            x2v_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let diff = (&out - &io["output"]).abs().max().double_value(&[]);
    let scale = io["output"].abs().max().double_value(&[]);
    let _ = std::fs::remove_dir_all(&dir);

    let (x2v, reference) = (median(&mut x2v_times), median(&mut ref_times));
    println!(
        "Qwen-Image DiT forward, CPU fp32: dim {} ({} heads), {} layers, {} image tokens + {} text, {} threads, median of {} runs in {} alternating rounds",
        args.heads * 128,
        args.heads,
        args.layers,
        args.grid[0] * args.grid[1],
        args.text,
        args.threads,
        args.runs * args.rounds,
        args.rounds
    );
    println!("| implementation | median s | min s |");
    println!("|---|---|---|");
    println!("| diffusers (torch {torch}) | {reference:.3} | {:.3} |", min(&ref_times));
    println!("| x2v | {x2v:.3} | {:.3} |", min(&x2v_times));
    println!(
        "x2v / diffusers = {:.3}; output max |diff| {diff:.2e} (reference max |x| {scale:.2e})",
        x2v / reference
    );
    if args.n > 1 {
        batched_vs_back_to_back(&args, &model, x, c, t, &shapes)?;
    }
    Ok(())
}

/// One step for `args.n` images: a batch of `n` against `n` forwards of one, alternating.
fn batched_vs_back_to_back(
    args: &Args,
    model: &QwenImageTransformer,
    x: &Tensor,
    c: &Tensor,
    t: &Tensor,
    shapes: &[(i64, i64, i64)],
) -> Result<(), Box<dyn Error>> {
    let n = args.n;
    let (xb, cb) = (x.repeat([n, 1, 1]), c.repeat([n, 1, 1]));
    let tb = t.reshape([-1]).narrow(0, 0, 1).expand([n], false).contiguous();
    drop(model.forward(&xb, &cb, None, &tb, shapes)?); // warm-up at this batch size
    let (mut batched, mut sequential) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds * args.runs {
        let t0 = Instant::now();
        drop(model.forward(&xb, &cb, None, &tb, shapes)?);
        batched.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..n {
            drop(model.forward(x, c, None, t, shapes)?);
        }
        sequential.push(t0.elapsed().as_secs_f64());
    }
    let (b, s) = (median(&mut batched), median(&mut sequential));
    println!();
    println!(
        "{n} images per step (one request, n = {n}), x2v, CPU fp32, median of {} alternating runs",
        args.rounds * args.runs
    );
    println!("| mode | median s per step | min s | per image s |");
    println!("|---|---|---|---|");
    println!("| one batch of {n} | {b:.3} | {:.3} | {:.3} |", min(&batched), b / n as f64);
    println!("| {n} back to back | {s:.3} | {:.3} | {:.3} |", min(&sequential), s / n as f64);
    println!("batched / back to back = {:.3}", b / s);
    Ok(())
}

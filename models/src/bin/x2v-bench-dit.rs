//! One Wan2.1 DiT forward on the CPU, x2v against diffusers on the same random weights and
//! inputs, fp32, same thread count. Prints a table (median of several runs); not a test.
//!
//! `cargo run --release -p x2v-models --bin x2v-bench-dit -- [--heads 12] [--layers 2]
//! [--ffn 8960] [--latent F H W] [--runs 3] [--rounds 2] [--threads 2] [--lora-rank 32]`; needs
//! `$X2V_PYTHON` with diffusers.
//!
//! The last rows time the same denoise-loop step with a LoRA adapter of `--lora-rank` on every
//! attention projection (q, k, v, o of self- and cross-attention) and both feed-forward layers of
//! every block, the usual targets of published Wan LoRAs, applied at run time as x2v serves them,
//! and the cost of putting the adapter on and taking it off; and the same step in bf16 (x2v only).

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use x2v_models::bench::{median, min, parse_flags};
use x2v_models::wan::transformer::WanTransformer3DModel;

struct Args {
    heads: i64,
    layers: i64,
    ffn: i64,
    latent: [i64; 3],
    runs: i64,
    rounds: i64,
    threads: i64,
    lora_rank: i64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        heads: 12,
        layers: 2,
        ffn: 8960,
        latent: [2, 32, 32],
        runs: 3,
        rounds: 2,
        threads: 2,
        lora_rank: 32,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    parse_flags(
        &argv,
        &mut [
            ("--heads", std::slice::from_mut(&mut a.heads)),
            ("--layers", std::slice::from_mut(&mut a.layers)),
            ("--ffn", std::slice::from_mut(&mut a.ffn)),
            ("--latent", &mut a.latent[..]),
            ("--runs", std::slice::from_mut(&mut a.runs)),
            ("--rounds", std::slice::from_mut(&mut a.rounds)),
            ("--threads", std::slice::from_mut(&mut a.threads)),
            ("--lora-rank", std::slice::from_mut(&mut a.lora_rank)),
        ],
    )?;
    if a.runs < 1 || a.rounds < 1 || a.threads < 1 || a.lora_rank < 1 {
        return Err("--runs, --rounds, --threads and --lora-rank must be positive".into());
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let python =
        std::env::var_os("X2V_PYTHON").map(PathBuf::from).unwrap_or_else(|| "python3".into());
    let dir = std::env::temp_dir().join(format!("x2v-bench-dit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let [f, h, w] = args.latent;
    let n = |v: i64| v.to_string();
    // Rounds alternate diffusers and x2v so that load from other processes hits both alike.
    let diffusers = |load: bool| -> Result<(Vec<f64>, String), Box<dyn Error>> {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("tools/bench/wan_dit_diffusers.py"))
            .arg("--out")
            .arg(&dir)
            .args(["--heads", &n(args.heads), "--layers", &n(args.layers), "--ffn", &n(args.ffn)])
            .args(["--runs", &n(args.runs), "--threads", &n(args.threads)])
            .args(["--latent", &n(f), &n(h), &n(w)]);
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
    let model = WanTransformer3DModel::load(&dir.join("transformer"), Device::Cpu, Kind::Float)?;
    let (x, t, c) = (&io["hidden_states"], &io["timestep"], &io["encoder_hidden_states"]);
    let out = model.forward(x, t, c, None)?; // warm-up, as on the Python side
    // In the denoise loop the conditioning is projected once per request, not once per step.
    let ctx = model.prepare_context(c, None)?;
    let (mut x2v_times, mut step_times) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if round > 0 {
            ref_times.extend(diffusers(true)?.0);
        }
        for _ in 0..args.runs {
            let t0 = Instant::now();
            drop(model.forward(x, t, c, None)?);
            x2v_times.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            drop(model.forward_prepared(x, t, &ctx)?);
            step_times.push(t0.elapsed().as_secs_f64());
        }
    }
    let lora = lora_timings(&model, &dir, &args, (x, t, c))?;
    let bf16 = bf16_step_times(&dir, &args, (x, t, c))?;
    let diff = (&out - &io["output"]).abs().max().double_value(&[]);
    let scale = io["output"].abs().max().double_value(&[]);
    let _ = std::fs::remove_dir_all(&dir);

    let (x2v, reference) = (median(&mut x2v_times), median(&mut ref_times));
    println!(
        "Wan DiT forward, CPU fp32: dim {} ({} heads), {} layers, ffn {}, {} video tokens + 512 text, {} threads, median of {} runs in {} alternating rounds",
        args.heads * 128,
        args.heads,
        args.layers,
        args.ffn,
        f * (h / 2) * (w / 2),
        args.threads,
        args.runs * args.rounds,
        args.rounds
    );
    println!("| implementation | median s | min s |");
    println!("|---|---|---|");
    println!("| diffusers (torch {torch}) | {reference:.3} | {:.3} |", min(&ref_times));
    println!("| x2v forward | {x2v:.3} | {:.3} |", min(&x2v_times));
    let step = median(&mut step_times);
    println!(
        "| x2v forward, context prepared once (denoise loop) | {step:.3} | {:.3} |",
        min(&step_times)
    );
    println!(
        "x2v / diffusers = {:.3} (forward), {:.3} (denoise-loop step); output max |diff| {diff:.2e} (reference max |x| {scale:.2e})",
        x2v / reference,
        step / reference
    );
    let mut bf16 = bf16;
    println!(
        "| x2v denoise-loop step, bf16 weights and activations | {:.3} | {:.3} |",
        median(&mut bf16),
        min(&bf16)
    );
    println!("bf16 / fp32 = {:.3} (denoise-loop step, medians)", median(&mut bf16) / step);
    let LoraTimes { mut without, with: mut with_lora, apply, clear } = lora;
    let (base, lora) = (median(&mut without), median(&mut with_lora));
    println!(
        "| x2v denoise-loop step, alternating with the next row | {base:.3} | {:.3} |",
        min(&without)
    );
    println!(
        "| x2v denoise-loop step with a rank-{} LoRA on {} layers | {lora:.3} | {:.3} |",
        args.lora_rank,
        args.layers * 10,
        min(&with_lora)
    );
    println!(
        "LoRA: step overhead {:+.1}% (medians of alternating runs); putting the adapter on {:.2} ms, taking it off {:.2} ms",
        (lora / base - 1.0) * 100.0,
        apply * 1e3,
        clear * 1e3
    );
    Ok(())
}

/// Denoise-loop step times of the same DiT loaded in bf16 (oneDNN's bf16 kernels on a CPU that
/// has them).
fn bf16_step_times(
    dir: &Path,
    args: &Args,
    (x, t, c): (&Tensor, &Tensor, &Tensor),
) -> Result<Vec<f64>, Box<dyn Error>> {
    let model = WanTransformer3DModel::load(&dir.join("transformer"), Device::Cpu, Kind::BFloat16)?;
    let (x, c) = (x.to_kind(Kind::BFloat16), c.to_kind(Kind::BFloat16));
    let ctx = model.prepare_context(&c, None)?;
    drop(model.forward_prepared(&x, t, &ctx)?); // warm-up
    let mut times = Vec::new();
    for _ in 0..args.runs * args.rounds {
        let t0 = Instant::now();
        drop(model.forward_prepared(&x, t, &ctx)?);
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Step seconds without and with the adapter (alternating runs), and the median seconds to put it
/// on and to take it off.
struct LoraTimes {
    without: Vec<f64>,
    with: Vec<f64>,
    apply: f64,
    clear: f64,
}

/// Denoise-loop step times without and with a synthetic rank-`lora_rank` adapter on every
/// attention projection and both FFN layers of every block (alternating), and the median seconds
/// to apply and to clear it.
fn lora_timings(
    model: &WanTransformer3DModel,
    dir: &Path,
    args: &Args,
    (x, t, c): (&Tensor, &Tensor, &Tensor),
) -> Result<LoraTimes, Box<dyn Error>> {
    let dim = args.heads * 128;
    let r = args.lora_rank;
    let mut tensors = Vec::new();
    for b in 0..args.layers {
        for attn in ["attn1", "attn2"] {
            for p in ["to_q", "to_k", "to_v", "to_out.0"] {
                tensors.push((format!("transformer.blocks.{b}.{attn}.{p}"), dim, dim));
            }
        }
        tensors.push((format!("transformer.blocks.{b}.ffn.net.0.proj"), dim, args.ffn));
        tensors.push((format!("transformer.blocks.{b}.ffn.net.2"), args.ffn, dim));
    }
    let named: Vec<(String, Tensor)> = tensors
        .into_iter()
        .flat_map(|(m, d_in, d_out)| {
            [
                (
                    format!("{m}.lora_A.weight"),
                    Tensor::randn([r, d_in], (Kind::Float, Device::Cpu)) * 0.01,
                ),
                (
                    format!("{m}.lora_B.weight"),
                    Tensor::randn([d_out, r], (Kind::Float, Device::Cpu)) * 0.01,
                ),
            ]
        })
        .collect();
    let path = dir.join("lora.safetensors");
    Tensor::write_safetensors(&named, &path)?;
    let adapter = std::rc::Rc::new(x2v_models::wan::lora::load_adapter("bench", &path)?);
    let base_ctx = model.prepare_context(c, None)?;
    // Runs alternate without and with the adapter, so that drift hits both alike. Cross-attention
    // keys and values depend on the adapter: its context is prepared while it is on.
    x2v_models::wan::lora::set_loras(model, &[(adapter.clone(), 1.0)])?;
    let lora_ctx = model.prepare_context(c, None)?;
    drop(model.forward_prepared(x, t, &lora_ctx)?); // warm-up
    let (mut without, mut with, mut apply, mut clear) = (vec![], vec![], vec![], vec![]);
    for _ in 0..args.runs * args.rounds {
        let t0 = Instant::now();
        x2v_models::wan::lora::clear_loras(model);
        clear.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        drop(model.forward_prepared(x, t, &base_ctx)?);
        without.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        x2v_models::wan::lora::set_loras(model, &[(adapter.clone(), 1.0)])?;
        apply.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        drop(model.forward_prepared(x, t, &lora_ctx)?);
        with.push(t0.elapsed().as_secs_f64());
    }
    x2v_models::wan::lora::clear_loras(model);
    Ok(LoraTimes { without, with, apply: median(&mut apply), clear: median(&mut clear) })
}

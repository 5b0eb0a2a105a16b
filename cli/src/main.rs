//! `x2v`: the command line of the x2v video/image generation service.
//!
//! - `x2v up`: the gateway and all three stages in one process (embedded queue, no Redis).
//! - `x2v gateway`, `x2v encoder`, `x2v dit`, `x2v decoder`: one service per process, on Redis.
//! - `x2v generate`: one video (Wan2.1) or image (Qwen-Image) in this process, no server.
//! - `x2v doctor`: checks this host (libtorch, devices, Redis, ffmpeg).

mod build_engines;
mod doctor;
mod generate;
mod generate_image;
mod serve;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "x2v", version, about = "x2v: disaggregated video and image diffusion serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway and all three stages in one process, on the embedded queue.
    Up(up::Args),
    /// The OpenAI-compatible gateway (jobs in Redis).
    Gateway(serve::GatewayArgs),
    /// The encoder stage service (UMT5; CLIP and the VAE encoder for i2v).
    Encoder(serve::StageArgs),
    /// The DiT stage service (transformer and sampling loop).
    Dit(serve::StageArgs),
    /// The decoder stage service (VAE decoder and media encoding).
    Decoder(serve::StageArgs),
    /// Generate one Wan2.1 video in this process (encoder, DiT and decoder stages in turn).
    Generate(generate::Args),
    /// Check this host: libtorch, CPU/CUDA devices, cuDNN, Redis, ffmpeg, binary compatibility.
    Doctor(doctor::Args),
    /// Write a tiny random-initialised demo model (diffusers layout) to a directory, e.g. to try
    /// the multi-process services without real weights: Wan (video) or Qwen-Image (images and
    /// edits). Its videos and images are noise.
    DemoModel(up::DemoModelArgs),
    /// Load every engine of a VAE engine catalog once on the decoder's provider: TensorRT builds
    /// the engines into its cache, so a deployment's first requests find them built.
    BuildEngines(build_engines::Args),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Up(args) => up::run(&args),
        Command::Gateway(args) => serve::gateway(&args),
        Command::Encoder(args) => serve::stage(serve::Which::Encoder, &args),
        Command::Dit(args) => serve::stage(serve::Which::Dit, &args),
        Command::Decoder(args) => serve::stage(serve::Which::Decoder, &args),
        Command::Generate(args) => generate::run(&args),
        Command::Doctor(args) => doctor::run(&args),
        Command::DemoModel(args) => up::demo_model(&args),
        Command::BuildEngines(args) => build_engines::run(&args),
    }
}

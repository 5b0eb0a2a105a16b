//! `x2v`: the command line of the x2v video/image generation service.
//!
//! `x2v doctor` checks this host (libtorch, devices, Redis, ffmpeg). `x2v generate` makes one
//! video in-process. `x2v up` will start the whole
//! system once the stage services exist; until then it says what is missing and fails.

mod doctor;
mod generate;

use std::path::PathBuf;
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
    /// Check this host: libtorch, CPU/CUDA devices, cuDNN, Redis, ffmpeg, binary compatibility.
    Doctor(doctor::Args),
    /// Generate one Wan2.1 video in this process (encoder, DiT and decoder stages) into a .npy file.
    Generate(generate::Args),
    /// Start the gateway and all three stages in one process (not built yet).
    Up {
        /// Model directory to serve (Wan2.1, original or diffusers layout).
        #[arg(long)]
        model_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Doctor(args) => doctor::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Up { .. } => {
            eprintln!(
                "x2v up: not available yet. The gateway (x2v-gateway), the job queue, the transfer \
                 library and the Wan2.1 models exist, but the encoder, DiT and decoder stage services \
                 that join them are not built, so there is no system to start. `x2v generate` runs the \
                 whole pipeline in one process; `x2v doctor` checks the host."
            );
            ExitCode::from(2)
        }
    }
}

//! `tpla`: the command-line client of the libtpla Rust API.
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function.

mod bench;
mod calibrate;
mod convert;
mod demo;
mod fidelity;
mod shard;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tpla",
    version,
    about = "Tensor-Parallel Latent Attention for MLA models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time decode steps of an attention backend against this machine's ceilings.
    Bench(bench::Args),
    /// Compare exact MLA with TPLA on a synthetic DeepSeek-V3-shaped layer.
    Demo(demo::Args),
    /// Export a prefill cache to shard files; inspect a shard file.
    Shard(shard::Args),
    /// Convert a Hugging Face MLA checkpoint into one TPLA weights file per rank.
    Convert(convert::Args),
    /// Write calibration files and fit each layer's transform and mu from one.
    Calibrate(calibrate::Args),
    /// TPLA against exact MLA over groups x transform x mu x append mode, on synthetic
    /// layers of each preset or on a checkpoint with a calibration file.
    Fidelity(fidelity::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Shard(args) => shard::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Fidelity(args) => fidelity::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tpla: {e}");
            ExitCode::FAILURE
        }
    }
}

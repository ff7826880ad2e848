//! `tpla`: the command-line client of the libtpla Rust API.
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function.

mod bench;
mod calibrate;
mod convert;
mod demo;
mod fidelity;
mod progress;
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
    /// Show no progress bars (they are only drawn when stderr is a terminal anyway).
    #[arg(long, short, global = true)]
    quiet: bool,
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
    progress::set_quiet(cli.quiet);
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every flag and argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tpla", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    /// One vocabulary: a preset shape is `--preset` and a checkpoint `--model` in every
    /// subcommand, and list-valued flags are named in the singular like their one-valued
    /// twins (`--transform`, `--preset`).
    #[test]
    fn flag_names_mean_the_same_everywhere() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                let plural = ["presets", "transforms", "models", "seeds"].contains(&long);
                let preset_named_model = long == "model" && help.contains("preset");
                if plural || preset_named_model {
                    bad.push(format!("{path} --{long}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&Cli::command(), "tpla", &mut bad);
        assert!(bad.is_empty(), "flags outside the vocabulary: {bad:?}");
    }
}

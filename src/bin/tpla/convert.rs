//! `tpla convert`: a Hugging Face MLA checkpoint -> one TPLA weights file per rank.

use std::path::PathBuf;
use tpla::calibration::{CalibrationFile, FitOptions};
use tpla::checkpoint::{convert, Checkpoint, ConvertOptions};
use tpla::fidelity::HADAMARD_SEED;
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory: config.json and model.safetensors[.index.json].
    #[arg(long)]
    model: PathBuf,
    /// Latent groups g (1, 2, 4 or 8).
    #[arg(long)]
    groups: usize,
    /// Ranks (a multiple of g; each group splits its heads over ranks/g ranks).
    /// Defaults to g.
    #[arg(long)]
    ranks: Option<usize>,
    /// identity, hadamard or pca (pca needs --calibration).
    #[arg(long)]
    transform: String,
    /// Per-slice logit scale: one, groups, variance (needs --calibration) or kl (needs
    /// calibration windows).
    #[arg(long)]
    mu: String,
    /// PCA slice layout: contiguous (slice 0 holds the largest components) or
    /// interleaved.
    #[arg(long, default_value = "contiguous")]
    layout: String,
    /// Calibration file (see `tpla calibrate`).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Seed of the randomised Hadamard transforms: layer l uses --hadamard-seed + l,
    /// like `tpla shard export` (whose default is the same).
    #[arg(long, default_value_t = HADAMARD_SEED)]
    hadamard_seed: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let calibration = args
        .calibration
        .as_ref()
        .map(CalibrationFile::open)
        .transpose()?;
    let opts = ConvertOptions {
        fit: FitOptions {
            transform: TransformKind::parse(&args.transform)?,
            layout: SliceLayout::parse(&args.layout)?,
            groups: args.groups,
            policy: MuPolicy::parse(&args.mu)?,
            hadamard_seed: args.hadamard_seed,
        },
        ranks: args.ranks.unwrap_or(args.groups),
    };
    let c = checkpoint.config();
    let d = c.dims;
    println!(
        "{}: {} layers, H={} d_c={} d_r={} d_n={} d_v={}, softmax scale {:.6}",
        args.model.display(),
        c.layers,
        d.heads,
        d.d_c,
        d.d_r,
        d.d_n,
        d.d_v,
        d.softmax_scale
    );
    let files = convert(
        &checkpoint,
        calibration.as_ref(),
        &opts,
        &args.out,
        |layer, fit| {
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            println!(
                "layer {layer}: mu [{}], slice energy [{}]",
                show(&fit.mus),
                show(&fit.fractions)
            );
        },
    )?;
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

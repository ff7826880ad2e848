//! `tpla calibrate`: write calibration files, and fit each layer's transform and mu
//! from one.

use serde_json::json;
use std::path::PathBuf;
use tpla::calibration::{
    fit_layer, synthetic_layers, write_synthetic, CalibrationFile, FitOptions, LayerCalibration,
    SyntheticCalibration,
};
use tpla::checkpoint::Checkpoint;
use tpla::convert::MlaWeights;
use tpla::fidelity::HADAMARD_SEED;
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::{Error, ModelDims, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Write a calibration file from synthetic layers of a preset shape (layer l uses
    /// seed + l): per layer a latent sequence and a window with queries.
    Synthetic(SyntheticArgs),
    /// Fit every layer's transform U and per-slice mu from a calibration file and print
    /// them (the same fit `tpla convert --calibration` applies).
    Fit(FitArgs),
}

#[derive(clap::Args)]
struct SyntheticArgs {
    /// Model preset whose layer shape is used.
    #[arg(long, default_value = "deepseek-v2-lite")]
    preset: String,
    /// Layers of the file (synthetic layers 0..layers).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Latent tokens per layer (they feed PCA).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens of each layer's window.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Queries of each window (its last positions).
    #[arg(long, default_value_t = 2)]
    queries: usize,
    /// Seed of the synthetic layers (layer l uses seed + l) and of their sequences.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Calibration file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct FitArgs {
    /// Calibration file to fit on (see `tpla calibrate synthetic`).
    #[arg(long)]
    calibration: PathBuf,
    /// Checkpoint whose weights the kl policy absorbs the queries with.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Instead of --model: the synthetic layers the file was generated from.
    #[arg(long)]
    preset: Option<String>,
    /// Seed of the synthetic layers (with --preset).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Latent groups g (1, 2, 4 or 8).
    #[arg(long)]
    groups: usize,
    /// identity, hadamard or pca.
    #[arg(long, default_value = "pca")]
    transform: String,
    /// Per-slice logit scale: one, groups, variance or kl.
    #[arg(long, default_value = "kl")]
    mu: String,
    /// PCA slice layout: contiguous or interleaved.
    #[arg(long, default_value = "contiguous")]
    layout: String,
    /// Seed of the randomised Hadamard transforms (layer l uses --hadamard-seed + l).
    #[arg(long, default_value_t = HADAMARD_SEED)]
    hadamard_seed: u64,
    /// One JSON object per layer instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Synthetic(a) => synthetic(a),
        Command::Fit(a) => fit(a),
    }
}

fn synthetic(a: SyntheticArgs) -> Result<()> {
    let dims = ModelDims::preset(&a.preset)?;
    let layers = synthetic_layers(&dims, a.layers, a.seed)?;
    let spec = SyntheticCalibration {
        tokens: a.tokens,
        window: a.window,
        queries: a.queries,
        seed: a.seed.wrapping_add(1 << 32),
    };
    let path = write_synthetic(&a.out, &layers, &spec)?;
    println!(
        "wrote {}: {} layers of {}, {} latent tokens and a {}-token window with {} queries each",
        path.display(),
        a.layers,
        a.preset,
        a.tokens,
        a.window,
        a.queries
    );
    Ok(())
}

fn fit(a: FitArgs) -> Result<()> {
    let file = CalibrationFile::open(&a.calibration)?;
    let shape = *file.shape();
    let weights: Box<dyn Fn(usize) -> Result<MlaWeights>> = match (&a.model, &a.preset) {
        (Some(dir), _) => {
            let ckpt = Checkpoint::open(dir)?;
            Box::new(move |l| ckpt.mla_weights(l))
        }
        (None, Some(preset)) => {
            let dims = ModelDims::preset(preset)?;
            let layers = synthetic_layers(&dims, shape.layers, a.seed)?;
            Box::new(move |l| Ok(layers[l].weights.clone()))
        }
        (None, None) => {
            return Err(Error::invalid(
                "give the model's weights: --model DIR, or --preset for synthetic layers",
            ))
        }
    };
    let opts = FitOptions {
        transform: TransformKind::parse(&a.transform)?,
        layout: SliceLayout::parse(&a.layout)?,
        groups: a.groups,
        policy: MuPolicy::parse(&a.mu)?,
        hadamard_seed: a.hadamard_seed,
    };
    for layer in 0..shape.layers {
        let w = weights(layer)?;
        if !shape.matches(&w.dims) {
            return Err(Error::mismatch(
                "the calibration file and the model have different layer shapes",
            ));
        }
        let cal = LayerCalibration::from_file(&file, layer)?;
        let fit = fit_layer(&w, Some(&cal), &opts, layer)
            .map_err(|e| e.context(format!("layer {layer}")))?;
        let top: Vec<f64> = fit
            .transform
            .eigenvalues()
            .map(|e| e.iter().take(8).copied().collect())
            .unwrap_or_default();
        if a.json {
            println!(
                "{}",
                json!({
                    "layer": layer,
                    "latent_tokens": cal.moment.count(),
                    "window_tokens": cal.window.as_ref().map(|w| w.tokens(shape.d_c)),
                    "transform": opts.transform.name(),
                    "groups": opts.groups,
                    "mu_policy": opts.policy.name(),
                    "mu": fit.mus,
                    "slice_energy": fit.fractions,
                    "top_eigenvalues": top,
                    "fingerprint": format!("{:016x}", fit.transform.fingerprint()),
                })
            );
        } else {
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "layer {layer}: {} latents, {} U {:016x}, mu [{}], slice energy [{}]{}",
                cal.moment.count(),
                opts.transform.name(),
                fit.transform.fingerprint(),
                show(&fit.mus),
                show(&fit.fractions),
                if top.is_empty() {
                    String::new()
                } else {
                    format!(", top eigenvalues [{}]", show(&top))
                }
            );
        }
    }
    Ok(())
}

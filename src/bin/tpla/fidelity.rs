//! `tpla fidelity`: TPLA against exact MLA over a grid of configurations, on synthetic
//! layers of each preset or on a checkpoint's layers with a calibration file.

use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tpla::calibration::{CalibrationFile, LayerCalibration};
use tpla::checkpoint::Checkpoint;
use tpla::fidelity::{report, AppendChoice, ReportOptions, ReportRow, Scenario, Storage};
use tpla::geometry::PRESETS;
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::{Error, ModelDims, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Presets whose synthetic layers are measured (ignored with --model).
    #[arg(long = "preset", value_delimiter = ',', default_values_t = PRESETS.map(String::from))]
    presets: Vec<String>,
    /// Tokens of each synthetic sequence; the queries sit at its end.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Tokens appended at decode time in the short run (the rest is an exact prefill).
    #[arg(long, default_value_t = 16)]
    short: usize,
    /// Tokens appended at decode time in the long run.
    #[arg(long, default_value_t = 1024)]
    long: usize,
    /// Decode queries per synthetic sequence (its last positions).
    #[arg(long, default_value_t = 2)]
    queries: usize,
    /// Latent group counts g to measure (1, 2, 4, 8).
    #[arg(long, value_delimiter = ',', default_values_t = [2, 4, 8])]
    groups: Vec<usize>,
    /// Sequence shard counts s of each latent group (1 = none): every shard attends over
    /// the tokens the owner rule gives it and the shards merge by log-sum-exp, the
    /// hybrid (g, s) deployment (g = 1: exact sequence-sharded MLA).
    #[arg(long, value_delimiter = ',', default_values_t = [1])]
    seq_shards: Vec<usize>,
    /// Tokens per interleave block of the sequence sharding (block k on shard k mod s).
    #[arg(long, default_value_t = 1)]
    interleave: usize,
    /// Transforms to measure: identity, hadamard, pca.
    #[arg(long = "transform", value_delimiter = ',', default_values_t = ["identity".to_string(), "hadamard".to_string(), "pca".to_string()])]
    transforms: Vec<String>,
    /// Per-slice logit scale policies to measure: one, groups, variance, kl.
    #[arg(long, value_delimiter = ',', default_values_t = ["one".to_string(), "groups".to_string(), "variance".to_string(), "kl".to_string()])]
    mu: Vec<String>,
    /// How decode-time tokens are normalised: exact (the full latent's RMS) or
    /// sliced-rms (estimated from the rank's slice).
    #[arg(long, value_delimiter = ',', default_values_t = ["exact".to_string(), "sliced-rms".to_string()])]
    append: Vec<String>,
    /// How the cached rows are stored: f64 (as computed: the fidelity of TPLA itself),
    /// bf16, f16, f32, fp8_e4m3 (the FP8 cache), fp8_e4m3_pow2 (FP8 with power-of-two
    /// scales, a measurement only). With bf16 in the list every row also reports its
    /// distance from the bf16 rows' outputs ("vs bf16").
    #[arg(long = "dtype", value_delimiter = ',', default_values_t = ["f64".to_string()])]
    dtypes: Vec<String>,
    /// PCA slice layout: contiguous or interleaved.
    #[arg(long, default_value = "contiguous")]
    layout: String,
    /// Seed of the synthetic layers and sequences.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Checkpoint directory: measure its layers instead of synthetic ones (needs
    /// --calibration; each layer's last window is evaluated, its first fits kl).
    #[arg(long, requires = "calibration")]
    model: Option<PathBuf>,
    /// Calibration file of the checkpoint (see `tpla calibrate`): latents for PCA and
    /// windows to evaluate on.
    #[arg(long, requires = "model")]
    calibration: Option<PathBuf>,
    /// Checkpoint layers to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// One JSON object per configuration instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_all<T>(names: &[String], parse: fn(&str) -> Result<T>) -> Result<Vec<T>> {
    names.iter().map(|n| parse(n)).collect()
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let opts = ReportOptions {
        groups: args.groups.clone(),
        sequence: args
            .seq_shards
            .iter()
            .map(|&n| tpla::SequenceSharding::new(n, args.interleave))
            .collect::<Result<_>>()?,
        transforms: parse_all(&args.transforms, TransformKind::parse)?,
        policies: parse_all(&args.mu, MuPolicy::parse)?,
        appends: parse_all(&args.append, AppendChoice::parse)?,
        storages: parse_all(&args.dtypes, Storage::parse)?,
        layout: SliceLayout::parse(&args.layout)?,
        short: args.short,
        long: args.long,
    };
    if opts.short >= opts.long {
        return Err(Error::invalid(format!(
            "the long run must append more tokens than the short one, got --short {} --long {}",
            opts.short, opts.long
        )));
    }
    match (&args.model, &args.calibration) {
        (Some(model), Some(cal)) => {
            let ckpt = Checkpoint::open(model)?;
            let file = CalibrationFile::open(cal)?;
            let layers = if args.layers.is_empty() {
                (0..ckpt.config().layers).collect()
            } else {
                args.layers.clone()
            };
            let progress = crate::progress::bar(layers.len() as u64, "measuring");
            for layer in layers {
                progress.set_message(format!("layer {layer}"));
                let weights = ckpt.mla_weights(layer)?;
                let windows = file.window_count(layer);
                if windows == 0 {
                    return Err(Error::invalid(format!(
                        "layer {layer} of the calibration file has no window to evaluate on"
                    )));
                }
                let calibration = LayerCalibration::from_file(&file, layer)?;
                let eval = file.window(layer, windows - 1)?;
                let s = Scenario::from_window(weights, calibration, &eval)?;
                let source = format!(
                    "{} layer {layer} ({} tokens, {})",
                    model.display(),
                    s.tokens.len(),
                    if windows > 1 {
                        "evaluated on its last window, kl fitted on its first"
                    } else {
                        "one window: kl is fitted on the evaluated window"
                    }
                );
                let rows = report(&s, &opts)?;
                progress.suspend(|| emit(&args, &source, &s, &opts, &rows));
                progress.inc(1);
            }
            progress.finish_and_clear();
        }
        _ => {
            let progress = crate::progress::bar(args.presets.len() as u64, "measuring");
            for preset in &args.presets {
                progress.set_message(preset.clone());
                let dims = ModelDims::preset(preset)?;
                let s = Scenario::new(&dims, args.seed, args.context, args.queries)?;
                let source = format!("{preset} synthetic layer ({} tokens)", args.context);
                let rows = report(&s, &opts)?;
                progress.suspend(|| emit(&args, &source, &s, &opts, &rows));
                progress.inc(1);
            }
            progress.finish_and_clear();
        }
    }
    if !args.json {
        println!(
            "rel L2: |TPLA - MLA| / |MLA| of the summed head outputs; KL: mean over heads and \
             slices of KL(MLA attention || slice attention); short/long: the last {} / {} \
             tokens appended at decode time, the rest an exact prefill. {:.1} s.",
            args.short,
            args.long,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn emit(args: &Args, source: &str, s: &Scenario, opts: &ReportOptions, rows: &[ReportRow]) {
    if args.json {
        for r in rows {
            let m = |m: &tpla::fidelity::Metrics, appended: usize| json!({"appended": appended, "rel_l2": m.rel_l2, "cosine": m.cosine, "kl": m.kl, "rel_l2_vs_bf16": m.vs_bf16});
            println!(
                "{}",
                json!({
                    "source": source,
                    "tokens": s.tokens.len(),
                    "groups": r.groups,
                    "seq_shards": r.sharding.shards,
                    "interleave": r.sharding.interleave,
                    "transform": r.transform.name(),
                    "layout": opts.layout.name(),
                    "mu_policy": r.policy.name(),
                    "mu": r.mus,
                    "append": r.append.name(),
                    "dtype": r.storage.name(),
                    "short": m(&r.short, opts.short),
                    "long": m(&r.long, opts.long),
                })
            );
        }
        return;
    }
    println!("{source}");
    println!(
        "{:>2} {:>2}  {:<9} {:<8} {:<10} {:<13} {:<23} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8}",
        "g",
        "s",
        "transform",
        "mu",
        "append",
        "dtype",
        "mu values",
        "rel L2",
        "cosine",
        "KL",
        "vs bf16",
        "rel L2",
        "cosine",
        "KL",
        "vs bf16"
    );
    println!(
        "{:>75} | {:^35} | {:^35}",
        "",
        format!("short ({} appended)", opts.short),
        format!("long ({} appended)", opts.long)
    );
    for r in rows {
        println!("{}", line(r));
    }
    println!();
}

fn line(r: &ReportRow) -> String {
    let mus: Vec<String> = r.mus.iter().map(|m| format!("{m:.2}")).collect();
    let vs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    format!(
        "{:>2} {:>2}  {:<9} {:<8} {:<10} {:<13} {:<23} | {:>8.4} {:>8.5} {:>8.5} {:>8} | {:>8.4} {:>8.5} {:>8.5} {:>8}",
        r.groups,
        r.sharding.shards,
        r.transform.name(),
        r.policy.name(),
        r.append.name(),
        r.storage.name(),
        mus.join(","),
        r.short.rel_l2,
        r.short.cosine,
        r.short.kl,
        vs(r.short.vs_bf16),
        r.long.rel_l2,
        r.long.cosine,
        r.long.kl,
        vs(r.long.vs_bf16)
    )
}

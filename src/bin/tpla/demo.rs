//! `tpla demo`: exact MLA against TPLA on a synthetic layer, one table.

use indicatif::ProgressBar;
use std::time::Instant;
use tpla::fidelity::{build_transform, evaluate, AppendChoice, Prepared, Scenario};
use tpla::transform::{MuPolicy, SliceLayout, TransformKind};
use tpla::{DType, ModelDims, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Model preset whose layer shape is used: deepseek-v3, kimi-k2, deepseek-v2-lite.
    #[arg(long = "preset", default_value = "deepseek-v3")]
    model: String,
    /// Prefill tokens written to the cache before decoding.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Decode-time tokens appended after the prefill; the last queries are compared.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Decode queries compared with exact MLA (the last ones).
    #[arg(long, default_value_t = 2)]
    queries: usize,
    /// Seed of the synthetic layer and sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let dims = ModelDims::preset(&args.model)?;
    let s = Scenario::new(&dims, args.seed, args.context + args.decode, args.queries)?;
    let bytes = |g: usize| (dims.d_c / g + dims.d_r) * DType::Bf16.size();
    println!(
        "TPLA vs exact MLA: {} layer (H={}, d_c={}, d_r={}), {} prefill + {} decode tokens, \
         last {} queries, decode tokens appended with exact RMS",
        args.model, dims.heads, dims.d_c, dims.d_r, args.context, args.decode, args.queries
    );
    println!(
        "MLA (g=1) keeps {} B of bf16 cache per token on every rank.\n",
        bytes(1)
    );
    println!(
        "{:>2}  {:<9} {:<8} {:<17} {:>10} {:>9} {:>9} {:>8}",
        "g", "transform", "mu", "mu values", "rel L2", "cosine", "KL", "B/tok"
    );
    // One table block per (g, transform), computed concurrently and printed in order.
    let blocks: Vec<(usize, TransformKind)> = [2, 4]
        .into_iter()
        .flat_map(|g| {
            [
                TransformKind::Identity,
                TransformKind::Hadamard,
                TransformKind::Pca,
            ]
            .map(|kind| (g, kind))
        })
        .collect();
    let s = &s;
    let progress = crate::progress::bar((blocks.len() * POLICIES.len()) as u64, "measuring");
    let progress = &progress;
    let tables: Vec<Result<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = blocks
            .iter()
            .map(|&(g, kind)| {
                scope.spawn(move || block(s, g, kind, bytes(g), args.decode, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("demo worker panicked"))
            .collect()
    });
    progress.finish_and_clear();
    for t in tables {
        print!("{}", t?);
    }
    println!(
        "\nrel L2: |TPLA - MLA| / |MLA| of the summed head outputs; KL: mean over heads and \
         slices of KL(MLA attention || slice attention). PCA slices are contiguous (slice 0 \
         holds the largest components). {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The mu policies of every block, in table order.
const POLICIES: [MuPolicy; 4] = [
    MuPolicy::One,
    MuPolicy::Groups,
    MuPolicy::Variance,
    MuPolicy::Kl,
];

/// The rows of one (g, transform) block of the table; `progress` counts its policies.
fn block(
    s: &Scenario,
    g: usize,
    kind: TransformKind,
    bytes: usize,
    appended: usize,
    progress: &ProgressBar,
) -> Result<String> {
    let transform = build_transform(s, kind, SliceLayout::Contiguous, g)?;
    let prepared = Prepared::new(s, transform)?;
    let mut out = String::new();
    for policy in POLICIES {
        let mus = prepared.mus(s, g, policy)?;
        let m = evaluate(s, &prepared, &mus, AppendChoice::Exact, appended)?;
        let shown: Vec<String> = mus.iter().map(|m| format!("{m:.2}")).collect();
        out += &format!(
            "{:>2}  {:<9} {:<8} {:<17} {:>10.4} {:>9.5} {:>9.5} {:>8}\n",
            g,
            kind.name(),
            policy.name(),
            shown.join(","),
            m.rel_l2,
            m.cosine,
            m.kl,
            bytes
        );
        progress.inc(1);
    }
    Ok(out)
}

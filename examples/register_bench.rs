//! Shard registration cost: exports a DeepSeek-V3-shaped prefill cache (default 32K
//! tokens, 61 layers, g = 2, bf16) to shard files, then measures how long registering
//! rank 0's file takes and how much resident memory it adds, in both modes: zero-copy
//! (`register_file_mapped`, against reading one layer through the mapping) and the
//! default copy (`register_file`: read into memory and checksummed).
//!
//! `cargo run --release --example register_bench -- --help`

use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;
use tpla::attention::RowSource;
use tpla::cache::{ExportPlan, RankCache, ShardFileWriter, ShardSpec, TransformId};
use tpla::transform::Transform;
use tpla::{DType, ModelDims, ShardPlan};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 32768)]
    tokens: usize,
    #[arg(long, default_value_t = 61)]
    layers: usize,
    #[arg(long, default_value_t = 2)]
    groups: usize,
    #[arg(long, default_value = "deepseek-v3")]
    preset: String,
    /// Directory for the shard files (default: the system temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Registrations to time after the first.
    #[arg(long, default_value_t = 20)]
    repeats: usize,
}

/// Resident memory of this process (kB): total, anonymous, file-backed.
fn rss_kb() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

fn main() -> tpla::Result<()> {
    let args = Args::parse();
    let dims = ModelDims::preset(&args.preset)?;
    let transforms: Vec<TransformId> = (0..args.layers)
        .map(|l| Transform::hadamard(dims.d_c, 1000 + l as u64).map(|t| TransformId::of(&t)))
        .collect::<tpla::Result<_>>()?;
    let seqs = [(0u32, args.tokens)];
    let plan = ExportPlan::new(
        dims,
        args.groups,
        DType::Bf16,
        64,
        transforms.clone(),
        &seqs,
    )?;
    let dir = tempfile::tempdir_in(args.dir.unwrap_or_else(std::env::temp_dir))?;
    let paths: Vec<PathBuf> = (0..args.groups)
        .map(|g| dir.path().join(format!("bench.rank{g}.tpla")))
        .collect();

    // Unit-RMS random rows stand in for rotated normalised latents: registration never
    // looks at values.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let t = Instant::now();
    let mut writer = ShardFileWriter::create(&plan, &paths)?;
    let mut latent = vec![0.0; args.tokens * dims.d_c];
    let mut rope = vec![0.0; args.tokens * dims.d_r];
    for _ in 0..args.layers {
        latent
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-1.7..1.7));
        rope.iter_mut()
            .for_each(|v| *v = rng.random_range(-1.7..1.7));
        writer.push(&latent, &rope)?;
    }
    writer.commit()?;
    drop((latent, rope));
    let export_s = t.elapsed().as_secs_f64();
    let file_len = std::fs::metadata(&paths[0])?.len();
    println!(
        "export: {} files of {:.3} GB ({} tokens, {} layers, g = {}, bf16) in {export_s:.1} s",
        args.groups,
        file_len as f64 / 1e9,
        args.tokens,
        args.layers,
        args.groups
    );

    let spec = ShardSpec::new(
        dims,
        &ShardPlan::new(&dims, args.groups, 0)?,
        DType::Bf16,
        64,
        transforms,
    )?;
    let mut cache = RankCache::new(spec.clone(), 64)?;
    // the default: a copy the file's fate cannot reach
    let mut copies = Vec::new();
    for _ in 0..3 {
        let before = rss_kb();
        let t = Instant::now();
        cache.register_file(&paths[0])?;
        copies.push(t.elapsed().as_secs_f64());
        let after = rss_kb();
        println!(
            "register (copy and verify): {:.3} s ({:.2} GB/s), RSS +{} kB (anon +{}, file +{})",
            copies[copies.len() - 1],
            file_len as f64 / 1e9 / copies[copies.len() - 1],
            after.0 as i64 - before.0 as i64,
            after.1 as i64 - before.1 as i64,
            after.2 as i64 - before.2 as i64
        );
        cache.free_sequence(0)?;
    }
    drop(cache);
    let mut cache = RankCache::new(spec, 64)?;
    let before = rss_kb();
    let t = Instant::now();
    // SAFETY: the benchmark's own file, in its own temporary directory; nothing else
    // writes it.
    unsafe { cache.register_file_mapped(&paths[0]) }?;
    let first_us = t.elapsed().as_secs_f64() * 1e6;
    let after = rss_kb();
    let mut times = Vec::new();
    for _ in 0..args.repeats {
        cache.free_sequence(0)?;
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { cache.register_file_mapped(&paths[0]) }?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let median_us = times.get(times.len() / 2).copied().unwrap_or(first_us);
    let after_repeats = rss_kb();
    println!(
        "register mapped: first {first_us:.0} us, median of {} more {median_us:.0} us; \
         RSS {} -> {} kB (+{} kB; anon +{}, file +{}); after the repeats {} kB",
        args.repeats,
        before.0,
        after.0,
        after.0 as i64 - before.0 as i64,
        after.1 as i64 - before.1 as i64,
        after.2 as i64 - before.2 as i64,
        after_repeats.0
    );

    // Touching one layer through the mapping brings in that layer only.
    let view = cache.layer(0)?;
    let t = Instant::now();
    let mut checksum = 0u64;
    for page in 0..args.tokens.div_ceil(view.page_size()) {
        checksum = view
            .page(0, page)
            .iter()
            .step_by(64)
            .fold(checksum, |a, &b| a.wrapping_add(b as u64));
    }
    let layer_ms = t.elapsed().as_secs_f64() * 1e3;
    let touched = rss_kb();
    println!(
        "reading layer 0 through the mapping: {layer_ms:.1} ms, RSS +{} kB (layer is {} kB) \
         [{checksum}]",
        touched.0 as i64 - after_repeats.0 as i64,
        file_len / args.layers as u64 / 1024
    );

    drop(cache);
    let base = rss_kb();
    let t = Instant::now();
    let bytes = std::fs::read(&paths[0])?;
    let read_s = t.elapsed().as_secs_f64();
    let read = rss_kb();
    println!(
        "for contrast, reading the whole file into memory: {read_s:.2} s, RSS +{} kB [{}]",
        read.0 as i64 - base.0 as i64,
        bytes.len()
    );
    Ok(())
}

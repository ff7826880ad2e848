//! `tpla shard`: export a prefill cache to the g shard files of a TPLA decode group (g * s
//! with sequence shards), and
//! inspect (validate) a shard file. docs/shard-format.md describes the files.

use clap::{Args as ClapArgs, Subcommand};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;
use tpla::attention::reference::rotated_latents;
use tpla::cache::{ExportPlan, ShardFile, ShardFileWriter, TransformId, DEFAULT_PAGE_SIZE};
use tpla::fidelity::HADAMARD_SEED;
use tpla::synthetic::SyntheticLayer;
use tpla::transform::{Transform, TransformKind};
use tpla::{DType, Error, ModelDims, Result};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Cut a prefill cache (synthetic, or read from a file) into the g shard files.
    Export(ExportArgs),
    /// Print a shard file's header, validate it and check its data; exits non-zero with
    /// the reason on a bad file.
    Inspect(InspectArgs),
}

#[derive(ClapArgs)]
struct ExportArgs {
    /// Directory the shard files are written to.
    #[arg(long)]
    out: PathBuf,
    /// File name stem: files are `<name>.rank<i>-of-<g>.tpla`.
    #[arg(long, default_value = "prefill")]
    name: String,
    /// Model preset whose layer shape is used: deepseek-v3, kimi-k2, deepseek-v2-lite.
    #[arg(long, default_value = "deepseek-v3")]
    preset: String,
    /// Latent groups g (decode ranks).
    #[arg(long, default_value_t = 2)]
    groups: usize,
    /// Sequence shards s: with s > 1 the export writes g * s files, rank r = i * s + j
    /// holding latent slice i of the tokens on sequence shard j (format version 2).
    #[arg(long, default_value_t = 1)]
    seq_shards: usize,
    /// Tokens per interleave block of the sequence shards (block k on shard k mod s).
    #[arg(long, default_value_t = 1)]
    interleave: usize,
    /// Layers of the exported cache (synthetic layers 0..layers, or the --input file's).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Cache element type: bf16, f16, f32, fp8_e4m3.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tokens per page.
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE)]
    page_size: usize,
    /// Rotation of every layer: identity, or hadamard (layer l seeded with
    /// --hadamard-seed + l, as `tpla convert` does). PCA, the measured default of
    /// `tpla convert`, needs calibration and is not built here; identity is what a
    /// conversion without calibration uses.
    #[arg(long, default_value = "identity")]
    transform: String,
    /// Sequences as id:tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0:1024")]
    sequences: Vec<String>,
    /// Prefill cache to export instead of a synthetic one: little-endian f32,
    /// `[layer][sequence][token][d_c + d_r]`, each row the pre-norm latent a_t then the
    /// RoPE-rotated key; sequences in --sequences order. Rows are normalised exactly and
    /// rotated before slicing.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Seed of the synthetic layers and sequences.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed of the randomised Hadamard transforms; the same default as `tpla convert`,
    /// so that the shards match a converted weights file.
    #[arg(long, default_value_t = HADAMARD_SEED)]
    hadamard_seed: u64,
}

#[derive(ClapArgs)]
struct InspectArgs {
    /// The shard file.
    file: PathBuf,
    /// Skip reading the data region for its checksum.
    #[arg(long)]
    no_verify: bool,
    /// Print every layer's transform and every sequence.
    #[arg(long)]
    verbose: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Export(a) => export(a),
        Command::Inspect(a) => inspect(a),
    }
}

fn parse_sequences(list: &[String]) -> Result<Vec<(u32, usize)>> {
    list.iter()
        .map(|s| {
            let bad = || Error::invalid(format!("sequence '{s}' is not id:tokens"));
            let (id, len) = s.split_once(':').ok_or_else(bad)?;
            let len: usize = len.trim().parse().map_err(|_| bad())?;
            if len == 0 {
                return Err(Error::invalid(format!(
                    "sequence '{s}' has no tokens: an export holds prefilled sequences only"
                )));
            }
            Ok((id.trim().parse().map_err(|_| bad())?, len))
        })
        .collect()
}

fn layer_transform(kind: TransformKind, d_c: usize, seed: u64, layer: usize) -> Result<Transform> {
    match kind {
        TransformKind::Identity => Transform::identity(d_c),
        TransformKind::Hadamard => Transform::hadamard_for_layer(d_c, seed, layer),
        TransformKind::Pca => Err(Error::unsupported(
            "PCA rotations come from calibration data; export with identity or hadamard",
        )),
    }
}

/// Where the f64 rows of each (layer, sequence) come from.
enum Source {
    Synthetic { seed: u64 },
    File(BufReader<File>),
}

impl Source {
    /// Pre-norm latents `[T][d_c]` and RoPE keys `[T][d_r]` of one (layer, sequence).
    fn rows(
        &mut self,
        layer: Option<&SyntheticLayer>,
        dims: &ModelDims,
        id: u32,
        len: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        match self {
            Source::Synthetic { seed } => {
                let tokens = layer
                    .expect("synthetic layers are generated")
                    .sequence(len, *seed ^ (u64::from(id) << 32))
                    .tokens;
                Ok((tokens.latents, tokens.k_rope))
            }
            Source::File(reader) => {
                let width = dims.d_c + dims.d_r;
                let mut bytes = vec![0u8; len * width * 4];
                reader.read_exact(&mut bytes)?;
                let mut latents = Vec::with_capacity(len * dims.d_c);
                let mut rope = Vec::with_capacity(len * dims.d_r);
                for row in bytes.chunks_exact(width * 4) {
                    let values = row
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64);
                    for (j, v) in values.enumerate() {
                        if j < dims.d_c {
                            latents.push(v);
                        } else {
                            rope.push(v);
                        }
                    }
                }
                Ok((latents, rope))
            }
        }
    }
}

fn export(a: ExportArgs) -> Result<()> {
    let started = Instant::now();
    let dims = ModelDims::preset(&a.preset)?;
    let dtype = DType::parse(&a.dtype)?;
    let kind = TransformKind::parse(&a.transform)?;
    let sequences = parse_sequences(&a.sequences)?;
    let transforms = (0..a.layers)
        .map(|l| layer_transform(kind, dims.d_c, a.hadamard_seed, l))
        .collect::<Result<Vec<_>>>()?;
    let ids = transforms.iter().map(TransformId::of).collect();
    let sharding = tpla::SequenceSharding::new(a.seq_shards, a.interleave)?;
    let plan = ExportPlan::hybrid(
        dims,
        a.groups,
        sharding,
        dtype,
        a.page_size,
        ids,
        &sequences,
    )?;
    let mut source = match &a.input {
        None => Source::Synthetic { seed: a.seed },
        Some(path) => {
            let at = |e: std::io::Error| Error::from(e).context(path.display());
            let file = File::open(path).map_err(at)?;
            let tokens: usize = sequences.iter().map(|s| s.1).sum();
            let want = (a.layers * tokens * (dims.d_c + dims.d_r) * 4) as u64;
            let got = file.metadata().map_err(at)?.len();
            if got != want {
                return Err(Error::invalid(format!(
                    "{} is {got} bytes; {} layers of {tokens} tokens of {} f32 values make {want}",
                    path.display(),
                    a.layers,
                    dims.d_c + dims.d_r
                )));
            }
            Source::File(BufReader::with_capacity(1 << 20, file))
        }
    };
    std::fs::create_dir_all(&a.out)?;
    let paths: Vec<PathBuf> = (0..plan.ranks())
        .map(|r| {
            a.out
                .join(format!("{}.rank{r}-of-{}.tpla", a.name, plan.ranks()))
        })
        .collect();
    let mut writer = ShardFileWriter::create(&plan, &paths)?;
    let progress = crate::progress::bar((a.layers * sequences.len()) as u64, "exporting");
    for (l, transform) in transforms.iter().enumerate() {
        let layer = match source {
            Source::Synthetic { seed } => Some(SyntheticLayer::generate(&dims, seed + l as u64)?),
            Source::File(_) => None,
        };
        for &(id, len) in &sequences {
            let (latents, rope) = source
                .rows(layer.as_ref(), &dims, id, len)
                .map_err(|e| e.context(format!("layer {l}, sequence {id}")))?;
            writer.push(&rotated_latents(&latents, transform), &rope)?;
            progress.set_message(format!("layer {l}, sequence {id}"));
            progress.inc(1);
        }
    }
    progress.set_message("syncing the files");
    writer.commit()?;
    progress.finish_and_clear();
    let what = match &a.input {
        None => format!("synthetic {} layers (seed {})", a.preset, a.seed),
        Some(p) => p.display().to_string(),
    };
    println!(
        "exported {what}: {} layers, {} sequences, {} tokens, {} transform, {}, g = {}, s = {}",
        a.layers,
        sequences.len(),
        sequences.iter().map(|s| s.1).sum::<usize>(),
        kind.name(),
        dtype.name(),
        a.groups,
        sharding.shards
    );
    for (r, p) in paths.iter().enumerate() {
        let len = plan.image_len_of(r).expect("one path per rank");
        println!("  {} ({len} bytes)", p.display());
    }
    println!("in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn transform_name(code: u32) -> String {
    TransformKind::from_code(code).map_or_else(|_| format!("code {code}"), |k| k.name().into())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let t = Instant::now();
    let file = if a.no_verify {
        // SAFETY: only the metadata is read, right away; a file truncated meanwhile can
        // only end this inspection, nothing else lives in this process.
        unsafe { ShardFile::map(&a.file) }?
    } else {
        // reads the whole file and checks the data checksum
        ShardFile::read(&a.file)?
    };
    let open_s = t.elapsed().as_secs_f64();
    let h = file.header();
    let s = h.spec();
    let d = s.dims();
    let tokens: usize = h.sequences().iter().map(|e| e.len).sum();
    println!("file        {} ({} bytes)", a.file.display(), h.image_len());
    println!(
        "format      version {}, header and table checksums ok",
        h.version()
    );
    if s.is_sequence_shard() {
        let sh = s.sequence_sharding();
        println!(
            "sequence    shard {} of {} sequence shards, interleave {} tokens",
            s.sequence_shard(),
            sh.shards,
            sh.interleave
        );
    }
    println!(
        "model       heads {}, d_c {}, d_r {}, d_n {}, d_v {}, softmax scale {}",
        d.heads, d.d_c, d.d_r, d.d_n, d.d_v, d.softmax_scale
    );
    println!(
        "slice       latent group {} of {}: columns {}..{} and the RoPE key, {} values ({} bytes) a row",
        s.group(),
        s.groups(),
        s.slice_start(),
        s.slice_start() + s.slice_width(),
        s.row_width(),
        s.row_bytes()
    );
    println!(
        "pages       {}, {} tokens a page, stride {} bytes, {} pages a layer",
        s.dtype().name(),
        s.page_size(),
        s.page_stride(),
        h.pages_per_layer()
    );
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for t in s.transforms() {
        let name = transform_name(t.code);
        match kinds.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => kinds.push((name, 1)),
        }
    }
    let kinds: Vec<String> = kinds.iter().map(|(n, c)| format!("{n} x{c}")).collect();
    println!("layers      {}: {}", s.layers(), kinds.join(", "));
    if a.verbose {
        for (l, t) in s.transforms().iter().enumerate() {
            println!(
                "  layer {l:>4}  {:<9} fingerprint {:#018x}",
                transform_name(t.code),
                t.fingerprint
            );
        }
    }
    println!("sequences   {} ({tokens} tokens)", h.sequences().len());
    let shown = if a.verbose { h.sequences().len() } else { 8 };
    for e in h.sequences().iter().take(shown) {
        println!(
            "  id {:>10}  {:>9} tokens  pages {}..{}",
            e.id,
            e.len,
            e.first_page,
            e.first_page + e.len.div_ceil(s.page_size())
        );
    }
    if h.sequences().len() > shown {
        println!("  ... {} more (--verbose)", h.sequences().len() - shown);
    }
    let verified = if a.no_verify {
        "not verified".to_string()
    } else {
        format!("read and verified in {open_s:.3} s")
    };
    println!(
        "data        offset {}, {} bytes, crc32c {:#010x}, {verified}",
        h.data_offset(),
        h.data_len(),
        h.data_crc()
    );
    Ok(())
}

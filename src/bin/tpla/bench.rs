//! `tpla bench`: decode-step speed of an attention backend on synthetic caches, against
//! the machine's own ceilings measured in the same run (DESIGN 4).

use clap::Args as ClapArgs;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::time::{Duration, Instant};
use tpla::attention::cpu::{CpuBackend, KernelChoice};
use tpla::attention::RowSource;
use tpla::attention::{LatentAttention, LatentShape};
use tpla::cache::{RankCache, ShardSpec, TransformId, DEFAULT_PAGE_SIZE};
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::engine::{BlockTable, PagedCache, PagedLayout, PagedStep};
use tpla::transform::Transform;
use tpla::{DType, Error, HybridPlan, ModelDims, Result, SequenceSharding, ShardPlan};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Attention backend: `cpu`, or `cuda` in builds with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Model presets (comma-separated): deepseek-v3, kimi-k2, deepseek-v2-lite.
    #[arg(long = "preset", value_delimiter = ',', default_value = "deepseek-v3")]
    model: Vec<String>,
    /// Cached tokens per sequence (comma-separated list to sweep).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    context: Vec<usize>,
    /// Sequences per step.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Latent groups g (1 = plain MLA); the bench runs rank 0's slice with all heads.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    groups: Vec<usize>,
    /// Sequence shard counts s (1 = none): the bench runs rank (0, 0) of g latent groups
    /// times s sequence shards, whose cache holds the tokens of each sequence that the
    /// owner rule puts on shard 0 (the most of any shard), and reports the bytes each
    /// rank puts through the merge's collectives ((a) and (b) of `combine::sequence`).
    /// With `--backend cuda`, also the in-process device merges of every rank of the
    /// deployment emulated on the GPU (`combine::sequence_device`), timed.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seq_shards: Vec<usize>,
    /// Tokens per interleave block of the sequence sharding.
    #[arg(long, default_value_t = 1)]
    interleave: usize,
    /// Backend threads (default: every core).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Kernels: on the CPU auto, avx512-bf16, avx512f, avx2-fma, portable; on CUDA
    /// auto, wgmma (Hopper), mma-sync (v3). Each shape runs on each kernel in turn.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    kernel: Vec<String>,
    /// Cache element types (comma-separated): bf16, f16, f32, fp8_e4m3. Several are timed
    /// in the same rounds, so their ratios see the same machine load.
    #[arg(long, value_delimiter = ',', default_value = "bf16")]
    dtype: Vec<String>,
    /// Tokens per cache page.
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE)]
    page_size: usize,
    /// Timed steps per configuration, after two warm-up steps; the median is reported.
    /// Configurations take turns, one step each per round.
    #[arg(long, default_value_t = 9)]
    repeats: usize,
    /// MiB streamed by each read-bandwidth measurement (many times the last-level cache).
    #[arg(long, default_value_t = 512)]
    bandwidth_mib: usize,
    /// Seed of the synthetic cache rows and queries.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How each step is called (comma-separated): `kernel` (the backend alone over a
    /// library-owned cache) or `engine` (plan + paged decode through `tpla::engine` over
    /// an engine-owned pool with shuffled pages; with `--backend cuda`, the device path
    /// of `tpla::engine_device` over the same pool: the API's own cost is the difference).
    #[arg(long, value_delimiter = ',', default_value = "kernel")]
    api: Vec<String>,
    /// One JSON object per configuration instead of a table.
    #[arg(long)]
    json: bool,
}

/// A step through the engine API: a rank context with its own backend, the engine's
/// pool holding the same rows as the owned cache on shuffled pages, and a plan buffer.
struct EngineStep {
    ctx: RankContext,
    pool: Vec<u32>,
    layout: PagedLayout,
    table: Vec<i32>,
    width: usize,
    lens: Vec<i32>,
    plan: Vec<i32>,
}

impl EngineStep {
    fn new(
        cache: &RankCache,
        dims: ModelDims,
        plan: ShardPlan,
        backend: CpuBackend,
        batch: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let spec = cache.spec();
        let view = cache.layer(0)?;
        let (ps, rw) = (spec.page_size(), spec.row_width());
        let width = view.seq_len(0)?.div_ceil(ps);
        let layout = PagedLayout {
            dtype: spec.dtype(),
            row_width: rw,
            rope_width: spec.dims().d_r,
            page_size: ps,
            page_stride: spec.page_stride(),
            pages: batch * width,
        };
        let mut pool = vec![0u32; layout.extent()?.div_ceil(4)];
        let mut table: Vec<i32> = (0..(batch * width) as i32).collect();
        table.shuffle(rng);
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut pool);
        for b in 0..batch {
            for k in 0..width {
                let src = view.page(b as u32, k);
                let start = table[b * width + k] as usize * layout.page_stride;
                bytes[start..start + src.len()].copy_from_slice(src);
            }
        }
        let (w, heads) = (plan.slice_width, plan.heads);
        let layer = RankLayer::from_f32(
            vec![0.0; heads * w * dims.d_n],
            vec![0.0; heads * w * dims.d_v],
            1.0,
            Transform::identity(dims.d_c)?,
            1.0,
        )?;
        let mut ctx = RankContext::new(dims, plan, 1, Box::new(backend))?;
        ctx.install(0, layer)?;
        ctx.reserve(batch)?;
        let lens = vec![view.seq_len(0)? as i32; batch];
        let plan = vec![0; ctx.decode_plan_len(batch)];
        Ok(EngineStep {
            ctx,
            pool,
            layout,
            table,
            width,
            lens,
            plan,
        })
    }

    /// Plans and decodes one step; the queries are the kernel's rows (scale and mu 1).
    fn run(&mut self, q: &[f32], out: &mut [f32], lse: &mut [f32]) -> Result<()> {
        self.ctx.decode_plan(&self.lens, &mut self.plan)?;
        let step = PagedStep {
            cache: PagedCache::new(self.layout, bytemuck::cast_slice(&self.pool))?,
            block_table: BlockTable::new(&self.table, self.lens.len(), self.width)?,
            seq_lens: &self.lens,
            plan: &self.plan,
            softmax_scale: Some(1.0),
            mu: Some(1.0),
        };
        let faults =
            self.ctx
                .decode_paged(0, &step, Queries::Joined(q), Outputs::Latent { out, lse })?;
        if !faults.is_empty() {
            return Err(Error::new(
                tpla::ErrorKind::Backend,
                "the engine step faulted",
            ));
        }
        Ok(())
    }
}

/// Ceilings measured on one backend's threads, once per round.
#[derive(Default)]
struct Ceilings {
    read_bytes_per_s: Vec<f64>,
    /// Per element type of the run (the kernel path may depend on it).
    peak_flops: Vec<Vec<f64>>,
}

/// Median of `v` (sorted in place); `v` is not empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    if args.backend == "cuda" {
        return run_cuda(&args);
    }
    if args.backend != "cpu" {
        return Err(Error::unsupported(format!(
            "backend '{}' is not available in this build (cpu{})",
            args.backend,
            if cfg!(feature = "cuda") {
                ", cuda"
            } else {
                "; cuda needs the `cuda` feature"
            }
        )));
    }
    if args.repeats == 0
        || args.context.contains(&0)
        || args.batch.contains(&0)
        || args.bandwidth_mib == 0
    {
        return Err(Error::invalid(
            "repeats, context lengths, batch sizes and the bandwidth buffer must be positive",
        ));
    }
    let dtypes = args
        .dtype
        .iter()
        .map(|d| DType::parse(d))
        .collect::<Result<Vec<_>>>()?;
    let kernels = args
        .kernel
        .iter()
        .map(|k| KernelChoice::parse(k))
        .collect::<Result<Vec<_>>>()?;
    let models = args
        .model
        .iter()
        .map(|m| Ok((m.as_str(), ModelDims::preset(m)?)))
        .collect::<Result<Vec<_>>>()?;
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map_or(1, |n| n.get())]
    } else {
        args.threads.clone()
    };
    let max_batch = *args.batch.iter().max().expect("clap gives at least one");
    for api in &args.api {
        if api != "kernel" && api != "engine" {
            return Err(Error::invalid(format!(
                "unknown --api '{api}' (kernel, engine)"
            )));
        }
    }

    let mut backends = Vec::new();
    for &t in &threads {
        for &k in &kernels {
            let ceilings = Ceilings {
                read_bytes_per_s: Vec::new(),
                peak_flops: vec![Vec::new(); dtypes.len()],
            };
            backends.push((CpuBackend::with_kernel(t, k)?, ceilings));
        }
    }

    // Every configuration is set up first, then timed in rounds (one step of each per
    // round): a change of machine load during the run hits all of them alike.
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let shardings = args
        .seq_shards
        .iter()
        .map(|&n| SequenceSharding::new(n, args.interleave))
        .collect::<Result<Vec<_>>>()?;
    let mut caches = Vec::new();
    for &(model, dims) in &models {
        for &g in &args.groups {
            for &sharding in &shardings {
                let rank = HybridPlan::new(&dims, g, sharding, 0)?;
                let plan = rank.latent;
                for &context in &args.context {
                    // rank (0, 0)'s tokens of each sequence
                    let tokens = sharding.tokens_on(0, context as u64)? as usize;
                    for (di, &dtype) in dtypes.iter().enumerate() {
                        let cache = synthetic_cache(
                            &mut rng,
                            dims,
                            &plan,
                            dtype,
                            args.page_size,
                            tokens,
                            max_batch,
                        )?;
                        caches.push(BenchCache {
                            model,
                            groups: g,
                            sharding,
                            plan,
                            context,
                            tokens,
                            cache,
                            dims,
                            dtype: di,
                        });
                    }
                }
            }
        }
    }
    let mut configs = Vec::new();
    for (ci, c) in caches.iter().enumerate() {
        let (plan, cache, dims) = (&c.plan, &c.cache, &c.dims);
        let shape = LatentShape {
            heads: plan.heads,
            slice_width: plan.slice_width,
            d_r: dims.d_r,
        };
        for &batch in &args.batch {
            let sigma = 2.5 / (shape.row_width() as f64).sqrt();
            let q: Vec<f32> = (0..batch * shape.heads * shape.row_width())
                .map(|_| (sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect();
            for (bi, (kernel_backend, _)) in backends.iter().enumerate() {
                for api in &args.api {
                    let engine = match api.as_str() {
                        "engine" => {
                            let (t, k) = (kernel_backend.threads(), kernel_backend.kernel());
                            let backend = CpuBackend::with_kernel(t, k)?;
                            Some(EngineStep::new(
                                cache, *dims, *plan, backend, batch, &mut rng,
                            )?)
                        }
                        _ => None,
                    };
                    configs.push(Config {
                        cache: ci,
                        backend: bi,
                        shape,
                        batch,
                        q: q.clone(),
                        times: Vec::with_capacity(args.repeats),
                        engine,
                    });
                }
            }
        }
    }
    // the bandwidth buffer, written once so its pages exist before any timing
    let stream: Vec<u64> = (0..(args.bandwidth_mib << 17) as u64).collect();
    for round in 0..args.repeats + 2 {
        // ceilings in every round too, so they see the same machine load as the steps
        for (backend, ceil) in backends.iter_mut() {
            let bandwidth = backend.read_bandwidth(&stream);
            if round >= 2 {
                ceil.read_bytes_per_s.push(bandwidth);
            }
            // one peak per kernel path: element types that run the same kernel share it
            let mut peaks: Vec<(KernelChoice, f64)> = Vec::new();
            for (di, &dtype) in dtypes.iter().enumerate() {
                let kernel = backend.kernel_for(dtype);
                let peak = match peaks.iter().find(|p| p.0 == kernel) {
                    Some(p) => p.1,
                    None => backend.peak_flops(dtype, Duration::from_millis(20)),
                };
                peaks.push((kernel, peak));
                if round >= 2 {
                    ceil.peak_flops[di].push(peak);
                }
            }
        }
        for c in configs.iter_mut() {
            let layer = caches[c.cache].cache.layer(0)?;
            let seqs: Vec<u32> = (0..c.batch as u32).collect();
            let mut out = vec![0.0; c.batch * c.shape.heads * c.shape.slice_width];
            let mut lse = vec![0.0; c.batch * c.shape.heads];
            let backend = &mut backends[c.backend].0;
            let start = Instant::now();
            match &mut c.engine {
                Some(engine) => engine.run(&c.q, &mut out, &mut lse)?,
                None => backend.attend(&layer, c.shape, &seqs, &c.q, &mut out, &mut lse)?,
            }
            let secs = start.elapsed().as_secs_f64();
            // two warm-up rounds: thread start, page faults, scratch growth
            if round >= 2 {
                c.times.push(secs);
            }
            if out.iter().any(|v| !v.is_finite()) {
                return Err(Error::new(
                    tpla::ErrorKind::Backend,
                    format!("{} produced non-finite outputs", backend.name()),
                ));
            }
        }
    }

    let ceilings: Vec<(f64, Vec<f64>)> = backends
        .iter_mut()
        .map(|(_, c)| {
            let peaks = c.peak_flops.iter_mut().map(|p| median(p)).collect();
            (median(&mut c.read_bytes_per_s), peaks)
        })
        .collect();
    if !args.json {
        println!(
            "{:<16} {:>6} {:<8} {:>5} {:>5} {:>3} {:>3} {:>7} {:>7} {:>8} {:>8} {:>5} {:>3} {:<12} {:>10} {:>10} {:>7} {:>7} {:>9} {:>9} {:>8}",
            "model",
            "api",
            "dtype",
            "B/tok",
            "heads",
            "g",
            "s",
            "context",
            "tok/rk",
            "(a) KiB",
            "(b) KiB",
            "batch",
            "thr",
            "kernel",
            "us/step",
            "min us",
            "GB/s",
            "TFLOP/s",
            "ceil GB/s",
            "ceil TF/s",
            "roofline"
        );
    }
    for c in configs.iter_mut() {
        let bc = &caches[c.cache];
        let (model, g, sharding, context) = (bc.model, bc.groups, bc.sharding, bc.context);
        let dtype = dtypes[bc.dtype];
        let di = &bc.dtype;
        let backend = &backends[c.backend].0;
        let (read_bw, peak) = (ceilings[c.backend].0, ceilings[c.backend].1[*di]);
        let (shape, batch) = (c.shape, c.batch);
        // in round order: configurations timed in the same round saw the same load, so
        // their step-by-step ratios compare them more robustly than their medians
        let rounds_us: Vec<f64> = c.times.iter().map(|t| t * 1e6).collect();
        c.times.sort_by(f64::total_cmp);
        let secs = c.times[c.times.len() / 2];
        let best = c.times[0];
        // DESIGN 4: bytes and flops per token of context, per query, per rank
        let tokens = (batch * bc.tokens) as f64;
        // what one rank sends into the merge's collectives per step (examples/
        // sequence_merge_bench.rs): (a) its f32 log-sum-exps to the all-gather of its
        // group's shards and its f32 outputs to one all-reduce over all ranks; (b) its
        // f64 pack of d_v + 2 per row to the all-reduce over its group's shards, then its
        // f32 outputs to the all-reduce over the groups
        let (rows, d_v) = (batch * shape.heads, bc.dims.d_v);
        let s = sharding.shards;
        let outputs = if g * s > 1 { 4 * rows * d_v } else { 0 };
        let collective_a = outputs + if s > 1 { 4 * rows } else { 0 };
        let collective_b =
            if s > 1 { 8 * rows * (d_v + 2) } else { 0 } + if g > 1 { 4 * rows * d_v } else { 0 };
        let row_bytes = dtype.row_bytes(shape.slice_width, shape.d_r);
        let bytes = tokens * row_bytes as f64;
        let flops = tokens * 2.0 * (shape.heads * (2 * shape.slice_width + shape.d_r)) as f64;
        let (t_bytes, t_flops) = (bytes / read_bw, flops / peak);
        let roofline = t_bytes.max(t_flops);
        let kernel = backend.kernel_for(dtype).name();
        let api = if c.engine.is_some() {
            "engine"
        } else {
            "kernel"
        };
        if args.json {
            let record = serde_json::json!({
                "backend": "cpu",
                "api": api,
                "kernel": kernel,
                "dtype": dtype.name(),
                "bytes_per_token": row_bytes,
                "model": model,
                "heads": shape.heads,
                "groups": g,
                "seq_shards": s,
                "interleave": sharding.interleave,
                "slice_width": shape.slice_width,
                "context": context,
                "tokens_per_rank": bc.tokens,
                "bytes_per_token_per_rank": row_bytes as f64 * bc.tokens as f64 / context as f64,
                "bytes_per_step": bytes,
                "flops_per_step": flops,
                "collective_bytes_a": collective_a,
                "collective_bytes_b": collective_b,
                "batch": batch,
                "threads": backend.threads(),
                "page_size": args.page_size,
                "us_per_step": secs * 1e6,
                "us_per_step_min": best * 1e6,
                "us_per_round": rounds_us,
                "gbps": bytes / secs / 1e9,
                "tflops": flops / secs / 1e12,
                "read_gbps_ceiling": read_bw / 1e9,
                "peak_tflops_ceiling": peak / 1e12,
                "roofline_frac": roofline / secs,
                "bound": if t_bytes > t_flops { "bandwidth" } else { "compute" },
            });
            println!("{record}");
        } else {
            println!(
                "{:<16} {:>6} {:<8} {:>5} {:>5} {:>3} {:>3} {:>7} {:>7} {:>8.0} {:>8.0} {:>5} {:>3} {:<12} {:>10.0} {:>10.0} {:>7.2} {:>7.3} {:>9.1} {:>9.3} {:>8.2}",
                model,
                api,
                dtype.name(),
                row_bytes,
                shape.heads,
                g,
                s,
                context,
                bc.tokens,
                collective_a as f64 / 1024.0,
                collective_b as f64 / 1024.0,
                batch,
                backend.threads(),
                kernel,
                secs * 1e6,
                best * 1e6,
                bytes / secs / 1e9,
                flops / secs / 1e12,
                read_bw / 1e9,
                peak / 1e12,
                roofline / secs
            );
        }
    }
    Ok(())
}

/// One rank's synthetic cache and what it stands for.
struct BenchCache<'a> {
    model: &'a str,
    groups: usize,
    sharding: SequenceSharding,
    plan: ShardPlan,
    /// Tokens of each sequence, and those of them on this rank.
    context: usize,
    tokens: usize,
    cache: RankCache,
    dims: ModelDims,
    /// Index into the run's element types.
    dtype: usize,
}

/// One timed configuration: a cache, a backend, a batch, its queries and step times.
struct Config {
    cache: usize,
    backend: usize,
    shape: LatentShape,
    batch: usize,
    q: Vec<f32>,
    times: Vec<f64>,
    /// `--api engine`: the step goes through the engine API.
    engine: Option<EngineStep>,
}

/// A one-layer cache of rank `plan`'s slice holding `batch` sequences of `context`
/// random rows (the content does not change the timing; random rows keep it honest).
fn synthetic_cache(
    rng: &mut ChaCha8Rng,
    dims: ModelDims,
    plan: &ShardPlan,
    dtype: DType,
    page_size: usize,
    context: usize,
    batch: usize,
) -> Result<RankCache> {
    let transform = TransformId {
        code: 0,
        fingerprint: 0,
    };
    let spec = ShardSpec::new(dims, plan, dtype, page_size, vec![transform])?;
    let rw = spec.row_width();
    let mut cache = RankCache::new(spec, batch * context.div_ceil(page_size))?;
    const ROWS_PER_APPEND: usize = 4096;
    let mut rows = Vec::with_capacity(ROWS_PER_APPEND * rw);
    for seq in 0..batch as u32 {
        cache.add_sequence(seq)?;
        let mut left = context;
        while left > 0 {
            let n = left.min(ROWS_PER_APPEND);
            rows.clear();
            rows.extend((0..n * rw).map(|_| rng.sample::<f64, _>(StandardNormal)));
            cache.append_rows(seq, 0, &rows)?;
            left -= n;
        }
    }
    Ok(cache)
}

/// `--backend cuda`: the GPU's decode step timed with CUDA events
/// ([`tpla::attention::cuda::bench`]), bf16 or FP8 cache in pages of 64, against the read
/// bandwidth and cuBLAS bf16 rate measured at the start of the run.
#[cfg(feature = "cuda")]
fn run_cuda(args: &Args) -> Result<()> {
    use tpla::attention::cuda::bench::{measure, measure_ceilings, measure_engine, Case};
    use tpla::attention::cuda::{CudaBackend, DecodeKernel, PAGE_SIZE};
    if args.page_size != PAGE_SIZE {
        return Err(Error::unsupported(format!(
            "the CUDA backend caches rows in pages of {PAGE_SIZE} tokens"
        )));
    }
    let dtypes = args
        .dtype
        .iter()
        .map(|d| DType::parse(d))
        .collect::<Result<Vec<_>>>()?;
    if args.repeats == 0 || args.context.contains(&0) || args.batch.contains(&0) {
        return Err(Error::invalid(
            "repeats, context lengths and batch sizes must be positive",
        ));
    }
    let kernels = args
        .kernel
        .iter()
        .map(|k| match k.as_str() {
            "auto" => Ok(None),
            "wgmma" => Ok(Some(DecodeKernel::Wgmma)),
            "mma-sync" => Ok(Some(DecodeKernel::MmaSync)),
            other => Err(Error::invalid(format!(
                "unknown CUDA kernel {other:?} (auto, wgmma, mma-sync)"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    for api in &args.api {
        if api != "kernel" && api != "engine" {
            return Err(Error::invalid(format!(
                "unknown --api '{api}' (kernel, engine)"
            )));
        }
    }
    let mut backend = CudaBackend::new(0)?;
    let ceilings = measure_ceilings(&backend)?;
    let peak_tflops = ceilings.bf16_tflops.unwrap_or(f64::NAN);
    if !args.json {
        println!(
            "{} : read {:.0} GB/s, cuBLAS bf16 {:.0} TFLOP/s",
            backend.device().name(),
            ceilings.read_gbps,
            peak_tflops
        );
        println!(
            "{:<12} {:<11} {:<6} {:>5} {:>3} {:>3} {:>7} {:>7} {:>5} {:>6} {:>9} {:>9} {:>7} {:>6} {:>7} {:>6} {:>9} {:>9}",
            "model",
            "kernel",
            "api",
            "heads",
            "g",
            "s",
            "context",
            "tok/rk",
            "batch",
            "splits",
            "us/step",
            "min us",
            "GB/s",
            "%read",
            "TFLOP/s",
            "%mma",
            "(a) us",
            "(b) us"
        );
    }
    let shardings = args
        .seq_shards
        .iter()
        .map(|&n| SequenceSharding::new(n, args.interleave))
        .collect::<Result<Vec<_>>>()?;
    for model in &args.model {
        let dims = ModelDims::preset(model)?;
        for (&g, &sharding) in args
            .groups
            .iter()
            .flat_map(|g| shardings.iter().map(move |s| (g, s)))
        {
            // rank (0, 0): latent slice 0 of the tokens on sequence shard 0 (the most of
            // any shard), decoded by the same kernel as an unsharded rank
            let plan = HybridPlan::new(&dims, g, sharding, 0)?.latent;
            let s = sharding.shards;
            for (&context, &batch) in args
                .context
                .iter()
                .flat_map(|c| args.batch.iter().map(move |b| (c, b)))
            {
                let tokens = sharding.tokens_on(0, context as u64)? as usize;
                // the merge of every rank of the deployment, in process on this GPU
                let merges = if g * s > 1 {
                    Some(measure_merges(
                        dims,
                        g,
                        sharding,
                        context,
                        batch,
                        args.repeats.max(5),
                        args.seed,
                    )?)
                } else {
                    None
                };
                let (merge_a, merge_b) = merges.unwrap_or((f64::NAN, f64::NAN));
                let (rows, d_v) = (batch * plan.heads, dims.d_v);
                let outputs = if g * s > 1 { 4 * rows * d_v } else { 0 };
                let collective_a = outputs + if s > 1 { 4 * rows } else { 0 };
                let collective_b = if s > 1 { 8 * rows * (d_v + 2) } else { 0 }
                    + if g > 1 { 4 * rows * d_v } else { 0 };
                for ((&kernel, api), &dtype) in kernels
                    .iter()
                    .flat_map(|k| args.api.iter().map(move |a| (k, a)))
                    .flat_map(|ka| dtypes.iter().map(move |d| (ka, d)))
                {
                    let case = Case {
                        heads: plan.heads,
                        slice_width: plan.slice_width,
                        context: tokens,
                        batch,
                        dtype,
                    };
                    backend.set_decode_kernel(kernel);
                    let m = match api.as_str() {
                        "engine" => measure_engine(&backend, case, args.repeats.max(20))?,
                        _ => measure(&backend, case, args.repeats.max(20))?,
                    };
                    let (gbps, tflops) = (m.gbps(), m.tflops());
                    let roofline =
                        (m.bytes / (ceilings.read_gbps * 1e3)).max(m.flops / (peak_tflops * 1e6));
                    if args.json {
                        let record = serde_json::json!({
                            "backend": "cuda",
                            "api": api,
                            "device": backend.device().name(),
                            "kernel": m.kernel,
                            "dtype": dtype.name(),
                            "model": model,
                            "heads": plan.heads,
                            "groups": g,
                            "seq_shards": s,
                            "interleave": sharding.interleave,
                            "slice_width": plan.slice_width,
                            "context": context,
                            "tokens_per_rank": tokens,
                            "collective_bytes_a": collective_a,
                            "collective_bytes_b": collective_b,
                            "merge_a_us": merges.map(|m| m.0),
                            "merge_b_us": merges.map(|m| m.1),
                            "merge_a_frac": merges.map(|mm| mm.0 / m.median_us),
                            "merge_b_frac": merges.map(|mm| mm.1 / m.median_us),
                            "batch": batch,
                            "splits": m.splits,
                            "page_size": PAGE_SIZE,
                            "us_per_step": m.median_us,
                            "us_per_step_min": m.min_us,
                            "gbps": gbps,
                            "tflops": tflops,
                            "read_gbps_ceiling": ceilings.read_gbps,
                            "peak_tflops_ceiling": peak_tflops,
                            "roofline_frac": roofline / m.median_us,
                            "bound": if m.bytes / (ceilings.read_gbps * 1e3) > m.flops / (peak_tflops * 1e6) { "bandwidth" } else { "compute" },
                        });
                        println!("{record}");
                    } else {
                        println!(
                            "{:<12} {:<11} {:<6} {:>5} {:>3} {:>3} {:>7} {:>7} {:>5} {:>6} {:>9.1} {:>9.1} {:>7.0} {:>5.0}% {:>7.1} {:>5.0}% {:>9.1} {:>9.1}",
                            model,
                            m.kernel_kind,
                            api,
                            plan.heads,
                            g,
                            s,
                            context,
                            tokens,
                            batch,
                            m.splits,
                            m.median_us,
                            m.min_us,
                            gbps,
                            100.0 * gbps / ceilings.read_gbps,
                            tflops,
                            100.0 * tflops / peak_tflops,
                            merge_a,
                            merge_b
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Median host times (us) of the in-process device merges (a) and (b) of every rank of
/// `groups x sharding` emulated on GPU 0, at `batch` sequences of `context` tokens: each
/// rank's synthetic cache holds its share of the tokens; every timed merge follows a
/// fresh decode of every rank (not timed) and is synchronous (its kernels, copies and
/// the final wait).
#[cfg(feature = "cuda")]
fn measure_merges(
    dims: ModelDims,
    groups: usize,
    sharding: SequenceSharding,
    context: usize,
    batch: usize,
    repeats: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    use tpla::attention::cuda::CudaBackend;
    use tpla::combine::sequence_device::{merge_by_lse_on_device, merge_packed_on_device};
    use tpla::device_rank::DeviceRank;
    let mut ranks = (0..groups * sharding.shards)
        .map(|r| {
            let plan = HybridPlan::new(&dims, groups, sharding, r)?;
            let backend = CudaBackend::new(0)?;
            DeviceRank::synthetic_shard(backend, dims, &plan, 1, batch, context, seed ^ r as u64)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // one set of queries per latent group: every shard of a group sees the same
    let queries: Vec<Vec<f32>> = (0..groups)
        .map(|g| {
            let r = &ranks[g * sharding.shards];
            let sigma = 2.5 / (r.query_width() as f64).sqrt();
            (0..batch * r.plan().heads * r.query_width())
                .map(|_| (sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect()
        })
        .collect();
    // synthetic rows lie in [-1, 1): |k_rope| <= sqrt(d_r) bounds the RoPE keys
    let rope_key_norm = (dims.d_r as f64).sqrt();
    let seqs: Vec<u32> = (0..batch as u32).collect();
    let decode = |ranks: &mut [DeviceRank]| -> Result<()> {
        for (r, rank) in ranks.iter_mut().enumerate() {
            let q = &queries[r / sharding.shards];
            rank.decode_sequence_shard(0, &seqs, q, Some(rope_key_norm))?;
        }
        ranks[0].backend().device().synchronize()
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..repeats + 1 {
        decode(&mut ranks)?;
        let t = Instant::now();
        merge_by_lse_on_device(&mut ranks, 0, batch)?;
        let ta = t.elapsed().as_secs_f64();
        decode(&mut ranks)?;
        let t = Instant::now();
        merge_packed_on_device(&mut ranks, 0, batch)?;
        let tb = t.elapsed().as_secs_f64();
        // one warm-up round: the merge kernels load and the scratch is allocated
        if round >= 1 {
            a.push(ta * 1e6);
            b.push(tb * 1e6);
        }
    }
    Ok((median(&mut a), median(&mut b)))
}

//! The CPU backend: split-KV flash decoding over a paged slice cache.
//!
//! A batch step is cut into work items `(sequence, head group, chunk of cached rows)`.
//! Each item walks its chunk in tiles of [`tile::TILE_ROWS`] rows with an online
//! softmax; every loaded row serves all heads of the group (that sharing is what makes
//! MLA and TPLA decode bandwidth-efficient). The items' partial outputs are merged per
//! sequence and head with their log-sum-exps. Items run on a rayon pool the backend
//! owns (never the host's global pool), so the context decides how many cores decode
//! takes; a step that is one thread's work on a pool the backend owns alone runs on the
//! calling thread, which would otherwise wait for the pool (`runs_inline`).
//!
//! Kernels are picked at run time: AVX-512 BF16 (`vdpbf16ps`, bf16 caches), AVX-512F,
//! AVX2+FMA (a register-blocked tile of its own, `avx2.rs`), and a portable one. The
//! AVX-512 BF16 choice handles f16 and f32 caches with the AVX-512F kernel: `vdpbf16ps`
//! needs bf16 operands, and rounding an f32 cache to bf16 would lose the precision it
//! was stored with. FP8 caches (e4m3 with f32 block scales) are decoded in registers:
//! to the f32 panel by the f32 kernels, to bf16 rows per tile by the `vdpbf16ps` one.
//!
//! Non-finite cached values are not searched for (that would cost a second read of the
//! cache): a NaN in a row makes that row's scores NaN for every head, which propagates to
//! the sequence's outputs and log-sum-exps, so a damaged cache never yields a plausible
//! number. An infinite value gives NaN or infinite outputs the same way.

mod avx2;
mod bf16dot;
mod ceilings;
mod simd;
mod tile;

use super::reference::check_attend_args;
use super::{schedule, LatentAttention, LatentShape, RowSource};
use crate::decode::try_capacity;
use crate::dtype::DType;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use tile::{grow, Accum, TileGeo, TileRows, TileScratch, ROW_STEP, TILE_ROWS};

/// Which vector kernel the backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelChoice {
    /// The fastest kernel this CPU supports.
    Auto,
    /// `vdpbf16ps` for bf16 and FP8 caches (AVX-512F kernel for f16 and f32 caches).
    Avx512Bf16,
    Avx512F,
    Avx2Fma,
    /// Plain Rust, vectorised by the compiler for the build target; runs anywhere.
    Portable,
}

impl KernelChoice {
    /// Every concrete kernel, fastest first.
    pub const ALL: [KernelChoice; 4] = [
        KernelChoice::Avx512Bf16,
        KernelChoice::Avx512F,
        KernelChoice::Avx2Fma,
        KernelChoice::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Auto => "auto",
            KernelChoice::Avx512Bf16 => "avx512-bf16",
            KernelChoice::Avx512F => "avx512f",
            KernelChoice::Avx2Fma => "avx2-fma",
            KernelChoice::Portable => "portable",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        std::iter::once(KernelChoice::Auto)
            .chain(Self::ALL)
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown CPU kernel '{name}' (auto, avx512-bf16, avx512f, avx2-fma, portable)"
                ))
            })
    }

    /// Whether this CPU can run the kernel (`Auto` always can).
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                KernelChoice::Auto | KernelChoice::Portable => true,
                KernelChoice::Avx512Bf16 => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512bf16")
                }
                KernelChoice::Avx512F => is_x86_feature_detected!("avx512f"),
                KernelChoice::Avx2Fma => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            matches!(self, KernelChoice::Auto | KernelChoice::Portable)
        }
    }

    /// The concrete kernels this CPU can run, fastest first.
    pub fn available() -> Vec<KernelChoice> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The kernel that runs a cache of `dtype` under this choice.
    fn path(self, dtype: DType) -> Path {
        match (self, dtype) {
            (KernelChoice::Avx512Bf16, DType::Bf16 | DType::Fp8E4m3) => Path::Bf16Dot,
            (KernelChoice::Avx512Bf16 | KernelChoice::Avx512F, _) => Path::Avx512,
            (KernelChoice::Avx2Fma, _) => Path::Avx2,
            _ => Path::Portable,
        }
    }
}

/// A concrete tile kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Bf16Dot,
    Avx512,
    Avx2,
    Portable,
}

impl Path {
    fn lanes(self) -> usize {
        match self {
            Path::Bf16Dot | Path::Avx512 => 16,
            Path::Avx2 | Path::Portable => 8,
        }
    }
}

/// Heads of one work item at most: the query and output accumulators of a group
/// (128 heads x 512 latent columns: 256 KiB of f32 outputs) stay in a core's L2.
const MAX_GROUP_HEADS: usize = 128;
/// Work items aimed for per thread: enough to balance sequences of different lengths.
const ITEMS_PER_THREAD: usize = 4;
/// A chunk shorter than this costs more in merging than it gains in parallelism.
const MIN_CHUNK_ROWS: usize = 512;

/// Most threads one pool may have: more than any machine's cores today (a two-socket
/// server has a few hundred), and a bound on the time and memory a pool costs to start
/// (each thread has its own stack; 1024 threads start in about a second on 2 cores).
pub const MAX_THREADS: usize = 1024;

/// The fast CPU decode backend. See the module documentation.
pub struct CpuBackend {
    /// Shared by every backend made with [`CpuBackend::on_pool`] from the same pool.
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    kernel: KernelChoice,
    work: Workspace,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads)
            .field("kernel", &self.kernel)
            .finish()
    }
}

/// One work item: rows `start..end` of batch entry `batch`, heads of group `group`.
#[derive(Clone, Copy, Debug)]
struct WorkItem {
    batch: usize,
    group: usize,
    start: usize,
    end: usize,
}

/// Buffers reused across steps: they grow to the largest batch shape seen and are
/// never sized by context length.
#[derive(Default)]
struct Workspace {
    items: Vec<WorkItem>,
    /// `(first item, item count)` per (batch entry, head group).
    spans: Vec<(usize, usize)>,
    lens: Vec<usize>,
    /// Packed queries per (batch entry, head group): f32 `[xs][hp]`, f32 per block of
    /// head vectors (AVX2), or bf16 pairs.
    query_f32: Vec<f32>,
    query_bf16: Vec<u32>,
    /// Per item: outputs `[group heads][wp]`, running maximum `[hp]`, sum `[hp]`.
    partials: Vec<f32>,
    tiles: Vec<Mutex<TileScratch>>,
    zero_row: Vec<u8>,
}

impl CpuBackend {
    /// A backend with `threads` threads and the fastest kernel this CPU supports.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_kernel(threads, KernelChoice::Auto)
    }

    /// A backend with its own pool of `threads` threads and the given kernel; an
    /// `Unsupported` error when this CPU cannot run it.
    pub fn with_kernel(threads: usize, kernel: KernelChoice) -> Result<Self> {
        Self::on_pool(Self::thread_pool(threads)?, kernel)
    }

    /// A pool of `threads` (1 to [`MAX_THREADS`]) worker threads for
    /// [`on_pool`](Self::on_pool): backends sharing one pool take turns on its threads
    /// (their steps queue), so an engine with many contexts decides once how many cores
    /// decode takes.
    pub fn thread_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
        if threads == 0 || threads > MAX_THREADS {
            return Err(Error::invalid(format!(
                "the CPU backend needs between 1 and {MAX_THREADS} threads, got {threads}"
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tpla-cpu-{i}"))
            .build()
            .map_err(|e| Error::new(crate::ErrorKind::Backend, e.to_string()))?;
        Ok(Arc::new(pool))
    }

    /// A backend running on `pool` (from [`thread_pool`](Self::thread_pool)) with the
    /// given kernel.
    pub fn on_pool(pool: Arc<rayon::ThreadPool>, kernel: KernelChoice) -> Result<Self> {
        let threads = pool.current_num_threads();
        let kernel = match kernel {
            KernelChoice::Auto => KernelChoice::available()[0],
            k if k.is_available() => k,
            k => {
                return Err(Error::unsupported(format!(
                    "this CPU cannot run the {} kernel; available: {}",
                    k.name(),
                    KernelChoice::available()
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let work = Workspace {
            tiles: (0..threads).map(|_| Mutex::default()).collect(),
            ..Workspace::default()
        };
        Ok(CpuBackend {
            pool,
            threads,
            kernel,
            work,
        })
    }

    /// The kernel chosen at construction (never `Auto`).
    pub fn kernel(&self) -> KernelChoice {
        self.kernel
    }

    /// The kernel that runs caches of `dtype`: the chosen one, except that `Avx512Bf16`
    /// runs f16 and f32 caches with `Avx512F`.
    pub fn kernel_for(&self, dtype: DType) -> KernelChoice {
        match self.kernel.path(dtype) {
            Path::Bf16Dot => KernelChoice::Avx512Bf16,
            Path::Avx512 => KernelChoice::Avx512F,
            Path::Avx2 => KernelChoice::Avx2Fma,
            Path::Portable => KernelChoice::Portable,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The backend's own thread pool (the benchmark measures machine ceilings on it).
    pub fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }
}

impl LatentAttention for CpuBackend {
    fn name(&self) -> String {
        format!("cpu {} ({} threads)", self.kernel.name(), self.threads)
    }

    fn attend(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        self.attend_with(cache, shape, seqs, None, q, [1.0, 1.0], out, lse)
    }

    fn schedule_len(&self, shape: LatentShape, batch: usize) -> usize {
        let groups = head_groups(shape.heads).1;
        // saturating: a batch size from a caller must not wrap
        (SPAN_WORDS * groups)
            .saturating_mul(batch)
            .saturating_add(ITEM_WORDS.saturating_mul(max_items(batch, groups, self.threads)))
            .saturating_add(schedule::HEADER_WORDS)
    }

    fn schedule(&self, shape: LatentShape, lens: &[usize], out: &mut [i32]) -> Result<()> {
        if lens.contains(&0) {
            return Err(Error::invalid(
                "a decode schedule needs lengths of at least 1",
            ));
        }
        let groups = head_groups(shape.heads).1;
        let words = self.schedule_len(shape, lens.len());
        if out.len() < words {
            return Err(Error::invalid(format!(
                "the decode plan of {} sequences needs {words} words, the buffer holds {}",
                lens.len(),
                out.len()
            )));
        }
        let total: usize = lens.iter().sum();
        let target = item_target(groups, self.threads);
        let (spans, items) =
            out[schedule::HEADER_WORDS..].split_at_mut(SPAN_WORDS * lens.len() * groups);
        let (mut span, mut n) = (0, 0);
        for (b, &len) in lens.iter().enumerate() {
            let chunk = chunk_rows(len, total, target);
            for group in 0..groups {
                let first = n;
                for start in (0..len).step_by(chunk) {
                    let end = (start + chunk).min(len);
                    items[n * ITEM_WORDS..(n + 1) * ITEM_WORDS]
                        .copy_from_slice(&[b, group, start, end].map(word));
                    n += 1;
                }
                spans[span * SPAN_WORDS..(span + 1) * SPAN_WORDS]
                    .copy_from_slice(&[first, n - first].map(word));
                span += 1;
            }
        }
        let header = schedule::Header {
            kind: schedule::KIND_CPU,
            batch: lens.len(),
            heads: shape.heads,
            words: schedule::HEADER_WORDS + SPAN_WORDS * span + ITEM_WORDS * n,
            extra: [word(groups), word(n), 0],
        };
        schedule::write_header(&header, out)
    }

    fn attend_scheduled(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        schedule: &[i32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        self.attend_with(cache, shape, seqs, Some(schedule), q, [1.0, 1.0], out, lse)
    }

    fn scales_queries(&self) -> bool {
        true
    }

    fn attend_scaling(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        schedule: Option<&[i32]>,
        q: &[f32],
        scales: [f32; 2],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        self.attend_with(cache, shape, seqs, schedule, q, scales, out, lse)
    }

    fn reserve(&mut self, shape: LatentShape, batch: usize) -> Result<()> {
        let groups = head_groups(shape.heads).1;
        let items = max_items(batch, groups, self.threads);
        let blocks = batch.saturating_mul(groups);
        let work = &mut self.work;
        try_capacity(&mut work.lens, batch, "sequence lengths")?;
        try_capacity(&mut work.items, items, "work items")?;
        try_capacity(&mut work.spans, blocks, "work spans")?;
        for dtype in [DType::Bf16, DType::F16, DType::F32, DType::Fp8E4m3] {
            let (path, geo, _) = self.layout(shape, dtype);
            let work = &mut self.work;
            if path == Path::Bf16Dot {
                let len = shape.row_width().div_ceil(2) * geo.hp;
                try_capacity(&mut work.query_bf16, blocks.saturating_mul(len), "queries")?;
            } else {
                let len = geo.xs() * geo.hp;
                try_capacity(&mut work.query_f32, blocks.saturating_mul(len), "queries")?;
            }
            let part_len = geo.heads * geo.wp + 2 * geo.hp;
            try_capacity(
                &mut work.partials,
                items.saturating_mul(part_len),
                "partials",
            )?;
            grow(
                &mut work.zero_row,
                dtype.row_bytes(shape.slice_width, shape.d_r),
            );
            for t in &work.tiles {
                t.lock().expect("tile scratch lock").reserve(&geo);
            }
        }
        Ok(())
    }
}

/// `i32` words of one (sequence, head group) span and of one work item in a schedule.
const SPAN_WORDS: usize = 2;
const ITEM_WORDS: usize = 4;

/// A schedule word; every value written is below `i32::MAX` (lengths come from `i32`
/// sequence lengths, counts are bounded by the batch).
fn word(value: usize) -> i32 {
    i32::try_from(value).expect("schedule values fit in i32")
}

/// Equal groups of at most `MAX_GROUP_HEADS` heads, none of them empty: `(heads per
/// group, groups)`.
fn head_groups(heads: usize) -> (usize, usize) {
    let group_heads = heads
        .div_ceil(heads.div_ceil(MAX_GROUP_HEADS).max(1))
        .max(1);
    (group_heads, heads.div_ceil(group_heads))
}

/// The most work items [`plan_items`] makes for `batch` sequences: each sequence gets at
/// most one item per group beyond its share of `item_target` (see `plan_items`).
fn max_items(batch: usize, groups: usize, threads: usize) -> usize {
    // saturating: a batch size from a caller must not wrap
    groups.saturating_mul(item_target(groups, threads).saturating_add(batch))
}

/// Work items aimed for per (sequence set, head group).
fn item_target(groups: usize, threads: usize) -> usize {
    (ITEMS_PER_THREAD * threads).div_ceil(groups).max(1)
}

/// Rows per chunk of a sequence of `len` rows in a batch of `total` rows: a share of
/// `target` items proportional to its length, whole tiles, at least `MIN_CHUNK_ROWS`.
fn chunk_rows(len: usize, total: usize, target: usize) -> usize {
    let by_share = (target * len).div_ceil(total);
    let splits = by_share.min(len.div_ceil(MIN_CHUNK_ROWS)).max(1);
    len.div_ceil(splits).next_multiple_of(TILE_ROWS)
}

/// Reads a CPU schedule's items into `work`, checking that for every (sequence, head
/// group) they tile its rows `0..len` in order: a schedule made for other lengths, or
/// damaged, is refused before any row is read.
fn load_items(
    work: &mut Workspace,
    header: &schedule::Header,
    groups: usize,
    words: &[i32],
) -> Result<()> {
    let stale = |why: &str| {
        Error::invalid(format!(
            "the decode plan does not fit this step: {why} (plan again when the batch or its \
             lengths change)"
        ))
    };
    let batch = work.lens.len();
    let items = usize::try_from(header.extra[1]).map_err(|_| stale("negative item count"))?;
    if header.extra[0] != word(groups) {
        return Err(stale("it was made for another head grouping"));
    }
    let spans_end = schedule::HEADER_WORDS + SPAN_WORDS * batch * groups;
    if words.len() != spans_end + ITEM_WORDS * items {
        return Err(stale("its length is not that of its items"));
    }
    let (spans, item_words) = words[schedule::HEADER_WORDS..].split_at(SPAN_WORDS * batch * groups);
    let at = |w: i32| usize::try_from(w).unwrap_or(usize::MAX);
    work.items.clear();
    work.spans.clear();
    for (k, span) in spans.chunks_exact(SPAN_WORDS).enumerate() {
        let (b, group) = (k / groups, k % groups);
        let (first, count) = (at(span[0]), at(span[1]));
        if first != work.items.len() || count == 0 || count > items - first {
            return Err(stale("its spans do not follow each other"));
        }
        let mut next = 0;
        for it in
            item_words[first * ITEM_WORDS..(first + count) * ITEM_WORDS].chunks_exact(ITEM_WORDS)
        {
            let item = WorkItem {
                batch: at(it[0]),
                group: at(it[1]),
                start: at(it[2]),
                end: at(it[3]),
            };
            if item.batch != b
                || item.group != group
                || item.start != next
                || item.end <= item.start
            {
                return Err(stale("its work items do not tile the sequences"));
            }
            next = item.end;
            work.items.push(item);
        }
        if next != work.lens[b] {
            return Err(stale(&format!(
                "it covers {next} rows of batch entry {b}, which holds {}",
                work.lens[b]
            )));
        }
        work.spans.push((first, count));
    }
    Ok(())
}

impl CpuBackend {
    /// The kernel path, tile shapes and head-group count of a step of `shape` over a
    /// cache of `dtype`.
    fn layout(&self, shape: LatentShape, dtype: DType) -> (Path, TileGeo, usize) {
        let path = self.kernel.path(dtype);
        let lanes = path.lanes();
        let (group_heads, groups) = head_groups(shape.heads);
        let geo = TileGeo {
            heads: group_heads,
            hp: group_heads.next_multiple_of(lanes),
            w: shape.slice_width,
            wp: shape.slice_width.next_multiple_of(lanes),
            d_r: shape.d_r,
            dtype,
        };
        (path, geo, groups)
    }

    /// The one decode path of the backend: the batch's work items from `schedule` (or
    /// planned here), the query rows packed with their `scales` (latent, RoPE), run.
    #[allow(clippy::too_many_arguments)]
    fn attend_with(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        schedule: Option<&[i32]>,
        q: &[f32],
        scales: [f32; 2],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        check_attend_args(cache, shape, seqs, q, out, lse)?;
        let header = match schedule {
            Some(s) => Some(schedule::read_header(
                s,
                schedule::KIND_CPU,
                seqs.len(),
                shape,
            )?),
            None => None,
        };
        if seqs.is_empty() || shape.heads == 0 {
            // nothing to compute: the checked output buffers are empty
            return Ok(());
        }
        let (path, geo, groups) = self.layout(shape, cache.dtype());
        let work = &mut self.work;
        work.lens.clear();
        for &s in seqs {
            work.lens.push(cache.seq_len(s)?);
        }
        match (schedule, header) {
            (Some(s), Some(header)) => load_items(work, &header, groups, &s[..header.words])?,
            _ => plan_items(work, groups, self.threads),
        }
        self.run_items(cache, shape, seqs, path, geo, groups, q, scales, out, lse)
    }

    /// Runs the work items planned in `self.work` and merges their partial outputs.
    #[allow(clippy::too_many_arguments)]
    fn run_items(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        path: Path,
        geo: TileGeo,
        groups: usize,
        q: &[f32],
        scales: [f32; 2],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let group_heads = geo.heads;
        let work = &mut self.work;
        let q_block = pack_queries(work, path, &geo, shape, groups, q, scales);
        let part_len = geo.heads * geo.wp + 2 * geo.hp;
        grow(&mut work.partials, work.items.len() * part_len);
        grow(
            &mut work.zero_row,
            cache.dtype().row_bytes(shape.slice_width, shape.d_r),
        );
        for t in &work.tiles {
            t.lock().expect("tile scratch lock").reserve(&geo);
        }

        let heads = shape.heads;
        let job = ItemJob {
            cache,
            seqs,
            geo,
            path,
            groups,
            q_block,
            lens: &work.lens,
            query_f32: &work.query_f32,
            query_bf16: &work.query_bf16,
            tiles: &work.tiles,
            zero_row: &work.zero_row,
        };
        let items = &work.items;
        let spans = &work.spans;
        let w = shape.slice_width;
        let merge_entry = |b: usize, out_b: &mut [f32], lse_b: &mut [f32], partials: &[f32]| {
            for g in 0..groups {
                let h0 = g * group_heads;
                let gh = group_heads.min(heads - h0);
                let (first, count) = spans[b * groups + g];
                let parts = &partials[first * part_len..(first + count) * part_len];
                merge(
                    parts,
                    part_len,
                    &geo,
                    &mut out_b[h0 * w..(h0 + gh) * w],
                    &mut lse_b[h0..h0 + gh],
                );
            }
        };
        let partials = &mut work.partials[..items.len() * part_len];
        if runs_inline(&self.pool, self.threads, items.len()) {
            // the same items and merges, in the same order, on the calling thread
            for (item, part) in items.iter().zip(partials.chunks_mut(part_len)) {
                job.run(item, part)?;
            }
            let partials = &*partials;
            for (b, (out_b, lse_b)) in out
                .chunks_mut(heads * w)
                .zip(lse.chunks_mut(heads))
                .enumerate()
            {
                merge_entry(b, out_b, lse_b, partials);
            }
            return Ok(());
        }
        // one entry into the pool per step: the items, then the merge
        self.pool.install(|| {
            items
                .par_iter()
                .zip(partials.par_chunks_mut(part_len))
                .with_max_len(1)
                .try_for_each(|(item, part)| job.run(item, part))?;
            let partials = &*partials;
            out.par_chunks_mut(heads * w)
                .zip(lse.par_chunks_mut(heads))
                .enumerate()
                .for_each(|(b, (out_b, lse_b))| merge_entry(b, out_b, lse_b, partials));
            Ok::<(), Error>(())
        })?;
        Ok(())
    }
}

/// Whether a step of `items` work items runs on the calling thread rather than in
/// `pool`: when it is one thread's work (a pool of one thread, or a single item) and
/// the pool is this backend's alone (no other backend can queue on it, and a step holds
/// the backend mutably, so nobody can share it meanwhile). The caller waits for the pool
/// anyway, so the cores used are the same; what goes is the hand-over: waking a pool
/// thread, then being woken by it (tens of microseconds on a busy or virtual machine,
/// as long as a 64-row tile). The calling thread must also round as the pool threads
/// do: its MXCSR must be the default one (a host that set flush-to-zero or another
/// rounding mode on its thread gets the pool).
fn runs_inline(pool: &Arc<rayon::ThreadPool>, threads: usize, items: usize) -> bool {
    (threads == 1 || items == 1)
        && Arc::strong_count(pool) == 1
        && Arc::weak_count(pool) == 0
        && default_rounding()
}

/// Whether this thread's floating-point control is the default (round to nearest, no
/// flush-to-zero or denormals-are-zero, every exception masked).
fn default_rounding() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // status flags (bits 0-5) are sticky results, not settings
        #[allow(deprecated)]
        // SAFETY: SSE is part of x86_64; reading MXCSR has no side effect
        let csr = unsafe { std::arch::x86_64::_mm_getcsr() };
        csr & !0x3f == 0x1f80
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Splits every sequence into chunks: about `ITEMS_PER_THREAD * threads` items in all,
/// chunks proportional to length and whole tiles, so the item count (and the partial
/// buffers) depend on the batch shape and thread count, not on the context length.
fn plan_items(work: &mut Workspace, groups: usize, threads: usize) {
    let total: usize = work.lens.iter().sum();
    let target = item_target(groups, threads);
    work.items.clear();
    work.spans.clear();
    for (b, &len) in work.lens.iter().enumerate() {
        let chunk = chunk_rows(len, total, target);
        for group in 0..groups {
            let first = work.items.len();
            for start in (0..len).step_by(chunk) {
                work.items.push(WorkItem {
                    batch: b,
                    group,
                    start,
                    end: (start + chunk).min(len),
                });
            }
            work.spans.push((first, work.items.len() - first));
        }
    }
}

/// Packs each (batch entry, head group) query in the layout of `path`; returns the
/// length of one packed block.
fn pack_queries(
    work: &mut Workspace,
    path: Path,
    geo: &TileGeo,
    shape: LatentShape,
    groups: usize,
    q: &[f32],
    scales: [f32; 2],
) -> usize {
    let (rw, hp, w) = (shape.row_width(), geo.hp, geo.w);
    let blocks = work.lens.len() * groups;
    if path == Path::Bf16Dot {
        let len = rw.div_ceil(2) * hp;
        grow(&mut work.query_bf16, blocks * len);
        for (blk, qb) in work.query_bf16[..blocks * len]
            .chunks_exact_mut(len)
            .enumerate()
        {
            let rows = |h| query_row(q, blk, groups, geo.heads, shape.heads, h, rw);
            bf16dot::pack_query(qb, rows, geo.heads, hp, rw, w, scales);
        }
        len
    } else if path == Path::Avx2 {
        let len = geo.xs() * hp;
        grow(&mut work.query_f32, blocks * len);
        for (blk, qb) in work.query_f32[..blocks * len]
            .chunks_exact_mut(len)
            .enumerate()
        {
            let rows = |h| query_row(q, blk, groups, geo.heads, shape.heads, h, rw);
            avx2::pack_query(qb, rows, geo, scales);
        }
        len
    } else {
        let xs = geo.xs();
        let len = xs * hp;
        grow(&mut work.query_f32, blocks * len);
        let dst = &mut work.query_f32[..blocks * len];
        dst.fill(0.0);
        for (blk, qb) in dst.chunks_exact_mut(len).enumerate() {
            for h in 0..geo.heads {
                let Some(src) = query_row(q, blk, groups, geo.heads, shape.heads, h, rw) else {
                    break;
                };
                for (k, &v) in src.iter().enumerate() {
                    // latent columns keep their index, the RoPE part starts at wp
                    let (col, scale) = if k < w {
                        (k, scales[0])
                    } else {
                        (k - w + geo.wp, scales[1])
                    };
                    qb[col * hp + h] = v * scale;
                }
            }
        }
        len
    }
}

/// Query row of head `h` of the group of block `blk`, or `None` past the last head.
fn query_row(
    q: &[f32],
    blk: usize,
    groups: usize,
    group_heads: usize,
    heads: usize,
    h: usize,
    rw: usize,
) -> Option<&[f32]> {
    let (b, g) = (blk / groups, blk % groups);
    let head = g * group_heads + h;
    (head < heads).then(|| &q[(b * heads + head) * rw..(b * heads + head + 1) * rw])
}

/// What every work item of one step shares.
struct ItemJob<'a> {
    cache: &'a dyn RowSource,
    seqs: &'a [u32],
    geo: TileGeo,
    path: Path,
    groups: usize,
    q_block: usize,
    lens: &'a [usize],
    query_f32: &'a [f32],
    query_bf16: &'a [u32],
    tiles: &'a [Mutex<TileScratch>],
    zero_row: &'a [u8],
}

impl ItemJob<'_> {
    /// Runs one work item into its partial block `[o][m][l]`.
    fn run(&self, item: &WorkItem, part: &mut [f32]) -> Result<()> {
        let geo = self.geo;
        let slot = rayon::current_thread_index().unwrap_or(0) % self.tiles.len();
        let mut scratch = self.tiles[slot].lock().expect("tile scratch lock");
        let (o, ml) = part.split_at_mut(geo.heads * geo.wp);
        let (m, l) = ml.split_at_mut(geo.hp);
        o.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let mut acc = Accum { o, m, l };
        let blk = item.batch * self.groups + item.group;
        let row_bytes = geo.dtype.row_bytes(geo.w, geo.d_r);
        let zero = self.zero_row.as_ptr();
        let mut page: (usize, &[u8]) = (usize::MAX, &[]);
        // the next tile's rows are gathered now and prefetched while this one computes
        let (mut rows, mut next) = ([zero; TILE_ROWS], [zero; TILE_ROWS]);
        let mut valid = self.gather(item, item.start, &mut rows, &mut page)?;
        for t0 in (item.start..item.end).step_by(TILE_ROWS) {
            let next_valid = match t0 + TILE_ROWS {
                t1 if t1 < item.end => self.gather(item, t1, &mut next, &mut page)?,
                _ => 0,
            };
            let n = valid.next_multiple_of(ROW_STEP);
            for r in &mut rows[valid..n] {
                *r = zero;
            }
            let tile = TileRows {
                rows: &rows[..n],
                valid,
                next: &next[..next_valid],
                row_bytes,
            };
            let scr = &mut *scratch;
            // SAFETY: the path was checked against this CPU at construction; every row
            // pointer is valid for `row_bytes` (cache pages checked in `gather`, the zero
            // row sized for a row); scratch, query and accumulators are sized for `geo`.
            unsafe {
                match self.path {
                    #[cfg(target_arch = "x86_64")]
                    Path::Bf16Dot => {
                        let qp = &self.query_bf16[blk * self.q_block..][..self.q_block];
                        if geo.dtype == DType::Fp8E4m3 {
                            bf16dot::tile_fp8(&geo, qp, &tile, scr, &mut acc)
                        } else {
                            bf16dot::tile_bf16(&geo, qp, &tile, scr, &mut acc)
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx512 => tile::tile_avx512(&geo, self.query(blk), &tile, scr, &mut acc),
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx2 => avx2::tile_avx2(&geo, self.query(blk), &tile, scr, &mut acc),
                    _ => tile::tile_portable(&geo, self.query(blk), &tile, scr, &mut acc),
                }
            }
            std::mem::swap(&mut rows, &mut next);
            valid = next_valid;
        }
        Ok(())
    }

    /// Fills `rows` with pointers to rows `t0..` of the item (at most a tile, up to the
    /// item's end), checking each new page's length; returns how many it filled.
    fn gather<'p>(
        &'p self,
        item: &WorkItem,
        t0: usize,
        rows: &mut [*const u8; TILE_ROWS],
        page: &mut (usize, &'p [u8]),
    ) -> Result<usize> {
        let geo = self.geo;
        let (seq, len, ps) = (
            self.seqs[item.batch],
            self.lens[item.batch],
            self.cache.page_size(),
        );
        let row_bytes = geo.dtype.row_bytes(geo.w, geo.d_r);
        let valid = TILE_ROWS.min(item.end - t0);
        for (i, r) in rows[..valid].iter_mut().enumerate() {
            let t = t0 + i;
            if t / ps != page.0 {
                let p = t / ps;
                let bytes = self.cache.page(seq, p);
                let need = ps.min(len - p * ps) * row_bytes;
                if bytes.len() < need {
                    return Err(Error::invalid(format!(
                        "page {p} of sequence {seq} holds {} bytes, fewer than its {need} \
                         bytes of cached rows",
                        bytes.len()
                    )));
                }
                *page = (p, bytes);
            }
            // in bounds: checked against the page length above
            *r = page.1[(t % ps) * row_bytes..].as_ptr();
        }
        Ok(valid)
    }

    fn query(&self, blk: usize) -> &[f32] {
        &self.query_f32[blk * self.q_block..][..self.q_block]
    }
}

/// Merges the partial blocks of one (sequence, head group) into the output rows of its
/// heads: `out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i`, `lse = M + ln(den)`.
fn merge(parts: &[f32], part_len: usize, geo: &TileGeo, out: &mut [f32], lse: &mut [f32]) {
    let (w, wp) = (geo.w, geo.wp);
    let o_len = geo.heads * wp;
    for (h, (out_h, lse_h)) in out.chunks_exact_mut(w).zip(lse.iter_mut()).enumerate() {
        let stat = |p: &[f32], k: usize| p[o_len + k * geo.hp + h];
        // a NaN maximum must stay NaN: f32::max would drop it
        let top =
            parts
                .chunks_exact(part_len)
                .map(|p| stat(p, 0))
                .fold(
                    f32::NEG_INFINITY,
                    |a, b| if a.is_nan() || a > b { a } else { b },
                );
        let weight = |p: &[f32]| (stat(p, 0) - top).exp();
        let mut den = 0.0;
        for p in parts.chunks_exact(part_len) {
            den += weight(p) * stat(p, 1);
        }
        // one pass over the outputs per part, the division folded into the last: each
        // value is `((0 + w_0 v_0) + w_1 v_1 + ...) / den`, the order of the three
        // passes this replaces (zero, accumulate, divide)
        let count = parts.len() / part_len;
        for (i, p) in parts.chunks_exact(part_len).enumerate() {
            let (wt, v) = (weight(p), &p[h * wp..h * wp + w]);
            match (i == 0, i + 1 == count) {
                (true, true) => out_h
                    .iter_mut()
                    .zip(v)
                    .for_each(|(o, v)| *o = (0.0 + wt * v) / den),
                (true, false) => out_h.iter_mut().zip(v).for_each(|(o, v)| *o = 0.0 + wt * v),
                (false, false) => out_h.iter_mut().zip(v).for_each(|(o, v)| *o += wt * v),
                (false, true) => out_h
                    .iter_mut()
                    .zip(v)
                    .for_each(|(o, v)| *o = (*o + wt * v) / den),
            }
        }
        *lse_h = top + den.ln();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_items_depend_on_the_batch_shape_not_the_context_length() {
        let mut work = Workspace::default();
        for threads in [1, 2, 8] {
            for lens in [vec![1, 5000, 64], vec![32768, 7, 100_000]] {
                for scale in [1, 10, 1000] {
                    work.lens = lens.iter().map(|l| l * scale).collect();
                    plan_items(&mut work, 1, threads);
                    let bound = ITEMS_PER_THREAD * threads + lens.len();
                    assert!(work.items.len() <= bound, "{} > {bound}", work.items.len());
                    // the chunks of each sequence tile it exactly, in whole tiles
                    for (b, &len) in work.lens.iter().enumerate() {
                        let mut next = 0;
                        for item in work.items.iter().filter(|i| i.batch == b) {
                            assert_eq!(item.start, next);
                            assert!(item.end > item.start);
                            assert!(item.end == len || (item.end - item.start) % TILE_ROWS == 0);
                            next = item.end;
                        }
                        assert_eq!(next, len);
                    }
                }
            }
        }
    }
}

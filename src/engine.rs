//! The kernel API on the engine's own paged memory: stateless decode and append over a
//! latent cache that a serving engine allocates, pages and frees itself, as FlashMLA
//! (`get_mla_metadata` + `flash_mla_with_kvcache`), FlashInfer (`plan` + `run`) and
//! vLLM's `concat_and_cache_mla` are used. libtpla keeps no cache state: the engine passes
//! its cache, block table and lengths on every call; a [`RankContext`] holds only the
//! rank's weights of every layer (`W'_UK`, `W'_UV`, mu, the transform) and reusable
//! buffers.
//!
//! # Memory layout ([`PagedLayout`])
//! The cache of one layer is `pages` pages at `base + page * page_stride` bytes; a page
//! holds `page_size` rows back to back, row `offset` at `offset * row_bytes` bytes into
//! the page. A row is `row_width = slice_width + d_r` values: this rank's slice of the
//! rotated normalised latent, then the RoPE key (`rope_width = d_r` values), stored as
//! `dtype` ([`DType::row_bytes`]): bf16, f16 or f32 (little-endian) throughout
//! (FlashMLA's `[num_blocks, page_block_size, 1, d]` with d = 576 is this layout at g =
//! 1), or for fp8_e4m3 the slice's e4m3 codes, one f32 scale per block of 128 of them and
//! the RoPE key in bf16 (DESIGN 7.1; 392 bytes at g = 2 of DeepSeek-V3 and Kimi-K2). Token `t` of batch entry `b` lives in row `t % page_size` of page
//! `block_table[b][t / page_size]`; an append writes token `i` at slot `slots[i]`, row
//! `slot % page_size` of page `slot / page_size`.
//!
//! # A step ([`RankContext`] methods)
//! 1. [`RankContext::decode_plan`] once per step: the split-KV schedule of the batch, from the
//!    lengths, into caller-owned `i32` words ([`RankContext::decode_plan_len`] of them); it is
//!    plain data, reused by every layer of the step.
//! 2. Per layer: [`RankContext::append_paged`] writes the new tokens (from their full
//!    pre-norm latents `a_t` and RoPE keys), [`RankContext::decode_paged`] attends and
//!    writes latent outputs + log-sum-exps or the rank's partial head outputs, and the
//!    ranks' partial outputs are summed ([`crate::combine`]).
//!
//! [`RankContext::import_sequence`] copies a prefill's rows (a registered shard file or
//! buffer) into the engine's pages. After [`RankContext::reserve`] and a first step, a
//! decode of up to that batch allocates nothing.
//!
//! # Checks
//! Shapes, the layout, buffer lengths, element alignment, scales and the plan are checked
//! at the call (an `Err`, nothing read or written). Page indices and lengths are checked
//! as rows are read: a block table entry outside `0..pages`, or a length needing more
//! pages than the table's width, makes that entry's outputs NaN and sets
//! [`Faults::BAD_PAGE`] in the result, never reads outside the cache. Empty sequences
//! (length 0, as in padded batches) give zero outputs and a log-sum-exp of minus
//! infinity. Negative slots are padding and skipped; a slot past the pool is skipped and
//! sets [`Faults::BAD_SLOT`].
//!
//! # The GPU contract
//! `tpla::engine_device` (feature `cuda`) implements it. A CUDA implementation serves the
//! same calls with device addresses in place of the
//! slices (cache base, block table, lengths, plan, queries, outputs, slots, a device
//! `u32` fault word that kernels OR bits into) plus the engine's `CUstream`: the layout,
//! shapes, plan header ([`crate::attention::schedule`]), zero-length and fault semantics
//! are the ones above. Its plan is written by a kernel from the device lengths into the
//! device workspace (no host synchronisation, capturable in a CUDA graph), decode and
//! append are kernels on the same stream, and the per-rank weights live on the device.
//! Checks that need the host to read device memory (page indices, lengths, slots, the
//! plan's body) happen in the kernels and surface as fault bits and NaN rows.

use crate::attention::reference::{slice_token, AppendMode};
use crate::attention::RowSource;
use crate::cache::{RankCache, MAX_PAGE_SIZE};
use crate::decode::{try_capacity, Outputs, Queries, QueryScales, RankContext, StepRows};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the rows of one layer of the engine's cache lie (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    pub dtype: DType,
    /// Values per row: `slice_width + d_r` of the rank.
    pub row_width: usize,
    /// The RoPE key's values at the end of a row: `d_r` of the model (it sizes the rows
    /// of fp8_e4m3 pools, whose slice and key have different element types).
    pub rope_width: usize,
    /// Rows per page.
    pub page_size: usize,
    /// Bytes from one page to the next (at least a page's rows, a multiple of
    /// [`Self::alignment`]).
    pub page_stride: usize,
    /// Pages of the pool: block table entries and slots index these.
    pub pages: usize,
}

impl PagedLayout {
    /// Bytes of one row ([`DType::row_bytes`] of the slice and the RoPE key).
    pub fn row_bytes(&self) -> usize {
        let w = self.row_width.saturating_sub(self.rope_width);
        self.dtype.row_bytes(w, self.row_width - w)
    }

    /// The alignment of the memory and of the page stride, in bytes: the element size,
    /// and 4 for fp8_e4m3 (its f32 scales and bf16 keys stay aligned in rows that are a
    /// multiple of 4 bytes).
    pub fn alignment(&self) -> usize {
        match self.dtype {
            DType::Fp8E4m3 => 4,
            d => d.size(),
        }
    }

    /// Bytes of the rows of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_size * self.row_bytes()
    }

    /// Token slots of the pool, `pages * page_size`.
    pub fn slots(&self) -> usize {
        self.pages * self.page_size
    }

    /// Bytes from the base to the end of the last page's rows, after checking the layout.
    pub fn extent(&self) -> Result<usize> {
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return Err(Error::invalid(format!(
                "page size must be between 1 and {MAX_PAGE_SIZE} rows, got {}",
                self.page_size
            )));
        }
        if self.pages == 0 || self.pages > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "a paged cache needs between 1 and {} pages (block tables are int32), got {}",
                i32::MAX,
                self.pages
            )));
        }
        if self.row_width == 0 {
            return Err(Error::invalid("cache rows must have at least one element"));
        }
        if self.row_width > u32::MAX as usize {
            // the C ABI's limit; it also keeps the row's byte count from overflowing
            return Err(Error::invalid(format!(
                "cache rows of {} values exceed {}",
                self.row_width,
                u32::MAX
            )));
        }
        if self.rope_width > self.row_width {
            return Err(Error::invalid(format!(
                "rows of {} values cannot end in a RoPE key of {}",
                self.row_width, self.rope_width
            )));
        }
        let align = self.alignment();
        if self.row_bytes() % align != 0 {
            // fp8_e4m3: slices are multiples of 64 values and keys of even width in practice
            return Err(Error::invalid(format!(
                "{} rows of {} slice and {} RoPE values take {} bytes, not a multiple of {align}",
                self.dtype.name(),
                self.row_width - self.rope_width,
                self.rope_width,
                self.row_bytes()
            )));
        }
        let page_bytes = self
            .page_size
            .checked_mul(self.row_bytes())
            .ok_or_else(|| Error::invalid("page size in bytes overflows"))?;
        if self.page_stride < page_bytes || self.page_stride % align != 0 {
            return Err(Error::invalid(format!(
                "page stride {} must be at least the {page_bytes} bytes of a page's rows \
                 and a multiple of {align} bytes",
                self.page_stride
            )));
        }
        (self.pages - 1)
            .checked_mul(self.page_stride)
            .and_then(|n| n.checked_add(page_bytes))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid("the paged cache's extent overflows"))
    }

    /// The layout of memory `data`: the layout is valid, `data` covers its extent and is
    /// aligned to the element type.
    fn check_memory(&self, data: *const u8, len: usize) -> Result<()> {
        let extent = self.extent()?;
        if len < extent {
            return Err(Error::invalid(format!(
                "the paged cache memory holds {len} bytes, its layout spans {extent}"
            )));
        }
        if (data as usize) % self.alignment() != 0 {
            return Err(Error::invalid(format!(
                "the paged cache memory is not aligned to {} bytes ({} rows)",
                self.alignment(),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    fn check_rank(&self, ctx: &RankContext) -> Result<()> {
        let want = ctx.plan().row_width(ctx.dims());
        if self.row_width != want || self.rope_width != ctx.dims().d_r {
            return Err(Error::mismatch(format!(
                "the paged cache's rows are {} values ({} RoPE), this rank's are {want} ({} \
                 latent + {} RoPE)",
                self.row_width,
                self.rope_width,
                ctx.plan().slice_width,
                ctx.dims().d_r
            )));
        }
        Ok(())
    }

    fn page_start(&self, page: usize) -> usize {
        page * self.page_stride
    }
}

/// The engine's cache of one layer, read by decode.
#[derive(Clone, Copy, Debug)]
pub struct PagedCache<'a> {
    layout: PagedLayout,
    data: &'a [u8],
}

impl<'a> PagedCache<'a> {
    /// Checks `layout` and that `data` holds its pages.
    pub fn new(layout: PagedLayout, data: &'a [u8]) -> Result<Self> {
        layout.check_memory(data.as_ptr(), data.len())?;
        Ok(PagedCache { layout, data })
    }

    pub fn layout(&self) -> &PagedLayout {
        &self.layout
    }

    fn page(&self, page: usize) -> &'a [u8] {
        let start = self.layout.page_start(page);
        &self.data[start..start + self.layout.page_bytes()]
    }
}

/// The engine's cache of one layer, written by appends.
#[derive(Debug)]
pub struct PagedCacheMut<'a> {
    layout: PagedLayout,
    data: &'a mut [u8],
}

impl<'a> PagedCacheMut<'a> {
    /// Checks `layout` and that `data` holds its pages.
    pub fn new(layout: PagedLayout, data: &'a mut [u8]) -> Result<Self> {
        layout.check_memory(data.as_ptr(), data.len())?;
        Ok(PagedCacheMut { layout, data })
    }

    pub fn layout(&self) -> &PagedLayout {
        &self.layout
    }

    /// Row `slot` as bytes, or `None` past the pool.
    fn row_mut(&mut self, slot: usize) -> Option<&mut [u8]> {
        let l = self.layout;
        (slot < l.slots()).then(|| {
            let start = l.page_start(slot / l.page_size) + (slot % l.page_size) * l.row_bytes();
            &mut self.data[start..start + l.row_bytes()]
        })
    }
}

/// Page indices `[batch][width]`: entry `(b, k)` is the page holding tokens
/// `k * page_size ..` of batch entry `b`. Entries past a sequence's pages are not read.
#[derive(Clone, Copy, Debug)]
pub struct BlockTable<'a> {
    entries: &'a [i32],
    batch: usize,
    width: usize,
}

impl<'a> BlockTable<'a> {
    pub fn new(entries: &'a [i32], batch: usize, width: usize) -> Result<Self> {
        if batch.checked_mul(width) != Some(entries.len()) {
            return Err(Error::invalid(format!(
                "the block table holds {} entries, expected {batch} rows of {width}",
                entries.len()
            )));
        }
        Ok(BlockTable {
            entries,
            batch,
            width,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Page `k` of entry `b`; `None` past the row.
    fn get(&self, b: usize, k: usize) -> Option<i32> {
        (k < self.width).then(|| self.entries[b * self.width + k])
    }
}

/// Problems found while reading or writing engine memory, as bits (the C ABI's
/// `tpla_fault`). The call itself succeeded; the entries concerned hold NaN (decode) or
/// were skipped (append).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults(u32);

impl Faults {
    pub const NONE: Faults = Faults(0);
    /// A block table entry outside `0..pages`, or a length needing more pages than the
    /// table's width: that entry's outputs are NaN.
    pub const BAD_PAGE: Faults = Faults(1);
    /// A slot at or past `pages * page_size`: that token was not written.
    pub const BAD_SLOT: Faults = Faults(2);
    /// GPU appends: a non-finite input, or a value beyond the cache's element type (which
    /// the CPU refuses at the call): that token was not written.
    pub const BAD_VALUE: Faults = Faults(4);
    /// GPU decodes: the plan in the workspace was not made for this launch (batch,
    /// shape, block table width) or is not a plan: every entry's outputs are NaN (the CPU
    /// refuses such a plan at the call).
    pub const BAD_PLAN: Faults = Faults(8);

    /// The faults of bits `bits` (a device fault word).
    pub fn from_bits(bits: u32) -> Faults {
        Faults(bits)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Faults) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Faults {
    type Output = Faults;
    fn bitor(self, other: Faults) -> Faults {
        Faults(self.0 | other.0)
    }
}

/// One layer's decode over engine memory.
#[derive(Clone, Copy, Debug)]
pub struct PagedStep<'a> {
    pub cache: PagedCache<'a>,
    pub block_table: BlockTable<'a>,
    /// Tokens of each batch entry, `[batch]`, at least 0.
    pub seq_lens: &'a [i32],
    /// The schedule [`RankContext::decode_plan`] wrote for these lengths.
    pub plan: &'a [i32],
    /// The softmax scale; `None`: the model's (`ModelDims::softmax_scale`).
    pub softmax_scale: Option<f64>,
    /// The slice's logit scale; `None`: the layer's.
    pub mu: Option<f64>,
}

/// How appended tokens are normalised (DESIGN 3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmsMode {
    /// With the full latent's RMS.
    Exact,
    /// With an RMS estimated from the rank's slice and the layer's energy fraction.
    Sliced,
}

/// Buffers of engine steps, reused: a fault flag per batch entry, the batch entries the
/// backend reads (`0..batch`), and the zero row empty sequences are given.
#[derive(Debug, Default)]
pub(crate) struct PagedScratch {
    faulted: Vec<AtomicBool>,
    entries: Vec<u32>,
    zero_row: Vec<u8>,
}

impl PagedScratch {
    /// For rows of `row_width` elements of any element type.
    pub(crate) fn new(row_width: usize) -> Self {
        PagedScratch {
            zero_row: vec![0; row_width * DType::F32.size()],
            ..Self::default()
        }
    }

    /// One zero row of any element type.
    pub(crate) fn zero_row(&self) -> &[u8] {
        &self.zero_row
    }

    pub(crate) fn reserve(&mut self, batch: usize) -> Result<()> {
        try_capacity(&mut self.faulted, batch, "fault flags")?;
        try_capacity(&mut self.entries, batch, "batch entries")
    }

    /// Sized for `batch` entries, none faulted.
    fn start(&mut self, batch: usize) {
        self.faulted.truncate(batch);
        for f in &self.faulted {
            f.store(false, Ordering::Relaxed);
        }
        self.faulted.resize_with(batch, || AtomicBool::new(false));
        self.entries.clear();
        self.entries.extend(0..batch as u32);
    }
}

/// The engine's cache of one step as the backends read it: sequence ids are batch
/// entries. A bad page reads as page 0 (in bounds) and flags its entry, whose outputs
/// are then overwritten with NaN; an empty sequence reads as one zero row.
struct PagedView<'a> {
    cache: PagedCache<'a>,
    table: BlockTable<'a>,
    lens: &'a [i32],
    faulted: &'a [AtomicBool],
    zero_row: &'a [u8],
}

impl PagedView<'_> {
    fn len(&self, b: usize) -> usize {
        // lengths were checked non-negative at the call
        self.lens[b] as usize
    }
}

impl RowSource for PagedView<'_> {
    fn dtype(&self) -> DType {
        self.cache.layout.dtype
    }

    fn row_width(&self) -> usize {
        self.cache.layout.row_width
    }

    fn page_size(&self) -> usize {
        self.cache.layout.page_size
    }

    fn seq_len(&self, seq: u32) -> Result<usize> {
        let b = seq as usize;
        if b >= self.lens.len() {
            return Err(Error::out_of_range(format!(
                "batch entry {b} is out of range for a batch of {}",
                self.lens.len()
            )));
        }
        Ok(self.len(b).max(1))
    }

    fn page(&self, seq: u32, page: usize) -> &[u8] {
        let b = seq as usize;
        if self.len(b) == 0 {
            return &self.zero_row[..self.cache.layout.row_bytes()];
        }
        match self.table.get(b, page) {
            Some(p) if p >= 0 && (p as usize) < self.cache.layout.pages => {
                self.cache.page(p as usize)
            }
            _ => {
                self.faulted[b].store(true, Ordering::Relaxed);
                self.cache.page(0)
            }
        }
    }
}

fn check_scale(what: &str, value: Option<f64>, default: f64) -> Result<f64> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 => Ok(v),
        Some(v) => Err(Error::invalid(format!(
            "{what} must be finite and positive, got {v}"
        ))),
    }
}

fn check_lengths(seq_lens: &[i32]) -> Result<()> {
    match seq_lens.iter().position(|&l| l < 0) {
        None => Ok(()),
        Some(b) => Err(Error::invalid(format!(
            "sequence length {} of batch entry {b} is negative",
            seq_lens[b]
        ))),
    }
}

impl RankContext {
    /// `i32` words of the plan of a step of `batch` sequences (fixed by the batch size
    /// and the backend; allocate them once for the largest batch).
    pub fn decode_plan_len(&self, batch: usize) -> usize {
        self.backend().schedule_len(self.shape(), batch)
    }

    /// Computes the split-KV schedule of a step over sequences of `seq_lens` tokens into
    /// `plan` (at least [`Self::decode_plan_len`] words), for every layer's
    /// [`Self::decode_paged`] of the step. Balances the work of mixed lengths over the
    /// backend's threads.
    pub fn decode_plan(&self, seq_lens: &[i32], plan: &mut [i32]) -> Result<()> {
        check_lengths(seq_lens)?;
        // an empty sequence is read as one zero row (see `PagedView`)
        let lens: Vec<usize> = seq_lens.iter().map(|&l| (l as usize).max(1)).collect();
        self.backend().schedule(self.shape(), &lens, plan)
    }

    /// One decode step of `layer` over the engine's memory: as [`Self::decode`], with the
    /// rows of batch entry `b` found through `step.block_table` row `b`. Returns the
    /// faults met while reading (the entries concerned hold NaN).
    pub fn decode_paged(
        &mut self,
        layer: usize,
        step: &PagedStep,
        queries: Queries,
        outputs: Outputs,
    ) -> Result<Faults> {
        let mu = self.layer(layer)?.mu;
        step.cache.layout.check_rank(self)?;
        let batch = step.seq_lens.len();
        if step.block_table.batch() != batch {
            return Err(Error::invalid(format!(
                "the block table has {} rows for a batch of {batch} lengths",
                step.block_table.batch()
            )));
        }
        check_lengths(step.seq_lens)?;
        let scales = QueryScales::new(
            check_scale(
                "softmax scale",
                step.softmax_scale,
                self.dims().softmax_scale,
            )?,
            check_scale("mu", step.mu, mu)?,
        );
        // Moved out for the call so that the view can borrow it while the context decodes;
        // taking the default leaves empty vectors behind, which allocates nothing.
        let mut paged = std::mem::take(&mut self.paged);
        paged.start(batch);
        let (heads, width) = (self.plan().heads, self.plan().slice_width);
        let view = PagedView {
            cache: step.cache,
            table: step.block_table,
            lens: step.seq_lens,
            faulted: &paged.faulted,
            zero_row: &paged.zero_row,
        };
        let patch = |out: &mut [f32], lse: &mut [f32]| {
            for b in 0..batch {
                let (o, l) = (
                    &mut out[b * heads * width..(b + 1) * heads * width],
                    &mut lse[b * heads..(b + 1) * heads],
                );
                if paged.faulted[b].load(Ordering::Relaxed) {
                    o.fill(f32::NAN);
                    l.fill(f32::NAN);
                } else if step.seq_lens[b] == 0 {
                    o.fill(0.0);
                    l.fill(f32::NEG_INFINITY);
                }
            }
        };
        let rows = StepRows {
            rows: &view,
            seqs: &paged.entries,
            schedule: Some(step.plan),
            patch: Some(&patch),
        };
        let result = self.decode_rows(layer, rows, scales, queries, outputs);
        let faults = if paged.faulted.iter().any(|f| f.load(Ordering::Relaxed)) {
            Faults::BAD_PAGE
        } else {
            Faults::NONE
        };
        self.paged = paged;
        result.map(|()| faults)
    }

    /// Appends `slots.len()` tokens to the engine's cache of `layer`: token `i` has the
    /// full pre-norm latent `latents[i]` (`d_c`) and the RoPE-rotated key `k_rope[i]`
    /// (`d_r`); it is normalised (`mode`), rotated by the layer's `U`, cut to this rank's
    /// slice, rounded to the cache's element type and stored at slot `slots[i]`. Every row
    /// is computed and checked (finite, representable) before any is written, so on
    /// error the cache is unchanged. Negative slots are skipped (padding); slots past the
    /// pool are skipped and reported as [`Faults::BAD_SLOT`].
    pub fn append_paged(
        &self,
        layer: usize,
        cache: &mut PagedCacheMut,
        slots: &[i32],
        latents: &[f32],
        k_rope: &[f32],
        mode: RmsMode,
    ) -> Result<Faults> {
        let l = self.layer(layer)?;
        cache.layout.check_rank(self)?;
        let (d, n) = (self.dims(), slots.len());
        for (what, got, per) in [
            ("latents", latents.len(), d.d_c),
            ("RoPE keys", k_rope.len(), d.d_r),
        ] {
            if Some(got) != n.checked_mul(per) {
                return Err(Error::invalid(format!(
                    "{what} hold {got} values, expected {n} tokens of {per}"
                )));
            }
        }
        // checked before the rotation, which would spread a NaN over every column
        crate::decode::check_finite("latents", latents)?;
        crate::decode::check_finite("RoPE keys", k_rope)?;
        let mode = match mode {
            RmsMode::Exact => AppendMode::Exact,
            RmsMode::Sliced => AppendMode::SlicedRms {
                fraction: l.slice_fraction,
            },
        };
        let rw = cache.layout.row_width;
        let mut rows = Vec::with_capacity(n * rw);
        for (a, kr) in latents.chunks_exact(d.d_c).zip(k_rope.chunks_exact(d.d_r)) {
            let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            let kr: Vec<f64> = kr.iter().map(|&v| v as f64).collect();
            rows.extend(slice_token(&a, &kr, &l.transform, self.plan(), mode)?);
        }
        let dtype = cache.layout.dtype;
        crate::cache::check_representable(dtype, &rows, "appended rows")?;
        let w = rw - cache.layout.rope_width;
        let mut faults = Faults::NONE;
        for (&slot, row) in slots.iter().zip(rows.chunks_exact(rw)) {
            if slot < 0 {
                continue;
            }
            match cache.row_mut(slot as usize) {
                Some(dst) => dtype.encode_row(row, w, dst),
                None => faults = faults | Faults::BAD_SLOT,
            }
        }
        Ok(faults)
    }

    /// Copies the rows of sequence `seq` in `layer` of `source` (for example a prefill's
    /// shard file registered there, read in place) into the engine's cache, byte for byte
    /// (both hold the same element type): row `t` to slot `slots[t]`, one slot per cached
    /// row. Negative and bad slots as in [`Self::append_paged`].
    pub fn import_sequence(
        &self,
        source: &RankCache,
        seq: u32,
        layer: usize,
        cache: &mut PagedCacheMut,
        slots: &[i32],
    ) -> Result<Faults> {
        self.check_cache(source)?;
        if source.spec().transforms()[layer] != self.layer(layer)?.transform_id() {
            return Err(Error::mismatch(format!(
                "layer {layer} of the source cache was rotated by another transform"
            )));
        }
        cache.layout.check_rank(self)?;
        let len = source.seq_len(seq, layer)?;
        if slots.len() != len {
            return Err(Error::invalid(format!(
                "{} slots for the {len} cached rows of sequence {seq}",
                slots.len()
            )));
        }
        let view = source.layer(layer)?;
        if view.dtype() != cache.layout.dtype {
            return Err(Error::mismatch(format!(
                "the source cache holds {} rows, the paged cache {}",
                view.dtype().name(),
                cache.layout.dtype.name()
            )));
        }
        let (ps, row_bytes) = (view.page_size(), cache.layout.row_bytes());
        let mut faults = Faults::NONE;
        for (t, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            match cache.row_mut(slot as usize) {
                Some(dst) => dst
                    .copy_from_slice(&view.page(seq, t / ps)[(t % ps) * row_bytes..][..row_bytes]),
                None => faults = faults | Faults::BAD_SLOT,
            }
        }
        Ok(faults)
    }
}

//! The backend object, decode plans (split-KV launch geometry plus workspace) and the
//! [`LatentAttention`] implementation.

use super::cache::{DeviceCache, DeviceCacheConfig};
use super::compile::default_cache_dir;
use super::driver::{arg, bf16_pages_tensor_map, CUstream, CudaDevice, DeviceBuffer, Stream};
use super::engine::EngineKernels;
use super::kernels::{
    DecodeKernel, KernelConfig, Kernels, MAX_STAGES, PAGE_SIZE, ROPE_WIDTH, TILE_TOKENS,
};
use super::sequence::SequenceKernels;
use crate::attention::reference::check_attend_args;
use crate::attention::schedule::HEADER_WORDS;
use crate::attention::{LatentAttention, LatentShape, RowSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The CUDA backend on one GPU: its kernels (compiled on first use per shape, cached
/// on disk) and a stream of its own.
#[derive(Debug)]
pub struct CudaBackend {
    device: Arc<CudaDevice>,
    cache_dir: Option<PathBuf>,
    kernels: Mutex<HashMap<KernelConfig, Arc<Kernels>>>,
    engine_kernels: Mutex<HashMap<usize, Arc<EngineKernels>>>,
    sequence_kernels: Mutex<Option<Arc<SequenceKernels>>>,
    max_stages: usize,
    decode_kernel: Option<DecodeKernel>,
    stream: Stream,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, caching compiled kernels under [`default_cache_dir`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_cache_dir(ordinal, default_cache_dir())
    }

    /// Opens GPU `ordinal`, caching compiled kernels in `cache_dir` (none: no disk cache).
    pub fn with_cache_dir(ordinal: usize, cache_dir: Option<PathBuf>) -> Result<Self> {
        let device = CudaDevice::open(ordinal)?;
        // Fail at creation, not at the first call, when libnvrtc is missing.
        super::compile::nvrtc_version()?;
        Ok(CudaBackend {
            stream: Stream::new(&device)?,
            device,
            cache_dir,
            kernels: Mutex::new(HashMap::new()),
            engine_kernels: Mutex::new(HashMap::new()),
            sequence_kernels: Mutex::new(None),
            max_stages: MAX_STAGES,
            decode_kernel: None,
        })
    }

    /// Caps the decode kernels' cp.async pipeline depth (2 to [`MAX_STAGES`]; default
    /// the maximum): a tuning knob for benchmarks, applied to kernels chosen afterwards.
    pub fn set_max_stages(&mut self, stages: usize) -> Result<()> {
        if !(2..=MAX_STAGES).contains(&stages) {
            return Err(Error::invalid(format!(
                "pipeline depth must be 2 to {MAX_STAGES}, got {stages}"
            )));
        }
        self.max_stages = stages;
        Ok(())
    }

    /// Forces a decode kernel for plans made afterwards (`None`, the default: the
    /// fastest the device and shape allow; an `Unsupported` error at planning where the
    /// forced one cannot run). For A/B measurements and tests of both kernels.
    pub fn set_decode_kernel(&mut self, kernel: Option<DecodeKernel>) {
        self.decode_kernel = kernel;
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The backend's own stream.
    pub fn stream(&self) -> CUstream {
        self.stream.raw()
    }

    /// The kernels for `heads` heads over bf16 slices of `slice_width` (compiled or
    /// loaded on first use).
    pub fn kernels(&self, heads: usize, slice_width: usize, d_r: usize) -> Result<Arc<Kernels>> {
        self.kernels_for(heads, slice_width, d_r, DType::Bf16)
    }

    /// [`Self::kernels`] over caches of `dtype` (bf16, or fp8_e4m3 where
    /// [`KernelConfig::choose`] allows it).
    pub fn kernels_for(
        &self,
        heads: usize,
        slice_width: usize,
        d_r: usize,
        dtype: DType,
    ) -> Result<Arc<Kernels>> {
        let config = KernelConfig::choose(
            &self.device,
            heads,
            slice_width,
            d_r,
            self.max_stages,
            self.decode_kernel,
            dtype,
        )?;
        let mut map = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = map.get(&config) {
            return Ok(k.clone());
        }
        let k = Arc::new(Kernels::load(
            &self.device,
            config,
            self.cache_dir.as_deref(),
        )?);
        map.insert(config, k.clone());
        Ok(k)
    }

    /// The engine path's kernels for slices of `slice_width` (compiled or loaded on first
    /// use).
    pub fn engine_kernels(&self, slice_width: usize) -> Result<Arc<EngineKernels>> {
        let mut map = self
            .engine_kernels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(k) = map.get(&slice_width) {
            return Ok(k.clone());
        }
        let k = Arc::new(EngineKernels::load(
            &self.device,
            slice_width,
            self.cache_dir.as_deref(),
        )?);
        map.insert(slice_width, k.clone());
        Ok(k)
    }

    /// The sequence-shard merge kernels (compiled or loaded on first use).
    pub fn sequence_kernels(&self) -> Result<Arc<SequenceKernels>> {
        let mut slot = self
            .sequence_kernels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let k = Arc::new(SequenceKernels::load(
            &self.device,
            self.cache_dir.as_deref(),
        )?);
        *slot = Some(k.clone());
        Ok(k)
    }

    /// An empty device cache of bf16 rows.
    pub fn new_cache(&self, config: DeviceCacheConfig) -> Result<DeviceCache> {
        self.new_cache_for(config, DType::Bf16)
    }

    /// An empty device cache of `dtype` rows (bf16 or fp8_e4m3, DESIGN 7.1).
    pub fn new_cache_for(&self, config: DeviceCacheConfig, dtype: DType) -> Result<DeviceCache> {
        let kernels = self.kernels_for(64, config.slice_width, ROPE_WIDTH, dtype)?;
        DeviceCache::new(&self.device, kernels, config)
    }

    /// A decode plan for `batch` queries of `shape` over sequences of at most `max_len`
    /// tokens, filling the GPU: the wgmma kernel gets one CTA per multiprocessor (over
    /// the head tiles), each taking an equal share of the batch's tiles; v3 a split count
    /// per sequence.
    pub fn plan(&self, shape: LatentShape, batch: usize, max_len: usize) -> Result<DecodePlan> {
        self.plan_for(shape, DType::Bf16, batch, max_len)
    }

    /// [`Self::plan`] over caches of `dtype`.
    pub fn plan_for(
        &self,
        shape: LatentShape,
        dtype: DType,
        batch: usize,
        max_len: usize,
    ) -> Result<DecodePlan> {
        let kernels = self.kernels_for(shape.heads, shape.slice_width, shape.d_r, dtype)?;
        let splits = self.splits_for(&kernels, shape, batch, max_len);
        DecodePlan::new(&self.device, kernels, shape, batch, splits)
    }

    /// The split count [`Self::plan`] chooses for `kernels` (the engine path's plans
    /// choose theirs the same way, from the block table's width).
    pub(crate) fn splits_for(
        &self,
        kernels: &Kernels,
        shape: LatentShape,
        batch: usize,
        max_len: usize,
    ) -> usize {
        let slots = self.device.multiprocessors() * kernels.decode_blocks_per_sm;
        let head_tiles = shape.heads / kernels.config.heads_tile;
        match kernels.config.kernel {
            DecodeKernel::Wgmma => (slots / head_tiles).clamp(1, 1024),
            DecodeKernel::MmaSync => choose_splits(
                slots,
                batch * head_tiles,
                max_len.max(1).div_ceil(TILE_TOKENS),
            ),
        }
    }

    /// A decode plan with a fixed split count (1 to 1024): for the wgmma kernel, the
    /// number of CTAs per head tile sharing the batch's tiles.
    pub fn plan_with_splits(
        &self,
        shape: LatentShape,
        batch: usize,
        splits: usize,
    ) -> Result<DecodePlan> {
        let kernels = self.kernels(shape.heads, shape.slice_width, shape.d_r)?;
        DecodePlan::new(&self.device, kernels, shape, batch, splits)
    }
}

/// Splits per (sequence, head tile): the fewest that keep at least 90% of the GPU's
/// resident-block slots busy across waves, with at least 4 tiles (256 tokens) per split;
/// failing that, the best-filling count.
fn choose_splits(slots: usize, blocks_per_split: usize, tiles: usize) -> usize {
    let max_splits = (tiles / 4).clamp(1, 1024);
    let fill = |s: usize| {
        let blocks = blocks_per_split * s;
        blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
    };
    let mut best = 1;
    for s in 1..=max_splits {
        if fill(s) >= 0.9 {
            return s;
        }
        if fill(s) > fill(best) + 1e-9 {
            best = s;
        }
    }
    best
}

/// Where a plan's device words lie, in bytes from the start of its workspace (16-byte
/// aligned regions): the engine path's header, slots and entry statuses
/// ([`HEADER_WORDS`] + 2 x batch `i32`, see engine.cu), the wgmma kernel's schedule (2 x
/// batch `i32`), the partial log-sum-exps and the partial outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WorkspaceLayout {
    pub slots: usize,
    pub status: usize,
    pub schedule: usize,
    pub part_lse: usize,
    pub part_out: usize,
    pub bytes: usize,
}

impl WorkspaceLayout {
    pub(crate) fn new(
        kernel: DecodeKernel,
        shape: LatentShape,
        batch: usize,
        splits: usize,
    ) -> Result<Self> {
        let overflow = || Error::invalid("the decode workspace's size overflows");
        let (partials, schedule) = match kernel {
            // wgmma: each CTA boundary inside a sequence adds one piece to the batch's
            DecodeKernel::Wgmma => ((batch + splits) * shape.heads, 2 * batch),
            DecodeKernel::MmaSync if splits > 1 => (batch * splits * shape.heads, 0),
            DecodeKernel::MmaSync => (0, 0),
        };
        let align = |n: usize| n.checked_next_multiple_of(16).ok_or_else(overflow);
        let slots = HEADER_WORDS * 4;
        let status = slots + batch * 4;
        let sched = status + batch * 4;
        let part_lse = align(sched + schedule * 4)?;
        let part_out = partials
            .checked_mul(4)
            .and_then(|n| n.checked_add(part_lse))
            .ok_or_else(overflow)
            .and_then(align)?;
        let bytes = partials
            .checked_mul(shape.slice_width * 4)
            .and_then(|n| n.checked_add(part_out))
            .ok_or_else(overflow)?;
        Ok(WorkspaceLayout {
            slots,
            status,
            schedule: sched,
            part_lse,
            part_out,
            bytes,
        })
    }
}

/// The engine's pool as the decode kernels read it: `pages` pages of [`PAGE_SIZE`] rows
/// of `row_width` values of `dtype` at `pool`, page `p` at `pool + p * page_stride` bytes; block table
/// rows of `max_pages` and lengths at `table` and `lens`, indexed by slot (`num_slots`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolRef {
    pub pool: u64,
    pub row_width: usize,
    pub dtype: DType,
    pub page_stride: usize,
    pub pages: usize,
    pub table: u64,
    pub lens: u64,
    pub num_slots: usize,
    pub max_pages: usize,
}

impl PoolRef {
    /// Bytes of the rows of one page.
    pub fn page_bytes(&self) -> usize {
        PAGE_SIZE
            * self
                .dtype
                .row_bytes(self.row_width.saturating_sub(ROPE_WIDTH), ROPE_WIDTH)
    }

    /// Refuses a page stride the decode kernels cannot read: both take any multiple of
    /// 16 bytes (the copy engine's and cp.async's granule) of at least a page's rows.
    pub fn check_supported(&self) -> Result<()> {
        if self.page_stride % 16 != 0 || self.page_stride < self.page_bytes() {
            return Err(Error::invalid(format!(
                "a page stride must be a multiple of 16 bytes of at least a page's {} bytes \
                 of rows, got {}",
                self.page_bytes(),
                self.page_stride
            )));
        }
        Ok(())
    }
}

/// The FP8 pool as the Hopper kernel takes it (`RawPool` in decode_sm90.cu).
#[repr(C)]
struct RawPool {
    base: u64,
    page_stride: u64,
    pages: i32,
}

/// Who holds a plan's workspace.
#[derive(Debug)]
enum Workspace {
    /// The plan's own (made by [`CudaBackend::plan`]).
    Owned(DeviceBuffer<u8>),
    /// Caller-owned device memory (the engine path), at least the layout's bytes.
    Borrowed(u64),
}

/// Launch geometry and workspace of one decode shape; reusable for any lengths (the
/// kernels read them on the device), so its launches can be captured in a CUDA graph.
#[derive(Debug)]
pub struct DecodePlan {
    device: Arc<CudaDevice>,
    kernels: Arc<Kernels>,
    shape: LatentShape,
    batch: usize,
    splits: usize,
    layout: WorkspaceLayout,
    workspace: Workspace,
}

fn check_geometry(batch: usize, splits: usize) -> Result<()> {
    if batch == 0 || batch > 65535 {
        return Err(Error::invalid(format!(
            "decode batch must be 1 to 65535, got {batch}"
        )));
    }
    if !(1..=1024).contains(&splits) {
        return Err(Error::invalid(format!(
            "split count must be 1 to 1024, got {splits}"
        )));
    }
    Ok(())
}

impl DecodePlan {
    fn new(
        device: &Arc<CudaDevice>,
        kernels: Arc<Kernels>,
        shape: LatentShape,
        batch: usize,
        splits: usize,
    ) -> Result<Self> {
        check_geometry(batch, splits)?;
        let layout = WorkspaceLayout::new(kernels.config.kernel, shape, batch, splits)?;
        Ok(DecodePlan {
            workspace: Workspace::Owned(DeviceBuffer::new(device, layout.bytes)?),
            device: device.clone(),
            kernels,
            shape,
            batch,
            splits,
            layout,
        })
    }

    /// A plan over caller-owned device memory at `workspace` (16-byte aligned, at least
    /// [`WorkspaceLayout::bytes`]; checked by the caller): allocates nothing.
    pub(crate) fn borrowed(
        device: &Arc<CudaDevice>,
        kernels: Arc<Kernels>,
        shape: LatentShape,
        batch: usize,
        splits: usize,
        workspace: u64,
    ) -> Result<Self> {
        check_geometry(batch, splits)?;
        Ok(DecodePlan {
            layout: WorkspaceLayout::new(kernels.config.kernel, shape, batch, splits)?,
            workspace: Workspace::Borrowed(workspace),
            device: device.clone(),
            kernels,
            shape,
            batch,
            splits,
        })
    }

    /// Device address of the workspace.
    pub(crate) fn workspace(&self) -> u64 {
        match &self.workspace {
            Workspace::Owned(b) => b.ptr(),
            Workspace::Borrowed(p) => *p,
        }
    }

    pub(crate) fn layout(&self) -> &WorkspaceLayout {
        &self.layout
    }

    /// The specialisation of the plan's kernels.
    pub fn config(&self) -> KernelConfig {
        self.kernels.config
    }

    pub fn splits(&self) -> usize {
        self.splits
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn shape(&self) -> LatentShape {
        self.shape
    }
    /// Name of the kernel variant, for reports.
    pub fn kernel_name(&self) -> String {
        let c = self.kernels.config;
        format!(
            "cuda {} split-kv (slice {}, {} heads/block, {} stages, {} blocks/SM, {} splits)",
            c.kernel.name(),
            c.slice_width,
            c.heads_tile,
            c.stages,
            c.blocks_per_sm,
            self.splits
        )
    }

    /// Enqueues one decode step on `stream`, with no host synchronisation (graph
    /// capturable): for each `b < batch`, query rows `q[b]` (f32, `[heads][row_width]`)
    /// against slot `slots[b]` of `cache`; writes `out[b]` (f32, `[heads][slice_width]`)
    /// and `lse[b]` (f32, `[heads]`). A slot id out of range, or a slot holding no token,
    /// reads nothing and yields NaN outputs for its sequence.
    ///
    /// # Safety
    /// `slots` (`batch` i32), `q`, `out` and `lse` must be device addresses of buffers of
    /// those sizes, valid until the stream passes this point.
    pub unsafe fn launch(
        &self,
        cache: &DeviceCache,
        slots: u64,
        q: u64,
        out: u64,
        lse: u64,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: forwarded contract; the cache's own pool, table and lengths.
        unsafe { self.launch_pool(&cache.pool_ref(), slots, q, out, lse, stream) }
    }

    /// [`Self::launch`] over any pool: the device cache's, or the engine's (then `slots`
    /// are the plan's checked identity slots, see `engine.cu`). The one decode launch of
    /// the backend.
    ///
    /// # Safety
    /// As [`Self::launch`]; `pool` describes live device memory: `pages` pages, a block
    /// table of `num_slots` rows of `max_pages` and `num_slots` lengths.
    pub(crate) unsafe fn launch_pool(
        &self,
        pool: &PoolRef,
        slots: u64,
        q: u64,
        out: u64,
        lse: u64,
        stream: CUstream,
    ) -> Result<()> {
        if pool.row_width != self.shape.row_width() {
            return Err(Error::mismatch(format!(
                "the cache holds rows of {} values, the plan expects {}",
                pool.row_width,
                self.shape.row_width()
            )));
        }
        if pool.dtype != self.kernels.config.dtype {
            return Err(Error::mismatch(format!(
                "the cache holds {} rows, the plan's kernels read {}",
                pool.dtype.name(),
                self.kernels.config.dtype.name()
            )));
        }
        pool.check_supported()?;
        self.device.bind()?;
        let pool_ptr = pool.pool;
        let (table, lens) = (pool.table, pool.lens);
        let heads = self.shape.heads as i32;
        let max_pages = pool.max_pages as i32;
        let splits = self.splits as i32;
        let num_slots = pool.num_slots as i32;
        let ws = self.workspace();
        let part_out = ws + self.layout.part_out as u64;
        let part_lse = ws + self.layout.part_lse as u64;
        let (batch, sched) = (self.batch as i32, ws + self.layout.schedule as u64);
        let page_stride = pool.page_stride as u64;
        let config = self.kernels.config;
        let wgmma = config.kernel == DecodeKernel::Wgmma;
        // The Hopper kernel reads a bf16 pool through a tensor map and an FP8 pool
        // through its address, stride and page count (both by value, so a captured graph
        // keeps its own copy) and schedules the whole batch over a grid of CTAs (it takes
        // the batch size and writes the merge's table); v3 reads the pool through its
        // address and has a block per (split, sequence).
        let raw_pool = match pool.dtype {
            DType::Fp8E4m3 => Some(RawPool {
                base: pool_ptr,
                page_stride: pool.page_stride as u64,
                pages: i32::try_from(pool.pages)
                    .map_err(|_| Error::invalid("an FP8 pool holds at most 2^31 - 1 pages"))?,
            }),
            _ => None,
        };
        let pool_map = if wgmma && pool.dtype == DType::Bf16 {
            Some(bf16_pages_tensor_map(
                pool_ptr,
                self.shape.row_width(),
                pool.pages,
                pool.page_stride,
            )?)
        } else {
            None
        };
        let mut args = [
            match (&pool_map, &raw_pool) {
                (Some(map), _) => arg(map),
                (None, Some(raw)) => arg(raw),
                (None, None) => arg(&pool_ptr),
            },
            arg(&q),
            arg(&table),
            arg(&lens),
            arg(&slots),
            arg(&num_slots),
            arg(&heads),
            arg(&max_pages),
            if wgmma { arg(&batch) } else { arg(&splits) },
            arg(&out),
            arg(&lse),
            arg(&part_out),
            arg(&part_lse),
            // the Hopper kernel's page stride is in its tensor map
            if wgmma {
                arg(&sched)
            } else {
                arg(&page_stride)
            },
        ];
        let grid_z = if wgmma { 1 } else { self.batch as u32 };
        let head_tiles = (self.shape.heads / config.heads_tile) as u32;
        self.kernels.decode.launch(
            (head_tiles, self.splits as u32, grid_z),
            config.decode_threads(),
            self.kernels.decode_shared_bytes,
            stream,
            &mut args,
        )?;
        let merge_grid = (self.shape.heads as u32, self.batch as u32, 1);
        match self.kernels.combine_pieces {
            Some(combine_pieces) => {
                let mut args = [
                    arg(&part_out),
                    arg(&part_lse),
                    arg(&sched),
                    arg(&heads),
                    arg(&batch),
                    arg(&out),
                    arg(&lse),
                ];
                // the merge starts as the decode's CTAs finish, not after a launch gap
                combine_pieces
                    .launch_programmatic_dependent(merge_grid, 128, 0, stream, &mut args)?;
            }
            None if self.splits > 1 => {
                let mut args = [
                    arg(&part_out),
                    arg(&part_lse),
                    arg(&heads),
                    arg(&splits),
                    arg(&out),
                    arg(&lse),
                ];
                self.kernels
                    .combine
                    .launch(merge_grid, 128, self.splits * 4, stream, &mut args)?;
            }
            None => {}
        }
        Ok(())
    }
}

impl LatentAttention for CudaBackend {
    fn name(&self) -> String {
        format!("cuda ({})", self.device.name())
    }

    /// Uploads the sequences of `cache` to a fresh device cache, runs one decode step
    /// and copies the results back (the engine-facing path is [`DecodePlan::launch`]).
    fn attend(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        check_attend_args(cache, shape, seqs, q, out, lse)?;
        if seqs.is_empty() {
            return Ok(());
        }
        // Check the shape and row type before allocating anything.
        let dtype = cache.dtype();
        self.kernels_for(shape.heads, shape.slice_width, shape.d_r, dtype)?;
        let lens = seqs
            .iter()
            .map(|&s| cache.seq_len(s))
            .collect::<Result<Vec<_>>>()?;
        let max_len = *lens.iter().max().expect("the batch is not empty");
        let pages: usize = lens.iter().map(|l| l.div_ceil(PAGE_SIZE)).sum();
        let mut dev_cache = self.new_cache_for(
            DeviceCacheConfig {
                slice_width: shape.slice_width,
                pages,
                slots: seqs.len(),
                max_pages_per_slot: max_len.div_ceil(PAGE_SIZE),
            },
            dtype,
        )?;
        for (slot, &seq) in seqs.iter().enumerate() {
            dev_cache.upload(slot, cache, seq)?;
        }
        let plan = self.plan_for(shape, dtype, seqs.len(), max_len)?;
        let slots: Vec<i32> = (0..seqs.len() as i32).collect();
        let slots_dev = DeviceBuffer::from_host(&self.device, &slots)?;
        let q_dev = DeviceBuffer::from_host(&self.device, q)?;
        let mut out_dev = DeviceBuffer::<f32>::new(&self.device, out.len())?;
        let mut lse_dev = DeviceBuffer::<f32>::new(&self.device, lse.len())?;
        // NaN poison: an element the kernels fail to write cannot pass as a result.
        out_dev.fill_bytes(0xff)?;
        lse_dev.fill_bytes(0xff)?;
        // SAFETY: every buffer is sized for this batch and shape and outlives the sync.
        unsafe {
            plan.launch(
                &dev_cache,
                slots_dev.ptr(),
                q_dev.ptr(),
                out_dev.ptr(),
                lse_dev.ptr(),
                self.stream.raw(),
            )?
        };
        self.stream.synchronize()?;
        out_dev.download(out)?;
        lse_dev.download(lse)
    }
}

#[cfg(test)]
mod tests {
    use super::choose_splits;

    #[test]
    fn splits_fill_the_gpu_without_tiny_chunks() {
        // 132 slots: one long sequence spreads over (nearly) every slot
        let s = choose_splits(132, 1, 1024);
        assert!((119..=132).contains(&s), "{s}");
        // 128 sequences already fill a wave: no split
        assert_eq!(choose_splits(132, 128, 1024), 1);
        // a short sequence is not cut below 4 tiles per split
        assert_eq!(choose_splits(132, 1, 8), 2);
        assert_eq!(choose_splits(132, 1, 1), 1);
    }
}

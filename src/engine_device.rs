//! The engine API on the GPU (feature `cuda`): stateless decode and append on the
//! engine's own device memory, the contract of [`crate::engine`] with device addresses
//! and the engine's `CUstream`. Nothing here synchronises with the host or allocates
//! after creation (but the cuBLAS handle and the bf16 projection's staging buffer, made
//! on first use), so a step (plan, then per layer append and decode) can be captured in
//! a CUDA graph and replayed with new tokens.
//!
//! - The cache of a layer is the engine's pool ([`DevicePagedCache`]): rows of the rank's
//!   `slice_width + d_r` (latent slice, then RoPE key), pages of [`PAGE_SIZE`] rows at
//!   `base + page * page_stride` (a multiple of 16 bytes, the base 16-byte aligned). Rows
//!   are bf16, or fp8_e4m3 (the slice's e4m3 codes with f32 block scales, the key in
//!   bf16; DESIGN 7.1). The engine decodes pools of the row type it was made for
//!   ([`DeviceEngine::from_context_for`]: FP8 on the Hopper kernel only); appends and row
//!   copies take pools of either type.
//! - [`DeviceEngine::plan`] writes the plan header into a caller-owned device workspace
//!   ([`DeviceEngine::workspace_bytes`] bytes for a batch and a block table width), which
//!   every layer's decode of the step reuses (it also holds the partial outputs of the
//!   split-KV merge). The schedule itself is computed by the decode kernels from the device
//!   lengths, so the plan fixes only the launch geometry.
//! - [`DeviceEngine::decode`]: per batch entry `b`, block table row `b` and length `b`;
//!   the query rows are the kernel's (`[batch][heads][slice_width + d_r]` f32, the latent
//!   part scaled by `softmax_scale * mu`, the RoPE part by `softmax_scale`: see
//!   [`DeviceEngine::query_scales`]); writes latent outputs `[batch][heads][slice_width]`
//!   and log-sum-exps `[batch][heads]` (f32, engine-owned). Before the kernels, a check
//!   kernel reads the lengths and the page indices each entry will use: an entry with a
//!   page index outside the pool, or a length needing more pages than the table's width,
//!   reads nothing, gets NaN outputs and sets [`Faults::BAD_PAGE`] in the device fault
//!   word; an empty entry gets zeros and a log-sum-exp of minus infinity; a workspace
//!   whose plan was made for another launch sets [`Faults::BAD_PLAN`] and NaN everywhere.
//! - [`DeviceEngine::append`] writes new tokens from their full pre-norm latents (f32 or
//!   bf16) and RoPE keys at a slot mapping, normalised, rotated and sliced as
//!   [`RankContext::append_paged`] does (in f64, rounded to bf16 or quantised to FP8 as
//!   the host encodes rows).
//! - [`DeviceEngine::absorb_queries`] builds the query rows from `q_nope` and `q_rope`
//!   (`W'_UK` of every layer is on the GPU), [`DeviceEngine::project`] the rank's partial
//!   head outputs from the latent outputs (`W'_UV`), a strided batched cuBLAS product each
//!   (f32 outputs; [`DeviceEngine::project_for`] also bf16, engine-owned as the rest);
//!   [`DeviceEngine::copy_rows`] hands a prefill's rows over into the engine's pages.
//!
//! Everything that can be checked without reading device memory is checked at the call
//! (null and misaligned addresses, sizes, the layout, the workspace's size).

use crate::attention::cuda::{
    arg, CUstream, CudaBackend, DecodePlan, DeviceBuffer, EngineKernels, Kernels, PoolRef,
    WorkspaceLayout, APPEND_THREADS, PAGE_SIZE,
};
use crate::attention::LatentShape;
use crate::decode::RankContext;
use crate::device_rank::{blas_err, Blas};
use crate::dtype::DType;
use crate::engine::{Faults, PagedLayout, RmsMode};
use crate::error::{Error, Result};
use crate::geometry::{ModelDims, ShardPlan};
use crate::transform::TransformKind;
use cudarc::cublas::{result as blas, sys as blas_sys};
use std::sync::Arc;

pub use crate::attention::schedule::{HEADER_WORDS, MAGIC};

/// The plan kind of CUDA workspaces (the header's second word).
pub const KIND_CUDA: i32 = 3;

/// Largest latent width a device append takes (its shared memory holds the latent).
pub const MAX_APPEND_LATENT: usize = 4096;

/// Bytes of the f32 staging buffer of bf16 projections ([`DeviceEngine::project_for`]):
/// each cuBLAS product covers as many batch entries as it holds (at least one).
pub const BF16_PROJECTION_STAGING_BYTES: usize = 4 << 20;

/// The engine's cache of one layer in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePagedCache {
    /// Device address of page 0.
    pub base: u64,
    pub layout: PagedLayout,
}

/// One layer's decode over the engine's device memory.
#[derive(Clone, Copy, Debug)]
pub struct DeviceStep {
    pub cache: DevicePagedCache,
    /// `[batch][block_table_width]` int32 page indices.
    pub block_table: u64,
    pub batch: usize,
    pub block_table_width: usize,
    /// `[batch]` int32 lengths.
    pub seq_lens: u64,
    /// The workspace [`DeviceEngine::plan`] filled for this batch and width.
    pub workspace: u64,
    pub workspace_bytes: usize,
    /// 0, or a device `u32` the kernels OR [`Faults`] bits into.
    pub faults: u64,
}

/// How a device append reads its inputs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAppend {
    /// `[count]` int32 slots (`page * page_size + offset`; negative: skipped).
    pub slots: u64,
    pub count: usize,
    /// `[count][d_c]` full pre-norm latents.
    pub latents: u64,
    /// `[count][d_r]` RoPE-rotated keys.
    pub k_rope: u64,
    /// Element type of both inputs: f32 or bf16.
    pub input: DType,
    pub mode: RmsMode,
    /// 0, or a device `u32` the kernel ORs [`Faults`] bits into.
    pub faults: u64,
}

/// `transform` argument of `tpla_engine_append`.
const TRANSFORM_IDENTITY: i32 = 0;
const TRANSFORM_HADAMARD: i32 = 1;
const TRANSFORM_DENSE: i32 = 2;

/// What the device engine holds of a layer.
struct EngineLayer {
    transform: i32,
    /// Hadamard: the signs `[d_c]`; dense: `U`'s slice columns `[d_c][slice_width]` (f64).
    data: Option<DeviceBuffer<u8>>,
    fraction: f64,
    mu: f64,
    /// `W'_UK` `[heads][slice_width][d_n]` and `W'_UV` `[heads][slice_width][d_v]` (f32).
    w_uk: DeviceBuffer<f32>,
    w_uv: DeviceBuffer<f32>,
}

/// One rank's engine-facing GPU object: the decode and engine kernels of its shape and,
/// per layer, what appends need (the transform on the device, the energy fraction) and
/// the query scales. Holds no cache state.
pub struct DeviceEngine {
    backend: CudaBackend,
    /// The decode kernels, for pools of one row type (`kernels.config.dtype`): plans and
    /// workspaces depend on them.
    kernels: Arc<Kernels>,
    engine: Arc<EngineKernels>,
    dims: ModelDims,
    plan: ShardPlan,
    layers: Vec<EngineLayer>,
    /// Made on the first absorption or projection (decode and append need no cuBLAS).
    blas: std::cell::OnceCell<Blas>,
    /// The f32 products of bf16 projections, made on the first one.
    bf16_staging: std::cell::OnceCell<DeviceBuffer<f32>>,
}

// SAFETY: the raw handles inside (modules, the backend's stream) are used from one
// thread at a time through `&self`/`&mut self`; CUDA allows moving them between threads.
unsafe impl Send for DeviceEngine {}

impl std::fmt::Debug for DeviceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEngine")
            .field("plan", &self.plan)
            .field("layers", &self.layers.len())
            .field("kernel", &self.kernels.config)
            .finish()
    }
}

pub(crate) fn check_address(ptr: u64, align: u64, what: &str) -> Result<()> {
    if ptr == 0 {
        return Err(Error::invalid(format!("{what} is a null device address")));
    }
    if ptr % align != 0 {
        return Err(Error::invalid(format!(
            "{what} ({ptr:#x}) is not aligned to {align} bytes"
        )));
    }
    Ok(())
}

fn word(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::invalid(format!("{what} {value} exceeds int32")))
}

impl DeviceEngine {
    /// The engine object of `context`'s rank on `backend`'s GPU, decoding bf16 pools:
    /// compiles (or loads) the kernels of its shape and uploads every layer's transform.
    /// Every layer of the context must have its weights.
    pub fn from_context(backend: CudaBackend, context: &RankContext) -> Result<Self> {
        Self::from_context_for(backend, context, DType::Bf16)
    }

    /// [`Self::from_context`] decoding pools of `dtype` rows: bf16, or fp8_e4m3 on the
    /// Hopper kernel (compute capability 9.0, heads in multiples of 64, slices up to 256;
    /// an `Unsupported` error elsewhere). The row type is fixed here because the decode
    /// kernels, and with them the plans and workspaces, differ between the two.
    pub fn from_context_for(
        backend: CudaBackend,
        context: &RankContext,
        dtype: DType,
    ) -> Result<Self> {
        let (dims, plan) = (*context.dims(), *context.plan());
        let kernels = backend.kernels_for(plan.heads, plan.slice_width, dims.d_r, dtype)?;
        let engine = backend.engine_kernels(plan.slice_width)?;
        if dims.d_c > MAX_APPEND_LATENT {
            return Err(Error::unsupported(format!(
                "device appends take latents of at most {MAX_APPEND_LATENT} values, not {}",
                dims.d_c
            )));
        }
        let (d, w, start) = (dims.d_c, plan.slice_width, plan.slice_start);
        let device = backend.device().clone();
        let upload = |values: &[f64]| -> Result<DeviceBuffer<u8>> {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            DeviceBuffer::from_host(&device, &bytes)
        };
        let mut layers = Vec::with_capacity(context.layer_count());
        for l in 0..context.layer_count() {
            let layer = context.layer(l)?;
            let t = &layer.transform;
            if t.dim() != d {
                return Err(Error::mismatch(format!(
                    "layer {l}'s transform is {} wide, the latent {d}",
                    t.dim()
                )));
            }
            let (transform, data) = match t.kind() {
                TransformKind::Identity => (TRANSFORM_IDENTITY, None),
                TransformKind::Hadamard => {
                    let signs = t.hadamard_signs().expect("a Hadamard transform has signs");
                    (TRANSFORM_HADAMARD, Some(upload(signs)?))
                }
                TransformKind::Pca => {
                    let m = t.matrix();
                    let cols: Vec<f64> = (0..d)
                        .flat_map(|r| m[r * d + start..r * d + start + w].iter().copied())
                        .collect();
                    (TRANSFORM_DENSE, Some(upload(&cols)?))
                }
            };
            layers.push(EngineLayer {
                transform,
                data,
                fraction: layer.slice_fraction,
                mu: layer.mu,
                w_uk: DeviceBuffer::from_host(&device, &layer.w_uk)?,
                w_uv: DeviceBuffer::from_host(&device, &layer.w_uv)?,
            });
        }
        Ok(DeviceEngine {
            blas: std::cell::OnceCell::new(),
            bf16_staging: std::cell::OnceCell::new(),
            backend,
            kernels,
            engine,
            dims,
            plan,
            layers,
        })
    }

    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }
    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }
    /// The decode kernel's shape.
    pub fn shape(&self) -> LatentShape {
        LatentShape {
            heads: self.plan.heads,
            slice_width: self.plan.slice_width,
            d_r: self.dims.d_r,
        }
    }
    /// Elements per cache row and query row: `slice_width + d_r`.
    pub fn row_width(&self) -> usize {
        self.shape().row_width()
    }
    /// The row type of the pools [`Self::decode`] reads.
    pub fn pool_dtype(&self) -> DType {
        self.kernels.config.dtype
    }

    fn check_layer(&self, layer: usize) -> Result<&EngineLayer> {
        self.layers.get(layer).ok_or_else(|| {
            Error::out_of_range(format!(
                "layer {layer} is out of range for {} layers",
                self.layers.len()
            ))
        })
    }

    /// The factors of the latent and the RoPE parts of a query row of `layer`:
    /// `softmax_scale * mu` and `softmax_scale`.
    pub fn query_scales(&self, layer: usize) -> Result<(f32, f32)> {
        let l = self.check_layer(layer)?;
        let s = self.dims.softmax_scale;
        Ok(((s * l.mu) as f32, s as f32))
    }

    /// The split count of a step of `batch` entries over a block table `width` pages
    /// wide (the wgmma kernel's CTAs per head tile; v3's splits per sequence, chosen for
    /// sequences of `width` pages).
    pub fn splits(&self, batch: usize, width: usize) -> Result<usize> {
        self.geometry(batch, width).map(|(_, s)| s)
    }

    fn geometry(&self, batch: usize, width: usize) -> Result<(WorkspaceLayout, usize)> {
        if batch == 0 || batch > 65535 {
            return Err(Error::invalid(format!(
                "decode batch must be 1 to 65535, got {batch}"
            )));
        }
        if width == 0 || width > i32::MAX as usize / PAGE_SIZE {
            return Err(Error::invalid(format!(
                "the block table must be 1 to {} pages wide, got {width}",
                i32::MAX as usize / PAGE_SIZE
            )));
        }
        let shape = self.shape();
        let splits = self
            .backend
            .splits_for(&self.kernels, shape, batch, width * PAGE_SIZE);
        let layout = WorkspaceLayout::new(self.kernels.config.kernel, shape, batch, splits)?;
        if layout.bytes / 4 > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "the workspace of a batch of {batch} would be {} bytes, beyond int32 words",
                layout.bytes
            )));
        }
        Ok((layout, splits))
    }

    /// Bytes of the device workspace of a step of `batch` entries over a block table
    /// `width` pages wide (allocate it once for the largest batch and width).
    pub fn workspace_bytes(&self, batch: usize, width: usize) -> Result<usize> {
        self.geometry(batch, width).map(|(l, _)| l.bytes)
    }

    fn check_workspace(&self, ptr: u64, bytes: usize, layout: &WorkspaceLayout) -> Result<()> {
        check_address(ptr, 16, "the workspace")?;
        if bytes < layout.bytes {
            return Err(Error::invalid(format!(
                "the workspace holds {bytes} bytes, the plan needs {}",
                layout.bytes
            )));
        }
        Ok(())
    }

    /// Plans a step of `batch` entries over a block table `width` pages wide into the
    /// device workspace at `workspace` (`workspace_bytes` bytes, 16-byte aligned): one
    /// kernel on `stream`, no host synchronisation. `seq_lens` (device, `[batch]` int32) is
    /// checked but not read: the decode kernels schedule from the lengths themselves.
    ///
    /// # Safety
    /// `workspace` is device memory of this GPU holding `workspace_bytes`, not in use by
    /// another stream; `stream` is a live stream of this device's context (or NULL).
    pub unsafe fn plan_step(
        &self,
        seq_lens: u64,
        batch: usize,
        width: usize,
        workspace: u64,
        workspace_bytes: usize,
        stream: CUstream,
    ) -> Result<()> {
        let (layout, splits) = self.geometry(batch, width)?;
        check_address(seq_lens, 4, "seq_lens")?;
        self.check_workspace(workspace, workspace_bytes, &layout)?;
        let plan = self.borrowed_plan(batch, splits, workspace)?;
        self.backend.device().bind()?;
        // SAFETY: the workspace holds the layout's bytes (checked), caller contract.
        unsafe { self.engine.launch_plan(&plan, width, stream) }
    }

    fn borrowed_plan(&self, batch: usize, splits: usize, workspace: u64) -> Result<DecodePlan> {
        DecodePlan::borrowed(
            self.backend.device(),
            self.kernels.clone(),
            self.shape(),
            batch,
            splits,
            workspace,
        )
    }

    /// The layout of `cache` if every kernel of the engine can read and write it: bf16 or
    /// FP8 rows of this rank, pages of [`PAGE_SIZE`] rows, a page stride of a multiple of
    /// 16 bytes and a 16-byte aligned base (the decode kernels' tile and bulk copies, the
    /// row copy's words).
    fn check_cache(&self, cache: &DevicePagedCache) -> Result<PagedLayout> {
        let l = cache.layout;
        l.extent()?;
        if !matches!(l.dtype, DType::Bf16 | DType::Fp8E4m3) {
            return Err(Error::unsupported(format!(
                "the CUDA kernels read bf16 or fp8_e4m3 caches, not {}",
                l.dtype.name()
            )));
        }
        if l.page_size != PAGE_SIZE {
            return Err(Error::unsupported(format!(
                "the CUDA kernels read pages of {PAGE_SIZE} rows, not {}",
                l.page_size
            )));
        }
        if l.row_width != self.row_width() || l.rope_width != self.dims.d_r {
            return Err(Error::mismatch(format!(
                "the paged cache's rows are {} elements ({} RoPE), this rank's are {} ({} \
                 latent + {} RoPE)",
                l.row_width,
                l.rope_width,
                self.row_width(),
                self.plan.slice_width,
                self.dims.d_r
            )));
        }
        if l.page_stride % 16 != 0 {
            return Err(Error::invalid(format!(
                "the page stride {} is not a multiple of 16 bytes (the decode kernels copy \
                 pages in 16-byte units)",
                l.page_stride
            )));
        }
        check_address(cache.base, 16, "the cache base")?;
        Ok(l)
    }

    /// One decode step of `layer` over the engine's device memory (a pool of
    /// [`Self::pool_dtype`] rows), enqueued on `stream` with no host synchronisation:
    /// queries `q` (`[batch][heads][row_width]` f32, scaled as [`Self::query_scales`]
    /// says), latent outputs `out` (`[batch][heads][slice_width]` f32) and log-sum-exps
    /// `lse` (`[batch][heads]` f32), all device addresses. Three launches: the check of
    /// the lengths and page indices, the decode (and its merge), the fix-up of empty and
    /// faulted entries.
    ///
    /// # Safety
    /// Every address is device memory of this GPU holding what its description says,
    /// valid until the stream passes this point; `out` and `lse` overlap nothing else;
    /// no other stream uses the workspace meanwhile; `stream` is live (or NULL).
    pub unsafe fn decode(
        &self,
        layer: usize,
        step: &DeviceStep,
        q: u64,
        out: u64,
        lse: u64,
        stream: CUstream,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let l = self.check_cache(&step.cache)?;
        if l.dtype != self.pool_dtype() {
            return Err(Error::mismatch(format!(
                "this device engine decodes {} pools, the cache holds {} rows (the row type \
                 is chosen when the engine is made: DeviceEngine::from_context_for, \
                 tpla_device_engine_create_for)",
                self.pool_dtype().name(),
                l.dtype.name()
            )));
        }
        let (batch, width) = (step.batch, step.block_table_width);
        let (layout, splits) = self.geometry(batch, width)?;
        check_address(step.block_table, 4, "the block table")?;
        check_address(step.seq_lens, 4, "seq_lens")?;
        for (p, what) in [(q, "the queries"), (out, "the outputs"), (lse, "the lse")] {
            check_address(p, 16, what)?;
        }
        if step.faults != 0 {
            check_address(step.faults, 4, "the fault word")?;
        }
        self.check_workspace(step.workspace, step.workspace_bytes, &layout)?;
        let pool = PoolRef {
            pool: step.cache.base,
            row_width: l.row_width,
            dtype: l.dtype,
            page_stride: l.page_stride,
            pages: l.pages,
            table: step.block_table,
            lens: step.seq_lens,
            num_slots: batch,
            max_pages: width,
        };
        let plan = self.borrowed_plan(batch, splits, step.workspace)?;
        self.backend.device().bind()?;
        // SAFETY: checked sizes and alignment; validity is the caller's contract.
        unsafe {
            self.engine
                .launch_decode(&plan, &pool, step.faults, q, out, lse, stream)
        }
    }

    /// Appends `a.count` tokens to the engine's device cache of `layer` (see
    /// [`DeviceAppend`]), a pool of bf16 or FP8 rows (either, whatever
    /// [`Self::pool_dtype`] is): one block per token on `stream`, no host
    /// synchronisation. The rows are the bytes [`RankContext::append_paged`] writes into a
    /// host pool of that type, up to the order of the RMS sums. Negative slots are
    /// skipped; a slot past the pool sets [`Faults::BAD_SLOT`], a non-finite input or a
    /// value beyond bf16 (FP8 pools too, as the host refuses) [`Faults::BAD_VALUE`];
    /// those tokens are not written.
    ///
    /// # Safety
    /// Every address is device memory of this GPU holding what its description says,
    /// valid until the stream passes this point; the cache memory spans its layout and
    /// no other stream reads or writes the rows appended meanwhile; `stream` is live.
    pub unsafe fn append(
        &self,
        layer: usize,
        cache: &DevicePagedCache,
        a: &DeviceAppend,
        stream: CUstream,
    ) -> Result<()> {
        let layer = self.check_layer(layer)?;
        let l = self.check_cache(cache)?;
        let bf16_in = match a.input {
            DType::F32 => 0i32,
            DType::Bf16 => 1,
            other => {
                return Err(Error::unsupported(format!(
                    "device appends take f32 or bf16 latents and keys, not {other:?}"
                )))
            }
        };
        let count = word(a.count, "the token count")?;
        if count == 0 {
            return Ok(());
        }
        check_address(a.slots, 4, "the slots")?;
        let size = a.input.size() as u64;
        check_address(a.latents, size, "the latents")?;
        check_address(a.k_rope, size, "the RoPE keys")?;
        if a.faults != 0 {
            check_address(a.faults, 4, "the fault word")?;
        }
        let dc = self.dims.d_c as i32;
        let start = self.plan.slice_start as i32;
        let sliced = (a.mode == RmsMode::Sliced) as i32;
        if sliced != 0 && !(layer.fraction > 0.0 && layer.fraction <= 1.0) {
            return Err(Error::invalid(format!(
                "slice energy fraction must lie in (0, 1], got {}",
                layer.fraction
            )));
        }
        let tdata = layer.data.as_ref().map_or(0, |d| d.ptr());
        let (page_stride, pages) = (l.page_stride as u64, l.pages as i64);
        let fp8 = (l.dtype == DType::Fp8E4m3) as i32;
        let mut args = [
            arg(&a.latents),
            arg(&a.k_rope),
            arg(&bf16_in),
            arg(&a.slots),
            arg(&count),
            arg(&dc),
            arg(&start),
            arg(&layer.transform),
            arg(&tdata),
            arg(&sliced),
            arg(&layer.fraction),
            arg(&cache.base),
            arg(&page_stride),
            arg(&pages),
            arg(&fp8),
            arg(&a.faults),
        ];
        let shared = (self.dims.d_c + self.plan.slice_width) * 8;
        self.backend.device().bind()?;
        // SAFETY: the kernel reads `count` slots, latents and keys, and writes rows of
        // pages below `pages` only (slots are checked on the device).
        unsafe {
            self.engine.append.launch(
                (a.count as u32, 1, 1),
                APPEND_THREADS,
                shared,
                stream,
                &mut args,
            )
        }
    }
}

impl DeviceEngine {
    /// Copies `count` rows between two device caches of this rank's rows (both bf16 or
    /// both FP8), on `stream` with no host synchronisation: row `src_slots[i]` of `src` to
    /// row `dst_slots[i]` of `dst` (both device `[count]` int32; slot = page * 64 +
    /// offset), bytes unchanged. The
    /// hand-off of a prefill's cache into the engine's decode pages, device to device (a
    /// host prefill: copy its rows to the device first, as one packed source "pool").
    /// Negative destination slots are skipped; a slot past its pool (or a negative source
    /// slot) sets [`Faults::BAD_SLOT`] in `faults` (0 or a device `u32`) and copies
    /// nothing for that row.
    ///
    /// # Safety
    /// Every address is device memory of this GPU holding what its description says,
    /// valid until the stream passes this point; the destination rows are not read or
    /// written by other work meanwhile and do not overlap the source rows; `stream` is
    /// live.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn copy_rows(
        &self,
        dst: &DevicePagedCache,
        dst_slots: u64,
        src: &DevicePagedCache,
        src_slots: u64,
        count: usize,
        faults: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (d, s) = (self.check_cache(dst)?, self.check_cache(src)?);
        if d.dtype != s.dtype {
            return Err(Error::mismatch(format!(
                "row copies keep the bytes: the source holds {} rows, the destination {}",
                s.dtype.name(),
                d.dtype.name()
            )));
        }
        let n = word(count, "the row count")?;
        if n == 0 {
            return Ok(());
        }
        check_address(dst_slots, 4, "the destination slots")?;
        check_address(src_slots, 4, "the source slots")?;
        if faults != 0 {
            check_address(faults, 4, "the fault word")?;
        }
        let (ds, dp) = (d.page_stride as u64, d.pages as i64);
        let (ss, sp) = (s.page_stride as u64, s.pages as i64);
        let fp8 = (s.dtype == DType::Fp8E4m3) as i32;
        let mut args = [
            arg(&src.base),
            arg(&ss),
            arg(&sp),
            arg(&src_slots),
            arg(&dst.base),
            arg(&ds),
            arg(&dp),
            arg(&dst_slots),
            arg(&n),
            arg(&fp8),
            arg(&faults),
        ];
        self.backend.device().bind()?;
        // SAFETY: the kernel reads and writes rows of pages below each pool's page count
        // only (slots are checked on the device); caller contract for the rest.
        unsafe {
            self.engine.copy_rows.launch(
                (count.div_ceil(4) as u32, 1, 1),
                128,
                0,
                stream,
                &mut args,
            )
        }
    }
}

impl DeviceEngine {
    fn blas(&self) -> Result<&Blas> {
        if self.blas.get().is_none() {
            let _ = self.blas.set(Blas::new(&self.backend)?);
        }
        Ok(self.blas.get().expect("set above"))
    }

    fn check_batch(batch: usize) -> Result<i32> {
        if batch == 0 || batch > 65535 {
            return Err(Error::invalid(format!(
                "a step has 1 to 65535 entries, got {batch}"
            )));
        }
        Ok(batch as i32)
    }

    /// The query rows of a decode from what an engine has, on `stream`: `rows[b][h]` (f32
    /// `[batch][heads][row_width]`, the layout [`Self::decode`] reads) is `W'_UK[h]`
    /// `q_nope[b][h]` (`[batch][heads][d_n]` f32) times `softmax_scale * mu`, then
    /// `q_rope[b][h]` (`[batch][heads][d_r]` f32) times `softmax_scale`: one strided
    /// batched cuBLAS product over the heads and one small kernel.
    ///
    /// # Safety
    /// The addresses are device memory of this GPU holding those sizes, valid until the
    /// stream passes this point; `rows` overlaps neither input; `stream` is live.
    pub unsafe fn absorb_queries(
        &self,
        layer: usize,
        batch: usize,
        q_nope: u64,
        q_rope: u64,
        rows: u64,
        stream: CUstream,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = Self::check_batch(batch)?;
        for (p, what) in [
            (q_nope, "q_nope"),
            (q_rope, "q_rope"),
            (rows, "the query rows"),
        ] {
            check_address(p, 4, what)?;
        }
        let (lat_scale, rope_scale) = self.query_scales(layer)?;
        let (h, w, dn, rw) = (
            self.plan.heads,
            self.plan.slice_width,
            self.dims.d_n,
            self.row_width(),
        );
        let blas = self.blas()?;
        let beta = 0.0f32;
        self.backend.device().bind()?;
        // Per head, in cuBLAS's column-major terms: C (w x batch) = A^T B with A the
        // row-major W'_UK[h] (w x d_n, so column-major d_n x w), B the head's q_nope
        // (d_n x batch, leading dimension heads * d_n) and C the rows' latent parts
        // (leading dimension heads * row_width).
        // SAFETY: live handle and stream; operands sized as documented (caller contract).
        unsafe {
            blas::set_stream(blas.0, stream as _).map_err(blas_err("binding a stream"))?;
            blas::sgemm_strided_batched(
                blas.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                w as i32,
                n,
                dn as i32,
                &lat_scale,
                l.w_uk.ptr() as *const f32,
                dn as i32,
                (w * dn) as i64,
                q_nope as *const f32,
                (h * dn) as i32,
                dn as i64,
                &beta,
                rows as *mut f32,
                (h * rw) as i32,
                rw as i64,
                h as i32,
            )
        }
        .map_err(blas_err("absorbing q_nope through W_UK"))?;
        let count = n * h as i32;
        let mut args = [arg(&q_rope), arg(&rope_scale), arg(&count), arg(&rows)];
        let threads = 256u32;
        let blocks = (count as u64 * self.dims.d_r as u64).div_ceil(threads as u64) as u32;
        // SAFETY: writes the RoPE part of `count` rows (caller contract for the sizes).
        unsafe {
            self.engine
                .rope_rows
                .launch((blocks, 1, 1), threads, 0, stream, &mut args)
        }
    }

    /// The rank's partial head outputs from [`Self::decode`]'s latent outputs, on
    /// `stream`: `heads_out[b][h][:] = W'_UV[h]^T latent[b][h][:]` (f32 `[batch][heads][d_v]`
    /// from f32 `[batch][heads][slice_width]`), one strided batched cuBLAS product; the
    /// ranks' outputs are then summed (NCCL). NaN latent rows (faulted entries) stay NaN.
    ///
    /// # Safety
    /// The addresses are device memory of this GPU holding those sizes, valid until the
    /// stream passes this point; `heads_out` overlaps `latent` nowhere; `stream` is live.
    pub unsafe fn project(
        &self,
        layer: usize,
        batch: usize,
        latent: u64,
        heads_out: u64,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: forwarded caller contract.
        unsafe { self.project_for(layer, batch, latent, heads_out, DType::F32, stream) }
    }

    /// [`Self::project`] writing head outputs of `out_dtype`: f32, or bf16 (the f32
    /// outputs rounded to nearest even as `half::bf16::from_f32` rounds them: a batch of
    /// up to [`BF16_PROJECTION_STAGING_BYTES`] / (heads * d_v * 4) entries is one cuBLAS
    /// product of the f32 call's shape; a larger one is cut into such products, whose f32
    /// sums may differ from one product's by f32 rounding of the terms, so a value may
    /// round to a neighbouring bf16, or several units away where the terms nearly cancel:
    /// session 6 saw -6.7e-6 rounded 4 units from the single product's). `heads_out` is
    /// aligned to its element size. The first bf16 call allocates the engine's staging
    /// buffer (make one before capturing a graph, as for the cuBLAS handle); other dtypes
    /// are `Unsupported`.
    ///
    /// # Safety
    /// As [`Self::project`]; and no bf16 projection of this engine runs on another stream
    /// meanwhile (they share the staging buffer).
    pub unsafe fn project_for(
        &self,
        layer: usize,
        batch: usize,
        latent: u64,
        heads_out: u64,
        out_dtype: DType,
        stream: CUstream,
    ) -> Result<()> {
        let l = self.check_layer(layer)?;
        let n = Self::check_batch(batch)?;
        if !matches!(out_dtype, DType::F32 | DType::Bf16) {
            return Err(Error::unsupported(format!(
                "projected head outputs are f32 or bf16, not {}",
                out_dtype.name()
            )));
        }
        check_address(latent, 4, "the latent outputs")?;
        check_address(heads_out, out_dtype.size() as u64, "the head outputs")?;
        let blas = self.blas()?;
        if out_dtype == DType::F32 {
            self.backend.device().bind()?;
            // SAFETY: forwarded caller contract.
            return unsafe { self.project_f32(blas, l, n, latent, heads_out, stream) };
        }
        // cuBLAS writes bf16 results only from bf16 operands (cublasGemmEx and its
        // strided batched form, CUBLAS_COMPUTE_32F: A/B CUDA_R_32F allow C CUDA_R_32F
        // only), and rounding W'_UV and the latents to bf16 first would add two roundings
        // to every product. So the f32 products go to a staging buffer, as many entries
        // as it holds at a time, and one small kernel rounds them: the f32 outputs are
        // written and read once more (batch * heads * d_v * 8 bytes; each product reads
        // all of W'_UV, heads * w * d_v * 4) and a launch is added per product.
        let staging = self.bf16_staging()?;
        let (h, w, dv) = (self.plan.heads, self.plan.slice_width, self.dims.d_v);
        let per_entry = h * dv;
        let chunk = staging.len() / per_entry;
        self.backend.device().bind()?;
        for first in (0..batch).step_by(chunk) {
            let entries = chunk.min(batch - first);
            let from = latent + (first * h * w * 4) as u64;
            // SAFETY: the staging buffer holds `chunk` entries' outputs; the latents are
            // the caller's (contract).
            unsafe { self.project_f32(blas, l, entries as i32, from, staging.ptr(), stream) }?;
            let (src, count) = (staging.ptr(), (entries * per_entry) as u64);
            let dst = heads_out + (first * per_entry * 2) as u64;
            let mut args = [arg(&src), arg(&count), arg(&dst)];
            let threads = 256u32;
            // SAFETY: reads `count` staged values, writes as many bf16 outputs of the
            // caller's buffer (contract).
            unsafe {
                self.engine.round_bf16.launch(
                    (count.div_ceil(threads as u64) as u32, 1, 1),
                    threads,
                    0,
                    stream,
                    &mut args,
                )
            }?;
        }
        Ok(())
    }

    fn bf16_staging(&self) -> Result<&DeviceBuffer<f32>> {
        if self.bf16_staging.get().is_none() {
            let per_entry = self.plan.heads * self.dims.d_v;
            let entries = (BF16_PROJECTION_STAGING_BYTES / (per_entry * 4)).max(1);
            let buffer = DeviceBuffer::new(self.backend.device(), entries * per_entry)?;
            let _ = self.bf16_staging.set(buffer);
        }
        Ok(self.bf16_staging.get().expect("set above"))
    }

    /// `heads_out` (f32) from `latent` for `n` entries: one strided batched product.
    ///
    /// # Safety
    /// As [`Self::project`], for `n` entries; the device is bound.
    unsafe fn project_f32(
        &self,
        blas: &Blas,
        l: &EngineLayer,
        n: i32,
        latent: u64,
        heads_out: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (h, w, dv) = (self.plan.heads, self.plan.slice_width, self.dims.d_v);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // As `DeviceRank::project`: per head, C (d_v x batch) = A (d_v x w) * B (w x
        // batch) with A the row-major W'_UV[h] (w x d_v), B the head's latents (leading
        // dimension heads * w) and C its outputs (heads * d_v).
        // SAFETY: live handle and stream; operands sized as documented (caller contract).
        unsafe {
            blas::set_stream(blas.0, stream as _).map_err(blas_err("binding a stream"))?;
            blas::sgemm_strided_batched(
                blas.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                dv as i32,
                n,
                w as i32,
                &alpha,
                l.w_uv.ptr() as *const f32,
                dv as i32,
                (w * dv) as i64,
                latent as *const f32,
                (h * w) as i32,
                w as i64,
                &beta,
                heads_out as *mut f32,
                (h * dv) as i32,
                dv as i64,
                h as i32,
            )
        }
        .map_err(blas_err("projecting latent outputs through W_UV"))
    }
}

impl Drop for DeviceEngine {
    fn drop(&mut self) {
        // The transforms and kernels are freed next; no launch may still be using them.
        let _ = self.backend.device().synchronize();
    }
}

/// Reads a device fault word (after the stream's work): for tests and tools.
pub fn read_faults(word: &DeviceBuffer<u32>) -> Result<Faults> {
    Ok(Faults::from_bits(word.to_vec()?[0]))
}

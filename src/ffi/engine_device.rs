//! Decode and append on the engine's own device memory (`tpla::engine_device`): the
//! contract of the tpla_context_*_paged calls with device addresses and the engine's
//! CUstream, no host synchronisation (capturable in a CUDA graph).
//!
//! Every function exists in every build; without the `cuda` feature the argument checks
//! run and the call then returns TPLA_STATUS_UNSUPPORTED.

use super::context::{tpla_context, tpla_dtype};
#[cfg(not(feature = "cuda"))]
use super::device::no_cuda;
#[cfg(feature = "cuda")]
use super::device::{check_device_buffers, check_device_disjoint, checked_stream};
use super::engine::{layout, rms_mode, tpla_paged_cache};
#[cfg(feature = "cuda")]
use super::Failure;
use super::{
    check_non_null, guard, guard_value, hand_out, handle, tpla_status, versioned, write_out,
    Outcome, Versioned,
};
use crate::dtype::DType;
use crate::engine::{PagedLayout, RmsMode};
use std::ffi::c_void;

/// One rank's engine-facing GPU object: the decode and append kernels of its shape and
/// every layer's transform on the device, made from a context by
/// `tpla_device_engine_create` or `tpla_device_engine_create_for`; it holds no cache
/// state (the engine passes its pool, block table and lengths on every call) and no
/// pointer to the context. Use it from one thread at a time.
pub struct tpla_device_engine {
    #[cfg(feature = "cuda")]
    engine: crate::engine_device::DeviceEngine,
    /// No device engine exists in a build without CUDA.
    #[cfg(not(feature = "cuda"))]
    pub(super) never: std::convert::Infallible,
}

impl tpla_device_engine {
    #[cfg(feature = "cuda")]
    pub(super) fn engine(&self) -> &crate::engine_device::DeviceEngine {
        &self.engine
    }

    /// The rank's RoPE key width, which sizes its cache rows.
    fn rope_width(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.engine.dims().d_r;
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

/// Opens GPU `device` for the rank of `ctx` (every layer with its weights), decoding
/// TPLA_DTYPE_BF16 pools: tpla_device_engine_create_for with that dtype (the same
/// statuses).
///
/// # Safety
/// `ctx` is NULL or live; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_create(
    ctx: *const tpla_context,
    device: u32,
    out: *mut *mut tpla_device_engine,
) -> tpla_status {
    // SAFETY: forwarded caller contract.
    unsafe { tpla_device_engine_create_for(ctx, device, tpla_dtype::Bf16 as u32, out) }
}

/// Opens GPU `device` for the rank of `ctx` (every layer with its weights), decoding
/// pools of `kv_dtype` rows (a `tpla_dtype`: TPLA_DTYPE_BF16, or TPLA_DTYPE_FP8_E4M3 on a
/// Hopper GPU, compute capability 9.0, with the rank's heads a multiple of 64 and its
/// slice width at most 256): compiles (or loads from the disk cache) the kernels of its
/// shape and uploads every layer's transform. The dtype is fixed here because the decode
/// kernels, and with them plans and workspace sizes, depend on it; appends and row
/// copies take pools of either dtype. Destroy it with `tpla_device_engine_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (a layer without
/// weights, an unknown dtype), TPLA_STATUS_UNSUPPORTED (built without CUDA; no usable
/// GPU, driver or libnvrtc; heads, slice width, d_r or d_c the kernels lack; a dtype
/// other than those two, or FP8 on another GPU or shape) or TPLA_STATUS_BACKEND. Reads
/// `ctx`.
///
/// # Safety
/// `ctx` is NULL or live; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_create_for(
    ctx: *const tpla_context,
    device: u32,
    kv_dtype: u32,
    out: *mut *mut tpla_device_engine,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        let dtype = DType::from_code(kv_dtype)?;
        // SAFETY: caller contract.
        unsafe { hand_out(out, || make_engine(c, device, dtype)) }
    })
}

#[cfg(feature = "cuda")]
fn make_engine(
    c: &crate::decode::RankContext,
    device: u32,
    dtype: DType,
) -> Outcome<tpla_device_engine> {
    let backend = crate::attention::cuda::CudaBackend::new(super::to_usize(device))?;
    Ok(tpla_device_engine {
        engine: crate::engine_device::DeviceEngine::from_context_for(backend, c, dtype)?,
    })
}

#[cfg(not(feature = "cuda"))]
fn make_engine(
    _c: &crate::decode::RankContext,
    _device: u32,
    _dtype: DType,
) -> Outcome<tpla_device_engine> {
    no_cuda()
}

/// Destroys a device engine, after waiting for the GPU; NULL is a no-op.
///
/// # Safety
/// `engine` is NULL or a device engine not yet destroyed and not in use by another
/// thread; no captured CUDA graph that still runs may refer to it.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_destroy(engine: *mut tpla_device_engine) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(engine) })
}

/// The factors an engine applies when it builds the query rows of layer `layer` for
/// `tpla_device_engine_decode`: a row is [heads][row_width] f32, per head the absorbed
/// latent query (TPLA_QUERY_KIND_LATENT's values) times `*latent_scale`, then q_rope
/// times `*rope_scale` (the softmax scale, times the layer's mu for the latent part).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_OUT_OF_RANGE (layer).
///
/// # Safety
/// `engine` is NULL or live; the outputs are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_query_scales(
    engine: *const tpla_device_engine,
    layer: u32,
    latent_scale: *mut f32,
    rope_scale: *mut f32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        let (lat, rope) = query_scales(e, layer)?;
        // SAFETY: caller contract.
        unsafe {
            write_out(latent_scale, lat, "latent_scale")?;
            write_out(rope_scale, rope, "rope_scale")
        }
    })
}

#[cfg(feature = "cuda")]
fn query_scales(e: &tpla_device_engine, layer: u32) -> Outcome<(f32, f32)> {
    Ok(e.engine.query_scales(super::to_usize(layer))?)
}

#[cfg(not(feature = "cuda"))]
fn query_scales(e: &tpla_device_engine, _layer: u32) -> Outcome<(f32, f32)> {
    match e.never {}
}

/// Writes to `*bytes` the size of the device workspace of a step of `batch` entries
/// (1 to 65535) over a block table `block_table_width` pages wide: the plan header and
/// the split-KV merge's partial outputs. Fixed by those two and the engine's shape, not by
/// the lengths: allocate it once (cuMemAlloc, 16-byte aligned) for the largest batch and
/// width.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (batch or width out
/// of range).
///
/// # Safety
/// `engine` is NULL or live; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_workspace_size(
    engine: *const tpla_device_engine,
    batch: usize,
    block_table_width: usize,
    bytes: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        let n = workspace_size(e, batch, block_table_width)?;
        // SAFETY: caller contract.
        unsafe { write_out(bytes, n, "bytes") }
    })
}

#[cfg(feature = "cuda")]
fn workspace_size(e: &tpla_device_engine, batch: usize, width: usize) -> Outcome<usize> {
    Ok(e.engine.workspace_bytes(batch, width)?)
}

#[cfg(not(feature = "cuda"))]
fn workspace_size(e: &tpla_device_engine, _batch: usize, _width: usize) -> Outcome<usize> {
    match e.never {}
}

/// Plans one step of `batch` entries over a block table `block_table_width` pages wide
/// into the caller's device workspace (`workspace_bytes`, at least
/// tpla_device_engine_workspace_size, 16-byte aligned): one kernel on `stream`, no host
/// synchronisation. Plan once per step (or once for good: the plan depends only on the
/// batch and width); every layer's tpla_device_engine_decode of the step reuses it. The
/// decode kernels compute their split-KV schedule from the device lengths themselves;
/// `seq_lens_dev` ([batch] int32) is checked, not read. A decode whose batch or width is
/// not the plan's sets TPLA_FAULT_BAD_PLAN and writes NaN outputs.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (batch or width out of
/// range, a workspace too small or misaligned, an address that is not device memory of
/// the engine's GPU or whose allocation is too short, not a stream),
/// TPLA_STATUS_MISMATCH (memory or stream of another GPU), TPLA_STATUS_UNSUPPORTED (no
/// CUDA) or TPLA_STATUS_BACKEND.
///
/// # Safety
/// `engine` is NULL or live; the device buffers stay valid until the stream passes the
/// call; `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_plan(
    engine: *const tpla_device_engine,
    seq_lens_dev: *const i32,
    batch: usize,
    block_table_width: usize,
    workspace_dev: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (seq_lens_dev as usize, "seq_lens_dev"),
            (workspace_dev as usize, "workspace_dev"),
        ])?;
        // SAFETY: forwarded caller contract.
        unsafe {
            plan(
                e,
                seq_lens_dev as u64,
                batch,
                block_table_width,
                workspace_dev as u64,
                workspace_bytes,
                stream,
            )
        }
    })
}

/// # Safety
/// As `tpla_device_engine_plan`.
#[cfg(feature = "cuda")]
unsafe fn plan(
    e: &tpla_device_engine,
    seq_lens: u64,
    batch: usize,
    width: usize,
    workspace: u64,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> Outcome {
    let device = e.engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let need = e.engine.workspace_bytes(batch, width)?;
    check_device_buffers(
        &device,
        &[
            (seq_lens, batch * 4, "seq_lens_dev"),
            (workspace, workspace_bytes.min(need), "workspace_dev"),
        ],
    )?;
    // SAFETY: checked device memory of this GPU; validity is the caller's contract.
    Ok(unsafe {
        e.engine
            .plan_step(seq_lens, batch, width, workspace, workspace_bytes, stream)
    }?)
}

/// # Safety
/// As `tpla_device_engine_plan`.
#[cfg(not(feature = "cuda"))]
unsafe fn plan(
    e: &tpla_device_engine,
    _seq_lens: u64,
    _batch: usize,
    _width: usize,
    _workspace: u64,
    _workspace_bytes: usize,
    _stream: *mut c_void,
) -> Outcome {
    match e.never {}
}

/// Arguments of `tpla_device_engine_decode`: device addresses of the engine's GPU.
/// Shapes use the rank's heads, slice width and row width (slice_width + d_r).
#[repr(C)]
pub struct tpla_device_decode_args {
    /// sizeof(tpla_device_decode_args).
    pub struct_size: usize,
    /// The layer to decode.
    pub layer: u32,
    /// The layer's cache: `base` is a device address (16-byte aligned); the dtype the
    /// engine was created for (TPLA_DTYPE_BF16 or TPLA_DTYPE_FP8_E4M3), 64 rows per page,
    /// the page stride a multiple of 16 (FP8 pools too, where the CPU takes 4; 64 FP8 rows
    /// always fill a multiple of 16 bytes).
    pub cache: *const tpla_paged_cache,
    /// Page indices, [batch][block_table_width] int32 (device): row b names the pages of
    /// batch entry b in token order.
    pub block_table: *const i32,
    pub batch: usize,
    pub block_table_width: usize,
    /// Tokens of each batch entry, [batch] int32 (device). 0: the entry's outputs are
    /// zero and its log-sum-exps -infinity; negative, or more than block_table_width * 64:
    /// TPLA_FAULT_BAD_PAGE and NaN.
    pub seq_lens: *const i32,
    /// The workspace tpla_device_engine_plan filled for this batch and width (device).
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
    /// Query rows [batch][heads][row_width] f32 (device, 16-byte aligned), scaled as
    /// tpla_device_engine_query_scales says.
    pub queries: *const f32,
    /// Latent outputs [batch][heads][slice_width] f32 (device, 16-byte aligned).
    pub out: *mut f32,
    /// Log-sum-exps [batch][heads] f32 (device, 16-byte aligned).
    pub lse: *mut f32,
    /// NULL, or a device uint32 the kernels OR `tpla_fault` bits into (never cleared).
    pub faults: *mut u32,
    /// A CUstream of the engine GPU's primary context (NULL: the legacy default stream).
    pub stream: *mut c_void,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_device_decode_args {
    const NAME: &'static str = "tpla_device_decode_args";
}

/// One decode step of one layer on the engine's device memory, enqueued on `stream` with
/// no host synchronisation (capturable in a CUDA graph): the rows of batch entry b are
/// found through block table row b and length b. A check kernel reads every page index an
/// entry will use: one outside 0..pages, or a length needing more pages than the table's
/// width, makes that entry's outputs NaN and sets TPLA_FAULT_BAD_PAGE (the kernels read
/// nothing for it, never outside the pool); nothing else is touched. The device buffers
/// must stay valid and unchanged (inputs) or untouched (outputs) until the stream passes
/// the step; steps sharing a workspace must not overlap in time.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (batch or width out of range, a bad cache layout, a
/// page stride not a multiple of 16, misaligned addresses, a workspace too small,
/// overlapping buffers, an address that is not device memory of the engine's GPU or whose
/// allocation is too short, not a stream), TPLA_STATUS_OUT_OF_RANGE (layer),
/// TPLA_STATUS_MISMATCH (rows of another width; a dtype other than the one the engine
/// was created for; memory or stream of another GPU), TPLA_STATUS_UNSUPPORTED (no CUDA;
/// a dtype or page size the kernels do not read) or TPLA_STATUS_BACKEND.
///
/// # Safety
/// `engine` is NULL or live; `args` is NULL or a valid `tpla_device_decode_args` whose
/// device buffers hold their sizes; `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_decode(
    engine: *const tpla_device_engine,
    args: *const tpla_device_decode_args,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        // SAFETY: caller contract.
        let a = unsafe { versioned(args, "args") }?;
        // SAFETY: caller contract.
        let (layout, desc, _) = unsafe { layout(a.cache, e.rope_width()) }?;
        check_non_null(&[
            (a.block_table as usize, "args->block_table"),
            (a.seq_lens as usize, "args->seq_lens"),
            (a.workspace as usize, "args->workspace"),
            (a.queries as usize, "args->queries"),
            (a.out as usize, "args->out"),
            (a.lse as usize, "args->lse"),
        ])?;
        // SAFETY: forwarded caller contract.
        unsafe { decode(e, a, layout, desc.base as u64) }
    })
}

/// # Safety
/// As `tpla_device_engine_decode`.
#[cfg(feature = "cuda")]
unsafe fn decode(
    e: &tpla_device_engine,
    a: &tpla_device_decode_args,
    layout: PagedLayout,
    base: u64,
) -> Outcome {
    use crate::engine_device::{DevicePagedCache, DeviceStep};
    let engine = &e.engine;
    let device = engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, a.stream) }?;
    let shape = engine.shape();
    let (b, h) = (a.batch, shape.heads);
    let need = engine.workspace_bytes(b, a.block_table_width)?;
    let table_bytes = b
        .checked_mul(a.block_table_width)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| Failure::invalid("the block table's size overflows"))?;
    let extent = layout.extent()?;
    let inputs = [
        (base, extent, "args->cache->base"),
        (a.block_table as u64, table_bytes, "args->block_table"),
        (a.seq_lens as u64, b * 4, "args->seq_lens"),
        (
            a.queries as u64,
            b * h * shape.row_width() * 4,
            "args->queries",
        ),
    ];
    let mut outputs = vec![
        (a.out as u64, b * h * shape.slice_width * 4, "args->out"),
        (a.lse as u64, b * h * 4, "args->lse"),
        (a.workspace as u64, need, "args->workspace"),
    ];
    if !a.faults.is_null() {
        outputs.push((a.faults as u64, 4, "args->faults"));
    }
    check_device_buffers(&device, inputs.iter().chain(&outputs))?;
    check_device_disjoint(&outputs, &inputs)?;
    let step = DeviceStep {
        cache: DevicePagedCache { base, layout },
        block_table: a.block_table as u64,
        batch: b,
        block_table_width: a.block_table_width,
        seq_lens: a.seq_lens as u64,
        workspace: a.workspace as u64,
        workspace_bytes: a.workspace_bytes,
        faults: a.faults as u64,
    };
    // SAFETY: checked device memory of this GPU, disjoint outputs; validity until the
    // stream passes is the caller's contract.
    Ok(unsafe {
        engine.decode(
            super::to_usize(a.layer),
            &step,
            a.queries as u64,
            a.out as u64,
            a.lse as u64,
            stream,
        )
    }?)
}

/// # Safety
/// As `tpla_device_engine_decode`.
#[cfg(not(feature = "cuda"))]
unsafe fn decode(
    e: &tpla_device_engine,
    _a: &tpla_device_decode_args,
    _layout: PagedLayout,
    _base: u64,
) -> Outcome {
    match e.never {}
}

/// Writes `count` new tokens into the engine's device cache of `layer`, one block per
/// token on `stream`, no host synchronisation: token i has the full pre-norm latent
/// latents_dev[i] ([count][d_c]) and the RoPE-rotated key k_rope_dev[i] ([count][d_r]),
/// both of `input_dtype` (TPLA_DTYPE_F32 or TPLA_DTYPE_BF16); it is normalised
/// (`rms_mode`, a `tpla_rms_mode`), rotated by the layer's transform, cut to the rank's
/// slice, stored as the cache's dtype (TPLA_DTYPE_BF16: rounded; TPLA_DTYPE_FP8_E4M3:
/// quantised per block with its scales, the key rounded to bf16; whatever dtype the
/// engine decodes) at slot slots_dev[i] (page * 64 + offset), as
/// tpla_context_append_paged does (in f64; the rows are equal to its rows up to the
/// order of the RMS sums). Negative slots are padding and skipped; a slot past the pool
/// sets TPLA_FAULT_BAD_SLOT, a non-finite input or a value beyond bf16 (FP8 caches too)
/// TPLA_FAULT_BAD_VALUE in `*faults_dev` (a device uint32, or NULL); those tokens are
/// not written. Two tokens of one call must not share a slot.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (a bad cache layout,
/// a page stride not a multiple of 16, unknown rms_mode or input_dtype, misaligned
/// addresses, count above INT32_MAX, an address that is not device memory of the
/// engine's GPU or whose allocation is too short, not a stream), TPLA_STATUS_OUT_OF_RANGE
/// (layer), TPLA_STATUS_MISMATCH (rows of another width; memory or stream of another GPU),
/// TPLA_STATUS_UNSUPPORTED (no CUDA; a dtype or page size the kernels do not write) or
/// TPLA_STATUS_BACKEND.
///
/// # Safety
/// `engine` is NULL or live; `cache` is NULL or a valid `tpla_paged_cache` over device
/// memory; the device arrays hold their counts and stay valid until the stream passes
/// the call; `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_append(
    engine: *const tpla_device_engine,
    layer: u32,
    cache: *const tpla_paged_cache,
    slots_dev: *const i32,
    count: usize,
    latents_dev: *const c_void,
    k_rope_dev: *const c_void,
    input_dtype: u32,
    rms_mode_value: u32,
    faults_dev: *mut u32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        // SAFETY: caller contract.
        let (layout, desc, _) = unsafe { layout(cache, e.rope_width()) }?;
        let mode = rms_mode(rms_mode_value)?;
        let input = DType::from_code(input_dtype)?;
        if count > 0 {
            check_non_null(&[
                (slots_dev as usize, "slots_dev"),
                (latents_dev as usize, "latents_dev"),
                (k_rope_dev as usize, "k_rope_dev"),
            ])?;
        }
        let a = Append {
            layer,
            base: desc.base as u64,
            layout,
            slots: slots_dev as u64,
            count,
            latents: latents_dev as u64,
            k_rope: k_rope_dev as u64,
            input,
            mode,
            faults: faults_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { append(e, &a, stream) }
    })
}

/// The arguments of one `tpla_device_engine_append`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Append {
    layer: u32,
    base: u64,
    layout: PagedLayout,
    slots: u64,
    count: usize,
    latents: u64,
    k_rope: u64,
    input: DType,
    mode: RmsMode,
    faults: u64,
}

/// # Safety
/// As `tpla_device_engine_append`.
#[cfg(feature = "cuda")]
unsafe fn append(e: &tpla_device_engine, a: &Append, stream: *mut c_void) -> Outcome {
    use crate::engine_device::{DeviceAppend, DevicePagedCache};
    let engine = &e.engine;
    let device = engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let extent = a.layout.extent()?;
    let size = a.input.size();
    let (d_c, d_r) = (engine.dims().d_c, engine.dims().d_r);
    let mut outputs = vec![(a.base, extent, "cache->base")];
    if a.faults != 0 {
        outputs.push((a.faults, 4, "faults_dev"));
    }
    let inputs = if a.count > 0 {
        vec![
            (a.slots, a.count * 4, "slots_dev"),
            (a.latents, a.count * d_c * size, "latents_dev"),
            (a.k_rope, a.count * d_r * size, "k_rope_dev"),
        ]
    } else {
        Vec::new()
    };
    check_device_buffers(&device, outputs.iter().chain(&inputs))?;
    check_device_disjoint(&outputs, &inputs)?;
    let cache = DevicePagedCache {
        base: a.base,
        layout: a.layout,
    };
    let append = DeviceAppend {
        slots: a.slots,
        count: a.count,
        latents: a.latents,
        k_rope: a.k_rope,
        input: a.input,
        mode: a.mode,
        faults: a.faults,
    };
    // SAFETY: checked device memory of this GPU; validity is the caller's contract.
    Ok(unsafe { engine.append(super::to_usize(a.layer), &cache, &append, stream) }?)
}

/// # Safety
/// As `tpla_device_engine_append`.
#[cfg(not(feature = "cuda"))]
unsafe fn append(e: &tpla_device_engine, _a: &Append, _stream: *mut c_void) -> Outcome {
    match e.never {}
}

/// Copies `count` rows between two device caches of the engine's rank (the bulk hand-off
/// of a prefill's rows into decode pages, device to device), on `stream` with no host
/// synchronisation: row src_slots_dev[i] of `src` to row dst_slots_dev[i] of `dst`
/// (device int32 [count] each; slot = page * 64 + offset), bytes unchanged; both caches
/// described as for tpla_device_engine_decode, of one dtype (TPLA_DTYPE_BF16 or
/// TPLA_DTYPE_FP8_E4M3, whatever dtype the engine decodes). A prefill held on the host is
/// copied to the device first (as one packed source pool). Negative destination slots
/// are skipped; a slot past its pool, or a negative source slot, sets TPLA_FAULT_BAD_SLOT
/// in `*faults_dev` (a device uint32, or NULL) and copies nothing for that row.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (a bad cache layout, misaligned addresses, count above
/// INT32_MAX, overlapping caches, an address that is not device memory of the engine's
/// GPU or whose allocation is too short, not a stream), TPLA_STATUS_MISMATCH (rows of
/// another width; caches of two dtypes; memory or stream of another GPU),
/// TPLA_STATUS_UNSUPPORTED (no CUDA; a dtype or page size the kernels do not read) or
/// TPLA_STATUS_BACKEND.
///
/// # Safety
/// `engine` is NULL or live; the caches are NULL or valid `tpla_paged_cache`s over device
/// memory; the device arrays hold `count` values and stay valid until the stream passes
/// the call; `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_copy_rows(
    engine: *const tpla_device_engine,
    dst: *const tpla_paged_cache,
    dst_slots_dev: *const i32,
    src: *const tpla_paged_cache,
    src_slots_dev: *const i32,
    count: usize,
    faults_dev: *mut u32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        // SAFETY: caller contract.
        let (dst_layout, dst_desc, _) = unsafe { layout(dst, e.rope_width()) }?;
        // SAFETY: caller contract.
        let (src_layout, src_desc, _) = unsafe { layout(src, e.rope_width()) }?;
        if count > 0 {
            check_non_null(&[
                (dst_slots_dev as usize, "dst_slots_dev"),
                (src_slots_dev as usize, "src_slots_dev"),
            ])?;
        }
        let c = RowCopy {
            dst: (dst_desc.base as u64, dst_layout),
            dst_slots: dst_slots_dev as u64,
            src: (src_desc.base as u64, src_layout),
            src_slots: src_slots_dev as u64,
            count,
            faults: faults_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { copy_rows(e, &c, stream) }
    })
}

/// The arguments of one `tpla_device_engine_copy_rows`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RowCopy {
    dst: (u64, PagedLayout),
    dst_slots: u64,
    src: (u64, PagedLayout),
    src_slots: u64,
    count: usize,
    faults: u64,
}

/// # Safety
/// As `tpla_device_engine_copy_rows`.
#[cfg(feature = "cuda")]
unsafe fn copy_rows(e: &tpla_device_engine, c: &RowCopy, stream: *mut c_void) -> Outcome {
    use crate::engine_device::DevicePagedCache;
    let engine = &e.engine;
    let device = engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let mut outputs = vec![(c.dst.0, c.dst.1.extent()?, "dst->base")];
    if c.faults != 0 {
        outputs.push((c.faults, 4, "faults_dev"));
    }
    let mut inputs = vec![(c.src.0, c.src.1.extent()?, "src->base")];
    if c.count > 0 {
        inputs.push((c.dst_slots, c.count * 4, "dst_slots_dev"));
        inputs.push((c.src_slots, c.count * 4, "src_slots_dev"));
    }
    check_device_buffers(&device, outputs.iter().chain(&inputs))?;
    check_device_disjoint(&outputs, &inputs)?;
    let dst = DevicePagedCache {
        base: c.dst.0,
        layout: c.dst.1,
    };
    let src = DevicePagedCache {
        base: c.src.0,
        layout: c.src.1,
    };
    // SAFETY: checked device memory of this GPU, disjoint caches; validity is the
    // caller's contract.
    Ok(unsafe {
        engine.copy_rows(
            &dst,
            c.dst_slots,
            &src,
            c.src_slots,
            c.count,
            c.faults,
            stream,
        )
    }?)
}

/// # Safety
/// As `tpla_device_engine_copy_rows`.
#[cfg(not(feature = "cuda"))]
unsafe fn copy_rows(e: &tpla_device_engine, _c: &RowCopy, _stream: *mut c_void) -> Outcome {
    match e.never {}
}

/// The query rows of tpla_device_engine_decode from what an engine has, on `stream` with
/// no host synchronisation: rows_dev[b][h] ([batch][heads][row_width] f32) becomes
/// W'_UK[h] q_nope_dev[b][h] ([batch][heads][d_n] f32) times the latent scale, then
/// q_rope_dev[b][h] ([batch][heads][d_r] f32) times the RoPE scale
/// (tpla_device_engine_query_scales): a batched cuBLAS product over the heads and one
/// small kernel, with the layer's W'_UK held on the GPU.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (batch 0 or above
/// 65535, misaligned or overlapping buffers, an address that is not device memory of the
/// engine's GPU or whose allocation is too short, not a stream), TPLA_STATUS_OUT_OF_RANGE
/// (layer), TPLA_STATUS_MISMATCH (memory or stream of another GPU),
/// TPLA_STATUS_UNSUPPORTED (no CUDA, no libcublas) or TPLA_STATUS_BACKEND.
///
/// # Safety
/// `engine` is NULL or live; the device buffers hold their sizes and stay valid until the
/// stream passes the call; `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_absorb_queries(
    engine: *const tpla_device_engine,
    layer: u32,
    batch: usize,
    q_nope_dev: *const f32,
    q_rope_dev: *const f32,
    rows_dev: *mut f32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (q_nope_dev as usize, "q_nope_dev"),
            (q_rope_dev as usize, "q_rope_dev"),
            (rows_dev as usize, "rows_dev"),
        ])?;
        let bufs = [q_nope_dev as u64, q_rope_dev as u64, rows_dev as u64];
        // SAFETY: forwarded caller contract.
        unsafe { gemm(e, Gemm::Absorb, layer, batch, bufs, stream) }
    })
}

/// The rank's partial head outputs from tpla_device_engine_decode's latent outputs, on
/// `stream` with no host synchronisation: heads_dev[b][h] ([batch][heads][d_v] f32) =
/// W'_UV[h]^T latent_dev[b][h] ([batch][heads][slice_width] f32), a batched cuBLAS product
/// with the layer's W'_UV held on the GPU; sum them over the ranks with
/// tpla_nccl_all_reduce. NaN latent rows (faulted entries) give NaN head rows.
/// tpla_device_engine_project_for with TPLA_DTYPE_F32.
///
/// Returns as tpla_device_engine_absorb_queries.
///
/// # Safety
/// As tpla_device_engine_absorb_queries.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_project(
    engine: *const tpla_device_engine,
    layer: u32,
    batch: usize,
    latent_dev: *const f32,
    heads_dev: *mut f32,
    stream: *mut c_void,
) -> tpla_status {
    // SAFETY: forwarded caller contract.
    unsafe {
        tpla_device_engine_project_for(
            engine,
            layer,
            batch,
            latent_dev,
            heads_dev.cast(),
            tpla_dtype::F32 as u32,
            stream,
        )
    }
}

/// Bytes of a device engine's f32 staging buffer of bf16 projections
/// (tpla_device_engine_project_for): each cuBLAS product covers as many batch entries as
/// it holds (at least one).
pub const TPLA_BF16_PROJECTION_STAGING_BYTES: usize = 4194304;

#[cfg(feature = "cuda")]
const _: () = assert!(
    TPLA_BF16_PROJECTION_STAGING_BYTES == crate::engine_device::BF16_PROJECTION_STAGING_BYTES
);

/// tpla_device_engine_project writing head outputs of `heads_dtype`: TPLA_DTYPE_F32, or
/// TPLA_DTYPE_BF16 (uint16_t bits, 2-byte aligned: the f32 outputs rounded to nearest
/// even. A batch of up to TPLA_BF16_PROJECTION_STAGING_BYTES / (heads * d_v * 4) entries
/// is one cuBLAS product of the f32 call's shape; a larger one is cut into such products,
/// whose sums may differ from one product's in the last f32 bit, so that a value may
/// round to the neighbouring bf16). cuBLAS has no f32 x f32 -> bf16 product: the f32
/// products go through an engine-owned staging buffer, allocated by the first bf16
/// call (make one before capturing a CUDA graph, as for the cuBLAS handle), and one
/// rounding kernel; bf16 projections of one engine must not run on two streams at once.
///
/// Returns as tpla_device_engine_absorb_queries, and TPLA_STATUS_INVALID_ARGUMENT (an
/// unknown dtype), TPLA_STATUS_UNSUPPORTED (a dtype other than those two).
///
/// # Safety
/// As tpla_device_engine_absorb_queries.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_project_for(
    engine: *const tpla_device_engine,
    layer: u32,
    batch: usize,
    latent_dev: *const f32,
    heads_dev: *mut c_void,
    heads_dtype: u32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (latent_dev as usize, "latent_dev"),
            (heads_dev as usize, "heads_dev"),
        ])?;
        let dtype = DType::from_code(heads_dtype)?;
        let bufs = [latent_dev as u64, heads_dev as u64, 0];
        // SAFETY: forwarded caller contract.
        unsafe { gemm(e, Gemm::Project(dtype), layer, batch, bufs, stream) }
    })
}

/// Which weight product.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gemm {
    /// `[q_nope, q_rope, rows]`
    Absorb,
    /// `[latent, heads, -]`, heads of that dtype
    Project(DType),
}

/// # Safety
/// As `tpla_device_engine_absorb_queries`.
#[cfg(feature = "cuda")]
unsafe fn gemm(
    e: &tpla_device_engine,
    which: Gemm,
    layer: u32,
    batch: usize,
    bufs: [u64; 3],
    stream: *mut c_void,
) -> Outcome {
    let engine = &e.engine;
    let device = engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let (d, h, w) = (
        engine.dims(),
        engine.plan().heads,
        engine.plan().slice_width,
    );
    let rows = batch.saturating_mul(h);
    let f32s = |width: usize| rows.saturating_mul(width).saturating_mul(4);
    let (inputs, output) = match which {
        Gemm::Absorb => (
            vec![
                (bufs[0], f32s(d.d_n), "q_nope_dev"),
                (bufs[1], f32s(d.d_r), "q_rope_dev"),
            ],
            (bufs[2], f32s(w + d.d_r), "rows_dev"),
        ),
        Gemm::Project(dtype) => (
            vec![(bufs[0], f32s(w), "latent_dev")],
            (
                bufs[1],
                rows.saturating_mul(d.d_v).saturating_mul(dtype.size()),
                "heads_dev",
            ),
        ),
    };
    if batch == 0 || batch > 65535 {
        return Err(Failure::invalid(format!(
            "a step has 1 to 65535 entries, got {batch}"
        )));
    }
    check_device_buffers(&device, inputs.iter().chain(std::iter::once(&output)))?;
    check_device_disjoint(&[output], &inputs)?;
    let layer = super::to_usize(layer);
    // SAFETY: checked device memory of this GPU, disjoint output; validity is the
    // caller's contract.
    Ok(unsafe {
        match which {
            Gemm::Absorb => engine.absorb_queries(layer, batch, bufs[0], bufs[1], bufs[2], stream),
            Gemm::Project(dtype) => {
                engine.project_for(layer, batch, bufs[0], bufs[1], dtype, stream)
            }
        }
    }?)
}

/// # Safety
/// As `tpla_device_engine_absorb_queries`.
#[cfg(not(feature = "cuda"))]
unsafe fn gemm(
    e: &tpla_device_engine,
    _which: Gemm,
    _layer: u32,
    _batch: usize,
    _bufs: [u64; 3],
    _stream: *mut c_void,
) -> Outcome {
    match e.never {}
}

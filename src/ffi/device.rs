//! Device ranks and NCCL: decode steps on engine-owned device memory and streams (graph
//! capturable), and the all-reduce of the ranks' partial outputs across GPUs.
//!
//! Every function exists in every build; without the `cuda` (or `nccl`) feature the
//! argument checks run and the call then returns TPLA_STATUS_UNSUPPORTED.

use super::cache::tpla_cache;
use super::context::tpla_context;
use super::{
    check_disjoint, check_non_null, guard, guard_value, hand_out, handle, handle_mut, input,
    output, span, tpla_status, versioned_out, write_out, Failure, Outcome, Versioned,
};
use std::ffi::c_void;

/// Bytes of an NCCL unique id (`tpla_nccl_unique_id`, `tpla_nccl_comm_create`).
pub const TPLA_NCCL_UNIQUE_ID_BYTES: usize = 128;

// ---- device ranks ---------------------------------------------------------------------------

/// One rank of a layer stack on one GPU: the rank's cache of every layer and its `W'_UV`
/// in device memory, and the decode kernels. Made from a context (weights) and a cache
/// (sequences) by `tpla_device_rank_create`; independent of both afterwards. Use it from
/// one thread at a time; separate device ranks may be used from separate threads.
pub struct tpla_device_rank {
    #[cfg(feature = "cuda")]
    rank: crate::device_rank::DeviceRank,
    /// Per layer: the factors of the latent and the RoPE parts of a query row.
    #[cfg(feature = "cuda")]
    scales: Vec<(f32, f32)>,
    /// No device rank exists in a build without CUDA.
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

/// What a device rank is, for sizing device buffers (`tpla_device_rank_get_info`).
#[repr(C)]
pub struct tpla_device_rank_info {
    /// Set by the caller to sizeof(tpla_device_rank_info) before the call.
    pub struct_size: usize,
    /// The GPU ordinal.
    pub device: u32,
    /// The rank's heads.
    pub heads: u32,
    /// Values per query row: slice_width + d_r.
    pub query_width: u32,
    /// Values per head output: d_v.
    pub d_v: u32,
    pub layers: u32,
    /// The largest batch of one step.
    pub max_batch: u32,
    /// Sequences on the device (those given at creation).
    pub sequences: u32,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_device_rank_info {
    const NAME: &'static str = "tpla_device_rank_info";
}

#[cfg(not(feature = "cuda"))]
pub(super) fn no_cuda<T>() -> Outcome<T> {
    Err(crate::error::Error::unsupported(
        "this libtpla was built without CUDA support (cargo feature `cuda`)",
    )
    .into())
}

/// Uploads sequences `seq_ids` (`seq_count` of them, each holding at least one token in
/// every layer, unless the cache holds one sequence shard of several: then a sequence
/// may have none on this rank) of every layer of `cache` (registered shard files or
/// appended rows) and the `W'_UV` of every layer of `ctx` to GPU `device`; steps then
/// decode batches of 1 to `max_batch` of those sequences. The device rank keeps no
/// pointer to `ctx`, `cache` or `seq_ids`: later appends to `cache` do not reach it.
/// Compiles (or loads from the disk cache) the decode kernels. Destroy it with
/// `tpla_device_rank_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (no sequences, a
/// sequence listed twice or, on a rank holding every token, without tokens, max_batch 0
/// or above 65535, a layer of `ctx`
/// without weights), TPLA_STATUS_OUT_OF_RANGE (unknown sequence id), TPLA_STATUS_MISMATCH
/// (cache of another geometry, group, layer count or transform), TPLA_STATUS_UNSUPPORTED
/// (built without CUDA; no usable GPU, driver, libnvrtc or libcublas; a shape the kernels
/// lack) or TPLA_STATUS_BACKEND. Reads `ctx` and `cache` (other read-only uses may run
/// concurrently). Thread-safe otherwise.
///
/// # Safety
/// Handles are NULL or live; `seq_ids` holds `seq_count` ids; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_create(
    ctx: *const tpla_context,
    cache: *const tpla_cache,
    seq_ids: *const u32,
    seq_count: usize,
    device: u32,
    max_batch: u32,
    out: *mut *mut tpla_device_rank,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let rc = &unsafe { handle(cache, "cache") }?.cache;
        // SAFETY: caller contract.
        let seqs = unsafe { input(seq_ids, seq_count, "seq_ids") }?;
        if seqs.is_empty() {
            return Err(Failure::invalid(
                "a device rank needs at least one sequence",
            ));
        }
        // SAFETY: caller contract.
        unsafe { hand_out(out, || make_rank(c, rc, seqs, device, max_batch)) }
    })
}

#[cfg(feature = "cuda")]
fn make_rank(
    c: &crate::decode::RankContext,
    rc: &crate::cache::RankCache,
    seqs: &[u32],
    device: u32,
    max_batch: u32,
) -> Outcome<tpla_device_rank> {
    use crate::attention::cuda::CudaBackend;
    use crate::device_rank::DeviceRank;
    let backend = CudaBackend::new(super::to_usize(device))?;
    let scale = c.dims().softmax_scale;
    let scales = (0..c.layer_count())
        .map(|l| Ok(((scale * c.layer(l)?.mu) as f32, scale as f32)))
        .collect::<crate::error::Result<Vec<_>>>()?;
    let rank = DeviceRank::from_context(backend, c, rc, seqs, super::to_usize(max_batch))?;
    Ok(tpla_device_rank { rank, scales })
}

#[cfg(not(feature = "cuda"))]
fn make_rank(
    _c: &crate::decode::RankContext,
    _rc: &crate::cache::RankCache,
    _seqs: &[u32],
    _device: u32,
    _max_batch: u32,
) -> Outcome<tpla_device_rank> {
    no_cuda()
}

/// Destroys a device rank, after waiting for its work on the GPU; NULL is a no-op.
///
/// # Safety
/// `rank` is NULL or a device rank not yet destroyed and not in use by another thread;
/// no captured CUDA graph that still runs may refer to it.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_destroy(rank: *mut tpla_device_rank) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(rank) })
}

/// Fills `*info` (whose struct_size the caller sets) with the rank's shapes.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_WRONG_STRUCT_SIZE. Safe to call
/// concurrently with other read-only uses of the rank.
///
/// # Safety
/// `rank` is NULL or live; `info` is NULL or a writable `tpla_device_rank_info`.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_get_info(
    rank: *const tpla_device_rank,
    info: *mut tpla_device_rank_info,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle(rank, "rank") }?;
        // SAFETY: caller contract.
        let info = unsafe { versioned_out(info, "info") }?;
        fill_info(r, info);
        Ok(())
    })
}

#[cfg(feature = "cuda")]
fn fill_info(r: &tpla_device_rank, info: &mut tpla_device_rank_info) {
    let w = |v: usize| v as u32; // shapes below 65536, batch and sequences below 2^32
    let rank = &r.rank;
    *info = tpla_device_rank_info {
        struct_size: size_of::<tpla_device_rank_info>(),
        device: w(rank.backend().device().ordinal()),
        heads: w(rank.plan().heads),
        query_width: w(rank.query_width()),
        d_v: w(rank.dims().d_v),
        layers: w(rank.layer_count()),
        max_batch: w(rank.max_batch()),
        sequences: w(rank.sequences()),
    };
}

#[cfg(not(feature = "cuda"))]
fn fill_info(r: &tpla_device_rank, _info: &mut tpla_device_rank_info) {
    match r.never {}
}

/// The factors an engine applies when it builds the query rows of layer `layer` for
/// `tpla_device_rank_decode`: a row is [heads][query_width] f32, per head the absorbed
/// latent query (TPLA_QUERY_KIND_LATENT's values) times `*latent_scale`, then q_rope
/// times `*rope_scale` (the softmax scale, times the layer's mu for the latent part).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_OUT_OF_RANGE (layer). Safe to call
/// concurrently with other read-only uses of the rank.
///
/// # Safety
/// `rank` is NULL or live; the outputs are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_query_scales(
    rank: *const tpla_device_rank,
    layer: u32,
    latent_scale: *mut f32,
    rope_scale: *mut f32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle(rank, "rank") }?;
        let (lat, rope) = layer_scales(r, layer)?;
        // SAFETY: caller contract.
        unsafe {
            write_out(latent_scale, lat, "latent_scale")?;
            write_out(rope_scale, rope, "rope_scale")
        }
    })
}

#[cfg(feature = "cuda")]
fn layer_scales(r: &tpla_device_rank, layer: u32) -> Outcome<(f32, f32)> {
    r.scales
        .get(super::to_usize(layer))
        .copied()
        .ok_or_else(|| {
            Failure::from(crate::error::Error::out_of_range(format!(
                "layer {layer} is out of range for {} layers",
                r.scales.len()
            )))
        })
}

#[cfg(not(feature = "cuda"))]
fn layer_scales(r: &tpla_device_rank, _layer: u32) -> Outcome<(f32, f32)> {
    match r.never {}
}

/// The device cache slots of sequences `seq_ids` (`count` of them, 1 to max_batch), in
/// `slots` (`slots_count` >= count): what `tpla_device_rank_decode` reads from device
/// memory. A sequence keeps its slot for the rank's life, so an engine can look its
/// slots up once and keep them in its own device buffers.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (count 0 or above
/// max_batch, overlapping buffers), TPLA_STATUS_BUFFER_TOO_SMALL or
/// TPLA_STATUS_OUT_OF_RANGE (a sequence not on this rank). Safe to call concurrently with
/// other read-only uses of the rank.
///
/// # Safety
/// `rank` is NULL or live; the arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_slots(
    rank: *const tpla_device_rank,
    seq_ids: *const u32,
    count: usize,
    slots: *mut i32,
    slots_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle(rank, "rank") }?;
        check_disjoint(
            &[span(slots, slots_count, "slots")],
            &[span(seq_ids, count, "seq_ids")],
        )?;
        // SAFETY: caller contract; checked disjoint.
        let (seqs, slots) = unsafe {
            (
                input(seq_ids, count, "seq_ids")?,
                output(slots, slots_count, "slots")?,
            )
        };
        if slots.len() < seqs.len() {
            return Err(Failure::new(
                tpla_status::BufferTooSmall,
                format!("slots holds {} values, {} needed", slots.len(), seqs.len()),
            ));
        }
        write_slots(r, seqs, slots)
    })
}

#[cfg(feature = "cuda")]
fn write_slots(r: &tpla_device_rank, seqs: &[u32], slots: &mut [i32]) -> Outcome {
    let found = r.rank.slots_of(seqs)?;
    slots[..found.len()].copy_from_slice(&found);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn write_slots(r: &tpla_device_rank, _seqs: &[u32], _slots: &mut [i32]) -> Outcome {
    match r.never {}
}

/// Enqueues one decode step of layer `layer` on `stream` and returns without waiting
/// for the GPU, so a CUDA graph can capture it: attention of the `batch` query rows at
/// `q_dev` ([batch][heads][query_width] f32, scaled as `tpla_device_rank_query_scales`
/// says) against the sequences whose slots (`tpla_device_rank_slots`) are at `slots_dev`
/// ([batch] int32), then the projection through `W'_UV` into the rank's partial head
/// outputs at `out_dev` ([batch][heads][d_v] f32; sum them over ranks with
/// `tpla_nccl_all_reduce`). All three are device memory of the rank's GPU owned by the
/// engine, which must keep them alive, unchanged (inputs) and untouched (output) until
/// the stream has passed this step; the library reads them only on the GPU. `stream` is
/// a CUstream of the rank's GPU's primary context (NULL: the legacy default stream).
///
/// The first step of each batch size allocates that size's workspace: run one step of
/// each batch size to be captured before capturing. A step reads the rank's sequence
/// lengths on the GPU, so a captured step stays valid. Steps on different streams must
/// not overlap in time (they share the rank's intermediate buffers). The GPU checks each
/// slot id: one out of range, or a slot holding no token, yields NaN outputs for its
/// batch entry and reads nothing outside the rank's cache.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT (rank, or a NULL device pointer),
/// TPLA_STATUS_INVALID_ARGUMENT (batch 0 or above max_batch; an address that is not
/// device memory, or whose allocation ends before the buffer does; out_dev overlapping an
/// input; not a stream), TPLA_STATUS_OUT_OF_RANGE (layer), TPLA_STATUS_MISMATCH (memory
/// or stream of another GPU or context), TPLA_STATUS_UNSUPPORTED (no CUDA in this build)
/// or TPLA_STATUS_BACKEND. Uses `rank` exclusively (one thread at a time).
///
/// # Safety
/// `rank` is NULL or live; `slots_dev` holds `batch` slots (from
/// `tpla_device_rank_slots`); the device buffers stay valid as said above;
/// `stream` is NULL or a live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_decode(
    rank: *mut tpla_device_rank,
    layer: u32,
    slots_dev: *const i32,
    batch: usize,
    q_dev: *const f32,
    out_dev: *mut f32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle_mut(rank, "rank") }?;
        check_non_null(&[
            (slots_dev as usize, "slots_dev"),
            (q_dev as usize, "q_dev"),
            (out_dev as usize, "out_dev"),
        ])?;
        // SAFETY: forwarded caller contract.
        unsafe {
            enqueue(
                r,
                layer,
                slots_dev as u64,
                batch,
                q_dev as u64,
                out_dev as u64,
                stream,
            )
        }
    })
}

/// # Safety
/// As `tpla_device_rank_decode`.
#[cfg(feature = "cuda")]
unsafe fn enqueue(
    r: &mut tpla_device_rank,
    layer: u32,
    slots: u64,
    batch: usize,
    q: u64,
    out: u64,
    stream: *mut c_void,
) -> Outcome {
    let rank = &mut r.rank;
    if batch == 0 || batch > rank.max_batch() {
        return Err(Failure::invalid(format!(
            "a step decodes 1 to {} sequences, got {batch}",
            rank.max_batch()
        )));
    }
    let layer = super::to_usize(layer);
    if layer >= rank.layer_count() {
        return Err(crate::error::Error::out_of_range(format!(
            "layer {layer} is out of range for {} layers",
            rank.layer_count()
        ))
        .into());
    }
    let device = rank.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let buffers = [
        (slots, batch * 4, "slots_dev"),
        (
            q,
            batch * rank.plan().heads * rank.query_width() * 4,
            "q_dev",
        ),
        (out, rank.partial_len(batch) * 4, "out_dev"),
    ];
    check_device_buffers(&device, &buffers)?;
    check_device_disjoint(&buffers[2..], &buffers[..2])?;
    // SAFETY: the buffers lie on the rank's device and hold their sizes (checked), the
    // stream is of its context (checked); validity until the stream passes, and the slot
    // values, are the caller's contract.
    Ok(unsafe { rank.enqueue(layer, batch, slots, q, out, stream) }?)
}

/// # Safety
/// As `tpla_device_rank_decode`.
#[cfg(not(feature = "cuda"))]
unsafe fn enqueue(
    r: &mut tpla_device_rank,
    _layer: u32,
    _slots: u64,
    _batch: usize,
    _q: u64,
    _out: u64,
    _stream: *mut c_void,
) -> Outcome {
    match r.never {}
}

/// `stream` as a CUstream, refused unless NULL or a stream of `device`'s primary context.
///
/// # Safety
/// `stream` is NULL or a live CUstream.
#[cfg(feature = "cuda")]
pub(super) unsafe fn checked_stream(
    device: &crate::attention::cuda::CudaDevice,
    stream: *mut c_void,
) -> Outcome<crate::attention::cuda::CUstream> {
    let stream = stream as crate::attention::cuda::CUstream;
    // SAFETY: NULL or a live stream, by the caller's contract.
    unsafe { device.check_stream(stream) }?;
    Ok(stream)
}

/// A device buffer argument: its address, the bytes it must hold, and its name.
#[cfg(feature = "cuda")]
pub(super) type DeviceBuffer = (u64, usize, &'static str);

/// Refuses, in their order, buffers that are not device memory of `device` or whose
/// allocation ends before their bytes do.
#[cfg(feature = "cuda")]
pub(super) fn check_device_buffers<'a>(
    device: &crate::attention::cuda::CudaDevice,
    buffers: impl IntoIterator<Item = &'a DeviceBuffer>,
) -> Outcome {
    for &(ptr, bytes, what) in buffers {
        check_device_buffer(device, ptr, bytes, what)?;
    }
    Ok(())
}

/// Refuses device outputs that overlap each other or an input (`check_disjoint` on the
/// byte ranges the buffers were checked to hold).
#[cfg(feature = "cuda")]
pub(super) fn check_device_disjoint(outputs: &[DeviceBuffer], inputs: &[DeviceBuffer]) -> Outcome {
    let spans = |v: &[DeviceBuffer]| -> Vec<super::Span> {
        v.iter()
            .map(|&(p, n, w)| (p as usize, p as usize + n, w))
            .collect()
    };
    check_disjoint(&spans(outputs), &spans(inputs))
}

/// Refuses an address that is not device memory of `device`, or whose allocation ends
/// before `bytes` bytes.
#[cfg(feature = "cuda")]
fn check_device_buffer(
    device: &crate::attention::cuda::CudaDevice,
    ptr: u64,
    bytes: usize,
    what: &str,
) -> Outcome {
    let (ordinal, left) =
        crate::attention::cuda::device_extent(ptr).map_err(|e| e.context(what))?;
    if ordinal != device.ordinal() {
        return Err(crate::error::Error::mismatch(format!(
            "{what} is memory of device {ordinal}, not of device {}",
            device.ordinal()
        ))
        .into());
    }
    if left < bytes {
        return Err(Failure::invalid(format!(
            "{what}: its allocation holds {left} bytes from this address, {bytes} needed"
        )));
    }
    Ok(())
}

/// The synchronous form of `tpla_device_rank_decode` on host memory, on the rank's own
/// stream: uploads the slots of `seq_ids` and the query rows `queries`
/// ([batch][heads][query_width], scaled as `tpla_device_rank_query_scales` says), runs
/// the step and waits for it, and copies the partial head outputs to `out`
/// ([batch][heads][d_v]). For tests and tools; an engine's step uses device memory.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (batch 0 or above
/// max_batch, counts, overlapping buffers), TPLA_STATUS_OUT_OF_RANGE (layer, a sequence
/// not on this rank), TPLA_STATUS_UNSUPPORTED (no CUDA in this build) or
/// TPLA_STATUS_BACKEND. Uses `rank` exclusively (one thread at a time).
///
/// # Safety
/// `rank` is NULL or live; the arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_decode_host(
    rank: *mut tpla_device_rank,
    layer: u32,
    seq_ids: *const u32,
    batch: usize,
    queries: *const f32,
    queries_count: usize,
    out: *mut f32,
    out_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle_mut(rank, "rank") }?;
        check_disjoint(
            &[span(out, out_count, "out")],
            &[
                span(seq_ids, batch, "seq_ids"),
                span(queries, queries_count, "queries"),
            ],
        )?;
        // SAFETY: caller contract; the output is disjoint from the inputs.
        let (seqs, q, out) = unsafe {
            (
                input(seq_ids, batch, "seq_ids")?,
                input(queries, queries_count, "queries")?,
                output(out, out_count, "out")?,
            )
        };
        decode_host(r, layer, seqs, q, out)
    })
}

#[cfg(feature = "cuda")]
fn decode_host(
    r: &mut tpla_device_rank,
    layer: u32,
    seqs: &[u32],
    q: &[f32],
    out: &mut [f32],
) -> Outcome {
    let rank = &mut r.rank;
    let want = rank.partial_len(seqs.len());
    if out.len() != want {
        return Err(Failure::invalid(format!(
            "out holds {} values, expected {want} ({} sequences x heads x d_v)",
            out.len(),
            seqs.len()
        )));
    }
    let layer = super::to_usize(layer);
    rank.decode(layer, seqs, q)?;
    Ok(rank.download_partial(layer, out)?)
}

#[cfg(not(feature = "cuda"))]
fn decode_host(
    r: &mut tpla_device_rank,
    _layer: u32,
    _seqs: &[u32],
    _q: &[f32],
    _out: &mut [f32],
) -> Outcome {
    match r.never {}
}

// ---- NCCL -------------------------------------------------------------------------------------

/// One rank's NCCL communicator on one GPU (`tpla_nccl_comm_create`). Use it from one
/// thread at a time.
pub struct tpla_nccl_comm {
    #[cfg(feature = "nccl")]
    comm: crate::combine::nccl::Communicator,
    /// No communicator exists in a build without NCCL.
    #[cfg(not(feature = "nccl"))]
    never: std::convert::Infallible,
}

#[cfg(feature = "nccl")]
const _: () = assert!(TPLA_NCCL_UNIQUE_ID_BYTES == crate::combine::nccl::UNIQUE_ID_BYTES);

#[cfg(not(feature = "nccl"))]
fn no_nccl<T>() -> Outcome<T> {
    Err(crate::error::Error::unsupported(
        "this libtpla was built without NCCL support (cargo feature `nccl`)",
    )
    .into())
}

/// Makes a fresh NCCL unique id (rank 0 does this once) and writes its
/// TPLA_NCCL_UNIQUE_ID_BYTES bytes to `buf` (`len` >= that); the engine hands the bytes
/// to every rank's `tpla_nccl_comm_create` (through a file, a socket, its own launcher).
/// The calling process must stay alive until every rank has joined (NCCL's bootstrap
/// listener runs in it).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_BUFFER_TOO_SMALL,
/// TPLA_STATUS_UNSUPPORTED (built without NCCL, or libnccl not found) or
/// TPLA_STATUS_BACKEND. Thread-safe.
///
/// # Safety
/// `buf` is NULL or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn tpla_nccl_unique_id(buf: *mut u8, len: usize) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let buf = unsafe { output(buf, len, "buf") }?;
        if buf.is_empty() {
            return Err(Failure::null("buf"));
        }
        if buf.len() < TPLA_NCCL_UNIQUE_ID_BYTES {
            return Err(Failure::new(
                tpla_status::BufferTooSmall,
                format!("an NCCL unique id is {TPLA_NCCL_UNIQUE_ID_BYTES} bytes, buf holds {len}"),
            ));
        }
        new_unique_id(&mut buf[..TPLA_NCCL_UNIQUE_ID_BYTES])
    })
}

#[cfg(feature = "nccl")]
fn new_unique_id(buf: &mut [u8]) -> Outcome {
    let id = crate::combine::nccl::UniqueId::new()?;
    buf.copy_from_slice(id.as_bytes());
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn new_unique_id(_buf: &mut [u8]) -> Outcome {
    no_nccl()
}

/// Joins the communicator of `nranks` ranks named by the unique id `id` (`len` ==
/// TPLA_NCCL_UNIQUE_ID_BYTES bytes from rank 0's `tpla_nccl_unique_id`) as rank `rank`
/// on GPU `device`. Blocks until every rank has joined. One rank per GPU. Destroy it with
/// `tpla_nccl_comm_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (len, nranks < 1,
/// rank outside 0 .. nranks - 1, device < 0), TPLA_STATUS_UNSUPPORTED (built without
/// NCCL; libnccl, the driver or the GPU missing) or TPLA_STATUS_BACKEND (NCCL failed,
/// for example a rank that never joined). Thread-safe (each rank usually calls it from
/// its own process or thread).
///
/// # Safety
/// `id` is NULL or readable for `len` bytes; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_nccl_comm_create(
    id: *const u8,
    len: usize,
    nranks: i32,
    rank: i32,
    device: i32,
    out: *mut *mut tpla_nccl_comm,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let id = unsafe { input(id, len, "id") }?;
        if id.is_empty() {
            return Err(Failure::null("id"));
        }
        if len != TPLA_NCCL_UNIQUE_ID_BYTES {
            return Err(Failure::invalid(format!(
                "an NCCL unique id is {TPLA_NCCL_UNIQUE_ID_BYTES} bytes, got {len}"
            )));
        }
        if nranks < 1 || rank < 0 || rank >= nranks || device < 0 {
            return Err(Failure::invalid(format!(
                "rank {rank} of {nranks} ranks on device {device}: need nranks >= 1, \
                 0 <= rank < nranks and device >= 0"
            )));
        }
        // SAFETY: caller contract.
        unsafe { hand_out(out, || make_comm(id, nranks, rank, device)) }
    })
}

#[cfg(feature = "nccl")]
fn make_comm(id: &[u8], nranks: i32, rank: i32, device: i32) -> Outcome<tpla_nccl_comm> {
    use crate::combine::nccl::{check_library, Communicator, UniqueId};
    check_library()?;
    let id = UniqueId::from_bytes(id)?;
    let device = crate::attention::cuda::CudaDevice::open(device as usize)?;
    let comm = Communicator::init_rank(&id, nranks as usize, rank as usize, &device)?;
    Ok(tpla_nccl_comm { comm })
}

#[cfg(not(feature = "nccl"))]
fn make_comm(_id: &[u8], _nranks: i32, _rank: i32, _device: i32) -> Outcome<tpla_nccl_comm> {
    no_nccl()
}

/// Destroys a communicator (NCCL lets its pending operations finish); NULL is a no-op.
///
/// # Safety
/// `comm` is NULL or a communicator not yet destroyed and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_nccl_comm_destroy(comm: *mut tpla_nccl_comm) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(comm) })
}

/// Enqueues an in-place f32 sum of `count` values at `dev_buf` (device memory of the
/// communicator's GPU, for example a step's `out_dev`) over every rank of `comm`, on
/// `stream` (a CUstream of that GPU's primary context; NULL: the legacy default stream),
/// and returns without waiting: a CUDA graph can capture it. Every rank must make the
/// same calls with the same counts in the same order. The buffer must stay valid until
/// the stream has passed the sum.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (count 0; an address
/// that is not device memory, or whose allocation ends before count values; not a
/// stream), TPLA_STATUS_MISMATCH (memory or stream of another GPU or context),
/// TPLA_STATUS_UNSUPPORTED (no NCCL in this build) or TPLA_STATUS_BACKEND. Uses `comm`
/// exclusively (one thread at a time).
///
/// # Safety
/// `comm` is NULL or live; `dev_buf` stays valid as said above; `stream` is NULL or a
/// live CUstream.
#[no_mangle]
pub unsafe extern "C" fn tpla_nccl_all_reduce(
    comm: *mut tpla_nccl_comm,
    dev_buf: *mut f32,
    count: usize,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = unsafe { handle_mut(comm, "comm") }?;
        if dev_buf.is_null() {
            return Err(Failure::null("dev_buf"));
        }
        if count == 0 || count > isize::MAX as usize / 4 {
            return Err(Failure::invalid(format!(
                "an all-reduce sums 1 or more values, got {count}"
            )));
        }
        // SAFETY: forwarded caller contract.
        unsafe { all_reduce(c, dev_buf as u64, count, stream) }
    })
}

/// # Safety
/// As `tpla_nccl_all_reduce`.
#[cfg(feature = "nccl")]
unsafe fn all_reduce(
    c: &mut tpla_nccl_comm,
    ptr: u64,
    count: usize,
    stream: *mut c_void,
) -> Outcome {
    let device = c.comm.device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    check_device_buffer(&device, ptr, count * 4, "dev_buf")?;
    // SAFETY: the buffer lies on the communicator's device and holds count f32, the
    // stream is of its context (both checked); validity until the stream passes is the
    // caller's contract.
    Ok(unsafe { c.comm.all_reduce_raw(&[(ptr, count)], stream) }?)
}

/// # Safety
/// As `tpla_nccl_all_reduce`.
#[cfg(not(feature = "nccl"))]
unsafe fn all_reduce(
    c: &mut tpla_nccl_comm,
    _ptr: u64,
    _count: usize,
    _stream: *mut c_void,
) -> Outcome {
    match c.never {}
}

// ---- sequence shards on the device ---------------------------------------------------------

/// Merge (a) of `tpla_device_sequence_merge_in_process`: the gathered log-sum-exps, then
/// one sum of the rescaled outputs.
pub const TPLA_SEQUENCE_MERGE_LSE: u32 = 0;
/// Merge (b): numerators and denominators packed in f64 against the shared logit bounds.
pub const TPLA_SEQUENCE_MERGE_PACKED: u32 = 1;

/// The rank's place in a hybrid deployment (from its cache at creation): its sequence
/// shard `*shard` of `*shards` (0 of 1 without sequence sharding) and their interleave.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT. Safe to call concurrently with other read-only uses
/// of the rank.
///
/// # Safety
/// `rank` is NULL or live; the outputs are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_sequence_shard(
    rank: *const tpla_device_rank,
    shard: *mut u32,
    shards: *mut u32,
    interleave: *mut u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle(rank, "rank") }?;
        let (j, s, b) = sequence_position(r);
        // SAFETY: caller contract.
        unsafe {
            write_out(shard, j, "shard")?;
            write_out(shards, s, "shards")?;
            write_out(interleave, b, "interleave")
        }
    })
}

#[cfg(feature = "cuda")]
fn sequence_position(r: &tpla_device_rank) -> (u32, u32, u32) {
    let s = r.rank.sequence_sharding();
    // shard counts and interleaves are validated far below 2^32
    (
        r.rank.sequence_shard() as u32,
        s.shards as u32,
        s.interleave as u32,
    )
}

#[cfg(not(feature = "cuda"))]
fn sequence_position(r: &tpla_device_rank) -> (u32, u32, u32) {
    match r.never {}
}

/// One decode step of layer `layer` on a rank holding a sequence shard (or every token),
/// on host query rows as `tpla_device_rank_decode_host` takes them: the same decode
/// kernels over the rank's tokens of each sequence (an entry with none gets zero outputs
/// and a log-sum-exp of -inf), into the rank's own partial outputs and log-sum-exps,
/// which stay on the device for the merges (`tpla_device_sequence_merge_in_process`,
/// `tpla_device_rank_merge_nccl`); `tpla_device_rank_download` copies them out. With
/// `rope_key_norm` >= 0 (a bound of |k_rope| over every token of the batch's sequences,
/// the same on every rank), the step also writes the shared logit bounds merge (b)
/// needs; a negative value writes none. Waits for the upload, not for the step.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (batch 0 or above
/// max_batch, counts, a NaN or infinite bound), TPLA_STATUS_OUT_OF_RANGE (layer, a
/// sequence not on this rank), TPLA_STATUS_UNSUPPORTED (no CUDA in this build) or
/// TPLA_STATUS_BACKEND. Uses `rank` exclusively (one thread at a time).
///
/// # Safety
/// `rank` is NULL or live; the arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_decode_sequence_shard_host(
    rank: *mut tpla_device_rank,
    layer: u32,
    seq_ids: *const u32,
    batch: usize,
    queries: *const f32,
    queries_count: usize,
    rope_key_norm: f64,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle_mut(rank, "rank") }?;
        // SAFETY: caller contract (inputs only).
        let (seqs, q) = unsafe {
            (
                input(seq_ids, batch, "seq_ids")?,
                input(queries, queries_count, "queries")?,
            )
        };
        if rope_key_norm.is_nan() || rope_key_norm.is_infinite() {
            return Err(Failure::invalid(format!(
                "rope_key_norm must be finite (negative: no logit bounds), got {rope_key_norm}"
            )));
        }
        let norm = (rope_key_norm >= 0.0).then_some(rope_key_norm);
        decode_shard_host(r, layer, seqs, q, norm)
    })
}

#[cfg(feature = "cuda")]
fn decode_shard_host(
    r: &mut tpla_device_rank,
    layer: u32,
    seqs: &[u32],
    q: &[f32],
    norm: Option<f64>,
) -> Outcome {
    Ok(r.rank
        .decode_sequence_shard(super::to_usize(layer), seqs, q, norm)?)
}

#[cfg(not(feature = "cuda"))]
fn decode_shard_host(
    r: &mut tpla_device_rank,
    _layer: u32,
    _seqs: &[u32],
    _q: &[f32],
    _norm: Option<f64>,
) -> Outcome {
    match r.never {}
}

/// Waits for the rank's work and copies the first values of layer `layer`'s partial head
/// outputs ([batch][heads][d_v], `out_count` of them; after a merge, the merged output)
/// into `out`, and, when `lse` is not NULL, of its log-sum-exps ([batch][heads],
/// `lse_count`) into `lse`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT (rank, out), TPLA_STATUS_INVALID_ARGUMENT (a count
/// above the rank's buffers, overlapping buffers), TPLA_STATUS_OUT_OF_RANGE (layer),
/// TPLA_STATUS_UNSUPPORTED (no CUDA in this build) or TPLA_STATUS_BACKEND. Safe to call
/// concurrently with other read-only uses of the rank.
///
/// # Safety
/// `rank` is NULL or live; `out` holds `out_count` floats; `lse` is NULL or holds
/// `lse_count`.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_download(
    rank: *const tpla_device_rank,
    layer: u32,
    out: *mut f32,
    out_count: usize,
    lse: *mut f32,
    lse_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle(rank, "rank") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let lse_count = if lse.is_null() { 0 } else { lse_count };
        check_disjoint(
            &[span(out, out_count, "out")],
            &[span(lse as *const f32, lse_count, "lse")],
        )?;
        // SAFETY: caller contract; disjoint (checked).
        let out = unsafe { output(out, out_count, "out") }?;
        let lse = if lse.is_null() {
            None
        } else {
            // SAFETY: caller contract.
            Some(unsafe { output(lse, lse_count, "lse") }?)
        };
        download(r, layer, out, lse)
    })
}

#[cfg(feature = "cuda")]
fn download(r: &tpla_device_rank, layer: u32, out: &mut [f32], lse: Option<&mut [f32]>) -> Outcome {
    let layer = super::to_usize(layer);
    r.rank.download_partial(layer, out)?;
    if let Some(l) = lse {
        r.rank.lse(layer)?.download(l)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn download(
    r: &tpla_device_rank,
    _layer: u32,
    _out: &mut [f32],
    _lse: Option<&mut [f32]>,
) -> Outcome {
    match r.never {}
}

/// Merges layer `layer`'s step of `batch` sequences over every rank of a hybrid
/// deployment emulated on one GPU: `ranks` holds `count` device ranks in rank order
/// (`group * shards + shard`), each after `tpla_device_rank_decode_sequence_shard_host`
/// of that step (with logit bounds for TPLA_SEQUENCE_MERGE_PACKED). `merge` is
/// TPLA_SEQUENCE_MERGE_LSE (merge (a)) or TPLA_SEQUENCE_MERGE_PACKED (merge (b)).
/// Synchronous: afterwards every rank's partial outputs hold the merged output, summed
/// over the latent groups.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (merge, count, batch,
/// a rank listed twice, a step without logit bounds for merge (b), a bound that is not
/// one), TPLA_STATUS_OUT_OF_RANGE (layer), TPLA_STATUS_MISMATCH (ranks out of order, of
/// another deployment or on another GPU), TPLA_STATUS_UNSUPPORTED (no CUDA in this
/// build) or TPLA_STATUS_BACKEND. Uses every rank exclusively.
///
/// # Safety
/// `ranks` is NULL or holds `count` pointers, each NULL or a live device rank.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_sequence_merge_in_process(
    ranks: *const *mut tpla_device_rank,
    count: usize,
    layer: u32,
    batch: usize,
    merge: u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let ptrs = unsafe { input(ranks, count, "ranks") }?;
        if ptrs.is_empty() {
            return Err(Failure::null("ranks"));
        }
        if merge != TPLA_SEQUENCE_MERGE_LSE && merge != TPLA_SEQUENCE_MERGE_PACKED {
            return Err(Failure::invalid(format!(
                "merge {merge} is neither TPLA_SEQUENCE_MERGE_LSE nor TPLA_SEQUENCE_MERGE_PACKED"
            )));
        }
        if let Some(i) = ptrs.iter().position(|p| p.is_null()) {
            return Err(Failure::null(&format!("ranks[{i}]")));
        }
        for (i, p) in ptrs.iter().enumerate() {
            if ptrs[..i].contains(p) {
                return Err(Failure::invalid(format!("ranks[{i}] is listed twice")));
            }
        }
        // SAFETY: live, distinct handles (checked above), used by this call alone.
        let handles: Vec<&mut tpla_device_rank> = ptrs
            .iter()
            .map(|&p| unsafe { handle_mut(p, "a rank") })
            .collect::<Outcome<_>>()?;
        merge_in_process(handles, layer, batch, merge)
    })
}

#[cfg(feature = "cuda")]
fn merge_in_process(
    mut handles: Vec<&mut tpla_device_rank>,
    layer: u32,
    batch: usize,
    merge: u32,
) -> Outcome {
    use crate::combine::sequence_device::{merge_by_lse_on_device, merge_packed_on_device};
    let mut ranks: Vec<&mut crate::device_rank::DeviceRank> =
        handles.iter_mut().map(|h| &mut h.rank).collect();
    let layer = super::to_usize(layer);
    Ok(if merge == TPLA_SEQUENCE_MERGE_LSE {
        merge_by_lse_on_device(&mut ranks, layer, batch)
    } else {
        merge_packed_on_device(&mut ranks, layer, batch)
    }?)
}

#[cfg(not(feature = "cuda"))]
fn merge_in_process(
    mut handles: Vec<&mut tpla_device_rank>,
    _layer: u32,
    _batch: usize,
    _merge: u32,
) -> Outcome {
    match handles.pop().expect("at least one rank").never {}
}

/// Merges layer `layer`'s step of `batch` sequences through NCCL, one rank per GPU,
/// after `tpla_device_rank_decode_sequence_shard_host` of that step. `group` joins the
/// shards of this rank's latent group (this rank as its shard index). With
/// TPLA_SEQUENCE_MERGE_LSE, `other` joins every rank of the deployment (this rank as
/// `group * shards + shard`; with one latent group it may be `group` itself): an
/// all-gather of the group's log-sum-exps, the rescale and one all-reduce, enqueued on
/// the rank's stream. With TPLA_SEQUENCE_MERGE_PACKED, `other` joins the ranks of this
/// shard index (one per latent group, this rank as its group): the pack, an f64
/// all-reduce over `group`, the unpack and the f32 all-reduce over `other`; synchronous.
/// Every rank must make the same call. `tpla_device_rank_download` reads the result.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (merge, batch, a step
/// without logit bounds for merge (b), a bound that is not one), TPLA_STATUS_OUT_OF_RANGE
/// (layer), TPLA_STATUS_MISMATCH (a communicator of another GPU, size or rank),
/// TPLA_STATUS_UNSUPPORTED (no CUDA or NCCL in this build) or TPLA_STATUS_BACKEND. Uses
/// `rank` and both communicators exclusively.
///
/// # Safety
/// `rank`, `group` and `other` are NULL or live.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_rank_merge_nccl(
    rank: *mut tpla_device_rank,
    group: *const tpla_nccl_comm,
    other: *const tpla_nccl_comm,
    layer: u32,
    batch: usize,
    merge: u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let r = unsafe { handle_mut(rank, "rank") }?;
        // SAFETY: caller contract.
        let g = unsafe { handle(group, "group") }?;
        // SAFETY: caller contract.
        let o = unsafe { handle(other, "other") }?;
        if merge != TPLA_SEQUENCE_MERGE_LSE && merge != TPLA_SEQUENCE_MERGE_PACKED {
            return Err(Failure::invalid(format!(
                "merge {merge} is neither TPLA_SEQUENCE_MERGE_LSE nor TPLA_SEQUENCE_MERGE_PACKED"
            )));
        }
        merge_nccl(r, g, o, layer, batch, merge)
    })
}

#[cfg(feature = "nccl")]
fn merge_nccl(
    r: &mut tpla_device_rank,
    g: &tpla_nccl_comm,
    o: &tpla_nccl_comm,
    layer: u32,
    batch: usize,
    merge: u32,
) -> Outcome {
    let layer = super::to_usize(layer);
    Ok(if merge == TPLA_SEQUENCE_MERGE_LSE {
        r.rank.merge_by_lse_nccl(&g.comm, &o.comm, layer, batch)
    } else {
        r.rank.merge_packed_nccl(&g.comm, &o.comm, layer, batch)
    }?)
}

#[cfg(not(feature = "nccl"))]
fn merge_nccl(
    _r: &mut tpla_device_rank,
    g: &tpla_nccl_comm,
    _o: &tpla_nccl_comm,
    _layer: u32,
    _batch: usize,
    _merge: u32,
) -> Outcome {
    match g.never {}
}

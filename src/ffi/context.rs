//! Geometry, transforms, weights and rank contexts: decode steps and decode-time appends.

use super::cache::tpla_cache;
use super::{
    check_disjoint, guard, guard_value, hand_out, handle, handle_mut, input, output, span, to_f64,
    to_usize, tpla_status, versioned, versioned_out, write_out, Failure, Outcome, Versioned,
};
use crate::attention::cpu::{CpuBackend, KernelChoice};
use crate::attention::reference::normalise;
use crate::attention::reference::Reference;
use crate::attention::LatentAttention;
use crate::convert::{FoldedLayer, MlaWeights};
use crate::decode::{shape_count, Outputs, Queries, RankContext, RankLayer};
use crate::geometry::{ModelDims, ShardPlan};
use crate::transform::{SecondMoment, SliceLayout, Transform, TransformKind};
use std::ffi::{c_char, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// Shape of one MLA attention layer (DESIGN.md section 2). A plain value: its layout
/// is fixed for this ABI version (a new field would be a new struct).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tpla_dims {
    /// Query heads H.
    pub heads: u32,
    /// Latent width d_c (kv_lora_rank).
    pub d_c: u32,
    /// RoPE key width d_r.
    pub d_r: u32,
    /// Per-head no-RoPE query/key width d_n.
    pub d_n: u32,
    /// Per-head value width d_v.
    pub d_v: u32,
    /// Softmax scale of the model (1/sqrt(d_n + d_r), times YaRN's mscale^2 when the
    /// model config has rope_scaling).
    pub softmax_scale: f64,
}

impl tpla_dims {
    pub(super) fn to_rust(self) -> Outcome<ModelDims> {
        Ok(ModelDims::new(
            to_usize(self.heads),
            to_usize(self.d_c),
            to_usize(self.d_r),
            to_usize(self.d_n),
            to_usize(self.d_v),
            self.softmax_scale,
        )?)
    }

    fn from_rust(d: &ModelDims) -> Self {
        // Every width is at most 65536 (ModelDims::validate).
        let w = |v: usize| v as u32;
        tpla_dims {
            heads: w(d.heads),
            d_c: w(d.d_c),
            d_r: w(d.d_r),
            d_n: w(d.d_n),
            d_v: w(d.d_v),
            softmax_scale: d.softmax_scale,
        }
    }
}

/// Which rank a context is: `ranks` ranks in `groups` latent groups (g = 1, 2, 4, 8;
/// ranks a multiple of groups). Rank r holds latent slice `r / (ranks / groups)` and head
/// shard `r % (ranks / groups)` of its group's heads; with ranks == groups every rank has
/// every head. A plain value, fixed for this ABI version.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tpla_plan {
    pub ranks: u32,
    pub groups: u32,
    pub rank: u32,
}

impl tpla_plan {
    pub(super) fn to_rust(self, dims: &ModelDims) -> Outcome<ShardPlan> {
        Ok(ShardPlan::with_head_split(
            dims,
            to_usize(self.ranks),
            to_usize(self.groups),
            to_usize(self.rank),
        )?)
    }
}

/// Decode backends (`tpla_backend_options.kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_backend {
    /// The f64 reference implementation: exact and slow; the oracle of the tests.
    Reference = 1,
    /// The multi-threaded CPU backend (AVX-512 BF16, AVX-512F, AVX2+FMA or portable
    /// kernels, chosen for the CPU at context creation).
    Cpu = 2,
    /// The CUDA backend on GPU `device`. Returns TPLA_STATUS_UNSUPPORTED when the
    /// library was built without CUDA (cargo feature `cuda`) or no usable GPU, driver or
    /// libnvrtc is present.
    Cuda = 3,
}

/// Element types of cached rows (`tpla_cache_options.dtype`,
/// `tpla_export_options.dtype`). bf16 is what MLA checkpoints and engines use.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_dtype {
    Bf16 = 1,
    F16 = 2,
    F32 = 3,
    /// FP8 latent slice (caches, shard files and engine memory; not outputs; on the GPU
    /// decoded by the Hopper kernel only: tpla_device_engine_create_for). A row of
    /// latent width w = d_c/g and RoPE width d_r is `w + 4*ceil(w/128) + 2*d_r` bytes:
    /// w e4m3 codes (bias 7, no infinities, 0x7f/0xff NaN), then one little-endian f32
    /// scale per block of 128 latent values (the last block may be shorter; value =
    /// code * scale, scale = block max magnitude / 448), then the RoPE key as d_r
    /// little-endian bf16 (DeepSeek-V3 at g=2: 392 bytes per token instead of 640).
    Fp8E4m3 = 4,
}

/// Latent transform families (`tpla_transform_desc.kind`); the codes shard files store.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_transform_kind {
    /// U = I: plain slicing.
    Identity = 0,
    /// Randomised Hadamard U = D H / sqrt(d_c), D a +-1 diagonal drawn from `seed`;
    /// d_c must be a power of two.
    Hadamard = 1,
    /// A PCA basis of calibration latents, given as its matrix and eigenvalues.
    Pca = 2,
}

/// How the queries of a decode step are given (`tpla_decode_args.query_kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_query_kind {
    /// `queries` holds q_nope, [batch][rank heads][d_n]; the context absorbs W_UK.
    Nope = 1,
    /// `queries` holds absorbed latent queries in the rotated basis, cut to the rank's
    /// slice, [batch][rank heads][slice_width] (W'_UK q_nope, without scale or mu).
    Latent = 2,
    /// `queries` holds each head's absorbed latent query then its RoPE query in one row,
    /// [batch][rank heads][slice_width + d_r] (FlashMLA's q layout, cut to the rank's
    /// slice; without scale or mu); `q_rope` is NULL with count 0.
    Joined = 3,
}

/// What a decode step writes (`tpla_decode_args.output_kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_output_kind {
    /// The rank's partial head outputs [batch][rank heads][d_v], to be summed over the
    /// ranks of a head shard (the all-reduce).
    Heads = 1,
    /// The latent outputs [batch][rank heads][slice_width] and, in `lse`, the natural-log
    /// sum-exp of each head's scores [batch][rank heads].
    Latent = 2,
}

/// How an appended token's latent is normalised (DESIGN.md 3.4).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_rms_mode {
    /// With the full latent's RMS (the engine has the whole pre-norm latent).
    Exact = 1,
    /// With an RMS estimated from the rank's slice and the layer's `slice_fraction`.
    Sliced = 2,
}

fn transform_kind(code: u32) -> Outcome<TransformKind> {
    Ok(TransformKind::from_code(code)?)
}

/// Fills `*out` with the shape of a published model: "deepseek-v3", "kimi-k2" or
/// "deepseek-v2-lite" (softmax scale including the model's YaRN mscale).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT (name or out NULL) or TPLA_STATUS_INVALID_ARGUMENT
/// (unknown name). Thread-safe.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_dims_preset(name: *const c_char, out: *mut tpla_dims) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let name = unsafe { super::c_string(name, "name") }?;
        let name = name
            .to_str()
            .map_err(|_| Failure::invalid("preset name is not UTF-8"))?;
        let dims = ModelDims::preset(name)?;
        // SAFETY: caller contract.
        unsafe { write_out(out, tpla_dims::from_rust(&dims), "out") }
    })
}

// ---- transforms ----------------------------------------------------------------------------

/// An orthogonal latent transform U (d_c x d_c). Immutable once made: it may be used
/// from several threads at once, and by several contexts and exports.
pub struct tpla_transform {
    pub(super) transform: Transform,
}

/// Describes a transform for `tpla_transform_create`.
#[repr(C)]
pub struct tpla_transform_desc {
    /// sizeof(tpla_transform_desc).
    pub struct_size: usize,
    /// A `tpla_transform_kind`.
    pub kind: u32,
    /// Latent width d_c.
    pub d_c: u32,
    /// Hadamard: the seed of the random signs. Other kinds: must be 0.
    pub seed: u64,
    /// PCA: the row-major d_c x d_c orthogonal matrix (max |U U^T - I| below 1e-9).
    /// Identity and Hadamard: NULL, or the matrix they generate, which is then checked.
    pub matrix: *const f64,
    /// Elements at `matrix`: d_c * d_c, or 0 when `matrix` is NULL.
    pub matrix_count: usize,
    /// PCA: the eigenvalue of each column, in column order. Other kinds: NULL.
    pub eigenvalues: *const f64,
    /// Elements at `eigenvalues`: d_c, or 0 when `eigenvalues` is NULL.
    pub eigenvalues_count: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_transform_desc {
    const NAME: &'static str = "tpla_transform_desc";
}

/// Makes a transform. The arrays are copied; the caller keeps ownership of them.
/// Destroy the result with `tpla_transform_destroy` (it may be destroyed while contexts
/// made with it live: they keep their own copy).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (unknown kind, d_c 0 or above 65536, d_c not a power of
/// two for Hadamard, negative PCA eigenvalues, a matrix that is not orthogonal, wrong
/// counts, a seed for a kind without one) or
/// TPLA_STATUS_MISMATCH (a matrix that is not the one the kind and seed generate).
/// Thread-safe.
///
/// # Safety
/// `desc` is NULL or a valid `tpla_transform_desc` whose arrays hold their counts;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_transform_create(
    desc: *const tpla_transform_desc,
    out: *mut *mut tpla_transform,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let d = unsafe { versioned(desc, "desc") }?;
        // SAFETY: caller contract.
        let matrix = unsafe { input(d.matrix, d.matrix_count, "desc->matrix") }?;
        // SAFETY: caller contract.
        let eigen = unsafe { input(d.eigenvalues, d.eigenvalues_count, "desc->eigenvalues") }?;
        let kind = transform_kind(d.kind)?;
        // C has no "absent": a zero seed counts as none, except for Hadamard where every
        // seed is meaningful.
        let seed = (kind == TransformKind::Hadamard || d.seed != 0).then_some(d.seed);
        let present = |v: &[f64], p: *const f64| (!p.is_null()).then(|| v.to_vec());
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                let transform = Transform::from_parts(
                    kind,
                    to_usize(d.d_c),
                    seed,
                    present(matrix, d.matrix),
                    present(eigen, d.eigenvalues),
                )?;
                Ok(tpla_transform { transform })
            })
        }
    })
}

/// How PCA components are assigned to latent slices (`tpla_transform_pca`).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_slice_layout {
    /// Slice 0 holds the largest components, slice 1 the next ones, and so on (the
    /// paper's choice: slice 0's attention is nearly exact).
    Contiguous = 1,
    /// Slice i holds components i, i+g, i+2g, ...: balanced energy across slices.
    Interleaved = 2,
}

/// Makes a PCA transform from calibration latents: the eigenvectors of the second moment
/// of the normalised latents, sorted by eigenvalue, laid out for `groups` slices by
/// `layout` (a `tpla_slice_layout`). `latents` are pre-norm latents a_t, [tokens][d_c],
/// read during the call. Destroy the result with `tpla_transform_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (d_c 0 or above
/// 65536, no whole latent, non-finite values (named by their index in `latents`), groups
/// not dividing d_c, unknown layout). Thread-safe.
///
/// # Safety
/// `latents` is NULL or readable for `latents_count` floats; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_transform_pca(
    d_c: u32,
    latents: *const f32,
    latents_count: usize,
    layout: u32,
    groups: u32,
    out: *mut *mut tpla_transform,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let a = unsafe { input(latents, latents_count, "latents") }?;
        let d = to_usize(d_c);
        crate::transform::check_dim(d)?;
        if a.is_empty() || a.len() % d != 0 {
            return Err(Failure::invalid(format!(
                "latents must hold a positive whole number of {d_c}-wide latents, got {} values",
                a.len()
            )));
        }
        let layout = match layout {
            l if l == tpla_slice_layout::Contiguous as u32 => SliceLayout::Contiguous,
            l if l == tpla_slice_layout::Interleaved as u32 => SliceLayout::Interleaved,
            l => {
                return Err(Failure::invalid(format!(
                    "unknown slice layout {l} (1 = contiguous, 2 = interleaved)"
                )))
            }
        };
        // checked here: normalising spreads a non-finite value over its whole latent
        crate::decode::check_finite("latents", a)?;
        let mut moment = SecondMoment::new(d);
        for latent in a.chunks_exact(d) {
            moment.add(&normalise(&to_f64(latent)))?;
        }
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                let transform = Transform::pca(&moment, layout, to_usize(groups))?;
                Ok(tpla_transform { transform })
            })
        }
    })
}

/// Destroys a transform; NULL is a no-op.
///
/// # Safety
/// `transform` is NULL or a transform not yet destroyed, not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_transform_destroy(transform: *mut tpla_transform) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(transform) })
}

// ---- weights -------------------------------------------------------------------------------

/// The MLA up-projections and norm weight of one layer, as a checkpoint has them (all
/// heads, full latent width), in f32. The library reads them during the call only.
#[repr(C)]
pub struct tpla_mla_weights {
    /// sizeof(tpla_mla_weights).
    pub struct_size: usize,
    /// W_UK, [heads][d_c][d_n]: latent -> per-head no-RoPE key (first half of
    /// kv_b_proj, transposed per head).
    pub w_uk: *const f32,
    pub w_uk_count: usize,
    /// W_UV, [heads][d_c][d_v]: latent -> per-head value.
    pub w_uv: *const f32,
    pub w_uv_count: usize,
    /// gamma, [d_c]: the kv_a_layernorm weight.
    pub gamma: *const f32,
    pub gamma_count: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_mla_weights {
    const NAME: &'static str = "tpla_mla_weights";
}

/// Reads MLA weights (f32 -> f64) after checking their counts against `dims`.
///
/// # Safety
/// `w` is NULL or a valid `tpla_mla_weights` whose arrays hold their counts.
pub(super) unsafe fn mla_weights(
    w: *const tpla_mla_weights,
    dims: ModelDims,
) -> Outcome<MlaWeights> {
    // SAFETY: caller contract.
    let w = unsafe { versioned(w, "weights") }?;
    // SAFETY: caller contract (the three arrays).
    let (uk, uv, gamma) = unsafe {
        (
            input(w.w_uk, w.w_uk_count, "weights->w_uk")?,
            input(w.w_uv, w.w_uv_count, "weights->w_uv")?,
            input(w.gamma, w.gamma_count, "weights->gamma")?,
        )
    };
    Ok(MlaWeights::new(
        dims,
        to_f64(uk),
        to_f64(uv),
        to_f64(gamma),
    )?)
}

/// Folds one layer's MLA weights for one rank (DESIGN.md 3.1-3.2): writes the rank's
/// absorbed weights W'_UK = (U^T diag(gamma) W_UK)[slice, :] for its heads into `w_uk`
/// ([rank heads][slice_width][d_n]) and W'_UV likewise into `w_uv` ([rank heads]
/// [slice_width][d_v]), f32. This is what `tpla convert` stores per rank; install the
/// result with `tpla_context_set_layer`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (bad dims or plan, counts that do not match the
/// shapes, non-finite weights, overlapping buffers), TPLA_STATUS_OUT_OF_RANGE (rank not
/// below ranks) or TPLA_STATUS_MISMATCH (transform width is not d_c). Thread-safe.
///
/// # Safety
/// Pointers are NULL or valid for their counts; the outputs are writable and do not
/// overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn tpla_fold_layer(
    dims: tpla_dims,
    plan: tpla_plan,
    weights: *const tpla_mla_weights,
    transform: *const tpla_transform,
    w_uk: *mut f32,
    w_uk_count: usize,
    w_uv: *mut f32,
    w_uv_count: usize,
) -> tpla_status {
    guard(|| {
        let d = dims.to_rust()?;
        let p = plan.to_rust(&d)?;
        // SAFETY: caller contract.
        let mla = unsafe { mla_weights(weights, d) }?;
        // SAFETY: caller contract.
        let t = unsafe { handle(transform, "transform") }?;
        // SAFETY: checked by `mla_weights` above.
        let inputs = unsafe { &*weights };
        check_disjoint(
            &[
                span(w_uk, w_uk_count, "w_uk"),
                span(w_uv, w_uv_count, "w_uv"),
            ],
            &[
                span(inputs.w_uk, inputs.w_uk_count, "weights->w_uk"),
                span(inputs.w_uv, inputs.w_uv_count, "weights->w_uv"),
                span(inputs.gamma, inputs.gamma_count, "weights->gamma"),
            ],
        )?;
        // SAFETY: caller contract; disjoint from each other and from the inputs (above).
        let (out_uk, out_uv) = unsafe {
            (
                output(w_uk, w_uk_count, "w_uk")?,
                output(w_uv, w_uv_count, "w_uv")?,
            )
        };
        let rw = FoldedLayer::new(&mla, &t.transform)?.rank(&p, 1.0)?;
        for (what, out, folded) in [("w_uk", out_uk, &rw.w_uk), ("w_uv", out_uv, &rw.w_uv)] {
            if out.len() != folded.len() {
                return Err(Failure::invalid(format!(
                    "{what} holds {} values, this rank's folded weights are {}",
                    out.len(),
                    folded.len()
                )));
            }
            for (o, v) in out.iter_mut().zip(folded) {
                *o = *v as f32;
            }
        }
        Ok(())
    })
}

/// One layer's weights for one rank, for `tpla_context_set_layer`: the absorbed slices
/// made by `tpla_fold_layer` or `tpla convert`, the slice's logit scale and its
/// transform. The library copies what it needs during the call.
#[repr(C)]
pub struct tpla_layer_weights {
    /// sizeof(tpla_layer_weights).
    pub struct_size: usize,
    /// W'_UK, [rank heads][slice_width][d_n].
    pub w_uk: *const f32,
    pub w_uk_count: usize,
    /// W'_UV, [rank heads][slice_width][d_v].
    pub w_uv: *const f32,
    pub w_uv_count: usize,
    /// The slice's logit scale mu (finite, positive; 1 is a good default, DESIGN.md 3.2).
    pub mu: f64,
    /// The slice's share of the latent energy, in (0, 1]: used by TPLA_RMS_MODE_SLICED
    /// appends (1/g for identity and Hadamard transforms; the eigenvalue share for PCA).
    pub slice_fraction: f64,
    /// The layer's transform, the one the weights were folded with.
    pub transform: *const tpla_transform,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_layer_weights {
    const NAME: &'static str = "tpla_layer_weights";
}

// ---- contexts ------------------------------------------------------------------------------

/// One rank of a TPLA layer stack: its weights of every layer, its transforms and a
/// decode backend. Use it from one thread at a time; separate contexts may be used
/// from separate threads concurrently.
pub struct tpla_context {
    pub(super) ctx: RankContext,
    backend_name: CString,
}

/// The model and rank of a context (`tpla_context_create`).
#[repr(C)]
pub struct tpla_context_options {
    /// sizeof(tpla_context_options).
    pub struct_size: usize,
    pub dims: tpla_dims,
    pub plan: tpla_plan,
    /// Layers of the model (1 to 4096).
    pub layers: u32,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_context_options {
    const NAME: &'static str = "tpla_context_options";
}

/// Most worker threads of a CPU backend or a `tpla_thread_pool`.
pub const TPLA_MAX_THREADS: u32 = 1024;

/// A pool of CPU worker threads that the contexts given it share
/// (`tpla_backend_options.pool`): their decode steps take turns on its threads, so an
/// engine with many contexts decides once how many cores decode uses. Contexts keep the
/// pool alive: it may be destroyed while they live, and its threads end with the last
/// of them. Thread-safe.
pub struct tpla_thread_pool {
    pool: Arc<rayon::ThreadPool>,
}

/// Starts a pool of `threads` worker threads (1 to TPLA_MAX_THREADS). Destroy it with
/// `tpla_thread_pool_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (thread count).
/// Thread-safe.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_thread_pool_create(
    threads: u32,
    out: *mut *mut tpla_thread_pool,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                let pool = CpuBackend::thread_pool(to_usize(threads))?;
                Ok(tpla_thread_pool { pool })
            })
        }
    })
}

/// Gives up the caller's reference to a pool; contexts using it keep it running. NULL
/// is a no-op.
///
/// # Safety
/// `pool` is NULL or a pool not yet destroyed, not in use by another thread's call.
#[no_mangle]
pub unsafe extern "C" fn tpla_thread_pool_destroy(pool: *mut tpla_thread_pool) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(pool) })
}

/// The decode backend of a context (`tpla_context_create`,
/// `tpla_context_create_from_weights_file`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct tpla_backend_options {
    /// sizeof(tpla_backend_options). The size of the first version, without `pool`, is
    /// accepted too (then `pool` is NULL).
    pub struct_size: usize,
    /// A `tpla_backend`.
    pub kind: u32,
    /// TPLA_BACKEND_CPU without `pool`: worker threads of the context's own pool, 1 to
    /// TPLA_MAX_THREADS. Ignored with a pool, and by other backends.
    pub threads: u32,
    /// TPLA_BACKEND_CUDA: the GPU ordinal. Others: ignored.
    pub device: u32,
    /// TPLA_BACKEND_CPU: NULL for a pool of the context's own, or a pool shared with
    /// other contexts (`tpla_thread_pool_create`), which the context keeps alive.
    /// Others: ignored.
    pub pool: *const tpla_thread_pool,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_backend_options {
    const NAME: &'static str = "tpla_backend_options";
}

/// sizeof(tpla_backend_options) before `pool` was appended: programs built against that
/// header keep working, with a private pool.
const BACKEND_OPTIONS_WITHOUT_POOL: usize = std::mem::offset_of!(tpla_backend_options, pool);

/// Reads backend options of either size.
///
/// # Safety
/// `ptr` is NULL or points to a `tpla_backend_options` of its `struct_size`.
unsafe fn backend_options(ptr: *const tpla_backend_options) -> Outcome<tpla_backend_options> {
    if !ptr.is_null() && ptr.is_aligned() {
        // SAFETY: non-NULL and aligned; every version starts with `size_t struct_size`.
        if unsafe { ptr.cast::<usize>().read() } == BACKEND_OPTIONS_WITHOUT_POOL {
            // SAFETY: the caller's struct holds every field before `pool`, at the same
            // offsets (repr(C), fields only appended).
            let (kind, threads, device) = unsafe { ((*ptr).kind, (*ptr).threads, (*ptr).device) };
            return Ok(tpla_backend_options {
                struct_size: BACKEND_OPTIONS_WITHOUT_POOL,
                kind,
                threads,
                device,
                pool: std::ptr::null(),
            });
        }
    }
    // SAFETY: caller contract.
    Ok(*unsafe { versioned(ptr, "backend") }?)
}

/// # Safety
/// `o.pool` is NULL or a live pool.
unsafe fn make_backend(o: &tpla_backend_options) -> Outcome<Box<dyn LatentAttention + Send>> {
    match o.kind {
        b if b == tpla_backend::Reference as u32 => Ok(Box::new(Reference)),
        b if b == tpla_backend::Cpu as u32 => {
            // SAFETY: caller contract.
            let backend = match unsafe { o.pool.as_ref() } {
                Some(shared) => CpuBackend::on_pool(shared.pool.clone(), KernelChoice::Auto)?,
                None => CpuBackend::new(to_usize(o.threads))?,
            };
            Ok(Box::new(backend))
        }
        b if b == tpla_backend::Cuda as u32 => cuda_backend(o.device),
        b => Err(Failure::invalid(format!(
            "unknown backend {b} (1 = reference, 2 = cpu, 3 = cuda)"
        ))),
    }
}

fn wrap(ctx: RankContext) -> tpla_context {
    let backend_name =
        CString::new(ctx.backend_name().replace('\0', " ")).expect("NUL bytes were replaced");
    tpla_context { ctx, backend_name }
}

#[cfg(feature = "cuda")]
fn cuda_backend(device: u32) -> Outcome<Box<dyn LatentAttention + Send>> {
    use crate::attention::cuda::CudaBackend;
    Ok(Box::new(CudaBackend::new(to_usize(device))?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_device: u32) -> Outcome<Box<dyn LatentAttention + Send>> {
    Err(crate::error::Error::unsupported(
        "this libtpla was built without CUDA support (cargo feature `cuda`)",
    )
    .into())
}

/// Creates a rank context for the model and rank of `options`, decoding with `backend`.
/// Its layers have no weights until `tpla_context_set_layer` installs them. Destroy it
/// with `tpla_context_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (bad dims, plan, layer count, backend, or a thread
/// count outside 1..TPLA_MAX_THREADS),
/// TPLA_STATUS_OUT_OF_RANGE (rank not below ranks), TPLA_STATUS_UNSUPPORTED (CUDA not
/// built in, no GPU; a CPU kernel this machine lacks) or TPLA_STATUS_BACKEND (GPU
/// runtime failure). Thread-safe.
///
/// # Safety
/// `options` and `backend` are NULL or valid structs of their types; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_create(
    options: *const tpla_context_options,
    backend: *const tpla_backend_options,
    out: *mut *mut tpla_context,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let o = unsafe { versioned(options, "options") }?;
        // SAFETY: caller contract.
        let b = unsafe { backend_options(backend) }?;
        let dims = o.dims.to_rust()?;
        let plan = o.plan.to_rust(&dims)?;
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                // the pool, if any, is live by the caller contract
                let backend = make_backend(&b)?;
                Ok(wrap(RankContext::new(
                    dims,
                    plan,
                    to_usize(o.layers),
                    backend,
                )?))
            })
        }
    })
}

/// Creates a rank context holding every layer of a converted weights file (written by
/// `tpla convert`: one file per rank), which fixes the model dims, the rank's plan and
/// the layer count (read them with `tpla_context_get_info`). The file is read during the
/// call only. Destroy the context with `tpla_context_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE, TPLA_STATUS_IO,
/// TPLA_STATUS_CORRUPT_FILE (truncated, corrupted or hostile file), or as
/// `tpla_context_create` for the backend. Thread-safe.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `backend` is NULL or a valid
/// `tpla_backend_options`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_create_from_weights_file(
    path: *const c_char,
    backend: *const tpla_backend_options,
    out: *mut *mut tpla_context,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let path = OsStr::from_bytes(unsafe { super::c_string(path, "path") }?.to_bytes());
        // SAFETY: caller contract.
        let b = unsafe { backend_options(backend) }?;
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                // the pool, if any, is live by the caller contract
                let backend = make_backend(&b)?;
                Ok(wrap(RankContext::from_weights_file(path, backend)?))
            })
        }
    })
}

/// Destroys a context; NULL is a no-op. Caches made from it stay valid.
///
/// # Safety
/// `ctx` is NULL or a context not yet destroyed and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_destroy(ctx: *mut tpla_context) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(ctx) })
}

/// What a context is, for sizing buffers (`tpla_context_get_info`).
#[repr(C)]
pub struct tpla_context_info {
    /// Set by the caller to sizeof(tpla_context_info) before the call.
    pub struct_size: usize,
    pub dims: tpla_dims,
    pub plan: tpla_plan,
    /// The rank's latent group (slice index).
    pub group: u32,
    /// The rank's heads: `head_start .. head_start + heads` of the model's heads.
    pub head_start: u32,
    pub heads: u32,
    /// The rank's latent columns: `slice_start .. slice_start + slice_width`.
    pub slice_start: u32,
    pub slice_width: u32,
    /// Values per cached token: slice_width + d_r.
    pub row_width: u32,
    pub layers: u32,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_context_info {
    const NAME: &'static str = "tpla_context_info";
}

/// Fills `*info` (whose struct_size the caller sets) with the context's geometry.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_WRONG_STRUCT_SIZE. Safe to call
/// concurrently with other read-only uses of the context.
///
/// # Safety
/// `ctx` is NULL or a live context; `info` is NULL or a writable `tpla_context_info`.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_get_info(
    ctx: *const tpla_context,
    info: *mut tpla_context_info,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let info = unsafe { versioned_out(info, "info") }?;
        let (d, p) = (c.dims(), c.plan());
        let w = |v: usize| v as u32; // all below the 65536 limit of ModelDims
        *info = tpla_context_info {
            struct_size: size_of::<tpla_context_info>(),
            dims: tpla_dims::from_rust(d),
            plan: tpla_plan {
                ranks: w(p.ranks),
                groups: w(p.groups),
                rank: w(p.rank),
            },
            group: w(p.group),
            head_start: w(p.head_start),
            heads: w(p.heads),
            slice_start: w(p.slice_start),
            slice_width: w(p.slice_width),
            row_width: w(p.row_width(d)),
            layers: w(c.layer_count()),
        };
        Ok(())
    })
}

/// The backend's name and chosen kernel, e.g. "cpu avx512-bf16 (4 threads)". The string
/// belongs to the context and lives until it is destroyed. Returns "" for a NULL ctx.
///
/// # Safety
/// `ctx` is NULL or a live context.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_backend_name(ctx: *const tpla_context) -> *const c_char {
    // SAFETY: caller contract.
    guard_value(c"".as_ptr(), || match unsafe { ctx.as_ref() } {
        Some(c) => c.backend_name.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// Installs the weights of layer `layer` (replacing earlier ones): this rank's absorbed
/// slices, mu, the slice energy fraction and the transform. The library copies them.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_OUT_OF_RANGE (layer), TPLA_STATUS_INVALID_ARGUMENT (counts that do not
/// match [rank heads][slice_width][d_n or d_v], NaN or infinite weights, mu or
/// slice_fraction out of range; the layer keeps its earlier weights) or
/// TPLA_STATUS_MISMATCH (transform width is not d_c). Not thread-safe for `ctx`.
///
/// # Safety
/// `ctx` is NULL or a live context not used by another thread during the call;
/// `weights` is NULL or a valid `tpla_layer_weights` whose arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_set_layer(
    ctx: *mut tpla_context,
    layer: u32,
    weights: *const tpla_layer_weights,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &mut unsafe { handle_mut(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let w = unsafe { versioned(weights, "weights") }?;
        // SAFETY: caller contract.
        let t = &unsafe { handle(w.transform, "weights->transform") }?.transform;
        // SAFETY: caller contract.
        let (uk, uv) = unsafe {
            (
                input(w.w_uk, w.w_uk_count, "weights->w_uk")?,
                input(w.w_uv, w.w_uv_count, "weights->w_uv")?,
            )
        };
        let rank_layer =
            RankLayer::from_f32(uk.to_vec(), uv.to_vec(), w.mu, t.clone(), w.slice_fraction)?;
        Ok(c.install(to_usize(layer), rank_layer)?)
    })
}

/// Appends one decode-time token to sequence `seq` in layer `layer` of `cache`:
/// `latent` is the token's full pre-norm latent a_t (d_c values), `k_rope` its
/// RoPE-rotated key (d_r values); the context normalises (`rms_mode`, a
/// `tpla_rms_mode`), rotates and slices it. Append to every layer before the next
/// decode step of the sequence. On error the cache is unchanged.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (counts, unknown
/// rms_mode, layer without weights, non-finite values), TPLA_STATUS_OUT_OF_RANGE
/// (unknown seq, layer), TPLA_STATUS_MISMATCH (the cache belongs to another geometry,
/// group, layer count or transform) or TPLA_STATUS_OUT_OF_CAPACITY (no free page).
/// Reads `ctx` only (other read-only uses may run concurrently); modifies `cache`, which
/// no other thread may use during the call.
///
/// # Safety
/// Handles are NULL or live; arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_append_token(
    ctx: *const tpla_context,
    cache: *mut tpla_cache,
    seq: u32,
    layer: u32,
    latent: *const f32,
    latent_count: usize,
    k_rope: *const f32,
    k_rope_count: usize,
    rms_mode: u32,
) -> tpla_status {
    // SAFETY: caller contract.
    unsafe {
        append_token(
            ctx,
            cache,
            seq,
            layer,
            None,
            (latent, latent_count),
            (k_rope, k_rope_count),
            rms_mode,
        )
    }
}

/// The one body of `tpla_context_append_token` and `tpla_context_append_token_at`
/// (`position` None: at the sequence's end).
///
/// # Safety
/// As `tpla_context_append_token`.
#[allow(clippy::too_many_arguments)]
unsafe fn append_token(
    ctx: *const tpla_context,
    cache: *mut tpla_cache,
    seq: u32,
    layer: u32,
    position: Option<u64>,
    (latent, latent_count): (*const f32, usize),
    (k_rope, k_rope_count): (*const f32, usize),
    rms_mode: u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let rc = &mut unsafe { handle_mut(cache, "cache") }?.cache;
        // SAFETY: caller contract.
        let (a, kr) = unsafe {
            (
                input(latent, latent_count, "latent")?,
                input(k_rope, k_rope_count, "k_rope")?,
            )
        };
        let exact = exact_rms(rms_mode)?;
        let layer = to_usize(layer);
        match position {
            None => c.append_token(rc, seq, layer, a, kr, exact)?,
            Some(position) => c.append_token_at(rc, seq, layer, position, a, kr, exact)?,
        }
        Ok(())
    })
}

fn exact_rms(rms_mode: u32) -> Outcome<bool> {
    match rms_mode {
        m if m == tpla_rms_mode::Exact as u32 => Ok(true),
        m if m == tpla_rms_mode::Sliced as u32 => Ok(false),
        m => Err(Failure::invalid(format!(
            "unknown rms_mode {m} (1 = exact, 2 = sliced)"
        ))),
    }
}

/// As `tpla_context_append_token`, for the token at `position` of the sequence: the way
/// to append to a cache of one sequence shard (`tpla_cache_create_sequence_shard`),
/// whose rank must own the position (`tpla_hybrid_owner_rank`; another shard's position
/// is TPLA_STATUS_MISMATCH, a position that is not the shard's next
/// TPLA_STATUS_INVALID_ARGUMENT). On a cache of every token, `position` must be the
/// sequence's length in `layer`. On error the cache is unchanged.
///
/// Returns as `tpla_context_append_token`.
///
/// # Safety
/// As `tpla_context_append_token`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tpla_context_append_token_at(
    ctx: *const tpla_context,
    cache: *mut tpla_cache,
    seq: u32,
    layer: u32,
    position: u64,
    latent: *const f32,
    latent_count: usize,
    k_rope: *const f32,
    k_rope_count: usize,
    rms_mode: u32,
) -> tpla_status {
    // SAFETY: caller contract.
    unsafe {
        append_token(
            ctx,
            cache,
            seq,
            layer,
            Some(position),
            (latent, latent_count),
            (k_rope, k_rope_count),
            rms_mode,
        )
    }
}

/// Arguments of one decode step (`tpla_context_decode`). Shapes use the rank's heads
/// (`tpla_context_info.heads`) and slice width.
#[repr(C)]
pub struct tpla_decode_args {
    /// sizeof(tpla_decode_args).
    pub struct_size: usize,
    /// The layer to decode.
    pub layer: u32,
    /// A `tpla_query_kind`.
    pub query_kind: u32,
    /// A `tpla_output_kind`.
    pub output_kind: u32,
    /// The sequences of the batch, [batch]; each must hold at least one token.
    pub seq_ids: *const u32,
    pub batch: usize,
    /// TPLA_QUERY_KIND_NOPE: q_nope [batch][heads][d_n]; TPLA_QUERY_KIND_LATENT: absorbed latent
    /// queries [batch][heads][slice_width]; TPLA_QUERY_KIND_JOINED: both parts of each head's
    /// row, [batch][heads][slice_width + d_r] (latent then RoPE, FlashMLA's layout).
    pub queries: *const f32,
    pub queries_count: usize,
    /// RoPE-rotated queries, [batch][heads][d_r]; NULL with count 0 for
    /// TPLA_QUERY_KIND_JOINED.
    pub q_rope: *const f32,
    pub q_rope_count: usize,
    /// TPLA_OUTPUT_KIND_HEADS: [batch][heads][d_v]; TPLA_OUTPUT_KIND_LATENT:
    /// [batch][heads][slice_width].
    pub out: *mut f32,
    pub out_count: usize,
    /// TPLA_OUTPUT_KIND_LATENT: log-sum-exp per head, [batch][heads]. TPLA_OUTPUT_KIND_HEADS:
    /// NULL with lse_count 0.
    pub lse: *mut f32,
    pub lse_count: usize,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_decode_args {
    const NAME: &'static str = "tpla_decode_args";
}

/// One decode step of one layer for a batch of sequences on this rank: absorbs the
/// queries, runs the backend over the rank's cache, and writes the partial head outputs
/// (sum them over ranks with `tpla_all_reduce_in_process` or `tpla_all_reduce_with`) or
/// the latent outputs and log-sum-exps. Host memory; steps on engine-owned device memory
/// and streams are `tpla_device_rank_decode`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (counts, checked against `batch` with overflow-checked
/// products before anything else; unknown kinds, misaligned or overlapping buffers,
/// empty sequence, layer without weights), TPLA_STATUS_OUT_OF_RANGE (layer,
/// unknown sequence id), TPLA_STATUS_MISMATCH (cache of another geometry, group, layer
/// count or transform) or TPLA_STATUS_BACKEND. On error the output contents are
/// unspecified. Uses `ctx` exclusively (one thread at a time); reads `cache`, which may
/// be read by other calls concurrently but not modified.
///
/// # Safety
/// Handles are NULL or live; `args` is NULL or a valid `tpla_decode_args` whose arrays
/// hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_decode(
    ctx: *mut tpla_context,
    cache: *const tpla_cache,
    args: *const tpla_decode_args,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &mut unsafe { handle_mut(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let rc = &unsafe { handle(cache, "cache") }?.cache;
        // SAFETY: caller contract.
        let a = unsafe { versioned(args, "args") }?;
        // The batch size first, with checked arithmetic: every other count is a multiple
        // of it. A batch inconsistent with q_rope_count (or, for joined queries, which
        // carry their RoPE part, with queries_count) is refused before any span or slice
        // is made from it.
        let (p, d) = (c.plan(), c.dims());
        if a.query_kind == tpla_query_kind::Joined as u32 {
            let count = shape_count("args->queries", &[a.batch, p.heads, p.slice_width + d.d_r])?;
            if a.queries_count != count {
                return Err(Failure::invalid(format!(
                    "args->queries holds {} values, a batch of {} sequences of {} joined \
                     heads needs {count} ([batch][heads][slice_width + d_r])",
                    a.queries_count, a.batch, p.heads
                )));
            }
        } else {
            let rope_count = shape_count("args->q_rope", &[a.batch, p.heads, d.d_r])?;
            if a.q_rope_count != rope_count {
                return Err(Failure::invalid(format!(
                    "args->q_rope holds {} values, a batch of {} sequences of {} heads needs \
                     {rope_count} ([batch][heads][d_r])",
                    a.q_rope_count, a.batch, p.heads
                )));
            }
        }
        check_disjoint(
            &[
                span(a.out, a.out_count, "args->out"),
                span(a.lse, a.lse_count, "args->lse"),
            ],
            &[
                span(a.seq_ids, a.batch, "args->seq_ids"),
                span(a.queries, a.queries_count, "args->queries"),
                span(a.q_rope, a.q_rope_count, "args->q_rope"),
            ],
        )?;
        // SAFETY: caller contract; outputs checked disjoint from every other buffer.
        let (seqs, q, q_rope, out, lse) = unsafe {
            (
                input(a.seq_ids, a.batch, "args->seq_ids")?,
                input(a.queries, a.queries_count, "args->queries")?,
                input(a.q_rope, a.q_rope_count, "args->q_rope")?,
                output(a.out, a.out_count, "args->out")?,
                output(a.lse, a.lse_count, "args->lse")?,
            )
        };
        let queries = queries_of(a.query_kind, q, q_rope)?;
        let outputs = match a.output_kind {
            k if k == tpla_output_kind::Heads as u32 => {
                if !lse.is_empty() {
                    return Err(Failure::invalid(
                        "lse must be NULL with lse_count 0 for TPLA_OUTPUT_KIND_HEADS",
                    ));
                }
                Outputs::Heads(out)
            }
            k if k == tpla_output_kind::Latent as u32 => Outputs::Latent { out, lse },
            k => {
                return Err(Failure::invalid(format!(
                    "unknown output_kind {k} (1 = heads, 2 = latent)"
                )))
            }
        };
        Ok(c.decode(rc, to_usize(a.layer), seqs, queries, outputs)?)
    })
}

/// The queries of a step from a `tpla_query_kind` and its two arrays.
pub(super) fn queries_of<'a>(kind: u32, q: &'a [f32], q_rope: &'a [f32]) -> Outcome<Queries<'a>> {
    Ok(match kind {
        k if k == tpla_query_kind::Nope as u32 => Queries::Nope { q_nope: q, q_rope },
        k if k == tpla_query_kind::Latent as u32 => Queries::Latent { q_lat: q, q_rope },
        k if k == tpla_query_kind::Joined as u32 && q_rope.is_empty() => Queries::Joined(q),
        k if k == tpla_query_kind::Joined as u32 => {
            return Err(Failure::invalid(
                "q_rope must be NULL with q_rope_count 0 for TPLA_QUERY_KIND_JOINED",
            ))
        }
        k => {
            return Err(Failure::invalid(format!(
                "unknown query_kind {k} (1 = nope, 2 = latent, 3 = joined)"
            )))
        }
    })
}

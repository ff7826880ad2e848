//! Decode and append on the engine's own paged memory (`tpla::engine`): the engine
//! passes its cache, block table and lengths on every call; the context holds only
//! weights and reusable buffers.

use super::cache::tpla_cache;
use super::context::{tpla_context, tpla_output_kind, tpla_query_kind, tpla_rms_mode};
use super::{
    check_disjoint, guard, handle, handle_mut, input, output, span, to_usize, tpla_status,
    versioned, write_out, Failure, Outcome, Span, Versioned,
};
use crate::decode::{Outputs, Queries};
use crate::dtype::DType;
use crate::engine::{
    BlockTable, Faults, PagedCache, PagedCacheMut, PagedLayout, PagedStep, RmsMode,
};
use half::bf16;
use std::ffi::c_void;

/// Bits of the fault word the paged calls OR into `*faults`: problems met while reading
/// or writing engine memory. The call still returns TPLA_STATUS_OK; the entries
/// concerned hold NaN (decode) or were not written (append).
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_fault {
    /// A block table entry outside 0..pages, or a length needing more pages than the
    /// table's width: that batch entry's outputs (and log-sum-exps) are NaN.
    BadPage = 1,
    /// A slot at or past pages * page_size: that token was skipped.
    BadSlot = 2,
    /// GPU appends: a non-finite input, or a value beyond the cache's element type (the
    /// CPU refuses those at the call): that token was skipped.
    BadValue = 4,
    /// GPU decodes: the workspace's plan was not made for this batch, shape and block
    /// table width (the CPU refuses such a plan at the call): every entry is NaN.
    BadPlan = 8,
}

/// The engine's paged cache of one layer. Page p starts at base + p * page_stride bytes
/// and holds page_size rows back to back; a row is row_width values: the rank's latent
/// slice (slice_width values, rotated and normalised), then the RoPE key (d_r values),
/// stored as dtype (little-endian; row_width * sizeof(element) bytes, or for
/// TPLA_DTYPE_FP8_E4M3 the row of `tpla_dtype`: codes, block scales, bf16 key). Token t
/// of a sequence is row t % page_size of the page its block table names at t /
/// page_size; slot s is row s % page_size of page s / page_size. With tpla_context_*
/// calls base is host memory; a GPU rank takes the same description with a device
/// address.
#[repr(C)]
pub struct tpla_paged_cache {
    /// sizeof(tpla_paged_cache).
    pub struct_size: usize,
    /// A `tpla_dtype`.
    pub dtype: u32,
    /// Values per row: slice_width + d_r of the rank (tpla_context_info.row_width).
    pub row_width: u32,
    /// Rows per page (1 to 65536).
    pub page_size: u32,
    /// Bytes from one page to the next: at least page_size * row_bytes, a multiple of
    /// the element size (4 for TPLA_DTYPE_FP8_E4M3, whose rows must be a multiple of 4
    /// bytes).
    pub page_stride: usize,
    /// Pages of the pool (1 to INT32_MAX); block table entries and slots index them.
    pub pages: usize,
    /// Page 0, aligned like page_stride; (pages - 1) * page_stride + page_size *
    /// row_bytes bytes must be readable (and writable for appends).
    pub base: *mut c_void,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_paged_cache {
    const NAME: &'static str = "tpla_paged_cache";
}

/// The described layout of a rank whose RoPE keys are `rope_width` values, and the
/// bytes it spans (for overlap checks).
///
/// # Safety
/// `desc` is NULL or a valid `tpla_paged_cache`.
pub(super) unsafe fn layout<'a>(
    desc: *const tpla_paged_cache,
    rope_width: usize,
) -> Outcome<(PagedLayout, &'a tpla_paged_cache, Span)> {
    // SAFETY: caller contract.
    let d = unsafe { versioned(desc, "cache") }?;
    if d.base.is_null() {
        return Err(Failure::null("cache->base"));
    }
    let layout = PagedLayout {
        dtype: DType::from_code(d.dtype)?,
        row_width: to_usize(d.row_width),
        rope_width,
        page_size: to_usize(d.page_size),
        page_stride: d.page_stride,
        pages: d.pages,
    };
    let extent = layout.extent()?;
    Ok((layout, d, span(d.base as *const u8, extent, "cache memory")))
}

/// ORs `faults` into `*out` when `out` is not NULL.
///
/// # Safety
/// `out` is NULL or valid for reading and writing a `u32`.
unsafe fn report(out: *mut u32, faults: Faults) -> Outcome {
    if out.is_null() {
        return Ok(());
    }
    super::check_aligned(out, "faults")?;
    // SAFETY: non-NULL, aligned, readable and writable by contract.
    unsafe { out.write(out.read() | faults.bits()) };
    Ok(())
}

/// Sizes the query rows, outputs and the backend's work buffers for steps of up to
/// `max_batch` sequences now, so that tpla_context_decode_paged (and
/// tpla_context_decode) allocates nothing from the second step on (on the first, the
/// backend's worker threads finish starting). Optional; without it the buffers grow on
/// first use.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (a batch too large
/// to address) or TPLA_STATUS_OUT_OF_CAPACITY (the memory cannot be had). Not
/// thread-safe for `ctx`.
///
/// # Safety
/// `ctx` is NULL or a live context not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_reserve(
    ctx: *mut tpla_context,
    max_batch: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &mut unsafe { handle_mut(ctx, "ctx") }?.ctx;
        Ok(c.reserve(max_batch)?)
    })
}

/// Writes to `*words` the int32 words of the decode plan of a step of `batch` sequences
/// (fixed by the batch size and the context's backend, not by the lengths: allocate the
/// plan once for the largest batch).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT. Reads `ctx` only.
///
/// # Safety
/// `ctx` is NULL or a live context; `words` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_decode_plan_size(
    ctx: *const tpla_context,
    batch: usize,
    words: *mut usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        unsafe { write_out(words, c.decode_plan_len(batch), "words") }
    })
}

/// Computes the split-KV schedule of one step over `batch` sequences of `seq_lens`
/// tokens (each at least 0) into the caller's `plan` (plan_count int32 words, at least
/// tpla_context_decode_plan_size): the work of mixed lengths balanced over the backend's
/// threads. Plan once per step; every layer's tpla_context_decode_paged of the step
/// reuses it. A decode with other lengths refuses the plan.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (negative length,
/// plan too small, overlapping buffers). Reads `ctx` only.
///
/// # Safety
/// `ctx` is NULL or a live context; arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_decode_plan(
    ctx: *const tpla_context,
    seq_lens: *const i32,
    batch: usize,
    plan: *mut i32,
    plan_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        check_disjoint(
            &[span(plan, plan_count, "plan")],
            &[span(seq_lens, batch, "seq_lens")],
        )?;
        // SAFETY: caller contract; checked disjoint.
        let (lens, plan) = unsafe {
            (
                input(seq_lens, batch, "seq_lens")?,
                output(plan, plan_count, "plan")?,
            )
        };
        Ok(c.decode_plan(lens, plan)?)
    })
}

/// Arguments of `tpla_context_decode_paged`. Shapes use the rank's heads and slice width
/// (tpla_context_info).
#[repr(C)]
pub struct tpla_paged_decode_args {
    /// sizeof(tpla_paged_decode_args).
    pub struct_size: usize,
    /// The layer to decode.
    pub layer: u32,
    /// A `tpla_query_kind`.
    pub query_kind: u32,
    /// A `tpla_output_kind`.
    pub output_kind: u32,
    /// The element type of `out`: TPLA_DTYPE_F32 or TPLA_DTYPE_BF16 (log-sum-exps are
    /// always float).
    pub output_dtype: u32,
    /// The layer's cache.
    pub cache: *const tpla_paged_cache,
    /// Page indices, [batch][block_table_width] int32: row b names the pages of batch
    /// entry b in token order. Entries past a sequence's pages are not read.
    pub block_table: *const i32,
    pub batch: usize,
    pub block_table_width: usize,
    /// Tokens of each batch entry, [batch], at least 0 (0: the entry's outputs are zero
    /// and its log-sum-exps -infinity, as for padding).
    pub seq_lens: *const i32,
    /// The plan tpla_context_decode_plan wrote for these lengths.
    pub plan: *const i32,
    pub plan_count: usize,
    /// As `tpla_decode_args.queries`; TPLA_QUERY_KIND_JOINED: [batch][heads][row_width].
    pub queries: *const f32,
    pub queries_count: usize,
    /// RoPE-rotated queries [batch][heads][d_r]; NULL with count 0 for
    /// TPLA_QUERY_KIND_JOINED.
    pub q_rope: *const f32,
    pub q_rope_count: usize,
    /// TPLA_OUTPUT_KIND_HEADS: [batch][heads][d_v]; TPLA_OUTPUT_KIND_LATENT:
    /// [batch][heads][slice_width]; elements of `output_dtype` (bf16 as uint16_t bits).
    pub out: *mut c_void,
    pub out_count: usize,
    /// TPLA_OUTPUT_KIND_LATENT: [batch][heads]; TPLA_OUTPUT_KIND_HEADS: NULL with count 0.
    pub lse: *mut f32,
    pub lse_count: usize,
    /// The softmax scale; 0: the model's (tpla_dims.softmax_scale).
    pub softmax_scale: f64,
    /// The slice's logit scale mu; 0: the layer's.
    pub mu: f64,
    /// NULL, or a word the call ORs `tpla_fault` bits into (never clears it: check it
    /// once per step).
    pub faults: *mut u32,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_paged_decode_args {
    const NAME: &'static str = "tpla_paged_decode_args";
}

fn optional(value: f64) -> Option<f64> {
    (value != 0.0).then_some(value)
}

/// One decode step of one layer on the engine's paged cache (host memory): as
/// `tpla_context_decode`, with the rows of batch entry b found through block table row b.
/// Page indices and lengths are checked as rows are read (see `tpla_fault`); everything
/// else at the call. Allocates nothing once the context has reserved (or decoded) a batch
/// this large and run a first step.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (counts, unknown kinds, a bad cache layout, misaligned
/// or overlapping buffers, negative lengths, a plan made for other lengths, a scale that
/// is not finite and positive, layer without weights), TPLA_STATUS_OUT_OF_RANGE (layer)
/// or TPLA_STATUS_MISMATCH (cache rows of another width than the rank's). On error the
/// output contents are unspecified. Uses `ctx` exclusively.
///
/// # Safety
/// `ctx` is NULL or a live context; `args` is NULL or a valid `tpla_paged_decode_args`
/// whose arrays hold their counts and whose cache memory spans its layout.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_decode_paged(
    ctx: *mut tpla_context,
    args: *const tpla_paged_decode_args,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &mut unsafe { handle_mut(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let a = unsafe { versioned(args, "args") }?;
        // SAFETY: caller contract.
        let (layout, desc, cache_span) = unsafe { layout(a.cache, c.dims().d_r) }?;
        let table_count = a
            .batch
            .checked_mul(a.block_table_width)
            .ok_or_else(|| Failure::invalid("the block table's size overflows"))?;
        let out_dtype = DType::from_code(a.output_dtype)?;
        let out_size = match out_dtype {
            DType::F32 => 4,
            DType::Bf16 => 2,
            DType::F16 | DType::Fp8E4m3 => {
                return Err(Failure::invalid(
                    "output_dtype must be TPLA_DTYPE_F32 or TPLA_DTYPE_BF16",
                ))
            }
        };
        check_disjoint(
            &[
                (
                    a.out as usize,
                    (a.out as usize).saturating_add(a.out_count.saturating_mul(out_size)),
                    "args->out",
                ),
                span(a.lse, a.lse_count, "args->lse"),
            ],
            &[
                cache_span,
                span(a.block_table, table_count, "args->block_table"),
                span(a.seq_lens, a.batch, "args->seq_lens"),
                span(a.plan, a.plan_count, "args->plan"),
                span(a.queries, a.queries_count, "args->queries"),
                span(a.q_rope, a.q_rope_count, "args->q_rope"),
                span(a.faults, usize::from(!a.faults.is_null()), "args->faults"),
            ],
        )?;
        // SAFETY: caller contract: the cache memory spans its layout's extent.
        let memory = unsafe {
            std::slice::from_raw_parts(desc.base as *const u8, cache_span.1 - cache_span.0)
        };
        // SAFETY: caller contract; outputs checked disjoint from every other buffer.
        let (table, lens, plan, q, q_rope, lse) = unsafe {
            (
                input(a.block_table, table_count, "args->block_table")?,
                input(a.seq_lens, a.batch, "args->seq_lens")?,
                input(a.plan, a.plan_count, "args->plan")?,
                input(a.queries, a.queries_count, "args->queries")?,
                input(a.q_rope, a.q_rope_count, "args->q_rope")?,
                output(a.lse, a.lse_count, "args->lse")?,
            )
        };
        let queries = match a.query_kind {
            k if k == tpla_query_kind::Nope as u32 => Queries::Nope { q_nope: q, q_rope },
            k if k == tpla_query_kind::Latent as u32 => Queries::Latent { q_lat: q, q_rope },
            k if k == tpla_query_kind::Joined as u32 => {
                if !q_rope.is_empty() {
                    return Err(Failure::invalid(
                        "q_rope must be NULL with q_rope_count 0 for TPLA_QUERY_KIND_JOINED",
                    ));
                }
                Queries::Joined(q)
            }
            k => {
                return Err(Failure::invalid(format!(
                    "unknown query_kind {k} (1 = nope, 2 = latent, 3 = joined)"
                )))
            }
        };
        let heads = a.output_kind == tpla_output_kind::Heads as u32;
        if !heads && a.output_kind != tpla_output_kind::Latent as u32 {
            return Err(Failure::invalid(format!(
                "unknown output_kind {} (1 = heads, 2 = latent)",
                a.output_kind
            )));
        }
        if heads && !lse.is_empty() {
            return Err(Failure::invalid(
                "lse must be NULL with lse_count 0 for TPLA_OUTPUT_KIND_HEADS",
            ));
        }
        // SAFETY: caller contract; checked disjoint above.
        let outputs = unsafe {
            match (heads, out_dtype) {
                (true, DType::F32) => {
                    Outputs::Heads(output(a.out.cast::<f32>(), a.out_count, "args->out")?)
                }
                (true, _) => {
                    Outputs::HeadsBf16(output(a.out.cast::<bf16>(), a.out_count, "args->out")?)
                }
                (false, DType::F32) => Outputs::Latent {
                    out: output(a.out.cast::<f32>(), a.out_count, "args->out")?,
                    lse,
                },
                (false, _) => Outputs::LatentBf16 {
                    out: output(a.out.cast::<bf16>(), a.out_count, "args->out")?,
                    lse,
                },
            }
        };
        let step = PagedStep {
            cache: PagedCache::new(layout, memory)?,
            block_table: BlockTable::new(table, a.batch, a.block_table_width)?,
            seq_lens: lens,
            plan,
            softmax_scale: optional(a.softmax_scale),
            mu: optional(a.mu),
        };
        let faults = c.decode_paged(to_usize(a.layer), &step, queries, outputs)?;
        // SAFETY: caller contract.
        unsafe { report(a.faults, faults) }
    })
}

/// Decodes a `tpla_rms_mode`.
pub(super) fn rms_mode(mode: u32) -> Outcome<RmsMode> {
    match mode {
        m if m == tpla_rms_mode::Exact as u32 => Ok(RmsMode::Exact),
        m if m == tpla_rms_mode::Sliced as u32 => Ok(RmsMode::Sliced),
        m => Err(Failure::invalid(format!(
            "unknown rms_mode {m} (1 = exact, 2 = sliced)"
        ))),
    }
}

/// Writes `count` new tokens into the engine's paged cache of `layer`: token i has the
/// full pre-norm latent latents[i] ([count][d_c]) and the RoPE-rotated key k_rope[i]
/// ([count][d_r]); it is normalised (`rms_mode`, a `tpla_rms_mode`), rotated by the
/// layer's transform, cut to the rank's slice, rounded to the cache's dtype and stored at
/// slot slots[i] (page * page_size + offset). Decode-time tokens and whole prompts alike.
/// Negative slots are padding and skipped; slots past the pool are skipped and set
/// TPLA_FAULT_BAD_SLOT in `*faults` (when not NULL). Every row is checked before any is
/// written: on error the cache is unchanged.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (counts, a bad cache layout, unknown rms_mode, layer
/// without weights, non-finite or unrepresentable values, overlapping buffers),
/// TPLA_STATUS_OUT_OF_RANGE (layer) or TPLA_STATUS_MISMATCH (row width). Reads `ctx`
/// only; writes the cache memory, which no other call may use meanwhile.
///
/// # Safety
/// `ctx` is NULL or a live context; `cache` is NULL or a valid `tpla_paged_cache` whose
/// memory spans its layout; arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_append_paged(
    ctx: *const tpla_context,
    layer: u32,
    cache: *const tpla_paged_cache,
    slots: *const i32,
    count: usize,
    latents: *const f32,
    latents_count: usize,
    k_rope: *const f32,
    k_rope_count: usize,
    rms_mode_value: u32,
    faults: *mut u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let (layout, desc, cache_span) = unsafe { layout(cache, c.dims().d_r) }?;
        check_disjoint(
            &[
                cache_span,
                span(faults, usize::from(!faults.is_null()), "faults"),
            ],
            &[
                span(slots, count, "slots"),
                span(latents, latents_count, "latents"),
                span(k_rope, k_rope_count, "k_rope"),
            ],
        )?;
        // SAFETY: caller contract.
        let (slots, a, kr) = unsafe {
            (
                input(slots, count, "slots")?,
                input(latents, latents_count, "latents")?,
                input(k_rope, k_rope_count, "k_rope")?,
            )
        };
        let mode = rms_mode(rms_mode_value)?;
        // SAFETY: caller contract: the memory spans the layout and is not used elsewhere
        // during the call; checked disjoint from the inputs.
        let memory = unsafe {
            std::slice::from_raw_parts_mut(desc.base.cast::<u8>(), cache_span.1 - cache_span.0)
        };
        let mut paged = PagedCacheMut::new(layout, memory)?;
        let found = c.append_paged(to_usize(layer), &mut paged, slots, a, kr, mode)?;
        // SAFETY: caller contract.
        unsafe { report(faults, found) }
    })
}

/// Copies the cached rows of sequence `seq` in `layer` of `source` (for example a
/// prefill's shard file registered with tpla_cache_register_file, read in place) into
/// the engine's paged cache: row t to slot slots[t], `count` equal to the sequence's
/// length in that layer, byte for byte (both caches hold the same dtype). Negative slots
/// are skipped; slots past the pool set TPLA_FAULT_BAD_SLOT in `*faults`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (count, a bad cache layout, overlapping buffers),
/// TPLA_STATUS_OUT_OF_RANGE (unknown seq, layer) or TPLA_STATUS_MISMATCH (the source of
/// another geometry, group, transform or dtype; row width). Reads `ctx` and `source`.
///
/// # Safety
/// Handles are NULL or live; `cache` is NULL or a valid `tpla_paged_cache` whose memory
/// spans its layout; `slots` holds `count` values.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_import_sequence(
    ctx: *const tpla_context,
    source: *const tpla_cache,
    seq: u32,
    layer: u32,
    cache: *const tpla_paged_cache,
    slots: *const i32,
    count: usize,
    faults: *mut u32,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &unsafe { handle(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let src = &unsafe { handle(source, "source") }?.cache;
        // SAFETY: caller contract.
        let (layout, desc, cache_span) = unsafe { layout(cache, c.dims().d_r) }?;
        check_disjoint(
            &[
                cache_span,
                span(faults, usize::from(!faults.is_null()), "faults"),
            ],
            &[span(slots, count, "slots")],
        )?;
        // SAFETY: caller contract.
        let slots = unsafe { input(slots, count, "slots") }?;
        // SAFETY: caller contract, as in tpla_context_append_paged.
        let memory = unsafe {
            std::slice::from_raw_parts_mut(desc.base.cast::<u8>(), cache_span.1 - cache_span.0)
        };
        let mut paged = PagedCacheMut::new(layout, memory)?;
        let found = c.import_sequence(src, seq, to_usize(layer), &mut paged, slots)?;
        // SAFETY: caller contract.
        unsafe { report(faults, found) }
    })
}

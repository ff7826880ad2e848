//! Sequence shards and hybrid plans (DESIGN 3.6): which rank holds a token, the decode of
//! a sequence shard, and the two merges of its partial outputs (`combine::sequence`).

use super::cache::tpla_cache;
use super::combine::tpla_all_reduce_fn;
use super::context::{queries_of, tpla_context, tpla_dims, tpla_output_kind, tpla_plan};
use super::{
    check_disjoint, guard, handle, handle_mut, input, output, span, to_usize, tpla_status,
    versioned, versioned_out, write_out, Failure, Outcome, Versioned,
};
use crate::combine::all_reduce_with;
use crate::combine::sequence::{
    merge_by_lse_in_process, merge_packed_in_process, pack_against_bound, packed_row_len,
    rescale_by_gathered_lse, unpack_merged,
};
use crate::decode::{shape_count, LogitBounds, Outputs};
use crate::error::{Error, ErrorKind};
use crate::geometry::{HybridPlan, SequenceSharding};
use crate::DType;
use std::ffi::c_void;

/// How a sequence's tokens are spread over sequence shards: positions are cut into
/// blocks of `interleave` tokens and block k lives on shard `k % shards` (`interleave` 1
/// is token t on shard `t mod shards`). `shards` 1 is no sequence sharding. Shards lie in
/// 1..=64, the interleave in 1..=2^20. A plain value, fixed for this ABI version.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tpla_sequence_sharding {
    pub shards: u32,
    pub interleave: u32,
}

impl tpla_sequence_sharding {
    pub(super) fn to_rust(self) -> Outcome<SequenceSharding> {
        Ok(SequenceSharding::new(
            to_usize(self.shards),
            to_usize(self.interleave),
        )?)
    }
}

/// One rank of a hybrid deployment of `groups` latent groups (1, 2, 4, 8) times
/// `sharding.shards` sequence shards: rank `(i, j)`, numbered `rank = i * shards + j`,
/// holds latent slice i (with every head) of the tokens whose block falls on sequence
/// shard j. `groups` 1 is exact sequence-sharded MLA; `shards` 1 is TPLA. A plain value,
/// fixed for this ABI version.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tpla_hybrid_plan {
    pub groups: u32,
    pub sharding: tpla_sequence_sharding,
    pub rank: u32,
}

impl tpla_hybrid_plan {
    fn to_rust(self, dims: tpla_dims) -> Outcome<HybridPlan> {
        let dims = dims.to_rust()?;
        Ok(HybridPlan::new(
            &dims,
            to_usize(self.groups),
            self.sharding.to_rust()?,
            to_usize(self.rank),
        )?)
    }
}

/// What a hybrid plan makes of a rank (`tpla_hybrid_plan_info`).
#[repr(C)]
pub struct tpla_hybrid_info {
    /// sizeof(tpla_hybrid_info).
    pub struct_size: usize,
    /// Ranks of the deployment: groups * shards.
    pub ranks: u32,
    /// The rank's latent group i and sequence shard j.
    pub group: u32,
    pub shard: u32,
    /// Latent columns the rank caches per token (d_c / groups).
    pub slice_width: u32,
    /// The plan to create this rank's context with (`tpla_context_options.plan`): rank
    /// `group` of `groups` latent groups, every head.
    pub context_plan: tpla_plan,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_hybrid_info {
    const NAME: &'static str = "tpla_hybrid_info";
}

/// Checks a sequence sharding: TPLA_STATUS_OK, or TPLA_STATUS_INVALID_ARGUMENT with the
/// reason. Thread-safe.
#[no_mangle]
pub extern "C" fn tpla_sequence_sharding_validate(sharding: tpla_sequence_sharding) -> tpla_status {
    guard(|| sharding.to_rust().map(|_| ()))
}

/// Writes to `*shard` the sequence shard that holds the token at `position` (the shard
/// whose rank appends a decode-time token).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (sharding).
/// Thread-safe.
///
/// # Safety
/// `shard` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_owner(
    sharding: tpla_sequence_sharding,
    position: u64,
    shard: *mut u32,
) -> tpla_status {
    guard(|| {
        let s = sharding.to_rust()?;
        // below `shards`, at most 64
        // SAFETY: caller contract.
        unsafe { write_out(shard, s.owner(position) as u32, "shard") }
    })
}

/// Writes to `*tokens` how many of the first `len` tokens of a sequence shard `shard`
/// holds, and to `*local` (may be NULL) the row the token at `position` takes on its
/// own shard.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (sharding) or
/// TPLA_STATUS_OUT_OF_RANGE (shard). Thread-safe.
///
/// # Safety
/// `tokens` is NULL or writable; `local` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_tokens_on(
    sharding: tpla_sequence_sharding,
    shard: u32,
    len: u64,
    position: u64,
    tokens: *mut u64,
    local: *mut u64,
) -> tpla_status {
    guard(|| {
        let s = sharding.to_rust()?;
        let n = s.tokens_on(to_usize(shard), len)?;
        if !local.is_null() {
            // SAFETY: caller contract.
            unsafe { write_out(local, s.local_index(position), "local") }?;
        }
        // SAFETY: caller contract.
        unsafe { write_out(tokens, n, "tokens") }
    })
}

/// Checks a hybrid plan against `dims` and fills `*info` (whose `struct_size` the caller
/// sets).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (dims, groups, sharding) or TPLA_STATUS_OUT_OF_RANGE
/// (rank). Thread-safe.
///
/// # Safety
/// `info` is NULL or a writable `tpla_hybrid_info`.
#[no_mangle]
pub unsafe extern "C" fn tpla_hybrid_plan_info(
    dims: tpla_dims,
    plan: tpla_hybrid_plan,
    info: *mut tpla_hybrid_info,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let out = unsafe { versioned_out(info, "info") }?;
        let p = plan.to_rust(dims)?;
        // every count is at most 8 * 64 ranks or a width of at most 65536
        out.ranks = p.ranks() as u32;
        out.group = p.latent.group as u32;
        out.shard = p.shard as u32;
        out.slice_width = p.latent.slice_width as u32;
        out.context_plan = tpla_plan {
            ranks: plan.groups,
            groups: plan.groups,
            rank: out.group,
        };
        Ok(())
    })
}

/// Writes to `*rank` the rank of a deployment (described by `plan`, any of its ranks)
/// that holds latent group `group` of the token at `position`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (dims, plan) or
/// TPLA_STATUS_OUT_OF_RANGE (rank of the plan, group). Thread-safe.
///
/// # Safety
/// `rank` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_hybrid_owner_rank(
    dims: tpla_dims,
    plan: tpla_hybrid_plan,
    group: u32,
    position: u64,
    rank: *mut u32,
) -> tpla_status {
    guard(|| {
        let p = plan.to_rust(dims)?;
        let r = p.owner_rank(to_usize(group), position)?;
        // below groups * shards, at most 512
        // SAFETY: caller contract.
        unsafe { write_out(rank, r as u32, "rank") }
    })
}

/// Writes to `*bytes` the cached bytes per token of context on a rank of `plan` with
/// elements of `dtype` (a `tpla_dtype`): `(d_c / groups + d_r) * sizeof(dtype) / shards`
/// (TPLA_DTYPE_FP8_E4M3: the FP8 row of `tpla_dtype`), averaged over a long sequence.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (dims, plan, dtype) or
/// TPLA_STATUS_OUT_OF_RANGE (rank). Thread-safe.
///
/// # Safety
/// `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_hybrid_bytes_per_token(
    dims: tpla_dims,
    plan: tpla_hybrid_plan,
    dtype: u32,
    bytes: *mut f64,
) -> tpla_status {
    guard(|| {
        let d = dims.to_rust()?;
        let p = plan.to_rust(dims)?;
        let t = DType::from_code(dtype)?;
        // SAFETY: caller contract.
        unsafe { write_out(bytes, p.bytes_per_token(&d, t), "bytes") }
    })
}

// ---- decode of a sequence shard -------------------------------------------------------------

/// Arguments of one decode step of a sequence shard (`tpla_context_decode_sequence_shard`).
/// As `tpla_decode_args`, with the log-sum-exps always written and the logit bounds of
/// merge (b) optionally.
#[repr(C)]
pub struct tpla_shard_decode_args {
    /// sizeof(tpla_shard_decode_args).
    pub struct_size: usize,
    pub layer: u32,
    /// A `tpla_query_kind`.
    pub query_kind: u32,
    /// TPLA_OUTPUT_KIND_HEADS: head outputs [batch][heads][d_v], normalised over this
    /// shard's tokens; TPLA_OUTPUT_KIND_LATENT: latent outputs [batch][heads][slice_width].
    pub output_kind: u32,
    /// The sequences of the batch, [batch]; a sequence may hold no token on this shard
    /// (its outputs are then zeros and its log-sum-exps -inf).
    pub seq_ids: *const u32,
    pub batch: usize,
    /// As in `tpla_decode_args`.
    pub queries: *const f32,
    pub queries_count: usize,
    /// [batch][heads][d_r]; NULL with count 0 for TPLA_QUERY_KIND_JOINED.
    pub q_rope: *const f32,
    pub q_rope_count: usize,
    pub out: *mut f32,
    pub out_count: usize,
    /// Log-sum-exp of each head's scores over this shard's tokens, [batch][heads].
    pub lse: *mut f32,
    pub lse_count: usize,
    /// Logit bounds for merge (b), [batch][heads] (equal on every shard of a latent
    /// group), or NULL with count 0 when not wanted.
    pub bounds: *mut f64,
    pub bounds_count: usize,
    /// With `bounds`: a bound of |k_rope| over every token of the batch's sequences, the
    /// same on every rank (finite, not negative).
    pub rope_key_norm: f64,
}

// SAFETY: repr(C), first field `struct_size: usize`.
unsafe impl Versioned for tpla_shard_decode_args {
    const NAME: &'static str = "tpla_shard_decode_args";
}

/// One decode step of one layer on a sequence shard: `cache` holds this rank's tokens
/// of each sequence only (the owner rule of its `tpla_hybrid_plan`); writes the partial
/// outputs, their log-sum-exps and optionally the logit bounds, for
/// `tpla_sequence_merge_*`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE,
/// TPLA_STATUS_INVALID_ARGUMENT (counts, kinds, buffers, bound), TPLA_STATUS_OUT_OF_RANGE
/// (layer, unknown sequence id), TPLA_STATUS_MISMATCH or TPLA_STATUS_BACKEND. Uses `ctx`
/// exclusively; reads `cache`.
///
/// # Safety
/// Handles are NULL or live; `args` is NULL or a valid `tpla_shard_decode_args` whose
/// arrays hold their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_context_decode_sequence_shard(
    ctx: *mut tpla_context,
    cache: *const tpla_cache,
    args: *const tpla_shard_decode_args,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let c = &mut unsafe { handle_mut(ctx, "ctx") }?.ctx;
        // SAFETY: caller contract.
        let rc = &unsafe { handle(cache, "cache") }?.cache;
        // SAFETY: caller contract.
        let a = unsafe { versioned(args, "args") }?;
        let (p, d) = (c.plan(), c.dims());
        let rope_count = shape_count("args->q_rope", &[a.batch, p.heads, d.d_r])?;
        if a.q_rope_count != rope_count && a.q_rope_count != 0 {
            return Err(Failure::invalid(format!(
                "args->q_rope holds {} values, a batch of {} sequences of {} heads needs \
                 {rope_count} ([batch][heads][d_r])",
                a.q_rope_count, a.batch, p.heads
            )));
        }
        check_disjoint(
            &[
                span(a.out, a.out_count, "args->out"),
                span(a.lse, a.lse_count, "args->lse"),
                span(a.bounds, a.bounds_count, "args->bounds"),
            ],
            &[
                span(a.seq_ids, a.batch, "args->seq_ids"),
                span(a.queries, a.queries_count, "args->queries"),
                span(a.q_rope, a.q_rope_count, "args->q_rope"),
            ],
        )?;
        // SAFETY: caller contract; outputs checked disjoint from every other buffer.
        let (seqs, q, q_rope, out, lse, bounds) = unsafe {
            (
                input(a.seq_ids, a.batch, "args->seq_ids")?,
                input(a.queries, a.queries_count, "args->queries")?,
                input(a.q_rope, a.q_rope_count, "args->q_rope")?,
                output(a.out, a.out_count, "args->out")?,
                output(a.lse, a.lse_count, "args->lse")?,
                output(a.bounds, a.bounds_count, "args->bounds")?,
            )
        };
        let queries = queries_of(a.query_kind, q, q_rope)?;
        let outputs = match a.output_kind {
            k if k == tpla_output_kind::Heads as u32 => Outputs::HeadsAndLse { out, lse },
            k if k == tpla_output_kind::Latent as u32 => Outputs::Latent { out, lse },
            k => {
                return Err(Failure::invalid(format!(
                    "unknown output_kind {k} (1 = heads, 2 = latent)"
                )))
            }
        };
        let bounds = (!a.bounds.is_null()).then_some(LogitBounds {
            rope_key_norm: a.rope_key_norm,
            out: bounds,
        });
        Ok(c.decode_sequence_shard(rc, to_usize(a.layer), seqs, queries, outputs, bounds)?)
    })
}

// ---- merges -------------------------------------------------------------------------------------

/// Reads `ranks` pointers to `count` elements each: outputs (checked disjoint) or inputs.
///
/// # Safety
/// `ptrs` is NULL or holds `ranks` pointers, each NULL or valid for `count` elements.
unsafe fn rank_outputs<'a>(
    ptrs: *const *mut f32,
    ranks: usize,
    count: usize,
    inputs: &[super::Span],
) -> Outcome<Vec<&'a mut [f32]>> {
    // SAFETY: caller contract.
    let ptrs = unsafe { input(ptrs, ranks, "outs") }?;
    let spans: Vec<_> = ptrs
        .iter()
        .map(|&p| span(p, count, "a rank's outputs"))
        .collect();
    check_disjoint(&spans, inputs)?;
    ptrs.iter()
        // SAFETY: caller contract; disjoint (checked above).
        .map(|&p| unsafe { output(p, count, "a rank's outputs") })
        .collect()
}

/// # Safety
/// As [`rank_outputs`], for reading.
unsafe fn rank_inputs<'a, T>(
    ptrs: *const *const T,
    ranks: usize,
    count: usize,
    what: &'static str,
) -> Outcome<(Vec<&'a [T]>, Vec<super::Span>)> {
    // SAFETY: caller contract.
    let ptrs = unsafe { input(ptrs, ranks, what) }?;
    let spans = ptrs.iter().map(|&p| span(p, count, what)).collect();
    let views = ptrs
        .iter()
        // SAFETY: caller contract.
        .map(|&p| unsafe { input(p, count, what) })
        .collect::<Outcome<Vec<_>>>()?;
    Ok((views, spans))
}

/// Merge (a) over every rank of a deployment living in one process: `outs[r]` holds rank
/// r's outputs [rows][width] (rows = batch * heads; width d_v for head outputs),
/// `lses[r]` its log-sum-exps [rows], ranks numbered `group * shards + shard`. Afterwards
/// every `outs[r]` holds the exact merge over the shards, summed over the latent groups
/// (bit-identical on every rank).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (ranks not a
/// multiple of shards, counts, overlapping buffers). Thread-safe for disjoint buffers.
///
/// # Safety
/// `outs` is NULL or holds `ranks` pointers writable for `rows * width` floats; `lses`
/// is NULL or holds `ranks` pointers readable for `rows` floats.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_merge_lse_in_process(
    shards: usize,
    ranks: usize,
    rows: usize,
    width: usize,
    outs: *const *mut f32,
    lses: *const *const f32,
) -> tpla_status {
    guard(|| {
        let count = shape_count("outs", &[rows, width])?;
        // SAFETY: caller contract.
        let (lv, ls) = unsafe { rank_inputs(lses, ranks, rows, "lses") }?;
        // SAFETY: caller contract.
        let mut ov = unsafe { rank_outputs(outs, ranks, count, &ls) }?;
        Ok(merge_by_lse_in_process(shards, width, &mut ov, &lv)?)
    })
}

/// Merge (b) over every rank of a deployment living in one process: as
/// `tpla_sequence_merge_lse_in_process`, with `bounds[r]` the logit bounds [rows] rank r's
/// decode wrote (equal within a latent group): the shards' numerators and denominators
/// are packed in f64 against the bounds and summed, then the latent groups are summed.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (as above, or a
/// bound that is not finite or not an upper bound of the log-sum-exps). Thread-safe for
/// disjoint buffers.
///
/// # Safety
/// As `tpla_sequence_merge_lse_in_process`; `bounds` is NULL or holds `ranks` pointers
/// readable for `rows` doubles.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_merge_packed_in_process(
    shards: usize,
    ranks: usize,
    rows: usize,
    width: usize,
    outs: *const *mut f32,
    lses: *const *const f32,
    bounds: *const *const f64,
) -> tpla_status {
    guard(|| {
        let count = shape_count("outs", &[rows, width])?;
        // SAFETY: caller contract.
        let (lv, mut spans) = unsafe { rank_inputs(lses, ranks, rows, "lses") }?;
        // SAFETY: caller contract.
        let (bv, bs) = unsafe { rank_inputs(bounds, ranks, rows, "bounds") }?;
        spans.extend(bs);
        // SAFETY: caller contract.
        let mut ov = unsafe { rank_outputs(outs, ranks, count, &spans) }?;
        Ok(merge_packed_in_process(shards, width, &mut ov, &lv, &bv)?)
    })
}

/// The engine's all-gather, called by `tpla_sequence_merge_lse_with`: over the ranks of
/// the calling rank's latent group, in shard order, gather each rank's `count` floats at
/// `send` into `recv` (`shards * count` floats, shard j's at `recv + j * count`); return
/// 0 on success or any other value on failure.
pub type tpla_all_gather_fn = Option<
    unsafe extern "C" fn(send: *const f32, count: usize, recv: *mut f32, user: *mut c_void) -> i32,
>;

/// Merge (a) on one rank through the engine's communicators: gathers the log-sum-exps
/// `lse` [rows] of the rank's latent group with `gather` (into `gathered`, a caller
/// buffer of `shards * rows` floats), rescales this rank's outputs `out` [rows][width]
/// by `e^(lse - L)`, then hands them to `reduce` (the all-reduce of
/// `tpla_all_reduce_with`, over every rank of the deployment), each called once with
/// `user`. Afterwards `out` holds the merged, group-summed output.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (counts, overlapping
/// buffers), TPLA_STATUS_OUT_OF_RANGE (shard not below shards) or TPLA_STATUS_BACKEND (a
/// callback returned nonzero; `out` is then unspecified). Thread-safety is the
/// callbacks'.
///
/// # Safety
/// `out` is NULL or writable for `rows * width` floats, `lse` readable for `rows`,
/// `gathered` writable for `shards * rows`; the callbacks are valid functions.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tpla_sequence_merge_lse_with(
    shard: usize,
    shards: usize,
    rows: usize,
    width: usize,
    out: *mut f32,
    lse: *const f32,
    gathered: *mut f32,
    gather: tpla_all_gather_fn,
    reduce: tpla_all_reduce_fn,
    user: *mut c_void,
) -> tpla_status {
    guard(|| {
        let gather = gather.ok_or_else(|| Failure::null("gather"))?;
        let reduce = reduce.ok_or_else(|| Failure::null("reduce"))?;
        if shards == 0 {
            return Err(Failure::invalid("shards must be at least 1"));
        }
        let count = shape_count("out", &[rows, width])?;
        let g_count = shape_count("gathered", &[shards, rows])?;
        check_disjoint(
            &[span(out, count, "out"), span(gathered, g_count, "gathered")],
            &[span(lse, rows, "lse")],
        )?;
        // SAFETY: caller contract; outputs disjoint from each other and the input.
        let (out, lse, gathered) = unsafe {
            (
                output(out, count, "out")?,
                input(lse, rows, "lse")?,
                output(gathered, g_count, "gathered")?,
            )
        };
        if shard >= shards {
            return Err(Error::out_of_range(format!(
                "sequence shard {shard} is out of range for {shards} shards"
            ))
            .into());
        }
        // SAFETY: the engine's callback, given the buffers it was promised.
        let rc = unsafe { gather(lse.as_ptr(), rows, gathered.as_mut_ptr(), user) };
        if rc != 0 {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("the all-gather callback failed with {rc}"),
            )
            .into());
        }
        let views: Vec<&[f32]> = if rows == 0 {
            vec![&[]; shards]
        } else {
            gathered.chunks_exact(rows).collect()
        };
        rescale_by_gathered_lse(out, width, shard, &views)?;
        Ok(all_reduce_with(out, |b| {
            // SAFETY: the engine's callback, given the buffer it was promised.
            match unsafe { reduce(b.as_mut_ptr(), b.len(), user) } {
                0 => Ok(()),
                rc => Err(Error::new(
                    ErrorKind::Backend,
                    format!("the all-reduce callback failed with {rc}"),
                )),
            }
        })?)
    })
}

/// Doubles per row of merge (b)'s packed buffer for outputs of `width` floats: the
/// numerators, the denominator and a count of the shards holding a token. Thread-safe.
#[no_mangle]
pub extern "C" fn tpla_sequence_packed_row_len(width: usize) -> usize {
    super::guard_value(0, || packed_row_len(width))
}

/// Merge (b) on one rank, first half: packs this rank's outputs `out` [rows][width] and
/// log-sum-exps `lse` [rows] against its logit bounds `bounds` [rows] into `packed`
/// [rows][tpla_sequence_packed_row_len(width)] doubles, which the engine sums over the
/// shards of the rank's latent group (one f64 all-reduce) before
/// `tpla_sequence_unpack`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (counts,
/// overlapping buffers, a bound not finite or not an upper bound). Thread-safe.
///
/// # Safety
/// The arrays are NULL or valid for their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_pack(
    rows: usize,
    width: usize,
    out: *const f32,
    lse: *const f32,
    bounds: *const f64,
    packed: *mut f64,
    packed_count: usize,
) -> tpla_status {
    guard(|| {
        let count = shape_count("out", &[rows, width])?;
        check_disjoint(
            &[span(packed, packed_count, "packed")],
            &[
                span(out, count, "out"),
                span(lse, rows, "lse"),
                span(bounds, rows, "bounds"),
            ],
        )?;
        // SAFETY: caller contract; the output is disjoint from the inputs.
        let (o, l, b, p) = unsafe {
            (
                input(out, count, "out")?,
                input(lse, rows, "lse")?,
                input(bounds, rows, "bounds")?,
                output(packed, packed_count, "packed")?,
            )
        };
        Ok(pack_against_bound(o, l, b, width, p)?)
    })
}

/// Merge (b) on one rank, second half: divides the summed numerators of `packed`
/// [rows][tpla_sequence_packed_row_len(width)] by their denominators into `out`
/// [rows][width]. The latent groups' TPLA sum follows (`tpla_all_reduce_with` over the
/// ranks of one shard index).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (counts, overlap, a
/// row whose every shard lay far below the bound). Thread-safe.
///
/// # Safety
/// The arrays are NULL or valid for their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_sequence_unpack(
    rows: usize,
    width: usize,
    packed: *const f64,
    packed_count: usize,
    out: *mut f32,
) -> tpla_status {
    guard(|| {
        let count = shape_count("out", &[rows, width])?;
        let want = shape_count("packed", &[rows, packed_row_len(width)])?;
        if packed_count != want {
            return Err(Failure::invalid(format!(
                "packed holds {packed_count} doubles, {rows} rows of width {width} need {want}"
            )));
        }
        check_disjoint(
            &[span(out, count, "out")],
            &[span(packed, packed_count, "packed")],
        )?;
        // SAFETY: caller contract; disjoint.
        let (p, o) = unsafe {
            (
                input(packed, packed_count, "packed")?,
                output(out, count, "out")?,
            )
        };
        Ok(unpack_merged(p, width, o)?)
    })
}

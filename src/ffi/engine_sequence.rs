//! The sequence-shard merges on the engine's own device buffers
//! (`tpla::combine::sequence_engine`): this rank's share of merges (a) and (b) between
//! the collectives the engine runs on its own communicators and stream, no host
//! synchronisation (capturable in a CUDA graph).
//!
//! Every function exists in every build; without the `cuda` feature the argument checks
//! run and the call then returns TPLA_STATUS_UNSUPPORTED.

#[cfg(feature = "cuda")]
use super::device::{check_device_buffers, check_device_disjoint, checked_stream};
use super::engine_device::tpla_device_engine;
use super::{check_non_null, guard, handle, tpla_status, Failure, Outcome};
use std::ffi::c_void;

/// Bits of merge (b)'s device error word (`tpla_device_engine_sequence_pack` and
/// `_unpack` OR them in; the engine clears the word): what the host merge refuses.
/// `tpla_sequence_merge_error` turns a word into the host merge's status and message.
#[repr(u32)]
#[derive(Clone, Copy, Debug)]
pub enum tpla_merge_error {
    /// A logit bound was not finite.
    BoundNotFinite = 1,
    /// A log-sum-exp lay more than the packing limit (700) above its logit bound: the
    /// bound was not one.
    LseAboveBound = 2,
    /// The bound lay more than the limit above every shard's log-sum-exp of a row: that
    /// row's outputs are NaN.
    BoundFarAbove = 4,
}

// the kernels' bits
const _: () = {
    use crate::combine::sequence::{
        MERGE_BOUND_FAR_ABOVE, MERGE_BOUND_NOT_FINITE, MERGE_LSE_ABOVE_BOUND,
    };
    assert!(tpla_merge_error::BoundNotFinite as u32 == MERGE_BOUND_NOT_FINITE);
    assert!(tpla_merge_error::LseAboveBound as u32 == MERGE_LSE_ABOVE_BOUND);
    assert!(tpla_merge_error::BoundFarAbove as u32 == MERGE_BOUND_FAR_ABOVE);
};

/// The status (and `tpla_last_error_message`) of a merge (b) error word `bits` read back
/// by the engine: TPLA_STATUS_OK for none, TPLA_STATUS_INVALID_ARGUMENT with the host
/// merge's message otherwise.
#[no_mangle]
pub extern "C" fn tpla_sequence_merge_error(bits: u32) -> tpla_status {
    guard(|| {
        if bits & !0x7 != 0 {
            return Err(Failure::invalid(format!(
                "{bits:#x} holds bits no merge writes (tpla_merge_error: 1, 2, 4)"
            )));
        }
        Ok(crate::combine::sequence::merge_error(bits)?)
    })
}

/// Merge (a), this rank's step between the engine's all-gather and all-reduce, on
/// `stream` (a CUstream, NULL for the default one): `out_dev` ([rows][width] f32, this
/// rank's outputs of tpla_device_engine_decode, rows = batch * heads, or its projected
/// head outputs, width = d_v) times e^(lse_own - L), with `gathered_dev` the log-sum-exps
/// of the `shards` shards of its latent group side by side ([shards][rows] f32, shard j's
/// at row j) and `shard` this rank's. Summing `out_dev` over every rank of the
/// deployment then gives the exact, group-summed output.
///
/// Returns TPLA_STATUS_INVALID_ARGUMENT for a NULL handle or buffer, shard >= shards, no
/// rows or width, or a buffer that is not device memory of the engine's GPU holding its
/// bytes (or an output overlapping an input); TPLA_STATUS_UNSUPPORTED without CUDA.
///
/// # Safety
/// `engine` is NULL or live; the buffers are device memory valid until the stream passes
/// this point; `stream` is NULL or a live stream of the engine's device.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_sequence_rescale(
    engine: *const tpla_device_engine,
    shard: usize,
    shards: usize,
    rows: usize,
    width: usize,
    gathered_dev: *const f32,
    out_dev: *mut f32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (gathered_dev as usize, "gathered_dev"),
            (out_dev as usize, "out_dev"),
        ])?;
        let call = Merge::Rescale {
            shard,
            shards,
            gathered: gathered_dev as u64,
            out: out_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { merge(e, call, rows, width, stream) }
    })
}

/// Merge (b)'s shared logit bounds `bound_dev` ([rows] f64) of the decode's query rows
/// `q_dev` ([rows][row_width] f32, as tpla_device_engine_decode reads them; the same on
/// every shard of a latent group), with `rope_key_norm` (finite, >= 0) a bound of |k_rope|
/// over every token of the batch's sequences. On `stream`.
///
/// Returns as tpla_device_engine_sequence_rescale (and INVALID_ARGUMENT for a
/// `rope_key_norm` that is negative or not finite).
///
/// # Safety
/// As tpla_device_engine_sequence_rescale.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_sequence_bounds(
    engine: *const tpla_device_engine,
    rows: usize,
    rope_key_norm: f64,
    q_dev: *const f32,
    bound_dev: *mut f64,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[(q_dev as usize, "q_dev"), (bound_dev as usize, "bound_dev")])?;
        let call = Merge::Bounds {
            rope_key_norm,
            q: q_dev as u64,
            bound: bound_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { merge(e, call, rows, 1, stream) }
    })
}

/// Merge (b), pack, on `stream`: `packed_dev` ([rows][tpla_sequence_packed_row_len(width)]
/// f64) from this rank's outputs `out_dev` ([rows][width] f32), log-sum-exps `lse_dev`
/// ([rows] f32) and the shared bounds `bound_dev` ([rows] f64); `tpla_merge_error` bits
/// ORed into `*error_dev` (a device uint32_t the engine clears). The engine then sums
/// `packed_dev` over the shards of the rank's latent group (an f64 all-reduce).
///
/// Returns as tpla_device_engine_sequence_rescale.
///
/// # Safety
/// As tpla_device_engine_sequence_rescale.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_sequence_pack(
    engine: *const tpla_device_engine,
    rows: usize,
    width: usize,
    out_dev: *const f32,
    lse_dev: *const f32,
    bound_dev: *const f64,
    packed_dev: *mut f64,
    error_dev: *mut u32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (out_dev as usize, "out_dev"),
            (lse_dev as usize, "lse_dev"),
            (bound_dev as usize, "bound_dev"),
            (packed_dev as usize, "packed_dev"),
            (error_dev as usize, "error_dev"),
        ])?;
        let call = Merge::Pack {
            out: out_dev as u64,
            lse: lse_dev as u64,
            bound: bound_dev as u64,
            packed: packed_dev as u64,
            error: error_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { merge(e, call, rows, width, stream) }
    })
}

/// Merge (b), unpack, on `stream`: the merged outputs `out_dev` ([rows][width] f32) from
/// the packs summed over the group's shards (`packed_dev`); `tpla_merge_error` bits ORed
/// into `*error_dev`. The engine then sums `out_dev` over the latent groups.
///
/// Returns as tpla_device_engine_sequence_rescale.
///
/// # Safety
/// As tpla_device_engine_sequence_rescale.
#[no_mangle]
pub unsafe extern "C" fn tpla_device_engine_sequence_unpack(
    engine: *const tpla_device_engine,
    rows: usize,
    width: usize,
    packed_dev: *const f64,
    out_dev: *mut f32,
    error_dev: *mut u32,
    stream: *mut c_void,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let e = unsafe { handle(engine, "engine") }?;
        check_non_null(&[
            (packed_dev as usize, "packed_dev"),
            (out_dev as usize, "out_dev"),
            (error_dev as usize, "error_dev"),
        ])?;
        let call = Merge::Unpack {
            packed: packed_dev as u64,
            out: out_dev as u64,
            error: error_dev as u64,
        };
        // SAFETY: forwarded caller contract.
        unsafe { merge(e, call, rows, width, stream) }
    })
}

/// One merge step's device buffers.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Merge {
    Rescale {
        shard: usize,
        shards: usize,
        gathered: u64,
        out: u64,
    },
    Bounds {
        rope_key_norm: f64,
        q: u64,
        bound: u64,
    },
    Pack {
        out: u64,
        lse: u64,
        bound: u64,
        packed: u64,
        error: u64,
    },
    Unpack {
        packed: u64,
        out: u64,
        error: u64,
    },
}

/// Checks the buffers against the engine's device and the sizes, then enqueues.
///
/// # Safety
/// As `tpla_device_engine_sequence_rescale`.
#[cfg(feature = "cuda")]
unsafe fn merge(
    e: &tpla_device_engine,
    call: Merge,
    rows: usize,
    width: usize,
    stream: *mut c_void,
) -> Outcome {
    let engine = e.engine();
    let device = engine.backend().device().clone();
    // SAFETY: caller contract.
    let stream = unsafe { checked_stream(&device, stream) }?;
    let f32s = |n: usize| rows.saturating_mul(n).saturating_mul(4);
    let f64s = |n: usize| rows.saturating_mul(n).saturating_mul(8);
    let packed_len = crate::combine::sequence::packed_row_len(width);
    let (inputs, outputs) = match call {
        Merge::Rescale {
            shards,
            gathered,
            out,
            ..
        } => (
            vec![(gathered, f32s(shards), "gathered_dev")],
            vec![(out, f32s(width), "out_dev")],
        ),
        Merge::Bounds { q, bound, .. } => (
            vec![(q, f32s(engine.row_width()), "q_dev")],
            vec![(bound, f64s(1), "bound_dev")],
        ),
        Merge::Pack {
            out,
            lse,
            bound,
            packed,
            error,
        } => (
            vec![
                (out, f32s(width), "out_dev"),
                (lse, f32s(1), "lse_dev"),
                (bound, f64s(1), "bound_dev"),
            ],
            vec![
                (packed, f64s(packed_len), "packed_dev"),
                (error, 4, "error_dev"),
            ],
        ),
        Merge::Unpack { packed, out, error } => (
            vec![(packed, f64s(packed_len), "packed_dev")],
            vec![(out, f32s(width), "out_dev"), (error, 4, "error_dev")],
        ),
    };
    // (the engine refuses empty merges, shards and bounds out of range)
    check_device_buffers(&device, inputs.iter().chain(outputs.iter()))?;
    check_device_disjoint(&outputs, &inputs)?;
    // SAFETY: checked device memory of this GPU, outputs disjoint from the inputs;
    // validity is the caller's contract.
    Ok(unsafe {
        match call {
            Merge::Rescale {
                shard,
                shards,
                gathered,
                out,
            } => engine.sequence_rescale(shard, shards, rows, width, gathered, out, stream),
            Merge::Bounds {
                rope_key_norm,
                q,
                bound,
            } => engine.sequence_bounds(rows, rope_key_norm, q, bound, stream),
            Merge::Pack {
                out,
                lse,
                bound,
                packed,
                error,
            } => engine.sequence_pack(rows, width, out, lse, bound, packed, error, stream),
            Merge::Unpack { packed, out, error } => {
                engine.sequence_unpack(rows, width, packed, out, error, stream)
            }
        }
    }?)
}

/// # Safety
/// As `tpla_device_engine_sequence_rescale`.
#[cfg(not(feature = "cuda"))]
unsafe fn merge(
    e: &tpla_device_engine,
    _call: Merge,
    _rows: usize,
    _width: usize,
    _stream: *mut c_void,
) -> Outcome {
    match e.never {}
}

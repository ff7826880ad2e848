//! Seeded synthetic layers and the exact MLA reference, for demos and tests in C.

use super::context::{mla_weights, tpla_dims, tpla_mla_weights};
use super::{
    check_disjoint, guard, guard_value, hand_out, handle, input, output, span, to_f64, tpla_status,
    Failure, Outcome,
};
use crate::attention::reference::mla_decode;
use crate::synthetic::SyntheticLayer;

/// A seeded synthetic MLA layer with anisotropic latents (as real checkpoints have),
/// for demos and tests. Immutable: may be used from several threads at once.
pub struct tpla_synthetic {
    layer: SyntheticLayer,
}

/// Generates the synthetic layer of shape `dims` and `seed` (same inputs, same layer;
/// d_r must be even). Destroy it with `tpla_synthetic_destroy`.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT. Thread-safe.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tpla_synthetic_create(
    dims: tpla_dims,
    seed: u64,
    out: *mut *mut tpla_synthetic,
) -> tpla_status {
    guard(|| {
        let d = dims.to_rust()?;
        // SAFETY: caller contract.
        unsafe {
            hand_out(out, || {
                Ok(tpla_synthetic {
                    layer: SyntheticLayer::generate(&d, seed)?,
                })
            })
        }
    })
}

/// Destroys a synthetic layer; NULL is a no-op.
///
/// # Safety
/// `synthetic` is NULL or a layer not yet destroyed and not in use by another thread.
#[no_mangle]
pub unsafe extern "C" fn tpla_synthetic_destroy(synthetic: *mut tpla_synthetic) {
    // SAFETY: caller contract.
    guard_value((), || unsafe { super::destroy(synthetic) })
}

fn copy_out(what: &str, out: &mut [f32], values: &[f64]) -> Outcome {
    if out.len() != values.len() {
        return Err(Failure::invalid(format!(
            "{what} holds {} values, expected {}",
            out.len(),
            values.len()
        )));
    }
    for (o, v) in out.iter_mut().zip(values) {
        *o = *v as f32;
    }
    Ok(())
}

/// Copies the layer's MLA weights, rounded to f32: `w_uk` [heads][d_c][d_n], `w_uv`
/// [heads][d_c][d_v], `gamma` [d_c] (the layout of `tpla_mla_weights`).
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (counts,
/// misaligned or overlapping buffers). Thread-safe.
///
/// # Safety
/// `synthetic` is NULL or live; the outputs are NULL or writable for their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_synthetic_weights(
    synthetic: *const tpla_synthetic,
    w_uk: *mut f32,
    w_uk_count: usize,
    w_uv: *mut f32,
    w_uv_count: usize,
    gamma: *mut f32,
    gamma_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let s = &unsafe { handle(synthetic, "synthetic") }?.layer;
        check_disjoint(
            &[
                span(w_uk, w_uk_count, "w_uk"),
                span(w_uv, w_uv_count, "w_uv"),
                span(gamma, gamma_count, "gamma"),
            ],
            &[],
        )?;
        let w = &s.weights;
        // SAFETY: caller contract; disjoint (checked above).
        unsafe {
            copy_out("w_uk", output(w_uk, w_uk_count, "w_uk")?, &w.w_uk)?;
            copy_out("w_uv", output(w_uv, w_uv_count, "w_uv")?, &w.w_uv)?;
            copy_out("gamma", output(gamma, gamma_count, "gamma")?, &w.gamma)?;
        }
        Ok(())
    })
}

/// Generates a sequence of `len` tokens at positions 0..len from `seed`, rounded to f32:
/// `latents` its pre-norm latents [len][d_c], `k_rope` its RoPE-rotated keys
/// [len][d_r], and the query of every position: `q_nope` [len][heads][d_n], `q_rope`
/// [len][heads][d_r] (all heads of the model). The query arrays may be NULL with count 0
/// when not wanted.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT or TPLA_STATUS_INVALID_ARGUMENT (len 0, counts,
/// misaligned or overlapping buffers). Thread-safe.
///
/// # Safety
/// `synthetic` is NULL or live; the outputs are NULL or writable for their counts.
#[no_mangle]
pub unsafe extern "C" fn tpla_synthetic_sequence(
    synthetic: *const tpla_synthetic,
    seed: u64,
    len: usize,
    latents: *mut f32,
    latents_count: usize,
    k_rope: *mut f32,
    k_rope_count: usize,
    q_nope: *mut f32,
    q_nope_count: usize,
    q_rope: *mut f32,
    q_rope_count: usize,
) -> tpla_status {
    guard(|| {
        // SAFETY: caller contract.
        let s = &unsafe { handle(synthetic, "synthetic") }?.layer;
        if len == 0 {
            return Err(Failure::invalid("a sequence needs at least one token"));
        }
        let d = s.dims;
        // Refuse wrong counts before generating anything.
        let expect = |what: &str, got: usize, per_token: usize| -> Outcome {
            match len.checked_mul(per_token) {
                Some(want) if want == got => Ok(()),
                _ => Err(Failure::invalid(format!(
                    "{what} holds {got} values, expected {len} x {per_token}"
                ))),
            }
        };
        expect("latents", latents_count, d.d_c)?;
        expect("k_rope", k_rope_count, d.d_r)?;
        let queries =
            !(q_nope.is_null() && q_nope_count == 0 && q_rope.is_null() && q_rope_count == 0);
        if queries {
            expect("q_nope", q_nope_count, d.heads * d.d_n)?;
            expect("q_rope", q_rope_count, d.heads * d.d_r)?;
        }
        check_disjoint(
            &[
                span(latents, latents_count, "latents"),
                span(k_rope, k_rope_count, "k_rope"),
                span(q_nope, q_nope_count, "q_nope"),
                span(q_rope, q_rope_count, "q_rope"),
            ],
            &[],
        )?;
        // SAFETY: caller contract; disjoint (checked above).
        let (lat, kr, qn, qr) = unsafe {
            (
                output(latents, latents_count, "latents")?,
                output(k_rope, k_rope_count, "k_rope")?,
                output(q_nope, q_nope_count, "q_nope")?,
                output(q_rope, q_rope_count, "q_rope")?,
            )
        };
        let seq = s.sequence(len, seed);
        copy_out("latents", lat, &seq.tokens.latents)?;
        copy_out("k_rope", kr, &seq.tokens.k_rope)?;
        if queries {
            let (nq, rq) = (d.heads * d.d_n, d.heads * d.d_r);
            for t in 0..len {
                let q = s.query_at(&seq, t);
                copy_out("q_nope", &mut qn[t * nq..(t + 1) * nq], &q.q_nope)?;
                copy_out("q_rope", &mut qr[t * rq..(t + 1) * rq], &q.q_rope)?;
            }
        }
        Ok(())
    })
}

/// Exact MLA decode of one query (the f64 oracle, slow; for tests and demos): attends
/// with all `dims.heads` heads over `tokens = latents_count / d_c` cached tokens given as
/// pre-norm latents [tokens][d_c] and RoPE keys [tokens][d_r], for the query `q_nope`
/// [heads][d_n], `q_rope` [heads][d_r], and writes the head outputs [heads][d_v] to `out`
/// (rounded to f32). This is what the all-reduced TPLA outputs approximate.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_WRONG_STRUCT_SIZE or
/// TPLA_STATUS_INVALID_ARGUMENT (dims, counts, no tokens, non-finite weights,
/// misaligned or overlapping buffers). Thread-safe.
///
/// # Safety
/// Pointers are NULL or valid for their counts; `out` is writable and does not overlap
/// the inputs.
#[no_mangle]
pub unsafe extern "C" fn tpla_mla_reference(
    dims: tpla_dims,
    weights: *const tpla_mla_weights,
    latents: *const f32,
    latents_count: usize,
    k_rope: *const f32,
    k_rope_count: usize,
    q_nope: *const f32,
    q_nope_count: usize,
    q_rope: *const f32,
    q_rope_count: usize,
    out: *mut f32,
    out_count: usize,
) -> tpla_status {
    guard(|| {
        let d = dims.to_rust()?;
        // SAFETY: caller contract.
        let w = unsafe { mla_weights(weights, d) }?;
        check_disjoint(
            &[span(out, out_count, "out")],
            &[
                span(latents, latents_count, "latents"),
                span(k_rope, k_rope_count, "k_rope"),
                span(q_nope, q_nope_count, "q_nope"),
                span(q_rope, q_rope_count, "q_rope"),
            ],
        )?;
        // SAFETY: caller contract; `out` is disjoint from the inputs (checked above).
        let (lat, kr, qn, qr, out) = unsafe {
            (
                input(latents, latents_count, "latents")?,
                input(k_rope, k_rope_count, "k_rope")?,
                input(q_nope, q_nope_count, "q_nope")?,
                input(q_rope, q_rope_count, "q_rope")?,
                output(out, out_count, "out")?,
            )
        };
        let tokens = lat.len() / d.d_c;
        let shape_ok = tokens > 0
            && lat.len() == tokens * d.d_c
            && kr.len() == tokens * d.d_r
            && qn.len() == d.heads * d.d_n
            && qr.len() == d.heads * d.d_r;
        if !shape_ok {
            return Err(Failure::invalid(format!(
                "expected latents [tokens >= 1][{}], k_rope [tokens][{}], q_nope [{}][{}] and \
                 q_rope [{}][{}]; got {}, {}, {} and {} values",
                d.d_c,
                d.d_r,
                d.heads,
                d.d_n,
                d.heads,
                d.d_r,
                lat.len(),
                kr.len(),
                qn.len(),
                qr.len()
            )));
        }
        let r = mla_decode(&w, &to_f64(lat), &to_f64(kr), &to_f64(qn), &to_f64(qr));
        copy_out("out", out, &r.out)
    })
}

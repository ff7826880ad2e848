//! Merging the partial outputs of sequence shards (exact decode, DESIGN 3.6).
//!
//! A rank of sequence shard `j` attends over its own tokens only: per batch entry and
//! head it has an output `o_j` (normalised over its tokens) and the log-sum-exp `l_j` of
//! its scores. The exact output over all tokens is `sum_j e^(l_j - L) o_j` with
//! `L = log sum_j e^(l_j)`. Two ways to get it, both ending with the TPLA sum over the
//! latent groups:
//! - (a) [`rescale_by_gathered_lse`]: all-gather the log-sum-exps of the rank's latent
//!   group (`4 * batch * heads` bytes per shard), rescale `o_j` by `e^(l_j - L)`, then
//!   sum the outputs over all ranks ([`super::all_reduce_in_process`] or the engine's):
//!   the shards' merge and the groups' TPLA sum in one all-reduce.
//! - (b) [`pack_against_bound`]: with an offset `m` every shard of a group computes
//!   alike without communication ([`logit_bound`]), pack the numerator `e^(l_j - m) o_j`
//!   and the denominator `e^(l_j - m)` in f64 (`m` lies far enough above the true
//!   logits that `e^(l - m)` underflows in f32), sum them over the group's shards in one
//!   all-reduce, and divide ([`unpack_merged`]); with several latent groups, the TPLA
//!   sum then runs over the ranks of one shard index. One collective instead of two in
//!   exact mode, at twice the bytes of an f32 output.
//!
//! Which to use (measured on the CPU at batch 64, Kimi-K2 and DeepSeek-V3 heads,
//! `examples/sequence_merge_bench.rs`, benches/RESULTS.md "Sequence-shard merges"): (a).
//! Its per-rank arithmetic is 2-2.5x smaller than (b)'s pack and unpack, it moves half
//! the bytes in exact mode and a third with several latent groups, and both cost under
//! 0.1% of the per-rank attention at 32K. (b) saves only the latency of the small
//! all-gather, so it is worth measuring only in exact mode when a step is bound by
//! collective latency (small batches, slow interconnect).
//!
//! A batch entry with no token on a shard has `o_j = 0` and `l_j = -inf` (what the
//! decode of a sequence shard writes); an entry with no token on any shard merges to
//! zeros. A NaN log-sum-exp (a faulted entry) makes the merged entry NaN.

use crate::error::{Error, Result};

/// Largest `|l - m|` whose `e^(l - m)` is a normal f64 (`e^700 ~ 1e304`).
pub const PACKED_EXPONENT_LIMIT: f64 = 700.0;

/// Bit of merge (b)'s error word on the GPU (the pack and unpack kernels of sequence.cu
/// OR them in where the host merge returns an error): a logit bound was not finite.
pub const MERGE_BOUND_NOT_FINITE: u32 = 1;
/// Error bit: a log-sum-exp lay more than [`PACKED_EXPONENT_LIMIT`] above its bound.
pub const MERGE_LSE_ABOVE_BOUND: u32 = 2;
/// Error bit: the bound lay more than [`PACKED_EXPONENT_LIMIT`] above every shard's
/// log-sum-exp of a row (its outputs are NaN).
pub const MERGE_BOUND_FAR_ABOVE: u32 = 4;

/// The host merge's error for the bits of a GPU merge's error word, `Ok` for none.
pub fn merge_error(bits: u32) -> Result<()> {
    if bits & MERGE_BOUND_NOT_FINITE != 0 {
        return Err(Error::invalid(
            "a logit bound is not finite: bounds must be finite",
        ));
    }
    if bits & MERGE_LSE_ABOVE_BOUND != 0 {
        return Err(Error::invalid(format!(
            "a log-sum-exp lies more than {PACKED_EXPONENT_LIMIT} above its logit bound: the \
             bound must not lie more than {PACKED_EXPONENT_LIMIT} below it"
        )));
    }
    if bits & MERGE_BOUND_FAR_ABOVE != 0 {
        return Err(Error::invalid(format!(
            "the logit bound lies more than {PACKED_EXPONENT_LIMIT} above the log-sum-exp of \
             every shard of an entry"
        )));
    }
    Ok(())
}

/// Values per packed row of `width` outputs: the numerators, the denominator, and the
/// count of shards that hold a token of the entry (which tells an entry without tokens
/// from one whose bound was too loose).
pub fn packed_row_len(width: usize) -> usize {
    width + 2
}

/// Rescales this rank's outputs `out` (`[rows][width]`, normalised over its tokens) by
/// `e^(l_own - L)`, where `gathered[j]` holds the log-sum-exps (`[rows]`) of shard `j` of
/// the rank's latent group, `shard` is this rank's, and `L` their log-sum-exp. Summing
/// the rescaled outputs over the shards then gives the exact output.
pub fn rescale_by_gathered_lse(
    out: &mut [f32],
    width: usize,
    shard: usize,
    gathered: &[&[f32]],
) -> Result<()> {
    let rows = check_gathered(gathered, shard)?;
    check_rows("outputs", out.len(), rows, width)?;
    for (r, row) in out.chunks_exact_mut(width.max(1)).enumerate().take(rows) {
        let own = gathered[shard][r] as f64;
        let max = gathered
            .iter()
            .map(|l| l[r] as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let weight = if gathered.iter().any(|l| l[r].is_nan()) {
            f64::NAN
        } else if own == f64::NEG_INFINITY {
            // no token of this entry on this shard (and so `max` may be -inf too)
            0.0
        } else {
            let sum: f64 = gathered.iter().map(|l| (l[r] as f64 - max).exp()).sum();
            (own - max).exp() / sum
        };
        for x in row.iter_mut() {
            *x = (*x as f64 * weight) as f32;
        }
    }
    Ok(())
}

/// The in-process form of merge (a) over every rank of a hybrid deployment: `outs[r]`
/// and `lses[r]` are rank `r`'s outputs and log-sum-exps, ranks numbered
/// `group * shards + shard` ([`crate::geometry::HybridPlan`]). Afterwards every rank's
/// `outs` holds the merged, group-summed output.
pub fn merge_by_lse_in_process(
    shards: usize,
    width: usize,
    outs: &mut [&mut [f32]],
    lses: &[&[f32]],
) -> Result<()> {
    check_ranks(shards, outs.len(), lses.len())?;
    for (rank, out) in outs.iter_mut().enumerate() {
        let group = rank / shards;
        let gathered = &lses[group * shards..(group + 1) * shards];
        rescale_by_gathered_lse(out, width, rank % shards, gathered)?;
    }
    super::all_reduce_in_process(outs)
}

/// An upper bound of the logits of query row `q` (`[slice_width + d_r]`, scaled as the
/// backends see it) over every cached token, from norms alone, so every shard of a
/// latent group computes the same one without communication: cached latent rows are
/// RMS-normalised (`|n_t| <= sqrt(d_c)`, see [`latent_row_norm_bound`]) and
/// `rope_key_norm` bounds `|k_rope|` over the sequence (RoPE keeps a key's norm, and
/// every rank sees every appended key).
pub fn logit_bound(q: &[f32], slice_width: usize, latent_norm: f64, rope_key_norm: f64) -> f64 {
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let (lat, rope) = q.split_at(slice_width.min(q.len()));
    norm(lat) * latent_norm + norm(rope) * rope_key_norm
}

/// The norm bound of a cached latent row (or its slice) of width `d_c`: `sqrt(d_c)` for
/// a normalised latent, with room for bf16 rounding (a relative `2^-8` per value).
pub fn latent_row_norm_bound(d_c: usize) -> f64 {
    (d_c as f64).sqrt() * (1.0 + 1.0 / 128.0)
}

/// Packs this rank's outputs `out` (`[rows][width]`) and log-sum-exps `lse` (`[rows]`)
/// against the shared offsets `bound` (`[rows]`) into `packed`
/// (`[rows][packed_row_len(width)]`, f64), for a sum over the shards of the rank's
/// latent group. A log-sum-exp more than [`PACKED_EXPONENT_LIMIT`] above its bound is
/// an error (the bound is not an upper bound); one as far below contributes nothing,
/// which is exact to f64 rounding when another shard lies near the bound.
pub fn pack_against_bound(
    out: &[f32],
    lse: &[f32],
    bound: &[f64],
    width: usize,
    packed: &mut [f64],
) -> Result<()> {
    let rows = lse.len();
    check_rows("outputs", out.len(), rows, width)?;
    check_rows("logit bounds", bound.len(), rows, 1)?;
    check_rows("packed rows", packed.len(), rows, packed_row_len(width))?;
    for r in 0..rows {
        let (l, m) = (lse[r] as f64, bound[r]);
        if !m.is_finite() {
            return Err(Error::invalid(format!(
                "logit bound {r} is {m}: bounds must be finite"
            )));
        }
        let dst = &mut packed[r * (width + 2)..(r + 1) * (width + 2)];
        let (num, tail) = dst.split_at_mut(width);
        if l == f64::NEG_INFINITY {
            num.fill(0.0);
            tail.copy_from_slice(&[0.0, 0.0]);
            continue;
        }
        if l - m > PACKED_EXPONENT_LIMIT {
            return Err(Error::invalid(format!(
                "log-sum-exp {l} of row {r} lies {} above its logit bound {m}: the bound \
                 must not lie more than {PACKED_EXPONENT_LIMIT} below it",
                l - m
            )));
        }
        // NaN (a faulted entry) travels on and makes the merged entry NaN
        let e = if l - m < -PACKED_EXPONENT_LIMIT {
            0.0
        } else {
            (l - m).exp()
        };
        for (n, &o) in num.iter_mut().zip(&out[r * width..(r + 1) * width]) {
            *n = e * o as f64;
        }
        tail.copy_from_slice(&[e, 1.0]);
    }
    Ok(())
}

/// Divides the summed numerators of `packed` by their denominators into `out`
/// (`[rows][width]`). An entry no shard holds a token of is zeros; one whose every
/// shard lay more than [`PACKED_EXPONENT_LIMIT`] below the bound is an error.
pub fn unpack_merged(packed: &[f64], width: usize, out: &mut [f32]) -> Result<()> {
    let rows = packed.len() / packed_row_len(width);
    check_rows("packed rows", packed.len(), rows, packed_row_len(width))?;
    check_rows("outputs", out.len(), rows, width)?;
    for r in 0..rows {
        let src = &packed[r * (width + 2)..(r + 1) * (width + 2)];
        let (den, holders) = (src[width], src[width + 1]);
        let dst = &mut out[r * width..(r + 1) * width];
        if holders == 0.0 {
            dst.fill(0.0);
        } else if den == 0.0 {
            return Err(Error::invalid(format!(
                "row {r}: the logit bound lies more than {PACKED_EXPONENT_LIMIT} above the \
                 log-sum-exp of every shard"
            )));
        } else {
            for (o, n) in dst.iter_mut().zip(&src[..width]) {
                *o = (n / den) as f32;
            }
        }
    }
    Ok(())
}

/// Sums f64 buffers element-wise in rank order into each of them (the in-process
/// all-reduce of merge (b)).
pub fn all_reduce_f64_in_process(buffers: &mut [&mut [f64]]) -> Result<()> {
    let Some(first) = buffers.first() else {
        return Err(Error::invalid("an all-reduce needs at least one buffer"));
    };
    let n = first.len();
    if let Some(bad) = buffers.iter().position(|b| b.len() != n) {
        return Err(Error::invalid(format!(
            "rank {bad}'s buffer holds {} values, rank 0's holds {n}",
            buffers[bad].len()
        )));
    }
    for i in 0..n {
        let sum: f64 = buffers.iter().map(|b| b[i]).sum();
        for b in buffers.iter_mut() {
            b[i] = sum;
        }
    }
    Ok(())
}

/// The in-process form of merge (b) over every rank of a hybrid deployment (ranks
/// numbered as in [`merge_by_lse_in_process`]): packs each rank against `bounds[r]`
/// (equal within a latent group), sums the packs of each group's shards, unpacks, and
/// sums the groups. Afterwards every rank's `outs` holds the merged output.
pub fn merge_packed_in_process(
    shards: usize,
    width: usize,
    outs: &mut [&mut [f32]],
    lses: &[&[f32]],
    bounds: &[&[f64]],
) -> Result<()> {
    check_ranks(shards, outs.len(), lses.len())?;
    check_ranks(shards, outs.len(), bounds.len())?;
    let rows = lses[0].len();
    let mut packs: Vec<Vec<f64>> = Vec::with_capacity(outs.len());
    for r in 0..outs.len() {
        let mut p = vec![0.0; rows * packed_row_len(width)];
        pack_against_bound(&*outs[r], lses[r], bounds[r], width, &mut p)?;
        packs.push(p);
    }
    for (group, group_packs) in packs.chunks_mut(shards).enumerate() {
        let mut views: Vec<&mut [f64]> = group_packs.iter_mut().map(|p| p.as_mut_slice()).collect();
        all_reduce_f64_in_process(&mut views)?;
        for (shard, p) in group_packs.iter().enumerate() {
            unpack_merged(p, width, &mut *outs[group * shards + shard])?;
        }
    }
    // Every shard of a group now holds the group's output: the TPLA sum runs over the
    // ranks of one shard, one per group, as a communicator per shard index would.
    for shard in 0..shards {
        let mut same_shard: Vec<&mut [f32]> = outs
            .iter_mut()
            .skip(shard)
            .step_by(shards)
            .map(|o| &mut **o)
            .collect();
        super::all_reduce_in_process(&mut same_shard)?;
    }
    Ok(())
}

fn check_ranks(shards: usize, outs: usize, lses: usize) -> Result<()> {
    if shards == 0 || outs == 0 || outs % shards != 0 {
        return Err(Error::invalid(format!(
            "{outs} ranks cannot be split evenly into groups of {shards} sequence shards"
        )));
    }
    if lses != outs {
        return Err(Error::invalid(format!(
            "{outs} ranks' outputs but {lses} ranks' log-sum-exps or bounds"
        )));
    }
    Ok(())
}

fn check_gathered(gathered: &[&[f32]], shard: usize) -> Result<usize> {
    let Some(first) = gathered.first() else {
        return Err(Error::invalid("the gathered log-sum-exps hold no shard"));
    };
    if shard >= gathered.len() {
        return Err(Error::out_of_range(format!(
            "sequence shard {shard} is out of range for {} gathered shards",
            gathered.len()
        )));
    }
    if let Some(bad) = gathered.iter().position(|l| l.len() != first.len()) {
        return Err(Error::invalid(format!(
            "shard {bad} gathered {} log-sum-exps, shard 0 {}",
            gathered[bad].len(),
            first.len()
        )));
    }
    Ok(first.len())
}

fn check_rows(what: &str, got: usize, rows: usize, width: usize) -> Result<()> {
    if Some(got) != rows.checked_mul(width) {
        return Err(Error::invalid(format!(
            "{what} hold {got} values, expected {rows} rows of {width}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_merge_error_bits_read_as_the_cpu_merge_errors() {
        assert!(merge_error(0).is_ok());
        let e = merge_error(MERGE_BOUND_NOT_FINITE).unwrap_err();
        assert!(e.message().contains("finite"), "{e}");
        let e = merge_error(MERGE_LSE_ABOVE_BOUND).unwrap_err();
        assert!(e.message().contains("above its logit bound"), "{e}");
        let e = merge_error(MERGE_BOUND_FAR_ABOVE).unwrap_err();
        assert!(e.message().contains("more than 700 above"), "{e}");
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
    }

    /// Two shards of one row of width 2: shard 0 with lse 0, shard 1 with lse ln 3, so
    /// the weights are 1/4 and 3/4.
    fn two_shards() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        (
            vec![vec![4.0, 8.0], vec![-4.0, 0.0]],
            vec![vec![0.0], vec![3f32.ln()]],
        )
    }

    #[test]
    fn both_merges_weigh_shards_by_their_log_sum_exps() {
        let want = [0.25 * 4.0 - 0.75 * 4.0, 0.25 * 8.0];
        let (mut outs, lses) = two_shards();
        let lv: Vec<&[f32]> = lses.iter().map(|l| l.as_slice()).collect();
        let mut ov: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        merge_by_lse_in_process(2, 2, &mut ov, &lv).unwrap();
        for o in &outs {
            assert!(
                (o[0] - want[0]).abs() < 1e-6 && (o[1] - want[1]).abs() < 1e-6,
                "{o:?}"
            );
        }
        // a bound 300 above the logits: e^(l - m) would underflow in f32, not in f64
        let (mut outs, _) = two_shards();
        let bounds = [vec![300.0], vec![300.0]];
        let bv: Vec<&[f64]> = bounds.iter().map(|b| b.as_slice()).collect();
        let mut ov: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        merge_packed_in_process(2, 2, &mut ov, &lv, &bv).unwrap();
        for o in &outs {
            assert!(
                (o[0] - want[0]).abs() < 1e-6 && (o[1] - want[1]).abs() < 1e-6,
                "{o:?}"
            );
        }
    }

    #[test]
    fn shards_without_tokens_weigh_nothing_and_entries_without_any_are_zero() {
        let gathered: [&[f32]; 2] = [
            &[f32::NEG_INFINITY, f32::NEG_INFINITY],
            &[1.5, f32::NEG_INFINITY],
        ];
        let mut own = vec![9.0f32, 9.0, 9.0, 9.0];
        rescale_by_gathered_lse(&mut own, 2, 0, &gathered).unwrap();
        assert_eq!(own, vec![0.0; 4]);
        let mut other = vec![2.0f32, 3.0, 9.0, 9.0];
        rescale_by_gathered_lse(&mut other, 2, 1, &gathered).unwrap();
        assert_eq!(other, vec![2.0, 3.0, 0.0, 0.0]);
        let mut packed = vec![f64::NAN; 2 * packed_row_len(2)];
        pack_against_bound(
            &[2.0, 3.0, 9.0, 9.0],
            gathered[1],
            &[4.0, 4.0],
            2,
            &mut packed,
        )
        .unwrap();
        let mut out = vec![f32::NAN; 4];
        unpack_merged(&packed, 2, &mut out).unwrap();
        assert_eq!(out, vec![2.0, 3.0, 0.0, 0.0]);
    }

    #[test]
    fn a_faulted_entry_stays_nan() {
        let gathered: [&[f32]; 2] = [&[f32::NAN], &[0.0]];
        let mut out = vec![1.0f32];
        rescale_by_gathered_lse(&mut out, 1, 1, &gathered).unwrap();
        assert!(out[0].is_nan());
        let mut packed = vec![0.0; packed_row_len(1)];
        pack_against_bound(&[1.0], &[f32::NAN], &[0.0], 1, &mut packed).unwrap();
        unpack_merged(&packed, 1, &mut out).unwrap();
        assert!(out[0].is_nan());
    }

    #[test]
    fn a_bound_below_the_log_sum_exps_or_far_above_all_of_them_is_an_error() {
        let mut packed = vec![0.0; packed_row_len(1)];
        let e = pack_against_bound(&[1.0], &[800.0], &[0.0], 1, &mut packed).unwrap_err();
        assert!(e.message().contains("above its logit bound"), "{e}");
        let e = pack_against_bound(&[1.0], &[0.0], &[f64::INFINITY], 1, &mut packed).unwrap_err();
        assert!(e.message().contains("finite"), "{e}");
        // far below the bound on its own: contributes nothing, fine next to a near shard
        pack_against_bound(&[1.0], &[-800.0], &[0.0], 1, &mut packed).unwrap();
        let mut out = vec![0.0f32];
        let e = unpack_merged(&packed, 1, &mut out).unwrap_err();
        assert!(e.message().contains("more than 700 above"), "{e}");
    }

    #[test]
    fn mismatched_shapes_are_errors_with_a_reason() {
        let mut out = vec![0.0f32; 3];
        let e = rescale_by_gathered_lse(&mut out, 2, 0, &[&[0.0]]).unwrap_err();
        assert!(e.message().contains("expected 1 rows of 2"), "{e}");
        let e = rescale_by_gathered_lse(&mut out, 3, 1, &[&[0.0]]).unwrap_err();
        assert!(e.message().contains("out of range"), "{e}");
        let e = rescale_by_gathered_lse(&mut out, 3, 0, &[&[0.0], &[0.0, 1.0]]).unwrap_err();
        assert!(e.message().contains("shard 1 gathered 2"), "{e}");
        let mut a = vec![0.0f32; 2];
        let mut ov: Vec<&mut [f32]> = vec![&mut a];
        let e = merge_by_lse_in_process(2, 2, &mut ov, &[&[0.0]]).unwrap_err();
        assert!(e.message().contains("groups of 2"), "{e}");
        let e = merge_by_lse_in_process(1, 2, &mut ov, &[]).unwrap_err();
        assert!(e.message().contains("0 ranks' log-sum-exps"), "{e}");
        let mut packed = vec![0.0; 3];
        let e = pack_against_bound(&[0.0; 2], &[0.0], &[0.0], 2, &mut packed).unwrap_err();
        assert!(e.message().contains("packed rows"), "{e}");
    }

    #[test]
    fn logit_bounds_bound_the_scores_of_normalised_rows() {
        let q = [3.0f32, 4.0, 1.0];
        assert!((logit_bound(&q, 2, 2.0, 10.0) - (5.0 * 2.0 + 10.0)).abs() < 1e-12);
        assert!(latent_row_norm_bound(64) > 8.0 && latent_row_norm_bound(64) < 8.1);
    }
}

//! The sequence-shard merges of [`super::sequence`] on an engine's own device buffers
//! (feature `cuda`): the rank's share of merges (a) and (b) between the collectives the
//! engine runs itself (its NCCL communicators, its stream), as vLLM's decode context
//! parallelism does around its attention. The arithmetic and the kernels are those of
//! [`super::sequence_device`] (sequence.cu); nothing here synchronises with the host or
//! allocates, so a step stays capturable in a CUDA graph.
//!
//! Per layer, after [`DeviceEngine::decode`] over the rank's shard of each sequence
//! (rows = `batch * heads`; the outputs may be the latent outputs, `width =
//! slice_width`, or the projected head outputs of [`DeviceEngine::project`], `width =
//! d_v`: both merges are linear in them):
//! - (a) the engine all-gathers the log-sum-exps over the shards of the rank's latent
//!   group (`[shards][rows]` f32), [`DeviceEngine::sequence_rescale`] rescales the rank's
//!   outputs, and the engine sums them over every rank (one all-reduce);
//! - (b) [`DeviceEngine::sequence_bounds`] computes the shared logit bounds from the
//!   queries, [`DeviceEngine::sequence_pack`] packs numerator and denominator against
//!   them (f64 `[rows][packed_row_len(width)]`), the engine sums the packs over the
//!   group's shards (an f64 all-reduce), [`DeviceEngine::sequence_unpack`] divides, and
//!   the engine sums the outputs over the latent groups (the TPLA all-reduce).
//!
//! Pack and unpack report what the host merge refuses as bits in a device error word
//! the engine owns ([`super::sequence::MERGE_BOUND_NOT_FINITE`] and the two after it;
//! [`super::sequence::merge_error`] turns them into the host merge's error).

use super::sequence::latent_row_norm_bound;
use crate::attention::cuda::CUstream;
use crate::engine_device::{check_address, DeviceEngine};
use crate::error::{Error, Result};

/// The launches refuse no rows and counts beyond int32; a width of 0 would launch kernels
/// that do nothing, which is a caller's mistake.
fn check_width(width: usize) -> Result<()> {
    if width == 0 {
        return Err(Error::invalid("a sequence merge of rows with no columns"));
    }
    Ok(())
}
impl DeviceEngine {
    /// Merge (a), this rank's step between the engine's all-gather and all-reduce: its
    /// outputs `out` (`[rows][width]` f32, normalised over its shard's tokens) times
    /// `e^(l_own - L)`, with `gathered` the log-sum-exps of the `shards` shards of its
    /// latent group side by side (`[shards][rows]` f32, shard `j`'s at `gathered + 4 j
    /// rows`), `shard` this rank's and `L` their log-sum-exp. Summing the rescaled
    /// outputs over every rank then gives the merged, group-summed output. On `stream`,
    /// no host synchronisation.
    ///
    /// # Safety
    /// `out` and `gathered` are device memory of this GPU of those sizes, valid until the
    /// stream passes this point; `stream` is live (or NULL).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sequence_rescale(
        &self,
        shard: usize,
        shards: usize,
        rows: usize,
        width: usize,
        gathered: u64,
        out: u64,
        stream: CUstream,
    ) -> Result<()> {
        // (the launch refuses a shard past the group's)
        check_width(width)?;
        check_address(gathered, 4, "the gathered log-sum-exps")?;
        check_address(out, 4, "the outputs")?;
        let k = self.backend().sequence_kernels()?;
        self.backend().device().bind()?;
        // SAFETY: checked sizes and alignment; validity is the caller's contract.
        unsafe { k.launch_rescale(out, rows, width, shard, shards, gathered, rows, stream) }
    }

    /// Merge (b)'s shared logit bounds (`[rows]` f64 at `bound`) of the decode's query
    /// rows `q` (`[rows][row_width]` f32, as [`DeviceEngine::decode`] reads them; the
    /// same on every shard of a latent group): `|q_latent| sqrt(d_c) + |q_rope|
    /// rope_key_norm`, with `rope_key_norm` a bound of `|k_rope|` over every token of
    /// the batch's sequences. On `stream`.
    ///
    /// # Safety
    /// As [`Self::sequence_rescale`], for `q` and `bound`.
    pub unsafe fn sequence_bounds(
        &self,
        rows: usize,
        rope_key_norm: f64,
        q: u64,
        bound: u64,
        stream: CUstream,
    ) -> Result<()> {
        if !rope_key_norm.is_finite() || rope_key_norm < 0.0 {
            return Err(Error::invalid(format!(
                "rope_key_norm must be finite and at least 0, got {rope_key_norm}"
            )));
        }
        check_address(q, 4, "the queries")?;
        check_address(bound, 8, "the bounds")?;
        let shape = self.shape();
        let latent_norm = latent_row_norm_bound(self.dims().d_c);
        let k = self.backend().sequence_kernels()?;
        self.backend().device().bind()?;
        // SAFETY: as sequence_rescale.
        unsafe {
            k.launch_bounds(
                q,
                rows,
                shape.slice_width,
                shape.d_r,
                latent_norm,
                rope_key_norm,
                bound,
                stream,
            )
        }
    }

    /// Merge (b), pack: `packed` (`[rows][packed_row_len(width)]` f64) from this rank's
    /// outputs `out` (`[rows][width]` f32), log-sum-exps `lse` (`[rows]` f32) and the
    /// shared bounds `bound` (`[rows]` f64); error bits ORed into the `u32` at `error`
    /// (which the engine clears). The engine then sums `packed` over the shards of the
    /// rank's latent group. On `stream`.
    ///
    /// # Safety
    /// As [`Self::sequence_rescale`], for every buffer named.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sequence_pack(
        &self,
        rows: usize,
        width: usize,
        out: u64,
        lse: u64,
        bound: u64,
        packed: u64,
        error: u64,
        stream: CUstream,
    ) -> Result<()> {
        check_width(width)?;
        for (p, align, what) in [
            (out, 4, "the outputs"),
            (lse, 4, "the log-sum-exps"),
            (bound, 8, "the bounds"),
            (packed, 8, "the packed buffer"),
            (error, 4, "the error word"),
        ] {
            check_address(p, align, what)?;
        }
        let k = self.backend().sequence_kernels()?;
        self.backend().device().bind()?;
        // SAFETY: as sequence_rescale.
        unsafe { k.launch_pack(out, lse, bound, rows, width, packed, error, stream) }
    }

    /// Merge (b), unpack: the merged outputs `out` (`[rows][width]` f32) from the packs
    /// summed over the group's shards (`packed`); error bits ORed into `error`. The
    /// engine then sums `out` over the latent groups. On `stream`.
    ///
    /// # Safety
    /// As [`Self::sequence_rescale`], for every buffer named.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sequence_unpack(
        &self,
        rows: usize,
        width: usize,
        packed: u64,
        out: u64,
        error: u64,
        stream: CUstream,
    ) -> Result<()> {
        check_width(width)?;
        for (p, align, what) in [
            (packed, 8, "the packed buffer"),
            (out, 4, "the outputs"),
            (error, 4, "the error word"),
        ] {
            check_address(p, align, what)?;
        }
        let k = self.backend().sequence_kernels()?;
        self.backend().device().bind()?;
        // SAFETY: as sequence_rescale.
        unsafe { k.launch_unpack(packed, rows, width, out, error, stream) }
    }
}

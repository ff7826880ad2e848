//! Attention backends.
//!
//! Every backend computes the same thing, *latent attention* over one rank's slice
//! cache: for each query row `q` (width `slice_width + d_r`, already multiplied by the
//! softmax scale and, on its latent part, by the slice's `mu`) and each cached row `r`
//! (latent slice then RoPE key), score `s_t = q . r_t`, softmax over the sequence, and
//! return the weighted sum of the rows' latent parts (width `slice_width`) plus the
//! natural-log sum-exp of the scores. Absorbing `W_UK` into the query and projecting the
//! latent output through `W_UV` happen around the backend, once, in [`crate::decode`].
//!
//! `reference` is the f64 oracle every other backend is tested against.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod reference;
pub mod schedule;

use crate::dtype::DType;
use crate::error::Result;

/// Read access to one rank's paged slice cache, as the backends need it.
///
/// A sequence's rows live in pages of `page_size` rows; row `t` of sequence `s` is row
/// `t % page_size` of page `t / page_size`. Each row is `row_width` elements of `dtype`,
/// little-endian: the latent slice first, then the RoPE key.
pub trait RowSource: Sync {
    fn dtype(&self) -> DType;
    fn row_width(&self) -> usize;
    fn page_size(&self) -> usize;
    /// Cached tokens of sequence `seq`; an unknown id is an `OutOfRange` error.
    fn seq_len(&self, seq: u32) -> Result<usize>;
    /// Bytes of page `page` of sequence `seq`: `page_size * row_width * dtype.size()`
    /// bytes, of which the first `min(page_size, seq_len - page * page_size)` rows are
    /// valid. Callers only ask for pages below `ceil(seq_len / page_size)`.
    fn page(&self, seq: u32, page: usize) -> &[u8];
}

/// Shape of one latent-attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatentShape {
    /// Query heads of the rank.
    pub heads: usize,
    /// Latent slice width `d_c / g`.
    pub slice_width: usize,
    /// RoPE key width.
    pub d_r: usize,
}

impl LatentShape {
    pub fn row_width(&self) -> usize {
        self.slice_width + self.d_r
    }
}

/// A latent-attention implementation (reference, CPU, CUDA).
pub trait LatentAttention {
    /// Human-readable name of the backend and the kernel it chose.
    fn name(&self) -> String;

    /// For each sequence `seqs[b]`, each head `h`:
    /// `q[b][h]` (f32, `row_width`) against the cached rows of `seqs[b]`; writes
    /// `out[b][h]` (f32, `slice_width`) and `lse[b][h]`. A sequence of length 0 is an
    /// `InvalidArgument` error.
    fn attend(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()>;

    /// `i32` words of the schedule of a step of `batch` sequences (an upper bound, fixed
    /// by the batch size and the backend, not by the lengths): what a caller allocates
    /// for [`Self::schedule`].
    fn schedule_len(&self, shape: LatentShape, batch: usize) -> usize {
        schedule::lengths_len(shape, batch)
    }

    /// Computes the split-KV schedule of one step over sequences of lengths `lens` (each
    /// at least 1) into the caller's `out` (at least [`Self::schedule_len`] words). The
    /// schedule is plain data: every layer of the step reuses it. This default records
    /// the lengths only; backends that split the work override it.
    fn schedule(&self, shape: LatentShape, lens: &[usize], out: &mut [i32]) -> Result<()> {
        schedule::write_lengths(shape, lens, out)
    }

    /// [`Self::attend`] following a schedule made by [`Self::schedule`] of this backend
    /// for the sequences' current lengths; a schedule of another backend, shape, batch or
    /// other lengths is an `InvalidArgument` error.
    #[allow(clippy::too_many_arguments)]
    fn attend_scheduled(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        schedule: &[i32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        schedule::check_lengths(cache, shape, seqs, schedule)?;
        self.attend(cache, shape, seqs, q, out, lse)
    }

    /// Whether [`Self::attend_scaling`] is available: the backend multiplies the query
    /// rows by their scales as it packs them for its kernel, which saves the caller a
    /// pass over the rows (the whole cost of a step at the shortest contexts).
    fn scales_queries(&self) -> bool {
        false
    }

    /// [`Self::attend`], or [`Self::attend_scheduled`] with `schedule`, on query rows
    /// not yet scaled: the latent columns are multiplied by `scales[0]` and the RoPE
    /// columns by `scales[1]` (in f32, as a caller scaling them first would: the results
    /// are the same bits). Backends without [`Self::scales_queries`] refuse it.
    #[allow(clippy::too_many_arguments)]
    fn attend_scaling(
        &mut self,
        _cache: &dyn RowSource,
        _shape: LatentShape,
        _seqs: &[u32],
        _schedule: Option<&[i32]>,
        _q: &[f32],
        _scales: [f32; 2],
        _out: &mut [f32],
        _lse: &mut [f32],
    ) -> Result<()> {
        Err(crate::error::Error::unsupported(format!(
            "{} does not scale query rows itself",
            self.name()
        )))
    }

    /// Allocates what steps of up to `batch` sequences of `shape` need, so that those
    /// steps allocate nothing; memory that cannot be had is an `OutOfCapacity` error.
    /// Backends without reusable buffers ignore it.
    fn reserve(&mut self, _shape: LatentShape, _batch: usize) -> Result<()> {
        Ok(())
    }
}

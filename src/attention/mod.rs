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
}

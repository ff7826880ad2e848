//! The paged slice cache of one rank (DESIGN 3.2, 3.5, 7).
//!
//! A rank in latent group `i` of `g` caches, per token and layer, one *row* of
//! `slice_width + d_r` elements: columns `[i*w, (i+1)*w)` of the rotated normalised latent
//! (`w = d_c / g`), then the RoPE key. [`RankCache`] holds those rows for every layer of a
//! model and a set of sequences, and hands each layer to the attention backends as a
//! [`RowSource`](crate::attention::RowSource) through [`RankCache::layer`].
//!
//! Layout and lifetimes:
//! - Rows are grouped into pages of `page_size` tokens (default 64). A page is
//!   `page_size * dtype.row_bytes(w, d_r)` bytes, padded to a multiple of 64 bytes (the
//!   page stride) and 64-byte aligned; rows past a sequence's end read as zero.
//! - The pool has a fixed capacity given at creation. One pool page holds `page_size`
//!   token slots of one sequence in *every* layer (a block of a paged-attention engine),
//!   laid out `[layer][page]`: sequences grow by whole pages for all layers at once.
//!   Running out of pages is an [`OutOfCapacity`](crate::ErrorKind::OutOfCapacity)
//!   error that leaves the cache unchanged; freeing a sequence returns its pages.
//! - Sequence ids (`u32`) and the sequence table are shared by all layers. Each layer
//!   keeps its own length, because a decode step appends to one layer after another;
//!   between steps every layer has the same length.

mod export;
mod file;
pub mod format;
mod pool;
mod rank;

pub use export::{ExportPlan, ShardFileWriter, ShardWriter};
pub use file::ShardFile;
pub use format::{SequenceEntry, ShardHeader};
pub use pool::PAGE_ALIGN;
pub use rank::{LayerView, RankCache};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::geometry::{HybridPlan, ModelDims, SequenceSharding, ShardPlan};
use crate::transform::Transform;
use half::{bf16, f16};

/// Tokens per page unless the caller chooses otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 64;
/// Largest supported page size, in tokens.
pub const MAX_PAGE_SIZE: usize = 1 << 16;
/// Largest supported number of layers.
pub const MAX_LAYERS: usize = 1 << 12;

/// Which rotation `U` a layer's cached latent went through: the transform's numeric kind
/// code and a 64-bit fingerprint of its matrix. Shard files record it per layer so that a
/// decode rank refuses a cache rotated by another `U`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransformId {
    pub code: u32,
    pub fingerprint: u64,
}

impl TransformId {
    /// The identity of `transform`: its kind code and fingerprint.
    pub fn of(transform: &Transform) -> Self {
        TransformId {
            code: transform.kind().code(),
            fingerprint: transform.fingerprint(),
        }
    }
}

/// Everything that fixes the bytes of one rank's cache: model dims, latent group, element
/// type, page size, the transform of every layer, and (for a rank of a sequence-sharded
/// deployment, [`HybridPlan`]) the sequence sharding and the rank's sequence shard. A
/// shard file must match it exactly to be registered.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSpec {
    dims: ModelDims,
    groups: usize,
    group: usize,
    dtype: DType,
    page_size: usize,
    transforms: Vec<TransformId>,
    page_bytes: usize,
    page_stride: usize,
    /// [`SequenceSharding::NONE`] and 0 unless the cache holds one sequence shard.
    sharding: SequenceSharding,
    shard: usize,
}

impl ShardSpec {
    /// The cache of latent group `plan.group` of `plan.groups` (the plan's head split does
    /// not change the cache), one layer per entry of `transforms`.
    pub fn new(
        dims: ModelDims,
        plan: &ShardPlan,
        dtype: DType,
        page_size: usize,
        transforms: Vec<TransformId>,
    ) -> Result<Self> {
        let checked = ShardPlan::new(&dims, plan.groups, plan.group)?;
        if (checked.slice_start, checked.slice_width) != (plan.slice_start, plan.slice_width) {
            return Err(Error::invalid(format!(
                "shard plan slice [{}, +{}) does not belong to d_c = {} in {} groups",
                plan.slice_start, plan.slice_width, dims.d_c, plan.groups
            )));
        }
        if page_size == 0 || page_size > MAX_PAGE_SIZE {
            return Err(Error::invalid(format!(
                "page size must be between 1 and {MAX_PAGE_SIZE} tokens, got {page_size}"
            )));
        }
        if transforms.is_empty() || transforms.len() > MAX_LAYERS {
            return Err(Error::invalid(format!(
                "a cache needs between 1 and {MAX_LAYERS} layers, got {}",
                transforms.len()
            )));
        }
        // At most 2^16 tokens of 2^17 values of 4 bytes (2^35 bytes): checked anyway, for
        // 32-bit targets.
        let row_bytes = dtype.row_bytes(checked.slice_width, dims.d_r);
        let page_bytes = page_size
            .checked_mul(row_bytes)
            .ok_or_else(|| Error::invalid("page size in bytes overflows"))?;
        let page_stride = page_bytes
            .checked_next_multiple_of(PAGE_ALIGN)
            .ok_or_else(|| Error::invalid("page size in bytes overflows"))?;
        Ok(ShardSpec {
            dims,
            groups: plan.groups,
            group: plan.group,
            dtype,
            page_size,
            transforms,
            page_bytes,
            page_stride,
            sharding: SequenceSharding::NONE,
            shard: 0,
        })
    }

    /// The cache of rank `plan` of a hybrid deployment: latent group `plan.latent.group`
    /// of the tokens on sequence shard `plan.shard`.
    pub fn for_hybrid(
        dims: ModelDims,
        plan: &HybridPlan,
        dtype: DType,
        page_size: usize,
        transforms: Vec<TransformId>,
    ) -> Result<Self> {
        Self::new(dims, &plan.latent, dtype, page_size, transforms)?
            .with_sequence_shard(plan.sharding, plan.shard)
    }

    /// The same cache holding only the tokens of sequence shard `shard` of `sharding`
    /// (`SequenceSharding::NONE` and 0: every token).
    pub fn with_sequence_shard(mut self, sharding: SequenceSharding, shard: usize) -> Result<Self> {
        let sharding = SequenceSharding::new(sharding.shards, sharding.interleave)?;
        sharding.check_shard(shard)?;
        // one spelling of "no sequence sharding", so that equal caches compare equal
        self.sharding = if sharding.shards == 1 {
            SequenceSharding::NONE
        } else {
            sharding
        };
        self.shard = shard;
        Ok(self)
    }

    pub fn dims(&self) -> &ModelDims {
        &self.dims
    }
    pub fn groups(&self) -> usize {
        self.groups
    }
    pub fn group(&self) -> usize {
        self.group
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn layers(&self) -> usize {
        self.transforms.len()
    }
    pub fn transforms(&self) -> &[TransformId] {
        &self.transforms
    }
    /// How the deployment spreads a sequence's tokens over sequence shards
    /// ([`SequenceSharding::NONE`] when this cache holds every token).
    pub fn sequence_sharding(&self) -> SequenceSharding {
        self.sharding
    }
    /// The sequence shard this cache holds (0 without sequence sharding).
    pub fn sequence_shard(&self) -> usize {
        self.shard
    }
    /// Whether the cache holds one sequence shard of several.
    pub fn is_sequence_shard(&self) -> bool {
        self.sharding.shards > 1
    }
    /// Latent columns per row, `d_c / g`.
    pub fn slice_width(&self) -> usize {
        self.dims.d_c / self.groups
    }
    /// First latent column of this group's slice.
    pub fn slice_start(&self) -> usize {
        self.group * self.slice_width()
    }
    /// Elements per cached row: the latent slice then the RoPE key.
    pub fn row_width(&self) -> usize {
        self.slice_width() + self.dims.d_r
    }
    /// Bytes per cached row ([`DType::row_bytes`]).
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.slice_width(), self.dims.d_r)
    }
    /// Bytes of the rows of one page.
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }
    /// Distance between consecutive pages: `page_bytes` rounded up to [`PAGE_ALIGN`].
    pub fn page_stride(&self) -> usize {
        self.page_stride
    }

    /// The same cache with another element type.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        let plan =
            ShardPlan::new(&self.dims, self.groups, self.group).expect("checked at creation");
        Self::new(
            self.dims,
            &plan,
            dtype,
            self.page_size,
            self.transforms.clone(),
        )
        .and_then(|s| s.with_sequence_shard(self.sharding, self.shard))
        .expect("every element type fits a valid spec")
    }

    /// The same cache for another latent group.
    pub fn for_group(&self, group: usize) -> Result<Self> {
        let plan = ShardPlan::new(&self.dims, self.groups, group)?;
        Self::new(
            self.dims,
            &plan,
            self.dtype,
            self.page_size,
            self.transforms.clone(),
        )?
        .with_sequence_shard(self.sharding, self.shard)
    }
}

/// Refuses values the element type cannot hold: NaN, infinities, and magnitudes that
/// would round to infinity (above 65504 in f16). A cached NaN would poison every later
/// decode of its sequence, so it is stopped at the door.
pub(crate) fn check_representable(dtype: DType, values: &[f64], what: &str) -> Result<()> {
    let max = match dtype {
        // FP8: latent values are scaled per block (any bf16-range value fits an f32
        // scale), the RoPE key is bf16
        DType::Bf16 | DType::Fp8E4m3 => bf16::MAX.to_f64(),
        DType::F16 => f16::MAX.to_f64(),
        DType::F32 => f32::MAX as f64,
    };
    match values.iter().position(|v| v.is_nan() || v.abs() > max) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(format!(
            "{what}: value {} at index {i} is not a finite {} number",
            values[i],
            dtype.name()
        ))),
    }
}

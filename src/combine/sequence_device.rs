//! The sequence-shard merges of [`super::sequence`] on the GPU (feature `cuda`), over
//! the partial outputs and log-sum-exps that [`DeviceRank::decode_sequence_shard`]
//! leaves on the device: the same two merges with the same arithmetic (f64 weights and
//! packs, small kernels of sequence.cu), ending with the TPLA sum over latent groups.
//! - In process, for ranks emulated on one GPU (each its own [`DeviceRank`], ranks
//!   numbered `group * shards + shard` as [`crate::geometry::HybridPlan`] does):
//!   [`merge_by_lse_on_device`] (a) and [`merge_packed_on_device`] (b): one kernel each
//!   over every rank's buffers (up to
//!   [`MAX_IN_PROCESS_RANKS`](crate::attention::cuda::MAX_IN_PROCESS_RANKS)), on the
//!   first rank's stream, in the arithmetic of the collectives (sums in rank order).
//! - Through NCCL, one rank per GPU (feature `nccl`): [`DeviceRank::merge_by_lse_nccl`]
//!   (an all-gather of the group's log-sum-exps, the rescale, one all-reduce over every
//!   rank) and [`DeviceRank::merge_packed_nccl`] (pack, an f64 all-reduce over the
//!   group's shards, unpack, the f32 TPLA all-reduce over the ranks of one shard index).
//!
//! Afterwards every rank's [`DeviceRank::partial`] holds the merged output of the layer
//! (the first `batch * heads * d_v` values). Which merge to use: see [`super::sequence`]
//! and benches/RESULTS.md, "Sequence-shard merges".

use crate::attention::cuda::{CUstream, RankBuffers, SequenceKernels};
use crate::device_rank::DeviceRank;
use crate::error::{Error, ErrorKind, Result};
use std::borrow::BorrowMut;
use std::sync::Arc;

/// The device addresses of one rank's part in a merge.
#[derive(Clone, Copy)]
struct Ptrs {
    partial: u64,
    lse: u64,
    bounds: u64,
    error: u64,
}

fn zero_async(ptr: u64, bytes: usize, stream: CUstream) -> Result<()> {
    // SAFETY: as copy_async.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, stream as _) }.map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            format!("CUDA: clearing a merge's error word failed: {e}"),
        )
    })
}

fn sync(stream: CUstream) -> Result<()> {
    // SAFETY: a live stream of the bound context.
    unsafe { cudarc::driver::result::stream::synchronize(stream as _) }.map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            format!("CUDA: waiting for a sequence merge failed: {e}"),
        )
    })
}

fn read_error(rank: &DeviceRank, ptr: u64) -> Result<()> {
    let mut bits = [0u32];
    rank.backend().device().bind()?;
    // SAFETY: the rank's own live error word; the stream was synchronised.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bits, ptr) }.map_err(|e| {
        Error::new(
            ErrorKind::Backend,
            format!("CUDA: reading a merge's error word failed: {e}"),
        )
    })?;
    crate::combine::sequence::merge_error(bits[0])
}

/// Checks `ranks` form a whole hybrid deployment on one GPU, in rank order, for a step
/// of `batch`, and returns (groups, shards).
fn check_deployment<R: BorrowMut<DeviceRank>>(
    ranks: &[R],
    layer: usize,
    batch: usize,
) -> Result<(usize, usize)> {
    let first = ranks
        .first()
        .map(|r| r.borrow())
        .ok_or_else(|| Error::invalid("a sequence merge needs at least one rank"))?;
    let plan = first.hybrid_plan();
    let (groups, shards) = (plan.latent.groups, plan.sharding.shards);
    if ranks.len() != groups * shards {
        return Err(Error::invalid(format!(
            "{} ranks given, the deployment of {groups} latent groups x {shards} sequence \
             shards has {}",
            ranks.len(),
            groups * shards
        )));
    }
    let ordinal = first.backend().device().ordinal();
    for (r, rank) in ranks.iter().enumerate() {
        let rank: &DeviceRank = rank.borrow();
        let p = rank.hybrid_plan();
        if p.sharding != plan.sharding || p.latent.groups != groups || p.rank() != r {
            return Err(Error::mismatch(format!(
                "rank {r} holds rank {} of {} latent groups x {:?}; the ranks must be given \
                 in rank order, all of one deployment",
                p.rank(),
                p.latent.groups,
                p.sharding
            )));
        }
        if rank.dims() != first.dims() || rank.plan().heads != plan.latent.heads {
            return Err(Error::mismatch(format!(
                "rank {r} belongs to another model geometry"
            )));
        }
        if rank.backend().device().ordinal() != ordinal {
            return Err(Error::mismatch(format!(
                "rank {r} is on device {}, rank 0 on device {ordinal}: the in-process merge \
                 runs on one GPU (across GPUs, merge through NCCL)",
                rank.backend().device().ordinal()
            )));
        }
        check_batch(rank, batch)?;
        if layer >= rank.layer_count() {
            return Err(Error::out_of_range(format!(
                "layer {layer} is out of range for {} layers",
                rank.layer_count()
            )));
        }
    }
    Ok((groups, shards))
}

fn check_batch(rank: &DeviceRank, batch: usize) -> Result<()> {
    if batch == 0 || batch > rank.max_batch() {
        return Err(Error::invalid(format!(
            "a step decodes 1 to {} sequences, got {batch}",
            rank.max_batch()
        )));
    }
    Ok(())
}

fn check_bounds(rank: &DeviceRank, r: usize, layer: usize, batch: usize) -> Result<()> {
    if rank.bounds_batch(layer) != Some(batch) {
        return Err(Error::invalid(format!(
            "rank {r}'s last step of layer {layer} wrote no logit bounds for a batch of \
             {batch}: merge (b) needs decode_sequence_shard with a RoPE key norm bound"
        )));
    }
    Ok(())
}

/// Every rank's merge addresses, and the kernels (rank 0's: one context).
fn parts<R: BorrowMut<DeviceRank>>(
    ranks: &mut [R],
    shards: usize,
    layer: usize,
) -> Result<(Arc<SequenceKernels>, Vec<Ptrs>)> {
    let mut kernels = None;
    let mut ptrs = Vec::with_capacity(ranks.len());
    for rank in ranks.iter_mut() {
        let (k, p) = rank.borrow_mut().merge_parts(shards, layer)?;
        kernels.get_or_insert(k);
        ptrs.push(Ptrs {
            partial: p.partial.ptr(),
            lse: p.lse.ptr(),
            bounds: p.bounds.ptr(),
            error: p.scratch.error.ptr(),
        });
    }
    Ok((kernels.expect("at least one rank"), ptrs))
}

/// Every rank's buffers for the in-process merge kernels (refuses more ranks than they
/// take).
fn rank_buffers(groups: usize, shards: usize, ptrs: &[Ptrs]) -> Result<RankBuffers> {
    let addresses: Vec<(u64, u64, u64)> =
        ptrs.iter().map(|p| (p.partial, p.lse, p.bounds)).collect();
    RankBuffers::new(groups, shards, &addresses)
}

/// Merge (a) over every rank of a hybrid deployment emulated on one GPU (`ranks` in rank
/// order, owned or borrowed, each after [`DeviceRank::decode_sequence_shard`] of `layer`
/// for `batch` sequences): each rank's outputs are weighed by `e^(l_own - L)` (L the
/// log-sum-exp of its latent group's shards) and the outputs of all ranks summed (the
/// shards' merge and the groups' TPLA sum in one), by one kernel. Synchronous: returns
/// when every rank's [`DeviceRank::partial`] holds the merged output.
pub fn merge_by_lse_on_device<R: BorrowMut<DeviceRank>>(
    ranks: &mut [R],
    layer: usize,
    batch: usize,
) -> Result<()> {
    let (groups, shards) = check_deployment(ranks, layer, batch)?;
    let (heads, d_v) = (ranks[0].borrow().plan().heads, ranks[0].borrow().dims().d_v);
    let (k, ptrs) = parts(ranks, shards, layer)?;
    let buffers = rank_buffers(groups, shards, &ptrs)?;
    let device = ranks[0].borrow().backend().device().clone();
    // every rank's decode is done before rank 0's stream reads it
    device.synchronize()?;
    let stream = ranks[0].borrow().stream();
    // SAFETY: the ranks' own buffers (distinct: check_deployment): partials of max_batch
    // * heads * d_v f32 and log-sum-exps of max_batch * heads f32, batch <= max_batch.
    unsafe { k.launch_merge_lse_all(&buffers, batch * heads, d_v, stream)? };
    sync(stream)
}

/// Merge (b) over every rank of a hybrid deployment emulated on one GPU (`ranks` as in
/// [`merge_by_lse_on_device`], each after [`DeviceRank::decode_sequence_shard`] with a
/// RoPE key norm bound, so that it holds the shared logit bounds), by one kernel: each
/// rank's outputs packed against its bounds in f64, each latent group's packs summed and
/// divided, then the groups summed. Synchronous; a bound that is not one (a log-sum-exp
/// more than [`PACKED_EXPONENT_LIMIT`](crate::combine::sequence::PACKED_EXPONENT_LIMIT)
/// above it) is an `InvalidArgument` error, as on the CPU.
pub fn merge_packed_on_device<R: BorrowMut<DeviceRank>>(
    ranks: &mut [R],
    layer: usize,
    batch: usize,
) -> Result<()> {
    let (groups, shards) = check_deployment(ranks, layer, batch)?;
    for (r, rank) in ranks.iter().enumerate() {
        check_bounds(rank.borrow(), r, layer, batch)?;
    }
    let (heads, d_v) = (ranks[0].borrow().plan().heads, ranks[0].borrow().dims().d_v);
    let (k, ptrs) = parts(ranks, shards, layer)?;
    let buffers = rank_buffers(groups, shards, &ptrs)?;
    let device = ranks[0].borrow().backend().device().clone();
    device.synchronize()?;
    let stream = ranks[0].borrow().stream();
    let error = ptrs[0].error;
    zero_async(error, 4, stream)?;
    // SAFETY: as in merge_by_lse_on_device, and bounds of max_batch * heads f64 (written
    // for this batch: check_bounds).
    unsafe { k.launch_merge_packed_all(&buffers, batch * heads, d_v, error, stream)? };
    sync(stream)?;
    read_error(ranks[0].borrow(), error)
}

#[cfg(feature = "nccl")]
mod nccl_merges {
    use super::*;

    fn copy_async(dst: u64, src: u64, bytes: usize, stream: CUstream) -> Result<()> {
        // SAFETY: callers pass live device ranges of `bytes` of one context and its stream.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream as _) }.map_err(
            |e| {
                Error::new(
                    ErrorKind::Backend,
                    format!("CUDA: a device copy of a sequence merge failed: {e}"),
                )
            },
        )
    }
    use crate::combine::nccl::Communicator;

    fn check_comm(
        rank: &DeviceRank,
        comm: &Communicator,
        what: &str,
        want: (usize, usize),
    ) -> Result<()> {
        if comm.device().ordinal() != rank.backend().device().ordinal() {
            return Err(Error::mismatch(format!(
                "the {what} communicator is on device {}, this rank on device {}",
                comm.device().ordinal(),
                rank.backend().device().ordinal()
            )));
        }
        if (comm.rank(), comm.ranks()) != want {
            return Err(Error::mismatch(format!(
                "the {what} communicator has this rank as rank {} of {}, the deployment \
                 needs rank {} of {}",
                comm.rank(),
                comm.ranks(),
                want.0,
                want.1
            )));
        }
        Ok(())
    }

    impl DeviceRank {
        /// Merge (a) through NCCL, one rank per GPU, after
        /// [`Self::decode_sequence_shard`] of `layer` for `batch` sequences: `group`
        /// joins the shards of this rank's latent group (this rank as its shard index),
        /// `all` every rank of the deployment (this rank as `group * shards + shard`;
        /// with one latent group both may be the same communicator). An all-gather of
        /// `4 * batch * heads` bytes per shard, the rescale, one all-reduce of the
        /// outputs: enqueued on [`Self::stream`], no host wait. Every rank must make the
        /// same call.
        pub fn merge_by_lse_nccl(
            &mut self,
            group: &Communicator,
            all: &Communicator,
            layer: usize,
            batch: usize,
        ) -> Result<()> {
            let plan = self.hybrid_plan();
            let shards = plan.sharding.shards;
            check_comm(self, group, "group", (plan.shard, shards))?;
            check_comm(self, all, "deployment", (plan.rank(), plan.ranks()))?;
            check_batch(self, batch)?;
            // the kernels launch in the calling thread's context
            self.backend().device().bind()?;
            let (rows, d_v) = (batch * self.plan().heads, self.dims().d_v);
            let stream = self.stream();
            let (k, p) = self.merge_parts(shards, layer)?;
            let (partial, lse, gathered) = (p.partial.ptr(), p.lse.ptr(), p.scratch.gathered.ptr());
            // SAFETY: the rank's own buffers (log-sum-exps of max_batch * heads f32, the
            // gathered scratch of shards times that, partials of that times d_v), which
            // live as long as the rank (whose drop waits for its stream).
            unsafe {
                if shards > 1 {
                    group.all_gather_raw(lse, gathered, rows, stream)?;
                } else {
                    copy_async(gathered, lse, 4 * rows, stream)?;
                }
                k.launch_rescale(
                    partial, rows, d_v, plan.shard, shards, gathered, rows, stream,
                )?;
                if all.ranks() > 1 {
                    all.all_reduce_raw(&[(partial, rows * d_v)], stream)?;
                }
            }
            Ok(())
        }

        /// Merge (b) through NCCL, one rank per GPU, after
        /// [`Self::decode_sequence_shard`] with a RoPE key norm bound: the pack, an f64
        /// all-reduce of `8 * batch * heads * (d_v + 2)` bytes over `group` (the shards
        /// of this rank's latent group, this rank as its shard index), the unpack, and
        /// the TPLA all-reduce over `same_shard` (the ranks of this shard index, one per
        /// latent group, this rank as its group; skipped with one group). Synchronous (it
        /// reads the pack's error word): a bound that is not one is an `InvalidArgument`
        /// error. Every rank must make the same call.
        pub fn merge_packed_nccl(
            &mut self,
            group: &Communicator,
            same_shard: &Communicator,
            layer: usize,
            batch: usize,
        ) -> Result<()> {
            let plan = self.hybrid_plan();
            let shards = plan.sharding.shards;
            check_comm(self, group, "group", (plan.shard, shards))?;
            check_comm(
                self,
                same_shard,
                "same-shard",
                (plan.latent.group, plan.latent.groups),
            )?;
            check_batch(self, batch)?;
            check_bounds(self, plan.rank(), layer, batch)?;
            self.backend().device().bind()?;
            let (rows, d_v) = (batch * self.plan().heads, self.dims().d_v);
            let stream = self.stream();
            let (k, p) = self.merge_parts(shards, layer)?;
            let (partial, lse, bounds) = (p.partial.ptr(), p.lse.ptr(), p.bounds.ptr());
            let (packed, error) = (p.scratch.packed.ptr(), p.scratch.error.ptr());
            zero_async(error, 4, stream)?;
            // SAFETY: the rank's own buffers, sized for max_batch (see merge_by_lse_nccl).
            unsafe {
                k.launch_pack(partial, lse, bounds, rows, d_v, packed, error, stream)?;
                if shards > 1 {
                    group.all_reduce_f64_raw(packed, rows * (d_v + 2), stream)?;
                }
                k.launch_unpack(packed, rows, d_v, partial, error, stream)?;
                if same_shard.ranks() > 1 {
                    same_shard.all_reduce_raw(&[(partial, rows * d_v)], stream)?;
                }
            }
            sync(stream)?;
            read_error(self, error)
        }
    }
}

//! The kernels of the sequence-shard merges on the device (sequence.cu; the CPU form,
//! whose arithmetic they follow, is [`crate::combine::sequence`]): the fix-up of a
//! shard's empty batch entries, the rescale of merge (a), the shared logit bounds, pack
//! and unpack of merge (b) (the NCCL merges), and each merge over every rank of one
//! process in one kernel. One module per device (no
//! specialisation), compiled by NVRTC and cached on disk like the decode kernels.
//! [`crate::combine::sequence_device`] drives them.

use super::compile::{compile_cubin, Origin};
use super::driver::{arg, CUstream, CudaDevice, Function, Module};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

const SEQUENCE: &str = include_str!("sequence.cu");

/// Threads of a per-row or per-entry block (`__launch_bounds__(128)` in sequence.cu).
const ROW_THREADS: u32 = 128;
/// Most ranks of one deployment the in-process merges take (`MAX_RANKS` in sequence.cu:
/// their buffers pass by value, as one kernel parameter).
pub const MAX_IN_PROCESS_RANKS: usize = 32;

/// The kernel parameter of the in-process merges: every rank's buffers by rank
/// (`RankBuffers` in sequence.cu); entries past the rank count are unused.
#[repr(C)]
#[derive(Clone, Copy)]
struct RankTable {
    /// `[rows][width]` f32 partial outputs; the merged output is written back to each.
    partial: [u64; MAX_IN_PROCESS_RANKS],
    /// `[rows]` f32 log-sum-exps.
    lse: [u64; MAX_IN_PROCESS_RANKS],
    /// `[rows]` f64 logit bounds (merge (b)).
    bound: [u64; MAX_IN_PROCESS_RANKS],
}

/// The buffers of every rank of an in-process merge of `groups x shards` ranks.
pub(crate) struct RankBuffers {
    table: RankTable,
    groups: i32,
    shards: i32,
}

impl RankBuffers {
    /// Rank `k`'s (partial, log-sum-exps, bounds) device addresses at `ranks[k]`, for
    /// `groups x shards` ranks: 1 to [`MAX_IN_PROCESS_RANKS`] of them.
    pub(crate) fn new(groups: usize, shards: usize, ranks: &[(u64, u64, u64)]) -> Result<Self> {
        let n = groups.saturating_mul(shards);
        if n == 0 || n > MAX_IN_PROCESS_RANKS {
            return Err(Error::invalid(format!(
                "the in-process merge takes 1 to {MAX_IN_PROCESS_RANKS} ranks, the deployment \
                 of {groups} latent groups x {shards} sequence shards has {n}"
            )));
        }
        if ranks.len() != n {
            return Err(Error::invalid(format!(
                "{} ranks' buffers for a deployment of {n} ranks",
                ranks.len()
            )));
        }
        let mut table = RankTable {
            partial: [0; MAX_IN_PROCESS_RANKS],
            lse: [0; MAX_IN_PROCESS_RANKS],
            bound: [0; MAX_IN_PROCESS_RANKS],
        };
        for (k, &(partial, lse, bound)) in ranks.iter().enumerate() {
            (table.partial[k], table.lse[k], table.bound[k]) = (partial, lse, bound);
        }
        Ok(RankBuffers {
            table,
            groups: groups as i32,
            shards: shards as i32,
        })
    }
}

fn options() -> Vec<String> {
    vec!["-std=c++17".into()]
}

/// The loaded sequence-merge kernels of one device.
#[derive(Debug)]
pub struct SequenceKernels {
    pub origin: Origin,
    empty: Function,
    rescale: Function,
    bounds: Function,
    pack: Function,
    unpack: Function,
    merge_lse_all: Function,
    merge_packed_all: Function,
    // Keeps the functions above valid; dropped last.
    _module: Module,
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} exceeds int32")))
}

fn grid_rows(rows: usize) -> Result<(u32, u32, u32)> {
    if rows == 0 {
        return Err(Error::invalid("a sequence merge of no rows"));
    }
    Ok((int(rows, "the rows of a merge")? as u32, 1, 1))
}

impl SequenceKernels {
    pub(crate) fn load(device: &Arc<CudaDevice>, cache_dir: Option<&Path>) -> Result<Self> {
        let (cubin, origin) = compile_cubin(
            SEQUENCE,
            "tpla_sequence",
            &options(),
            device.compute_capability(),
            false,
            cache_dir,
        )?;
        let module = Module::load(device, &cubin)?;
        Ok(SequenceKernels {
            origin,
            empty: module.function("tpla_seq_empty")?,
            rescale: module.function("tpla_seq_rescale")?,
            bounds: module.function("tpla_seq_bounds")?,
            pack: module.function("tpla_seq_pack")?,
            unpack: module.function("tpla_seq_unpack")?,
            merge_lse_all: module.function("tpla_seq_merge_lse_all")?,
            merge_packed_all: module.function("tpla_seq_merge_packed_all")?,
            _module: module,
        })
    }

    /// Zero latent outputs (`[batch][heads][width]` f32 at `latent`) and log-sum-exps of
    /// -inf (`[batch][heads]` at `lse`) for the batch entries whose slot (`slots`, `batch`
    /// i32) has length 0 in `seq_lens` (`num_slots` i32).
    ///
    /// # Safety
    /// Every address is live device memory of the sizes above; `stream` is live.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_empty(
        &self,
        slots: u64,
        seq_lens: u64,
        num_slots: usize,
        batch: usize,
        heads: usize,
        width: usize,
        latent: u64,
        lse: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (n, b, h, w) = (
            int(num_slots, "the slots")?,
            int(batch, "the batch")?,
            int(heads, "the heads")?,
            int(width, "the slice width")?,
        );
        let mut args = [
            arg(&slots),
            arg(&seq_lens),
            arg(&n),
            arg(&b),
            arg(&h),
            arg(&w),
            arg(&latent),
            arg(&lse),
        ];
        // SAFETY: caller contract for every size.
        unsafe {
            self.empty
                .launch(grid_rows(batch)?, ROW_THREADS, 0, stream, &mut args)
        }
    }

    /// Merge (a): rows `[rows][width]` at `out` times `e^(l_own - L)`, the log-sum-exps
    /// of shard `j` at `gathered + 4 * j * stride` (`rows` f32 each).
    ///
    /// # Safety
    /// `out` holds `rows * width` f32, `gathered` `shards` runs of `stride >= rows` f32;
    /// `stream` is live.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_rescale(
        &self,
        out: u64,
        rows: usize,
        width: usize,
        shard: usize,
        shards: usize,
        gathered: u64,
        stride: usize,
        stream: CUstream,
    ) -> Result<()> {
        if shard >= shards || stride < rows {
            return Err(Error::invalid(format!(
                "shard {shard} of {shards}, {rows} rows a stride of {stride} apart"
            )));
        }
        let (r, w, j, s) = (
            int(rows, "the rows")?,
            int(width, "the width")?,
            int(shard, "the shard")?,
            int(shards, "the shards")?,
        );
        let st = stride as i64;
        let mut args = [
            arg(&out),
            arg(&r),
            arg(&w),
            arg(&j),
            arg(&s),
            arg(&gathered),
            arg(&st),
        ];
        // SAFETY: caller contract.
        unsafe {
            self.rescale
                .launch(grid_rows(rows)?, ROW_THREADS, 0, stream, &mut args)
        }
    }

    /// The shared logit bounds (f64, `rows` at `bound`) of query rows `q`
    /// (`[rows][slice_width + d_r]` f32).
    ///
    /// # Safety
    /// Live device buffers of those sizes; `stream` is live.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_bounds(
        &self,
        q: u64,
        rows: usize,
        slice_width: usize,
        d_r: usize,
        latent_norm: f64,
        rope_norm: f64,
        bound: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (r, w, d) = (
            int(rows, "the rows")?,
            int(slice_width, "the slice width")?,
            int(d_r, "the RoPE width")?,
        );
        let mut args = [
            arg(&q),
            arg(&r),
            arg(&w),
            arg(&d),
            arg(&latent_norm),
            arg(&rope_norm),
            arg(&bound),
        ];
        let per_block = (ROW_THREADS / 32) as usize;
        let grid = (rows.div_ceil(per_block) as u32, 1, 1);
        grid_rows(rows)?;
        // SAFETY: caller contract.
        unsafe { self.bounds.launch(grid, ROW_THREADS, 0, stream, &mut args) }
    }

    /// Merge (b), pack: `[rows][width + 2]` f64 at `packed` from the outputs `out`
    /// (`[rows][width]` f32), log-sum-exps `lse` (`rows` f32) and bounds `bound` (`rows`
    /// f64); error bits into the `u32` at `error`.
    ///
    /// # Safety
    /// Live device buffers of those sizes; `stream` is live.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_pack(
        &self,
        out: u64,
        lse: u64,
        bound: u64,
        rows: usize,
        width: usize,
        packed: u64,
        error: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (r, w) = (int(rows, "the rows")?, int(width, "the width")?);
        let mut args = [
            arg(&out),
            arg(&lse),
            arg(&bound),
            arg(&r),
            arg(&w),
            arg(&packed),
            arg(&error),
        ];
        // SAFETY: caller contract.
        unsafe {
            self.pack
                .launch(grid_rows(rows)?, ROW_THREADS, 0, stream, &mut args)
        }
    }

    /// Merge (b), unpack: `[rows][width]` f32 at `out` from the summed packs at `packed`;
    /// error bits into the `u32` at `error`.
    ///
    /// # Safety
    /// Live device buffers of those sizes; `stream` is live.
    pub(crate) unsafe fn launch_unpack(
        &self,
        packed: u64,
        rows: usize,
        width: usize,
        out: u64,
        error: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (r, w) = (int(rows, "the rows")?, int(width, "the width")?);
        let mut args = [arg(&packed), arg(&r), arg(&w), arg(&out), arg(&error)];
        // SAFETY: caller contract.
        unsafe {
            self.unpack
                .launch(grid_rows(rows)?, ROW_THREADS, 0, stream, &mut args)
        }
    }

    /// Merge (a) over the ranks of `ranks`, `rows` rows of `width` outputs each: every
    /// rank's partial ends holding the merged output.
    ///
    /// # Safety
    /// The addresses in `ranks` are live device buffers of those sizes (partials
    /// `[rows][width]` f32, log-sum-exps `rows` f32), distinct per rank; `stream` is live.
    pub(crate) unsafe fn launch_merge_lse_all(
        &self,
        ranks: &RankBuffers,
        rows: usize,
        width: usize,
        stream: CUstream,
    ) -> Result<()> {
        let (r, w) = (int(rows, "the rows")?, int(width, "the width")?);
        let mut args = [
            arg(&ranks.table),
            arg(&ranks.groups),
            arg(&ranks.shards),
            arg(&r),
            arg(&w),
        ];
        // SAFETY: caller contract.
        unsafe {
            self.merge_lse_all
                .launch(grid_rows(rows)?, ROW_THREADS, 0, stream, &mut args)
        }
    }

    /// Merge (b) over the ranks of `ranks`, as [`Self::launch_merge_lse_all`], with each
    /// rank's logit bounds; error bits into the `u32` at `error`.
    ///
    /// # Safety
    /// As [`Self::launch_merge_lse_all`], and the bounds are `rows` f64 each.
    pub(crate) unsafe fn launch_merge_packed_all(
        &self,
        ranks: &RankBuffers,
        rows: usize,
        width: usize,
        error: u64,
        stream: CUstream,
    ) -> Result<()> {
        let (r, w) = (int(rows, "the rows")?, int(width, "the width")?);
        let mut args = [
            arg(&ranks.table),
            arg(&ranks.groups),
            arg(&ranks.shards),
            arg(&r),
            arg(&w),
            arg(&error),
        ];
        // SAFETY: caller contract.
        unsafe {
            self.merge_packed_all
                .launch(grid_rows(rows)?, ROW_THREADS, 0, stream, &mut args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::cuda::compile::{compile, nvrtc_version};

    /// The merge kernels compile for Hopper and Ampere where libnvrtc is present (no GPU
    /// needed), without spills.
    #[test]
    fn sequence_sources_compile_without_spills() {
        if let Err(e) = nvrtc_version() {
            eprintln!("skipping: {e}");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let mut options = options();
            options.push(format!("--gpu-architecture={arch}"));
            options.push("--ptxas-options=-v".into());
            let (cubin, log) = compile(SEQUENCE, "sequence_test", &options).unwrap();
            assert!(cubin.starts_with(b"\x7fELF"), "not a cubin");
            for line in log.lines().filter(|l| l.contains("spill")) {
                assert!(
                    line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                    "{arch}: {line}"
                );
            }
        }
    }
}

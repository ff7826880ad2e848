//! The kernels of the engine path (engine.cu): the plan header, the per-decode check of
//! the engine's block table and lengths, the fix-up of empty and faulted batch entries,
//! and the append into the engine's pool. One module per slice width, compiled by NVRTC
//! for the device (no architecture-specific instructions) and cached on disk like the
//! decode kernels.

use super::compile::{compile_cubin, Origin};
use super::decode::{DecodePlan, PoolRef};
use super::driver::{arg, CUstream, CudaDevice, Function, Module};
use super::kernels::{DecodeKernel, PAGE_SIZE};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

const COMMON: &str = include_str!("common.cuh");
const ENGINE: &str = include_str!("engine.cu");

/// Threads of an append block (`APPEND_THREADS` in engine.cu).
pub(crate) const APPEND_THREADS: u32 = 256;
/// Threads of a check or finish block.
const ENTRY_THREADS: u32 = 128;

/// The module's source and NVRTC options for slices of `slice_width`.
fn source_and_options(slice_width: usize) -> (String, Vec<String>) {
    (
        [COMMON, ENGINE].concat(),
        vec![
            "-std=c++17".into(),
            format!("-DSLICE={slice_width}"),
            format!("-DPAGE={PAGE_SIZE}"),
        ],
    )
}

/// The loaded engine kernels of one slice width.
#[derive(Debug)]
pub struct EngineKernels {
    pub slice_width: usize,
    pub origin: Origin,
    pub(crate) plan: Function,
    pub(crate) check: Function,
    pub(crate) finish: Function,
    pub(crate) append: Function,
    pub(crate) copy_rows: Function,
    pub(crate) rope_rows: Function,
    pub(crate) round_bf16: Function,
    // Keeps the functions above valid; dropped last.
    _module: Module,
}

impl EngineKernels {
    pub(crate) fn load(
        device: &Arc<CudaDevice>,
        slice_width: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        let (source, options) = source_and_options(slice_width);
        let (cubin, origin) = compile_cubin(
            &source,
            &format!("tpla_engine_w{slice_width}"),
            &options,
            device.compute_capability(),
            false,
            cache_dir,
        )?;
        let module = Module::load(device, &cubin)?;
        Ok(EngineKernels {
            slice_width,
            origin,
            plan: module.function("tpla_engine_plan")?,
            check: module.function("tpla_engine_check")?,
            finish: module.function("tpla_engine_finish")?,
            append: module.function("tpla_engine_append")?,
            copy_rows: module.function("tpla_engine_copy_rows")?,
            rope_rows: module.function("tpla_engine_rope_rows")?,
            round_bf16: module.function("tpla_engine_round_bf16")?,
            _module: module,
        })
    }
}

/// The plan header after `[MAGIC, KIND_CUDA]` for `plan` over block tables `width`
/// pages wide: batch, heads, workspace words, splits, kernel tag, width.
fn header(plan: &DecodePlan, width: usize) -> Result<[i32; 6]> {
    let c = plan.config();
    let tag = ((c.kernel == DecodeKernel::Wgmma) as i32) << 28
        | (c.heads_tile as i32) << 16
        | (c.slice_width as i32) << 4
        | c.stages as i32;
    let word = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} exceeds int32")))
    };
    Ok([
        word(plan.batch(), "the batch")?,
        word(plan.shape().heads, "the heads")?,
        word(plan.layout().bytes / 4, "the workspace's words")?,
        word(plan.splits(), "the splits")?,
        tag,
        word(width, "the block table width")?,
    ])
}

impl EngineKernels {
    /// Writes the header of `plan` (over block tables `width` pages wide) into its
    /// workspace: one kernel on `stream`.
    ///
    /// # Safety
    /// The plan's workspace is live device memory of its layout's size; `stream` is live.
    pub(crate) unsafe fn launch_plan(
        &self,
        plan: &DecodePlan,
        width: usize,
        stream: CUstream,
    ) -> Result<()> {
        let [b, h, words, splits, tag, width] = header(plan, width)?;
        let ws = plan.workspace();
        let mut args = [
            arg(&ws),
            arg(&b),
            arg(&h),
            arg(&words),
            arg(&splits),
            arg(&tag),
            arg(&width),
        ];
        // SAFETY: writes the header words of the workspace (caller contract).
        unsafe { self.plan.launch((1, 1, 1), 32, 0, stream, &mut args) }
    }

    /// The engine path's decode on `stream`: the check of the lengths and page indices
    /// of `pool` (slot b = batch entry b, `pool.max_pages` the table's width) against the
    /// plan header, the decode (and its merge) over the checked slots, the fix-up of
    /// empty and faulted entries. `faults`: 0 or a device `u32`.
    ///
    /// # Safety
    /// As [`DecodePlan::launch`]; `pool` describes live device memory with `num_slots`
    /// equal to the plan's batch; `faults` is 0 or a live device `u32`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_decode(
        &self,
        plan: &DecodePlan,
        pool: &PoolRef,
        faults: u64,
        q: u64,
        out: u64,
        lse: u64,
        stream: CUstream,
    ) -> Result<()> {
        if pool.num_slots != plan.batch() {
            return Err(Error::invalid(format!(
                "the engine path reads one table row per batch entry: {} rows for a batch of {}",
                pool.num_slots,
                plan.batch()
            )));
        }
        pool.check_supported()?;
        let [b, h, words, splits, tag, width] = header(plan, pool.max_pages)?;
        let pages = i64::try_from(pool.pages).unwrap_or(i64::MAX);
        let (ws, table, lens) = (plan.workspace(), pool.table, pool.lens);
        let mut check_args = [
            arg(&ws),
            arg(&table),
            arg(&lens),
            arg(&b),
            arg(&h),
            arg(&words),
            arg(&splits),
            arg(&tag),
            arg(&width),
            arg(&pages),
            arg(&faults),
        ];
        let grid = (plan.batch() as u32, 1, 1);
        // SAFETY: the check reads at most `width` table entries per row and `batch`
        // lengths and writes the workspace's slots and statuses; the decode reads only
        // the slots the check let through, whose pages it verified; the fix-up writes
        // `out` and `lse` of non-OK entries (caller contract for all sizes).
        unsafe {
            self.check
                .launch(grid, ENTRY_THREADS, 0, stream, &mut check_args)?;
            let slots = ws + plan.layout().slots as u64;
            plan.launch_pool(pool, slots, q, out, lse, stream)?;
            let mut finish_args = [arg(&ws), arg(&b), arg(&h), arg(&out), arg(&lse)];
            self.finish
                .launch(grid, ENTRY_THREADS, 0, stream, &mut finish_args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::cuda::compile::{compile, nvrtc_version};
    use crate::attention::cuda::SLICE_WIDTHS;

    /// The engine kernels compile for Hopper and Ampere at every slice width where
    /// libnvrtc is present (no GPU needed), without spills.
    #[test]
    fn engine_sources_compile_without_spills() {
        if let Err(e) = nvrtc_version() {
            eprintln!("skipping: {e}");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            for w in SLICE_WIDTHS {
                let (source, mut options) = source_and_options(w);
                options.push(format!("--gpu-architecture={arch}"));
                options.push("--ptxas-options=-v".into());
                let (cubin, log) = compile(&source, "engine_test", &options).unwrap();
                assert!(cubin.starts_with(b"\x7fELF"), "not a cubin");
                for line in log.lines().filter(|l| l.contains("spill")) {
                    assert!(
                        line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                        "slice {w} {arch}: {line}"
                    );
                }
            }
        }
    }
}

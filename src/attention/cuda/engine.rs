//! The kernels of the engine path (engine.cu): the plan header, the per-decode check of
//! the engine's block table and lengths, the fix-up of empty and faulted batch entries,
//! and the append into the engine's pool. One module per slice width, compiled by NVRTC
//! for the device (no architecture-specific instructions) and cached on disk like the
//! decode kernels.

use super::compile::{compile_cubin, Origin};
use super::driver::{CudaDevice, Function, Module};
use super::kernels::PAGE_SIZE;
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

const COMMON: &str = include_str!("common.cuh");
const ENGINE: &str = include_str!("engine.cu");

/// Threads of an append block (`APPEND_THREADS` in engine.cu).
pub(crate) const APPEND_THREADS: u32 = 256;
/// Threads of a check or finish block.
pub(crate) const ENTRY_THREADS: u32 = 128;

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
            _module: module,
        })
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

//! The compiled kernels of one (slice width, heads tile) specialisation and the choice
//! of that specialisation.

use super::compile::{compile_cubin, Origin};
use super::driver::{CudaDevice, Function, Module};
use crate::error::{Error, Result};
use cudarc::driver::sys;
use std::path::Path;
use std::sync::Arc;

const SOURCE: &str = include_str!("decode.cu");

/// Rows per cache page on the device (the CPU cache's default too).
pub const PAGE_SIZE: usize = 64;
/// RoPE key width the kernels are built for.
pub const ROPE_WIDTH: usize = 64;
/// Latent slice widths the kernels are built for (d_c / g with d_c = 512).
pub const SLICE_WIDTHS: [usize; 4] = [64, 128, 256, 512];
/// Deepest cp.async pipeline (token tiles in flight per block, plus the one in use).
pub const MAX_STAGES: usize = 6;
/// Threads per decode block (8 warps).
pub const DECODE_THREADS: u32 = 256;
/// Tokens per tile of the decode kernel.
pub const TILE_TOKENS: usize = 64;

/// What a module is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    pub slice_width: usize,
    /// Heads per block (16, 32 or 64); a rank's heads are a multiple of it.
    pub heads_tile: usize,
    /// cp.async pipeline depth (2 to [`MAX_STAGES`]), as deep as shared memory allows.
    pub stages: usize,
    /// Blocks per multiprocessor the kernel is built for (registers and shared memory
    /// budgeted so that they fit): 2 where the output accumulator is small.
    pub blocks_per_sm: usize,
}

impl KernelConfig {
    /// The specialisation for `heads` query heads over slices of `slice_width`, or an
    /// `Unsupported` error naming what is supported.
    /// `max_stages` caps the pipeline depth (2 to [`MAX_STAGES`]).
    pub fn choose(
        device: &CudaDevice,
        heads: usize,
        slice_width: usize,
        d_r: usize,
        max_stages: usize,
    ) -> Result<Self> {
        if d_r != ROPE_WIDTH {
            return Err(Error::unsupported(format!(
                "the CUDA kernels are built for a RoPE width of {ROPE_WIDTH}, not {d_r}"
            )));
        }
        if !SLICE_WIDTHS.contains(&slice_width) {
            return Err(Error::unsupported(format!(
                "the CUDA kernels support latent slice widths {SLICE_WIDTHS:?}, not {slice_width}"
            )));
        }
        let heads_tile = heads.min(64);
        if !(heads == 16 || heads == 32 || (heads > 0 && heads % 64 == 0)) {
            return Err(Error::unsupported(format!(
                "the CUDA kernels need the rank's heads to be 16, 32, 64 or a multiple of 64, not {heads}"
            )));
        }
        // Two blocks per multiprocessor hide each other's barriers and softmax; they fit
        // when the f32 output accumulator is at most 32 registers per thread.
        let blocks_per_sm = if heads_tile * slice_width / DECODE_THREADS as usize <= 32 {
            2
        } else {
            1
        };
        let budget = |blocks: usize| {
            device
                .max_shared_per_block()
                .min(device.max_shared_per_sm() / blocks - 1024)
        };
        let choose_stages = |blocks| {
            (2..=max_stages.clamp(2, MAX_STAGES))
                .rev()
                .find(|&s| shared_bytes(slice_width, heads_tile, s) <= budget(blocks))
        };
        let (stages, blocks_per_sm) = match choose_stages(blocks_per_sm) {
            Some(s) => (s, blocks_per_sm),
            None => (
                choose_stages(1).ok_or_else(|| {
                    Error::unsupported(format!(
                        "{} allows {} bytes of shared memory per block; the decode kernel needs {}",
                        device.name(),
                        device.max_shared_per_block(),
                        shared_bytes(slice_width, heads_tile, 2)
                    ))
                })?,
                1,
            ),
        };
        Ok(KernelConfig {
            slice_width,
            heads_tile,
            stages,
            blocks_per_sm,
        })
    }

    fn options(&self) -> Vec<String> {
        vec![
            "-std=c++17".into(),
            format!("-DSLICE={}", self.slice_width),
            format!("-DHT={}", self.heads_tile),
            format!("-DPAGE={PAGE_SIZE}"),
            format!("-DSTAGES={}", self.stages),
            format!("-DMINB={}", self.blocks_per_sm),
        ]
    }
}

/// Bytes of the decode kernel's shared-memory layout (`struct Smem` in decode.cu; the
/// loaded module's `tpla_decode_smem_bytes` is checked against it).
pub fn shared_bytes(slice_width: usize, heads_tile: usize, stages: usize) -> usize {
    let row = slice_width + ROPE_WIDTH;
    let token_groups = 8 / (heads_tile / 16);
    stages * TILE_TOKENS * row * 2
        + heads_tile * row * 2
        + heads_tile * TILE_TOKENS * 2
        + token_groups * heads_tile * 4
        + 2 * heads_tile * 4
}

/// One loaded specialisation.
#[derive(Debug)]
pub struct Kernels {
    pub config: KernelConfig,
    pub origin: Origin,
    pub decode: Function,
    pub combine: Function,
    pub append: Function,
    pub fill_bf16: Function,
    pub fill_f32: Function,
    pub read_probe: Function,
    pub decode_shared_bytes: usize,
    /// Decode blocks resident per multiprocessor.
    pub decode_blocks_per_sm: usize,
    // Keeps the functions above valid; dropped last.
    _module: Module,
}

impl Kernels {
    pub fn load(
        device: &Arc<CudaDevice>,
        config: KernelConfig,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        let (cubin, origin) = compile_cubin(
            SOURCE,
            &format!(
                "tpla_decode_w{}_h{}_s{}_b{}",
                config.slice_width, config.heads_tile, config.stages, config.blocks_per_sm
            ),
            &config.options(),
            device.compute_capability(),
            cache_dir,
        )?;
        let module = Module::load(device, &cubin)?;
        let decode = module.function("tpla_decode")?;
        let expected = shared_bytes(config.slice_width, config.heads_tile, config.stages);
        let actual = module.global_i32("tpla_decode_smem_bytes")? as usize;
        if actual != expected {
            return Err(Error::new(
                crate::error::ErrorKind::Backend,
                format!(
                    "decode kernel shared layout is {actual} bytes, the host computed {expected}"
                ),
            ));
        }
        decode.set_max_dynamic_shared(actual)?;
        let mut blocks = 0i32;
        // SAFETY: live function handle, out-pointer to a live integer.
        unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut blocks,
                decode.raw(),
                DECODE_THREADS as i32,
                actual,
            )
        }
        .result()
        .map_err(super::driver::driver_err(
            "reading the decode kernel's occupancy",
        ))?;
        if blocks < 1 {
            return Err(Error::unsupported(format!(
                "the decode kernel ({actual} bytes of shared memory, {DECODE_THREADS} threads) \
                 cannot run on {}",
                device.name()
            )));
        }
        Ok(Kernels {
            config,
            origin,
            decode,
            combine: module.function("tpla_combine")?,
            append: module.function("tpla_append")?,
            fill_bf16: module.function("tpla_fill_bf16")?,
            fill_f32: module.function("tpla_fill_f32")?,
            read_probe: module.function("tpla_read_probe")?,
            decode_shared_bytes: actual,
            decode_blocks_per_sm: blocks as usize,
            _module: module,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::cuda::compile::{compile, nvrtc_version};

    /// Every specialisation compiles for Hopper and Ampere where libnvrtc is present
    /// (no GPU needed); ptxas must not spill registers to local memory.
    #[test]
    fn decode_source_compiles_without_spills() {
        if let Err(e) = nvrtc_version() {
            eprintln!("skipping: {e}");
            return;
        }
        for (cc, w, ht, stages, blocks_per_sm) in [
            ((9, 0), 512, 64, 2, 1),
            ((9, 0), 256, 64, 4, 1),
            ((9, 0), 512, 32, 2, 1),
            ((9, 0), 128, 64, 3, 2),
            ((9, 0), 64, 16, 6, 2),
            ((8, 0), 256, 32, 2, 1),
        ] {
            let config = KernelConfig {
                slice_width: w,
                heads_tile: ht,
                stages,
                blocks_per_sm,
            };
            let mut options = config.options();
            options.push(format!("--gpu-architecture=sm_{}{}", cc.0, cc.1));
            options.push("--ptxas-options=-v".into());
            let (cubin, log) = compile(SOURCE, "test", &options).unwrap();
            assert!(cubin.starts_with(b"\x7fELF"), "not a cubin");
            println!("{config:?} sm_{}{}:\n{log}", cc.0, cc.1);
            for line in log.lines().filter(|l| l.contains("spill")) {
                assert!(
                    line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                    "{config:?}: {line}"
                );
            }
        }
    }
}

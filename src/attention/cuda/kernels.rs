//! The compiled kernels of one specialisation (decode kernel, slice width, heads per
//! block, pipeline depth) and the choice of that specialisation.
//!
//! Two decode kernels: `wgmma` (decode_sm90.cu) on Hopper (compute capability 9.0) for
//! heads in multiples of 64, and `mma.sync` v3 (decode_v3.cu) on every other shape and
//! on Ampere/Ada (8.x). Each module also carries the split merge,
//! the device appends and the benchmark helpers (support.cu).

use super::compile::{compile_cubin, Origin};
use super::driver::{CudaDevice, Function, Module};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::sys;
use std::path::Path;
use std::sync::Arc;

const COMMON: &str = include_str!("common.cuh");
const SUPPORT: &str = include_str!("support.cu");
const DECODE_V3: &str = include_str!("decode_v3.cu");
const WGMMA: &str = include_str!("wgmma.cuh");
const DECODE_SM90: &str = include_str!("decode_sm90.cu");

/// Rows per cache page on the device (the CPU cache's default too).
pub const PAGE_SIZE: usize = 64;
/// RoPE key width the kernels are built for.
pub const ROPE_WIDTH: usize = 64;
/// Latent slice widths the kernels are built for (d_c / g with d_c = 512).
pub const SLICE_WIDTHS: [usize; 4] = [64, 128, 256, 512];
/// Deepest pipeline (token tiles in shared memory per block).
pub const MAX_STAGES: usize = 8;
/// Threads per block of the v3 decode kernel (8 warps).
const V3_THREADS: u32 = 256;
/// Threads per block of the Hopper decode kernel (two warpgroups).
const SM90_THREADS: u32 = 256;
/// Converted 16-bit stages of the FP8 kernel (`CONV_STAGES` in decode_sm90.cu): TOKENS one
/// per warpgroup, HEADS two that both read.
const FP8_CONV_STAGES: usize = 2;

/// Threads per block of the Hopper kernel of this shape (`BLOCK_THREADS` in
/// decode_sm90.cu): two warpgroups, and with FP8 in the HEADS mode a third that converts
/// the pages (`FP8_CONVERTER`).
fn sm90_threads(dtype: DType, slice_width: usize, heads_tile: usize) -> u32 {
    let converter =
        dtype == DType::Fp8E4m3 && Sm90Mode::of(slice_width, heads_tile) == Sm90Mode::Heads;
    SM90_THREADS + if converter { 128 } else { 0 }
}
/// The v3 kernel's deepest cp.async pipeline (deeper measured no faster).
const V3_MAX_STAGES: usize = 6;
/// Tokens per tile of the decode kernel.
pub const TILE_TOKENS: usize = 64;

/// Which decode kernel a module carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// v3: mma.sync with ldmatrix operands, cp.async tiles (sm_80 and newer).
    MmaSync,
    /// Hopper: wgmma from shared memory, TMA tiles on an mbarrier pipeline, a producer
    /// warp and two consumer warpgroups (sm_90a).
    Wgmma,
}

impl DecodeKernel {
    pub fn name(self) -> &'static str {
        match self {
            DecodeKernel::MmaSync => "mma.sync v3",
            DecodeKernel::Wgmma => "wgmma sm90",
        }
    }
}

/// What a module is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelConfig {
    pub kernel: DecodeKernel,
    pub slice_width: usize,
    /// Heads per block (v3: 16, 32 or 64; wgmma: 64, or 128 when both warpgroups share
    /// each K tile); a rank's heads are a multiple of it.
    pub heads_tile: usize,
    /// Pipeline depth (2 to [`MAX_STAGES`]), as deep as shared memory allows.
    pub stages: usize,
    /// Blocks per multiprocessor the kernel is built for (registers and shared memory
    /// budgeted so that they fit): 2 where the output accumulator is small.
    pub blocks_per_sm: usize,
    /// The cache rows the kernel reads: bf16, or FP8 e4m3 (DESIGN 7.1; the Hopper kernel
    /// only).
    pub dtype: DType,
}

impl KernelConfig {
    /// The specialisation for `heads` query heads over slices of `slice_width`, or an
    /// `Unsupported` error naming what is supported.
    /// `max_stages` caps the pipeline depth (2 to [`MAX_STAGES`]); `kernel` forces a
    /// decode kernel (`None`: the fastest one the device and shape allow); `dtype` is the
    /// cache's row type (bf16, or FP8 e4m3 on Hopper at slices up to 256).
    pub fn choose(
        device: &CudaDevice,
        heads: usize,
        slice_width: usize,
        d_r: usize,
        max_stages: usize,
        kernel: Option<DecodeKernel>,
        dtype: DType,
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
        let wgmma_fits = device.compute_capability() == (9, 0) && heads % 64 == 0;
        match dtype {
            DType::Bf16 => {}
            DType::Fp8E4m3
                if wgmma_fits && slice_width <= 256 && kernel != Some(DecodeKernel::MmaSync) =>
            {
                return Self::choose_wgmma(device, heads, slice_width, max_stages, dtype)
            }
            DType::Fp8E4m3 => {
                return Err(Error::unsupported(format!(
                    "FP8 caches decode on the wgmma kernel only: a Hopper GPU (compute capability \
                     9.0), heads in multiples of 64 and slices up to 256; {} has {:?}, the shape \
                     {heads} heads x {slice_width}",
                    device.name(),
                    device.compute_capability()
                )))
            }
            other => {
                return Err(Error::unsupported(format!(
                    "the CUDA kernels read bf16 or fp8_e4m3 caches, not {}",
                    other.name()
                )))
            }
        }
        match kernel {
            Some(DecodeKernel::Wgmma) if !wgmma_fits => {
                return Err(Error::unsupported(format!(
                "the wgmma decode kernel needs a Hopper GPU (compute capability 9.0) and heads in \
                     multiples of 64; {} has {:?}, the shape {heads} heads x {slice_width}",
                device.name(),
                device.compute_capability()
            )))
            }
            Some(DecodeKernel::Wgmma) | None if wgmma_fits => {
                return Self::choose_wgmma(device, heads, slice_width, max_stages, dtype)
            }
            _ => {}
        }
        let max_stages = max_stages.min(V3_MAX_STAGES);
        // Two blocks per multiprocessor hide each other's barriers and softmax; they fit
        // when the f32 output accumulator is at most 32 registers per thread.
        let blocks_per_sm = if heads_tile * slice_width / V3_THREADS as usize <= 32 {
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
            kernel: DecodeKernel::MmaSync,
            slice_width,
            heads_tile,
            stages,
            blocks_per_sm,
            dtype,
        })
    }

    /// The Hopper kernel: slices up to 256 take 128 heads per block where the rank's
    /// heads allow it (each K tile read once for both warpgroups), else 64 with the
    /// warpgroups taking alternate tiles (an even pipeline depth); slices of 512 take 64
    /// heads with the warpgroups splitting the output columns over a pair of tiles (two
    /// stages, the seesaw). Otherwise as many stages as shared memory holds. FP8 caches
    /// take the same modes but the seesaw (`stages` are then raw pages).
    fn choose_wgmma(
        device: &CudaDevice,
        heads: usize,
        slice_width: usize,
        max_stages: usize,
        dtype: DType,
    ) -> Result<Self> {
        let heads_tile = if heads % 128 == 0 && slice_width <= 256 {
            128
        } else {
            64
        };
        // TOKENS needs an even depth (a warpgroup owns the stages of its parity); the
        // COLUMNS seesaw keeps exactly one pair of tiles
        let (step, deepest) = match Sm90Mode::of(slice_width, heads_tile) {
            // (FP8: `stages` are raw pages; TOKENS' warpgroups own those of their parity)
            Sm90Mode::Tokens => (2, max_stages.clamp(2, MAX_STAGES)),
            Sm90Mode::Heads => (1, max_stages.clamp(2, MAX_STAGES)),
            Sm90Mode::Columns => (1, 2),
        };
        let stages = (2..=deepest)
            .rev()
            .filter(|s| s % step == 0)
            .find(|&s| {
                sm90_shared_bytes(slice_width, heads_tile, s, dtype) <= device.max_shared_per_block()
            })
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "{} allows {} bytes of shared memory per block; the wgmma decode kernel needs {}",
                    device.name(),
                    device.max_shared_per_block(),
                    sm90_shared_bytes(slice_width, heads_tile, 2, dtype)
                ))
            })?;
        Ok(KernelConfig {
            kernel: DecodeKernel::Wgmma,
            slice_width,
            heads_tile,
            stages,
            blocks_per_sm: 1,
            dtype,
        })
    }

    /// Threads per decode block.
    pub fn decode_threads(&self) -> u32 {
        match self.kernel {
            DecodeKernel::MmaSync => V3_THREADS,
            DecodeKernel::Wgmma => sm90_threads(self.dtype, self.slice_width, self.heads_tile),
        }
    }

    fn decode_shared_bytes(&self) -> usize {
        match self.kernel {
            DecodeKernel::MmaSync => shared_bytes(self.slice_width, self.heads_tile, self.stages),
            DecodeKernel::Wgmma => {
                sm90_shared_bytes(self.slice_width, self.heads_tile, self.stages, self.dtype)
            }
        }
    }

    /// The module's source text: the shared part, then the decode kernel.
    fn source(&self) -> String {
        match self.kernel {
            DecodeKernel::MmaSync => [COMMON, SUPPORT, DECODE_V3].concat(),
            DecodeKernel::Wgmma => [COMMON, SUPPORT, WGMMA, DECODE_SM90].concat(),
        }
    }

    fn options(&self) -> Vec<String> {
        let mut o = vec![
            "-std=c++17".into(),
            format!("-DSLICE={}", self.slice_width),
            format!("-DPAGE={PAGE_SIZE}"),
            format!("-DSTAGES={}", self.stages),
        ];
        match self.kernel {
            DecodeKernel::MmaSync => {
                o.push(format!("-DHT={}", self.heads_tile));
                o.push(format!("-DMINB={}", self.blocks_per_sm));
            }
            DecodeKernel::Wgmma => {
                o.push(format!(
                    "-DMODE={}",
                    Sm90Mode::of(self.slice_width, self.heads_tile) as u8
                ));
                if self.dtype == DType::Fp8E4m3 {
                    o.push("-DKV_FP8=1".into());
                }
            }
        }
        o
    }
}

/// How the Hopper kernel's two warpgroups share a block (`MODE_*` in decode_sm90.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sm90Mode {
    /// 64 heads, alternate tiles, merged at the end.
    Tokens = 0,
    /// 128 heads, 64 each, every tile read by both.
    Heads = 1,
    /// 64 heads, half the output columns each, P passed between them (slice 512).
    Columns = 2,
}

impl Sm90Mode {
    fn of(slice_width: usize, heads_tile: usize) -> Self {
        match (slice_width, heads_tile) {
            (512, _) => Sm90Mode::Columns,
            (_, 128) => Sm90Mode::Heads,
            _ => Sm90Mode::Tokens,
        }
    }
}

/// Bytes of the Hopper kernel's shared-memory layout (`SM_*` in decode_sm90.cu: K
/// stages, queries, the exchange of P and maxima, mbarriers and stage counters, the
/// CTA's schedule, and slack to align the swizzle atoms to 1024 bytes). FP8: two bf16
/// stages and `stages` raw pages before the queries (at a 1024-byte boundary), and with
/// the converting warpgroup (HEADS) the 16-bit stages' `full` and `empty` mbarriers beside
/// the raw pages'.
pub fn sm90_shared_bytes(
    slice_width: usize,
    heads_tile: usize,
    stages: usize,
    dtype: DType,
) -> usize {
    let row = slice_width + ROPE_WIDTH;
    let tile = row * TILE_TOKENS * 2;
    let mode = Sm90Mode::of(slice_width, heads_tile);
    let threads = sm90_threads(dtype, slice_width, heads_tile);
    let tiles = match dtype == DType::Fp8E4m3 {
        true => (FP8_CONV_STAGES * tile
            + stages * TILE_TOKENS * dtype.row_bytes(slice_width, ROPE_WIDTH))
        .next_multiple_of(1024),
        false => stages * tile,
    };
    let (exchange, barriers_per_stage) = match mode {
        // P_a's slot (64 x 64 bf16; P_b's is in Q's RoPE chunk), 64 maxima per
        // warpgroup; one mbarrier per 64-column chunk
        Sm90Mode::Columns => (64 * 64 * 2 + 2 * 64 * 4, row / 64),
        _ => (0, 1),
    };
    // the converting warpgroup's 16-bit stages are signalled by mbarriers, not copies
    let bf16_stage_barriers = if threads > SM90_THREADS {
        2 * FP8_CONV_STAGES
    } else {
        0
    };
    let warps = threads as usize / 32;
    // 8 bytes per mbarrier, 8 of counter (FP8: page flag) per stage, the CTA's schedule
    // (8 words and two per warp)
    tiles
        + heads_tile / 64 * tile
        + exchange
        + 8 * (stages * (barriers_per_stage + 1) + bf16_stage_barriers)
        + 4 * (8 + 2 * warps)
        + 1024
}

/// Bytes of the v3 decode kernel's shared-memory layout (`struct Smem` in decode_v3.cu;
/// the loaded module's `tpla_decode_smem_bytes` is checked against it).
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
    /// The merge of the wgmma kernel's sequence pieces (wgmma modules only).
    pub combine_pieces: Option<Function>,
    /// Device appends of f32 rows: into bf16 pools, and quantised into FP8 pools.
    pub append: Function,
    pub append_fp8: Function,
    pub fill_bf16: Function,
    pub fill_fp8: Function,
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
            &config.source(),
            &format!(
                "tpla_decode_{}_w{}_h{}_s{}_b{}_{}",
                match config.kernel {
                    DecodeKernel::MmaSync => "v3",
                    DecodeKernel::Wgmma => "sm90",
                },
                config.slice_width,
                config.heads_tile,
                config.stages,
                config.blocks_per_sm,
                config.dtype.name()
            ),
            &config.options(),
            device.compute_capability(),
            config.kernel == DecodeKernel::Wgmma,
            cache_dir,
        )?;
        let module = Module::load(device, &cubin)?;
        let decode = module.function("tpla_decode")?;
        let expected = config.decode_shared_bytes();
        let actual = module.global_i32("tpla_decode_smem_bytes")? as usize;
        if actual != expected {
            return Err(Error::new(
                crate::error::ErrorKind::Backend,
                format!(
                    "decode kernel shared layout is {actual} bytes, the host computed {expected}"
                ),
            ));
        }
        if config.kernel == DecodeKernel::Wgmma {
            // its roles are warpgroups (FP8: a third one converts): a block of another size
            // would wait forever at its barriers
            let threads = module.global_i32("tpla_decode_threads")?;
            if threads != config.decode_threads() as i32 {
                return Err(Error::new(
                    crate::error::ErrorKind::Backend,
                    format!(
                        "the decode kernel is built for blocks of {threads} threads, the host \
                         launches {}",
                        config.decode_threads()
                    ),
                ));
            }
        }
        decode.set_max_dynamic_shared(actual)?;
        let mut blocks = 0i32;
        // SAFETY: live function handle, out-pointer to a live integer.
        unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut blocks,
                decode.raw(),
                config.decode_threads() as i32,
                actual,
            )
        }
        .result()
        .map_err(super::driver::driver_err(
            "reading the decode kernel's occupancy",
        ))?;
        if blocks < 1 {
            return Err(Error::unsupported(format!(
                "the decode kernel ({actual} bytes of shared memory, {} threads) cannot run on {}",
                config.decode_threads(),
                device.name()
            )));
        }
        Ok(Kernels {
            config,
            origin,
            decode,
            combine: module.function("tpla_combine")?,
            combine_pieces: match config.kernel {
                DecodeKernel::Wgmma => Some(module.function("tpla_combine_pieces")?),
                DecodeKernel::MmaSync => None,
            },
            append: module.function("tpla_append")?,
            append_fp8: module.function("tpla_append_fp8")?,
            fill_bf16: module.function("tpla_fill_bf16")?,
            fill_fp8: module.function("tpla_fill_fp8")?,
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
    /// (no GPU needed); ptxas must not spill registers to local memory, and must not
    /// serialise the asynchronous wgmma instructions.
    #[test]
    fn decode_sources_compile_without_spills() {
        if let Err(e) = nvrtc_version() {
            eprintln!("skipping: {e}");
            return;
        }
        let v3 = |w, ht, stages, blocks_per_sm| KernelConfig {
            kernel: DecodeKernel::MmaSync,
            slice_width: w,
            heads_tile: ht,
            stages,
            blocks_per_sm,
            dtype: DType::Bf16,
        };
        let sm90 = |w, ht, stages| KernelConfig {
            kernel: DecodeKernel::Wgmma,
            slice_width: w,
            heads_tile: ht,
            stages,
            blocks_per_sm: 1,
            dtype: DType::Bf16,
        };
        let fp8 = |w, ht, stages| KernelConfig {
            dtype: DType::Fp8E4m3,
            ..sm90(w, ht, stages)
        };
        for (arch, config) in [
            ("sm_90", v3(512, 64, 2, 1)),
            ("sm_90", v3(256, 64, 4, 1)),
            ("sm_90", v3(512, 32, 2, 1)),
            ("sm_90", v3(128, 64, 3, 2)),
            ("sm_90", v3(64, 16, 6, 2)),
            ("sm_80", v3(256, 32, 2, 1)),
            ("sm_90a", sm90(256, 64, 4)),
            ("sm_90a", sm90(256, 128, 3)),
            ("sm_90a", sm90(128, 64, 8)),
            ("sm_90a", sm90(128, 128, 7)),
            ("sm_90a", sm90(64, 64, 8)),
            ("sm_90a", sm90(64, 128, 8)),
            ("sm_90a", sm90(512, 64, 2)),
            ("sm_90a", fp8(256, 64, 4)),
            ("sm_90a", fp8(128, 64, 8)),
            ("sm_90a", fp8(64, 64, 8)),
            ("sm_90a", fp8(256, 128, 2)),
            ("sm_90a", fp8(128, 128, 6)),
            ("sm_90a", fp8(64, 128, 8)),
        ] {
            let mut options = config.options();
            options.push(format!("--gpu-architecture={arch}"));
            options.push("--ptxas-options=-v".into());
            let (cubin, log) = compile(&config.source(), "test", &options).unwrap();
            assert!(cubin.starts_with(b"\x7fELF"), "not a cubin");
            println!("{config:?} {arch}:\n{log}");
            for line in log.lines().filter(|l| l.contains("spill")) {
                assert!(
                    line.contains(" 0 bytes spill stores, 0 bytes spill loads"),
                    "{config:?}: {line}"
                );
            }
            assert!(!log.contains("serialized"), "{config:?}: {log}");
        }
    }
}

//! The machine ceilings a benchmark compares the backend against, measured on the
//! backend's own threads: streaming read bandwidth and the multiply-add rate of the
//! instruction the kernel is built on.

use super::simd::{Portable, Simd};
use super::{CpuBackend, Path};
use crate::dtype::DType;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Independent accumulators of the peak loops: more than latency x throughput of a
/// multiply-add, few enough to stay in registers. The portable loop is whatever the
/// compiler makes of plain Rust (on x86-64 without FMA it vectorises it poorly), so
/// on that path the kernel can beat its "peak".
const CHAINS_AVX512: usize = 24;
const CHAINS_AVX2: usize = 12;
const CHAINS_PORTABLE: usize = 4;
/// Pieces per thread the measurements are split into.
const PIECES_PER_THREAD: usize = 16;

impl CpuBackend {
    /// Read bandwidth in bytes per second: the pool streams `buffer` once (make it
    /// several times the last-level cache, and write it once before timing so the pages
    /// exist). Like the decode steps, the work is split into many pieces the threads
    /// take as they go, so both meet a busy machine the same way.
    pub fn read_bandwidth(&self, buffer: &[u64]) -> f64 {
        let piece = buffer
            .len()
            .div_ceil(PIECES_PER_THREAD * self.threads())
            .max(1);
        let start = Instant::now();
        let sum = self.pool().install(|| {
            buffer
                .par_chunks(piece)
                .with_max_len(1)
                .map(stream_sum)
                .reduce(|| 0, u64::wrapping_add)
        });
        let secs = start.elapsed().as_secs_f64();
        black_box(sum);
        std::mem::size_of_val(buffer) as f64 / secs
    }

    /// Peak multiply-add rate in flop/s (a multiply-add counts 2) of the instruction the
    /// kernel uses for caches of `dtype`: the pool runs independent chains from registers
    /// for about `duration` (calibrated on the calling thread first), in pieces.
    pub fn peak_flops(&self, dtype: DType, duration: Duration) -> f64 {
        let path = self.kernel.path(dtype);
        let mut iters = 1u64 << 10;
        loop {
            let start = Instant::now();
            peak_loop(path, iters);
            let t = start.elapsed();
            if t >= duration / 4 || iters >= 1 << 40 {
                iters = (iters as f64 * duration.as_secs_f64() / t.as_secs_f64().max(1e-9)) as u64;
                break;
            }
            iters *= 2;
        }
        let pieces = PIECES_PER_THREAD * self.threads();
        let iters = (iters * self.threads() as u64 / pieces as u64).max(1);
        let start = Instant::now();
        self.pool().install(|| {
            (0..pieces).into_par_iter().with_max_len(1).for_each(|_| {
                peak_loop(path, iters);
            })
        });
        let secs = start.elapsed().as_secs_f64();
        let ops = (pieces as u64 * iters) as f64 * chains(path) as f64;
        ops * flops_per_op(path) / secs
    }
}

fn chains(path: Path) -> usize {
    match path {
        Path::Bf16Dot | Path::Avx512 => CHAINS_AVX512,
        Path::Avx2 => CHAINS_AVX2,
        Path::Portable => CHAINS_PORTABLE,
    }
}

/// Flops of one multiply-add instruction of the path.
fn flops_per_op(path: Path) -> f64 {
    match path {
        // 16 lanes x 2 bf16 products, 2 flops each
        Path::Bf16Dot => 64.0,
        Path::Avx512 => 32.0,
        Path::Avx2 | Path::Portable => 16.0,
    }
}

fn stream_sum(words: &[u64]) -> u64 {
    // eight independent sums so the loop is bound by loads, not by one add chain
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*w);
        }
    }
    let rest: u64 = chunks.remainder().iter().fold(0, |a, w| a.wrapping_add(*w));
    acc.iter().fold(rest, |a, w| a.wrapping_add(*w))
}

fn peak_loop(path: Path, iters: u64) {
    let iters = iters.max(1);
    // SAFETY: the backend checked at construction that this CPU runs `path`.
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Bf16Dot => asm_loops::dpbf16(iters),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => asm_loops::fma_zmm(iters),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => asm_loops::fma_ymm(iters),
            _ => {
                black_box(portable_loop(iters));
            }
        }
    }
}

fn portable_loop(iters: u64) -> f32 {
    let a = [black_box(0.999_999f32); 8];
    let b = [black_box(1e-7f32); 8];
    // distinct starting values, so the compiler cannot treat the chains as one
    let mut acc: [[f32; 8]; CHAINS_PORTABLE] = std::array::from_fn(|i| [black_box(i as f32); 8]);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            // SAFETY: the portable vector type has no CPU requirement.
            *x = unsafe { Portable::fmadd(*x, a, b) };
        }
    }
    acc.iter().flatten().sum()
}

/// The peak loops of the x86 kernels in assembly: compilers reshuffle (and spill) 24
/// accumulators in Rust, and the point is the instruction's own rate.
#[cfg(target_arch = "x86_64")]
mod asm_loops {
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Runs `iters` rounds of 24 independent chains of the zmm multiply-add `$insn`
    /// (`acc += p * p`) with zeroed accumulators; `iters >= 1`.
    macro_rules! zmm_chains {
        ($insn:literal, $p:expr, $iters:expr) => {
            asm!(
                "vpxord zmm0, zmm0, zmm0",
                "vpxord zmm1, zmm1, zmm1",
                "vpxord zmm2, zmm2, zmm2",
                "vpxord zmm3, zmm3, zmm3",
                "vpxord zmm4, zmm4, zmm4",
                "vpxord zmm5, zmm5, zmm5",
                "vpxord zmm6, zmm6, zmm6",
                "vpxord zmm7, zmm7, zmm7",
                "vpxord zmm8, zmm8, zmm8",
                "vpxord zmm9, zmm9, zmm9",
                "vpxord zmm10, zmm10, zmm10",
                "vpxord zmm11, zmm11, zmm11",
                "vpxord zmm12, zmm12, zmm12",
                "vpxord zmm13, zmm13, zmm13",
                "vpxord zmm14, zmm14, zmm14",
                "vpxord zmm15, zmm15, zmm15",
                "vpxord zmm16, zmm16, zmm16",
                "vpxord zmm17, zmm17, zmm17",
                "vpxord zmm18, zmm18, zmm18",
                "vpxord zmm19, zmm19, zmm19",
                "vpxord zmm20, zmm20, zmm20",
                "vpxord zmm21, zmm21, zmm21",
                "vpxord zmm22, zmm22, zmm22",
                "vpxord zmm23, zmm23, zmm23",
                "2:",
                concat!($insn, " zmm0, {p}, {p}"),
                concat!($insn, " zmm1, {p}, {p}"),
                concat!($insn, " zmm2, {p}, {p}"),
                concat!($insn, " zmm3, {p}, {p}"),
                concat!($insn, " zmm4, {p}, {p}"),
                concat!($insn, " zmm5, {p}, {p}"),
                concat!($insn, " zmm6, {p}, {p}"),
                concat!($insn, " zmm7, {p}, {p}"),
                concat!($insn, " zmm8, {p}, {p}"),
                concat!($insn, " zmm9, {p}, {p}"),
                concat!($insn, " zmm10, {p}, {p}"),
                concat!($insn, " zmm11, {p}, {p}"),
                concat!($insn, " zmm12, {p}, {p}"),
                concat!($insn, " zmm13, {p}, {p}"),
                concat!($insn, " zmm14, {p}, {p}"),
                concat!($insn, " zmm15, {p}, {p}"),
                concat!($insn, " zmm16, {p}, {p}"),
                concat!($insn, " zmm17, {p}, {p}"),
                concat!($insn, " zmm18, {p}, {p}"),
                concat!($insn, " zmm19, {p}, {p}"),
                concat!($insn, " zmm20, {p}, {p}"),
                concat!($insn, " zmm21, {p}, {p}"),
                concat!($insn, " zmm22, {p}, {p}"),
                concat!($insn, " zmm23, {p}, {p}"),
                "dec {n}",
                "jnz 2b",
                p = in(zmm_reg) $p,
                n = inout(reg) $iters => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _,
                out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _,
                out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                options(nostack, nomem),
            )
        };
    }

    /// 24 independent `vdpbf16ps` chains per iteration; `iters >= 1`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(iters: u64) {
        // bf16 pairs of 1e-3: the sums stay finite for any duration
        zmm_chains!("vdpbf16ps", _mm512_set1_epi32(0x3a83_3a83), iters);
    }

    /// 24 independent `vfmadd231ps` zmm chains per iteration; `iters >= 1`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_zmm(iters: u64) {
        zmm_chains!("vfmadd231ps", _mm512_set1_ps(1e-3), iters);
    }

    /// 12 independent `vfmadd231ps` ymm chains per iteration; `iters >= 1`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_ymm(iters: u64) {
        let x = _mm256_set1_ps(1e-3);
        asm!(
            "vxorps ymm0, ymm0, ymm0", "vxorps ymm1, ymm1, ymm1", "vxorps ymm2, ymm2, ymm2",
            "vxorps ymm3, ymm3, ymm3", "vxorps ymm4, ymm4, ymm4", "vxorps ymm5, ymm5, ymm5",
            "vxorps ymm6, ymm6, ymm6", "vxorps ymm7, ymm7, ymm7", "vxorps ymm8, ymm8, ymm8",
            "vxorps ymm9, ymm9, ymm9", "vxorps ymm10, ymm10, ymm10", "vxorps ymm11, ymm11, ymm11",
            "2:",
            "vfmadd231ps ymm0, {p}, {p}", "vfmadd231ps ymm1, {p}, {p}",
            "vfmadd231ps ymm2, {p}, {p}", "vfmadd231ps ymm3, {p}, {p}",
            "vfmadd231ps ymm4, {p}, {p}", "vfmadd231ps ymm5, {p}, {p}",
            "vfmadd231ps ymm6, {p}, {p}", "vfmadd231ps ymm7, {p}, {p}",
            "vfmadd231ps ymm8, {p}, {p}", "vfmadd231ps ymm9, {p}, {p}",
            "vfmadd231ps ymm10, {p}, {p}", "vfmadd231ps ymm11, {p}, {p}",
            "dec {n}",
            "jnz 2b",
            p = in(ymm_reg) x,
            n = inout(reg) iters => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
            out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
            out("ymm10") _, out("ymm11") _,
            options(nostack, nomem),
        );
    }
}

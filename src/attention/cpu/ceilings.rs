//! The machine ceilings a benchmark compares the backend against, measured on the
//! backend's own threads: streaming read bandwidth and the multiply-add rate of the
//! instruction the kernel is built on.

use super::simd::{Portable, Simd};
use super::{CpuBackend, Path};
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Independent accumulators of the peak loops: more than latency x throughput of a
/// multiply-add, few enough to stay in registers. The portable loop is whatever the
/// compiler makes of plain Rust (on x86-64 without FMA it vectorises it poorly), so
/// on that path the kernel can beat its "peak".
const CHAINS_AVX512: usize = 24;
const CHAINS_AVX2: usize = 12;
const CHAINS_PORTABLE: usize = 4;

impl CpuBackend {
    /// Read bandwidth in bytes per second: every thread of the pool streams its share of
    /// a `bytes`-long buffer (make it several times the last-level cache); the best of
    /// `repeats` passes after one untimed pass.
    pub fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        let words = bytes / 8;
        if words < 1024 * self.threads() || repeats == 0 {
            return Err(Error::invalid(format!(
                "a bandwidth measurement needs at least {} bytes and one repeat",
                8 * 1024 * self.threads()
            )));
        }
        let buffer: Vec<u64> = (0..words as u64).collect();
        let share = words.div_ceil(self.threads());
        let mut best = 0.0f64;
        for pass in 0..=repeats {
            let start = Instant::now();
            let sums = self
                .pool()
                .broadcast(|ctx| stream_sum(buffer.chunks(share).nth(ctx.index()).unwrap_or(&[])));
            let secs = start.elapsed().as_secs_f64();
            black_box(sums);
            if pass > 0 {
                best = best.max(bytes as f64 / secs);
            }
        }
        Ok(best)
    }

    /// Peak multiply-add rate in flop/s (a multiply-add counts 2) of the instruction the
    /// kernel uses for caches of `dtype`: every pool thread runs independent chains from
    /// registers, five times for a fifth of `duration`; the best run counts.
    pub fn peak_flops(&self, dtype: DType, duration: Duration) -> f64 {
        let path = self.kernel.path(dtype);
        // calibrate the iteration count on one thread for a fifth of `duration`
        let mut iters = 1u64 << 12;
        let slice = duration / 5;
        loop {
            let start = Instant::now();
            black_box(peak_loop(path, iters));
            let t = start.elapsed();
            if t >= slice / 4 || iters >= 1 << 40 {
                iters = (iters as f64 * slice.as_secs_f64() / t.as_secs_f64().max(1e-9)) as u64;
                break;
            }
            iters *= 2;
        }
        let iters = iters.max(1);
        // the best of five all-thread runs: other processes only ever slow a run down
        let mut best = 0.0f64;
        for _ in 0..5 {
            let start = Instant::now();
            black_box(self.pool().broadcast(|_| peak_loop(path, iters)));
            let secs = start.elapsed().as_secs_f64();
            let ops = (self.threads() as u64 * iters) as f64 * chains(path) as f64;
            let flops = ops * flops_per_op(path);
            best = best.max(flops / secs);
        }
        best
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

fn peak_loop(path: Path, iters: u64) -> f32 {
    // SAFETY: the backend checked at construction that this CPU runs `path`.
    unsafe {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Bf16Dot => dpbf16_loop(iters),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => fma_loop_avx512(iters),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => fma_loop_avx2(iters),
            _ => fma_loop::<Portable, CHAINS_PORTABLE>(iters),
        }
    }
}

#[inline(always)]
unsafe fn fma_loop<S: Simd, const C: usize>(iters: u64) -> f32 {
    let a = S::splat(black_box(0.999_999));
    let b = S::splat(black_box(1e-7));
    let mut acc = [S::splat(1.0); C];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = S::fmadd(*x, a, b);
        }
    }
    let mut lanes = vec![0.0f32; S::LANES];
    let mut total = 0.0;
    for x in acc {
        S::store(lanes.as_mut_ptr(), x);
        total += lanes.iter().sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f32 {
    fma_loop::<super::simd::Avx512, CHAINS_AVX512>(iters)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f32 {
    fma_loop::<super::simd::Avx2, CHAINS_AVX2>(iters)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_loop(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    // small bf16 pairs (1e-3 each) so the sums stay finite for any duration
    let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(black_box(0x3a83_3a83)));
    let mut acc = [_mm512_setzero_ps(); CHAINS_AVX512];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, pair, pair);
        }
    }
    acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
}

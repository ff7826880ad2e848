//! One tile of the flash-decoding loop in f32 (AVX-512F, portable), and what every
//! kernel shares: the f32 row panel, the online-softmax update, work blocks.
//!
//! A tile is `n` cached rows (a multiple of [`ROW_STEP`], at most [`TILE_ROWS`]) of one
//! sequence, of which the first `valid` are real (the rest point at a zero row). Heads
//! lie in vector lanes for the scores: `S[t][h] = x_t . q_h`, so a loaded row is
//! broadcast against every head of the group, and the softmax statistics of 16 (or 8)
//! heads are updated with vertical vector operations. The latent output then
//! accumulates `O[h][j] += P[t][h] * x_t[j]` with latent columns in lanes.

use super::simd::Simd;
use crate::dtype::{DType, FP8_BLOCK};

/// Rows of one tile: large enough to amortise loading and rescaling the accumulators,
/// small enough that a tile's decoded rows stay in L2.
pub(super) const TILE_ROWS: usize = 64;
/// Tiles are processed in steps of this many rows (a multiple of every score
/// micro-kernel's height).
pub(super) const ROW_STEP: usize = 8;

/// Shapes of one head group's tile work.
#[derive(Clone, Copy, Debug)]
pub(super) struct TileGeo {
    /// Heads of the group.
    pub heads: usize,
    /// Heads rounded up to whole vectors: the row stride of scores and the length of the
    /// softmax statistics.
    pub hp: usize,
    /// Latent slice width.
    pub w: usize,
    /// Latent width rounded up to whole vectors: the row stride of the outputs.
    pub wp: usize,
    pub d_r: usize,
    pub dtype: DType,
}

impl TileGeo {
    /// Row stride of a decoded f32 tile: latent, zero padding to `wp`, RoPE key.
    pub fn xs(&self) -> usize {
        self.wp + self.d_r
    }
}

/// Per-thread buffers of the tile loop, sized once per batch shape.
#[derive(Default)]
pub(super) struct TileScratch {
    /// Decoded rows `[TILE_ROWS][xs]` (f32 kernels).
    pub x: Vec<f32>,
    /// Scores, then probabilities, `[TILE_ROWS][hp]`.
    pub s: Vec<f32>,
    /// Probabilities regrouped per output head block, `[block][TILE_ROWS][block heads]`
    /// (AVX2 kernel).
    pub p_blocks: Vec<f32>,
    /// Probabilities of row pairs as bf16 pairs `[TILE_ROWS/2][hp]` (bf16 kernel).
    pub pp: Vec<u32>,
    /// Latent parts of row pairs as bf16 pairs `[TILE_ROWS/2][wp]` (bf16 kernel).
    pub vp: Vec<u32>,
    /// Per-head rescaling of the accumulators for this tile `[hp]`.
    pub corr: Vec<f32>,
    /// FP8 rows rounded to bf16 for the bf16 kernel, `[TILE_ROWS][w + d_r]`.
    pub fp8_as_bf16: Vec<u16>,
}

impl TileScratch {
    pub fn reserve(&mut self, geo: &TileGeo) {
        grow(&mut self.x, TILE_ROWS * geo.xs());
        grow(&mut self.s, TILE_ROWS * geo.hp);
        grow(&mut self.p_blocks, TILE_ROWS * geo.hp);
        grow(&mut self.pp, TILE_ROWS / 2 * geo.hp);
        grow(&mut self.vp, TILE_ROWS / 2 * geo.wp);
        grow(&mut self.corr, geo.hp);
        if geo.dtype == DType::Fp8E4m3 {
            grow(&mut self.fp8_as_bf16, TILE_ROWS * (geo.w + geo.d_r));
        }
    }
}

/// Grows `v` to at least `len` elements; never shrinks, so steps of one shape reuse it.
pub(super) fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Consecutive blocks of `step` vectors, then single vectors for the rest: the
/// micro-kernels' work units, and the order packed operands are laid out in.
#[derive(Clone, Copy)]
pub(super) struct VectorBlocks {
    next: usize,
    total: usize,
    whole: usize,
    step: usize,
}

#[derive(Clone, Copy)]
pub(super) struct VectorBlock {
    pub start: usize,
    pub len: usize,
}

impl VectorBlocks {
    pub fn new(total: usize, step: usize) -> Self {
        VectorBlocks {
            next: 0,
            total,
            whole: total / step * step,
            step,
        }
    }
}

impl Iterator for VectorBlocks {
    type Item = VectorBlock;
    #[inline(always)]
    fn next(&mut self) -> Option<VectorBlock> {
        if self.next >= self.total {
            return None;
        }
        let len = if self.next < self.whole { self.step } else { 1 };
        let blk = VectorBlock {
            start: self.next,
            len,
        };
        self.next += len;
        Some(blk)
    }
}

/// The rows of one tile: `rows.len()` pointers (a multiple of [`ROW_STEP`]), each valid
/// for `row_bytes`, of which the first `valid` are real (the rest point at a zero row),
/// and the next tile's rows, to prefetch while this one computes.
pub(super) struct TileRows<'a> {
    pub rows: &'a [*const u8],
    pub valid: usize,
    pub next: &'a [*const u8],
    pub row_bytes: usize,
}

impl TileRows<'_> {
    /// Prefetches the share of the next tile's rows that matches rows `t0..t1` of this
    /// one, so the requests spread over the tile's work. A kernel's first touch of a row
    /// is where the hardware prefetchers cannot help: a new page, or (bf16 kernel) 4-byte
    /// broadcasts from 8 rows at once.
    #[inline(always)]
    pub fn prefetch_next(&self, t0: usize, t1: usize) {
        let n = self.rows.len();
        let part = &self.next[self.next.len() * t0 / n..self.next.len() * t1 / n];
        #[cfg(target_arch = "x86_64")]
        for &r in part {
            for off in (0..self.row_bytes).step_by(64) {
                // SAFETY: prefetching is a hint; `r + off` lies inside the row.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        r.add(off).cast(),
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = part;
    }
}

/// Running state of one work item: unnormalised outputs `[heads][wp]`, running maximum
/// and sum of exponentials per head `[hp]`.
pub(super) struct Accum<'a> {
    pub o: &'a mut [f32],
    pub m: &'a mut [f32],
    pub l: &'a mut [f32],
}

/// Online-softmax update for one tile: turns the scores in `s` (`[n][hp]`) into
/// probabilities relative to the new running maximum (rows `valid..n` become 0), and
/// leaves in `corr` the factor the accumulated outputs must be multiplied by.
#[inline(always)]
pub(super) unsafe fn softmax_update<S: Simd>(
    s: &mut [f32],
    n: usize,
    valid: usize,
    hp: usize,
    acc: &mut Accum,
    corr: &mut [f32],
) {
    debug_assert!(s.len() >= n * hp && acc.m.len() >= hp && corr.len() >= hp);
    let s = s.as_mut_ptr();
    for h0 in (0..hp).step_by(S::LANES) {
        let m_old = S::load(acc.m.as_ptr().add(h0));
        let mut m_new = m_old;
        for t in 0..valid {
            m_new = S::max(m_new, S::load(s.add(t * hp + h0)));
        }
        let c = S::exp(S::sub(m_old, m_new));
        let mut sum = S::zero();
        for t in 0..valid {
            let p = S::exp(S::sub(S::load(s.add(t * hp + h0)), m_new));
            S::store(s.add(t * hp + h0), p);
            sum = S::add(sum, p);
        }
        for t in valid..n {
            S::store(s.add(t * hp + h0), S::zero());
        }
        let l = S::load(acc.l.as_ptr().add(h0));
        S::store(acc.l.as_mut_ptr().add(h0), S::fmadd(l, c, sum));
        S::store(acc.m.as_mut_ptr().add(h0), m_new);
        S::store(corr.as_mut_ptr().add(h0), c);
    }
}

/// Decodes the tile's rows into the f32 panel `x` (`[n][xs]`: latent, zeros up to `wp`,
/// RoPE key), once for all heads, prefetching the next tile's rows as it goes.
#[inline(always)]
pub(super) unsafe fn decode_tile<S: Simd>(geo: &TileGeo, tile: &TileRows, x: *mut f32) {
    let (xs, wp) = (geo.xs(), geo.wp);
    for (t, &row) in tile.rows.iter().enumerate() {
        tile.prefetch_next(t, t + 1);
        let xt = x.add(t * xs);
        if geo.dtype == DType::Fp8E4m3 {
            decode_fp8_slice::<S>(row, xt, geo.w);
        } else {
            S::decode_row(geo.dtype, row, xt, geo.w);
        }
        std::ptr::write_bytes(xt.add(geo.w), 0, wp - geo.w);
        let rope = row.add(geo.dtype.rope_offset(geo.w));
        S::decode_row(geo.dtype.rope_dtype(), rope, xt.add(wp), geo.d_r);
    }
}

/// Decodes the FP8 latent slice of one row (`w` e4m3 codes, then one little-endian f32
/// scale per block of [`FP8_BLOCK`] codes) into `dst`, each block times its scale.
#[inline(always)]
unsafe fn decode_fp8_slice<S: Simd>(row: *const u8, dst: *mut f32, w: usize) {
    let scales = row.add(w);
    for b in 0..DType::scale_blocks(w) {
        let scale = f32::from_le_bytes(scales.add(4 * b).cast::<[u8; 4]>().read_unaligned());
        let start = b * FP8_BLOCK;
        let n = FP8_BLOCK.min(w - start);
        S::decode_fp8(row.add(start), dst.add(start), n, scale);
    }
}

/// Scores of rows `R` x head vectors `HV`: `s[t][h] = sum_k x[t][k] * qt[k][h]`.
#[inline(always)]
unsafe fn score_block<S: Simd, const R: usize, const HV: usize>(
    x: *const f32,
    xs: usize,
    qt: *const f32,
    hp: usize,
    s: *mut f32,
) {
    let mut acc = [[S::zero(); HV]; R];
    for k in 0..xs {
        let mut qv = [S::zero(); HV];
        for (j, v) in qv.iter_mut().enumerate() {
            *v = S::load(qt.add(k * hp + j * S::LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xb = S::splat(*x.add(r * xs + k));
            for (a, v) in row.iter_mut().zip(qv) {
                *a = S::fmadd(v, xb, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            S::store(s.add(r * hp + j * S::LANES), *a);
        }
    }
}

/// Outputs of heads `HB` x latent vectors `JV`:
/// `o[h][j] = corr[h] * o[h][j] + sum_t p[t][h] * x[t][j]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_block<S: Simd, const HB: usize, const JV: usize>(
    p: *const f32,
    hp: usize,
    x: *const f32,
    xs: usize,
    o: *mut f32,
    wp: usize,
    corr: *const f32,
    n: usize,
) {
    let mut acc = [[S::zero(); JV]; HB];
    for (h, row) in acc.iter_mut().enumerate() {
        let c = S::splat(*corr.add(h));
        for (j, a) in row.iter_mut().enumerate() {
            *a = S::mul(S::load(o.add(h * wp + j * S::LANES)), c);
        }
    }
    for t in 0..n {
        let mut xv = [S::zero(); JV];
        for (j, v) in xv.iter_mut().enumerate() {
            *v = S::load(x.add(t * xs + j * S::LANES));
        }
        for (h, row) in acc.iter_mut().enumerate() {
            let pb = S::splat(*p.add(t * hp + h));
            for (a, v) in row.iter_mut().zip(xv) {
                *a = S::fmadd(v, pb, *a);
            }
        }
    }
    for (h, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            S::store(o.add(h * wp + j * S::LANES), *a);
        }
    }
}

/// The f32 tile: decode rows, scores, softmax update, output accumulation.
///
/// `qt` is the group's query transposed, `[xs][hp]` (zero in padding); the rows hold
/// `w + d_r` elements of `geo.dtype` each.
#[inline(always)]
unsafe fn tile_f32<S: Simd, const R: usize, const HV: usize, const HB: usize, const JV: usize>(
    geo: &TileGeo,
    qt: &[f32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    let (rows, valid) = (tile.rows, tile.valid);
    let (n, hp, wp, xs) = (rows.len(), geo.hp, geo.wp, geo.xs());
    debug_assert!(n % R == 0 && n <= TILE_ROWS && valid <= n && hp % S::LANES == 0);
    debug_assert!(qt.len() >= xs * hp && acc.o.len() >= geo.heads * wp);
    let x = scr.x.as_mut_ptr();
    decode_tile::<S>(geo, tile, x);

    let s = scr.s.as_mut_ptr();
    let vectors = hp / S::LANES;
    let mut v0 = 0;
    while v0 + HV <= vectors {
        for t0 in (0..n).step_by(R) {
            let qv = qt.as_ptr().add(v0 * S::LANES);
            score_block::<S, R, HV>(x.add(t0 * xs), xs, qv, hp, s.add(t0 * hp + v0 * S::LANES));
        }
        v0 += HV;
    }
    for v in v0..vectors {
        for t0 in (0..n).step_by(R) {
            let qv = qt.as_ptr().add(v * S::LANES);
            score_block::<S, R, 1>(x.add(t0 * xs), xs, qv, hp, s.add(t0 * hp + v * S::LANES));
        }
    }

    softmax_update::<S>(&mut scr.s, n, valid, hp, acc, &mut scr.corr);

    let (s, o, corr) = (scr.s.as_ptr(), acc.o.as_mut_ptr(), scr.corr.as_ptr());
    let (vectors, heads) = (wp / S::LANES, geo.heads);
    let (whole_j, whole_h) = (vectors / JV * JV, heads / HB * HB);
    // plain loops rather than closures: closures do not inherit the target features
    let mut j = 0;
    while j < vectors {
        let (xj, oj) = (x.add(j * S::LANES), o.add(j * S::LANES));
        let mut h = 0;
        while h < heads {
            let (p, oh, c) = (s.add(h), oj.add(h * wp), corr.add(h));
            match (h < whole_h, j < whole_j) {
                (true, true) => output_block::<S, HB, JV>(p, hp, xj, xs, oh, wp, c, n),
                (true, false) => output_block::<S, HB, 1>(p, hp, xj, xs, oh, wp, c, n),
                (false, true) => output_block::<S, 1, JV>(p, hp, xj, xs, oh, wp, c, n),
                (false, false) => output_block::<S, 1, 1>(p, hp, xj, xs, oh, wp, c, n),
            }
            h += if h < whole_h { HB } else { 1 };
        }
        j += if j < whole_j { JV } else { 1 };
    }
}

/// AVX-512F tile (16 lanes; 16 accumulators per micro-kernel of the 32 registers).
///
/// # Safety
/// The CPU must have AVX-512F; buffers as documented on [`tile_f32`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile_avx512(
    geo: &TileGeo,
    qt: &[f32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    tile_f32::<super::simd::Avx512, ROW_STEP, 4, 4, 4>(geo, qt, tile, scr, acc)
}

/// Portable tile: plain Rust the compiler vectorises for the build target.
///
/// # Safety
/// Buffers as documented on [`tile_f32`].
pub(super) unsafe fn tile_portable(
    geo: &TileGeo,
    qt: &[f32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    tile_f32::<super::simd::Portable, ROW_STEP, 2, 4, 2>(geo, qt, tile, scr, acc)
}

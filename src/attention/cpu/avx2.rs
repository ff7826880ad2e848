//! The AVX2+FMA tile: the step's two products as small register-blocked GEMMs on the 16
//! ymm registers, for machines without AVX-512.
//!
//! The tile's rows are decoded to f32 once, into a panel `[n][xs]` every head reads (F16C
//! for f16 caches). Scores `S[t][h] = x_t . q_h` keep heads in lanes: a micro-kernel holds
//! [`SCORE_ROWS`] rows x [`SCORE_HV`] head vectors of accumulators (12 of 16 registers),
//! and per column loads two query vectors and broadcasts one value of each row. The
//! query is packed per block of head vectors, `[xs][block width]` contiguous, so a block
//! walks one dense stream. Outputs `O[h][j] += P[t][h] x_t[j]` keep latent columns in
//! lanes, [`OUT_HEADS`] heads x [`OUT_JV`] latent vectors per micro-kernel, reading the
//! probabilities from a dense slab per head block, and the online-softmax rescale is
//! folded into loading those accumulators once per tile. Both micro-kernels take two
//! columns (rows) per loop trip: 1.92 instructions per FMA. benches/RESULTS.md (issue
//! 16) has the measurements behind each choice.

use super::simd::{Avx2, Simd};
use super::tile::{
    decode_tile, softmax_update, Accum, TileGeo, TileRows, TileScratch, VectorBlocks,
};
use std::arch::x86_64::*;

/// Rows x head vectors of the score micro-kernel: 12 accumulators, 2 query vectors and a
/// broadcast fill 15 of the 16 registers.
const SCORE_ROWS: usize = 6;
const SCORE_HV: usize = 2;
/// Heads x latent vectors of the output micro-kernel (the same 12 + 2 + 1 registers).
const OUT_HEADS: usize = 6;
const OUT_JV: usize = 2;
const LANES: usize = <Avx2 as Simd>::LANES;

/// Packs one group's query rows (`rows(h)` for `h < heads`, `None` past the last) for
/// [`tile_avx2`]: block `b` of [`SCORE_HV`] head vectors holds `[xs][b.len * 8]` at
/// `b.start * 8 * xs`, latent column `k` at `k`, RoPE column `k` at `wp + k - w`; zero
/// in the padding; latent columns times `scales[0]`, RoPE columns times `scales[1]`.
/// `dst` (`xs * hp` values) is overwritten. Each packed column is written whole, in
/// order (the block of 16 heads is larger than L1: writing it head by head, a column
/// every 64 bytes, took half as long as the tile of a 64-row step).
pub(super) fn pack_query<'a>(
    dst: &mut [f32],
    rows: impl Fn(usize) -> Option<&'a [f32]>,
    geo: &TileGeo,
    scales: [f32; 2],
) {
    let (xs, w, wp) = (geo.xs(), geo.w, geo.wp);
    for blk in VectorBlocks::new(geo.hp / LANES, SCORE_HV) {
        let width = blk.len * LANES;
        let block = &mut dst[blk.start * LANES * xs..][..width * xs];
        // the block's query rows; padding heads (past the group) have none
        let mut src: [&[f32]; SCORE_HV * LANES] = [&[]; SCORE_HV * LANES];
        let mut real = 0;
        for (i, s) in src[..width].iter_mut().enumerate() {
            let h = blk.start * LANES + i;
            match rows(h).filter(|_| h < geo.heads) {
                Some(q) => *s = q,
                None => break,
            }
            real += 1;
        }
        let src = &src[..real];
        // groups of 8 real heads go through 8 x 8 transposes where the CPU has AVX2
        // (the backend only packs for this kernel there; the check keeps this safe)
        let whole = if is_x86_feature_detected!("avx2") {
            real / LANES * LANES
        } else {
            0
        };
        for (col, packed) in block.chunks_exact_mut(width).enumerate() {
            let (k, scale) = match col {
                c if c < w => (c, scales[0]),
                c if c < wp => {
                    packed.fill(0.0);
                    continue;
                }
                c => (c - wp + w, scales[1]),
            };
            for (p, q) in packed[whole..].iter_mut().zip(&src[whole..]) {
                *p = q[k] * scale;
            }
            packed[real..].fill(0.0);
        }
        for i0 in (0..whole).step_by(LANES) {
            // SAFETY: AVX2 was detected above; `src[i0..i0 + 8]` are rows of `w + d_r`
            // values and `block` holds `xs` columns of `width >= i0 + 8` values
            unsafe { pack_transposed(block, width, i0, &src[i0..i0 + LANES], geo, scales) };
        }
    }
}

/// Heads `i0..i0 + 8` of one packed block: each run of 8 source columns of one part
/// (latent or RoPE) as an 8 x 8 transpose, the rest one value at a time; every value is
/// `q[k] * scale` as in the scalar loop, so the bits are the same.
#[target_feature(enable = "avx2")]
unsafe fn pack_transposed(
    block: &mut [f32],
    width: usize,
    i0: usize,
    src: &[&[f32]],
    geo: &TileGeo,
    scales: [f32; 2],
) {
    let (w, wp, d_r) = (geo.w, geo.wp, geo.d_r);
    for (k0, len, c0, scale) in [(0, w, 0, scales[0]), (w, d_r, wp, scales[1])] {
        let sv = _mm256_set1_ps(scale);
        let whole = len / LANES * LANES;
        for j in (0..whole).step_by(LANES) {
            let r: [__m256; LANES] =
                std::array::from_fn(|i| _mm256_loadu_ps(src[i][k0 + j..][..LANES].as_ptr()));
            let t: [__m256; LANES] = std::array::from_fn(|i| {
                let (a, b) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            // u[4m + n]: rows 4m..4m+4, columns n and n + 4 of each 128-bit half
            let u: [__m256; LANES] = std::array::from_fn(|i| {
                let (m, n) = (i / 4, i % 4);
                let (a, b) = (t[4 * m + (n / 2)], t[4 * m + 2 + (n / 2)]);
                if n % 2 == 0 {
                    _mm256_shuffle_ps::<0x44>(a, b)
                } else {
                    _mm256_shuffle_ps::<0xee>(a, b)
                }
            });
            for n in 0..LANES {
                let col = if n < 4 {
                    _mm256_permute2f128_ps::<0x20>(u[n], u[4 + n])
                } else {
                    _mm256_permute2f128_ps::<0x31>(u[n - 4], u[n])
                };
                let at = (c0 + j + n) * width + i0;
                _mm256_storeu_ps(block[at..at + LANES].as_mut_ptr(), _mm256_mul_ps(col, sv));
            }
        }
        for j in whole..len {
            let at = (c0 + j) * width + i0;
            for (p, q) in block[at..at + LANES].iter_mut().zip(src) {
                *p = q[k0 + j] * scale;
            }
        }
    }
}

/// One column `k` of the score micro-kernel: `HV` query vectors against one broadcast
/// value of each row.
#[inline(always)]
unsafe fn score_column<const R: usize, const HV: usize>(
    acc: &mut [[__m256; HV]; R],
    rows: &[*const f32; R],
    q: *const f32,
    k: usize,
) {
    let mut qv = [_mm256_setzero_ps(); HV];
    for (j, v) in qv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(q.add((k * HV + j) * LANES));
    }
    for (row, x) in acc.iter_mut().zip(rows) {
        let xb = _mm256_broadcast_ss(&*x.add(k));
        for (a, v) in row.iter_mut().zip(qv) {
            *a = _mm256_fmadd_ps(v, xb, *a);
        }
    }
}

/// Scores of rows `R` x head vectors `HV`: `s[r][h] = sum_k x[r][k] * q[k][h]`, with `q`
/// one packed block `[xs][HV * 8]` and `s` rows of stride `hp`. Two columns per loop
/// trip halve the loop's own instructions.
#[inline(always)]
unsafe fn score_block<const R: usize, const HV: usize>(
    x: *const f32,
    xs: usize,
    q: *const f32,
    s: *mut f32,
    hp: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); HV]; R];
    // Opaque to the optimiser, so each row keeps a base register addressed as
    // `[row + 4k]`: rewritten as `x + r * xs` it costs four address computations per
    // column (an instruction for every three multiply-adds).
    let rows: [*const f32; R] = std::hint::black_box(std::array::from_fn(|r| x.add(r * xs)));
    let mut k = 0;
    while k + 2 <= xs {
        score_column::<R, HV>(&mut acc, &rows, q, k);
        score_column::<R, HV>(&mut acc, &rows, q, k + 1);
        k += 2;
    }
    if k < xs {
        score_column::<R, HV>(&mut acc, &rows, q, k);
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * hp + j * LANES), *a);
        }
    }
}

/// One row of the output micro-kernel: `JV` latent vectors of the row (`x`) against one
/// broadcast probability of each head (`p`).
#[inline(always)]
unsafe fn output_row<const HB: usize, const JV: usize>(
    acc: &mut [[__m256; JV]; HB],
    p: *const f32,
    x: *const f32,
) {
    let mut xv = [_mm256_setzero_ps(); JV];
    for (j, v) in xv.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(x.add(j * LANES));
    }
    for (h, row) in acc.iter_mut().enumerate() {
        let pb = _mm256_broadcast_ss(&*p.add(h));
        for (a, v) in row.iter_mut().zip(xv) {
            *a = _mm256_fmadd_ps(v, pb, *a);
        }
    }
}

/// Outputs of heads `HB` x latent vectors `JV` over the tile's `n` rows (an even
/// number), two rows per loop trip: `o[h][j] = corr[h] * o[h][j] + sum_t p[t][h] *
/// x[t][j]`, with `p` rows of stride `hp`, `x` of `xs`, `o` of `wp`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_block<const HB: usize, const JV: usize>(
    p: *const f32,
    hp: usize,
    x: *const f32,
    xs: usize,
    o: *mut f32,
    wp: usize,
    corr: *const f32,
    n: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); JV]; HB];
    for (h, row) in acc.iter_mut().enumerate() {
        let c = _mm256_broadcast_ss(&*corr.add(h));
        for (j, a) in row.iter_mut().enumerate() {
            *a = _mm256_mul_ps(_mm256_loadu_ps(o.add(h * wp + j * LANES)), c);
        }
    }
    let (mut pt, mut xt) = (p, x);
    for _ in 0..n / 2 {
        output_row::<HB, JV>(&mut acc, pt, xt);
        output_row::<HB, JV>(&mut acc, pt.add(hp), xt.add(xs));
        pt = pt.add(2 * hp);
        xt = xt.add(2 * xs);
    }
    for (h, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm256_storeu_ps(o.add(h * wp + j * LANES), *a);
        }
    }
}

/// Scores of all `n` rows (an even number) for one block of `HV` head vectors.
#[inline(always)]
unsafe fn score_rows<const HV: usize>(
    x: *const f32,
    xs: usize,
    q: *const f32,
    s: *mut f32,
    hp: usize,
    n: usize,
) {
    let whole = n / SCORE_ROWS * SCORE_ROWS;
    let mut t = 0;
    while t < whole {
        score_block::<SCORE_ROWS, HV>(x.add(t * xs), xs, q, s.add(t * hp), hp);
        t += SCORE_ROWS;
    }
    // n is even, so the rest is 0, 2 or 4 rows
    match n - whole {
        4 => score_block::<4, HV>(x.add(t * xs), xs, q, s.add(t * hp), hp),
        2 => score_block::<2, HV>(x.add(t * xs), xs, q, s.add(t * hp), hp),
        rest => debug_assert_eq!(rest, 0),
    }
}

/// The AVX2+FMA tile: decode rows to the f32 panel, scores, softmax update, outputs.
///
/// `qp` is the group's query packed by [`pack_query`]; the rows hold `w + d_r` elements
/// of `geo.dtype` each.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `scr` reserved for `geo`, `acc` sized for it.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2(
    geo: &TileGeo,
    qp: &[f32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    let (n, hp, wp, xs) = (tile.rows.len(), geo.hp, geo.wp, geo.xs());
    debug_assert!(n % 2 == 0 && tile.valid <= n && hp % LANES == 0);
    debug_assert!(qp.len() >= xs * hp && acc.o.len() >= geo.heads * wp);
    let x = scr.x.as_mut_ptr();
    decode_tile::<Avx2>(geo, tile, x);

    let s = scr.s.as_mut_ptr();
    for blk in VectorBlocks::new(hp / LANES, SCORE_HV) {
        let q = qp.as_ptr().add(blk.start * LANES * xs);
        let st = s.add(blk.start * LANES);
        if blk.len == SCORE_HV {
            score_rows::<SCORE_HV>(x, xs, q, st, hp, n);
        } else {
            score_rows::<1>(x, xs, q, st, hp, n);
        }
    }

    softmax_update::<Avx2>(&mut scr.s, n, tile.valid, hp, acc, &mut scr.corr);

    let p = scr.p_blocks.as_mut_ptr();
    regroup_probabilities(scr.s.as_ptr(), hp, p, geo.heads, n);
    let (o, corr) = (acc.o.as_mut_ptr(), scr.corr.as_ptr());
    for jb in VectorBlocks::new(wp / LANES, OUT_JV) {
        let (xj, oj) = (x.add(jb.start * LANES), o.add(jb.start * LANES));
        let mut h = 0;
        // plain loops rather than closures: closures do not inherit the target features
        while h < geo.heads {
            let heads = out_block_heads(geo.heads - h);
            let (ph, oh, c) = (p.add(h * n), oj.add(h * wp), corr.add(h));
            match (heads, jb.len == OUT_JV) {
                (OUT_HEADS, true) => {
                    output_block::<OUT_HEADS, OUT_JV>(ph, heads, xj, xs, oh, wp, c, n)
                }
                (OUT_HEADS, false) => output_block::<OUT_HEADS, 1>(ph, heads, xj, xs, oh, wp, c, n),
                (4, true) => output_block::<4, OUT_JV>(ph, heads, xj, xs, oh, wp, c, n),
                (4, false) => output_block::<4, 1>(ph, heads, xj, xs, oh, wp, c, n),
                (2, true) => output_block::<2, OUT_JV>(ph, heads, xj, xs, oh, wp, c, n),
                (2, false) => output_block::<2, 1>(ph, heads, xj, xs, oh, wp, c, n),
                (_, true) => output_block::<1, OUT_JV>(ph, heads, xj, xs, oh, wp, c, n),
                (_, false) => output_block::<1, 1>(ph, heads, xj, xs, oh, wp, c, n),
            }
            h += heads;
        }
    }
}

/// Heads of the output block that starts with `left` heads to go: whole blocks of
/// [`OUT_HEADS`], then 4, 2 and 1.
#[inline(always)]
fn out_block_heads(left: usize) -> usize {
    match left {
        l if l >= OUT_HEADS => OUT_HEADS,
        l if l >= 4 => 4,
        l if l >= 2 => 2,
        _ => 1,
    }
}

/// Copies the probabilities `s[t][h]` (rows of stride `hp`) into one contiguous
/// `[n][len]` slab per output head block, at `dst + start * n`: an output micro-kernel
/// then reads 24 bytes per row from one dense stream, where rows of a power-of-two
/// stride (512 bytes for 128 heads) put all 64 of its row lines in 8 of L1's 64 sets.
#[inline(always)]
unsafe fn regroup_probabilities(s: *const f32, hp: usize, dst: *mut f32, heads: usize, n: usize) {
    let mut h = 0;
    while h < heads {
        let len = out_block_heads(heads - h);
        let (src, slab) = (s.add(h), dst.add(h * n));
        match len {
            OUT_HEADS => regroup_block::<OUT_HEADS>(src, hp, slab, n),
            4 => regroup_block::<4>(src, hp, slab, n),
            2 => regroup_block::<2>(src, hp, slab, n),
            _ => regroup_block::<1>(src, hp, slab, n),
        }
        h += len;
    }
}

/// One head block of [`regroup_probabilities`], `L` heads wide.
#[inline(always)]
unsafe fn regroup_block<const L: usize>(src: *const f32, hp: usize, slab: *mut f32, n: usize) {
    for t in 0..n {
        slab.add(t * L)
            .cast::<[f32; L]>()
            .write_unaligned(src.add(t * hp).cast::<[f32; L]>().read_unaligned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// The packing as first written (head by head), kept as the layout's definition.
    fn pack_query_by_head<'a>(
        dst: &mut [f32],
        rows: impl Fn(usize) -> Option<&'a [f32]>,
        geo: &TileGeo,
        scales: [f32; 2],
    ) {
        let xs = geo.xs();
        dst.fill(0.0);
        for blk in VectorBlocks::new(geo.hp / LANES, SCORE_HV) {
            let width = blk.len * LANES;
            let block = &mut dst[blk.start * LANES * xs..][..width * xs];
            for i in 0..width {
                let h = blk.start * LANES + i;
                let Some(q) = rows(h).filter(|_| h < geo.heads) else {
                    break;
                };
                for (k, &v) in q.iter().enumerate() {
                    let (col, scale) = if k < geo.w {
                        (k, scales[0])
                    } else {
                        (k - geo.w + geo.wp, scales[1])
                    };
                    block[col * width + i] = v * scale;
                }
            }
        }
    }

    #[test]
    fn the_packed_query_has_the_bits_of_the_head_by_head_packing() {
        // head counts leaving every remainder of a 16-head block, widths that are and
        // are not whole vectors, rows past the last head (`None`)
        for (heads, w, d_r, last) in [
            (16, 512, 64, 16),
            (13, 24, 7, 13),
            (40, 9, 1, 37),
            (1, 8, 3, 1),
        ] {
            let geo = TileGeo {
                heads,
                hp: heads.next_multiple_of(LANES),
                w,
                wp: w.next_multiple_of(LANES),
                d_r,
                dtype: DType::Bf16,
            };
            let rw = w + d_r;
            let q: Vec<f32> = (0..heads * rw)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0)
                .collect();
            let rows = |h: usize| (h < last).then(|| &q[h * rw..(h + 1) * rw]);
            let scales = [0.0721_f32, -0.1353];
            let mut want = vec![f32::NAN; geo.xs() * geo.hp];
            let mut got = vec![f32::NAN; geo.xs() * geo.hp];
            pack_query_by_head(&mut want, rows, &geo, scales);
            pack_query(&mut got, rows, &geo, scales);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{heads} heads, w {w}, d_r {d_r}");
        }
    }
}

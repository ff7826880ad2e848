//! The AVX-512 BF16 tile for bf16 caches: `vdpbf16ps` multiplies pairs of bf16 values
//! and accumulates in f32, 32 multiply-adds per instruction (twice the f32 FMA rate).
//!
//! Scores: heads in lanes, the query packed as bf16 pairs `[k/2][hp]`, each pair of a
//! cached row broadcast straight from the cache (no decode): `S[t][h] += q_h[k..k+2] .
//! row_t[k..k+2]`. Outputs: latent columns in lanes, rows paired through the reduction:
//! the probabilities of rows `t, t+1` become one bf16 pair per head, the latent parts of
//! the two rows are interleaved once per tile into `[t/2][wp]` pairs, and
//! `O[h][j] += (p_t, p_t+1)[h] . (x_t[j], x_t+1[j])`. The query and the probabilities
//! are rounded to bf16 (relative 2^-9 each); everything accumulates in f32.

use super::simd::{Avx512, Simd};
use super::tile::{
    softmax_update, Accum, TileGeo, TileRows, TileScratch, VectorBlocks, ROW_STEP, TILE_ROWS,
};
use crate::dtype::{DType, E4M3_TO_F32, FP8_BLOCK};
use half::bf16;
use std::arch::x86_64::*;

/// Scores of rows `R` x head vectors `HV`; `rows` holds `R` row pointers, `qp` the
/// block's packed query `[ceil(rw/2)][HV*16]`, `s` the scores `[R][hp]`.
#[inline(always)]
unsafe fn score_block<const R: usize, const HV: usize>(
    rows: *const *const u8,
    qp: *const u32,
    hp: usize,
    s: *mut f32,
    rw: usize,
) {
    let qs = HV * 16;
    let mut acc = [[_mm512_setzero_ps(); HV]; R];
    let mut r = [std::ptr::null::<u8>(); R];
    for (i, p) in r.iter_mut().enumerate() {
        *p = *rows.add(i);
    }
    for kk in 0..rw / 2 {
        let mut qv = [_mm512_setzero_si512(); HV];
        for (j, v) in qv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(qp.add(kk * qs + j * 16).cast());
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let pair = r[i].add(4 * kk).cast::<i32>().read_unaligned();
            let b = as_bh(_mm512_set1_epi32(pair));
            for (a, v) in row.iter_mut().zip(qv) {
                *a = _mm512_dpbf16_ps(*a, as_bh(v), b);
            }
        }
    }
    if rw % 2 == 1 {
        // the last element pairs with a zero (only 2 bytes of the row are read)
        let kk = rw / 2;
        for (i, row) in acc.iter_mut().enumerate() {
            let last = r[i].add(2 * (rw - 1)).cast::<u16>().read_unaligned();
            let b = as_bh(_mm512_set1_epi32(last as i32));
            for (j, a) in row.iter_mut().enumerate() {
                let v = _mm512_loadu_si512(qp.add(kk * qs + j * 16).cast());
                *a = _mm512_dpbf16_ps(*a, as_bh(v), b);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm512_storeu_ps(s.add(i * hp + j * 16), *a);
        }
    }
}

/// Outputs of heads `HB` x latent vectors `JV` over `pairs` row pairs; `vp` is the
/// block's packed latents `[pairs][JV*16]`, `o` the outputs `[heads][wp]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_block<const HB: usize, const JV: usize>(
    pp: *const u32,
    hp: usize,
    vp: *const u32,
    wp: usize,
    o: *mut f32,
    corr: *const f32,
    pairs: usize,
) {
    let vs = JV * 16;
    let mut acc = [[_mm512_setzero_ps(); JV]; HB];
    for (h, row) in acc.iter_mut().enumerate() {
        let c = _mm512_set1_ps(*corr.add(h));
        for (j, a) in row.iter_mut().enumerate() {
            *a = _mm512_mul_ps(_mm512_loadu_ps(o.add(h * wp + j * 16)), c);
        }
    }
    for tp in 0..pairs {
        let mut v = [_mm512_setzero_si512(); JV];
        for (j, x) in v.iter_mut().enumerate() {
            *x = _mm512_loadu_si512(vp.add(tp * vs + j * 16).cast());
        }
        for (h, row) in acc.iter_mut().enumerate() {
            let b = as_bh(_mm512_set1_epi32(*pp.add(tp * hp + h) as i32));
            for (a, x) in row.iter_mut().zip(v) {
                *a = _mm512_dpbf16_ps(*a, as_bh(x), b);
            }
        }
    }
    for (h, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm512_storeu_ps(o.add(h * wp + j * 16), *a);
        }
    }
}

#[inline(always)]
unsafe fn as_bh(v: __m512i) -> __m512bh {
    std::mem::transmute(v)
}

/// Probabilities of rows `2i, 2i+1` as bf16 pairs per head: `pp[i][h]`.
#[inline(always)]
unsafe fn pack_probabilities(s: *const f32, pp: *mut u32, n: usize, hp: usize) {
    // word order after the conversion: row 2i in words 0..16, row 2i+1 in 16..32
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for i in 0..n / 2 {
        for h0 in (0..hp).step_by(16) {
            let even = _mm512_loadu_ps(s.add(2 * i * hp + h0));
            let odd = _mm512_loadu_ps(s.add((2 * i + 1) * hp + h0));
            let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(odd, even));
            let pairs = _mm512_permutexvar_epi16(interleave, both);
            _mm512_storeu_si512(pp.add(i * hp + h0).cast(), pairs);
        }
    }
}

/// Latent parts of rows `2i, 2i+1` interleaved, `x_2i[j] | x_2i+1[j] << 16`, zero in the
/// padding `w..wp`; stored block by block of output vectors (see [`VectorBlocks`]) so
/// that each block's `[pairs][width]` slab is contiguous (rows of a power-of-two stride
/// would share a few L1 sets and evict each other).
#[inline(always)]
unsafe fn pack_latents(rows: &[*const u8], vp: *mut u32, w: usize, wp: usize) {
    // word k of the low (high) half: column k/2 (16 + k/2) of row 2i for even k, of
    // row 2i+1 (indices 32..64) for odd k
    let lo_index = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4,
        35, 3, 34, 2, 33, 1, 32, 0,
    );
    let hi_index = _mm512_add_epi16(lo_index, _mm512_set1_epi16(16));
    let pairs = rows.len() / 2;
    for blk in VectorBlocks::new(wp / 16, JV) {
        let base = vp.add(blk.start * 16 * pairs);
        for (i, pair) in rows.chunks_exact(2).enumerate() {
            let dst = base.add(i * blk.len * 16);
            let mut v = 0;
            // two vectors (32 columns) from one 64-byte load of each row
            while v + 2 <= blk.len {
                let j0 = (blk.start + v) * 16;
                let mask: __mmask32 = match w.saturating_sub(j0) {
                    n if n >= 32 => u32::MAX,
                    n => (1u32 << n) - 1,
                };
                let a = _mm512_maskz_loadu_epi16(mask, pair[0].add(2 * j0).cast());
                let b = _mm512_maskz_loadu_epi16(mask, pair[1].add(2 * j0).cast());
                _mm512_storeu_si512(
                    dst.add(v * 16).cast(),
                    _mm512_permutex2var_epi16(a, lo_index, b),
                );
                _mm512_storeu_si512(
                    dst.add((v + 1) * 16).cast(),
                    _mm512_permutex2var_epi16(a, hi_index, b),
                );
                v += 2;
            }
            if v < blk.len {
                let j0 = (blk.start + v) * 16;
                let mask: __mmask16 = match w.saturating_sub(j0) {
                    n if n >= 16 => u16::MAX,
                    n => ((1u32 << n) - 1) as u16,
                };
                let a = _mm256_maskz_loadu_epi16(mask, pair[0].add(2 * j0).cast());
                let b = _mm256_maskz_loadu_epi16(mask, pair[1].add(2 * j0).cast());
                let x = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(a),
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)),
                );
                _mm512_storeu_si512(dst.add(v * 16).cast(), x);
            }
        }
    }
}

/// Packs one group's query rows (`rows(h)` for `h < heads`, `None` past the last) as
/// bf16 pairs, block by block of score vectors: block `b` holds `[ceil(rw/2)][len*16]`
/// at `b.start * 16 * ceil(rw/2)`; the `w` latent columns times `scales[0]`, the RoPE
/// columns times `scales[1]`, before rounding. `dst` (`ceil(rw/2) * hp` values) is
/// overwritten.
pub(super) fn pack_query<'a>(
    dst: &mut [u32],
    rows: impl Fn(usize) -> Option<&'a [f32]>,
    heads: usize,
    hp: usize,
    rw: usize,
    w: usize,
    scales: [f32; 2],
) {
    let rw2 = rw.div_ceil(2);
    // the latent width is even: a pair is all latent or all RoPE
    debug_assert!(w % 2 == 0);
    dst.fill(0);
    for blk in VectorBlocks::new(hp / 16, HV) {
        let block = &mut dst[blk.start * 16 * rw2..(blk.start + blk.len) * 16 * rw2];
        let width = blk.len * 16;
        for i in 0..width {
            let h = blk.start * 16 + i;
            let Some(q) = rows(h).filter(|_| h < heads) else {
                break;
            };
            for (kk, pair) in q.chunks(2).enumerate() {
                let scale = scales[usize::from(2 * kk >= w)];
                let lo = bf16::from_f32(pair[0] * scale).to_bits() as u32;
                let hi = pair
                    .get(1)
                    .map_or(0, |&v| bf16::from_f32(v * scale).to_bits() as u32);
                block[kk * width + i] = lo | hi << 16;
            }
        }
    }
}

/// The bf16 tile: scores with `vdpbf16ps`, softmax update, outputs with `vdpbf16ps`.
///
/// `qp` is the group's query as bf16 pairs `[ceil(rw/2)][hp]` (zero in padding); the
/// rows hold `w + d_r` bf16 values each.
///
/// # Safety
/// The CPU must have AVX-512F, BW, VL and BF16; buffers as documented.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn tile_bf16(
    geo: &TileGeo,
    qp: &[u32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    let (rows, valid) = (tile.rows, tile.valid);
    let (n, hp, wp, rw) = (rows.len(), geo.hp, geo.wp, geo.w + geo.d_r);
    let rw2 = rw.div_ceil(2);
    debug_assert!(n % ROW_STEP == 0 && n <= TILE_ROWS && valid <= n && hp % 16 == 0);
    debug_assert!(qp.len() >= rw2 * hp && acc.o.len() >= geo.heads * wp);

    let s = scr.s.as_mut_ptr();
    for blk in VectorBlocks::new(hp / 16, HV) {
        let q = qp.as_ptr().add(blk.start * 16 * rw2);
        let st = s.add(blk.start * 16);
        // 16 accumulators for whole blocks; single vectors take more rows instead
        for t0 in (0..n).step_by(ROW_STEP) {
            if blk.start == 0 {
                tile.prefetch_next(t0, t0 + ROW_STEP);
            }
            let r = rows.as_ptr().add(t0);
            if blk.len == HV {
                score_block::<4, HV>(r, q, hp, st.add(t0 * hp), rw);
                score_block::<4, HV>(r.add(4), q, hp, st.add((t0 + 4) * hp), rw);
            } else {
                score_block::<ROW_STEP, 1>(r, q, hp, st.add(t0 * hp), rw);
            }
        }
    }

    softmax_update::<Avx512>(&mut scr.s, n, valid, hp, acc, &mut scr.corr);
    pack_probabilities(scr.s.as_ptr(), scr.pp.as_mut_ptr(), n, hp);
    pack_latents(rows, scr.vp.as_mut_ptr(), geo.w, wp);

    let (pp, vp, o, corr) = (
        scr.pp.as_ptr(),
        scr.vp.as_ptr(),
        acc.o.as_mut_ptr(),
        scr.corr.as_ptr(),
    );
    let (heads, pairs) = (geo.heads, n / 2);
    for jb in VectorBlocks::new(wp / 16, JV) {
        let (vj, oj) = (vp.add(jb.start * 16 * pairs), o.add(jb.start * 16));
        for hb in VectorBlocks::new(heads, HB) {
            let (p, oh, c) = (pp.add(hb.start), oj.add(hb.start * wp), corr.add(hb.start));
            match (hb.len == HB, jb.len == JV) {
                (true, true) => output_block::<HB, JV>(p, hp, vj, wp, oh, c, pairs),
                (true, false) => output_block::<HB, 1>(p, hp, vj, wp, oh, c, pairs),
                (false, true) => output_block::<1, JV>(p, hp, vj, wp, oh, c, pairs),
                (false, false) => output_block::<1, 1>(p, hp, vj, wp, oh, c, pairs),
            }
        }
    }
}

/// The bf16 tile over FP8 rows: each row's latent slice decoded (`code * scale` in f32,
/// as every kernel computes it) and rounded to bf16 (nearest even), its bf16 RoPE key
/// copied, into a per-thread `[TILE_ROWS][w + d_r]` buffer that [`tile_bf16`] then
/// reads as a bf16 cache. The result equals, bit for bit, [`tile_bf16`] over a bf16
/// cache holding the dequantised rows rounded from f32 (`vcvtneps2bf16` rounds to
/// nearest even but flushes f32 subnormals, below 1.2e-38, to zero).
///
/// # Safety
/// As [`tile_bf16`]; the rows hold FP8 rows of `geo` (DESIGN 7.1) and `scr` was
/// reserved for `geo`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn tile_fp8(
    geo: &TileGeo,
    qp: &[u32],
    tile: &TileRows,
    scr: &mut TileScratch,
    acc: &mut Accum,
) {
    let (w, rw) = (geo.w, geo.w + geo.d_r);
    // moved out for the call, so that `tile_bf16` may borrow the rest of the scratch
    let mut buf = std::mem::take(&mut scr.fp8_as_bf16);
    debug_assert!(buf.len() >= tile.rows.len() * rw);
    let mut rows = [std::ptr::null::<u8>(); TILE_ROWS];
    let rope_at = DType::Fp8E4m3.rope_offset(w);
    let (mag_mask, sign_mask) = (_mm256_set1_epi16(0x7f), _mm256_set1_epi16(0x80));
    let nan_exp = _mm256_set1_epi16(0x7c00);
    for (t, &row) in tile.rows.iter().enumerate() {
        let dst = buf.as_mut_ptr().add(t * rw);
        let scales = row.add(w);
        for blk in 0..DType::scale_blocks(w) {
            let scale = f32::from_le_bytes(scales.add(4 * blk).cast::<[u8; 4]>().read_unaligned());
            let start = blk * FP8_BLOCK;
            let end = (start + FP8_BLOCK).min(w);
            // as `Simd::decode_fp8` (e4m3 in f16 bits is the value times 2^-8), kept in
            // registers through the rounding to bf16
            let sv = _mm512_set1_ps(scale * 256.0);
            let mut j = start;
            while j + 16 <= end {
                let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(row.add(j).cast()));
                let mag = _mm256_and_si256(b, mag_mask);
                let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, sign_mask));
                let nan = _mm256_and_si256(_mm256_cmpeq_epi16(mag, mag_mask), nan_exp);
                let h = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16::<7>(mag), sign), nan);
                let v = _mm512_mul_ps(_mm512_cvtph_ps(h), sv);
                let out: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.add(j).cast(), out);
                j += 16;
            }
            for k in j..end {
                let v = E4M3_TO_F32[*row.add(k) as usize] * scale;
                *dst.add(k) = bf16::from_f32(v).to_bits();
            }
        }
        std::ptr::copy_nonoverlapping(row.add(rope_at), dst.add(w).cast::<u8>(), 2 * geo.d_r);
        rows[t] = dst.cast::<u8>();
    }
    let bf16_tile = TileRows {
        rows: &rows[..tile.rows.len()],
        valid: tile.valid,
        next: tile.next,
        row_bytes: tile.row_bytes,
    };
    tile_bf16(geo, qp, &bf16_tile, scr, acc);
    scr.fp8_as_bf16 = buf;
}

/// Head vectors per score micro-kernel (16 accumulators of the 32 registers).
const HV: usize = 4;
/// Heads x latent vectors per output micro-kernel.
const HB: usize = 4;
const JV: usize = 4;

// `Avx512` lanes are what the softmax update assumes for `hp`.
const _: () = assert!(<Avx512 as Simd>::LANES == 16);

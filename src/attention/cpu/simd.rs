//! A small f32 vector abstraction over the instruction sets the CPU backend targets, so
//! the tile kernel ([`super::tile`]) and the softmax are written once.
//!
//! Every method is `#[inline(always)]` and `unsafe`: it must only run inside a function
//! compiled with the matching `#[target_feature]` on a CPU that has it (the entry
//! points in `tile` and `bf16dot` are such functions; the backend checks the CPU before
//! calling them). Pointers must be valid for the `LANES` values they touch.

use crate::dtype::{DType, E4M3_TO_F32};
use half::{bf16, f16};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

pub(super) trait Simd {
    const LANES: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum; a NaN in `b` is returned as is (it must reach the output).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `e^x`, relative error ~1e-7; below `x = -87` (and for `-inf`) at most 2e-38, so
    /// weights that small vanish against the running maximum's 1; NaN stays NaN.
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Decodes `n` little-endian values of `dtype` at `src` into `dst` (FP8: bare codes,
    /// scale 1).
    unsafe fn decode_row(dtype: DType, src: *const u8, dst: *mut f32, n: usize);
    /// Decodes `n` e4m3 codes at `src` times `scale` into `dst`: `E4M3_TO_F32[c] * scale`
    /// rounded once to f32, NaN codes to NaN.
    unsafe fn decode_fp8(src: *const u8, dst: *mut f32, n: usize, scale: f32);
}

/// Scalar e4m3 decode for tails and the portable path.
#[inline(always)]
unsafe fn decode_fp8_scalar(src: *const u8, dst: *mut f32, from: usize, n: usize, scale: f32) {
    for j in from..n {
        *dst.add(j) = E4M3_TO_F32[*src.add(j) as usize] * scale;
    }
}

/// Scalar decode of one element, for tails and the portable path.
#[inline(always)]
unsafe fn decode_one(dtype: DType, src: *const u8, i: usize) -> f32 {
    match dtype {
        DType::Bf16 => bf16::from_bits(src.add(2 * i).cast::<u16>().read_unaligned()).to_f32(),
        DType::F16 => f16::from_bits(src.add(2 * i).cast::<u16>().read_unaligned()).to_f32(),
        DType::F32 => src.add(4 * i).cast::<f32>().read_unaligned(),
        DType::Fp8E4m3 => E4M3_TO_F32[*src.add(i) as usize],
    }
}

/// Coefficients of `2^f = e^(f ln 2)` on `[-0.5, 0.5]` (Taylor, degree 6: error 1.2e-7).
const EXP2_POLY: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
];

/// `e^x` is evaluated at `max(x, EXP_LOWER)`: keeps the range reduction finite for `-inf`
/// (the running maximum before the first tile).
const EXP_LOWER: f32 = -87.0;
const EXP_UPPER: f32 = 88.5;

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // vmaxps returns its second operand when either is NaN
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_set1_ps(EXP_LOWER), x);
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(EXP2_POLY[6]);
        for c in EXP2_POLY[..6].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        // scalef gives 2^n * p with correct overflow to inf and NaN propagation
        _mm512_scalef_ps(p, n)
    }
    #[inline(always)]
    unsafe fn decode_fp8(src: *const u8, dst: *mut f32, n: usize, scale: f32) {
        // e4m3 S.EEEE.MMM as the f16 S.0EEEE.MMM0000000 is the value times 2^-8 (bias 15
        // against 7), subnormals included; the 2^8 goes into the scale (exact: a
        // power of two). The NaN codes S.1111.111 get the f16 exponent 11111.
        let full = n / 16 * 16;
        let sv = _mm512_set1_ps(scale * 256.0);
        let (mag_mask, sign_mask) = (_mm256_set1_epi16(0x7f), _mm256_set1_epi16(0x80));
        let nan_exp = _mm256_set1_epi16(0x7c00);
        for i in (0..full).step_by(16) {
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.add(i).cast()));
            let mag = _mm256_and_si256(b, mag_mask);
            let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, sign_mask));
            let nan = _mm256_and_si256(_mm256_cmpeq_epi16(mag, mag_mask), nan_exp);
            let h = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16::<7>(mag), sign), nan);
            _mm512_storeu_ps(dst.add(i), _mm512_mul_ps(_mm512_cvtph_ps(h), sv));
        }
        decode_fp8_scalar(src, dst, full, n, scale);
    }
    #[inline(always)]
    unsafe fn decode_row(dtype: DType, src: *const u8, dst: *mut f32, n: usize) {
        if dtype == DType::Fp8E4m3 {
            return Self::decode_fp8(src, dst, n, 1.0);
        }
        let full = n / 16 * 16;
        let mut i = 0;
        while i < full {
            let v = match dtype {
                DType::Bf16 => {
                    let h = _mm256_loadu_si256(src.add(2 * i).cast());
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(src.add(2 * i).cast())),
                DType::F32 => _mm512_loadu_ps(src.add(4 * i).cast()),
                DType::Fp8E4m3 => unreachable!("decoded above"),
            };
            _mm512_storeu_ps(dst.add(i), v);
            i += 16;
        }
        for j in full..n {
            *dst.add(j) = decode_one(dtype, src, j);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        // operand order keeps a NaN x (vmaxps/vminps return the second operand on NaN)
        let x = _mm256_max_ps(_mm256_set1_ps(EXP_LOWER), x);
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_UPPER), x);
        let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm256_sub_ps(t, n);
        let mut p = _mm256_set1_ps(EXP2_POLY[6]);
        for c in EXP2_POLY[..6].iter().rev() {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(*c));
        }
        // n is in [-126, 128]: build 2^n in two halves so 128 does not overflow the field
        let ni = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(ni);
        let two_a = _mm256_slli_epi32::<23>(_mm256_add_epi32(half, _mm256_set1_epi32(127)));
        let two_b = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_sub_epi32(ni, half),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(
            _mm256_mul_ps(p, _mm256_castsi256_ps(two_a)),
            _mm256_castsi256_ps(two_b),
        )
    }
    #[inline(always)]
    unsafe fn decode_fp8(src: *const u8, dst: *mut f32, n: usize, scale: f32) {
        // as for AVX-512: e4m3 placed in an f16 is the value times 2^-8; F16C widens it.
        // The bit work runs on 16 codes per 256-bit instruction (half the instructions
        // of 8 at a time: benches/RESULTS.md, issue 14).
        let full = n / 16 * 16;
        let sv = _mm256_set1_ps(scale * 256.0);
        let (mag_mask, sign_mask) = (_mm256_set1_epi16(0x7f), _mm256_set1_epi16(0x80));
        let nan_exp = _mm256_set1_epi16(0x7c00);
        for i in (0..full).step_by(16) {
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.add(i).cast()));
            let mag = _mm256_and_si256(b, mag_mask);
            let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, sign_mask));
            let nan = _mm256_and_si256(_mm256_cmpeq_epi16(mag, mag_mask), nan_exp);
            let h = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi16::<7>(mag), sign), nan);
            let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
            let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
            _mm256_storeu_ps(dst.add(i), _mm256_mul_ps(lo, sv));
            _mm256_storeu_ps(dst.add(i + 8), _mm256_mul_ps(hi, sv));
        }
        decode_fp8_scalar(src, dst, full, n, scale);
    }
    #[inline(always)]
    unsafe fn decode_row(dtype: DType, src: *const u8, dst: *mut f32, n: usize) {
        let full = n / 8 * 8;
        // one loop per element type: with the match inside, the loop paid a dispatch
        // and its own counter for every 8 values (half the decode's instructions)
        match dtype {
            DType::Bf16 => {
                for i in (0..full).step_by(8) {
                    let h = _mm_loadu_si128(src.add(2 * i).cast());
                    let v = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                    _mm256_storeu_ps(dst.add(i), _mm256_castsi256_ps(v));
                }
            }
            DType::F16 => {
                for i in (0..full).step_by(8) {
                    let v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(2 * i).cast()));
                    _mm256_storeu_ps(dst.add(i), v);
                }
            }
            DType::F32 => {
                for i in (0..full).step_by(8) {
                    _mm256_storeu_ps(dst.add(i), _mm256_loadu_ps(src.add(4 * i).cast()));
                }
            }
            DType::Fp8E4m3 => return Self::decode_fp8(src, dst, n, 1.0),
        }
        for j in full..n {
            *dst.add(j) = decode_one(dtype, src, j);
        }
    }
}

/// Plain Rust on arrays of 8: the compiler vectorises it for whatever the target has.
#[derive(Clone, Copy)]
pub(super) struct Portable;

const PORTABLE_LANES: usize = 8;

impl Simd for Portable {
    const LANES: usize = PORTABLE_LANES;
    type V = [f32; PORTABLE_LANES];
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PORTABLE_LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        p.cast::<Self::V>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        p.cast::<Self::V>().write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        std::array::from_fn(|i| x[i].exp())
    }
    #[inline(always)]
    unsafe fn decode_row(dtype: DType, src: *const u8, dst: *mut f32, n: usize) {
        for i in 0..n {
            *dst.add(i) = decode_one(dtype, src, i);
        }
    }
    #[inline(always)]
    unsafe fn decode_fp8(src: *const u8, dst: *mut f32, n: usize, scale: f32) {
        decode_fp8_scalar(src, dst, 0, n, scale);
    }
}

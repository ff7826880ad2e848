// Shared by every kernel module of the CUDA backend (libtpla, DESIGN.md 2-4): the cache
// row geometry, types and small helpers, and the FP8 row writer both device appends use. Modules are compiled at run time by NVRTC with
// no CUDA headers: bf16 is a 16-bit integer, special instructions are inline PTX.
//
// Specialisation (-D): SLICE (latent slice width W), PAGE (rows per cache page, a
// multiple of the decode tile NT).

#ifndef SLICE
#error "SLICE must be defined"
#endif
#ifndef PAGE
#define PAGE 64
#endif

#define DR 64
#define RW (SLICE + DR)        // cached row width (latent slice then RoPE key)
#define NT 64                  // tokens per decode tile
#define RESCALE_LOG2 8.0f      // probabilities stay below 2^8 between output rescales
#define LOG2E 1.4426950408889634f

#if (PAGE % NT) != 0 || (SLICE % 64) != 0
#error "unsupported shape"
#endif

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)
#define QNAN __int_as_float(0x7fc00000)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// ---- rows as the host encodes them (src/dtype.rs) ------------------------------------------

// FP8 rows (DESIGN 7.1): SLICE e4m3 codes, an f32 scale per block of FP8_BLOCK of them,
// then the RoPE key in bf16; a multiple of 4 bytes (SLICE % 64 == 0).
#define FP8_BLOCK 128
#define FP8_SCALE_BLOCKS ((SLICE + FP8_BLOCK - 1) / FP8_BLOCK)
#define FP8_ROPE_OFFSET (SLICE + 4 * FP8_SCALE_BLOCKS)
#define FP8_ROW_BYTES (FP8_ROPE_OFFSET + 2 * DR)

// f64 -> bf16 bits as the host's `half::bf16::from_f64` rounds (its rounding looks at the
// upper 32 bits of the double only), so device rows equal the CPU's bit for bit.
__device__ __forceinline__ unsigned short f64_to_bf16_host(double v) {
    const unsigned long long val = (unsigned long long)__double_as_longlong(v);
    const u32 x = (u32)(val >> 32);
    const u32 sign = x & 0x80000000u;
    const u32 ex = x & 0x7FF00000u;
    const u32 man = x & 0x000FFFFFu;
    const u32 hs = sign >> 16;
    if (ex == 0x7FF00000u) {
        const u32 nan_bit = (man == 0 && (u32)val == 0) ? 0u : 0x0040u;
        return (unsigned short)(hs | 0x7F80u | nan_bit | (man >> 13));
    }
    const int half_exp = (int)(ex >> 20) - 1023 + 127;
    if (half_exp >= 0xFF) return (unsigned short)(hs | 0x7F80u);
    if (half_exp <= 0) {
        if (7 - half_exp > 21) return (unsigned short)hs;
        const u32 m = man | 0x00100000u;
        u32 hm = m >> (14 - half_exp);
        const u32 rb = 1u << (13 - half_exp);
        if ((m & rb) != 0 && (m & (3 * rb - 1)) != 0) hm += 1;
        return (unsigned short)(hs | hm);
    }
    const u32 r = hs | ((u32)half_exp << 7) | (man >> 13);
    const u32 rb = 0x1000u;
    return (unsigned short)(((man & rb) != 0 && (man & (3 * rb - 1)) != 0) ? r + 1 : r);
}

// f32 -> bf16 bits as the host's `half::bf16::from_f32` rounds (to nearest even, past the
// largest finite value to infinity; a NaN stays NaN, quiet, with its sign and the top of its
// payload), so device outputs rounded to bf16 equal the host's rounding of the same f32.
__device__ __forceinline__ unsigned short f32_to_bf16_host(float v) {
    const u32 x = __float_as_uint(v);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((x >> 16) | 0x0040u);
    return (unsigned short)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// f32 -> f64 as the host widens it (Rust's `as f64`, x86's cvtss2sd): exact for numbers;
// a NaN keeps its sign and payload and becomes quiet. Built from the bits because the
// device conversion need not keep a NaN's sign or payload, which reach the stored bytes
// (the e4m3 NaN code carries the sign, a bf16 NaN the payload's top bits).
__device__ __forceinline__ double widen_as_host(float x) {
    const u32 b = __float_as_uint(x);
    if ((b & 0x7FFFFFFFu) <= 0x7F800000u) return (double)x;
    const u64 bits = ((u64)(b >> 31) << 63) | 0x7FF8000000000000ull | ((u64)(b & 0x007FFFFFu) << 29);
    return __longlong_as_double((long long)bits);
}

// The e4m3 code of x as the host's `e4m3_from_f64` (the float8 crate's conversion, NVIDIA's
// __nv_cvt_double_to_fp8 with __NV_SATFINITE): round to nearest even from the f64 bits,
// magnitudes past 464 (infinity too) saturate to 448 (0x7e), NaN is 0x7f; every code
// carries x's sign bit. Integer operations only, so no rounding mode or flush applies.
__device__ __forceinline__ u32 e4m3_from_f64(double x) {
    const u64 bits = (u64)__double_as_longlong(x);
    const u32 sign = (u32)(bits >> 63) << 7;
    const u64 absx = bits & 0x7FFFFFFFFFFFFFFFull;
    const int exp = (int)((bits >> 52) & 0x7FF) - 1023 + 7;  // biased as e4m3
    const u32 mant = (u32)(bits >> 49) & 0x7u;                // the 3 kept mantissa bits
    const u64 half_ulp = 1ull << 48;                          // of a normal e4m3 value
    u32 res;
    if (absx <= 0x3F50000000000000ull) {  // at most 2^-10, half the smallest subnormal
        res = 0;
    } else if (absx > 0x7FF0000000000000ull) {  // NaN
        res = 0x7F;
    } else if (absx > 0x407D000000000000ull) {  // beyond 464, the midpoint above 448
        res = 0x7E;
    } else if (absx >= 0x3F90000000000000ull) {  // normal: 2^-6 and up
        res = ((u32)exp << 3) | mant;
        const u64 round = bits & ((half_ulp << 1) - 1);
        if (round > half_ulp || (round == half_ulp && (mant & 1))) res += 1;
    } else {  // subnormal: the implicit bit shifted in, 1 to 4 places
        const int shift = 1 - exp;
        res = (mant | 8u) >> shift;
        const u64 round = (bits | (1ull << 52)) & ((half_ulp << (shift + 1)) - 1);
        if (round > (half_ulp << shift) || (round == (half_ulp << shift) && (res & 1))) res += 1;
    }
    return res | sign;
}

// The scale of an FP8 block whose largest magnitude is amax, as the host's
// `fp8_block_scale`: amax / 448 rounded to f32, or 1 where that is not a positive finite
// f32 (an all-zero block, or one too small or too large for f32 scales).
__device__ __forceinline__ float fp8_block_scale(double amax) {
    const float s = (float)(amax / 448.0);
    return s > 0.f && isfinite(s) ? s : 1.f;
}

// Writes one FP8 row at `row` (4-byte aligned) as the host's `DType::encode_row` does:
// latent(j) for j < SLICE quantised per block of FP8_BLOCK (the block's scale, then each
// value divided by it, in f64), rope(c) for c < DR rounded to bf16. Called by every thread
// of a block of a multiple of 32 threads: each warp takes whole scale blocks, 4 values a
// lane, and finds the block's largest magnitude by shuffles (fmax skips a NaN, as the
// host's f64::max does, so a NaN value gives the NaN code without poisoning its block).
template <class Latent, class Rope>
__device__ __forceinline__ void store_fp8_row(Latent latent, Rope rope, unsigned char* row) {
    const int lane = threadIdx.x % 32;
    for (int blk = threadIdx.x / 32; blk < FP8_SCALE_BLOCKS; blk += blockDim.x / 32) {
        const int j0 = blk * FP8_BLOCK + 4 * lane;
        const bool mine = j0 < SLICE;  // a last block of 64 values leaves lanes idle
        double v[4];
        double amax = 0.0;
        for (int k = 0; k < 4; ++k) {
            v[k] = mine ? latent(j0 + k) : 0.0;
            amax = fmax(amax, fabs(v[k]));
        }
        for (int off = 16; off > 0; off /= 2) amax = fmax(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float scale = fp8_block_scale(amax);
        if (lane == 0) reinterpret_cast<float*>(row + SLICE)[blk] = scale;
        if (mine) {
            u32 codes = 0;
            for (int k = 0; k < 4; ++k) codes |= e4m3_from_f64(v[k] / (double)scale) << (8 * k);
            *reinterpret_cast<u32*>(row + j0) = codes;
        }
    }
    bf16_t* key = reinterpret_cast<bf16_t*>(row + FP8_ROPE_OFFSET);
    for (int c = threadIdx.x; c < DR; c += blockDim.x) key[c] = f64_to_bf16_host(rope(c));
}

// Shared by every kernel module of the CUDA backend (libtpla, DESIGN.md 2-4): the cache
// row geometry, types and small helpers. Modules are compiled at run time by NVRTC with
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

__device__ __forceinline__ float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

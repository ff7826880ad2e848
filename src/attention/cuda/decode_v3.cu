// Latent-attention decode kernel v3 (mma.sync, sm_80 or newer) over a paged bf16 slice
// cache; compiled after common.cuh.
//
// Specialisation (-D): HT (heads per block: 16, 32 or 64), STAGES (cp.async pipeline
// depth), MINB (blocks per multiprocessor the registers are budgeted for).
//
// tpla_decode (kernel v3): one block of 8 warps per (head tile, split, sequence). It
// streams the split's tokens in tiles of NT = 64 rows through shared memory (cp.async,
// STAGES deep); every head of the tile uses each loaded row.
// - S = Q K^T: warp (token group tg, head block hb) computes 16 heads x TW tokens over
//   the full row width (no partial scores to reduce), mma.sync m16n8k16 with Q and K
//   fragments by ldmatrix from XOR-swizzled rows (no padding, conflict-free).
// - Online softmax on S in registers against a reference maximum per row that only
//   moves when a tile's maximum exceeds it by more than RESCALE_LOG2 (log2 units): the
//   token groups exchange maxima and the output is rescaled only then (a block vote,
//   on the first tiles), so a common tile has two barriers and no rescale; P goes to
//   shared memory as bf16, row sums stay per thread until the end.
// - O += P V: warp owns all HT heads x SLICE/8 latent columns, so every V element is
//   read from shared memory once per tile.
// With one split the block writes the final output; otherwise an f32 partial output
// (normalised) and its log-sum-exp, merged by tpla_combine.

#ifndef HT
#error "HT must be defined"
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef MINB
#define MINB 1
#endif

#define CPR (RW / 8)           // 16-byte chunks per cached row
#define NWARPS 8
#define THREADS (NWARPS * 32)
#define MB (HT / 16)           // 16-row blocks of heads
#define TG (NWARPS / MB)       // token groups of the QK step
#define TW (NT / TG)           // tokens per QK warp
#define QK_NT (TW / 8)         // n8 tiles of tokens per QK warp
#define KSTEPS (RW / 16)
#define PV_NT (SLICE / 64)     // n8 tiles of output columns per warp (SLICE / 8 columns)

#if (CPR % 8) != 0 || (HT % 16) != 0 || HT > 64
#error "unsupported shape"
#endif


// Rows of K, Q and P are stored without padding, their 16-byte chunk c at position
// c ^ (row & 7): the 8 rows an ldmatrix reads hit 8 different bank groups.
struct Smem {
    bf16_t k[STAGES][NT][RW];
    bf16_t q[HT][RW];
    bf16_t p[HT][NT];
    float red[TG][HT];   // per-token-group row maxima, then row sums
    float alpha[HT];     // this tile's output rescale per head
    float row_max[HT];   // final reference maximum (log2 units)
};

// The layout the host sizes the dynamic shared memory from (read back through this symbol).
extern "C" __constant__ int tpla_decode_smem_bytes = sizeof(Smem);

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// The copy only where `on`: the predicate is applied inside the asm, so the addresses
// are computed the same way on every lane (no duplicated address arithmetic).
__device__ __forceinline__ void cp_async16_if(bool on, u32 dst, const void* src, int src_bytes) {
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %3, 0; @p cp.async.cg.shared.global [%0], [%1], 16, %2; }"
                 ::"r"(dst), "l"(src), "r"(src_bytes), "r"((int)on));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 addr, u32& r0, u32& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(u32 addr, u32& r0, u32& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r0), "=r"(r1) : "r"(addr));
}

// D += A B, m16n8k16, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled array of `cpr`-chunk rows.
__device__ __forceinline__ u32 swz(int row, int chunk, int cpr) {
    return (u32)(row * cpr + (chunk ^ (row & 7))) * 16u;
}

// Issues the cp.async copies of token tile `tile` into the stage at shared address
// `stage_base`: warp w copies rows w, w + 8, ..., its lanes consecutive 16-byte chunks
// (coalesced). Rows past the sequence's end are zero-filled so that 0-weighted rows
// never carry NaN bit patterns into P V.
__device__ __forceinline__ void load_tile(u32 stage_base, const unsigned char* __restrict__ pool, u64 page_stride,
                                          const int* __restrict__ pages, int tile, int len,
                                          int warp, int lane) {
    const int first = tile * NT;
    const int page = pages[first / PAGE];
    const bf16_t* base =
        reinterpret_cast<const bf16_t*>(pool + (u64)page * page_stride) + ((first % PAGE) + warp) * RW + lane * 8;
    const u32 dst0 = stage_base + (u32)(warp * RW * 2) + (u32)((lane ^ warp) * 16);
#pragma unroll
    for (int i = 0; i < NT / NWARPS; ++i) {
        const int bytes = first + warp + i * NWARPS < len ? 16 : 0;
#pragma unroll
        for (int j = 0; j < (CPR + 31) / 32; ++j)
            cp_async16_if(CPR % 32 == 0 || lane + 32 * j < CPR,
                          dst0 + (u32)(i * NWARPS * RW * 2 + j * 512),
                          base + (u64)i * NWARPS * RW + j * 256, bytes);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MINB)
tpla_decode(const unsigned char* __restrict__ pool,  // page p at pool + p * page_stride: [PAGE][RW] bf16
            const float* __restrict__ q,          // [batch][heads][RW]
            const int* __restrict__ block_table,  // [slots][max_pages]
            const int* __restrict__ seq_lens,     // [slots]
            const int* __restrict__ slots,        // [batch]
            int num_slots, int heads, int max_pages, int num_splits,
            float* __restrict__ out,              // [batch][heads][SLICE]  (one split)
            float* __restrict__ lse,              // [batch][heads]         (one split)
            float* __restrict__ part_out,         // [batch][splits][heads][SLICE]
            float* __restrict__ part_lse,         // [batch][splits][heads]
            unsigned long long page_stride)       // bytes, a multiple of 16
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);

    const int h0 = blockIdx.x * HT;
    const int split = blockIdx.y;
    const int b = blockIdx.z;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4;   // mma row group
    const int t4 = lane % 4;  // mma thread in group

    // Slot ids come from engine memory: one out of range reads nothing and, like an
    // empty slot, yields NaN outputs below.
    const int slot = slots[b];
    const bool valid_slot = slot >= 0 && slot < num_slots;
    const int len = valid_slot ? seq_lens[slot] : 0;
    const int* pages = block_table + (u64)(valid_slot ? slot : 0) * max_pages;
    const int tiles = (len + NT - 1) / NT;
    const int per_split = (tiles + num_splits - 1) / num_splits;
    const int t_begin = split * per_split;
    const int t_end = min(tiles, t_begin + per_split);

    if (t_begin >= t_end) {
        if (num_splits > 1) {  // an empty split: contributes nothing to the merge
            if (tid < HT) part_lse[((u64)b * num_splits + split) * heads + h0 + tid] = NEG_INF;
        } else {  // nothing to attend to: NaN, never a previous step's values
            float* dst = out + ((u64)b * heads + h0) * SLICE;
            for (int i = tid; i < HT * SLICE; i += THREADS) dst[i] = QNAN;
            if (tid < HT) lse[(u64)b * heads + h0 + tid] = QNAN;
        }
        return;
    }

    const u32 k_base = smem_addr(&sm.k[0][0][0]);
    const u32 q_base = smem_addr(&sm.q[0][0]);
    const u32 p_base = smem_addr(&sm.p[0][0]);

    // Prefetch the first tiles, then stage the queries (f32 -> bf16) while they fly.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (t_begin + s < t_end)
            load_tile(k_base + s * NT * RW * 2, pool, page_stride, pages, t_begin + s, len, warp, lane);
        cp_async_commit();
    }
    const float* qb = q + ((u64)b * heads + h0) * RW;
    for (int i = tid; i < HT * RW / 4; i += THREADS) {
        const int r = (i * 4) / RW;
        const int c = (i * 4) % RW;
        const float4 v = *reinterpret_cast<const float4*>(qb + (u64)r * RW + c);
        uint2 packed = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
        *reinterpret_cast<uint2*>(smem_raw + ((char*)&sm.q[0][0] - (char*)smem_raw) +
                                  swz(r, c / 8, CPR) + (c % 8) * 2) = packed;
    }

    // QK roles: 16 heads (head block hb) x TW tokens (token group tg).
    const int hb = warp % MB;
    const int tg = warp / MB;
    // Per-lane ldmatrix offsets; k-step ks uses offset[ks % 4] + 128 * (ks / 4) (the XOR
    // of the swizzle only touches the chunk index's low 3 bits).
    u32 q_off[4], k_off[4];
    {
        const int q_row = hb * 16 + lane % 16;
        const int k_row = tg * TW + ((lane / 16) * 8 + lane % 8) % TW;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            q_off[j] = q_base + swz(q_row, 2 * j + lane / 16, CPR);
            k_off[j] = swz(k_row, 2 * j + (lane / 8) % 2, CPR);
        }
    }
    // PV roles: all HT heads x SLICE / 8 columns (PV_NT n8 tiles from column pv_c0 * 8).
    const int pv_c0 = warp * PV_NT;
    u32 p_off[4], v_off[(PV_NT + 1) / 2];
    {
        const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
        for (int j = 0; j < 4; ++j) p_off[j] = p_base + swz(lane % 16, 2 * j + lane / 16, NT / 8);
#pragma unroll
        for (int j = 0; j < (PV_NT + 1) / 2; ++j) v_off[j] = swz(v_row, pv_c0 + 2 * j + lane / 16, CPR);
    }

    float o[MB][PV_NT][4];
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
        for (int n = 0; n < PV_NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[m][n][e] = 0.f;
    // Reference maxima (log2 units) and this thread's partial row sums, rows g and g + 8
    // of head block hb (identical maxima in every token group).
    float m_ref[2] = {NEG_INF, NEG_INF};
    float l_part[2] = {0.f, 0.f};

    int stage = 0;
    for (int tile = t_begin; tile < t_end; ++tile) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int next = tile + STAGES - 1;
            if (next < t_end) {
                const int ns = (stage + STAGES - 1) % STAGES;
                load_tile(k_base + ns * NT * RW * 2, pool, page_stride, pages, next, len, warp, lane);
            }
            cp_async_commit();
        }
        const u32 kst = k_base + stage * NT * RW * 2;

        // ---- S = Q K^T for 16 heads x TW tokens over the full row ----
        float s[QK_NT][4];
#pragma unroll
        for (int n = 0; n < QK_NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            u32 a0, a1, a2, a3;
            ldsm_x4(q_off[ks % 4] + 128 * (ks / 4), a0, a1, a2, a3);
#if QK_NT == 1
            {
                u32 b0, b1;
                ldsm_x2(kst + k_off[ks % 4] + 128 * (ks / 4), b0, b1);
                mma_bf16(s[0], a0, a1, a2, a3, b0, b1);
            }
#else
#pragma unroll
            for (int n = 0; n < QK_NT; n += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4(kst + k_off[ks % 4] + 128 * (ks / 4) + n * 8 * RW * 2, b0, b1, b2, b3);
                mma_bf16(s[n], a0, a1, a2, a3, b0, b1);
                mma_bf16(s[n + 1], a0, a1, a2, a3, b2, b3);
            }
#endif
        }

        // ---- online softmax ----
        // Probabilities are first taken against the current reference maxima; only when
        // some token group's maximum exceeds its reference by more than RESCALE_LOG2 (a
        // block-wide vote, on the first tiles only) do the groups exchange maxima, move
        // the references and redo P. The common tile thus needs two barriers.
        const int first = tile * NT;
        if (first + NT > len) {  // the sequence's last, partial tile
#pragma unroll
            for (int n = 0; n < QK_NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (first + tg * TW + n * 8 + 2 * t4 + (e & 1) >= len) s[n][e] = NEG_INF;
        }
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < QK_NT; ++n) {
            mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            mx[h] *= LOG2E;
        }
        const int row0 = hb * 16 + g;
        unsigned char* p_bytes = reinterpret_cast<unsigned char*>(&sm.p[0][0]);
        float l_tile[2];
        // P against m_ref into shared memory; the tile's row sums into l_tile.
        auto write_p = [&]() {
            l_tile[0] = 0.f;
            l_tile[1] = 0.f;
#pragma unroll
            for (int n = 0; n < QK_NT; ++n) {
                const float p0 = fast_exp2(fmaf(s[n][0], LOG2E, -m_ref[0]));
                const float p1 = fast_exp2(fmaf(s[n][1], LOG2E, -m_ref[0]));
                const float p2 = fast_exp2(fmaf(s[n][2], LOG2E, -m_ref[1]));
                const float p3 = fast_exp2(fmaf(s[n][3], LOG2E, -m_ref[1]));
                l_tile[0] += p0 + p1;
                l_tile[1] += p2 + p3;
                const u32 at = swz(row0, tg * QK_NT + n, NT / 8) + 4 * t4;
                *reinterpret_cast<u32*>(p_bytes + at) = pack_bf16x2(p0, p1);
                *reinterpret_cast<u32*>(p_bytes + at + 8 * NT * 2) = pack_bf16x2(p2, p3);
            }
        };
        write_p();
        if (__syncthreads_or(mx[0] > m_ref[0] + RESCALE_LOG2 || mx[1] > m_ref[1] + RESCALE_LOG2)) {
            if (t4 == 0) {
                sm.red[tg][row0] = mx[0];
                sm.red[tg][row0 + 8] = mx[1];
            }
            __syncthreads();
            float alpha[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float m = sm.red[0][row0 + 8 * h];
#pragma unroll
                for (int t = 1; t < TG; ++t) m = fmaxf(m, sm.red[t][row0 + 8 * h]);
                alpha[h] = 1.f;
                if (m > m_ref[h] + RESCALE_LOG2) {  // m is finite: a tile holds a valid token
                    alpha[h] = fast_exp2(m_ref[h] - m);  // 0 on the first tile
                    m_ref[h] = m;
                    l_part[h] *= alpha[h];
                }
            }
            write_p();
            if (tg == 0 && t4 == 0) {
                sm.alpha[row0] = alpha[0];
                sm.alpha[row0 + 8] = alpha[1];
            }
            __syncthreads();
#pragma unroll
            for (int m = 0; m < MB; ++m) {
                const float a_lo = sm.alpha[m * 16 + g];
                const float a_hi = sm.alpha[m * 16 + g + 8];
#pragma unroll
                for (int n = 0; n < PV_NT; ++n) {
                    o[m][n][0] *= a_lo;
                    o[m][n][1] *= a_lo;
                    o[m][n][2] *= a_hi;
                    o[m][n][3] *= a_hi;
                }
            }
        }
        l_part[0] += l_tile[0];
        l_part[1] += l_tile[1];

        // ---- O += P V  (V = the latent part of the cached rows) ----
#pragma unroll
        for (int ks = 0; ks < NT / 16; ++ks) {
            u32 a[MB][4];
#pragma unroll
            for (int m = 0; m < MB; ++m)
                ldsm_x4(p_off[ks] + m * 16 * NT * 2, a[m][0], a[m][1], a[m][2], a[m][3]);
#if PV_NT == 1
            {
                u32 b0, b1;
                ldsm_x2_t(kst + v_off[0] + ks * 16 * RW * 2, b0, b1);
#pragma unroll
                for (int m = 0; m < MB; ++m) mma_bf16(o[m][0], a[m][0], a[m][1], a[m][2], a[m][3], b0, b1);
            }
#else
#pragma unroll
            for (int n = 0; n < PV_NT; n += 2) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(kst + v_off[n / 2] + ks * 16 * RW * 2, b0, b1, b2, b3);
#pragma unroll
                for (int m = 0; m < MB; ++m) {
                    mma_bf16(o[m][n], a[m][0], a[m][1], a[m][2], a[m][3], b0, b1);
                    mma_bf16(o[m][n + 1], a[m][0], a[m][1], a[m][2], a[m][3], b2, b3);
                }
            }
#endif
        }
        stage = (stage + 1) % STAGES;
    }
    cp_async_wait<0>();

    // ---- row sums over the quad and the token groups; reference maxima ----
    // (sm.red is free: a barrier follows its last read)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_part[h] += __shfl_xor_sync(0xffffffffu, l_part[h], 1);
        l_part[h] += __shfl_xor_sync(0xffffffffu, l_part[h], 2);
    }
    {
        const int row0 = hb * 16 + g;
        if (t4 == 0) {
            sm.red[tg][row0] = l_part[0];
            sm.red[tg][row0 + 8] = l_part[1];
            if (tg == 0) {
                sm.row_max[row0] = m_ref[0];
                sm.row_max[row0 + 8] = m_ref[1];
            }
        }
    }
    __syncthreads();

    // ---- write the (partial) output, normalised, and its log-sum-exp ----
    float* dst;
    if (num_splits == 1) {
        dst = out + ((u64)b * heads + h0) * SLICE;
    } else {
        dst = part_out + (((u64)b * num_splits + split) * heads + h0) * SLICE;
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
        const int r_lo = m * 16 + g;
        const int r_hi = r_lo + 8;
        float l_lo = 0.f, l_hi = 0.f;
#pragma unroll
        for (int t = 0; t < TG; ++t) {
            l_lo += sm.red[t][r_lo];
            l_hi += sm.red[t][r_hi];
        }
        const float inv_lo = 1.f / l_lo;
        const float inv_hi = 1.f / l_hi;
#pragma unroll
        for (int n = 0; n < PV_NT; ++n) {
            const int c = (pv_c0 + n) * 8 + 2 * t4;
            *reinterpret_cast<float2*>(dst + (u64)r_lo * SLICE + c) =
                make_float2(o[m][n][0] * inv_lo, o[m][n][1] * inv_lo);
            *reinterpret_cast<float2*>(dst + (u64)r_hi * SLICE + c) =
                make_float2(o[m][n][2] * inv_hi, o[m][n][3] * inv_hi);
        }
    }
    if (tid < HT) {
        float l = 0.f;
#pragma unroll
        for (int t = 0; t < TG; ++t) l += sm.red[t][tid];
        // natural-log units: m_ref is max * log2(e)
        const float v = (sm.row_max[tid] + __log2f(l)) * 0.6931471805599453f;
        if (num_splits == 1) lse[(u64)b * heads + h0 + tid] = v;
        else part_lse[((u64)b * num_splits + split) * heads + h0 + tid] = v;
    }
}

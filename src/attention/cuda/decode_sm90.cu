// Latent-attention decode kernel for Hopper (sm_90a): wgmma from shared memory, tiles
// by the bulk tensor copy engine (TMA) on an mbarrier pipeline, two warpgroups.
// Compiled after common.cuh and wgmma.cuh.
//
// Specialisation (-D): SLICE, MODE (how the two warpgroups share a block's work; the
// output accumulator of a warpgroup, 64 rows x at most 256 f32 columns, must stay in
// registers), STAGES (tiles in flight).
//
// One block of two warpgroups (WG0, WG1), each owning 64 query rows:
// - MODE_TOKENS (64 heads, SLICE <= 256): both hold the same 64 heads and WG w takes
//   the tiles j = w, w + 2, ... of the split (STAGES is even, so it owns the stages of
//   its parity); the two partial results are merged through shared memory at the end.
// - MODE_HEADS (128 heads, SLICE <= 256): WG w holds heads 64w..64w+63 and both read
//   every tile, so each K tile is loaded once for 128 heads. Their matrix products
//   alternate (two named barriers): one's softmax runs under the other's products.
// - MODE_COLUMNS (64 heads, SLICE = 512): WG w holds output columns 256w..256w+255 of
//   the same 64 heads; tile j's scores and softmax are computed by WG j % 2, which
//   passes P (bf16, in its register layout) and its reference maxima to the other
//   through shared memory (one slot, strictly alternating, named-barrier arrive/sync).
//   The receiver adopts a larger reference (rescaling its output rows) or scales the
//   received P down to its own; row sums are merged at the end.
// Tiles are cache pages (NT = 64 rows): RW/64 tensor copies of 64 rows x 64 columns
// (128-byte swizzle, the layout wgmma reads) completing on the stage's `full` mbarrier.
// Pages are tensor coordinates, so a page index outside the pool reads zeros, never
// memory outside it. A stage is refilled (with the tile STAGES further on) by one
// thread of the last warpgroup to finish reading it, right after that: no producer
// warp, which would cost the consumers registers (each sub-partition's register file
// is shared by the block's warps on it: 9 warps leave 168 registers a thread, 8 leave
// 255).
// Per tile, S = Q K^T is RW/16 wgmma m64n64k16 with Q and K both read by the tensor
// cores from shared memory; the online softmax runs in registers against a reference
// maximum per row that moves only when the tile's maximum exceeds it by more than
// RESCALE_LOG2 (then the output rows are rescaled: first tiles only); O += P V is 4
// wgmma m64nNk16 with P from registers in the accumulator layout of S and V the
// latent columns of the same K tile read transposed.
// A tile past the sequence's end has its rows zeroed in shared memory before use (0 *
// NaN would poison P V). With one split the block writes the final output; otherwise an
// f32 partial output (normalised) and its log-sum-exp, merged by tpla_combine.

#define MODE_TOKENS 0
#define MODE_HEADS 1
#define MODE_COLUMNS 2
#ifndef MODE
#error "MODE must be defined"
#endif
#ifndef STAGES
#error "STAGES must be defined"
#endif

#define CHUNKS (RW / 64)                   // 128-byte swizzle atoms across a row
#define ATOM_BYTES (64 * 128)              // 64 rows of one 64-column chunk
#define STAGE_BYTES (CHUNKS * ATOM_BYTES)  // one tile of NT = 64 rows
#define QWG_BYTES (CHUNKS * ATOM_BYTES)    // 64 query rows
#define HQ (MODE == MODE_HEADS ? 128 : 64)  // heads per block
#define THREADS 256
#define PV_N (MODE == MODE_COLUMNS ? SLICE / 2 : SLICE)  // output columns per warpgroup
#define ON (PV_N / 2)                      // output accumulators per thread
#define SHARED_TILES (MODE != MODE_TOKENS)  // both warpgroups read every tile

#if MODE == MODE_COLUMNS ? SLICE != 512 : (SLICE != 64 && SLICE != 128 && SLICE != 256)
#error "unsupported slice width for this mode"
#endif
#if MODE == MODE_TOKENS && (STAGES % 2) != 0
#error "with two warpgroups taking alternate tiles, STAGES must be even"
#endif
#if NT != PAGE
#error "one tensor copy per page: the tile is the page"
#endif

// Byte layout of the dynamic shared memory, from a 1024-byte aligned base (the
// swizzle atoms must be): K stages, queries, the P exchange slot (MODE_COLUMNS: 16
// words of P and 2 maxima per thread), the stages' mbarriers, then per stage a count
// of the warpgroups done with it (SHARED_TILES).
#define XCHG_WORDS 18
#define SM_K 0
#define SM_Q (STAGES * STAGE_BYTES)
#define SM_X (SM_Q + (HQ / 64) * QWG_BYTES)
#define SM_BAR (SM_X + (MODE == MODE_COLUMNS ? XCHG_WORDS * 128 * 4 : 0))
#define SM_DONE (SM_BAR + STAGES * 8)
#define SM_END (SM_DONE + STAGES * 8)
#define SM_ALIGN_SLACK 1024

// Named barriers (0 is __syncthreads): 2 + w warpgroup w, 4 + w warpgroup w's turn at
// the tensor cores (MODE_HEADS), 6 + w P from warpgroup w (MODE_COLUMNS).
#define BAR_WG 2
#define BAR_TURN 4
#define BAR_P 6

// The layout the host sizes the dynamic shared memory from (read back through this symbol).
extern "C" __constant__ int tpla_decode_smem_bytes = SM_END + SM_ALIGN_SLACK;

// The driver's CUtensorMap: 128 opaque bytes, passed by value as a kernel parameter.
struct __align__(64) TensorMap {
    u64 opaque[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load_tile(u32 dst, const TensorMap* map, u32 bar, int col, int row) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(dst), "l"((u64)map), "r"(bar), "r"(col), "r"(row) : "memory");
}
// Orders this thread's ordinary shared-memory stores before later reads by the tensor
// cores or the copy engine (the async proxy).
__device__ __forceinline__ void fence_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Signals a named barrier without waiting (the other side waits with named_barrier).
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accesses of accumulator registers across the
// asynchronous matrix instructions that write them.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// wgmma shared-memory descriptor of a 128-byte-swizzled operand at `addr`: `lbo` and
// `sbo` are the byte strides between 64-element column blocks and between 8-row groups.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | (1ull << 62);
}

// Starts the copy of tile `j` of the split into its stage.
__device__ __forceinline__ void load_tile(const TensorMap* map, u32 k_base, u32 full_bar, int j, int page) {
    const int s = j % STAGES;
    mbar_expect_tx(full_bar + 8 * s, STAGE_BYTES);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
        tma_load_tile(k_base + s * STAGE_BYTES + c * ATOM_BYTES, map, full_bar + 8 * s, c * 64, page * PAGE);
}

// S = Q K^T for 64 query rows x the 64 tokens of the tile at `kst`, over the full row.
__device__ __forceinline__ void scores(float (&sc)[32], u32 q_rows, u32 kst) {
    fence_regs(sc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < RW / 16; ++ks) {
        const u32 off = (ks / 4) * ATOM_BYTES + (ks % 4) * 32;
        wgmma_qk_n64(sc, smem_desc(q_rows + off, 16, 1024), smem_desc(kst + off, 16, 1024), ks > 0);
    }
    wgmma_commit();
}

// O += P V over the tile at `kst`, V = PV_N latent columns from `col_chunk` * 64.
__device__ __forceinline__ void attend_values(float (&o)[ON], const u32 (&pa)[16], u32 kst, int col_chunk) {
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < NT / 16; ++kk) {
        const u64 dv = smem_desc(kst + col_chunk * ATOM_BYTES + kk * 16 * 128, ATOM_BYTES, 1024);
#if PV_N == 256
        wgmma_pv_n256(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#elif PV_N == 128
        wgmma_pv_n128(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#else
        wgmma_pv_n64(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#endif
    }
    wgmma_commit();
}

// Multiplies output row h (0: row0, 1: row0 + 8) of this thread by `alpha`.
__device__ __forceinline__ void scale_row(float (&o)[ON], int h, float alpha) {
#pragma unroll
    for (int n = 0; n < ON / 4; ++n) {
        o[4 * n + 2 * h] *= alpha;
        o[4 * n + 2 * h + 1] *= alpha;
    }
}

// The online softmax of one tile's scores (sc[4 n + e]: row row0 + 8 (e / 2), token
// 8 n + 2 t4 + e % 2, the first `valid` tokens real): moves the reference maxima when
// the tile's maximum exceeds them by more than RESCALE_LOG2 (rescaling the output rows
// and row sums), adds the tile's probabilities to the row sums and packs them as bf16
// pairs, the A operand of the P V products.
__device__ __forceinline__ void softmax_tile(float (&sc)[32], int valid, int t4, float (&m_ref)[2],
                                             float (&l_part)[2], float (&o)[ON], u32 (&pa)[16]) {
    if (valid < NT) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (8 * n + 2 * t4 + (e & 1) >= valid) sc[4 * n + e] = NEG_INF;
    }
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        mx[0] = fmaxf(mx[0], fmaxf(sc[4 * n], sc[4 * n + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(sc[4 * n + 2], sc[4 * n + 3]));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        mx[h] *= LOG2E;
        if (mx[h] > m_ref[h] + RESCALE_LOG2) {  // mx is finite: the tile holds a valid token
            const float alpha = fast_exp2(m_ref[h] - mx[h]);  // 0 on the first tile
            m_ref[h] = mx[h];
            l_part[h] *= alpha;
            scale_row(o, h, alpha);
        }
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        const float p0 = fast_exp2(fmaf(sc[4 * n], LOG2E, -m_ref[0]));
        const float p1 = fast_exp2(fmaf(sc[4 * n + 1], LOG2E, -m_ref[0]));
        const float p2 = fast_exp2(fmaf(sc[4 * n + 2], LOG2E, -m_ref[1]));
        const float p3 = fast_exp2(fmaf(sc[4 * n + 3], LOG2E, -m_ref[1]));
        l_part[0] += p0 + p1;
        l_part[1] += p2 + p3;
        pa[2 * n] = pack_bf16x2(p0, p1);
        pa[2 * n + 1] = pack_bf16x2(p2, p3);
    }
}

__device__ __forceinline__ u32 scale_bf16x2(u32 v, float f) {
    const float lo = __uint_as_float(v << 16) * f;
    const float hi = __uint_as_float(v & 0xffff0000u) * f;
    return pack_bf16x2(lo, hi);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
tpla_decode(const __grid_constant__ TensorMap pool_map,  // the pool: [pages * PAGE][RW] bf16
            const float* __restrict__ q,          // [batch][heads][RW]
            const int* __restrict__ block_table,  // [slots][max_pages]
            const int* __restrict__ seq_lens,     // [slots]
            const int* __restrict__ slots,        // [batch]
            int num_slots, int heads, int max_pages, int num_splits,
            float* __restrict__ out,              // [batch][heads][SLICE]  (one split)
            float* __restrict__ lse,              // [batch][heads]         (one split)
            float* __restrict__ part_out,         // [batch][splits][heads][SLICE]
            float* __restrict__ part_lse)         // [batch][splits][heads]
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const u32 raw_base = smem_addr(smem_raw);
    const u32 pad = ((raw_base + 1023u) & ~1023u) - raw_base;
    unsigned char* smem = smem_raw + pad;
    const u32 base = raw_base + pad;
    const u32 k_base = base + SM_K;
    const u32 q_base = base + SM_Q;
    const u32 full_bar = base + SM_BAR;  // full_bar + 8 * stage

    const int h0 = blockIdx.x * HQ;
    const int split = blockIdx.y;
    const int b = blockIdx.z;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;

    // Slot ids come from engine memory: one out of range reads nothing and, like an
    // empty slot, yields NaN outputs below.
    const int slot = slots[b];
    const bool valid_slot = slot >= 0 && slot < num_slots;
    const int len = valid_slot ? seq_lens[slot] : 0;
    const int* pages = block_table + (u64)(valid_slot ? slot : 0) * max_pages;
    const int tiles = (len + NT - 1) / NT;
    const int per_split = (tiles + num_splits - 1) / num_splits;
    const int t_begin = split * per_split;
    const int n_tiles = min(tiles, t_begin + per_split) - t_begin;

    if (n_tiles <= 0) {
        if (num_splits > 1) {  // an empty split: contributes nothing to the merge
            if (tid < HQ) part_lse[((u64)b * num_splits + split) * heads + h0 + tid] = NEG_INF;
        } else {  // nothing to attend to: NaN, never a previous step's values
            float* dst = out + ((u64)b * heads + h0) * SLICE;
            for (int i = tid; i < HQ * SLICE; i += THREADS) dst[i] = QNAN;
            if (tid < HQ) lse[(u64)b * heads + h0 + tid] = QNAN;
        }
        return;
    }

    const int wg = warp / 4;
    const int tw = tid % 128;  // thread in its warpgroup
    const int g = lane / 4;    // accumulator row group
    const int t4 = lane % 4;   // thread in the row's quad
    const int row0 = (warp % 4) * 16 + g;  // this thread's rows in its warpgroup: row0, row0 + 8
    const int j_first = MODE == MODE_TOKENS ? wg : 0;
    const int j_step = MODE == MODE_TOKENS ? 2 : 1;
    // The thread that starts this warpgroup's copies (SHARED_TILES: either warpgroup's).
    const bool loader = tw == 0;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full_bar + 8 * s, 1);
            *reinterpret_cast<u32*>(smem + SM_DONE + 8 * s) = 0u;
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (loader && (!SHARED_TILES || wg == 0)) {
        asm volatile("prefetch.tensormap [%0];" ::"l"((u64)&pool_map) : "memory");
        for (int j = j_first; j < min(STAGES, n_tiles); j += j_step)
            load_tile(&pool_map, k_base, full_bar, j, pages[t_begin + j]);
    }

    // Queries f32 -> bf16 into the swizzled atoms: element (r, c) of warpgroup block
    // r / 64 at chunk c / 64, row r % 64, 16-byte unit ((c % 64) / 8) ^ (r % 8).
    {
        const float* qb = q + ((u64)b * heads + h0) * RW;
        for (int i = tid; i < HQ * RW / 4; i += THREADS) {
            const int r = (i * 4) / RW;
            const int c = (i * 4) % RW;
            const float4 v = *reinterpret_cast<const float4*>(qb + (u64)r * RW + c);
            const int rr = r % 64;
            const u32 at = (u32)((r / 64) * QWG_BYTES + (c / 64) * ATOM_BYTES + rr * 128 +
                                 ((((c % 64) / 8) ^ (rr % 8)) * 16) + (c % 8) * 2);
            *reinterpret_cast<uint2*>(smem + SM_Q + at) =
                make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
        }
        fence_async_shared();
        __syncthreads();
    }
    const u32 q_wg = q_base + (MODE == MODE_HEADS ? wg * QWG_BYTES : 0);
    // this warpgroup's output columns, in 64-column chunks
    const int col_chunk = MODE == MODE_COLUMNS ? wg * (PV_N / 64) : 0;
#if MODE == MODE_COLUMNS
    // the exchange slot, word i of thread tw at xchg[i * 128 + tw] (conflict-free)
    u32* xchg = reinterpret_cast<u32*>(smem + SM_X);
#elif MODE == MODE_HEADS
    if (wg == 1) named_arrive(BAR_TURN + 0, THREADS);  // WG0 takes the first turn
#endif

    float o[ON];
#pragma unroll
    for (int i = 0; i < ON; ++i) o[i] = 0.f;
    // Reference maxima (log2 units) and this thread's partial row sums for row0, row0 + 8.
    float m_ref[2] = {NEG_INF, NEG_INF};
    float l_part[2] = {0.f, 0.f};

    for (int j = j_first; j < n_tiles; j += j_step) {
        const int s = j % STAGES;
        const u32 kst = k_base + s * STAGE_BYTES;
        // the page of the tile this stage takes next, read early to hide the latency
        const int refill = j + STAGES;
        const int refill_page = loader && refill < n_tiles ? pages[t_begin + refill] : 0;
        mbar_wait(full_bar + 8 * s, (j / STAGES) & 1);
        const int first = (t_begin + j) * NT;
        const int valid = min(NT, len - first);
        if (valid < NT) {
            // The sequence's last page: zero its rows past the end (whatever the engine
            // left there) before the tensor cores read them; the readers of this stage
            // split the work and meet at a barrier.
            const int readers = SHARED_TILES ? THREADS : 128;
            const int me = SHARED_TILES ? tid : tw;
            const int units = CHUNKS * (NT - valid) * 8;  // 16-byte units to clear
            for (int u = me; u < units; u += readers) {
                const int c = u / ((NT - valid) * 8);
                const int rest = u % ((NT - valid) * 8);
                const int r = valid + rest / 8;
                *reinterpret_cast<uint4*>(smem + SM_K + s * STAGE_BYTES + c * ATOM_BYTES + r * 128 +
                                          (rest % 8) * 16) = make_uint4(0u, 0u, 0u, 0u);
            }
            fence_async_shared();
            if (SHARED_TILES) __syncthreads();
            else named_barrier(BAR_WG + wg, 128);
        }

        u32 pa[16];  // P of this tile as bf16 pairs
        if (MODE != MODE_COLUMNS || j % 2 == wg) {
            float sc[32];
#if MODE == MODE_HEADS
            named_barrier(BAR_TURN + wg, THREADS);  // wait for this warpgroup's turn
            scores(sc, q_wg, kst);
            if (wg == 0 || j + 1 < n_tiles) named_arrive(BAR_TURN + (1 - wg), THREADS);
#else
            scores(sc, q_wg, kst);
#endif
            wgmma_wait_all();
            fence_regs(sc);
            softmax_tile(sc, valid, t4, m_ref, l_part, o, pa);
#if MODE == MODE_COLUMNS
            // Publish P and the maxima it is relative to. The slot held the other's
            // previous P, which this thread read (its own words) one tile ago.
#pragma unroll
            for (int i = 0; i < 16; ++i) xchg[i * 128 + tw] = pa[i];
            xchg[16 * 128 + tw] = __float_as_uint(m_ref[0]);
            xchg[17 * 128 + tw] = __float_as_uint(m_ref[1]);
            named_arrive(BAR_P + wg, THREADS);
#endif
        }
#if MODE == MODE_COLUMNS
        else {
            named_barrier(BAR_P + (1 - wg), THREADS);
#pragma unroll
            for (int i = 0; i < 16; ++i) pa[i] = xchg[i * 128 + tw];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float m = __uint_as_float(xchg[(16 + h) * 128 + tw]);
                if (m > m_ref[h]) {  // adopt the larger reference
                    const float alpha = fast_exp2(m_ref[h] - m);
                    m_ref[h] = m;
                    l_part[h] *= alpha;
                    scale_row(o, h, alpha);
                } else if (m < m_ref[h]) {  // bring P down to this reference
                    const float f = fast_exp2(m - m_ref[h]);
#pragma unroll
                    for (int n = 0; n < 8; ++n) pa[2 * n + h] = scale_bf16x2(pa[2 * n + h], f);
                }
            }
        }
#endif

        attend_values(o, pa, kst, col_chunk);
        wgmma_wait_all();
        fence_regs(o);
        // Refill the stage once every reader is done with it: this warpgroup's warps meet
        // at a barrier; with SHARED_TILES the second warpgroup to get there starts the copy.
        named_barrier(BAR_WG + wg, 128);
        if (loader && refill < n_tiles) {
            bool last = true;
            if (SHARED_TILES) {
                u32* done = reinterpret_cast<u32*>(smem + SM_DONE + 8 * s);
                __threadfence_block();
                last = atomicAdd(done, 1u) == 1u;
                if (last) *done = 0u;
                __threadfence_block();
            }
            if (last) load_tile(&pool_map, k_base, full_bar, refill, refill_page);
        }
    }

    // ---- row sums over the quad ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l_part[h] += __shfl_xor_sync(0xffffffffu, l_part[h], 1);
        l_part[h] += __shfl_xor_sync(0xffffffffu, l_part[h], 2);
    }

#if MODE == MODE_TOKENS
    // ---- merge WG1's partial result into WG0's, through the (now idle) stage memory ----
    {
        float* buf = reinterpret_cast<float*>(smem + SM_K);  // [ON + 4][128]
        __syncthreads();  // every tile consumed: no copy or read in flight
        if (wg == 1) {
#pragma unroll
            for (int i = 0; i < ON; ++i) buf[i * 128 + tw] = o[i];
            buf[(ON + 0) * 128 + tw] = m_ref[0];
            buf[(ON + 1) * 128 + tw] = m_ref[1];
            buf[(ON + 2) * 128 + tw] = l_part[0];
            buf[(ON + 3) * 128 + tw] = l_part[1];
        }
        __syncthreads();
        if (wg == 1) return;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float m1 = buf[(ON + h) * 128 + tw];
            const float m = fmaxf(m_ref[h], m1);  // m_ref is finite: WG0 had a tile
            const float a0 = fast_exp2(m_ref[h] - m);
            const float a1 = fast_exp2(m1 - m);  // 0 when WG1 had no tile
            l_part[h] = l_part[h] * a0 + buf[(ON + 2 + h) * 128 + tw] * a1;
            m_ref[h] = m;
#pragma unroll
            for (int n = 0; n < ON / 4; ++n) {
                o[4 * n + 2 * h] = o[4 * n + 2 * h] * a0 + buf[(4 * n + 2 * h) * 128 + tw] * a1;
                o[4 * n + 2 * h + 1] = o[4 * n + 2 * h + 1] * a0 + buf[(4 * n + 2 * h + 1) * 128 + tw] * a1;
            }
        }
    }
#elif MODE == MODE_COLUMNS
    // ---- each warpgroup summed the tiles it computed: exchange the row sums ----
    {
        float* buf = reinterpret_cast<float*>(smem + SM_K);  // [2 warpgroups][4][128]
        __syncthreads();  // every tile consumed: no copy or read in flight
        buf[(wg * 4 + 0) * 128 + tw] = m_ref[0];
        buf[(wg * 4 + 1) * 128 + tw] = m_ref[1];
        buf[(wg * 4 + 2) * 128 + tw] = l_part[0];
        buf[(wg * 4 + 3) * 128 + tw] = l_part[1];
        __syncthreads();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // the output rows are relative to m_ref, which is at least the other's
            // reference (every P it sent was adopted): bring its sum to m_ref
            const float m1 = buf[((1 - wg) * 4 + h) * 128 + tw];
            const float l1 = buf[((1 - wg) * 4 + 2 + h) * 128 + tw];
            l_part[h] += l1 == 0.f ? 0.f : l1 * fast_exp2(m1 - m_ref[h]);
        }
    }
#endif

    // ---- write the (partial) output, normalised, and its log-sum-exp ----
    const int head = h0 + (MODE == MODE_HEADS ? wg * 64 : 0) + row0;
    float* dst = (num_splits == 1 ? out + ((u64)b * heads + head) * SLICE
                                  : part_out + (((u64)b * num_splits + split) * heads + head) * SLICE) +
                 col_chunk * 64;
    const float inv0 = 1.f / l_part[0];
    const float inv1 = 1.f / l_part[1];
#pragma unroll
    for (int n = 0; n < ON / 4; ++n) {
        const int c = 8 * n + 2 * t4;
        *reinterpret_cast<float2*>(dst + c) = make_float2(o[4 * n] * inv0, o[4 * n + 1] * inv0);
        *reinterpret_cast<float2*>(dst + 8 * SLICE + c) = make_float2(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1);
    }
    if (t4 == 0 && (MODE != MODE_COLUMNS || wg == 0)) {
        // natural-log units: m_ref is max * log2(e)
        const float v0 = (m_ref[0] + __log2f(l_part[0])) * 0.6931471805599453f;
        const float v1 = (m_ref[1] + __log2f(l_part[1])) * 0.6931471805599453f;
        float* l = num_splits == 1 ? lse + (u64)b * heads + head
                                   : part_lse + ((u64)b * num_splits + split) * heads + head;
        l[0] = v0;
        l[8] = v1;
    }
}

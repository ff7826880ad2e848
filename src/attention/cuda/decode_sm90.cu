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
// - MODE_COLUMNS (64 heads, SLICE = 512; FlashMLA's "seesaw"): WG w holds output
//   columns 256w..256w+255 of the same 64 heads, and the tiles go in pairs: WG0 scores
//   the pair's first tile (stage 0), WG1 the second (stage 1), and each adds both
//   tiles' P V products over its columns. The pair shares one reference maximum per
//   row: WG0 moves it for tile a and publishes it (BAR_M0); WG1 adopts it, moves it for
//   tile b and publishes it (BAR_M1), then stores P_b; WG0 adopts it and stores P_a
//   (brought to the pair's reference) (BAR_P). Each P is stored in the swizzled layout
//   the tensor cores read, so the other warpgroup's P V takes it from shared memory
//   (two slots, one in the place of Q's RoPE chunk, which both warpgroups hold in
//   registers). One warpgroup's softmax thus runs under the other's products. Each stage has one mbarrier per 64-column
//   chunk: the scoring warpgroup waits chunk by chunk, and each warpgroup refills the
//   chunks it alone still reads (WG0 the V columns 0-255, WG1 256-511 and the RoPE
//   chunk) as soon as its own products on them are done, mid-pair. So that the copies
//   start early: each warpgroup scores the chunks it refilled first (WG1: 4-8, then
//   0-3), WG1's P_a V enters the tensor pipe before WG0's P_b V (BAR_ISSUED), and WG0
//   issues its next scores over its own chunks before it waits for P_b V.
// MODE_TOKENS issues a tile's scores behind the previous tile's P V (the warpgroup
// does not idle while its products run); MODE_HEADS keeps its turns.
// Tiles are cache pages (NT = 64 rows): RW/64 tensor copies of 64 columns x a page's
// rows (a 3D map: columns, rows of a page, pages, so pages may be any stride apart;
// 128-byte swizzle, the layout wgmma reads; L2 evict-first: each is read once per head
// tile) completing on the stage's `full` mbarrier (MODE_COLUMNS: one per chunk).
// Pages are tensor coordinates, so a page index outside the pool reads zeros, never
// memory outside it. A stage is refilled (with the tile STAGES further on) by one
// thread of the last warpgroup to finish reading it, right after that: no producer
// warp, which would cost the consumers registers (each sub-partition's register file
// is shared by the block's warps on it: 9 warps leave 168 registers a thread, 8 leave
// 255).
// Per tile, S = Q K^T is RW/16 wgmma m64n64k16 with Q and K both read by the tensor
// cores from shared memory (MODE_COLUMNS and MODE_HEADS: Q's RoPE chunk from registers);
// the online softmax runs in registers against a reference maximum per row that moves
// only when the tile's maximum exceeds it by more than RESCALE_LOG2 (then the output
// rows are rescaled: first tiles only); O += P V is 4 wgmma m64nNk16 with P from
// registers in the accumulator layout of S (MODE_COLUMNS, the other warpgroup's P: from
// shared memory) and V the latent columns of the same K tile read transposed.
// A tile past the sequence's end has its rows zeroed in shared memory before use (0 *
// NaN would poison P V).
//
// KV_FP8 (MODE_TOKENS and MODE_HEADS): the pool holds FP8 rows (DESIGN 7.1: SLICE e4m3
// codes, an f32 scale per 128 of them, the bf16 RoPE key; ROW8 bytes, 4-aligned, so no
// tensor map fits): each raw page arrives by one 1D bulk copy into a ring of STAGES raw
// stages and is converted into a 16-bit stage in the layout above (rows past the end as
// zeros), then the same products run. The latent columns are f16, not bf16: the e4m3
// code becomes f16 exactly (one cvt per pair) and one f16x2 multiply applies the
// block's scale times 2^FP8_F16_EXP, two instructions a pair where bf16 took six
// (through f32; session 6). The RoPE key stays bf16 and its products stay bf16 (into
// the same f32 scores), with the queries' RoPE chunk times 2^FP8_F16_EXP so that every
// score is 2^FP8_F16_EXP S: the softmax takes that factor out of the scores, the
// output's normalisation out of O (P, in f16, is unchanged). So the dequantised latents
// sit in f16 as k * 2^FP8_F16_EXP: exact up to the f16 rounding of the scale and the
// product (2^-11 each), for blocks whose largest magnitude is in [1.7e-3, 4094]
// (DESIGN 7.1); the latent queries are f16 too (|q| < 65504, with the softmax scale in
// it). A page index outside the pool copies nothing and converts to zeros, as the
// tensor map's bounds give.
// - MODE_TOKENS: the warpgroup that owns the tile converts it into its one 16-bit stage
//   and refills the raw stage right after that (no scores ahead). Each warp of both
//   warpgroups converts, which measured faster (session 5: 381 us against 442 at
//   Kimi-K2 g=2) than one converting warpgroup beside them, whose single warp per
//   sub-partition became the chain.
// - MODE_HEADS (FP8_CONVERTER): both warpgroups read every tile, so a third warpgroup
//   (WG2, 40 registers a thread by setmaxnreg, the consumers 232) converts each page
//   once, for 128 heads, into two 16-bit stages (tile t into t % 2) signalled by `full`
//   mbarriers and released by both consumers on `empty` ones; the consumers keep the
//   bf16 HEADS loop and its turns.
//
// Work schedule: the grid is (head tiles, CTAS). The batch's tiles, sequence after
// sequence, are cut into CTAS equal ranges of `per` tiles (at least MIN_TILES), and CTA
// c takes range c, whatever sequences it spans: every multiprocessor gets the same work
// on mixed lengths as on equal ones. Each CTA finds its range from the lengths itself
// (a block-wide sum and scans over the batch, no planning kernel, so a captured graph
// needs nothing recomputed): a sequence inside one range gets its final output from that CTA;
// one cut by range boundaries gets normalised f32 partials with log-sum-exps in slots
// split_base[b] + k, which tpla_combine_pieces merges. CTA 0 writes split_base and the
// piece counts for the merge (2 x batch words of `sched`). A sequence with no tokens (or
// an invalid slot) is in no range: the merge writes NaN for it.

#define MODE_TOKENS 0
#define MODE_HEADS 1
#define MODE_COLUMNS 2
#ifndef MODE
#error "MODE must be defined"
#endif
#ifndef STAGES
#error "STAGES must be defined"
#endif
#ifndef KV_FP8
#define KV_FP8 0
#endif
// FP8 caches multiply the latent columns in f16 (see the top); the dequantised values are
// stored times 2^FP8_F16_EXP, the f16 window centred on the latents models hold
#define LAT_F16 KV_FP8
#define FP8_F16_EXP 4
#define LAT_SCALE (LAT_F16 ? (float)(1 << FP8_F16_EXP) : 1.f)  // every score is LAT_SCALE S
#define SCORE_LOG2E (LOG2E / LAT_SCALE)

#define CHUNKS (RW / 64)                   // 128-byte swizzle atoms across a row
#define ATOM_BYTES (64 * 128)              // 64 rows of one 64-column chunk
#define STAGE_BYTES (CHUNKS * ATOM_BYTES)  // one tile of NT = 64 rows
#define QWG_BYTES (CHUNKS * ATOM_BYTES)    // 64 query rows
#define HQ (MODE == MODE_HEADS ? 128 : 64)  // heads per block
#define THREADS 256                         // the two warpgroups that compute
// KV_FP8 with MODE_HEADS: a third warpgroup converts the raw pages (see the top)
#define FP8_CONVERTER (KV_FP8 && MODE == MODE_HEADS)
#define BLOCK_THREADS (THREADS + (FP8_CONVERTER ? 128 : 0))
#define PV_N (MODE == MODE_COLUMNS ? SLICE / 2 : SLICE)  // output columns per warpgroup
#define ON (PV_N / 2)                      // output accumulators per thread
#define SHARED_TILES (MODE != MODE_TOKENS)  // both warpgroups read every tile
// The block's queries as float4s per thread (RW is a multiple of 16: exact), loaded in
// batches of Q_BATCH (the largest of 12, 10, 8, 4 that divides it).
#define Q_PER_THREAD (HQ * RW / 4 / THREADS)
#define Q_BATCH (Q_PER_THREAD % 12 == 0 ? 12 : Q_PER_THREAD % 10 == 0 ? 10 : Q_PER_THREAD % 8 == 0 ? 8 : 4)

#if MODE == MODE_COLUMNS ? SLICE != 512 : (SLICE != 64 && SLICE != 128 && SLICE != 256)
#error "unsupported slice width for this mode"
#endif
#if MODE == MODE_TOKENS && (STAGES % 2) != 0
#error "with two warpgroups taking alternate tiles, STAGES must be even"
#endif
#if MODE == MODE_COLUMNS && STAGES != 2
#error "the seesaw keeps one pair of tiles: STAGES must be 2"
#endif
#if KV_FP8 && MODE == MODE_COLUMNS
#error "FP8 pages feed the TOKENS and HEADS modes"
#endif
#if NT != PAGE
#error "one tensor copy per page: the tile is the page"
#endif
#if (HQ * RW / 4) % THREADS != 0 || Q_PER_THREAD % Q_BATCH != 0
#error "the queries must split evenly over the threads and the batches"
#endif

// Byte layout of the dynamic shared memory, from a 1024-byte aligned base (the
// swizzle atoms must be): K stages, queries, the exchange (MODE_COLUMNS: P_a's slot, one
// 64 x 64 bf16 swizzle atom, then each warpgroup's published maxima, 64 rows each), the
// stages' mbarriers (MODE_COLUMNS: one per chunk), then per stage a count of the
// warpgroups done with it (MODE_HEADS).
#define XCHG_BYTES (MODE == MODE_COLUMNS ? ATOM_BYTES + 2 * 64 * 4 : 0)
#define STAGE_BARS (MODE == MODE_COLUMNS ? CHUNKS : 1)
// FP8: CONV_STAGES converted stages, then the ring of STAGES raw pages; the mbarriers
// are the raw pages' (completed by the copies), then (HEADS) each 16-bit stage's `full`
// (converted) and `empty` (released by both consumers); the counts' place holds a flag
// per raw page that was outside the pool.
#define SCALE_BYTES (4 * ((SLICE + 127) / 128))
#define ROW8 (SLICE + SCALE_BYTES + 2 * 64)  // bytes of one FP8 row
#define RAW_BYTES (NT * ROW8)                // one raw page: a multiple of 16 (NT = 64)
#define CONV_STAGES (KV_FP8 ? 2 : STAGES)
#define CONSUMER_REGS 232
#define PRODUCER_REGS 40
#define SM_K 0
#define SM_RAW (CONV_STAGES * STAGE_BYTES)
#define SM_Q (((SM_RAW + (KV_FP8 ? STAGES * RAW_BYTES : 0)) + 1023) / 1024 * 1024)
#define SM_X (SM_Q + (HQ / 64) * QWG_BYTES)
#define SM_BAR (SM_X + XCHG_BYTES)
#define SM_DONE (SM_BAR + (STAGES * STAGE_BARS + (FP8_CONVERTER ? 2 * CONV_STAGES : 0)) * 8)
#define SM_PAGE_BAD SM_DONE
// this CTA's schedule: 8 words, then the scans' scratch (two words per warp)
#define SM_SCHED (SM_DONE + STAGES * 8)
#define SM_END (SM_SCHED + 4 * (8 + 2 * BLOCK_THREADS / 32))
#define MIN_TILES 4  // fewest tiles a CTA's range holds (shorter ones cost more merging)
#define SM_ALIGN_SLACK 1024

// Named barriers (0 is __syncthreads): 2 + w warpgroup w, 4 + w warpgroup w's turn at
// the tensor cores (MODE_HEADS); MODE_COLUMNS: 4 + w maxima from warpgroup w, 6 P_a,
// 7 WG1's P_a V issued.
#define BAR_WG 2
#define BAR_TURN 4
#define BAR_M 4
#define BAR_P 6
#define BAR_ISSUED 7
#define BAR_CONVERT 8  // the converting warpgroup (FP8)

// The layout the host sizes the dynamic shared memory from (read back through this symbol).
extern "C" __constant__ int tpla_decode_smem_bytes = SM_END + SM_ALIGN_SLACK;
// The threads a block is launched with (read back like the layout).
extern "C" __constant__ int tpla_decode_threads = BLOCK_THREADS;

// The driver's CUtensorMap: 128 opaque bytes, passed by value as a kernel parameter.
struct __align__(64) TensorMap {
    u64 opaque[16];
};
// The FP8 pool, passed by value: page p at base + p * page_stride, pages in [0, pages).
struct RawPool {
    const unsigned char* base;
    u64 page_stride;
    int pages;
};
#if KV_FP8
typedef RawPool PoolParam;
#else
typedef TensorMap PoolParam;
#endif

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// Copies columns col..col+63 of the rows of cache page `page` (a 3D map: columns, rows
// of the page, pages) into `dst`, completing on `bar`; the lines are marked evict-first
// in L2 (each is read once per head tile).
__device__ __forceinline__ void tma_load_tile(u32 dst, const TensorMap* map, u32 bar, int col, int page) {
    asm volatile(
        "{\n.reg .b64 policy;\n"
        "createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%3, 0, %4}], [%2], policy;\n}"
        ::"r"(dst), "l"((u64)map), "r"(bar), "r"(col), "r"(page) : "memory");
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
// Waits for all but the last committed group.
__device__ __forceinline__ void wgmma_wait_but_last() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
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
// The descriptor of the operand `bytes` (a multiple of 16) further on: the start address
// field (bits 0-13, addresses / 16) cannot carry, shared memory ending below 256 KB. One
// add per product instead of rebuilding the descriptor (measured: ~6 instructions each,
// 72 per tile in the scores alone).
__device__ __forceinline__ u64 desc_at(u64 desc, u32 bytes) {
    u64 d;
    asm("mov.b64 %0, {%1, %2};" : "=l"(d) : "r"((u32)desc + (bytes >> 4)), "r"((u32)(desc >> 32)));
    return d;
}

// Starts the copy of the CTA's tile number `j` (counted over its whole range: it names
// the stage) from cache page `page`.
__device__ __forceinline__ void load_tile(const TensorMap* map, u32 k_base, u32 full_bar, int j, int page) {
    const int s = j % STAGES;
    mbar_expect_tx(full_bar + 8 * s, STAGE_BYTES);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
        tma_load_tile(k_base + s * STAGE_BYTES + c * ATOM_BYTES, map, full_bar + 8 * s, c * 64, page);
}

#if KV_FP8
// Starts the copy of the CTA's tile number `j` (it names the raw stage) from FP8 page
// `page`: one bulk copy of the page's rows, evict-first in L2. A page outside the pool
// copies nothing: its stage is flagged (converted to zeros) and the barrier completes
// on a plain arrival.
__device__ __forceinline__ void load_raw_page(const RawPool& pool, unsigned char* smem, u32 base, u32 full_bar,
                                              int j, int page) {
    const int s = j % STAGES;
    const u32 bar = full_bar + 8 * s;
    const bool inside = page >= 0 && page < pool.pages;
    reinterpret_cast<volatile u32*>(smem + SM_PAGE_BAD)[s] = inside ? 0u : 1u;
    if (inside) {
        mbar_expect_tx(bar, RAW_BYTES);
        asm volatile(
            "{\n.reg .b64 policy;\n"
            "createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], policy;\n}"
            ::"r"(base + SM_RAW + s * RAW_BYTES), "l"(pool.base + (u64)page * pool.page_stride), "r"(RAW_BYTES),
              "r"(bar) : "memory");
    } else {
        mbar_arrive(bar);
    }
}

// Two e4m3 codes (low byte first) as an f16 pair (exact) times `scale2` (the block's
// scale times LAT_SCALE, in both halves).
__device__ __forceinline__ u32 dequant_pair(u32 codes, u32 scale2) {
    u32 h2, r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)codes));
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h2), "r"(scale2));
    return r;
}

// Converts the raw FP8 page at `raw` into the 16-bit stage at `stage` (the swizzled
// layout the tensor map would have written), rows kept..NT-1 as zeros, split over the
// warpgroup's 128 threads (`me`). FP8 rows are only 4-aligned: 32-bit loads. The loads
// of DEQ_BATCH rows go out before any of their conversions: one warp of the warpgroup
// per sub-partition has no other warp of its own to hide a load's latency behind, and
// a row at a time waited for each (session 4: the conversion was most of a tile's time).
#define DEQ_BATCH 4
// A converting thread takes one 16-byte bf16 unit (8 latent values) of every
// DEQ_ROWS_STEP-th row: DEQ_UNITS units a row, 128 threads.
constexpr int DEQ_UNITS = SLICE / 8;  // 8 to 32
constexpr int DEQ_ROWS_STEP = 128 / DEQ_UNITS;
// The latent units of dequant_page, DEQ_BATCH rows at a time (`FULL`: no row is past
// `kept`). Codes load as one 64-bit word where rows are 8-aligned (slice 256).
template <bool FULL>
__device__ __forceinline__ void dequant_rows(const unsigned char* src, const unsigned char* scale_src,
                                             unsigned char* dst, int r0, int at_even, int at_odd, int kept) {
    constexpr int ROWS_STEP = DEQ_ROWS_STEP;
#pragma unroll 1
    for (int r = r0; r < NT; r += DEQ_BATCH * ROWS_STEP) {
        u32 c0[DEQ_BATCH], c1[DEQ_BATCH], scale2[DEQ_BATCH];
#pragma unroll
        for (int k = 0; k < DEQ_BATCH; ++k) {
            if (ROW8 % 8 == 0) {
                const uint2 c = *reinterpret_cast<const uint2*>(src + k * ROWS_STEP * ROW8);
                c0[k] = c.x;
                c1[k] = c.y;
            } else {
                c0[k] = *reinterpret_cast<const u32*>(src + k * ROWS_STEP * ROW8);
                c1[k] = *reinterpret_cast<const u32*>(src + k * ROWS_STEP * ROW8 + 4);
            }
            const float scale = *reinterpret_cast<const float*>(scale_src + k * ROWS_STEP * ROW8) * LAT_SCALE;
            scale2[k] = pack_f16x2(scale, scale);
        }
#pragma unroll
        for (int k = 0; k < DEQ_BATCH; ++k) {
            uint4 v = make_uint4(dequant_pair(c0[k], scale2[k]), dequant_pair(c0[k] >> 16, scale2[k]),
                                 dequant_pair(c1[k], scale2[k]), dequant_pair(c1[k] >> 16, scale2[k]));
            if (!FULL && r + k * ROWS_STEP >= kept) v = make_uint4(0u, 0u, 0u, 0u);  // past the end (or no page)
            *reinterpret_cast<uint4*>(dst + k * ROWS_STEP * 128 + (k % 2 ? at_odd : at_even)) = v;
        }
        src += DEQ_BATCH * ROWS_STEP * ROW8;
        scale_src += DEQ_BATCH * ROWS_STEP * ROW8;
        dst += DEQ_BATCH * ROWS_STEP * 128;
    }
}

__device__ __forceinline__ void dequant_page(const unsigned char* raw, unsigned char* stage, int kept, int me) {
    // thread `me`'s column, scale and chunk stay fixed, only the row moves
    constexpr int UNITS = DEQ_UNITS;
    constexpr int ROWS_STEP = DEQ_ROWS_STEP;
    constexpr int ROWS = NT / ROWS_STEP;  // rows per thread (4 to 16)
    static_assert(ROWS % DEQ_BATCH == 0 && DEQ_BATCH % 2 == 0, "the rows split into whole batches");
    const int cu = me % UNITS;
    const int r0 = me / UNITS;
    const unsigned char* src = raw + r0 * ROW8 + cu * 8;
    const unsigned char* scale_src = raw + r0 * ROW8 + SLICE + 4 * (cu / 16);
    unsigned char* dst = stage + (cu / 8) * ATOM_BYTES + r0 * 128;
    // the 16-byte unit's place in the swizzled row: rows r0 + m ROWS_STEP alternate
    // between two (ROWS_STEP = 4) or keep one
    const int at_even = ((cu % 8) ^ (r0 % 8)) * 16;
    const int at_odd = ((cu % 8) ^ ((r0 + ROWS_STEP) % 8)) * 16;
    // A whole page (the rule) converts without a select per row: the branch is uniform.
    if (kept >= NT)
        dequant_rows<true>(src, scale_src, dst, r0, at_even, at_odd, kept);
    else
        dequant_rows<false>(src, scale_src, dst, r0, at_even, at_odd, kept);
    // the RoPE chunk, bf16 already: thread `me` takes unit me % 8 of rows me / 8 + 16 k,
    // two rows' loads at a time (the HEADS converter has 40 registers)
    const int unit = me % 8;
#pragma unroll
    for (int k0 = 0; k0 < NT / 16; k0 += 2) {
        uint4 w[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const u32* from =
                reinterpret_cast<const u32*>(raw + (me / 8 + 16 * (k0 + k)) * ROW8 + SLICE + SCALE_BYTES + unit * 16);
            w[k] = make_uint4(from[0], from[1], from[2], from[3]);
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const int r = me / 8 + 16 * (k0 + k);
            if (r >= kept) w[k] = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(stage + (CHUNKS - 1) * ATOM_BYTES + r * 128 + ((unit ^ (r % 8)) * 16)) = w[k];
        }
    }
}
#endif

// Clears rows valid..NT-1 of chunks [c_begin, c_end) of stage `s` (a sequence's last
// page, whatever the engine left past its end: 0 * NaN would poison P V), split over
// `readers` threads (`me` among them), ordered before the tensor cores' reads.
__device__ __forceinline__ void zero_tail(unsigned char* smem, int s, int valid, int c_begin, int c_end,
                                          int me, int readers) {
    const int per_chunk = (NT - valid) * 8;  // 16-byte units
    for (int u = me; u < (c_end - c_begin) * per_chunk; u += readers) {
        const int c = c_begin + u / per_chunk;
        const int rest = u % per_chunk;
        const int r = valid + rest / 8;
        *reinterpret_cast<uint4*>(smem + SM_K + s * STAGE_BYTES + c * ATOM_BYTES + r * 128 + (rest % 8) * 16) =
            make_uint4(0u, 0u, 0u, 0u);
    }
    fence_async_shared();
}

// MODE_COLUMNS and MODE_HEADS read the queries' RoPE chunk from registers in the scores
// (its shared-memory reads were ~10% of the scores' operand bytes, which at 128 heads
// approach the shared-memory bandwidth). Not MODE_HEADS at slice 256, where its 16
// registers spill.
#define ROPE_IN_REGISTERS (MODE == MODE_COLUMNS || (MODE == MODE_HEADS && SLICE <= 128))

// Loads this thread's part of the queries' RoPE chunk (the swizzle atom at `chunk`, rows
// row0 and row0 + 8) in the A-operand layout of wgmma: word 4 kk + 2 half + h holds
// columns 16 kk + 8 half + 2 t4, +1 of row row0 + 8 h.
__device__ __forceinline__ void load_rope_queries(const unsigned char* chunk, int row0, int t4, u32 (&rope_q)[16]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int at = (((2 * kk + half) ^ (row0 % 8)) << 4) + 4 * t4;
            rope_q[4 * kk + 2 * half] = *reinterpret_cast<const u32*>(chunk + row0 * 128 + at);
            rope_q[4 * kk + 2 * half + 1] = *reinterpret_cast<const u32*>(chunk + (row0 + 8) * 128 + at);
        }
}

#if MODE == MODE_COLUMNS
// The chunks of a stage that warpgroup w alone reads last, and so refills: WG0 the V
// columns 0-255 (chunks 0-3), WG1 the columns 256-511 and the RoPE chunk.
#define PART_BEGIN(w) ((w) * 4)
#define PART_END(w) ((w) == 0 ? 4 : CHUNKS)

// Starts the copy of warpgroup w's chunks of stage `s` from cache page `page`, each
// completing on its own mbarrier (`bars` + 8 (s CHUNKS + c)).
__device__ __forceinline__ void load_part(const TensorMap* map, u32 k_base, u32 bars, int s, int w, int page) {
#pragma unroll
    for (int c = PART_BEGIN(w); c < PART_END(w); ++c) {
        const u32 bar = bars + 8 * (s * CHUNKS + c);
        mbar_expect_tx(bar, ATOM_BYTES);
        tma_load_tile(k_base + s * STAGE_BYTES + c * ATOM_BYTES, map, bar, c * 64, page);
    }
}
#endif

// S = Q K^T for 64 query rows x the 64 tokens of the tile at `kst`, over the row's
// chunks from chunk FIRST on (modulo the row). MODE_COLUMNS: `chunk_bars` are the
// stage's chunk mbarriers, each waited for (phase `parity`) before the products over
// its chunk are issued, so they start on the chunks that came first; the other modes
// have waited for the whole tile. With ROPE_IN_REGISTERS the queries' RoPE chunk (the
// last) comes from `rope_q` (see load_rope_queries).
template <int FIRST, int COUNT = CHUNKS, bool ACCUMULATE = false>
__device__ __forceinline__ void scores(float (&sc)[32], u32 q_rows, u32 kst, const u32* rope_q = nullptr,
                                       u32 chunk_bars = 0, u32 parity = 0) {
    fence_regs(sc);
    const u64 q_desc = smem_desc(q_rows, 16, 1024);
    const u64 k_desc = smem_desc(kst, 16, 1024);
    if (MODE == MODE_COLUMNS) mbar_wait(chunk_bars + 8 * FIRST, parity);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < COUNT * 4; ++ks) {
        const int c = (FIRST + ks / 4) % CHUNKS;
        if (MODE == MODE_COLUMNS && ks % 4 == 0 && ks > 0) {
            mbar_wait(chunk_bars + 8 * c, parity);
            wgmma_fence();  // the wait loop is a branch: fence here, not ptxas (serialising)
        }
        const u32 off = c * ATOM_BYTES + (ks % 4) * 32;
        const int acc = ACCUMULATE || ks > 0;
        if (ROPE_IN_REGISTERS && c == CHUNKS - 1) {
            const int k = 4 * (ks % 4);
            wgmma_qk_n64_rq(sc, rope_q[k], rope_q[k + 1], rope_q[k + 2], rope_q[k + 3], desc_at(k_desc, off), acc);
        } else {
            if (MODE == MODE_COLUMNS)
                wgmma_qk_n64(sc, desc_at(q_desc, off), desc_at(k_desc, off), acc);
            else if (LAT_F16 && c < CHUNKS - 1)
                wgmma_qk_n64_f16(sc, smem_desc(q_rows + off, 16, 1024), smem_desc(kst + off, 16, 1024), acc);
            else
                wgmma_qk_n64(sc, smem_desc(q_rows + off, 16, 1024), smem_desc(kst + off, 16, 1024), acc);
        }
    }
    wgmma_commit();
}

// O += P V over the tile at `kst`, V = PV_N latent columns from `col_chunk` * 64.
__device__ __forceinline__ void attend_values(float (&o)[ON], const u32 (&pa)[16], u32 kst, int col_chunk) {
    fence_regs(o);
    const u64 v_desc = smem_desc(kst + col_chunk * ATOM_BYTES, ATOM_BYTES, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < NT / 16; ++kk) {
        const u64 dv = MODE == MODE_COLUMNS ? desc_at(v_desc, kk * 16 * 128)
                                            : smem_desc(kst + col_chunk * ATOM_BYTES + kk * 16 * 128, ATOM_BYTES, 1024);
#if PV_N == 256 && LAT_F16
        wgmma_pv_n256_f16(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#elif PV_N == 128 && LAT_F16
        wgmma_pv_n128_f16(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#elif LAT_F16
        wgmma_pv_n64_f16(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#elif PV_N == 256
        wgmma_pv_n256(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#elif PV_N == 128
        wgmma_pv_n128(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#else
        wgmma_pv_n64(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], dv, 1);
#endif
    }
    wgmma_commit();
}

#if MODE == MODE_COLUMNS
// O += P V as attend_values, with P read by the tensor cores from the swizzle atom at
// `p_slot` (the other warpgroup's, see store_p).
__device__ __forceinline__ void attend_values_shared(float (&o)[ON], u32 p_slot, u32 kst, int col_chunk) {
    fence_regs(o);
    const u64 v_desc = smem_desc(kst + col_chunk * ATOM_BYTES, ATOM_BYTES, 1024);
    const u64 p_desc = smem_desc(p_slot, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < NT / 16; ++kk) {
        const u64 dv = desc_at(v_desc, kk * 16 * 128);
        wgmma_pv_n256_sp(o, desc_at(p_desc, kk * 32), dv, 1);
    }
    wgmma_commit();
}

// Writes this thread's P (pa[2n], pa[2n + 1]: rows row0, row0 + 8, tokens 8n + 2 t4, +1)
// into the 64 x 64 bf16 swizzle atom at `slot`, the K-major A operand the other
// warpgroup's tensor cores read (16-byte unit n of row r at (n ^ r % 8): no bank
// conflicts), ordered before that read.
__device__ __forceinline__ void store_p(unsigned char* slot, const u32 (&pa)[16], int row0, int t4) {
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        const int at = ((n ^ (row0 % 8)) << 4) + 4 * t4;
        *reinterpret_cast<u32*>(slot + row0 * 128 + at) = pa[2 * n];
        *reinterpret_cast<u32*>(slot + (row0 + 8) * 128 + at) = pa[2 * n + 1];
    }
    fence_async_shared();
}
#endif

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
// pairs (LAT_F16: f16), the A operand of the P V products. The scores are LAT_SCALE S.
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
        mx[h] *= SCORE_LOG2E;
        if (mx[h] > m_ref[h] + RESCALE_LOG2) {  // mx is finite: the tile holds a valid token
            const float alpha = fast_exp2(m_ref[h] - mx[h]);  // 0 on the first tile
            m_ref[h] = mx[h];
            l_part[h] *= alpha;
            scale_row(o, h, alpha);
        }
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
        const float p0 = fast_exp2(fmaf(sc[4 * n], SCORE_LOG2E, -m_ref[0]));
        const float p1 = fast_exp2(fmaf(sc[4 * n + 1], SCORE_LOG2E, -m_ref[0]));
        const float p2 = fast_exp2(fmaf(sc[4 * n + 2], SCORE_LOG2E, -m_ref[1]));
        const float p3 = fast_exp2(fmaf(sc[4 * n + 3], SCORE_LOG2E, -m_ref[1]));
        l_part[0] += p0 + p1;
        l_part[1] += p2 + p3;
        pa[2 * n] = LAT_F16 ? pack_f16x2(p0, p1) : pack_bf16x2(p0, p1);
        pa[2 * n + 1] = LAT_F16 ? pack_f16x2(p2, p3) : pack_bf16x2(p2, p3);
    }
}

__device__ __forceinline__ u32 scale_bf16x2(u32 v, float f) {
    const float lo = __uint_as_float(v << 16) * f;
    const float hi = __uint_as_float(v & 0xffff0000u) * f;
    return pack_bf16x2(lo, hi);
}

#if MODE == MODE_COLUMNS
// Moves the reference maxima up to `m` (another warpgroup's), rescaling the output rows
// and row sums.
__device__ __forceinline__ void adopt_reference(float (&m_ref)[2], const float (&m)[2], float (&l_part)[2],
                                                float (&o)[ON]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (m[h] > m_ref[h]) {
            const float alpha = fast_exp2(m_ref[h] - m[h]);  // 0 while m_ref is -inf
            m_ref[h] = m[h];
            l_part[h] *= alpha;
            scale_row(o, h, alpha);
        }
    }
}

// One piece's n_tiles tiles (from tile t_begin of the sequence of `len` tokens), in the
// seesaw order of the top of the file: tile j is in stage j % 2 and scored by WG j % 2.
// `phase`: the mbarrier phase of this warpgroup's stage at its next use (carried from
// piece to piece); o, m_ref, l_part start empty and end relative to the same maxima in
// both warpgroups.
// WG is the warpgroup, a template parameter so that the stage addresses are uniform
// (the tensor cores' descriptors are then built in uniform registers, not per thread).
template <int WG>
__device__ __forceinline__ void seesaw_piece(const TensorMap* map, unsigned char* smem, u32 k_base, u32 bars,
                                             u32 q_rows, const int* pages, int t_begin, int n_tiles, int len,
                                             int tw, int row0, int t4, bool loader, u32& phase,
                                             float (&o)[ON], float (&m_ref)[2], float (&l_part)[2]) {
    // P_a's slot (written by WG0) and P_b's, the place of the queries' RoPE chunk, which
    // both warpgroups hold in registers first (the same rows: each word is read there
    // and written here by thread tw of each warpgroup; WG1 writes after BAR_M + 0,
    // which WG0 reaches after its first scores used its copy)
    unsigned char* slot_a = smem + SM_X;
    unsigned char* slot_b = smem + SM_Q + (CHUNKS - 1) * ATOM_BYTES;
    float* maxima = reinterpret_cast<float*>(smem + SM_X + ATOM_BYTES);  // [warpgroup][row]
    u32 rope_q[16];
    load_rope_queries(slot_b, row0, t4, rope_q);
    const u32 mine = k_base + WG * STAGE_BYTES;  // the stage this warpgroup scores
    const u32 other = k_base + (1 - WG) * STAGE_BYTES;
    const u32 my_bars = bars + 8 * WG * CHUNKS;
    const int my_cols = WG * (PV_N / 64);  // this warpgroup's output columns, in chunks
    if (loader) {
        for (int j = 0; j < min(2, n_tiles); ++j) load_part(map, k_base, bars, j, WG, pages[t_begin + j]);
    }
    float sc[32];
    // (the first pair's tiles are both there before anything else: the chunk order
    // does not matter; one call site here keeps ptxas from spilling)
    if (WG < n_tiles) scores<0>(sc, q_rows, mine, rope_q, my_bars, phase);
    for (int j0 = 0; j0 < n_tiles; j0 += 2) {
        const bool has_b = j0 + 1 < n_tiles;
        const bool next_a = j0 + 2 < n_tiles;
        const bool next_b = j0 + 3 < n_tiles;
        const int valid_a = min(NT, len - (t_begin + j0) * NT);
        const int valid_b = min(NT, len - (t_begin + j0 + 1) * NT);  // with has_b
        // the pages the stages take next, read early to hide the latency
        const int page_a = loader && next_a ? pages[t_begin + j0 + 2] : 0;
        const int page_b = loader && next_b ? pages[t_begin + j0 + 3] : 0;
        u32 p_own[16];  // P of this warpgroup's tile as bf16 pairs
        if (WG == 0) {
            wgmma_wait_all();
            fence_regs(sc);
            phase ^= 1;
            softmax_tile(sc, valid_a, t4, m_ref, l_part, o, p_own);
            if (t4 == 0) {
                maxima[row0] = m_ref[0];
                maxima[row0 + 8] = m_ref[1];
            }
            named_arrive(BAR_M + 0, THREADS);
            if (valid_a < NT) {
                zero_tail(smem, 0, valid_a, 0, 4, tw, 128);
                named_barrier(BAR_WG + 0, 128);
            }
            attend_values(o, p_own, mine, my_cols);
            wgmma_wait_all();
            fence_regs(o);
            named_barrier(BAR_WG + 0, 128);  // every warp is done with stage 0's columns 0-255
            if (loader && next_a) load_part(map, k_base, bars, 0, 0, page_a);
            named_barrier(BAR_M + 1, THREADS);  // WG1's maxima
            const float m1[2] = {maxima[64 + row0], maxima[64 + row0 + 8]};
            // leave P_a in its slot, relative to the pair's final maxima
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (m1[h] > m_ref[h]) {
                    const float f = fast_exp2(m_ref[h] - m1[h]);
#pragma unroll
                    for (int n = 0; n < 8; ++n) p_own[2 * n + h] = scale_bf16x2(p_own[2 * n + h], f);
                }
            }
            store_p(slot_a, p_own, row0, t4);
            named_arrive(BAR_P, THREADS);
            adopt_reference(m_ref, m1, l_part, o);
            // WG1's P_a V goes to the tensor cores first: it frees stage 0's columns
            // 256-511 for the refill this warpgroup's next scores wait for (and WG1
            // stored P_b before).
            named_barrier(BAR_ISSUED, THREADS);
            if (has_b) {
                if (valid_b < NT) {
                    zero_tail(smem, 1, valid_b, 0, 4, tw, 128);
                    named_barrier(BAR_WG + 0, 128);
                }
                attend_values_shared(o, smem_addr(slot_b), other, my_cols);
            }
            // The next tile's scores over the chunks WG0 refilled (there by now) queue
            // behind P_b V; stage 1's columns 0-255 are refilled as soon as P_b V is
            // done (WG1 scores its next tile over them last); then the scores over the
            // chunks WG1 refilled.
            if (next_a) {
                scores<0, 4>(sc, q_rows, mine, rope_q, my_bars, phase);
                wgmma_wait_but_last();
            } else {
                wgmma_wait_all();
            }
            fence_regs(o);
            named_barrier(BAR_WG + 0, 128);
            if (loader && next_b) load_part(map, k_base, bars, 1, 0, page_b);
            if (next_a) scores<4, CHUNKS - 4, true>(sc, q_rows, mine, rope_q, my_bars, phase);
        } else {
            wgmma_wait_all();
            fence_regs(sc);
            if (has_b) phase ^= 1;
            named_barrier(BAR_M + 0, THREADS);  // WG0's maxima after tile a
            const float m0[2] = {maxima[row0], maxima[row0 + 8]};
            adopt_reference(m_ref, m0, l_part, o);
            if (has_b) softmax_tile(sc, valid_b, t4, m_ref, l_part, o, p_own);
            if (t4 == 0) {
                maxima[64 + row0] = m_ref[0];
                maxima[64 + row0 + 8] = m_ref[1];
            }
            named_arrive(BAR_M + 1, THREADS);
            if (has_b) {
                store_p(slot_b, p_own, row0, t4);  // WG0 reads it after BAR_ISSUED
                if (valid_b < NT) {
                    zero_tail(smem, 1, valid_b, 4, 8, tw, 128);
                    named_barrier(BAR_WG + 1, 128);
                }
                attend_values(o, p_own, mine, my_cols);
            }
            named_barrier(BAR_P, THREADS);  // P_a
            if (valid_a < NT) {
                zero_tail(smem, 0, valid_a, 4, 8, tw, 128);
                named_barrier(BAR_WG + 1, 128);
            }
            attend_values_shared(o, smem_addr(slot_a), other, my_cols);
            named_arrive(BAR_ISSUED, THREADS);
            // (the waits are unconditional: ptxas serialises the products around waits
            // on paths it cannot tell apart)
            wgmma_wait_but_last();  // P_b V done (with tile b)
            named_barrier(BAR_WG + 1, 128);
            if (loader && next_b) load_part(map, k_base, bars, 1, 1, page_b);
            wgmma_wait_all();
            fence_regs(o);
            named_barrier(BAR_WG + 1, 128);
            if (loader && next_a) load_part(map, k_base, bars, 0, 1, page_a);
            // WG1's own chunks first: WG0 refills columns 0-255 of stage 1 last
            if (next_b) scores<4>(sc, q_rows, mine, rope_q, my_bars, phase);
        }
    }
    // Nothing is in flight here (the last pair issues no scores), but ptxas cannot tell
    // and would otherwise wait, serialising the products, on the paths it suspects.
    wgmma_wait_all();
    fence_regs(sc);
}
#endif

// Exclusive prefix sum of `v` over the block's threads in order; `total` gets the sum.
// `warp_buf` holds one word per warp; every thread must call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_buf, int lane, int warp, int& total) {
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
        const int n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    if (lane == 31) warp_buf[warp] = incl;
    __syncthreads();
    int before = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < BLOCK_THREADS / 32; ++w) {
        const int x = warp_buf[w];
        before += w < warp ? x : 0;
        total += x;
    }
    __syncthreads();  // warp_buf is free again
    return before + incl - v;
}

// Tiles of batch entry `b`: 0 for an invalid slot (engine memory is never trusted).
__device__ __forceinline__ int entry_tiles(const int* slots, const int* seq_lens, int num_slots, int b) {
    const int slot = slots[b];
    return slot >= 0 && slot < num_slots ? (max(seq_lens[slot], 0) + NT - 1) / NT : 0;
}

#if FP8_CONVERTER
// The converting warpgroup's part (thread `me` of it): the same walk over the CTA's pieces
// as the consumers', meeting them at each piece's two block barriers (its start, Q
// stored); after the second it converts the piece's pages in order, tile t (counted
// over the CTA's range) from raw stage t % STAGES into 16-bit stage t % CONV_STAGES once
// both consumers released tile t - CONV_STAGES there, and refills the raw stage with the
// page STAGES on as soon as it is converted.
__device__ __forceinline__ void convert_pieces(const RawPool& pool, unsigned char* smem, u32 base, u32 full_bar,
                                               u32 conv_full, u32 conv_empty, const int* block_table,
                                               const int* seq_lens, const int* slots, int num_slots, int max_pages,
                                               int batch, int b, int seq_start, int range_begin, int range_end,
                                               int me) {
    const bool loader = me == 0;
    int done_tiles = 0;
    for (; b < batch && seq_start < range_end; ++b) {
        const int seq_tiles = entry_tiles(slots, seq_lens, num_slots, b);
        const int t_begin = max(range_begin, seq_start) - seq_start;
        const int n_tiles = min(range_end, seq_start + seq_tiles) - seq_start - t_begin;
        seq_start += seq_tiles;
        if (n_tiles <= 0) continue;
        const int len = seq_lens[slots[b]];
        const int* pages = block_table + (u64)slots[b] * max_pages;
        __syncthreads();  // the piece's start
        if (loader)
            for (int j = 0; j < min(STAGES, n_tiles); ++j)
                load_raw_page(pool, smem, base, full_bar, done_tiles + j, pages[t_begin + j]);
        __syncthreads();  // Q stored
        for (int j = 0; j < n_tiles; ++j) {
            const int t = done_tiles + j;
            const int rs = t % STAGES;
            const int bs = t % CONV_STAGES;
            mbar_wait(full_bar + 8 * rs, (t / STAGES) & 1);
            if (t >= CONV_STAGES) mbar_wait(conv_empty + 8 * bs, (t / CONV_STAGES - 1) & 1);
            const bool bad = reinterpret_cast<volatile u32*>(smem + SM_PAGE_BAD)[rs] != 0u;
            const int valid = min(NT, len - (t_begin + j) * NT);
            dequant_page(smem + SM_RAW + rs * RAW_BYTES, smem + SM_K + bs * STAGE_BYTES, bad ? 0 : valid, me);
            fence_async_shared();
            named_barrier(BAR_CONVERT, 128);  // the stage is written and the raw page read
            if (loader) {
                mbar_arrive(conv_full + 8 * bs);
                if (j + STAGES < n_tiles)
                    load_raw_page(pool, smem, base, full_bar, t + STAGES, pages[t_begin + j + STAGES]);
            }
        }
        done_tiles += n_tiles;  // (HEADS has no merge: nothing more to meet)
    }
}
#endif

extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1)
tpla_decode(const __grid_constant__ PoolParam pool_map,  // the pool: [pages][PAGE][RW] bf16 (KV_FP8: FP8 rows), pages a stride apart
            const float* __restrict__ q,          // [batch][heads][RW]
            const int* __restrict__ block_table,  // [slots][max_pages]
            const int* __restrict__ seq_lens,     // [slots]
            const int* __restrict__ slots,        // [batch]
            int num_slots, int heads, int max_pages, int batch,
            float* __restrict__ out,              // [batch][heads][SLICE]
            float* __restrict__ lse,              // [batch][heads]
            float* __restrict__ part_out,         // [batch + CTAS][heads][SLICE]
            float* __restrict__ part_lse,         // [batch + CTAS][heads]
            int* __restrict__ sched)              // [2][batch]: pieces, split_base
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const u32 raw_base = smem_addr(smem_raw);
    const u32 pad = ((raw_base + 1023u) & ~1023u) - raw_base;
    unsigned char* smem = smem_raw + pad;
    const u32 base = raw_base + pad;
    const u32 k_base = base + SM_K;
    const u32 q_base = base + SM_Q;
    const u32 full_bar = base + SM_BAR;  // full_bar + 8 * stage
    int* my_sched = reinterpret_cast<int*>(smem + SM_SCHED);

    // The merge (tpla_combine_pieces, launched as this grid's programmatic dependent)
    // may be scheduled from now on: its blocks start as this grid's CTAs leave the
    // multiprocessors instead of after the whole grid and a launch gap, and they wait
    // (griddepcontrol.wait) for the grid's completion and memory before reading.
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    const int h0 = blockIdx.x * HQ;
    const int cta = blockIdx.y;
    const int ctas = gridDim.y;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;

    // ---- this CTA's range: all threads read the batch's lengths at once (entry tid +
    // BLOCK_THREADS k), a block-wide sum gives the range, block-wide scans find the first sequence
    // it touches (and, in CTA 0, write the merge's table) ----
    {
        int* warp_buf = my_sched + 8;
        const int t_own = tid < batch ? entry_tiles(slots, seq_lens, num_slots, tid) : 0;
        int t_sum = t_own, t_min = tid < batch ? t_own : 0x7fffffff, t_max = t_own;
        for (int e = tid + BLOCK_THREADS; e < batch; e += BLOCK_THREADS) {
            const int t = entry_tiles(slots, seq_lens, num_slots, e);
            t_sum += t;
            t_min = min(t_min, t);
            t_max = max(t_max, t);
        }
        int total;
        block_exclusive_scan(t_sum, warp_buf, lane, warp, total);
        int per = max(MIN_TILES, (total + ctas - 1) / ctas);
#if MODE == MODE_TOKENS
        // Equal lengths of T tiles: ranges of T / k tiles keep every CTA inside one
        // sequence (measured faster where the tiles are memory-bound: a piece boundary
        // drains the pipeline and reloads Q, which costs more than the idle SMs).
        t_min = __reduce_min_sync(0xffffffffu, t_min);
        t_max = __reduce_max_sync(0xffffffffu, t_max);
        if (lane == 0) {
            warp_buf[warp] = t_min;
            warp_buf[BLOCK_THREADS / 32 + warp] = t_max;
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < BLOCK_THREADS / 32; ++w) {
            t_min = min(t_min, warp_buf[w]);
            t_max = max(t_max, warp_buf[BLOCK_THREADS / 32 + w]);
        }
        __syncthreads();
        if (t_min == t_max && t_max >= per) per = (t_max + t_max / per - 1) / (t_max / per);
#endif
        const int begin = min(total, cta * per);
        const int end = min(total, begin + per);
        const bool writer = blockIdx.x == 0 && cta == 0;
        if (tid == 0) {
            my_sched[0] = per;
            my_sched[1] = begin;
            my_sched[2] = end;
            my_sched[3] = batch;  // no sequence, until one is found below
        }
        int start = 0, split_base = 0;  // running over the chunks of the batch
        for (int c0 = 0; c0 < batch; c0 += BLOCK_THREADS) {
            const int e = c0 + tid;
            const int t = e < batch ? (c0 == 0 ? t_own : entry_tiles(slots, seq_lens, num_slots, e)) : 0;
            int chunk_tiles, chunk_pieces;
            const int my_start = start + block_exclusive_scan(t, warp_buf, lane, warp, chunk_tiles);
            const int pieces = t > 0 ? (my_start + t - 1) / per - my_start / per + 1 : 0;
            const int my_base = split_base + block_exclusive_scan(pieces, warp_buf, lane, warp, chunk_pieces);
            if (writer && e < batch) {
                sched[e] = pieces;
                sched[batch + e] = my_base;
            }
            if (t > 0 && my_start <= begin && begin < my_start + t) {  // one entry at most
                my_sched[3] = e;
                my_sched[4] = my_start;
                my_sched[5] = my_base;
            }
            start += chunk_tiles;
            split_base += chunk_pieces;
            if (!writer && start > begin) break;  // uniform: the range's start is found
        }
    }
    if (tid == 0) {
        for (int i = 0; i < STAGES * STAGE_BARS + (FP8_CONVERTER ? CONV_STAGES : 0); ++i)
            mbar_init(full_bar + 8 * i, 1);
        // FP8 HEADS: a 16-bit stage is free again once both consumers released it
        for (int i = 0; i < (FP8_CONVERTER ? CONV_STAGES : 0); ++i) mbar_init(full_bar + 8 * (STAGES + CONV_STAGES + i), 2);
        for (int s = 0; s < STAGES; ++s) *reinterpret_cast<u32*>(smem + SM_DONE + 8 * s) = 0u;
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int per = my_sched[0];
    const int range_begin = my_sched[1];
    const int range_end = my_sched[2];

    const int wg = warp / 4;
#if FP8_CONVERTER
    const u32 conv_full = full_bar + 8 * STAGES;  // 16-bit stage s converted: conv_full + 8 s
    const u32 conv_empty = conv_full + 8 * CONV_STAGES;  // and released by both consumers
#endif
    const int tw = tid % 128;  // thread in its warpgroup
    const int g = lane / 4;    // accumulator row group
    const int t4 = lane % 4;   // thread in the row's quad
    const int row0 = (warp % 4) * 16 + g;  // this thread's rows in its warpgroup: row0, row0 + 8
    // The thread that starts this warpgroup's copies (SHARED_TILES: either warpgroup's).
    const bool loader = tw == 0;
    if (!KV_FP8 && loader && wg == 0) asm volatile("prefetch.tensormap [%0];" ::"l"((u64)&pool_map) : "memory");

    // ---- the pieces of sequences in this CTA's range, in batch order ----
    int b = my_sched[3];
    int seq_start = my_sched[4];   // the sequence's first tile in the batch's order
    int split_base = my_sched[5];  // its first partial slot
    int done_tiles = 0;            // tiles this CTA consumed before the piece (stage names)
#if MODE == MODE_COLUMNS
    u32 phase = 0;  // the mbarrier phase of this warpgroup's stage
#endif
#if FP8_CONVERTER
    // The converting warpgroup (2) needs few registers, the consumers their accumulators:
    // 2 x CONSUMER_REGS + PRODUCER_REGS = 3 x 168, what the launch gave each three threads.
    // The two roles never join again (ptxas allocates each within its own limit).
    if (wg == 2) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        convert_pieces(pool_map, smem, base, full_bar, conv_full, conv_empty, block_table, seq_lens, slots, num_slots,
                       max_pages, batch, b, seq_start, range_begin, range_end, tw);
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
#endif
    for (; b < batch && seq_start < range_end; ++b) {
    const int seq_tiles = entry_tiles(slots, seq_lens, num_slots, b);
    const int t_begin = max(range_begin, seq_start) - seq_start;
    const int n_tiles = min(range_end, seq_start + seq_tiles) - seq_start - t_begin;
    const int pieces = seq_tiles > 0 ? (seq_start + seq_tiles - 1) / per - seq_start / per + 1 : 0;
    const int piece = cta - seq_start / per;
    seq_start += seq_tiles;
    split_base += pieces;
    if (n_tiles <= 0) continue;
    const int len = seq_lens[slots[b]];  // a valid slot: it has tiles
#if !FP8_CONVERTER
    const int* pages = block_table + (u64)slots[b] * max_pages;
#endif
    // TOKENS: WG w takes the tiles whose stage has its parity
    const int j_first = MODE == MODE_TOKENS ? (wg + done_tiles) & 1 : 0;
    const int j_step = MODE == MODE_TOKENS ? 2 : 1;
    __syncthreads();  // the previous piece is done with every stage, Q and the merge buffer
#if !FP8_CONVERTER
    if (MODE != MODE_COLUMNS && loader && (!SHARED_TILES || wg == 0)) {
        for (int j = j_first; j < min(STAGES, n_tiles); j += j_step)
#if KV_FP8
            load_raw_page(pool_map, smem, base, full_bar, done_tiles + j, pages[t_begin + j]);
#else
            load_tile(&pool_map, k_base, full_bar, done_tiles + j, pages[t_begin + j]);
#endif
    }
#endif

    // Queries f32 -> bf16 (LAT_F16: the latent columns f16, the RoPE chunk bf16 times
    // LAT_SCALE) into the swizzled atoms: element (r, c) of warpgroup block
    // r / 64 at chunk c / 64, row r % 64, 16-byte unit ((c % 64) / 8) ^ (r % 8). Each
    // thread's Q_PER_THREAD float4s (thread tid + THREADS k) are loaded Q_BATCH at a time,
    // all of a batch before any is stored: a loop of one load each waited for its global
    // latency 20-40 times per piece, most of the step's fixed cost (RESULTS v6f).
    {
        const float* qb = q + ((u64)b * heads + h0) * RW;
#pragma unroll 1
        for (int k0 = 0; k0 < Q_PER_THREAD; k0 += Q_BATCH) {
            float4 v[Q_BATCH];
#pragma unroll
            for (int k = 0; k < Q_BATCH; ++k)
                v[k] = *reinterpret_cast<const float4*>(qb + (u64)(tid + THREADS * (k0 + k)) * 4);
#pragma unroll
            for (int k = 0; k < Q_BATCH; ++k) {
                const int i = tid + THREADS * (k0 + k);
                const int r = (i * 4) / RW;
                const int c = (i * 4) % RW;
                const int rr = r % 64;
                const u32 at = (u32)((r / 64) * QWG_BYTES + (c / 64) * ATOM_BYTES + rr * 128 +
                                     ((((c % 64) / 8) ^ (rr % 8)) * 16) + (c % 8) * 2);
                uint2 w = make_uint2(pack_bf16x2(v[k].x, v[k].y), pack_bf16x2(v[k].z, v[k].w));
                if (LAT_F16) {
                    const float f = LAT_SCALE;
                    w = c < SLICE ? make_uint2(pack_f16x2(v[k].x, v[k].y), pack_f16x2(v[k].z, v[k].w))
                                  : make_uint2(pack_bf16x2(v[k].x * f, v[k].y * f), pack_bf16x2(v[k].z * f, v[k].w * f));
                }
                *reinterpret_cast<uint2*>(smem + SM_Q + at) = w;
            }
        }
        fence_async_shared();
        __syncthreads();
    }
    // this warpgroup's output columns, in 64-column chunks
    const int col_chunk = MODE == MODE_COLUMNS ? wg * (PV_N / 64) : 0;
#if MODE == MODE_HEADS
    if (wg == 1) named_arrive(BAR_TURN + 0, THREADS);  // WG0 takes the first turn
#endif

    float o[ON];
#pragma unroll
    for (int i = 0; i < ON; ++i) o[i] = 0.f;
    // Reference maxima (log2 units) and this thread's partial row sums for row0, row0 + 8.
    float m_ref[2] = {NEG_INF, NEG_INF};
    float l_part[2] = {0.f, 0.f};

#if MODE == MODE_COLUMNS
    if (wg == 0)
        seesaw_piece<0>(&pool_map, smem, k_base, full_bar, q_base, pages, t_begin, n_tiles, len, tw, row0, t4, loader,
                        phase, o, m_ref, l_part);
    else
        seesaw_piece<1>(&pool_map, smem, k_base, full_bar, q_base, pages, t_begin, n_tiles, len, tw, row0, t4, loader,
                        phase, o, m_ref, l_part);
#else
    const u32 q_wg = q_base + (MODE == MODE_HEADS ? wg * QWG_BYTES : 0);
#if MODE == MODE_HEADS && ROPE_IN_REGISTERS
    u32 rope_q[16];
    load_rope_queries(smem + SM_Q + wg * QWG_BYTES + (CHUNKS - 1) * ATOM_BYTES, row0, t4, rope_q);
    const u32* rope = rope_q;
#else
    const u32* rope = nullptr;
#endif
    // Tile j's scores: wait for its stage, clear the rows past the sequence's end, issue
    // the products (MODE_HEADS: in this warpgroup's turn); returns its valid rows.
    float sc[32];
#if MODE == MODE_HEADS
    // The turns' barriers, read once through a shuffle: ptxas otherwise recomputes them
    // from the thread index at each use, which spilled a register at slice 256 (FP8).
    const int my_turn = __shfl_sync(0xffffffffu, BAR_TURN + wg, 0);
    const int other_turn = __shfl_sync(0xffffffffu, BAR_TURN + 1 - wg, 0);
#endif
    auto issue_scores = [&](int j) {
        const int valid = min(NT, len - (t_begin + j) * NT);
#if FP8_CONVERTER
        // the converting warpgroup zeroed the rows past the end
        const int t = done_tiles + j;
        mbar_wait(conv_full + 8 * (t % CONV_STAGES), (t / CONV_STAGES) & 1);
        named_barrier(my_turn, THREADS);  // wait for this warpgroup's turn
        scores<0>(sc, q_wg, k_base + (t % CONV_STAGES) * STAGE_BYTES, rope);
        if (wg == 0 || j + 1 < n_tiles) named_arrive(other_turn, THREADS);
#elif KV_FP8
        // TOKENS: the raw page becomes this warpgroup's 16-bit stage (its previous tile's
        // products are done: the loop's barrier), then its raw stage takes the tile
        // STAGES on
        const int s = (done_tiles + j) % STAGES;
        mbar_wait(full_bar + 8 * s, ((done_tiles + j) / STAGES) & 1);
        const bool bad = reinterpret_cast<volatile u32*>(smem + SM_PAGE_BAD)[s] != 0u;
        dequant_page(smem + SM_RAW + s * RAW_BYTES, smem + SM_K + (s % 2) * STAGE_BYTES, bad ? 0 : valid, tw);
        fence_async_shared();
        named_barrier(BAR_WG + wg, 128);
        if (loader && j + STAGES < n_tiles)
            load_raw_page(pool_map, smem, base, full_bar, done_tiles + j + STAGES, pages[t_begin + j + STAGES]);
        scores<0>(sc, q_wg, k_base + (s % 2) * STAGE_BYTES, rope);
#else
        const int s = (done_tiles + j) % STAGES;
        mbar_wait(full_bar + 8 * s, ((done_tiles + j) / STAGES) & 1);
        if (valid < NT) {
            // the readers of this stage split the clearing and meet at a barrier
            if (SHARED_TILES) {
                zero_tail(smem, s, valid, 0, CHUNKS, tid, THREADS);
                __syncthreads();
            } else {
                zero_tail(smem, s, valid, 0, CHUNKS, tw, 128);
                named_barrier(BAR_WG + wg, 128);
            }
        }
#if MODE == MODE_HEADS
        named_barrier(my_turn, THREADS);  // wait for this warpgroup's turn
        scores<0>(sc, q_wg, k_base + s * STAGE_BYTES, rope);
        if (wg == 0 || j + 1 < n_tiles) named_arrive(other_turn, THREADS);
#else
        scores<0>(sc, q_wg, k_base + s * STAGE_BYTES, rope);
#endif
#endif
        return valid;
    };
    // MODE_TOKENS issues the next tile's scores right behind this tile's P V (the
    // warpgroup does not idle while its products run: measured 1-2% faster at 64 heads;
    // not with two stages, one each, where the next tile's stage must be refilled
    // first). MODE_HEADS does not: its turns already keep the tensor cores busy, and the
    // early scores measured 1% slower.
    // FP8 TOKENS converts before its scores, into its one 16-bit stage: no scores ahead.
    constexpr bool ahead = MODE == MODE_TOKENS && STAGES > 2 && !KV_FP8;
    int valid = j_first < n_tiles ? issue_scores(j_first) : NT;
    for (int j = j_first; j < n_tiles; j += j_step) {
        const int s = (done_tiles + j) % CONV_STAGES;
        const u32 kst = k_base + s * STAGE_BYTES;
        const bool more = j + j_step < n_tiles;
#if !KV_FP8
        // the page of the tile this stage takes next, read early to hide the latency
        const int refill = j + STAGES;
        const int refill_page = loader && refill < n_tiles ? pages[t_begin + refill] : 0;
#endif
        wgmma_wait_all();
        fence_regs(sc);
        u32 pa[16];  // P of this tile as bf16 pairs
        softmax_tile(sc, valid, t4, m_ref, l_part, o, pa);
        attend_values(o, pa, kst, col_chunk);
        if (ahead && more) {
            valid = issue_scores(j + j_step);
            wgmma_wait_but_last();  // P V done, the scores run on
        } else {
            wgmma_wait_all();
        }
        fence_regs(o);
        // Refill the stage once every reader is done with it: this warpgroup's warps meet
        // at a barrier; with SHARED_TILES the second warpgroup to get there starts the copy.
        named_barrier(BAR_WG + wg, 128);
#if FP8_CONVERTER
        if (loader) mbar_arrive(conv_empty + 8 * s);  // both warpgroups: it may be refilled
#elif !KV_FP8
        if (loader && refill < n_tiles) {
            bool last = true;
            if (SHARED_TILES) {
                u32* done = reinterpret_cast<u32*>(smem + SM_DONE + 8 * s);
                __threadfence_block();
                last = atomicAdd(done, 1u) == 1u;
                if (last) *done = 0u;
                __threadfence_block();
            }
            if (last) load_tile(&pool_map, k_base, full_bar, done_tiles + refill, refill_page);
        }
#endif
        if (!ahead && more) valid = issue_scores(j + j_step);
    }
    // (nothing in flight; as in seesaw_piece, for ptxas)
    wgmma_wait_all();
    fence_regs(sc);
#endif

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
        // One barrier orders the hand-over on the hardware (200 launches of every mode
        // gave the same bits). compute-sanitizer's racecheck (CUDA 13) still flagged WG1's
        // last stores against WG0's first loads across it in 8 of 9 runs, and in none
        // when WG0 waited 100 us before loading, or behind this second barrier (RESULTS
        // "racecheck, session 4"): it costs one barrier per piece and keeps the tool's
        // report empty, so a real hazard elsewhere would show.
        __syncthreads();
        __syncthreads();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (wg == 1) break;  // WG0 writes the merged result
            const float m1 = buf[(ON + h) * 128 + tw];
            const float m = fmaxf(m_ref[h], m1);  // finite: the piece has a tile
            const float a0 = fast_exp2(m_ref[h] - m);  // 0 when WG0 had no tile
            const float a1 = fast_exp2(m1 - m);        // 0 when WG1 had none
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

    // ---- write the final or partial output, normalised, and its log-sum-exp ----
    if (MODE != MODE_TOKENS || wg == 0) {
        const int head = h0 + (MODE == MODE_HEADS ? wg * 64 : 0) + row0;
        const u64 row = pieces == 1 ? (u64)b * heads + head : (u64)(split_base - pieces + piece) * heads + head;
        float* dst = (pieces == 1 ? out : part_out) + row * SLICE + col_chunk * 64;
        // (O holds LAT_SCALE times the values' products)
        const float inv0 = 1.f / (l_part[0] * LAT_SCALE);
        const float inv1 = 1.f / (l_part[1] * LAT_SCALE);
#pragma unroll
        for (int n = 0; n < ON / 4; ++n) {
            const int c = 8 * n + 2 * t4;
            *reinterpret_cast<float2*>(dst + c) = make_float2(o[4 * n] * inv0, o[4 * n + 1] * inv0);
            *reinterpret_cast<float2*>(dst + 8 * SLICE + c) = make_float2(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1);
        }
        if (t4 == 0 && (MODE != MODE_COLUMNS || wg == 0)) {
            // natural-log units: m_ref is max * log2(e)
            float* l = (pieces == 1 ? lse : part_lse) + row;
            l[0] = (m_ref[0] + __log2f(l_part[0])) * 0.6931471805599453f;
            l[8] = (m_ref[1] + __log2f(l_part[1])) * 0.6931471805599453f;
        }
    }
    done_tiles += n_tiles;
    }
}

// Merges the pieces of the sequences tpla_decode cut (sched: [pieces][split_base] per
// batch entry, written by its CTA 0): lse = log sum_k exp(lse_k), out = sum_k exp(lse_k -
// lse) out_k. One block per (head, batch entry); a sequence in one piece has its output
// already, one in none (no tokens, or an invalid slot) gets NaN, never stale values.
extern "C" __global__ void __launch_bounds__(128)
tpla_combine_pieces(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                    const int* __restrict__ sched, int heads, int batch,
                    float* __restrict__ out, float* __restrict__ lse)
{
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    // launched as tpla_decode's programmatic dependent: wait for its grid (a no-op when
    // launched plainly)
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const int pieces = sched[b];
    const int first = sched[batch + b];
    float* dst = out + ((u64)b * heads + h) * SLICE;
    if (pieces == 1) return;
    if (pieces == 0) {
        for (int c = threadIdx.x; c < SLICE; c += blockDim.x) dst[c] = QNAN;
        if (threadIdx.x == 0) lse[(u64)b * heads + h] = QNAN;
        return;
    }
    float mx = NEG_INF;
    for (int k = 0; k < pieces; ++k) mx = fmaxf(mx, part_lse[(u64)(first + k) * heads + h]);
    float sum = 0.f;
    for (int k = 0; k < pieces; ++k) sum += __expf(part_lse[(u64)(first + k) * heads + h] - mx);
    const float inv = 1.f / sum;
    for (int c = threadIdx.x * 4; c < SLICE; c += blockDim.x * 4) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int k = 0; k < pieces; ++k) {
            const float w = __expf(part_lse[(u64)(first + k) * heads + h] - mx);
            const float4 v = *reinterpret_cast<const float4*>(part_out + ((u64)(first + k) * heads + h) * SLICE + c);
            acc.x += w * v.x;
            acc.y += w * v.y;
            acc.z += w * v.z;
            acc.w += w * v.w;
        }
        *reinterpret_cast<float4*>(dst + c) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    }
    if (threadIdx.x == 0) lse[(u64)b * heads + h] = mx + __logf(sum);
}

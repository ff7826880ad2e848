// Kernels of the engine path (src/engine_device.rs, DESIGN: "Calling libtpla from an
// engine"): the plan header, the per-step check of the engine's block table and lengths,
// the fix-up of empty and faulted batch entries after the decode, and the append of new
// tokens into the engine's paged cache. Compiled after common.cuh (SLICE, PAGE, RW, DR),
// in a module of their own (not arch-specific).
//
// The workspace of a plan (caller-owned device memory, 16-byte aligned) is int32 words:
//   [0, 8)                 header: MAGIC, KIND_CUDA, batch, heads, words, splits,
//                          kernel tag, block table width (max_pages)
//   [8, 8 + batch)         slots the decode kernels read: b, or -1 (nothing to read)
//   [.., + batch)          entry status: ENTRY_OK, ENTRY_EMPTY, ENTRY_BAD_PAGE, ENTRY_BAD_PLAN
//   then the decode kernels' own words (schedule, partial outputs); see decode.rs.

#define TPLA_MAGIC 0x54504C53
#define TPLA_KIND_CUDA 3
#define HEADER_WORDS 8

#define ENTRY_OK 0
#define ENTRY_EMPTY 1
#define ENTRY_BAD_PAGE 2
#define ENTRY_BAD_PLAN 3

// tpla_fault bits (src/engine.rs Faults)
#define FAULT_BAD_PAGE 1u
#define FAULT_BAD_SLOT 2u
#define FAULT_BAD_VALUE 4u
#define FAULT_BAD_PLAN 8u

// Writes the plan header (one thread); the slots and statuses are written by every
// decode's check, so a plan holds nothing that depends on the lengths.
extern "C" __global__ void tpla_engine_plan(int* __restrict__ ws, int batch, int heads, int words,
                                            int splits, int tag, int max_pages)
{
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    ws[0] = TPLA_MAGIC;
    ws[1] = TPLA_KIND_CUDA;
    ws[2] = batch;
    ws[3] = heads;
    ws[4] = words;
    ws[5] = splits;
    ws[6] = tag;
    ws[7] = max_pages;
}

// Before each decode: one block per batch entry checks the plan header against the
// launch (a plan made for another batch, shape or table width fails every entry), the
// entry's length (0: empty; negative, or more pages than the table's width: bad) and
// each page index it will read (outside 0..pages: bad). An entry that is not OK gets slot
// -1, so the decode kernels read nothing for it; bad ones set their fault bit.
extern "C" __global__ void __launch_bounds__(128)
tpla_engine_check(int* __restrict__ ws, const int* __restrict__ block_table,
                  const int* __restrict__ seq_lens, int batch, int heads, int words, int splits,
                  int tag, int max_pages, long long pages, unsigned int* __restrict__ faults)
{
    const int b = blockIdx.x;
    if (b >= batch) return;
    int* slots = ws + HEADER_WORDS;
    int* status = slots + batch;
    const bool plan_ok = ws[0] == TPLA_MAGIC && ws[1] == TPLA_KIND_CUDA && ws[2] == batch &&
                         ws[3] == heads && ws[4] == words && ws[5] == splits && ws[6] == tag &&
                         ws[7] == max_pages;
    if (!plan_ok) {
        if (threadIdx.x == 0) {
            slots[b] = -1;
            status[b] = ENTRY_BAD_PLAN;
            if (faults) atomicOr(faults, FAULT_BAD_PLAN);
        }
        return;
    }
    const int len = seq_lens[b];
    const long long need = len > 0 ? ((long long)len + PAGE - 1) / PAGE : 0;
    bool bad = len < 0 || need > max_pages;
    if (!bad) {
        const int* row = block_table + (u64)b * max_pages;
        for (long long k = threadIdx.x; k < need; k += blockDim.x) {
            const int p = row[k];
            if (p < 0 || (long long)p >= pages) bad = true;
        }
    }
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        if (bad) {
            slots[b] = -1;
            status[b] = ENTRY_BAD_PAGE;
            if (faults) atomicOr(faults, FAULT_BAD_PAGE);
        } else if (len == 0) {
            slots[b] = -1;
            status[b] = ENTRY_EMPTY;
        } else {
            slots[b] = b;
            status[b] = ENTRY_OK;
        }
    }
}

// After each decode (and its merge): an empty entry gets zero outputs and log-sum-exps
// of -infinity, a bad one NaN, whatever the decode kernels left there. One block per
// batch entry; OK entries return at once.
extern "C" __global__ void __launch_bounds__(128)
tpla_engine_finish(const int* __restrict__ ws, int batch, int heads, float* __restrict__ out,
                   float* __restrict__ lse)
{
    const int b = blockIdx.x;
    if (b >= batch) return;
    const int st = ws[HEADER_WORDS + batch + b];
    if (st == ENTRY_OK) return;
    const float v = st == ENTRY_EMPTY ? 0.f : QNAN;
    const float l = st == ENTRY_EMPTY ? NEG_INF : QNAN;
    float* o = out + (u64)b * heads * SLICE;
    for (int i = threadIdx.x; i < heads * SLICE; i += blockDim.x) o[i] = v;
    for (int h = threadIdx.x; h < heads; h += blockDim.x) lse[(u64)b * heads + h] = l;
}

// ---- append ------------------------------------------------------------------------------

#define TRANSFORM_IDENTITY 0
#define TRANSFORM_HADAMARD 1
#define TRANSFORM_DENSE 2
#define APPEND_THREADS 256
#define RMS_EPS 1e-6
#define BF16_MAX 3.3895313892515355e38

__device__ __forceinline__ double load_in(const void* p, u64 i, int bf16_in) {
    if (bf16_in) {
        const u32 bits = (u32)reinterpret_cast<const bf16_t*>(p)[i] << 16;
        return (double)__uint_as_float(bits);
    }
    return (double)reinterpret_cast<const float*>(p)[i];
}

// Block-wide f64 sum (APPEND_THREADS threads); every thread gets the total.
__device__ __forceinline__ double block_sum(double v, double* red) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < APPEND_THREADS / 32; ++w) t += red[w];
    return t;
}

// Writes token i (one block per token) of the batch into the engine's pool at slot
// slots[i] (page slot / PAGE, row slot % PAGE): the full pre-norm latent a (dc values,
// f32 or bf16) is normalised (exact: by its RMS; sliced: by the RMS estimated from the
// rank's slice and its energy fraction), rotated (identity; Hadamard: signs, FWHT and
// 1/sqrt(dc); dense: the [dc][SLICE] columns of U of the slice), cut to the rank's slice
// starting at slice_start, followed by the RoPE key (DR values), and stored as the pool's
// rows are encoded on the host: bf16 (fp8 == 0), or FP8 (fp8 == 1: the slice's e4m3 codes
// and block scales, the key in bf16; DESIGN 7.1). All in f64 with the host's order of
// operations (no fused multiply-adds), so rows equal the CPU's up to the order of the RMS
// sums. A negative slot is skipped; a slot past the pool sets FAULT_BAD_SLOT, a
// non-finite input or a value beyond bf16 FAULT_BAD_VALUE, and writes nothing (FP8 pools
// too, as the host refuses such rows: it keeps every block scale a finite f32).
// Dynamic shared memory: dc + SLICE doubles.
extern "C" __global__ void __launch_bounds__(APPEND_THREADS)
tpla_engine_append(const void* __restrict__ latents, const void* __restrict__ k_rope, int bf16_in,
                   const int* __restrict__ slot_map, int count, int dc, int slice_start,
                   int transform, const double* __restrict__ tdata, int sliced, double fraction,
                   unsigned char* __restrict__ pool, unsigned long long page_stride,
                   long long pages, int fp8, unsigned int* __restrict__ faults)
{
    extern __shared__ double y[];  // [dc] the latent, then [SLICE] the rank's slice
    double* s = y + dc;
    __shared__ double red[APPEND_THREADS / 32];
    const int i = blockIdx.x;
    if (i >= count) return;
    const int slot = slot_map[i];
    if (slot < 0) return;
    if ((long long)slot >= pages * PAGE) {
        if (threadIdx.x == 0 && faults) atomicOr(faults, FAULT_BAD_SLOT);
        return;
    }
    const int tid = threadIdx.x;
    bool bad = false;
    // a, exactly as the host widens it, and the sum of its squares
    double sq = 0.0;
    for (int c = tid; c < dc; c += APPEND_THREADS) {
        const double v = load_in(latents, (u64)i * dc + c, bf16_in);
        if (!isfinite(v)) bad = true;
        y[c] = v;
        sq = __dadd_rn(sq, __dmul_rn(v, v));
    }
    for (int c = tid; c < DR; c += APPEND_THREADS)
        if (!isfinite(load_in(k_rope, (u64)i * DR + c, bf16_in))) bad = true;
    if (__syncthreads_or(bad)) {
        if (tid == 0 && faults) atomicOr(faults, FAULT_BAD_VALUE);
        return;
    }
    const double total = block_sum(sq, red);
    if (!sliced) {
        const double rms = sqrt(total / (double)dc + RMS_EPS);
        for (int c = tid; c < dc; c += APPEND_THREADS) y[c] = y[c] / rms;
    }
    __syncthreads();
    // the rotation, keeping the slice's columns
    if (transform == TRANSFORM_HADAMARD) {
        for (int c = tid; c < dc; c += APPEND_THREADS) y[c] = __dmul_rn(y[c], tdata[c]);
        __syncthreads();
        for (int half = 1; half < dc; half *= 2) {
            for (int k = tid; k < dc / 2; k += APPEND_THREADS) {
                const int lo = (k / half) * 2 * half + k % half;
                const double a = y[lo], b = y[lo + half];
                y[lo] = __dadd_rn(a, b);
                y[lo + half] = __dsub_rn(a, b);
            }
            __syncthreads();
        }
        const double norm = 1.0 / sqrt((double)dc);
        for (int j = tid; j < SLICE; j += APPEND_THREADS) s[j] = __dmul_rn(y[slice_start + j], norm);
    } else if (transform == TRANSFORM_DENSE) {
        for (int j = tid; j < SLICE; j += APPEND_THREADS) {
            double acc = 0.0;
            for (int r = 0; r < dc; ++r)
                acc = __dadd_rn(acc, __dmul_rn(y[r], tdata[(u64)r * SLICE + j]));
            s[j] = acc;
        }
    } else {
        for (int j = tid; j < SLICE; j += APPEND_THREADS) s[j] = y[slice_start + j];
    }
    if (sliced) {
        double e = 0.0;
        for (int j = tid; j < SLICE; j += APPEND_THREADS) e = __dadd_rn(e, __dmul_rn(s[j], s[j]));
        const double energy = block_sum(e, red);
        const double rms = sqrt(energy / ((double)dc * fraction) + RMS_EPS);
        for (int j = tid; j < SLICE; j += APPEND_THREADS) s[j] = s[j] / rms;
    }
    // every value of the row is representable before any is stored
    for (int j = tid; j < SLICE; j += APPEND_THREADS)
        if (!(fabs(s[j]) <= BF16_MAX)) bad = true;
    for (int c = tid; c < DR; c += APPEND_THREADS)
        if (!(fabs(load_in(k_rope, (u64)i * DR + c, bf16_in)) <= BF16_MAX)) bad = true;
    if (__syncthreads_or(bad)) {
        if (tid == 0 && faults) atomicOr(faults, FAULT_BAD_VALUE);
        return;
    }
    const u64 row_bytes = fp8 ? FP8_ROW_BYTES : RW * 2;
    unsigned char* row = pool + (u64)(slot / PAGE) * page_stride + (u64)(slot % PAGE) * row_bytes;
    const auto key = [&](int c) { return load_in(k_rope, (u64)i * DR + c, bf16_in); };
    if (fp8) {
        // s is complete: the barrier of the check above follows its last write
        store_fp8_row([&](int j) { return s[j]; }, key, row);
        return;
    }
    bf16_t* dst = reinterpret_cast<bf16_t*>(row);
    for (int c = tid; c < RW; c += APPEND_THREADS) dst[c] = f64_to_bf16_host(c < SLICE ? s[c] : key(c - SLICE));
}

// ---- row copies (the hand-off of a prefill's rows into decode pages) ----------------------

// One row of `bytes` bytes (a multiple of sizeof(Word), both rows aligned to it), copied
// by the 32 lanes of a warp.
template <class Word>
__device__ __forceinline__ void copy_row(const unsigned char* from, unsigned char* to, int bytes, int lane) {
    for (int w = lane; w < bytes / (int)sizeof(Word); w += 32)
        reinterpret_cast<Word*>(to)[w] = reinterpret_cast<const Word*>(from)[w];
}

// Copies row src_slots[i] of the source pool to row dst_slots[i] of the destination pool
// (both pages of PAGE rows at their page strides, multiples of 16 bytes), one warp per
// row: bf16 rows (fp8 == 0, RW * 2 bytes, a multiple of 16) in 16-byte words, FP8 rows
// (fp8 == 1, FP8_ROW_BYTES, only a multiple of 4) in 4-byte words. A negative destination
// slot is skipped; a source or destination slot past its pool (or a negative source slot)
// sets FAULT_BAD_SLOT and copies nothing.
extern "C" __global__ void __launch_bounds__(128)
tpla_engine_copy_rows(const unsigned char* __restrict__ src, unsigned long long src_stride,
                      long long src_pages, const int* __restrict__ src_slots,
                      unsigned char* __restrict__ dst, unsigned long long dst_stride,
                      long long dst_pages, const int* __restrict__ dst_slots, int count, int fp8,
                      unsigned int* __restrict__ faults)
{
    const int lane = threadIdx.x % 32;
    const int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (i >= count) return;
    const int d = dst_slots[i];
    if (d < 0) return;
    const int s = src_slots[i];
    if (s < 0 || (long long)s >= src_pages * PAGE || (long long)d >= dst_pages * PAGE) {
        if (lane == 0 && faults) atomicOr(faults, FAULT_BAD_SLOT);
        return;
    }
    const int row_bytes = fp8 ? FP8_ROW_BYTES : RW * 2;
    const unsigned char* from = src + (u64)(s / PAGE) * src_stride + (u64)(s % PAGE) * row_bytes;
    unsigned char* to = dst + (u64)(d / PAGE) * dst_stride + (u64)(d % PAGE) * row_bytes;
    if (fp8)
        copy_row<u32>(from, to, row_bytes, lane);
    else
        copy_row<uint4>(from, to, row_bytes, lane);
}

// ---- query rows from absorbed queries ------------------------------------------------------

// Writes the RoPE part of the kernel's query rows: rows[i][SLICE + c] = scale * q_rope[i][c]
// for the count = batch * heads rows (the latent part is written by the absorption GEMM).
extern "C" __global__ void __launch_bounds__(256)
tpla_engine_rope_rows(const float* __restrict__ q_rope, float scale, int count,
                      float* __restrict__ rows)
{
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)count * DR) return;
    const u64 r = i / DR, c = i % DR;
    rows[r * RW + SLICE + c] = scale * q_rope[i];
}

// ---- bf16 head outputs ---------------------------------------------------------------------

// dst[i] = src[i] rounded to bf16 as the host rounds an f32: the bf16 projection's f32
// products, which it stages because cuBLAS has no f32 x f32 -> bf16 product.
extern "C" __global__ void __launch_bounds__(256)
tpla_engine_round_bf16(const float* __restrict__ src, u64 count, bf16_t* __restrict__ dst)
{
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) dst[i] = f32_to_bf16_host(src[i]);
}

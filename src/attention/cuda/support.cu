// Kernels every module carries beside its decode kernel: the split merge, device
// appends, benchmark fills and the read-bandwidth probe; compiled after common.cuh.

// Merges the splits of tpla_decode: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s -
// lse) out_s. One block per (head, sequence); empty splits (lse_s = -inf) are skipped,
// so their unwritten partial outputs are never read.
extern "C" __global__ void __launch_bounds__(128)
tpla_combine(const float* __restrict__ part_out, const float* __restrict__ part_lse,
             int heads, int num_splits, float* __restrict__ out, float* __restrict__ lse)
{
    extern __shared__ float weight[];  // [num_splits]
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const float* pl = part_lse + (u64)b * num_splits * heads + h;
    __shared__ float red[2];
    if (threadIdx.x < 32) {
        float mx = NEG_INF;
        for (int s = threadIdx.x; s < num_splits; s += 32) mx = fmaxf(mx, pl[(u64)s * heads]);
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float sum = 0.f;
        for (int s = threadIdx.x; s < num_splits; s += 32) {
            const float w = __expf(pl[(u64)s * heads] - mx);
            weight[s] = w;
            sum += w;
        }
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (threadIdx.x == 0) {
            red[0] = mx;
            red[1] = sum;
        }
    }
    __syncthreads();
    const float inv = 1.f / red[1];
    for (int c = threadIdx.x * 4; c < SLICE; c += blockDim.x * 4) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < num_splits; ++s) {
            const float w = weight[s];
            if (w == 0.f) continue;
            const float4 v = *reinterpret_cast<const float4*>(
                part_out + (((u64)b * num_splits + s) * heads + h) * SLICE + c);
            acc.x += w * v.x;
            acc.y += w * v.y;
            acc.z += w * v.z;
            acc.w += w * v.w;
        }
        *reinterpret_cast<float4*>(out + ((u64)b * heads + h) * SLICE + c) =
            make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    }
    if (threadIdx.x == 0) lse[(u64)b * heads + h] = red[0] + __logf(red[1]);
}

// Device appends of the owned cache (DeviceCache): one decode row per entry, rows[i] (f32,
// RW wide) to position seq_lens[slots[i]] of that slot, whose page the host reserved
// beforehand; the length then grows by one. A row with no reserved page sets *error to
// 1, a slot id out of range sets it to 2; either row is dropped. Slots must be distinct
// within one call. One block per row; the pool is pages of PAGE rows of its type.

// Where row `i` goes (its row index in the pool), or -1 after flagging *error.
__device__ __forceinline__ long long append_target(const int* __restrict__ slots, int i, int num_slots,
                                                   const int* __restrict__ block_table,
                                                   const int* __restrict__ seq_lens, int max_pages,
                                                   int* __restrict__ error)
{
    const int slot = slots[i];
    if (slot < 0 || slot >= num_slots) {
        if (threadIdx.x == 0) atomicExch(error, 2);
        return -1;
    }
    const int pos = seq_lens[slot];
    const int page_idx = pos / PAGE;
    const int page = page_idx < max_pages ? block_table[(u64)slot * max_pages + page_idx] : -1;
    if (page < 0) {
        if (threadIdx.x == 0) atomicExch(error, 1);
        return -1;
    }
    return (long long)page * PAGE + pos % PAGE;
}

// Bf16 pools: each value rounded to nearest even from f32.
extern "C" __global__ void __launch_bounds__(128)
tpla_append(const float* __restrict__ rows, const int* __restrict__ slots, int count,
            int num_slots, bf16_t* __restrict__ pool, const int* __restrict__ block_table,
            int* __restrict__ seq_lens, int max_pages, int* __restrict__ error)
{
    const int i = blockIdx.x;
    if (i >= count) return;
    const long long target = append_target(slots, i, num_slots, block_table, seq_lens, max_pages, error);
    if (target < 0) return;
    bf16_t* dst = pool + (u64)target * RW;
    const float* src = rows + (u64)i * RW;
    for (int c = threadIdx.x * 2; c < RW; c += blockDim.x * 2)
        *reinterpret_cast<u32*>(dst + c) = pack_bf16x2(src[c], src[c + 1]);
    __syncthreads();
    if (threadIdx.x == 0) seq_lens[slots[i]] += 1;
}

// FP8 pools (DESIGN 7.1): the row quantised on the device into exactly the bytes of the
// host's `DType::Fp8E4m3.encode_row` of the same f32 values (non-finite ones included:
// a NaN gives the NaN code, an infinity saturates and makes its block's scale 1).
extern "C" __global__ void __launch_bounds__(128)
tpla_append_fp8(const float* __restrict__ rows, const int* __restrict__ slots, int count,
                int num_slots, unsigned char* __restrict__ pool, const int* __restrict__ block_table,
                int* __restrict__ seq_lens, int max_pages, int* __restrict__ error)
{
    const int i = blockIdx.x;
    if (i >= count) return;
    const long long target = append_target(slots, i, num_slots, block_table, seq_lens, max_pages, error);
    if (target < 0) return;
    const float* src = rows + (u64)i * RW;
    store_fp8_row([&](int j) { return widen_as_host(src[j]); },
                  [&](int c) { return widen_as_host(src[SLICE + c]); }, pool + (u64)target * FP8_ROW_BYTES);
    __syncthreads();
    if (threadIdx.x == 0) seq_lens[slots[i]] += 1;
}

// Pseudo-random fill for benchmarks: element i of `data` becomes a value in [-scale,
// scale) from a 64-bit mix of (seed, i). Synthetic caches are filled on the device so
// gigabytes of input need no host round trip.
__device__ __forceinline__ float hash_unit(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 bits -> [-1, 1)
}

extern "C" __global__ void tpla_fill_bf16(bf16_t* data, unsigned long long count,
                                          unsigned long long seed, float scale)
{
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < count;
         i += (unsigned long long)gridDim.x * blockDim.x)
        data[i] = (bf16_t)(pack_bf16x2(scale * hash_unit(seed, i), 0.f) & 0xffffu);
}

// Fills `rows` FP8 rows (DESIGN 7.1: `slice` e4m3 codes, f32 block scales, 64 bf16 RoPE
// values; `row_bytes` each) with pseudo-random values of magnitude below `scale`: codes
// of any finite e4m3 value (the two NaN codes become 448's), each block's scale
// `scale` / 448, RoPE values in [-scale, scale). Benchmark inputs.
extern "C" __global__ void tpla_fill_fp8(unsigned char* data, unsigned long long rows, int slice, int row_bytes,
                                         unsigned long long seed, float scale)
{
    const int scales = (slice + 127) / 128;
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        unsigned char* row = data + r * row_bytes;
        for (int i = threadIdx.x; i < slice; i += blockDim.x) {
            const unsigned int h = (unsigned int)((hash_unit(seed, r * 1024 + i) + 1.f) * 128.f) & 0xffu;
            row[i] = (unsigned char)((h & 0x7fu) == 0x7fu ? h - 1u : h);
        }
        for (int i = threadIdx.x; i < scales; i += blockDim.x)
            reinterpret_cast<float*>(row + slice)[i] = scale / 448.f;
        bf16_t* rope = reinterpret_cast<bf16_t*>(row + slice + 4 * scales);
        for (int i = threadIdx.x; i < 64; i += blockDim.x)
            rope[i] = (bf16_t)(pack_bf16x2(scale * hash_unit(seed ^ 0x9e3779b9ull, r * 64 + i), 0.f) & 0xffffu);
    }
}

extern "C" __global__ void tpla_fill_f32(float* data, unsigned long long count,
                                         unsigned long long seed, float scale)
{
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < count;
         i += (unsigned long long)gridDim.x * blockDim.x)
        data[i] = scale * hash_unit(seed, i);
}

// Read-bandwidth probe for benchmark ceilings: every 16-byte word of `data` is loaded
// once (coalesced, several loads in flight per thread); the xor of everything is
// stored only when it equals `never`, which the host makes impossible in practice, so
// the loads cannot be removed and nothing is written.
extern "C" __global__ void __launch_bounds__(256)
tpla_read_probe(const uint4* __restrict__ data, unsigned long long words, unsigned int never,
                unsigned int* __restrict__ sink)
{
    unsigned int acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < words; i += 4 * stride) {
        const uint4 a = data[i], b = data[i + stride], c = data[i + 2 * stride], d = data[i + 3 * stride];
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < words; i += stride) {
        const uint4 a = data[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == never) sink[0] = acc;
}

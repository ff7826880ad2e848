// Kernels of the sequence-shard merges (DESIGN 3.6; src/combine/sequence.rs is the CPU
// form, whose arithmetic these follow: f64 weights and packs, f32 outputs): the fix-up of
// a shard's empty batch entries after its attention, the rescale of merge (a), the
// shared logit bounds, pack and unpack of merge (b) (the NCCL merges), and each merge
// over every rank of one process in one kernel. One module per device, not specialised
// and not arch-specific, compiled by NVRTC like the others (src/attention/cuda/
// sequence.rs launches them).

typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF_F __int_as_float(0xff800000)
#define NEG_INF_D __longlong_as_double(0xfff0000000000000ll)
#define QNAN_D __longlong_as_double(0x7ff8000000000000ll)
#define PACKED_EXPONENT_LIMIT 700.0  // combine::sequence::PACKED_EXPONENT_LIMIT

// Error bits of the pack and unpack (combine::sequence::MERGE_*, the engine's error word)
#define ERR_BOUND_NOT_FINITE 1u
#define ERR_LSE_ABOVE_BOUND 2u
#define ERR_BOUND_FAR_ABOVE 4u

// After a sequence shard's attention, before its projection: an entry whose slot holds
// no token of the sequence (a sequence shorter than the shards or the interleave) gets
// zero latent outputs and a log-sum-exp of -inf, which the merges weigh zero, instead
// of the decode kernels' NaN. One block per batch entry; other entries return at once.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_empty(const int* __restrict__ slots, const int* __restrict__ seq_lens, int num_slots,
               int batch, int heads, int width, float* __restrict__ latent, float* __restrict__ lse)
{
    const int b = blockIdx.x;
    if (b >= batch) return;
    const int slot = slots[b];
    if (slot < 0 || slot >= num_slots || seq_lens[slot] != 0) return;
    float* o = latent + (u64)b * heads * width;
    for (int i = threadIdx.x; i < heads * width; i += blockDim.x) o[i] = 0.f;
    for (int h = threadIdx.x; h < heads; h += blockDim.x) lse[(u64)b * heads + h] = NEG_INF_F;
}

// The weight of merge (a) for a shard whose log-sum-exp is `own` among `shards`
// log-sum-exps (lse.at(j)): e^(own - L), L their log-sum-exp, in f64. NaN anywhere: NaN;
// no token on the shard (own = -inf): 0.
template <typename Lses>
__device__ double shard_weight(double own, int shards, const Lses& lse)
{
    double mx = NEG_INF_D;
    bool nan = false;
    for (int j = 0; j < shards; ++j) {
        const double l = lse.at(j);
        nan = nan || l != l;
        mx = fmax(mx, l);
    }
    if (nan) return QNAN_D;
    if (own == NEG_INF_D) return 0.0;
    double sum = 0.0;
    for (int j = 0; j < shards; ++j) sum += exp(lse.at(j) - mx);
    return exp(own - mx) / sum;
}

// Row r's log-sum-exps of the shards, gathered side by side `stride` apart.
struct GatheredLses {
    const float* gathered;
    long long stride;
    int r;
    __device__ double at(int j) const { return gathered[(u64)j * stride + r]; }
};

// Merge (a): row r of `out` ([rows][width], this shard's outputs normalised over its
// tokens) times its shard_weight among the gathered log-sum-exps (gathered[j * stride +
// r] for shard j < shards). One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_rescale(float* __restrict__ out, int rows, int width, int shard, int shards,
                 const float* __restrict__ gathered, long long stride)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    __shared__ double weight;
    if (threadIdx.x == 0) {
        const GatheredLses lse{gathered, stride, r};
        weight = shard_weight(lse.at(shard), shards, lse);
    }
    __syncthreads();
    const double w = weight;
    float* o = out + (u64)r * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) o[c] = (float)((double)o[c] * w);
}

// Shared logit bounds of merge (b) (combine::sequence::logit_bound): per query row r of
// q ([rows][slice_width + d_r], the rows the kernels read), |q_lat| * latent_norm +
// |q_rope| * rope_norm in f64. One warp per row; every shard of a latent group computes
// the same bounds from the same queries.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_bounds(const float* __restrict__ q, int rows, int slice_width, int d_r,
                double latent_norm, double rope_norm, double* __restrict__ bound)
{
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* row = q + (u64)r * (slice_width + d_r);
    double a = 0.0, b = 0.0;
    for (int c = lane; c < slice_width; c += 32) a += (double)row[c] * (double)row[c];
    for (int c = lane; c < d_r; c += 32) b += (double)row[slice_width + c] * (double)row[slice_width + c];
    for (int off = 16; off > 0; off /= 2) {
        a += __shfl_xor_sync(0xffffffffu, a, off);
        b += __shfl_xor_sync(0xffffffffu, b, off);
    }
    if (lane == 0) bound[r] = sqrt(a) * latent_norm + sqrt(b) * rope_norm;
}

// The pack of merge (b) for a shard with log-sum-exp l against the bound m
// (combine::sequence::pack_against_bound): its outputs are weighed by e, its
// denominator is e and it counts as `holder` shards holding a token (0 for l = -inf:
// a zero pack). A non-finite bound, or l more than the limit above it, gives an error
// bit and a NaN pack (never stale values); a NaN l (a faulted entry) travels on and
// makes the merged entry NaN.
struct Pack {
    double e, holder;
    u32 error;
};
__device__ __forceinline__ Pack pack_weight(double l, double m)
{
    if (!(m - m == 0.0)) return {QNAN_D, 1.0, ERR_BOUND_NOT_FINITE};  // inf or NaN
    if (l == NEG_INF_D) return {0.0, 0.0, 0u};
    if (l - m > PACKED_EXPONENT_LIMIT) return {QNAN_D, 1.0, ERR_LSE_ABOVE_BOUND};
    return {l - m < -PACKED_EXPONENT_LIMIT ? 0.0 : exp(l - m), 1.0, 0u};
}

// Merge (b), pack: row r of `packed` ([rows][width + 2], f64) is e * out[r], e, holder
// (pack_weight); error bits into `error`. One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_pack(const float* __restrict__ out, const float* __restrict__ lse,
              const double* __restrict__ bound, int rows, int width, double* __restrict__ packed,
              u32* __restrict__ error)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const Pack p = pack_weight(lse[r], bound[r]);
    if (p.error != 0u && threadIdx.x == 0) atomicOr(error, p.error);
    double* dst = packed + (u64)r * (width + 2);
    const float* src = out + (u64)r * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = p.holder == 0.0 ? 0.0 : p.e * (double)src[c];
    if (threadIdx.x == 0) {
        dst[width] = p.e;
        dst[width + 1] = p.holder;
    }
}

// The unpack of merge (b) (combine::sequence::unpack_merged): the merged output of an
// entry from its summed numerator, denominator and holders: zero for an entry no shard
// holds a token of; NaN with an error bit for one whose every shard lay more than the
// limit below the bound.
__device__ __forceinline__ float unpack_value(double num, double den, double holders)
{
    if (holders == 0.0) return 0.f;
    if (den == 0.0) return __int_as_float(0x7fc00000);
    return (float)(num / den);
}
__device__ __forceinline__ u32 unpack_error(double den, double holders)
{
    return holders != 0.0 && den == 0.0 ? ERR_BOUND_FAR_ABOVE : 0u;
}

// Merge (b), unpack: out[r] from the summed packs of row r; error bits into `error`.
// One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_unpack(const double* __restrict__ packed, int rows, int width, float* __restrict__ out,
                u32* __restrict__ error)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const double* src = packed + (u64)r * (width + 2);
    const double den = src[width], holders = src[width + 1];
    const u32 bits = unpack_error(den, holders);
    if (bits != 0u && threadIdx.x == 0) atomicOr(error, bits);
    float* dst = out + (u64)r * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = unpack_value(src[c], den, holders);
}

// ---- In process: every rank of a deployment on one GPU, merged by one kernel ----
// The ranks' buffers by rank (group * shards + shard), passed by value; the merged
// output goes back into every rank's partial (the all-reduce's result on every rank).
#define MAX_RANKS 32  // attention::cuda::sequence::MAX_IN_PROCESS_RANKS
struct RankBuffers {
    float* partial[MAX_RANKS];        // [rows][width] f32
    const float* lse[MAX_RANKS];      // [rows] f32
    const double* bound[MAX_RANKS];   // [rows] f64 (merge (b))
};

// Row r's log-sum-exps of the shards of one latent group.
struct GroupLses {
    const RankBuffers* ranks;
    int first;
    int r;
    __device__ double at(int j) const { return ranks->lse[first + j][r]; }
};

// Merge (a) of every rank, in the arithmetic of the rescale and the in-rank-order f32
// sum the collectives do: each rank's outputs times its shard_weight within its group,
// rounded to f32, summed over the ranks in rank order. One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_merge_lse_all(const __grid_constant__ RankBuffers ranks, int groups, int shards, int rows,
                       int width)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int n = groups * shards;
    __shared__ double weight[MAX_RANKS];
    if (threadIdx.x < n) {
        const int k = threadIdx.x;
        const GroupLses lse{&ranks, k - k % shards, r};
        weight[k] = shard_weight(lse.at(k % shards), shards, lse);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = (float)((double)ranks.partial[0][(u64)r * width + c] * weight[0]);
        for (int k = 1; k < n; ++k) acc += (float)((double)ranks.partial[k][(u64)r * width + c] * weight[k]);
        for (int k = 0; k < n; ++k) ranks.partial[k][(u64)r * width + c] = acc;
    }
}

// Merge (b) of every rank, in the arithmetic of pack, the in-rank-order f64 sum over a
// group's shards, unpack, and the in-group-order f32 sum over the groups: one block per
// row; error bits into `error`. (The minimum of 4 blocks per multiprocessor is for ptxas,
// which otherwise held this kernel to 32 registers and spilled.)
extern "C" __global__ void __launch_bounds__(128, 4)
tpla_seq_merge_packed_all(const __grid_constant__ RankBuffers ranks, int groups, int shards,
                          int rows, int width, u32* __restrict__ error)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int n = groups * shards;
    __shared__ double e[MAX_RANKS], holder[MAX_RANKS];  // per rank
    __shared__ double den[MAX_RANKS], holders[MAX_RANKS];  // per group
    if (threadIdx.x < n) {
        const int k = threadIdx.x;
        const Pack p = pack_weight(ranks.lse[k][r], ranks.bound[k][r]);
        if (p.error != 0u) atomicOr(error, p.error);
        e[k] = p.e;
        holder[k] = p.holder;
    }
    __syncthreads();
    if (threadIdx.x < groups) {
        const int first = threadIdx.x * shards;
        double d = e[first], h = holder[first];
        for (int j = 1; j < shards; ++j) {
            d += e[first + j];
            h += holder[first + j];
        }
        const u32 bits = unpack_error(d, h);
        if (bits != 0u) atomicOr(error, bits);
        den[threadIdx.x] = d;
        holders[threadIdx.x] = h;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.f;
        for (int g = 0; g < groups; ++g) {
            double num = 0.0;
            for (int j = 0; j < shards; ++j) {
                const int k = g * shards + j;
                const double x = holder[k] == 0.0 ? 0.0 : e[k] * (double)ranks.partial[k][(u64)r * width + c];
                num = j == 0 ? x : num + x;
            }
            const float v = unpack_value(num, den[g], holders[g]);
            acc = g == 0 ? v : acc + v;
        }
        for (int k = 0; k < groups * shards; ++k) ranks.partial[k][(u64)r * width + c] = acc;
    }
}

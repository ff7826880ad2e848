// Kernels of the sequence-shard merges (DESIGN 3.6; src/combine/sequence.rs is the CPU
// form, whose arithmetic these follow: f64 weights and packs, f32 outputs): the fix-up of
// a shard's empty batch entries after its attention, the rescale of merge (a), the
// shared logit bounds, pack and unpack of merge (b), and element-wise sums for the ranks
// of one process. One module per device, not specialised and not arch-specific, compiled
// by NVRTC like the others (src/attention/cuda/sequence.rs launches them).

typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF_F __int_as_float(0xff800000)
#define NEG_INF_D __longlong_as_double(0xfff0000000000000ll)
#define QNAN_D __longlong_as_double(0x7ff8000000000000ll)
#define PACKED_EXPONENT_LIMIT 700.0  // combine::sequence::PACKED_EXPONENT_LIMIT

// Error bits of the pack and unpack (src/attention/cuda/sequence.rs)
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

// Merge (a): row r of `out` ([rows][width], this shard's outputs normalised over its
// tokens) times e^(l_own - L), where gathered[j * stride + r] is the log-sum-exp of shard
// j (j < shards) and L their log-sum-exp. NaN anywhere: NaN; no token on this shard: 0.
// One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_rescale(float* __restrict__ out, int rows, int width, int shard, int shards,
                 const float* __restrict__ gathered, long long stride)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    __shared__ double weight;
    if (threadIdx.x == 0) {
        const double own = gathered[(u64)shard * stride + r];
        double mx = NEG_INF_D;
        bool nan = false;
        for (int j = 0; j < shards; ++j) {
            const double l = gathered[(u64)j * stride + r];
            nan = nan || l != l;
            mx = fmax(mx, l);
        }
        double w;
        if (nan) {
            w = QNAN_D;
        } else if (own == NEG_INF_D) {
            w = 0.0;
        } else {
            double sum = 0.0;
            for (int j = 0; j < shards; ++j) sum += exp((double)gathered[(u64)j * stride + r] - mx);
            w = exp(own - mx) / sum;
        }
        weight = w;
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

// Merge (b), pack (combine::sequence::pack_against_bound): row r of `packed`
// ([rows][width + 2], f64) is e^(l - m) * out[r], e^(l - m), 1 (a shard holding a token);
// zeros for l = -inf. A non-finite bound, or l more than the limit above it, sets an
// error bit (and NaN in the row, never stale values). One block per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_pack(const float* __restrict__ out, const float* __restrict__ lse,
              const double* __restrict__ bound, int rows, int width, double* __restrict__ packed,
              u32* __restrict__ error)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const double l = lse[r], m = bound[r];
    double* dst = packed + (u64)r * (width + 2);
    const float* src = out + (u64)r * width;
    double e, holder;
    if (!(m - m == 0.0)) {  // inf or NaN
        if (threadIdx.x == 0) atomicOr(error, ERR_BOUND_NOT_FINITE);
        e = QNAN_D;
        holder = 1.0;
    } else if (l == NEG_INF_D) {
        for (int c = threadIdx.x; c < width + 2; c += blockDim.x) dst[c] = 0.0;
        return;
    } else if (l - m > PACKED_EXPONENT_LIMIT) {
        if (threadIdx.x == 0) atomicOr(error, ERR_LSE_ABOVE_BOUND);
        e = QNAN_D;
        holder = 1.0;
    } else {
        // NaN (a faulted entry) travels on and makes the merged entry NaN
        e = l - m < -PACKED_EXPONENT_LIMIT ? 0.0 : exp(l - m);
        holder = 1.0;
    }
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = e * (double)src[c];
    if (threadIdx.x == 0) {
        dst[width] = e;
        dst[width + 1] = holder;
    }
}

// Merge (b), unpack (combine::sequence::unpack_merged): out[r] = numerators / denominator
// of the summed packs; zeros for an entry no shard holds a token of; an entry whose every
// shard lay more than the limit below the bound sets an error bit (and NaN). One block
// per row.
extern "C" __global__ void __launch_bounds__(128)
tpla_seq_unpack(const double* __restrict__ packed, int rows, int width, float* __restrict__ out,
                u32* __restrict__ error)
{
    const int r = blockIdx.x;
    if (r >= rows) return;
    const double* src = packed + (u64)r * (width + 2);
    const double den = src[width], holders = src[width + 1];
    float* dst = out + (u64)r * width;
    if (holders == 0.0) {
        for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = 0.f;
    } else if (den == 0.0) {
        if (threadIdx.x == 0) atomicOr(error, ERR_BOUND_FAR_ABOVE);
        for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = __int_as_float(0x7fc00000);
    } else {
        for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = (float)(src[c] / den);
    }
}

// dst[i] += src[i] (the in-process sums, in rank order, of ranks on one GPU).
extern "C" __global__ void tpla_seq_add_f32(float* __restrict__ dst, const float* __restrict__ src,
                                            long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

extern "C" __global__ void tpla_seq_add_f64(double* __restrict__ dst, const double* __restrict__ src,
                                            long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

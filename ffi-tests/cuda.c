/* cuda.c: a context with TPLA_BACKEND_CUDA decodes what the CPU backend decodes (same
 * cache, same weights; both read bf16 rows and accumulate in f32, so they agree to
 * rounding). Where the library was built without CUDA or no GPU is usable, context
 * creation must say TPLA_STATUS_UNSUPPORTED; the program then prints why and passes.
 */
#include "check.h"

#define PREFILL 300
#define STEPS 2
#define BATCH 2

static double rel_l2(const float *a, const float *b, size_t n) {
  double num = 0.0, den = 0.0;
  size_t i;
  for (i = 0; i < n; i++) {
    double e = (double)a[i] - (double)b[i];
    num += e * e;
    den += (double)b[i] * (double)b[i];
  }
  return sqrt(num / den);
}

int main(void) {
  tpla_dims d;
  tpla_synthetic *model;
  tpla_transform_desc td;
  tpla_transform *hadamard;
  tpla_context_options o;
  tpla_backend_options cuda = backend_options(TPLA_BACKEND_CUDA, 0);
  tpla_backend_options cpu = backend_options(TPLA_BACKEND_CPU, 2);
  tpla_context *gpu_ctx, *cpu_ctx;
  tpla_context_info info;
  tpla_layer_weights lw;
  tpla_mla_weights mla;
  tpla_cache_options co;
  tpla_cache *cache;
  tpla_status s;
  const uint32_t seqs[BATCH] = {0, 1};
  float *latents[BATCH], *keys[BATCH], *q_nope[BATCH], *q_rope[BATCH], *w_uk, *w_uv;
  size_t tokens = PREFILL + STEPS, H, W, b, uk_n, uv_n;
  int step;

  CHECK_OK(tpla_dims_preset("deepseek-v2-lite", &d));
  H = d.heads;
  CHECK(H == 16); /* lse arrays below */
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = d;
  o.plan.ranks = 2;
  o.plan.groups = 2;
  o.plan.rank = 1;
  o.layers = 1;
  s = tpla_context_create(&o, &cuda, &gpu_ctx);
  if (s == TPLA_STATUS_UNSUPPORTED) {
    printf("cuda: skipped: %s\n", tpla_last_error_message());
    return 0;
  }
  CHECK_OK(s);
  CHECK_OK(tpla_context_create(&o, &cpu, &cpu_ctx));
  printf("cuda: %s against %s\n", tpla_context_backend_name(gpu_ctx),
         tpla_context_backend_name(cpu_ctx));
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(gpu_ctx, &info));
  W = info.slice_width;

  CHECK_OK(tpla_synthetic_create(d, 3, &model));
  memset(&mla, 0, sizeof mla);
  mla.struct_size = sizeof mla;
  mla.w_uk_count = H * d.d_c * d.d_n;
  mla.w_uv_count = H * d.d_c * d.d_v;
  mla.gamma_count = d.d_c;
  mla.w_uk = (float *)xcalloc(mla.w_uk_count, sizeof(float));
  mla.w_uv = (float *)xcalloc(mla.w_uv_count, sizeof(float));
  mla.gamma = (float *)xcalloc(mla.gamma_count, sizeof(float));
  CHECK_OK(tpla_synthetic_weights(model, (float *)mla.w_uk, mla.w_uk_count, (float *)mla.w_uv,
                                  mla.w_uv_count, (float *)mla.gamma, mla.gamma_count));
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
  td.d_c = d.d_c;
  td.seed = 1;
  CHECK_OK(tpla_transform_create(&td, &hadamard));
  uk_n = H * W * d.d_n;
  uv_n = H * W * d.d_v;
  w_uk = (float *)xcalloc(uk_n, sizeof(float));
  w_uv = (float *)xcalloc(uv_n, sizeof(float));
  CHECK_OK(tpla_fold_layer(d, o.plan, &mla, hadamard, w_uk, uk_n, w_uv, uv_n));
  memset(&lw, 0, sizeof lw);
  lw.struct_size = sizeof lw;
  lw.w_uk = w_uk;
  lw.w_uk_count = uk_n;
  lw.w_uv = w_uv;
  lw.w_uv_count = uv_n;
  lw.mu = 1.0;
  lw.slice_fraction = 0.5;
  lw.transform = hadamard;
  CHECK_OK(tpla_context_set_layer(gpu_ctx, 0, &lw));
  CHECK_OK(tpla_context_set_layer(cpu_ctx, 0, &lw));

  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_BF16;
  co.page_size = TPLA_DEFAULT_PAGE_SIZE;
  co.capacity_pages = 16;
  CHECK_OK(tpla_cache_create(cpu_ctx, &co, &cache));
  for (b = 0; b < BATCH; b++) {
    size_t t, len = tokens - b * 100; /* sequences of different lengths */
    latents[b] = (float *)xcalloc(len * d.d_c, sizeof(float));
    keys[b] = (float *)xcalloc(len * d.d_r, sizeof(float));
    q_nope[b] = (float *)xcalloc(len * H * d.d_n, sizeof(float));
    q_rope[b] = (float *)xcalloc(len * H * d.d_r, sizeof(float));
    CHECK_OK(tpla_synthetic_sequence(model, 10 + b, len, latents[b], len * d.d_c, keys[b],
                                     len * d.d_r, q_nope[b], len * H * d.d_n, q_rope[b],
                                     len * H * d.d_r));
    CHECK_OK(tpla_cache_add_sequence(cache, seqs[b]));
    for (t = 0; t + STEPS < len; t++)
      CHECK_OK(tpla_context_append_token(cpu_ctx, cache, seqs[b], 0, latents[b] + t * d.d_c,
                                         d.d_c, keys[b] + t * d.d_r, d.d_r,
                                         TPLA_RMS_MODE_EXACT));
  }

  for (step = 0; step < STEPS; step++) {
    float *qn = (float *)xcalloc(BATCH * H * d.d_n, sizeof(float));
    float *qr = (float *)xcalloc(BATCH * H * d.d_r, sizeof(float));
    float *heads_gpu = (float *)xcalloc(BATCH * H * d.d_v, sizeof(float));
    float *heads_cpu = (float *)xcalloc(BATCH * H * d.d_v, sizeof(float));
    float *lat_gpu = (float *)xcalloc(BATCH * H * W, sizeof(float));
    float *lat_cpu = (float *)xcalloc(BATCH * H * W, sizeof(float));
    float lse_gpu[BATCH * 16], lse_cpu[BATCH * 16];
    tpla_decode_args a;
    double e_heads, e_lat, e_lse;
    for (b = 0; b < BATCH; b++) {
      size_t t = tokens - b * 100 - STEPS + (size_t)step;
      CHECK_OK(tpla_context_append_token(gpu_ctx, cache, seqs[b], 0, latents[b] + t * d.d_c,
                                         d.d_c, keys[b] + t * d.d_r, d.d_r,
                                         TPLA_RMS_MODE_EXACT));
      memcpy(qn + b * H * d.d_n, q_nope[b] + t * H * d.d_n, H * d.d_n * sizeof(float));
      memcpy(qr + b * H * d.d_r, q_rope[b] + t * H * d.d_r, H * d.d_r * sizeof(float));
    }
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.query_kind = TPLA_QUERY_KIND_NOPE;
    a.output_kind = TPLA_OUTPUT_KIND_HEADS;
    a.seq_ids = seqs;
    a.batch = BATCH;
    a.queries = qn;
    a.queries_count = BATCH * H * d.d_n;
    a.q_rope = qr;
    a.q_rope_count = BATCH * H * d.d_r;
    a.out_count = BATCH * H * d.d_v;
    a.out = heads_gpu;
    CHECK_OK(tpla_context_decode(gpu_ctx, cache, &a));
    a.out = heads_cpu;
    CHECK_OK(tpla_context_decode(cpu_ctx, cache, &a));
    a.output_kind = TPLA_OUTPUT_KIND_LATENT;
    a.out_count = BATCH * H * W;
    a.lse_count = BATCH * H;
    a.out = lat_gpu;
    a.lse = lse_gpu;
    CHECK_OK(tpla_context_decode(gpu_ctx, cache, &a));
    a.out = lat_cpu;
    a.lse = lse_cpu;
    CHECK_OK(tpla_context_decode(cpu_ctx, cache, &a));
    e_heads = rel_l2(heads_gpu, heads_cpu, BATCH * H * d.d_v);
    e_lat = rel_l2(lat_gpu, lat_cpu, BATCH * H * W);
    e_lse = rel_l2(lse_gpu, lse_cpu, BATCH * H);
    printf("cuda: step %d: rel. L2 GPU vs CPU: heads %.2e, latent %.2e, lse %.2e\n", step,
           e_heads, e_lat, e_lse);
    CHECK(e_heads < 1e-2 && e_lat < 1e-2 && e_lse < 1e-3);
    free(qn);
    free(qr);
    free(heads_gpu);
    free(heads_cpu);
    free(lat_gpu);
    free(lat_cpu);
  }

  for (b = 0; b < BATCH; b++) {
    free(latents[b]);
    free(keys[b]);
    free(q_nope[b]);
    free(q_rope[b]);
  }
  free(w_uk);
  free(w_uv);
  free((float *)mla.w_uk);
  free((float *)mla.w_uv);
  free((float *)mla.gamma);
  tpla_cache_destroy(cache);
  tpla_context_destroy(gpu_ctx);
  tpla_context_destroy(cpu_ctx);
  tpla_transform_destroy(hadamard);
  tpla_synthetic_destroy(model);
  printf("cuda: ok\n");
  return 0;
}

/* cuda.c: a context with TPLA_BACKEND_CUDA decodes what the CPU backend decodes (same
 * cache, same weights; both read bf16 rows and accumulate in f32, so they agree to
 * rounding). So does a device rank, on host buffers, on device buffers and a stream of
 * the test's own, and replayed from a CUDA graph that captured the step; a one-rank NCCL
 * all-reduce leaves its buffer as it was. Where the library was built without CUDA or no
 * GPU is usable, context and device-rank creation must say TPLA_STATUS_UNSUPPORTED; the
 * program then prints why and passes, unless TPLA_TEST_REQUIRE_GPU is set (device runs
 * set it, and TPLA_TEST_REQUIRE_NCCL for NCCL). The driver API is reached through dlopen
 * with the few prototypes below, so the test needs no CUDA headers.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>

#include "check.h"

#define PREFILL 300
#define STEPS 2
#define BATCH 2

/* ---- the CUDA driver API, loaded at run time ---- */
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUhandle; /* CUcontext, CUstream, CUgraph, CUgraphExec */
static struct {
  CUresult (*init)(unsigned);
  CUresult (*device_get)(int *, int);
  CUresult (*primary_ctx_retain)(CUhandle *, int);
  CUresult (*primary_ctx_release)(int);
  CUresult (*ctx_set_current)(CUhandle);
  CUresult (*ctx_sync)(void);
  CUresult (*mem_alloc)(CUdeviceptr *, size_t);
  CUresult (*mem_free)(CUdeviceptr);
  CUresult (*htod)(CUdeviceptr, const void *, size_t);
  CUresult (*dtoh)(void *, CUdeviceptr, size_t);
  CUresult (*stream_create)(CUhandle *, unsigned);
  CUresult (*stream_destroy)(CUhandle);
  CUresult (*stream_sync)(CUhandle);
  CUresult (*begin_capture)(CUhandle, int);
  CUresult (*end_capture)(CUhandle, CUhandle *);
  CUresult (*graph_instantiate)(CUhandle *, CUhandle, unsigned long long);
  CUresult (*graph_launch)(CUhandle, CUhandle);
  CUresult (*graph_exec_destroy)(CUhandle);
  CUresult (*graph_destroy)(CUhandle);
} cu;

#define CU(call)                                                                        \
  do {                                                                                  \
    CUresult cu_result_ = (call);                                                       \
    if (cu_result_ != 0) {                                                              \
      fprintf(stderr, "%s:%d: %s failed: CUresult %d\n", __FILE__, __LINE__, #call,      \
              cu_result_);                                                              \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

static void load(void *lib, void *fn, const char *name) {
  void *sym = dlsym(lib, name);
  if (sym == NULL) {
    fprintf(stderr, "libcuda lacks %s\n", name);
    exit(1);
  }
  memcpy(fn, &sym, sizeof sym); /* ISO C has no object-to-function pointer cast */
}

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  CHECK(lib != NULL); /* the library opened a GPU through it already */
  load(lib, &cu.init, "cuInit");
  load(lib, &cu.device_get, "cuDeviceGet");
  load(lib, &cu.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
  load(lib, &cu.primary_ctx_release, "cuDevicePrimaryCtxRelease_v2");
  load(lib, &cu.ctx_set_current, "cuCtxSetCurrent");
  load(lib, &cu.ctx_sync, "cuCtxSynchronize");
  load(lib, &cu.mem_alloc, "cuMemAlloc_v2");
  load(lib, &cu.mem_free, "cuMemFree_v2");
  load(lib, &cu.htod, "cuMemcpyHtoD_v2");
  load(lib, &cu.dtoh, "cuMemcpyDtoH_v2");
  load(lib, &cu.stream_create, "cuStreamCreate");
  load(lib, &cu.stream_destroy, "cuStreamDestroy_v2");
  load(lib, &cu.stream_sync, "cuStreamSynchronize");
  load(lib, &cu.begin_capture, "cuStreamBeginCapture_v2");
  load(lib, &cu.end_capture, "cuStreamEndCapture");
  load(lib, &cu.graph_instantiate, "cuGraphInstantiateWithFlags");
  load(lib, &cu.graph_launch, "cuGraphLaunch");
  load(lib, &cu.graph_exec_destroy, "cuGraphExecDestroy");
  load(lib, &cu.graph_destroy, "cuGraphDestroy");
}

static int required(const char *var) {
  const char *v = getenv(var);
  return v != NULL && *v != '\0' && strcmp(v, "0") != 0;
}

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

/* A finite float's bf16 bits, rounded to nearest even. */
static uint16_t bf16_of(float v) {
  uint32_t x;
  memcpy(&x, &v, sizeof x);
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

/* Without CUDA or a GPU: a device rank and an NCCL communicator are UNSUPPORTED. */
static void unsupported_paths(const tpla_context_options *o) {
  tpla_backend_options cpu = backend_options(TPLA_BACKEND_CPU, 1);
  tpla_context *ctx;
  tpla_context_info info;
  tpla_transform_desc td;
  tpla_transform *identity;
  tpla_layer_weights lw;
  tpla_cache_options co;
  tpla_cache *cache;
  tpla_device_rank *rank = NULL;
  tpla_device_engine *engine = NULL;
  tpla_nccl_comm *comm = NULL;
  uint8_t id[TPLA_NCCL_UNIQUE_ID_BYTES];
  const uint32_t seq = 0;
  tpla_status s;

  CHECK_OK(tpla_context_create(o, &cpu, &ctx));
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(ctx, &info));
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
  td.d_c = o->dims.d_c;
  CHECK_OK(tpla_transform_create(&td, &identity));
  memset(&lw, 0, sizeof lw); /* zero weights: nothing is decoded */
  lw.struct_size = sizeof lw;
  lw.w_uk_count = (size_t)info.heads * info.slice_width * o->dims.d_n;
  lw.w_uv_count = (size_t)info.heads * info.slice_width * o->dims.d_v;
  lw.w_uk = (float *)xcalloc(lw.w_uk_count, sizeof(float));
  lw.w_uv = (float *)xcalloc(lw.w_uv_count, sizeof(float));
  lw.mu = 1.0;
  lw.slice_fraction = 0.5;
  lw.transform = identity;
  CHECK_OK(tpla_context_set_layer(ctx, 0, &lw));
  free((float *)lw.w_uk);
  free((float *)lw.w_uv);
  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_BF16;
  co.page_size = TPLA_DEFAULT_PAGE_SIZE;
  co.capacity_pages = 1;
  CHECK_OK(tpla_cache_create(ctx, &co, &cache));
  CHECK_OK(tpla_cache_add_sequence(cache, seq));
  s = tpla_device_rank_create(ctx, cache, &seq, 1, 0, 1, &rank);
  printf("cuda: device rank: %s: %s\n", tpla_status_str(s), tpla_last_error_message());
  CHECK(s == TPLA_STATUS_UNSUPPORTED && rank == NULL);
  s = tpla_device_engine_create(ctx, 0, &engine);
  printf("cuda: device engine: %s: %s\n", tpla_status_str(s), tpla_last_error_message());
  CHECK(s == TPLA_STATUS_UNSUPPORTED && engine == NULL);
  s = tpla_device_engine_create_for(ctx, 0, TPLA_DTYPE_FP8_E4M3, &engine);
  CHECK(s == TPLA_STATUS_UNSUPPORTED && engine == NULL);
  CHECK(tpla_device_engine_create_for(ctx, 0, 99, &engine) == TPLA_STATUS_INVALID_ARGUMENT);
  CHECK(tpla_device_engine_create_for(NULL, 0, TPLA_DTYPE_BF16, &engine) ==
        TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_engine_create(NULL, 0, &engine) == TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_engine_decode(NULL, NULL) == TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_engine_project_for(NULL, 0, 1, NULL, NULL, TPLA_DTYPE_BF16, NULL) ==
        TPLA_STATUS_NULL_ARGUMENT);
  tpla_device_engine_destroy(NULL);
  /* the sequence-shard paths check their handles in every build */
  CHECK(tpla_device_rank_sequence_shard(NULL, NULL, NULL, NULL) == TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_rank_decode_sequence_shard_host(NULL, 0, &seq, 1, NULL, 0, -1.0) ==
        TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_rank_download(NULL, 0, NULL, 0, NULL, 0) == TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_sequence_merge_in_process(NULL, 0, 0, 1, TPLA_SEQUENCE_MERGE_LSE) ==
        TPLA_STATUS_NULL_ARGUMENT);
  CHECK(tpla_device_rank_merge_nccl(NULL, NULL, NULL, 0, 1, TPLA_SEQUENCE_MERGE_PACKED) ==
        TPLA_STATUS_NULL_ARGUMENT);
  /* a unique id needs only libnccl, no GPU */
  s = tpla_nccl_unique_id(id, sizeof id);
  printf("cuda: nccl unique id: %s: %s\n", tpla_status_str(s),
         s == TPLA_STATUS_OK ? "" : tpla_last_error_message());
  CHECK(s == TPLA_STATUS_OK || s == TPLA_STATUS_UNSUPPORTED);
  CHECK(!(s == TPLA_STATUS_UNSUPPORTED && required("TPLA_TEST_REQUIRE_NCCL")));
  memset(id, 0, sizeof id);
  s = tpla_nccl_comm_create(id, sizeof id, 1, 0, 0, &comm);
  printf("cuda: nccl communicator: %s: %s\n", tpla_status_str(s), tpla_last_error_message());
  CHECK(s == TPLA_STATUS_UNSUPPORTED && comm == NULL);
  tpla_cache_destroy(cache);
  tpla_context_destroy(ctx);
  tpla_transform_destroy(identity);
}

/* A device rank decodes the last step as the CPU context does, from host buffers, from
 * device buffers on a stream, and from a graph that captured the step; then NCCL. */
static void device_rank_paths(tpla_context *cpu_ctx, const tpla_cache *cache,
                              const uint32_t *seqs, const float *q_lat, const float *qr) {
  tpla_device_rank *rank;
  tpla_device_rank_info ri;
  tpla_context_info info;
  tpla_decode_args a;
  tpla_nccl_comm *comm;
  uint8_t id[TPLA_NCCL_UNIQUE_ID_BYTES];
  const uint32_t unknown[1] = {77};
  float lat_scale, rope_scale, *rows, *want, *got, *poison;
  int32_t slots[BATCH], one_slot[1];
  size_t H, W, DR, QW, n_out, b, h, j;
  CUdeviceptr slots_dev, q_dev, out_dev, small_dev;
  CUhandle ctx, stream, graph, exec;
  int dev;
  double e;
  tpla_status s;

  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(cpu_ctx, &info));
  CHECK_OK(tpla_device_rank_create(cpu_ctx, cache, seqs, BATCH, 0, BATCH, &rank));
  memset(&ri, 0, sizeof ri);
  ri.struct_size = sizeof ri;
  CHECK_OK(tpla_device_rank_get_info(rank, &ri));
  H = ri.heads;
  W = info.slice_width;
  DR = info.dims.d_r;
  QW = ri.query_width;
  CHECK(H == info.heads && QW == W + DR && ri.d_v == info.dims.d_v && ri.layers == 1 &&
        ri.max_batch == BATCH && ri.sequences == BATCH && ri.device == 0);
  CHECK_OK(tpla_device_rank_query_scales(rank, 0, &lat_scale, &rope_scale));
  CHECK(rope_scale == (float)info.dims.softmax_scale && lat_scale > 0.0f);
  n_out = BATCH * H * ri.d_v;

  /* the CPU context's partial head outputs for the latent queries */
  want = (float *)xcalloc(n_out, sizeof(float));
  got = (float *)xcalloc(n_out, sizeof(float));
  poison = (float *)xcalloc(n_out, sizeof(float));
  for (j = 0; j < n_out; j++) poison[j] = NAN;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.query_kind = TPLA_QUERY_KIND_LATENT;
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.seq_ids = seqs;
  a.batch = BATCH;
  a.queries = q_lat;
  a.queries_count = BATCH * H * W;
  a.q_rope = qr;
  a.q_rope_count = BATCH * H * DR;
  a.out = want;
  a.out_count = n_out;
  CHECK_OK(tpla_context_decode(cpu_ctx, cache, &a));

  /* the device rank's query rows: scaled latent query, then scaled q_rope */
  rows = (float *)xcalloc(BATCH * H * QW, sizeof(float));
  for (b = 0; b < BATCH; b++)
    for (h = 0; h < H; h++) {
      float *row = rows + (b * H + h) * QW;
      for (j = 0; j < W; j++) row[j] = lat_scale * q_lat[(b * H + h) * W + j];
      for (j = 0; j < DR; j++) row[W + j] = rope_scale * qr[(b * H + h) * DR + j];
    }

  memcpy(got, poison, n_out * sizeof(float));
  CHECK_OK(tpla_device_rank_decode_host(rank, 0, seqs, BATCH, rows, BATCH * H * QW, got, n_out));
  e = rel_l2(got, want, n_out);
  printf("cuda: device rank, host buffers: rel. L2 vs CPU %.2e\n", e);
  CHECK(e < 1e-2);

  /* the sequence-shard step of a rank holding every token is the same decode; it keeps
   * its outputs (and log-sum-exps, all finite here) on the device for the merges */
  {
    uint32_t shard = 9, shards = 9, interleave = 9;
    float *lse = (float *)xcalloc(BATCH * H, sizeof(float));
    tpla_device_rank *twice[2];
    CHECK_OK(tpla_device_rank_sequence_shard(rank, &shard, &shards, &interleave));
    CHECK(shard == 0 && shards == 1 && interleave == 1);
    CHECK_OK(tpla_device_rank_decode_sequence_shard_host(rank, 0, seqs, BATCH, rows,
                                                         BATCH * H * QW, 1.0));
    memcpy(got, poison, n_out * sizeof(float));
    CHECK_OK(tpla_device_rank_download(rank, 0, got, n_out, lse, BATCH * H));
    e = rel_l2(got, want, n_out);
    printf("cuda: device rank, sequence-shard step: rel. L2 vs CPU %.2e\n", e);
    CHECK(e < 1e-2);
    for (j = 0; j < BATCH * H; j++) CHECK(isfinite(lse[j]));
    CHECK(tpla_device_rank_decode_sequence_shard_host(rank, 0, seqs, BATCH, rows,
                                                      BATCH * H * QW, NAN) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    {
      float *more = (float *)xcalloc(n_out + 1, sizeof(float));
      CHECK(tpla_device_rank_download(rank, 0, more, n_out + 1, NULL, 0) ==
            TPLA_STATUS_INVALID_ARGUMENT);
      free(more);
    }
    twice[0] = rank;
    twice[1] = rank;
    CHECK(tpla_device_sequence_merge_in_process(twice, 2, 0, BATCH, TPLA_SEQUENCE_MERGE_LSE) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    CHECK(tpla_device_sequence_merge_in_process(twice, 1, 0, BATCH, 7) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    free(lse);
  }

  CHECK_OK(tpla_device_rank_slots(rank, seqs, BATCH, slots, BATCH));
  CHECK(tpla_device_rank_slots(rank, unknown, 1, one_slot, 1) == TPLA_STATUS_OUT_OF_RANGE);
  CHECK(tpla_device_rank_slots(rank, seqs, BATCH, one_slot, 1) == TPLA_STATUS_BUFFER_TOO_SMALL);

  /* engine-owned device buffers and stream, in the library's (primary) context */
  load_driver();
  CU(cu.init(0));
  CU(cu.device_get(&dev, 0));
  CU(cu.primary_ctx_retain(&ctx, dev));
  CU(cu.ctx_set_current(ctx));
  CU(cu.stream_create(&stream, 1 /* CU_STREAM_NON_BLOCKING */));
  CU(cu.mem_alloc(&slots_dev, sizeof slots));
  CU(cu.mem_alloc(&q_dev, BATCH * H * QW * sizeof(float)));
  CU(cu.mem_alloc(&out_dev, n_out * sizeof(float)));
  CU(cu.mem_alloc(&small_dev, n_out * sizeof(float) / 2));
  CU(cu.htod(slots_dev, slots, sizeof slots));
  CU(cu.htod(q_dev, rows, BATCH * H * QW * sizeof(float)));
  CU(cu.ctx_sync()); /* copies on the legacy stream end before the test's stream reads */

  /* errors the library finds in device arguments */
  s = tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH, rows,
                              (float *)out_dev, stream);
  printf("cuda: host memory as q_dev: %s: %s\n", tpla_status_str(s), tpla_last_error_message());
  CHECK(s == TPLA_STATUS_INVALID_ARGUMENT || s == TPLA_STATUS_MISMATCH);
  s = tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH,
                              (const float *)q_dev, (float *)small_dev, stream);
  printf("cuda: short out_dev: %s\n", tpla_last_error_message());
  CHECK(s == TPLA_STATUS_INVALID_ARGUMENT);
  CHECK(tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH + 1,
                                (const float *)q_dev, (float *)out_dev,
                                stream) == TPLA_STATUS_INVALID_ARGUMENT);
  CHECK(tpla_device_rank_decode(rank, 1, (const int32_t *)slots_dev, BATCH,
                                (const float *)q_dev, (float *)out_dev,
                                stream) == TPLA_STATUS_OUT_OF_RANGE);
  CHECK(tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH,
                                (const float *)q_dev, (float *)q_dev,
                                stream) == TPLA_STATUS_INVALID_ARGUMENT);
  CHECK(tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH,
                                (const float *)q_dev, NULL, stream) ==
        TPLA_STATUS_NULL_ARGUMENT);

  /* a step enqueued on the engine's stream (also the warm-up before capture) */
  CU(cu.htod(out_dev, poison, n_out * sizeof(float)));
  CU(cu.ctx_sync());
  CHECK_OK(tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH,
                                   (const float *)q_dev, (float *)out_dev, stream));
  CU(cu.stream_sync(stream));
  CU(cu.dtoh(got, out_dev, n_out * sizeof(float)));
  e = rel_l2(got, want, n_out);
  printf("cuda: device rank, device buffers on a stream: rel. L2 vs CPU %.2e\n", e);
  CHECK(e < 1e-2);

  /* the same step captured in a CUDA graph (global capture mode) and replayed */
  CU(cu.htod(out_dev, poison, n_out * sizeof(float)));
  CU(cu.ctx_sync());
  CU(cu.begin_capture(stream, 0 /* CU_STREAM_CAPTURE_MODE_GLOBAL */));
  s = tpla_device_rank_decode(rank, 0, (const int32_t *)slots_dev, BATCH,
                              (const float *)q_dev, (float *)out_dev, stream);
  CU(cu.end_capture(stream, &graph));
  CHECK_OK(s);
  CU(cu.graph_instantiate(&exec, graph, 0));
  CU(cu.graph_launch(exec, stream));
  CU(cu.stream_sync(stream));
  CU(cu.dtoh(got, out_dev, n_out * sizeof(float)));
  e = rel_l2(got, want, n_out);
  printf("cuda: device rank, replayed CUDA graph: rel. L2 vs CPU %.2e\n", e);
  CHECK(e < 1e-2);
  CU(cu.graph_exec_destroy(exec));
  CU(cu.graph_destroy(graph));

  /* NCCL: one rank, whose sum leaves the step's outputs as they are */
  s = tpla_nccl_unique_id(id, sizeof id);
  if (s == TPLA_STATUS_UNSUPPORTED) {
    printf("cuda: nccl skipped: %s\n", tpla_last_error_message());
    CHECK(!required("TPLA_TEST_REQUIRE_NCCL"));
  } else {
    float *summed = (float *)xcalloc(n_out, sizeof(float));
    CHECK_OK(s);
    CHECK_OK(tpla_nccl_comm_create(id, sizeof id, 1, 0, 0, &comm));
    CHECK(tpla_nccl_all_reduce(comm, (float *)out_dev, 0, stream) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    s = tpla_nccl_all_reduce(comm, got, n_out, stream);
    CHECK(s == TPLA_STATUS_INVALID_ARGUMENT || s == TPLA_STATUS_MISMATCH);
    CHECK(tpla_nccl_all_reduce(comm, (float *)small_dev, n_out, stream) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    CHECK_OK(tpla_nccl_all_reduce(comm, (float *)out_dev, n_out, stream));
    CU(cu.stream_sync(stream));
    CU(cu.dtoh(summed, out_dev, n_out * sizeof(float)));
    CHECK(memcmp(summed, got, n_out * sizeof(float)) == 0);
    printf("cuda: nccl one-rank all-reduce of %zu values: unchanged\n", n_out);
    tpla_nccl_comm_destroy(comm);
    free(summed);
  }

  CU(cu.mem_free(slots_dev));
  CU(cu.mem_free(q_dev));
  CU(cu.mem_free(out_dev));
  CU(cu.mem_free(small_dev));
  tpla_device_rank_destroy(rank);
  CU(cu.stream_destroy(stream));
  CU(cu.primary_ctx_release(dev));
  free(rows);
  free(want);
  free(got);
  free(poison);
}

/* The engine API on the GPU: the engine's own device pool (shuffled pages), device appends
 * equal to tpla_context_append_paged's rows (but for a rare bf16 unit: the order of the
 * RMS sums), and a planned device decode close to tpla_context_decode_paged's; then the
 * statuses of bad device arguments. */
#define ENGINE_PAGES 12
#define ENGINE_WIDTH 6
static void device_engine_paths(tpla_context *cpu_ctx, float *const *latents,
                                float *const *keys, const size_t *lens, const float *q_lat,
                                const float *qr) {
  static const int32_t pages[BATCH][ENGINE_WIDTH] = {{11, 3, 7, 0, 5, -1},
                                                      {2, 9, 4, 10, -1, -1}};
  tpla_device_engine *engine;
  tpla_context_info info;
  tpla_paged_cache host_pool, dev_pool;
  tpla_paged_decode_args pa;
  tpla_device_decode_args da;
  CUdeviceptr pool_dev, slots_dev, lat_dev, kr_dev, table_dev, lens_dev, ws_dev, q_dev,
      out_dev, lse_dev, faults_dev;
  CUhandle ctx, stream;
  int dev;
  size_t H, W, DC, DR, RW, pool_bytes, words, ws_bytes, b, h, j, t, differ = 0, n_out;
  uint16_t *host_rows, *dev_rows;
  int32_t *plan, *slots, table[BATCH * ENGINE_WIDTH], seq_lens[BATCH];
  float lat_scale, rope_scale, *rows, *want, *want_lse, *got, *got_lse;
  uint32_t faults = 0;
  double e, e_lse;
  tpla_status s;

  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(cpu_ctx, &info));
  H = info.heads;
  W = info.slice_width;
  DC = info.dims.d_c;
  DR = info.dims.d_r;
  RW = W + DR;
  n_out = BATCH * H * W;
  /* FP8 pools decode on the Hopper kernel, for heads in multiples of 64: not these 16 */
  s = tpla_device_engine_create_for(cpu_ctx, 0, TPLA_DTYPE_FP8_E4M3, &engine);
  CHECK(s == TPLA_STATUS_UNSUPPORTED);
  CHECK_OK(tpla_device_engine_create(cpu_ctx, 0, &engine));
  pool_bytes = ENGINE_PAGES * 64 * RW * 2;
  memset(&host_pool, 0, sizeof host_pool);
  host_pool.struct_size = sizeof host_pool;
  host_pool.dtype = TPLA_DTYPE_BF16;
  host_pool.row_width = (uint32_t)RW;
  host_pool.page_size = 64;
  host_pool.page_stride = 64 * RW * 2;
  host_pool.pages = ENGINE_PAGES;
  host_rows = (uint16_t *)xcalloc(pool_bytes / 2, 2);
  dev_rows = (uint16_t *)xcalloc(pool_bytes / 2, 2);
  host_pool.base = host_rows;

  load_driver();
  CU(cu.init(0));
  CU(cu.device_get(&dev, 0));
  CU(cu.primary_ctx_retain(&ctx, dev));
  CU(cu.ctx_set_current(ctx));
  CU(cu.stream_create(&stream, 1 /* CU_STREAM_NON_BLOCKING */));
  CU(cu.mem_alloc(&pool_dev, pool_bytes));
  CU(cu.htod(pool_dev, dev_rows, pool_bytes)); /* zero */
  dev_pool = host_pool;
  dev_pool.base = (void *)pool_dev;

  /* every token of both sequences, on the CPU and on the GPU */
  for (b = 0; b < BATCH; b++) {
    size_t n = lens[b];
    slots = (int32_t *)xcalloc(n, sizeof(int32_t));
    for (t = 0; t < n; t++) slots[t] = pages[b][t / 64] * 64 + (int32_t)(t % 64);
    CHECK_OK(tpla_context_append_paged(cpu_ctx, 0, &host_pool, slots, n, latents[b], n * DC,
                                       keys[b], n * DR, TPLA_RMS_MODE_EXACT, &faults));
    CU(cu.mem_alloc(&slots_dev, n * sizeof(int32_t)));
    CU(cu.mem_alloc(&lat_dev, n * DC * sizeof(float)));
    CU(cu.mem_alloc(&kr_dev, n * DR * sizeof(float)));
    CU(cu.htod(slots_dev, slots, n * sizeof(int32_t)));
    CU(cu.htod(lat_dev, latents[b], n * DC * sizeof(float)));
    CU(cu.htod(kr_dev, keys[b], n * DR * sizeof(float)));
    CU(cu.ctx_sync());
    CHECK_OK(tpla_device_engine_append(engine, 0, &dev_pool, (const int32_t *)slots_dev, n,
                                       (const void *)lat_dev, (const void *)kr_dev,
                                       TPLA_DTYPE_F32, TPLA_RMS_MODE_EXACT, NULL, stream));
    CU(cu.stream_sync(stream));
    CU(cu.mem_free(slots_dev));
    CU(cu.mem_free(lat_dev));
    CU(cu.mem_free(kr_dev));
    free(slots);
  }
  CHECK(faults == 0);
  CU(cu.dtoh(dev_rows, pool_dev, pool_bytes));
  for (j = 0; j < pool_bytes / 2; j++)
    if (dev_rows[j] != host_rows[j]) {
      differ++;
      CHECK(abs((int)dev_rows[j] - (int)host_rows[j]) == 1);
    }
  printf("cuda: device engine appends: %zu of %zu values one bf16 unit from the CPU's\n",
         differ, pool_bytes / 2);
  CHECK(differ * 1000 <= pool_bytes / 2);
  CU(cu.htod(pool_dev, host_rows, pool_bytes)); /* decode the CPU's rows on both sides */

  /* the CPU engine decode */
  for (b = 0; b < BATCH; b++) seq_lens[b] = (int32_t)lens[b];
  memcpy(table, pages, sizeof table);
  CHECK_OK(tpla_context_decode_plan_size(cpu_ctx, BATCH, &words));
  plan = (int32_t *)xcalloc(words, sizeof(int32_t));
  CHECK_OK(tpla_context_decode_plan(cpu_ctx, seq_lens, BATCH, plan, words));
  want = (float *)xcalloc(n_out, sizeof(float));
  got = (float *)xcalloc(n_out, sizeof(float));
  want_lse = (float *)xcalloc(BATCH * H, sizeof(float));
  got_lse = (float *)xcalloc(BATCH * H, sizeof(float));
  memset(&pa, 0, sizeof pa);
  pa.struct_size = sizeof pa;
  pa.query_kind = TPLA_QUERY_KIND_LATENT;
  pa.output_kind = TPLA_OUTPUT_KIND_LATENT;
  pa.output_dtype = TPLA_DTYPE_F32;
  pa.cache = &host_pool;
  pa.block_table = table;
  pa.batch = BATCH;
  pa.block_table_width = ENGINE_WIDTH;
  pa.seq_lens = seq_lens;
  pa.plan = plan;
  pa.plan_count = words;
  pa.queries = q_lat;
  pa.queries_count = n_out;
  pa.q_rope = qr;
  pa.q_rope_count = BATCH * H * DR;
  pa.out = want;
  pa.out_count = n_out;
  pa.lse = want_lse;
  pa.lse_count = BATCH * H;
  CHECK_OK(tpla_context_decode_paged(cpu_ctx, &pa));

  /* the device engine decode: scaled query rows, a planned workspace, the engine's stream */
  CHECK_OK(tpla_device_engine_query_scales(engine, 0, &lat_scale, &rope_scale));
  rows = (float *)xcalloc(BATCH * H * RW, sizeof(float));
  for (b = 0; b < BATCH; b++)
    for (h = 0; h < H; h++) {
      float *row = rows + (b * H + h) * RW;
      for (j = 0; j < W; j++) row[j] = lat_scale * q_lat[(b * H + h) * W + j];
      for (j = 0; j < DR; j++) row[W + j] = rope_scale * qr[(b * H + h) * DR + j];
    }
  CHECK_OK(tpla_device_engine_workspace_size(engine, BATCH, ENGINE_WIDTH, &ws_bytes));
  CU(cu.mem_alloc(&ws_dev, ws_bytes));
  CU(cu.mem_alloc(&table_dev, sizeof table));
  CU(cu.mem_alloc(&lens_dev, sizeof seq_lens));
  CU(cu.mem_alloc(&q_dev, BATCH * H * RW * sizeof(float)));
  CU(cu.mem_alloc(&out_dev, n_out * sizeof(float)));
  CU(cu.mem_alloc(&lse_dev, BATCH * H * sizeof(float)));
  CU(cu.mem_alloc(&faults_dev, sizeof faults));
  CU(cu.htod(table_dev, table, sizeof table));
  CU(cu.htod(lens_dev, seq_lens, sizeof seq_lens));
  CU(cu.htod(q_dev, rows, BATCH * H * RW * sizeof(float)));
  CU(cu.htod(faults_dev, &faults, sizeof faults));
  for (j = 0; j < n_out; j++) got[j] = NAN;
  CU(cu.htod(out_dev, got, n_out * sizeof(float)));
  CU(cu.ctx_sync());
  CHECK_OK(tpla_device_engine_plan(engine, (const int32_t *)lens_dev, BATCH, ENGINE_WIDTH,
                                   (void *)ws_dev, ws_bytes, stream));
  memset(&da, 0, sizeof da);
  da.struct_size = sizeof da;
  da.cache = &dev_pool;
  da.block_table = (const int32_t *)table_dev;
  da.batch = BATCH;
  da.block_table_width = ENGINE_WIDTH;
  da.seq_lens = (const int32_t *)lens_dev;
  da.workspace = (void *)ws_dev;
  da.workspace_bytes = ws_bytes;
  da.queries = (const float *)q_dev;
  da.out = (float *)out_dev;
  da.lse = (float *)lse_dev;
  da.faults = (uint32_t *)faults_dev;
  da.stream = stream;
  CHECK_OK(tpla_device_engine_decode(engine, &da));
  CU(cu.stream_sync(stream));
  CU(cu.dtoh(got, out_dev, n_out * sizeof(float)));
  CU(cu.dtoh(got_lse, lse_dev, BATCH * H * sizeof(float)));
  CU(cu.dtoh(&faults, faults_dev, sizeof faults));
  e = rel_l2(got, want, n_out);
  e_lse = rel_l2(got_lse, want_lse, BATCH * H);
  printf("cuda: device engine decode: rel. L2 vs CPU: latent %.2e, lse %.2e\n", e, e_lse);
  CHECK(e < 1e-2 && e_lse < 1e-3 && faults == 0);

  /* the partial head outputs, f32 and bf16: a batch this small is one cuBLAS product,
   * the same as the f32 call's, so the bf16 outputs are its outputs rounded */
  {
    size_t n_heads = BATCH * H * info.dims.d_v;
    CUdeviceptr heads_dev, heads16_dev;
    float *heads = (float *)xcalloc(n_heads, sizeof(float));
    uint16_t *heads16 = (uint16_t *)xcalloc(n_heads, sizeof(uint16_t));
    CU(cu.mem_alloc(&heads_dev, n_heads * sizeof(float)));
    CU(cu.mem_alloc(&heads16_dev, n_heads * sizeof(uint16_t)));
    CHECK_OK(tpla_device_engine_project(engine, 0, BATCH, (const float *)out_dev,
                                        (float *)heads_dev, stream));
    CHECK_OK(tpla_device_engine_project_for(engine, 0, BATCH, (const float *)out_dev,
                                            (void *)heads16_dev, TPLA_DTYPE_BF16, stream));
    CU(cu.stream_sync(stream));
    CU(cu.dtoh(heads, heads_dev, n_heads * sizeof(float)));
    CU(cu.dtoh(heads16, heads16_dev, n_heads * sizeof(uint16_t)));
    for (j = 0; j < n_heads; j++) CHECK(heads16[j] == bf16_of(heads[j]));
    CHECK(tpla_device_engine_project_for(engine, 0, BATCH, (const float *)out_dev,
                                         (void *)heads16_dev, 99, stream) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    s = tpla_device_engine_project_for(engine, 0, BATCH, (const float *)out_dev,
                                       (void *)heads16_dev, TPLA_DTYPE_F16, stream);
    printf("cuda: f16 head outputs: %s: %s\n", tpla_status_str(s), tpla_last_error_message());
    CHECK(s == TPLA_STATUS_UNSUPPORTED);
    CHECK(tpla_device_engine_project_for(engine, 0, BATCH, (const float *)out_dev,
                                         (void *)(heads16_dev + 1), TPLA_DTYPE_BF16,
                                         stream) == TPLA_STATUS_INVALID_ARGUMENT);
    CHECK(tpla_device_engine_project_for(engine, 0, BATCH, (const float *)out_dev,
                                         (void *)out_dev, TPLA_DTYPE_BF16, stream) ==
          TPLA_STATUS_INVALID_ARGUMENT); /* overlaps the latents */
    CU(cu.mem_free(heads_dev));
    CU(cu.mem_free(heads16_dev));
    free(heads);
    free(heads16);
  }

  /* bad device arguments */
  {
    tpla_device_decode_args bad = da;
    tpla_paged_cache padded = dev_pool;
    /* a padded page stride (a multiple of 16 bytes) is served; one that is not, refused */
    padded.page_stride += 64;
    padded.pages -= 1;
    bad.cache = &padded;
    CHECK_OK(tpla_device_engine_decode(engine, &bad));
    CU(cu.stream_sync(stream));
    padded.page_stride += 8;
    s = tpla_device_engine_decode(engine, &bad);
    printf("cuda: page stride not a multiple of 16: %s: %s\n", tpla_status_str(s),
           tpla_last_error_message());
    CHECK(s == TPLA_STATUS_INVALID_ARGUMENT);
    bad = da;
    bad.workspace = NULL;
    CHECK(tpla_device_engine_decode(engine, &bad) == TPLA_STATUS_NULL_ARGUMENT);
    bad = da;
    bad.workspace_bytes = ws_bytes - 16;
    CHECK(tpla_device_engine_decode(engine, &bad) == TPLA_STATUS_INVALID_ARGUMENT);
    bad = da;
    bad.queries = rows; /* host memory */
    s = tpla_device_engine_decode(engine, &bad);
    CHECK(s == TPLA_STATUS_INVALID_ARGUMENT || s == TPLA_STATUS_MISMATCH);
    bad = da;
    bad.out = (float *)q_dev; /* overlaps the queries */
    CHECK(tpla_device_engine_decode(engine, &bad) == TPLA_STATUS_INVALID_ARGUMENT);
    bad = da;
    bad.struct_size -= 1;
    CHECK(tpla_device_engine_decode(engine, &bad) == TPLA_STATUS_WRONG_STRUCT_SIZE);
    CHECK(tpla_device_engine_plan(engine, (const int32_t *)lens_dev, 0, ENGINE_WIDTH,
                                  (void *)ws_dev, ws_bytes, stream) ==
          TPLA_STATUS_INVALID_ARGUMENT);
    CHECK(tpla_device_engine_append(engine, 0, &dev_pool, NULL, 1, (const void *)q_dev,
                                    (const void *)q_dev, TPLA_DTYPE_F32, TPLA_RMS_MODE_EXACT,
                                    NULL, stream) == TPLA_STATUS_NULL_ARGUMENT);
    CHECK(tpla_device_engine_append(engine, 0, &dev_pool, (const int32_t *)lens_dev, 1,
                                    (const void *)q_dev, (const void *)q_dev, TPLA_DTYPE_F16,
                                    TPLA_RMS_MODE_EXACT, NULL,
                                    stream) == TPLA_STATUS_UNSUPPORTED);
  }

  CU(cu.mem_free(pool_dev));
  CU(cu.mem_free(ws_dev));
  CU(cu.mem_free(table_dev));
  CU(cu.mem_free(lens_dev));
  CU(cu.mem_free(q_dev));
  CU(cu.mem_free(out_dev));
  CU(cu.mem_free(lse_dev));
  CU(cu.mem_free(faults_dev));
  tpla_device_engine_destroy(engine);
  CU(cu.stream_destroy(stream));
  CU(cu.primary_ctx_release(dev));
  free(host_rows);
  free(dev_rows);
  free(plan);
  free(rows);
  free(want);
  free(got);
  free(want_lse);
  free(got_lse);
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
    CHECK(!required("TPLA_TEST_REQUIRE_GPU"));
    unsupported_paths(&o);
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

  {
    /* the last step's queries, absorbed on the host (what an engine does on the GPU) */
    float *q_lat = (float *)xcalloc(BATCH * H * W, sizeof(float));
    float *qr = (float *)xcalloc(BATCH * H * d.d_r, sizeof(float));
    size_t h, j, n;
    for (b = 0; b < BATCH; b++) {
      size_t t = tokens - b * 100 - 1;
      for (h = 0; h < H; h++)
        for (j = 0; j < W; j++) {
          float acc = 0.0f;
          for (n = 0; n < d.d_n; n++)
            acc += w_uk[(h * W + j) * d.d_n + n] * q_nope[b][(t * H + h) * d.d_n + n];
          q_lat[(b * H + h) * W + j] = acc;
        }
      memcpy(qr + b * H * d.d_r, q_rope[b] + t * H * d.d_r, H * d.d_r * sizeof(float));
    }
    device_rank_paths(cpu_ctx, cache, seqs, q_lat, qr);
    {
      const size_t lens[BATCH] = {tokens, tokens - 100};
      device_engine_paths(cpu_ctx, latents, keys, lens, q_lat, qr);
    }
    free(q_lat);
    free(qr);
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

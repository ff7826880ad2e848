/* threads.c: separate contexts and caches used from several threads at once give the
 * same bits as the same work done on one thread; each thread's error message is its own;
 * a synthetic layer and a transform are shared read-only by all threads.
 */
#define _POSIX_C_SOURCE 200112L
#include <pthread.h>

#include "check.h"

#define THREADS 4
#define LEN 48
#define STEPS 4

enum { H = TEST_HEADS, OUT = TEST_HEADS * TEST_DV };

static tpla_synthetic *synthetic;
static tpla_transform *transform;
static float *mla_uk, *mla_uv, *mla_gamma;
static float *latents, *keys, *q_nope, *q_rope;
static pthread_barrier_t barrier;

struct job {
  int index;
  uint32_t rank;
  float outputs[STEPS][OUT];
  int failed;
};

/* One rank's whole life: context, weights, cache filled by appends, decode steps. */
static void run(struct job *job, int concurrent) {
  const tpla_dims d = test_dims();
  tpla_context_options o;
  tpla_backend_options b;
  tpla_cache_options co;
  tpla_layer_weights lw;
  tpla_mla_weights mw;
  tpla_decode_args a;
  tpla_context *ctx;
  tpla_cache *cache;
  const uint32_t seq = 7;
  const size_t w = TEST_DC / 2;
  float *w_uk = (float *)xcalloc(H * w * TEST_DN, sizeof(float));
  float *w_uv = (float *)xcalloc(H * w * TEST_DV, sizeof(float));
  char want[64];
  size_t t;
  int step;

  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = d;
  o.plan.ranks = 2;
  o.plan.groups = 2;
  o.plan.rank = job->rank;
  o.layers = 1;
  b = backend_options(TPLA_BACKEND_CPU, 1 + (uint32_t)(job->index % 2));
  CHECK_OK(tpla_context_create(&o, &b, &ctx));
  memset(&mw, 0, sizeof mw);
  mw.struct_size = sizeof mw;
  mw.w_uk = mla_uk;
  mw.w_uk_count = H * TEST_DC * TEST_DN;
  mw.w_uv = mla_uv;
  mw.w_uv_count = H * TEST_DC * TEST_DV;
  mw.gamma = mla_gamma;
  mw.gamma_count = TEST_DC;
  CHECK_OK(tpla_fold_layer(d, o.plan, &mw, transform, w_uk, H * w * TEST_DN, w_uv,
                           H * w * TEST_DV));
  memset(&lw, 0, sizeof lw);
  lw.struct_size = sizeof lw;
  lw.w_uk = w_uk;
  lw.w_uk_count = H * w * TEST_DN;
  lw.w_uv = w_uv;
  lw.w_uv_count = H * w * TEST_DV;
  lw.mu = 1.0;
  lw.slice_fraction = 0.5;
  lw.transform = transform;
  CHECK_OK(tpla_context_set_layer(ctx, 0, &lw));
  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_BF16;
  co.page_size = 16;
  co.capacity_pages = 8;
  CHECK_OK(tpla_cache_create(ctx, &co, &cache));
  CHECK_OK(tpla_cache_add_sequence(cache, seq));
  for (t = 0; t + STEPS < LEN; t++)
    CHECK_OK(tpla_context_append_token(ctx, cache, seq, 0, latents + t * TEST_DC, TEST_DC,
                                       keys + t * TEST_DR, TEST_DR, TPLA_RMS_MODE_EXACT));

  /* A failure whose message names this thread, made while the others make theirs. */
  if (concurrent) pthread_barrier_wait(&barrier);
  CHECK(tpla_cache_add_sequence(cache, seq) == TPLA_STATUS_INVALID_ARGUMENT);
  CHECK(tpla_cache_free_sequence(cache, 1000 + (uint32_t)job->index) == TPLA_STATUS_OUT_OF_RANGE);
  if (concurrent) pthread_barrier_wait(&barrier);
  sprintf(want, "sequence %d is not in the cache", 1000 + job->index);
  if (strcmp(tpla_last_error_message(), want) != 0) {
    fprintf(stderr, "thread %d: last error \"%s\", expected \"%s\"\n", job->index,
            tpla_last_error_message(), want);
    job->failed = 1;
  }

  for (step = 0; step < STEPS; step++) {
    t = LEN - STEPS + (size_t)step;
    CHECK_OK(tpla_context_append_token(ctx, cache, seq, 0, latents + t * TEST_DC, TEST_DC,
                                       keys + t * TEST_DR, TEST_DR, TPLA_RMS_MODE_EXACT));
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.query_kind = TPLA_QUERY_KIND_NOPE;
    a.output_kind = TPLA_OUTPUT_KIND_HEADS;
    a.seq_ids = &seq;
    a.batch = 1;
    a.queries = q_nope + t * H * TEST_DN;
    a.queries_count = H * TEST_DN;
    a.q_rope = q_rope + t * H * TEST_DR;
    a.q_rope_count = H * TEST_DR;
    a.out = job->outputs[step];
    a.out_count = OUT;
    CHECK_OK(tpla_context_decode(ctx, cache, &a));
  }
  tpla_cache_destroy(cache);
  tpla_context_destroy(ctx);
  free(w_uk);
  free(w_uv);
}

static void *thread_main(void *arg) {
  run((struct job *)arg, 1);
  return NULL;
}

int main(void) {
  const tpla_dims d = test_dims();
  tpla_transform_desc td;
  struct job *sequential = (struct job *)xcalloc(THREADS, sizeof(struct job));
  struct job *concurrent = (struct job *)xcalloc(THREADS, sizeof(struct job));
  pthread_t threads[THREADS];
  int i, failed = 0;

  CHECK_OK(tpla_synthetic_create(d, 21, &synthetic));
  mla_uk = (float *)xcalloc(H * TEST_DC * TEST_DN, sizeof(float));
  mla_uv = (float *)xcalloc(H * TEST_DC * TEST_DV, sizeof(float));
  mla_gamma = (float *)xcalloc(TEST_DC, sizeof(float));
  CHECK_OK(tpla_synthetic_weights(synthetic, mla_uk, H * TEST_DC * TEST_DN, mla_uv,
                                  H * TEST_DC * TEST_DV, mla_gamma, TEST_DC));
  latents = (float *)xcalloc(LEN * TEST_DC, sizeof(float));
  keys = (float *)xcalloc(LEN * TEST_DR, sizeof(float));
  q_nope = (float *)xcalloc(LEN * H * TEST_DN, sizeof(float));
  q_rope = (float *)xcalloc(LEN * H * TEST_DR, sizeof(float));
  CHECK_OK(tpla_synthetic_sequence(synthetic, 5, LEN, latents, LEN * TEST_DC, keys,
                                   LEN * TEST_DR, q_nope, LEN * H * TEST_DN, q_rope,
                                   LEN * H * TEST_DR));
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
  td.d_c = TEST_DC;
  td.seed = 3;
  CHECK_OK(tpla_transform_create(&td, &transform));

  for (i = 0; i < THREADS; i++) {
    sequential[i].index = concurrent[i].index = i;
    sequential[i].rank = concurrent[i].rank = (uint32_t)(i % 2);
    run(&sequential[i], 0);
  }
  CHECK(pthread_barrier_init(&barrier, NULL, THREADS) == 0);
  for (i = 0; i < THREADS; i++)
    CHECK(pthread_create(&threads[i], NULL, thread_main, &concurrent[i]) == 0);
  for (i = 0; i < THREADS; i++) CHECK(pthread_join(threads[i], NULL) == 0);
  CHECK(pthread_barrier_destroy(&barrier) == 0);

  for (i = 0; i < THREADS; i++) {
    if (concurrent[i].failed || sequential[i].failed) failed = 1;
    if (memcmp(concurrent[i].outputs, sequential[i].outputs, sizeof concurrent[i].outputs) != 0) {
      fprintf(stderr, "thread %d: outputs differ from the sequential run\n", i);
      failed = 1;
    }
  }
  /* the two ranks really computed different partial outputs */
  CHECK(memcmp(sequential[0].outputs, sequential[1].outputs, sizeof sequential[0].outputs) != 0);

  tpla_transform_destroy(transform);
  tpla_synthetic_destroy(synthetic);
  free(mla_uk);
  free(mla_uv);
  free(mla_gamma);
  free(latents);
  free(keys);
  free(q_nope);
  free(q_rope);
  free(sequential);
  free(concurrent);
  if (failed) return 1;
  printf("threads: %d threads agree with the sequential run\n", THREADS);
  return 0;
}

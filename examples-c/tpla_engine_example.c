/* tpla_engine_example.c: libtpla called from an engine that owns its paged KV cache.
 *
 * Two TPLA ranks (g = 2 latent groups, every head on each) of a DeepSeek-V2-Lite-shaped
 * layer in one process; synthetic weights and tokens stand in for a checkpoint and the
 * model's projections. Each rank's KV memory is the engine's: a pool of pages with a
 * block allocator, a block table per sequence; libtpla keeps no cache state.
 *  - Sequence A was prefilled on another node, which exported one shard file per rank
 *    (into a temporary directory); each rank copies its shard's rows into its own pages
 *    (tpla_context_import_sequence), then the files are removed.
 *  - Sequence B is prefilled here: its prompt's pre-norm latents are written into the
 *    pages with one batched tpla_context_append_paged per rank.
 * Every decode step then plans once for the batch (tpla_context_decode_plan) and, per
 * layer (one here), appends the new tokens at their slots, decodes in place
 * (tpla_context_decode_paged), sums the ranks' partial outputs (the all-reduce) and
 * compares with exact MLA.
 *
 * Build (after `cargo build --release`):
 *   cc -std=c99 -O2 examples-c/tpla_engine_example.c -Iinclude -Ltarget/release -ltpla \
 *      -lm -lpthread -ldl -o tpla_engine_example
 * Run: LD_LIBRARY_PATH=target/release ./tpla_engine_example [TMPDIR]
 *      (the shard files go to a fresh directory under TMPDIR, default /tmp, removed at
 *      the end)
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tpla.h"

#define RANKS 2
#define BATCH 2
#define PAGE 64          /* the engine's page size, in tokens */
#define POOL_PAGES 40    /* pages of each rank's pool */
#define TABLE_WIDTH 16   /* block table width: up to 1024 tokens per sequence */
#define STEPS 3

static const size_t PROMPT[BATCH] = {700, 300}; /* A (imported), B (prefilled here) */
static const uint32_t SEQ_ID[BATCH] = {7, 8};

#define TRY(call)                                                                   \
  do {                                                                              \
    tpla_status status_ = (call);                                                   \
    if (status_ != TPLA_STATUS_OK) {                                                \
      fprintf(stderr, "%s failed: %s: %s\n", #call, tpla_status_str(status_),        \
              tpla_last_error_message());                                            \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

static void *zeroed(size_t n, size_t size) {
  void *p = calloc(n, size);
  if (p == NULL) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  return p;
}

/* The engine's bookkeeping: a free list of pages, and per sequence its block table row
 * and length (the same on both ranks: each rank's pool has the same page numbering). */
static int32_t free_list[POOL_PAGES];
static size_t free_count;
static int32_t block_table[BATCH * TABLE_WIDTH];
static int32_t seq_lens[BATCH];

static int32_t slot_of(size_t b, size_t t) {
  if (t % PAGE == 0 && block_table[b * TABLE_WIDTH + t / PAGE] < 0) {
    if (free_count == 0 || t / PAGE >= TABLE_WIDTH) {
      fprintf(stderr, "the engine's pool is full\n");
      exit(1);
    }
    block_table[b * TABLE_WIDTH + t / PAGE] = free_list[--free_count];
  }
  return block_table[b * TABLE_WIDTH + t / PAGE] * PAGE + (int32_t)(t % PAGE);
}

int main(int argc, char **argv) {
  const char *tmp = argc > 1 ? argv[1] : "/tmp";
  char dir[4096], paths[RANKS][4096 + 64];
  tpla_dims d;
  tpla_synthetic *model;
  tpla_mla_weights mla;
  tpla_transform *pca;
  tpla_context *ctx[RANKS];
  tpla_paged_cache pool[RANKS];
  float *latents[BATCH], *k_rope[BATCH], *q_nope[BATCH], *q_rope[BATCH];
  size_t H, b, r, i, step, total[BATCH], plan_words;
  int32_t *plan;

  if (tpla_abi_version() != TPLA_ABI_VERSION) {
    fprintf(stderr, "tpla.h and libtpla disagree on the ABI version\n");
    return 1;
  }
  sprintf(dir, "%.4000s/tpla_engine_example.XXXXXX", tmp);
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }

  /* The model and the tokens (an engine has these from its checkpoint and forward pass):
   * per sequence the pre-norm latents a_t, RoPE keys and queries of every position. */
  TRY(tpla_dims_preset("deepseek-v2-lite", &d));
  H = d.heads;
  TRY(tpla_synthetic_create(d, 1, &model));
  memset(&mla, 0, sizeof mla);
  mla.struct_size = sizeof mla;
  mla.w_uk_count = H * d.d_c * d.d_n;
  mla.w_uv_count = H * d.d_c * d.d_v;
  mla.gamma_count = d.d_c;
  mla.w_uk = (float *)zeroed(mla.w_uk_count, sizeof(float));
  mla.w_uv = (float *)zeroed(mla.w_uv_count, sizeof(float));
  mla.gamma = (float *)zeroed(mla.gamma_count, sizeof(float));
  TRY(tpla_synthetic_weights(model, (float *)mla.w_uk, mla.w_uk_count, (float *)mla.w_uv,
                             mla.w_uv_count, (float *)mla.gamma, mla.gamma_count));
  for (b = 0; b < BATCH; b++) {
    size_t n = total[b] = PROMPT[b] + STEPS;
    latents[b] = (float *)zeroed(n * d.d_c, sizeof(float));
    k_rope[b] = (float *)zeroed(n * d.d_r, sizeof(float));
    q_nope[b] = (float *)zeroed(n * H * d.d_n, sizeof(float));
    q_rope[b] = (float *)zeroed(n * H * d.d_r, sizeof(float));
    TRY(tpla_synthetic_sequence(model, 20 + b, n, latents[b], n * d.d_c, k_rope[b],
                                n * d.d_r, q_nope[b], n * H * d.d_n, q_rope[b],
                                n * H * d.d_r));
  }
  { /* the rotation U: PCA of calibration latents, largest components on rank 0 */
    const size_t n = 2048;
    float *cal = (float *)zeroed(n * d.d_c, sizeof(float));
    float *cal_keys = (float *)zeroed(n * d.d_r, sizeof(float));
    TRY(tpla_synthetic_sequence(model, 99, n, cal, n * d.d_c, cal_keys, n * d.d_r, NULL, 0,
                                NULL, 0));
    free(cal_keys);
    TRY(tpla_transform_pca(d.d_c, cal, n * d.d_c, TPLA_SLICE_LAYOUT_CONTIGUOUS, RANKS, &pca));
    free(cal);
  }

  /* The prefill node's export of sequence A: one shard file per rank. */
  {
    const tpla_transform *transforms[1];
    const uint32_t ids[1] = {SEQ_ID[0]};
    const uint64_t lens[1] = {PROMPT[0]};
    const char *path_list[RANKS];
    tpla_export_options eo;
    tpla_export *exp;
    transforms[0] = pca;
    for (r = 0; r < RANKS; r++) {
      sprintf(paths[r], "%s/rank%u.shard", dir, (unsigned)r);
      path_list[r] = paths[r];
    }
    memset(&eo, 0, sizeof eo);
    eo.struct_size = sizeof eo;
    eo.dims = d;
    eo.groups = RANKS;
    eo.dtype = TPLA_DTYPE_BF16;
    eo.page_size = TPLA_DEFAULT_PAGE_SIZE;
    eo.transforms = transforms;
    eo.layers = 1;
    eo.seq_ids = ids;
    eo.seq_lens = lens;
    eo.sequences = 1;
    eo.paths = path_list;
    eo.path_count = RANKS;
    TRY(tpla_export_create(&eo, &exp));
    TRY(tpla_export_push(exp, latents[0], PROMPT[0] * d.d_c, k_rope[0], PROMPT[0] * d.d_r));
    TRY(tpla_export_finish(exp));
    tpla_export_destroy(exp);
  }

  /* The engine's allocator: pages handed out in a scrambled order, as after churn. */
  for (i = 0; i < POOL_PAGES; i++) free_list[i] = (int32_t)((i * 17) % POOL_PAGES);
  free_count = POOL_PAGES;
  for (i = 0; i < BATCH * TABLE_WIDTH; i++) block_table[i] = -1;

  /* Each rank: its context (weights of every layer) and the engine's pool for it. */
  for (r = 0; r < RANKS; r++) {
    tpla_context_options o;
    tpla_backend_options backend;
    tpla_context_info info;
    tpla_layer_weights lw;
    float *w_uk, *w_uv;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.dims = d;
    o.plan.ranks = RANKS;
    o.plan.groups = RANKS;
    o.plan.rank = (uint32_t)r;
    o.layers = 1;
    memset(&backend, 0, sizeof backend);
    backend.struct_size = sizeof backend;
    backend.kind = TPLA_BACKEND_CPU;
    backend.threads = 2;
    TRY(tpla_context_create(&o, &backend, &ctx[r]));
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    TRY(tpla_context_get_info(ctx[r], &info));
    w_uk = (float *)zeroed((size_t)info.heads * info.slice_width * d.d_n, sizeof(float));
    w_uv = (float *)zeroed((size_t)info.heads * info.slice_width * d.d_v, sizeof(float));
    TRY(tpla_fold_layer(d, o.plan, &mla, pca, w_uk, (size_t)info.heads * info.slice_width * d.d_n,
                        w_uv, (size_t)info.heads * info.slice_width * d.d_v));
    memset(&lw, 0, sizeof lw);
    lw.struct_size = sizeof lw;
    lw.w_uk = w_uk;
    lw.w_uk_count = (size_t)info.heads * info.slice_width * d.d_n;
    lw.w_uv = w_uv;
    lw.w_uv_count = (size_t)info.heads * info.slice_width * d.d_v;
    lw.mu = 1.0;
    lw.slice_fraction = 1.0 / RANKS;
    lw.transform = pca;
    TRY(tpla_context_set_layer(ctx[r], 0, &lw));
    free(w_uk);
    free(w_uv);
    TRY(tpla_context_reserve(ctx[r], BATCH)); /* steps after the first allocate nothing */

    memset(&pool[r], 0, sizeof pool[r]);
    pool[r].struct_size = sizeof pool[r];
    pool[r].dtype = TPLA_DTYPE_BF16;
    pool[r].row_width = info.row_width; /* latent slice, then the RoPE key */
    pool[r].page_size = PAGE;
    pool[r].page_stride = (size_t)PAGE * info.row_width * 2;
    pool[r].pages = POOL_PAGES;
    pool[r].base = zeroed(POOL_PAGES, pool[r].page_stride);
    printf("rank %u: %u values per cached token (MLA: %u), pool of %u pages of %u tokens\n",
           (unsigned)r, info.row_width, d.d_c + d.d_r, POOL_PAGES, PAGE);
  }

  /* Sequence A: the shard's rows go into the engine's pages; then the shard is dropped.
   * Sequence B: its prompt is written by one batched append per rank. */
  {
    int32_t *slots = (int32_t *)zeroed(PROMPT[0] > PROMPT[1] ? PROMPT[0] : PROMPT[1], sizeof(int32_t));
    for (r = 0; r < RANKS; r++) {
      tpla_cache *shard;
      tpla_cache_options co;
      size_t registered;
      uint32_t faults = 0;
      memset(&co, 0, sizeof co);
      co.struct_size = sizeof co;
      co.dtype = TPLA_DTYPE_BF16;
      co.page_size = TPLA_DEFAULT_PAGE_SIZE;
      co.capacity_pages = 0;
      TRY(tpla_cache_create(ctx[r], &co, &shard));
      TRY(tpla_cache_register_file(shard, paths[r], &registered));
      for (i = 0; i < PROMPT[0]; i++) slots[i] = slot_of(0, i);
      TRY(tpla_context_import_sequence(ctx[r], shard, SEQ_ID[0], 0, &pool[r], slots, PROMPT[0],
                                       &faults));
      tpla_cache_destroy(shard);
      if (remove(paths[r]) != 0) perror("remove");
      for (i = 0; i < PROMPT[1]; i++) slots[i] = slot_of(1, i);
      TRY(tpla_context_append_paged(ctx[r], 0, &pool[r], slots, PROMPT[1], latents[1],
                                    PROMPT[1] * d.d_c, k_rope[1], PROMPT[1] * d.d_r,
                                    TPLA_RMS_MODE_EXACT, &faults));
      if (faults != 0) {
        fprintf(stderr, "prefill faults %u\n", faults);
        return 1;
      }
    }
    free(slots);
  }
  if (rmdir(dir) != 0) perror("rmdir");
  for (b = 0; b < BATCH; b++) seq_lens[b] = (int32_t)PROMPT[b];

  TRY(tpla_context_decode_plan_size(ctx[0], BATCH, &plan_words));
  plan = (int32_t *)zeroed(plan_words, sizeof(int32_t));
  for (step = 0; step < STEPS; step++) {
    float *new_latents = (float *)zeroed(BATCH * d.d_c, sizeof(float));
    float *new_keys = (float *)zeroed(BATCH * d.d_r, sizeof(float));
    float *qn = (float *)zeroed(BATCH * H * d.d_n, sizeof(float));
    float *qr = (float *)zeroed(BATCH * H * d.d_r, sizeof(float));
    float *out[RANKS], *exact = (float *)zeroed(H * d.d_v, sizeof(float));
    int32_t slots[BATCH];
    uint32_t faults = 0;

    /* the step's new tokens: one per sequence, at the next slot */
    for (b = 0; b < BATCH; b++) {
      size_t t = (size_t)seq_lens[b];
      slots[b] = slot_of(b, t);
      memcpy(new_latents + b * d.d_c, latents[b] + t * d.d_c, d.d_c * sizeof(float));
      memcpy(new_keys + b * d.d_r, k_rope[b] + t * d.d_r, d.d_r * sizeof(float));
      memcpy(qn + b * H * d.d_n, q_nope[b] + t * H * d.d_n, H * d.d_n * sizeof(float));
      memcpy(qr + b * H * d.d_r, q_rope[b] + t * H * d.d_r, H * d.d_r * sizeof(float));
      seq_lens[b]++;
    }
    /* plan once per step (every layer reuses it); both ranks have the same backend */
    TRY(tpla_context_decode_plan(ctx[0], seq_lens, BATCH, plan, plan_words));
    for (r = 0; r < RANKS; r++) { /* per layer: append, decode */
      tpla_paged_decode_args a;
      TRY(tpla_context_append_paged(ctx[r], 0, &pool[r], slots, BATCH, new_latents,
                                    BATCH * d.d_c, new_keys, BATCH * d.d_r,
                                    TPLA_RMS_MODE_EXACT, &faults));
      out[r] = (float *)zeroed(BATCH * H * d.d_v, sizeof(float));
      memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.layer = 0;
      a.query_kind = TPLA_QUERY_KIND_NOPE;
      a.output_kind = TPLA_OUTPUT_KIND_HEADS;
      a.output_dtype = TPLA_DTYPE_F32;
      a.cache = &pool[r];
      a.block_table = block_table;
      a.batch = BATCH;
      a.block_table_width = TABLE_WIDTH;
      a.seq_lens = seq_lens;
      a.plan = plan;
      a.plan_count = plan_words;
      a.queries = qn;
      a.queries_count = BATCH * H * d.d_n;
      a.q_rope = qr;
      a.q_rope_count = BATCH * H * d.d_r;
      a.out = out[r];
      a.out_count = BATCH * H * d.d_v;
      a.faults = &faults;
      TRY(tpla_context_decode_paged(ctx[r], &a));
    }
    if (faults != 0) {
      fprintf(stderr, "step %u: fault bits %u\n", (unsigned)step, faults);
      return 1;
    }
    /* the all-reduce of the ranks' partial head outputs */
    TRY(tpla_all_reduce_in_process(out, RANKS, BATCH * H * d.d_v));

    for (b = 0; b < BATCH; b++) { /* against exact MLA over the same tokens (f64) */
      size_t t = (size_t)seq_lens[b] - 1;
      double err = 0.0, norm = 0.0;
      TRY(tpla_mla_reference(d, &mla, latents[b], (t + 1) * d.d_c, k_rope[b], (t + 1) * d.d_r,
                             q_nope[b] + t * H * d.d_n, H * d.d_n, q_rope[b] + t * H * d.d_r,
                             H * d.d_r, exact, H * d.d_v));
      for (i = 0; i < H * d.d_v; i++) {
        double e = (double)out[0][b * H * d.d_v + i] - (double)exact[i];
        err += e * e;
        norm += (double)exact[i] * exact[i];
      }
      err = sqrt(err / norm);
      printf("step %u, sequence %u (context %u): |TPLA - MLA| / |MLA| = %.4f\n",
             (unsigned)step, (unsigned)SEQ_ID[b], (unsigned)(t + 1), err);
      if (!isfinite(err)) return 1;
    }
    for (r = 0; r < RANKS; r++) free(out[r]);
    free(exact), free(new_latents), free(new_keys), free(qn), free(qr);
  }

  free(plan);
  for (r = 0; r < RANKS; r++) {
    free(pool[r].base);
    tpla_context_destroy(ctx[r]);
  }
  for (b = 0; b < BATCH; b++) free(latents[b]), free(k_rope[b]), free(q_nope[b]), free(q_rope[b]);
  tpla_transform_destroy(pca);
  tpla_synthetic_destroy(model);
  free((float *)mla.w_uk);
  free((float *)mla.w_uv);
  free((float *)mla.gamma);
  return 0;
}

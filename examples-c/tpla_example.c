/* tpla_example.c: TPLA decode with two ranks in one process, the way an engine uses it.
 *
 * A DeepSeek-V2-Lite-shaped attention layer (synthetic weights and tokens from libtpla's
 * seeded generator stand in for a checkpoint and a real prefill) is split into g = 2
 * latent groups after a PCA rotation of the latent. The "prefill" exports each rank's
 * slice of its cache to a shard file;
 * each rank registers its file (the cache reads it into memory of its own, so the files
 * are removed right after), then every decode step appends the new token on both ranks,
 * decodes, sums the two partial outputs (the all-reduce) and compares the result with
 * exact MLA.
 *
 * Build (after `cargo build --release`):
 *   cc -std=c99 -O2 examples-c/tpla_example.c -Iinclude -Ltarget/release -ltpla \
 *      -lm -lpthread -ldl -o tpla_example
 * Run: ./tpla_example [DIR]   (shard files go to DIR, default a new directory under
 *                              $TMPDIR or /tmp; either way they are removed)
 */
#define _POSIX_C_SOURCE 200809L /* mkdtemp */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tpla.h"

#define RANKS 2   /* latent groups g; one rank per group, every head on each */
#define PREFILL 512
#define STEPS 4
#define SEQ 42    /* the engine's id of the one sequence */

/* Every call returns a status; on failure the library says why. */
#define TRY(call)                                                                   \
  do {                                                                              \
    tpla_status status_ = (call);                                                   \
    if (status_ != TPLA_STATUS_OK) {                                                \
      fprintf(stderr, "%s failed: %s: %s\n", #call, tpla_status_str(status_),        \
              tpla_last_error_message());                                            \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

static float *floats(size_t n) {
  float *p = (float *)calloc(n, sizeof(float));
  if (p == NULL) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  return p;
}

int main(int argc, char **argv) {
  char own_dir[4096] = "";
  const char *dir = argc > 1 ? argv[1] : own_dir;
  const size_t tokens = PREFILL + STEPS;
  tpla_dims d;
  tpla_synthetic *model;
  tpla_mla_weights mla;
  tpla_transform *pca;
  float *latents, *k_rope, *q_nope, *q_rope;
  char paths[RANKS][4096];
  tpla_context *ctx[RANKS];
  tpla_cache *cache[RANKS];
  size_t H, dv, r, step;

  if (argc <= 1) {
    const char *tmp = getenv("TMPDIR");
    sprintf(own_dir, "%.4000s/tpla_example.XXXXXX", tmp != NULL && *tmp ? tmp : "/tmp");
    if (mkdtemp(own_dir) == NULL) {
      perror("mkdtemp");
      return 1;
    }
  }

  if (tpla_abi_version() != TPLA_ABI_VERSION) {
    fprintf(stderr, "tpla.h and libtpla disagree on the ABI version\n");
    return 1;
  }
  printf("libtpla %s\n", tpla_version());

  /* The model: layer shape, MLA weights (W_UK, W_UV, gamma) and a sequence's tokens.
   * An engine reads these from its checkpoint and computes them in its prefill. */
  TRY(tpla_dims_preset("deepseek-v2-lite", &d));
  H = d.heads;
  dv = d.d_v;
  TRY(tpla_synthetic_create(d, 1, &model));
  memset(&mla, 0, sizeof mla);
  mla.struct_size = sizeof mla;
  mla.w_uk_count = H * d.d_c * d.d_n;
  mla.w_uv_count = H * d.d_c * d.d_v;
  mla.gamma_count = d.d_c;
  mla.w_uk = floats(mla.w_uk_count);
  mla.w_uv = floats(mla.w_uv_count);
  mla.gamma = floats(mla.gamma_count);
  TRY(tpla_synthetic_weights(model, (float *)mla.w_uk, mla.w_uk_count, (float *)mla.w_uv,
                             mla.w_uv_count, (float *)mla.gamma, mla.gamma_count));
  latents = floats(tokens * d.d_c);        /* pre-norm latents a_t */
  k_rope = floats(tokens * d.d_r);         /* RoPE-rotated keys */
  q_nope = floats(tokens * H * d.d_n);     /* the query of every position */
  q_rope = floats(tokens * H * d.d_r);
  TRY(tpla_synthetic_sequence(model, 7, tokens, latents, tokens * d.d_c, k_rope,
                              tokens * d.d_r, q_nope, tokens * H * d.d_n, q_rope,
                              tokens * H * d.d_r));

  /* The latent rotation U: PCA of calibration latents (captured from a calibration run,
   * or made offline by `tpla calibrate`), largest components in rank 0's slice. */
  {
    const size_t calibration_tokens = 2048;
    float *calibration = floats(calibration_tokens * d.d_c);
    float *calibration_keys = floats(calibration_tokens * d.d_r);
    TRY(tpla_synthetic_sequence(model, 99, calibration_tokens, calibration,
                                calibration_tokens * d.d_c, calibration_keys,
                                calibration_tokens * d.d_r, NULL, 0, NULL, 0));
    TRY(tpla_transform_pca(d.d_c, calibration, calibration_tokens * d.d_c,
                           TPLA_SLICE_LAYOUT_CONTIGUOUS, RANKS, &pca));
    free(calibration);
    free(calibration_keys);
  }

  /* Prefill side: export the first PREFILL tokens' cache, cut into one shard per rank. */
  {
    const tpla_transform *layer_transforms[1];
    const uint32_t seq_ids[1] = {SEQ};
    const uint64_t seq_lens[1] = {PREFILL};
    const char *path_list[RANKS];
    tpla_export_options eo;
    tpla_export *exp;
    layer_transforms[0] = pca;
    for (r = 0; r < RANKS; r++) {
      sprintf(paths[r], "%s/tpla_example_rank%u.shard", dir, (unsigned)r);
      path_list[r] = paths[r];
    }
    memset(&eo, 0, sizeof eo);
    eo.struct_size = sizeof eo;
    eo.dims = d;
    eo.groups = RANKS;
    eo.dtype = TPLA_DTYPE_BF16;
    eo.page_size = TPLA_DEFAULT_PAGE_SIZE;
    eo.transforms = layer_transforms;
    eo.layers = 1;
    eo.seq_ids = seq_ids;
    eo.seq_lens = seq_lens;
    eo.sequences = 1;
    eo.paths = path_list;
    eo.path_count = RANKS;
    TRY(tpla_export_create(&eo, &exp));
    /* one block per (layer, sequence): here layer 0 of sequence SEQ */
    TRY(tpla_export_push(exp, latents, PREFILL * d.d_c, k_rope, PREFILL * d.d_r));
    TRY(tpla_export_finish(exp));
    tpla_export_destroy(exp);
  }

  /* Decode side: one context and one cache per rank. */
  for (r = 0; r < RANKS; r++) {
    tpla_context_options o;
    tpla_backend_options backend;
    tpla_context_info info;
    tpla_layer_weights lw;
    tpla_cache_options co;
    float *w_uk, *w_uv;
    size_t w_uk_count, w_uv_count, registered;

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

    /* This rank's absorbed weights (what `tpla convert` would store for it). */
    w_uk_count = (size_t)info.heads * info.slice_width * d.d_n;
    w_uv_count = (size_t)info.heads * info.slice_width * d.d_v;
    w_uk = floats(w_uk_count);
    w_uv = floats(w_uv_count);
    TRY(tpla_fold_layer(d, o.plan, &mla, pca, w_uk, w_uk_count, w_uv, w_uv_count));
    memset(&lw, 0, sizeof lw);
    lw.struct_size = sizeof lw;
    lw.w_uk = w_uk;
    lw.w_uk_count = w_uk_count;
    lw.w_uv = w_uv;
    lw.w_uv_count = w_uv_count;
    lw.mu = 1.0;
    lw.slice_fraction = 1.0 / RANKS; /* used by TPLA_RMS_MODE_SLICED appends only */
    lw.transform = pca;
    TRY(tpla_context_set_layer(ctx[r], 0, &lw));
    free(w_uk); /* the context keeps its own copy */
    free(w_uv);

    memset(&co, 0, sizeof co);
    co.struct_size = sizeof co;
    co.dtype = TPLA_DTYPE_BF16;
    co.page_size = TPLA_DEFAULT_PAGE_SIZE;
    co.capacity_pages = 16; /* for the tokens decode appends */
    TRY(tpla_cache_create(ctx[r], &co, &cache[r]));
    TRY(tpla_cache_register_file(cache[r], paths[r], &registered));
    /* The cache holds its own copy: the prefill's file is no longer needed. */
    if (remove(paths[r]) != 0) {
      perror(paths[r]);
      return 1;
    }
    printf("rank %u: %s, latent columns [%u, %u), %u values per cached token (MLA: %u)\n",
           (unsigned)r, tpla_context_backend_name(ctx[r]), info.slice_start,
           info.slice_start + info.slice_width, info.row_width, d.d_c + d.d_r);
  }

  /* Decode steps: append the new token everywhere, decode, all-reduce, compare. */
  for (step = 0; step < STEPS; step++) {
    const size_t t = PREFILL + step; /* position of the new token */
    const uint32_t seq = SEQ;
    float *out[RANKS], *exact = floats(H * dv);
    double err = 0.0, norm = 0.0;
    size_t i;

    for (r = 0; r < RANKS; r++) {
      tpla_decode_args a;
      TRY(tpla_context_append_token(ctx[r], cache[r], SEQ, 0, latents + t * d.d_c, d.d_c,
                                    k_rope + t * d.d_r, d.d_r, TPLA_RMS_MODE_EXACT));
      out[r] = floats(H * dv);
      memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.layer = 0;
      a.query_kind = TPLA_QUERY_KIND_NOPE;
      a.output_kind = TPLA_OUTPUT_KIND_HEADS;
      a.seq_ids = &seq;
      a.batch = 1;
      a.queries = q_nope + t * H * d.d_n;
      a.queries_count = H * d.d_n;
      a.q_rope = q_rope + t * H * d.d_r;
      a.q_rope_count = H * d.d_r;
      a.out = out[r];
      a.out_count = H * dv;
      TRY(tpla_context_decode(ctx[r], cache[r], &a));
    }
    /* The all-reduce: both ranks now hold the summed head outputs. With ranks in
     * separate processes, tpla_all_reduce_with hands the buffer to your communicator. */
    TRY(tpla_all_reduce_in_process(out, RANKS, H * dv));

    /* Exact MLA over the same t + 1 tokens (an f64 reference, for this comparison). */
    TRY(tpla_mla_reference(d, &mla, latents, (t + 1) * d.d_c, k_rope, (t + 1) * d.d_r,
                           q_nope + t * H * d.d_n, H * d.d_n, q_rope + t * H * d.d_r,
                           H * d.d_r, exact, H * dv));
    for (i = 0; i < H * dv; i++) {
      double e = (double)out[0][i] - (double)exact[i];
      err += e * e;
      norm += (double)exact[i] * exact[i];
    }
    err = sqrt(err / norm);
    printf("step %u (context %u): |TPLA - MLA| / |MLA| = %.4f\n", (unsigned)step,
           (unsigned)(t + 1), err);
    if (!isfinite(err)) {
      fprintf(stderr, "the output is not finite\n");
      return 1;
    }
    for (r = 0; r < RANKS; r++) free(out[r]);
    free(exact);
  }

  for (r = 0; r < RANKS; r++) {
    tpla_cache_destroy(cache[r]);
    tpla_context_destroy(ctx[r]);
  }
  if (own_dir[0] != '\0' && rmdir(own_dir) != 0) {
    perror(own_dir);
    return 1;
  }
  tpla_transform_destroy(pca);
  tpla_synthetic_destroy(model);
  free((float *)mla.w_uk);
  free((float *)mla.w_uv);
  free((float *)mla.gamma);
  free(latents);
  free(k_rope);
  free(q_nope);
  free(q_rope);
  return 0;
}

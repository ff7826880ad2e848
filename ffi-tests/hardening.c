/* hardening.c: what an adversarial run found (issue 17), each check once per defect:
 * files changed under a registered cache, counts that overflow, absurd sizes and thread
 * counts, FIFOs, non-finite weights, overlaps, statuses and messages the header
 * promises, shared thread pools.
 *
 * Usage: hardening WORK_DIR
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

static int failures = 0;
static int checked = 0;

enum { H = TEST_HEADS, W = TEST_DC / 2, LEN = 300, BATCH = 1 };

static float w_uk[H * W * TEST_DN], w_uv[H * W * TEST_DV];
static float tokens[LEN * TEST_DC], keys[LEN * TEST_DR];
static float q_nope[BATCH * H * TEST_DN], q_rope[BATCH * H * TEST_DR];

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static tpla_context_options context_options(uint32_t rank) {
  tpla_context_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = test_dims();
  o.plan.ranks = 2;
  o.plan.groups = 2;
  o.plan.rank = rank;
  o.layers = 1;
  return o;
}

static tpla_layer_weights layer_weights(const tpla_transform *t) {
  tpla_layer_weights lw;
  memset(&lw, 0, sizeof lw);
  lw.struct_size = sizeof lw;
  lw.w_uk = w_uk;
  lw.w_uk_count = H * W * TEST_DN;
  lw.w_uv = w_uv;
  lw.w_uv_count = H * W * TEST_DV;
  lw.mu = 1.0;
  lw.slice_fraction = 0.5;
  lw.transform = t;
  return lw;
}

static tpla_cache *make_cache(const tpla_context *ctx) {
  tpla_cache_options co;
  tpla_cache *cache;
  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_BF16;
  co.page_size = 16;
  co.capacity_pages = 4;
  CHECK_OK(tpla_cache_create(ctx, &co, &cache));
  return cache;
}

static tpla_decode_args decode_args(uint32_t *seq, float *out) {
  tpla_decode_args a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.layer = 0;
  a.query_kind = TPLA_QUERY_KIND_NOPE;
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.seq_ids = seq;
  a.batch = BATCH;
  a.queries = q_nope;
  a.queries_count = BATCH * H * TEST_DN;
  a.q_rope = q_rope;
  a.q_rope_count = BATCH * H * TEST_DR;
  a.out = out;
  a.out_count = BATCH * H * TEST_DV;
  return a;
}

/* Exports one LEN-token sequence (id 5) of one identity layer into `paths`. */
static tpla_export_options export_options(const tpla_transform **transforms,
                                          const uint32_t *ids, const uint64_t *lens,
                                          const char **paths) {
  tpla_export_options eo;
  memset(&eo, 0, sizeof eo);
  eo.struct_size = sizeof eo;
  eo.dims = test_dims();
  eo.groups = 2;
  eo.dtype = TPLA_DTYPE_BF16;
  eo.page_size = 16;
  eo.transforms = transforms;
  eo.layers = 1;
  eo.seq_ids = ids;
  eo.seq_lens = lens;
  eo.sequences = 1;
  eo.paths = paths;
  eo.path_count = 2;
  return eo;
}

int main(int argc, char **argv) {
  tpla_transform_desc td;
  tpla_transform *identity, *narrow, *t_out;
  tpla_context_options o = context_options(0);
  tpla_backend_options cpu = backend_options(TPLA_BACKEND_CPU, 2);
  tpla_context *ctx, *c_out, *shared[2];
  tpla_thread_pool *pool, *p_out;
  tpla_cache *copied, *mapped, *cache;
  tpla_layer_weights lw;
  tpla_mla_weights mw;
  tpla_export_options eo;
  tpla_export *exp, *e_out;
  tpla_decode_args a;
  const tpla_transform *transforms[1];
  const char *paths[2];
  char path0[4096], path1[4096], fifo[4096], dir[4096];
  uint32_t seq = 5, ids[1] = {5};
  uint64_t lens[1] = {LEN};
  float before[BATCH * H * TEST_DV], after[BATCH * H * TEST_DV], out[BATCH * H * TEST_DV];
  float latent[TEST_DC], k_rope[TEST_DR];
  static float mla_uk[H * TEST_DC * TEST_DN], mla_uv[H * TEST_DC * TEST_DV], gamma_[TEST_DC];
  static float folded_uv[H * W * TEST_DV];
  static double m[TEST_DC * TEST_DC], ev[TEST_DC];
  static char long_name[1 << 20];
  size_t n, len;
  double t0;
  int i;

  if (argc != 2) {
    fprintf(stderr, "usage: %s WORK_DIR\n", argv[0]);
    return 2;
  }
  for (i = 0; i < H * W * TEST_DN; i++) w_uk[i] = 0.01f * (float)(i % 7);
  for (i = 0; i < H * W * TEST_DV; i++) w_uv[i] = 0.02f * (float)(i % 5);
  for (i = 0; i < LEN * TEST_DC; i++) tokens[i] = (float)((i * 7) % 13) - 6.0f;
  for (i = 0; i < LEN * TEST_DR; i++) keys[i] = 0.125f * (float)(i % 5);
  for (i = 0; i < BATCH * H * TEST_DN; i++) q_nope[i] = 0.1f * (float)(i % 3);
  for (i = 0; i < BATCH * H * TEST_DR; i++) q_rope[i] = 0.1f;
  for (i = 0; i < TEST_DC; i++) latent[i] = 1.0f;
  for (i = 0; i < TEST_DR; i++) k_rope[i] = 0.5f;

  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
  td.d_c = TEST_DC;
  CHECK_OK(tpla_transform_create(&td, &identity));
  td.d_c = TEST_DC / 2;
  CHECK_OK(tpla_transform_create(&td, &narrow));
  CHECK_OK(tpla_context_create(&o, &cpu, &ctx));
  lw = layer_weights(identity);
  CHECK_OK(tpla_context_set_layer(ctx, 0, &lw));

  /* ---- item 4: exports that would lose a shard, a wrong width, an empty sequence ---- */
  sprintf(path0, "%s/hardening.rank0.tpla", argv[1]);
  sprintf(path1, "%s/hardening.rank1.tpla", argv[1]);
  transforms[0] = identity;
  paths[0] = path0;
  paths[1] = path0;
  eo = export_options(transforms, ids, lens, paths);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "groups 0 and 1 would both be written",
         tpla_export_create(&eo, &e_out));
  {
    char same[4200];
    sprintf(same, "%s/./hardening.rank0.tpla", argv[1]);
    paths[1] = same;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "would both be written", tpla_export_create(&eo, &e_out));
  }
  paths[1] = path1;
  transforms[0] = narrow;
  EXPECT(TPLA_STATUS_MISMATCH, "options->transforms[0] is 32 wide", tpla_export_image_len(&eo, &n));
  EXPECT(TPLA_STATUS_MISMATCH, "is 32 wide", tpla_export_create(&eo, &e_out));
  transforms[0] = identity;
  lens[0] = 0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "sequence 5 has no tokens", tpla_export_image_len(&eo, &n));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "has no tokens", tpla_export_create(&eo, &e_out));
  lens[0] = LEN;

  /* ---- item 10: a non-finite pushed value is named where the caller put it ---- */
  CHECK_OK(tpla_export_create(&eo, &exp));
  tokens[7] = NAN;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latents[7] is NaN",
         tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  tokens[7] = 1.0f;
  CHECK_OK(tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  CHECK_OK(tpla_export_finish(exp));
  tpla_export_destroy(exp);

  /* ---- item 15: the files are readable by others, as the umask allows ---- */
  {
    struct stat st;
    mode_t mask = umask(022);
    umask(mask);
    CHECK(stat(path0, &st) == 0);
    CHECK((st.st_mode & 0777) == (0666 & ~mask));
  }

  /* ---- item 1: a registered file truncated on disk loses nothing ---- */
  copied = make_cache(ctx);
  mapped = make_cache(ctx);
  CHECK_OK(tpla_cache_register_file(copied, path0, &n));
  CHECK(n == 1);
  CHECK_OK(tpla_cache_register_file_mapped(mapped, path0, &n));
  CHECK(n == 1);
  a = decode_args(&seq, before);
  CHECK_OK(tpla_context_decode(ctx, copied, &a));
  a = decode_args(&seq, out);
  CHECK_OK(tpla_context_decode(ctx, mapped, &a));
  CHECK(memcmp(before, out, sizeof out) == 0); /* both modes read the same rows */
  tpla_cache_destroy(mapped);                  /* before its file changes */
  CHECK(truncate(path0, 4096) == 0);
  a = decode_args(&seq, after);
  CHECK_OK(tpla_context_decode(ctx, copied, &a));
  CHECK(memcmp(before, after, sizeof after) == 0);
  CHECK(truncate(path0, 0) == 0);
  a = decode_args(&seq, after);
  CHECK_OK(tpla_context_decode(ctx, copied, &a));
  CHECK(memcmp(before, after, sizeof after) == 0);
  CHECK(unlink(path0) == 0);
  CHECK_OK(tpla_context_append_token(ctx, copied, seq, 0, latent, TEST_DC, k_rope, TEST_DR,
                                     TPLA_RMS_MODE_EXACT));
  CHECK_OK(tpla_cache_seq_len(copied, seq, 0, &len));
  CHECK(len == LEN + 1);
  a = decode_args(&seq, before); /* what every later decode of `copied` must give */
  CHECK_OK(tpla_context_decode(ctx, copied, &a));
  /* a truncated file is refused at registration, by both modes */
  cache = make_cache(ctx);
  EXPECT(TPLA_STATUS_IO, "hardening.rank0.tpla", tpla_cache_register_file(cache, path0, &n));
  {
    FILE *f = fopen(path0, "wb");
    CHECK(f != NULL && fclose(f) == 0);
  }
  EXPECT(TPLA_STATUS_CORRUPT_FILE, "truncated", tpla_cache_register_file(cache, path0, &n));
  EXPECT(TPLA_STATUS_CORRUPT_FILE, "truncated", tpla_cache_register_file_mapped(cache, path0, &n));

  /* ---- item 6 and 10: FIFOs and directories are refused at once ---- */
  sprintf(fifo, "%s/hardening.fifo", argv[1]);
  unlink(fifo);
  CHECK(mkfifo(fifo, 0600) == 0);
  EXPECT(TPLA_STATUS_IO, "not a regular file", tpla_cache_register_file(cache, fifo, &n));
  EXPECT(TPLA_STATUS_IO, "not a regular file", tpla_cache_register_file_mapped(cache, fifo, &n));
  EXPECT(TPLA_STATUS_IO, "not a regular file",
         tpla_context_create_from_weights_file(fifo, &cpu, &c_out));
  sprintf(dir, "%s", argv[1]);
  EXPECT(TPLA_STATUS_IO, "a directory", tpla_cache_register_file(cache, dir, &n));
  EXPECT(TPLA_STATUS_IO, "a directory", tpla_context_create_from_weights_file(dir, &cpu, &c_out));
  CHECK(unlink(fifo) == 0);

  /* ---- item 2: counts whose products overflow are refused before anything else ---- */
  a = decode_args(&seq, out);
  a.batch = ((size_t)1 << 59) + 1; /* every count below equals batch 1's modulo 2^64 */
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "too large to address", tpla_context_decode(ctx, copied, &a));
  a.batch = SIZE_MAX;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "too large to address", tpla_context_decode(ctx, copied, &a));
  a.batch = 2; /* consistent with nothing: named, not an overlap */
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "args->q_rope holds 64 values, a batch of 2",
         tpla_context_decode(ctx, copied, &a));

  /* ---- item 3: thread counts are bounded; contexts share a pool ---- */
  t0 = seconds();
  cpu = backend_options(TPLA_BACKEND_CPU, 1u << 20);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "between 1 and 1024 threads",
         tpla_context_create(&o, &cpu, &c_out));
  cpu = backend_options(TPLA_BACKEND_CPU, UINT32_MAX);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "between 1 and 1024", tpla_context_create(&o, &cpu, &c_out));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "between 1 and 1024", tpla_thread_pool_create(TPLA_MAX_THREADS + 1, &p_out));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "got 0", tpla_thread_pool_create(0, &p_out));
  CHECK(seconds() - t0 < 1.0);
  CHECK_OK(tpla_thread_pool_create(2, &pool));
  cpu = backend_options(TPLA_BACKEND_CPU, 0);
  cpu.pool = pool;
  for (i = 0; i < 2; i++) {
    CHECK_OK(tpla_context_create(&o, &cpu, &shared[i]));
    CHECK_OK(tpla_context_set_layer(shared[i], 0, &lw));
    CHECK(strstr(tpla_context_backend_name(shared[i]), "(2 threads)") != NULL);
  }
  tpla_thread_pool_destroy(pool); /* the contexts keep it running */
  for (i = 0; i < 2; i++) {
    a = decode_args(&seq, out);
    CHECK_OK(tpla_context_decode(shared[i], copied, &a));
    CHECK(memcmp(before, out, sizeof out) == 0);
    tpla_context_destroy(shared[i]);
  }
  {
    /* a program built against the first tpla_backend_options (no pool) still works */
    cpu = backend_options(TPLA_BACKEND_CPU, 1);
    cpu.struct_size = offsetof(tpla_backend_options, pool);
    CHECK_OK(tpla_context_create(&o, &cpu, &c_out));
    tpla_context_destroy(c_out);
    cpu.struct_size = offsetof(tpla_backend_options, pool) - 8;
    EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_backend_options",
           tpla_context_create(&o, &cpu, &c_out));
    cpu = backend_options(TPLA_BACKEND_CPU, 2);
  }

  /* ---- item 5: transform widths are capped like every dimension ---- */
  t0 = seconds();
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
  td.d_c = 1u << 31;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "supported maximum 65536", tpla_transform_create(&td, &t_out));
  td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
  td.d_c = 65537;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "supported maximum 65536", tpla_transform_create(&td, &t_out));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "supported maximum 65536",
         tpla_transform_pca(1u << 31, tokens, LEN * TEST_DC, TPLA_SLICE_LAYOUT_CONTIGUOUS, 2, &t_out));
  CHECK(seconds() - t0 < 1.0);

  /* ---- item 7: non-finite absorbed weights are refused ---- */
  w_uk[5] = NAN;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "W'_UK[5] is NaN", tpla_context_set_layer(ctx, 0, &lw));
  w_uk[5] = 0.0f;
  w_uv[9] = -INFINITY;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "W'_UV[9] is -inf", tpla_context_set_layer(ctx, 0, &lw));
  w_uv[9] = 0.0f;
  a = decode_args(&seq, after);
  CHECK_OK(tpla_context_decode(ctx, copied, &a)); /* the layer was left as it was */
  CHECK(memcmp(before, after, sizeof after) == 0);

  /* ---- item 8: fold outputs overlapping the inputs ---- */
  {
    tpla_plan plan = {2, 2, 0};
    memset(&mw, 0, sizeof mw);
    mw.struct_size = sizeof mw;
    mw.w_uk = mla_uk;
    mw.w_uk_count = H * TEST_DC * TEST_DN;
    mw.w_uv = mla_uv;
    mw.w_uv_count = H * TEST_DC * TEST_DV;
    for (i = 0; i < TEST_DC; i++) gamma_[i] = 1.0f;
    mw.gamma = gamma_;
    mw.gamma_count = TEST_DC;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "w_uk overlaps weights->w_uk",
           tpla_fold_layer(test_dims(), plan, &mw, identity, mla_uk, H * W * TEST_DN, folded_uv,
                           H * W * TEST_DV));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "w_uv overlaps weights->w_uv",
           tpla_fold_layer(test_dims(), plan, &mw, identity, w_uk, H * W * TEST_DN,
                           mla_uv + 16, H * W * TEST_DV));
    CHECK_OK(tpla_fold_layer(test_dims(), plan, &mw, identity, w_uk, H * W * TEST_DN, folded_uv,
                             H * W * TEST_DV));
  }

  /* ---- item 9: statuses the header promises ---- */
  {
    tpla_cache_options co;
    tpla_cache *k_out;
    memset(&co, 0, sizeof co);
    co.struct_size = sizeof co;
    co.dtype = TPLA_DTYPE_F32;
    co.page_size = 64;
    co.capacity_pages = (size_t)1 << 31;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "cannot allocate a pool", tpla_cache_create(ctx, &co, &k_out));
  }
  n = 99;
  CHECK_OK(tpla_cache_sequence_ids(copied, NULL, 0, &n));
  CHECK(n == 1);
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_PCA;
  td.d_c = TEST_DC;
  for (i = 0; i < TEST_DC; i++) m[i * TEST_DC + i] = 1.0;
  for (i = 0; i < TEST_DC; i++) ev[i] = 1.0 / (1.0 + i);
  ev[3] = -0.5;
  td.matrix = m;
  td.matrix_count = TEST_DC * TEST_DC;
  td.eigenvalues = ev;
  td.eigenvalues_count = TEST_DC;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "cannot be negative, but entry 3 is -0.5",
         tpla_transform_create(&td, &t_out));
  ev[3] = 0.0;
  CHECK_OK(tpla_transform_create(&td, &t_out));
  tpla_transform_destroy(t_out);

  /* ---- item 10: messages that point at the right place ---- */
  latent[7] = NAN;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latent[7] is NaN",
         tpla_context_append_token(ctx, copied, seq, 0, latent, TEST_DC, k_rope, TEST_DR,
                                   TPLA_RMS_MODE_EXACT));
  latent[7] = 1.0f;
  k_rope[3] = -INFINITY;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "k_rope[3] is -inf",
         tpla_context_append_token(ctx, copied, seq, 0, latent, TEST_DC, k_rope, TEST_DR,
                                   TPLA_RMS_MODE_EXACT));
  k_rope[3] = 0.5f;
  tokens[70] = INFINITY;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latents[70] is inf",
         tpla_transform_pca(TEST_DC, tokens, LEN * TEST_DC, TPLA_SLICE_LAYOUT_CONTIGUOUS, 2, &t_out));
  tokens[70] = 1.0f;
  {
    /* another d_v, another softmax scale: the message names the field */
    tpla_context *other;
    tpla_layer_weights ow = layer_weights(identity);
    o.dims.d_v = TEST_DV / 2;
    ow.w_uv_count = H * W * (TEST_DV / 2);
    CHECK_OK(tpla_context_create(&o, &cpu, &other));
    CHECK_OK(tpla_context_set_layer(other, 0, &ow));
    a = decode_args(&seq, out);
    a.out_count = BATCH * H * (TEST_DV / 2);
    EXPECT(TPLA_STATUS_MISMATCH, "the cache has value width d_v 24, this context 12",
           tpla_context_decode(other, copied, &a));
    tpla_context_destroy(other);
    o = context_options(0);
    o.dims.softmax_scale = 0.25;
    CHECK_OK(tpla_context_create(&o, &cpu, &other));
    CHECK_OK(tpla_context_set_layer(other, 0, &lw));
    a = decode_args(&seq, out);
    EXPECT(TPLA_STATUS_MISMATCH, "the cache has softmax scale 0.15, this context 0.25",
           tpla_context_decode(other, copied, &a));
    tpla_context_destroy(other);
    o = context_options(0);
  }
  {
    tpla_dims d;
    memset(long_name, 'x', sizeof long_name - 1);
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "(1048575 bytes)", tpla_dims_preset(long_name, &d));
    CHECK(strlen(tpla_last_error_message()) < 400);
  }

  tpla_cache_destroy(cache);
  tpla_cache_destroy(copied);
  tpla_context_destroy(ctx);
  tpla_transform_destroy(identity);
  tpla_transform_destroy(narrow);
  unlink(path0);
  unlink(path1);
  if (failures) {
    fprintf(stderr, "hardening: %d of %d checks failed\n", failures, checked);
    return 1;
  }
  printf("hardening: all %d checks passed\n", checked);
  return 0;
}

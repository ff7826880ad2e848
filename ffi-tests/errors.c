/* errors.c: every error path of tpla.h returns its status and a sentence, changes
 * nothing, and never crashes.
 *
 * Usage: errors WORK_DIR
 */
#include "check.h"

static int failures = 0;
static int checked = 0;

enum { H = TEST_HEADS, W = TEST_DC / 2, LEN = 20 };

static tpla_context_options context_options(uint32_t rank, uint32_t layers) {
  tpla_context_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = test_dims();
  o.plan.ranks = 2;
  o.plan.groups = 2;
  o.plan.rank = rank;
  o.layers = layers;
  return o;
}

static tpla_cache_options cache_options(size_t pages) {
  tpla_cache_options o;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dtype = TPLA_DTYPE_F32;
  o.page_size = 8;
  o.capacity_pages = pages;
  return o;
}

static float w_uk[H * W * TEST_DN], w_uv[H * W * TEST_DV];
static float mla_uk[H * TEST_DC * TEST_DN], mla_uv[H * TEST_DC * TEST_DV], gamma_[TEST_DC];

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

static tpla_mla_weights mla_weights(void) {
  tpla_mla_weights m;
  memset(&m, 0, sizeof m);
  m.struct_size = sizeof m;
  m.w_uk = mla_uk;
  m.w_uk_count = H * TEST_DC * TEST_DN;
  m.w_uv = mla_uv;
  m.w_uv_count = H * TEST_DC * TEST_DV;
  m.gamma = gamma_;
  m.gamma_count = TEST_DC;
  return m;
}

static int release_calls = 0;
static void count_release(void *user) {
  (void)user;
  release_calls++;
}

static int32_t failing_reduce(float *buffer, size_t count, void *user) {
  (void)buffer;
  (void)count;
  (void)user;
  return 42;
}

int main(int argc, char **argv) {
  const tpla_dims d = test_dims();
  tpla_dims bad_dims;
  tpla_plan plan = {2, 2, 0};
  tpla_transform_desc td;
  tpla_transform *hadamard, *identity, *other_width, *t_out;
  tpla_context_options o;
  tpla_backend_options reference = backend_options(TPLA_BACKEND_REFERENCE, 0), backend;
  tpla_context *ctx0, *ctx1, *ctx_one_layer, *ctx_unset, *c_out;
  tpla_cache_options co;
  tpla_cache *cache0, *cache1, *cache_one_layer, *small, *k_out;
  tpla_context_info info;
  tpla_cache_info cinfo;
  tpla_layer_weights lw;
  tpla_mla_weights mw;
  tpla_decode_args a;
  tpla_export_options eo;
  tpla_export *exp, *e_out;
  tpla_synthetic *syn, *s_out;
  const tpla_transform *transforms[1];
  char path[4096], corrupt_path[4096], group1_path[4096];
  const char *paths[2];
  uint32_t seq_ids[2] = {1, 2}, ids[1], layer_out, seq_out;
  uint64_t seq_lens[2] = {LEN, LEN};
  float latent[TEST_DC], k_rope[TEST_DR], rows[W + TEST_DR];
  float q_nope[2 * H * TEST_DN], q_rope[2 * H * TEST_DR], out[2 * H * TEST_DV];
  float lse[2 * H], lat_out[2 * H * W], tokens[LEN * TEST_DC], keys[LEN * TEST_DR];
  float big[64], *bufs[2] = {NULL, NULL};
  unsigned char junk[4096];
  size_t n, len;
  bool done;
  FILE *f;
  int i;

  if (argc != 2) {
    fprintf(stderr, "usage: %s WORK_DIR\n", argv[0]);
    return 2;
  }
  for (i = 0; i < H * W * TEST_DN; i++) w_uk[i] = 0.01f * (float)(i % 7);
  for (i = 0; i < H * W * TEST_DV; i++) w_uv[i] = 0.02f * (float)(i % 5);
  for (i = 0; i < TEST_DC; i++) latent[i] = (float)(i % 9) - 4.0f;
  for (i = 0; i < TEST_DR; i++) k_rope[i] = 0.5f;
  for (i = 0; i < W + TEST_DR; i++) rows[i] = 0.25f;
  for (i = 0; i < 2 * H * TEST_DN; i++) q_nope[i] = 0.1f;
  for (i = 0; i < 2 * H * TEST_DR; i++) q_rope[i] = 0.1f;
  for (i = 0; i < 64; i++) big[i] = (float)i;
  memset(junk, 0x5a, sizeof junk);

  /* ---- version, status strings, messages ---- */
  CHECK(strcmp(tpla_status_str(TPLA_STATUS_OK), "ok") == 0);
  CHECK(strcmp(tpla_status_str(TPLA_STATUS_PANIC), "internal error (panic)") == 0);
  CHECK(strcmp(tpla_status_str(999), "unknown status") == 0);
  CHECK(tpla_last_error_message() != NULL);

  /* ---- dims ---- */
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "name is NULL", tpla_dims_preset(NULL, &bad_dims));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL", tpla_dims_preset("kimi-k2", NULL));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "known presets", tpla_dims_preset("llama", &bad_dims));
  CHECK_OK(tpla_dims_preset("deepseek-v3", &bad_dims));
  CHECK(bad_dims.heads == 128 && bad_dims.d_c == 512 && bad_dims.d_r == 64);

  /* ---- transforms ---- */
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
  td.d_c = TEST_DC;
  td.seed = 9;
  CHECK_OK(tpla_transform_create(&td, &hadamard));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "desc is NULL", tpla_transform_create(NULL, &t_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL", tpla_transform_create(&td, NULL));
  td.struct_size = sizeof td - 8;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "struct_size", tpla_transform_create(&td, &t_out));
  td.struct_size = 0;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "sizeof(tpla_transform_desc)",
         tpla_transform_create(&td, &t_out));
  td.struct_size = sizeof td;
  td.d_c = 48;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "power of two", tpla_transform_create(&td, &t_out));
  td.d_c = TEST_DC;
  td.kind = 17;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown transform code 17",
         tpla_transform_create(&td, &t_out));
  td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "no seed", tpla_transform_create(&td, &t_out));
  td.seed = 0;
  td.matrix_count = 4;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "desc->matrix is NULL", tpla_transform_create(&td, &t_out));
  td.matrix_count = 0;
  td.kind = TPLA_TRANSFORM_KIND_PCA;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "needs its matrix", tpla_transform_create(&td, &t_out));
  {
    /* A PCA "matrix" that is not orthogonal. */
    static double m[TEST_DC * TEST_DC], ev[TEST_DC];
    for (i = 0; i < TEST_DC * TEST_DC; i++) m[i] = 1.0;
    td.matrix = m;
    td.matrix_count = TEST_DC * TEST_DC;
    td.eigenvalues = ev;
    td.eigenvalues_count = TEST_DC;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "not orthogonal", tpla_transform_create(&td, &t_out));
    /* The identity matrix given for a Hadamard transform. */
    memset(m, 0, sizeof m);
    for (i = 0; i < TEST_DC; i++) m[i * TEST_DC + i] = 1.0;
    td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
    td.eigenvalues = NULL;
    td.eigenvalues_count = 0;
    EXPECT(TPLA_STATUS_MISMATCH, "not the hadamard", tpla_transform_create(&td, &t_out));
    td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
    CHECK_OK(tpla_transform_create(&td, &identity));
    td.matrix = (const double *)((const char *)m + 1);
    td.matrix_count = 1;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "aligned", tpla_transform_create(&td, &t_out));
  }
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_IDENTITY;
  td.d_c = 32;
  CHECK_OK(tpla_transform_create(&td, &other_width));
  tpla_transform_destroy(NULL);

  /* ---- contexts ---- */
  o = context_options(0, 2);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "options is NULL", tpla_context_create(NULL, &reference, &c_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL", tpla_context_create(&o, &reference, NULL));
  o.struct_size = sizeof o + 8;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_context_options", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 2);
  o.dims.heads = 0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "heads must be positive", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 2);
  o.dims.softmax_scale = -1.0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "softmax scale", tpla_context_create(&o, &reference, &c_out));
  o = context_options(2, 2);
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "rank 2 is out of range", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 2);
  o.plan.groups = 3;
  o.plan.ranks = 3;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "one of 1, 2, 4, 8", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 2);
  o.plan.ranks = 16;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "heads cannot be split", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 0);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "layers", tpla_context_create(&o, &reference, &c_out));
  o = context_options(0, 2);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "backend is NULL", tpla_context_create(&o, NULL, &c_out));
  backend = backend_options(0, 1);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown backend 0", tpla_context_create(&o, &backend, &c_out));
  backend = backend_options(TPLA_BACKEND_CPU, 0);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "between 1 and 1024 threads, got 0",
         tpla_context_create(&o, &backend, &c_out));
  backend.struct_size = 0;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_backend_options",
         tpla_context_create(&o, &backend, &c_out));
  backend = backend_options(TPLA_BACKEND_CUDA, 0);
  {
    /* CUDA: unsupported in a build without it or on a machine without a GPU. */
    tpla_status s = tpla_context_create(&o, &backend, &c_out);
    if (s == TPLA_STATUS_OK) {
      tpla_context_destroy(c_out);
    } else {
      EXPECT(TPLA_STATUS_UNSUPPORTED, "", s);
    }
  }
  /* converted weights files */
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "path is NULL",
         tpla_context_create_from_weights_file(NULL, &reference, &c_out));
  sprintf(path, "%s/errors-missing.weights", argv[1]);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "backend is NULL",
         tpla_context_create_from_weights_file(path, NULL, &c_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL",
         tpla_context_create_from_weights_file(path, &reference, NULL));
  EXPECT(TPLA_STATUS_IO, "errors-missing.weights",
         tpla_context_create_from_weights_file(path, &reference, &c_out));
  sprintf(path, "%s/errors-corrupt.weights", argv[1]);
  f = fopen(path, "wb");
  CHECK(f != NULL && fwrite(junk, 1, sizeof junk, f) == sizeof junk && fclose(f) == 0);
  EXPECT(TPLA_STATUS_CORRUPT_FILE, "", tpla_context_create_from_weights_file(path, &reference, &c_out));
  o = context_options(0, 2);
  CHECK_OK(tpla_context_create(&o, &reference, &ctx0));
  o = context_options(1, 2);
  CHECK_OK(tpla_context_create(&o, &reference, &ctx1));
  o = context_options(0, 1);
  CHECK_OK(tpla_context_create(&o, &reference, &ctx_one_layer));
  o = context_options(0, 2);
  CHECK_OK(tpla_context_create(&o, &reference, &ctx_unset));
  tpla_context_destroy(NULL);
  CHECK(strcmp(tpla_context_backend_name(NULL), "") == 0);
  CHECK(strcmp(tpla_context_backend_name(ctx0), "reference (f64)") == 0);

  memset(&info, 0, sizeof info);
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_context_info", tpla_context_get_info(ctx0, &info));
  info.struct_size = sizeof info;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL", tpla_context_get_info(NULL, &info));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "info is NULL", tpla_context_get_info(ctx0, NULL));

  /* ---- weights ---- */
  lw = layer_weights(hadamard);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL", tpla_context_set_layer(NULL, 0, &lw));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "weights is NULL", tpla_context_set_layer(ctx0, 0, NULL));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 2 is out of range",
         tpla_context_set_layer(ctx0, 2, &lw));
  lw.struct_size = 8;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_layer_weights", tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(NULL);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "weights->transform is NULL",
         tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(other_width);
  EXPECT(TPLA_STATUS_MISMATCH, "d_c is 64", tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(hadamard);
  lw.w_uk_count -= 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "W_UK holds", tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(hadamard);
  lw.w_uv = NULL;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "weights->w_uv is NULL",
         tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(hadamard);
  lw.mu = 0.0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "mu must be", tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(hadamard);
  lw.slice_fraction = 1.5;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "fraction", tpla_context_set_layer(ctx0, 0, &lw));
  lw = layer_weights(hadamard);
  CHECK_OK(tpla_context_set_layer(ctx0, 0, &lw));
  CHECK_OK(tpla_context_set_layer(ctx1, 0, &lw));
  lw = layer_weights(identity);
  CHECK_OK(tpla_context_set_layer(ctx0, 1, &lw));
  CHECK_OK(tpla_context_set_layer(ctx1, 1, &lw));
  CHECK_OK(tpla_context_set_layer(ctx_one_layer, 0, &lw));
  CHECK_OK(tpla_context_set_layer(ctx_unset, 0, &lw));

  mw = mla_weights();
  for (i = 0; i < TEST_DC; i++) gamma_[i] = 1.0f;
  CHECK_OK(tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "w_uk holds",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, 5, w_uv, H * W * TEST_DV));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "w_uk overlaps w_uv",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uk + 8,
                         H * W * TEST_DV));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "transform is NULL",
         tpla_fold_layer(d, plan, &mw, NULL, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  EXPECT(TPLA_STATUS_MISMATCH, "transform is 32 wide",
         tpla_fold_layer(d, plan, &mw, other_width, w_uk, H * W * TEST_DN, w_uv,
                         H * W * TEST_DV));
  plan.rank = 5;
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "rank 5",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  plan.rank = 0;
  mw.gamma_count = 3;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "gamma has 3 values",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  mw = mla_weights();
  gamma_[3] = (float)NAN;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "non-finite",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  gamma_[3] = 1.0f;
  mw.struct_size = 0;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_mla_weights",
         tpla_fold_layer(d, plan, &mw, hadamard, w_uk, H * W * TEST_DN, w_uv, H * W * TEST_DV));
  mw = mla_weights();

  /* ---- caches ---- */
  co = cache_options(16);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL", tpla_cache_create(NULL, &co, &k_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "options is NULL", tpla_cache_create(ctx0, NULL, &k_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL", tpla_cache_create(ctx0, &co, NULL));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "layer 1 has no weights",
         tpla_cache_create(ctx_unset, &co, &k_out));
  co.struct_size = 4;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_cache_options", tpla_cache_create(ctx0, &co, &k_out));
  co = cache_options(16);
  co.dtype = 9;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "element type code 9",
         tpla_cache_create(ctx0, &co, &k_out));
  co = cache_options((size_t)-1);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "supported maximum", tpla_cache_create(ctx0, &co, &k_out));
  co = cache_options(16);
  co.page_size = 0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "page size", tpla_cache_create(ctx0, &co, &k_out));
  co = cache_options(16);
  CHECK_OK(tpla_cache_create(ctx0, &co, &cache0));
  CHECK_OK(tpla_cache_create(ctx1, &co, &cache1));
  CHECK_OK(tpla_cache_create(ctx_one_layer, &co, &cache_one_layer));
  co = cache_options(1);
  CHECK_OK(tpla_cache_create(ctx0, &co, &small));
  tpla_cache_destroy(NULL);

  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL", tpla_cache_add_sequence(NULL, 1));
  CHECK_OK(tpla_cache_add_sequence(cache0, 1));
  CHECK_OK(tpla_cache_add_sequence(cache1, 1));
  CHECK_OK(tpla_cache_add_sequence(small, 1));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "sequence 1 is already", tpla_cache_add_sequence(cache0, 1));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 7 is not", tpla_cache_free_sequence(cache0, 7));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL", tpla_cache_free_sequence(NULL, 1));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 7 is not", tpla_cache_seq_len(cache0, 7, 0, &len));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 2 is out of range",
         tpla_cache_seq_len(cache0, 1, 2, &len));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "len is NULL", tpla_cache_seq_len(cache0, 1, 0, NULL));
  CHECK_OK(tpla_cache_add_sequence(cache0, 2));
  EXPECT(TPLA_STATUS_BUFFER_TOO_SMALL, "room for 1", tpla_cache_sequence_ids(cache0, ids, 1, &n));
  CHECK(n == 2);
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "count is NULL", tpla_cache_sequence_ids(cache0, ids, 1, NULL));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ids is NULL", tpla_cache_sequence_ids(cache0, NULL, 3, &n));
  n = 0;
  CHECK(tpla_cache_sequence_ids(cache0, NULL, 0, &n) == TPLA_STATUS_OK && n == 2);
  CHECK_OK(tpla_cache_free_sequence(cache0, 2));
  memset(&cinfo, 0, sizeof cinfo);
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_cache_info", tpla_cache_get_info(cache0, &cinfo));
  cinfo.struct_size = sizeof cinfo;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL", tpla_cache_get_info(NULL, &cinfo));

  /* append_rows */
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "whole number", tpla_cache_append_rows(cache0, 1, 0, rows, 5));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 9", tpla_cache_append_rows(cache0, 9, 0, rows, W + TEST_DR));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 4", tpla_cache_append_rows(cache0, 1, 4, rows, W + TEST_DR));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rows is NULL", tpla_cache_append_rows(cache0, 1, 0, NULL, 3));
  rows[2] = (float)INFINITY;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "not a finite", tpla_cache_append_rows(cache0, 1, 0, rows, W + TEST_DR));
  rows[2] = 0.25f;
  CHECK_OK(tpla_cache_seq_len(cache0, 1, 0, &len));
  CHECK(len == 0);

  /* ---- appends ---- */
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL",
         tpla_context_append_token(NULL, cache0, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL",
         tpla_context_append_token(ctx0, NULL, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "latent is NULL",
         tpla_context_append_token(ctx0, cache0, 1, 0, NULL, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latent holds 63",
         tpla_context_append_token(ctx0, cache0, 1, 0, latent, TEST_DC - 1, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "RoPE key holds 17",
         tpla_context_append_token(ctx0, cache0, 1, 0, latent, TEST_DC, k_rope, TEST_DR + 1, 1));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown rms_mode 0",
         tpla_context_append_token(ctx0, cache0, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 0));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 5",
         tpla_context_append_token(ctx0, cache0, 5, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 2",
         tpla_context_append_token(ctx0, cache0, 1, 2, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_MISMATCH, "latent group 1",
         tpla_context_append_token(ctx0, cache1, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_MISMATCH, "1 layers",
         tpla_context_append_token(ctx0, cache_one_layer, 1, 0, latent, TEST_DC, k_rope,
                                   TEST_DR, 1));
  EXPECT(TPLA_STATUS_MISMATCH, "another transform",
         tpla_context_append_token(ctx_unset, cache0, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  /* an empty sequence cannot be decoded */
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.query_kind = TPLA_QUERY_KIND_NOPE;
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.seq_ids = seq_ids;
  a.batch = 1;
  a.queries = q_nope;
  a.queries_count = H * TEST_DN;
  a.q_rope = q_rope;
  a.q_rope_count = H * TEST_DR;
  a.out = out;
  a.out_count = H * TEST_DV;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "", tpla_context_decode(ctx0, cache0, &a));
  for (i = 0; i < 3; i++) {
    int l;
    for (l = 0; l < 2; l++) {
      CHECK_OK(tpla_context_append_token(ctx0, cache0, 1, (uint32_t)l, latent, TEST_DC, k_rope,
                                         TEST_DR, TPLA_RMS_MODE_EXACT));
      CHECK_OK(tpla_context_append_token(ctx1, cache1, 1, (uint32_t)l, latent, TEST_DC, k_rope,
                                         TEST_DR, TPLA_RMS_MODE_SLICED));
    }
  }
  /* out of capacity: a one-page pool of 8-token pages */
  for (i = 0; i < 8; i++)
    CHECK_OK(tpla_context_append_token(ctx0, small, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  EXPECT(TPLA_STATUS_OUT_OF_CAPACITY, "pages are free",
         tpla_context_append_token(ctx0, small, 1, 0, latent, TEST_DC, k_rope, TEST_DR, 1));
  CHECK_OK(tpla_cache_seq_len(small, 1, 0, &len));
  CHECK(len == 8);

  /* ---- decode ---- */
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL", tpla_context_decode(NULL, cache0, &a));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL", tpla_context_decode(ctx0, NULL, &a));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "args is NULL", tpla_context_decode(ctx0, cache0, NULL));
  CHECK_OK(tpla_context_decode(ctx0, cache0, &a));
  a.struct_size = sizeof a - 1;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_decode_args", tpla_context_decode(ctx0, cache0, &a));
  a.struct_size = sizeof a;
  a.layer = 2;
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 2", tpla_context_decode(ctx0, cache0, &a));
  a.layer = 0;
  seq_ids[0] = 77;
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 77", tpla_context_decode(ctx0, cache0, &a));
  seq_ids[0] = 1;
  a.queries_count -= 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "q_nope holds", tpla_context_decode(ctx0, cache0, &a));
  a.queries_count += 1;
  a.q_rope_count += TEST_DR;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "q_rope holds", tpla_context_decode(ctx0, cache0, &a));
  a.q_rope_count -= TEST_DR;
  a.out_count -= 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "head outputs hold", tpla_context_decode(ctx0, cache0, &a));
  a.out_count += 1;
  a.queries = NULL;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "args->queries is NULL", tpla_context_decode(ctx0, cache0, &a));
  a.queries = q_nope;
  a.out = (float *)((char *)out + 2);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "not aligned", tpla_context_decode(ctx0, cache0, &a));
  a.out = q_nope; /* the output on top of the input */
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "args->out overlaps args->queries",
         tpla_context_decode(ctx0, cache0, &a));
  a.out = out;
  a.query_kind = 5;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown query_kind 5", tpla_context_decode(ctx0, cache0, &a));
  a.query_kind = TPLA_QUERY_KIND_LATENT;
  a.queries_count = H * W - 4;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latent queries hold", tpla_context_decode(ctx0, cache0, &a));
  a.queries_count = H * TEST_DN;
  a.query_kind = TPLA_QUERY_KIND_NOPE;
  a.output_kind = 0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown output_kind 0", tpla_context_decode(ctx0, cache0, &a));
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.lse = lse;
  a.lse_count = H;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "lse must be NULL", tpla_context_decode(ctx0, cache0, &a));
  a.output_kind = TPLA_OUTPUT_KIND_LATENT;
  a.out = lat_out;
  a.out_count = H * W;
  a.lse_count = H - 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "log-sum-exp outputs hold",
         tpla_context_decode(ctx0, cache0, &a));
  a.lse_count = H;
  a.lse = lat_out + 3;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "args->out overlaps args->lse",
         tpla_context_decode(ctx0, cache0, &a));
  a.lse = lse;
  CHECK_OK(tpla_context_decode(ctx0, cache0, &a));
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.out = out;
  a.out_count = H * TEST_DV;
  a.lse = NULL;
  a.lse_count = 0;
  EXPECT(TPLA_STATUS_MISMATCH, "latent group 1", tpla_context_decode(ctx0, cache1, &a));
  EXPECT(TPLA_STATUS_MISMATCH, "the cache has 1 layers",
         tpla_context_decode(ctx0, cache_one_layer, &a));
  /* a context whose layer 0 has another transform than the cache's */
  EXPECT(TPLA_STATUS_MISMATCH, "another transform", tpla_context_decode(ctx_unset, cache0, &a));

  /* ---- export, shard files and buffers ---- */
  transforms[0] = identity;
  memset(&eo, 0, sizeof eo);
  eo.struct_size = sizeof eo;
  eo.dims = d;
  eo.groups = 2;
  eo.dtype = TPLA_DTYPE_F32;
  eo.page_size = 8;
  eo.transforms = transforms;
  eo.layers = 1;
  eo.seq_ids = seq_ids;
  eo.seq_lens = seq_lens;
  eo.sequences = 2;
  sprintf(path, "%s/errors-rank0.shard", argv[1]);
  sprintf(group1_path, "%s/errors-rank1.shard", argv[1]);
  paths[0] = path;
  paths[1] = group1_path;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "options is NULL", tpla_export_image_len(NULL, &len));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "len is NULL", tpla_export_image_len(&eo, NULL));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "neither", tpla_export_create(&eo, &e_out));
  eo.paths = paths;
  eo.path_count = 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "1 sinks for an export of 2",
         tpla_export_create(&eo, &e_out));
  eo.path_count = 2;
  bufs[0] = big;
  bufs[1] = big + 32;
  eo.buffers = (uint8_t *const *)bufs;
  eo.buffer_count = 2;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "not both", tpla_export_create(&eo, &e_out));
  eo.buffers = NULL;
  eo.buffer_count = 0;
  seq_ids[1] = 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "", tpla_export_create(&eo, &e_out));
  seq_ids[1] = 2;
  eo.transforms = NULL;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "options->transforms is NULL",
         tpla_export_create(&eo, &e_out));
  transforms[0] = NULL;
  eo.transforms = transforms;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "options->transforms[0] is NULL",
         tpla_export_create(&eo, &e_out));
  transforms[0] = identity;
  eo.groups = 3;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "one of 1, 2, 4, 8", tpla_export_create(&eo, &e_out));
  eo.groups = 2;
  eo.struct_size = 16;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_export_options", tpla_export_create(&eo, &e_out));
  eo.struct_size = sizeof eo;
  CHECK_OK(tpla_export_create(&eo, &exp));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "export is NULL",
         tpla_export_next_block(NULL, &done, &layer_out, &seq_out));
  CHECK_OK(tpla_export_next_block(exp, &done, &layer_out, &seq_out));
  CHECK(!done && layer_out == 0 && seq_out == 1);
  for (i = 0; i < LEN * TEST_DC; i++) tokens[i] = (float)((i * 7) % 13) - 6.0f;
  for (i = 0; i < LEN * TEST_DR; i++) keys[i] = 0.125f * (float)(i % 5);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "expected 20 tokens",
         tpla_export_push(exp, tokens, (LEN - 1) * TEST_DC, keys, (LEN - 1) * TEST_DR));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "whole number",
         tpla_export_push(exp, tokens, 5, keys, LEN * TEST_DR));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "export is NULL",
         tpla_export_push(NULL, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  CHECK_OK(tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "incomplete", tpla_export_finish(exp));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "already finished", tpla_export_finish(exp));
  tpla_export_destroy(exp);
  f = fopen(path, "rb");
  CHECK(f == NULL); /* an unfinished export leaves no file behind */
  CHECK_OK(tpla_export_create(&eo, &exp));
  CHECK_OK(tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  CHECK_OK(tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "already written",
         tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  CHECK_OK(tpla_export_next_block(exp, &done, &layer_out, &seq_out));
  CHECK(done);
  CHECK_OK(tpla_export_finish(exp));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "already finished",
         tpla_export_push(exp, tokens, LEN * TEST_DC, keys, LEN * TEST_DR));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "already finished",
         tpla_export_next_block(exp, &done, &layer_out, &seq_out));
  tpla_export_destroy(exp);
  tpla_export_destroy(NULL);
  /* buffers of the wrong size */
  eo.paths = NULL;
  eo.path_count = 0;
  bufs[0] = big;
  bufs[1] = big + 32;
  eo.buffers = (uint8_t *const *)bufs;
  eo.buffer_count = 2;
  eo.buffer_len = 200;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "an export buffer overlaps an export buffer",
         tpla_export_create(&eo, &e_out));
  eo.buffer_len = 16;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "a shard image of this export is",
         tpla_export_create(&eo, &e_out));

  /* registration: the ctx_one_layer cache is single-layer, identity, group 0, f32, page 8 */
  {
    tpla_cache *one;
    co = cache_options(4);
    CHECK_OK(tpla_cache_create(ctx_one_layer, &co, &one));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "path is NULL", tpla_cache_register_file(one, NULL, &n));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL", tpla_cache_register_file(NULL, path, &n));
    sprintf(corrupt_path, "%s/errors-missing.shard", argv[1]);
    EXPECT(TPLA_STATUS_IO, "errors-missing.shard", tpla_cache_register_file(one, corrupt_path, &n));
    sprintf(corrupt_path, "%s/errors-corrupt.shard", argv[1]);
    f = fopen(corrupt_path, "wb");
    CHECK(f != NULL && fwrite(junk, 1, sizeof junk, f) == sizeof junk && fclose(f) == 0);
    EXPECT(TPLA_STATUS_CORRUPT_FILE, "", tpla_cache_register_file(one, corrupt_path, &n));
    EXPECT(TPLA_STATUS_MISMATCH, "", tpla_cache_register_file(one, group1_path, &n));
    CHECK_OK(tpla_cache_register_file(one, path, &n));
    CHECK(n == 2);
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "already in the cache",
           tpla_cache_register_file(one, path, NULL));
    /* a registered sequence grows past its last full page: needs a pool page */
    CHECK_OK(tpla_context_append_token(ctx_one_layer, one, 1, 0, latent, TEST_DC, k_rope,
                                       TEST_DR, TPLA_RMS_MODE_EXACT));
    CHECK_OK(tpla_cache_seq_len(one, 1, 0, &len));
    CHECK(len == LEN + 1);
    /* buffers: each failure releases the image once */
    release_calls = 0;
    EXPECT(TPLA_STATUS_CORRUPT_FILE, "",
           tpla_cache_register_buffer(one, junk, sizeof junk, count_release, NULL, &n));
    CHECK(release_calls == 1);
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "image is NULL",
           tpla_cache_register_buffer(one, NULL, 10, count_release, NULL, &n));
    CHECK(release_calls == 2);
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL",
           tpla_cache_register_buffer(NULL, junk, sizeof junk, count_release, NULL, &n));
    CHECK(release_calls == 3);
    EXPECT(TPLA_STATUS_CORRUPT_FILE, "", tpla_cache_register_buffer(one, junk, 10, NULL, NULL, &n));
    tpla_cache_destroy(one);
  }

  /* ---- combine ---- */
  bufs[0] = big;
  bufs[1] = big + 32;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "buffers is NULL", tpla_all_reduce_in_process(NULL, 2, 4));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "at least one buffer",
         tpla_all_reduce_in_process(bufs, 0, 4));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps", tpla_all_reduce_in_process(bufs, 2, 40));
  bufs[1] = big;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps", tpla_all_reduce_in_process(bufs, 2, 4));
  bufs[1] = NULL;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "is NULL", tpla_all_reduce_in_process(bufs, 2, 4));
  bufs[1] = (float *)((char *)big + 130);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "aligned", tpla_all_reduce_in_process(bufs, 2, 4));
  bufs[1] = big + 32;
  CHECK_OK(tpla_all_reduce_in_process(bufs, 2, 4));
  CHECK(big[0] == 32.0f && big[32] == 32.0f && big[3] == 38.0f && big[4] == 4.0f);
  EXPECT(TPLA_STATUS_BACKEND, "failed with 42", tpla_all_reduce_with(big, 4, failing_reduce, NULL));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "reduce is NULL", tpla_all_reduce_with(big, 4, NULL, NULL));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "buffer is NULL",
         tpla_all_reduce_with(NULL, 4, failing_reduce, NULL));

  /* ---- synthetic layers and the MLA reference ---- */
  bad_dims = d;
  bad_dims.d_r = 15;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "must be even", tpla_synthetic_create(bad_dims, 1, &s_out));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL", tpla_synthetic_create(d, 1, NULL));
  CHECK_OK(tpla_synthetic_create(d, 1, &syn));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "w_uk holds",
         tpla_synthetic_weights(syn, mla_uk, 3, mla_uv, H * TEST_DC * TEST_DV, gamma_, TEST_DC));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "synthetic is NULL",
         tpla_synthetic_weights(NULL, mla_uk, H * TEST_DC * TEST_DN, mla_uv,
                                H * TEST_DC * TEST_DV, gamma_, TEST_DC));
  CHECK_OK(tpla_synthetic_weights(syn, mla_uk, H * TEST_DC * TEST_DN, mla_uv,
                                  H * TEST_DC * TEST_DV, gamma_, TEST_DC));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "at least one token",
         tpla_synthetic_sequence(syn, 1, 0, tokens, 0, keys, 0, NULL, 0, NULL, 0));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latents holds",
         tpla_synthetic_sequence(syn, 1, LEN, tokens, 7, keys, LEN * TEST_DR, NULL, 0, NULL, 0));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "q_nope holds",
         tpla_synthetic_sequence(syn, 1, LEN, tokens, LEN * TEST_DC, keys, LEN * TEST_DR,
                                 q_nope, 8, q_rope, 8));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latents overlaps k_rope",
         tpla_synthetic_sequence(syn, 1, 1, tokens, TEST_DC, tokens + 4, TEST_DR, NULL, 0, NULL,
                                 0));
  CHECK_OK(tpla_synthetic_sequence(syn, 1, LEN, tokens, LEN * TEST_DC, keys, LEN * TEST_DR, NULL,
                                   0, NULL, 0));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "expected latents",
         tpla_mla_reference(d, &mw, tokens, LEN * TEST_DC, keys, LEN * TEST_DR - 1, q_nope,
                            H * TEST_DN, q_rope, H * TEST_DR, out, H * TEST_DV));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "expected latents",
         tpla_mla_reference(d, &mw, tokens, 0, keys, 0, q_nope, H * TEST_DN, q_rope,
                            H * TEST_DR, out, H * TEST_DV));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "out overlaps q_nope",
         tpla_mla_reference(d, &mw, tokens, LEN * TEST_DC, keys, LEN * TEST_DR, q_nope,
                            H * TEST_DN, q_rope, H * TEST_DR, q_nope, H * TEST_DV));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "out holds",
         tpla_mla_reference(d, &mw, tokens, LEN * TEST_DC, keys, LEN * TEST_DR, q_nope,
                            H * TEST_DN, q_rope, H * TEST_DR, out, 5));
  CHECK_OK(tpla_mla_reference(d, &mw, tokens, LEN * TEST_DC, keys, LEN * TEST_DR, q_nope,
                              H * TEST_DN, q_rope, H * TEST_DR, out, H * TEST_DV));
  for (i = 0; i < H * TEST_DV; i++) CHECK(isfinite(out[i]));
  tpla_synthetic_destroy(syn);
  tpla_synthetic_destroy(NULL);

  /* ---- device ranks and NCCL: the checks that come before any GPU or NCCL (what a
   * build or machine without them answers for valid arguments is in cuda.c) ---- */
  {
    tpla_device_rank *r_out = NULL;
    tpla_nccl_comm *n_out = NULL;
    tpla_device_rank_info ri;
    uint8_t id[TPLA_NCCL_UNIQUE_ID_BYTES + 1];
    int32_t slots[2];
    float lat_scale, rope_scale;
    memset(id, 0, sizeof id);
    memset(&ri, 0, sizeof ri);
    ri.struct_size = sizeof ri;
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL",
           tpla_device_rank_create(NULL, cache0, seq_ids, 2, 0, 2, &r_out));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL",
           tpla_device_rank_create(ctx0, NULL, seq_ids, 2, 0, 2, &r_out));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "seq_ids is NULL",
           tpla_device_rank_create(ctx0, cache0, NULL, 2, 0, 2, &r_out));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "at least one sequence",
           tpla_device_rank_create(ctx0, cache0, seq_ids, 0, 0, 2, &r_out));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL",
           tpla_device_rank_create(ctx0, cache0, seq_ids, 2, 0, 2, NULL));
    CHECK(r_out == NULL);
    tpla_device_rank_destroy(NULL);
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rank is NULL", tpla_device_rank_get_info(NULL, &ri));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rank is NULL",
           tpla_device_rank_query_scales(NULL, 0, &lat_scale, &rope_scale));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rank is NULL",
           tpla_device_rank_slots(NULL, seq_ids, 2, slots, 2));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rank is NULL",
           tpla_device_rank_decode(NULL, 0, slots, 2, q_rope, out, NULL));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "rank is NULL",
           tpla_device_rank_decode_host(NULL, 0, seq_ids, 2, q_rope, 4, out, 4));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "buf is NULL",
           tpla_nccl_unique_id(NULL, TPLA_NCCL_UNIQUE_ID_BYTES));
    EXPECT(TPLA_STATUS_BUFFER_TOO_SMALL, "is 128 bytes, buf holds 127",
           tpla_nccl_unique_id(id, TPLA_NCCL_UNIQUE_ID_BYTES - 1));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "id is NULL",
           tpla_nccl_comm_create(NULL, TPLA_NCCL_UNIQUE_ID_BYTES, 1, 0, 0, &n_out));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "128 bytes, got 129",
           tpla_nccl_comm_create(id, TPLA_NCCL_UNIQUE_ID_BYTES + 1, 1, 0, 0, &n_out));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "rank 1 of 1 ranks",
           tpla_nccl_comm_create(id, TPLA_NCCL_UNIQUE_ID_BYTES, 1, 1, 0, &n_out));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "rank 0 of 0 ranks",
           tpla_nccl_comm_create(id, TPLA_NCCL_UNIQUE_ID_BYTES, 0, 0, 0, &n_out));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "on device -1",
           tpla_nccl_comm_create(id, TPLA_NCCL_UNIQUE_ID_BYTES, 1, 0, -1, &n_out));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "out is NULL",
           tpla_nccl_comm_create(id, TPLA_NCCL_UNIQUE_ID_BYTES, 1, 0, 0, NULL));
    CHECK(n_out == NULL);
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "comm is NULL", tpla_nccl_all_reduce(NULL, out, 4, NULL));
    tpla_nccl_comm_destroy(NULL);
  }

  tpla_cache_destroy(cache0);
  tpla_cache_destroy(cache1);
  tpla_cache_destroy(cache_one_layer);
  tpla_cache_destroy(small);
  tpla_context_destroy(ctx0);
  tpla_context_destroy(ctx1);
  tpla_context_destroy(ctx_one_layer);
  tpla_context_destroy(ctx_unset);
  tpla_transform_destroy(hadamard);
  tpla_transform_destroy(identity);
  tpla_transform_destroy(other_width);

  if (failures > 0) {
    fprintf(stderr, "errors: %d of %d checks failed\n", failures, checked);
    return 1;
  }
  printf("errors: all %d error checks passed\n", checked);
  return 0;
}

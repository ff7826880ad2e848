/* sequence.c: exact sequence-sharded decode through tpla.h alone.
 *
 * One latent group (exact MLA) times two sequence shards of interleave 3. Every token
 * goes to the cache of the shard tpla_sequence_owner names (and all of them to a third
 * cache, the unsharded reference); a sequence of 1 token has none on shard 1. Each shard
 * decodes its tokens with tpla_context_decode_sequence_shard; the merges (a) in process,
 * (a) through engine callbacks, (b) in process and (b) by pack / sum / unpack must all
 * equal tpla_context_decode over the whole sequence to f32 rounding (relative L2 below
 * 1e-5). Then the planning queries and the error statuses. Then shard files cut by
 * sequence shard: the prefill is exported into one file per shard
 * (tpla_export_create_sequence_shards), each registers into its rank's cache only, the
 * last token of each sequence is appended at its position by the shard owning it, and the
 * merged decode equals the exact one again.
 *
 * Usage: sequence DIR (a directory for the shard files)
 */
#include "check.h"

#define SHARDS 2
#define INTERLEAVE 3
#define NSEQ 3
#define MAX_LEN 20

static int checked = 0, failures = 0;

#define ROWS (NSEQ * TEST_HEADS)
#define OUTS (ROWS * TEST_DV)

static const size_t lens[NSEQ] = {1, 7, 20};
static float want[OUTS], outs[SHARDS][OUTS], lses[SHARDS][ROWS], merged[SHARDS][OUTS];
static double bounds[SHARDS][ROWS];

static double rel_l2(const float *got, const float *ref, size_t n) {
  double num = 0, den = 0;
  size_t i;
  for (i = 0; i < n; i++) {
    double e = (double)got[i] - (double)ref[i];
    num += e * e;
    den += (double)ref[i] * ref[i];
  }
  return sqrt(num / den);
}

static void check_close(const float *got, const char *what) {
  double e = rel_l2(got, want, OUTS);
  if (!(e < 1e-5)) {
    fprintf(stderr, "%s: relative L2 error %g against exact decode\n", what, e);
    failures++;
  }
}

/* An in-process "engine communicator" for two ranks called one after the other: the
 * all-gather copies both shards' log-sum-exps (what a real all-gather returns); the
 * all-reduce of the first rank only records its buffer, that of the last rank sums
 * both and writes the sum into both, so both hold it once both calls returned. */
struct comm {
  const float *lses[SHARDS];
  float *pending[SHARDS];
  int calls, fail_gather;
};

static int gather(const float *send, size_t count, float *recv, void *user) {
  struct comm *c = (struct comm *)user;
  int j;
  (void)send;
  if (c->fail_gather) return 5;
  for (j = 0; j < SHARDS; j++) memcpy(recv + j * count, c->lses[j], count * sizeof(float));
  return 0;
}

static int reduce(float *buffer, size_t count, void *user) {
  struct comm *c = (struct comm *)user;
  size_t i;
  int j;
  c->pending[c->calls++] = buffer;
  if (c->calls < SHARDS) return 0;
  for (i = 0; i < count; i++) {
    float s = 0;
    for (j = 0; j < SHARDS; j++) s += c->pending[j][i];
    for (j = 0; j < SHARDS; j++) c->pending[j][i] = s;
  }
  return 0;
}

static tpla_shard_decode_args shard_args(const uint32_t *ids, const float *q_nope,
                                         const float *q_rope, int j, double rope_norm) {
  tpla_shard_decode_args a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.layer = 0;
  a.query_kind = TPLA_QUERY_KIND_NOPE;
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.seq_ids = ids;
  a.batch = NSEQ;
  a.queries = q_nope;
  a.queries_count = ROWS * TEST_DN;
  a.q_rope = q_rope;
  a.q_rope_count = ROWS * TEST_DR;
  a.out = outs[j];
  a.out_count = OUTS;
  a.lse = lses[j];
  a.lse_count = ROWS;
  a.bounds = bounds[j];
  a.bounds_count = ROWS;
  a.rope_key_norm = rope_norm;
  return a;
}

static void planning_queries(void) {
  tpla_sequence_sharding sh = {SHARDS, INTERLEAVE}, bad = {0, 1};
  tpla_hybrid_plan hp;
  tpla_hybrid_info info;
  tpla_dims v3;
  uint32_t shard, rank;
  uint64_t tokens, local;
  double bytes;
  CHECK_OK(tpla_sequence_sharding_validate(sh));
  CHECK_OK(tpla_sequence_owner(sh, 7, &shard));
  CHECK(shard == 0); /* block 2 of 3 tokens: shard 0 */
  CHECK_OK(tpla_sequence_owner(sh, 4, &shard));
  CHECK(shard == 1);
  CHECK_OK(tpla_sequence_tokens_on(sh, 1, 7, 10, &tokens, &local));
  CHECK(tokens == 3); /* positions 3, 4, 5 */
  CHECK(local == 4);  /* position 10 is row 4 of shard 1 (3 4 5 9 10 11 ...) */
  CHECK_OK(tpla_sequence_tokens_on(sh, 1, 2, 0, &tokens, NULL));
  CHECK(tokens == 0);

  CHECK_OK(tpla_dims_preset("deepseek-v3", &v3));
  hp.groups = 2;
  hp.sharding = sh;
  hp.rank = 3;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_hybrid_plan_info(v3, hp, &info));
  CHECK(info.ranks == 4 && info.group == 1 && info.shard == 1 && info.slice_width == 256);
  CHECK(info.context_plan.ranks == 2 && info.context_plan.groups == 2 &&
        info.context_plan.rank == 1);
  CHECK_OK(tpla_hybrid_owner_rank(v3, hp, 1, 4, &rank));
  CHECK(rank == 3);
  CHECK_OK(tpla_hybrid_owner_rank(v3, hp, 0, 7, &rank));
  CHECK(rank == 0);
  CHECK_OK(tpla_hybrid_bytes_per_token(v3, hp, TPLA_DTYPE_BF16, &bytes));
  CHECK(bytes == 320.0); /* (512/2 + 64) * 2 / 2 */
  CHECK_OK(tpla_hybrid_bytes_per_token(v3, hp, TPLA_DTYPE_FP8_E4M3, &bytes));
  CHECK(bytes == 196.0); /* (256 codes + 2 f32 scales + 64 bf16) / 2 */
  hp.groups = 1;
  hp.rank = 0;
  CHECK_OK(tpla_hybrid_bytes_per_token(v3, hp, TPLA_DTYPE_BF16, &bytes));
  CHECK(bytes == 576.0); /* (512 + 64) * 2 / 2: exact MLA's 1152 halved */

  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "sequence shards must lie in",
         tpla_sequence_sharding_validate(bad));
  bad.shards = 2;
  bad.interleave = 0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "interleave", tpla_sequence_owner(bad, 0, &shard));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "shard is NULL", tpla_sequence_owner(sh, 0, NULL));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence shard 2 is out of range",
         tpla_sequence_tokens_on(sh, 2, 10, 0, &tokens, NULL));
  hp.groups = 3;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "3", tpla_hybrid_plan_info(v3, hp, &info));
  hp.groups = 2;
  hp.rank = 4;
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "rank 4 is out of range", tpla_hybrid_plan_info(v3, hp, &info));
  hp.rank = 0;
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "latent group 2", tpla_hybrid_owner_rank(v3, hp, 2, 0, &rank));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "9", tpla_hybrid_bytes_per_token(v3, hp, 9, &bytes));
  info.struct_size = 8;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "struct_size is 8", tpla_hybrid_plan_info(v3, hp, &info));
}

/* The shard-file section: see the file comment. `ctx`, `transform` and `syn` as in main;
 * `want` holds the exact decode of the queries at the end of each sequence. */
static void shard_files(tpla_context *ctx, tpla_transform *transform, tpla_synthetic *syn,
                        const char *dir, double rope_norm, const float *q_nope,
                        const float *q_rope) {
  const tpla_sequence_sharding sh = {SHARDS, INTERLEAVE}, other = {SHARDS, 1};
  static float latents[NSEQ][MAX_LEN * TEST_DC], k_rope[NSEQ][MAX_LEN * TEST_DR];
  static float q_all_nope[MAX_LEN * TEST_HEADS * TEST_DN], q_all_rope[MAX_LEN * TEST_HEADS * TEST_DR];
  tpla_dims d = test_dims();
  uint32_t ids[NSEQ] = {10, 11, 12};
  uint64_t prefill[NSEQ];
  char names[SHARDS][512];
  const char *paths[SHARDS];
  const tpla_transform *transforms[1];
  tpla_export_options eo;
  tpla_export *ex;
  tpla_cache_options co;
  tpla_cache *fc[SHARDS], *wrong;
  tpla_sequence_sharding got;
  tpla_shard_decode_args sa;
  float *out_ptrs[SHARDS];
  const float *lse_ptrs[SHARDS];
  size_t s, n, len;
  uint32_t j, shard, owner;

  transforms[0] = transform;
  for (s = 0; s < NSEQ; s++) {
    size_t hn = (size_t)d.heads * d.d_n, hr = (size_t)d.heads * d.d_r;
    CHECK_OK(tpla_synthetic_sequence(syn, 900 + s, lens[s], latents[s], lens[s] * d.d_c,
                                     k_rope[s], lens[s] * d.d_r, q_all_nope, lens[s] * hn,
                                     q_all_rope, lens[s] * hr));
    /* every token but the last one (an export holds at least one token) */
    prefill[s] = lens[s] > 1 ? lens[s] - 1 : lens[s];
  }
  for (j = 0; j < SHARDS; j++) {
    snprintf(names[j], sizeof names[j], "%s/seq-shard-%u.tpla", dir, (unsigned)j);
    paths[j] = names[j];
  }
  memset(&eo, 0, sizeof eo);
  eo.struct_size = sizeof eo;
  eo.dims = d;
  eo.groups = 1;
  eo.dtype = TPLA_DTYPE_F32;
  eo.page_size = 4;
  eo.transforms = transforms;
  eo.layers = 1;
  eo.seq_ids = ids;
  eo.seq_lens = prefill;
  eo.sequences = NSEQ;
  eo.paths = paths;
  eo.path_count = SHARDS;
  CHECK_OK(tpla_export_image_len_of(&eo, sh, 1, &len));
  CHECK(len > 4096);
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "rank 2 is out of range",
         tpla_export_image_len_of(&eo, sh, 2, &len));
  eo.path_count = 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "needs 2", tpla_export_create_sequence_shards(&eo, sh, &ex));
  eo.path_count = SHARDS;
  CHECK_OK(tpla_export_create_sequence_shards(&eo, sh, &ex));
  for (s = 0; s < NSEQ; s++)
    CHECK_OK(tpla_export_push(ex, latents[s], prefill[s] * d.d_c, k_rope[s],
                              prefill[s] * d.d_r));
  CHECK_OK(tpla_export_finish(ex));
  tpla_export_destroy(ex);

  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_F32;
  co.page_size = 4;
  co.capacity_pages = 64;
  for (j = 0; j < SHARDS; j++) {
    CHECK_OK(tpla_cache_create_sequence_shard(ctx, &co, sh, j, &fc[j]));
    CHECK_OK(tpla_cache_sequence_shard(fc[j], &got, &shard));
    CHECK(got.shards == SHARDS && got.interleave == INTERLEAVE && shard == j);
    /* the other shard's file belongs to another rank */
    EXPECT(TPLA_STATUS_MISMATCH, "belongs to another rank",
           tpla_cache_register_file(fc[j], paths[1 - j], &n));
    CHECK_OK(tpla_cache_register_file(fc[j], paths[j], &n));
    CHECK(n == NSEQ);
  }
  /* another interleave, or no sequence sharding at all */
  CHECK_OK(tpla_cache_create_sequence_shard(ctx, &co, other, 0, &wrong));
  EXPECT(TPLA_STATUS_MISMATCH, "interleave 3", tpla_cache_register_file(wrong, paths[0], &n));
  tpla_cache_destroy(wrong);
  CHECK_OK(tpla_cache_create(ctx, &co, &wrong));
  EXPECT(TPLA_STATUS_MISMATCH, "cut for 2 sequence shards",
         tpla_cache_register_file(wrong, paths[0], &n));
  tpla_cache_destroy(wrong);
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence shard 2 is out of range",
         tpla_cache_create_sequence_shard(ctx, &co, sh, 2, &wrong));

  /* the last token of each sequence, at its position, on the shard owning it */
  for (s = 0; s < NSEQ; s++) {
    uint64_t t = lens[s] - 1;
    if (prefill[s] == lens[s]) continue;
    CHECK_OK(tpla_sequence_owner(sh, t, &owner));
    EXPECT(TPLA_STATUS_MISMATCH, "belongs to sequence shard",
           tpla_context_append_token_at(ctx, fc[1 - owner], ids[s], 0, t,
                                        latents[s] + t * d.d_c, d.d_c, k_rope[s] + t * d.d_r,
                                        d.d_r, TPLA_RMS_MODE_EXACT));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "append by position",
           tpla_context_append_token(ctx, fc[owner], ids[s], 0, latents[s] + t * d.d_c, d.d_c,
                                     k_rope[s] + t * d.d_r, d.d_r, TPLA_RMS_MODE_EXACT));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "next token this cache holds",
           tpla_context_append_token_at(ctx, fc[owner], ids[s], 0, t + 1,
                                        latents[s] + t * d.d_c, d.d_c, k_rope[s] + t * d.d_r,
                                        d.d_r, TPLA_RMS_MODE_EXACT));
    CHECK_OK(tpla_context_append_token_at(ctx, fc[owner], ids[s], 0, t,
                                          latents[s] + t * d.d_c, d.d_c,
                                          k_rope[s] + t * d.d_r, d.d_r, TPLA_RMS_MODE_EXACT));
  }
  {
    float row[TEST_DC + TEST_DR];
    memset(row, 0, sizeof row);
    EXPECT(TPLA_STATUS_MISMATCH, "belongs to sequence shard 0",
           tpla_cache_append_rows_at(fc[1], 12, 0, 0, row, TEST_DC + TEST_DR));
  }

  for (j = 0; j < SHARDS; j++) {
    sa = shard_args(ids, q_nope, q_rope, (int)j, rope_norm);
    CHECK_OK(tpla_context_decode_sequence_shard(ctx, fc[j], &sa));
    memcpy(merged[j], outs[j], sizeof merged[j]);
    out_ptrs[j] = merged[j];
    lse_ptrs[j] = lses[j];
  }
  CHECK_OK(tpla_sequence_merge_lse_in_process(SHARDS, SHARDS, ROWS, TEST_DV, out_ptrs, lse_ptrs));
  check_close(merged[0], "merge (a) over shard files");
  for (j = 0; j < SHARDS; j++) tpla_cache_destroy(fc[j]);
}

int main(int argc, char **argv) {
  const tpla_backend_options cpu2 = backend_options(TPLA_BACKEND_CPU, 2);
  const tpla_sequence_sharding sh = {SHARDS, INTERLEAVE};
  tpla_dims d = test_dims();
  tpla_context_options o;
  tpla_context *ctx;
  tpla_cache *full, *shard[SHARDS];
  tpla_cache_options co;
  tpla_synthetic *syn;
  tpla_transform_desc td;
  tpla_transform *transform;
  tpla_mla_weights mla;
  tpla_layer_weights lw;
  tpla_decode_args da;
  tpla_shard_decode_args sa;
  size_t w_uk_n = (size_t)d.heads * d.d_c * d.d_n, w_uv_n = (size_t)d.heads * d.d_c * d.d_v;
  float *uk = (float *)xcalloc(w_uk_n, sizeof(float)), *uv = (float *)xcalloc(w_uv_n, sizeof(float));
  float *suk = (float *)xcalloc(w_uk_n, sizeof(float)), *suv = (float *)xcalloc(w_uv_n, sizeof(float));
  float gamma[TEST_DC];
  static float latents[MAX_LEN * TEST_DC], k_rope[MAX_LEN * TEST_DR];
  static float q_all_nope[MAX_LEN * TEST_HEADS * TEST_DN], q_all_rope[MAX_LEN * TEST_HEADS * TEST_DR];
  static float q_nope[ROWS * TEST_DN], q_rope[ROWS * TEST_DR];
  static double packed[SHARDS][ROWS * (TEST_DV + 2)];
  float gathered[SHARDS * ROWS];
  float *out_ptrs[SHARDS];
  const float *lse_ptrs[SHARDS];
  const double *bound_ptrs[SHARDS];
  uint32_t ids[NSEQ] = {10, 11, 12};
  double rope_norm = 0;
  size_t s, t, i, row_len;
  int j;
  struct comm comm;

  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  planning_queries();

  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = d;
  o.plan.ranks = 1;
  o.plan.groups = 1;
  o.plan.rank = 0;
  o.layers = 1;
  CHECK_OK(tpla_context_create(&o, &cpu2, &ctx));
  memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = TPLA_TRANSFORM_KIND_HADAMARD;
  td.d_c = d.d_c;
  td.seed = 3;
  CHECK_OK(tpla_transform_create(&td, &transform));
  CHECK_OK(tpla_synthetic_create(d, 77, &syn));
  CHECK_OK(tpla_synthetic_weights(syn, uk, w_uk_n, uv, w_uv_n, gamma, d.d_c));
  memset(&mla, 0, sizeof mla);
  mla.struct_size = sizeof mla;
  mla.w_uk = uk;
  mla.w_uk_count = w_uk_n;
  mla.w_uv = uv;
  mla.w_uv_count = w_uv_n;
  mla.gamma = gamma;
  mla.gamma_count = d.d_c;
  CHECK_OK(tpla_fold_layer(d, o.plan, &mla, transform, suk, w_uk_n, suv, w_uv_n));
  memset(&lw, 0, sizeof lw);
  lw.struct_size = sizeof lw;
  lw.w_uk = suk;
  lw.w_uk_count = w_uk_n;
  lw.w_uv = suv;
  lw.w_uv_count = w_uv_n;
  lw.mu = 1.0;
  lw.slice_fraction = 1.0;
  lw.transform = transform;
  CHECK_OK(tpla_context_set_layer(ctx, 0, &lw));

  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = TPLA_DTYPE_F32;
  co.page_size = 4;
  co.capacity_pages = 64;
  CHECK_OK(tpla_cache_create(ctx, &co, &full));
  for (j = 0; j < SHARDS; j++) CHECK_OK(tpla_cache_create(ctx, &co, &shard[j]));

  for (s = 0; s < NSEQ; s++) {
    size_t hn = (size_t)d.heads * d.d_n, hr = (size_t)d.heads * d.d_r;
    CHECK_OK(tpla_synthetic_sequence(syn, 900 + s, lens[s], latents, lens[s] * d.d_c, k_rope,
                                     lens[s] * d.d_r, q_all_nope, lens[s] * hn, q_all_rope,
                                     lens[s] * hr));
    memcpy(q_nope + s * hn, q_all_nope + (lens[s] - 1) * hn, hn * sizeof(float));
    memcpy(q_rope + s * hr, q_all_rope + (lens[s] - 1) * hr, hr * sizeof(float));
    CHECK_OK(tpla_cache_add_sequence(full, ids[s]));
    for (j = 0; j < SHARDS; j++) CHECK_OK(tpla_cache_add_sequence(shard[j], ids[s]));
    for (t = 0; t < lens[s]; t++) {
      uint32_t owner;
      double n2 = 0;
      for (i = 0; i < d.d_r; i++) n2 += (double)k_rope[t * d.d_r + i] * k_rope[t * d.d_r + i];
      if (sqrt(n2) > rope_norm) rope_norm = sqrt(n2);
      CHECK_OK(tpla_sequence_owner(sh, t, &owner));
      CHECK_OK(tpla_context_append_token(ctx, full, ids[s], 0, latents + t * d.d_c, d.d_c,
                                         k_rope + t * d.d_r, d.d_r, TPLA_RMS_MODE_EXACT));
      CHECK_OK(tpla_context_append_token(ctx, shard[owner], ids[s], 0, latents + t * d.d_c,
                                         d.d_c, k_rope + t * d.d_r, d.d_r,
                                         TPLA_RMS_MODE_EXACT));
    }
    for (j = 0; j < SHARDS; j++) {
      uint64_t tokens;
      size_t held;
      CHECK_OK(tpla_sequence_tokens_on(sh, (uint32_t)j, lens[s], 0, &tokens, NULL));
      CHECK_OK(tpla_cache_seq_len(shard[j], ids[s], 0, &held));
      CHECK(held == tokens);
    }
  }

  /* the reference: exact decode over every token */
  memset(&da, 0, sizeof da);
  da.struct_size = sizeof da;
  da.layer = 0;
  da.query_kind = TPLA_QUERY_KIND_NOPE;
  da.output_kind = TPLA_OUTPUT_KIND_HEADS;
  da.seq_ids = ids;
  da.batch = NSEQ;
  da.queries = q_nope;
  da.queries_count = ROWS * TEST_DN;
  da.q_rope = q_rope;
  da.q_rope_count = ROWS * TEST_DR;
  da.out = want;
  da.out_count = OUTS;
  CHECK_OK(tpla_context_decode(ctx, full, &da));

  for (j = 0; j < SHARDS; j++) {
    sa = shard_args(ids, q_nope, q_rope, j, rope_norm);
    CHECK_OK(tpla_context_decode_sequence_shard(ctx, shard[j], &sa));
    out_ptrs[j] = merged[j];
    lse_ptrs[j] = lses[j];
    bound_ptrs[j] = bounds[j];
  }
  /* sequence 10 (1 token) has none on shard 1: zeros and -inf */
  for (i = 0; i < TEST_HEADS; i++) CHECK(isinf(lses[1][i]) && lses[1][i] < 0);
  for (i = 0; i < TEST_HEADS * TEST_DV; i++) CHECK(outs[1][i] == 0.0f);
  /* every shard of the group computed the same bounds, above its log-sum-exps */
  for (i = 0; i < ROWS; i++) {
    CHECK(bounds[0][i] == bounds[1][i]);
    CHECK(bounds[0][i] >= lses[0][i]);
  }

  /* (a) in process */
  for (j = 0; j < SHARDS; j++) memcpy(merged[j], outs[j], sizeof merged[j]);
  CHECK_OK(tpla_sequence_merge_lse_in_process(SHARDS, SHARDS, ROWS, TEST_DV, out_ptrs, lse_ptrs));
  check_close(merged[0], "merge (a) in process, shard 0");
  CHECK(memcmp(merged[0], merged[1], sizeof merged[0]) == 0);

  /* (b) in process */
  for (j = 0; j < SHARDS; j++) memcpy(merged[j], outs[j], sizeof merged[j]);
  CHECK_OK(tpla_sequence_merge_packed_in_process(SHARDS, SHARDS, ROWS, TEST_DV, out_ptrs,
                                                 lse_ptrs, bound_ptrs));
  check_close(merged[0], "merge (b) in process, shard 0");
  CHECK(memcmp(merged[0], merged[1], sizeof merged[0]) == 0);

  /* (a) through the engine's communicators */
  memset(&comm, 0, sizeof comm);
  for (j = 0; j < SHARDS; j++) {
    comm.lses[j] = lses[j];
    memcpy(merged[j], outs[j], sizeof merged[j]);
  }
  for (j = 0; j < SHARDS; j++)
    CHECK_OK(tpla_sequence_merge_lse_with((size_t)j, SHARDS, ROWS, TEST_DV, merged[j], lses[j],
                                          gathered, gather, reduce, &comm));
  check_close(merged[0], "merge (a) through callbacks, shard 0");
  check_close(merged[1], "merge (a) through callbacks, shard 1");

  /* (b) by pack, the engine's f64 sum, unpack */
  row_len = tpla_sequence_packed_row_len(TEST_DV);
  CHECK(row_len == TEST_DV + 2);
  for (j = 0; j < SHARDS; j++)
    CHECK_OK(tpla_sequence_pack(ROWS, TEST_DV, outs[j], lses[j], bounds[j], packed[j],
                                ROWS * row_len));
  for (i = 0; i < ROWS * row_len; i++) packed[0][i] += packed[1][i];
  CHECK_OK(tpla_sequence_unpack(ROWS, TEST_DV, packed[0], ROWS * row_len, merged[0]));
  check_close(merged[0], "merge (b) by pack and unpack");

  /* errors */
  sa = shard_args(ids, q_nope, q_rope, 0, rope_norm);
  sa.output_kind = 7;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown output_kind 7",
         tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  sa = shard_args(ids, q_nope, q_rope, 0, rope_norm);
  sa.lse_count = ROWS - 1;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "log-sum-exp",
         tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  sa = shard_args(ids, q_nope, q_rope, 0, -1.0);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "RoPE key norm",
         tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  sa = shard_args(ids, q_nope, q_rope, 0, rope_norm);
  sa.lse = (float *)q_nope;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps",
         tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  sa = shard_args(ids, q_nope, q_rope, 0, rope_norm);
  sa.struct_size = 3;
  EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "tpla_shard_decode_args",
         tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  ids[0] = 99;
  sa = shard_args(ids, q_nope, q_rope, 0, rope_norm);
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "99", tpla_context_decode_sequence_shard(ctx, shard[0], &sa));
  ids[0] = 10;
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache is NULL",
         tpla_context_decode_sequence_shard(ctx, NULL, &sa));

  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "groups of 2",
         tpla_sequence_merge_lse_in_process(2, 1, ROWS, TEST_DV, out_ptrs, lse_ptrs));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "outs is NULL",
         tpla_sequence_merge_lse_in_process(2, 2, ROWS, TEST_DV, NULL, lse_ptrs));
  out_ptrs[1] = merged[0];
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps",
         tpla_sequence_merge_lse_in_process(2, 2, ROWS, TEST_DV, out_ptrs, lse_ptrs));
  out_ptrs[1] = merged[1];
  for (i = 0; i < ROWS; i++) bounds[1][i] = bounds[0][i] - 800.0;
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "above its logit bound",
         tpla_sequence_merge_packed_in_process(SHARDS, SHARDS, ROWS, TEST_DV, out_ptrs, lse_ptrs,
                                               bound_ptrs));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "above its logit bound",
         tpla_sequence_pack(ROWS, TEST_DV, outs[1], lses[0], bounds[1], packed[1],
                            ROWS * row_len));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "packed rows",
         tpla_sequence_pack(ROWS, TEST_DV, outs[0], lses[0], bounds[0], packed[0], 5));
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "packed holds 5",
         tpla_sequence_unpack(ROWS, TEST_DV, packed[0], 5, merged[0]));
  EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence shard 2 is out of range",
         tpla_sequence_merge_lse_with(2, SHARDS, ROWS, TEST_DV, merged[0], lses[0], gathered,
                                      gather, reduce, &comm));
  EXPECT(TPLA_STATUS_NULL_ARGUMENT, "gather is NULL",
         tpla_sequence_merge_lse_with(0, SHARDS, ROWS, TEST_DV, merged[0], lses[0], gathered, NULL,
                                      reduce, &comm));
  comm.fail_gather = 1;
  EXPECT(TPLA_STATUS_BACKEND, "all-gather callback failed with 5",
         tpla_sequence_merge_lse_with(0, SHARDS, ROWS, TEST_DV, merged[0], lses[0], gathered,
                                      gather, reduce, &comm));

  shard_files(ctx, transform, syn, argv[1], rope_norm, q_nope, q_rope);

  tpla_cache_destroy(full);
  for (j = 0; j < SHARDS; j++) tpla_cache_destroy(shard[j]);
  tpla_context_destroy(ctx);
  tpla_transform_destroy(transform);
  tpla_synthetic_destroy(syn);
  free(uk), free(uv), free(suk), free(suv);
  if (failures) {
    fprintf(stderr, "sequence: %d of %d checks failed\n", failures, checked);
    return 1;
  }
  printf("sequence: ok\n");
  return 0;
}

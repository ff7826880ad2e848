/* happy.c: the whole TPLA decode flow through tpla.h alone.
 *
 * Two layers, two ranks (g = 2), two sequences. A prefill exports the sequences' caches
 * to shard files and to buffers; rank 0 registers its file, rank 1 its buffer (zero
 * copy). Each decode step appends one token per sequence and layer, decodes layer 0 to
 * head outputs (queries as q_nope, and again as absorbed latent queries on rank 1),
 * combines them in process and through a callback, and decodes layer 1 to latent
 * outputs. Every output goes to RECORD in order (raw float32); tests/c_abi.rs runs the
 * same flow through the Rust API and compares the two bit for bit. The same ranks loaded
 * from the converted weights files WORK_DIR/rank{0,1}.weights (written by the Rust side
 * from the same weights) must decode the same bits.
 *
 * Usage: happy RECORD WORK_DIR
 */
#include "check.h"

#define LAYERS 2
#define RANKS 2
#define NSEQ 2
#define STEPS 3

static const uint32_t SEQ_IDS[NSEQ] = {3, 8};
static const size_t SEQ_LENS[NSEQ] = {40, 70}; /* tokens in all; prefill = len - STEPS */

struct layer_data {
  tpla_synthetic *synthetic;
  tpla_transform *transform;
  tpla_mla_weights mla;
  float *latents[NSEQ], *k_rope[NSEQ], *q_nope[NSEQ], *q_rope[NSEQ];
};

static FILE *record;

static void put(const float *values, size_t count) {
  CHECK(fwrite(values, sizeof(float), count, record) == count);
}

/* The fake communicator of tpla_all_reduce_with: every rank's buffer becomes the sum of
 * the ranks' original partial outputs, summed in rank order. */
struct communicator {
  const float *originals[RANKS];
  int calls;
};

static int32_t sum_over_ranks(float *buffer, size_t count, void *user) {
  struct communicator *c = (struct communicator *)user;
  size_t i;
  int r;
  for (i = 0; i < count; i++) {
    float s = 0.0f;
    for (r = 0; r < RANKS; r++) s += c->originals[r][i];
    buffer[i] = s;
  }
  c->calls++;
  return 0;
}

static void release_buffer(void *user) {
  int *released = (int *)user;
  (*released)++;
}

static unsigned char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  unsigned char *data;
  long n;
  CHECK(f != NULL);
  CHECK(fseek(f, 0, SEEK_END) == 0);
  n = ftell(f);
  CHECK(n > 0);
  CHECK(fseek(f, 0, SEEK_SET) == 0);
  data = (unsigned char *)xcalloc((size_t)n, 1);
  CHECK(fread(data, 1, (size_t)n, f) == (size_t)n);
  fclose(f);
  *len = (size_t)n;
  return data;
}

int main(int argc, char **argv) {
  const tpla_dims d = test_dims();
  const tpla_backend_options cpu2 = backend_options(TPLA_BACKEND_CPU, 2);
  struct layer_data layers[LAYERS];
  const tpla_transform *transforms[LAYERS];
  tpla_context *ctx[RANKS], *file_ctx[RANKS];
  tpla_cache *cache[RANKS];
  tpla_context_info info;
  tpla_cache_info cinfo;
  tpla_export_options eo;
  tpla_export *exp;
  char paths[RANKS][4096];
  const char *path_list[RANKS];
  unsigned char *images[RANKS];
  size_t image_len, file_len, len, n, i;
  uint64_t prefill[NSEQ];
  int released = 0;
  int l, r, s, step;
  bool done;
  uint32_t next_layer, next_seq, ids[4];
  size_t w_uk_n, w_uv_n, slice_w_uk_n, slice_w_uv_n;
  float *slice_w_uk[LAYERS][RANKS], *slice_w_uv[LAYERS][RANKS];

  if (argc != 3) {
    fprintf(stderr, "usage: %s RECORD WORK_DIR\n", argv[0]);
    return 2;
  }
  record = fopen(argv[1], "wb");
  CHECK(record != NULL);

  CHECK(tpla_abi_version() == TPLA_ABI_VERSION);
  {
    char want[64];
    sprintf(want, "%d.%d.%d", TPLA_VERSION_MAJOR, TPLA_VERSION_MINOR, TPLA_VERSION_PATCH);
    CHECK(strcmp(tpla_version(), want) == 0);
  }

  /* Weights, transforms and token data of each layer. */
  w_uk_n = (size_t)d.heads * d.d_c * d.d_n;
  w_uv_n = (size_t)d.heads * d.d_c * d.d_v;
  for (l = 0; l < LAYERS; l++) {
    struct layer_data *L = &layers[l];
    tpla_transform_desc td;
    memset(&td, 0, sizeof td);
    td.struct_size = sizeof td;
    td.kind = l == 0 ? TPLA_TRANSFORM_KIND_HADAMARD : TPLA_TRANSFORM_KIND_IDENTITY;
    td.d_c = d.d_c;
    td.seed = l == 0 ? 5 : 0;
    CHECK_OK(tpla_transform_create(&td, &L->transform));
    transforms[l] = L->transform;
    CHECK_OK(tpla_synthetic_create(d, 11 + (uint64_t)l, &L->synthetic));
    memset(&L->mla, 0, sizeof L->mla);
    L->mla.struct_size = sizeof L->mla;
    L->mla.w_uk = (float *)xcalloc(w_uk_n, sizeof(float));
    L->mla.w_uk_count = w_uk_n;
    L->mla.w_uv = (float *)xcalloc(w_uv_n, sizeof(float));
    L->mla.w_uv_count = w_uv_n;
    L->mla.gamma = (float *)xcalloc(d.d_c, sizeof(float));
    L->mla.gamma_count = d.d_c;
    CHECK_OK(tpla_synthetic_weights(L->synthetic, (float *)L->mla.w_uk, w_uk_n,
                                    (float *)L->mla.w_uv, w_uv_n, (float *)L->mla.gamma,
                                    d.d_c));
    for (s = 0; s < NSEQ; s++) {
      size_t t = SEQ_LENS[s];
      L->latents[s] = (float *)xcalloc(t * d.d_c, sizeof(float));
      L->k_rope[s] = (float *)xcalloc(t * d.d_r, sizeof(float));
      L->q_nope[s] = (float *)xcalloc(t * d.heads * d.d_n, sizeof(float));
      L->q_rope[s] = (float *)xcalloc(t * d.heads * d.d_r, sizeof(float));
      CHECK_OK(tpla_synthetic_sequence(L->synthetic, 100 + SEQ_IDS[s], t, L->latents[s],
                                       t * d.d_c, L->k_rope[s], t * d.d_r, L->q_nope[s],
                                       t * d.heads * d.d_n, L->q_rope[s],
                                       t * d.heads * d.d_r));
    }
  }

  /* The prefill: export the first len - STEPS tokens of each sequence, once to files and
   * once to buffers; both must hold the same bytes. */
  for (s = 0; s < NSEQ; s++) prefill[s] = SEQ_LENS[s] - STEPS;
  memset(&eo, 0, sizeof eo);
  eo.struct_size = sizeof eo;
  eo.dims = d;
  eo.groups = RANKS;
  eo.dtype = TPLA_DTYPE_BF16;
  eo.page_size = 16;
  eo.transforms = transforms;
  eo.layers = LAYERS;
  eo.seq_ids = SEQ_IDS;
  eo.seq_lens = prefill;
  eo.sequences = NSEQ;
  CHECK_OK(tpla_export_image_len(&eo, &image_len));
  for (r = 0; r < RANKS; r++) {
    sprintf(paths[r], "%s/rank%d.shard", argv[2], r);
    path_list[r] = paths[r];
    images[r] = (unsigned char *)xcalloc(image_len, 1);
  }
  for (i = 0; i < 2; i++) {
    if (i == 0) {
      eo.paths = path_list;
      eo.path_count = RANKS;
    } else {
      eo.paths = NULL;
      eo.path_count = 0;
      eo.buffers = images;
      eo.buffer_count = RANKS;
      eo.buffer_len = image_len;
    }
    CHECK_OK(tpla_export_create(&eo, &exp));
    for (;;) {
      CHECK_OK(tpla_export_next_block(exp, &done, &next_layer, &next_seq));
      if (done) break;
      s = next_seq == SEQ_IDS[0] ? 0 : 1;
      CHECK(next_seq == SEQ_IDS[s]);
      CHECK_OK(tpla_export_push(exp, layers[next_layer].latents[s], prefill[s] * d.d_c,
                                layers[next_layer].k_rope[s], prefill[s] * d.d_r));
    }
    CHECK_OK(tpla_export_finish(exp));
    tpla_export_destroy(exp);
  }
  for (r = 0; r < RANKS; r++) {
    unsigned char *file = read_file(paths[r], &file_len);
    CHECK(file_len == image_len && memcmp(file, images[r], image_len) == 0);
    free(file);
  }

  /* One context and one cache per rank. */
  for (r = 0; r < RANKS; r++) {
    tpla_context_options o;
    tpla_cache_options co;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.dims = d;
    o.plan.ranks = RANKS;
    o.plan.groups = RANKS;
    o.plan.rank = (uint32_t)r;
    o.layers = LAYERS;
    CHECK_OK(tpla_context_create(&o, &cpu2, &ctx[r]));
    {
      char weights[4096 + 32];
      tpla_context_info from_file;
      sprintf(weights, "%s/rank%d.weights", argv[2], r);
      CHECK_OK(tpla_context_create_from_weights_file(weights, &cpu2, &file_ctx[r]));
      memset(&from_file, 0, sizeof from_file);
      from_file.struct_size = sizeof from_file;
      CHECK_OK(tpla_context_get_info(file_ctx[r], &from_file));
      CHECK(from_file.plan.rank == (uint32_t)r && from_file.layers == LAYERS);
      CHECK(from_file.dims.d_v == d.d_v && from_file.dims.softmax_scale == d.softmax_scale);
    }
    CHECK(strncmp(tpla_context_backend_name(ctx[r]), "cpu", 3) == 0);
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_OK(tpla_context_get_info(ctx[r], &info));
    CHECK(info.heads == d.heads && info.group == (uint32_t)r && info.layers == LAYERS);
    CHECK(info.slice_width == d.d_c / RANKS && info.slice_start == info.slice_width * r);
    CHECK(info.row_width == info.slice_width + d.d_r && info.plan.rank == (uint32_t)r);
    slice_w_uk_n = (size_t)info.heads * info.slice_width * d.d_n;
    slice_w_uv_n = (size_t)info.heads * info.slice_width * d.d_v;
    for (l = 0; l < LAYERS; l++) {
      tpla_layer_weights lw;
      slice_w_uk[l][r] = (float *)xcalloc(slice_w_uk_n, sizeof(float));
      slice_w_uv[l][r] = (float *)xcalloc(slice_w_uv_n, sizeof(float));
      CHECK_OK(tpla_fold_layer(d, o.plan, &layers[l].mla, layers[l].transform, slice_w_uk[l][r],
                               slice_w_uk_n, slice_w_uv[l][r], slice_w_uv_n));
      memset(&lw, 0, sizeof lw);
      lw.struct_size = sizeof lw;
      lw.w_uk = slice_w_uk[l][r];
      lw.w_uk_count = slice_w_uk_n;
      lw.w_uv = slice_w_uv[l][r];
      lw.w_uv_count = slice_w_uv_n;
      lw.mu = 1.0 + 0.25 * r;
      lw.slice_fraction = 0.5;
      lw.transform = layers[l].transform;
      CHECK_OK(tpla_context_set_layer(ctx[r], (uint32_t)l, &lw));
    }
    memset(&co, 0, sizeof co);
    co.struct_size = sizeof co;
    co.dtype = TPLA_DTYPE_BF16;
    co.page_size = 16;
    co.capacity_pages = 64;
    CHECK_OK(tpla_cache_create(ctx[r], &co, &cache[r]));
  }
  CHECK_OK(tpla_cache_register_file(cache[0], paths[0], &n));
  CHECK(n == NSEQ);
  CHECK_OK(tpla_cache_register_buffer(cache[1], images[1], image_len, release_buffer, &released,
                                      &n));
  CHECK(n == NSEQ);
  /* An FP8 cache of rank 0 refuses the bf16 shard (another dtype's file), unchanged. */
  {
    tpla_cache *fp8;
    tpla_cache_options co;
    tpla_cache_info fi;
    memset(&co, 0, sizeof co);
    co.struct_size = sizeof co;
    co.dtype = TPLA_DTYPE_FP8_E4M3;
    co.page_size = 16;
    co.capacity_pages = 8;
    CHECK_OK(tpla_cache_create(ctx[0], &co, &fp8));
    memset(&fi, 0, sizeof fi);
    fi.struct_size = sizeof fi;
    CHECK_OK(tpla_cache_get_info(fp8, &fi));
    CHECK(fi.dtype == TPLA_DTYPE_FP8_E4M3 && fi.free_pages == 8);
    CHECK(tpla_cache_register_file(fp8, paths[0], &n) == TPLA_STATUS_MISMATCH);
    CHECK(strstr(tpla_last_error_message(), "fp8_e4m3") != NULL);
    CHECK_OK(tpla_cache_get_info(fp8, &fi));
    CHECK(fi.sequences == 0 && fi.free_pages == 8 && fi.registered_images == 0);
    tpla_cache_destroy(fp8);
  }
  for (r = 0; r < RANKS; r++) {
    CHECK_OK(tpla_cache_sequence_ids(cache[r], ids, 4, &n));
    CHECK(n == NSEQ && ids[0] == SEQ_IDS[0] && ids[1] == SEQ_IDS[1]);
    CHECK_OK(tpla_cache_seq_len(cache[r], SEQ_IDS[1], 1, &len));
    CHECK(len == prefill[1]);
  }

  /* Decode steps. */
  for (step = 0; step < STEPS; step++) {
    enum { H = TEST_HEADS, W = TEST_DC / RANKS, HEADS_OUT = NSEQ * TEST_HEADS * TEST_DV };
    float q_nope[NSEQ * H * TEST_DN], q_rope[NSEQ * H * TEST_DR], q_lat[NSEQ * H * W];
    float heads[RANKS][HEADS_OUT], via_callback[RANKS][HEADS_OUT], originals[RANKS][HEADS_OUT];
    float latent_heads[HEADS_OUT], latent[NSEQ * H * W], lse[NSEQ * H];
    float again[HEADS_OUT], again_latent[NSEQ * H * W], again_lse[NSEQ * H];
    float *bufs[RANKS];
    struct communicator comm;
    tpla_decode_args a;
    size_t h, j, k;

    /* The new token of every sequence, in every layer, on every rank. */
    for (r = 0; r < RANKS; r++)
      for (s = 0; s < NSEQ; s++)
        for (l = 0; l < LAYERS; l++) {
          size_t t = prefill[s] + (size_t)step;
          CHECK_OK(tpla_context_append_token(
              ctx[r], cache[r], SEQ_IDS[s], (uint32_t)l, layers[l].latents[s] + t * d.d_c,
              d.d_c, layers[l].k_rope[s] + t * d.d_r, d.d_r,
              l == 0 ? TPLA_RMS_MODE_EXACT : TPLA_RMS_MODE_SLICED));
        }
    for (r = 0; r < RANKS; r++) {
      CHECK_OK(tpla_cache_seq_len(cache[r], SEQ_IDS[0], 0, &len));
      CHECK(len == prefill[0] + (size_t)step + 1);
    }

    for (l = 0; l < LAYERS; l++) {
      /* The queries of each sequence's newest position. */
      for (s = 0; s < NSEQ; s++) {
        size_t t = prefill[s] + (size_t)step;
        memcpy(q_nope + s * H * TEST_DN, layers[l].q_nope[s] + t * H * TEST_DN,
               H * TEST_DN * sizeof(float));
        memcpy(q_rope + s * H * TEST_DR, layers[l].q_rope[s] + t * H * TEST_DR,
               H * TEST_DR * sizeof(float));
      }
      memset(&a, 0, sizeof a);
      a.struct_size = sizeof a;
      a.layer = (uint32_t)l;
      a.query_kind = TPLA_QUERY_KIND_NOPE;
      a.seq_ids = SEQ_IDS;
      a.batch = NSEQ;
      a.queries = q_nope;
      a.queries_count = NSEQ * H * TEST_DN;
      a.q_rope = q_rope;
      a.q_rope_count = NSEQ * H * TEST_DR;
      if (l == 0) {
        a.output_kind = TPLA_OUTPUT_KIND_HEADS;
        a.out_count = HEADS_OUT;
        for (r = 0; r < RANKS; r++) {
          a.out = heads[r];
          CHECK_OK(tpla_context_decode(ctx[r], cache[r], &a));
          a.out = again;
          CHECK_OK(tpla_context_decode(file_ctx[r], cache[r], &a));
          CHECK(memcmp(again, heads[r], sizeof again) == 0);
          memcpy(originals[r], heads[r], sizeof heads[r]);
          memcpy(via_callback[r], heads[r], sizeof heads[r]);
          comm.originals[r] = originals[r];
        }
        /* Rank 1 again, from absorbed latent queries W'_UK q_nope computed here. */
        for (s = 0; s < NSEQ; s++)
          for (h = 0; h < H; h++)
            for (j = 0; j < W; j++) {
              double acc = 0.0;
              for (k = 0; k < TEST_DN; k++)
                acc += (double)slice_w_uk[0][1][(h * W + j) * TEST_DN + k] *
                       (double)q_nope[(s * H + h) * TEST_DN + k];
              q_lat[(s * H + h) * W + j] = (float)acc;
            }
        a.query_kind = TPLA_QUERY_KIND_LATENT;
        a.queries = q_lat;
        a.queries_count = NSEQ * H * W;
        a.out = latent_heads;
        CHECK_OK(tpla_context_decode(ctx[1], cache[1], &a));
        put(latent_heads, HEADS_OUT);
        /* The same queries joined FlashMLA-style, [latent | rope] per head: the same bits. */
        {
          static float joined[NSEQ * H * (W + TEST_DR)];
          float joined_heads[HEADS_OUT];
          for (s = 0; s < NSEQ; s++)
            for (h = 0; h < H; h++) {
              memcpy(joined + (s * H + h) * (W + TEST_DR), q_lat + (s * H + h) * W, W * sizeof(float));
              memcpy(joined + (s * H + h) * (W + TEST_DR) + W, q_rope + (s * H + h) * TEST_DR,
                     TEST_DR * sizeof(float));
            }
          a.query_kind = TPLA_QUERY_KIND_JOINED;
          a.queries = joined;
          a.queries_count = NSEQ * H * (W + TEST_DR);
          a.q_rope = NULL;
          a.q_rope_count = 0;
          a.out = joined_heads;
          CHECK_OK(tpla_context_decode(ctx[1], cache[1], &a));
          CHECK(memcmp(joined_heads, latent_heads, sizeof joined_heads) == 0);
          a.queries_count--;
          CHECK(tpla_context_decode(ctx[1], cache[1], &a) == TPLA_STATUS_INVALID_ARGUMENT);
          a.queries_count++;
          a.q_rope = q_rope;
          a.q_rope_count = NSEQ * H * TEST_DR;
        }

        /* Combine in process, and through the callback: the same bits on every rank. */
        for (r = 0; r < RANKS; r++) bufs[r] = heads[r];
        CHECK_OK(tpla_all_reduce_in_process(bufs, RANKS, HEADS_OUT));
        comm.calls = 0;
        for (r = 0; r < RANKS; r++)
          CHECK_OK(tpla_all_reduce_with(via_callback[r], HEADS_OUT, sum_over_ranks, &comm));
        CHECK(comm.calls == RANKS);
        for (r = 0; r < RANKS; r++) {
          CHECK(memcmp(heads[r], heads[0], sizeof heads[0]) == 0);
          CHECK(memcmp(via_callback[r], heads[0], sizeof heads[0]) == 0);
        }
        put(heads[0], HEADS_OUT);
      } else {
        a.output_kind = TPLA_OUTPUT_KIND_LATENT;
        a.out = latent;
        a.out_count = NSEQ * H * W;
        a.lse = lse;
        a.lse_count = NSEQ * H;
        for (r = 0; r < RANKS; r++) {
          a.out = latent;
          a.lse = lse;
          CHECK_OK(tpla_context_decode(ctx[r], cache[r], &a));
          a.out = again_latent;
          a.lse = again_lse;
          CHECK_OK(tpla_context_decode(file_ctx[r], cache[r], &a));
          CHECK(memcmp(again_latent, latent, sizeof latent) == 0);
          CHECK(memcmp(again_lse, lse, sizeof lse) == 0);
          put(latent, NSEQ * H * W);
          put(lse, NSEQ * H);
        }
      }
    }
  }

  /* Freeing rank 1's sequences releases its buffer, once. */
  memset(&cinfo, 0, sizeof cinfo);
  cinfo.struct_size = sizeof cinfo;
  CHECK_OK(tpla_cache_get_info(cache[1], &cinfo));
  CHECK(cinfo.registered_images == 1 && cinfo.sequences == NSEQ && released == 0);
  CHECK(cinfo.dtype == TPLA_DTYPE_BF16 && cinfo.page_size == 16 && cinfo.layers == LAYERS);
  CHECK(cinfo.group == 1 && cinfo.groups == RANKS && cinfo.capacity_pages == 64);
  /* The appended tokens moved each sequence's partial last page to the pool. */
  CHECK(cinfo.free_pages < cinfo.capacity_pages);
  for (s = 0; s < NSEQ; s++) CHECK_OK(tpla_cache_free_sequence(cache[1], SEQ_IDS[s]));
  CHECK_OK(tpla_cache_get_info(cache[1], &cinfo));
  CHECK(cinfo.registered_images == 0 && cinfo.free_pages == 64 && released == 1);

  for (r = 0; r < RANKS; r++) {
    tpla_cache_destroy(cache[r]);
    tpla_context_destroy(ctx[r]);
    tpla_context_destroy(file_ctx[r]);
    free(images[r]);
    for (l = 0; l < LAYERS; l++) {
      free(slice_w_uk[l][r]);
      free(slice_w_uv[l][r]);
    }
  }
  CHECK(released == 1);
  for (l = 0; l < LAYERS; l++) {
    struct layer_data *L = &layers[l];
    for (s = 0; s < NSEQ; s++) {
      free(L->latents[s]);
      free(L->k_rope[s]);
      free(L->q_nope[s]);
      free(L->q_rope[s]);
    }
    free((float *)L->mla.w_uk);
    free((float *)L->mla.w_uv);
    free((float *)L->mla.gamma);
    tpla_synthetic_destroy(L->synthetic);
    tpla_transform_destroy(L->transform);
  }
  CHECK(fclose(record) == 0);
  printf("happy: ok\n");
  return 0;
}

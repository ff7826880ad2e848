/* paged.c: decode and append on engine-owned paged memory through tpla.h alone.
 *
 * One rank (latent group 1 of 2), two layers. The "engine" owns one pool per layer
 * (pages padded past their rows), hands out pages from a shuffled free list, prefills
 * sequences with one batched tpla_context_append_paged per layer, and frees and adds
 * sequences between steps so that freed pages are reused. Every step plans once and
 * decodes every layer with tpla_context_decode_paged; the results must be bit-equal to
 * tpla_context_decode over a tpla_cache holding the same tokens. Then the fault bits
 * (bad page index, bad slot) and the error statuses of the paged calls, and the same
 * churn again over fp8_e4m3 pools (codes, block scales and bf16 keys) and cache.
 *
 * Usage: paged
 */
#include "check.h"

#define LAYERS 2
#define GROUPS 2
#define RANK 1
#define PAGE 32
#define POOL_PAGES 64
#define WIDTH 32 /* block table width: sequences of up to 1024 tokens */
#define MAX_LEN 700
#define MAX_SEQ 8

static int checked = 0, failures = 0;

struct seq {
  uint32_t id;
  int live;
  size_t len, npages;
  int32_t pages[WIDTH];
  float *latents[LAYERS], *k_rope[LAYERS], *q_nope[LAYERS], *q_rope[LAYERS];
};

static tpla_dims d;
static tpla_context *ctx;
static tpla_cache *owned;
static tpla_paged_cache pools[LAYERS];
static int32_t free_pages[POOL_PAGES];
static size_t free_count;
static struct seq seqs[MAX_SEQ];
static tpla_synthetic *synthetic[LAYERS];
static uint32_t rng = 12345;
static size_t reused;
static int ever_used[POOL_PAGES];

static uint32_t next_random(void) {
  rng = rng * 1103515245u + 12345u;
  return rng >> 8;
}

static void shuffle(int32_t *v, size_t n) {
  size_t i;
  for (i = n; i > 1; i--) {
    size_t j = next_random() % i;
    int32_t t = v[i - 1];
    v[i - 1] = v[j];
    v[j] = t;
  }
}

static void append(struct seq *s, size_t n) {
  int32_t slots[MAX_LEN];
  size_t t;
  int l;
  uint32_t faults = 0;
  while (s->npages * PAGE < s->len + n) {
    int32_t page;
    CHECK(free_count > 0);
    page = free_pages[--free_count];
    if (ever_used[page]) reused++;
    ever_used[page] = 1;
    s->pages[s->npages++] = page;
  }
  for (t = 0; t < n; t++) {
    size_t pos = s->len + t;
    slots[t] = s->pages[pos / PAGE] * PAGE + (int32_t)(pos % PAGE);
  }
  for (l = 0; l < LAYERS; l++) {
    const float *a = s->latents[l] + s->len * d.d_c;
    const float *kr = s->k_rope[l] + s->len * d.d_r;
    uint32_t mode = l == 0 ? TPLA_RMS_MODE_EXACT : TPLA_RMS_MODE_SLICED;
    CHECK_OK(tpla_context_append_paged(ctx, (uint32_t)l, &pools[l], slots, n, a, n * d.d_c,
                                       kr, n * d.d_r, mode, &faults));
    for (t = 0; t < n; t++)
      CHECK_OK(tpla_context_append_token(ctx, owned, s->id, (uint32_t)l, a + t * d.d_c, d.d_c,
                                         kr + t * d.d_r, d.d_r, mode));
  }
  CHECK(faults == 0);
  s->len += n;
}

static void add(int k, size_t n) {
  struct seq *s = &seqs[k];
  int l;
  s->id = 100 + (uint32_t)k;
  s->live = 1;
  s->len = 0;
  s->npages = 0;
  for (l = 0; l < LAYERS; l++) {
    size_t q = (size_t)MAX_LEN * d.heads;
    if (s->latents[l] == NULL) {
      s->latents[l] = (float *)xcalloc((size_t)MAX_LEN * d.d_c, sizeof(float));
      s->k_rope[l] = (float *)xcalloc((size_t)MAX_LEN * d.d_r, sizeof(float));
      s->q_nope[l] = (float *)xcalloc(q * d.d_n, sizeof(float));
      s->q_rope[l] = (float *)xcalloc(q * d.d_r, sizeof(float));
    }
    CHECK_OK(tpla_synthetic_sequence(synthetic[l], s->id, MAX_LEN, s->latents[l],
                                     (size_t)MAX_LEN * d.d_c, s->k_rope[l],
                                     (size_t)MAX_LEN * d.d_r, s->q_nope[l], q * d.d_n,
                                     s->q_rope[l], q * d.d_r));
  }
  CHECK_OK(tpla_cache_add_sequence(owned, s->id));
  append(s, n);
}

static void release(int k) {
  struct seq *s = &seqs[k];
  /* freed pages go back on top of the free list, shuffled: they are handed out next */
  shuffle(s->pages, s->npages);
  memcpy(free_pages + free_count, s->pages, s->npages * sizeof(int32_t));
  free_count += s->npages;
  s->live = 0;
  CHECK_OK(tpla_cache_free_sequence(owned, s->id));
}

/* A step's batch: the live sequences, then (with `padding`) an entry of length 0. */
struct batch {
  size_t n;
  int k[MAX_SEQ + 1];
  uint32_t ids[MAX_SEQ + 1];
  int32_t table[(MAX_SEQ + 1) * WIDTH];
  int32_t lens[MAX_SEQ + 1];
};

static void make_batch(struct batch *b, int padding) {
  int k;
  b->n = 0;
  for (k = 0; k < MAX_SEQ; k++) {
    size_t p;
    if (!seqs[k].live) continue;
    for (p = 0; p < WIDTH; p++) b->table[b->n * WIDTH + p] = p < seqs[k].npages ? seqs[k].pages[p] : -1;
    b->lens[b->n] = (int32_t)seqs[k].len;
    b->ids[b->n] = seqs[k].id;
    b->k[b->n++] = k;
  }
  if (!padding) return;
  for (k = 0; k < WIDTH; k++) b->table[b->n * WIDTH + k] = -1;
  b->lens[b->n] = 0;
  b->k[b->n++] = -1;
}

static tpla_paged_decode_args decode_args(int l, const struct batch *b, const int32_t *plan,
                                          size_t plan_count, const float *q_nope,
                                          const float *q_rope, float *out, size_t out_count) {
  tpla_paged_decode_args a;
  memset(&a, 0, sizeof a);
  a.struct_size = sizeof a;
  a.layer = (uint32_t)l;
  a.query_kind = TPLA_QUERY_KIND_NOPE;
  a.output_kind = TPLA_OUTPUT_KIND_HEADS;
  a.output_dtype = TPLA_DTYPE_F32;
  a.cache = &pools[l];
  a.block_table = b->table;
  a.batch = b->n;
  a.block_table_width = WIDTH;
  a.seq_lens = b->lens;
  a.plan = plan;
  a.plan_count = plan_count;
  a.queries = q_nope;
  a.queries_count = b->n * d.heads * d.d_n;
  a.q_rope = q_rope;
  a.q_rope_count = b->n * d.heads * d.d_r;
  a.out = out;
  a.out_count = out_count;
  return a;
}

/* The queries of each batch entry's last token (zeros for the padding entry). */
static void gather_queries(int l, const struct batch *b, float *q_nope, float *q_rope) {
  size_t i, hn = (size_t)d.heads * d.d_n, hr = (size_t)d.heads * d.d_r;
  for (i = 0; i < b->n; i++) {
    if (b->k[i] < 0) {
      memset(q_nope + i * hn, 0, hn * sizeof(float));
      memset(q_rope + i * hr, 0, hr * sizeof(float));
      continue;
    }
    memcpy(q_nope + i * hn, seqs[b->k[i]].q_nope[l] + (b->lens[i] - 1) * hn, hn * sizeof(float));
    memcpy(q_rope + i * hr, seqs[b->k[i]].q_rope[l] + (b->lens[i] - 1) * hr, hr * sizeof(float));
  }
}

static float q_nope[(MAX_SEQ + 1) * TEST_HEADS * TEST_DN], q_rope[(MAX_SEQ + 1) * TEST_HEADS * TEST_DR];
static float out[(MAX_SEQ + 1) * TEST_HEADS * TEST_DV], want[(MAX_SEQ + 1) * TEST_HEADS * TEST_DV];

static int32_t *make_plan(const struct batch *b, size_t *words) {
  int32_t *plan;
  CHECK_OK(tpla_context_decode_plan_size(ctx, b->n, words));
  plan = (int32_t *)xcalloc(*words, sizeof(int32_t));
  CHECK_OK(tpla_context_decode_plan(ctx, b->lens, b->n, plan, *words));
  return plan;
}

/* Plans once per batch and decodes every layer: paged and owned must agree bit for bit;
 * with a padding entry added, that entry's outputs are zero. */
static void step(void) {
  struct batch b, padded;
  size_t words, padded_words, i, hv = (size_t)d.heads * d.d_v;
  int32_t *plan, *padded_plan;
  int l;
  make_batch(&b, 0);
  make_batch(&padded, 1);
  plan = make_plan(&b, &words);
  padded_plan = make_plan(&padded, &padded_words);
  for (l = 0; l < LAYERS; l++) {
    uint32_t faults = 0;
    tpla_paged_decode_args a;
    tpla_decode_args o;
    gather_queries(l, &padded, q_nope, q_rope);
    a = decode_args(l, &b, plan, words, q_nope, q_rope, out, b.n * hv);
    a.faults = &faults;
    CHECK_OK(tpla_context_decode_paged(ctx, &a));
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.layer = (uint32_t)l;
    o.query_kind = TPLA_QUERY_KIND_NOPE;
    o.output_kind = TPLA_OUTPUT_KIND_HEADS;
    o.seq_ids = b.ids;
    o.batch = b.n;
    o.queries = q_nope;
    o.queries_count = b.n * d.heads * d.d_n;
    o.q_rope = q_rope;
    o.q_rope_count = b.n * d.heads * d.d_r;
    o.out = want;
    o.out_count = b.n * hv;
    CHECK_OK(tpla_context_decode(ctx, owned, &o));
    CHECK(memcmp(out, want, b.n * hv * sizeof(float)) == 0);

    a = decode_args(l, &padded, padded_plan, padded_words, q_nope, q_rope, out, padded.n * hv);
    a.faults = &faults;
    CHECK_OK(tpla_context_decode_paged(ctx, &a));
    for (i = 0; i < hv; i++) CHECK(out[b.n * hv + i] == 0.0f);
    for (i = 0; i < b.n * hv; i++) CHECK(fabsf(out[i] - want[i]) <= 1e-3f * (1.0f + fabsf(want[i])));
    CHECK(faults == 0);
  }
  free(plan);
  free(padded_plan);
}

static uint16_t bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static int all_nan(const float *v, size_t n) {
  size_t i;
  for (i = 0; i < n; i++)
    if (v[i] == v[i]) return 0;
  return 1;
}

/* Bytes of a row of `dtype` (tpla_dtype's layouts). */
static size_t row_bytes(uint32_t dtype, size_t row_width) {
  size_t w = row_width - d.d_r;
  return dtype == TPLA_DTYPE_FP8_E4M3 ? w + 4 * ((w + 127) / 128) + 2 * (size_t)d.d_r
                                      : row_width * 2;
}

/* One pool per layer of `dtype` (pages padded past their rows), an owned cache of it,
 * every page free. */
static void open_caches(uint32_t dtype) {
  tpla_context_info info;
  tpla_cache_options co;
  size_t i;
  int l;
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(ctx, &info));
  for (l = 0; l < LAYERS; l++) {
    memset(&pools[l], 0, sizeof pools[l]);
    pools[l].struct_size = sizeof pools[l];
    pools[l].dtype = dtype;
    pools[l].row_width = info.row_width;
    pools[l].page_size = PAGE;
    pools[l].page_stride = (size_t)PAGE * row_bytes(dtype, info.row_width) + 64;
    pools[l].pages = POOL_PAGES;
    pools[l].base = xcalloc(POOL_PAGES, pools[l].page_stride);
  }
  memset(&co, 0, sizeof co);
  co.struct_size = sizeof co;
  co.dtype = dtype;
  co.page_size = 16;
  co.capacity_pages = 256;
  CHECK_OK(tpla_cache_create(ctx, &co, &owned));
  for (i = 0; i < POOL_PAGES; i++) free_pages[i] = (int32_t)i, ever_used[i] = 0;
  free_count = POOL_PAGES;
  reused = 0;
  shuffle(free_pages, free_count);
  for (i = 0; i < MAX_SEQ; i++) seqs[i].live = 0;
}

static void close_caches(void) {
  int l;
  for (l = 0; l < LAYERS; l++) free(pools[l].base);
  tpla_cache_destroy(owned);
}

/* Mixed lengths, one long enough to be split over several work items; churn. */
static void churn(const char *dtype) {
  int k, s;
  add(0, 40);
  add(1, 600);
  add(2, 3);
  for (s = 0; s < 4; s++) {
    step();
    for (k = 0; k < MAX_SEQ; k++)
      if (seqs[k].live) append(&seqs[k], 1);
    if (s == 0) {
      release(0);
      add(3, 90);
    } else if (s == 1) {
      release(2);
      add(4, 17);
    }
  }
  CHECK(reused > 0);
  printf("paged (%s): 4 steps bit-equal to the owned cache, %zu freed pages reused\n", dtype,
         reused);
}

int main(void) {
  const tpla_backend_options cpu2 = backend_options(TPLA_BACKEND_CPU, 2);
  tpla_context_options o;
  tpla_context_info info;
  size_t w_uk_n, w_uv_n, sw_uk, sw_uv, i, words;
  int l, k;
  d = test_dims();

  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.dims = d;
  o.plan.ranks = GROUPS;
  o.plan.groups = GROUPS;
  o.plan.rank = RANK;
  o.layers = LAYERS;
  CHECK_OK(tpla_context_create(&o, &cpu2, &ctx));
  memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  CHECK_OK(tpla_context_get_info(ctx, &info));
  w_uk_n = (size_t)d.heads * d.d_c * d.d_n;
  w_uv_n = (size_t)d.heads * d.d_c * d.d_v;
  sw_uk = (size_t)info.heads * info.slice_width * d.d_n;
  sw_uv = (size_t)info.heads * info.slice_width * d.d_v;
  for (l = 0; l < LAYERS; l++) {
    tpla_transform_desc td;
    tpla_transform *transform;
    tpla_mla_weights mla;
    tpla_layer_weights lw;
    float *uk = (float *)xcalloc(w_uk_n, sizeof(float)), *uv = (float *)xcalloc(w_uv_n, sizeof(float));
    float *gamma = (float *)xcalloc(d.d_c, sizeof(float));
    float *suk = (float *)xcalloc(sw_uk, sizeof(float)), *suv = (float *)xcalloc(sw_uv, sizeof(float));
    memset(&td, 0, sizeof td);
    td.struct_size = sizeof td;
    td.kind = l == 0 ? TPLA_TRANSFORM_KIND_HADAMARD : TPLA_TRANSFORM_KIND_IDENTITY;
    td.d_c = d.d_c;
    td.seed = l == 0 ? 3 : 0;
    CHECK_OK(tpla_transform_create(&td, &transform));
    CHECK_OK(tpla_synthetic_create(d, 40 + (uint64_t)l, &synthetic[l]));
    CHECK_OK(tpla_synthetic_weights(synthetic[l], uk, w_uk_n, uv, w_uv_n, gamma, d.d_c));
    memset(&mla, 0, sizeof mla);
    mla.struct_size = sizeof mla;
    mla.w_uk = uk;
    mla.w_uk_count = w_uk_n;
    mla.w_uv = uv;
    mla.w_uv_count = w_uv_n;
    mla.gamma = gamma;
    mla.gamma_count = d.d_c;
    CHECK_OK(tpla_fold_layer(d, o.plan, &mla, transform, suk, sw_uk, suv, sw_uv));
    memset(&lw, 0, sizeof lw);
    lw.struct_size = sizeof lw;
    lw.w_uk = suk;
    lw.w_uk_count = sw_uk;
    lw.w_uv = suv;
    lw.w_uv_count = sw_uv;
    lw.mu = 1.2;
    lw.slice_fraction = 0.5;
    lw.transform = transform;
    CHECK_OK(tpla_context_set_layer(ctx, (uint32_t)l, &lw));
    tpla_transform_destroy(transform);
    free(uk), free(uv), free(gamma), free(suk), free(suv);

  }
  open_caches(TPLA_DTYPE_BF16);
  EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "too large", tpla_context_reserve(ctx, (size_t)-1));
  CHECK_OK(tpla_context_reserve(ctx, MAX_SEQ + 1));

  churn("bf16");

  /* Faults: a bad page index makes its entry NaN; a bad slot is skipped. */
  {
    struct batch b;
    int32_t *plan;
    uint32_t faults = 0;
    int32_t len0;
    size_t hv = (size_t)d.heads * d.d_v;
    tpla_paged_decode_args a;
    make_batch(&b, 1);
    plan = make_plan(&b, &words);
    gather_queries(0, &b, q_nope, q_rope);
    b.table[0 * WIDTH + 1] = POOL_PAGES + 5;
    a = decode_args(0, &b, plan, words, q_nope, q_rope, out, b.n * hv);
    a.faults = &faults;
    CHECK_OK(tpla_context_decode_paged(ctx, &a));
    CHECK(faults == TPLA_FAULT_BAD_PAGE);
    CHECK(all_nan(out, hv) && !all_nan(out + hv, hv));
    b.table[0 * WIDTH + 1] = -7;
    faults = 0;
    CHECK_OK(tpla_context_decode_paged(ctx, &a));
    CHECK(faults == TPLA_FAULT_BAD_PAGE && all_nan(out, hv));

    /* errors at the call */
    a.faults = NULL;
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "ctx is NULL", tpla_context_decode_paged(NULL, &a));
    EXPECT(TPLA_STATUS_NULL_ARGUMENT, "args is NULL", tpla_context_decode_paged(ctx, NULL));
    a.struct_size--;
    EXPECT(TPLA_STATUS_WRONG_STRUCT_SIZE, "struct_size", tpla_context_decode_paged(ctx, &a));
    a.struct_size++;
    len0 = b.lens[0];
    b.lens[0]++;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "plan again", tpla_context_decode_paged(ctx, &a));
    b.lens[0] = -1;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "negative", tpla_context_decode_paged(ctx, &a));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "negative", tpla_context_decode_plan(ctx, b.lens, b.n, plan, words));
    b.lens[0] = len0;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "needs", tpla_context_decode_plan(ctx, b.lens, b.n, plan, 8));
    a.out = pools[0].base;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps", tpla_context_decode_paged(ctx, &a));
    a.out = out;
    a.output_dtype = TPLA_DTYPE_F16;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "output_dtype", tpla_context_decode_paged(ctx, &a));
    {
      /* bf16 outputs: the f32 outputs rounded to nearest even (entry 0 is NaN) */
      static uint16_t bf[(MAX_SEQ + 1) * TEST_HEADS * TEST_DV];
      a.output_dtype = TPLA_DTYPE_BF16;
      a.out = bf;
      CHECK_OK(tpla_context_decode_paged(ctx, &a));
      for (i = hv; i < b.n * hv; i++) CHECK(bf[i] == bf16_bits(out[i]));
      a.output_dtype = TPLA_DTYPE_F32;
      a.out = out;
    }
    a.out_count--;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "head outputs holds", tpla_context_decode_paged(ctx, &a));
    a.out_count++;
    a.query_kind = 9;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown query_kind 9", tpla_context_decode_paged(ctx, &a));
    a.query_kind = TPLA_QUERY_KIND_JOINED;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "q_rope must be NULL", tpla_context_decode_paged(ctx, &a));
    a.query_kind = TPLA_QUERY_KIND_NOPE;
    a.softmax_scale = -1.0;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "softmax scale", tpla_context_decode_paged(ctx, &a));
    a.softmax_scale = 0.0;
    {
      tpla_paged_cache bad = pools[0];
      a.cache = &bad;
      bad.row_width += 2;
      bad.page_stride += 4 * PAGE;
      EXPECT(TPLA_STATUS_MISMATCH, "rank's", tpla_context_decode_paged(ctx, &a));
      bad = pools[0];
      bad.base = (char *)bad.base + 1;
      EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "aligned", tpla_context_decode_paged(ctx, &a));
      bad = pools[0];
      bad.page_stride = 8;
      EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "page stride", tpla_context_decode_paged(ctx, &a));
      bad = pools[0];
      bad.base = NULL;
      EXPECT(TPLA_STATUS_NULL_ARGUMENT, "cache->base", tpla_context_decode_paged(ctx, &a));
      a.cache = &pools[0];
    }
    free(plan);
  }
  {
    float a[2 * TEST_DC], kr[2 * TEST_DR];
    int32_t slots[2] = {-1, POOL_PAGES * PAGE};
    uint32_t faults = 0;
    for (i = 0; i < 2 * TEST_DC; i++) a[i] = 0.1f * (float)(i % 7);
    for (i = 0; i < 2 * TEST_DR; i++) kr[i] = 0.5f;
    CHECK_OK(tpla_context_append_paged(ctx, 0, &pools[0], slots, 2, a, 2 * TEST_DC, kr,
                                       2 * TEST_DR, TPLA_RMS_MODE_EXACT, &faults));
    CHECK(faults == TPLA_FAULT_BAD_SLOT);
    slots[1] = 3;
    a[5] = NAN;
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "latents[5] is NaN",
           tpla_context_append_paged(ctx, 0, &pools[0], slots, 2, a, 2 * TEST_DC, kr,
                                     2 * TEST_DR, TPLA_RMS_MODE_EXACT, NULL));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "unknown rms_mode",
           tpla_context_append_paged(ctx, 0, &pools[0], slots, 2, a, 2 * TEST_DC, kr,
                                     2 * TEST_DR, 7, NULL));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "expected 2 tokens",
           tpla_context_append_paged(ctx, 0, &pools[0], slots, 2, a, TEST_DC, kr,
                                     2 * TEST_DR, TPLA_RMS_MODE_EXACT, NULL));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "overlaps",
           tpla_context_append_paged(ctx, 0, &pools[0], slots, 2, (const float *)pools[0].base,
                                     2 * TEST_DC, kr, 2 * TEST_DR, TPLA_RMS_MODE_EXACT, NULL));
    EXPECT(TPLA_STATUS_OUT_OF_RANGE, "layer 2",
           tpla_context_append_paged(ctx, 2, &pools[0], slots, 2, a, 2 * TEST_DC, kr,
                                     2 * TEST_DR, TPLA_RMS_MODE_EXACT, NULL));
    EXPECT(TPLA_STATUS_OUT_OF_RANGE, "sequence 9",
           tpla_context_import_sequence(ctx, owned, 9, 0, &pools[0], slots, 2, NULL));
    EXPECT(TPLA_STATUS_INVALID_ARGUMENT, "slots for the",
           tpla_context_import_sequence(ctx, owned, seqs[1].id, 0, &pools[0], slots, 2, NULL));
  }
  if (failures) {
    fprintf(stderr, "paged: %d of %d checks failed\n", failures, checked);
    return 1;
  }
  printf("paged: faults and errors as documented\n");
  close_caches();
  open_caches(TPLA_DTYPE_FP8_E4M3);
  churn("fp8_e4m3");
  close_caches();
  if (failures) {
    fprintf(stderr, "paged: %d of %d checks failed\n", failures, checked);
    return 1;
  }

  for (k = 0; k < MAX_SEQ; k++)
    for (l = 0; l < LAYERS; l++) {
      free(seqs[k].latents[l]);
      free(seqs[k].k_rope[l]);
      free(seqs[k].q_nope[l]);
      free(seqs[k].q_rope[l]);
    }
  for (l = 0; l < LAYERS; l++) tpla_synthetic_destroy(synthetic[l]);
  tpla_context_destroy(ctx);
  return 0;
}

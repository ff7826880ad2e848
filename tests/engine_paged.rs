//! The kernel API on engine-owned paged memory (`tpla::engine`), driven the way a serving
//! engine drives it: a block allocator hands out shuffled pages, sequences join and leave
//! between steps, freed pages are reused, the batch mixes lengths (and an empty padding
//! entry). Every step plans once and then, per layer, appends and decodes; the results
//! must be bit-equal to the owned-cache path (`RankContext::decode` over a `RankCache`
//! holding the same tokens) and close to the f64 reference.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::{rel_l2, rotated_latents, Reference};
use tpla::attention::LatentAttention;
use tpla::cache::{ExportPlan, RankCache, ShardSpec, ShardWriter, TransformId};
use tpla::convert::FoldedLayer;
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::engine::{
    BlockTable, Faults, PagedCache, PagedCacheMut, PagedLayout, PagedStep, RmsMode,
};
use tpla::synthetic::{Sequence, SyntheticLayer};
use tpla::transform::Transform;
use tpla::{DType, ErrorKind, ModelDims, ShardPlan};

const LAYERS: usize = 2;
const GROUPS: usize = 2;
const RANK: usize = 1;
/// The engine's page size differs from the owned cache's (16): results must not care.
const PAGE: usize = 32;
const POOL_PAGES: usize = 160;
const TABLE_WIDTH: usize = 64;
const MAX_TOKENS: usize = 1400;

fn dims() -> ModelDims {
    ModelDims::new(8, 128, 32, 32, 24, 0.15).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// One model layer's data: its synthetic generator, transform and folded weights.
struct Layer {
    syn: SyntheticLayer,
    transform: Transform,
    rank_layer: RankLayer,
}

fn layers(plan: &ShardPlan) -> Vec<Layer> {
    let d = dims();
    (0..LAYERS)
        .map(|l| {
            let syn = SyntheticLayer::generate(&d, 31 + l as u64).unwrap();
            let transform = if l == 0 {
                Transform::hadamard(d.d_c, 9).unwrap()
            } else {
                Transform::identity(d.d_c).unwrap()
            };
            let folded = FoldedLayer::new(&syn.weights, &transform).unwrap();
            let weights = folded.rank(plan, 1.1).unwrap();
            let rank_layer = RankLayer::new(&weights, transform.clone(), 0.5).unwrap();
            Layer {
                syn,
                transform,
                rank_layer,
            }
        })
        .collect()
}

fn context(
    plan: ShardPlan,
    layers: &[Layer],
    backend: Box<dyn LatentAttention + Send>,
) -> RankContext {
    let mut ctx = RankContext::new(dims(), plan, LAYERS, backend).unwrap();
    for (l, layer) in layers.iter().enumerate() {
        ctx.install(l, layer.rank_layer.clone()).unwrap();
    }
    ctx
}

/// An engine-owned pool of one layer: 4-byte aligned memory, pages padded by 64 bytes.
struct Pool {
    words: Vec<u32>,
    layout: PagedLayout,
}

impl Pool {
    fn new(dtype: DType, row_width: usize) -> Self {
        let d_r = dims().d_r;
        let page_bytes = PAGE * dtype.row_bytes(row_width - d_r, d_r);
        let layout = PagedLayout {
            dtype,
            row_width,
            rope_width: d_r,
            page_size: PAGE,
            page_stride: page_bytes + 64,
            pages: POOL_PAGES,
        };
        let words = vec![0u32; layout.extent().unwrap().div_ceil(4)];
        Pool { words, layout }
    }
    fn cache(&self) -> PagedCache<'_> {
        PagedCache::new(self.layout, bytemuck::cast_slice(&self.words)).unwrap()
    }
    fn cache_mut(&mut self) -> PagedCacheMut<'_> {
        PagedCacheMut::new(self.layout, bytemuck::cast_slice_mut(&mut self.words)).unwrap()
    }
}

/// A sequence the engine serves: its tokens in every layer, its pages and length.
struct Live {
    data: Vec<Sequence>,
    pages: Vec<i32>,
    len: usize,
}

/// The engine: block allocator, pools, and the two contexts of one rank (CPU backend,
/// f64 reference), plus the owned cache mirroring the pools.
struct Engine {
    layers: Vec<Layer>,
    ctx: RankContext,
    reference: RankContext,
    owned: RankCache,
    pools: Vec<Pool>,
    free: Vec<i32>,
    live: BTreeMap<u32, Live>,
    rng: rand_chacha::ChaCha8Rng,
    ever_used: Vec<i32>,
}

impl Engine {
    fn new(dtype: DType) -> Self {
        let d = dims();
        let plan = ShardPlan::new(&d, GROUPS, RANK).unwrap();
        let layers = layers(&plan);
        let ctx = context(plan, &layers, Box::new(CpuBackend::new(2).unwrap()));
        let reference = context(plan, &layers, Box::new(Reference));
        let spec = ShardSpec::new(d, &plan, dtype, 16, ctx.transform_ids().unwrap()).unwrap();
        let owned = RankCache::new(spec, 512).unwrap();
        let pools = (0..LAYERS)
            .map(|_| Pool::new(dtype, plan.row_width(&d)))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut free: Vec<i32> = (0..POOL_PAGES as i32).collect();
        free.shuffle(&mut rng);
        Engine {
            layers,
            ctx,
            reference,
            owned,
            pools,
            free,
            live: BTreeMap::new(),
            rng,
            ever_used: Vec::new(),
        }
    }

    fn slot(&self, seq: u32, t: usize) -> i32 {
        let s = &self.live[&seq];
        s.pages[t / PAGE] * PAGE as i32 + (t % PAGE) as i32
    }

    /// Adds sequence `seq` with a prefill of `len` tokens: one batched append per layer
    /// on the engine side, token appends on the owned side.
    fn add(&mut self, seq: u32, len: usize) {
        let data = self
            .layers
            .iter()
            .map(|l| l.syn.sequence(MAX_TOKENS, 1000 + seq as u64))
            .collect();
        self.live.insert(
            seq,
            Live {
                data,
                pages: Vec::new(),
                len: 0,
            },
        );
        self.owned.add_sequence(seq).unwrap();
        self.append(seq, len);
    }

    fn free(&mut self, seq: u32) {
        // freed pages are handed out first, in shuffled order
        let mut pages = self.live.remove(&seq).unwrap().pages;
        pages.shuffle(&mut self.rng);
        self.free.extend(pages);
        self.owned.free_sequence(seq).unwrap();
    }

    /// Appends the next `n` tokens of `seq` in every layer.
    fn append(&mut self, seq: u32, n: usize) {
        let d = dims();
        let start = self.live[&seq].len;
        while self.live[&seq].pages.len() * PAGE < start + n {
            let page = self.free.pop().expect("the pool is large enough");
            self.ever_used.push(page);
            self.live.get_mut(&seq).unwrap().pages.push(page);
        }
        let slots: Vec<i32> = (start..start + n).map(|t| self.slot(seq, t)).collect();
        for l in 0..LAYERS {
            let tokens = &self.live[&seq].data[l].tokens;
            let a = f32s(&tokens.latents[start * d.d_c..(start + n) * d.d_c]);
            let kr = f32s(&tokens.k_rope[start * d.d_r..(start + n) * d.d_r]);
            let mode = if l == 0 {
                RmsMode::Exact
            } else {
                RmsMode::Sliced
            };
            let faults = self
                .ctx
                .append_paged(l, &mut self.pools[l].cache_mut(), &slots, &a, &kr, mode)
                .unwrap();
            assert!(faults.is_empty());
            for t in 0..n {
                self.ctx
                    .append_token(
                        &mut self.owned,
                        seq,
                        l,
                        &a[t * d.d_c..(t + 1) * d.d_c],
                        &kr[t * d.d_r..(t + 1) * d.d_r],
                        mode == RmsMode::Exact,
                    )
                    .unwrap();
            }
        }
        self.live.get_mut(&seq).unwrap().len += n;
    }

    /// The batch of a step: sequence ids in order, their block table and lengths; empty
    /// sequences only with `padding`.
    fn batch(&self, padding: bool) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
        let ids: Vec<u32> = self
            .live
            .iter()
            .filter(|(_, s)| padding || s.len > 0)
            .map(|(&id, _)| id)
            .collect();
        let mut table = vec![-1; ids.len() * TABLE_WIDTH];
        let mut lens = Vec::new();
        for (b, id) in ids.iter().enumerate() {
            let s = &self.live[id];
            table[b * TABLE_WIDTH..b * TABLE_WIDTH + s.pages.len()].copy_from_slice(&s.pages);
            lens.push(s.len as i32);
        }
        (ids, table, lens)
    }

    /// q_nope and q_rope of this rank's heads for the last token of each sequence.
    fn queries(&self, ids: &[u32], layer: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut q_nope, mut q_rope) = (Vec::new(), Vec::new());
        for id in ids {
            let s = &self.live[id];
            let q = self.layers[layer]
                .syn
                .query_at(&s.data[layer], s.len.max(1) - 1);
            q_nope.extend(f32s(&q.q_nope));
            q_rope.extend(f32s(&q.q_rope));
        }
        (q_nope, q_rope)
    }

    fn plan(&self, lens: &[i32]) -> Vec<i32> {
        let mut plan = vec![0i32; self.ctx.decode_plan_len(lens.len())];
        self.ctx.decode_plan(lens, &mut plan).unwrap();
        plan
    }

    /// Decodes `layer` for the batch on the engine's pages (queries of each entry's last
    /// token); no faults allowed.
    fn paged(
        &mut self,
        layer: usize,
        batch: &(Vec<u32>, Vec<i32>, Vec<i32>),
        plan: &[i32],
        outputs: Outputs,
    ) {
        let (ids, table, lens) = batch;
        let (q_nope, q_rope) = self.queries(ids, layer);
        let step = PagedStep {
            cache: self.pools[layer].cache(),
            block_table: BlockTable::new(table, ids.len(), TABLE_WIDTH).unwrap(),
            seq_lens: lens,
            plan,
            softmax_scale: None,
            mu: None,
        };
        let q = Queries::Nope {
            q_nope: &q_nope,
            q_rope: &q_rope,
        };
        let faults = self.ctx.decode_paged(layer, &step, q, outputs).unwrap();
        assert_eq!(faults, Faults::NONE);
    }

    /// One engine step: plan once per batch, decode every layer. Over the non-empty
    /// sequences the head outputs must be bit-equal to the owned path's; with the padding
    /// entries added, the latent outputs must be close to the f64 reference and the
    /// padding entries zero (log-sum-exp minus infinity). Returns the worst error.
    fn step_and_check(&mut self) -> f64 {
        let d = dims();
        let (h, w) = (d.heads, d.d_c / GROUPS);
        let full = self.batch(false);
        let padded = self.batch(true);
        let (full_plan, padded_plan) = (self.plan(&full.2), self.plan(&padded.2));
        let (n, b) = (full.0.len(), padded.0.len());
        let mut worst: f64 = 0.0;
        for l in 0..LAYERS {
            let mut heads = vec![f32::NAN; n * h * d.d_v];
            self.paged(l, &full, &full_plan, Outputs::Heads(&mut heads));
            let (q_nope, q_rope) = self.queries(&full.0, l);
            let q = || Queries::Nope {
                q_nope: &q_nope,
                q_rope: &q_rope,
            };
            let mut owned_heads = vec![f32::NAN; n * h * d.d_v];
            let owned = Outputs::Heads(&mut owned_heads);
            self.ctx
                .decode(&self.owned, l, &full.0, q(), owned)
                .unwrap();
            assert!(
                heads
                    .iter()
                    .zip(&owned_heads)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "layer {l}: paged and owned head outputs differ"
            );

            let (mut out, mut lse) = (vec![f32::NAN; b * h * w], vec![f32::NAN; b * h]);
            let latent = Outputs::Latent {
                out: &mut out,
                lse: &mut lse,
            };
            self.paged(l, &padded, &padded_plan, latent);
            let (mut ref_out, mut ref_lse) = (vec![0.0; n * h * w], vec![0.0; n * h]);
            let ref_latent = Outputs::Latent {
                out: &mut ref_out,
                lse: &mut ref_lse,
            };
            self.reference
                .decode(&self.owned, l, &full.0, q(), ref_latent)
                .unwrap();
            let mut k = 0;
            for (i, id) in padded.0.iter().enumerate() {
                let (o, e) = (&out[i * h * w..(i + 1) * h * w], &lse[i * h..(i + 1) * h]);
                if self.live[id].len == 0 {
                    assert!(o.iter().all(|&v| v == 0.0));
                    assert!(e.iter().all(|&v| v == f32::NEG_INFINITY));
                    continue;
                }
                let as64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                worst = worst.max(rel_l2(
                    &as64(o),
                    &as64(&ref_out[k * h * w..(k + 1) * h * w]),
                ));
                for (x, y) in e.iter().zip(&ref_lse[k * h..(k + 1) * h]) {
                    assert!((x - y).abs() < 1e-2 * y.abs().max(1.0), "lse {x} vs {y}");
                }
                k += 1;
            }
        }
        worst
    }
}

#[test]
fn engine_pool_with_churn_is_bit_equal_to_the_owned_path_and_close_to_the_reference() {
    for dtype in [DType::Bf16, DType::F32, DType::Fp8E4m3] {
        let mut e = Engine::new(dtype);
        e.add(1, 70);
        e.add(2, 5);
        e.add(3, 1300); // long enough to be split over several work items
        e.add(9, 0); // a padding entry of the batch
                     // against the f64 reference over the same stored rows: the kernels' rounding
        let tolerance = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
        for step in 0..4 {
            let worst = e.step_and_check();
            assert!(worst < tolerance, "{dtype:?} step {step}: error {worst}");
            for id in [1, 2, 3, 4, 5] {
                if e.live.contains_key(&id) {
                    e.append(id, 1);
                }
            }
            match step {
                0 => {
                    e.free(2);
                    e.add(4, 33);
                }
                1 => {
                    e.free(1);
                    e.add(5, 130);
                }
                _ => {}
            }
        }
        let used: std::collections::HashSet<_> = e.ever_used.iter().collect();
        assert!(used.len() < e.ever_used.len(), "freed pages were reused");
        let all_pages: Vec<i32> = e.live.values().flat_map(|s| s.pages.clone()).collect();
        let sorted = {
            let mut s = all_pages.clone();
            s.sort();
            s
        };
        assert_ne!(
            all_pages, sorted,
            "pages are neither contiguous nor ordered"
        );
    }
}

/// A small engine with one step's batch ready: for the fault and error cases.
fn small_engine() -> (Engine, Vec<u32>, Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut e = Engine::new(DType::Bf16);
    e.add(1, 40);
    e.add(2, 100);
    e.add(3, 7);
    let (ids, table, lens) = e.batch(false);
    let mut plan = vec![0; e.ctx.decode_plan_len(ids.len())];
    e.ctx.decode_plan(&lens, &mut plan).unwrap();
    (e, ids, table, lens, plan)
}

fn latent_decode(
    e: &mut Engine,
    table: &[i32],
    lens: &[i32],
    plan: &[i32],
    queries: Queries,
) -> tpla::Result<(Vec<f32>, Vec<f32>, Faults)> {
    let d = dims();
    let b = lens.len();
    let (mut out, mut lse) = (
        vec![0.0; b * d.heads * d.d_c / GROUPS],
        vec![0.0; b * d.heads],
    );
    let step = PagedStep {
        cache: e.pools[0].cache(),
        block_table: BlockTable::new(table, b, TABLE_WIDTH)?,
        seq_lens: lens,
        plan,
        softmax_scale: None,
        mu: None,
    };
    let outputs = Outputs::Latent {
        out: &mut out,
        lse: &mut lse,
    };
    let faults = e.ctx.decode_paged(0, &step, queries, outputs)?;
    Ok((out, lse, faults))
}

#[test]
fn a_bad_page_index_gives_nan_rows_for_its_sequence_only_and_a_fault() {
    let (mut e, ids, table, lens, plan) = small_engine();
    let (q_nope, q_rope) = e.queries(&ids, 0);
    let q = || Queries::Nope {
        q_nope: &q_nope,
        q_rope: &q_rope,
    };
    let (good, good_lse, faults) = latent_decode(&mut e, &table, &lens, &plan, q()).unwrap();
    assert!(faults.is_empty());
    let per = dims().heads * dims().d_c / GROUPS;
    for bad_index in [-1, POOL_PAGES as i32, i32::MAX] {
        let mut bad = table.clone();
        bad[TABLE_WIDTH + 2] = bad_index; // entry 1's third page
        let (out, lse, faults) = latent_decode(&mut e, &bad, &lens, &plan, q()).unwrap();
        assert_eq!(faults, Faults::BAD_PAGE);
        assert!(out[per..2 * per].iter().all(|v| v.is_nan()));
        assert!(lse[8..16].iter().all(|v| v.is_nan()));
        for entry in [0, 2] {
            let r = entry * per..(entry + 1) * per;
            assert_eq!(out[r.clone()], good[r], "entry {entry} is untouched");
            assert_eq!(
                lse[entry * 8..entry * 8 + 8],
                good_lse[entry * 8..entry * 8 + 8]
            );
        }
    }
    // a length longer than the block table's width can name
    let mut long = lens.clone();
    long[2] = (TABLE_WIDTH * PAGE + 1) as i32;
    let mut long_plan = vec![0; plan.len()];
    e.ctx.decode_plan(&long, &mut long_plan).unwrap();
    let (out, _, faults) = latent_decode(&mut e, &table, &long, &long_plan, q()).unwrap();
    assert!(faults.contains(Faults::BAD_PAGE));
    assert!(out[2 * per..].iter().all(|v| v.is_nan()));
    assert_eq!(out[..per], good[..per]);
    // the next good call reports nothing
    let (out, _, faults) = latent_decode(&mut e, &table, &lens, &plan, q()).unwrap();
    assert!(faults.is_empty());
    assert_eq!(out, good);
}

#[test]
fn stale_or_foreign_plans_and_bad_shapes_are_errors() {
    let (mut e, ids, table, lens, plan) = small_engine();
    let (q_nope, q_rope) = e.queries(&ids, 0);
    let q = || Queries::Nope {
        q_nope: &q_nope,
        q_rope: &q_rope,
    };
    let kind = |r: tpla::Result<(Vec<f32>, Vec<f32>, Faults)>| r.unwrap_err().kind();
    let message =
        |r: tpla::Result<(Vec<f32>, Vec<f32>, Faults)>| r.unwrap_err().message().to_string();
    // the lengths grew after planning
    let mut grown = lens.clone();
    grown[0] += 1;
    let m = message(latent_decode(&mut e, &table, &grown, &plan, q()));
    assert!(m.contains("plan again"), "{m}");
    // a plan made by another backend
    let mut ref_plan = vec![0; e.reference.decode_plan_len(ids.len())];
    e.reference.decode_plan(&lens, &mut ref_plan).unwrap();
    let m = message(latent_decode(&mut e, &table, &lens, &ref_plan, q()));
    assert!(m.contains("another backend"), "{m}");
    // no plan, a damaged plan
    assert_eq!(
        kind(latent_decode(&mut e, &table, &lens, &[], q())),
        ErrorKind::InvalidArgument
    );
    for word in 8..plan.len().min(40) {
        let mut damaged = plan.clone();
        damaged[word] ^= 0x40;
        let r = latent_decode(&mut e, &table, &lens, &damaged, q());
        // a flipped bit in a span or item either breaks the tiling or names another row
        assert!(r.is_err() || word >= plan[4] as usize, "word {word}");
    }
    // negative lengths
    let mut negative = lens.clone();
    negative[1] = -3;
    assert!(e
        .ctx
        .decode_plan(&negative, &mut vec![0; plan.len()])
        .is_err());
    assert_eq!(
        kind(latent_decode(&mut e, &table, &negative, &plan, q())),
        ErrorKind::InvalidArgument
    );
    // a too-short plan buffer
    assert!(e.ctx.decode_plan(&lens, &mut [0; 9]).is_err());
    // block table rows for another batch
    assert!(BlockTable::new(&table, 2, TABLE_WIDTH).is_err());
    // wrong query count
    let short = Queries::Nope {
        q_nope: &q_nope[1..],
        q_rope: &q_rope,
    };
    assert_eq!(
        kind(latent_decode(&mut e, &table, &lens, &plan, short)),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn layouts_that_do_not_fit_are_refused() {
    let d = dims();
    let rw = d.d_c / GROUPS + d.d_r;
    let ok = PagedLayout {
        dtype: DType::Bf16,
        row_width: rw,
        rope_width: d.d_r,
        page_size: 16,
        page_stride: 16 * rw * 2,
        pages: 4,
    };
    let words = vec![0u32; ok.extent().unwrap() / 4 + 1];
    let bytes: &[u8] = bytemuck::cast_slice(&words);
    assert!(PagedCache::new(ok, bytes).is_ok());
    let cases = [
        PagedLayout { page_size: 0, ..ok },
        PagedLayout { pages: 0, ..ok },
        PagedLayout {
            page_stride: ok.page_stride - 2,
            ..ok
        },
        PagedLayout {
            page_stride: ok.page_stride + 1,
            ..ok
        },
        PagedLayout {
            pages: usize::MAX / 2,
            ..ok
        },
    ];
    for bad in cases {
        assert!(PagedCache::new(bad, bytes).is_err(), "{bad:?}");
    }
    // fp8 rows: codes, one f32 scale per 128 of them, the bf16 key (64 + 4 + 64 bytes
    // here), pages and memory 4-byte aligned, rows a multiple of 4 bytes
    let fp8_row = d.d_c / GROUPS + 4 + 2 * d.d_r;
    let fp8 = PagedLayout {
        dtype: DType::Fp8E4m3,
        page_stride: 16 * fp8_row,
        ..ok
    };
    assert_eq!(fp8.row_bytes(), fp8_row);
    assert!(PagedCache::new(fp8, bytes).is_ok());
    for bad in [
        PagedLayout {
            page_stride: 16 * fp8_row - 4,
            ..fp8
        },
        PagedLayout {
            page_stride: 16 * fp8_row + 2,
            ..fp8
        },
        // a key of odd width leaves rows of 2 (mod 4) bytes
        PagedLayout {
            rope_width: d.d_r - 1,
            row_width: rw - 1,
            page_stride: 16 * (fp8_row + 2),
            ..fp8
        },
        PagedLayout {
            rope_width: rw + 1,
            ..fp8
        },
    ] {
        assert_eq!(
            PagedCache::new(bad, bytes).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad:?}"
        );
    }
    assert!(PagedCache::new(fp8, &bytes[2..]).is_err());
    // memory shorter than the layout's extent, misaligned memory
    assert!(PagedCache::new(ok, &bytes[..ok.extent().unwrap() - 1]).is_err());
    assert!(PagedCache::new(
        PagedLayout {
            dtype: DType::F32,
            page_stride: 16 * rw * 4,
            pages: 1,
            ..ok
        },
        &bytes[2..]
    )
    .is_err());
    // rows of another width than the rank's
    let (mut e, ids, table, lens, plan) = small_engine();
    let (q_nope, q_rope) = e.queries(&ids, 0);
    let other = PagedLayout {
        row_width: rw + 8,
        page_stride: 16 * (rw + 8) * 2,
        ..ok
    };
    let words = vec![0u32; other.extent().unwrap() / 4 + 1];
    let step = PagedStep {
        cache: PagedCache::new(other, bytemuck::cast_slice(&words)).unwrap(),
        block_table: BlockTable::new(&table, 3, TABLE_WIDTH).unwrap(),
        seq_lens: &lens,
        plan: &plan,
        softmax_scale: None,
        mu: None,
    };
    let mut out = vec![0.0; 3 * d.heads * d.d_v];
    let q = Queries::Nope {
        q_nope: &q_nope,
        q_rope: &q_rope,
    };
    let err = e
        .ctx
        .decode_paged(0, &step, q, Outputs::Heads(&mut out))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch);
    // a scale that is not finite and positive
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let step = PagedStep {
            cache: e.pools[0].cache(),
            softmax_scale: Some(bad),
            ..step
        };
        let q = Queries::Nope {
            q_nope: &q_nope,
            q_rope: &q_rope,
        };
        assert!(e
            .ctx
            .decode_paged(0, &step, q, Outputs::Heads(&mut out))
            .is_err());
    }
}

#[test]
fn query_forms_output_types_and_scale_overrides_agree() {
    let (mut e, ids, table, lens, plan) = small_engine();
    let d = dims();
    let (h, w, b) = (d.heads, d.d_c / GROUPS, ids.len());
    let (q_nope, q_rope) = e.queries(&ids, 0);
    let wk = e.ctx.layer(0).unwrap().w_uk.clone();
    // absorbed latent queries in f32, as an engine would pass them
    let mut q_lat = vec![0.0f32; b * h * w];
    for i in 0..b * h {
        for j in 0..w {
            q_lat[i * w + j] = (0..d.d_n)
                .map(|k| wk[((i % h) * w + j) * d.d_n + k] * q_nope[i * d.d_n + k])
                .sum();
        }
    }
    let mut joined = Vec::new();
    for i in 0..b * h {
        joined.extend_from_slice(&q_lat[i * w..(i + 1) * w]);
        joined.extend_from_slice(&q_rope[i * d.d_r..(i + 1) * d.d_r]);
    }
    let latent = Queries::Latent {
        q_lat: &q_lat,
        q_rope: &q_rope,
    };
    let (a, a_lse, _) = latent_decode(&mut e, &table, &lens, &plan, latent).unwrap();
    let (j, j_lse, _) =
        latent_decode(&mut e, &table, &lens, &plan, Queries::Joined(&joined)).unwrap();
    assert_eq!(a, j);
    assert_eq!(a_lse, j_lse);

    // doubling the softmax scale equals doubling the queries (both exact in binary)
    let doubled: Vec<f32> = joined.iter().map(|v| v * 2.0).collect();
    let (x, _, _) = latent_decode(&mut e, &table, &lens, &plan, Queries::Joined(&doubled)).unwrap();
    let step = |scale: Option<f64>, mu: Option<f64>| PagedStep {
        cache: e.pools[0].cache(),
        block_table: BlockTable::new(&table, b, TABLE_WIDTH).unwrap(),
        seq_lens: &lens,
        plan: &plan,
        softmax_scale: scale,
        mu,
    };
    let (mut y, mut y_lse) = (vec![0.0; b * h * w], vec![0.0; b * h]);
    let s = step(Some(2.0 * d.softmax_scale), Some(1.1));
    let ctx = &mut e.ctx;
    ctx.decode_paged(
        0,
        &s,
        Queries::Joined(&joined),
        Outputs::Latent {
            out: &mut y,
            lse: &mut y_lse,
        },
    )
    .unwrap();
    assert_eq!(x, y, "softmax_scale overrides the model's");
    // bf16 outputs are the f32 outputs rounded
    let s = step(None, None);
    let (mut bo, mut blse) = (vec![half::bf16::ZERO; b * h * w], vec![0.0; b * h]);
    ctx.decode_paged(
        0,
        &s,
        Queries::Joined(&joined),
        Outputs::LatentBf16 {
            out: &mut bo,
            lse: &mut blse,
        },
    )
    .unwrap();
    assert!(bo
        .iter()
        .zip(&a)
        .all(|(x, y)| *x == half::bf16::from_f32(*y)));
    assert_eq!(blse, a_lse);
    let mut heads = vec![0.0; b * h * d.d_v];
    let mut heads_bf16 = vec![half::bf16::ZERO; b * h * d.d_v];
    ctx.decode_paged(0, &s, Queries::Joined(&joined), Outputs::Heads(&mut heads))
        .unwrap();
    ctx.decode_paged(
        0,
        &s,
        Queries::Joined(&joined),
        Outputs::HeadsBf16(&mut heads_bf16),
    )
    .unwrap();
    assert!(heads_bf16
        .iter()
        .zip(&heads)
        .all(|(x, y)| *x == half::bf16::from_f32(*y)));
    // mu overrides the layer's: a different mu gives a different answer
    let s = step(None, Some(0.5));
    let mut other = vec![0.0; b * h * d.d_v];
    ctx.decode_paged(0, &s, Queries::Joined(&joined), Outputs::Heads(&mut other))
        .unwrap();
    assert_ne!(other, heads);
}

#[test]
fn appends_skip_padding_slots_report_bad_ones_and_check_before_writing() {
    let mut e = Engine::new(DType::Bf16);
    let d = dims();
    let a = vec![0.5f32; 3 * d.d_c];
    let kr = vec![0.25f32; 3 * d.d_r];
    let before = e.pools[0].words.clone();
    let slots = [-1, (POOL_PAGES * PAGE) as i32, 5];
    let faults = e
        .ctx
        .append_paged(
            0,
            &mut e.pools[0].cache_mut(),
            &slots,
            &a,
            &kr,
            RmsMode::Exact,
        )
        .unwrap();
    assert_eq!(faults, Faults::BAD_SLOT);
    let bytes: &[u8] = bytemuck::cast_slice(&e.pools[0].words);
    let old: &[u8] = bytemuck::cast_slice(&before);
    let row = e.pools[0].layout.row_bytes();
    let changed: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != old[i]).collect();
    assert!(!changed.is_empty());
    assert!(
        changed.iter().all(|&i| (5 * row..6 * row).contains(&i)),
        "only slot 5 was written"
    );
    // a non-finite latent: nothing is written
    let snapshot = e.pools[0].words.clone();
    let mut bad = a.clone();
    bad[2 * d.d_c] = f32::NAN;
    let err = e
        .ctx
        .append_paged(
            0,
            &mut e.pools[0].cache_mut(),
            &[7, 8, 9],
            &bad,
            &kr,
            RmsMode::Exact,
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(e.pools[0].words, snapshot);
    // counts that disagree, a layer without weights
    assert!(e
        .ctx
        .append_paged(
            0,
            &mut e.pools[0].cache_mut(),
            &[1, 2],
            &a,
            &kr,
            RmsMode::Exact
        )
        .is_err());
    assert!(e
        .ctx
        .append_paged(
            LAYERS,
            &mut e.pools[0].cache_mut(),
            &slots,
            &a,
            &kr,
            RmsMode::Exact
        )
        .is_err());
}

#[test]
fn a_prefill_shard_is_imported_into_engine_pages_byte_for_byte() {
    let d = dims();
    let mut e = Engine::new(DType::Bf16);
    let plan = ShardPlan::new(&d, GROUPS, RANK).unwrap();
    let ids: Vec<TransformId> = e.ctx.transform_ids().unwrap();
    let seqs = [(11u32, 90usize), (12, 17)];
    let export = ExportPlan::new(d, GROUPS, DType::Bf16, 16, ids, &seqs).unwrap();
    let mut images = vec![vec![0u8; export.image_len()]; GROUPS];
    let data: Vec<Vec<Sequence>> = e
        .layers
        .iter()
        .map(|l| {
            seqs.iter()
                .map(|&(id, n)| l.syn.sequence(n, id as u64))
                .collect()
        })
        .collect();
    {
        let views = images.iter_mut().map(|b| b.as_mut_slice()).collect();
        let mut writer = ShardWriter::to_buffers(&export, views).unwrap();
        while let Some((l, id)) = writer.next_block() {
            let s = seqs.iter().position(|x| x.0 == id).unwrap();
            let tokens = &data[l][s].tokens;
            let rotated = rotated_latents(&tokens.latents, &e.layers[l].transform);
            writer.push(&rotated, &tokens.k_rope).unwrap();
        }
        writer.finish().unwrap();
    }
    let spec = ShardSpec::new(d, &plan, DType::Bf16, 16, e.ctx.transform_ids().unwrap()).unwrap();
    let mut shard = RankCache::new(spec, 4).unwrap();
    shard.register_buffer(images.swap_remove(RANK)).unwrap();
    // the engine places the sequences on its shuffled pages and decodes them
    let mut table = vec![-1; seqs.len() * TABLE_WIDTH];
    let mut lens = Vec::new();
    for (b, &(id, n)) in seqs.iter().enumerate() {
        let pages: Vec<i32> = (0..n.div_ceil(PAGE))
            .map(|_| e.free.pop().unwrap())
            .collect();
        table[b * TABLE_WIDTH..][..pages.len()].copy_from_slice(&pages);
        let slots: Vec<i32> = (0..n)
            .map(|t| pages[t / PAGE] * PAGE as i32 + (t % PAGE) as i32)
            .collect();
        for l in 0..LAYERS {
            let faults = e
                .ctx
                .import_sequence(&shard, id, l, &mut e.pools[l].cache_mut(), &slots)
                .unwrap();
            assert!(faults.is_empty());
        }
        lens.push(n as i32);
    }
    let mut plan_words = vec![0; e.ctx.decode_plan_len(seqs.len())];
    e.ctx.decode_plan(&lens, &mut plan_words).unwrap();
    let q_nope = vec![0.3f32; seqs.len() * d.heads * d.d_n];
    let q_rope = vec![-0.2f32; seqs.len() * d.heads * d.d_r];
    for l in 0..LAYERS {
        let step = PagedStep {
            cache: e.pools[l].cache(),
            block_table: BlockTable::new(&table, seqs.len(), TABLE_WIDTH).unwrap(),
            seq_lens: &lens,
            plan: &plan_words,
            softmax_scale: None,
            mu: None,
        };
        let q = || Queries::Nope {
            q_nope: &q_nope,
            q_rope: &q_rope,
        };
        let mut paged = vec![0.0; seqs.len() * d.heads * d.d_v];
        e.ctx
            .decode_paged(l, &step, q(), Outputs::Heads(&mut paged))
            .unwrap();
        let mut owned = vec![0.0; paged.len()];
        let ids: Vec<u32> = seqs.iter().map(|s| s.0).collect();
        e.ctx
            .decode(&shard, l, &ids, q(), Outputs::Heads(&mut owned))
            .unwrap();
        assert!(paged
            .iter()
            .zip(&owned)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    // a source of another element type, too few slots
    let slots = vec![0; 90];
    assert!(e
        .ctx
        .import_sequence(&shard, 11, 0, &mut e.pools[0].cache_mut(), &slots[..89])
        .is_err());
    let mut f32_pool = Pool::new(DType::F32, plan.row_width(&d));
    let err = e
        .ctx
        .import_sequence(&shard, 11, 0, &mut f32_pool.cache_mut(), &slots)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch);
}

//! The engine API on the GPU (`tpla::engine_device`), driven the way a serving engine
//! drives it: a device pool whose pages a block allocator hands out shuffled, sequences
//! added and freed between steps (freed pages reused), mixed lengths (an empty padding
//! entry, 1, 63, 64, 65 and 4096 tokens), device appends at a slot mapping, and a CUDA
//! graph of plan + append + decode of several layers replayed with new tokens. Results
//! are checked against the f64 reference, bit for bit against the owned-cache device path
//! on the same rows, and the device appends against the CPU's `append_paged`.
//!
//! Every test skips, saying why, on a machine without a usable GPU (CI has none).

#![cfg(feature = "cuda")]

mod attention_support;

use attention_support::{gpu, launch_poisoned};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::time::{SystemTime, UNIX_EPOCH};
use tpla::attention::cuda::{CudaBackend, DecodeKernel, DeviceBuffer, DeviceCacheConfig};
use tpla::attention::reference::{latent_attention, Reference};
use tpla::attention::{LatentShape, RowSource};
use tpla::decode::{RankContext, RankLayer};
use tpla::engine::{Faults, PagedCacheMut, PagedLayout, RmsMode};
use tpla::engine_device::{DeviceAppend, DeviceEngine, DevicePagedCache, DeviceStep};
use tpla::transform::{SecondMoment, SliceLayout, Transform};
use tpla::{DType, ErrorKind, ModelDims, Result, ShardPlan};

const HEADS: usize = 64;
const D_C: usize = 512;
const D_R: usize = 64;
const GROUPS: usize = 4;
const W: usize = D_C / GROUPS;
const RW: usize = W + D_R;
const PAGE: usize = 64;
const LAYERS: usize = 3;

/// A new seed every run (printed, so a failure can be replayed).
fn fresh_seed() -> u64 {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    seed
}

fn dims() -> ModelDims {
    ModelDims::new(HEADS, D_C, D_R, 64, 64, 1.0 / 128f64.sqrt()).unwrap()
}

/// What most tests start from: a fresh generator (its seed printed), [`context`] and a
/// bf16 device engine made from it; `None` (the test returns) without a usable GPU.
fn engine_setup() -> Option<(ChaCha8Rng, RankContext, DeviceEngine)> {
    let backend = gpu()?;
    let mut rng = ChaCha8Rng::seed_from_u64(fresh_seed());
    let ctx = context(&mut rng);
    let engine = DeviceEngine::from_context(backend, &ctx).unwrap();
    Some((rng, ctx, engine))
}

/// A rank context of three layers: Hadamard, PCA and identity transforms, random
/// absorbed weights (decode on the device reads only mu from them).
fn context(rng: &mut ChaCha8Rng) -> RankContext {
    context_of(GROUPS, rng)
}

/// [`context`] with `groups` latent groups (slices of D_C / groups values).
fn context_of(groups: usize, rng: &mut ChaCha8Rng) -> RankContext {
    let d = dims();
    // rank 1 as the default context's, rank 0 when there is only one
    let plan = ShardPlan::new(&d, groups, groups.min(2) - 1).unwrap();
    let w = D_C / groups;
    let mut ctx = RankContext::new(d, plan, LAYERS, Box::new(Reference)).unwrap();
    let mut moment = SecondMoment::new(D_C);
    for _ in 0..2 * D_C {
        let x: Vec<f64> = (0..D_C)
            .map(|i| rng.sample::<f64, _>(StandardNormal) * (1.0 + (i % 7) as f64))
            .collect();
        moment.add(&x).unwrap();
    }
    let transforms = [
        Transform::hadamard(D_C, 5).unwrap(),
        Transform::pca(&moment, SliceLayout::Interleaved, groups).unwrap(),
        Transform::identity(D_C).unwrap(),
    ];
    for (l, t) in transforms.into_iter().enumerate() {
        let mut n = |k: usize| (0..k).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let layer = RankLayer::from_f32(
            n(HEADS * w * d.d_n),
            n(HEADS * w * d.d_v),
            1.0 + 0.1 * l as f64,
            t,
            0.3,
        )
        .unwrap();
        ctx.install(l, layer).unwrap();
    }
    ctx
}

fn layout(pages: usize) -> PagedLayout {
    PagedLayout {
        dtype: DType::Bf16,
        row_width: RW,
        rope_width: D_R,
        page_size: PAGE,
        page_stride: PAGE * RW * 2,
        pages,
    }
}

/// Bytes of an FP8 row of the rank (DESIGN 7.1): codes, block scales, bf16 key.
fn fp8_row_bytes() -> usize {
    DType::Fp8E4m3.row_bytes(W, D_R)
}

fn fp8_layout(pages: usize) -> PagedLayout {
    PagedLayout {
        dtype: DType::Fp8E4m3,
        page_stride: PAGE * fp8_row_bytes(),
        ..layout(pages)
    }
}

/// An engine pool on the device with its host mirror: bf16 rows ([`Pool`]) or FP8 rows
/// ([`Fp8Pool`]).
trait EnginePool {
    /// The device pool as the engine takes it.
    fn cache(&self) -> DevicePagedCache;
    /// The bytes of row `slot` of the host mirror.
    fn row_bytes_of(&self, slot: usize) -> &[u8];
    /// Writes a random row of the pool's type into row `slot` of the host mirror.
    fn fill_random(&mut self, slot: usize, rng: &mut ChaCha8Rng);
    fn dtype(&self) -> DType {
        self.cache().layout.dtype
    }
    /// The f64 rows of a sequence in token order (what the kernels read: FP8 values
    /// dequantised).
    fn rows(&self, pages: &[i32], len: usize) -> Vec<f64> {
        let mut rows = vec![0.0; len * RW];
        for (t, row) in rows.chunks_mut(RW).enumerate() {
            let slot = pages[t / PAGE] as usize * PAGE + t % PAGE;
            self.dtype().decode_row(self.row_bytes_of(slot), W, row);
        }
        rows
    }
}

/// The engine's device pool of one layer and its host mirror (bf16 bits, pages packed);
/// on the device each page is followed by `pad` bytes of NaN bit patterns (an engine's
/// padded page stride: the kernels must step over them and never read them).
struct Pool {
    pages: usize,
    pad: usize,
    host: Vec<u16>,
    dev: DeviceBuffer<u16>,
}

impl Pool {
    fn new(backend: &CudaBackend, pages: usize) -> Self {
        Self::padded(backend, pages, 0)
    }
    fn padded(backend: &CudaBackend, pages: usize, pad: usize) -> Self {
        assert_eq!(pad % 16, 0);
        let dev = DeviceBuffer::new(backend.device(), pages * (PAGE * RW + pad / 2)).unwrap();
        let mut pool = Pool {
            pages,
            pad,
            host: vec![0; pages * PAGE * RW],
            dev,
        };
        pool.upload();
        pool
    }
    fn row_mut(&mut self, slot: usize) -> &mut [u16] {
        &mut self.host[slot * RW..(slot + 1) * RW]
    }
    fn upload(&mut self) {
        if self.pad == 0 {
            return self.dev.upload(&self.host).unwrap();
        }
        let image: Vec<u16> = self
            .host
            .chunks(PAGE * RW)
            .flat_map(|page| {
                page.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0x7fc0, self.pad / 2))
            })
            .collect();
        self.dev.upload(&image).unwrap();
    }
}

impl EnginePool for Pool {
    fn cache(&self) -> DevicePagedCache {
        let mut layout = layout(self.pages);
        layout.page_stride += self.pad;
        DevicePagedCache {
            base: self.dev.ptr(),
            layout,
        }
    }
    fn row_bytes_of(&self, slot: usize) -> &[u8] {
        bytemuck::cast_slice(&self.host[slot * RW..(slot + 1) * RW])
    }
    fn fill_random(&mut self, slot: usize, rng: &mut ChaCha8Rng) {
        self.row_mut(slot).copy_from_slice(&random_row(rng));
    }
}

/// The engine's device pool of FP8 rows and its host mirror (pages packed); on the device
/// each page is followed by `pad` bytes (a multiple of 16) of e4m3 NaN codes, which the
/// kernels must step over.
struct Fp8Pool {
    pages: usize,
    pad: usize,
    host: Vec<u8>,
    dev: DeviceBuffer<u8>,
}

impl Fp8Pool {
    fn padded(backend: &CudaBackend, pages: usize, pad: usize) -> Self {
        assert_eq!(pad % 16, 0);
        let page_bytes = PAGE * fp8_row_bytes();
        let dev = DeviceBuffer::new(backend.device(), pages * (page_bytes + pad)).unwrap();
        let mut pool = Fp8Pool {
            pages,
            pad,
            host: vec![0; pages * page_bytes],
            dev,
        };
        pool.upload();
        pool
    }
    fn row_mut(&mut self, slot: usize) -> &mut [u8] {
        let rb = fp8_row_bytes();
        &mut self.host[slot * rb..(slot + 1) * rb]
    }
    fn upload(&mut self) {
        let image: Vec<u8> = self
            .host
            .chunks(PAGE * fp8_row_bytes())
            .flat_map(|page| {
                page.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0x7f, self.pad))
            })
            .collect();
        self.dev.upload(&image).unwrap();
    }
    /// The device's rows into the host mirror (padding dropped).
    fn download(&mut self) {
        let page_bytes = PAGE * fp8_row_bytes();
        let image = self.dev.to_vec().unwrap();
        self.host = image
            .chunks(page_bytes + self.pad)
            .flat_map(|page| page[..page_bytes].iter().copied())
            .collect();
    }
}

impl EnginePool for Fp8Pool {
    fn cache(&self) -> DevicePagedCache {
        let mut layout = fp8_layout(self.pages);
        layout.page_stride += self.pad;
        DevicePagedCache {
            base: self.dev.ptr(),
            layout,
        }
    }
    fn row_bytes_of(&self, slot: usize) -> &[u8] {
        let rb = fp8_row_bytes();
        &self.host[slot * rb..(slot + 1) * rb]
    }
    fn fill_random(&mut self, slot: usize, rng: &mut ChaCha8Rng) {
        self.row_mut(slot).copy_from_slice(&random_fp8_row(rng));
    }
}

/// A sequence the engine serves.
#[derive(Clone)]
struct Live {
    pages: Vec<i32>,
    len: usize,
}

/// Block allocator over shuffled pages.
struct Allocator {
    free: Vec<i32>,
    used: Vec<i32>,
}

impl Allocator {
    fn new(pages: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut free: Vec<i32> = (0..pages as i32).collect();
        free.shuffle(rng);
        Allocator {
            free,
            used: Vec::new(),
        }
    }
    fn grow(&mut self, s: &mut Live, len: usize) {
        while s.pages.len() * PAGE < len {
            let p = self.free.pop().expect("the pool is large enough");
            self.used.push(p);
            s.pages.push(p);
        }
    }
    fn release(&mut self, s: Live, rng: &mut ChaCha8Rng) {
        let mut pages = s.pages;
        pages.shuffle(rng);
        self.free.extend(pages);
    }
}

/// A new sequence of `len` tokens on pages from `alloc`, its rows random in `pool`'s host
/// mirror (uploaded by the caller).
fn new_sequence(
    pool: &mut dyn EnginePool,
    alloc: &mut Allocator,
    len: usize,
    rng: &mut ChaCha8Rng,
) -> Live {
    let mut s = Live {
        pages: Vec::new(),
        len,
    };
    alloc.grow(&mut s, len);
    for t in 0..len {
        pool.fill_random(s.pages[t / PAGE] as usize * PAGE + t % PAGE, rng);
    }
    s
}

/// Asserts that the engine's outputs (`out`, `lse`) and another path's (`other`: its
/// name, outputs and log-sum-exps) hold the same bits for every non-empty entry.
fn assert_paths_bit_equal(
    seqs: &[Live],
    (out, lse): (&[f32], &[f32]),
    (other, o_out, o_lse): (&str, &[f32], &[f32]),
    what: &str,
) {
    for (b, s) in seqs.iter().enumerate() {
        if s.len == 0 {
            continue;
        }
        assert!(
            bits_equal(
                &out[b * HEADS * W..(b + 1) * HEADS * W],
                &o_out[b * HEADS * W..(b + 1) * HEADS * W]
            ) && bits_equal(
                &lse[b * HEADS..(b + 1) * HEADS],
                &o_lse[b * HEADS..(b + 1) * HEADS]
            ),
            "{what} entry {b}: engine and {other} paths differ"
        );
    }
}

fn random_row(rng: &mut ChaCha8Rng) -> Vec<u16> {
    (0..RW)
        .map(|_| half::bf16::from_f64(rng.sample::<f64, _>(StandardNormal)).to_bits())
        .collect()
}

fn random_f32(n: usize, sigma: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect()
}

/// Block table `[batch][width]` (unused entries -1) and lengths of `seqs`.
fn table(seqs: &[Live], width: usize) -> (Vec<i32>, Vec<i32>) {
    let mut t = vec![-1; seqs.len() * width];
    for (b, s) in seqs.iter().enumerate() {
        t[b * width..b * width + s.pages.len()].copy_from_slice(&s.pages);
    }
    (t, seqs.iter().map(|s| s.len as i32).collect())
}

/// f64 reference outputs and log-sum-exps of `seqs` (empty ones: zeros, -inf), heads
/// chunked over threads.
fn reference(pool: &dyn EnginePool, seqs: &[Live], q: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let shape = LatentShape {
        heads: 8,
        slice_width: W,
        d_r: D_R,
    };
    let mut out = vec![0.0; seqs.len() * HEADS * W];
    let mut lse = vec![f64::NEG_INFINITY; seqs.len() * HEADS];
    std::thread::scope(|s| {
        for (b, (o, l)) in out
            .chunks_mut(HEADS * W)
            .zip(lse.chunks_mut(HEADS))
            .enumerate()
        {
            if seqs[b].len == 0 {
                continue;
            }
            let rows = pool.rows(&seqs[b].pages, seqs[b].len);
            let rows = std::sync::Arc::new(rows);
            for (c, (oc, lc)) in o.chunks_mut(8 * W).zip(l.chunks_mut(8)).enumerate() {
                let rows = rows.clone();
                let qs: Vec<f64> = q[(b * HEADS + c * 8) * RW..(b * HEADS + c * 8 + 8) * RW]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                s.spawn(move || {
                    let (ro, rl) = latent_attention(&rows, &qs, shape);
                    oc.copy_from_slice(&ro);
                    lc.copy_from_slice(&rl);
                });
            }
        }
    });
    (out, lse)
}

/// Checks device outputs of `seqs` against the reference: relative L2 per entry below
/// 1e-2 (NaN never passes), lse within 2e-2, empty entries exactly zero and -inf.
fn check_against_reference(
    pool: &dyn EnginePool,
    seqs: &[Live],
    q: &[f32],
    out: &[f32],
    lse: &[f32],
) {
    let (r_out, r_lse) = reference(pool, seqs, q);
    for (b, s) in seqs.iter().enumerate() {
        let o = &out[b * HEADS * W..(b + 1) * HEADS * W];
        let l = &lse[b * HEADS..(b + 1) * HEADS];
        if s.len == 0 {
            assert!(o.iter().all(|&v| v == 0.0), "entry {b} (empty) is not zero");
            assert!(l.iter().all(|&v| v == f32::NEG_INFINITY), "entry {b} lse");
            continue;
        }
        let ro = &r_out[b * HEADS * W..(b + 1) * HEADS * W];
        let (mut num, mut den) = (0.0, 0.0);
        for (x, r) in o.iter().zip(ro) {
            num += (*x as f64 - r).powi(2);
            den += r * r;
        }
        let e = (num / den).sqrt();
        assert!(e < 1e-2, "entry {b} (length {}): rel L2 {e}", s.len);
        for (x, r) in l.iter().zip(&r_lse[b * HEADS..(b + 1) * HEADS]) {
            let err = (*x as f64 - r).abs() / r.abs().max(1.0);
            assert!(err < 2e-2, "entry {b}: lse {x} vs {r}");
        }
    }
}

/// Device buffers of one decode step.
struct StepBuffers {
    table: DeviceBuffer<i32>,
    lens: DeviceBuffer<i32>,
    q: DeviceBuffer<f32>,
    out: DeviceBuffer<f32>,
    lse: DeviceBuffer<f32>,
    workspace: DeviceBuffer<u8>,
    faults: DeviceBuffer<u32>,
    width: usize,
    batch: usize,
}

impl StepBuffers {
    fn new(engine: &DeviceEngine, seqs: &[Live], width: usize, q: &[f32]) -> Self {
        let dev = engine.backend().device();
        let (t, l) = table(seqs, width);
        let b = seqs.len();
        let mut faults = DeviceBuffer::new(dev, 1).unwrap();
        faults.fill_bytes(0).unwrap();
        StepBuffers {
            table: DeviceBuffer::from_host(dev, &t).unwrap(),
            lens: DeviceBuffer::from_host(dev, &l).unwrap(),
            q: DeviceBuffer::from_host(dev, q).unwrap(),
            out: DeviceBuffer::new(dev, b * HEADS * W).unwrap(),
            lse: DeviceBuffer::new(dev, b * HEADS).unwrap(),
            workspace: DeviceBuffer::new(dev, engine.workspace_bytes(b, width).unwrap()).unwrap(),
            faults,
            width,
            batch: b,
        }
    }
    fn step(&self, pool: &dyn EnginePool) -> DeviceStep {
        DeviceStep {
            cache: pool.cache(),
            block_table: self.table.ptr(),
            batch: self.batch,
            block_table_width: self.width,
            seq_lens: self.lens.ptr(),
            workspace: self.workspace.ptr(),
            workspace_bytes: self.workspace.len(),
            faults: self.faults.ptr(),
        }
    }
    /// Plans and decodes `layer` on the backend's stream, outputs poisoned with NaN
    /// first; returns the outputs and the fault word.
    fn run(
        &mut self,
        engine: &DeviceEngine,
        layer: usize,
        pool: &dyn EnginePool,
    ) -> (Vec<f32>, Vec<f32>, u32) {
        self.out.fill_bytes(0xff).unwrap();
        self.lse.fill_bytes(0xff).unwrap();
        let stream = engine.backend().stream();
        unsafe {
            engine
                .plan_step(
                    self.lens.ptr(),
                    self.batch,
                    self.width,
                    self.workspace.ptr(),
                    self.workspace.len(),
                    stream,
                )
                .unwrap();
            engine
                .decode(
                    layer,
                    &self.step(pool),
                    self.q.ptr(),
                    self.out.ptr(),
                    self.lse.ptr(),
                    stream,
                )
                .unwrap();
        }
        engine.backend().device().synchronize().unwrap();
        (
            self.out.to_vec().unwrap(),
            self.lse.to_vec().unwrap(),
            self.faults.to_vec().unwrap()[0],
        )
    }
}

/// The rows of `seqs`, for an owned device cache (page size 64, one slot per entry).
struct Gathered {
    dtype: DType,
    row_bytes: usize,
    seqs: Vec<(Vec<u8>, usize)>,
}

impl Gathered {
    fn new(pool: &dyn EnginePool, seqs: &[Live]) -> Self {
        let row_bytes = pool.cache().layout.row_bytes();
        let seqs = seqs
            .iter()
            .map(|s| {
                let mut bytes = vec![0u8; s.len.div_ceil(PAGE).max(1) * PAGE * row_bytes];
                for (t, row) in bytes.chunks_mut(row_bytes).take(s.len).enumerate() {
                    let slot = s.pages[t / PAGE] as usize * PAGE + t % PAGE;
                    row.copy_from_slice(pool.row_bytes_of(slot));
                }
                (bytes, s.len)
            })
            .collect();
        Gathered {
            dtype: pool.dtype(),
            row_bytes,
            seqs,
        }
    }
}

impl RowSource for Gathered {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn row_width(&self) -> usize {
        RW
    }
    fn page_size(&self) -> usize {
        PAGE
    }
    fn seq_len(&self, seq: u32) -> Result<usize> {
        Ok(self.seqs[seq as usize].1)
    }
    fn page(&self, seq: u32, page: usize) -> &[u8] {
        let b = PAGE * self.row_bytes;
        &self.seqs[seq as usize].0[page * b..(page + 1) * b]
    }
}

/// The owned-cache device path on the same rows (a device cache of the pool's row type),
/// with the engine's split count.
fn owned_path(
    backend: &CudaBackend,
    engine: &DeviceEngine,
    pool: &dyn EnginePool,
    seqs: &[Live],
    width: usize,
    q: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let dev = backend.device();
    let b = seqs.len();
    let pages: usize = seqs.iter().map(|s| s.len.div_ceil(PAGE)).sum();
    let mut cache = backend
        .new_cache_for(
            DeviceCacheConfig {
                slice_width: W,
                pages: pages.max(1),
                slots: b,
                max_pages_per_slot: width,
            },
            pool.dtype(),
        )
        .unwrap();
    let rows = Gathered::new(pool, seqs);
    for slot in 0..b {
        cache.upload(slot, &rows, slot as u32).unwrap();
    }
    // the engine chooses its split count this way too: from the table's width
    let plan = backend
        .plan_for(engine.shape(), pool.dtype(), b, width * PAGE)
        .unwrap();
    assert_eq!(plan.splits(), engine.splits(b, width).unwrap());
    let slots: Vec<i32> = (0..b as i32).collect();
    let slots_dev = DeviceBuffer::from_host(dev, &slots).unwrap();
    let q_dev = DeviceBuffer::from_host(dev, q).unwrap();
    let mut out = DeviceBuffer::<f32>::new(dev, b * HEADS * W).unwrap();
    let mut lse = DeviceBuffer::<f32>::new(dev, b * HEADS).unwrap();
    launch_poisoned(
        backend, &plan, &cache, &slots_dev, &q_dev, &mut out, &mut lse,
    )
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Decode on a churning engine pool, with both decode kernels: sequences of 0 (padding),
/// 1, 63, 64, 65 and 4096 tokens on shuffled pages; between steps one sequence leaves, a
/// new one arrives on reused pages and every sequence grows by a token. Each step: close
/// to the f64 reference, empty entries zero, no faults, and bit-equal to the owned-cache
/// device path over the same rows.
#[test]
fn engine_pool_decode_matches_the_reference_and_the_owned_path() {
    let seed = fresh_seed();
    // packed pages, then pages 256 bytes apart (NaN between them)
    for (kernel, pad) in [
        (None, 0),
        (Some(DecodeKernel::MmaSync), 0),
        (None, 256),
        (Some(DecodeKernel::MmaSync), 256),
    ] {
        let Some(mut backend) = gpu() else { return };
        backend.set_decode_kernel(kernel);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ctx = context(&mut rng);
        let engine = DeviceEngine::from_context(backend, &ctx).unwrap();
        println!("{kernel:?}, page padding {pad}: {:?}", engine);
        let backend2 = {
            let mut b = CudaBackend::new(0).unwrap();
            b.set_decode_kernel(kernel);
            b
        };
        let pages = 200;
        let width = 66;
        let mut pool = Pool::padded(engine.backend(), pages, pad);
        let mut alloc = Allocator::new(pages, &mut rng);
        let mut seqs: Vec<Live> = [0usize, 1, 63, 64, 65, 4096]
            .into_iter()
            .map(|len| new_sequence(&mut pool, &mut alloc, len, &mut rng))
            .collect();
        for step in 0..3 {
            pool.upload();
            let q = random_f32(seqs.len() * HEADS * RW, 0.08, &mut rng);
            let mut bufs = StepBuffers::new(&engine, &seqs, width, &q);
            let layer = step % LAYERS;
            let (out, lse, faults) = bufs.run(&engine, layer, &pool);
            assert_eq!(faults, 0, "step {step}: faults {faults:#x}");
            check_against_reference(&pool, &seqs, &q, &out, &lse);
            let (o_out, o_lse) = owned_path(&backend2, &engine, &pool, &seqs, width, &q);
            assert_paths_bit_equal(
                &seqs,
                (&out, &lse),
                ("owned", &o_out, &o_lse),
                &format!("step {step}"),
            );
            // churn: the 63-token sequence (or its successor) leaves, a new one arrives on
            // reused pages, every non-empty sequence grows by one token
            let gone = seqs.remove(2);
            alloc.release(gone, &mut rng);
            seqs.push(new_sequence(&mut pool, &mut alloc, 130 + step, &mut rng));
            for s in seqs.iter_mut().filter(|s| s.len > 0) {
                alloc.grow(s, s.len + 1);
                let slot = s.pages[s.len / PAGE] as usize * PAGE + s.len % PAGE;
                pool.row_mut(slot).copy_from_slice(&random_row(&mut rng));
                s.len += 1;
            }
        }
        let distinct: std::collections::HashSet<_> = alloc.used.iter().collect();
        assert!(distinct.len() < alloc.used.len(), "freed pages were reused");
    }
}

/// The CPU's `append_paged` into a host pool (whole pages): the expected bytes.
fn cpu_append(
    ctx: &RankContext,
    layer: usize,
    host: &mut [u16],
    slots: &[i32],
    latents: &[f32],
    k_rope: &[f32],
    mode: RmsMode,
) -> Faults {
    let pages = host.len() / (PAGE * RW);
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(host);
    cpu_append_to(
        ctx,
        layer,
        layout(pages),
        bytes,
        slots,
        latents,
        k_rope,
        mode,
    )
}

/// [`cpu_append`] into host memory of any layout.
#[allow(clippy::too_many_arguments)]
fn cpu_append_to(
    ctx: &RankContext,
    layer: usize,
    layout: PagedLayout,
    bytes: &mut [u8],
    slots: &[i32],
    latents: &[f32],
    k_rope: &[f32],
    mode: RmsMode,
) -> Faults {
    let mut cache = PagedCacheMut::new(layout, bytes).unwrap();
    ctx.append_paged(layer, &mut cache, slots, latents, k_rope, mode)
        .unwrap()
}

/// Compares device rows with the CPU's: equal, or (from the order of the RMS sums) one
/// bf16 unit apart in a few values. Returns the count of differing values.
fn compare_rows(dev: &[u16], cpu: &[u16], what: &str) -> usize {
    let mut differ = 0;
    for (i, (&d, &c)) in dev.iter().zip(cpu).enumerate() {
        if d != c {
            differ += 1;
            assert!(
                (d as i32 - c as i32).abs() == 1 && (d ^ c) & 0x8000 == 0,
                "{what}: value {i} is {d:#06x} on the device, {c:#06x} on the CPU"
            );
        }
    }
    assert!(
        differ * 1000 <= dev.len().max(1000),
        "{what}: {differ} of {} values differ",
        dev.len()
    );
    differ
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// Appends the tokens at `slots` (pre-norm latents `[n][D_C]` and RoPE keys `[n][D_R]`,
/// handed to the device as `input`: f32, or the bf16 bits of these values) into `cache`
/// through [`DeviceEngine::append`], waits for it, and returns the fault word.
#[allow(clippy::too_many_arguments)]
fn device_append(
    engine: &DeviceEngine,
    layer: usize,
    cache: &DevicePagedCache,
    slots: &[i32],
    latents: &[f32],
    k_rope: &[f32],
    input: DType,
    mode: RmsMode,
) -> u32 {
    let dev = engine.backend().device();
    let upload = |v: &[f32]| match input {
        DType::F32 => DeviceBuffer::<u8>::from_host(dev, bytemuck::cast_slice(v)),
        _ => DeviceBuffer::<u8>::from_host(dev, bytemuck::cast_slice(&bf16_bits(v))),
    };
    let slots_dev = DeviceBuffer::from_host(dev, slots).unwrap();
    let (lat_dev, kr_dev) = (upload(latents).unwrap(), upload(k_rope).unwrap());
    let mut faults = DeviceBuffer::<u32>::new(dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    let a = DeviceAppend {
        slots: slots_dev.ptr(),
        count: slots.len(),
        latents: lat_dev.ptr(),
        k_rope: kr_dev.ptr(),
        input,
        mode,
        faults: faults.ptr(),
    };
    unsafe {
        engine
            .append(layer, cache, &a, engine.backend().stream())
            .unwrap()
    };
    dev.synchronize().unwrap();
    faults.to_vec().unwrap()[0]
}

/// Device appends (every transform kind, both RMS modes, f32 and bf16 inputs) write the
/// rows the CPU's `append_paged` writes, at the same slots; padding slots are skipped, a
/// slot past the pool is skipped and flagged, and so is a token with a non-finite input.
#[test]
fn device_appends_equal_the_cpu_appends() {
    let Some((mut rng, ctx, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let pages = 8;
    let n = 40;
    let mut all_slots: Vec<i32> = (0..(pages * PAGE) as i32).collect();
    all_slots.shuffle(&mut rng);
    let mut slots: Vec<i32> = all_slots[..n].to_vec();
    slots[3] = -1; // padding
    slots[7] = (pages * PAGE + 5) as i32; // past the pool
    let mut total_differ = 0;
    for layer in 0..LAYERS {
        for mode in [RmsMode::Exact, RmsMode::Sliced] {
            for input in [DType::F32, DType::Bf16] {
                let scale = rng.random_range(0.01..100.0);
                let mut latents = random_f32(n * D_C, scale, &mut rng);
                let mut k_rope = random_f32(n * D_R, 1.0, &mut rng);
                if input == DType::Bf16 {
                    latents = bf16_round(&latents);
                    k_rope = bf16_round(&k_rope);
                }
                let mut cpu = vec![0u16; pages * PAGE * RW];
                let cpu_faults = cpu_append(&ctx, layer, &mut cpu, &slots, &latents, &k_rope, mode);
                assert_eq!(cpu_faults, Faults::BAD_SLOT);
                let mut pool = Pool::new(engine.backend(), pages);
                let faults = device_append(
                    &engine,
                    layer,
                    &pool.cache(),
                    &slots,
                    &latents,
                    &k_rope,
                    input,
                    mode,
                );
                assert_eq!(faults, Faults::BAD_SLOT.bits());
                pool.host = pool.dev.to_vec().unwrap();
                let what = format!("layer {layer} {mode:?} {input:?}");
                total_differ += compare_rows(&pool.host, &cpu, &what);
            }
        }
    }
    println!("device vs CPU appends: {total_differ} values one bf16 unit apart");

    // a token with a NaN latent, another with an infinite key: neither is written
    let mut latents = random_f32(3 * D_C, 1.0, &mut rng);
    let mut k_rope = random_f32(3 * D_R, 1.0, &mut rng);
    latents[D_C + 17] = f32::NAN;
    k_rope[2 * D_R + 1] = f32::INFINITY;
    let slots = [0i32, 1, 2];
    let pool = Pool::new(engine.backend(), 1);
    let slots_dev = DeviceBuffer::from_host(&dev, &slots).unwrap();
    let lat_dev = DeviceBuffer::from_host(&dev, &latents).unwrap();
    let kr_dev = DeviceBuffer::from_host(&dev, &k_rope).unwrap();
    let mut faults = DeviceBuffer::<u32>::new(&dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    let a = DeviceAppend {
        slots: slots_dev.ptr(),
        count: 3,
        latents: lat_dev.ptr(),
        k_rope: kr_dev.ptr(),
        input: DType::F32,
        mode: RmsMode::Exact,
        faults: faults.ptr(),
    };
    unsafe { engine.append(0, &pool.cache(), &a, stream).unwrap() };
    dev.synchronize().unwrap();
    assert_eq!(faults.to_vec().unwrap()[0], Faults::BAD_VALUE.bits());
    let rows = pool.dev.to_vec().unwrap();
    assert!(rows[..RW].iter().any(|&v| v != 0), "token 0 was written");
    assert!(
        rows[RW..3 * RW].iter().all(|&v| v == 0),
        "bad tokens were written"
    );
}

/// What an engine has in hand: q_nope and q_rope in, partial head outputs out. The
/// device absorbs q_nope through W'_UK, decodes, and projects through W'_UV; the result
/// matches the CPU context's `decode_paged` (f64 reference backend) with `Queries::Nope`
/// and `Outputs::Heads` over the same pool.
#[test]
fn absorbed_queries_and_projected_heads_match_the_cpu_context() {
    use tpla::decode::{Outputs, Queries};
    use tpla::engine::{BlockTable, PagedCache, PagedStep};
    let Some((mut rng, mut ctx, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let d = dims();
    let (pages, width) = (12, 5);
    let mut pool = Pool::new(engine.backend(), pages);
    let mut alloc = Allocator::new(pages, &mut rng);
    let seqs: Vec<Live> = [200usize, 1, 77]
        .iter()
        .map(|&len| new_sequence(&mut pool, &mut alloc, len, &mut rng))
        .collect();
    pool.upload();
    let b = seqs.len();
    let q_nope = random_f32(b * HEADS * d.d_n, 1.0, &mut rng);
    let q_rope = random_f32(b * HEADS * D_R, 1.0, &mut rng);
    for layer in 0..LAYERS {
        // the device: absorb, decode, project
        let mut bufs = StepBuffers::new(&engine, &seqs, width, &vec![0.0; b * HEADS * RW]);
        let qn_dev = DeviceBuffer::from_host(&dev, &q_nope).unwrap();
        let qr_dev = DeviceBuffer::from_host(&dev, &q_rope).unwrap();
        let mut heads_dev = DeviceBuffer::<f32>::new(&dev, b * HEADS * d.d_v).unwrap();
        heads_dev.fill_bytes(0xff).unwrap();
        unsafe {
            engine
                .absorb_queries(layer, b, qn_dev.ptr(), qr_dev.ptr(), bufs.q.ptr(), stream)
                .unwrap()
        };
        let (_, _, faults) = bufs.run(&engine, layer, &pool);
        assert_eq!(faults, 0);
        unsafe {
            engine
                .project(layer, b, bufs.out.ptr(), heads_dev.ptr(), stream)
                .unwrap()
        };
        dev.synchronize().unwrap();
        let got = heads_dev.to_vec().unwrap();
        // the CPU context on the host mirror
        let (t, lens) = table(&seqs, width);
        let mut plan = vec![0; ctx.decode_plan_len(b)];
        ctx.decode_plan(&lens, &mut plan).unwrap();
        let bytes: &[u8] = bytemuck::cast_slice(&pool.host);
        let step = PagedStep {
            cache: PagedCache::new(layout(pages), bytes).unwrap(),
            block_table: BlockTable::new(&t, b, width).unwrap(),
            seq_lens: &lens,
            plan: &plan,
            softmax_scale: None,
            mu: None,
        };
        let mut want = vec![f32::NAN; b * HEADS * d.d_v];
        let q = Queries::Nope {
            q_nope: &q_nope,
            q_rope: &q_rope,
        };
        let f = ctx
            .decode_paged(layer, &step, q, Outputs::Heads(&mut want))
            .unwrap();
        assert!(f.is_empty());
        for e in 0..b {
            let n = HEADS * d.d_v;
            let (g, w) = (&got[e * n..(e + 1) * n], &want[e * n..(e + 1) * n]);
            let num: f64 = g.iter().zip(w).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = w.iter().map(|&y| (y as f64).powi(2)).sum();
            let err = (num / den).sqrt();
            println!("layer {layer} entry {e}: heads rel L2 {err:.2e}");
            assert!(err < 1e-2, "layer {layer} entry {e}: rel L2 {err}");
        }
    }
}

/// bf16 partial head outputs (`project_for`): the f32 outputs of `project` over the same
/// staged products (the batch in runs of the staging buffer's entries) rounded to bf16
/// (as `half::bf16::from_f32` rounds), bit for bit, for batches of one product and of
/// several; a NaN latent row (a faulted entry) gives NaN outputs in both. Bad arguments
/// are refused at the call with the kind the API documents.
#[test]
fn bf16_projected_heads_are_the_f32_ones_rounded() {
    use tpla::engine_device::BF16_PROJECTION_STAGING_BYTES;
    let Some((mut rng, _, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let per_entry = HEADS * dims().d_v;
    let chunk = BF16_PROJECTION_STAGING_BYTES / (per_entry * 4);
    for batch in [3, chunk, 2 * chunk + 5] {
        let mut latent = random_f32(batch * HEADS * W, 1.0, &mut rng);
        latent[W..2 * W].fill(f32::NAN); // entry 0, head 1
        let latent_dev = DeviceBuffer::from_host(&dev, &latent).unwrap();
        let mut f32_dev = DeviceBuffer::<f32>::new(&dev, batch * per_entry).unwrap();
        let mut bf16_dev = DeviceBuffer::<u16>::new(&dev, batch * per_entry).unwrap();
        for layer in 0..LAYERS {
            f32_dev.fill_bytes(0xff).unwrap();
            bf16_dev.fill_bytes(0xff).unwrap();
            unsafe {
                let l = latent_dev.ptr();
                // the f32 products over the entries the staging buffer takes at a time:
                // the bf16 outputs are those rounded, bit for bit (one product over
                // another split of the batch may sum in another order, which near
                // cancellation moves the f32 by more than a bf16 unit)
                for first in (0..batch).step_by(chunk) {
                    let n = chunk.min(batch - first);
                    let (l_at, o_at) = (
                        (first * HEADS * W * 4) as u64,
                        (first * per_entry * 4) as u64,
                    );
                    engine
                        .project(layer, n, l + l_at, f32_dev.ptr() + o_at, stream)
                        .unwrap();
                }
                engine
                    .project_for(layer, batch, l, bf16_dev.ptr(), DType::Bf16, stream)
                    .unwrap();
            }
            dev.synchronize().unwrap();
            let f32s = f32_dev.to_vec().unwrap();
            let got = bf16_dev.to_vec().unwrap();
            let what = format!("batch {batch}, layer {layer}");
            let nan_head = per_entry / HEADS..2 * per_entry / HEADS;
            for (i, (&g, &f)) in got.iter().zip(&f32s).enumerate() {
                if nan_head.contains(&i) {
                    assert!(f.is_nan(), "{what}: f32 output {i} of the NaN row is {f}");
                }
                let want = half::bf16::from_f32(f).to_bits();
                if f.is_nan() {
                    assert!(half::bf16::from_bits(g).is_nan(), "{what}: output {i}");
                } else {
                    assert_eq!(
                        g, want,
                        "{what}: output {i} is {g:#06x}, the f32 {f:e} rounds to {want:#06x}"
                    );
                }
            }
        }
    }

    // refused at the call
    let latent_dev = DeviceBuffer::from_host(&dev, &random_f32(HEADS * W, 1.0, &mut rng)).unwrap();
    let out_dev = DeviceBuffer::<f32>::new(&dev, 2 * per_entry).unwrap();
    let (l, o) = (latent_dev.ptr(), out_dev.ptr());
    let kind = |r: Result<()>| r.unwrap_err().kind();
    unsafe {
        for dtype in [DType::F16, DType::Fp8E4m3] {
            assert_eq!(
                kind(engine.project_for(0, 1, l, o, dtype, stream)),
                ErrorKind::Unsupported
            );
        }
        for (latent, out, dtype) in [
            (0, o, DType::Bf16),
            (l, 0, DType::Bf16),
            (l + 2, o, DType::Bf16),
            (l, o + 1, DType::Bf16),
            (l, o + 2, DType::F32),
        ] {
            assert_eq!(
                kind(engine.project_for(0, 1, latent, out, dtype, stream)),
                ErrorKind::InvalidArgument,
                "latent {latent:#x}, out {out:#x}, {dtype:?}"
            );
        }
        assert_eq!(
            kind(engine.project_for(0, 0, l, o, DType::Bf16, stream)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(engine.project_for(0, 65536, l, o, DType::Bf16, stream)),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            kind(engine.project_for(LAYERS, 1, l, o, DType::Bf16, stream)),
            ErrorKind::OutOfRange
        );
        // bf16 outputs need 2-byte alignment only
        engine
            .project_for(0, 1, l, o + 2, DType::Bf16, stream)
            .unwrap();
    }
    dev.synchronize().unwrap();
}

/// The hand-off of a prefill's rows into the engine's pages, device to device: rows land
/// byte for byte at their destination slots (a packed source, shuffled destinations);
/// padding is skipped, slots past either pool are flagged and copy nothing.
#[test]
fn prefill_rows_are_copied_into_engine_pages_on_the_device() {
    let Some((mut rng, _, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let (src_pages, dst_pages, n) = (3, 7, 150);
    let mut src = Pool::new(engine.backend(), src_pages);
    for slot in 0..n {
        src.row_mut(slot).copy_from_slice(&random_row(&mut rng));
    }
    src.upload();
    let dst = Pool::new(engine.backend(), dst_pages);
    let mut dst_slots: Vec<i32> = (0..(dst_pages * PAGE) as i32).collect();
    dst_slots.shuffle(&mut rng);
    dst_slots.truncate(n);
    let mut src_slots: Vec<i32> = (0..n as i32).collect();
    dst_slots[5] = -1; // padding: skipped
    dst_slots[9] = (dst_pages * PAGE) as i32; // past the destination: flagged
    src_slots[11] = (src_pages * PAGE + 1) as i32; // past the source: flagged
    src_slots[12] = -3; // negative source: flagged
    let dst_dev = DeviceBuffer::from_host(&dev, &dst_slots).unwrap();
    let src_dev = DeviceBuffer::from_host(&dev, &src_slots).unwrap();
    let mut faults = DeviceBuffer::<u32>::new(&dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    unsafe {
        engine
            .copy_rows(
                &dst.cache(),
                dst_dev.ptr(),
                &src.cache(),
                src_dev.ptr(),
                n,
                faults.ptr(),
                engine.backend().stream(),
            )
            .unwrap()
    };
    dev.synchronize().unwrap();
    assert_eq!(faults.to_vec().unwrap()[0], Faults::BAD_SLOT.bits());
    let got = dst.dev.to_vec().unwrap();
    let mut want = vec![0u16; dst_pages * PAGE * RW];
    for (i, (&d, &s)) in dst_slots.iter().zip(&src_slots).enumerate() {
        if [5, 9, 11, 12].contains(&i) {
            continue;
        }
        let (d, s) = (d as usize, s as usize);
        want[d * RW..(d + 1) * RW].copy_from_slice(&src.host[s * RW..(s + 1) * RW]);
    }
    assert!(got == want, "the copied rows differ");
}

/// An engine's decode loop in a CUDA graph: plan, then per layer append one token per
/// sequence and decode, captured once and replayed with new tokens (new latents, slots
/// and lengths written into the same device buffers between replays). The pools equal
/// the CPU's appends of the same tokens, and every replay's outputs are close to the f64
/// reference over those rows.
#[test]
fn plan_append_and_decode_of_several_layers_replay_from_a_cuda_graph() {
    use cudarc::driver::{result, sys};
    let Some((mut rng, ctx, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let (pages, width, steps) = (32, 8, 3);
    let mut alloc = Allocator::new(pages, &mut rng);
    let start_lens = [100usize, 64, 1, 300];
    let b = start_lens.len();
    let mut seqs: Vec<Live> = start_lens
        .iter()
        .map(|&len| {
            let mut s = Live {
                pages: Vec::new(),
                len,
            };
            // pages for the steps to come are in the table before capture
            alloc.grow(&mut s, len + steps);
            s
        })
        .collect();
    let mut pools: Vec<Pool> = (0..LAYERS)
        .map(|_| Pool::new(engine.backend(), pages))
        .collect();
    // prefill: written by the CPU path, uploaded
    for (l, pool) in pools.iter_mut().enumerate() {
        for s in &seqs {
            let slots: Vec<i32> = (0..s.len)
                .map(|t| s.pages[t / PAGE] * PAGE as i32 + (t % PAGE) as i32)
                .collect();
            let lat = random_f32(s.len * D_C, 3.0, &mut rng);
            let kr = random_f32(s.len * D_R, 1.0, &mut rng);
            let f = cpu_append(&ctx, l, &mut pool.host, &slots, &lat, &kr, RmsMode::Exact);
            assert!(f.is_empty());
        }
        pool.upload();
    }
    let (t, _) = table(&seqs, width);
    let table_dev = DeviceBuffer::from_host(&dev, &t).unwrap();
    let mut lens_dev = DeviceBuffer::<i32>::new(&dev, b).unwrap();
    let mut slots_dev = DeviceBuffer::<i32>::new(&dev, b).unwrap();
    let mut lat_dev = DeviceBuffer::<f32>::new(&dev, LAYERS * b * D_C).unwrap();
    let mut kr_dev = DeviceBuffer::<f32>::new(&dev, LAYERS * b * D_R).unwrap();
    let mut q_dev = DeviceBuffer::<f32>::new(&dev, LAYERS * b * HEADS * RW).unwrap();
    let mut outs: Vec<DeviceBuffer<f32>> = (0..LAYERS)
        .map(|_| DeviceBuffer::new(&dev, b * HEADS * W).unwrap())
        .collect();
    let mut lses: Vec<DeviceBuffer<f32>> = (0..LAYERS)
        .map(|_| DeviceBuffer::new(&dev, b * HEADS).unwrap())
        .collect();
    let ws = DeviceBuffer::<u8>::new(&dev, engine.workspace_bytes(b, width).unwrap()).unwrap();
    let mut faults = DeviceBuffer::<u32>::new(&dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    let exec = unsafe {
        result::stream::begin_capture(
            stream,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
        engine
            .plan_step(lens_dev.ptr(), b, width, ws.ptr(), ws.len(), stream)
            .unwrap();
        for l in 0..LAYERS {
            let a = DeviceAppend {
                slots: slots_dev.ptr(),
                count: b,
                latents: lat_dev.ptr() + (l * b * D_C * 4) as u64,
                k_rope: kr_dev.ptr() + (l * b * D_R * 4) as u64,
                input: DType::F32,
                mode: RmsMode::Exact,
                faults: faults.ptr(),
            };
            engine.append(l, &pools[l].cache(), &a, stream).unwrap();
            let step = DeviceStep {
                cache: pools[l].cache(),
                block_table: table_dev.ptr(),
                batch: b,
                block_table_width: width,
                seq_lens: lens_dev.ptr(),
                workspace: ws.ptr(),
                workspace_bytes: ws.len(),
                faults: faults.ptr(),
            };
            engine
                .decode(
                    l,
                    &step,
                    q_dev.ptr() + (l * b * HEADS * RW * 4) as u64,
                    outs[l].ptr(),
                    lses[l].ptr(),
                    stream,
                )
                .unwrap();
        }
        let graph = result::stream::end_capture(stream).unwrap();
        let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)).unwrap();
        result::graph::destroy(graph).unwrap();
        exec
    };
    for step in 0..steps {
        dev.synchronize().unwrap();
        // the new token of every sequence at its next slot
        let slots: Vec<i32> = seqs
            .iter()
            .map(|s| s.pages[s.len / PAGE] * PAGE as i32 + (s.len % PAGE) as i32)
            .collect();
        for s in &mut seqs {
            s.len += 1;
        }
        let lat = random_f32(LAYERS * b * D_C, 3.0, &mut rng);
        let kr = random_f32(LAYERS * b * D_R, 1.0, &mut rng);
        let q = random_f32(LAYERS * b * HEADS * RW, 0.08, &mut rng);
        slots_dev.upload(&slots).unwrap();
        lens_dev
            .upload(&seqs.iter().map(|s| s.len as i32).collect::<Vec<_>>())
            .unwrap();
        lat_dev.upload(&lat).unwrap();
        kr_dev.upload(&kr).unwrap();
        q_dev.upload(&q).unwrap();
        for l in 0..LAYERS {
            outs[l].fill_bytes(0xff).unwrap();
            lses[l].fill_bytes(0xff).unwrap();
            let f = cpu_append(
                &ctx,
                l,
                &mut pools[l].host,
                &slots,
                &lat[l * b * D_C..(l + 1) * b * D_C],
                &kr[l * b * D_R..(l + 1) * b * D_R],
                RmsMode::Exact,
            );
            assert!(f.is_empty());
        }
        unsafe { result::graph::launch(exec, stream).unwrap() };
        dev.synchronize().unwrap();
        assert_eq!(faults.to_vec().unwrap()[0], 0, "step {step}: faults");
        for l in 0..LAYERS {
            let rows = pools[l].dev.to_vec().unwrap();
            compare_rows(&rows, &pools[l].host, &format!("step {step} layer {l}"));
            // the reference reads the device's rows (equal but for a rare unit)
            pools[l].host = rows;
            let q_l = &q[l * b * HEADS * RW..(l + 1) * b * HEADS * RW];
            check_against_reference(
                &pools[l],
                &seqs,
                q_l,
                &outs[l].to_vec().unwrap(),
                &lses[l].to_vec().unwrap(),
            );
        }
    }
    unsafe { result::graph::exec_destroy(exec).unwrap() };
}

/// Everything checkable at the call is refused there with the right kind; on the device,
/// a block table entry outside the pool, a negative one, and a length beyond the table's
/// width make only their entries NaN (and set TPLA_FAULT_BAD_PAGE), the other entries
/// bit-equal to a clean run; a workspace planned for another batch makes every entry NaN
/// and sets TPLA_FAULT_BAD_PLAN.
#[test]
fn bad_inputs_are_refused_at_the_call_or_flagged_on_the_device() {
    let Some((mut rng, _, engine)) = engine_setup() else {
        return;
    };
    let stream = engine.backend().stream();
    let (pages, width) = (40, 6);
    let mut pool = Pool::new(engine.backend(), pages);
    let mut alloc = Allocator::new(pages, &mut rng);
    let seqs: Vec<Live> = [70usize, 200, 5, 130, 64]
        .iter()
        .map(|&len| new_sequence(&mut pool, &mut alloc, len, &mut rng))
        .collect();
    pool.upload();
    let b = seqs.len();
    let q = random_f32(b * HEADS * RW, 0.08, &mut rng);
    let mut bufs = StepBuffers::new(&engine, &seqs, width, &q);
    let (good_out, good_lse, f) = bufs.run(&engine, 0, &pool);
    assert_eq!(f, 0);
    check_against_reference(&pool, &seqs, &q, &good_out, &good_lse);

    // ---- refused at the call ----
    let kind = |r: Result<()>| r.unwrap_err().kind();
    let decode_with = |step: DeviceStep, q: u64| unsafe {
        engine.decode(0, &step, q, bufs.out.ptr(), bufs.lse.ptr(), stream)
    };
    let good = bufs.step(&pool);
    let mut s = good;
    s.cache.base = 0;
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    assert_eq!(kind(decode_with(good, 0)), ErrorKind::InvalidArgument);
    assert_eq!(
        kind(decode_with(good, bufs.q.ptr() + 4)),
        ErrorKind::InvalidArgument
    );
    let mut s = good;
    s.cache.layout.page_stride += 8; // not a multiple of 16
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    let mut s = good;
    s.cache.layout.page_size = 32;
    assert_eq!(kind(decode_with(s, bufs.q.ptr())), ErrorKind::Unsupported);
    let mut s = good;
    s.cache.layout.dtype = DType::F32;
    s.cache.layout.page_stride *= 2;
    s.cache.layout.pages /= 2;
    assert_eq!(kind(decode_with(s, bufs.q.ptr())), ErrorKind::Unsupported);
    let mut s = good;
    s.cache.layout.row_width = W + 2 * D_R;
    s.cache.layout.page_stride = PAGE * s.cache.layout.row_width * 2;
    assert_eq!(kind(decode_with(s, bufs.q.ptr())), ErrorKind::Mismatch);
    let mut s = good;
    s.workspace_bytes -= 16;
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    let mut s = good;
    s.workspace += 8;
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    let mut s = good;
    s.batch = 0;
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    let mut s = good;
    s.block_table = 0;
    assert_eq!(
        kind(decode_with(s, bufs.q.ptr())),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        unsafe {
            engine.decode(
                LAYERS,
                &good,
                bufs.q.ptr(),
                bufs.out.ptr(),
                bufs.lse.ptr(),
                stream,
            )
        }
        .unwrap_err()
        .kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        engine.workspace_bytes(0, width).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        engine.workspace_bytes(b, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // ---- flagged on the device ----
    let (mut t, mut lens) = table(&seqs, width);
    t[width] = pages as i32 + 3; // entry 1: first page outside the pool
    t[3 * width + 1] = -7; // entry 3: second page negative
    lens[2] = (width * PAGE + 1) as i32; // entry 2: more pages than the table's width
    bufs.table.upload(&t).unwrap();
    bufs.lens.upload(&lens).unwrap();
    bufs.faults.fill_bytes(0).unwrap();
    let (out, lse, f) = bufs.run(&engine, 0, &pool);
    assert_eq!(f, Faults::BAD_PAGE.bits());
    for e in 0..b {
        let (o, l) = (
            &out[e * HEADS * W..(e + 1) * HEADS * W],
            &lse[e * HEADS..(e + 1) * HEADS],
        );
        if [1, 2, 3].contains(&e) {
            assert!(
                o.iter().chain(l).all(|v| v.is_nan()),
                "entry {e} is not NaN"
            );
        }
    }
    // The other entries are still right (their tiles may be cut differently now that the
    // faulted entries' are gone from the batch's schedule, so not bit-equal to the clean
    // run), and nothing was written to the pool.
    let keep = [0usize, 4];
    let sub: Vec<Live> = keep.iter().map(|&e| seqs[e].clone()).collect();
    let pick = |v: &[f32], n: usize| -> Vec<f32> {
        keep.iter()
            .flat_map(|&e| v[e * n..(e + 1) * n].to_vec())
            .collect()
    };
    check_against_reference(
        &pool,
        &sub,
        &pick(&q, HEADS * RW),
        &pick(&out, HEADS * W),
        &pick(&lse, HEADS),
    );
    assert!(pool.dev.to_vec().unwrap() == pool.host, "the pool changed");

    // a workspace planned for another batch: nothing is trusted
    let (t, lens) = table(&seqs, width);
    bufs.table.upload(&t).unwrap();
    bufs.lens.upload(&lens).unwrap();
    bufs.faults.fill_bytes(0).unwrap();
    bufs.out.fill_bytes(0xff).unwrap();
    unsafe {
        engine
            .plan_step(
                bufs.lens.ptr(),
                b - 1,
                width,
                bufs.workspace.ptr(),
                bufs.workspace.len(),
                stream,
            )
            .unwrap();
        engine
            .decode(
                0,
                &bufs.step(&pool),
                bufs.q.ptr(),
                bufs.out.ptr(),
                bufs.lse.ptr(),
                stream,
            )
            .unwrap();
    }
    engine.backend().device().synchronize().unwrap();
    assert_eq!(bufs.faults.to_vec().unwrap()[0], Faults::BAD_PLAN.bits());
    assert!(bufs.out.to_vec().unwrap().iter().all(|v| v.is_nan()));
    assert!(bufs.lse.to_vec().unwrap().iter().all(|v| v.is_nan()));
}

/// The C entry points refuse NULL handles and arguments before touching the GPU.
#[test]
fn c_entry_points_refuse_null_arguments() {
    use tpla::ffi::engine_device::*;
    use tpla::ffi::tpla_status;
    unsafe {
        assert_eq!(
            tpla_device_engine_create(std::ptr::null(), 0, std::ptr::null_mut()),
            tpla_status::NullArgument
        );
        assert_eq!(
            tpla_device_engine_create_for(
                std::ptr::null(),
                0,
                DType::Fp8E4m3.code(),
                std::ptr::null_mut()
            ),
            tpla_status::NullArgument
        );
        assert_eq!(
            tpla_device_engine_decode(std::ptr::null(), std::ptr::null()),
            tpla_status::NullArgument
        );
        assert_eq!(
            tpla_device_engine_project_for(
                std::ptr::null(),
                0,
                1,
                std::ptr::null(),
                std::ptr::null_mut(),
                DType::Bf16.code(),
                std::ptr::null_mut()
            ),
            tpla_status::NullArgument
        );
        let mut bytes = 0usize;
        assert_eq!(
            tpla_device_engine_workspace_size(std::ptr::null(), 1, 1, &mut bytes),
            tpla_status::NullArgument
        );
        tpla_device_engine_destroy(std::ptr::null_mut());
    }
}

// ---- FP8 pools ---------------------------------------------------------------------------

/// One FP8 row of random N(0, 1) values, each scale block with its own magnitude, as the
/// host encodes it.
fn random_fp8_row(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let row: Vec<f64> = (0..RW)
        .map(|c| {
            let block_scale = 1.0 + (c / 128) as f64;
            block_scale * rng.sample::<f64, _>(StandardNormal)
        })
        .collect();
    let mut bytes = vec![0u8; fp8_row_bytes()];
    DType::Fp8E4m3.encode_row(&row, W, &mut bytes);
    bytes
}

/// Compares device FP8 rows with the CPU's (whole pools): the RoPE keys equal; the codes
/// and scales equal, or (from the order of the RMS sums, which moves a value only in its
/// last bits) a code one step apart with the same sign and a scale one f32 unit apart, in
/// a few places. Returns the count of differing codes and scales.
fn compare_fp8_rows(dev: &[u8], cpu: &[u8], what: &str) -> usize {
    let rb = fp8_row_bytes();
    let rope = DType::Fp8E4m3.rope_offset(W);
    assert_eq!(dev.len(), cpu.len());
    let mut differ = 0;
    for (r, (d, c)) in dev.chunks(rb).zip(cpu.chunks(rb)).enumerate() {
        assert!(
            d[rope..] == c[rope..],
            "{what}: row {r}: the RoPE keys differ"
        );
        for (j, (&x, &y)) in d[..W].iter().zip(&c[..W]).enumerate() {
            if x != y {
                differ += 1;
                assert!(
                    (x as i32 - y as i32).abs() == 1 && (x ^ y) & 0x80 == 0,
                    "{what}: row {r} value {j}: code {x:#04x} on the device, {y:#04x} on the CPU"
                );
            }
        }
        for (k, (x, y)) in d[W..rope].chunks(4).zip(c[W..rope].chunks(4)).enumerate() {
            let (x, y) = (
                u32::from_le_bytes(x.try_into().unwrap()),
                u32::from_le_bytes(y.try_into().unwrap()),
            );
            if x != y {
                differ += 1;
                assert!(
                    (x as i64 - y as i64).abs() == 1,
                    "{what}: row {r} block {k}: scale {:e} on the device, {:e} on the CPU",
                    f32::from_bits(x),
                    f32::from_bits(y)
                );
            }
        }
    }
    assert!(
        differ * 1000 <= (dev.len() / rb * W).max(1000),
        "{what}: {differ} codes and scales differ"
    );
    differ
}

/// Device appends into FP8 pools (every transform kind, both RMS modes, f32 and bf16
/// inputs) write the bytes the CPU's `append_paged` writes into a host FP8 pool, at the
/// same slots of a padded pool whose every byte starts as an e4m3 NaN code on both sides
/// (so a row written in the wrong place or a byte left unwritten shows); padding slots are
/// skipped, a slot past the pool is skipped and flagged, and so is a token with a
/// non-finite input. The engine decodes bf16 pools: appends need no FP8 decode kernels,
/// so this runs on any GPU.
#[test]
fn fp8_device_appends_equal_the_cpu_appends() {
    let Some((mut rng, ctx, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let (pages, n) = (8, 40);
    let mut all_slots: Vec<i32> = (0..(pages * PAGE) as i32).collect();
    all_slots.shuffle(&mut rng);
    let mut slots: Vec<i32> = all_slots[..n].to_vec();
    slots[3] = -1; // padding
    slots[7] = (pages * PAGE + 5) as i32; // past the pool
    let mut total_differ = 0;
    for layer in 0..LAYERS {
        for mode in [RmsMode::Exact, RmsMode::Sliced] {
            for input in [DType::F32, DType::Bf16] {
                let scale = rng.random_range(0.01..100.0);
                let mut latents = random_f32(n * D_C, scale, &mut rng);
                let mut k_rope = random_f32(n * D_R, 1.0, &mut rng);
                if input == DType::Bf16 {
                    latents = bf16_round(&latents);
                    k_rope = bf16_round(&k_rope);
                }
                let mut pool = Fp8Pool::padded(engine.backend(), pages, 32);
                pool.host.fill(0x7f);
                pool.upload();
                let mut cpu = pool.host.clone();
                let cpu_faults = cpu_append_to(
                    &ctx,
                    layer,
                    fp8_layout(pages),
                    &mut cpu,
                    &slots,
                    &latents,
                    &k_rope,
                    mode,
                );
                assert_eq!(cpu_faults, Faults::BAD_SLOT);
                let faults = device_append(
                    &engine,
                    layer,
                    &pool.cache(),
                    &slots,
                    &latents,
                    &k_rope,
                    input,
                    mode,
                );
                assert_eq!(faults, Faults::BAD_SLOT.bits());
                let image = pool.dev.to_vec().unwrap();
                let page_bytes = PAGE * fp8_row_bytes();
                for page in image.chunks(page_bytes + 32) {
                    assert!(
                        page[page_bytes..].iter().all(|&b| b == 0x7f),
                        "padding written"
                    );
                }
                pool.download();
                let what = format!("layer {layer} {mode:?} {input:?}");
                total_differ += compare_fp8_rows(&pool.host, &cpu, &what);
            }
        }
    }
    println!("device vs CPU FP8 appends: {total_differ} codes or scales one unit apart");

    // a token with a NaN latent, another with an infinite key: neither is written
    let mut latents = random_f32(3 * D_C, 1.0, &mut rng);
    let mut k_rope = random_f32(3 * D_R, 1.0, &mut rng);
    latents[D_C + 17] = f32::NAN;
    k_rope[2 * D_R + 1] = f32::INFINITY;
    let mut pool = Fp8Pool::padded(engine.backend(), 1, 0);
    let slots_dev = DeviceBuffer::from_host(&dev, &[0i32, 1, 2]).unwrap();
    let lat_dev = DeviceBuffer::from_host(&dev, &latents).unwrap();
    let kr_dev = DeviceBuffer::from_host(&dev, &k_rope).unwrap();
    let mut faults = DeviceBuffer::<u32>::new(&dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    let a = DeviceAppend {
        slots: slots_dev.ptr(),
        count: 3,
        latents: lat_dev.ptr(),
        k_rope: kr_dev.ptr(),
        input: DType::F32,
        mode: RmsMode::Exact,
        faults: faults.ptr(),
    };
    unsafe { engine.append(0, &pool.cache(), &a, stream).unwrap() };
    dev.synchronize().unwrap();
    assert_eq!(faults.to_vec().unwrap()[0], Faults::BAD_VALUE.bits());
    pool.download();
    let rb = fp8_row_bytes();
    assert!(
        pool.host[..rb].iter().any(|&v| v != 0),
        "token 0 was written"
    );
    assert!(
        pool.host[rb..3 * rb].iter().all(|&v| v == 0),
        "bad tokens were written"
    );
}

/// Decode over an engine pool of FP8 rows on the Hopper kernel (an engine made for
/// fp8_e4m3), on a churning pool as the bf16 test's: sequences of 0 (padding), 1, 63, 64,
/// 65 and 4096 tokens on shuffled pages, packed and padded page strides; between steps
/// one sequence leaves, a new one arrives on reused pages and every sequence grows by a
/// token appended on the device (checked against the CPU's append, then read back as the
/// pool's rows). Each step: close to the f64 reference over the dequantised rows (the
/// bounds of the FP8 device-cache test), empty entries zero, no faults, and bit-equal to
/// an FP8 device cache's decode of the same rows (same kernels, same split count).
#[test]
fn fp8_engine_pool_decode_matches_the_reference_and_the_device_cache() {
    let seed = fresh_seed();
    for pad in [0, 48] {
        let Some(backend) = gpu() else { return };
        if backend.device().compute_capability() != (9, 0) {
            eprintln!("skipping: FP8 pools decode on the Hopper kernel only");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ctx = context(&mut rng);
        let engine = DeviceEngine::from_context_for(backend, &ctx, DType::Fp8E4m3).unwrap();
        assert_eq!(engine.pool_dtype(), DType::Fp8E4m3);
        println!("page padding {pad}: {engine:?}");
        let backend2 = CudaBackend::new(0).unwrap();
        let (pages, width) = (200, 66);
        let mut pool = Fp8Pool::padded(engine.backend(), pages, pad);
        let mut alloc = Allocator::new(pages, &mut rng);
        let mut seqs: Vec<Live> = [0usize, 1, 63, 64, 65, 4096]
            .into_iter()
            .map(|len| new_sequence(&mut pool, &mut alloc, len, &mut rng))
            .collect();
        for step in 0..3 {
            pool.upload();
            let q = random_f32(seqs.len() * HEADS * RW, 0.08, &mut rng);
            let mut bufs = StepBuffers::new(&engine, &seqs, width, &q);
            let layer = step % LAYERS;
            let (out, lse, faults) = bufs.run(&engine, layer, &pool);
            assert_eq!(faults, 0, "step {step}: faults {faults:#x}");
            check_against_reference(&pool, &seqs, &q, &out, &lse);
            let (o_out, o_lse) = owned_path(&backend2, &engine, &pool, &seqs, width, &q);
            assert_paths_bit_equal(
                &seqs,
                (&out, &lse),
                ("device-cache", &o_out, &o_lse),
                &format!("step {step}"),
            );
            // churn: a sequence leaves, a new one arrives on reused pages
            let gone = seqs.remove(2);
            alloc.release(gone, &mut rng);
            seqs.push(new_sequence(&mut pool, &mut alloc, 130 + step, &mut rng));
            pool.upload();
            // every non-empty sequence grows by a token appended on the device
            let mut slots = Vec::new();
            for s in seqs.iter_mut().filter(|s| s.len > 0) {
                alloc.grow(s, s.len + 1);
                slots.push(s.pages[s.len / PAGE] * PAGE as i32 + (s.len % PAGE) as i32);
                s.len += 1;
            }
            let n = slots.len();
            let lat = random_f32(n * D_C, 3.0, &mut rng);
            let kr = random_f32(n * D_R, 1.0, &mut rng);
            let mut cpu = pool.host.clone();
            let f = cpu_append_to(
                &ctx,
                layer,
                fp8_layout(pages),
                &mut cpu,
                &slots,
                &lat,
                &kr,
                RmsMode::Exact,
            );
            assert!(f.is_empty());
            let faults = device_append(
                &engine,
                layer,
                &pool.cache(),
                &slots,
                &lat,
                &kr,
                DType::F32,
                RmsMode::Exact,
            );
            assert_eq!(faults, 0, "step {step}: append faults");
            pool.download();
            compare_fp8_rows(&pool.host, &cpu, &format!("step {step} appends"));
        }
        let distinct: std::collections::HashSet<_> = alloc.used.iter().collect();
        assert!(distinct.len() < alloc.used.len(), "freed pages were reused");
    }
}

/// The hand-off of a prefill's FP8 rows into the engine's pages, device to device: rows
/// land byte for byte at their destination slots (a packed source, a padded destination
/// whose bytes start as e4m3 NaN codes, shuffled slots); padding is skipped, slots past
/// either pool are flagged and copy nothing. Any GPU (the copy needs no FP8 decode).
#[test]
fn fp8_prefill_rows_are_copied_into_engine_pages_on_the_device() {
    let Some((mut rng, _, engine)) = engine_setup() else {
        return;
    };
    let dev = engine.backend().device().clone();
    let (src_pages, dst_pages, n) = (3, 7, 150);
    let mut src = Fp8Pool::padded(engine.backend(), src_pages, 0);
    for slot in 0..n {
        src.row_mut(slot).copy_from_slice(&random_fp8_row(&mut rng));
    }
    src.upload();
    let mut dst = Fp8Pool::padded(engine.backend(), dst_pages, 16);
    dst.host.fill(0x7f);
    let mut want = dst.host.clone();
    dst.upload();
    let mut dst_slots: Vec<i32> = (0..(dst_pages * PAGE) as i32).collect();
    dst_slots.shuffle(&mut rng);
    dst_slots.truncate(n);
    let mut src_slots: Vec<i32> = (0..n as i32).collect();
    dst_slots[5] = -1; // padding: skipped
    dst_slots[9] = (dst_pages * PAGE) as i32; // past the destination: flagged
    src_slots[11] = (src_pages * PAGE + 1) as i32; // past the source: flagged
    src_slots[12] = -3; // negative source: flagged
    let dst_dev = DeviceBuffer::from_host(&dev, &dst_slots).unwrap();
    let src_dev = DeviceBuffer::from_host(&dev, &src_slots).unwrap();
    let mut faults = DeviceBuffer::<u32>::new(&dev, 1).unwrap();
    faults.fill_bytes(0).unwrap();
    unsafe {
        engine
            .copy_rows(
                &dst.cache(),
                dst_dev.ptr(),
                &src.cache(),
                src_dev.ptr(),
                n,
                faults.ptr(),
                engine.backend().stream(),
            )
            .unwrap()
    };
    dev.synchronize().unwrap();
    assert_eq!(faults.to_vec().unwrap()[0], Faults::BAD_SLOT.bits());
    let image = dst.dev.to_vec().unwrap();
    let page_bytes = PAGE * fp8_row_bytes();
    for page in image.chunks(page_bytes + 16) {
        assert!(
            page[page_bytes..].iter().all(|&b| b == 0x7f),
            "padding written"
        );
    }
    dst.download();
    let rb = fp8_row_bytes();
    for (i, (&d, &s)) in dst_slots.iter().zip(&src_slots).enumerate() {
        if [5, 9, 11, 12].contains(&i) {
            continue;
        }
        let (d, s) = (d as usize, s as usize);
        want[d * rb..(d + 1) * rb].copy_from_slice(src.row_bytes_of(s));
    }
    assert!(dst.host == want, "the copied rows differ");
}

/// What the FP8 paths cannot serve is refused at the call, with the kind that says why:
/// an FP8 engine where the Hopper kernel does not serve the shape or the GPU
/// (Unsupported); a pool of the other row type than the engine decodes, row copies
/// between row types, rows of another RoPE width (Mismatch); FP8 pools whose page
/// stride is not a multiple of 16 bytes or whose base is not 16-byte aligned, though
/// their layout is valid on the CPU (InvalidArgument); f16 pools (Unsupported).
#[test]
fn fp8_engines_and_pools_refuse_what_the_kernels_cannot_serve() {
    let Some(backend) = gpu() else { return };
    let hopper = backend.device().compute_capability() == (9, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(fresh_seed());
    let ctx = context(&mut rng);
    // slices of 512 (one group), and the mma.sync kernel, do not read FP8 rows
    let wide = context_of(1, &mut rng);
    let e = DeviceEngine::from_context_for(backend, &wide, DType::Fp8E4m3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let mut forced = CudaBackend::new(0).unwrap();
    forced.set_decode_kernel(Some(DecodeKernel::MmaSync));
    let e = DeviceEngine::from_context_for(forced, &ctx, DType::Fp8E4m3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e =
        DeviceEngine::from_context_for(CudaBackend::new(0).unwrap(), &ctx, DType::F16).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    if !hopper {
        let e = DeviceEngine::from_context_for(CudaBackend::new(0).unwrap(), &ctx, DType::Fp8E4m3)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }

    let engine = DeviceEngine::from_context(CudaBackend::new(0).unwrap(), &ctx).unwrap();
    let stream = engine.backend().stream();
    let dev = engine.backend().device().clone();
    let pages = 4;
    let fp8 = Fp8Pool::padded(engine.backend(), pages, 16);
    let bf16 = Pool::new(engine.backend(), pages);
    let seqs = vec![Live {
        pages: vec![0],
        len: 10,
    }];
    let q = random_f32(HEADS * RW, 0.08, &mut rng);
    let bufs = StepBuffers::new(&engine, &seqs, 1, &q);
    let kind = |r: Result<()>| r.unwrap_err().kind();
    let decode = |engine: &DeviceEngine, cache: DevicePagedCache| unsafe {
        let mut step = bufs.step(&bf16);
        step.cache = cache;
        engine.decode(
            0,
            &step,
            bufs.q.ptr(),
            bufs.out.ptr(),
            bufs.lse.ptr(),
            stream,
        )
    };
    let slots_dev = DeviceBuffer::from_host(&dev, &[0i32]).unwrap();
    let lat_dev = DeviceBuffer::<f32>::new(&dev, D_C).unwrap();
    let kr_dev = DeviceBuffer::<f32>::new(&dev, D_R).unwrap();
    let append = |cache: DevicePagedCache| unsafe {
        let a = DeviceAppend {
            slots: slots_dev.ptr(),
            count: 1,
            latents: lat_dev.ptr(),
            k_rope: kr_dev.ptr(),
            input: DType::F32,
            mode: RmsMode::Exact,
            faults: 0,
        };
        engine.append(0, &cache, &a, stream)
    };
    let copy = |dst: DevicePagedCache, src: DevicePagedCache| unsafe {
        engine.copy_rows(&dst, slots_dev.ptr(), &src, slots_dev.ptr(), 1, 0, stream)
    };
    // a bf16 engine decodes bf16 pools only; row copies keep one row type
    assert_eq!(kind(decode(&engine, fp8.cache())), ErrorKind::Mismatch);
    assert_eq!(kind(copy(fp8.cache(), bf16.cache())), ErrorKind::Mismatch);
    assert_eq!(kind(copy(bf16.cache(), fp8.cache())), ErrorKind::Mismatch);
    // FP8 layouts the CPU takes (4-byte multiples) but the kernels do not
    let mut c = fp8.cache();
    c.layout.page_stride += 4;
    c.layout.pages -= 1;
    c.layout.extent().unwrap();
    assert_eq!(kind(decode(&engine, c)), ErrorKind::InvalidArgument);
    assert_eq!(kind(append(c)), ErrorKind::InvalidArgument);
    assert_eq!(kind(copy(c, fp8.cache())), ErrorKind::InvalidArgument);
    let mut c = fp8.cache();
    c.base += 4;
    c.layout.pages -= 1;
    assert_eq!(kind(append(c)), ErrorKind::InvalidArgument);
    assert_eq!(kind(copy(fp8.cache(), c)), ErrorKind::InvalidArgument);
    let mut c = fp8.cache();
    c.layout.rope_width = D_R / 2;
    assert_eq!(kind(append(c)), ErrorKind::Mismatch);
    let mut c = bf16.cache();
    c.layout.dtype = DType::F16;
    assert_eq!(kind(append(c)), ErrorKind::Unsupported);
    assert_eq!(kind(decode(&engine, c)), ErrorKind::Unsupported);
    if hopper {
        let engine8 =
            DeviceEngine::from_context_for(CudaBackend::new(0).unwrap(), &ctx, DType::Fp8E4m3)
                .unwrap();
        assert_eq!(kind(decode(&engine8, bf16.cache())), ErrorKind::Mismatch);
    }
}

/// Largest difference of `got` from `want`, relative to `want`'s largest magnitude.
fn rel_max_diff<T: Copy + Into<f64>>(got: &[T], want: &[T]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.into().abs()));
    let diff = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g.into() - w.into()).abs())
        .fold(
            0f64,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    diff / scale
}

/// The sequence-shard merges on engine buffers (`combine::sequence_engine`) against the
/// CPU merges of `combine::sequence` on the same random outputs, log-sum-exps and
/// queries of three shards: (a) the rescale of every shard; (b) the logit bounds, each
/// shard's pack, and the unpack of the packs summed on the host, which must equal the
/// sum of (a)'s rescaled outputs (both are the exact merge). A bound 800 below a
/// log-sum-exp sets the error word's bit, which reads as the host merge's error; bad
/// arguments are refused at the call, in Rust and C, with nothing enqueued.
#[test]
fn sequence_merges_on_engine_buffers_match_the_cpu_merges() {
    use tpla::combine::sequence::{
        logit_bound, merge_error, pack_against_bound, packed_row_len, rescale_by_gathered_lse,
        unpack_merged, MERGE_LSE_ABOVE_BOUND,
    };
    let Some((mut rng, _, engine)) = engine_setup() else {
        return;
    };
    let device = engine.backend().device().clone();
    let stream = engine.backend().stream();
    let (shards, rows, width) = (3usize, 2 * HEADS, W);
    let outs: Vec<Vec<f32>> = (0..shards)
        .map(|_| random_f32(rows * width, 1.0, &mut rng))
        .collect();
    let lses: Vec<Vec<f32>> = (0..shards)
        .map(|_| random_f32(rows, 3.0, &mut rng))
        .collect();
    let upload = |v: &[f32]| {
        let mut b = DeviceBuffer::<f32>::new(&device, v.len()).unwrap();
        b.upload(v).unwrap();
        b
    };
    let download = |b: &DeviceBuffer<f32>, n: usize| {
        let mut v = vec![f32::NAN; n];
        b.download(&mut v).unwrap();
        v
    };
    // (a): every shard rescaled as the CPU does; their sum is the merged output
    let gathered = upload(&lses.concat());
    let lse_refs: Vec<&[f32]> = lses.iter().map(|v| v.as_slice()).collect();
    let mut merged_a = vec![0f32; rows * width];
    for (shard, host) in outs.iter().enumerate() {
        let mut want = host.clone();
        rescale_by_gathered_lse(&mut want, width, shard, &lse_refs).unwrap();
        let out = upload(host);
        unsafe {
            engine
                .sequence_rescale(
                    shard,
                    shards,
                    rows,
                    width,
                    gathered.ptr(),
                    out.ptr(),
                    stream,
                )
                .unwrap();
        }
        let got = download(&out, rows * width);
        let d = rel_max_diff(&got, &want);
        println!("(a) shard {shard}: {d:.2e} from the CPU rescale");
        assert!(d < 1e-6, "(a) shard {shard}: {d}");
        for (m, g) in merged_a.iter_mut().zip(&got) {
            *m += g;
        }
    }
    // (b): bounds from the queries, packs, their sum unpacked
    let q = random_f32(rows * RW, 0.1, &mut rng);
    let rope_norm = 2.5;
    let latent_norm = tpla::combine::sequence::latent_row_norm_bound(D_C);
    let want_bounds: Vec<f64> = q
        .chunks_exact(RW)
        .map(|row| logit_bound(row, W, latent_norm, rope_norm))
        .collect();
    let q_dev = upload(&q);
    let bound = DeviceBuffer::<f64>::new(&device, rows).unwrap();
    unsafe {
        engine
            .sequence_bounds(rows, rope_norm, q_dev.ptr(), bound.ptr(), stream)
            .unwrap();
    }
    let mut bounds = vec![f64::NAN; rows];
    bound.download(&mut bounds).unwrap();
    let d = rel_max_diff(&bounds, &want_bounds);
    assert!(d < 1e-12, "bounds: {d}");
    let plen = packed_row_len(width);
    let mut error = DeviceBuffer::<u32>::new(&device, 1).unwrap();
    error.upload(&[0]).unwrap();
    let mut summed = vec![0f64; rows * plen];
    for (shard, (host, lse_host)) in outs.iter().zip(&lses).enumerate() {
        let mut want = vec![0f64; rows * plen];
        pack_against_bound(host, lse_host, &bounds, width, &mut want).unwrap();
        let (out, lse) = (upload(host), upload(lse_host));
        let packed = DeviceBuffer::<f64>::new(&device, rows * plen).unwrap();
        unsafe {
            engine
                .sequence_pack(
                    rows,
                    width,
                    out.ptr(),
                    lse.ptr(),
                    bound.ptr(),
                    packed.ptr(),
                    error.ptr(),
                    stream,
                )
                .unwrap();
        }
        let mut got = vec![f64::NAN; rows * plen];
        packed.download(&mut got).unwrap();
        let d = rel_max_diff(&got, &want);
        assert!(d < 1e-12, "(b) pack of shard {shard}: {d}");
        for (s, g) in summed.iter_mut().zip(&got) {
            *s += g;
        }
    }
    let mut want_b = vec![0f32; rows * width];
    unpack_merged(&summed, width, &mut want_b).unwrap();
    let mut packed = DeviceBuffer::<f64>::new(&device, rows * plen).unwrap();
    packed.upload(&summed).unwrap();
    let merged = DeviceBuffer::<f32>::new(&device, rows * width).unwrap();
    unsafe {
        engine
            .sequence_unpack(rows, width, packed.ptr(), merged.ptr(), error.ptr(), stream)
            .unwrap();
    }
    let got_b = download(&merged, rows * width);
    let mut bits = [u32::MAX];
    error.download(&mut bits).unwrap();
    assert_eq!(bits[0], 0, "no merge error on sound bounds");
    let (d_unpack, d_ab) = (
        rel_max_diff(&got_b, &want_b),
        rel_max_diff(&got_b, &merged_a),
    );
    println!("(b) unpack {d_unpack:.2e} from the CPU's, {d_ab:.2e} from (a)'s merge");
    assert!(d_unpack < 1e-6 && d_ab < 1e-5, "(b): {d_unpack} {d_ab}");
    // a bound far below a log-sum-exp: the error bit, read as the host merge's error
    let mut low = bounds.clone();
    low[5] = lses[0][5] as f64 - 800.0;
    let mut low_dev = DeviceBuffer::<f64>::new(&device, rows).unwrap();
    low_dev.upload(&low).unwrap();
    let (out, lse) = (upload(&outs[0]), upload(&lses[0]));
    unsafe {
        engine
            .sequence_pack(
                rows,
                width,
                out.ptr(),
                lse.ptr(),
                low_dev.ptr(),
                packed.ptr(),
                error.ptr(),
                stream,
            )
            .unwrap();
    }
    error.download(&mut bits).unwrap();
    assert_eq!(bits[0], MERGE_LSE_ABOVE_BOUND);
    let e = merge_error(bits[0]).unwrap_err();
    assert!(e.message().contains("above its logit bound"), "{e}");
    // refused at the call
    let refusals = unsafe {
        [
            engine.sequence_rescale(3, 3, rows, width, gathered.ptr(), out.ptr(), stream),
            engine.sequence_rescale(0, 3, 0, width, gathered.ptr(), out.ptr(), stream),
            engine.sequence_rescale(0, 3, rows, width, 0, out.ptr(), stream),
            engine.sequence_bounds(rows, -1.0, q_dev.ptr(), bound.ptr(), stream),
            engine.sequence_bounds(rows, f64::NAN, q_dev.ptr(), bound.ptr(), stream),
            engine.sequence_bounds(rows, 1.0, q_dev.ptr(), bound.ptr() + 4, stream),
            engine.sequence_unpack(rows, 0, packed.ptr(), merged.ptr(), error.ptr(), stream),
        ]
    };
    for (k, r) in refusals.into_iter().enumerate() {
        assert_eq!(
            r.unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "refusal {k}"
        );
    }
    // the C entry points: NULL refused before the GPU, the error word's status
    use std::ptr::{null, null_mut};
    use tpla::ffi::engine_sequence::*;
    use tpla::ffi::tpla_status;
    unsafe {
        assert_eq!(
            tpla_device_engine_sequence_rescale(
                null(),
                0,
                2,
                rows,
                width,
                null(),
                null_mut(),
                null_mut()
            ),
            tpla_status::NullArgument
        );
        assert_eq!(
            tpla_device_engine_sequence_unpack(
                null(),
                rows,
                width,
                null(),
                null_mut(),
                null_mut(),
                null_mut()
            ),
            tpla_status::NullArgument
        );
    }
    assert_eq!(
        tpla_sequence_merge_error(MERGE_LSE_ABOVE_BOUND),
        tpla_status::InvalidArgument
    );
    assert_eq!(tpla_sequence_merge_error(8), tpla_status::InvalidArgument);
    assert_eq!(tpla_sequence_merge_error(0), tpla_status::Ok);
}

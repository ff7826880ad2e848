//! The CPU backend against the f64 reference, on fresh random caches and queries, for
//! every kernel this machine can run: on the paged slice cache ([`RankCache`]), and on a
//! hand-made row source for what that cache cannot hold (NaN values, garbage past a
//! sequence's end, pages shorter than promised).

mod attention_support;

use attention_support::{random_queries, run};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tpla::attention::cpu::{CpuBackend, KernelChoice};
use tpla::attention::reference::Reference;
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::{DType, ErrorKind, ModelDims, Result, ShardPlan};

/// A damaged paged cache: every page is a separate allocation, the rows past a
/// sequence's end in its last page hold NaN (reading them would show), and single values
/// can be set to NaN (the real cache refuses non-finite rows; a mapped shard file is
/// not checked value by value).
struct PagedRows {
    dtype: DType,
    row_width: usize,
    page_size: usize,
    seqs: Vec<(usize, Vec<Vec<u8>>)>,
}

impl PagedRows {
    fn random(
        rng: &mut ChaCha8Rng,
        dtype: DType,
        row_width: usize,
        page_size: usize,
        lens: &[usize],
    ) -> Self {
        let mut seqs = Vec::new();
        for &len in lens {
            let values: Vec<f64> = (0..len * row_width)
                .map(|_| rng.sample(StandardNormal))
                .collect();
            let page_bytes = page_size * row_width * dtype.size();
            let mut pages = Vec::new();
            for chunk in values.chunks(page_size * row_width) {
                let mut page = vec![0xffu8; page_bytes];
                dtype.encode(chunk, &mut page[..chunk.len() * dtype.size()]);
                pages.push(page);
            }
            seqs.push((len, pages));
        }
        PagedRows {
            dtype,
            row_width,
            page_size,
            seqs,
        }
    }

    /// Overwrites element `col` of row `row` of sequence `seq`.
    fn set(&mut self, seq: usize, row: usize, col: usize, value: f64) {
        let size = self.dtype.size();
        let page = &mut self.seqs[seq].1[row / self.page_size];
        let at = ((row % self.page_size) * self.row_width + col) * size;
        self.dtype.encode(&[value], &mut page[at..at + size]);
    }
}

impl RowSource for PagedRows {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn row_width(&self) -> usize {
        self.row_width
    }
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn seq_len(&self, seq: u32) -> Result<usize> {
        self.seqs
            .get(seq as usize)
            .map(|s| s.0)
            .ok_or_else(|| tpla::Error::out_of_range(format!("no sequence {seq}")))
    }
    fn page(&self, seq: u32, page: usize) -> &[u8] {
        &self.seqs[seq as usize].1[page]
    }
}

/// Rank `groups - 1`'s slice cache of a layer with `heads` heads, latent width `d_c` and
/// RoPE width `d_r`, holding sequences `0..lens.len()` of random rows.
#[allow(clippy::too_many_arguments)]
fn rank_cache(
    rng: &mut ChaCha8Rng,
    dtype: DType,
    heads: usize,
    d_c: usize,
    d_r: usize,
    groups: usize,
    page: usize,
    lens: &[usize],
) -> (RankCache, LatentShape) {
    let dims = ModelDims::new(heads, d_c, d_r, 8, 8, 0.1).unwrap();
    let plan = ShardPlan::new(&dims, groups, groups - 1).unwrap();
    let id = TransformId {
        code: 0,
        fingerprint: 0,
    };
    let spec = ShardSpec::new(dims, &plan, dtype, page, vec![id]).unwrap();
    let rw = spec.row_width();
    let pages = lens.iter().map(|l| l.div_ceil(page)).sum();
    let mut cache = RankCache::new(spec, pages).unwrap();
    for (seq, &len) in lens.iter().enumerate() {
        cache.add_sequence(seq as u32).unwrap();
        let rows: Vec<f64> = (0..len * rw).map(|_| rng.sample(StandardNormal)).collect();
        cache.append_rows(seq as u32, 0, &rows).unwrap();
    }
    let shape = LatentShape {
        heads,
        slice_width: plan.slice_width,
        d_r,
    };
    (cache, shape)
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        let d = *g as f64 - *w as f64;
        num += d * d;
        den += (*w as f64) * (*w as f64);
    }
    // NaN compares false: a NaN anywhere fails every `<` check on the result
    if got.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    (num / den.max(1e-300)).sqrt()
}

fn tolerance(dtype: DType, kernel: KernelChoice) -> f64 {
    match (dtype, kernel) {
        // the query and the probabilities are rounded to bf16 for vdpbf16ps
        (DType::Bf16, KernelChoice::Avx512Bf16) => 2e-2,
        _ => 1e-5,
    }
}

/// Checks every available kernel against the reference on one cache.
fn check_all_kernels(cache: &dyn RowSource, shape: LatentShape, q: &[f32], threads: usize) {
    let (want_out, want_lse) = run(&mut Reference, cache, shape, q).unwrap();
    for kernel in KernelChoice::available() {
        let mut backend = CpuBackend::with_kernel(threads, kernel).unwrap();
        let (out, lse) = run(&mut backend, cache, shape, q).unwrap();
        let tol = tolerance(cache.dtype(), kernel);
        let (e_out, e_lse) = (rel_l2(&out, &want_out), rel_l2(&lse, &want_lse));
        assert!(
            e_out < tol && e_lse < tol,
            "{} on {:?} {shape:?}: output error {e_out:.2e}, lse error {e_lse:.2e}, tolerance {tol:.0e}",
            backend.name(),
            cache.dtype()
        );
    }
}

fn shape(heads: usize, slice_width: usize, d_r: usize) -> LatentShape {
    LatentShape {
        heads,
        slice_width,
        d_r,
    }
}

#[test]
fn every_kernel_and_element_type_matches_the_reference_and_never_reads_past_the_end() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0001);
    let page = 16;
    // length 1, page size -1/0/+1, odd lengths, several pages and tiles
    let lens = [1, page - 1, page, page + 1, 2 * page + 3, 131, 700];
    for dtype in [DType::Bf16, DType::F16, DType::F32] {
        let s = shape(24, 128, 64);
        let cache = PagedRows::random(&mut rng, dtype, s.row_width(), page, &lens);
        let q = random_queries(&mut rng, lens.len(), s);
        check_all_kernels(&cache, s, &q, 2);
    }
}

#[test]
fn deepseek_v3_shapes_match_the_reference_for_every_group_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0002);
    for g in [1, 2, 4, 8] {
        let (cache, s) = rank_cache(&mut rng, DType::Bf16, 128, 512, 64, g, 64, &[257, 64]);
        let q = random_queries(&mut rng, 2, s);
        check_all_kernels(&cache.layer(0).unwrap(), s, &q, 2);
    }
}

#[test]
fn odd_widths_head_counts_and_page_sizes_match_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0003);
    // odd row width (31), widths that are not whole vectors, a single head, more heads
    // than one group holds, page sizes that are not powers of two
    for (heads, d_c, d_r, page) in [(5, 24, 7, 7), (1, 16, 1, 64), (3, 9, 4, 1), (130, 32, 8, 5)] {
        for dtype in [DType::Bf16, DType::F32] {
            let lens = [1, page + 1, 97];
            let (cache, s) = rank_cache(&mut rng, dtype, heads, d_c, d_r, 1, page, &lens);
            let q = random_queries(&mut rng, lens.len(), s);
            check_all_kernels(&cache.layer(0).unwrap(), s, &q, 2);
        }
    }
}

#[test]
fn every_micro_kernel_edge_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0009);
    // head counts 1..=17 leave every remainder of the 6-head output blocks and of the
    // 16-head score blocks (and of the AVX-512 ones); lengths 8, 16, 24, 64 + 40 give
    // last tiles of every row count modulo 6; widths 8 and 24 + 4 end on one latent
    // vector (AVX2) and on a part of one (AVX-512)
    let lens = [8, 16, 24, 104];
    for heads in 1..=17 {
        for (d_c, d_r) in [(8, 3), (24, 4)] {
            let (cache, s) = rank_cache(&mut rng, DType::F16, heads, d_c, d_r, 1, 16, &lens);
            let q = random_queries(&mut rng, lens.len(), s);
            check_all_kernels(&cache.layer(0).unwrap(), s, &q, 1);
        }
    }
}

#[test]
fn a_32k_token_sequence_matches_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0004);
    let lens = [32768, 3000];
    let (cache, s) = rank_cache(&mut rng, DType::Bf16, 16, 512, 64, 4, 64, &lens);
    let layer = cache.layer(0).unwrap();
    let q = random_queries(&mut rng, 2, s);
    let (want_out, want_lse) = run(&mut Reference, &layer, s, &q).unwrap();
    let mut backend = CpuBackend::new(2).unwrap();
    let (out, lse) = run(&mut backend, &layer, s, &q).unwrap();
    let tol = tolerance(DType::Bf16, backend.kernel());
    assert!(rel_l2(&out, &want_out) < tol, "{}", rel_l2(&out, &want_out));
    assert!(rel_l2(&lse, &want_lse) < tol, "{}", rel_l2(&lse, &want_lse));
}

#[test]
fn one_backend_serves_changing_batch_shapes_and_thread_counts() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0005);
    for threads in [1, 3] {
        let mut backend = CpuBackend::new(threads).unwrap();
        for (heads, g, lens) in [
            (64, 2, vec![900, 5, 64]),
            (16, 8, vec![3]),
            (64, 2, vec![2000, 1, 1, 1, 1000]),
        ] {
            let (cache, s) = rank_cache(&mut rng, DType::Bf16, heads, 512, 64, g, 64, &lens);
            let layer = cache.layer(0).unwrap();
            let q = random_queries(&mut rng, lens.len(), s);
            let (want_out, _) = run(&mut Reference, &layer, s, &q).unwrap();
            let (out, _) = run(&mut backend, &layer, s, &q).unwrap();
            let err = rel_l2(&out, &want_out);
            assert!(err < tolerance(DType::Bf16, backend.kernel()), "{err}");
        }
    }
}

#[test]
fn nan_in_the_cache_or_query_reaches_the_output_and_nothing_else() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0006);
    let s = shape(32, 64, 16);
    let lens = [300, 1000, 70];
    for dtype in [DType::Bf16, DType::F16, DType::F32] {
        // a NaN in the latent part, in the RoPE part, and in the middle of a long chunk
        for col in [3, s.slice_width + 5] {
            let mut cache = PagedRows::random(&mut rng, dtype, s.row_width(), 16, &lens);
            let row = rng.random_range(0..lens[1]);
            cache.set(1, row, col, f64::NAN);
            let q = random_queries(&mut rng, lens.len(), s);
            for kernel in KernelChoice::available() {
                let mut backend = CpuBackend::with_kernel(2, kernel).unwrap();
                let (out, lse) = run(&mut backend, &cache, s, &q).unwrap();
                let per_seq = s.heads * s.slice_width;
                assert!(
                    out[per_seq..2 * per_seq].iter().all(|v| v.is_nan())
                        && lse[s.heads..2 * s.heads].iter().all(|v| v.is_nan()),
                    "{}: NaN at row {row} col {col} did not reach every output",
                    backend.name()
                );
                for b in [0, 2] {
                    let v = &out[b * per_seq..(b + 1) * per_seq];
                    assert!(v.iter().all(|v| v.is_finite()), "{}", backend.name());
                }
            }
        }
    }
    // a NaN query value poisons its own head only
    let cache = PagedRows::random(&mut rng, DType::Bf16, s.row_width(), 16, &lens);
    let mut q = random_queries(&mut rng, lens.len(), s);
    let head = 7;
    q[head * s.row_width() + 2] = f32::NAN;
    for kernel in KernelChoice::available() {
        let mut backend = CpuBackend::with_kernel(2, kernel).unwrap();
        let (out, lse) = run(&mut backend, &cache, s, &q).unwrap();
        for h in 0..s.heads {
            let v = &out[h * s.slice_width..(h + 1) * s.slice_width];
            assert_eq!(
                v.iter().all(|x| x.is_nan()),
                h == head,
                "{} head {h}",
                backend.name()
            );
            assert_eq!(
                v.iter().all(|x| x.is_finite()),
                h != head,
                "{} head {h}",
                backend.name()
            );
            assert_eq!(lse[h].is_nan(), h == head);
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0007);
    let s = shape(4, 16, 8);
    let cache = PagedRows::random(&mut rng, DType::Bf16, s.row_width(), 8, &[10, 0]);
    let mut backend = CpuBackend::new(1).unwrap();
    let q = random_queries(&mut rng, 1, s);
    let (mut out, mut lse) = (vec![0.0; 4 * 16], vec![0.0; 4]);
    let mut call =
        |seqs: &[u32], shape: LatentShape, q: &[f32], out: &mut [f32], lse: &mut [f32]| {
            backend
                .attend(&cache, shape, seqs, q, out, lse)
                .unwrap_err()
                .kind()
        };
    assert_eq!(
        call(&[0], s, &q[1..], &mut out, &mut lse),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        call(&[0], s, &q, &mut out[1..], &mut lse),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        call(&[0], s, &q, &mut out, &mut lse[1..]),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        call(&[1], s, &q, &mut out, &mut lse),
        ErrorKind::InvalidArgument
    );
    assert_eq!(call(&[9], s, &q, &mut out, &mut lse), ErrorKind::OutOfRange);
    let wide = shape(4, 16, 9);
    assert_eq!(
        call(&[0], wide, &q, &mut out, &mut lse),
        ErrorKind::Mismatch
    );
    // no heads and no sequences are empty steps, not errors
    let none = shape(0, 16, 8);
    backend
        .attend(&cache, none, &[0], &[], &mut [], &mut [])
        .unwrap();
    backend
        .attend(&cache, s, &[], &[], &mut [], &mut [])
        .unwrap();

    assert_eq!(
        CpuBackend::new(0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    for kernel in KernelChoice::ALL {
        match CpuBackend::with_kernel(1, kernel) {
            Ok(b) => assert!(kernel.is_available() && b.kernel() == kernel),
            Err(e) => assert!(!kernel.is_available() && e.kind() == ErrorKind::Unsupported),
        }
        assert_eq!(KernelChoice::parse(kernel.name()).unwrap(), kernel);
    }
    assert_eq!(
        KernelChoice::parse("sse9").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    if let Ok(b) = CpuBackend::with_kernel(1, KernelChoice::Avx512Bf16) {
        assert_eq!(b.kernel_for(DType::Bf16), KernelChoice::Avx512Bf16);
        assert_eq!(b.kernel_for(DType::F32), KernelChoice::Avx512F);
    }
    let auto = CpuBackend::new(1).unwrap();
    assert_eq!(auto.kernel(), KernelChoice::available()[0]);
    assert!(auto.name().contains(auto.kernel().name()));
}

/// A row source whose pages are shorter than it claims.
struct ShortPages(PagedRows);

impl RowSource for ShortPages {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    fn row_width(&self) -> usize {
        self.0.row_width()
    }
    fn page_size(&self) -> usize {
        self.0.page_size()
    }
    fn seq_len(&self, seq: u32) -> Result<usize> {
        self.0.seq_len(seq)
    }
    fn page(&self, seq: u32, page: usize) -> &[u8] {
        &self.0.page(seq, page)[..10]
    }
}

#[test]
fn a_row_source_with_short_pages_is_an_error_not_a_wild_read() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0008);
    let s = shape(4, 16, 8);
    let cache = ShortPages(PagedRows::random(
        &mut rng,
        DType::Bf16,
        s.row_width(),
        8,
        &[20],
    ));
    let q = random_queries(&mut rng, 1, s);
    let (mut out, mut lse) = (vec![0.0; 4 * 16], vec![0.0; 4]);
    let err = CpuBackend::new(1)
        .unwrap()
        .attend(&cache, s, &[0], &q, &mut out, &mut lse)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("page 0"), "{err}");
    // several work items on several threads: each item finds its short page, and the
    // step returns one of those errors (on a pool of its own or a shared one)
    let cache = ShortPages(PagedRows::random(
        &mut rng,
        DType::Bf16,
        s.row_width(),
        8,
        &[2000],
    ));
    let pool = CpuBackend::thread_pool(2).unwrap();
    for mut backend in [
        CpuBackend::new(2).unwrap(),
        CpuBackend::on_pool(pool.clone(), KernelChoice::Auto).unwrap(),
    ] {
        let err = backend
            .attend(&cache, s, &[0], &q, &mut out, &mut lse)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.message().contains("holds 10 bytes, fewer than its 384"),
            "{err}"
        );
    }
}

#[test]
fn ceilings_are_measured_for_every_kernel() {
    let buffer: Vec<u64> = (0..1 << 17).collect();
    for kernel in KernelChoice::available() {
        let backend = CpuBackend::with_kernel(2, kernel).unwrap();
        let bw = backend.read_bandwidth(&buffer);
        assert!(bw.is_finite() && bw > 1e6, "{}: {bw} B/s", backend.name());
        for dtype in [DType::Bf16, DType::F32] {
            let peak = backend.peak_flops(dtype, std::time::Duration::from_millis(2));
            assert!(
                peak.is_finite() && peak > 1e6,
                "{}: {peak} flop/s",
                backend.name()
            );
        }
    }
}

#[test]
fn scaling_the_queries_in_the_kernel_gives_the_bits_of_scaled_rows() {
    // `attend_scaling` multiplies as it packs; a caller scaling the rows first must get
    // the same bits from every kernel and element type, planned or not.
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0009);
    let scales = [0.0721_f32, 0.1353];
    for dtype in [DType::Bf16, DType::F32, DType::Fp8E4m3] {
        let (cache, s) = rank_cache(&mut rng, dtype, 48, 256, 64, 2, 16, &[1, 70, 300]);
        let layer = cache.layer(0).unwrap();
        let q = random_queries(&mut rng, 3, s);
        let rw = s.row_width();
        let scaled: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &v)| v * scales[usize::from(i % rw >= s.slice_width)])
            .collect();
        for kernel in KernelChoice::available() {
            let mut backend = CpuBackend::with_kernel(2, kernel).unwrap();
            assert!(backend.scales_queries());
            let (want_out, want_lse) = run(&mut backend, &layer, s, &scaled).unwrap();
            let lens: Vec<usize> = (0..3).map(|b| layer.seq_len(b).unwrap()).collect();
            let mut plan = vec![0; backend.schedule_len(s, 3)];
            backend.schedule(s, &lens, &mut plan).unwrap();
            for schedule in [None, Some(&plan[..])] {
                let mut out = vec![f32::NAN; want_out.len()];
                let mut lse = vec![f32::NAN; want_lse.len()];
                backend
                    .attend_scaling(
                        &layer,
                        s,
                        &[0, 1, 2],
                        schedule,
                        &q,
                        scales,
                        &mut out,
                        &mut lse,
                    )
                    .unwrap();
                let same =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same(&out, &want_out) && same(&lse, &want_lse),
                    "{dtype:?} {kernel:?} planned {}",
                    schedule.is_some()
                );
            }
        }
    }
}

#[test]
fn a_step_on_the_calling_thread_has_the_bits_of_a_step_in_the_pool() {
    // A backend alone on its pool runs one thread's work (one thread, or one work item)
    // on the calling thread; on a pool another owner holds, it always enters the pool.
    // Both must give the same bits: one item, several chunks of one sequence, a batch,
    // two head groups (130 heads).
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_000a);
    let cases: [(usize, usize, &[usize]); 4] = [
        (16, 1, &[300]),
        (16, 2, &[3000]),
        (24, 2, &[700, 1, 65]),
        (130, 1, &[90, 1100]),
    ];
    for (heads, g, lens) in cases {
        for dtype in [DType::Bf16, DType::F16] {
            let (cache, s) = rank_cache(&mut rng, dtype, heads, 64, 16, g, 16, lens);
            let layer = cache.layer(0).unwrap();
            let q = random_queries(&mut rng, lens.len(), s);
            for kernel in KernelChoice::available() {
                for threads in [1, 2] {
                    let mut alone = CpuBackend::with_kernel(threads, kernel).unwrap();
                    let pool = CpuBackend::thread_pool(threads).unwrap();
                    let mut shared = CpuBackend::on_pool(pool.clone(), kernel).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    // twice: the second step reuses the grown buffers
                    for _ in 0..2 {
                        let (out_a, lse_a) = run(&mut alone, &layer, s, &q).unwrap();
                        let (out_s, lse_s) = run(&mut shared, &layer, s, &q).unwrap();
                        assert!(out_a.iter().all(|v| v.is_finite()));
                        assert_eq!(bits(&out_a), bits(&out_s), "{kernel:?} {threads} {lens:?}");
                        assert_eq!(bits(&lse_a), bits(&lse_s), "{kernel:?} {threads} {lens:?}");
                    }
                    drop(pool);
                }
            }
        }
    }
}

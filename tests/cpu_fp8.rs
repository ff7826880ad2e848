//! The FP8 (e4m3, f32 block scales, bf16 RoPE key) slice cache on the CPU backend, on
//! fresh random inputs: every kernel's decode of an FP8 cache equals its decode of an f32
//! cache holding the dequantised rows, stays within a documented bound of the f64
//! reference over the unquantised rows, and a NaN code, scale or RoPE value reaches
//! every output of its sequence and no other. Outputs are poisoned with NaN first.

mod attention_support;

use attention_support::{random_queries, run};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tpla::attention::cpu::{CpuBackend, KernelChoice};
use tpla::attention::reference::{gather_rows, latent_attention, Reference};
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::{DType, ModelDims, Result, ShardPlan};

/// Relative L2 error of the FP8 decode against the f64 reference over the unquantised
/// rows that this test allows. e4m3 keeps 3 mantissa bits: a value's rounding error is up
/// to 2^-4 of it, about 0.025 RMS over a binade. A one-token sequence's output is its row,
/// so that error shows undiluted; measured 0.018-0.032 on these shapes (worst at g=1),
/// 0.05 leaves room for other seeds.
const FP8_BOUND: f64 = 0.05;

fn cache(
    dtype: DType,
    dims: ModelDims,
    groups: usize,
    page: usize,
    lens: &[usize],
) -> (RankCache, LatentShape) {
    let plan = ShardPlan::new(&dims, groups, groups - 1).unwrap();
    let id = TransformId {
        code: 0,
        fingerprint: 0,
    };
    let spec = ShardSpec::new(dims, &plan, dtype, page, vec![id]).unwrap();
    let pages = lens.iter().map(|l| l.div_ceil(page)).sum();
    let mut cache = RankCache::new(spec, pages).unwrap();
    for seq in 0..lens.len() {
        cache.add_sequence(seq as u32).unwrap();
    }
    let shape = LatentShape {
        heads: dims.heads,
        slice_width: plan.slice_width,
        d_r: dims.d_r,
    };
    (cache, shape)
}

/// Rows like normalised latents: unit scale with a few large outlier channels, so the
/// block scales differ, and a RoPE key of its own scale.
fn random_rows(rng: &mut ChaCha8Rng, len: usize, shape: LatentShape) -> Vec<f64> {
    let (w, rw) = (shape.slice_width, shape.row_width());
    (0..len * rw)
        .map(|i| {
            let col = i % rw;
            let scale = if col >= w {
                0.7
            } else if col % 37 == 5 {
                8.0
            } else {
                1.0
            };
            scale * rng.sample::<f64, _>(StandardNormal)
        })
        .collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    if got.iter().any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - w) * (*g as f64 - w);
        den += w * w;
    }
    (num / den.max(1e-300)).sqrt()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// FP8 caches and caches of its dequantised rows (f32: exact; bf16: as the `vdpbf16ps`
/// kernel rounds them), and the unquantised rows.
struct Case {
    fp8: RankCache,
    f32: RankCache,
    bf16: RankCache,
    shape: LatentShape,
    exact: Vec<Vec<f64>>,
}

fn case(seed: u64, dims: ModelDims, groups: usize, page: usize, lens: &[usize]) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut fp8, shape) = cache(DType::Fp8E4m3, dims, groups, page, lens);
    let (mut f32c, _) = cache(DType::F32, dims, groups, page, lens);
    let (mut bf16c, _) = cache(DType::Bf16, dims, groups, page, lens);
    let mut exact = Vec::new();
    for (seq, &len) in lens.iter().enumerate() {
        let rows = random_rows(&mut rng, len, shape);
        fp8.append_rows(seq as u32, 0, &rows).unwrap();
        let deq = gather_rows(&fp8.layer(0).unwrap(), seq as u32, shape.slice_width).unwrap();
        // every dequantised value is an f32 (code * scale rounded once), so the f32
        // cache holds them exactly
        assert!(deq.iter().all(|&v| v as f32 as f64 == v));
        f32c.append_rows(seq as u32, 0, &deq).unwrap();
        // rounded from f32 here: half's f64-to-bf16 drops the low 32 mantissa bits before
        // rounding, so values a hair above a tie round down (the kernel rounds the f32)
        let deq_bf16: Vec<f64> = deq
            .iter()
            .map(|&v| half::bf16::from_f32(v as f32).to_f64())
            .collect();
        bf16c.append_rows(seq as u32, 0, &deq_bf16).unwrap();
        exact.push(rows);
    }
    Case {
        fp8,
        f32: f32c,
        bf16: bf16c,
        shape,
        exact,
    }
}

/// Every kernel on the FP8 cache: bit for bit its result on the dequantised f32 cache
/// (the f32 kernels decode both to the same f32 panel) or, for `vdpbf16ps`, on the
/// dequantised rows rounded to bf16 (what it decodes FP8 rows to); within 1e-5 of the
/// f64 reference over the dequantised rows (2e-2 for `vdpbf16ps`, which rounds the query
/// and probabilities to bf16 as on bf16 caches), and within [`FP8_BOUND`] of the f64
/// reference over the unquantised rows.
fn check(c: &Case, threads: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(c.exact.len() as u64 ^ 0xf8);
    let s = c.shape;
    let batch = c.exact.len();
    let q = random_queries(&mut rng, batch, s);
    let (ref_out, ref_lse) = run(&mut Reference, &c.f32.layer(0).unwrap(), s, &q).unwrap();
    let (ref_out, ref_lse) = (widen(&ref_out), widen(&ref_lse));
    let mut exact_out = Vec::new();
    for (b, rows) in c.exact.iter().enumerate() {
        let qb = widen(&q[b * s.heads * s.row_width()..(b + 1) * s.heads * s.row_width()]);
        exact_out.extend(latent_attention(rows, &qb, s).0);
    }
    let mut worst: f64 = 0.0;
    for kernel in KernelChoice::available() {
        let mut backend = CpuBackend::with_kernel(threads, kernel).unwrap();
        let name = backend.name();
        let (out, lse) = run(&mut backend, &c.fp8.layer(0).unwrap(), s, &q).unwrap();
        let (same_as, tol) = match kernel {
            KernelChoice::Avx512Bf16 => (&c.bf16, 2e-2),
            _ => (&c.f32, 1e-5),
        };
        assert_eq!(backend.kernel_for(DType::Fp8E4m3), kernel);
        let (out2, lse2) = run(&mut backend, &same_as.layer(0).unwrap(), s, &q).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&out) == bits(&out2) && bits(&lse) == bits(&lse2),
            "{name} {s:?}: the FP8 decode differs from the decode of the dequantised rows"
        );
        let (e_out, e_lse) = (rel_l2(&out, &ref_out), rel_l2(&lse, &ref_lse));
        assert!(
            e_out < tol && e_lse < tol,
            "{name} {s:?}: {e_out:e} {e_lse:e}"
        );
        let e = rel_l2(&out, &exact_out);
        assert!(
            e < FP8_BOUND,
            "{name} {s:?}: error {e} against unquantised rows"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn fp8_decode_equals_decode_over_the_dequantised_rows_for_every_kernel() {
    // DeepSeek-V3 / Kimi-K2 widths at g = 1, 2, 4, 8 (one scale block or several)
    for (i, g) in [1, 2, 4, 8].into_iter().enumerate() {
        let dims = ModelDims::new(16, 512, 64, 128, 128, 0.07).unwrap();
        let c = case(0xf8_0000 + i as u64, dims, g, 64, &[1, 63, 700, 130]);
        let e = check(&c, 2);
        eprintln!("g={g}: worst relative L2 against unquantised rows {e:.4}");
    }
}

#[test]
fn odd_widths_partial_blocks_and_page_sizes() {
    // w = 200 (blocks of 128 and 72), w = 13 (a lone short block, scalar tails), w = 136
    // (one value past a block); odd page sizes, odd head counts, RoPE widths 8 and 3
    for (seed, heads, d_c, d_r, g, page) in [
        (1u64, 5, 200, 8, 1, 7),
        (2, 3, 26, 3, 2, 1),
        (3, 33, 272, 8, 2, 13),
    ] {
        let dims = ModelDims::new(heads, d_c, d_r, 8, 8, 0.1).unwrap();
        let c = case(seed, dims, g, page, &[1, page + 1, 97, 300]);
        check(&c, 3);
    }
}

/// An FP8 row source of random rows whose bytes a test may damage.
struct Fp8Rows {
    w: usize,
    d_r: usize,
    page_size: usize,
    seqs: Vec<(usize, Vec<Vec<u8>>)>,
}

impl Fp8Rows {
    fn random(rng: &mut ChaCha8Rng, shape: LatentShape, page_size: usize, lens: &[usize]) -> Self {
        let (w, d_r) = (shape.slice_width, shape.d_r);
        let rb = DType::Fp8E4m3.row_bytes(w, d_r);
        let seqs = lens
            .iter()
            .map(|&len| {
                let rows = random_rows(rng, len, shape);
                let mut pages = vec![vec![0xffu8; page_size * rb]; len.div_ceil(page_size)];
                for (t, row) in rows.chunks_exact(w + d_r).enumerate() {
                    let page = &mut pages[t / page_size];
                    let at = (t % page_size) * rb;
                    DType::Fp8E4m3.encode_row(row, w, &mut page[at..at + rb]);
                }
                (len, pages)
            })
            .collect();
        Fp8Rows {
            w,
            d_r,
            page_size,
            seqs,
        }
    }

    /// Byte `at` of row `row` of sequence `seq`.
    fn byte(&mut self, seq: usize, row: usize, at: usize) -> &mut u8 {
        let rb = DType::Fp8E4m3.row_bytes(self.w, self.d_r);
        &mut self.seqs[seq].1[row / self.page_size][(row % self.page_size) * rb + at]
    }
}

impl RowSource for Fp8Rows {
    fn dtype(&self) -> DType {
        DType::Fp8E4m3
    }
    fn row_width(&self) -> usize {
        self.w + self.d_r
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

#[test]
fn a_nan_code_scale_or_rope_value_reaches_its_sequence_only_and_garbage_past_the_end_is_never_read()
{
    let mut rng = ChaCha8Rng::seed_from_u64(0xf8_4a4e);
    let s = LatentShape {
        heads: 20,
        slice_width: 256,
        d_r: 16,
    };
    // pages past each sequence's end hold 0xff bytes: NaN codes, NaN scales
    let lens = [300, 1000, 70];
    let rope_at = DType::Fp8E4m3.rope_offset(s.slice_width);
    for (what, at, value) in [
        ("NaN code 0x7f", 3, 0x7f),
        ("NaN code 0xff", 200, 0xff),
        ("NaN scale", s.slice_width + 4 + 3, 0xff), // high byte of block 1's scale
        ("NaN RoPE value", rope_at + 2 * 5 + 1, 0xff),
    ] {
        let mut cache = Fp8Rows::random(&mut rng, s, 16, &lens);
        let row = rng.random_range(0..lens[1]);
        if what == "NaN scale" {
            for k in 0..4 {
                *cache.byte(1, row, s.slice_width + 4 + k) = 0xff;
            }
        } else if what == "NaN RoPE value" {
            *cache.byte(1, row, at) = 0x7f;
            *cache.byte(1, row, at - 1) = 0xc0;
        } else {
            *cache.byte(1, row, at) = value;
        }
        let q = random_queries(&mut rng, lens.len(), s);
        for kernel in KernelChoice::available() {
            let mut backend = CpuBackend::with_kernel(2, kernel).unwrap();
            let (out, lse) = run(&mut backend, &cache, s, &q).unwrap();
            let per_seq = s.heads * s.slice_width;
            assert!(
                out[per_seq..2 * per_seq].iter().all(|v| v.is_nan())
                    && lse[s.heads..2 * s.heads].iter().all(|v| v.is_nan()),
                "{}: {what} at row {row} did not reach every output",
                backend.name()
            );
            for b in [0, 2] {
                let v = &out[b * per_seq..(b + 1) * per_seq];
                assert!(
                    v.iter().all(|v| v.is_finite()),
                    "{} {what}: sequence {b} read garbage",
                    backend.name()
                );
            }
        }
    }
}

#[test]
fn fp8_caches_refuse_values_out_of_range_and_size_rows_by_their_layout() {
    let dims = ModelDims::new(4, 512, 64, 128, 128, 0.07).unwrap();
    let (mut c, shape) = cache(DType::Fp8E4m3, dims, 2, 64, &[10]);
    assert_eq!(c.spec().row_bytes(), 392);
    assert_eq!(c.spec().page_bytes(), 64 * 392);
    let mut rows = vec![0.5; shape.row_width()];
    rows[7] = f64::NAN;
    assert!(c.append_rows(0, 0, &rows).is_err());
    rows[7] = f64::INFINITY;
    assert!(c.append_rows(0, 0, &rows).is_err());
    rows[7] = 1e300; // no f32 scale holds it
    assert!(c.append_rows(0, 0, &rows).is_err());
    rows[7] = 1e30; // an f32 scale does: quantised, not refused
    c.append_rows(0, 0, &rows).unwrap();
    let back = gather_rows(&c.layer(0).unwrap(), 0, shape.slice_width).unwrap();
    assert!((back[7] - 1e30).abs() < 1e30 * 1e-6);
    // the block's small values fall below its smallest subnormal step: zero
    assert_eq!(back[8], 0.0);
    // the other block keeps its own scale
    assert_eq!(back[200], 0.5);
}

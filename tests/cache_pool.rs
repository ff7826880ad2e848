//! The in-memory paged cache: appends, reads through `RowSource`, capacity, reuse.

mod cache_support;

use cache_support::*;
use tpla::attention::reference::{latent_attention, Reference};
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::cache::{RankCache, PAGE_ALIGN};
use tpla::{DType, ErrorKind};

#[test]
fn appended_rows_read_back_rounded_to_the_element_type() {
    for (i, dtype) in [DType::Bf16, DType::F16, DType::F32]
        .into_iter()
        .enumerate()
    {
        let spec = spec(dtype, 2, 1, 8, 3);
        let rw = spec.row_width();
        let mut cache = RankCache::new(spec, 32).unwrap();
        let mut rng = rng(i as u64);
        let mut want = vec![vec![Vec::new(); 3]; 2];
        cache.add_sequence(7).unwrap();
        cache.add_sequence(3).unwrap();
        // pieces that start and end mid-page, span several pages, and are single rows
        for (step, n) in [1usize, 5, 13, 8, 1, 1, 20].into_iter().enumerate() {
            for (si, seq) in [7u32, 3].into_iter().enumerate() {
                for (layer, want) in want[si].iter_mut().enumerate() {
                    let n = n + si * layer;
                    let rows = random_values(&mut rng, n * rw);
                    cache.append_rows(seq, layer, &rows).unwrap();
                    want.extend(rounded(dtype, &rows));
                }
            }
            for (si, seq) in [7u32, 3].into_iter().enumerate() {
                for (layer, want) in want[si].iter().enumerate() {
                    let got = rows_of(&cache, layer, seq);
                    assert_eq!(&got, want, "{dtype:?} step {step} seq {seq} layer {layer}");
                }
            }
        }
        let view = cache.layer(2).unwrap();
        let len = view.seq_len(3).unwrap();
        for page in 0..len.div_ceil(8) {
            let bytes = view.page(3, page);
            assert_eq!(bytes.len(), 8 * rw * dtype.size());
            assert_eq!(
                bytes.as_ptr() as usize % PAGE_ALIGN,
                0,
                "page {page} misaligned"
            );
        }
        // rows past the end of the last page read as zero
        let last = view.page(3, len / 8);
        assert!(last[(len % 8) * rw * dtype.size()..]
            .iter()
            .all(|&b| b == 0));
    }
}

#[test]
fn an_exhausted_pool_is_an_error_and_leaves_the_cache_unchanged() {
    let spec = spec(DType::Bf16, 4, 0, 4, 2);
    let rw = spec.row_width();
    let mut cache = RankCache::new(spec, 3).unwrap();
    let mut rng = rng(11);
    cache.add_sequence(1).unwrap();
    let rows = random_values(&mut rng, 10 * rw);
    cache.append_rows(1, 0, &rows).unwrap();
    assert_eq!(cache.free_pages(), 0);
    // the partial third page still has room for two rows
    cache.append_rows(1, 0, &rows[..2 * rw]).unwrap();
    let before = rows_of(&cache, 0, 1);
    let err = cache.append_rows(1, 0, &rows[..rw]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfCapacity, "{err}");
    assert!(err.message().contains("0 of 3 pages are free"), "{err}");
    assert_eq!(cache.seq_len(1, 0).unwrap(), 12);
    assert_eq!(rows_of(&cache, 0, 1), before);
    // another sequence cannot take a page either, and is left empty
    cache.add_sequence(2).unwrap();
    let err = cache.append_rows(2, 1, &rows[..rw]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfCapacity);
    assert_eq!(cache.seq_len(2, 1).unwrap(), 0);

    // freeing returns the pages; the reused pages hold only the new rows
    cache.free_sequence(1).unwrap();
    assert_eq!(cache.free_pages(), 3);
    let fresh = random_values(&mut rng, 5 * rw);
    cache.append_rows(2, 1, &fresh).unwrap();
    assert_eq!(rows_of(&cache, 1, 2), rounded(DType::Bf16, &fresh));
    let view = cache.layer(1).unwrap();
    assert!(
        view.page(2, 1)[rw * 2..].iter().all(|&b| b == 0),
        "stale rows"
    );
    assert_eq!(cache.free_pages(), 1);
    assert_eq!(
        cache.seq_len(1, 0).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
}

#[test]
fn layers_share_the_pages_of_a_sequence() {
    let spec = spec(DType::F32, 2, 0, 4, 3);
    let rw = spec.row_width();
    let mut cache = RankCache::new(spec, 4).unwrap();
    let rows = random_values(&mut rng(5), 9 * rw);
    cache.add_sequence(0).unwrap();
    cache.append_rows(0, 0, &rows).unwrap();
    assert_eq!(cache.free_pages(), 1);
    // the other layers catch up without taking pages
    cache.append_rows(0, 2, &rows).unwrap();
    cache.append_rows(0, 1, &rows[..3 * rw]).unwrap();
    assert_eq!(cache.free_pages(), 1);
    assert_eq!(
        (0..3)
            .map(|l| cache.seq_len(0, l).unwrap())
            .collect::<Vec<_>>(),
        [9, 3, 9]
    );
    assert_eq!(rows_of(&cache, 1, 0), rounded(DType::F32, &rows[..3 * rw]));
}

#[test]
fn bad_appends_are_errors_with_a_reason() {
    let spec = spec(DType::F16, 2, 0, 4, 2);
    let rw = spec.row_width();
    let mut cache = RankCache::new(spec, 4).unwrap();
    cache.add_sequence(9).unwrap();
    let row = vec![0.5; rw];
    let cases: Vec<(tpla::Error, ErrorKind, &str)> = vec![
        (
            cache.append_rows(9, 0, &row[1..]).unwrap_err(),
            ErrorKind::InvalidArgument,
            "whole number",
        ),
        (
            cache.append_rows(8, 0, &row).unwrap_err(),
            ErrorKind::OutOfRange,
            "sequence 8",
        ),
        (
            cache.append_rows(9, 2, &row).unwrap_err(),
            ErrorKind::OutOfRange,
            "layer 2",
        ),
        (
            cache
                .append_rows(9, 0, &[vec![f64::NAN], row[1..].to_vec()].concat())
                .unwrap_err(),
            ErrorKind::InvalidArgument,
            "not a finite f16",
        ),
        (
            cache
                .append_rows(9, 0, &[row[1..].to_vec(), vec![1e5]].concat())
                .unwrap_err(),
            ErrorKind::InvalidArgument,
            "index 47",
        ),
        (
            cache.add_sequence(9).unwrap_err(),
            ErrorKind::InvalidArgument,
            "already",
        ),
        (
            cache.layer(5).err().unwrap(),
            ErrorKind::OutOfRange,
            "layer 5",
        ),
        (
            cache.free_sequence(4).unwrap_err(),
            ErrorKind::OutOfRange,
            "sequence 4",
        ),
    ];
    for (err, kind, text) in cases {
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.message().contains(text), "'{err}' lacks '{text}'");
    }
    assert_eq!(cache.seq_len(9, 0).unwrap(), 0);
    assert_eq!(cache.free_pages(), 4);
}

#[test]
fn the_reference_backend_reads_a_paged_cache() {
    let spec = spec(DType::Bf16, 2, 1, 8, 1);
    let shape = LatentShape {
        heads: 4,
        slice_width: spec.slice_width(),
        d_r: spec.dims().d_r,
    };
    let rw = spec.row_width();
    let mut cache = RankCache::new(spec, 16).unwrap();
    let mut rng = rng(3);
    let lens = [1usize, 8, 29];
    for (seq, len) in lens.iter().enumerate() {
        cache.add_sequence(seq as u32 * 10).unwrap();
        let rows = random_values(&mut rng, len * rw);
        cache.append_rows(seq as u32 * 10, 0, &rows).unwrap();
    }
    let seqs = [20u32, 0, 10];
    let q: Vec<f32> = random_values(&mut rng, 3 * 4 * rw)
        .into_iter()
        .map(|v| (v * 0.1) as f32)
        .collect();
    let mut out = vec![f32::NAN; 3 * 4 * shape.slice_width];
    let mut lse = vec![f32::NAN; 3 * 4];
    let view = cache.layer(0).unwrap();
    Reference
        .attend(&view, shape, &seqs, &q, &mut out, &mut lse)
        .unwrap();
    for (b, &seq) in seqs.iter().enumerate() {
        let qb: Vec<f64> = q[b * 4 * rw..(b + 1) * 4 * rw]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (o, l) = latent_attention(&rows_of(&cache, 0, seq), &qb, shape);
        let w = 4 * shape.slice_width;
        assert!(out[b * w..(b + 1) * w]
            .iter()
            .zip(&o)
            .all(|(a, b)| *a == *b as f32));
        assert!(lse[b * 4..(b + 1) * 4]
            .iter()
            .zip(&l)
            .all(|(a, b)| *a == *b as f32));
    }
}

//! Export to shard files and buffers, registration, decode on registered caches.

mod cache_support;

use cache_support::*;
use tpla::attention::cpu::{CpuBackend, KernelChoice};
use tpla::attention::reference::Reference;
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::cache::{ExportPlan, RankCache, ShardFileWriter, ShardHeader, ShardSpec, ShardWriter};
use tpla::{DType, ErrorKind};

const SEQS: [(u32, usize); 5] = [(5, 13), (2, 8), (9, 1), (4, 0), (70, 30)];

fn shard_paths(dir: &std::path::Path, groups: usize) -> Vec<std::path::PathBuf> {
    (0..groups)
        .map(|g| dir.join(format!("prefill.rank{g}-of-{groups}.tpla")))
        .collect()
}

fn export_files(
    prefill: &Prefill,
    groups: usize,
    dtype: DType,
    dir: &std::path::Path,
) -> Vec<std::path::PathBuf> {
    let paths = shard_paths(dir, groups);
    let mut w = ShardFileWriter::create(&prefill.plan(groups, dtype, 8), &paths).unwrap();
    for (latent, rope) in prefill.blocks() {
        w.push(latent, rope).unwrap();
    }
    w.commit().unwrap();
    paths
}

/// Every page of every sequence of every layer, byte for byte.
fn assert_same_pages(a: &RankCache, b: &RankCache, ids: &[u32]) {
    for layer in 0..a.spec().layers() {
        let (va, vb) = (a.layer(layer).unwrap(), b.layer(layer).unwrap());
        for &id in ids {
            let len = va.seq_len(id).unwrap();
            assert_eq!(len, vb.seq_len(id).unwrap(), "layer {layer} seq {id}");
            for page in 0..len.div_ceil(va.page_size()) {
                assert!(
                    va.page(id, page) == vb.page(id, page),
                    "layer {layer} seq {id} page {page}"
                );
            }
        }
    }
}

/// Decode of `ids` (non-empty sequences) by `backend` on both caches, bit for bit.
fn assert_same_decode(
    backend: &mut dyn LatentAttention,
    a: &RankCache,
    b: &RankCache,
    ids: &[u32],
    seed: u64,
) {
    let spec = a.spec();
    let shape = LatentShape {
        heads: spec.dims().heads,
        slice_width: spec.slice_width(),
        d_r: spec.dims().d_r,
    };
    let q: Vec<f32> = random_values(&mut rng(seed), ids.len() * shape.heads * shape.row_width())
        .into_iter()
        .map(|v| (v * 0.2) as f32)
        .collect();
    for layer in 0..spec.layers() {
        let mut outs = Vec::new();
        for cache in [a, b] {
            let mut out = vec![f32::NAN; ids.len() * shape.heads * shape.slice_width];
            let mut lse = vec![f32::NAN; ids.len() * shape.heads];
            backend
                .attend(
                    &cache.layer(layer).unwrap(),
                    shape,
                    ids,
                    &q,
                    &mut out,
                    &mut lse,
                )
                .unwrap();
            assert!(out.iter().chain(&lse).all(|v| v.is_finite()));
            outs.push((out, lse));
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&outs[0].0), bits(&outs[1].0), "layer {layer} outputs");
        assert_eq!(bits(&outs[0].1), bits(&outs[1].1), "layer {layer} lse");
    }
}

#[test]
fn registered_shards_hold_each_ranks_slice_of_the_prefill_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = SEQS.iter().map(|s| s.0).collect();
    let nonempty: Vec<u32> = SEQS.iter().filter(|s| s.1 > 0).map(|s| s.0).collect();
    for (case, (groups, dtype)) in [
        (2, DType::Bf16),
        (4, DType::F16),
        (1, DType::F32),
        (8, DType::Bf16),
    ]
    .into_iter()
    .enumerate()
    {
        let prefill = Prefill::random(case as u64, 3, &SEQS);
        let paths = export_files(&prefill, groups, dtype, dir.path());
        let buffers = prefill.export_buffers(groups, dtype, 8);
        for (group, path) in paths.iter().enumerate() {
            // the buffer export is the file, byte for byte
            assert!(
                std::fs::read(path).unwrap() == buffers[group],
                "group {group}"
            );
            let spec = spec(dtype, groups, group, 8, 3);
            let mut registered = RankCache::new(spec.clone(), 4).unwrap();
            let mut got = registered.register_file(path).unwrap();
            assert_eq!(got, ids);
            got.sort();
            assert_eq!(
                registered.free_pages(),
                4,
                "registration takes no pool pages"
            );
            for layer in 0..3 {
                for (s, &(id, _)) in SEQS.iter().enumerate() {
                    let want = rounded(dtype, &prefill.slice(groups, group, layer, s));
                    assert_eq!(
                        rows_of(&registered, layer, id),
                        want,
                        "{groups} {group} {layer} {id}"
                    );
                }
            }
            let in_memory = prefill.in_memory(spec, 16);
            assert_same_pages(&registered, &in_memory, &ids);
            assert_same_decode(
                &mut Reference,
                &registered,
                &in_memory,
                &nonempty,
                case as u64,
            );
        }
    }
}

#[test]
fn registered_buffers_are_read_in_place() {
    let prefill = Prefill::random(1, 2, &SEQS);
    let image = prefill.export_buffers(2, DType::Bf16, 8).swap_remove(1);
    let header = ShardHeader::parse(&image).unwrap();
    let base = image.as_ptr() as usize;
    let mut cache = RankCache::new(spec(DType::Bf16, 2, 1, 8, 2), 2).unwrap();
    cache.register_buffer(image).unwrap();
    for e in header.sequences().iter().filter(|e| e.len > 0) {
        for layer in 0..2 {
            let page = cache.layer(layer).unwrap().page(e.id, 0).as_ptr() as usize;
            assert_eq!(
                page,
                base + header.page_offset(layer, e.first_page),
                "seq {}",
                e.id
            );
        }
    }
}

#[test]
fn decode_tokens_appended_after_registration_go_to_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let prefill = Prefill::random(7, 2, &SEQS);
    let paths = export_files(&prefill, 2, DType::Bf16, dir.path());
    let spec = spec(DType::Bf16, 2, 0, 8, 2);
    let mut registered = RankCache::new(spec.clone(), 8).unwrap();
    registered.register_file(&paths[0]).unwrap();
    let mut in_memory = prefill.in_memory(spec.clone(), 16);
    let rw = spec.row_width();
    let mut rng = rng(99);
    // seq 5 ends mid-page (13 of 16 rows), seq 2 at a page boundary, seq 4 is empty
    let free = registered.free_pages();
    for step in 0..12 {
        for id in [5u32, 2, 4] {
            for layer in [1, 0] {
                let row = random_values(&mut rng, rw);
                registered.append_rows(id, layer, &row).unwrap();
                in_memory.append_rows(id, layer, &row).unwrap();
            }
        }
        if step == 0 {
            // seq 5's partial page moved to the pool; seqs 2 and 4 took a new page each
            assert_eq!(registered.free_pages(), free - 3);
        }
    }
    let ids: Vec<u32> = SEQS.iter().map(|s| s.0).collect();
    assert_same_pages(&registered, &in_memory, &ids);
    let ids = [5, 2, 4, 70, 9];
    assert_same_decode(&mut Reference, &registered, &in_memory, &ids, 3);
    // mapped pages (64-byte aligned) and pool pages mixed within a sequence
    for kernel in KernelChoice::available() {
        let mut cpu = CpuBackend::with_kernel(2, kernel).unwrap();
        assert_same_decode(&mut cpu, &registered, &in_memory, &ids, 4);
    }
    // the untouched sequences still read from the file
    assert_eq!(
        rows_of(&registered, 1, 70),
        rounded(DType::Bf16, &prefill.slice(2, 0, 1, 4))
    );
}

#[test]
fn freeing_registered_sequences_releases_pages_and_the_image() {
    let prefill = Prefill::random(2, 1, &SEQS);
    let image = prefill.export_buffers(2, DType::Bf16, 8).swap_remove(0);
    let mut cache = RankCache::new(spec(DType::Bf16, 2, 0, 8, 1), 4).unwrap();
    let ids = cache.register_buffer(image.clone()).unwrap();
    assert_eq!(cache.registered_images(), 1);
    let row = vec![0.25; cache.spec().row_width()];
    cache.append_rows(5, 0, &row).unwrap();
    assert_eq!(cache.free_pages(), 3);
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(cache.registered_images(), 1);
        cache.free_sequence(*id).unwrap();
        assert_eq!(cache.registered_images(), usize::from(k + 1 < ids.len()));
    }
    assert_eq!(cache.free_pages(), 4);
    // the same ids can come back
    assert_eq!(cache.register_buffer(image).unwrap(), ids);
}

#[test]
fn several_shards_share_one_cache_and_ids_must_not_clash() {
    let a = Prefill::random(3, 2, &[(1, 10), (2, 3)]);
    let b = Prefill::random(4, 2, &[(3, 17)]);
    let clash = Prefill::random(5, 2, &[(4, 2), (2, 5)]);
    let spec = spec(DType::Bf16, 4, 3, 8, 2);
    let mut cache = RankCache::new(spec, 2).unwrap();
    cache.add_sequence(100).unwrap();
    for p in [&a, &b] {
        cache
            .register_buffer(p.export_buffers(4, DType::Bf16, 8).swap_remove(3))
            .unwrap();
    }
    let err = cache
        .register_buffer(clash.export_buffers(4, DType::Bf16, 8).swap_remove(3))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("sequence 2"), "{err}");
    assert_eq!(
        cache.seq_len(4, 0).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(cache.registered_images(), 2);
    for (p, s, id) in [(&a, 0, 1), (&a, 1, 2), (&b, 0, 3)] {
        assert_eq!(
            rows_of(&cache, 1, id),
            rounded(DType::Bf16, &p.slice(4, 3, 1, s))
        );
    }
    let mut ids: Vec<u32> = cache.sequence_ids().collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3, 100]);
}

#[test]
fn a_shard_for_another_rank_or_model_is_a_mismatch_naming_the_field() {
    let prefill = Prefill::random(6, 2, &SEQS);
    let image = prefill.export_buffers(2, DType::Bf16, 8).swap_remove(1);
    let dims = small_dims();
    let plan = |groups, group| tpla::ShardPlan::new(&dims, groups, group).unwrap();
    let mut other_transform = transforms(2);
    other_transform[1].fingerprint ^= 1;
    let mut other_code = transforms(2);
    other_code[0].code = 1;
    let other_scale = tpla::ModelDims {
        softmax_scale: 0.126,
        ..dims
    };
    let other_heads = tpla::ModelDims { heads: 8, ..dims };
    let cases = [
        (
            ShardSpec::new(dims, &plan(2, 0), DType::Bf16, 8, transforms(2)),
            "another rank",
        ),
        (
            ShardSpec::new(dims, &plan(4, 1), DType::Bf16, 8, transforms(2)),
            "latent group count 2",
        ),
        (
            ShardSpec::new(dims, &plan(2, 1), DType::F16, 8, transforms(2)),
            "stores bf16",
        ),
        (
            ShardSpec::new(dims, &plan(2, 1), DType::Bf16, 16, transforms(2)),
            "pages of 8 tokens",
        ),
        (
            ShardSpec::new(dims, &plan(2, 1), DType::Bf16, 8, transforms(3)),
            "2 layers",
        ),
        (
            ShardSpec::new(dims, &plan(2, 1), DType::Bf16, 8, other_transform),
            "layer 1: the shard was rotated",
        ),
        (
            ShardSpec::new(dims, &plan(2, 1), DType::Bf16, 8, other_code),
            "layer 0",
        ),
        (
            ShardSpec::new(other_scale, &plan(2, 1), DType::Bf16, 8, transforms(2)),
            "softmax scale",
        ),
        (
            ShardSpec::new(other_heads, &plan(2, 1), DType::Bf16, 8, transforms(2)),
            "heads 4",
        ),
    ];
    for (spec, want) in cases {
        let mut cache = RankCache::new(spec.unwrap(), 4).unwrap();
        let err = cache.register_buffer(image.clone()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch, "{err}");
        assert!(err.message().contains(want), "'{err}' lacks '{want}'");
        assert_eq!(cache.sequence_ids().count(), 0);
    }
}

#[test]
fn shard_files_are_replaced_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let old = Prefill::random(8, 1, &[(1, 20)]);
    let new = Prefill::random(9, 1, &[(1, 20)]);
    let paths = export_files(&old, 2, DType::Bf16, dir.path());
    let mut mapped_old = RankCache::new(spec(DType::Bf16, 2, 0, 8, 1), 1).unwrap();
    mapped_old.register_file(&paths[0]).unwrap();

    // an abandoned export leaves no file behind and the old shard in place
    let mut abandoned = ShardFileWriter::create(&new.plan(2, DType::Bf16, 8), &paths).unwrap();
    abandoned
        .push(&new.rows[0][0].0, &new.rows[0][0].1)
        .unwrap();
    drop(abandoned);
    let names = |dir: &std::path::Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(dir.path()),
        ["prefill.rank0-of-2.tpla", "prefill.rank1-of-2.tpla"]
    );

    export_files(&new, 2, DType::Bf16, dir.path());
    assert_eq!(names(dir.path()).len(), 2);
    let mut mapped_new = RankCache::new(spec(DType::Bf16, 2, 0, 8, 1), 1).unwrap();
    mapped_new.register_file(&paths[0]).unwrap();
    // the mapping taken before the rename still reads the old rows
    assert_eq!(
        rows_of(&mapped_old, 0, 1),
        rounded(DType::Bf16, &old.slice(2, 0, 0, 0))
    );
    assert_eq!(
        rows_of(&mapped_new, 0, 1),
        rounded(DType::Bf16, &new.slice(2, 0, 0, 0))
    );
}

#[test]
fn bad_exports_are_errors_with_a_reason() {
    let prefill = Prefill::random(10, 2, &[(1, 3), (2, 2)]);
    let plan = prefill.plan(2, DType::F16, 8);
    let mut images = vec![vec![0u8; plan.image_len()]; 2];
    let mut short = vec![0u8; plan.image_len() - 1];
    let err = ShardWriter::to_buffers(&plan, vec![&mut images[0][..], &mut short[..]])
        .err()
        .unwrap();
    assert!(err.message().contains("buffer 1"), "{err}");
    let err = ShardWriter::to_buffers(&plan, vec![&mut images[0][..]])
        .err()
        .unwrap();
    assert!(
        err.message().contains("1 sinks for an export of 2"),
        "{err}"
    );

    let (a, b) = images.split_at_mut(1);
    let mut w = ShardWriter::to_buffers(&plan, vec![&mut a[0][..], &mut b[0][..]]).unwrap();
    assert_eq!(w.next_block(), Some((0, 1)));
    let (latent, rope) = &prefill.rows[0][0];
    let err = w.push(&latent[1..], rope).unwrap_err();
    assert!(
        err.message()
            .contains("layer 0, sequence 1: expected 3 tokens"),
        "{err}"
    );
    let mut big = latent.clone();
    big[5] = 7e4;
    let err = w.push(&big, rope).unwrap_err();
    assert!(err.message().contains("not a finite f16"), "{err}");
    w.push(latent, rope).unwrap();
    assert_eq!(w.next_block(), Some((0, 2)));
    let err = w.finish().err().unwrap();
    assert!(
        err.message()
            .contains("layer 0 of sequence 2 was not written"),
        "{err}"
    );

    let dims = small_dims();
    for (groups, seqs, want) in [
        (3, vec![(1, 3)], "one of 1, 2, 4, 8"),
        (0, vec![(1, 3)], "one of 1, 2, 4, 8"),
        (2, vec![(1, 3), (1, 4)], "appears twice"),
        (2, vec![(1, usize::MAX)], "too large"),
    ] {
        let err = ExportPlan::new(dims, groups, DType::Bf16, 8, transforms(2), &seqs).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains(want), "'{err}' lacks '{want}'");
    }
}

/// Small shard images committed as the fuzzer's seed corpus double as golden files: a
/// fresh export of the same rows must reproduce them byte for byte, so an accidental
/// change of the format fails here. `TPLA_BLESS_SHARD_SEEDS=1` rewrites them after a
/// deliberate change (which also needs a new format version).
#[test]
fn exports_reproduce_the_committed_golden_images() {
    let dims = tpla::ModelDims::new(1, 8, 4, 4, 4, 0.25).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/shard_parse");
    let bless = std::env::var_os("TPLA_BLESS_SHARD_SEEDS").is_some();
    // name, groups, (sequence shards, interleave), element type, page size, sequences
    type Case = (
        &'static str,
        usize,
        (usize, usize),
        DType,
        usize,
        &'static [(u32, usize)],
    );
    let cases: [Case; 8] = [
        (
            "g1-f32",
            1,
            (1, 1),
            DType::F32,
            4,
            &[(1, 5), (2, 0), (3, 4)],
        ),
        (
            "g2-bf16",
            2,
            (1, 1),
            DType::Bf16,
            4,
            &[(1, 5), (2, 0), (3, 4)],
        ),
        ("g4-f16", 4, (1, 1), DType::F16, 3, &[(7, 2), (8, 7)]),
        ("g8-bf16-page1", 8, (1, 1), DType::Bf16, 1, &[(9, 3)]),
        ("g2-empty", 2, (1, 1), DType::Bf16, 4, &[]),
        ("g2-fp8", 2, (1, 1), DType::Fp8E4m3, 3, &[(1, 5), (4, 2)]),
        // version 2: sequence shards (rank 1 of g1-s2 holds 2 tokens of 5, none of 2)
        (
            "g1-s2-f32",
            1,
            (2, 3),
            DType::F32,
            4,
            &[(1, 5), (2, 2), (3, 4)],
        ),
        ("g2-s4-bf16", 2, (4, 1), DType::Bf16, 2, &[(1, 9), (5, 3)]),
    ];
    for (name, groups, (shards, interleave), dtype, page_size, seqs) in cases {
        let prefill = Prefill::random_with(dims, 31, 2, seqs);
        let sharding = tpla::SequenceSharding::new(shards, interleave).unwrap();
        let plan = ExportPlan::hybrid(
            dims,
            groups,
            sharding,
            dtype,
            page_size,
            transforms(2),
            seqs,
        )
        .unwrap();
        let mut images: Vec<Vec<u8>> = (0..plan.ranks())
            .map(|r| vec![0u8; plan.image_len_of(r).unwrap()])
            .collect();
        let mut w = ShardWriter::to_buffers(&plan, images.iter_mut().map(|b| &mut b[..]).collect())
            .unwrap();
        for (latent, rope) in prefill.blocks() {
            w.push(latent, rope).unwrap();
        }
        w.finish().unwrap();
        for (group, image) in images.iter().enumerate().take(2) {
            let path = dir.join(format!("{name}-rank{group}.tpla"));
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, image).unwrap();
            }
            let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                golden == *image,
                "{} differs from a fresh export",
                path.display()
            );
            ShardHeader::parse(&golden)
                .unwrap()
                .verify_data(&golden)
                .unwrap();
        }
    }
}

#[test]
fn fp8_shards_round_trip_and_a_file_of_another_dtype_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = SEQS.iter().map(|s| s.0).collect();
    let nonempty: Vec<u32> = SEQS.iter().filter(|s| s.1 > 0).map(|s| s.0).collect();
    for (case, groups) in [1, 2, 4].into_iter().enumerate() {
        let prefill = Prefill::random(100 + case as u64, 2, &SEQS);
        let paths = export_files(&prefill, groups, DType::Fp8E4m3, dir.path());
        let buffers = prefill.export_buffers(groups, DType::Fp8E4m3, 8);
        for (group, path) in paths.iter().enumerate() {
            assert!(std::fs::read(path).unwrap() == buffers[group]);
            let header = ShardHeader::parse(&buffers[group]).unwrap();
            assert_eq!(header.spec().dtype(), DType::Fp8E4m3);
            let spec = spec(DType::Fp8E4m3, groups, group, 8, 2);
            // 8 rows of w codes, ceil(w / 128) scales and a bf16 RoPE key, to 64 bytes
            let w = spec.slice_width();
            let rb = w + 4 * w.div_ceil(128) + 2 * spec.dims().d_r;
            assert_eq!(spec.row_bytes(), rb);
            assert_eq!(spec.page_stride(), (8 * rb).next_multiple_of(64));
            let mut registered = RankCache::new(spec.clone(), 4).unwrap();
            assert_eq!(registered.register_file(path).unwrap(), ids);
            for layer in 0..2 {
                for (s, &(id, _)) in SEQS.iter().enumerate() {
                    let want = rounded_rows(
                        DType::Fp8E4m3,
                        &prefill.slice(groups, group, layer, s),
                        w,
                        spec.row_width(),
                    );
                    assert_eq!(rows_of(&registered, layer, id), want);
                }
            }
            // export quantises exactly as append does
            let in_memory = prefill.in_memory(spec.clone(), 16);
            assert_same_pages(&registered, &in_memory, &ids);
            let mut cpu = CpuBackend::with_kernel(2, KernelChoice::Portable).unwrap();
            assert_same_decode(&mut cpu, &registered, &in_memory, &nonempty, 7);
            // a bf16 cache refuses the FP8 file and an FP8 cache a bf16 file
            for other in [DType::Bf16, DType::F32] {
                let mut c = RankCache::new(spec.clone().with_dtype(other), 4).unwrap();
                let e = c.register_file(path).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
                assert!(e.to_string().contains("fp8_e4m3"), "{e}");
            }
            let bf16 = prefill.export_buffers(groups, DType::Bf16, 8);
            let mut c = RankCache::new(spec.clone(), 4).unwrap();
            let e = c.register_buffer(bf16[group].clone()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
            assert!(registered.free_pages() == 4 && c.free_pages() == 4);
        }
    }
}

#[test]
fn hostile_fp8_images_are_refused() {
    let prefill = Prefill::random(11, 2, &SEQS);
    let image = prefill.export_buffers(2, DType::Fp8E4m3, 8).remove(0);
    let spec = spec(DType::Fp8E4m3, 2, 0, 8, 2);
    let register = |img: Vec<u8>| {
        RankCache::new(spec.clone(), 4)
            .unwrap()
            .register_buffer(img)
    };
    // an unknown element type code, resealed so that the field check is reached
    for code in [0u32, 5, 0xff, u32::MAX] {
        let mut img = image.clone();
        img[44..48].copy_from_slice(&code.to_le_bytes());
        reseal::reseal(&mut img);
        let e = register(img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "{e}");
        assert!(e.to_string().contains("element type"), "{e}");
    }
    // an FP8 image relabelled bf16 (or the reverse) has the wrong page stride
    for code in [DType::Bf16.code(), DType::F16.code(), DType::F32.code()] {
        let mut img = image.clone();
        img[44..48].copy_from_slice(&code.to_le_bytes());
        reseal::reseal(&mut img);
        let e = register(img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "{e}");
        assert!(e.to_string().contains("page stride"), "{e}");
    }
    // truncated anywhere (inside the last page's scales, or a whole page short)
    let stride = spec.page_stride();
    let w = spec.slice_width();
    for cut in [1, w + 2, stride, stride + 3, image.len() - 128] {
        let e = register(image[..image.len() - cut].to_vec()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "cut {cut}: {e}");
    }
    // a damaged scale in the data: refused by the data checksum of a registration by
    // copy (zero-copy registration decodes it: a NaN or wrong value, never a wild read)
    let mut img = image.clone();
    let data = u64::from_le_bytes(img[104..112].try_into().unwrap()) as usize;
    img[data + w + 1] ^= 0x40;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.tpla");
    std::fs::write(&path, &img).unwrap();
    let mut c = RankCache::new(spec.clone(), 4).unwrap();
    let e = c.register_file(&path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptFile, "{e}");
    register(img).unwrap();
}

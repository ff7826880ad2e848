//! Corrupted, truncated and hostile shard images: every one is refused with a specific
//! error, never a crash or a read out of bounds.

mod cache_support;

use cache_support::hostile::*;
use cache_support::reseal::reseal;
use cache_support::*;
use rand::Rng;
use tpla::cache::{RankCache, ShardHeader};
use tpla::{DType, ErrorKind};

const SEQS: [(u32, usize); 4] = [(5, 13), (2, 8), (9, 1), (4, 0)];
const LAYERS: usize = 3;

/// Group 1 of 2, bf16, pages of 8 tokens.
fn image() -> Vec<u8> {
    Prefill::random(21, LAYERS, &SEQS)
        .export_buffers(2, DType::Bf16, 8)
        .swap_remove(1)
}

fn hostile() -> Hostile {
    Hostile {
        base: image(),
        spec: spec(DType::Bf16, 2, 1, 8, LAYERS),
        header_len: 128,
        layers: LAYERS,
        sequences: SEQS.len(),
    }
}

#[test]
fn every_metadata_byte_is_checked() {
    hostile().every_metadata_byte_is_checked();
}

#[test]
fn corrupted_rows_fail_the_data_checksum() {
    let base = image();
    let h = ShardHeader::parse(&base).unwrap();
    h.verify_data(&base).unwrap();
    for off in h.data_offset()..base.len() {
        let mut img = base.clone();
        img[off] ^= 0x10;
        // rows are not read by registration; the data checksum catches them on demand
        let parsed = ShardHeader::parse(&img).unwrap();
        let err = parsed.verify_data(&img).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CorruptFile);
        assert!(err.message().contains("data checksum"), "{err}");
    }
}

#[test]
fn truncated_and_extended_images_are_refused() {
    let hostile = hostile();
    hostile.truncations_are_refused(&[0, 1, 7, 8, 11, 12, 15, 16, 64, 127, 128], 4);
    hostile.extensions_are_refused(&[1, 63, 4096]);
    let mut other = b"GGUF\x03\x00\x00\x00".to_vec();
    other.resize(4096, 0);
    hostile.assert_refused(
        &other,
        ErrorKind::CorruptFile,
        "not a shard file",
        "another format",
    );
}

#[test]
fn hostile_fields_behind_valid_checksums_are_refused_by_name() {
    let hostile = hostile();
    let h = hostile.header();
    let lt = hostile.header_len;
    let st = hostile.seq_table();
    let seq = move |k: usize| st + 24 * k;
    let p = h.pages_per_layer() as u64;
    let stride = h.spec().page_stride() as u64;
    let cases = vec![
        // version 2 reads a sequence-shard block where version 1 has its layer table
        corrupt("version 2 on a version 1 layout", set32(8, 2), "header:"),
        corrupt("heads 0", set32(16, 0), "heads must be positive"),
        corrupt("d_c huge", set32(20, u32::MAX), "d_c = 4294967295"),
        corrupt("d_c odd", set32(20, 63), "not divisible"),
        corrupt("groups 3", set32(36, 3), "one of 1, 2, 4, 8"),
        corrupt(
            "groups 0",
            set32(36, 0),
            "group index 1 is out of range for 0",
        ),
        corrupt("group 2 of 2", set32(40, 2), "group index 2"),
        corrupt("dtype 0", set32(44, 0), "element type code 0"),
        corrupt("scale NaN", set64(48, f64::NAN.to_bits()), "softmax scale"),
        corrupt("scale -1", set64(48, (-1f64).to_bits()), "softmax scale"),
        corrupt("page size 0", set32(56, 0), "page size 0"),
        corrupt(
            "page size huge",
            set32(56, u32::MAX),
            "page size 4294967295",
        ),
        corrupt("page size 16", set32(56, 16), "page stride"),
        corrupt("layers 0", set32(60, 0), "layer count 0"),
        corrupt("layers huge", set32(60, u32::MAX), "layer count 4294967295"),
        corrupt(
            "layers + 1",
            set32(60, LAYERS as u32 + 1),
            "sequence table offset",
        ),
        corrupt("sequences huge", set32(64, u32::MAX), "data offset"),
        corrupt(
            "pages + 1, data + 3 pages",
            move |i: &mut Vec<u8>| {
                put64(i, 72, p + 1);
                put64(i, 112, (p + 1) * LAYERS as u64 * stride);
            },
            "truncated",
        ),
        corrupt("page stride 0", set64(80, 0), "page stride is 0"),
        corrupt("stride huge", set64(80, u64::MAX), "page stride"),
        corrupt(
            "layer table at 0",
            set64(88, 0),
            "layer table offset 0 overlaps",
        ),
        corrupt(
            "layer table far",
            set64(88, u64::MAX),
            "layer table offset is",
        ),
        corrupt(
            "seq table over layer table",
            set64(96, lt as u64 + 8),
            "overlaps the layer table",
        ),
        corrupt(
            "seq table far",
            set64(96, 1 << 40),
            "a gap after the layer table",
        ),
        corrupt(
            "data over tables",
            set64(104, 128),
            "overlaps the sequence table",
        ),
        corrupt("data misplaced", set64(104, 8192), "data offset is 8192"),
        corrupt("data huge", set64(104, u64::MAX - 4095), "data offset"),
        corrupt("data len 0", set64(112, 0), "data length is 0"),
        corrupt("data len huge", set64(112, u64::MAX), "data length"),
        corrupt("reserved", set32(124, 1), "reserved field"),
        corrupt(
            "layer reserved",
            set32(lt + 16 + 4, 7),
            "layer table entry 1",
        ),
        // a corrupted file, not a shard of another transform (issue 17)
        corrupt(
            "unknown transform code",
            set32(lt + 16, 9),
            "layer table entry 1: unknown transform code 9",
        ),
        corrupt(
            "seq reserved",
            set32(seq(2) + 4, 7),
            "entry 2 (id 9): reserved",
        ),
        corrupt("duplicate id", set32(seq(3), 5), "appears twice"),
        corrupt("length huge", set64(seq(0) + 8, u64::MAX), "run past"),
        corrupt(
            "length + 8",
            set64(seq(0) + 8, 21),
            "entry 1 (id 2): starts at page 2",
        ),
        corrupt(
            "length - 8",
            set64(seq(0) + 8, 5),
            "entry 1 (id 2): starts at page 2, but the sequences before it end at page 1",
        ),
        corrupt("overlapping pages", set64(seq(1) + 16, 0), "gap or overlap"),
        corrupt(
            "first page huge",
            set64(seq(0) + 16, u64::MAX),
            "entry 0 (id 5)",
        ),
        corrupt(
            "pages missing",
            move |i: &mut Vec<u8>| {
                put64(i, seq(1) + 8, 0);
                let next = get64(i, seq(1) + 16);
                put64(i, seq(2) + 16, next);
                put64(i, seq(3) + 16, next + 1);
            },
            "the sequences fill 3 pages per layer, the header says 4",
        ),
    ];
    hostile.edits_are_refused(cases);
}

#[test]
fn swapped_rank_files_are_a_mismatch() {
    let images = Prefill::random(22, 2, &SEQS).export_buffers(4, DType::F16, 8);
    for rank in 0..4 {
        for (group, image) in images.iter().enumerate() {
            let mut cache = RankCache::new(spec(DType::F16, 4, rank, 8, 2), 2).unwrap();
            let got = cache.register_buffer(image.clone());
            if group == rank {
                assert_eq!(got.unwrap().len(), SEQS.len());
            } else {
                let err = got.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Mismatch);
                let want = format!("latent group {group} of 4, this cache is group {rank}");
                assert!(err.message().contains(&want), "{err}");
            }
        }
    }
}

#[test]
fn bad_files_name_the_path_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let base = image();
    let mut cache = RankCache::new(spec(DType::Bf16, 2, 1, 8, LAYERS), 2).unwrap();
    for (name, bytes, text) in [
        ("empty.tpla", &base[..0], "truncated: 0 bytes"),
        ("short.tpla", &base[..base.len() - 100], "truncated"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = cache.register_file(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CorruptFile);
        assert!(
            err.message().contains(name) && err.message().contains(text),
            "{err}"
        );
    }
    let err = cache
        .register_file(dir.path().join("missing.tpla"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.message().contains("missing.tpla"), "{err}");
    let err = cache.register_file(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
}

/// Random mutations of valid images (bytes, fields set to edge values, truncation,
/// extension), half of them resealed so that the field checks are reached. Accepted
/// images must be fully readable; refused ones must say why. The cargo-fuzz target in
/// fuzz/ runs the same contract for as long as one likes.
#[test]
fn randomly_mutated_images_are_refused_or_fully_readable() {
    let prefill = Prefill::random(23, 2, &[(1, 9), (2, 16), (3, 0), (4, 2)]);
    let bases: Vec<Vec<u8>> = [
        (1, DType::F32, 4),
        (2, DType::Bf16, 8),
        (4, DType::F16, 3),
        (2, DType::Fp8E4m3, 5),
    ]
    .into_iter()
    .flat_map(|(g, dt, ps)| prefill.export_buffers(g, dt, ps))
    .collect();
    let mut rng = rng(24);
    let (mut accepted, mut messages) = (0, std::collections::BTreeSet::new());
    for round in 0..4000 {
        let mut img = bases[rng.random_range(0..bases.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            let len = img.len();
            match rng.random_range(0..6) {
                0 => img[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                1 => img[rng.random_range(0..128.min(len))] = rng.random(),
                2 => {
                    let off = rng.random_range(0..(len.min(4096) - 8)) & !3;
                    let v: u64 = match rng.random_range(0..4) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => rng.random_range(0..5000),
                        _ => rng.random(),
                    };
                    let width = if rng.random() { 4 } else { 8 };
                    img[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
                3 => img.truncate(rng.random_range(0..len)),
                4 => img.resize(len + rng.random_range(1..5000), rng.random()),
                _ => {
                    let off = rng.random_range(0..len);
                    img[off] = img[off].wrapping_add(1);
                }
            }
            if img.len() < 16 {
                break;
            }
        }
        if rng.random() {
            reseal(&mut img);
        }
        match ShardHeader::parse(&img) {
            Ok(h) => {
                accepted += 1;
                let cache = RankCache::new(h.spec().clone(), 0).unwrap();
                reads_back(&h, &img, cache, |_| {});
            }
            Err(e) => note_refusal(&mut messages, &e, &format!("round {round}")),
        }
    }
    assert!(
        accepted > 100,
        "only {accepted} mutated images were accepted"
    );
    assert!(messages.len() > 10, "too few distinct errors: {messages:?}");
}

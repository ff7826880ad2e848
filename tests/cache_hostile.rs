//! Corrupted, truncated and hostile shard images: every one is refused with a specific
//! error, never a crash or a read out of bounds.

mod cache_support;

use cache_support::reseal::reseal;
use cache_support::*;
use rand::Rng;
use tpla::attention::reference::gather_rows;
use tpla::cache::{RankCache, ShardHeader};
use tpla::{DType, Error, ErrorKind};

const SEQS: [(u32, usize); 4] = [(5, 13), (2, 8), (9, 1), (4, 0)];
const LAYERS: usize = 3;

/// Group 1 of 2, bf16, pages of 8 tokens.
fn image() -> Vec<u8> {
    Prefill::random(21, LAYERS, &SEQS)
        .export_buffers(2, DType::Bf16, 8)
        .swap_remove(1)
}

/// The error of a hostile image, from the parser and from registration alike.
fn refused(image: &[u8]) -> Error {
    let err = ShardHeader::parse(image).expect_err("a hostile image was accepted");
    let mut cache = RankCache::new(spec(DType::Bf16, 2, 1, 8, LAYERS), 2).unwrap();
    let reg = cache.register_buffer(image.to_vec()).unwrap_err();
    assert_eq!(err, reg);
    assert_eq!(cache.sequence_ids().count(), 0);
    err
}

fn assert_refused(image: &[u8], kind: ErrorKind, text: &str, what: &str) {
    let err = refused(image);
    assert_eq!(err.kind(), kind, "{what}: {err}");
    assert!(
        err.message().contains(text),
        "{what}: '{err}' lacks '{text}'"
    );
}

#[test]
fn every_metadata_byte_is_checked() {
    let base = image();
    let h = ShardHeader::parse(&base).unwrap();
    let tables_end = 128 + 16 * LAYERS + 24 * SEQS.len();
    assert_eq!(h.data_offset(), 4096);
    for off in 0..h.data_offset() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut img = base.clone();
            img[off] ^= mask;
            let (kind, text) = match off {
                0..=7 => (ErrorKind::CorruptFile, "magic".to_string()),
                8..=11 => (ErrorKind::Unsupported, "version".to_string()),
                12..=127 => (ErrorKind::CorruptFile, "header checksum".to_string()),
                o if o < tables_end => (ErrorKind::CorruptFile, "table checksum".to_string()),
                o => (
                    ErrorKind::CorruptFile,
                    format!("padding byte at offset {o}"),
                ),
            };
            assert_refused(&img, kind, &text, &format!("byte {off} ^ {mask:#x}"));
        }
    }
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
    let base = image();
    let h = ShardHeader::parse(&base).unwrap();
    let stride = h.spec().page_stride();
    let mut cuts = vec![0, 1, 7, 8, 11, 12, 15, 16, 64, 127, 128, 128 + 16 * LAYERS];
    let tables_end = 128 + 16 * LAYERS + 24 * SEQS.len();
    cuts.extend([
        tables_end - 1,
        tables_end,
        h.data_offset() - 1,
        h.data_offset(),
    ]);
    cuts.extend((1..LAYERS * h.pages_per_layer()).map(|p| h.data_offset() + p * stride));
    cuts.push(base.len() - 1);
    let mut rng = rng(4);
    cuts.extend((0..300).map(|_| rng.random_range(0..base.len())));
    for cut in cuts {
        assert_refused(
            &base[..cut],
            ErrorKind::CorruptFile,
            "truncated",
            &format!("cut at {cut}"),
        );
    }
    for extra in [1, 63, 4096] {
        let mut img = base.clone();
        img.resize(base.len() + extra, 0);
        assert_refused(
            &img,
            ErrorKind::CorruptFile,
            &format!("{extra} unexpected bytes"),
            "extended",
        );
    }
    let mut other = b"GGUF\x03\x00\x00\x00".to_vec();
    other.resize(4096, 0);
    assert_refused(
        &other,
        ErrorKind::CorruptFile,
        "not a shard file",
        "another format",
    );
}

fn put32(img: &mut [u8], off: usize, v: u32) {
    img[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(img: &mut [u8], off: usize, v: u64) {
    img[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get64(img: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
}

#[test]
fn hostile_fields_behind_valid_checksums_are_refused_by_name() {
    let base = image();
    let h = ShardHeader::parse(&base).unwrap();
    let (lt, st) = (128usize, 128 + 16 * LAYERS);
    let seq = move |k: usize| st + 24 * k;
    let p = h.pages_per_layer() as u64;
    let stride = h.spec().page_stride() as u64;
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, ErrorKind, &str)> = vec![
        (
            "version 3",
            Box::new(|i| put32(i, 8, 3)),
            ErrorKind::Unsupported,
            "version 3",
        ),
        // version 2 reads a sequence-shard block where version 1 has its layer table
        (
            "version 2 on a version 1 layout",
            Box::new(|i| put32(i, 8, 2)),
            ErrorKind::CorruptFile,
            "header:",
        ),
        (
            "heads 0",
            Box::new(|i| put32(i, 16, 0)),
            ErrorKind::CorruptFile,
            "heads must be positive",
        ),
        (
            "d_c huge",
            Box::new(|i| put32(i, 20, u32::MAX)),
            ErrorKind::CorruptFile,
            "d_c = 4294967295",
        ),
        (
            "d_c odd",
            Box::new(|i| put32(i, 20, 63)),
            ErrorKind::CorruptFile,
            "not divisible",
        ),
        (
            "groups 3",
            Box::new(|i| put32(i, 36, 3)),
            ErrorKind::CorruptFile,
            "one of 1, 2, 4, 8",
        ),
        (
            "groups 0",
            Box::new(|i| put32(i, 36, 0)),
            ErrorKind::CorruptFile,
            "group index 1 is out of range for 0",
        ),
        (
            "group 2 of 2",
            Box::new(|i| put32(i, 40, 2)),
            ErrorKind::CorruptFile,
            "group index 2",
        ),
        (
            "dtype 0",
            Box::new(|i| put32(i, 44, 0)),
            ErrorKind::CorruptFile,
            "element type code 0",
        ),
        (
            "scale NaN",
            Box::new(|i| put64(i, 48, f64::NAN.to_bits())),
            ErrorKind::CorruptFile,
            "softmax scale",
        ),
        (
            "scale -1",
            Box::new(|i| put64(i, 48, (-1f64).to_bits())),
            ErrorKind::CorruptFile,
            "softmax scale",
        ),
        (
            "page size 0",
            Box::new(|i| put32(i, 56, 0)),
            ErrorKind::CorruptFile,
            "page size 0",
        ),
        (
            "page size huge",
            Box::new(|i| put32(i, 56, u32::MAX)),
            ErrorKind::CorruptFile,
            "page size 4294967295",
        ),
        (
            "page size 16",
            Box::new(|i| put32(i, 56, 16)),
            ErrorKind::CorruptFile,
            "page stride",
        ),
        (
            "layers 0",
            Box::new(|i| put32(i, 60, 0)),
            ErrorKind::CorruptFile,
            "layer count 0",
        ),
        (
            "layers huge",
            Box::new(|i| put32(i, 60, u32::MAX)),
            ErrorKind::CorruptFile,
            "layer count 4294967295",
        ),
        (
            "layers + 1",
            Box::new(|i| put32(i, 60, LAYERS as u32 + 1)),
            ErrorKind::CorruptFile,
            "sequence table offset",
        ),
        (
            "sequences huge",
            Box::new(|i| put32(i, 64, u32::MAX)),
            ErrorKind::CorruptFile,
            "data offset",
        ),
        (
            "sequences + 1",
            Box::new(|i| put32(i, 64, SEQS.len() as u32 + 1)),
            ErrorKind::CorruptFile,
            "sequence",
        ),
        (
            "pages huge",
            Box::new(|i| put64(i, 72, u64::MAX)),
            ErrorKind::CorruptFile,
            "overflows",
        ),
        (
            "pages + 1",
            Box::new(move |i| put64(i, 72, p + 1)),
            ErrorKind::CorruptFile,
            "data length",
        ),
        (
            "pages + 1, data + 3 pages",
            Box::new(move |i| {
                put64(i, 72, p + 1);
                put64(i, 112, (p + 1) * LAYERS as u64 * stride);
            }),
            ErrorKind::CorruptFile,
            "truncated",
        ),
        (
            "page stride 0",
            Box::new(|i| put64(i, 80, 0)),
            ErrorKind::CorruptFile,
            "page stride is 0",
        ),
        (
            "stride huge",
            Box::new(|i| put64(i, 80, u64::MAX)),
            ErrorKind::CorruptFile,
            "page stride",
        ),
        (
            "layer table at 0",
            Box::new(|i| put64(i, 88, 0)),
            ErrorKind::CorruptFile,
            "layer table offset 0 overlaps",
        ),
        (
            "layer table far",
            Box::new(|i| put64(i, 88, u64::MAX)),
            ErrorKind::CorruptFile,
            "layer table offset is",
        ),
        (
            "seq table over layer table",
            Box::new(move |i| put64(i, 96, lt as u64 + 8)),
            ErrorKind::CorruptFile,
            "overlaps the layer table",
        ),
        (
            "seq table far",
            Box::new(|i| put64(i, 96, 1 << 40)),
            ErrorKind::CorruptFile,
            "a gap after the layer table",
        ),
        (
            "data over tables",
            Box::new(|i| put64(i, 104, 128)),
            ErrorKind::CorruptFile,
            "overlaps the sequence table",
        ),
        (
            "data misplaced",
            Box::new(|i| put64(i, 104, 8192)),
            ErrorKind::CorruptFile,
            "data offset is 8192",
        ),
        (
            "data huge",
            Box::new(|i| put64(i, 104, u64::MAX - 4095)),
            ErrorKind::CorruptFile,
            "data offset",
        ),
        (
            "data len 0",
            Box::new(|i| put64(i, 112, 0)),
            ErrorKind::CorruptFile,
            "data length is 0",
        ),
        (
            "data len huge",
            Box::new(|i| put64(i, 112, u64::MAX)),
            ErrorKind::CorruptFile,
            "data length",
        ),
        (
            "reserved",
            Box::new(|i| put32(i, 124, 1)),
            ErrorKind::CorruptFile,
            "reserved field",
        ),
        (
            "layer reserved",
            Box::new(move |i| put32(i, lt + 16 + 4, 7)),
            ErrorKind::CorruptFile,
            "layer table entry 1",
        ),
        (
            // a corrupted file, not a shard of another transform (issue 17)
            "unknown transform code",
            Box::new(move |i| put32(i, lt + 16, 9)),
            ErrorKind::CorruptFile,
            "layer table entry 1: unknown transform code 9",
        ),
        (
            "seq reserved",
            Box::new(move |i| put32(i, seq(2) + 4, 7)),
            ErrorKind::CorruptFile,
            "entry 2 (id 9): reserved",
        ),
        (
            "duplicate id",
            Box::new(move |i| put32(i, seq(3), 5)),
            ErrorKind::CorruptFile,
            "appears twice",
        ),
        (
            "length huge",
            Box::new(move |i| put64(i, seq(0) + 8, u64::MAX)),
            ErrorKind::CorruptFile,
            "run past",
        ),
        (
            "length + 8",
            Box::new(move |i| put64(i, seq(0) + 8, 21)),
            ErrorKind::CorruptFile,
            "entry 1 (id 2): starts at page 2",
        ),
        (
            "length - 8",
            Box::new(move |i| put64(i, seq(0) + 8, 5)),
            ErrorKind::CorruptFile,
            "entry 1 (id 2): starts at page 2, but the sequences before it end at page 1",
        ),
        (
            "overlapping pages",
            Box::new(move |i| put64(i, seq(1) + 16, 0)),
            ErrorKind::CorruptFile,
            "gap or overlap",
        ),
        (
            "first page huge",
            Box::new(move |i| put64(i, seq(0) + 16, u64::MAX)),
            ErrorKind::CorruptFile,
            "entry 0 (id 5)",
        ),
        (
            "pages missing",
            Box::new(move |i| {
                put64(i, seq(1) + 8, 0);
                let next = get64(i, seq(1) + 16);
                put64(i, seq(2) + 16, next);
                put64(i, seq(3) + 16, next + 1);
            }),
            ErrorKind::CorruptFile,
            "the sequences fill 3 pages per layer, the header says 4",
        ),
    ];
    for (what, edit, kind, text) in cases {
        let mut img = base.clone();
        edit(&mut img);
        reseal(&mut img);
        assert_refused(&img, kind, text, what);
    }
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
    for _ in 0..4000 {
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
                assert_eq!(h.encode(), img[..h.data_offset()], "parse is not injective");
                let mut cache = RankCache::new(h.spec().clone(), 0).unwrap();
                let ids = cache.register_buffer(img.clone()).unwrap();
                for layer in 0..h.spec().layers() {
                    let view = cache.layer(layer).unwrap();
                    for (&id, e) in ids.iter().zip(h.sequences()) {
                        let rows = gather_rows(&view, id, h.spec().slice_width()).unwrap();
                        assert_eq!(rows.len(), e.len * h.spec().row_width());
                    }
                }
            }
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::CorruptFile | ErrorKind::Unsupported),
                    "{e}"
                );
                // the kind of failure, without the numbers
                let words = e.message().split(|c: char| c.is_ascii_digit() || c == '(');
                messages.insert(words.take(2).collect::<String>());
            }
        }
    }
    assert!(
        accepted > 100,
        "only {accepted} mutated images were accepted"
    );
    assert!(messages.len() > 10, "too few distinct errors: {messages:?}");
}

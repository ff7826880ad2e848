//! Corrupted, truncated and hostile shard images of format version 2 (one sequence shard
//! of several, `ExportPlan::hybrid`): every one is refused with a specific error, never a
//! crash or a read out of bounds; the ones that open decode without NaN when their data
//! is intact. The version 1 cases are tests/cache_hostile.rs.

mod cache_support;

use cache_support::hostile::*;
use cache_support::reseal::reseal;
use cache_support::{random_values, rng, small_dims};
use rand::Rng;
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::gather_rows;
use tpla::cache::{ExportPlan, RankCache, ShardHeader, ShardSpec, ShardWriter, TransformId};
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::transform::Transform;
use tpla::{DType, ErrorKind, HybridPlan, SequenceSharding};

/// Sequences (id, tokens over all shards): with 4 shards of interleave 3, sequence 9
/// (1 token) and 4 (0 tokens) hold nothing on shard 2, sequence 2 (8 tokens) 2 tokens.
const SEQS: [(u32, usize); 4] = [(5, 40), (2, 8), (9, 1), (4, 0)];
const LAYERS: usize = 3;
const GROUPS: usize = 2;

fn sharding() -> SequenceSharding {
    SequenceSharding::new(4, 3).unwrap()
}

fn transforms(layers: usize) -> Vec<Transform> {
    (0..layers)
        .map(|l| Transform::hadamard(small_dims().d_c, 7 + l as u64).unwrap())
        .collect()
}

/// A prefill of `seqs` (normalised latent rows, as a prefill writes them) exported into
/// the `groups * sharding.shards` rank images of a hybrid deployment.
fn export(
    seed: u64,
    groups: usize,
    sharding: SequenceSharding,
    dtype: DType,
    page_size: usize,
    layers: usize,
    seqs: &[(u32, usize)],
) -> Vec<Vec<u8>> {
    let d = small_dims();
    let ids = transforms(layers).iter().map(TransformId::of).collect();
    let plan = ExportPlan::hybrid(d, groups, sharding, dtype, page_size, ids, seqs).unwrap();
    let mut images: Vec<Vec<u8>> = (0..plan.ranks())
        .map(|r| vec![0u8; plan.image_len_of(r).unwrap()])
        .collect();
    let mut w =
        ShardWriter::to_buffers(&plan, images.iter_mut().map(|b| b.as_mut_slice()).collect())
            .unwrap();
    let mut rng = rng(seed);
    while let Some((_, id)) = w.next_block() {
        let len = seqs.iter().find(|s| s.0 == id).unwrap().1;
        let mut latent = random_values(&mut rng, len * d.d_c);
        for row in latent.chunks_exact_mut(d.d_c) {
            let rms = (row.iter().map(|x| x * x).sum::<f64>() / d.d_c as f64).sqrt();
            row.iter_mut().for_each(|x| *x /= rms);
        }
        w.push(&latent, &random_values(&mut rng, len * d.d_r))
            .unwrap();
    }
    w.finish().unwrap();
    images
}

/// Rank (group 1, shard 2) of 2 latent groups x 4 sequence shards of interleave 3, bf16,
/// pages of 8 tokens.
const RANK: usize = 6;

fn image() -> Vec<u8> {
    export(31, GROUPS, sharding(), DType::Bf16, 8, LAYERS, &SEQS).swap_remove(RANK)
}

fn rank_spec(
    groups: usize,
    sharding: SequenceSharding,
    rank: usize,
    dtype: DType,
    page_size: usize,
    layers: usize,
) -> ShardSpec {
    let d = small_dims();
    let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
    let ids = transforms(layers).iter().map(TransformId::of).collect();
    ShardSpec::for_hybrid(d, &plan, dtype, page_size, ids).unwrap()
}

fn hostile() -> Hostile {
    Hostile {
        base: image(),
        spec: rank_spec(GROUPS, sharding(), RANK, DType::Bf16, 8, LAYERS),
        header_len: 144,
        layers: LAYERS,
        sequences: SEQS.len(),
    }
}

#[test]
fn the_base_image_is_a_valid_version_2_shard() {
    let base = image();
    let h = ShardHeader::parse(&base).unwrap();
    h.verify_data(&base).unwrap();
    assert_eq!(h.version(), 2);
    assert_eq!(u32::from_le_bytes(base[8..12].try_into().unwrap()), 2);
    assert_eq!(
        h.spec(),
        &rank_spec(GROUPS, sharding(), RANK, DType::Bf16, 8, LAYERS)
    );
    // shard 2 of 4, interleave 3: positions 6..9, 18..21, 30..33 of 40; 6..8 of 8
    let lens: Vec<usize> = h.sequences().iter().map(|e| e.len).collect();
    assert_eq!(lens, [9, 2, 0, 0]);
    let sh = sharding();
    for (e, &(id, n)) in h.sequences().iter().zip(&SEQS) {
        assert_eq!(e.id, id);
        assert_eq!(e.len as u64, sh.tokens_on(2, n as u64).unwrap());
    }
}

#[test]
fn every_metadata_byte_of_a_version_2_image_is_checked() {
    // the sequence-shard block (128..144) is under the header checksum
    hostile().every_metadata_byte_is_checked();
}

#[test]
fn truncated_and_extended_version_2_images_are_refused() {
    let hostile = hostile();
    hostile.truncations_are_refused(
        &[0, 1, 7, 8, 12, 16, 127, 128, 129, 136, 143, 144, 144 + 16],
        41,
    );
    // inside the sequence-shard block: the header of version 2 is named
    for cut in 128..144 {
        hostile.assert_refused(
            &hostile.base[..cut],
            ErrorKind::CorruptFile,
            "shorter than the 144-byte header of version 2",
            &format!("cut at {cut}"),
        );
    }
    hostile.extensions_are_refused(&[1, 16, 4096]);
}

#[test]
fn hostile_sequence_shard_fields_behind_valid_checksums_are_refused_by_name() {
    let hostile = hostile();
    let st = hostile.seq_table();
    let seq = move |k: usize| st + 24 * k;
    let cases = vec![
        corrupt(
            "s = 0",
            set32(128, 0),
            "sequence shards must lie in 1..=64, got 0",
        ),
        corrupt("s = 65", set32(128, 65), "got 65"),
        corrupt("s huge", set32(128, u32::MAX), "got 4294967295"),
        corrupt(
            "s = 1 in version 2",
            set32(128, 1),
            "its sequence shard count is 1",
        ),
        corrupt(
            "shard = s",
            set32(132, 4),
            "sequence shard 4 is out of range for 4",
        ),
        corrupt(
            "shard past a smaller s",
            set32(128, 2),
            "sequence shard 2 is out of range for 2",
        ),
        corrupt(
            "shard huge",
            set32(132, u32::MAX),
            "sequence shard 4294967295 is out of range for 4",
        ),
        corrupt(
            "interleave 0",
            set32(136, 0),
            "the interleave must lie in 1..=1048576 tokens, got 0",
        ),
        corrupt(
            "interleave 2^20 + 1",
            set32(136, (1 << 20) + 1),
            "got 1048577",
        ),
        corrupt("interleave huge", set32(136, u32::MAX), "got 4294967295"),
        corrupt(
            "block reserved",
            set32(140, 1),
            "sequence-shard reserved field is 0x1",
        ),
        // the fields of version 2 inside a version 1 header: its layer table would
        // start where the block is
        corrupt(
            "version 1 on a version 2 layout",
            set32(8, 1),
            "layer table offset is 144, expected 128: a gap after the header",
        ),
        corrupt(
            "version 1 on a version 2 layout, tables moved back",
            |i: &mut Vec<u8>| {
                put32(i, 8, 1);
                put64(i, 88, 128);
            },
            "sequence table offset",
        ),
        corrupt(
            "layer table over the block",
            set64(88, 136),
            "layer table offset 136 overlaps the header (expected 144)",
        ),
        // row counts that do not fit the shard's pages
        corrupt(
            "rows + page",
            set64(seq(0) + 8, 9 + 8),
            "entry 1 (id 2): starts at page 2, but the sequences before it end at page 3",
        ),
        corrupt(
            "no rows for a sequence holding a page",
            set64(seq(1) + 8, 0),
            "entry 2 (id 9): starts at page 3, but the sequences before it end at page 2",
        ),
        corrupt(
            "rows of the last sequence",
            set64(seq(3) + 8, 1),
            "entry 3 (id 4): 1 tokens run past the 3 pages of a layer",
        ),
        corrupt("rows huge", set64(seq(0) + 8, u64::MAX), "run past"),
        corrupt("rows 2^63", set64(seq(1) + 8, 1 << 63), "run past"),
        corrupt(
            "rows 0 of a sequence holding a page",
            move |i: &mut Vec<u8>| {
                put64(i, seq(1) + 8, 0);
                let next = get64(i, seq(1) + 16);
                put64(i, seq(2) + 16, next);
                put64(i, seq(3) + 16, next);
            },
            "the sequences fill 2 pages per layer, the header says 3",
        ),
    ];
    hostile.edits_are_refused(cases);
}

#[test]
fn a_version_1_image_claiming_version_2_is_corrupt() {
    // a version 1 file of the same rows: bytes 128..144 are its first layer entry
    let d = small_dims();
    let ids = transforms(LAYERS).iter().map(TransformId::of).collect();
    let plan = ExportPlan::new(d, GROUPS, DType::Bf16, 8, ids, &SEQS).unwrap();
    let mut v1 = vec![0u8; plan.image_len()];
    let mut other = vec![0u8; plan.image_len()];
    let mut w = ShardWriter::to_buffers(&plan, vec![&mut v1[..], &mut other[..]]).unwrap();
    let mut rng = rng(2);
    while let Some((_, id)) = w.next_block() {
        let len = SEQS.iter().find(|s| s.0 == id).unwrap().1;
        w.push(
            &random_values(&mut rng, len * d.d_c),
            &random_values(&mut rng, len * d.d_r),
        )
        .unwrap();
    }
    w.finish().unwrap();
    assert_eq!(ShardHeader::parse(&v1).unwrap().version(), 1);
    for (what, edit) in [
        (
            "version 2",
            Box::new(|_: &mut Vec<u8>| {}) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        // a block that would parse (2 shards, shard 0, interleave 1) over the layer table
        (
            "version 2 with a plausible block",
            Box::new(|i: &mut Vec<u8>| {
                put32(i, 128, 2);
                put32(i, 132, 0);
                put32(i, 136, 1);
                put32(i, 140, 0);
            }),
        ),
    ] {
        let mut img = v1.clone();
        put32(&mut img, 8, 2);
        edit(&mut img);
        reseal(&mut img);
        let e = ShardHeader::parse(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "{what}: {e}");
        assert!(e.message().starts_with("header:"), "{what}: {e}");
    }
}

/// A decoding context of rank `rank` of `groups x sharding` for images of `layers` layers
/// (random absorbed weights, the export's transforms).
fn context(groups: usize, sharding: SequenceSharding, rank: usize, layers: usize) -> RankContext {
    let d = small_dims();
    let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap().latent;
    let mut ctx = RankContext::new(d, plan, layers, Box::new(CpuBackend::new(1).unwrap())).unwrap();
    let mut rng = rng(100 + rank as u64);
    let w = plan.slice_width;
    for (l, t) in transforms(layers).into_iter().enumerate() {
        let mut f = |n| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.5f32..0.5)).collect() };
        let layer = RankLayer::from_f32(
            f(plan.heads * w * d.d_n),
            f(plan.heads * w * d.d_v),
            1.0,
            t,
            1.0 / groups as f64,
        )
        .unwrap();
        ctx.install(l, layer).unwrap();
    }
    ctx
}

/// Decodes every sequence of `ids` in every layer of `cache`: outputs and log-sum-exps
/// start as NaN. Returns whether every output is a number (an entry without tokens on
/// the shard: zeros and -inf).
fn decode_is_clean(ctx: &mut RankContext, cache: &RankCache, ids: &[u32]) -> tpla::Result<bool> {
    let d = *ctx.dims();
    let (h, w) = (ctx.plan().heads, ctx.plan().slice_width);
    let mut rng = rng(7);
    let q: Vec<f32> = (0..ids.len() * h * (w + d.d_r))
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut clean = true;
    for layer in 0..ctx.layer_count() {
        let mut out = vec![f32::NAN; ids.len() * h * d.d_v];
        let mut lse = vec![f32::NAN; ids.len() * h];
        let outputs = Outputs::HeadsAndLse {
            out: &mut out,
            lse: &mut lse,
        };
        ctx.decode_sequence_shard(cache, layer, ids, Queries::Joined(&q), outputs, None)?;
        clean &= out.iter().all(|x| x.is_finite());
        for (b, &id) in ids.iter().enumerate() {
            let empty = cache.seq_len(id, layer)? == 0;
            clean &= lse[b * h..(b + 1) * h].iter().all(|&l| {
                if empty {
                    l == f32::NEG_INFINITY
                } else {
                    l.is_finite()
                }
            });
        }
    }
    Ok(clean)
}

/// Random flips and edits over valid version 2 images, in a deterministic loop, half of
/// them resealed so that the field checks are reached. Every outcome is a clean error,
/// or an image that registers, reads back every row it claims, takes the next token of
/// each sequence at its next position, and (for the rank it was cut for, with its data
/// intact) decodes without NaN.
#[test]
fn randomly_flipped_version_2_images_are_refused_or_decode_cleanly() {
    let seqs = [(1u32, 9usize), (2, 16), (3, 0), (4, 2), (7, 1)];
    let mut bases = Vec::new();
    for (groups, shards, interleave, dtype, ps) in [
        (1, 2, 1, DType::F32, 4),
        (2, 2, 3, DType::Bf16, 8),
        (1, 4, 2, DType::F16, 3),
        (2, 4, 1, DType::Fp8E4m3, 5),
        (1, 8, 1, DType::Bf16, 2),
    ] {
        let sh = SequenceSharding::new(shards, interleave).unwrap();
        for (rank, img) in export(5, groups, sh, dtype, ps, 2, &seqs)
            .into_iter()
            .enumerate()
        {
            let spec = rank_spec(groups, sh, rank, dtype, ps, 2);
            let ctx = context(groups, sh, rank, 2);
            bases.push((img, spec, ctx));
        }
    }
    let mut rng = rng(43);
    let (mut accepted, mut decoded, mut data_damaged) = (0, 0, 0);
    let mut messages = std::collections::BTreeSet::new();
    for round in 0..10_000 {
        let k = rng.random_range(0..bases.len());
        let mut img = bases[k].0.clone();
        let data_offset = ShardHeader::parse(&img).unwrap().data_offset();
        for _ in 0..rng.random_range(1..4) {
            let len = img.len();
            match rng.random_range(0..7) {
                // a bit anywhere, mostly in the metadata
                0 => img[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                1 | 2 => {
                    img[rng.random_range(0..data_offset.min(len))] ^= 1 << rng.random_range(0..8)
                }
                // the sequence-shard block or the header set to an edge value
                3 => {
                    let off = if rng.random() {
                        128 + 4 * rng.random_range(0..4)
                    } else {
                        16 + 4 * rng.random_range(0..28)
                    };
                    let v: u32 = match rng.random_range(0..5) {
                        0 => 0,
                        1 => u32::MAX,
                        2 => 1,
                        3 => rng.random_range(0..70),
                        _ => rng.random(),
                    };
                    put32(&mut img, off, v);
                }
                // a sequence's row count
                4 => {
                    let st = 144 + 16 * 2;
                    let e = st + 24 * rng.random_range(0..seqs.len()) + 8;
                    if e + 8 > len {
                        continue;
                    }
                    let v = get64(&img, e);
                    let v = match rng.random_range(0..3) {
                        0 => v.wrapping_add(1),
                        1 => v.wrapping_sub(1),
                        _ => rng.random_range(0..40),
                    };
                    put64(&mut img, e, v);
                }
                5 => img.truncate(rng.random_range(0..len)),
                _ => img.resize(len + rng.random_range(1..100), rng.random()),
            }
            if img.len() < 144 {
                break;
            }
        }
        if rng.random() {
            reseal(&mut img);
        }
        let h = match ShardHeader::parse(&img) {
            Ok(h) => h,
            Err(e) => {
                note_refusal(&mut messages, &e, &format!("round {round}"));
                continue;
            }
        };
        accepted += 1;
        let intact = h.verify_data(&img).is_ok();
        let spec = h.spec().clone();
        // (a pool too large for memory: the image's own pages only)
        let cache = RankCache::new(spec.clone(), 8)
            .or_else(|_| RankCache::new(spec.clone(), 0))
            .unwrap();
        let own_rank = spec == bases[k].1;
        let (mut cache, ids) = reads_back(&h, &img, cache, |rows| {
            if intact && own_rank {
                assert!(rows.iter().all(|x| x.is_finite()), "round {round}");
            }
        });
        // the next token of each sequence goes to its next position on this shard, and
        // nowhere else
        let (sh, j) = (spec.sequence_sharding(), spec.sequence_shard());
        let row = vec![0.25; spec.row_width()];
        for &id in &ids {
            let len = cache.seq_len(id, 0).unwrap() as u64;
            let next = sh.position_of(j, len);
            if sh.shards > 1 {
                let e = cache.append_rows_at(id, 0, next + 1, &row);
                assert!(e.is_err(), "round {round}: a gap was accepted");
            }
            match cache.append_rows_at(id, 0, next, &row) {
                Ok(()) => assert_eq!(cache.seq_len(id, 0).unwrap() as u64, len + 1),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::OutOfCapacity, "round {round}: {e}");
                    assert_eq!(cache.seq_len(id, 0).unwrap() as u64, len);
                }
            }
        }
        if spec == bases[k].1 {
            let clean = decode_is_clean(&mut bases[k].2, &cache, &ids);
            // a decode of an accepted image for its own rank works; with intact data it
            // is free of NaN (rows past a sequence's end read as zero, the appended row
            // is finite)
            let clean = clean.unwrap_or_else(|e| panic!("round {round}: {e}"));
            if intact {
                assert!(clean, "round {round}: NaN from an intact image");
                decoded += 1;
            } else {
                data_damaged += 1;
            }
        }
    }
    assert!(
        accepted > 300,
        "only {accepted} mutated images were accepted"
    );
    eprintln!("{accepted} accepted, {decoded} decoded clean, {data_damaged} with damaged data");
    assert!(
        decoded > 100,
        "only {decoded} accepted images decoded clean"
    );
    assert!(messages.len() > 10, "too few distinct errors: {messages:?}");
}

/// A version 2 file whose row count for a sequence is not the shard's share of the
/// deployment's length (undetectable alone: every count is some length's share) opens,
/// and the first append by position shows the disagreement without losing a row.
#[test]
fn row_counts_another_length_would_give_are_caught_by_the_next_append() {
    let sh = sharding();
    let base = image();
    let st = 144 + 16 * LAYERS;
    // sequence 2 has 8 tokens: shard 2 holds positions 6 and 7 (2 rows); 1 row is the
    // share of a 7-token sequence, in the same page
    let mut img = base.clone();
    put64(&mut img, st + 24 + 8, 1);
    reseal(&mut img);
    let spec = rank_spec(GROUPS, sh, RANK, DType::Bf16, 8, LAYERS);
    let mut cache = RankCache::new(spec.clone(), 4).unwrap();
    cache.register_buffer(img).unwrap();
    assert_eq!(cache.seq_len(2, 0).unwrap(), 1);
    // position 8 is shard 2's next token of the 8-token sequence: its 3rd row
    assert_eq!(sh.owner(8), 2);
    assert_eq!(sh.position_of(2, 2), 8);
    let row = vec![0.5; spec.row_width()];
    let e = cache.append_rows_at(2, 0, 8, &row).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.message()
            .contains("the next token this cache holds is at position 7, not 8"),
        "{e}"
    );
    assert_eq!(cache.seq_len(2, 0).unwrap(), 1, "nothing was appended");
    // the row it holds is the first of the intact file's
    let mut intact = RankCache::new(spec.clone(), 4).unwrap();
    intact.register_buffer(base).unwrap();
    let w = spec.slice_width();
    for layer in 0..LAYERS {
        let a = gather_rows(&cache.layer(layer).unwrap(), 2, w).unwrap();
        let b = gather_rows(&intact.layer(layer).unwrap(), 2, w).unwrap();
        assert_eq!(a, b[..a.len()]);
    }
    // and the intact file takes position 8
    intact.append_rows_at(2, 0, 8, &row).unwrap();
    assert_eq!(intact.seq_len(2, 0).unwrap(), 3);
}

//! Sequence-sharded and hybrid (latent groups x sequence shards) decode end to end on the
//! CPU backend: each rank caches only the tokens the owner rule gives it (prefill rows
//! and decode-time appends), decodes them, and the merges of `combine::sequence` give
//! exact MLA (one latent group) or TPLA over the whole sequence (several groups).

mod attention_support;

use attention_support::{f32s, mu, reference_decode, sequences, Prefill};
use std::path::{Path, PathBuf};
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::{rel_l2, rotated_latents, slice_rows};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::combine::sequence::{merge_by_lse_in_process, merge_packed_in_process};
use tpla::convert::{FoldedLayer, RankWeights};
use tpla::decode::{LogitBounds, Outputs, Queries, RankContext, RankLayer};
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::transform::Transform;
use tpla::{DType, ErrorKind, HybridPlan, ModelDims, SequenceSharding};

/// Tokens each sequence gets after its prefill, through the owning rank's context.
const APPENDED: usize = 3;

fn dims() -> ModelDims {
    ModelDims::new(8, 128, 32, 32, 24, 0.15).unwrap()
}

struct Deployment {
    ranks: Vec<(RankContext, RankCache, RankWeights)>,
    layer: SyntheticLayer,
    transform: Transform,
    seqs: Vec<(Tokens, Query)>,
}

/// Every rank of `groups x sharding` over sequences of `lens` tokens: the prefill's
/// rows are cut by latent group and by owner, the last tokens are appended by the rank
/// that owns their position.
/// The CPU context of `plan`'s rank with its weights, layer 0 set.
fn rank_context(
    folded: &FoldedLayer,
    transform: &Transform,
    plan: &HybridPlan,
    groups: usize,
) -> (RankContext, RankWeights) {
    let d = dims();
    // mu differs per latent group (one logit scale per slice), not per shard
    let weights = folded
        .rank(&plan.latent, mu(groups, plan.latent.group))
        .unwrap();
    let rl = RankLayer::new(&weights, transform.clone(), 1.0 / groups as f64).unwrap();
    let mut ctx =
        RankContext::new(d, plan.latent, 1, Box::new(CpuBackend::new(1).unwrap())).unwrap();
    ctx.set_layer(0, &weights, rl).unwrap();
    (ctx, weights)
}

fn deploy(groups: usize, sharding: SequenceSharding, lens: &[usize]) -> Deployment {
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 91).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let folded = FoldedLayer::new(&layer.weights, &transform).unwrap();
    let seqs = sequences(&layer, lens, 500);
    let ranks = (0..groups * sharding.shards)
        .map(|rank| {
            let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
            let (ctx, weights) = rank_context(&folded, &transform, &plan, groups);
            let ids = ctx.transform_ids().unwrap();
            let spec = ShardSpec::new(d, &plan.latent, DType::F32, 8, ids).unwrap();
            let mut cache = RankCache::new(spec, 256).unwrap();
            for (s, (tokens, _)) in seqs.iter().enumerate() {
                let n = tokens.len();
                let prefill = n.saturating_sub(APPENDED);
                cache.add_sequence(s as u32).unwrap();
                let all = slice_rows(
                    &rotated_latents(&tokens.latents, &transform),
                    &tokens.k_rope,
                    &plan.latent,
                    d.d_c,
                );
                let rw = plan.latent.row_width(&d);
                let mine: Vec<f64> = (0..prefill)
                    .filter(|&t| plan.holds(t as u64))
                    .flat_map(|t| all[t * rw..(t + 1) * rw].iter().copied())
                    .collect();
                if !mine.is_empty() {
                    cache.append_rows(s as u32, 0, &mine).unwrap();
                }
                for t in prefill..n {
                    if plan.owner_rank(plan.latent.group, t as u64).unwrap() != rank {
                        continue;
                    }
                    let a: Vec<f32> = f32s(tokens.latent(t));
                    let kr: Vec<f32> = f32s(tokens.key_rope(t));
                    ctx.append_token(&mut cache, s as u32, 0, &a, &kr, true)
                        .unwrap();
                }
                let held = cache.seq_len(s as u32, 0).unwrap() as u64;
                assert_eq!(held, sharding.tokens_on(plan.shard, n as u64).unwrap());
            }
            (ctx, cache, weights)
        })
        .collect();
    Deployment {
        ranks,
        layer,
        transform,
        seqs,
    }
}

#[derive(Clone, Copy, Debug)]
enum Merge {
    GatheredLse,
    Packed,
}

/// Decodes every rank, merges, checks every rank ends with the same output, and returns
/// the worst relative L2 error against exact MLA (`groups == 1`) or unsharded TPLA.
fn merged_error(dep: &mut Deployment, groups: usize, shards: usize, merge: Merge) -> f64 {
    let d = dims();
    let ids: Vec<u32> = (0..dep.seqs.len() as u32).collect();
    let q_nope: Vec<f32> = dep.seqs.iter().flat_map(|(_, q)| f32s(&q.q_nope)).collect();
    let q_rope: Vec<f32> = dep.seqs.iter().flat_map(|(_, q)| f32s(&q.q_rope)).collect();
    let rope_key_norm = dep
        .seqs
        .iter()
        .flat_map(|(t, _)| t.k_rope.chunks_exact(d.d_r))
        .map(|k| k.iter().map(|x| x * x).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    let rows = ids.len() * d.heads;
    let mut outs = vec![vec![f32::NAN; rows * d.d_v]; dep.ranks.len()];
    let mut lses = vec![vec![f32::NAN; rows]; dep.ranks.len()];
    let mut bounds = vec![vec![f64::NAN; rows]; dep.ranks.len()];
    for (r, (ctx, cache, _)) in dep.ranks.iter_mut().enumerate() {
        let q = Queries::Nope {
            q_nope: &q_nope,
            q_rope: &q_rope,
        };
        let out = Outputs::HeadsAndLse {
            out: &mut outs[r],
            lse: &mut lses[r],
        };
        let b = LogitBounds {
            rope_key_norm,
            out: &mut bounds[r],
        };
        ctx.decode_sequence_shard(cache, 0, &ids, q, out, Some(b))
            .unwrap();
    }
    // the shards of a group compute the same bounds without communicating, and they
    // bound every logit, so every shard's log-sum-exp lies below them up to ln(len)
    for (r, b) in bounds.iter().enumerate() {
        assert_eq!(b, &bounds[r / shards * shards], "rank {r}");
        for (l, m) in lses[r].iter().zip(b) {
            assert!((*l as f64) < m + 10.0, "rank {r}: lse {l} bound {m}");
        }
    }
    let lse_views: Vec<&[f32]> = lses.iter().map(|l| l.as_slice()).collect();
    let mut out_views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    match merge {
        Merge::GatheredLse => {
            merge_by_lse_in_process(shards, d.d_v, &mut out_views, &lse_views).unwrap()
        }
        Merge::Packed => {
            let bound_views: Vec<&[f64]> = bounds.iter().map(|b| b.as_slice()).collect();
            merge_packed_in_process(shards, d.d_v, &mut out_views, &lse_views, &bound_views)
                .unwrap()
        }
    }
    for o in &outs[1..] {
        assert_eq!(o, &outs[0], "every rank holds the same merged output");
    }
    let group_weights: Vec<RankWeights> = (0..groups)
        .map(|i| dep.ranks[i * shards].2.clone())
        .collect();
    let stride = d.heads * d.d_v;
    let mut worst: f64 = 0.0;
    for (b, (tokens, q)) in dep.seqs.iter().enumerate() {
        let want = reference_decode(&d, &dep.layer, &group_weights, &dep.transform, tokens, q);
        let got: Vec<f64> = outs[0][b * stride..(b + 1) * stride]
            .iter()
            .map(|&x| x as f64)
            .collect();
        worst = worst.max(rel_l2(&got, &want));
    }
    worst
}

/// Lengths that divide by no shard count or interleave, and ones shorter than both.
const LENS: [usize; 6] = [1, 2, 3, 7, 61, 130];

#[test]
fn one_latent_group_over_sequence_shards_is_exact_mla() {
    for (shards, interleave) in [(1, 1), (2, 1), (3, 1), (2, 4), (4, 16), (8, 2)] {
        let sharding = SequenceSharding::new(shards, interleave).unwrap();
        let mut dep = deploy(1, sharding, &LENS);
        for merge in [Merge::GatheredLse, Merge::Packed] {
            let e = merged_error(&mut dep, 1, shards, merge);
            assert!(
                e < 1e-5,
                "s={shards} interleave={interleave} {merge:?}: {e}"
            );
        }
    }
}

#[test]
fn hybrid_latent_groups_times_sequence_shards_is_tpla_of_the_groups() {
    for (groups, shards, interleave) in [(2, 1, 1), (2, 2, 1), (2, 4, 4), (4, 2, 3), (8, 1, 1)] {
        let sharding = SequenceSharding::new(shards, interleave).unwrap();
        let mut dep = deploy(groups, sharding, &LENS);
        for merge in [Merge::GatheredLse, Merge::Packed] {
            let e = merged_error(&mut dep, groups, shards, merge);
            assert!(
                e < 1e-5,
                "g={groups} s={shards} interleave={interleave} {merge:?}: {e}"
            );
        }
    }
}

#[test]
fn a_shard_decode_without_log_sum_exps_is_refused() {
    let d = dims();
    let mut dep = deploy(1, SequenceSharding::new(2, 1).unwrap(), &[5]);
    let (ctx, cache, _) = &mut dep.ranks[0];
    let q = vec![0.0f32; d.heads * (d.d_c + d.d_r)];
    let mut out = vec![0.0f32; d.heads * d.d_v];
    let e = ctx
        .decode_sequence_shard(
            cache,
            0,
            &[0],
            Queries::Joined(&q),
            Outputs::Heads(&mut out),
            None,
        )
        .unwrap_err();
    assert!(e.message().contains("log-sum-exps"), "{e}");
    let mut lse = vec![0.0f32; d.heads];
    let mut short = vec![0.0f64; 1];
    let bounds = LogitBounds {
        rope_key_norm: 1.0,
        out: &mut short,
    };
    let outputs = Outputs::HeadsAndLse {
        out: &mut out,
        lse: &mut lse,
    };
    let e = ctx
        .decode_sequence_shard(cache, 0, &[0], Queries::Joined(&q), outputs, Some(bounds))
        .unwrap_err();
    assert!(e.message().contains("logit bounds"), "{e}");
}

// ---- shard files of sequence shards ---------------------------------------------------------

/// The (g, s) deployments of the cost table (issue 15), with interleaves that divide
/// none of the lengths.
const TABLE: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (2, 1, 1),
    (1, 2, 1),
    (4, 1, 1),
    (2, 2, 3),
    (1, 4, 4),
    (8, 1, 1),
    (4, 2, 16),
    (2, 4, 1),
    (1, 8, 2),
];

/// A prefill of every sequence but its last [`APPENDED`] tokens, exported into the
/// `g * s` rank files of `groups x sharding` under `dir`.
fn export_prefill(
    groups: usize,
    sharding: SequenceSharding,
    dtype: DType,
    seqs: &[(Tokens, Query)],
    transform: &Transform,
    dir: &Path,
) -> Vec<PathBuf> {
    Prefill {
        dims: dims(),
        seqs,
        transform,
        appended: APPENDED,
        dtype,
        page_size: 8,
    }
    .export(groups, sharding, dir)
}

/// Every rank of `groups x sharding`: its cache registers its rank file of the prefill,
/// then each decode-time token is appended, by position, on the rank that owns it.
fn deploy_from_files(
    groups: usize,
    sharding: SequenceSharding,
    dtype: DType,
    lens: &[usize],
    dir: &Path,
) -> Deployment {
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 91).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let folded = FoldedLayer::new(&layer.weights, &transform).unwrap();
    let seqs = sequences(&layer, lens, 500);
    let paths = export_prefill(groups, sharding, dtype, &seqs, &transform, dir);
    let ranks = (0..groups * sharding.shards)
        .map(|rank| {
            let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
            let (ctx, weights) = rank_context(&folded, &transform, &plan, groups);
            let spec =
                ShardSpec::for_hybrid(d, &plan, dtype, 8, ctx.transform_ids().unwrap()).unwrap();
            let mut cache = RankCache::new(spec, 256).unwrap();
            let mut ids = cache.register_file(&paths[rank]).unwrap();
            ids.sort();
            assert_eq!(ids, (0..seqs.len() as u32).collect::<Vec<_>>());
            for (s, (tokens, _)) in seqs.iter().enumerate() {
                let n = tokens.len();
                for t in n.saturating_sub(APPENDED)..n {
                    if plan.owner_rank(plan.latent.group, t as u64).unwrap() != rank {
                        continue;
                    }
                    let a: Vec<f32> = f32s(tokens.latent(t));
                    let kr: Vec<f32> = f32s(tokens.key_rope(t));
                    ctx.append_token_at(&mut cache, s as u32, 0, t as u64, &a, &kr, true)
                        .unwrap();
                }
                let held = cache.seq_len(s as u32, 0).unwrap() as u64;
                assert_eq!(held, sharding.tokens_on(plan.shard, n as u64).unwrap());
            }
            (ctx, cache, weights)
        })
        .collect();
    Deployment {
        ranks,
        layer,
        transform,
        seqs,
    }
}

#[test]
fn a_prefill_exported_into_every_rank_file_decodes_and_merges_to_the_unsharded_decode() {
    let dir = tempfile::tempdir().unwrap();
    // f32: rounding only; bf16: the bound of bf16 caches against the f64 reference
    for (dtype, bound) in [(DType::F32, 1e-5), (DType::Bf16, 2e-2)] {
        for (groups, shards, interleave) in TABLE {
            let sharding = SequenceSharding::new(shards, interleave).unwrap();
            let mut dep = deploy_from_files(groups, sharding, dtype, &LENS, dir.path());
            for merge in [Merge::GatheredLse, Merge::Packed] {
                let e = merged_error(&mut dep, groups, shards, merge);
                assert!(
                    e < bound,
                    "{} g={groups} s={shards} interleave={interleave} {merge:?}: {e}",
                    dtype.name()
                );
            }
        }
    }
}

/// One rank's cache of `groups x sharding` (a bf16 cache of one layer).
fn rank_cache(groups: usize, sharding: SequenceSharding, rank: usize) -> RankCache {
    let d = dims();
    let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let spec =
        ShardSpec::for_hybrid(d, &plan, DType::F32, 8, vec![TransformId::of(&transform)]).unwrap();
    RankCache::new(spec, 64).unwrap()
}

#[test]
fn registration_refuses_the_file_of_another_sequence_shard_or_sharding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 91).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let seqs: Vec<(Tokens, Query)> = [9usize, 20]
        .iter()
        .map(|&n| {
            let s = layer.sequence(n, 7);
            let q = layer.query_at(&s, n - 1);
            (s.tokens, q)
        })
        .collect();
    let two = SequenceSharding::new(2, 3).unwrap();
    let files = export_prefill(2, two, DType::F32, &seqs, &transform, dir.path());
    // rank r = group * 2 + shard
    for (file, rank, want) in [
        (
            1,
            0,
            "sequence shard 1 of 2, this cache is sequence shard 0",
        ),
        (
            0,
            1,
            "sequence shard 0 of 2, this cache is sequence shard 1",
        ),
        (2, 1, "latent group 1 of 2, this cache is group 0"),
    ] {
        let mut cache = rank_cache(2, two, rank);
        let e = cache.register_file(&files[file]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        assert!(e.message().contains(want), "file {file} rank {rank}: {e}");
        assert_eq!(cache.sequence_ids().count(), 0);
    }
    // the right rank takes it
    rank_cache(2, two, 1).register_file(&files[1]).unwrap();
    for other in [
        SequenceSharding::new(2, 1).unwrap(),
        SequenceSharding::new(4, 3).unwrap(),
        SequenceSharding::NONE,
    ] {
        let mut cache = rank_cache(2, other, 0);
        let e = cache.register_file(&files[0]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        assert!(
            e.message()
                .contains("cut for 2 sequence shards of interleave 3"),
            "{e}"
        );
    }
    // a file of every token into a sequence shard's cache
    let whole = export_prefill(
        2,
        SequenceSharding::NONE,
        DType::F32,
        &seqs,
        &transform,
        dir.path(),
    );
    let e = rank_cache(2, two, 0).register_file(&whole[0]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert!(e.message().contains("cut for 1 sequence shards"), "{e}");
    // versions: 1 without sequence sharding (the bytes of before), 2 with it
    let version =
        |p: &Path| u32::from_le_bytes(std::fs::read(p).unwrap()[8..12].try_into().unwrap());
    assert_eq!(version(&whole[0]), 1);
    assert_eq!(version(&files[0]), 2);
}

fn put32(img: &mut [u8], off: usize, v: u32) {
    img[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes a version 2 image's header checksum (bytes 16..144).
fn reseal_header(img: &mut [u8]) {
    let crc = crc32c::crc32c(&img[16..144]);
    img[12..16].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn hostile_sequence_shard_headers_are_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 91).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let s = layer.sequence(11, 7);
    let q = layer.query_at(&s, 10);
    let seqs = vec![(s.tokens, q)];
    let four = SequenceSharding::new(4, 2).unwrap();
    let files = export_prefill(1, four, DType::F32, &seqs, &transform, dir.path());
    let good = std::fs::read(&files[2]).unwrap();
    let header = tpla::cache::ShardHeader::parse(&good).unwrap();
    assert_eq!(header.version(), 2);
    assert_eq!(
        (
            header.spec().sequence_sharding(),
            header.spec().sequence_shard()
        ),
        (four, 2)
    );
    // shards at 128, shard at 132, interleave at 136, reserved at 140
    let cases: [(usize, u32, &str); 8] = [
        (128, 0, "sequence shards must lie in 1..=64"),
        (128, 65, "sequence shards must lie in 1..=64"),
        (128, 1, "its sequence shard count is 1"),
        (132, 4, "sequence shard 4 is out of range for 4"),
        (132, u32::MAX, "out of range for 4"),
        (136, 0, "the interleave must lie in"),
        (136, (1 << 20) + 1, "the interleave must lie in"),
        (140, 1, "sequence-shard reserved field"),
    ];
    for (off, v, want) in cases {
        let mut img = good.clone();
        put32(&mut img, off, v);
        reseal_header(&mut img);
        let e = tpla::cache::ShardHeader::parse(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptFile, "{off} {v}: {e}");
        assert!(e.message().contains(want), "{off} {v}: {e}");
        // and without the reseal, the checksum catches it first
        let mut img = good.clone();
        put32(&mut img, off, v);
        let e = tpla::cache::ShardHeader::parse(&img).unwrap_err();
        assert!(e.message().contains("header checksum"), "{e}");
    }
    // a version 2 image cut inside its sequence-shard block
    let e = tpla::cache::ShardHeader::parse(&good[..140]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptFile, "{e}");
    assert!(e.message().contains("144-byte header"), "{e}");
    // an unknown version is still unsupported
    let mut img = good.clone();
    put32(&mut img, 8, 3);
    let e = tpla::cache::ShardHeader::parse(&img).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[test]
fn appends_on_a_sequence_shard_go_by_position_to_the_owner_only() {
    let d = dims();
    let dir = tempfile::tempdir().unwrap();
    let sharding = SequenceSharding::new(2, 4).unwrap();
    // a prefill of 10 - 3 = 7 tokens: shard 0 holds 0..4, shard 1 holds 4..7
    let mut dep = deploy_from_files(1, sharding, DType::F32, &[10], dir.path());
    // positions 7 (shard 1), 8, 9 (shard 0) were appended by their owners
    assert_eq!(dep.ranks[0].1.seq_len(0, 0).unwrap(), 6);
    assert_eq!(dep.ranks[1].1.seq_len(0, 0).unwrap(), 4);
    let a = vec![0.5f32; d.d_c];
    let kr = vec![0.25f32; d.d_r];
    let (ctx0, cache0, _) = &mut dep.ranks[0];
    // position 12 is on shard 1; 10 is shard 0's, but its next is 10: 11 is a gap
    let e = ctx0
        .append_token_at(cache0, 0, 0, 12, &a, &kr, true)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert!(
        e.message()
            .contains("position 12 belongs to sequence shard 1 of 2"),
        "{e}"
    );
    let e = ctx0
        .append_token_at(cache0, 0, 0, 11, &a, &kr, true)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.message()
            .contains("next token this cache holds is at position 10"),
        "{e}"
    );
    // a token appended twice
    let e = ctx0
        .append_token_at(cache0, 0, 0, 9, &a, &kr, true)
        .unwrap_err();
    assert!(e.message().contains("not 9"), "{e}");
    // appends without a position are refused on a sequence shard
    let e = ctx0.append_token(cache0, 0, 0, &a, &kr, true).unwrap_err();
    assert!(e.message().contains("append by position"), "{e}");
    assert_eq!(cache0.seq_len(0, 0).unwrap(), 6, "nothing was appended");
    ctx0.append_token_at(cache0, 0, 0, 10, &a, &kr, true)
        .unwrap();
    // a plain decode of a sequence shard would be a partial output without its weight
    let q = vec![0.0f32; d.heads * (d.d_c + d.d_r)];
    let mut out = vec![0.0f32; d.heads * d.d_v];
    let e = ctx0
        .decode(
            cache0,
            0,
            &[0],
            Queries::Joined(&q),
            Outputs::Heads(&mut out),
        )
        .unwrap_err();
    assert!(e.message().contains("decode_sequence_shard"), "{e}");
    // without sequence sharding, the position of an append is the sequence's length
    let mut whole = rank_cache(1, SequenceSharding::NONE, 0);
    whole.add_sequence(5).unwrap();
    let row = vec![0.0f64; d.d_c + d.d_r];
    whole.append_rows_at(5, 0, 0, &row).unwrap();
    let e = whole.append_rows_at(5, 0, 2, &row).unwrap_err();
    assert!(e.message().contains("at position 1, not 2"), "{e}");
    whole.append_rows(5, 0, &row).unwrap();
}

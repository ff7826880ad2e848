//! Sequence-sharded and hybrid (latent groups x sequence shards) decode end to end on the
//! CPU backend: each rank caches only the tokens the owner rule gives it (prefill rows
//! and decode-time appends), decodes them, and the merges of `combine::sequence` give
//! exact MLA (one latent group) or TPLA over the whole sequence (several groups).

use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::{self, rel_l2, rotated_latents, slice_rows};
use tpla::cache::{RankCache, ShardSpec};
use tpla::combine::sequence::{merge_by_lse_in_process, merge_packed_in_process};
use tpla::convert::{FoldedLayer, RankWeights};
use tpla::decode::{LogitBounds, Outputs, Queries, RankContext, RankLayer};
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::transform::Transform;
use tpla::{DType, HybridPlan, ModelDims, SequenceSharding};

/// Tokens each sequence gets after its prefill, through the owning rank's context.
const APPENDED: usize = 3;

fn dims() -> ModelDims {
    ModelDims::new(8, 128, 32, 32, 24, 0.15).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
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
fn deploy(groups: usize, sharding: SequenceSharding, lens: &[usize]) -> Deployment {
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 91).unwrap();
    let transform = Transform::hadamard(d.d_c, 3).unwrap();
    let folded = FoldedLayer::new(&layer.weights, &transform).unwrap();
    let seqs: Vec<(Tokens, Query)> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = layer.sequence(n, 500 + i as u64);
            let q = layer.query_at(&s, n - 1);
            (s.tokens, q)
        })
        .collect();
    let ranks = (0..groups * sharding.shards)
        .map(|rank| {
            let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
            // mu differs per latent group (one logit scale per slice), not per shard
            let mu = if groups == 1 {
                1.0
            } else {
                1.0 + 0.1 * plan.latent.group as f64
            };
            let weights = folded.rank(&plan.latent, mu).unwrap();
            let rl = RankLayer::new(&weights, transform.clone(), 1.0 / groups as f64).unwrap();
            let mut ctx =
                RankContext::new(d, plan.latent, 1, Box::new(CpuBackend::new(1).unwrap())).unwrap();
            ctx.set_layer(0, &weights, rl).unwrap();
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
        let want = if groups == 1 {
            reference::mla_decode(
                &dep.layer.weights,
                &tokens.latents,
                &tokens.k_rope,
                &q.q_nope,
                &q.q_rope,
            )
            .out
        } else {
            let rot = rotated_latents(&tokens.latents, &dep.transform);
            let rows: Vec<Vec<f64>> = group_weights
                .iter()
                .map(|w| slice_rows(&rot, &tokens.k_rope, &w.plan, d.d_c))
                .collect();
            reference::tpla_decode(&group_weights, &rows, &q.q_nope, &q.q_rope).1
        };
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

//! Sequence-sharded and hybrid (latent groups x sequence shards) decode on the GPU
//! (feature `cuda`): each rank registers its bf16 rank file of the prefill (format v2),
//! gets its decode-time tokens appended by position, is uploaded to a device rank,
//! decodes its tokens with the CUDA decode path, and the device merges of
//! `combine::sequence_device` give exact MLA (one latent group) or TPLA over the whole
//! sequence (several groups). The ranks are emulated on one GPU (merged in process), and
//! with two or more GPUs also run one per GPU, merged through NCCL. Each test skips,
//! saying why, without a usable GPU (or GPUs, or libnccl).

#![cfg(feature = "cuda")]

mod attention_support;

use attention_support::{f32s, gpu, mu, reference_decode, sequences, Prefill};
use std::path::{Path, PathBuf};
use tpla::attention::cpu::CpuBackend;
use tpla::attention::cuda::CudaBackend;
use tpla::attention::reference::{rank_query, rel_l2};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::combine::all_reduce_in_process;
use tpla::combine::sequence_device::{merge_by_lse_on_device, merge_packed_on_device};
use tpla::convert::{FoldedLayer, RankWeights};
use tpla::decode::{RankContext, RankLayer};
use tpla::device_rank::DeviceRank;
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::transform::Transform;
use tpla::{DType, ErrorKind, HybridPlan, ModelDims, SequenceSharding, ShardPlan};

/// Tokens each sequence gets after its prefill, appended on the rank owning their position.
const APPENDED: usize = 3;
/// Lengths that divide by no shard count or interleave, ones shorter than the shards
/// (some shards hold none of their tokens), and one of several pages.
const LENS: [usize; 7] = [1, 2, 3, 7, 61, 130, 701];
/// Relative L2 bound of bf16 caches against the f64 reference.
const BF16_BOUND: f64 = 1e-2;

fn dims() -> ModelDims {
    ModelDims::preset("deepseek-v2-lite").unwrap()
}

struct Model {
    layer: SyntheticLayer,
    transform: Transform,
    folded: FoldedLayer,
    seqs: Vec<(Tokens, Query)>,
}

impl Model {
    fn new(lens: &[usize]) -> Model {
        let d = dims();
        let layer = SyntheticLayer::generate(&d, 77).unwrap();
        let transform = Transform::hadamard(d.d_c, 5).unwrap();
        let folded = FoldedLayer::new(&layer.weights, &transform).unwrap();
        let seqs = sequences(&layer, lens, 900);
        Model {
            layer,
            transform,
            folded,
            seqs,
        }
    }

    fn ids(&self) -> Vec<u32> {
        (0..self.seqs.len() as u32).collect()
    }

    fn weights(&self, plan: &ShardPlan) -> RankWeights {
        self.folded.rank(plan, mu(plan.groups, plan.group)).unwrap()
    }

    /// A bound of `|k_rope|` over every token (every rank sees every appended key).
    fn rope_key_norm(&self) -> f64 {
        let d_r = dims().d_r;
        self.seqs
            .iter()
            .flat_map(|(t, _)| t.k_rope.chunks_exact(d_r))
            .map(|k| k.iter().map(|x| x * x).sum::<f64>().sqrt())
            .fold(0.0, f64::max)
    }

    /// Rank `plan`'s kernel query rows for every sequence: `[batch][heads][w + d_r]`.
    fn queries(&self, plan: &ShardPlan) -> Vec<f32> {
        let w = self.weights(plan);
        self.seqs
            .iter()
            .flat_map(|(_, q)| rank_query(&w, &q.q_nope, &q.q_rope))
            .map(|v| v as f32)
            .collect()
    }

    /// The f64 reference `[batch][heads][d_v]`: exact MLA with one latent group, TPLA of
    /// the groups over every token with several.
    fn reference(&self, groups: usize) -> Vec<f64> {
        let d = dims();
        let weights: Vec<RankWeights> = (0..groups)
            .map(|g| self.weights(&ShardPlan::new(&d, groups, g).unwrap()))
            .collect();
        let mut out = Vec::new();
        for (tokens, q) in &self.seqs {
            let r = reference_decode(&d, &self.layer, &weights, &self.transform, tokens, q);
            out.extend(r);
        }
        out
    }

    /// The bf16 prefill (every sequence but its last [`APPENDED`] tokens) exported into
    /// the rank files of `groups x sharding` (format v2 when sharded) under `dir`.
    fn export(&self, groups: usize, sharding: SequenceSharding, dir: &Path) -> Vec<PathBuf> {
        Prefill {
            dims: dims(),
            seqs: &self.seqs,
            transform: &self.transform,
            appended: APPENDED,
            dtype: DType::Bf16,
            page_size: 16,
        }
        .export(groups, sharding, dir)
    }

    /// Rank `rank` of `groups x sharding` on the GPU `backend`: its registered rank file
    /// of the prefill, the decode-time tokens of the positions it owns appended through
    /// its host context, uploaded.
    fn device_rank(
        &self,
        backend: CudaBackend,
        groups: usize,
        sharding: SequenceSharding,
        rank: usize,
        path: &Path,
    ) -> DeviceRank {
        let d = dims();
        let plan = HybridPlan::new(&d, groups, sharding, rank).unwrap();
        let weights = self.weights(&plan.latent);
        let rl = RankLayer::new(&weights, self.transform.clone(), 1.0 / groups as f64).unwrap();
        let mut ctx =
            RankContext::new(d, plan.latent, 1, Box::new(CpuBackend::new(1).unwrap())).unwrap();
        ctx.set_layer(0, &weights, rl).unwrap();
        let spec =
            ShardSpec::for_hybrid(d, &plan, DType::Bf16, 16, ctx.transform_ids().unwrap()).unwrap();
        let mut cache = RankCache::new(spec, 1024).unwrap();
        let mut ids = cache.register_file(path).unwrap();
        ids.sort();
        assert_eq!(ids, self.ids());
        for (s, (tokens, _)) in self.seqs.iter().enumerate() {
            let n = tokens.len();
            for t in n.saturating_sub(APPENDED)..n {
                if plan.owner_rank(plan.latent.group, t as u64).unwrap() != rank {
                    continue;
                }
                let a = f32s(tokens.latent(t));
                let kr = f32s(tokens.key_rope(t));
                ctx.append_token_at(&mut cache, s as u32, 0, t as u64, &a, &kr, true)
                    .unwrap();
            }
            let held = cache.seq_len(s as u32, 0).unwrap() as u64;
            assert_eq!(held, sharding.tokens_on(plan.shard, n as u64).unwrap());
        }
        let r =
            DeviceRank::from_context(backend, &ctx, &cache, &self.ids(), self.seqs.len()).unwrap();
        assert_eq!(r.hybrid_plan(), plan);
        r
    }

    fn deploy(&self, groups: usize, sharding: SequenceSharding, dir: &Path) -> Vec<DeviceRank> {
        let paths = self.export(groups, sharding, dir);
        (0..groups * sharding.shards)
            .map(|r| self.device_rank(gpu().unwrap(), groups, sharding, r, &paths[r]))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Merge {
    GatheredLse,
    Packed,
}

/// Poisons every rank's outputs and log-sum-exps with NaN, decodes every rank, and
/// checks the shared logit bounds are equal within each latent group and bound the
/// log-sum-exps.
fn decode_all(model: &Model, ranks: &mut [DeviceRank], shards: usize) {
    let ids = model.ids();
    let rows = ids.len() * dims().heads;
    let mut bounds: Vec<Vec<f64>> = Vec::new();
    for r in ranks.iter_mut() {
        // NaN poison: a value the step fails to write cannot pass
        r.partial_mut(0).unwrap().fill_bytes(0xff).unwrap();
        r.lse_mut(0).unwrap().fill_bytes(0xff).unwrap();
        let q = model.queries(r.plan());
        r.decode_sequence_shard(0, &ids, &q, Some(model.rope_key_norm()))
            .unwrap();
        let mut b = vec![0.0f64; rows];
        r.logit_bounds(0).unwrap().download(&mut b).unwrap();
        let mut l = vec![0.0f32; rows];
        r.lse(0).unwrap().download(&mut l).unwrap();
        for (lse, m) in l.iter().zip(&b) {
            assert!(!lse.is_nan(), "a NaN log-sum-exp");
            assert!((*lse as f64) < m + 10.0, "lse {lse} above its bound {m}");
        }
        bounds.push(b);
    }
    for (r, b) in bounds.iter().enumerate() {
        assert_eq!(b, &bounds[r / shards * shards], "rank {r}'s bounds");
    }
}

/// Merges, checks every rank holds the same output, and returns rank 0's.
fn merged(ranks: &mut [DeviceRank], merge: Merge) -> Vec<f32> {
    let batch = ranks[0].sequences();
    match merge {
        Merge::GatheredLse => merge_by_lse_on_device(ranks, 0, batch).unwrap(),
        Merge::Packed => merge_packed_on_device(ranks, 0, batch).unwrap(),
    }
    let outs: Vec<Vec<f32>> = ranks
        .iter()
        .map(|r| {
            let mut o = vec![0.0f32; r.partial_len(batch)];
            r.download_partial(0, &mut o).unwrap();
            o
        })
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o, &outs[0], "rank {r} holds another merged output");
    }
    outs.into_iter().next().unwrap()
}

/// Worst relative L2 over sequences; NaN anywhere is infinite.
fn worst(got: &[f32], want: &[f64]) -> f64 {
    let per = dims().heads * dims().d_v;
    assert_eq!(got.len(), want.len());
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    got.chunks(per)
        .zip(want.chunks(per))
        .map(|(g, w)| {
            let g: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            rel_l2(&g, w)
        })
        .fold(0.0, f64::max)
}

#[test]
fn one_latent_group_over_sequence_shards_on_one_gpu_is_exact_mla() {
    if gpu().is_none() {
        return;
    }
    let model = Model::new(&LENS);
    let want = model.reference(1);
    for (shards, interleave) in [(2, 1), (2, 16), (4, 1), (4, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let sharding = SequenceSharding::new(shards, interleave).unwrap();
        let mut ranks = model.deploy(1, sharding, dir.path());
        for merge in [Merge::GatheredLse, Merge::Packed] {
            decode_all(&model, &mut ranks, shards);
            let e = worst(&merged(&mut ranks, merge), &want);
            eprintln!("s={shards} interleave={interleave} {merge:?}: worst rel L2 {e:.2e}");
            assert!(
                e < BF16_BOUND,
                "s={shards} interleave={interleave} {merge:?}: {e}"
            );
        }
    }
}

#[test]
fn hybrid_groups_times_shards_on_one_gpu_is_tpla_of_the_groups() {
    if gpu().is_none() {
        return;
    }
    let model = Model::new(&LENS);
    let ids = model.ids();
    for (groups, shards, interleave) in [(2, 2, 1), (2, 2, 3), (2, 4, 16), (4, 2, 1)] {
        let want = model.reference(groups);
        let dir = tempfile::tempdir().unwrap();
        // TPLA(g) on the same GPU, unsharded, summed in process
        let plain = SequenceSharding::NONE;
        let paths = model.export(groups, plain, dir.path());
        let mut tpla_out: Vec<Vec<f32>> = (0..groups)
            .map(|g| {
                let mut r = model.device_rank(gpu().unwrap(), groups, plain, g, &paths[g]);
                r.decode(0, &ids, &model.queries(r.plan())).unwrap();
                let mut o = vec![0.0f32; r.partial_len(ids.len())];
                r.download_partial(0, &mut o).unwrap();
                o
            })
            .collect();
        let mut views: Vec<&mut [f32]> = tpla_out.iter_mut().map(|o| o.as_mut_slice()).collect();
        all_reduce_in_process(&mut views).unwrap();
        let tpla_want: Vec<f64> = tpla_out[0].iter().map(|&x| x as f64).collect();
        assert!(worst(&tpla_out[0], &want) < BF16_BOUND);

        let sharding = SequenceSharding::new(shards, interleave).unwrap();
        let mut ranks = model.deploy(groups, sharding, dir.path());
        for merge in [Merge::GatheredLse, Merge::Packed] {
            decode_all(&model, &mut ranks, shards);
            let got = merged(&mut ranks, merge);
            let e = worst(&got, &want);
            // the same rows and kernels as TPLA(g): only the split of the softmax differs
            let r = worst(&got, &tpla_want);
            eprintln!(
                "g={groups} s={shards} interleave={interleave} {merge:?}: rel L2 {e:.2e} \
                 against f64 TPLA, {r:.2e} against the GPU's TPLA"
            );
            assert!(e < BF16_BOUND, "g={groups} s={shards} {merge:?}: {e}");
            assert!(
                r < 5e-3,
                "g={groups} s={shards} {merge:?}: {r} from TPLA(g)"
            );
        }
    }
}

#[test]
fn device_merges_refuse_what_they_cannot_merge() {
    if gpu().is_none() {
        return;
    }
    let d = dims();
    let model = Model::new(&[5, 70]);
    let ids = model.ids();
    let dir = tempfile::tempdir().unwrap();
    let sharding = SequenceSharding::new(2, 1).unwrap();
    let mut ranks = model.deploy(1, sharding, dir.path());
    let q = model.queries(ranks[0].plan());
    // a shard's decode is a partial one
    let e = ranks[0].decode(0, &ids, &q).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("decode_sequence_shard"), "{e}");
    let e = ranks[0]
        .decode_sequence_shard(0, &ids, &q, Some(f64::NAN))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = ranks[0]
        .decode_sequence_shard(0, &ids, &q, Some(-1.0))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = ranks[0]
        .decode_sequence_shard(0, &ids, &q[1..], None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // merge (b) needs the bounds of this very step
    for r in ranks.iter_mut() {
        let q = model.queries(r.plan());
        r.decode_sequence_shard(0, &ids, &q, None).unwrap();
    }
    let e = merge_packed_on_device(&mut ranks, 0, ids.len()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.message().contains("logit bounds"), "{e}");
    // a batch, a layer or a rank set of another deployment
    assert_eq!(
        merge_by_lse_on_device(&mut ranks, 0, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        merge_by_lse_on_device(&mut ranks, 1, ids.len())
            .unwrap_err()
            .kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        merge_by_lse_on_device(&mut ranks[..1], 0, ids.len())
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    ranks.swap(0, 1);
    assert_eq!(
        merge_by_lse_on_device(&mut ranks, 0, ids.len())
            .unwrap_err()
            .kind(),
        ErrorKind::Mismatch
    );
    ranks.swap(0, 1);
    assert_eq!(
        merge_by_lse_on_device::<DeviceRank>(&mut [], 0, 1)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    // after all that, a proper step still merges
    decode_all(&model, &mut ranks, 2);
    let e = worst(&merged(&mut ranks, Merge::Packed), &model.reference(1));
    assert!(e < BF16_BOUND, "{e}");
    // a plain (unsharded) rank still refuses an empty sequence at upload
    let plan = ShardPlan::new(&d, 1, 0).unwrap();
    let weights = model.weights(&plan);
    let spec = ShardSpec::new(
        d,
        &plan,
        DType::Bf16,
        16,
        vec![TransformId::of(&model.transform)],
    )
    .unwrap();
    let mut cache = RankCache::new(spec, 4).unwrap();
    cache.add_sequence(0).unwrap();
    let e = DeviceRank::upload(gpu().unwrap(), &[weights], &cache, &[0], 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

/// One rank per GPU through NCCL: exact mode (1, 2) on two GPUs, and with four also the
/// hybrid (2, 2) and exact (1, 4), both merges, against the f64 reference.
#[cfg(feature = "nccl")]
#[test]
fn one_rank_per_gpu_merges_through_nccl() {
    use tpla::combine::nccl::{check_library, Communicator, UniqueId};
    if let Err(e) = check_library() {
        eprintln!("skipping: {e}");
        return;
    }
    let gpus = (0..8)
        .take_while(|&i| tpla::attention::cuda::CudaDevice::open(i).is_ok())
        .count();
    if gpus < 2 {
        eprintln!("skipping: needs 2 GPUs, found {gpus}");
        return;
    }
    let model = std::sync::Arc::new(Model::new(&LENS));
    let mut cases = vec![(1, 2, 1)];
    if gpus >= 4 {
        cases.extend([(2, 2, 3), (1, 4, 16)]);
    }
    for (groups, shards, interleave) in cases {
        let ranks = groups * shards;
        let dir = tempfile::tempdir().unwrap();
        let sharding = SequenceSharding::new(shards, interleave).unwrap();
        let paths = model.export(groups, sharding, dir.path());
        let want = model.reference(groups);
        let all_id = UniqueId::new().unwrap();
        let group_ids: Vec<UniqueId> = (0..groups).map(|_| UniqueId::new().unwrap()).collect();
        let shard_ids: Vec<UniqueId> = (0..shards).map(|_| UniqueId::new().unwrap()).collect();
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let (model, path) = (model.clone(), paths[rank].clone());
                let (group_id, shard_id) = (group_ids[rank / shards], shard_ids[rank % shards]);
                std::thread::spawn(move || {
                    let backend = CudaBackend::new(rank).unwrap();
                    let dev = backend.device().clone();
                    let mut r = model.device_rank(backend, groups, sharding, rank, &path);
                    let all = Communicator::init_rank(&all_id, ranks, rank, &dev).unwrap();
                    let group =
                        Communicator::init_rank(&group_id, shards, rank % shards, &dev).unwrap();
                    let same_shard =
                        Communicator::init_rank(&shard_id, groups, rank / shards, &dev).unwrap();
                    let ids = model.ids();
                    let q = model.queries(r.plan());
                    let mut outs = Vec::new();
                    for merge in [Merge::GatheredLse, Merge::Packed] {
                        r.partial_mut(0).unwrap().fill_bytes(0xff).unwrap();
                        r.lse_mut(0).unwrap().fill_bytes(0xff).unwrap();
                        r.decode_sequence_shard(0, &ids, &q, Some(model.rope_key_norm()))
                            .unwrap();
                        match merge {
                            Merge::GatheredLse => r.merge_by_lse_nccl(&group, &all, 0, ids.len()),
                            Merge::Packed => r.merge_packed_nccl(&group, &same_shard, 0, ids.len()),
                        }
                        .unwrap();
                        let mut o = vec![0.0f32; r.partial_len(ids.len())];
                        r.download_partial(0, &mut o).unwrap();
                        outs.push(o);
                    }
                    outs
                })
            })
            .collect();
        let results: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (m, merge) in [Merge::GatheredLse, Merge::Packed].iter().enumerate() {
            for (rank, res) in results.iter().enumerate() {
                let e = worst(&res[m], &want);
                eprintln!("NCCL g={groups} s={shards} {merge:?} rank {rank}: {e:.2e}");
                assert!(
                    e < BF16_BOUND,
                    "g={groups} s={shards} {merge:?} rank {rank}: {e}"
                );
            }
        }
    }
}

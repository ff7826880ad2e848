//! Tensor-parallel ranks on the GPU (feature `cuda`): g ranks emulated as separate device
//! ranks on one GPU, each decoding its registered shard file, combined in process,
//! against the f64 multi-rank reference. Skips, saying why, without a usable GPU.

#![cfg(feature = "cuda")]

mod attention_support;

#[path = "../examples/tp_decode/case.rs"]
mod case;

use attention_support::gpu;
use case::{worst_rel_l2, TpCase};
use std::time::{SystemTime, UNIX_EPOCH};
use tpla::cache::{RankCache, ShardSpec};
use tpla::combine::all_reduce_in_process;
use tpla::device_rank::DeviceRank;
use tpla::{DType, ErrorKind, ModelDims, ShardPlan};

fn fresh_seed() -> u64 {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {s}");
    s
}

/// Rank `plan`'s cache: its group's shard file, registered (zero-copy).
fn registered(case: &TpCase, plan: &ShardPlan, dir: &std::path::Path) -> RankCache {
    let weights = case.weights(plan).unwrap();
    let transforms = weights
        .iter()
        .map(|w| tpla::cache::TransformId {
            code: w.transform_code,
            fingerprint: w.transform_fingerprint,
        })
        .collect();
    let spec = ShardSpec::new(case.dims, plan, DType::Bf16, 16, transforms).unwrap();
    let mut cache = RankCache::new(spec, 1).unwrap();
    cache
        .register_file(TpCase::shard_path(dir, plan.groups, plan.group))
        .unwrap();
    cache
}

#[test]
fn emulated_ranks_on_one_gpu_match_the_multi_rank_reference() {
    if gpu().is_none() {
        return;
    }
    let dims = ModelDims::preset("deepseek-v2-lite").unwrap();
    let case = TpCase::new(dims, 2, &[1, 63, 65, 700, 4096], fresh_seed()).unwrap();
    let ids = case.ids();
    let per = dims.heads * dims.d_v;
    for groups in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        case.export(groups, dir.path()).unwrap();
        let mut ranks: Vec<DeviceRank> = (0..groups)
            .map(|g| {
                let plan = ShardPlan::new(&dims, groups, g).unwrap();
                let cache = registered(&case, &plan, dir.path());
                let weights = case.weights(&plan).unwrap();
                DeviceRank::upload(gpu().unwrap(), &weights, &cache, &ids, ids.len()).unwrap()
            })
            .collect();
        for layer in 0..case.layers.len() {
            let mut outs: Vec<Vec<f32>> = ranks
                .iter_mut()
                .map(|r| {
                    // NaN poison: a value the step fails to write cannot pass
                    r.partial_mut(layer).unwrap().fill_bytes(0xff).unwrap();
                    let q = case.queries(r.plan(), layer).unwrap();
                    r.decode(layer, &ids, &q).unwrap();
                    let mut out = vec![0.0; r.partial_len(ids.len())];
                    r.download_partial(layer, &mut out).unwrap();
                    out
                })
                .collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            all_reduce_in_process(&mut views).unwrap();
            let want = case.reference(groups, layer).unwrap();
            let err = worst_rel_l2(&outs[0], &want, per);
            eprintln!("g={groups} layer {layer}: worst rel L2 {err:.2e}");
            assert!(err < 2e-2, "g={groups} layer {layer}: {err}");
        }
        // a sub-batch in another order decodes the same sequences
        let r = &mut ranks[0];
        let sub = [ids[3], ids[0]];
        let full = case.queries(r.plan(), 1).unwrap();
        let qw = r.plan().heads * r.query_width();
        let q: Vec<f32> = [3, 0]
            .iter()
            .flat_map(|&i| full[i * qw..(i + 1) * qw].to_vec())
            .collect();
        let mut all = vec![0.0; r.partial_len(ids.len())];
        r.decode(1, &ids, &full).unwrap();
        r.download_partial(1, &mut all).unwrap();
        let mut two = vec![0.0; r.partial_len(2)];
        r.decode(1, &sub, &q).unwrap();
        r.download_partial(1, &mut two).unwrap();
        let p = r.partial_len(1);
        let want: Vec<f64> = [&all[3 * p..4 * p], &all[..p]]
            .concat()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert!(worst_rel_l2(&two, &want, p) < 1e-5);
    }
}

#[test]
fn bad_steps_and_mismatched_inputs_are_errors() {
    let Some(backend) = gpu() else { return };
    let dims = ModelDims::preset("deepseek-v2-lite").unwrap();
    let case = TpCase::new(dims, 1, &[40, 9], 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    case.export(2, dir.path()).unwrap();
    let plan = ShardPlan::new(&dims, 2, 0).unwrap();
    let other = ShardPlan::new(&dims, 2, 1).unwrap();
    let cache = registered(&case, &plan, dir.path());
    let ids = case.ids();
    // weights of the other group
    let e = DeviceRank::upload(
        gpu().unwrap(),
        &case.weights(&other).unwrap(),
        &cache,
        &ids,
        2,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    let e = DeviceRank::upload(
        gpu().unwrap(),
        &case.weights(&plan).unwrap(),
        &cache,
        &[99],
        2,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    let mut r =
        DeviceRank::upload(backend, &case.weights(&plan).unwrap(), &cache, &ids, 2).unwrap();
    let q = case.queries(&plan, 0).unwrap();
    assert_eq!(
        r.decode(1, &ids, &q).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        r.decode(0, &ids, &q[1..]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        r.decode(0, &[ids[0], 5], &q).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        r.decode(0, &[], &[]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    r.decode(0, &ids, &q).unwrap();
}

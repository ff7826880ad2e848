//! The tensor-parallel test case of the GPU tests and the `tp_decode` example, checked on
//! the CPU: shard files registered per rank, decoded by the CPU backend with the case's
//! query rows, projected and summed, equal the case's f64 multi-rank reference. A GPU
//! failure then points at the device path, not at the case.

#[path = "../examples/tp_decode/case.rs"]
#[allow(dead_code)]
mod case;

use case::{worst_rel_l2, TpCase};
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::project_latent;
use tpla::attention::{LatentAttention, LatentShape};
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::{DType, ModelDims, ShardPlan};

#[test]
fn registered_shards_decoded_on_the_cpu_match_the_case_reference() {
    let dims = ModelDims::preset("deepseek-v2-lite").unwrap();
    let case = TpCase::new(dims, 2, &[1, 65, 300], 11).unwrap();
    let ids = case.ids();
    let mut cpu = CpuBackend::new(2).unwrap();
    for groups in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        case.export(groups, dir.path()).unwrap();
        for layer in 0..2 {
            let mut sum = vec![0.0f64; ids.len() * dims.heads * dims.d_v];
            for g in 0..groups {
                let plan = ShardPlan::new(&dims, groups, g).unwrap();
                let weights = case.weights(&plan).unwrap();
                let transforms = weights
                    .iter()
                    .map(|w| TransformId {
                        code: w.transform_code,
                        fingerprint: w.transform_fingerprint,
                    })
                    .collect();
                let spec = ShardSpec::new(dims, &plan, DType::Bf16, 16, transforms).unwrap();
                let mut cache = RankCache::new(spec, 1).unwrap();
                cache
                    .register_file(TpCase::shard_path(dir.path(), groups, g))
                    .unwrap();
                let shape = LatentShape {
                    heads: plan.heads,
                    slice_width: plan.slice_width,
                    d_r: dims.d_r,
                };
                let q = case.queries(&plan, layer).unwrap();
                let mut out = vec![f32::NAN; ids.len() * plan.heads * plan.slice_width];
                let mut lse = vec![f32::NAN; ids.len() * plan.heads];
                cpu.attend(
                    &cache.layer(layer).unwrap(),
                    shape,
                    &ids,
                    &q,
                    &mut out,
                    &mut lse,
                )
                .unwrap();
                let per = plan.heads * plan.slice_width;
                for (b, lat) in out.chunks(per).enumerate() {
                    let lat: Vec<f64> = lat.iter().map(|&v| v as f64).collect();
                    let part = project_latent(&weights[layer], &lat);
                    for (s, p) in sum[b * part.len()..].iter_mut().zip(part) {
                        *s += p;
                    }
                }
            }
            let got: Vec<f32> = sum.iter().map(|&v| v as f32).collect();
            let want = case.reference(groups, layer).unwrap();
            let err = worst_rel_l2(&got, &want, dims.heads * dims.d_v);
            eprintln!("g={groups} layer {layer}: worst rel L2 {err:.2e}");
            assert!(err < 2e-2, "g={groups} layer {layer}: {err}");
        }
    }
}

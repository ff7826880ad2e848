//! A rank's decode context end to end: folded weights, paged caches, backends, combine,
//! against the f64 reference.

mod attention_support;

use attention_support::sequences;
use tpla::attention::cpu::CpuBackend;
use tpla::attention::reference::{self, rel_l2, rotated_latents, slice_rows, Reference};
use tpla::attention::LatentAttention;
use tpla::cache::{RankCache, ShardSpec};
use tpla::combine::all_reduce_in_process;
use tpla::convert::{FoldedLayer, RankWeights};
use tpla::decode::{Outputs, Queries, RankContext, RankLayer};
use tpla::synthetic::{Query, SyntheticLayer};
use tpla::transform::Transform;
use tpla::{DType, ErrorKind, ModelDims, ShardPlan};

fn dims() -> ModelDims {
    ModelDims::new(8, 128, 32, 32, 24, 0.15).unwrap()
}

struct Rank {
    ctx: RankContext,
    cache: RankCache,
    weights: RankWeights,
}

/// `groups` ranks over one layer, prefill `lens[i] - 3` tokens of each sequence, append
/// three through the context, return the ranks and each sequence's tokens and query.
fn setup(
    groups: usize,
    dtype: DType,
    backend: &dyn Fn() -> Box<dyn LatentAttention + Send>,
    lens: &[usize],
) -> (
    Vec<Rank>,
    SyntheticLayer,
    Vec<(tpla::synthetic::Tokens, Query)>,
) {
    let d = dims();
    let layer = SyntheticLayer::generate(&d, 77).unwrap();
    let u = Transform::hadamard(d.d_c, 5).unwrap();
    let folded = FoldedLayer::new(&layer.weights, &u).unwrap();
    let seqs = sequences(&layer, lens, 100);
    let ranks = (0..groups)
        .map(|i| {
            let plan = ShardPlan::new(&d, groups, i).unwrap();
            let weights = folded.rank(&plan, 1.0 + 0.1 * i as f64).unwrap();
            let rl = RankLayer::new(&weights, u.clone(), 1.0 / groups as f64).unwrap();
            let mut ctx = RankContext::new(d, plan, 1, backend()).unwrap();
            ctx.set_layer(0, &weights, rl).unwrap();
            let spec = ShardSpec::new(d, &plan, dtype, 16, ctx.transform_ids().unwrap()).unwrap();
            let mut cache = RankCache::new(spec, 64).unwrap();
            for (s, (tokens, _)) in seqs.iter().enumerate() {
                let n = tokens.len();
                cache.add_sequence(s as u32).unwrap();
                let prefix = tokens.prefix(n - 3);
                let rows = slice_rows(
                    &rotated_latents(&prefix.latents, &u),
                    &prefix.k_rope,
                    &plan,
                    d.d_c,
                );
                cache.append_rows(s as u32, 0, &rows).unwrap();
                for t in n - 3..n {
                    let a: Vec<f32> = tokens.latent(t).iter().map(|&v| v as f32).collect();
                    let kr: Vec<f32> = tokens.key_rope(t).iter().map(|&v| v as f32).collect();
                    ctx.append_token(&mut cache, s as u32, 0, &a, &kr, true)
                        .unwrap();
                }
            }
            Rank {
                ctx,
                cache,
                weights,
            }
        })
        .collect();
    (ranks, layer, seqs)
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Decodes every sequence on every rank, combines in process, and compares with the
/// f64 TPLA reference; returns the worst relative error.
fn combined_error(ranks: &mut [Rank], seqs: &[(tpla::synthetic::Tokens, Query)]) -> f64 {
    let d = dims();
    let ids: Vec<u32> = (0..seqs.len() as u32).collect();
    let q_nope: Vec<f32> = seqs.iter().flat_map(|(_, q)| f32s(&q.q_nope)).collect();
    let q_rope: Vec<f32> = seqs.iter().flat_map(|(_, q)| f32s(&q.q_rope)).collect();
    let mut outs: Vec<Vec<f32>> = ranks
        .iter_mut()
        .map(|r| {
            let mut out = vec![f32::NAN; ids.len() * d.heads * d.d_v];
            let q = Queries::Nope {
                q_nope: &q_nope,
                q_rope: &q_rope,
            };
            r.ctx
                .decode(&r.cache, 0, &ids, q, Outputs::Heads(&mut out))
                .unwrap();
            out
        })
        .collect();
    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    all_reduce_in_process(&mut views).unwrap();
    let u = ranks[0].ctx.layer(0).unwrap().transform.clone();
    let weights: Vec<RankWeights> = ranks.iter().map(|r| r.weights.clone()).collect();
    let mut worst: f64 = 0.0;
    for (b, (tokens, q)) in seqs.iter().enumerate() {
        let rot = rotated_latents(&tokens.latents, &u);
        let rows: Vec<Vec<f64>> = weights
            .iter()
            .map(|w| slice_rows(&rot, &tokens.k_rope, &w.plan, d.d_c))
            .collect();
        let (_, want) = reference::tpla_decode(&weights, &rows, &q.q_nope, &q.q_rope);
        let stride = d.heads * d.d_v;
        let got = f64s(&outs[0][b * stride..(b + 1) * stride]);
        worst = worst.max(rel_l2(&got, &want));
    }
    worst
}

#[test]
fn reference_and_cpu_contexts_match_the_f64_tpla_reference() {
    let lens = [1 + 3, 17, 40, 100];
    let reference: &dyn Fn() -> Box<dyn LatentAttention + Send> = &|| Box::new(Reference);
    let cpu: &dyn Fn() -> Box<dyn LatentAttention + Send> =
        &|| Box::new(CpuBackend::new(2).unwrap());
    for groups in [1, 2, 4] {
        for (backend, name) in [(reference, "reference"), (cpu, "cpu")] {
            let (mut ranks, _, seqs) = setup(groups, DType::F32, backend, &lens);
            let err = combined_error(&mut ranks, &seqs);
            assert!(err < 1e-5, "{name} g={groups} f32: {err}");
            let (mut ranks, _, seqs) = setup(groups, DType::Bf16, backend, &lens);
            let err = combined_error(&mut ranks, &seqs);
            assert!(err < 2e-2, "{name} g={groups} bf16: {err}");
            // FP8 (prefill rows and appended tokens quantised at append): 3 mantissa bits,
            // about 2^-4 per value; short sequences average little of it away (measured
            // 0.024-0.029, both backends)
            let (mut ranks, _, seqs) = setup(groups, DType::Fp8E4m3, backend, &lens);
            let err = combined_error(&mut ranks, &seqs);
            eprintln!("{name} g={groups} fp8_e4m3: {err:.4}");
            assert!(err < 6e-2, "{name} g={groups} fp8_e4m3: {err}");
        }
    }
}

#[test]
fn one_group_context_is_mla() {
    let reference: &dyn Fn() -> Box<dyn LatentAttention + Send> = &|| Box::new(Reference);
    let (mut ranks, layer, seqs) = setup(1, DType::F32, reference, &[30]);
    let (tokens, q) = &seqs[0];
    let exact = reference::mla_decode(
        &layer.weights,
        &tokens.latents,
        &tokens.k_rope,
        &q.q_nope,
        &q.q_rope,
    );
    let d = dims();
    let mut out = vec![f32::NAN; d.heads * d.d_v];
    let (qn, qr) = (f32s(&q.q_nope), f32s(&q.q_rope));
    let r = &mut ranks[0];
    // g = 1 carries mu = 1 in setup (1.0 + 0.1 * 0)
    r.ctx
        .decode(
            &r.cache,
            0,
            &[0],
            Queries::Nope {
                q_nope: &qn,
                q_rope: &qr,
            },
            Outputs::Heads(&mut out),
        )
        .unwrap();
    let err = rel_l2(&f64s(&out), &exact.out);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn latent_queries_and_latent_outputs_agree_with_the_head_path() {
    let reference: &dyn Fn() -> Box<dyn LatentAttention + Send> = &|| Box::new(Reference);
    let (mut ranks, _, seqs) = setup(2, DType::F32, reference, &[25, 9]);
    let d = dims();
    let r = &mut ranks[1];
    let (w, h) = (r.ctx.plan().slice_width, d.heads);
    let ids = [0u32, 1];
    let q_nope: Vec<f32> = seqs.iter().flat_map(|(_, q)| f32s(&q.q_nope)).collect();
    let q_rope: Vec<f32> = seqs.iter().flat_map(|(_, q)| f32s(&q.q_rope)).collect();
    // absorbed latent queries computed outside: W'_UK q_nope per head
    let wk = &r.weights.w_uk;
    let mut q_lat = Vec::new();
    for (i, qn) in q_nope.chunks_exact(d.d_n).enumerate() {
        let hw = &wk[(i % h) * w * d.d_n..(i % h + 1) * w * d.d_n];
        q_lat.extend(
            hw.chunks_exact(d.d_n)
                .map(|row| row.iter().zip(qn).map(|(a, b)| a * *b as f64).sum::<f64>() as f32),
        );
    }
    let mut heads_a = vec![f32::NAN; 2 * h * d.d_v];
    let mut heads_b = vec![f32::NAN; 2 * h * d.d_v];
    r.ctx
        .decode(
            &r.cache,
            0,
            &ids,
            Queries::Nope {
                q_nope: &q_nope,
                q_rope: &q_rope,
            },
            Outputs::Heads(&mut heads_a),
        )
        .unwrap();
    r.ctx
        .decode(
            &r.cache,
            0,
            &ids,
            Queries::Latent {
                q_lat: &q_lat,
                q_rope: &q_rope,
            },
            Outputs::Heads(&mut heads_b),
        )
        .unwrap();
    assert!(rel_l2(&f64s(&heads_a), &f64s(&heads_b)) < 1e-6);
    let mut lat = vec![f32::NAN; 2 * h * w];
    let mut lse = vec![f32::NAN; 2 * h];
    r.ctx
        .decode(
            &r.cache,
            0,
            &ids,
            Queries::Latent {
                q_lat: &q_lat,
                q_rope: &q_rope,
            },
            Outputs::Latent {
                out: &mut lat,
                lse: &mut lse,
            },
        )
        .unwrap();
    assert!(lse.iter().all(|v| v.is_finite()));
    let projected = reference::project_latent(&r.weights, &f64s(&lat[..h * w]));
    assert!(rel_l2(&projected, &f64s(&heads_b[..h * d.d_v])) < 1e-5);
}

#[test]
fn bad_calls_are_errors_and_change_nothing() {
    let reference: &dyn Fn() -> Box<dyn LatentAttention + Send> = &|| Box::new(Reference);
    let (mut ranks, _, _) = setup(2, DType::F32, reference, &[10]);
    let d = dims();
    let h = d.heads;
    let qn = vec![0.1f32; h * d.d_n];
    let qr = vec![0.1f32; h * d.d_r];
    let mut out = vec![0.0f32; h * d.d_v];
    let (first, second) = ranks.split_at_mut(1);
    let (r0, r1) = (&mut first[0], &second[0]);
    let q = Queries::Nope {
        q_nope: &qn,
        q_rope: &qr,
    };
    let kind = |e: tpla::Error| e.kind();
    assert_eq!(
        kind(
            r0.ctx
                .decode(&r0.cache, 1, &[0], q, Outputs::Heads(&mut out))
                .unwrap_err()
        ),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        kind(
            r0.ctx
                .decode(&r0.cache, 0, &[7], q, Outputs::Heads(&mut out))
                .unwrap_err()
        ),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        kind(
            r0.ctx
                .decode(&r1.cache, 0, &[0], q, Outputs::Heads(&mut out))
                .unwrap_err()
        ),
        ErrorKind::Mismatch
    );
    let short = Queries::Nope {
        q_nope: &qn[1..],
        q_rope: &qr,
    };
    assert_eq!(
        kind(
            r0.ctx
                .decode(&r0.cache, 0, &[0], short, Outputs::Heads(&mut out))
                .unwrap_err()
        ),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(
            r0.ctx
                .decode(&r0.cache, 0, &[0], q, Outputs::Heads(&mut out[1..]))
                .unwrap_err()
        ),
        ErrorKind::InvalidArgument
    );
    let before = r0.cache.seq_len(0, 0).unwrap();
    let a = vec![1.0f32; d.d_c];
    assert!(r0
        .ctx
        .append_token(&mut r0.cache, 0, 0, &a[1..], &qr[..d.d_r], true)
        .is_err());
    assert!(r0
        .ctx
        .append_token(&mut r0.cache, 9, 0, &a, &qr[..d.d_r], true)
        .is_err());
    assert_eq!(r0.cache.seq_len(0, 0).unwrap(), before);
}

//! The TPLA maths against exact MLA, on fresh seeded random layers.

use tpla::attention::reference::{
    self, mla_decode, mla_decode_naive, rel_l2, rotated_latents, slice_rows, slice_token,
    tpla_decode, AppendMode,
};
use tpla::convert::{fold_all_slices, MlaWeights};
use tpla::fidelity::{build_transform, evaluate, AppendChoice, Prepared, Scenario};
use tpla::synthetic::SyntheticLayer;
use tpla::transform::{MuPolicy, SecondMoment, SliceLayout, Transform, TransformKind};
use tpla::{ModelDims, ShardPlan};

fn small() -> ModelDims {
    ModelDims::new(4, 64, 16, 32, 24, 0.17).unwrap()
}

/// Identity, Hadamard and PCAs fitted on another sequence of the same layer.
fn transforms(layer: &SyntheticLayer, seed: u64) -> Vec<Transform> {
    let d_c = layer.dims.d_c;
    let mut m = SecondMoment::new(d_c);
    for a in layer
        .sequence(300, seed + 100)
        .tokens
        .latents
        .chunks_exact(d_c)
    {
        m.add(&reference::normalise(a)).unwrap();
    }
    vec![
        Transform::identity(d_c).unwrap(),
        Transform::hadamard(d_c, seed).unwrap(),
        Transform::pca(&m, SliceLayout::Contiguous, 1).unwrap(),
        Transform::pca(&m, SliceLayout::Interleaved, 4).unwrap(),
    ]
}

#[test]
fn absorbed_mla_equals_materialised_mla() {
    for seed in [1, 2, 3] {
        let layer = SyntheticLayer::generate(&small(), seed).unwrap();
        let seq = layer.sequence(37, seed);
        let q = layer.query_at(&seq, 36);
        let t = &seq.tokens;
        let a = mla_decode(&layer.weights, &t.latents, &t.k_rope, &q.q_nope, &q.q_rope);
        let b = mla_decode_naive(&layer.weights, &t.latents, &t.k_rope, &q.q_nope, &q.q_rope);
        assert!(rel_l2(&a.out, &b.out) < 1e-12, "seed {seed}");
        assert!(rel_l2(&a.probs, &b.probs) < 1e-12);
    }
}

#[test]
fn one_group_with_any_orthogonal_transform_is_exactly_mla() {
    for seed in [4, 5, 6] {
        let layer = SyntheticLayer::generate(&small(), seed).unwrap();
        let seq = layer.sequence(50, seed);
        let t = &seq.tokens;
        let q = layer.query_at(&seq, 49);
        let exact = mla_decode(&layer.weights, &t.latents, &t.k_rope, &q.q_nope, &q.q_rope);
        for u in transforms(&layer, seed) {
            let ranks = fold_all_slices(&layer.weights, &u, &[1.0]).unwrap();
            let rows = slice_rows(
                &rotated_latents(&t.latents, &u),
                &t.k_rope,
                &ranks[0].plan,
                64,
            );
            let (parts, sum) = tpla_decode(&ranks, &[rows], &q.q_nope, &q.q_rope);
            let err = rel_l2(&sum, &exact.out);
            assert!(err < 1e-10, "{:?} seed {seed}: {err}", u.kind());
            assert!(rel_l2(&parts[0].probs, &exact.probs) < 1e-10);
        }
    }
}

#[test]
fn two_slices_reproduce_a_hand_computed_case() {
    // H=1, d_c=2, d_r=2, identity weights and norm, scale 1. Latents [1,1] and [1,-1]
    // have rms 1; the RoPE keys are [0,0] and [1,0]; q_nope = [1,2], q_rope = [1,0].
    // Slice 0 (column 0): scores 1 and 2, both latents 1 -> output [1, 0].
    // Slice 1 (column 1): scores 2 and -1, latents 1 and -1 -> output [0, tanh(3/2)].
    let dims = ModelDims::new(1, 2, 2, 2, 2, 1.0).unwrap();
    let eye = vec![1.0, 0.0, 0.0, 1.0];
    let w = MlaWeights::new(dims, eye.clone(), eye, vec![1.0, 1.0]).unwrap();
    let u = Transform::identity(2).unwrap();
    let ranks = fold_all_slices(&w, &u, &[1.0, 1.0]).unwrap();
    let latents = [1.0, 1.0, 1.0, -1.0];
    let k_rope = [0.0, 0.0, 1.0, 0.0];
    let rot = rotated_latents(&latents, &u);
    let rows: Vec<Vec<f64>> = ranks
        .iter()
        .map(|r| slice_rows(&rot, &k_rope, &r.plan, 2))
        .collect();
    let (parts, sum) = tpla_decode(&ranks, &rows, &[1.0, 2.0], &[1.0, 0.0]);
    let tol = 1e-5; // the RMS epsilon perturbs the normalised latents by ~5e-7
    assert!((parts[0].out[0] - 1.0).abs() < tol && parts[0].out[1].abs() < tol);
    assert!(parts[1].out[0].abs() < tol && (parts[1].out[1] - 1.5f64.tanh()).abs() < tol);
    let e = std::f64::consts::E;
    assert!((parts[0].probs[1] - e / (1.0 + e)).abs() < tol);
    assert!((sum[1] - 1.5f64.tanh()).abs() < tol);
}

#[test]
fn slices_partition_the_rotated_latent_for_every_group_count() {
    let layer = SyntheticLayer::generate(&small(), 9).unwrap();
    let t = layer.sequence(20, 9).tokens;
    let u = Transform::hadamard(64, 3).unwrap();
    let rot = rotated_latents(&t.latents, &u);
    for g in [1, 2, 4, 8] {
        let mut rebuilt = vec![0.0; rot.len()];
        for i in 0..g {
            let plan = ShardPlan::new(&layer.dims, g, i).unwrap();
            let rows = slice_rows(&rot, &t.k_rope, &plan, 64);
            let rw = plan.slice_width + 16;
            for (tok, row) in rows.chunks_exact(rw).enumerate() {
                let at = tok * 64 + plan.slice_start;
                rebuilt[at..at + plan.slice_width].copy_from_slice(&row[..plan.slice_width]);
                assert_eq!(&row[plan.slice_width..], t.key_rope(tok));
            }
        }
        assert_eq!(rebuilt, rot, "g={g}");
    }
}

#[test]
fn appended_tokens_match_the_prefill_rows() {
    let layer = SyntheticLayer::generate(&small(), 11).unwrap();
    let t = layer.sequence(10, 11).tokens;
    let u = Transform::hadamard(64, 11).unwrap();
    let rot = rotated_latents(&t.latents, &u);
    let append = |tok: usize, plan: &ShardPlan, mode| {
        slice_token(t.latent(tok), t.key_rope(tok), &u, plan, mode).unwrap()
    };
    for g in [1, 2, 4] {
        for i in 0..g {
            let plan = ShardPlan::new(&layer.dims, g, i).unwrap();
            let rows = slice_rows(&rot, &t.k_rope, &plan, 64);
            let rw = plan.slice_width + 16;
            for tok in 0..t.len() {
                let exact = append(tok, &plan, AppendMode::Exact);
                assert!(rel_l2(&exact, &rows[tok * rw..(tok + 1) * rw]) < 1e-14);
                // With the token's own energy share, the sliced estimate is exact too.
                let mut y = vec![0.0; 64];
                u.rotate(t.latent(tok), &mut y);
                let total: f64 = y.iter().map(|v| v * v).sum();
                let part: f64 = y[plan.slice_start..plan.slice_start + plan.slice_width]
                    .iter()
                    .map(|v| v * v)
                    .sum();
                let share = part / total;
                let est = append(tok, &plan, AppendMode::SlicedRms { fraction: share });
                assert!(rel_l2(&est, &exact) < 1e-6, "g={g} i={i}");
                // A wrong share scales the latent part by sqrt(wrong / right).
                let wrong = (share * 4.0).min(1.0);
                let off = append(tok, &plan, AppendMode::SlicedRms { fraction: wrong });
                if g > 1 {
                    assert!(rel_l2(&off, &exact) > 1e-3);
                }
            }
        }
    }
    let plan = ShardPlan::new(&layer.dims, 2, 0).unwrap();
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let mode = AppendMode::SlicedRms { fraction: bad };
        assert!(slice_token(t.latent(0), t.key_rope(0), &u, &plan, mode).is_err());
    }
    assert!(slice_token(&[1.0; 3], t.key_rope(0), &u, &plan, AppendMode::Exact).is_err());
}

#[test]
fn causal_prefill_attends_to_the_past_only() {
    let layer = SyntheticLayer::generate(&small(), 13).unwrap();
    let seq = layer.sequence(12, 13);
    let queries: Vec<_> = (0..12).map(|t| layer.query_at(&seq, t)).collect();
    let out = reference::mla_prefill(&layer.weights, &seq.tokens, &queries);
    let d = layer.dims;
    // Token 0 sees only itself: its output is W_UV^T (gamma * n_0) for every head.
    let n0 = reference::normalise(seq.tokens.latent(0));
    for h in 0..d.heads {
        let wv = layer.weights.w_uv_head(h);
        for j in 0..d.d_v {
            let v: f64 = (0..d.d_c)
                .map(|c| layer.weights.gamma[c] * n0[c] * wv[c * d.d_v + j])
                .sum();
            assert!((out[h * d.d_v + j] - v).abs() < 1e-10 * (1.0 + v.abs()));
        }
    }
    // The last token's output is the decode over the whole sequence, naive form.
    let last = mla_decode_naive(
        &layer.weights,
        &seq.tokens.latents,
        &seq.tokens.k_rope,
        &queries[11].q_nope,
        &queries[11].q_rope,
    );
    let stride = d.heads * d.d_v;
    assert!(rel_l2(&out[11 * stride..], &last.out) < 1e-12);
}

#[test]
fn contiguous_pca_beats_identity_slicing() {
    let dims = ModelDims::preset("deepseek-v2-lite").unwrap();
    for seed in [21, 22] {
        let s = Scenario::new(&dims, seed, 392, 2).unwrap();
        let err = |kind| {
            let t = build_transform(&s, kind, SliceLayout::Contiguous, 2).unwrap();
            let p = Prepared::new(&s, t).unwrap();
            let one = p.mus(&s, 2, MuPolicy::One).unwrap();
            evaluate(&s, &p, &one, AppendChoice::Exact, 8)
                .unwrap()
                .rel_l2
        };
        let identity = err(TransformKind::Identity);
        let pca = err(TransformKind::Pca);
        eprintln!("seed {seed}: pca {pca:.4} identity {identity:.4}");
        assert!(
            pca * 2.5 < identity,
            "seed {seed}: pca {pca} identity {identity}"
        );
    }
}

#[test]
fn folding_rejects_mismatched_inputs() {
    let layer = SyntheticLayer::generate(&small(), 1).unwrap();
    let u = Transform::identity(32).unwrap();
    assert!(fold_all_slices(&layer.weights, &u, &[1.0]).is_err());
    let u = Transform::identity(64).unwrap();
    assert!(fold_all_slices(&layer.weights, &u, &[1.0, f64::NAN]).is_err());
    assert!(fold_all_slices(&layer.weights, &u, &[1.0, 1.0, 1.0]).is_err());
    let d = small();
    assert!(MlaWeights::new(d, vec![0.0; 3], vec![0.0; 4 * 64 * 24], vec![1.0; 64]).is_err());
    let mut bad = layer.weights.w_uk.clone();
    bad[5] = f64::INFINITY;
    assert!(MlaWeights::new(d, bad, layer.weights.w_uv.clone(), vec![1.0; 64]).is_err());
}

//! How close TPLA comes to exact MLA: the measurements behind `tpla demo` and the
//! fidelity report.
//!
//! A [`Scenario`] is a synthetic layer, a sequence (a prefill plus decode-time tokens),
//! and a separate calibration sequence of the same layer. For a TPLA configuration
//! (groups, transform, mu policy, append mode) [`evaluate`] builds every rank's slice
//! cache, decodes the last queries through the f64 reference and compares the summed
//! outputs and each slice's attention distribution with exact MLA.

use crate::attention::reference::{
    self, kl_divergence, rotated_latents, slice_rows, slice_token, AppendMode, HeadOutputs,
};
use crate::convert::FoldedLayer;
use crate::error::Result;
use crate::geometry::{ModelDims, ShardPlan};
use crate::synthetic::{Query, Sequence, SyntheticLayer};
use crate::transform::{
    choose_mu, slice_energy_fractions, KlCalibration, MuPolicy, SecondMoment, SliceLayout,
    Transform, TransformKind,
};

/// Seed of the randomised Hadamard transform in the demo and the fidelity report.
pub const HADAMARD_SEED: u64 = 0x7a1a;

/// A layer, a sequence to decode and a calibration sequence.
pub struct Scenario {
    pub layer: SyntheticLayer,
    pub seq: Sequence,
    /// Tokens written by the prefill; the rest of `seq` is appended at decode time.
    pub prefill: usize,
    /// Decode positions whose queries are evaluated, with their exact MLA outputs.
    pub evaluated: Vec<(usize, Query, HeadOutputs)>,
    pub calibration: Sequence,
    /// Calibration queries (used by the `kl` policy).
    pub calibration_queries: Vec<Query>,
}

/// Calibration sequence length and the number of its positions whose queries calibrate.
const CALIBRATION_TOKENS: usize = 4096;
const CALIBRATION_QUERIES: usize = 2;

impl Scenario {
    /// `prefill` prefill tokens, `decode` appended tokens, the last `queries` of which are
    /// evaluated (`1 <= queries <= decode`).
    pub fn new(
        dims: &ModelDims,
        seed: u64,
        prefill: usize,
        decode: usize,
        queries: usize,
    ) -> Result<Self> {
        if prefill == 0 || queries == 0 || queries > decode {
            return Err(crate::Error::invalid(format!(
                "a scenario needs a prefill, and 1..={decode} evaluated queries (got prefill {prefill}, {queries} queries)"
            )));
        }
        let layer = SyntheticLayer::generate(dims, seed)?;
        let len = prefill + decode;
        let seq = layer.sequence(len, seed.wrapping_add(1));
        let evaluated = (len - queries..len)
            .map(|t| {
                let q = layer.query_at(&seq, t);
                let exact = reference::mla_decode(
                    &layer.weights,
                    &seq.tokens.latents[..(t + 1) * dims.d_c],
                    &seq.tokens.k_rope[..(t + 1) * dims.d_r],
                    &q.q_nope,
                    &q.q_rope,
                );
                (t, q, exact)
            })
            .collect();
        let calibration = layer.sequence(CALIBRATION_TOKENS, seed.wrapping_add(2));
        let calibration_queries = (CALIBRATION_TOKENS - CALIBRATION_QUERIES..CALIBRATION_TOKENS)
            .map(|t| layer.query_at(&calibration, t))
            .collect();
        Ok(Scenario {
            layer,
            seq,
            prefill,
            evaluated,
            calibration,
            calibration_queries,
        })
    }

    pub fn dims(&self) -> &ModelDims {
        &self.layer.dims
    }

    /// Second moment of the calibration sequence's normalised latents (input of PCA).
    pub fn calibration_moment(&self) -> Result<SecondMoment> {
        let d_c = self.dims().d_c;
        let mut m = SecondMoment::new(d_c);
        for a in self.calibration.tokens.latents.chunks_exact(d_c) {
            m.add(&reference::normalise(a))?;
        }
        Ok(m)
    }
}

/// A transform with everything derived from it that does not depend on the groups or mu.
pub struct Prepared {
    pub transform: Transform,
    pub folded: FoldedLayer,
    /// Rotated normalised latents of the scenario's sequence, `[T][d_c]`.
    pub rotated: Vec<f64>,
    moment: SecondMoment,
    /// `kl` calibration data in the rotated basis.
    cal_q_lat: Vec<f64>,
    cal_q_rope: Vec<f64>,
    cal_keys: Vec<f64>,
}

/// Which transform to build: `layout` and `groups` matter for PCA only.
pub fn build_transform(
    s: &Scenario,
    kind: TransformKind,
    layout: SliceLayout,
    groups: usize,
) -> Result<Transform> {
    let d_c = s.dims().d_c;
    match kind {
        TransformKind::Identity => Transform::identity(d_c),
        TransformKind::Hadamard => Transform::hadamard(d_c, HADAMARD_SEED),
        TransformKind::Pca => Transform::pca(&s.calibration_moment()?, layout, groups),
    }
}

impl Prepared {
    pub fn new(s: &Scenario, transform: Transform) -> Result<Self> {
        let d = *s.dims();
        let folded = FoldedLayer::new(&s.layer.weights, &transform)?;
        let rotated = rotated_latents(&s.seq.tokens.latents, &transform);
        // Calibration queries of every head, absorbed and rotated: U^T diag(gamma) W_UK q.
        let mut cal_q_lat = Vec::new();
        let mut cal_q_rope = Vec::new();
        for q in &s.calibration_queries {
            for h in 0..d.heads {
                let w = &folded.w_uk[h * d.d_c * d.d_n..(h + 1) * d.d_c * d.d_n];
                let qn = &q.q_nope[h * d.d_n..(h + 1) * d.d_n];
                cal_q_lat.extend(w.chunks_exact(d.d_n).map(|row| reference::dot(row, qn)));
                cal_q_rope.extend_from_slice(&q.q_rope[h * d.d_r..(h + 1) * d.d_r]);
            }
        }
        Ok(Prepared {
            cal_keys: rotated_latents(&s.calibration.tokens.latents, &transform),
            moment: s.calibration_moment()?,
            transform,
            folded,
            rotated,
            cal_q_lat,
            cal_q_rope,
        })
    }

    /// Per-slice shares of the calibration latents' energy.
    pub fn fractions(&self, groups: usize) -> Result<Vec<f64>> {
        slice_energy_fractions(&self.transform, &self.moment, groups)
    }

    /// One mu per slice under `policy`.
    pub fn mus(&self, s: &Scenario, groups: usize, policy: MuPolicy) -> Result<Vec<f64>> {
        let d = s.dims();
        let cal = KlCalibration {
            d_c: d.d_c,
            d_r: d.d_r,
            scale: d.softmax_scale,
            q_lat: &self.cal_q_lat,
            q_rope: &self.cal_q_rope,
            keys_lat: &self.cal_keys,
            keys_rope: &s.calibration.tokens.k_rope,
        };
        choose_mu(policy, groups, &self.fractions(groups)?, Some(&cal))
    }
}

/// How decode-time tokens are normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendChoice {
    Exact,
    SlicedRms,
}

/// TPLA against exact MLA, averaged over the evaluated queries.
#[derive(Clone, Copy, Debug)]
pub struct Metrics {
    /// Relative L2 error of the summed head outputs.
    pub rel_l2: f64,
    pub cosine: f64,
    /// Mean over heads and slices of KL(MLA attention || slice attention).
    pub kl: f64,
}

/// Decodes the scenario's evaluated queries under TPLA with `groups` slices of
/// `prepared`'s transform and logit scales `mus`, appending decode-time tokens per
/// `append`.
pub fn evaluate(
    s: &Scenario,
    prepared: &Prepared,
    mus: &[f64],
    append: AppendChoice,
) -> Result<Metrics> {
    let d = *s.dims();
    let groups = mus.len();
    let fractions = prepared.fractions(groups)?;
    let mut ranks = Vec::with_capacity(groups);
    let mut rows = Vec::with_capacity(groups);
    for (i, &mu) in mus.iter().enumerate() {
        let plan = ShardPlan::new(&d, groups, i)?;
        let prefix = s.prefill * d.d_c;
        let mut r = slice_rows(
            &prepared.rotated[..prefix],
            &s.seq.tokens.k_rope[..s.prefill * d.d_r],
            &plan,
            d.d_c,
        );
        for t in s.prefill..s.seq.tokens.len() {
            let mode = match append {
                AppendChoice::Exact => AppendMode::Exact,
                AppendChoice::SlicedRms => AppendMode::SlicedRms {
                    fraction: fractions[i],
                },
            };
            let tok = &s.seq.tokens;
            r.extend(slice_token(
                tok.latent(t),
                tok.key_rope(t),
                &prepared.transform,
                &plan,
                mode,
            )?);
        }
        ranks.push(prepared.folded.rank(&plan, mu)?);
        rows.push(r);
    }
    let mut m = Metrics {
        rel_l2: 0.0,
        cosine: 0.0,
        kl: 0.0,
    };
    let row_width = |i: usize| ranks[i].plan.slice_width + d.d_r;
    for (t, q, exact) in &s.evaluated {
        let len = t + 1;
        let prefix: Vec<Vec<f64>> = (0..groups)
            .map(|i| rows[i][..len * row_width(i)].to_vec())
            .collect();
        let (parts, sum) = reference::tpla_decode(&ranks, &prefix, &q.q_nope, &q.q_rope);
        m.rel_l2 += reference::rel_l2(&sum, &exact.out);
        m.cosine += reference::cosine(&sum, &exact.out);
        for part in &parts {
            for h in 0..d.heads {
                let span = h * len..(h + 1) * len;
                m.kl += kl_divergence(&exact.probs[span.clone()], &part.probs[span]);
            }
        }
    }
    let n = s.evaluated.len() as f64;
    m.rel_l2 /= n;
    m.cosine /= n;
    m.kl /= n * (groups * d.heads) as f64;
    Ok(m)
}

//! How close TPLA comes to exact MLA: the measurements behind `tpla demo` and
//! `tpla fidelity`.
//!
//! A [`Scenario`] is a layer's weights, a token sequence with decode queries at its end
//! (and the exact MLA outputs for them), and the layer's calibration data. It comes from
//! a synthetic layer ([`Scenario::new`]) or from a checkpoint's weights and a calibration
//! file's window ([`Scenario::from_window`]). For a TPLA configuration (groups,
//! transform, mu policy, append mode) [`evaluate`] builds every rank's slice cache — the
//! sequence's first tokens as an exact prefill, the last `appended` tokens appended one
//! by one as decode would — decodes the queries through the f64 reference and compares
//! the summed outputs and each slice's attention distribution with exact MLA.
//! [`report`] runs a grid of configurations, with a short and a long decode run. With a
//! sequence sharding ([`ReportOptions::sequence`]) each latent group's rows are cut by
//! the owner rule, every shard attends over its own tokens, and the shards' partial
//! outputs are merged with their log-sum-exps (merge (a) of `combine::sequence`, in f64)
//! before the groups' sum: the (g, s) hybrid, which must equal TPLA(g).

use crate::attention::reference::{
    self, kl_divergence, rotated_latents, slice_rows, slice_token, AppendMode, HeadOutputs,
};
use crate::calibration::{
    synthetic_layer_calibration, KlInputs, LayerCalibration, SyntheticCalibration, Window,
};
use crate::convert::{FoldedLayer, MlaWeights, RankWeights};
use crate::dtype::{e4m3_from_f64, DType, E4M3_MAX, E4M3_TO_F32, FP8_BLOCK};
use crate::error::{Error, Result};
use crate::geometry::{ModelDims, SequenceSharding, ShardPlan};
use crate::synthetic::{Query, SyntheticLayer, Tokens};
use crate::transform::{
    choose_mu, slice_energy_fractions, MuPolicy, SliceLayout, Transform, TransformKind,
};
use rayon::prelude::*;

/// Seed of the randomised Hadamard transform in the demo and the fidelity report.
pub const HADAMARD_SEED: u64 = 0x7a1a;

/// One decode query at the end of a scenario's sequence and its exact MLA output.
#[derive(Clone, Debug)]
pub struct Evaluated {
    /// Position of the query: it attends over tokens `0..=position`.
    pub position: usize,
    pub query: Query,
    pub exact: HeadOutputs,
}

/// A layer, a sequence to decode and the layer's calibration data.
pub struct Scenario {
    pub weights: MlaWeights,
    pub tokens: Tokens,
    pub evaluated: Vec<Evaluated>,
    pub calibration: LayerCalibration,
}

/// Synthetic calibration: a latent sequence for PCA and a window with two queries for kl.
const CALIBRATION: SyntheticCalibration = SyntheticCalibration {
    tokens: 4096,
    window: 2048,
    queries: 2,
    seed: 0,
};

fn exact_output(w: &MlaWeights, tokens: &Tokens, position: usize, q: &Query) -> HeadOutputs {
    let d = &w.dims;
    reference::mla_decode(
        w,
        &tokens.latents[..(position + 1) * d.d_c],
        &tokens.k_rope[..(position + 1) * d.d_r],
        &q.q_nope,
        &q.q_rope,
    )
}

impl Scenario {
    /// A synthetic layer of shape `dims` (seed `seed`), a sequence of `tokens` tokens whose
    /// last `queries` positions are evaluated, and a separate calibration sequence and
    /// window of the same layer.
    pub fn new(dims: &ModelDims, seed: u64, tokens: usize, queries: usize) -> Result<Self> {
        if queries == 0 || queries > tokens {
            return Err(Error::invalid(format!(
                "a scenario needs 1..={tokens} evaluated queries, got {queries}"
            )));
        }
        let layer = SyntheticLayer::generate(dims, seed)?;
        let seq = layer.sequence(tokens, seed.wrapping_add(1));
        let evaluated = (tokens - queries..tokens)
            .map(|t| {
                let query = layer.query_at(&seq, t);
                let exact = exact_output(&layer.weights, &seq.tokens, t, &query);
                Evaluated {
                    position: t,
                    query,
                    exact,
                }
            })
            .collect();
        let spec = SyntheticCalibration {
            seed: seed.wrapping_add(2),
            ..CALIBRATION
        };
        let (latents, window) = synthetic_layer_calibration(&layer, &spec)?;
        let calibration = LayerCalibration::from_latents(dims.d_c, &latents, Some(window))?;
        Ok(Scenario {
            weights: layer.weights,
            tokens: seq.tokens,
            evaluated,
            calibration,
        })
    }

    /// A checkpoint layer: its weights, its calibration data, and a window whose queries
    /// (which attend over all the window's tokens) are evaluated.
    pub fn from_window(
        weights: MlaWeights,
        calibration: LayerCalibration,
        window: &Window,
    ) -> Result<Self> {
        let d = weights.dims;
        let len = window.latents.len() / d.d_c;
        let queries = window.q_nope.len() / (d.heads * d.d_n);
        if len == 0
            || queries == 0
            || window.latents.len() != len * d.d_c
            || window.k_rope.len() != len * d.d_r
            || window.q_nope.len() != queries * d.heads * d.d_n
            || window.q_rope.len() != queries * d.heads * d.d_r
        {
            return Err(Error::invalid(
                "the evaluation window's shapes do not match the layer",
            ));
        }
        let tokens = Tokens {
            dims: d,
            latents: window.latents.clone(),
            k_rope: window.k_rope.clone(),
        };
        let evaluated = window
            .q_nope
            .chunks_exact(d.heads * d.d_n)
            .zip(window.q_rope.chunks_exact(d.heads * d.d_r))
            .map(|(qn, qr)| {
                let query = Query {
                    q_nope: qn.to_vec(),
                    q_rope: qr.to_vec(),
                };
                let exact = exact_output(&weights, &tokens, len - 1, &query);
                Evaluated {
                    position: len - 1,
                    query,
                    exact,
                }
            })
            .collect();
        Ok(Scenario {
            weights,
            tokens,
            evaluated,
            calibration,
        })
    }

    pub fn dims(&self) -> &ModelDims {
        &self.weights.dims
    }
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
        TransformKind::Pca => Transform::pca(&s.calibration.moment, layout, groups),
    }
}

/// A transform with everything derived from it that does not depend on the groups or mu.
pub struct Prepared {
    pub transform: Transform,
    pub folded: FoldedLayer,
    /// Rotated normalised latents of the scenario's sequence, `[T][d_c]`.
    pub rotated: Vec<f64>,
    /// The calibration window in the rotated basis, for the kl policy.
    kl: Option<KlInputs>,
}

impl Prepared {
    pub fn new(s: &Scenario, transform: Transform) -> Result<Self> {
        let folded = FoldedLayer::new(&s.weights, &transform)?;
        let kl = s
            .calibration
            .window
            .as_ref()
            .map(|w| KlInputs::new(&folded, &transform, w))
            .transpose()?;
        Ok(Prepared {
            rotated: rotated_latents(&s.tokens.latents, &transform),
            transform,
            folded,
            kl,
        })
    }

    /// Per-slice shares of the calibration latents' energy.
    pub fn fractions(&self, s: &Scenario, groups: usize) -> Result<Vec<f64>> {
        slice_energy_fractions(&self.transform, &s.calibration.moment, groups)
    }

    /// One mu per slice under `policy`.
    pub fn mus(&self, s: &Scenario, groups: usize, policy: MuPolicy) -> Result<Vec<f64>> {
        let kl = self.kl.as_ref().map(|k| k.calibration(s.dims()));
        choose_mu(policy, groups, &self.fractions(s, groups)?, kl.as_ref())
    }
}

/// How decode-time tokens are normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendChoice {
    Exact,
    SlicedRms,
}

impl AppendChoice {
    pub const ALL: [AppendChoice; 2] = [AppendChoice::Exact, AppendChoice::SlicedRms];

    pub fn name(self) -> &'static str {
        match self {
            AppendChoice::Exact => "exact",
            AppendChoice::SlicedRms => "sliced-rms",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown append mode '{name}'; expected one of: exact, sliced-rms"
                ))
            })
    }
}

/// How the cached rows are stored: as computed (f64), rounded to a cache element type,
/// or (a measurement only, not a cache type) FP8 with power-of-two block scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F64,
    Cache(DType),
    Fp8Pow2,
}

impl Storage {
    pub fn name(self) -> &'static str {
        match self {
            Storage::F64 => "f64",
            Storage::Cache(d) => d.name(),
            Storage::Fp8Pow2 => "fp8_e4m3_pow2",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f64" => Ok(Storage::F64),
            "fp8_e4m3_pow2" => Ok(Storage::Fp8Pow2),
            _ => DType::parse(name).map(Storage::Cache).map_err(|_| {
                Error::invalid(format!(
                    "unknown cache storage '{name}'; expected one of: f64, bf16, f16, f32, \
                     fp8_e4m3, fp8_e4m3_pow2"
                ))
            }),
        }
    }

    /// Rounds every row `[T][w + d_r]` as the cache would store it.
    fn round(self, rows: &mut [f64], w: usize, d_r: usize) {
        let rw = w + d_r;
        match self {
            Storage::F64 => {}
            Storage::Cache(dt) => {
                let mut bytes = vec![0u8; dt.row_bytes(w, d_r)];
                for row in rows.chunks_exact_mut(rw) {
                    dt.encode_row(row, w, &mut bytes);
                    dt.decode_row(&bytes, w, row);
                }
            }
            Storage::Fp8Pow2 => {
                for row in rows.chunks_exact_mut(rw) {
                    let (lat, rope) = row.split_at_mut(w);
                    for blk in lat.chunks_mut(FP8_BLOCK) {
                        let amax = blk.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                        // the smallest power of two that maps the block's maximum to 448
                        // or below
                        let scale = if amax > 0.0 {
                            2f64.powi((amax / E4M3_MAX).log2().ceil() as i32) as f32
                        } else {
                            1.0
                        };
                        for v in blk.iter_mut() {
                            let code = e4m3_from_f64(*v / scale as f64);
                            *v = (E4M3_TO_F32[code as usize] * scale) as f64;
                        }
                    }
                    let mut b = vec![0u8; 2 * rope.len()];
                    DType::Bf16.encode(rope, &mut b);
                    DType::Bf16.decode(&b, rope);
                }
            }
        }
    }
}

/// TPLA against exact MLA, averaged over the evaluated queries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Relative L2 error of the summed head outputs.
    pub rel_l2: f64,
    pub cosine: f64,
    /// Mean over heads and slices of KL(MLA attention || slice attention).
    pub kl: f64,
    /// Relative L2 distance of the summed head outputs from those of the same
    /// configuration over bf16 rows (`None` when bf16 is not in the report's storages).
    pub vs_bf16: Option<f64>,
}

/// Every rank's cache rows `[T][slice_width + d_r]`: the first `T - appended` tokens as
/// an exact prefill, the last `appended` appended per `append`.
fn rank_rows(
    s: &Scenario,
    prepared: &Prepared,
    groups: usize,
    append: AppendChoice,
    appended: usize,
) -> Result<Vec<Vec<f64>>> {
    let d = *s.dims();
    let len = s.tokens.len();
    if appended >= len {
        return Err(Error::invalid(format!(
            "{appended} appended tokens leave no prefill in a sequence of {len}"
        )));
    }
    let prefill = len - appended;
    let fractions = prepared.fractions(s, groups)?;
    (0..groups)
        .map(|i| {
            let plan = ShardPlan::new(&d, groups, i)?;
            let mut rows = slice_rows(
                &prepared.rotated[..prefill * d.d_c],
                &s.tokens.k_rope[..prefill * d.d_r],
                &plan,
                d.d_c,
            );
            let mode = match append {
                AppendChoice::Exact => AppendMode::Exact,
                AppendChoice::SlicedRms => AppendMode::SlicedRms {
                    fraction: fractions[i],
                },
            };
            for t in prefill..len {
                rows.extend(slice_token(
                    s.tokens.latent(t),
                    s.tokens.key_rope(t),
                    &prepared.transform,
                    &plan,
                    mode,
                )?);
            }
            Ok(rows)
        })
        .collect()
}

/// Decodes the evaluated queries over `rows` with slice logit scales `mus`.
fn measure(s: &Scenario, prepared: &Prepared, mus: &[f64], rows: &[Vec<f64>]) -> Result<Metrics> {
    Ok(measure_outputs(s, prepared, mus, rows, SequenceSharding::NONE)?.0)
}

/// One sequence shard's decode: its positions, latent outputs `[heads][w]`, log-sum-exps
/// `[heads]` and attention weights `[heads][positions]`.
type ShardPart = (Vec<usize>, Vec<f64>, Vec<f64>, Vec<f64>);

/// One latent group's decode over `rows` (`[len][slice_width + d_r]`) with its tokens
/// spread over the shards of `sharding`: each shard attends over the tokens the owner
/// rule gives it, and the shards' outputs are merged with their log-sum-exps (merge (a)).
/// Returns the group's partial head outputs and the merged attention weights in position
/// order, which equal those of one decode over every token to rounding.
fn sharded_rank_decode(
    rw: &RankWeights,
    rows: &[f64],
    q_nope: &[f64],
    q_rope: &[f64],
    sharding: SequenceSharding,
) -> HeadOutputs {
    if sharding.shards == 1 {
        return reference::tpla_rank_decode(rw, rows, q_nope, q_rope);
    }
    let shape = crate::attention::LatentShape {
        heads: rw.plan.heads,
        slice_width: rw.plan.slice_width,
        d_r: rw.dims.d_r,
    };
    let (rwid, w, heads) = (shape.row_width(), shape.slice_width, shape.heads);
    let len = rows.len() / rwid;
    let q = reference::rank_query(rw, q_nope, q_rope);
    // per shard: its positions, latent outputs [heads][w], log-sum-exps and weights
    let parts: Vec<ShardPart> = (0..sharding.shards)
        .map(|j| {
            let positions: Vec<usize> = (0..len)
                .filter(|&t| sharding.owner(t as u64) == j)
                .collect();
            if positions.is_empty() {
                return (
                    positions,
                    vec![0.0; heads * w],
                    vec![f64::NEG_INFINITY; heads],
                    Vec::new(),
                );
            }
            let mine: Vec<f64> = positions
                .iter()
                .flat_map(|&t| rows[t * rwid..(t + 1) * rwid].iter().copied())
                .collect();
            let (out, lse, probs) = reference::latent_attention_with_probs(&mine, &q, shape);
            (positions, out, lse, probs)
        })
        .collect();
    let mut latent = vec![0.0; heads * w];
    let mut probs = vec![0.0; heads * len];
    for h in 0..heads {
        let max = parts
            .iter()
            .map(|p| p.2[h])
            .fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = parts.iter().map(|p| (p.2[h] - max).exp()).sum();
        for (positions, out, lse, pr) in &parts {
            if positions.is_empty() {
                continue;
            }
            let weight = (lse[h] - max).exp() / total;
            for (o, x) in latent[h * w..(h + 1) * w]
                .iter_mut()
                .zip(&out[h * w..(h + 1) * w])
            {
                *o += weight * x;
            }
            let n = positions.len();
            for (k, &t) in positions.iter().enumerate() {
                probs[h * len + t] = weight * pr[h * n + k];
            }
        }
    }
    HeadOutputs {
        out: reference::project_latent(rw, &latent),
        probs,
    }
}

/// [`measure`], and the summed head outputs of every evaluated query.
fn measure_outputs(
    s: &Scenario,
    prepared: &Prepared,
    mus: &[f64],
    rows: &[Vec<f64>],
    sharding: SequenceSharding,
) -> Result<(Metrics, Vec<Vec<f64>>)> {
    let d = *s.dims();
    let groups = mus.len();
    let ranks = mus
        .iter()
        .enumerate()
        .map(|(i, &mu)| prepared.folded.rank(&ShardPlan::new(&d, groups, i)?, mu))
        .collect::<Result<Vec<RankWeights>>>()?;
    let mut m = Metrics {
        rel_l2: 0.0,
        cosine: 0.0,
        kl: 0.0,
        vs_bf16: None,
    };
    let mut outs = Vec::new();
    for e in &s.evaluated {
        let len = e.position + 1;
        let prefix: Vec<Vec<f64>> = rows
            .iter()
            .zip(&ranks)
            .map(|(r, w)| r[..len * (w.plan.slice_width + d.d_r)].to_vec())
            .collect();
        let parts: Vec<HeadOutputs> = ranks
            .iter()
            .zip(&prefix)
            .map(|(rw, r)| sharded_rank_decode(rw, r, &e.query.q_nope, &e.query.q_rope, sharding))
            .collect();
        let mut sum = vec![0.0; parts[0].out.len()];
        for p in &parts {
            for (s, v) in sum.iter_mut().zip(&p.out) {
                *s += v;
            }
        }
        m.rel_l2 += reference::rel_l2(&sum, &e.exact.out);
        m.cosine += reference::cosine(&sum, &e.exact.out);
        for part in &parts {
            for h in 0..d.heads {
                let span = h * len..(h + 1) * len;
                m.kl += kl_divergence(&e.exact.probs[span.clone()], &part.probs[span]);
            }
        }
        outs.push(sum);
    }
    let n = s.evaluated.len() as f64;
    m.rel_l2 /= n;
    m.cosine /= n;
    m.kl /= n * (groups * d.heads) as f64;
    Ok((m, outs))
}

/// Mean over queries of `|a - b| / |b|`.
fn mean_rel_l2(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let n = a.len() as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| reference::rel_l2(x, y))
        .sum::<f64>()
        / n
}

/// Every rank's rows stored as `storage` would.
fn stored(rows: &[Vec<f64>], storage: Storage, d: &ModelDims) -> Vec<Vec<f64>> {
    let groups = rows.len();
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            storage.round(&mut r, d.d_c / groups, d.d_r);
            r
        })
        .collect()
}

/// Decodes the scenario's evaluated queries under TPLA with `mus.len()` slices of
/// `prepared`'s transform and logit scales `mus`, the last `appended` tokens appended at
/// decode time per `append`.
pub fn evaluate(
    s: &Scenario,
    prepared: &Prepared,
    mus: &[f64],
    append: AppendChoice,
    appended: usize,
) -> Result<Metrics> {
    let rows = rank_rows(s, prepared, mus.len(), append, appended)?;
    measure(s, prepared, mus, &rows)
}

/// The grid of a fidelity report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportOptions {
    pub groups: Vec<usize>,
    /// Sequence shardings of each latent group (`[SequenceSharding::NONE]`: TPLA alone).
    pub sequence: Vec<SequenceSharding>,
    pub transforms: Vec<TransformKind>,
    pub policies: Vec<MuPolicy>,
    pub appends: Vec<AppendChoice>,
    /// How the cached rows are stored (f64: as computed, the fidelity of TPLA itself).
    pub storages: Vec<Storage>,
    /// PCA slice layout.
    pub layout: SliceLayout,
    /// Tokens appended at decode time in the short and the long run.
    pub short: usize,
    pub long: usize,
}

/// One configuration of a report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportRow {
    pub groups: usize,
    pub sharding: SequenceSharding,
    pub transform: TransformKind,
    pub policy: MuPolicy,
    pub mus: Vec<f64>,
    pub append: AppendChoice,
    pub storage: Storage,
    /// After the short decode run (`ReportOptions::short` appended tokens).
    pub short: Metrics,
    /// After the long one.
    pub long: Metrics,
}

/// Every configuration of `opts` on `s`, in the order groups, transform, append, mu
/// policy, sequence sharding, storage. (g, transform) blocks run in parallel on the rayon pool; cache rows
/// are built once per block and append mode and shared by the mu policies.
pub fn report(s: &Scenario, opts: &ReportOptions) -> Result<Vec<ReportRow>> {
    let blocks: Vec<(usize, TransformKind)> = opts
        .groups
        .iter()
        .flat_map(|&g| opts.transforms.iter().map(move |&t| (g, t)))
        .collect();
    let rows: Vec<Vec<ReportRow>> = blocks
        .par_iter()
        .map(|&(g, kind)| -> Result<Vec<ReportRow>> {
            let transform = build_transform(s, kind, opts.layout, g)?;
            let prepared = Prepared::new(s, transform)?;
            let mus: Vec<(MuPolicy, Vec<f64>)> = opts
                .policies
                .iter()
                .map(|&p| Ok((p, prepared.mus(s, g, p)?)))
                .collect::<Result<_>>()?;
            let mut out = Vec::new();
            for &append in &opts.appends {
                let short = rank_rows(s, &prepared, g, append, opts.short)?;
                let long = rank_rows(s, &prepared, g, append, opts.long)?;
                let d = s.dims();
                let with_bf16 = opts.storages.contains(&Storage::Cache(DType::Bf16));
                let runs = [&short, &long];
                for (policy, m) in &mus {
                    let bf16: Vec<Vec<Vec<f64>>> =
                        if with_bf16 {
                            runs.iter()
                                .map(|r| {
                                    let rows = stored(r, Storage::Cache(DType::Bf16), d);
                                    Ok(measure_outputs(
                                        s,
                                        &prepared,
                                        m,
                                        &rows,
                                        SequenceSharding::NONE,
                                    )?
                                    .1)
                                })
                                .collect::<Result<_>>()?
                        } else {
                            Vec::new()
                        };
                    for (&sharding, &storage) in opts
                        .sequence
                        .iter()
                        .flat_map(|sh| opts.storages.iter().map(move |st| (sh, st)))
                    {
                        let mut metrics = [None, None];
                        for (k, r) in runs.iter().enumerate() {
                            let rows = stored(r, storage, d);
                            let (mut met, outs) =
                                measure_outputs(s, &prepared, m, &rows, sharding)?;
                            met.vs_bf16 = bf16.get(k).map(|b| mean_rel_l2(&outs, b));
                            metrics[k] = Some(met);
                        }
                        out.push(ReportRow {
                            groups: g,
                            sharding,
                            transform: kind,
                            policy: *policy,
                            mus: m.clone(),
                            append,
                            storage,
                            short: metrics[0].expect("measured"),
                            long: metrics[1].expect("measured"),
                        });
                    }
                }
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(rows.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_shards_merge_to_the_groups_own_tpla() {
        let dims = ModelDims::new(4, 64, 16, 16, 16, 0.2).unwrap();
        let s = Scenario::new(&dims, 3, 45, 2).unwrap();
        let opts = ReportOptions {
            groups: vec![1, 2],
            sequence: [(1, 1), (2, 1), (3, 4), (8, 16)]
                .map(|(n, b)| SequenceSharding::new(n, b).unwrap())
                .to_vec(),
            transforms: vec![TransformKind::Hadamard],
            policies: vec![MuPolicy::One],
            appends: vec![AppendChoice::Exact],
            storages: vec![Storage::F64, Storage::Cache(DType::Bf16)],
            layout: SliceLayout::Contiguous,
            short: 2,
            long: 20,
        };
        let rows = report(&s, &opts).unwrap();
        assert_eq!(rows.len(), 2 * 4 * 2);
        for r in &rows {
            let base = rows
                .iter()
                .find(|b| {
                    b.groups == r.groups
                        && b.storage == r.storage
                        && b.sharding == SequenceSharding::NONE
                })
                .unwrap();
            for (m, b) in [(r.short, base.short), (r.long, base.long)] {
                assert!((m.rel_l2 - b.rel_l2).abs() < 1e-12, "{r:?}");
                assert!((m.kl - b.kl).abs() < 1e-12, "{r:?}");
            }
            if r.groups == 1 && r.storage == Storage::F64 {
                assert!(r.long.rel_l2 < 1e-12, "exact at g = 1: {r:?}");
            }
        }
    }

    #[test]
    fn storages_round_rows_as_their_caches_do() {
        for name in ["f64", "bf16", "f16", "f32", "fp8_e4m3", "fp8_e4m3_pow2"] {
            assert_eq!(Storage::parse(name).unwrap().name(), name);
        }
        assert!(Storage::parse("fp4").is_err());
        let (w, d_r) = (200, 8);
        let rows: Vec<f64> = (0..3 * (w + d_r))
            .map(|i| ((i * 7919) % 2001) as f64 / 1000.0 - 1.0)
            .collect();
        let mut f64_rows = rows.clone();
        Storage::F64.round(&mut f64_rows, w, d_r);
        assert_eq!(f64_rows, rows);
        for storage in [Storage::Cache(DType::Fp8E4m3), Storage::Fp8Pow2] {
            let mut r = rows.clone();
            storage.round(&mut r, w, d_r);
            let err = reference::rel_l2(&r, &rows);
            assert!(err > 1e-3 && err < 0.05, "{storage:?}: {err}");
            // the RoPE key is bf16 in both
            for (a, b) in r[w..w + d_r].iter().zip(&rows[w..w + d_r]) {
                assert_eq!(*a, half::bf16::from_f64(*b).to_f64());
            }
        }
        // an FP8 storage gives the cache's own rows
        let mut r = rows.clone();
        Storage::Cache(DType::Fp8E4m3).round(&mut r, w, d_r);
        let mut bytes = vec![0u8; DType::Fp8E4m3.row_bytes(w, d_r)];
        DType::Fp8E4m3.encode_row(&rows[..w + d_r], w, &mut bytes);
        let mut back = vec![0.0; w + d_r];
        DType::Fp8E4m3.decode_row(&bytes, w, &mut back);
        assert_eq!(back, r[..w + d_r]);
    }
}

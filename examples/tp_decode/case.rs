//! A small TPLA decode case with its f64 reference: synthetic layers, their prefill
//! exported to one shard file per latent group, each rank's folded weights and queries.
//! Shared by the `tp_decode` example and the device-rank tests.

use std::path::{Path, PathBuf};
use tpla::attention::reference::{rank_query, rotated_latents, slice_rows, tpla_decode};
use tpla::cache::{ExportPlan, ShardFileWriter, TransformId};
use tpla::convert::{FoldedLayer, RankWeights};
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::transform::Transform;
use tpla::{DType, ModelDims, Result, ShardPlan};

/// Page size of the exported shards (the device cache re-pages on upload).
const SHARD_PAGE: usize = 16;

pub struct Layer {
    transform: Transform,
    folded: FoldedLayer,
    /// Per sequence: its tokens and the query of its last token.
    seqs: Vec<(Tokens, Query)>,
}

pub struct TpCase {
    pub dims: ModelDims,
    /// Sequence ids and lengths, in export order.
    pub seqs: Vec<(u32, usize)>,
    pub layers: Vec<Layer>,
}

/// Logit scale of latent group `group` (not 1, so a rank that ignored mu would fail).
fn mu(group: usize) -> f64 {
    1.0 + 0.1 * group as f64
}

impl TpCase {
    /// `layers` synthetic layers of shape `dims` (Hadamard-rotated, seeded) holding one
    /// sequence per entry of `lens`.
    pub fn new(dims: ModelDims, layers: usize, lens: &[usize], seed: u64) -> Result<Self> {
        let seqs: Vec<(u32, usize)> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (10 + 3 * i as u32, n))
            .collect();
        let layers = (0..layers)
            .map(|l| {
                let layer = SyntheticLayer::generate(&dims, seed + 1000 * l as u64)?;
                let transform = Transform::hadamard(dims.d_c, seed + l as u64)?;
                let folded = FoldedLayer::new(&layer.weights, &transform)?;
                let seqs = seqs
                    .iter()
                    .map(|&(id, n)| {
                        let s = layer.sequence(n, seed ^ ((l as u64) << 32) ^ id as u64);
                        let q = layer.query_at(&s, n - 1);
                        (s.tokens, q)
                    })
                    .collect();
                Ok(Layer {
                    transform,
                    folded,
                    seqs,
                })
            })
            .collect::<Result<_>>()?;
        Ok(TpCase { dims, seqs, layers })
    }

    pub fn ids(&self) -> Vec<u32> {
        self.seqs.iter().map(|s| s.0).collect()
    }

    fn transform_ids(&self) -> Vec<TransformId> {
        self.layers
            .iter()
            .map(|l| TransformId {
                code: l.transform.kind().code(),
                fingerprint: l.transform.fingerprint(),
            })
            .collect()
    }

    /// Shard file of latent group `group` of `groups` in `dir`.
    pub fn shard_path(dir: &Path, groups: usize, group: usize) -> PathBuf {
        dir.join(format!("prefill.group{group}-of-{groups}.tpla"))
    }

    /// Exports the prefill cache, cut into `groups` slices, to one bf16 shard file per
    /// latent group in `dir`.
    pub fn export(&self, groups: usize, dir: &Path) -> Result<()> {
        let plan = ExportPlan::new(
            self.dims,
            groups,
            DType::Bf16,
            SHARD_PAGE,
            self.transform_ids(),
            &self.seqs,
        )?;
        let paths: Vec<PathBuf> = (0..groups)
            .map(|g| Self::shard_path(dir, groups, g))
            .collect();
        let mut w = ShardFileWriter::create(&plan, &paths)?;
        for layer in &self.layers {
            for (tokens, _) in &layer.seqs {
                w.push(
                    &rotated_latents(&tokens.latents, &layer.transform),
                    &tokens.k_rope,
                )?;
            }
        }
        w.commit()
    }

    /// Rank `plan`'s folded weights of every layer.
    pub fn weights(&self, plan: &ShardPlan) -> Result<Vec<RankWeights>> {
        self.layers
            .iter()
            .map(|l| l.folded.rank(plan, mu(plan.group)))
            .collect()
    }

    /// Rank `plan`'s query rows of `layer` for every sequence, in order:
    /// `[batch][heads][slice_width + d_r]`.
    pub fn queries(&self, plan: &ShardPlan, layer: usize) -> Result<Vec<f32>> {
        let w = self.layers[layer].folded.rank(plan, mu(plan.group))?;
        Ok(self.layers[layer]
            .seqs
            .iter()
            .flat_map(|(_, q)| rank_query(&w, &q.q_nope, &q.q_rope))
            .map(|v| v as f32)
            .collect())
    }

    /// The all-reduced head outputs of `layer` for every sequence (`[batch][heads][d_v]`)
    /// with one rank per latent group, in f64 from the exact (unrounded) cache.
    pub fn reference(&self, groups: usize, layer: usize) -> Result<Vec<f64>> {
        let l = &self.layers[layer];
        let plans = (0..groups)
            .map(|g| ShardPlan::new(&self.dims, groups, g))
            .collect::<Result<Vec<_>>>()?;
        let weights = plans
            .iter()
            .map(|p| l.folded.rank(p, mu(p.group)))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for (tokens, q) in &l.seqs {
            let rot = rotated_latents(&tokens.latents, &l.transform);
            let rows: Vec<Vec<f64>> = plans
                .iter()
                .map(|p| slice_rows(&rot, &tokens.k_rope, p, self.dims.d_c))
                .collect();
            out.extend(tpla_decode(&weights, &rows, &q.q_nope, &q.q_rope).1);
        }
        Ok(out)
    }
}

/// Worst relative L2 error over sequences of `got` (f32) against `want`, both
/// `[batch][per]`; NaN anywhere makes it infinite.
pub fn worst_rel_l2(got: &[f32], want: &[f64], per: usize) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.chunks(per)
        .zip(want.chunks(per))
        .map(|(g, w)| {
            let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
            let e = tpla::attention::reference::rel_l2(&g, w);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

//! Shared by the attention tests: random queries and one poisoned run of a backend (the
//! CPU backend tests, tests/cpu_backend.rs and tests/cpu_fp8.rs), synthetic sequences and
//! the latent groups' logit scales (the decode-context and sequence-shard tests), and
//! GPU 0 for the GPU tests, which skip without it.
#![allow(dead_code)] // each test crate uses its own subset

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::path::{Path, PathBuf};
use tpla::attention::reference::{self, rotated_latents, slice_rows};
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::cache::{ExportPlan, ShardFileWriter, TransformId};
use tpla::convert::RankWeights;
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::transform::Transform;
use tpla::{DType, ModelDims, Result, SequenceSharding};

/// Opens GPU 0, or says why not and returns None (the test then skips).
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<tpla::attention::cuda::CudaBackend> {
    match tpla::attention::cuda::CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipping: no usable CUDA device ({e})");
            None
        }
    }
}

/// Poisons `out` and `lse` (NaN bytes), runs `plan` over the slots `slots` of `cache`
/// with the queries `q` on the backend's stream, waits, and returns both.
#[cfg(feature = "cuda")]
pub fn launch_poisoned(
    backend: &tpla::attention::cuda::CudaBackend,
    plan: &tpla::attention::cuda::DecodePlan,
    cache: &tpla::attention::cuda::DeviceCache,
    slots: &tpla::attention::cuda::DeviceBuffer<i32>,
    q: &tpla::attention::cuda::DeviceBuffer<f32>,
    out: &mut tpla::attention::cuda::DeviceBuffer<f32>,
    lse: &mut tpla::attention::cuda::DeviceBuffer<f32>,
) -> (Vec<f32>, Vec<f32>) {
    out.fill_bytes(0xff).unwrap();
    lse.fill_bytes(0xff).unwrap();
    // SAFETY: the cache, slots, queries and outputs are live device buffers of the plan's
    // batch and shape (callers), on the backend's device and stream.
    unsafe {
        plan.launch(
            cache,
            slots.ptr(),
            q.ptr(),
            out.ptr(),
            lse.ptr(),
            backend.stream(),
        )
        .unwrap()
    };
    backend.device().synchronize().unwrap();
    (out.to_vec().unwrap(), lse.to_vec().unwrap())
}

/// Sequences of `layer` of `lens` tokens (sequence `i` drawn from seed `seed + i`): each
/// one's tokens and the query at its last token.
pub fn sequences(layer: &SyntheticLayer, lens: &[usize], seed: u64) -> Vec<(Tokens, Query)> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = layer.sequence(n, seed + i as u64);
            let q = layer.query_at(&s, n - 1);
            (s.tokens, q)
        })
        .collect()
}

/// Logit scale of latent group `group` of `groups` (not 1 with several groups, so that a
/// rank ignoring mu would fail).
pub fn mu(groups: usize, group: usize) -> f64 {
    if groups == 1 {
        1.0
    } else {
        1.0 + 0.1 * group as f64
    }
}

/// The f64 reference of one sequence `[heads][d_v]`: exact MLA of `layer` with one
/// latent group (one of `weights`), TPLA of the groups of `weights` with several (their
/// slices of the latents rotated by `transform`).
pub fn reference_decode(
    d: &ModelDims,
    layer: &SyntheticLayer,
    weights: &[RankWeights],
    transform: &Transform,
    tokens: &Tokens,
    q: &Query,
) -> Vec<f64> {
    if weights.len() == 1 {
        reference::mla_decode(
            &layer.weights,
            &tokens.latents,
            &tokens.k_rope,
            &q.q_nope,
            &q.q_rope,
        )
        .out
    } else {
        let rot = rotated_latents(&tokens.latents, transform);
        let rows: Vec<Vec<f64>> = weights
            .iter()
            .map(|w| slice_rows(&rot, &tokens.k_rope, &w.plan, d.d_c))
            .collect();
        reference::tpla_decode(weights, &rows, &q.q_nope, &q.q_rope).1
    }
}

pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Queries with logits of a few units (attention neither uniform nor one-hot).
pub fn random_queries(rng: &mut ChaCha8Rng, batch: usize, shape: LatentShape) -> Vec<f32> {
    let sigma = 2.5 / (shape.row_width() as f64).sqrt();
    (0..batch * shape.heads * shape.row_width())
        .map(|_| (sigma * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect()
}

/// Runs `backend` on sequences `0..batch` with NaN-poisoned outputs.
pub fn run(
    backend: &mut dyn LatentAttention,
    cache: &dyn RowSource,
    shape: LatentShape,
    q: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let batch = q.len() / (shape.heads * shape.row_width());
    let seqs: Vec<u32> = (0..batch as u32).collect();
    let mut out = vec![f32::NAN; batch * shape.heads * shape.slice_width];
    let mut lse = vec![f32::NAN; batch * shape.heads];
    backend.attend(cache, shape, &seqs, q, &mut out, &mut lse)?;
    Ok((out, lse))
}

/// A prefill of `seqs`: every sequence but its last `appended` tokens (the decode-time
/// ones), latents rotated by `transform`, rows of `dtype` in pages of `page_size` tokens.
pub struct Prefill<'a> {
    pub dims: ModelDims,
    pub seqs: &'a [(Tokens, Query)],
    pub transform: &'a Transform,
    pub appended: usize,
    pub dtype: DType,
    pub page_size: usize,
}

impl Prefill<'_> {
    /// The prefill exported into the `groups * sharding.shards` rank files of
    /// `groups x sharding` (format v2 when sharded) under `dir`.
    pub fn export(&self, groups: usize, sharding: SequenceSharding, dir: &Path) -> Vec<PathBuf> {
        let d = self.dims;
        let lens: Vec<(u32, usize)> = self
            .seqs
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (i as u32, t.len().saturating_sub(self.appended)))
            .collect();
        let plan = ExportPlan::hybrid(
            d,
            groups,
            sharding,
            self.dtype,
            self.page_size,
            vec![TransformId::of(self.transform)],
            &lens,
        )
        .unwrap();
        assert_eq!(plan.ranks(), groups * sharding.shards);
        let paths: Vec<PathBuf> = (0..plan.ranks())
            .map(|r| dir.join(format!("g{groups}-s{}-rank{r}.shard", sharding.shards)))
            .collect();
        let mut w = ShardFileWriter::create(&plan, &paths).unwrap();
        for ((tokens, _), &(_, n)) in self.seqs.iter().zip(&lens) {
            let rot = rotated_latents(&tokens.latents[..n * d.d_c], self.transform);
            w.push(&rot, &tokens.k_rope[..n * d.d_r]).unwrap();
        }
        w.commit().unwrap();
        paths
    }
}

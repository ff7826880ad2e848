//! Shared by the attention tests: random queries and one poisoned run of a backend (the
//! CPU backend tests, tests/cpu_backend.rs and tests/cpu_fp8.rs), synthetic sequences and
//! the latent groups' logit scales (the decode-context and sequence-shard tests), and
//! GPU 0 for the GPU tests, which skip without it.
#![allow(dead_code)] // each test crate uses its own subset

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::synthetic::{Query, SyntheticLayer, Tokens};
use tpla::Result;

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

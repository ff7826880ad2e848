//! Shared by the CPU backend tests (tests/cpu_backend.rs, tests/cpu_fp8.rs): random
//! queries and one poisoned run of a backend.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tpla::attention::{LatentAttention, LatentShape, RowSource};
use tpla::Result;

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

//! Shared helpers of the cache tests: small specs and seeded random rows.
#![allow(dead_code)] // each test crate uses its own subset

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tpla::attention::reference::gather_rows;
use tpla::cache::{RankCache, ShardSpec, TransformId};
use tpla::{DType, ModelDims, ShardPlan};

pub fn small_dims() -> ModelDims {
    ModelDims::new(4, 64, 16, 8, 8, 0.125).unwrap()
}

pub fn transforms(layers: usize) -> Vec<TransformId> {
    (0..layers)
        .map(|l| TransformId {
            code: 2,
            fingerprint: 0x9e37_79b9_7f4a_7c15 ^ l as u64,
        })
        .collect()
}

pub fn spec(
    dtype: DType,
    groups: usize,
    group: usize,
    page_size: usize,
    layers: usize,
) -> ShardSpec {
    let dims = small_dims();
    let plan = ShardPlan::new(&dims, groups, group).unwrap();
    ShardSpec::new(dims, &plan, dtype, page_size, transforms(layers)).unwrap()
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random_values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-3.0..3.0)).collect()
}

/// What the cache must give back for `values`: each rounded to the element type.
pub fn rounded(dtype: DType, values: &[f64]) -> Vec<f64> {
    let mut bytes = vec![0u8; values.len() * dtype.size()];
    dtype.encode(values, &mut bytes);
    let mut back = vec![0.0; values.len()];
    dtype.decode(&bytes, &mut back);
    back
}

/// Every row of `seq` in `layer`, decoded to f64.
pub fn rows_of(cache: &RankCache, layer: usize, seq: u32) -> Vec<f64> {
    gather_rows(&cache.layer(layer).unwrap(), seq).unwrap()
}

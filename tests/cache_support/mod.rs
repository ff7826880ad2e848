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
    gather_rows(
        &cache.layer(layer).unwrap(),
        seq,
        cache.spec().slice_width(),
    )
    .unwrap()
}

/// A synthetic prefill cache: per layer, per sequence, full-width rotated normalised
/// latent rows `[len][d_c]` and RoPE keys `[len][d_r]`.
pub struct Prefill {
    pub dims: ModelDims,
    pub layers: usize,
    pub sequences: Vec<(u32, usize)>,
    /// `[layer][sequence] -> (latent, rope)`
    pub rows: Vec<Vec<(Vec<f64>, Vec<f64>)>>,
}

impl Prefill {
    pub fn random(seed: u64, layers: usize, sequences: &[(u32, usize)]) -> Self {
        Self::random_with(small_dims(), seed, layers, sequences)
    }

    pub fn random_with(
        dims: ModelDims,
        seed: u64,
        layers: usize,
        sequences: &[(u32, usize)],
    ) -> Self {
        let mut rng = rng(seed);
        let rows = (0..layers)
            .map(|_| {
                sequences
                    .iter()
                    .map(|&(_, len)| {
                        (
                            random_values(&mut rng, len * dims.d_c),
                            random_values(&mut rng, len * dims.d_r),
                        )
                    })
                    .collect()
            })
            .collect();
        Prefill {
            dims,
            layers,
            sequences: sequences.to_vec(),
            rows,
        }
    }

    pub fn plan(&self, groups: usize, dtype: DType, page_size: usize) -> tpla::cache::ExportPlan {
        tpla::cache::ExportPlan::new(
            self.dims,
            groups,
            dtype,
            page_size,
            transforms(self.layers),
            &self.sequences,
        )
        .unwrap()
    }

    /// Rank `group`'s rows of sequence index `s` in `layer`, before rounding.
    pub fn slice(&self, groups: usize, group: usize, layer: usize, s: usize) -> Vec<f64> {
        let (d_c, d_r) = (self.dims.d_c, self.dims.d_r);
        let w = d_c / groups;
        let (latent, rope) = &self.rows[layer][s];
        let mut out = Vec::new();
        for t in 0..self.sequences[s].1 {
            out.extend_from_slice(&latent[t * d_c + group * w..t * d_c + (group + 1) * w]);
            out.extend_from_slice(&rope[t * d_r..(t + 1) * d_r]);
        }
        out
    }

    /// Every (layer, sequence) block in the order the writers take them.
    pub fn blocks(&self) -> impl Iterator<Item = &(Vec<f64>, Vec<f64>)> {
        self.rows.iter().flatten()
    }

    /// The g shard images, exported into memory buffers.
    pub fn export_buffers(&self, groups: usize, dtype: DType, page_size: usize) -> Vec<Vec<u8>> {
        let plan = self.plan(groups, dtype, page_size);
        let mut images = vec![vec![0u8; plan.image_len()]; groups];
        let mut w = tpla::cache::ShardWriter::to_buffers(
            &plan,
            images.iter_mut().map(|b| b.as_mut_slice()).collect(),
        )
        .unwrap();
        for (latent, rope) in self.blocks() {
            w.push(latent, rope).unwrap();
        }
        w.finish().unwrap();
        images
    }

    /// An in-memory cache of rank `group` holding the same rows, appended one layer
    /// at a time.
    pub fn in_memory(&self, spec: ShardSpec, capacity: usize) -> RankCache {
        let (groups, group) = (spec.groups(), spec.group());
        let mut cache = RankCache::new(spec, capacity).unwrap();
        for (s, &(id, _)) in self.sequences.iter().enumerate() {
            cache.add_sequence(id).unwrap();
            for layer in 0..self.layers {
                cache
                    .append_rows(id, layer, &self.slice(groups, group, layer, s))
                    .unwrap();
            }
        }
        cache
    }
}

pub mod hostile;
pub mod reseal;

/// What the cache must give back for rows `[..][w + d_r]` (`w` latent values each):
/// each row rounded to the element type, FP8 latent slices per scale block.
pub fn rounded_rows(dtype: DType, values: &[f64], w: usize, row_width: usize) -> Vec<f64> {
    let rb = dtype.row_bytes(w, row_width - w);
    let mut bytes = vec![0u8; rb];
    let mut out = vec![0.0; values.len()];
    for (row, o) in values
        .chunks_exact(row_width)
        .zip(out.chunks_exact_mut(row_width))
    {
        dtype.encode_row(row, w, &mut bytes);
        dtype.decode_row(&bytes, w, o);
    }
    out
}

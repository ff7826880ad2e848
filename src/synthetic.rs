//! Seeded synthetic MLA layers and hidden-state sequences for tests, the demo and the
//! benchmarks.
//!
//! Real MLA latents are strongly anisotropic: a few latent channels carry outliers and
//! the down-projection has a decaying spectrum, so slicing the identity basis loses much
//! more than slicing a PCA basis. The generator reproduces that, and hidden states are
//! correlated across positions (an AR(1) walk plus a few recurring "topic" directions)
//! so attention is far from uniform.

use crate::convert::MlaWeights;
use crate::error::{Error, Result};
use crate::geometry::ModelDims;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// RoPE base of DeepSeek-V2/V3 and Kimi-K2.
pub const ROPE_THETA: f64 = 10000.0;

/// Hidden width of synthetic layers: wider than the 512-wide latents of the presets (so
/// latents span the whole space, as in real models), small enough that a
/// DeepSeek-V3-shaped layer is generated in about a second.
pub const SYNTHETIC_HIDDEN: usize = 640;

/// A full MLA attention layer: the projections that make the cache and the query, plus
/// the up-projections and norm weight a checkpoint carries.
#[derive(Clone, Debug)]
pub struct SyntheticLayer {
    pub dims: ModelDims,
    pub hidden: usize,
    /// `[hidden][d_c]`: hidden state -> pre-norm latent `a_t`.
    pub w_dkv: Vec<f64>,
    /// `[hidden][d_r]`: hidden state -> RoPE key before rotation.
    pub w_kr: Vec<f64>,
    /// `[hidden][heads * (d_n + d_r)]`: hidden state -> per-head query (no-RoPE, RoPE).
    pub w_q: Vec<f64>,
    pub weights: MlaWeights,
}

/// Per-token cache entries of a sequence, as an MLA layer computes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub dims: ModelDims,
    /// Pre-norm latents `a_t`, `[T][d_c]`.
    pub latents: Vec<f64>,
    /// RoPE-rotated keys, `[T][d_r]`.
    pub k_rope: Vec<f64>,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.k_rope.len() / self.dims.d_r
    }
    pub fn is_empty(&self) -> bool {
        self.k_rope.is_empty()
    }
    pub fn latent(&self, t: usize) -> &[f64] {
        &self.latents[t * self.dims.d_c..(t + 1) * self.dims.d_c]
    }
    pub fn key_rope(&self, t: usize) -> &[f64] {
        &self.k_rope[t * self.dims.d_r..(t + 1) * self.dims.d_r]
    }
    /// The first `n` tokens.
    pub fn prefix(&self, n: usize) -> Tokens {
        Tokens {
            dims: self.dims,
            latents: self.latents[..n * self.dims.d_c].to_vec(),
            k_rope: self.k_rope[..n * self.dims.d_r].to_vec(),
        }
    }
}

/// One decode query: every head's no-RoPE and RoPE-rotated parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// `[heads][d_n]`
    pub q_nope: Vec<f64>,
    /// `[heads][d_r]`
    pub q_rope: Vec<f64>,
}

/// Hidden states of a sequence and the cache entries they produce.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// `[T][hidden]`
    pub hidden: Vec<f64>,
    pub tokens: Tokens,
}

fn gaussian(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| StandardNormal.sample(rng))
        .map(|x: f64| x * std)
        .collect()
}

/// Rotates `x` (even width, rotate-half convention) in place for position `pos`.
pub fn apply_rope(x: &mut [f64], pos: usize) {
    let half = x.len() / 2;
    for i in 0..half {
        let freq = ROPE_THETA.powf(-(2.0 * i as f64) / x.len() as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/// `y[n] = x[k] W[k][n]` for row-major `W` (`k` rows, `n` columns).
fn vec_mat(x: &[f64], w: &[f64], n: usize, y: &mut [f64]) {
    y.fill(0.0);
    for (xk, row) in x.iter().zip(w.chunks_exact(n)) {
        for (yj, wj) in y.iter_mut().zip(row) {
            *yj += xk * wj;
        }
    }
}

impl SyntheticLayer {
    /// A layer of the given shape. Same `(dims, seed)`, same layer.
    pub fn generate(dims: &ModelDims, seed: u64) -> Result<Self> {
        dims.validate()?;
        if dims.d_r % 2 != 0 {
            return Err(Error::invalid(format!(
                "RoPE width d_r = {} must be even",
                dims.d_r
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, dc, dr, dn, dv, hid) = (
            dims.heads,
            dims.d_c,
            dims.d_r,
            dims.d_n,
            dims.d_v,
            SYNTHETIC_HIDDEN,
        );
        // Down-projection with a decaying spectrum: W = A diag(s) B, then a few outlier
        // latent channels (as real kv_a_proj outputs have) scaled up.
        let rank = hid.min(dc);
        let a = gaussian(&mut rng, hid * rank, 1.0 / (hid as f64).sqrt());
        let b = gaussian(&mut rng, rank * dc, 1.0 / (dc as f64).sqrt());
        let mut w_dkv = vec![0.0; hid * dc];
        for k in 0..rank {
            let s = (dc as f64).sqrt() * (1.0 + k as f64 / 8.0).powf(-0.6);
            for i in 0..hid {
                let aik = a[i * rank + k] * s;
                let row = &mut w_dkv[i * dc..(i + 1) * dc];
                for (wj, bj) in row.iter_mut().zip(&b[k * dc..(k + 1) * dc]) {
                    *wj += aik * bj;
                }
            }
        }
        for _ in 0..dc.div_ceil(64) {
            let ch = rng.random_range(0..dc);
            let boost = 3.0 + 3.0 * rng.random::<f64>();
            for i in 0..hid {
                w_dkv[i * dc + ch] *= boost;
            }
        }
        let w_kr = gaussian(&mut rng, hid * dr, 1.0 / (hid as f64).sqrt());
        let w_q = gaussian(&mut rng, hid * h * (dn + dr), 1.0 / (hid as f64).sqrt());
        // Non-trivial norm weight: positive, spread over a decade.
        let gamma = (0..dc)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                (0.6 * z).exp()
            })
            .collect();
        // Up-projections sized so that logits have a spread of a few units: attention
        // is peaked, as in trained models.
        let w_uk = gaussian(&mut rng, h * dc * dn, 0.6 / (dc as f64).sqrt());
        let w_uv = gaussian(&mut rng, h * dc * dv, 1.0 / (dc as f64).sqrt());
        Ok(SyntheticLayer {
            dims: *dims,
            hidden: hid,
            w_dkv,
            w_kr,
            w_q,
            weights: MlaWeights::new(*dims, w_uk, w_uv, gamma)?,
        })
    }

    /// Hidden states of a sequence of `len` tokens: correlated across positions.
    pub fn hidden_states(&self, len: usize, seed: u64) -> Vec<f64> {
        let hid = self.hidden;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_eed0_f5e9);
        let topics: Vec<Vec<f64>> = (0..8).map(|_| gaussian(&mut rng, hid, 1.0)).collect();
        let rho: f64 = 0.6;
        let mut x = gaussian(&mut rng, hid, 1.0);
        let mut out = Vec::with_capacity(len * hid);
        for _ in 0..len {
            let noise = gaussian(&mut rng, hid, (1.0 - rho * rho).sqrt());
            let topic = &topics[rng.random_range(0..topics.len())];
            let weight = 0.8 * rng.random::<f64>();
            for i in 0..hid {
                x[i] = rho * x[i] + noise[i];
            }
            out.extend(x.iter().zip(topic).map(|(xi, ti)| xi + weight * ti));
        }
        out
    }

    /// Cache entries of the tokens at positions `start..` with hidden states `hidden`
    /// (`[T][hidden]`).
    pub fn cache_entries(&self, hidden: &[f64], start: usize) -> Tokens {
        let d = &self.dims;
        let len = hidden.len() / self.hidden;
        let mut t = Tokens {
            dims: *d,
            latents: vec![0.0; len * d.d_c],
            k_rope: vec![0.0; len * d.d_r],
        };
        for (i, x) in hidden.chunks_exact(self.hidden).enumerate() {
            vec_mat(
                x,
                &self.w_dkv,
                d.d_c,
                &mut t.latents[i * d.d_c..(i + 1) * d.d_c],
            );
            let kr = &mut t.k_rope[i * d.d_r..(i + 1) * d.d_r];
            vec_mat(x, &self.w_kr, d.d_r, kr);
            apply_rope(kr, start + i);
        }
        t
    }

    /// The query of the token with hidden state `x` at position `pos`.
    pub fn query(&self, x: &[f64], pos: usize) -> Query {
        let d = &self.dims;
        let qw = d.d_n + d.d_r;
        let mut q = vec![0.0; d.heads * qw];
        vec_mat(x, &self.w_q, d.heads * qw, &mut q);
        let mut out = Query {
            q_nope: Vec::with_capacity(d.heads * d.d_n),
            q_rope: Vec::with_capacity(d.heads * d.d_r),
        };
        for qh in q.chunks_exact_mut(qw) {
            out.q_nope.extend_from_slice(&qh[..d.d_n]);
            apply_rope(&mut qh[d.d_n..], pos);
            out.q_rope.extend_from_slice(&qh[d.d_n..]);
        }
        out
    }

    /// A sequence of `len` tokens at positions `0..len`.
    pub fn sequence(&self, len: usize, seed: u64) -> Sequence {
        let hidden = self.hidden_states(len, seed);
        let tokens = self.cache_entries(&hidden, 0);
        Sequence { hidden, tokens }
    }

    /// The query of token `t` of `seq`.
    pub fn query_at(&self, seq: &Sequence, t: usize) -> Query {
        self.query(&seq.hidden[t * self.hidden..(t + 1) * self.hidden], t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelDims {
        ModelDims::new(4, 64, 16, 32, 32, 0.15).unwrap()
    }

    #[test]
    fn generation_is_seeded_and_never_degenerate() {
        let d = small();
        let a = SyntheticLayer::generate(&d, 7).unwrap();
        let b = SyntheticLayer::generate(&d, 7).unwrap();
        let c = SyntheticLayer::generate(&d, 8).unwrap();
        assert_eq!(a.w_dkv, b.w_dkv);
        assert_ne!(a.w_dkv, c.w_dkv);
        let seq = a.sequence(50, 1);
        assert_eq!(seq.tokens, a.sequence(50, 1).tokens);
        assert_eq!(seq.tokens.len(), 50);
        let s = &seq.tokens;
        let q = a.query_at(&seq, 49);
        for v in [
            &s.latents,
            &s.k_rope,
            &q.q_nope,
            &q.q_rope,
            &a.weights.gamma,
        ] {
            assert!(v.iter().all(|x| x.is_finite()));
            let first = v[0];
            assert!(v.iter().any(|&x| x != first), "constant data");
        }
    }

    #[test]
    fn latents_are_anisotropic_and_correlated_across_positions() {
        let d = small();
        let layer = SyntheticLayer::generate(&d, 3).unwrap();
        let s = layer.sequence(400, 2).tokens;
        // channel energies spread over more than a decade (outliers, decaying spectrum)
        let mut energy = vec![0.0; d.d_c];
        for t in 0..s.len() {
            for (e, a) in energy.iter_mut().zip(s.latent(t)) {
                *e += a * a;
            }
        }
        let max = energy.iter().cloned().fold(0.0, f64::max);
        let min = energy.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(max > 10.0 * min, "max {max} min {min}");
        // neighbouring latents are more alike than distant ones
        let cos = |a: &[f64], b: &[f64]| {
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (n(a) * n(b))
        };
        let near: f64 = (0..300).map(|t| cos(s.latent(t), s.latent(t + 1))).sum();
        let far: f64 = (0..300).map(|t| cos(s.latent(t), s.latent(t + 97))).sum();
        assert!(near > far + 30.0, "near {near} far {far}");
    }

    #[test]
    fn rope_is_a_rotation_and_relative() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let q = gaussian(&mut rng, 16, 1.0);
        let k = gaussian(&mut rng, 16, 1.0);
        let score = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            apply_rope(&mut a, pq);
            apply_rope(&mut b, pk);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
        };
        assert!((score(10, 3) - score(107, 100)).abs() < 1e-9);
        let mut a = q.clone();
        apply_rope(&mut a, 1234);
        let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        assert!((n(&a) - n(&q)).abs() < 1e-9);
    }
}

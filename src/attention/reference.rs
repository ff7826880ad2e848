//! The f64 oracle: exact MLA (non-absorbed and absorbed), causal prefill, TPLA decode,
//! latent attention over a slice cache, and the append of decode-time tokens.
//!
//! Everything here favours obviousness over speed; every other backend is tested
//! against it.

use super::{LatentAttention, LatentShape, RowSource};
use crate::convert::{MlaWeights, RankWeights};
use crate::error::{Error, Result};
use crate::geometry::ShardPlan;
use crate::synthetic::{Query, Tokens};
use crate::transform::Transform;

/// Numerically stable softmax of `scores` in place; returns the log-sum-exp.
pub fn softmax_in_place(scores: &mut [f64]) -> f64 {
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
    max + sum.ln()
}

/// Dot product with eight partial sums, so the compiler vectorises it (f64 here, f32 in
/// the decode context's query absorption).
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + std::iter::Sum,
{
    let mut acc = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = acc[k] + x[k] * y[k];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// Latent attention over contiguous rows (`[T][slice_width + d_r]`) for `[heads]` query
/// rows: returns the latent outputs `[heads][slice_width]` and the log-sum-exps `[heads]`.
pub fn latent_attention(rows: &[f64], q: &[f64], shape: LatentShape) -> (Vec<f64>, Vec<f64>) {
    let (out, lse, _) = latent_attention_with_probs(rows, q, shape);
    (out, lse)
}

/// [`latent_attention`] that also returns the attention weights `[heads][T]`.
pub fn latent_attention_with_probs(
    rows: &[f64],
    q: &[f64],
    shape: LatentShape,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rw = shape.row_width();
    let w = shape.slice_width;
    let len = rows.len() / rw;
    let mut out = vec![0.0; shape.heads * w];
    let mut lse = vec![0.0; shape.heads];
    let mut probs = vec![0.0; shape.heads * len];
    for h in 0..shape.heads {
        let qh = &q[h * rw..(h + 1) * rw];
        let p = &mut probs[h * len..(h + 1) * len];
        for (t, pt) in p.iter_mut().enumerate() {
            *pt = dot(qh, &rows[t * rw..(t + 1) * rw]);
        }
        lse[h] = softmax_in_place(p);
        let o = &mut out[h * w..(h + 1) * w];
        for (t, pt) in p.iter().enumerate() {
            for (oj, rj) in o.iter_mut().zip(&rows[t * rw..t * rw + w]) {
                *oj += pt * rj;
            }
        }
    }
    (out, lse, probs)
}

/// Decodes every row of sequence `seq` of `cache` (latent slices of width `slice_width`)
/// to f64, `[len][row_width]`.
pub fn gather_rows(cache: &dyn RowSource, seq: u32, slice_width: usize) -> Result<Vec<f64>> {
    let len = cache.seq_len(seq)?;
    let rw = cache.row_width();
    let (dt, w) = (cache.dtype(), slice_width);
    let row_bytes = dt.row_bytes(w, rw - w);
    let ps = cache.page_size();
    let mut rows = vec![0.0; len * rw];
    for (page, chunk) in rows.chunks_mut(ps * rw).enumerate() {
        let bytes = cache.page(seq, page);
        for (k, row) in chunk.chunks_exact_mut(rw).enumerate() {
            dt.decode_row(&bytes[k * row_bytes..][..row_bytes], w, row);
        }
    }
    Ok(rows)
}

/// The oracle as a backend: decodes the cache to f64 and runs [`latent_attention`].
#[derive(Debug, Default)]
pub struct Reference;

impl LatentAttention for Reference {
    fn name(&self) -> String {
        "reference (f64)".into()
    }

    fn attend(
        &mut self,
        cache: &dyn RowSource,
        shape: LatentShape,
        seqs: &[u32],
        q: &[f32],
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        check_attend_args(cache, shape, seqs, q, out, lse)?;
        let (rw, w, h) = (shape.row_width(), shape.slice_width, shape.heads);
        for (b, &seq) in seqs.iter().enumerate() {
            let rows = gather_rows(cache, seq, w)?;
            let qb: Vec<f64> = q[b * h * rw..(b + 1) * h * rw]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let (o, l) = latent_attention(&rows, &qb, shape);
            for (dst, src) in out[b * h * w..(b + 1) * h * w].iter_mut().zip(o) {
                *dst = src as f32;
            }
            for (dst, src) in lse[b * h..(b + 1) * h].iter_mut().zip(l) {
                *dst = src as f32;
            }
        }
        Ok(())
    }
}

/// The argument checks every backend's `attend` performs first.
pub fn check_attend_args(
    cache: &dyn RowSource,
    shape: LatentShape,
    seqs: &[u32],
    q: &[f32],
    out: &[f32],
    lse: &[f32],
) -> Result<()> {
    let b = seqs.len();
    if cache.row_width() != shape.row_width() {
        return Err(Error::mismatch(format!(
            "cache rows are {} wide but the query rows are {} ({} latent + {} RoPE)",
            cache.row_width(),
            shape.row_width(),
            shape.slice_width,
            shape.d_r
        )));
    }
    for (what, got, want) in [
        ("query", q.len(), b * shape.heads * shape.row_width()),
        ("output", out.len(), b * shape.heads * shape.slice_width),
        ("log-sum-exp", lse.len(), b * shape.heads),
    ] {
        if got != want {
            return Err(Error::invalid(format!(
                "{what} buffer holds {got} values, expected {want} for batch {b}, {} heads",
                shape.heads
            )));
        }
    }
    for &seq in seqs {
        if cache.seq_len(seq)? == 0 {
            return Err(Error::invalid(format!(
                "sequence {seq} is empty: decode needs at least one cached token"
            )));
        }
    }
    Ok(())
}

/// Epsilon of kv_a_layernorm in DeepSeek-V2/V3 and Kimi-K2.
pub const RMS_EPS: f64 = 1e-6;

/// `a / rms(a)`: the weightless normalised latent the TPLA cache holds (gamma is folded
/// into the up-projections).
pub fn normalise(a: &[f64]) -> Vec<f64> {
    let rms = (a.iter().map(|x| x * x).sum::<f64>() / a.len() as f64 + RMS_EPS).sqrt();
    a.iter().map(|x| x / rms).collect()
}

/// How a decode-time token's latent is normalised before slicing (DESIGN 3.4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AppendMode {
    /// Normalise with the full latent's RMS (the engine has the full `a_t`).
    Exact,
    /// Estimate the RMS from the rank's slice alone: `rms^2 ~= |slice|^2 / (d_c * fraction)`
    /// where `fraction` is the slice's share of the latent energy.
    SlicedRms { fraction: f64 },
}

/// The cache row a rank keeps for a token with pre-norm latent `a` and RoPE key
/// `k_rope`: its slice of the rotated normalised latent, then the RoPE key.
pub fn slice_token(
    a: &[f64],
    k_rope: &[f64],
    transform: &Transform,
    plan: &ShardPlan,
    mode: AppendMode,
) -> Result<Vec<f64>> {
    let d_c = transform.dim();
    if a.len() != d_c {
        return Err(Error::invalid(format!(
            "latent has {} values, the transform is {d_c} wide",
            a.len()
        )));
    }
    if plan.slice_start + plan.slice_width > d_c {
        return Err(Error::mismatch("shard plan slice lies outside the latent"));
    }
    let slice = plan.slice_start..plan.slice_start + plan.slice_width;
    let mut y = vec![0.0; d_c];
    let mut row = Vec::with_capacity(plan.slice_width + k_rope.len());
    match mode {
        AppendMode::Exact => {
            transform.rotate(&normalise(a), &mut y);
            row.extend_from_slice(&y[slice]);
        }
        AppendMode::SlicedRms { fraction } => {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(Error::invalid(format!(
                    "slice energy fraction must lie in (0, 1], got {fraction}"
                )));
            }
            // Rotation commutes with the scalar normalisation, so rotate the raw latent.
            transform.rotate(a, &mut y);
            let s = &y[slice];
            let energy: f64 = s.iter().map(|x| x * x).sum();
            let rms = (energy / (d_c as f64 * fraction) + RMS_EPS).sqrt();
            row.extend(s.iter().map(|x| x / rms));
        }
    }
    row.extend_from_slice(k_rope);
    Ok(row)
}

/// Full-width cache rows of a prefill: rotated normalised latents `[T][d_c]`, exact.
pub fn rotated_latents(latents: &[f64], transform: &Transform) -> Vec<f64> {
    let d_c = transform.dim();
    let mut out = vec![0.0; latents.len()];
    for (a, y) in latents.chunks_exact(d_c).zip(out.chunks_exact_mut(d_c)) {
        transform.rotate(&normalise(a), y);
    }
    out
}

/// `[T][d_c]` -> the rank's rows `[T][slice_width + d_r]` (slice of each latent, RoPE key).
pub fn slice_rows(rotated: &[f64], k_rope: &[f64], plan: &ShardPlan, d_c: usize) -> Vec<f64> {
    let d_r = k_rope.len() / (rotated.len() / d_c).max(1);
    let mut rows = Vec::with_capacity(rotated.len() / d_c * (plan.slice_width + d_r));
    for (y, kr) in rotated.chunks_exact(d_c).zip(k_rope.chunks_exact(d_r)) {
        rows.extend_from_slice(&y[plan.slice_start..plan.slice_start + plan.slice_width]);
        rows.extend_from_slice(kr);
    }
    rows
}

/// MLA's cached latents `c_t = gamma * a_t / rms(a_t)`, `[T][d_c]`.
fn kv_latents(w: &MlaWeights, latents: &[f64]) -> Vec<f64> {
    latents
        .chunks_exact(w.dims.d_c)
        .flat_map(|a| normalise(a).into_iter().zip(&w.gamma).map(|(n, g)| n * g))
        .collect()
}

/// Decode of one query: per-head outputs and attention weights.
#[derive(Clone, Debug)]
pub struct HeadOutputs {
    /// `[heads][d_v]`
    pub out: Vec<f64>,
    /// `[heads][T]`
    pub probs: Vec<f64>,
}

/// Exact MLA decode, non-absorbed: materialises every head's key `[c W_UK, k_rope]` and
/// value `c W_UV` for every cached token (`latents` pre-norm `[T][d_c]`).
pub fn mla_decode_naive(
    w: &MlaWeights,
    latents: &[f64],
    k_rope: &[f64],
    q_nope: &[f64],
    q_rope: &[f64],
) -> HeadOutputs {
    let d = &w.dims;
    let len = latents.len() / d.d_c;
    let c = kv_latents(w, latents);
    let mut out = vec![0.0; d.heads * d.d_v];
    let mut probs = vec![0.0; d.heads * len];
    for h in 0..d.heads {
        let (wk, wv) = (w.w_uk_head(h), w.w_uv_head(h));
        let qn = &q_nope[h * d.d_n..(h + 1) * d.d_n];
        let qr = &q_rope[h * d.d_r..(h + 1) * d.d_r];
        let p = &mut probs[h * len..(h + 1) * len];
        for t in 0..len {
            let mut key = vec![0.0; d.d_n];
            for (ci, row) in c[t * d.d_c..(t + 1) * d.d_c]
                .iter()
                .zip(wk.chunks_exact(d.d_n))
            {
                for (kj, wj) in key.iter_mut().zip(row) {
                    *kj += ci * wj;
                }
            }
            p[t] = d.softmax_scale * (dot(qn, &key) + dot(qr, &k_rope[t * d.d_r..(t + 1) * d.d_r]));
        }
        softmax_in_place(p);
        let o = &mut out[h * d.d_v..(h + 1) * d.d_v];
        for t in 0..len {
            for (ci, row) in c[t * d.d_c..(t + 1) * d.d_c]
                .iter()
                .zip(wv.chunks_exact(d.d_v))
            {
                for (oj, wj) in o.iter_mut().zip(row) {
                    *oj += p[t] * ci * wj;
                }
            }
        }
    }
    HeadOutputs { out, probs }
}

/// `x W` for `W` stored `[k][n]` and `x` of width `k`: returns width `n`.
fn vec_mat(x: &[f64], w: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; n];
    for (xk, row) in x.iter().zip(w.chunks_exact(n)) {
        for (yj, wj) in y.iter_mut().zip(row) {
            *yj += xk * wj;
        }
    }
    y
}

/// `W x` for `W` stored `[k][n]` and `x` of width `n`: returns width `k`.
fn mat_vec(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| dot(row, x)).collect()
}

/// Exact MLA decode, absorbed: `q_lat = W_UK q_nope` attends over the normalised latents.
pub fn mla_decode(
    w: &MlaWeights,
    latents: &[f64],
    k_rope: &[f64],
    q_nope: &[f64],
    q_rope: &[f64],
) -> HeadOutputs {
    let d = &w.dims;
    let len = latents.len() / d.d_c;
    let c = kv_latents(w, latents);
    let mut out = vec![0.0; d.heads * d.d_v];
    let mut probs = vec![0.0; d.heads * len];
    for h in 0..d.heads {
        let q_lat = mat_vec(w.w_uk_head(h), &q_nope[h * d.d_n..(h + 1) * d.d_n]);
        let qr = &q_rope[h * d.d_r..(h + 1) * d.d_r];
        let p = &mut probs[h * len..(h + 1) * len];
        for t in 0..len {
            p[t] = d.softmax_scale
                * (dot(&q_lat, &c[t * d.d_c..(t + 1) * d.d_c])
                    + dot(qr, &k_rope[t * d.d_r..(t + 1) * d.d_r]));
        }
        softmax_in_place(p);
        let mut o = vec![0.0; d.d_c];
        for t in 0..len {
            for (oj, cj) in o.iter_mut().zip(&c[t * d.d_c..(t + 1) * d.d_c]) {
                *oj += p[t] * cj;
            }
        }
        out[h * d.d_v..(h + 1) * d.d_v].copy_from_slice(&vec_mat(&o, w.w_uv_head(h), d.d_v));
    }
    HeadOutputs { out, probs }
}

/// Causal MLA prefill: token `t` attends to tokens `0..=t`. Returns `[T][heads][d_v]`.
pub fn mla_prefill(w: &MlaWeights, tokens: &Tokens, queries: &[Query]) -> Vec<f64> {
    let d = &w.dims;
    let mut out = Vec::with_capacity(tokens.len() * d.heads * d.d_v);
    for (t, q) in queries.iter().enumerate().take(tokens.len()) {
        let r = mla_decode(
            w,
            &tokens.latents[..(t + 1) * d.d_c],
            &tokens.k_rope[..(t + 1) * d.d_r],
            &q.q_nope,
            &q.q_rope,
        );
        out.extend_from_slice(&r.out);
    }
    out
}

/// A rank's query rows for latent attention: `[heads][slice_width + d_r]`, the absorbed
/// latent query times `scale * mu`, then the RoPE query times `scale`.
pub fn rank_query(rw: &RankWeights, q_nope: &[f64], q_rope: &[f64]) -> Vec<f64> {
    let d = &rw.dims;
    let (w, p) = (rw.plan.slice_width, &rw.plan);
    let mut q = Vec::with_capacity(p.heads * (w + d.d_r));
    for i in 0..p.heads {
        let h = p.head_start + i;
        let wk = &rw.w_uk[i * w * d.d_n..(i + 1) * w * d.d_n];
        let q_lat = mat_vec(wk, &q_nope[h * d.d_n..(h + 1) * d.d_n]);
        q.extend(q_lat.iter().map(|x| x * d.softmax_scale * rw.mu));
        q.extend(
            q_rope[h * d.d_r..(h + 1) * d.d_r]
                .iter()
                .map(|x| x * d.softmax_scale),
        );
    }
    q
}

/// A rank's latent outputs `[heads][slice_width]` -> its partial head outputs
/// `[heads][d_v]` (the all-reduce sums these over ranks).
pub fn project_latent(rw: &RankWeights, latent: &[f64]) -> Vec<f64> {
    let (w, dv) = (rw.plan.slice_width, rw.dims.d_v);
    let mut out = Vec::with_capacity(rw.plan.heads * dv);
    for i in 0..rw.plan.heads {
        let wv = &rw.w_uv[i * w * dv..(i + 1) * w * dv];
        out.extend(vec_mat(&latent[i * w..(i + 1) * w], wv, dv));
    }
    out
}

/// One rank's TPLA decode of one query over its rows `[T][slice_width + d_r]`: its
/// partial head outputs and the attention weights of its sliced softmax.
pub fn tpla_rank_decode(
    rw: &RankWeights,
    rows: &[f64],
    q_nope: &[f64],
    q_rope: &[f64],
) -> HeadOutputs {
    let shape = LatentShape {
        heads: rw.plan.heads,
        slice_width: rw.plan.slice_width,
        d_r: rw.dims.d_r,
    };
    let q = rank_query(rw, q_nope, q_rope);
    let (latent, _, probs) = latent_attention_with_probs(rows, &q, shape);
    HeadOutputs {
        out: project_latent(rw, &latent),
        probs,
    }
}

/// TPLA decode over all ranks of a layer (one per latent group): each rank's partial
/// output and their sum, the all-reduced head outputs.
pub fn tpla_decode(
    ranks: &[RankWeights],
    rows: &[Vec<f64>],
    q_nope: &[f64],
    q_rope: &[f64],
) -> (Vec<HeadOutputs>, Vec<f64>) {
    let parts: Vec<HeadOutputs> = ranks
        .iter()
        .zip(rows)
        .map(|(rw, r)| tpla_rank_decode(rw, r, q_nope, q_rope))
        .collect();
    let mut sum = vec![0.0; parts[0].out.len()];
    for p in &parts {
        for (s, v) in sum.iter_mut().zip(&p.out) {
            *s += v;
        }
    }
    (parts, sum)
}

/// `|a - b| / |b|` (relative L2 error of `a` against the truth `b`); NaN if either holds
/// a NaN, so a NaN never passes a `<` check.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// `KL(p || q)` of two distributions over the same support.
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| pi * (pi / qi).ln())
        .sum()
}

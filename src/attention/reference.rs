//! The f64 oracle: exact MLA (non-absorbed and absorbed), causal prefill, TPLA decode,
//! latent attention over a slice cache, and the append of decode-time tokens.
//!
//! Everything here favours obviousness over speed; every other backend is tested
//! against it.

use super::{LatentAttention, LatentShape, RowSource};
use crate::error::{Error, Result};

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

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Latent attention over contiguous rows (`[T][slice_width + d_r]`) for `[heads]` query
/// rows: returns the latent outputs `[heads][slice_width]` and the log-sum-exps `[heads]`.
pub fn latent_attention(rows: &[f64], q: &[f64], shape: LatentShape) -> (Vec<f64>, Vec<f64>) {
    let rw = shape.row_width();
    let w = shape.slice_width;
    let len = rows.len() / rw;
    let mut out = vec![0.0; shape.heads * w];
    let mut lse = vec![0.0; shape.heads];
    let mut p = vec![0.0; len];
    for h in 0..shape.heads {
        let qh = &q[h * rw..(h + 1) * rw];
        for (t, pt) in p.iter_mut().enumerate() {
            *pt = dot(qh, &rows[t * rw..(t + 1) * rw]);
        }
        lse[h] = softmax_in_place(&mut p);
        let o = &mut out[h * w..(h + 1) * w];
        for (t, pt) in p.iter().enumerate() {
            for (oj, rj) in o.iter_mut().zip(&rows[t * rw..t * rw + w]) {
                *oj += pt * rj;
            }
        }
    }
    (out, lse)
}

/// Decodes every row of sequence `seq` of `cache` to f64, `[len][row_width]`.
pub fn gather_rows(cache: &dyn RowSource, seq: u32) -> Result<Vec<f64>> {
    let len = cache.seq_len(seq)?;
    let rw = cache.row_width();
    let dt = cache.dtype();
    let ps = cache.page_size();
    let mut rows = vec![0.0; len * rw];
    for (page, chunk) in rows.chunks_mut(ps * rw).enumerate() {
        let bytes = &cache.page(seq, page)[..chunk.len() * dt.size()];
        dt.decode(bytes, chunk);
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
            let rows = gather_rows(cache, seq)?;
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

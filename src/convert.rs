//! Weight folding: from a checkpoint's MLA up-projections and norm weight, and a layer's
//! orthogonal transform `U`, the per-rank absorbed weights of TPLA (DESIGN 3.1-3.2):
//!
//! `W'_UK,h = (U^T diag(gamma) W_UK,h)[S_i, :]`, `W'_UV,h = (U^T diag(gamma) W_UV,h)[S_i, :]`
//!
//! g = 1 (plain MLA) goes through the same code with a single slice of full width.

use crate::error::{Error, Result};
use crate::geometry::{ModelDims, ShardPlan};
use crate::transform::Transform;
use nalgebra::DMatrix;

/// The MLA weights of one layer that TPLA re-parameterises.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaWeights {
    pub dims: ModelDims,
    /// `[heads][d_c][d_n]`: latent -> per-head no-RoPE key (first half of kv_b_proj).
    pub w_uk: Vec<f64>,
    /// `[heads][d_c][d_v]`: latent -> per-head value (second half of kv_b_proj).
    pub w_uv: Vec<f64>,
    /// `[d_c]`: kv_a_layernorm weight.
    pub gamma: Vec<f64>,
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(format!(
            "{what} has {got} values, expected {want}"
        )));
    }
    Ok(())
}

fn check_finite(what: &str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!(
            "{what} holds a non-finite value at index {i}"
        ))),
        None => Ok(()),
    }
}

impl MlaWeights {
    pub fn new(dims: ModelDims, w_uk: Vec<f64>, w_uv: Vec<f64>, gamma: Vec<f64>) -> Result<Self> {
        dims.validate()?;
        check_len("W_UK", w_uk.len(), dims.heads * dims.d_c * dims.d_n)?;
        check_len("W_UV", w_uv.len(), dims.heads * dims.d_c * dims.d_v)?;
        check_len("gamma", gamma.len(), dims.d_c)?;
        check_finite("W_UK", &w_uk)?;
        check_finite("W_UV", &w_uv)?;
        check_finite("gamma", &gamma)?;
        Ok(MlaWeights {
            dims,
            w_uk,
            w_uv,
            gamma,
        })
    }

    pub fn w_uk_head(&self, h: usize) -> &[f64] {
        let n = self.dims.d_c * self.dims.d_n;
        &self.w_uk[h * n..(h + 1) * n]
    }

    pub fn w_uv_head(&self, h: usize) -> &[f64] {
        let n = self.dims.d_c * self.dims.d_v;
        &self.w_uv[h * n..(h + 1) * n]
    }
}

/// `U^T diag(gamma) W` for every head, full latent width: the layer's absorbed weights
/// before slicing. Ranks cut their slices from it with [`FoldedLayer::rank`].
#[derive(Clone, Debug)]
pub struct FoldedLayer {
    pub dims: ModelDims,
    /// `[heads][d_c][d_n]`
    pub w_uk: Vec<f64>,
    /// `[heads][d_c][d_v]`
    pub w_uv: Vec<f64>,
    pub transform_code: u32,
    pub transform_fingerprint: u64,
}

/// Returns `U^T diag(gamma) W` with `W` given as `[heads][d_c][width]`.
fn fold_matrix(u: &DMatrix<f64>, gamma: &[f64], w: &[f64], heads: usize, width: usize) -> Vec<f64> {
    let d_c = gamma.len();
    // Columns of `m` are (head, output) pairs; rows are latent channels.
    let m = DMatrix::from_fn(d_c, heads * width, |c, col| {
        let (h, j) = (col / width, col % width);
        gamma[c] * w[(h * d_c + c) * width + j]
    });
    let folded = u.transpose() * m;
    let mut out = vec![0.0; heads * d_c * width];
    for h in 0..heads {
        for c in 0..d_c {
            for j in 0..width {
                out[(h * d_c + c) * width + j] = folded[(c, h * width + j)];
            }
        }
    }
    out
}

impl FoldedLayer {
    pub fn new(weights: &MlaWeights, transform: &Transform) -> Result<Self> {
        let d = weights.dims;
        if transform.dim() != d.d_c {
            return Err(Error::mismatch(format!(
                "transform is {} wide but the layer's latent width d_c is {}",
                transform.dim(),
                d.d_c
            )));
        }
        let u = DMatrix::from_row_slice(d.d_c, d.d_c, &transform.matrix());
        Ok(FoldedLayer {
            dims: d,
            w_uk: fold_matrix(&u, &weights.gamma, &weights.w_uk, d.heads, d.d_n),
            w_uv: fold_matrix(&u, &weights.gamma, &weights.w_uv, d.heads, d.d_v),
            transform_code: transform.kind().code(),
            transform_fingerprint: transform.fingerprint(),
        })
    }

    /// The slice and heads of `plan`'s rank, with its logit scale `mu`.
    pub fn rank(&self, plan: &ShardPlan, mu: f64) -> Result<RankWeights> {
        let d = &self.dims;
        if plan.slice_start + plan.slice_width > d.d_c || plan.head_start + plan.heads > d.heads {
            return Err(Error::mismatch(
                "shard plan does not belong to this layer's geometry",
            ));
        }
        if !(mu.is_finite() && mu > 0.0) {
            return Err(Error::invalid(format!(
                "mu must be finite and positive, got {mu}"
            )));
        }
        let cut = |w: &[f64], width: usize| {
            let mut out = Vec::with_capacity(plan.heads * plan.slice_width * width);
            for h in plan.head_start..plan.head_start + plan.heads {
                let start = (h * d.d_c + plan.slice_start) * width;
                out.extend_from_slice(&w[start..start + plan.slice_width * width]);
            }
            out
        };
        Ok(RankWeights {
            dims: *d,
            plan: *plan,
            mu,
            w_uk: cut(&self.w_uk, d.d_n),
            w_uv: cut(&self.w_uv, d.d_v),
            transform_code: self.transform_code,
            transform_fingerprint: self.transform_fingerprint,
        })
    }
}

/// One rank's absorbed weights of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct RankWeights {
    pub dims: ModelDims,
    pub plan: ShardPlan,
    /// Logit scale of this rank's slice (DESIGN 3.2).
    pub mu: f64,
    /// `[plan.heads][slice_width][d_n]`
    pub w_uk: Vec<f64>,
    /// `[plan.heads][slice_width][d_v]`
    pub w_uv: Vec<f64>,
    pub transform_code: u32,
    pub transform_fingerprint: u64,
}

/// Folds every slice of a layer: `mus[i]` is slice `i`'s logit scale; one rank per
/// latent group, all heads on each.
pub fn fold_all_slices(
    weights: &MlaWeights,
    transform: &Transform,
    mus: &[f64],
) -> Result<Vec<RankWeights>> {
    let folded = FoldedLayer::new(weights, transform)?;
    let g = mus.len();
    (0..g)
        .map(|i| folded.rank(&ShardPlan::new(&weights.dims, g, i)?, mus[i]))
        .collect()
}

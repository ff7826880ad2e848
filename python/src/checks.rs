//! Argument checks that the CPU path (`lib.rs`) and the GPU path (`device.rs`) share,
//! written once (the element, contiguity and output checks they combine are `Tensor`'s).

use crate::errors::invalid;
use crate::tensor::Tensor;
use pyo3::prelude::*;

/// The shape of query rows and of the outputs that follow them: `[batch, 1, heads, last]`
/// (FlashMLA's) or `[batch, heads, last]`.
#[derive(Clone, Copy)]
pub struct Rows {
    pub four: bool,
    pub batch: usize,
    pub heads: usize,
}

impl Rows {
    /// The rows of `t`, which must be `[batch, 1, heads, last]` or `[batch, heads, last]`.
    pub fn of(t: &Tensor, heads: usize, last: usize) -> PyResult<Rows> {
        let four = t.shape.len() == 4;
        let want = if four {
            vec![None, Some(1), Some(heads), Some(last)]
        } else {
            vec![None, Some(heads), Some(last)]
        };
        t.expect_shape(&want, &described(four, heads, last))?;
        Ok(Rows {
            four,
            batch: t.shape[0],
            heads,
        })
    }

    pub fn shape(&self, last: usize) -> Vec<usize> {
        if self.four {
            vec![self.batch, 1, self.heads, last]
        } else {
            vec![self.batch, self.heads, last]
        }
    }

    /// Checks that `t` has these rows' shape with `last` elements each, naming the shape
    /// by its extents.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn expect(&self, t: &Tensor, last: usize) -> PyResult<()> {
        t.expect_exact_shape(&self.shape(last))
    }

    /// As [`Self::expect`], naming the shape as [`Self::of`] does.
    pub fn expect_described(&self, t: &Tensor, last: usize) -> PyResult<()> {
        let want: Vec<Option<usize>> = self.shape(last).into_iter().map(Some).collect();
        t.expect_shape(&want, &described(self.four, self.heads, last))
    }

    /// The shape of the rows' log-sum-exps: `[batch, heads, 1]` beside 4-d rows (as
    /// FlashMLA returns them), `[batch, heads]` beside 3-d ones.
    pub fn lse_shape(&self) -> Vec<usize> {
        if self.four {
            vec![self.batch, self.heads, 1]
        } else {
            vec![self.batch, self.heads]
        }
    }
}

fn described(four: bool, heads: usize, last: usize) -> String {
    if four {
        format!("[batch, 1, heads={heads}, {last}]")
    } else {
        format!("[batch, heads={heads}, {last}]")
    }
}

/// Refuses `lse=` with `project=True`: head outputs have no log-sum-exps.
pub fn refuse_lse_when_projecting(lse: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    if lse.is_some() {
        return Err(invalid(
            "project=True gives head outputs and no lse: pass lse=None",
        ));
    }
    Ok(())
}

/// The last extent of `q`: the joined rows `slice_width + d_r` (`w + d_r`) without
/// `q_rope`; with it the latent part `w` or, with `absorb=True`, q_nope's `d_n`. `nope`
/// names q_nope's shape in the refusal of `absorb=True` without `q_rope`.
pub fn query_width(
    has_rope: bool,
    absorb: bool,
    w: usize,
    d: &tpla::ModelDims,
    nope: &str,
) -> PyResult<usize> {
    Ok(match (has_rope, absorb) {
        (false, false) => w + d.d_r,
        (false, true) => {
            return Err(invalid(format!(
                "absorb=True needs q_rope: q is then q_nope {nope}"
            )))
        }
        (true, false) => w,
        (true, true) => d.d_n,
    })
}

//! Sequence shards from Python (issue 15, DESIGN 3.6): the sharding and hybrid plan of
//! `tpla::geometry`, a rank's libtpla-owned cache of one sequence shard
//! (`tpla::cache::RankCache` of a `ShardSpec::for_hybrid`), the outputs of the per-rank
//! decode that returns log-sum-exps (`RankContext.decode_sequence_shard`, which with
//! `RankContext.append_token`, appends by position, is a method in lib.rs), and the two
//! merges of `tpla::combine::sequence` on NumPy arrays (or CPU torch tensors).
//!
//! As everywhere in the binding: shapes, dtypes, contiguity, writability and overlaps
//! are checked before libtpla sees a slice, and libtpla's errors become the package's
//! exceptions with its message.

use crate::errors::{invalid, to_py, Tpla};
use crate::tensor::{check_disjoint, Elem, Tensor};
use crate::{empty, parse_dtype, PyModelDims, PyRankContext, PyShardPlan};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::path::PathBuf;
use tpla::cache::{RankCache, ShardSpec};
use tpla::combine::sequence as merge;
use tpla::{HybridPlan, SequenceSharding};

/// How a sequence's tokens are spread over `shards` sequence shards: positions are cut
/// into blocks of `interleave` tokens and block `k` lives on shard `k % shards`
/// (`interleave=1`: token `t` on shard `t % shards`).
#[pyclass(module = "tpla", name = "SequenceSharding", frozen, eq)]
#[derive(Clone, Copy, PartialEq)]
pub struct PySequenceSharding(pub SequenceSharding);

#[pymethods]
impl PySequenceSharding {
    /// Shards in 1..=64, the interleave in 1..=2**20 tokens.
    #[new]
    #[pyo3(signature = (shards, interleave=1))]
    fn new(shards: usize, interleave: usize) -> PyResult<Self> {
        Ok(PySequenceSharding(
            SequenceSharding::new(shards, interleave).py()?,
        ))
    }

    #[getter]
    fn shards(&self) -> usize {
        self.0.shards
    }
    #[getter]
    fn interleave(&self) -> usize {
        self.0.interleave
    }

    /// The shard that holds the token at `position` (whose rank appends it).
    fn owner(&self, position: u64) -> usize {
        self.0.owner(position)
    }

    /// How many of the first `length` tokens of a sequence shard `shard` holds.
    fn tokens_on(&self, shard: usize, length: u64) -> PyResult<u64> {
        self.0.tokens_on(shard, length).py()
    }

    /// The row the token at `position` takes on the shard that owns it.
    fn local_index(&self, position: u64) -> u64 {
        self.0.local_index(position)
    }

    /// The position in the sequence of row `local` of shard `shard` (the inverse of
    /// `local_index`).
    fn position_of(&self, shard: usize, local: u64) -> PyResult<u64> {
        self.0.tokens_on(shard, 0).py()?; // the shard's range
        Ok(self.0.position_of(shard, local))
    }

    fn __repr__(&self) -> String {
        format!(
            "SequenceSharding(shards={}, interleave={})",
            self.0.shards, self.0.interleave
        )
    }
}

fn sharding_or_none(sharding: Option<&PySequenceSharding>) -> SequenceSharding {
    sharding.map_or(SequenceSharding::NONE, |s| s.0)
}

/// One rank of a hybrid deployment of `groups` latent groups times `sharding.shards`
/// sequence shards: rank `r = group * shards + shard` holds latent slice `group` (every
/// head) of the tokens on sequence shard `shard`. `groups=1` is exact sequence-sharded
/// MLA, one shard is TPLA.
#[pyclass(module = "tpla", name = "HybridPlan", frozen, eq)]
#[derive(Clone, Copy, PartialEq)]
pub struct PyHybridPlan(pub HybridPlan);

#[pymethods]
impl PyHybridPlan {
    #[new]
    fn new(
        dims: &PyModelDims,
        groups: usize,
        sharding: &PySequenceSharding,
        rank: usize,
    ) -> PyResult<Self> {
        Ok(PyHybridPlan(
            HybridPlan::new(&dims.0, groups, sharding.0, rank).py()?,
        ))
    }

    /// The latent slice and heads of the rank: the plan to make its `RankContext` with.
    #[getter]
    fn latent(&self) -> PyShardPlan {
        PyShardPlan(self.0.latent)
    }
    #[getter]
    fn sharding(&self) -> PySequenceSharding {
        PySequenceSharding(self.0.sharding)
    }
    /// The rank's sequence shard.
    #[getter]
    fn shard(&self) -> usize {
        self.0.shard
    }
    /// The rank's latent group.
    #[getter]
    fn group(&self) -> usize {
        self.0.latent.group
    }
    #[getter]
    fn groups(&self) -> usize {
        self.0.latent.groups
    }
    #[getter]
    fn rank(&self) -> usize {
        self.0.rank()
    }
    /// Ranks of the deployment: `groups * shards`.
    #[getter]
    fn ranks(&self) -> usize {
        self.0.ranks()
    }

    /// The rank that holds latent group `group` of the token at `position`.
    fn owner_rank(&self, group: usize, position: u64) -> PyResult<usize> {
        self.0.owner_rank(group, position).py()
    }

    /// Whether this rank holds the token at `position`.
    fn holds(&self, position: u64) -> bool {
        self.0.holds(position)
    }

    /// Cached bytes per token of context on this rank, averaged over a long sequence.
    #[pyo3(signature = (dims, dtype="bfloat16"))]
    fn bytes_per_token(&self, dims: &PyModelDims, dtype: &str) -> PyResult<f64> {
        Ok(self.0.bytes_per_token(&dims.0, parse_dtype(dtype)?))
    }

    fn __repr__(&self) -> String {
        let p = &self.0;
        format!(
            "HybridPlan(groups={}, shards={}, interleave={}, rank={}: group={}, shard={})",
            p.latent.groups,
            p.sharding.shards,
            p.sharding.interleave,
            p.rank(),
            p.latent.group,
            p.shard
        )
    }
}

/// A rank's own cache (libtpla's pages, not the engine's): every layer of the context's
/// model for a set of sequences, of all their tokens or, with a `HybridPlan`, of those
/// on the plan's sequence shard. Sequences come from prefill shard files
/// (`register_file`) or start empty (`add_sequence`); tokens join through
/// `RankContext.append_token`, and `RankContext.decode_sequence_shard` decodes them.
#[pyclass(module = "tpla", name = "RankCache")]
pub struct PyRankCache {
    pub cache: RankCache,
}

#[pymethods]
impl PyRankCache {
    /// An empty cache for `context`'s rank (its dims, latent group and the transforms of
    /// its layers, which must all be installed), of `plan`'s sequence shard (None: every
    /// token), holding `dtype` rows in pages of `page_size` tokens; `capacity_pages`
    /// pages (of every layer) are allocated now for appended tokens, a registered file's
    /// rows are read in place.
    #[new]
    #[pyo3(signature = (context, *, plan=None, dtype="bfloat16", page_size=64, capacity_pages=0))]
    fn new(
        context: &PyRankContext,
        plan: Option<&PyHybridPlan>,
        dtype: &str,
        page_size: usize,
        capacity_pages: usize,
    ) -> PyResult<Self> {
        let c = context.c();
        let mut spec = ShardSpec::new(
            *c.dims(),
            c.plan(),
            parse_dtype(dtype)?,
            page_size,
            c.transform_ids().py()?,
        )
        .py()?;
        if let Some(p) = plan {
            let (lat, own) = (&p.0.latent, c.plan());
            if (lat.groups, lat.group) != (own.groups, own.group) {
                return Err(to_py(tpla::Error::mismatch(format!(
                    "the plan's rank {} holds latent group {} of {}, the context is group {} \
                     of {}",
                    p.0.rank(),
                    lat.group,
                    lat.groups,
                    own.group,
                    own.groups
                ))));
            }
            spec = spec.with_sequence_shard(p.0.sharding, p.0.shard).py()?;
        }
        Ok(PyRankCache {
            cache: RankCache::new(spec, capacity_pages).py()?,
        })
    }

    /// Reads the shard file at `path` into memory, checks it (checksums, fields, that it
    /// belongs to this cache: latent group, sequence sharding and shard, dtype, page
    /// size, transforms) and returns its sequence ids.
    fn register_file(&mut self, path: PathBuf) -> PyResult<Vec<u32>> {
        self.cache.register_file(path).py()
    }

    /// Starts an empty sequence.
    fn add_sequence(&mut self, seq: u32) -> PyResult<()> {
        self.cache.add_sequence(seq).py()
    }

    /// Drops a sequence and returns its pages.
    fn free_sequence(&mut self, seq: u32) -> PyResult<()> {
        self.cache.free_sequence(seq).py()
    }

    /// The cached sequences' ids, in increasing order.
    fn sequence_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.cache.sequence_ids().collect();
        ids.sort_unstable();
        ids
    }

    /// Rows of `seq` this cache holds in `layer` (on a sequence shard: its tokens only).
    #[pyo3(signature = (seq, layer=0))]
    fn seq_len(&self, seq: u32, layer: usize) -> PyResult<usize> {
        self.cache.seq_len(seq, layer).py()
    }

    #[getter]
    fn capacity_pages(&self) -> usize {
        self.cache.capacity_pages()
    }
    #[getter]
    fn free_pages(&self) -> usize {
        self.cache.free_pages()
    }
    /// The element type, by the name the constructor takes ("bfloat16", "float16",
    /// "float32", or libtpla's "fp8_e4m3").
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.cache.spec().dtype())
    }
    #[getter]
    fn page_size(&self) -> usize {
        self.cache.spec().page_size()
    }
    #[getter]
    fn layers(&self) -> usize {
        self.cache.spec().layers()
    }
    #[getter]
    fn row_width(&self) -> usize {
        self.cache.spec().row_width()
    }
    #[getter]
    fn groups(&self) -> usize {
        self.cache.spec().groups()
    }
    #[getter]
    fn group(&self) -> usize {
        self.cache.spec().group()
    }
    #[getter]
    fn sharding(&self) -> PySequenceSharding {
        PySequenceSharding(self.cache.spec().sequence_sharding())
    }
    /// The sequence shard held (0 without sequence sharding).
    #[getter]
    fn shard(&self) -> usize {
        self.cache.spec().sequence_shard()
    }
    /// Whether the cache holds one sequence shard of several.
    #[getter]
    fn is_sequence_shard(&self) -> bool {
        self.cache.spec().is_sequence_shard()
    }

    fn __repr__(&self) -> String {
        let s = self.cache.spec();
        format!(
            "RankCache(group={} of {}, shard={} of {} (interleave {}), dtype={}, \
             sequences={})",
            s.group(),
            s.groups(),
            s.sequence_shard(),
            s.sequence_sharding().shards,
            s.sequence_sharding().interleave,
            dtype_name(s.dtype()),
            self.cache.sequence_ids().count()
        )
    }
}

pub(crate) fn dtype_name(dtype: tpla::DType) -> &'static str {
    match dtype {
        tpla::DType::Bf16 => "bfloat16",
        tpla::DType::F16 => "float16",
        tpla::DType::F32 => "float32",
        other => other.name(),
    }
}

/// A fresh float32/float64 output or the caller's, checked: `shape`, element type,
/// contiguous, writable.
pub(crate) fn output<'py>(
    py: Python<'py>,
    name: &'static str,
    given: Option<&Bound<'py, PyAny>>,
    shape: &[usize],
    elem: Elem,
    like: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Tensor)> {
    let obj = match given {
        Some(o) => o.clone(),
        None => empty(py, shape, elem.name(), like)?,
    };
    let t = Tensor::new(name, &obj)?;
    t.expect_exact_shape(shape)?;
    t.expect_output(&[elem])?;
    Ok((obj, t))
}

/// The tensors of a list argument.
fn tensors(name: &'static str, list: &Bound<'_, PyList>) -> PyResult<Vec<Tensor>> {
    list.iter().map(|o| Tensor::new(name, &o)).collect()
}

/// The arrays of `ts` as slices of `T`.
///
/// # Safety
/// As [`Tensor::slice`], for each.
unsafe fn slices<T>(ts: &[Tensor]) -> PyResult<Vec<&[T]>> {
    ts.iter().map(|t| unsafe { t.slice::<T>() }).collect()
}

/// The arrays of `ts` as writable float32 slices.
///
/// # Safety
/// As [`Tensor::slice_mut`], for each.
#[allow(clippy::mut_from_ref)]
unsafe fn slices_mut(ts: &[Tensor]) -> PyResult<Vec<&mut [f32]>> {
    ts.iter().map(|t| unsafe { t.slice_mut::<f32>() }).collect()
}

/// Output arrays of a merge: float32, contiguous, writable, pairwise disjoint, all of
/// the first one's shape `[..., width]`. Returns that shape.
fn check_outs(outs: &[Tensor]) -> PyResult<Vec<usize>> {
    let Some(first) = outs.first() else {
        return Err(invalid(
            "outs holds no array: a merge needs every rank's outputs",
        ));
    };
    if first.shape.is_empty() {
        return Err(invalid(
            "outs must be arrays of shape [..., width] (e.g. [batch, heads, d_v]), got a \
             scalar",
        ));
    }
    for (i, t) in outs.iter().enumerate() {
        t.expect_output(&[Elem::F32])?;
        if t.shape != first.shape {
            return Err(invalid(format!(
                "outs[{i}] has shape {}, outs[0] {}: every rank's outputs have one shape",
                t.shape_str(),
                first.shape_str()
            )));
        }
        let before: Vec<&Tensor> = outs[..i].iter().collect();
        check_disjoint(t, &before)?;
    }
    Ok(first.shape.clone())
}

/// Per-row arrays (log-sum-exps, bounds) of `elem`, contiguous, of shape `rows_shape`
/// (the outputs' shape without its last extent), disjoint from the outputs.
fn check_rows(
    what: &str,
    ts: &[Tensor],
    elem: Elem,
    rows_shape: &[usize],
    outs: &[Tensor],
) -> PyResult<()> {
    let outs: Vec<&Tensor> = outs.iter().collect();
    for (i, t) in ts.iter().enumerate() {
        t.expect_elem(&[elem])?;
        t.expect_contiguous()?;
        if t.shape != rows_shape {
            return Err(invalid(format!(
                "{what}[{i}] has shape {}, expected {rows_shape:?} (the outputs' shape \
                 without its last extent)",
                t.shape_str()
            )));
        }
        for o in &outs {
            check_disjoint(o, &[t])?;
        }
    }
    Ok(())
}

/// Merge (a) over every rank of a hybrid deployment in one process: `outs[r]` (float32
/// `[..., width]`, e.g. `[batch, heads, d_v]`) and `lses[r]` (float32 `[...]`) are rank
/// `r`'s outputs and log-sum-exps from `decode_sequence_shard`, ranks numbered
/// `group * shards + shard`. Afterwards every `outs[r]` holds the merged output, summed
/// over the latent groups.
#[pyfunction]
pub fn merge_by_lse_in_process(
    py: Python<'_>,
    outs: &Bound<'_, PyList>,
    lses: &Bound<'_, PyList>,
    shards: usize,
) -> PyResult<()> {
    let ot = tensors("outs", outs)?;
    let shape = check_outs(&ot)?;
    let lt = tensors("lses", lses)?;
    check_rows("lses", &lt, Elem::F32, &shape[..shape.len() - 1], &ot)?;
    let width = shape[shape.len() - 1];
    // SAFETY: checked element types and contiguity; the outputs are pairwise disjoint
    // and disjoint from the log-sum-exps, which are only read.
    let mut o = unsafe { slices_mut(&ot)? };
    let l = unsafe { slices::<f32>(&lt)? };
    py.allow_threads(move || merge::merge_by_lse_in_process(shards, width, &mut o, &l))
        .py()
}

/// Merge (b) over every rank of a hybrid deployment in one process: as
/// `merge_by_lse_in_process`, with `bounds[r]` (float64 `[...]`, the logit bounds
/// `decode_sequence_shard(..., rope_key_norm=)` wrote, equal within a latent group):
/// packs each rank's numerators and denominator in f64, sums them over each group's
/// shards, divides, and sums the groups.
#[pyfunction]
pub fn merge_packed_in_process(
    py: Python<'_>,
    outs: &Bound<'_, PyList>,
    lses: &Bound<'_, PyList>,
    bounds: &Bound<'_, PyList>,
    shards: usize,
) -> PyResult<()> {
    let ot = tensors("outs", outs)?;
    let shape = check_outs(&ot)?;
    let rows_shape = &shape[..shape.len() - 1];
    let lt = tensors("lses", lses)?;
    check_rows("lses", &lt, Elem::F32, rows_shape, &ot)?;
    let bt = tensors("bounds", bounds)?;
    check_rows("bounds", &bt, Elem::F64, rows_shape, &ot)?;
    let width = shape[shape.len() - 1];
    // SAFETY: as in merge_by_lse_in_process; the bounds are only read.
    let mut o = unsafe { slices_mut(&ot)? };
    let l = unsafe { slices::<f32>(&lt)? };
    let m = unsafe { slices::<f64>(&bt)? };
    py.allow_threads(move || merge::merge_packed_in_process(shards, width, &mut o, &l, &m))
        .py()
}

/// Merge (a) on one rank, for an engine's own collectives: rescales this rank's `out`
/// (float32 `[..., width]`) in place by `e^(lse_own - L)`, where `gathered[j]` (float32
/// `[...]`) is the log-sum-exps of sequence shard `j` of the rank's latent group (an
/// all-gather), `shard` this rank's, and `L` their log-sum-exp. Summing the rescaled
/// outputs over all ranks (`tpla.all_reduce`) then gives the exact output.
#[pyfunction]
pub fn rescale_by_gathered_lse(
    out: &Bound<'_, PyAny>,
    shard: usize,
    gathered: &Bound<'_, PyList>,
) -> PyResult<()> {
    let ot = [Tensor::new("out", out)?];
    let shape = check_outs(&ot)?;
    let gt = tensors("gathered", gathered)?;
    check_rows("gathered", &gt, Elem::F32, &shape[..shape.len() - 1], &ot)?;
    // SAFETY: checked; `out` is disjoint from the gathered log-sum-exps.
    let o = unsafe { ot[0].slice_mut::<f32>()? };
    let g = unsafe { slices::<f32>(&gt)? };
    merge::rescale_by_gathered_lse(o, shape[shape.len() - 1], shard, &g).py()
}

/// Merge (b) on one rank: packs `out` (float32 `[..., width]`) and `lse` (float32
/// `[...]`) against the shared logit bounds `bound` (float64 `[...]`) into float64
/// rows `[..., width + 2]` (numerators, denominator, holder count), returned (or
/// written into `packed=`). Sum the packs over the latent group's shards (an
/// all-reduce), then `unpack_merged`.
#[pyfunction]
#[pyo3(signature = (out, lse, bound, *, packed=None))]
pub fn pack_against_bound<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    bound: &Bound<'py, PyAny>,
    packed: Option<&Bound<'py, PyAny>>,
) -> PyResult<PyObject> {
    let ot = Tensor::new("out", out)?;
    ot.expect_array(&[Elem::F32])?;
    let Some((&width, rows_shape)) = ot.shape.split_last() else {
        return Err(invalid("out must have shape [..., width], got a scalar"));
    };
    let rows_shape = rows_shape.to_vec();
    let lt = Tensor::new("lse", lse)?;
    let bt = Tensor::new("bound", bound)?;
    for t in [&lt, &bt] {
        if t.shape != rows_shape {
            return Err(invalid(format!(
                "{} has shape {}, expected {rows_shape:?} (out's shape without its last \
                 extent)",
                t.name,
                t.shape_str()
            )));
        }
        t.expect_contiguous()?;
    }
    lt.expect_elem(&[Elem::F32])?;
    bt.expect_elem(&[Elem::F64])?;
    let mut packed_shape = rows_shape.clone();
    packed_shape.push(merge::packed_row_len(width));
    let (pobj, pt) = output(py, "packed", packed, &packed_shape, Elem::F64, out)?;
    check_disjoint(&pt, &[&ot, &lt, &bt])?;
    // SAFETY: checked element types and contiguity; `packed` is disjoint from the
    // inputs, which are only read.
    unsafe {
        merge::pack_against_bound(
            ot.slice::<f32>()?,
            lt.slice::<f32>()?,
            bt.slice::<f64>()?,
            width,
            pt.slice_mut::<f64>()?,
        )
    }
    .py()?;
    drop(pt);
    Ok(pobj.unbind())
}

/// Merge (b)'s last step: divides the summed packs `packed` (float64 `[..., width + 2]`)
/// into the merged output (float32 `[..., width]`), returned (or written into `out=`).
#[pyfunction]
#[pyo3(signature = (packed, *, out=None))]
pub fn unpack_merged<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<PyObject> {
    let pt = Tensor::new("packed", packed)?;
    pt.expect_elem(&[Elem::F64])?;
    pt.expect_contiguous()?;
    let width = match pt.shape.last() {
        Some(&n) if n >= 2 => n - 2,
        _ => {
            return Err(invalid(format!(
                "packed must have shape [..., width + 2] (numerators, denominator, holder \
                 count), got {}",
                pt.shape_str()
            )))
        }
    };
    let mut shape = pt.shape.clone();
    *shape.last_mut().expect("checked above") = width;
    let (oobj, ot) = output(py, "out", out, &shape, Elem::F32, packed)?;
    check_disjoint(&ot, &[&pt])?;
    // SAFETY: checked; `out` is disjoint from `packed`.
    unsafe { merge::unpack_merged(pt.slice::<f64>()?, width, ot.slice_mut::<f32>()?) }.py()?;
    drop(ot);
    Ok(oobj.unbind())
}

/// Raises the host merge's error (InvalidArgumentError) for the bits of a GPU merge's
/// error word (`DeviceEngine.sequence_pack` / `sequence_unpack`); nothing for 0.
#[pyfunction]
pub fn sequence_merge_error(bits: u32) -> PyResult<()> {
    merge::merge_error(bits).py()
}

/// Values of one packed row of `width` outputs: `width + 2`.
#[pyfunction]
pub fn packed_row_len(width: usize) -> usize {
    merge::packed_row_len(width)
}

/// The sharding an export is cut for, and the latent groups of `ranks` paths.
pub(crate) fn export_groups(
    ranks: usize,
    sharding: Option<&PySequenceSharding>,
) -> PyResult<(usize, SequenceSharding)> {
    let sh = sharding_or_none(sharding);
    if ranks % sh.shards != 0 {
        return Err(invalid(format!(
            "{ranks} paths cannot be cut into {} sequence shards: give one path per rank, \
             groups * shards of them (rank group * shards + shard)",
            sh.shards
        )));
    }
    Ok((ranks / sh.shards, sh))
}

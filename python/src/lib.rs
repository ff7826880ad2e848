//! The native module of the `tpla` Python package (`tpla._tpla`): a thin skin over the
//! Rust API of libtpla (`tpla::engine`, `tpla::decode`, `tpla::geometry`, ...). Arrays are
//! borrowed in place (buffer protocol, DLPack, `__array_interface__`: see [`tensor`]);
//! every shape, dtype, stride and device is checked before libtpla sees a slice, and the
//! GIL is released while it computes.

mod checks;
mod device;
mod errors;
mod sequence;
mod tensor;

use checks::{query_width, refuse_lse_when_projecting, Rows};
use errors::{invalid, Tpla};
use half::bf16;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyList;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use tensor::{check_disjoint, Elem, Tensor};
use tpla::attention::cpu::{CpuBackend, KernelChoice};
use tpla::attention::reference::{rotated_latents, Reference};
use tpla::attention::LatentAttention;
use tpla::cache::{ExportPlan, RankCache, ShardFileWriter, ShardSpec};
use tpla::convert::{FoldedLayer, MlaWeights};
use tpla::decode::{LogitBounds, Outputs, Queries, RankLayer};
use tpla::engine::{BlockTable, PagedCache, PagedCacheMut, PagedLayout, PagedStep, RmsMode};
use tpla::transform::{SecondMoment, SliceLayout};
use tpla::weights_file::WeightsFileWriter;
use tpla::DType;

/// Model dimensions of one MLA attention layer (`tpla::ModelDims`).
#[pyclass(module = "tpla", name = "ModelDims", frozen, eq)]
#[derive(Clone, Copy, PartialEq)]
struct PyModelDims(tpla::ModelDims);

#[pymethods]
impl PyModelDims {
    #[new]
    #[pyo3(signature = (heads, d_c, d_r, d_n, d_v, softmax_scale))]
    fn new(
        heads: usize,
        d_c: usize,
        d_r: usize,
        d_n: usize,
        d_v: usize,
        softmax_scale: f64,
    ) -> PyResult<Self> {
        Ok(PyModelDims(
            tpla::ModelDims::new(heads, d_c, d_r, d_n, d_v, softmax_scale).py()?,
        ))
    }

    /// The dims of a published model: "deepseek-v3", "kimi-k2", "deepseek-v2-lite".
    #[staticmethod]
    fn preset(name: &str) -> PyResult<Self> {
        Ok(PyModelDims(tpla::ModelDims::preset(name).py()?))
    }

    #[getter]
    fn heads(&self) -> usize {
        self.0.heads
    }
    #[getter]
    fn d_c(&self) -> usize {
        self.0.d_c
    }
    #[getter]
    fn d_r(&self) -> usize {
        self.0.d_r
    }
    #[getter]
    fn d_n(&self) -> usize {
        self.0.d_n
    }
    #[getter]
    fn d_v(&self) -> usize {
        self.0.d_v
    }
    #[getter]
    fn softmax_scale(&self) -> f64 {
        self.0.softmax_scale
    }

    fn __repr__(&self) -> String {
        let d = &self.0;
        format!(
            "ModelDims(heads={}, d_c={}, d_r={}, d_n={}, d_v={}, softmax_scale={})",
            d.heads, d.d_c, d.d_r, d.d_n, d.d_v, d.softmax_scale
        )
    }
}

/// What one rank holds: latent slice `group` of `groups` and a shard of the heads.
#[pyclass(module = "tpla", name = "ShardPlan", frozen, eq)]
#[derive(Clone, Copy, PartialEq)]
struct PyShardPlan(tpla::ShardPlan);

#[pymethods]
impl PyShardPlan {
    /// One rank per latent group, every head on every rank.
    #[new]
    fn new(dims: &PyModelDims, groups: usize, group: usize) -> PyResult<Self> {
        Ok(PyShardPlan(
            tpla::ShardPlan::new(&dims.0, groups, group).py()?,
        ))
    }

    /// `ranks` ranks in `groups` latent groups; rank `r` holds slice `r // (ranks//groups)`
    /// and head shard `r % (ranks//groups)`.
    #[staticmethod]
    fn with_head_split(
        dims: &PyModelDims,
        ranks: usize,
        groups: usize,
        rank: usize,
    ) -> PyResult<Self> {
        Ok(PyShardPlan(
            tpla::ShardPlan::with_head_split(&dims.0, ranks, groups, rank).py()?,
        ))
    }

    #[getter]
    fn groups(&self) -> usize {
        self.0.groups
    }
    #[getter]
    fn group(&self) -> usize {
        self.0.group
    }
    #[getter]
    fn ranks(&self) -> usize {
        self.0.ranks
    }
    #[getter]
    fn rank(&self) -> usize {
        self.0.rank
    }
    #[getter]
    fn head_start(&self) -> usize {
        self.0.head_start
    }
    #[getter]
    fn heads(&self) -> usize {
        self.0.heads
    }
    #[getter]
    fn slice_start(&self) -> usize {
        self.0.slice_start
    }
    #[getter]
    fn slice_width(&self) -> usize {
        self.0.slice_width
    }
    /// Elements of one cache row of this rank: `slice_width + d_r`.
    fn row_width(&self, dims: &PyModelDims) -> usize {
        self.0.row_width(&dims.0)
    }

    fn __repr__(&self) -> String {
        let p = &self.0;
        format!(
            "ShardPlan(groups={}, group={}, ranks={}, rank={}, heads={}..{}, slice={}..{})",
            p.groups,
            p.group,
            p.ranks,
            p.rank,
            p.head_start,
            p.head_start + p.heads,
            p.slice_start,
            p.slice_start + p.slice_width
        )
    }
}

/// An orthogonal rotation `U` of the latent space (identity, randomised Hadamard, PCA).
#[pyclass(module = "tpla", name = "Transform", frozen)]
#[derive(Clone)]
struct PyTransform(tpla::transform::Transform);

#[pymethods]
impl PyTransform {
    #[staticmethod]
    fn identity(d_c: usize) -> PyResult<Self> {
        Ok(PyTransform(tpla::transform::Transform::identity(d_c).py()?))
    }

    /// The randomised Hadamard transform (d_c a power of two), signs from `seed`.
    #[staticmethod]
    #[pyo3(signature = (d_c, seed=0))]
    fn hadamard(d_c: usize, seed: u64) -> PyResult<Self> {
        Ok(PyTransform(
            tpla::transform::Transform::hadamard(d_c, seed).py()?,
        ))
    }

    /// PCA of calibration latents `[n, d_c]` (pre-norm `a_t`, float32 or float64), for
    /// `groups` slices laid out "contiguous" or "interleaved".
    #[staticmethod]
    #[pyo3(signature = (latents, groups, layout="contiguous"))]
    fn pca(latents: &Bound<'_, PyAny>, groups: usize, layout: &str) -> PyResult<Self> {
        let t = Tensor::new("latents", latents)?;
        t.expect_shape(&[None, None], "[n, d_c]")?;
        let d = t.shape[1];
        let rows = read_f64(&t)?;
        let mut m = SecondMoment::new(d);
        for r in rows.chunks_exact(d.max(1)) {
            m.add(r).py()?;
        }
        let layout = SliceLayout::parse(layout).py()?;
        Ok(PyTransform(
            tpla::transform::Transform::pca(&m, layout, groups).py()?,
        ))
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.0.kind().name()
    }
    #[getter]
    fn dim(&self) -> usize {
        self.0.dim()
    }
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.0.fingerprint()
    }

    /// `x U` row by row: rows of `x` (`[..., d_c]`, float32/64) in the rotated basis,
    /// as a new float64 NumPy array.
    fn rotate<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<PyObject> {
        self.apply(py, x, false)
    }

    /// The inverse of [`rotate`].
    fn rotate_back<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<PyObject> {
        self.apply(py, x, true)
    }

    /// `U` as a `[d_c, d_c]` float64 NumPy array: `rotate(x) == x @ matrix()`.
    fn matrix(&self, py: Python<'_>) -> PyResult<PyObject> {
        let d = self.0.dim();
        let m = self.0.matrix();
        new_f64(py, &[d, d], &m)
    }

    fn __repr__(&self) -> String {
        format!(
            "Transform(kind={:?}, dim={})",
            self.0.kind().name(),
            self.0.dim()
        )
    }
}

impl PyTransform {
    fn apply(&self, py: Python<'_>, x: &Bound<'_, PyAny>, back: bool) -> PyResult<PyObject> {
        let t = Tensor::new("x", x)?;
        let d = self.0.dim();
        if t.shape.last() != Some(&d) {
            return Err(invalid(format!(
                "x must have rows of {d} values (shape [..., {d}]), got {}",
                t.shape_str()
            )));
        }
        let v = read_f64(&t)?;
        let mut y = vec![0.0; v.len()];
        for (a, b) in v.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            if back {
                self.0.rotate_back(a, b)
            } else {
                self.0.rotate(a, b)
            }
        }
        new_f64(py, &t.shape, &y)
    }
}

/// The split-KV schedule of one step (`tpla.decode_plan`): plain `int32` words computed
/// once from the lengths and reused by every layer of the step, like FlashMLA's
/// `get_mla_metadata`. It remembers the context it was made by.
#[pyclass(module = "tpla", name = "DecodePlan")]
struct PyDecodePlan {
    context: Py<PyRankContext>,
    words: Vec<i32>,
    batch: usize,
}

#[pymethods]
impl PyDecodePlan {
    #[getter]
    fn batch(&self) -> usize {
        self.batch
    }
    #[getter]
    fn context(&self, py: Python<'_>) -> Py<PyRankContext> {
        self.context.clone_ref(py)
    }
    /// The plan's words (header then the backend's body), as a list of ints.
    fn words(&self) -> Vec<i32> {
        self.words.clone()
    }
    fn __len__(&self) -> usize {
        self.words.len()
    }
    fn __repr__(&self) -> String {
        format!(
            "DecodePlan(batch={}, words={})",
            self.batch,
            self.words.len()
        )
    }
}

/// One rank of a TPLA layer stack: the rank's absorbed weights of every layer and a CPU
/// attention backend; the engine owns the KV cache.
#[pyclass(module = "tpla", name = "RankContext")]
struct PyRankContext {
    /// A mutex only to make the class `Sync` (PyO3's borrow flag already gives `&mut`
    /// methods exclusive access): it is never contended.
    ctx: Mutex<tpla::decode::RankContext>,
    /// bf16 -> f32 conversions of queries and appended tokens, reused.
    qbuf: Vec<f32>,
    rbuf: Vec<f32>,
    slots: Vec<i32>,
    last_faults: u32,
}

fn backend(
    name: &str,
    threads: Option<usize>,
    kernel: &str,
) -> PyResult<Box<dyn LatentAttention + Send>> {
    match name {
        "cpu" => {
            let threads = match threads {
                Some(t) => t,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            let kernel = KernelChoice::parse(kernel).py()?;
            Ok(Box::new(CpuBackend::with_kernel(threads, kernel).py()?))
        }
        "reference" => Ok(Box::new(Reference)),
        "cuda" => Err(errors::to_py(tpla::Error::unsupported(
            "a RankContext computes on the CPU (backend='cpu' or 'reference'); for the GPU \
             make one and then tpla.DeviceEngine(context, device), which decodes and \
             appends on torch CUDA tensors",
        ))),
        other => Err(invalid(format!(
            "unknown backend '{other}'; known backends: cpu, reference"
        ))),
    }
}

fn rms_mode(rms: &str) -> PyResult<RmsMode> {
    match rms {
        "exact" => Ok(RmsMode::Exact),
        "sliced" => Ok(RmsMode::Sliced),
        other => Err(invalid(format!(
            "rms must be 'exact' or 'sliced', got '{other}'"
        ))),
    }
}

#[pymethods]
impl PyRankContext {
    /// A context of `layers` layers (set each with `set_layer` or `install_layer`) on
    /// the CPU backend with `threads` threads (default: all cores) and `kernel` ("auto",
    /// "avx512-bf16", "avx512f", "avx2-fma", "portable"), or backend="reference" (the
    /// f64 oracle).
    #[new]
    #[pyo3(signature = (dims, plan, layers, *, threads=None, kernel="auto", backend="cpu"))]
    fn new(
        dims: &PyModelDims,
        plan: &PyShardPlan,
        layers: usize,
        threads: Option<usize>,
        kernel: &str,
        backend: &str,
    ) -> PyResult<Self> {
        let b = self::backend(backend, threads, kernel)?;
        Ok(Self::wrap(
            tpla::decode::RankContext::new(dims.0, plan.0, layers, b).py()?,
        ))
    }

    /// A context holding every layer of a weights file `tpla convert` (or `save_weights`)
    /// wrote; the file fixes the dims and the rank's plan.
    #[staticmethod]
    #[pyo3(signature = (path, *, threads=None, kernel="auto", backend="cpu"))]
    fn from_weights_file(
        path: PathBuf,
        threads: Option<usize>,
        kernel: &str,
        backend: &str,
    ) -> PyResult<Self> {
        let b = self::backend(backend, threads, kernel)?;
        Ok(Self::wrap(
            tpla::decode::RankContext::from_weights_file(path, b).py()?,
        ))
    }

    /// Folds a checkpoint layer for this rank and installs it as layer `index`: the full
    /// `W_UK` `[heads, d_c, d_n]` and `W_UV` `[heads, d_c, d_v]` of `kv_b_proj`, the
    /// `kv_a_layernorm` weight `gamma` `[d_c]`, the layer's `transform` and this slice's
    /// `mu`; `slice_fraction` is the slice's share of the latent energy (sliced-RMS
    /// appends; default `slice_width / d_c`).
    #[pyo3(signature = (index, w_uk, w_uv, gamma, transform, *, mu=1.0, slice_fraction=None))]
    #[allow(clippy::too_many_arguments)]
    fn set_layer(
        &mut self,
        index: usize,
        w_uk: &Bound<'_, PyAny>,
        w_uv: &Bound<'_, PyAny>,
        gamma: &Bound<'_, PyAny>,
        transform: &PyTransform,
        mu: f64,
        slice_fraction: Option<f64>,
    ) -> PyResult<()> {
        let d = *self.c().dims();
        let wk = weight("w_uk", w_uk, &[d.heads, d.d_c, d.d_n])?;
        let wv = weight("w_uv", w_uv, &[d.heads, d.d_c, d.d_v])?;
        let g = weight("gamma", gamma, &[d.d_c])?;
        let weights = MlaWeights::new(d, wk, wv, g).py()?;
        let folded = FoldedLayer::new(&weights, &transform.0).py()?;
        let rank = folded.rank(self.c().plan(), mu).py()?;
        let fraction = slice_fraction.unwrap_or(self.default_fraction());
        let layer = RankLayer::new(&rank, transform.0.clone(), fraction).py()?;
        self.c().set_layer(index, &rank, layer).py()
    }

    /// Installs layer `index` from this rank's absorbed weights (as a converter wrote
    /// them): `W'_UK` `[heads, slice_width, d_n]` and `W'_UV` `[heads, slice_width, d_v]`
    /// for the rank's heads, in the rotated basis.
    #[pyo3(signature = (index, w_uk, w_uv, transform, *, mu=1.0, slice_fraction=None))]
    fn install_layer(
        &mut self,
        index: usize,
        w_uk: &Bound<'_, PyAny>,
        w_uv: &Bound<'_, PyAny>,
        transform: &PyTransform,
        mu: f64,
        slice_fraction: Option<f64>,
    ) -> PyResult<()> {
        let (d, p) = {
            let c = self.c();
            (*c.dims(), *c.plan())
        };
        let wk = weight("w_uk", w_uk, &[p.heads, p.slice_width, d.d_n])?;
        let wv = weight("w_uv", w_uv, &[p.heads, p.slice_width, d.d_v])?;
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        let fraction = slice_fraction.unwrap_or(self.default_fraction());
        let layer =
            RankLayer::from_f32(f32s(wk), f32s(wv), mu, transform.0.clone(), fraction).py()?;
        self.c().install(index, layer).py()
    }

    /// Writes every layer of this rank to a weights file (`from_weights_file` reads it).
    fn save_weights(&self, path: PathBuf) -> PyResult<PathBuf> {
        let c = self.c();
        let mut w = WeightsFileWriter::create(&path, *c.dims(), *c.plan(), c.layer_count()).py()?;
        for i in 0..c.layer_count() {
            w.write_layer(c.layer(i).py()?).py()?;
        }
        w.finish().py()
    }

    #[getter]
    fn dims(&self) -> PyModelDims {
        PyModelDims(*self.c().dims())
    }
    #[getter]
    fn plan(&self) -> PyShardPlan {
        PyShardPlan(*self.c().plan())
    }
    #[getter]
    fn layers(&self) -> usize {
        self.c().layer_count()
    }
    #[getter]
    fn backend(&self) -> String {
        self.c().backend_name()
    }
    /// Elements of one cache row: `slice_width + d_r`.
    #[getter]
    fn row_width(&self) -> usize {
        let c = self.c();
        c.plan().row_width(c.dims())
    }
    /// Faults (`tpla.Faults` bits) of the last decode or append: 1 a bad page (its batch
    /// entry's outputs are NaN), 2 a slot past the pool (that token was not written).
    #[getter]
    fn last_faults(&self) -> u32 {
        self.last_faults
    }
    /// The transform of layer `index`.
    fn transform(&self, index: usize) -> PyResult<PyTransform> {
        Ok(PyTransform(self.c().layer(index).py()?.transform.clone()))
    }
    /// mu of layer `index`.
    fn mu(&self, index: usize) -> PyResult<f64> {
        Ok(self.c().layer(index).py()?.mu)
    }

    /// Makes later steps of up to `max_batch` sequences allocation-free.
    fn reserve(&mut self, max_batch: usize) -> PyResult<()> {
        self.c().reserve(max_batch).py()
    }

    /// `tpla.decode_plan(cache_seqlens, self)`.
    fn decode_plan(
        slf: &Bound<'_, Self>,
        cache_seqlens: &Bound<'_, PyAny>,
    ) -> PyResult<PyDecodePlan> {
        cpu_decode_plan(cache_seqlens, slf)
    }

    /// `tpla.append(kv_c, k_pe, kv_cache, slot_mapping, context=self, ...)`.
    #[pyo3(signature = (kv_c, k_pe, kv_cache, slot_mapping, *, layer=0, rms="exact", kv_dtype=None))]
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        py: Python<'_>,
        kv_c: &Bound<'_, PyAny>,
        k_pe: &Bound<'_, PyAny>,
        kv_cache: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        layer: usize,
        rms: &str,
        kv_dtype: Option<&str>,
    ) -> PyResult<u32> {
        self.append_impl(py, kv_c, k_pe, kv_cache, slot_mapping, layer, rms, kv_dtype)
    }

    /// Copies sequence `seq` of `layer` of `source` (a registered prefill shard) into the
    /// engine's pages at `slots` (one int32 slot per cached row; negative: skipped).
    /// Returns the fault bits.
    #[pyo3(signature = (source, seq, layer, kv_cache, slots, *, kv_dtype=None))]
    #[allow(clippy::too_many_arguments)]
    fn import_sequence(
        &mut self,
        py: Python<'_>,
        source: &PyShardCache,
        seq: u32,
        layer: usize,
        kv_cache: &Bound<'_, PyAny>,
        slots: &Bound<'_, PyAny>,
        kv_dtype: Option<&str>,
    ) -> PyResult<u32> {
        let kv = Tensor::new("kv_cache", kv_cache)?;
        let (d_r, row_width) = {
            let c = self.c();
            (c.dims().d_r, c.plan().row_width(c.dims()))
        };
        let layout = paged_layout(&kv, kv_dtype, d_r, row_width)?;
        let st = Tensor::new("slots", slots)?;
        st.expect_shape(&[None], "[rows]")?;
        let slots = int32s(&st, &mut self.slots)?;
        check_disjoint(&kv, &[&st])?;
        // SAFETY: the layout's extent was checked against the view; disjoint from inputs.
        let mem = unsafe { kv_bytes_mut(&kv, &layout)? };
        let mut cache = PagedCacheMut::new(layout, mem).py()?;
        let mut guard = self.ctx.lock().unwrap_or_else(|e| e.into_inner());
        let ctx: &mut tpla::decode::RankContext = &mut guard;
        let src = &source.cache;
        let faults = py
            .allow_threads(move || ctx.import_sequence(src, seq, layer, &mut cache, slots))
            .py()?;
        self.last_faults = faults.bits();
        Ok(self.last_faults)
    }

    /// Appends one token to `seq` in `layer` of `cache` (a `tpla.RankCache` of this
    /// rank): `latent` is the full pre-norm latent `a_t` `[d_c]`, `k_rope` the
    /// RoPE-rotated key `[d_r]` (float32, bfloat16 or float16). `position` is the
    /// token's position in the sequence: required on a sequence shard, where a position
    /// another shard owns raises `MismatchError` (`SequenceSharding.owner` names the
    /// shard, `HybridPlan.owner_rank` the rank) and one that is not the shard's next
    /// raises `InvalidArgumentError`; elsewhere it must be the sequence's length, or None.
    #[pyo3(signature = (cache, seq, latent, k_rope, *, position=None, layer=0, rms="exact"))]
    #[allow(clippy::too_many_arguments)]
    fn append_token(
        &mut self,
        mut cache: PyRefMut<'_, sequence::PyRankCache>,
        seq: u32,
        latent: &Bound<'_, PyAny>,
        k_rope: &Bound<'_, PyAny>,
        position: Option<u64>,
        layer: usize,
        rms: &str,
    ) -> PyResult<()> {
        let d = *self.c().dims();
        let exact = match rms {
            "exact" => true,
            "sliced" => false,
            other => {
                return Err(invalid(format!(
                    "rms must be 'exact' or 'sliced', got '{other}'"
                )))
            }
        };
        let lt = Tensor::new("latent", latent)?;
        lt.expect_shape(&[Some(d.d_c)], &format!("[d_c={}]", d.d_c))?;
        let rt = Tensor::new("k_rope", k_rope)?;
        rt.expect_shape(&[Some(d.d_r)], &format!("[d_r={}]", d.d_r))?;
        let PyRankContext {
            ctx, qbuf, rbuf, ..
        } = self;
        let ctx = ctx.get_mut().unwrap_or_else(|e| e.into_inner());
        let a = floats(&lt, qbuf)?;
        let kr = floats(&rt, rbuf)?;
        match position {
            Some(p) => ctx.append_token_at(&mut cache.cache, seq, layer, p, a, kr, exact),
            None => ctx.append_token(&mut cache.cache, seq, layer, a, kr, exact),
        }
        .py()
    }

    /// One decode step of `layer` for the sequences `seqs` of `cache` (a `tpla.RankCache`
    /// of this rank, of one sequence shard or of every token), with the log-sum-exps a
    /// merge needs: `q` is `[batch, heads, slice_width + d_r]` (or, with `q_rope=`
    /// `[batch, heads, d_r]`, the latent part `[batch, heads, slice_width]`, or with
    /// `absorb=True` `q_nope` `[batch, heads, d_n]`). Returns `(out, lse, bounds)`:
    /// `out` float32 `[batch, heads, d_v]` (the rank's head outputs normalised over its
    /// tokens; `project=False`: latent outputs `[batch, heads, slice_width]`), `lse`
    /// float32 `[batch, heads]` (-inf, with zero outputs, for a sequence with no token on
    /// the shard), and with `rope_key_norm=` (a bound of `|k_rope|` over the batch's
    /// tokens, equal on every rank) the float64 logit bounds `[batch, heads]` of merge
    /// (b), else None. `out=`, `lse=`, `bounds=` write into the caller's arrays.
    #[pyo3(signature = (cache, seqs, q, *, layer=0, q_rope=None, absorb=false, project=true, out=None, lse=None, rope_key_norm=None, bounds=None))]
    #[allow(clippy::too_many_arguments)]
    fn decode_sequence_shard<'py>(
        &mut self,
        py: Python<'py>,
        cache: PyRef<'_, sequence::PyRankCache>,
        seqs: Vec<u32>,
        q: &Bound<'py, PyAny>,
        layer: usize,
        q_rope: Option<&Bound<'py, PyAny>>,
        absorb: bool,
        project: bool,
        out: Option<&Bound<'py, PyAny>>,
        lse: Option<&Bound<'py, PyAny>>,
        rope_key_norm: Option<f64>,
        bounds: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(PyObject, PyObject, PyObject)> {
        let (d, p) = {
            let g = self.c();
            (*g.dims(), *g.plan())
        };
        let (b, h, w) = (seqs.len(), p.heads, p.slice_width);
        let x = query_width(q_rope.is_some(), absorb, w, &d, "[batch, heads, d_n]")?;
        let qt = Tensor::new("q", q)?;
        qt.expect_shape(
            &[Some(b), Some(h), Some(x)],
            &format!("[batch={b} (len(seqs)), heads={h}, {x}]"),
        )?;
        let rt = match q_rope {
            Some(r) => {
                let rt = Tensor::new("q_rope", r)?;
                rt.expect_shape(
                    &[Some(b), Some(h), Some(d.d_r)],
                    &format!("[batch={b}, heads={h}, d_r={}]", d.d_r),
                )?;
                Some(rt)
            }
            None => None,
        };
        if bounds.is_some() && rope_key_norm.is_none() {
            return Err(invalid(
                "bounds= is written only with rope_key_norm= (the bound of |k_rope| over the \
                 batch's tokens, equal on every rank)",
            ));
        }
        let width = if project { d.d_v } else { w };
        let (out_obj, ot) = sequence::output(py, "out", out, &[b, h, width], Elem::F32, q)?;
        let (lse_obj, lt) = sequence::output(py, "lse", lse, &[b, h], Elem::F32, q)?;
        let bound = match rope_key_norm {
            Some(_) => Some(sequence::output(
                py,
                "bounds",
                bounds,
                &[b, h],
                Elem::F64,
                q,
            )?),
            None => None,
        };
        let mut inputs: Vec<&Tensor> = vec![&qt];
        inputs.extend(&rt);
        check_disjoint(&ot, &inputs)?;
        check_disjoint(&lt, &inputs)?;
        check_disjoint(&lt, &[&ot])?;
        if let Some((_, bt)) = &bound {
            check_disjoint(bt, &inputs)?;
            check_disjoint(bt, &[&ot, &lt])?;
        }

        let PyRankContext {
            ctx, qbuf, rbuf, ..
        } = self;
        let ctx = ctx.get_mut().unwrap_or_else(|e| e.into_inner());
        let queries = queries(&qt, rt.as_ref(), absorb, qbuf, rbuf)?;
        // SAFETY: element types, shapes and contiguity checked above; the outputs are
        // disjoint from the inputs and from each other, and written only through these.
        let (o, l) = unsafe { (ot.slice_mut::<f32>()?, lt.slice_mut::<f32>()?) };
        let outputs = if project {
            Outputs::HeadsAndLse { out: o, lse: l }
        } else {
            Outputs::Latent { out: o, lse: l }
        };
        let logit_bounds = match (&bound, rope_key_norm) {
            (Some((_, bt)), Some(norm)) => Some(LogitBounds {
                rope_key_norm: norm,
                // SAFETY: as above.
                out: unsafe { bt.slice_mut::<f64>()? },
            }),
            _ => None,
        };
        let rc = &cache.cache;
        py.allow_threads(move || {
            ctx.decode_sequence_shard(rc, layer, &seqs, queries, outputs, logit_bounds)
        })
        .py()?;
        let bounds_obj = match bound {
            Some((obj, _)) => obj.unbind(),
            None => py.None(),
        };
        Ok((out_obj.unbind(), lse_obj.unbind(), bounds_obj))
    }

    fn __repr__(&self) -> String {
        let c = self.c();
        format!(
            "RankContext({:?}, backend={:?})",
            c.plan(),
            c.backend_name()
        )
    }
}

impl PyRankContext {
    fn wrap(ctx: tpla::decode::RankContext) -> Self {
        PyRankContext {
            ctx: Mutex::new(ctx),
            qbuf: Vec::new(),
            rbuf: Vec::new(),
            slots: Vec::new(),
            last_faults: 0,
        }
    }

    fn c(&self) -> MutexGuard<'_, tpla::decode::RankContext> {
        self.ctx.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn default_fraction(&self) -> f64 {
        let c = self.c();
        c.plan().slice_width as f64 / c.dims().d_c as f64
    }

    #[allow(clippy::too_many_arguments)]
    fn append_impl(
        &mut self,
        py: Python<'_>,
        kv_c: &Bound<'_, PyAny>,
        k_pe: &Bound<'_, PyAny>,
        kv_cache: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        layer: usize,
        rms: &str,
        kv_dtype: Option<&str>,
    ) -> PyResult<u32> {
        let d = *self.c().dims();
        let mode = rms_mode(rms)?;
        let lat = Tensor::new("kv_c", kv_c)?;
        lat.expect_shape(&[None, Some(d.d_c)], &format!("[tokens, d_c={}]", d.d_c))?;
        let n = lat.shape[0];
        let kr = Tensor::new("k_pe", k_pe)?;
        if kr.shape.len() == 3 {
            kr.expect_shape(
                &[Some(n), Some(1), Some(d.d_r)],
                &format!("[{n}, 1, {}]", d.d_r),
            )?;
        } else {
            kr.expect_shape(&[Some(n), Some(d.d_r)], &format!("[{n}, d_r={}]", d.d_r))?;
        }
        let sm = Tensor::new("slot_mapping", slot_mapping)?;
        sm.expect_shape(&[Some(n)], &format!("[{n}]"))?;
        let kv = Tensor::new("kv_cache", kv_cache)?;
        let layout = paged_layout(&kv, kv_dtype, d.d_r, self.c().plan().row_width(&d))?;
        check_disjoint(&kv, &[&lat, &kr, &sm])?;
        let latents = floats(&lat, &mut self.qbuf)?;
        let rope = floats(&kr, &mut self.rbuf)?;
        let slots = int32s(&sm, &mut self.slots)?;
        // SAFETY: extent checked against the view; disjoint from the inputs.
        let mem = unsafe { kv_bytes_mut(&kv, &layout)? };
        let mut cache = PagedCacheMut::new(layout, mem).py()?;
        let mut guard = self.ctx.lock().unwrap_or_else(|e| e.into_inner());
        let ctx: &mut tpla::decode::RankContext = &mut guard;
        let faults = py
            .allow_threads(move || ctx.append_paged(layer, &mut cache, slots, latents, rope, mode))
            .py()?;
        self.last_faults = faults.bits();
        Ok(self.last_faults)
    }
}

/// Reads a weight array of `shape` (float32 or float64, contiguous) as f64.
fn weight(name: &'static str, obj: &Bound<'_, PyAny>, shape: &[usize]) -> PyResult<Vec<f64>> {
    let t = Tensor::new(name, obj)?;
    t.expect_exact_shape(shape)?;
    read_f64(&t)
}

fn read_f64(t: &Tensor) -> PyResult<Vec<f64>> {
    t.expect_contiguous()?;
    // SAFETY: element types checked; the views are read while the GIL is held.
    match t.expect_elem(&[Elem::F32, Elem::F64, Elem::Bf16])? {
        Elem::F32 => Ok(unsafe { t.slice::<f32>()? }
            .iter()
            .map(|&v| v as f64)
            .collect()),
        Elem::F64 => Ok(unsafe { t.slice::<f64>()? }.to_vec()),
        _ => Ok(unsafe { t.slice::<bf16>()? }
            .iter()
            .map(|v| v.to_f64())
            .collect()),
    }
}

/// The queries of a decode as float32 (converted into `qbuf` and `rbuf` where they are
/// bfloat16 or float16): `qt` the joined rows, or with `rt` (the RoPE part) the latent
/// part, or with `absorb` q_nope.
fn queries<'a>(
    qt: &'a Tensor,
    rt: Option<&'a Tensor>,
    absorb: bool,
    qbuf: &'a mut Vec<f32>,
    rbuf: &'a mut Vec<f32>,
) -> PyResult<Queries<'a>> {
    let qs = floats(qt, qbuf)?;
    Ok(match (rt, absorb) {
        (None, _) => Queries::Joined(qs),
        (Some(r), false) => Queries::Latent {
            q_lat: qs,
            q_rope: floats(r, rbuf)?,
        },
        (Some(r), true) => Queries::Nope {
            q_nope: qs,
            q_rope: floats(r, rbuf)?,
        },
    })
}

/// A contiguous float32 tensor as a slice, or a bfloat16 / float16 one converted into
/// `buf`.
fn floats<'a>(t: &'a Tensor, buf: &'a mut Vec<f32>) -> PyResult<&'a [f32]> {
    t.expect_contiguous()?;
    // SAFETY: element types checked.
    match t.expect_elem(&[Elem::F32, Elem::Bf16, Elem::F16])? {
        Elem::F32 => unsafe { t.slice::<f32>() },
        Elem::Bf16 => {
            let src = unsafe { t.slice::<bf16>()? };
            buf.clear();
            buf.extend(src.iter().map(|v| v.to_f32()));
            Ok(buf)
        }
        _ => {
            let src = unsafe { t.slice::<half::f16>()? };
            buf.clear();
            buf.extend(src.iter().map(|v| v.to_f32()));
            Ok(buf)
        }
    }
}

/// A contiguous int32 tensor as a slice, or an int64 one narrowed into `buf` (values
/// outside int32 become `i32::MAX`, past every pool, so a slot is skipped and flagged).
fn int32s<'a>(t: &'a Tensor, buf: &'a mut Vec<i32>) -> PyResult<&'a [i32]> {
    t.expect_contiguous()?;
    // SAFETY: element types checked.
    match t.expect_elem(&[Elem::I32, Elem::I64])? {
        Elem::I32 => unsafe { t.slice::<i32>() },
        _ => {
            let src = unsafe { t.slice::<i64>()? };
            buf.clear();
            buf.extend(src.iter().map(|&v| {
                if v < 0 {
                    -1
                } else {
                    i32::try_from(v).unwrap_or(i32::MAX)
                }
            }));
            Ok(buf)
        }
    }
}

/// The paged layout of `kv_cache` for a rank of `row_width` values a row, the last
/// `rope_width` of them the RoPE key: `[num_pages, page_size, 1, row_width]` (or without
/// the 1) of float32, float16 or bfloat16 (or its uint16 bits), or for
/// `kv_dtype='fp8_e4m3'` uint8 `[num_pages, page_size, 1, row_bytes]` holding the FP8
/// rows (codes, block scales, bfloat16 key); rows contiguous, pages at any stride of at
/// least a page.
fn paged_layout(
    kv: &Tensor,
    kv_dtype: Option<&str>,
    rope_width: usize,
    row_width: usize,
) -> PyResult<PagedLayout> {
    let dtype = match (kv.elem, kv_dtype) {
        (Elem::F32, None | Some("float32")) => DType::F32,
        (Elem::F16, None | Some("float16")) => DType::F16,
        (Elem::Bf16, None | Some("bfloat16")) => DType::Bf16,
        (Elem::U16, Some("bfloat16")) => DType::Bf16,
        (Elem::U16, Some("float16")) => DType::F16,
        (Elem::U8, Some("fp8_e4m3")) => DType::Fp8E4m3,
        (Elem::U16, None) => {
            return Err(invalid(
                "kv_cache is uint16: pass kv_dtype='bfloat16' (or 'float16') to say how its \
                 bits are read",
            ))
        }
        (Elem::U8, None) => {
            return Err(invalid(
                "kv_cache is uint8: pass kv_dtype='fp8_e4m3' to read its bytes as FP8 rows",
            ))
        }
        (e, Some(want)) => {
            return Err(invalid(format!(
                "kv_cache is {} and cannot be read as kv_dtype='{want}' (bfloat16 and \
                 float16 caches may be given as uint16 bits, fp8_e4m3 caches as uint8 bytes)",
                e.name()
            )))
        }
        (e, None) => {
            return Err(invalid(format!(
                "kv_cache must be bfloat16, float16 or float32 (or uint8 with \
                 kv_dtype='fp8_e4m3'), got {}",
                e.name()
            )))
        }
    };
    let (pages, ps, last) = match kv.shape.as_slice() {
        [p, s, 1, r] => (*p, *s, *r),
        [p, s, r] => (*p, *s, *r),
        _ => {
            return Err(invalid(format!(
                "kv_cache must have shape [num_pages, page_size, 1, {}], got {}",
                if dtype == DType::Fp8E4m3 {
                    "row_bytes"
                } else {
                    "row_width"
                },
                kv.shape_str()
            )))
        }
    };
    // an FP8 row's last dimension counts bytes; the others count values (checked against
    // the rank where the layout is used)
    let rw = if dtype == DType::Fp8E4m3 {
        let row_bytes = dtype.row_bytes(row_width.saturating_sub(rope_width), rope_width);
        if last != row_bytes {
            return Err(invalid(format!(
                "kv_cache's fp8_e4m3 rows must be {row_bytes} bytes for this rank ({} codes, \
                 block scales, {rope_width} bfloat16 key values), got {last}",
                row_width.saturating_sub(rope_width)
            )));
        }
        row_width
    } else {
        last
    };
    let n = kv.shape.len();
    let es = kv.itemsize as isize;
    let row_ok = last <= 1 || kv.strides[n - 1] == es;
    let page_ok = ps <= 1 || kv.strides[1] == last as isize * es;
    if !(row_ok && page_ok) {
        return Err(invalid(format!(
            "kv_cache must hold each page's rows contiguously (strides {:?} bytes for shape \
             {}); only the page stride may be larger",
            kv.strides,
            kv.shape_str()
        )));
    }
    let page_bytes = ps * last * kv.itemsize;
    let page_stride = if pages <= 1 {
        page_bytes
    } else if kv.strides[0] > 0 {
        kv.strides[0] as usize
    } else {
        return Err(invalid(format!(
            "kv_cache's page stride must be positive, got {} bytes",
            kv.strides[0]
        )));
    };
    Ok(PagedLayout {
        dtype,
        row_width: rw,
        rope_width,
        page_size: ps,
        page_stride,
        pages,
    })
}

/// The bytes of the cache's pages.
///
/// # Safety
/// Nothing else writes the memory meanwhile.
unsafe fn kv_bytes<'a>(kv: &'a Tensor, layout: &PagedLayout) -> PyResult<&'a [u8]> {
    let extent = layout.extent().py()?;
    // SAFETY: the view spans pages * page_stride bytes from ptr (checked shape and
    // positive strides), which covers the extent.
    Ok(unsafe { std::slice::from_raw_parts(kv.ptr as *const u8, extent) })
}

/// # Safety
/// As [`kv_bytes`], and nothing else reads or writes the memory meanwhile.
#[allow(clippy::mut_from_ref)]
unsafe fn kv_bytes_mut<'a>(kv: &'a Tensor, layout: &PagedLayout) -> PyResult<&'a mut [u8]> {
    kv.expect_writable()?;
    let extent = layout.extent().py()?;
    // SAFETY: as in kv_bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(kv.ptr, extent) })
}

/// An element type by its NumPy/torch name ("bfloat16", "float16", "float32") or
/// libtpla's ("bf16", "f16", "f32").
fn parse_dtype(name: &str) -> PyResult<DType> {
    match name {
        "bfloat16" => Ok(DType::Bf16),
        "float16" => Ok(DType::F16),
        "float32" => Ok(DType::F32),
        other => DType::parse(other).py(),
    }
}

/// NumPy's `empty`, looked up once.
static NP_EMPTY: GILOnceCell<PyObject> = GILOnceCell::new();

/// A new array of `shape` and `dtype` ("float32"): a torch tensor when `like` is one,
/// else a NumPy array.
fn empty<'py>(
    py: Python<'py>,
    shape: &[usize],
    dtype: &str,
    like: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let ty = like.get_type();
    if ty.module()?.to_str()?.starts_with("torch") {
        let torch = py.import("torch")?;
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("dtype", torch.getattr(dtype)?)?;
        return torch.getattr("empty")?.call((shape.to_vec(),), Some(&kw));
    }
    let f = NP_EMPTY.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("numpy")?.getattr("empty")?.unbind())
    })?;
    f.bind(py).call1((shape.to_vec(), dtype))
}

fn new_f64(py: Python<'_>, shape: &[usize], values: &[f64]) -> PyResult<PyObject> {
    let f = NP_EMPTY.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("numpy")?.getattr("empty")?.unbind())
    })?;
    let a = f.bind(py).call1((shape.to_vec(), "float64"))?;
    let t = Tensor::new("result", &a)?;
    // SAFETY: a fresh float64 array of exactly these elements.
    unsafe { t.slice_mut::<f64>()? }.copy_from_slice(values);
    drop(t);
    Ok(a.unbind())
}

/// The split-KV schedule of a decode step over sequences of `cache_seqlens` tokens
/// (`[batch]` int32), made by `context`'s backend, for every layer's `decode` of the
/// step (FlashMLA's `get_mla_metadata`). Plan again when the batch or a length changes.
///
/// With a `DeviceEngine` for `context`, the plan of a GPU step (`DeviceEngine.plan`):
/// `block_table_width` is then required, `workspace` and `stream` optional.
#[pyfunction]
#[pyo3(signature = (cache_seqlens, context, *, block_table_width=None, workspace=None, stream=None))]
fn decode_plan(
    py: Python<'_>,
    cache_seqlens: &Bound<'_, PyAny>,
    context: &Bound<'_, PyAny>,
    block_table_width: Option<usize>,
    workspace: Option<&Bound<'_, PyAny>>,
    stream: Option<u64>,
) -> PyResult<PyObject> {
    if let Ok(engine) = context.downcast::<device::PyDeviceEngine>() {
        return device::decode_plan_device(
            engine,
            cache_seqlens,
            block_table_width,
            workspace,
            stream,
        );
    }
    let context = context.downcast::<PyRankContext>().map_err(|_| {
        invalid("context must be a tpla.RankContext (CPU) or a tpla.DeviceEngine (GPU)")
    })?;
    if block_table_width.is_some() || workspace.is_some() || stream.is_some() {
        return Err(invalid(
            "block_table_width, workspace and stream are a DeviceEngine's (GPU) plan \
             arguments; a RankContext's plan takes the lengths alone",
        ));
    }
    Ok(Py::new(py, cpu_decode_plan(cache_seqlens, context)?)?.into_any())
}

fn cpu_decode_plan(
    cache_seqlens: &Bound<'_, PyAny>,
    context: &Bound<'_, PyRankContext>,
) -> PyResult<PyDecodePlan> {
    let t = Tensor::new("cache_seqlens", cache_seqlens)?;
    t.expect_shape(&[None], "[batch]")?;
    let mut c = context.try_borrow_mut()?;
    let c = &mut *c;
    let ctx = c.ctx.lock().unwrap_or_else(|e| e.into_inner());
    let lens = int32s(&t, &mut c.slots)?;
    let mut words = vec![0; ctx.decode_plan_len(lens.len())];
    ctx.decode_plan(lens, &mut words).py()?;
    Ok(PyDecodePlan {
        context: context.clone().unbind(),
        words,
        batch: lens.len(),
    })
}

/// Decode attention of one layer on the engine's paged cache, with FlashMLA's arguments
/// (see the package documentation): returns `(out, lse)`. A `DevicePlan` runs it on the
/// GPU (`DeviceEngine.decode`; `faults` and `stream` are the GPU's arguments).
#[pyfunction]
#[pyo3(signature = (q, kv_cache, block_table, cache_seqlens, plan, softmax_scale=None, *, layer=0, mu=None, q_rope=None, absorb=false, project=false, out=None, lse=None, kv_dtype=None, faults=None, stream=None))]
#[allow(clippy::too_many_arguments)]
fn decode<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    kv_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    cache_seqlens: &Bound<'py, PyAny>,
    plan: &Bound<'py, PyAny>,
    softmax_scale: Option<f64>,
    layer: usize,
    mu: Option<f64>,
    q_rope: Option<&Bound<'py, PyAny>>,
    absorb: bool,
    project: bool,
    out: Option<&Bound<'py, PyAny>>,
    lse: Option<&Bound<'py, PyAny>>,
    kv_dtype: Option<&str>,
    faults: Option<&Bound<'py, PyAny>>,
    stream: Option<u64>,
) -> PyResult<(PyObject, PyObject)> {
    let plan = match plan.downcast::<PyDecodePlan>() {
        Ok(p) => p,
        Err(_) => {
            #[cfg(feature = "cuda")]
            if let Ok(p) = plan.downcast::<device::PyDevicePlan>() {
                return device::decode_device(
                    py,
                    p,
                    q,
                    kv_cache,
                    block_table,
                    cache_seqlens,
                    softmax_scale,
                    layer,
                    mu,
                    q_rope,
                    absorb,
                    project,
                    out,
                    lse,
                    kv_dtype,
                    faults,
                    stream,
                );
            }
            return Err(invalid(format!(
                "plan must be a tpla.DecodePlan or tpla.DevicePlan (tpla.decode_plan), got {}",
                plan.get_type().name()?
            )));
        }
    };
    if faults.is_some() || stream.is_some() {
        return Err(invalid(
            "faults and stream are GPU arguments (a DevicePlan); on the CPU the fault bits \
             are the context's last_faults",
        ));
    }
    let plan = plan.borrow();
    let mut c = plan.context.bind(py).try_borrow_mut()?;
    let c = &mut *c;
    let (d, p) = {
        let g = c.c();
        (*g.dims(), *g.plan())
    };
    let (h, w) = (p.heads, p.slice_width);

    // q: [batch, 1, heads, X] (or [batch, heads, X])
    let qt = Tensor::new("q", q)?;
    let x = query_width(q_rope.is_some(), absorb, w, &d, "[batch, 1, heads, d_n]")?;
    let rows = Rows::of(&qt, h, x)?;
    let b = rows.batch;
    let rt = match q_rope {
        Some(r) => {
            let rt = Tensor::new("q_rope", r)?;
            rows.expect_described(&rt, d.d_r)?;
            Some(rt)
        }
        None => None,
    };
    let kv = Tensor::new("kv_cache", kv_cache)?;
    let layout = paged_layout(&kv, kv_dtype, d.d_r, p.row_width(&d))?;
    let bt = Tensor::new("block_table", block_table)?;
    bt.expect_shape(&[Some(b), None], &format!("[batch={b}, max_pages]"))?;
    bt.expect_array(&[Elem::I32])?;
    let sl = Tensor::new("cache_seqlens", cache_seqlens)?;
    sl.expect_shape(&[Some(b)], &format!("[batch={b}]"))?;
    sl.expect_array(&[Elem::I32])?;

    // outputs
    let out_last = if project { d.d_v } else { w };
    let out_obj = match out {
        Some(o) => o.clone(),
        None => empty(py, &rows.shape(out_last), "float32", q)?,
    };
    let ot = Tensor::new("out", &out_obj)?;
    rows.expect_described(&ot, out_last)?;
    let oelem = ot.expect_output(&[Elem::F32, Elem::Bf16])?;
    let lse_shape = rows.lse_shape();
    let lse_obj = if project {
        refuse_lse_when_projecting(lse)?;
        None
    } else {
        Some(match lse {
            Some(l) => l.clone(),
            None => empty(py, &lse_shape, "float32", q)?,
        })
    };
    let lt = match &lse_obj {
        Some(l) => {
            let lt = Tensor::new("lse", l)?;
            lt.expect_exact_shape(&lse_shape)?;
            lt.expect_output(&[Elem::F32])?;
            Some(lt)
        }
        None => None,
    };
    let mut inputs: Vec<&Tensor> = vec![&qt, &kv, &bt, &sl];
    inputs.extend(&rt);
    check_disjoint(&ot, &inputs)?;
    if let Some(l) = &lt {
        check_disjoint(l, &inputs)?;
        check_disjoint(l, &[&ot])?;
    }

    let PyRankContext {
        ctx: ctx_mutex,
        qbuf,
        rbuf,
        last_faults,
        ..
    } = c;
    let ctx = ctx_mutex.get_mut().unwrap_or_else(|e| e.into_inner());
    let queries = queries(&qt, rt.as_ref(), absorb, qbuf, rbuf)?;
    // SAFETY: element types and contiguity checked above; outputs are disjoint from the
    // inputs and each other, and are written only through these slices.
    let outputs = unsafe {
        match (&lt, oelem) {
            (Some(l), Elem::F32) => Outputs::Latent {
                out: ot.slice_mut::<f32>()?,
                lse: l.slice_mut::<f32>()?,
            },
            (Some(l), _) => Outputs::LatentBf16 {
                out: ot.slice_mut::<bf16>()?,
                lse: l.slice_mut::<f32>()?,
            },
            (None, Elem::F32) => Outputs::Heads(ot.slice_mut::<f32>()?),
            (None, _) => Outputs::HeadsBf16(ot.slice_mut::<bf16>()?),
        }
    };
    // SAFETY: checked element types; the inputs are only read.
    let (mem, table, lens) = unsafe {
        (
            kv_bytes(&kv, &layout)?,
            bt.slice::<i32>()?,
            sl.slice::<i32>()?,
        )
    };
    let step = PagedStep {
        cache: PagedCache::new(layout, mem).py()?,
        block_table: BlockTable::new(table, b, bt.shape[1]).py()?,
        seq_lens: lens,
        plan: &plan.words,
        softmax_scale,
        mu,
    };
    let faults = py
        .allow_threads(move || ctx.decode_paged(layer, &step, queries, outputs))
        .py()?;
    *last_faults = faults.bits();
    drop((qt, rt, kv, bt, sl, ot, lt));
    Ok((
        out_obj.unbind(),
        lse_obj.map_or_else(|| py.None(), |l| l.unbind()),
    ))
}

/// `context.append(...)`: writes new tokens into the engine's paged cache at
/// `slot_mapping` (vLLM's `concat_and_cache_mla` order). Returns the fault bits; with a
/// `DeviceEngine` as `context`, `DeviceEngine.append` on the GPU (returns None: the
/// faults, if asked for, go to the `faults` tensor).
#[pyfunction]
#[pyo3(signature = (kv_c, k_pe, kv_cache, slot_mapping, *, context, layer=0, rms="exact", kv_dtype=None, faults=None, stream=None))]
#[allow(clippy::too_many_arguments)]
fn append(
    py: Python<'_>,
    kv_c: &Bound<'_, PyAny>,
    k_pe: &Bound<'_, PyAny>,
    kv_cache: &Bound<'_, PyAny>,
    slot_mapping: &Bound<'_, PyAny>,
    context: &Bound<'_, PyAny>,
    layer: usize,
    rms: &str,
    kv_dtype: Option<&str>,
    faults: Option<&Bound<'_, PyAny>>,
    stream: Option<u64>,
) -> PyResult<PyObject> {
    #[cfg(feature = "cuda")]
    if let Ok(engine) = context.downcast::<device::PyDeviceEngine>() {
        engine.borrow().append_impl(
            py,
            kv_c,
            k_pe,
            kv_cache,
            kv_dtype,
            slot_mapping,
            layer,
            rms,
            faults,
            stream,
        )?;
        return Ok(py.None());
    }
    let context = context.downcast::<PyRankContext>().map_err(|_| {
        invalid("context must be a tpla.RankContext (CPU) or a tpla.DeviceEngine (GPU)")
    })?;
    if faults.is_some() || stream.is_some() {
        return Err(invalid(
            "faults and stream are GPU arguments (a DeviceEngine); on the CPU append \
             returns the fault bits",
        ));
    }
    let bits = context.try_borrow_mut()?.append_impl(
        py,
        kv_c,
        k_pe,
        kv_cache,
        slot_mapping,
        layer,
        rms,
        kv_dtype,
    )?;
    Ok(bits.into_pyobject(py)?.into_any().unbind())
}

/// Whether this build has the GPU engine path (`tpla.DeviceEngine`; the cargo feature
/// `cuda`). A GPU, its driver and NVRTC are looked for only when an engine is made.
#[pyfunction]
fn cuda_enabled() -> bool {
    device::enabled()
}

/// A rank's read-only view of prefill shard files (`tpla.export_shards` or `tpla shard
/// export` wrote them), mapped in place; `RankContext.import_sequence` copies their rows
/// into the engine's pages.
#[pyclass(module = "tpla", name = "ShardCache")]
struct PyShardCache {
    cache: RankCache,
}

#[pymethods]
impl PyShardCache {
    /// An empty cache for `context`'s rank (its dims, latent group and transforms),
    /// holding `dtype` rows in pages of `page_size` tokens.
    #[new]
    #[pyo3(signature = (context, *, dtype="bfloat16", page_size=64))]
    fn new(context: &PyRankContext, dtype: &str, page_size: usize) -> PyResult<Self> {
        let c = context.c();
        let spec = ShardSpec::new(
            *c.dims(),
            c.plan(),
            parse_dtype(dtype)?,
            page_size,
            c.transform_ids().py()?,
        )
        .py()?;
        Ok(PyShardCache {
            cache: RankCache::new(spec, 0).py()?,
        })
    }

    /// Maps the shard file at `path` read-only and returns its sequence ids.
    fn register_file(&mut self, path: PathBuf) -> PyResult<Vec<u32>> {
        self.cache.register_file(path).py()
    }

    fn sequence_ids(&self) -> Vec<u32> {
        self.cache.sequence_ids().collect()
    }

    /// Cached rows of `seq` in `layer`.
    fn seq_len(&self, seq: u32, layer: usize) -> PyResult<usize> {
        self.cache.seq_len(seq, layer).py()
    }
}

/// Writes one shard file per latent group (`paths[i]` for group `i` of `len(paths)`) of
/// a prefill's latent cache: `sequences` is a list of `(id, latents, k_rope)` with the
/// pre-norm latents `a_t` `[layers, tokens, d_c]` and RoPE keys `[layers, tokens, d_r]`
/// (float32/64); `transforms` the layers' transforms. Rows are normalised, rotated, cut
/// into slices and stored as `dtype` in pages of `page_size` tokens.
///
/// With `sharding` (a `SequenceSharding` of `s` shards), one file per rank of the hybrid
/// plan of `len(paths) / s` latent groups times `s` sequence shards: `paths[r]` for rank
/// `r = group * s + shard` (`HybridPlan`) holds latent slice `group` of the tokens on
/// sequence shard `shard` (format version 2), which may be none of a short sequence's.
#[pyfunction]
#[pyo3(signature = (paths, dims, transforms, sequences, *, dtype="bfloat16", page_size=64, sharding=None))]
#[allow(clippy::too_many_arguments)]
fn export_shards(
    paths: Vec<PathBuf>,
    dims: &PyModelDims,
    transforms: Vec<PyTransform>,
    sequences: &Bound<'_, PyList>,
    dtype: &str,
    page_size: usize,
    sharding: Option<&sequence::PySequenceSharding>,
) -> PyResult<()> {
    let (groups, sharding) = sequence::export_groups(paths.len(), sharding)?;
    let d = dims.0;
    let layers = transforms.len();
    let mut seqs: Vec<(u32, Vec<f64>, Vec<f64>, usize)> = Vec::new();
    for item in sequences.iter() {
        let (id, lat, rope): (u32, Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let lt = Tensor::new("latents", &lat)?;
        lt.expect_shape(&[Some(layers), None, Some(d.d_c)], "[layers, tokens, d_c]")?;
        let tokens = lt.shape[1];
        let rt = Tensor::new("k_rope", &rope)?;
        rt.expect_shape(
            &[Some(layers), Some(tokens), Some(d.d_r)],
            "[layers, tokens, d_r]",
        )?;
        seqs.push((id, read_f64(&lt)?, read_f64(&rt)?, tokens));
    }
    let ids: Vec<TransformIdList> = transforms
        .iter()
        .map(|t| tpla::cache::TransformId::of(&t.0))
        .collect();
    let table: Vec<(u32, usize)> = seqs.iter().map(|s| (s.0, s.3)).collect();
    let plan = ExportPlan::hybrid(
        d,
        groups,
        sharding,
        parse_dtype(dtype)?,
        page_size,
        ids,
        &table,
    )
    .py()?;
    let mut w = ShardFileWriter::create(&plan, &paths).py()?;
    while let Some((layer, id)) = w.next_block() {
        let s = seqs
            .iter()
            .find(|s| s.0 == id)
            .expect("the plan's sequences are the caller's");
        let t = s.3;
        let lat = &s.1[layer * t * d.d_c..(layer + 1) * t * d.d_c];
        let rope = &s.2[layer * t * d.d_r..(layer + 1) * t * d.d_r];
        w.push(&rotated_latents(lat, &transforms[layer].0), rope)
            .py()?;
    }
    w.commit().py()
}

type TransformIdList = tpla::cache::TransformId;

/// Sums the ranks' partial outputs (float32 arrays of one shape) in place, in rank
/// order, so that every rank's array holds the same sum (several ranks in one process).
#[pyfunction]
fn all_reduce_in_process(buffers: &Bound<'_, PyList>) -> PyResult<()> {
    let ts: Vec<Tensor> = buffers
        .iter()
        .map(|b| Tensor::new("buffer", &b))
        .collect::<PyResult<_>>()?;
    for (i, t) in ts.iter().enumerate() {
        t.expect_output(&[Elem::F32])?;
        let others: Vec<&Tensor> = ts[..i].iter().collect();
        check_disjoint(t, &others)?;
    }
    // SAFETY: float32, contiguous, writable and pairwise disjoint.
    let mut slices: Vec<&mut [f32]> = ts
        .iter()
        .map(|t| unsafe { t.slice_mut::<f32>() })
        .collect::<PyResult<_>>()?;
    tpla::combine::all_reduce_in_process(&mut slices).py()
}

/// The CPU kernels this machine can run, fastest first ("auto" picks the first).
#[pyfunction]
fn cpu_kernels() -> Vec<&'static str> {
    KernelChoice::available()
        .into_iter()
        .map(|k| k.name())
        .collect()
}

/// Names accepted by `ModelDims.preset`.
#[pyfunction]
fn presets() -> Vec<&'static str> {
    tpla::geometry::PRESETS.to_vec()
}

#[pymodule]
fn _tpla(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModelDims>()?;
    m.add_class::<PyShardPlan>()?;
    m.add_class::<PyTransform>()?;
    m.add_class::<PyRankContext>()?;
    m.add_class::<PyDecodePlan>()?;
    m.add_class::<PyShardCache>()?;
    m.add_class::<sequence::PySequenceSharding>()?;
    m.add_class::<sequence::PyHybridPlan>()?;
    m.add_class::<sequence::PyRankCache>()?;
    m.add_class::<device::PyDeviceEngine>()?;
    m.add_class::<device::PyDevicePlan>()?;
    m.add_function(wrap_pyfunction!(cuda_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(decode_plan, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(append, m)?)?;
    m.add_function(wrap_pyfunction!(export_shards, m)?)?;
    m.add_function(wrap_pyfunction!(all_reduce_in_process, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::merge_by_lse_in_process, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::merge_packed_in_process, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::rescale_by_gathered_lse, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::pack_against_bound, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::unpack_merged, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::sequence_merge_error, m)?)?;
    m.add_function(wrap_pyfunction!(sequence::packed_row_len, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

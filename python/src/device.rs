//! The GPU engine path (`tpla.DeviceEngine`): a thin skin over
//! `tpla::engine_device::DeviceEngine` on torch CUDA tensors (DLPack) or anything with
//! `__cuda_array_interface__`. Every tensor's dtype, shape, strides, device and
//! allocation extent is checked here (the driver says which GPU and allocation an address
//! lies in); the launches go on the caller's stream (torch's current stream unless
//! `stream=` names one), with no host synchronisation and no allocation but the outputs
//! asked for, so that a step can be captured in `torch.cuda.graphs`.
//!
//! Without the cargo feature `cuda` the class exists and its constructor raises
//! `UnsupportedError`.

#[cfg(feature = "cuda")]
pub use imp::*;
#[cfg(not(feature = "cuda"))]
pub use stub::*;

#[cfg(not(feature = "cuda"))]
mod stub {
    use crate::PyRankContext;
    use pyo3::prelude::*;

    fn no_cuda() -> PyErr {
        crate::errors::to_py(tpla::Error::unsupported(
            "this build of the tpla Python package has no CUDA support (built without the \
             cargo feature `cuda`): tpla.DeviceEngine is not available",
        ))
    }

    /// A rank's engine-facing GPU object (unavailable: this build has no CUDA).
    #[pyclass(module = "tpla", name = "DeviceEngine")]
    pub struct PyDeviceEngine;

    #[pymethods]
    impl PyDeviceEngine {
        #[new]
        #[pyo3(signature = (context, device=0, *, kv_dtype="bfloat16"))]
        fn new(context: &PyRankContext, device: usize, kv_dtype: &str) -> PyResult<Self> {
            let _ = (context, device, kv_dtype);
            Err(no_cuda())
        }
    }

    /// The plan of a device step (unavailable: this build has no CUDA).
    #[pyclass(module = "tpla", name = "DevicePlan")]
    pub struct PyDevicePlan;

    pub fn enabled() -> bool {
        false
    }

    pub fn decode_plan_device(
        _engine: &Bound<'_, PyDeviceEngine>,
        _cache_seqlens: &Bound<'_, PyAny>,
        _width: Option<usize>,
        _workspace: Option<&Bound<'_, PyAny>>,
        _stream: Option<u64>,
    ) -> PyResult<PyObject> {
        Err(no_cuda())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::checks::{refuse_lse_when_projecting, Rows};
    use crate::errors::{invalid, to_py, Tpla};
    use crate::sequence::dtype_name;
    use crate::tensor::{check_disjoint, Elem, Tensor};
    use crate::{paged_layout, parse_dtype, rms_mode, PyRankContext};
    use pyo3::prelude::*;
    use pyo3::sync::GILOnceCell;
    use pyo3::types::PyDict;
    use std::sync::{Mutex, MutexGuard};
    use tpla::attention::cuda::{device_extent, CUstream, CudaBackend};
    use tpla::engine_device::{DeviceAppend, DeviceEngine, DevicePagedCache, DeviceStep};
    use tpla::DType;

    pub fn enabled() -> bool {
        true
    }

    /// One rank's engine-facing GPU object (`tpla::engine_device::DeviceEngine`): the
    /// decode and append kernels of the rank's shape and every layer's transform and
    /// absorbed weights on GPU `device`, decoding pools of one row type (`kv_dtype`). It
    /// holds no cache state: the engine passes its pool, block table and lengths (torch
    /// CUDA tensors) on every call.
    #[pyclass(module = "tpla", name = "DeviceEngine")]
    pub struct PyDeviceEngine {
        /// A mutex only to make the class `Sync`; never contended under the GIL.
        engine: Mutex<DeviceEngine>,
        ordinal: usize,
        /// The row type of the pools `decode` reads (the engine's `pool_dtype`).
        kv_dtype: DType,
        heads: usize,
        slice_width: usize,
        d_c: usize,
        d_r: usize,
        d_n: usize,
        d_v: usize,
        layers: usize,
    }

    /// The plan of a device step (`DeviceEngine.plan` / `tpla.decode_plan`): the
    /// workspace (a CUDA tensor, kept alive here) that every layer's decode of the step
    /// reuses, for one batch size and block table width.
    #[pyclass(module = "tpla", name = "DevicePlan", frozen)]
    pub struct PyDevicePlan {
        engine: Py<PyDeviceEngine>,
        workspace: PyObject,
        ptr: u64,
        bytes: usize,
        batch: usize,
        width: usize,
    }

    #[pymethods]
    impl PyDevicePlan {
        #[getter]
        fn batch(&self) -> usize {
            self.batch
        }
        #[getter]
        fn block_table_width(&self) -> usize {
            self.width
        }
        /// The device workspace (the tensor given to `plan`, or the uint8 one it made).
        #[getter]
        fn workspace(&self, py: Python<'_>) -> PyObject {
            self.workspace.clone_ref(py)
        }
        #[getter]
        fn workspace_bytes(&self) -> usize {
            self.bytes
        }
        #[getter]
        fn engine(&self, py: Python<'_>) -> Py<PyDeviceEngine> {
            self.engine.clone_ref(py)
        }
        fn __repr__(&self) -> String {
            format!(
                "DevicePlan(batch={}, block_table_width={}, workspace_bytes={})",
                self.batch, self.width, self.bytes
            )
        }
    }

    /// What the binding calls in torch, looked up once.
    struct Torch {
        /// `torch._C._cuda_getCurrentRawStream(device)` (the `cudaStream_t` as an int, what
        /// torch's own generated code calls), or else `torch.cuda.current_stream`.
        raw_stream: Option<PyObject>,
        current_stream: PyObject,
        empty: PyObject,
        module: PyObject,
    }

    static TORCH: GILOnceCell<Torch> = GILOnceCell::new();

    fn torch(py: Python<'_>) -> PyResult<&Torch> {
        TORCH.get_or_try_init(py, || -> PyResult<_> {
            let torch = py.import("torch")?;
            let raw_stream = torch
                .getattr("_C")
                .and_then(|c| c.getattr("_cuda_getCurrentRawStream"))
                .ok()
                .map(|f| f.unbind());
            Ok(Torch {
                raw_stream,
                current_stream: torch.getattr("cuda")?.getattr("current_stream")?.unbind(),
                empty: torch.getattr("empty")?.unbind(),
                module: torch.unbind().into_any(),
            })
        })
    }

    fn torch_loaded(py: Python<'_>) -> PyResult<bool> {
        if TORCH.get(py).is_some() {
            return Ok(true);
        }
        let modules = py.import("sys")?.getattr("modules")?;
        modules.contains("torch")
    }

    /// The stream a call runs on: `stream` (a `CUstream` as an int, 0 the legacy default
    /// stream), or else torch's current stream of device `ordinal` (when torch is
    /// loaded; the legacy default stream otherwise).
    fn stream_of(py: Python<'_>, stream: Option<u64>, ordinal: usize) -> PyResult<CUstream> {
        if let Some(s) = stream {
            return Ok(s as usize as CUstream);
        }
        if !torch_loaded(py)? {
            return Ok(std::ptr::null_mut());
        }
        let t = torch(py)?;
        let handle: u64 = match &t.raw_stream {
            Some(raw) => raw.bind(py).call1((ordinal,))?.extract()?,
            None => t
                .current_stream
                .bind(py)
                .call1((ordinal,))?
                .getattr(pyo3::intern!(py, "cuda_stream"))?
                .extract()?,
        };
        Ok(handle as usize as CUstream)
    }

    /// A tensor's last extent (the row width) and the extents before it (the rows).
    fn split_rows(t: &Tensor) -> PyResult<(usize, Vec<usize>)> {
        match t.shape.split_last() {
            Some((&width, rows)) if width > 0 && rows.iter().product::<usize>() > 0 => {
                Ok((width, rows.to_vec()))
            }
            _ => Err(invalid(format!(
                "{} must have shape [..., width] with rows and a width, got {}",
                t.name,
                t.shape_str()
            ))),
        }
    }

    /// The caller's output `given`, or (none given) [`empty`] of `shape` and `dtype`.
    fn given_or_empty<'py>(
        py: Python<'py>,
        given: Option<&Bound<'py, PyAny>>,
        shape: &[usize],
        dtype: &str,
        like: &Bound<'py, PyAny>,
        what: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        match given {
            Some(o) => Ok(o.clone()),
            None => empty(py, shape, dtype, like, what),
        }
    }

    /// A new torch CUDA tensor of `shape` and `dtype` ("float32", "uint8") on the device
    /// of `like` (a torch tensor); other producers must pass their own buffers.
    fn empty<'py>(
        py: Python<'py>,
        shape: &[usize],
        dtype: &str,
        like: &Bound<'py, PyAny>,
        what: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !like.get_type().module()?.to_str()?.starts_with("torch") {
            return Err(invalid(format!(
                "{what} is allocated only next to torch tensors: pass {what}= (a CUDA buffer \
                 of shape {shape:?}, {dtype})"
            )));
        }
        let t = torch(py)?;
        let kw = PyDict::new(py);
        kw.set_item("dtype", t.module.bind(py).getattr(dtype)?)?;
        kw.set_item("device", like.getattr(pyo3::intern!(py, "device"))?)?;
        t.empty.bind(py).call((shape.to_vec(),), Some(&kw))
    }

    fn mismatch(msg: String) -> PyErr {
        to_py(tpla::Error::mismatch(msg))
    }

    impl PyDeviceEngine {
        fn e(&self) -> MutexGuard<'_, DeviceEngine> {
            self.engine.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// A CUDA tensor of this engine's GPU whose allocation spans the view.
        fn dev(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
            let t = Tensor::cuda(name, obj, self.ordinal)?;
            if let Some(d) = t.device {
                if d != self.ordinal {
                    return Err(mismatch(format!(
                        "{name} is on cuda:{d}, the engine on cuda:{}",
                        self.ordinal
                    )));
                }
            }
            if t.strides.iter().any(|&s| s < 0) {
                return Err(invalid(format!("{name} has negative strides")));
            }
            let (lo, hi) = t.span();
            if hi > lo {
                // the driver's pointer queries need a current context on this thread
                self.e().backend().device().bind().py()?;
                let (ordinal, left) = device_extent(lo as u64).map_err(|e| e.context(name)).py()?;
                if ordinal != self.ordinal {
                    return Err(mismatch(format!(
                        "{name} is memory of cuda:{ordinal}, the engine is on cuda:{}",
                        self.ordinal
                    )));
                }
                if left < hi - lo {
                    return Err(invalid(format!(
                        "{name} spans {} bytes but its allocation holds {left} from there",
                        hi - lo
                    )));
                }
            }
            Ok(t)
        }

        fn f32_rows(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
            let t = self.dev(name, obj)?;
            t.expect_array(&[Elem::F32])?;
            Ok(t)
        }

        fn int32s(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
            let t = self.dev(name, obj)?;
            if t.elem == Elem::I64 {
                return Err(invalid(format!(
                    "{name} must be int32 on the GPU, got int64 (pass {name}.to(torch.int32))"
                )));
            }
            t.expect_array(&[Elem::I32])?;
            Ok(t)
        }

        fn output(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
            let t = self.dev(name, obj)?;
            t.expect_output(&[Elem::F32])?;
            Ok(t)
        }

        /// A word the GPU ORs bits into (`faults`, a merge's `error`): one writable int32
        /// of this GPU.
        fn bit_word(&self, name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
            let t = self.dev(name, obj)?;
            t.expect_elem(&[Elem::I32])?;
            if t.numel() != 1 {
                return Err(invalid(format!(
                    "{name} must hold one int32 word, got shape {}",
                    t.shape_str()
                )));
            }
            t.expect_writable()?;
            Ok(t)
        }

        /// The output `given` (checked: `elem`, `shape`, this GPU) or a new torch tensor
        /// of `dtype` next to `like`.
        #[allow(clippy::too_many_arguments)]
        fn dev_output<'py>(
            &self,
            py: Python<'py>,
            name: &'static str,
            given: Option<&Bound<'py, PyAny>>,
            shape: &[usize],
            dtype: &str,
            elem: Elem,
            like: &Bound<'py, PyAny>,
        ) -> PyResult<(Bound<'py, PyAny>, Tensor)> {
            let obj = given_or_empty(py, given, shape, dtype, like, name)?;
            let t = self.dev(name, &obj)?;
            t.expect_output(&[elem])?;
            t.expect_exact_shape(shape)?;
            Ok((obj, t))
        }

        fn faults(&self, obj: Option<&Bound<'_, PyAny>>) -> PyResult<(u64, Option<Tensor>)> {
            let Some(obj) = obj else {
                return Ok((0, None));
            };
            let t = self.bit_word("faults", obj)?;
            Ok((t.ptr as u64, Some(t)))
        }

        /// The device pool `kv` of rows of `kv_dtype` (the CPU's names and rules; a uint8
        /// pool given to an engine made for fp8_e4m3 needs no name: the engine's rows).
        fn cache(&self, kv: &Tensor, kv_dtype: Option<&str>) -> PyResult<DevicePagedCache> {
            let named = kv_dtype.or_else(|| {
                (kv.elem == Elem::U8 && self.kv_dtype == DType::Fp8E4m3)
                    .then_some(dtype_name(DType::Fp8E4m3))
            });
            let layout = paged_layout(kv, named, self.d_r, self.slice_width + self.d_r)?;
            if !matches!(layout.dtype, DType::Bf16 | DType::Fp8E4m3) {
                return Err(to_py(tpla::Error::unsupported(format!(
                    "the CUDA kernels read bfloat16 caches or uint8 fp8_e4m3 rows, kv_cache is {}",
                    kv.elem.name()
                ))));
            }
            kv.expect_writable()?;
            Ok(DevicePagedCache {
                base: kv.ptr as u64,
                layout,
            })
        }

        fn check_layer(&self, layer: usize) -> PyResult<()> {
            if layer >= self.layers {
                return Err(to_py(tpla::Error::out_of_range(format!(
                    "layer {layer} is out of range for {} layers",
                    self.layers
                ))));
            }
            Ok(())
        }

        /// Checks `stream` belongs to the engine's context (and binds it).
        fn checked_stream(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<CUstream> {
            let s = stream_of(py, stream, self.ordinal)?;
            let e = self.e();
            // SAFETY: NULL, torch's live current stream, or a stream the caller vouches
            // for (documented: a live CUstream of the engine's GPU).
            unsafe { e.backend().device().check_stream(s) }.py()?;
            Ok(s)
        }
    }

    #[pymethods]
    impl PyDeviceEngine {
        /// The engine object of `context`'s rank on GPU `device` (every layer of the
        /// context with its weights), decoding pools of `kv_dtype` rows ("bfloat16", or
        /// "fp8_e4m3" on a Hopper GPU: uint8 rows of codes, block scales and the bfloat16
        /// key): compiles (or loads from the disk cache) the kernels of its shape and
        /// uploads every layer's transform and absorbed weights.
        #[new]
        #[pyo3(signature = (context, device=0, *, kv_dtype="bfloat16"))]
        fn new(
            py: Python<'_>,
            context: &Bound<'_, PyRankContext>,
            device: usize,
            kv_dtype: &str,
        ) -> PyResult<Self> {
            let dtype = parse_dtype(kv_dtype)?;
            let c = context.try_borrow_mut()?;
            let mut guard = c.ctx.lock().unwrap_or_else(|e| e.into_inner());
            let ctx: &mut tpla::decode::RankContext = &mut guard;
            let engine = py
                .allow_threads(move || {
                    let backend = CudaBackend::new(device)?;
                    DeviceEngine::from_context_for(backend, ctx, dtype)
                })
                .py()?;
            let (d, p) = (*engine.dims(), *engine.plan());
            let layers = engine.layer_count();
            Ok(PyDeviceEngine {
                kv_dtype: engine.pool_dtype(),
                engine: Mutex::new(engine),
                ordinal: device,
                heads: p.heads,
                slice_width: p.slice_width,
                d_c: d.d_c,
                d_r: d.d_r,
                d_n: d.d_n,
                d_v: d.d_v,
                layers,
            })
        }

        /// The CUDA device ordinal.
        #[getter]
        fn device(&self) -> usize {
            self.ordinal
        }
        #[getter]
        fn layers(&self) -> usize {
            self.layers
        }
        #[getter]
        fn heads(&self) -> usize {
            self.heads
        }
        #[getter]
        fn slice_width(&self) -> usize {
            self.slice_width
        }
        /// Elements of a cache row and of a query row: `slice_width + d_r`.
        #[getter]
        fn row_width(&self) -> usize {
            self.slice_width + self.d_r
        }
        /// The row type of the pools `decode` reads ("bfloat16" or "fp8_e4m3").
        #[getter]
        fn kv_dtype(&self) -> &'static str {
            dtype_name(self.kv_dtype)
        }
        /// The GPU's name.
        #[getter]
        fn device_name(&self) -> String {
            self.e().backend().device().name().to_string()
        }

        /// `(latent_scale, rope_scale)` of layer `layer`'s query rows: `softmax_scale *
        /// mu` and `softmax_scale`. `decode` reads rows already scaled so.
        #[pyo3(signature = (layer=0))]
        fn query_scales(&self, layer: usize) -> PyResult<(f32, f32)> {
            self.e().query_scales(layer).py()
        }

        /// Split count of a step of `batch` entries over a block table `width` pages wide.
        fn splits(&self, batch: usize, block_table_width: usize) -> PyResult<usize> {
            self.e().splits(batch, block_table_width).py()
        }

        /// Bytes of the device workspace of a step of `batch` entries over a block table
        /// `block_table_width` pages wide (allocate once for the largest batch and width).
        fn workspace_bytes(&self, batch: usize, block_table_width: usize) -> PyResult<usize> {
            self.e().workspace_bytes(batch, block_table_width).py()
        }

        /// Plans a step of `len(cache_seqlens)` entries over a block table
        /// `block_table_width` pages wide: one kernel on the stream, no synchronisation.
        /// `workspace`: a CUDA tensor of at least `workspace_bytes(...)` bytes, 16-byte
        /// aligned (default: a new torch uint8 tensor). Returns a `DevicePlan`, which
        /// depends only on the batch and the width (plan again when either changes).
        #[pyo3(signature = (cache_seqlens, block_table_width, *, workspace=None, stream=None))]
        fn plan(
            slf: &Bound<'_, Self>,
            cache_seqlens: &Bound<'_, PyAny>,
            block_table_width: usize,
            workspace: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyDevicePlan> {
            let py = slf.py();
            let me = slf.borrow();
            let sl = me.int32s("cache_seqlens", cache_seqlens)?;
            sl.expect_shape(&[None], "[batch]")?;
            let batch = sl.shape[0];
            let need = me.e().workspace_bytes(batch, block_table_width).py()?;
            let s = me.checked_stream(py, stream)?;
            let ws_obj =
                given_or_empty(py, workspace, &[need], "uint8", cache_seqlens, "workspace")?;
            let ws = me.dev("workspace", &ws_obj)?;
            ws.expect_contiguous()?;
            ws.expect_writable()?;
            let bytes = ws.numel() * ws.itemsize;
            if bytes < need {
                return Err(invalid(format!(
                    "the workspace holds {bytes} bytes, a step of batch {batch} over \
                     {block_table_width} pages needs {need}"
                )));
            }
            check_disjoint(&ws, &[&sl])?;
            // SAFETY: device memory of the engine's GPU of the checked sizes, live while
            // the plan (which keeps the workspace object) and the caller's tensors are.
            unsafe {
                me.e().plan_step(
                    sl.ptr as u64,
                    batch,
                    block_table_width,
                    ws.ptr as u64,
                    bytes,
                    s,
                )
            }
            .py()?;
            let ptr = ws.ptr as u64;
            drop((ws, sl));
            Ok(PyDevicePlan {
                engine: slf.clone().unbind(),
                workspace: ws_obj.unbind(),
                ptr,
                bytes,
                batch,
                width: block_table_width,
            })
        }

        /// One decode step of `layer` on the engine's paged pool, on the stream with no
        /// synchronisation: `q` query rows `[batch, 1, heads, row_width]` (or `[batch,
        /// heads, row_width]`) float32, scaled as `query_scales` says (`absorb_queries`
        /// makes them); `kv_cache` `[pages, 64, 1, row_width]` bfloat16, or for an engine
        /// made with `kv_dtype="fp8_e4m3"` uint8 `[pages, 64, 1, row_bytes]` FP8 rows;
        /// `block_table` `[batch, block_table_width]` and `cache_seqlens` `[batch]` int32.
        /// Returns `(out, lse)`: `[batch, 1, heads, slice_width]` and `[batch, heads, 1]`
        /// float32 (into `out=` / `lse=` when given). `faults`: an optional int32 CUDA
        /// tensor of one element the kernels OR `tpla.Faults` bits into (never cleared).
        /// `kv_dtype`: how `kv_cache` is read, as on the CPU (default: its dtype; uint8
        /// pools are the engine's FP8 rows); pools of another row type than the engine's
        /// raise `MismatchError`.
        #[pyo3(signature = (q, kv_cache, block_table, cache_seqlens, plan, *, layer=0, out=None, lse=None, kv_dtype=None, faults=None, stream=None))]
        #[allow(clippy::too_many_arguments)]
        fn decode(
            slf: &Bound<'_, Self>,
            q: &Bound<'_, PyAny>,
            kv_cache: &Bound<'_, PyAny>,
            block_table: &Bound<'_, PyAny>,
            cache_seqlens: &Bound<'_, PyAny>,
            plan: &Bound<'_, PyDevicePlan>,
            layer: usize,
            out: Option<&Bound<'_, PyAny>>,
            lse: Option<&Bound<'_, PyAny>>,
            kv_dtype: Option<&str>,
            faults: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<(PyObject, PyObject)> {
            let me = slf.borrow();
            me.decode_impl(
                slf.py(),
                slf,
                q,
                kv_cache,
                kv_dtype,
                block_table,
                cache_seqlens,
                plan,
                layer,
                out,
                lse,
                faults,
                stream,
            )
        }

        /// Appends `len(slot_mapping)` tokens to the pool of `layer`, on the stream with
        /// no synchronisation: `kv_c` the full pre-norm latents `[tokens, d_c]` and `k_pe`
        /// the RoPE keys `[tokens, d_r]` (or `[tokens, 1, d_r]`), both float32 or both
        /// bfloat16; `slot_mapping` `[tokens]` int32 (`page * 64 + offset`; negative:
        /// skipped). Normalised (`rms` "exact" or "sliced"), rotated and sliced as the CPU
        /// append does, then rounded to bfloat16 or quantised to FP8 as the pool's rows
        /// are (`kv_dtype` as for `decode`; either row type, whatever the engine
        /// decodes). A slot past the pool or a non-finite value sets `faults` bits.
        #[pyo3(signature = (kv_c, k_pe, kv_cache, slot_mapping, *, layer=0, rms="exact", kv_dtype=None, faults=None, stream=None))]
        #[allow(clippy::too_many_arguments)]
        fn append(
            &self,
            py: Python<'_>,
            kv_c: &Bound<'_, PyAny>,
            k_pe: &Bound<'_, PyAny>,
            kv_cache: &Bound<'_, PyAny>,
            slot_mapping: &Bound<'_, PyAny>,
            layer: usize,
            rms: &str,
            kv_dtype: Option<&str>,
            faults: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<()> {
            self.append_impl(
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
            )
        }

        /// The query rows of layer `layer` from `q_nope` `[batch, 1, heads, d_n]` and
        /// `q_rope` `[batch, 1, heads, d_r]` (float32, or 3-d without the 1): `W'_UK`
        /// times `q_nope` scaled by `softmax_scale * mu`, then `q_rope * softmax_scale`
        /// (cuBLAS, on the stream). Returns `[batch, 1, heads, row_width]` float32.
        #[pyo3(signature = (q_nope, q_rope, *, layer=0, out=None, stream=None))]
        fn absorb_queries(
            &self,
            py: Python<'_>,
            q_nope: &Bound<'_, PyAny>,
            q_rope: &Bound<'_, PyAny>,
            layer: usize,
            out: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyObject> {
            Ok(self
                .absorb_impl(py, q_nope, q_rope, layer, out, stream)?
                .unbind())
        }

        /// The rank's partial head outputs `[batch, 1, heads, d_v]` float32 from
        /// `decode`'s latent outputs `[batch, 1, heads, slice_width]` (`W'_UV`, cuBLAS, on
        /// the stream); sum them over the ranks (`tpla.all_reduce`). A bfloat16 `out=`
        /// gets the float32 outputs rounded to bfloat16 (the first such call allocates
        /// the engine's staging buffer: make one before capturing a graph).
        #[pyo3(signature = (latent, *, layer=0, out=None, stream=None))]
        fn project(
            &self,
            py: Python<'_>,
            latent: &Bound<'_, PyAny>,
            layer: usize,
            out: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyObject> {
            Ok(self.project_impl(py, latent, layer, out, stream)?.unbind())
        }

        /// Merge (a) of the sequence shards, this rank's step between the engine's
        /// all-gather of the log-sum-exps and its all-reduce, on the stream: rescales
        /// `out` (float32 `[..., width]`: `decode`'s latent outputs or `project`'s head
        /// outputs) in place by `e^(lse_own - L)`, with `gathered` (float32 `[shards,
        /// ...]`, `out`'s shape without its last extent, e.g.
        /// `all_gather_into_tensor`'s output) the shards' log-sum-exps and `shard` this
        /// rank's. Summing `out` over every rank then gives the exact output.
        #[pyo3(signature = (out, gathered, *, shard, stream=None))]
        fn sequence_rescale(
            &self,
            py: Python<'_>,
            out: &Bound<'_, PyAny>,
            gathered: &Bound<'_, PyAny>,
            shard: usize,
            stream: Option<u64>,
        ) -> PyResult<()> {
            let ot = self.dev("out", out)?;
            ot.expect_output(&[Elem::F32])?;
            let (width, rows_shape) = split_rows(&ot)?;
            let gt = self.f32_rows("gathered", gathered)?;
            if gt.shape.len() != rows_shape.len() + 1 || gt.shape[1..] != rows_shape[..] {
                return Err(invalid(format!(
                    "gathered must have shape [shards, {}] (out's shape without its last \
                     extent), got {}",
                    rows_shape
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    gt.shape_str()
                )));
            }
            check_disjoint(&ot, &[&gt])?;
            let rows = rows_shape.iter().product();
            let s = self.checked_stream(py, stream)?;
            // SAFETY: checked device memory of the engine's GPU of the documented sizes.
            unsafe {
                self.e().sequence_rescale(
                    shard,
                    gt.shape[0],
                    rows,
                    width,
                    gt.ptr as u64,
                    ot.ptr as u64,
                    s,
                )
            }
            .py()
        }

        /// Merge (b)'s shared logit bounds (float64 `[...]`, returned or written into
        /// `out=`) of `decode`'s query rows `q` (float32 `[..., row_width]`, the same on
        /// every shard of a latent group), with `rope_key_norm` a bound of `|k_rope|` over
        /// the batch's tokens. On the stream.
        #[pyo3(signature = (q, *, rope_key_norm, out=None, stream=None))]
        fn sequence_bounds<'py>(
            &self,
            py: Python<'py>,
            q: &Bound<'py, PyAny>,
            rope_key_norm: f64,
            out: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyObject> {
            let qt = self.f32_rows("q", q)?;
            let (width, rows_shape) = split_rows(&qt)?;
            if width != self.slice_width + self.d_r {
                return Err(invalid(format!(
                    "q's rows hold {width} values, the rank's rows {}",
                    self.slice_width + self.d_r
                )));
            }
            let (oobj, ot) =
                self.dev_output(py, "out", out, &rows_shape, "float64", Elem::F64, q)?;
            check_disjoint(&ot, &[&qt])?;
            let s = self.checked_stream(py, stream)?;
            // SAFETY: as sequence_rescale.
            unsafe {
                self.e().sequence_bounds(
                    rows_shape.iter().product(),
                    rope_key_norm,
                    qt.ptr as u64,
                    ot.ptr as u64,
                    s,
                )
            }
            .py()?;
            drop((qt, ot));
            Ok(oobj.unbind())
        }

        /// Merge (b), pack, on the stream: float64 `[..., width + 2]` (returned or
        /// written into `packed=`) from this rank's `out` (float32 `[..., width]`), `lse`
        /// (float32 `[...]`) and the shared `bound` (float64 `[...]`); what the host merge
        /// refuses is ORed into `error` (one int32 word on the GPU, which the caller
        /// clears; `tpla.sequence_merge_error(word)` raises the host merge's error). Sum
        /// the packs over the group's shards (an all-reduce), then `sequence_unpack`.
        #[pyo3(signature = (out, lse, bound, *, error, packed=None, stream=None))]
        #[allow(clippy::too_many_arguments)]
        fn sequence_pack<'py>(
            &self,
            py: Python<'py>,
            out: &Bound<'py, PyAny>,
            lse: &Bound<'py, PyAny>,
            bound: &Bound<'py, PyAny>,
            error: &Bound<'py, PyAny>,
            packed: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyObject> {
            let ot = self.f32_rows("out", out)?;
            let (width, rows_shape) = split_rows(&ot)?;
            let lt = self.f32_rows("lse", lse)?;
            let bt = self.dev("bound", bound)?;
            bt.expect_array(&[Elem::F64])?;
            for t in [&lt, &bt] {
                if t.shape != rows_shape {
                    return Err(invalid(format!(
                        "{} has shape {}, expected {rows_shape:?} (out's shape without its \
                         last extent)",
                        t.name,
                        t.shape_str()
                    )));
                }
            }
            let et = self.bit_word("error", error)?;
            let mut packed_shape = rows_shape.clone();
            packed_shape.push(tpla::combine::sequence::packed_row_len(width));
            let (pobj, pt) = self.dev_output(
                py,
                "packed",
                packed,
                &packed_shape,
                "float64",
                Elem::F64,
                out,
            )?;
            check_disjoint(&pt, &[&ot, &lt, &bt, &et])?;
            check_disjoint(&et, &[&ot, &lt, &bt])?;
            let s = self.checked_stream(py, stream)?;
            // SAFETY: as sequence_rescale.
            unsafe {
                self.e().sequence_pack(
                    rows_shape.iter().product(),
                    width,
                    ot.ptr as u64,
                    lt.ptr as u64,
                    bt.ptr as u64,
                    pt.ptr as u64,
                    et.ptr as u64,
                    s,
                )
            }
            .py()?;
            drop(pt);
            Ok(pobj.unbind())
        }

        /// Merge (b), unpack, on the stream: the merged outputs (float32 `[..., width]`,
        /// returned or written into `out=`) from the packs summed over the group's shards
        /// (float64 `[..., width + 2]`); refusals ORed into `error` as for
        /// `sequence_pack`. Then sum the outputs over the latent groups.
        #[pyo3(signature = (packed, *, error, out=None, stream=None))]
        fn sequence_unpack<'py>(
            &self,
            py: Python<'py>,
            packed: &Bound<'py, PyAny>,
            error: &Bound<'py, PyAny>,
            out: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<PyObject> {
            let pt = self.dev("packed", packed)?;
            pt.expect_array(&[Elem::F64])?;
            let width = match pt.shape.last() {
                Some(&n) if n > 2 => n - 2,
                _ => {
                    return Err(invalid(format!(
                        "packed must have shape [..., width + 2], got {}",
                        pt.shape_str()
                    )))
                }
            };
            let mut shape = pt.shape.clone();
            *shape.last_mut().expect("checked above") = width;
            let et = self.bit_word("error", error)?;
            let (oobj, ot) =
                self.dev_output(py, "out", out, &shape, "float32", Elem::F32, packed)?;
            check_disjoint(&ot, &[&pt, &et])?;
            check_disjoint(&et, &[&pt])?;
            let s = self.checked_stream(py, stream)?;
            // SAFETY: as sequence_rescale.
            unsafe {
                self.e().sequence_unpack(
                    shape[..shape.len() - 1].iter().product(),
                    width,
                    pt.ptr as u64,
                    ot.ptr as u64,
                    et.ptr as u64,
                    s,
                )
            }
            .py()?;
            drop(ot);
            Ok(oobj.unbind())
        }

        /// Copies rows between two device pools of this rank's rows, on the stream with no
        /// synchronisation: row `src_slots[i]` of `src` to row `dst_slots[i]` of `dst`
        /// (`[rows]` int32 slots, `page * 64 + offset`; a negative destination: skipped),
        /// bytes unchanged: a prefill's cache handed over into the engine's pages. Both
        /// pools hold rows of one type (`kv_dtype` as for `decode`, either row type). A
        /// slot past its pool sets `BAD_SLOT` in `faults` and copies nothing for that row.
        #[pyo3(signature = (dst, dst_slots, src, src_slots, *, kv_dtype=None, faults=None, stream=None))]
        #[allow(clippy::too_many_arguments)]
        fn copy_rows(
            &self,
            py: Python<'_>,
            dst: &Bound<'_, PyAny>,
            dst_slots: &Bound<'_, PyAny>,
            src: &Bound<'_, PyAny>,
            src_slots: &Bound<'_, PyAny>,
            kv_dtype: Option<&str>,
            faults: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<()> {
            let dt = self.dev("dst", dst)?;
            let dc = self.cache(&dt, kv_dtype)?;
            let st = self.dev("src", src)?;
            let sc = self.cache(&st, kv_dtype)?;
            let ds = self.int32s("dst_slots", dst_slots)?;
            ds.expect_shape(&[None], "[rows]")?;
            let n = ds.shape[0];
            let ss = self.int32s("src_slots", src_slots)?;
            ss.expect_shape(&[Some(n)], &format!("[rows={n}]"))?;
            let (fptr, ft) = self.faults(faults)?;
            check_disjoint(&dt, &[&st, &ds, &ss])?;
            if let Some(f) = &ft {
                check_disjoint(f, &[&dt, &st, &ds, &ss])?;
            }
            let s = self.checked_stream(py, stream)?;
            // SAFETY: checked device memory of the engine's GPU: both pools span their
            // layouts (allocation extents checked), the destination overlaps no input.
            unsafe {
                self.e()
                    .copy_rows(&dc, ds.ptr as u64, &sc, ss.ptr as u64, n, fptr, s)
            }
            .py()
        }

        fn __repr__(&self) -> String {
            format!(
                "DeviceEngine(device={}, heads={}, slice_width={}, d_r={}, layers={}, \
                 kv_dtype='{}')",
                self.ordinal,
                self.heads,
                self.slice_width,
                self.d_r,
                self.layers,
                dtype_name(self.kv_dtype)
            )
        }
    }

    impl PyDeviceEngine {
        #[allow(clippy::too_many_arguments)]
        pub fn decode_impl<'py>(
            &self,
            py: Python<'py>,
            slf: &Bound<'py, PyDeviceEngine>,
            q: &Bound<'py, PyAny>,
            kv_cache: &Bound<'py, PyAny>,
            kv_dtype: Option<&str>,
            block_table: &Bound<'py, PyAny>,
            cache_seqlens: &Bound<'py, PyAny>,
            plan: &Bound<'py, PyDevicePlan>,
            layer: usize,
            out: Option<&Bound<'py, PyAny>>,
            lse: Option<&Bound<'py, PyAny>>,
            faults: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<(PyObject, PyObject)> {
            let plan = plan.get();
            if !plan.engine.bind(py).is(slf) {
                return Err(invalid(
                    "the plan was made by another DeviceEngine: plan with this one",
                ));
            }
            self.check_layer(layer)?;
            let (h, w) = (self.heads, self.slice_width);
            let qt = self.f32_rows("q", q)?;
            let rows = Rows::of(&qt, h, w + self.d_r)?;
            let b = rows.batch;
            let kv = self.dev("kv_cache", kv_cache)?;
            let cache = self.cache(&kv, kv_dtype)?;
            let bt = self.int32s("block_table", block_table)?;
            bt.expect_shape(&[Some(b), None], &format!("[batch={b}, max_pages]"))?;
            let width = bt.shape[1];
            let sl = self.int32s("cache_seqlens", cache_seqlens)?;
            sl.expect_shape(&[Some(b)], &format!("[batch={b}]"))?;
            if plan.batch != b || plan.width != width {
                return Err(invalid(format!(
                    "the plan is for a batch of {} over {} pages, this step has {b} over \
                     {width}: plan again (tpla.decode_plan)",
                    plan.batch, plan.width
                )));
            }
            let s = self.checked_stream(py, stream)?;
            let out_obj = given_or_empty(py, out, &rows.shape(w), "float32", q, "out")?;
            let ot = self.output("out", &out_obj)?;
            rows.expect(&ot, w)?;
            let (lse_obj, lt) =
                self.dev_output(py, "lse", lse, &rows.lse_shape(), "float32", Elem::F32, q)?;
            let (fptr, ft) = self.faults(faults)?;
            let inputs = [&qt, &kv, &bt, &sl];
            check_disjoint(&ot, &inputs)?;
            check_disjoint(&lt, &inputs)?;
            check_disjoint(&lt, &[&ot])?;
            if let Some(f) = &ft {
                check_disjoint(f, &inputs)?;
                check_disjoint(f, &[&ot, &lt])?;
            }
            let step = DeviceStep {
                cache,
                block_table: bt.ptr as u64,
                batch: b,
                block_table_width: width,
                seq_lens: sl.ptr as u64,
                workspace: plan.ptr,
                workspace_bytes: plan.bytes,
                faults: fptr,
            };
            // SAFETY: every address is device memory of the engine's GPU whose
            // allocation spans the checked shapes; outputs are disjoint from the inputs;
            // the caller's tensors outlive the stream's work (torch's stream semantics).
            unsafe {
                self.e()
                    .decode(layer, &step, qt.ptr as u64, ot.ptr as u64, lt.ptr as u64, s)
            }
            .py()?;
            drop((qt, kv, bt, sl, ot, lt, ft));
            Ok((out_obj.unbind(), lse_obj.unbind()))
        }

        #[allow(clippy::too_many_arguments)]
        pub fn append_impl(
            &self,
            py: Python<'_>,
            kv_c: &Bound<'_, PyAny>,
            k_pe: &Bound<'_, PyAny>,
            kv_cache: &Bound<'_, PyAny>,
            kv_dtype: Option<&str>,
            slot_mapping: &Bound<'_, PyAny>,
            layer: usize,
            rms: &str,
            faults: Option<&Bound<'_, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<()> {
            self.check_layer(layer)?;
            let mode = rms_mode(rms)?;
            let lat = self.dev("kv_c", kv_c)?;
            lat.expect_shape(
                &[None, Some(self.d_c)],
                &format!("[tokens, d_c={}]", self.d_c),
            )?;
            let n = lat.shape[0];
            let input = match lat.expect_array(&[Elem::F32, Elem::Bf16])? {
                Elem::F32 => DType::F32,
                _ => DType::Bf16,
            };
            let kr = self.dev("k_pe", k_pe)?;
            let dr = self.d_r;
            if kr.shape.len() == 3 {
                kr.expect_shape(&[Some(n), Some(1), Some(dr)], &format!("[{n}, 1, {dr}]"))?;
            } else {
                kr.expect_shape(&[Some(n), Some(dr)], &format!("[{n}, d_r={dr}]"))?;
            }
            if kr.elem != lat.elem {
                return Err(invalid(format!(
                    "k_pe must have kv_c's dtype ({}), got {}",
                    lat.elem.name(),
                    kr.elem.name()
                )));
            }
            kr.expect_contiguous()?;
            let sm = self.int32s("slot_mapping", slot_mapping)?;
            sm.expect_shape(&[Some(n)], &format!("[{n}]"))?;
            let kv = self.dev("kv_cache", kv_cache)?;
            let cache = self.cache(&kv, kv_dtype)?;
            let (fptr, ft) = self.faults(faults)?;
            check_disjoint(&kv, &[&lat, &kr, &sm])?;
            if let Some(f) = &ft {
                check_disjoint(f, &[&lat, &kr, &sm, &kv])?;
            }
            let s = self.checked_stream(py, stream)?;
            let a = DeviceAppend {
                slots: sm.ptr as u64,
                count: n,
                latents: lat.ptr as u64,
                k_rope: kr.ptr as u64,
                input,
                mode,
                faults: fptr,
            };
            // SAFETY: checked device memory of the engine's GPU; the pool spans its
            // layout (allocation extent checked); disjoint from the inputs.
            unsafe { self.e().append(layer, &cache, &a, s) }.py()
        }

        fn absorb_impl<'py>(
            &self,
            py: Python<'py>,
            q_nope: &Bound<'py, PyAny>,
            q_rope: &Bound<'py, PyAny>,
            layer: usize,
            out: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<Bound<'py, PyAny>> {
            self.check_layer(layer)?;
            let qn = self.f32_rows("q_nope", q_nope)?;
            let rows = Rows::of(&qn, self.heads, self.d_n)?;
            let qr = self.f32_rows("q_rope", q_rope)?;
            rows.expect(&qr, self.d_r)?;
            let rw = self.slice_width + self.d_r;
            let s = self.checked_stream(py, stream)?;
            let out_obj = given_or_empty(py, out, &rows.shape(rw), "float32", q_nope, "out")?;
            let ot = self.output("out", &out_obj)?;
            rows.expect(&ot, rw)?;
            check_disjoint(&ot, &[&qn, &qr])?;
            // SAFETY: checked device memory of the engine's GPU of the documented sizes.
            unsafe {
                self.e().absorb_queries(
                    layer,
                    rows.batch,
                    qn.ptr as u64,
                    qr.ptr as u64,
                    ot.ptr as u64,
                    s,
                )
            }
            .py()?;
            drop((qn, qr, ot));
            Ok(out_obj)
        }

        fn project_impl<'py>(
            &self,
            py: Python<'py>,
            latent: &Bound<'py, PyAny>,
            layer: usize,
            out: Option<&Bound<'py, PyAny>>,
            stream: Option<u64>,
        ) -> PyResult<Bound<'py, PyAny>> {
            self.check_layer(layer)?;
            let lt = self.f32_rows("latent", latent)?;
            let rows = Rows::of(&lt, self.heads, self.slice_width)?;
            let s = self.checked_stream(py, stream)?;
            let out_obj = given_or_empty(py, out, &rows.shape(self.d_v), "float32", latent, "out")?;
            let ot = self.dev("out", &out_obj)?;
            let out_dtype = match ot.expect_output(&[Elem::F32, Elem::Bf16])? {
                Elem::F32 => DType::F32,
                _ => DType::Bf16,
            };
            rows.expect(&ot, self.d_v)?;
            check_disjoint(&ot, &[&lt])?;
            // SAFETY: checked device memory of the engine's GPU of the documented sizes.
            unsafe {
                self.e().project_for(
                    layer,
                    rows.batch,
                    lt.ptr as u64,
                    ot.ptr as u64,
                    out_dtype,
                    s,
                )
            }
            .py()?;
            drop((lt, ot));
            Ok(out_obj)
        }
    }

    /// `tpla.decode_plan(cache_seqlens, engine, block_table_width=...)`.
    pub fn decode_plan_device(
        engine: &Bound<'_, PyDeviceEngine>,
        cache_seqlens: &Bound<'_, PyAny>,
        width: Option<usize>,
        workspace: Option<&Bound<'_, PyAny>>,
        stream: Option<u64>,
    ) -> PyResult<PyObject> {
        let Some(width) = width else {
            return Err(invalid(
                "a DeviceEngine's plan needs block_table_width= (the block table's columns)",
            ));
        };
        let p = PyDeviceEngine::plan(engine, cache_seqlens, width, workspace, stream)?;
        Ok(Py::new(engine.py(), p)?.into_any())
    }

    /// The device path of `tpla.decode` (FlashMLA's arguments): query rows as
    /// `DeviceEngine.decode` reads them, or `q_nope` with `q_rope=` and `absorb=True`
    /// (absorbed on the GPU first); `project=True` returns the partial head outputs.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_device<'py>(
        py: Python<'py>,
        plan: &Bound<'py, PyDevicePlan>,
        q: &Bound<'py, PyAny>,
        kv_cache: &Bound<'py, PyAny>,
        block_table: &Bound<'py, PyAny>,
        cache_seqlens: &Bound<'py, PyAny>,
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
        let unsupported = |m: &str| Err(to_py(tpla::Error::unsupported(m.to_string())));
        if softmax_scale.is_some() || mu.is_some() {
            return unsupported(
                "on the GPU the query rows carry the scales (DeviceEngine.query_scales; \
                 absorb=True applies the model's softmax scale and the layer's mu): pass \
                 softmax_scale=None and mu=None",
            );
        }
        if q_rope.is_some() != absorb {
            return unsupported(
                "on the GPU q is either the joined query rows, or q_nope with q_rope= and \
                 absorb=True",
            );
        }
        let slf = plan.get().engine.bind(py).clone();
        let me = slf.borrow();
        let rows = match q_rope {
            Some(r) => Some(me.absorb_impl(py, q, r, layer, None, stream)?),
            None => None,
        };
        let q = rows.as_ref().unwrap_or(q);
        if !project {
            return me.decode_impl(
                py,
                &slf,
                q,
                kv_cache,
                kv_dtype,
                block_table,
                cache_seqlens,
                plan,
                layer,
                out,
                lse,
                faults,
                stream,
            );
        }
        refuse_lse_when_projecting(lse)?;
        let (latent, _) = me.decode_impl(
            py,
            &slf,
            q,
            kv_cache,
            kv_dtype,
            block_table,
            cache_seqlens,
            plan,
            layer,
            None,
            None,
            faults,
            stream,
        )?;
        let heads = me.project_impl(py, latent.bind(py), layer, out, stream)?;
        Ok((heads.unbind(), py.None()))
    }
}

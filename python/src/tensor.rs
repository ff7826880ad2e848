//! Zero-copy views of the caller's arrays: NumPy arrays and anything else with the buffer
//! protocol, DLPack producers (torch tensors, JAX, CuPy), and objects exposing
//! `__array_interface__`; on the GPU ([`Tensor::cuda`]), DLPack producers with CUDA
//! memory (torch CUDA tensors) and objects exposing `__cuda_array_interface__` (CuPy,
//! Numba). A [`Tensor`] keeps what it borrowed alive (the `Py_buffer`, the DLPack
//! capsule's tensor, or the object) until it is dropped, and checks dtype, device, shape
//! and strides before a slice of it (or its device address) is handed to libtpla.

use crate::errors::invalid;
use pyo3::exceptions::PyNotImplementedError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyCapsule, PyDict, PyTuple, PyType};
use std::ffi::{c_void, CStr};
use std::os::raw::{c_char, c_int};

/// Element types the binding reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    F16,
    Bf16,
    I32,
    I64,
    U16,
    U8,
    Other,
}

impl Elem {
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F64 => "float64",
            Elem::F16 => "float16",
            Elem::Bf16 => "bfloat16",
            Elem::I32 => "int32",
            Elem::I64 => "int64",
            Elem::U16 => "uint16",
            Elem::U8 => "uint8",
            Elem::Other => "an unsupported element type",
        }
    }
}

/// What keeps the memory of a [`Tensor`] valid.
enum Keep {
    Buffer(Box<ffi::Py_buffer>),
    DLPack(*mut DLManagedTensor),
    Object(#[allow(dead_code)] Py<PyAny>),
}

/// Where a [`Tensor`] must live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub enum Place {
    Host,
    /// CUDA memory of this device ordinal.
    Cuda(usize),
}

/// A strided view of caller memory on the host, or (made by [`Tensor::cuda`]) in CUDA
/// device memory.
pub struct Tensor {
    pub name: &'static str,
    pub ptr: *mut u8,
    pub elem: Elem,
    pub itemsize: usize,
    pub shape: Vec<usize>,
    /// In bytes.
    pub strides: Vec<isize>,
    pub readonly: bool,
    /// The CUDA device ordinal a DLPack producer gave (None: host memory, or a
    /// `__cuda_array_interface__` object, which names no device).
    pub device: Option<usize>,
    keep: Keep,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        match &mut self.keep {
            // SAFETY: the buffer was filled by a successful PyObject_GetBuffer; Drop of
            // a Tensor happens with the GIL held (Tensors never leave a GIL scope).
            Keep::Buffer(view) => unsafe { ffi::PyBuffer_Release(view.as_mut()) },
            Keep::DLPack(m) => {
                // SAFETY: we renamed the capsule to "used_dltensor", which makes the
                // consumer (us) responsible for calling the deleter exactly once.
                unsafe {
                    if let Some(deleter) = (**m).deleter {
                        deleter(*m);
                    }
                }
            }
            Keep::Object(_) => {}
        }
    }
}

// DLPack (v0.x ABI, what `__dlpack__()` returns without `max_version`).
#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: c_int,
    device_id: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: c_int,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i64 = 1;
const DL_CUDA: i64 = 2;
const DL_CUDA_HOST: i64 = 3;
const DL_CPU_PINNED: i64 = 13;

fn device_name(kind: i64) -> &'static str {
    match kind {
        2 => "CUDA",
        4 => "OpenCL",
        7 => "Vulkan",
        8 => "Metal",
        10 => "ROCm",
        _ => "an accelerator",
    }
}

fn gpu_error(name: &str, kind: i64) -> PyErr {
    let msg = if kind == DL_CUDA && cfg!(feature = "cuda") {
        format!(
            "{name} is a CUDA tensor, and this call runs on the CPU (a RankContext and its \
             DecodePlan): CUDA tensors go through a tpla.DeviceEngine (engine = \
             tpla.DeviceEngine(context); plan = tpla.decode_plan(cache_seqlens, engine, \
             block_table_width=...))"
        )
    } else {
        format!(
            "{name} is a {} tensor: this build of the tpla Python package decodes on the \
             CPU only (pass host memory: NumPy arrays or CPU torch tensors)",
            device_name(kind)
        )
    };
    crate::errors::unsupported_err(&msg).unwrap_or_else(|_| PyNotImplementedError::new_err(msg))
}

/// A CUDA tensor of device `id` where device `ordinal`'s memory is expected.
fn check_ordinal(name: &str, id: i64, ordinal: usize) -> PyResult<()> {
    if id != ordinal as i64 {
        return Err(crate::errors::to_py(tpla::Error::mismatch(format!(
            "{name} is on cuda:{id}, the engine on cuda:{ordinal}"
        ))));
    }
    Ok(())
}

/// What the torch fast path compares against (looked up once torch is imported; the
/// binding never imports torch itself).
pub struct TorchTypes {
    tensor: Py<PyType>,
    strided: PyObject,
    dtypes: Vec<(PyObject, Elem)>,
}

static TORCH_TYPES: GILOnceCell<TorchTypes> = GILOnceCell::new();

fn torch_types(py: Python<'_>) -> PyResult<Option<&'static TorchTypes>> {
    if let Some(t) = TORCH_TYPES.get(py) {
        return Ok(Some(t));
    }
    let modules = py.import("sys")?.getattr("modules")?;
    let Some(torch) = modules.downcast::<PyDict>()?.get_item("torch")? else {
        return Ok(None);
    };
    let mut dtypes = Vec::new();
    for (n, e) in [
        ("float32", Elem::F32),
        ("float64", Elem::F64),
        ("float16", Elem::F16),
        ("bfloat16", Elem::Bf16),
        ("int32", Elem::I32),
        ("int64", Elem::I64),
        // FP8 pools: uint8 bytes
        ("uint8", Elem::U8),
    ] {
        dtypes.push((torch.getattr(n)?.unbind(), e));
    }
    let t = TorchTypes {
        tensor: torch.getattr("Tensor")?.downcast_into::<PyType>()?.unbind(),
        strided: torch.getattr("strided")?.unbind(),
        dtypes,
    };
    let _ = TORCH_TYPES.set(py, t);
    Ok(TORCH_TYPES.get(py))
}

/// Host memory handed to a call that reads CUDA memory.
fn host_error(name: &str) -> PyErr {
    invalid(format!(
        "{name} is in host memory (a NumPy array or a CPU tensor): the device engine reads \
         CUDA tensors on its GPU (move it there, e.g. tensor.cuda())"
    ))
}

fn buffer_elem(format: &[u8], itemsize: usize) -> Elem {
    // a byte-order prefix of native or little-endian (the machines libtpla runs on)
    let f = match format.first() {
        Some(b'<' | b'=' | b'@') => &format[1..],
        _ => format,
    };
    match (f, itemsize) {
        (b"f", 4) => Elem::F32,
        (b"d", 8) => Elem::F64,
        (b"e", 2) => Elem::F16,
        (b"i" | b"l", 4) => Elem::I32,
        (b"l" | b"q", 8) => Elem::I64,
        (b"H", 2) => Elem::U16,
        (b"B", 1) => Elem::U8,
        _ => Elem::Other,
    }
}

fn typestr_elem(t: &str) -> Elem {
    match t.trim_start_matches(['<', '|', '=']) {
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        "f2" => Elem::F16,
        "i4" => Elem::I32,
        "i8" => Elem::I64,
        "u2" => Elem::U16,
        "u1" => Elem::U8,
        _ => Elem::Other,
    }
}

fn dl_elem(t: DLDataType) -> Elem {
    if t.lanes != 1 {
        return Elem::Other;
    }
    match (t.code, t.bits) {
        (2, 32) => Elem::F32,
        (2, 64) => Elem::F64,
        (2, 16) => Elem::F16,
        (4, 16) => Elem::Bf16,
        (0, 32) => Elem::I32,
        (0, 64) => Elem::I64,
        (1, 16) => Elem::U16,
        (1, 8) => Elem::U8,
        _ => Elem::Other,
    }
}

fn itemsize_of(elem: Elem, bits: usize) -> usize {
    match elem {
        Elem::F32 | Elem::I32 => 4,
        Elem::F64 | Elem::I64 => 8,
        Elem::F16 | Elem::Bf16 | Elem::U16 => 2,
        Elem::U8 => 1,
        Elem::Other => bits.div_ceil(8).max(1),
    }
}

const USED: &CStr = c"used_dltensor";
const DLTENSOR: &CStr = c"dltensor";

impl Tensor {
    /// A view of CUDA memory: a torch CUDA tensor, a DLPack producer whose device is
    /// CUDA, or an object with `__cuda_array_interface__`. Host memory is refused. `ptr`
    /// is then a device address; the caller checks its allocation's extent.
    ///
    /// A torch tensor is read through its own accessors (`data_ptr()`, `stride()`, ...),
    /// not DLPack: torch's `__dlpack__` makes the default stream wait on the current one
    /// (an event per tensor, and an error while a graph is being captured) and refuses
    /// tensors of a device other than the current one. Memory of a device other than
    /// `ordinal` is a `MismatchError`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn cuda(name: &'static str, obj: &Bound<'_, PyAny>, ordinal: usize) -> PyResult<Tensor> {
        let py = obj.py();
        if let Some(tt) = torch_types(py)? {
            if obj.is_instance(tt.tensor.bind(py))? {
                return Self::from_torch(name, obj, tt, ordinal);
            }
        }
        if obj.hasattr(pyo3::intern!(py, "__dlpack__"))? {
            return Self::from_dlpack(name, obj, Place::Cuda(ordinal));
        }
        if let Ok(iface) = obj.getattr(pyo3::intern!(py, "__cuda_array_interface__")) {
            return Self::from_cuda_array_interface(name, obj, &iface);
        }
        // SAFETY: obj is a live object and we hold the GIL.
        if unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 1
            || obj.hasattr(pyo3::intern!(py, "__array_interface__"))?
        {
            return Err(host_error(name));
        }
        Err(invalid(format!(
            "{name} must be a CUDA tensor (a torch CUDA tensor, or anything with DLPack or \
             __cuda_array_interface__), got {}",
            obj.get_type().name()?
        )))
    }

    /// A view of `obj` (named `name` in error messages).
    pub fn new(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        // SAFETY: obj is a live object and we hold the GIL.
        if unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 1 {
            return Self::from_buffer(name, obj);
        }
        let py = obj.py();
        if obj.hasattr(pyo3::intern!(py, "__dlpack__"))? {
            return Self::from_dlpack(name, obj, Place::Host);
        }
        if let Ok(iface) = obj.getattr(pyo3::intern!(py, "__array_interface__")) {
            return Self::from_array_interface(name, obj, &iface);
        }
        if obj.hasattr(pyo3::intern!(py, "__cuda_array_interface__"))? {
            return Err(gpu_error(name, 2));
        }
        Err(invalid(format!(
            "{name} must be an array (NumPy, a CPU torch tensor, or anything with the \
             buffer protocol, __array_interface__ or DLPack), got {}",
            obj.get_type().name()?
        )))
    }

    fn from_buffer(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        // SAFETY: a zeroed Py_buffer is what PyObject_GetBuffer expects to fill.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let flags = ffi::PyBUF_STRIDES | ffi::PyBUF_FORMAT;
        // SAFETY: obj is live, view is writable; on failure Python sets an exception.
        if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut(), flags) } != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let ndim = view.ndim.max(0) as usize;
        let itemsize = view.itemsize.max(0) as usize;
        let format: &[u8] = if view.format.is_null() {
            b"B"
        } else {
            // SAFETY: a NUL-terminated format string owned by the buffer.
            unsafe { CStr::from_ptr(view.format as *const c_char) }.to_bytes()
        };
        let elem = buffer_elem(format, itemsize);
        let (shape, strides) = if ndim == 0 {
            (Vec::new(), Vec::new())
        } else {
            // SAFETY: PyBUF_STRIDES makes shape and strides arrays of ndim entries.
            unsafe {
                (
                    std::slice::from_raw_parts(view.shape, ndim)
                        .iter()
                        .map(|&s| s as usize)
                        .collect(),
                    std::slice::from_raw_parts(view.strides, ndim).to_vec(),
                )
            }
        };
        Ok(Tensor {
            name,
            ptr: view.buf as *mut u8,
            elem,
            itemsize,
            shape,
            strides,
            readonly: view.readonly != 0,
            device: None,
            keep: Keep::Buffer(view),
        })
    }

    fn from_dlpack(name: &'static str, obj: &Bound<'_, PyAny>, place: Place) -> PyResult<Tensor> {
        let py = obj.py();
        // refused before `__dlpack__()` (which may copy or synchronise): the wrong device
        let refuse = |kind: i64| -> Option<PyErr> {
            let host = matches!(kind, DL_CPU | DL_CUDA_HOST | DL_CPU_PINNED);
            match place {
                Place::Host if !host => Some(gpu_error(name, kind)),
                Place::Cuda(_) if host => Some(host_error(name)),
                Place::Cuda(_) if kind != DL_CUDA => {
                    Some(crate::errors::to_py(tpla::Error::unsupported(format!(
                        "{name} is a {} tensor: the device engine reads CUDA memory",
                        device_name(kind)
                    ))))
                }
                _ => None,
            }
        };
        if let Ok(dev) = obj.call_method0(pyo3::intern!(py, "__dlpack_device__")) {
            let (kind, id): (i64, i64) = dev.extract()?;
            if let Some(e) = refuse(kind) {
                return Err(e);
            }
            if let Place::Cuda(ordinal) = place {
                check_ordinal(name, id, ordinal)?;
            }
        }
        let cap = match place {
            Place::Host => obj.call_method0(pyo3::intern!(py, "__dlpack__"))?,
            // stream -1: no synchronisation by the producer (the calls run on the
            // caller's stream); producers without the argument are asked without it
            Place::Cuda(_) => {
                let kw = PyDict::new(py);
                kw.set_item("stream", -1)?;
                match obj.call_method(pyo3::intern!(py, "__dlpack__"), (), Some(&kw)) {
                    Ok(c) => c,
                    Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                        obj.call_method0(pyo3::intern!(py, "__dlpack__"))?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let cap = cap.downcast::<PyCapsule>().map_err(|_| {
            invalid(format!(
                "{name}.__dlpack__() did not return a DLPack capsule"
            ))
        })?;
        // SAFETY: a capsule named "dltensor" holds a DLManagedTensor (the DLPack
        // protocol); renaming it hands ownership (the deleter call) to us.
        let m = unsafe {
            let p = ffi::PyCapsule_GetPointer(cap.as_ptr(), DLTENSOR.as_ptr());
            if p.is_null() {
                return Err(PyErr::fetch(py));
            }
            if ffi::PyCapsule_SetName(cap.as_ptr(), USED.as_ptr()) != 0 {
                return Err(PyErr::fetch(py));
            }
            p as *mut DLManagedTensor
        };
        // SAFETY: the producer keeps the tensor valid until its deleter runs.
        let t = unsafe { &(*m).dl_tensor };
        let mut tensor = Tensor {
            name,
            ptr: std::ptr::null_mut(),
            elem: dl_elem(t.dtype),
            itemsize: itemsize_of(dl_elem(t.dtype), t.dtype.bits as usize),
            shape: Vec::new(),
            strides: Vec::new(),
            readonly: false,
            device: None,
            keep: Keep::DLPack(m),
        };
        let kind = t.device.device_type as i64;
        if let Some(e) = refuse(kind) {
            return Err(e);
        }
        if kind == DL_CUDA {
            tensor.device = Some(t.device.device_id.max(0) as usize);
            if let Place::Cuda(ordinal) = place {
                check_ordinal(name, t.device.device_id as i64, ordinal)?;
            }
        }
        let ndim = t.ndim.max(0) as usize;
        if ndim > 0 {
            // SAFETY: shape (and strides, when not NULL) have ndim entries.
            let shape = unsafe { std::slice::from_raw_parts(t.shape, ndim) };
            tensor.shape = shape.iter().map(|&s| s.max(0) as usize).collect();
            tensor.strides = if t.strides.is_null() {
                contiguous_strides(&tensor.shape, tensor.itemsize)
            } else {
                // SAFETY: as above; DLPack strides count elements.
                unsafe { std::slice::from_raw_parts(t.strides, ndim) }
                    .iter()
                    .map(|&s| s as isize * tensor.itemsize as isize)
                    .collect()
            };
        }
        tensor.ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize);
        Ok(tensor)
    }

    fn from_array_interface(
        name: &'static str,
        obj: &Bound<'_, PyAny>,
        iface: &Bound<'_, PyAny>,
    ) -> PyResult<Tensor> {
        let d = iface
            .downcast::<PyDict>()
            .map_err(|_| invalid(format!("{name}.__array_interface__ is not a dictionary")))?;
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            d.get_item(k)?
                .ok_or_else(|| invalid(format!("{name}.__array_interface__ has no '{k}'")))
        };
        let typestr: String = get("typestr")?.extract()?;
        let elem = typestr_elem(&typestr);
        let itemsize = itemsize_of(elem, 8);
        let shape: Vec<usize> = get("shape")?.extract()?;
        let data = get("data")?;
        let (addr, readonly): (usize, bool) = match data.downcast::<PyTuple>() {
            Ok(t) => t.extract()?,
            Err(_) => {
                return Err(invalid(format!(
                    "{name}.__array_interface__ must give its data as (address, readonly)"
                )))
            }
        };
        let strides = match d.get_item("strides")? {
            Some(s) if !s.is_none() => s.extract::<Vec<isize>>()?,
            _ => contiguous_strides(&shape, itemsize),
        };
        if strides.len() != shape.len() {
            return Err(invalid(format!(
                "{name}.__array_interface__'s strides do not match its shape"
            )));
        }
        Ok(Tensor {
            name,
            ptr: addr as *mut u8,
            elem,
            itemsize,
            shape,
            strides,
            readonly,
            device: None,
            keep: Keep::Object(obj.clone().unbind()),
        })
    }

    /// A torch tensor of CUDA device `ordinal`, through its accessors.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn from_torch(
        name: &'static str,
        obj: &Bound<'_, PyAny>,
        tt: &TorchTypes,
        ordinal: usize,
    ) -> PyResult<Tensor> {
        let py = obj.py();
        let is_cuda: bool = obj.getattr(pyo3::intern!(py, "is_cuda"))?.extract()?;
        if !is_cuda {
            let device = obj.getattr(pyo3::intern!(py, "device"))?;
            let kind: String = device.getattr(pyo3::intern!(py, "type"))?.extract()?;
            if kind == "cpu" {
                return Err(host_error(name));
            }
            return Err(crate::errors::to_py(tpla::Error::unsupported(format!(
                "{name} is a torch tensor on '{kind}': the device engine reads CUDA memory"
            ))));
        }
        let id: i64 = obj
            .call_method0(pyo3::intern!(py, "get_device"))?
            .extract()?;
        check_ordinal(name, id, ordinal)?;
        if !obj
            .getattr(pyo3::intern!(py, "layout"))?
            .is(tt.strided.bind(py))
        {
            return Err(invalid(format!("{name} must be a dense (strided) tensor")));
        }
        let dtype = obj.getattr(pyo3::intern!(py, "dtype"))?;
        let elem = tt
            .dtypes
            .iter()
            .find(|(d, _)| dtype.is(d.bind(py)))
            .map_or(Elem::Other, |(_, e)| *e);
        let itemsize: usize = obj
            .call_method0(pyo3::intern!(py, "element_size"))?
            .extract()?;
        let shape: Vec<usize> = obj.getattr(pyo3::intern!(py, "shape"))?.extract()?;
        let strides: Vec<isize> = obj
            .call_method0(pyo3::intern!(py, "stride"))?
            .extract::<Vec<isize>>()?
            .into_iter()
            .map(|s| s * itemsize as isize)
            .collect();
        let ptr: usize = obj.call_method0(pyo3::intern!(py, "data_ptr"))?.extract()?;
        if strides.len() != shape.len() {
            return Err(invalid(format!("{name}'s strides do not match its shape")));
        }
        Ok(Tensor {
            name,
            ptr: ptr as *mut u8,
            elem,
            itemsize,
            shape,
            strides,
            readonly: false,
            device: Some(ordinal),
            keep: Keep::Object(obj.clone().unbind()),
        })
    }

    /// `__cuda_array_interface__` (version 2 or 3): shape, typestr, data, strides. Its
    /// `stream` entry is not waited on: the calls run on the caller's stream.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn from_cuda_array_interface(
        name: &'static str,
        obj: &Bound<'_, PyAny>,
        iface: &Bound<'_, PyAny>,
    ) -> PyResult<Tensor> {
        let mut t = Self::from_array_interface(name, obj, iface)?;
        if t.ptr.is_null() && t.numel() > 0 {
            return Err(invalid(format!(
                "{name}.__cuda_array_interface__ gives a NULL data pointer"
            )));
        }
        t.device = None;
        Ok(t)
    }

    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn shape_str(&self) -> String {
        let s: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", s.join(", "))
    }

    /// C-contiguous: every stride is the product of the inner extents (extents of 1 may
    /// have any stride, as NumPy and torch allow).
    pub fn is_contiguous(&self) -> bool {
        let mut want = self.itemsize as isize;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != want {
                return false;
            }
            want *= n as isize;
        }
        true
    }

    pub fn expect_elem(&self, allowed: &[Elem]) -> PyResult<Elem> {
        if allowed.contains(&self.elem) {
            return Ok(self.elem);
        }
        let names: Vec<&str> = allowed.iter().map(|e| e.name()).collect();
        Err(invalid(format!(
            "{} must be {}, got {}",
            self.name,
            names.join(" or "),
            self.elem.name()
        )))
    }

    /// Checks the shape against `want` (`None`: any extent); `what` names it.
    pub fn expect_shape(&self, want: &[Option<usize>], what: &str) -> PyResult<()> {
        let ok = self.shape.len() == want.len()
            && self
                .shape
                .iter()
                .zip(want)
                .all(|(&n, w)| w.is_none_or(|w| w == n));
        if !ok {
            return Err(invalid(format!(
                "{} must have shape {what}, got {}",
                self.name,
                self.shape_str()
            )));
        }
        Ok(())
    }

    pub fn expect_contiguous(&self) -> PyResult<()> {
        if !self.is_contiguous() {
            return Err(invalid(format!(
                "{} must be C-contiguous (strides {:?} bytes for shape {}); pass a \
                 contiguous copy (numpy.ascontiguousarray, tensor.contiguous())",
                self.name,
                self.strides,
                self.shape_str()
            )));
        }
        Ok(())
    }

    pub fn expect_writable(&self) -> PyResult<()> {
        if self.readonly {
            return Err(invalid(format!("{} is read-only", self.name)));
        }
        Ok(())
    }

    /// Checks the shape is exactly `shape`, named by its extents.
    pub fn expect_exact_shape(&self, shape: &[usize]) -> PyResult<()> {
        let want: Vec<Option<usize>> = shape.iter().map(|&n| Some(n)).collect();
        self.expect_shape(&want, &format!("{shape:?}"))
    }

    /// Checks an array the library reads as a slice: an element type of `allowed`
    /// (returned), C-contiguous.
    pub fn expect_array(&self, allowed: &[Elem]) -> PyResult<Elem> {
        let elem = self.expect_elem(allowed)?;
        self.expect_contiguous()?;
        Ok(elem)
    }

    /// As [`Self::expect_array`], for an output: writable too.
    pub fn expect_output(&self, allowed: &[Elem]) -> PyResult<Elem> {
        let elem = self.expect_array(allowed)?;
        self.expect_writable()?;
        Ok(elem)
    }

    fn aligned<T>(&self) -> PyResult<()> {
        if (self.ptr as usize) % std::mem::align_of::<T>() != 0 {
            return Err(invalid(format!(
                "{} is not aligned to its {}-byte elements",
                self.name,
                std::mem::align_of::<T>()
            )));
        }
        Ok(())
    }

    /// The elements of a contiguous tensor of `T` (the caller checked elem and layout).
    ///
    /// # Safety
    /// `T` is the tensor's element type and nothing writes the memory meanwhile.
    pub unsafe fn slice<T>(&self) -> PyResult<&[T]> {
        self.aligned::<T>()?;
        let n = self.numel();
        if n == 0 {
            return Ok(&[]);
        }
        // SAFETY: caller contract; contiguous memory of n elements kept alive by self.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, n) })
    }

    /// As [`Self::slice`], writable.
    ///
    /// # Safety
    /// As [`Self::slice`], and no other live slice overlaps this memory.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<T>(&self) -> PyResult<&mut [T]> {
        self.expect_writable()?;
        self.aligned::<T>()?;
        let n = self.numel();
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: caller contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, n) })
    }

    /// First and one-past-last byte the view spans.
    pub fn span(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (self.ptr as usize, self.ptr as usize);
        }
        let (mut lo, mut hi) = (self.ptr as isize, self.ptr as isize);
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            let reach = (n as isize - 1) * s;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        (lo as usize, hi as usize + self.itemsize)
    }
}

/// Refuses writes to `out` through memory that an input also views.
pub fn check_disjoint(out: &Tensor, others: &[&Tensor]) -> PyResult<()> {
    let (a0, a1) = out.span();
    for o in others {
        let (b0, b1) = o.span();
        if a0 < b1 && b0 < a1 {
            return Err(invalid(format!(
                "{} overlaps {} in memory: outputs must not share memory with inputs",
                out.name, o.name
            )));
        }
    }
    Ok(())
}

pub fn contiguous_strides(shape: &[usize], itemsize: usize) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = itemsize as isize;
    for (s, &n) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= n.max(1) as isize;
    }
    strides
}

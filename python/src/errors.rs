//! libtpla errors as Python exceptions: the classes live in `tpla/errors.py` (so that they
//! can inherit from both `TplaError` and the matching built-in, e.g. `ValueError`), each
//! carrying the C ABI's `tpla_status` name and libtpla's message.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;
use tpla::ErrorKind;

/// (class name in tpla.errors, tpla_status name) per kind.
fn names(kind: ErrorKind) -> (&'static str, &'static str) {
    match kind {
        ErrorKind::InvalidArgument => ("InvalidArgumentError", "TPLA_STATUS_INVALID_ARGUMENT"),
        ErrorKind::Unsupported => ("UnsupportedError", "TPLA_STATUS_UNSUPPORTED"),
        ErrorKind::Io => ("TplaIOError", "TPLA_STATUS_IO"),
        ErrorKind::CorruptFile => ("CorruptFileError", "TPLA_STATUS_CORRUPT_FILE"),
        ErrorKind::Mismatch => ("MismatchError", "TPLA_STATUS_MISMATCH"),
        ErrorKind::OutOfCapacity => ("OutOfCapacityError", "TPLA_STATUS_OUT_OF_CAPACITY"),
        ErrorKind::OutOfRange => ("OutOfRangeError", "TPLA_STATUS_OUT_OF_RANGE"),
        ErrorKind::Backend => ("BackendError", "TPLA_STATUS_BACKEND"),
    }
}

static MODULE: GILOnceCell<Py<PyModule>> = GILOnceCell::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let m = MODULE.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("tpla.errors")?.unbind())
    })?;
    Ok(m.bind(py).getattr(name)?.downcast_into::<PyType>()?)
}

fn make(kind: ErrorKind, message: &str) -> PyErr {
    let (cls, status) = names(kind);
    Python::with_gil(|py| match class(py, cls) {
        Ok(t) => PyErr::from_type(t, (message.to_string(), status)),
        Err(e) => PyRuntimeError::new_err(format!("{status}: {message} (and {e})")),
    })
}

/// A libtpla error as its Python exception.
pub fn to_py(e: tpla::Error) -> PyErr {
    make(e.kind(), e.message())
}

/// An `InvalidArgumentError` raised by the binding's own checks.
pub fn invalid(message: impl Into<String>) -> PyErr {
    make(ErrorKind::InvalidArgument, &message.into())
}

/// An `UnsupportedError` (also a `NotImplementedError`).
pub fn unsupported_err(message: &str) -> PyResult<PyErr> {
    Ok(make(ErrorKind::Unsupported, message))
}

pub trait Tpla<T> {
    /// Converts libtpla's error.
    fn py(self) -> PyResult<T>;
}

impl<T> Tpla<T> for tpla::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

//! The C ABI (`include/tpla.h`, generated from this module by cbindgen).
//!
//! A thin skin over the Rust API: every function checks its arguments (NULL pointers,
//! `struct_size`, buffer lengths given as counts, alignment, overlap), converts them, calls
//! the Rust API and turns the outcome into a [`tpla_status`]. Nothing is computed here.
//! The conventions every function follows are in the header's preamble (cbindgen.toml).
//!
//! Every exported function runs its body inside [`guard`], which catches panics (none
//! should be reachable) and records the failure's sentence for `tpla_last_error_message`.

#![allow(non_camel_case_types)]

// The header follows the declaration order, the flow of DESIGN.md section 5 (blank lines
// keep rustfmt from sorting them).
pub mod context;

pub mod cache;

pub mod engine;

pub mod export;

pub mod combine;

pub mod sequence;

pub mod device;

pub mod engine_device;

pub mod engine_sequence;

pub mod synthetic;

use crate::error::{Error, ErrorKind};
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr, CString};
use std::panic::{self, catch_unwind, AssertUnwindSafe};
use std::sync::Once;

/// Major version of libtpla (semantic versioning).
pub const TPLA_VERSION_MAJOR: u32 = 0;
/// Minor version of libtpla.
pub const TPLA_VERSION_MINOR: u32 = 1;
/// Patch version of libtpla.
pub const TPLA_VERSION_PATCH: u32 = 0;
/// Version of the binary interface described by this header. It changes whenever a
/// function, a struct layout or an enum value changes incompatibly; compare it with
/// `tpla_abi_version()` at startup to catch a header/library mismatch.
pub const TPLA_ABI_VERSION: u32 = 1;

/// Outcome of a call. `TPLA_STATUS_OK` is zero; every other value comes with a sentence
/// from `tpla_last_error_message()`. Values are stable: new ones are only ever appended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tpla_status {
    /// Success.
    Ok = 0,
    /// An argument is out of its valid range or inconsistent with another (including
    /// buffer counts that do not match the shapes, misaligned or overlapping buffers).
    InvalidArgument = 1,
    /// A valid request this build or this machine does not support (for example the
    /// CUDA backend in a build without CUDA, or on a machine without a GPU).
    Unsupported = 2,
    /// An operating-system I/O failure (file missing, permission denied, disk full).
    Io = 3,
    /// A file or image is truncated, corrupted or hostile.
    CorruptFile = 4,
    /// A file, cache or weights belong to another geometry, transform, latent group or
    /// element type than the context or cache they are used with.
    Mismatch = 5,
    /// A fixed-size page pool is full.
    OutOfCapacity = 6,
    /// A sequence id, layer, rank or position does not exist.
    OutOfRange = 7,
    /// The accelerator runtime or the engine's communicator failed.
    Backend = 8,
    /// A required pointer argument is NULL.
    NullArgument = 9,
    /// A struct's `struct_size` is not the size this library knows for it.
    WrongStructSize = 10,
    /// An output array is too small for the result; nothing was written.
    BufferTooSmall = 11,
    /// libtpla hit an internal error (a bug); the objects involved should be destroyed.
    Panic = 12,
}

impl From<ErrorKind> for tpla_status {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::InvalidArgument => tpla_status::InvalidArgument,
            ErrorKind::Unsupported => tpla_status::Unsupported,
            ErrorKind::Io => tpla_status::Io,
            ErrorKind::CorruptFile => tpla_status::CorruptFile,
            ErrorKind::Mismatch => tpla_status::Mismatch,
            ErrorKind::OutOfCapacity => tpla_status::OutOfCapacity,
            ErrorKind::OutOfRange => tpla_status::OutOfRange,
            ErrorKind::Backend => tpla_status::Backend,
        }
    }
}

/// A failed call: the status it returns and the sentence it records.
#[derive(Debug)]
pub(crate) struct Failure {
    status: tpla_status,
    message: String,
}

impl Failure {
    fn new(status: tpla_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
    fn null(what: &str) -> Self {
        Self::new(tpla_status::NullArgument, format!("{what} is NULL"))
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(tpla_status::InvalidArgument, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(e.kind().into(), e.message())
    }
}

type Outcome<T = ()> = std::result::Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn record(message: &str) {
    let text = CString::new(message.replace('\0', " ")).expect("NUL bytes were replaced");
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

thread_local! {
    /// Set while this thread runs the body of an exported function.
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
}

/// Prefix of the names of libtpla's worker threads (the CPU backend's pool), whose
/// panics are caught and turned into a status by the exported function that waits on
/// them.
pub(crate) const WORKER_THREAD_PREFIX: &str = "tpla-";

/// Keeps panics that the C boundary catches off the engine's stderr: the default hook
/// prints the message (and a backtrace under RUST_BACKTRACE) before `catch_unwind` sees
/// it, yet the message belongs in `tpla_last_error_message`. The hook wraps the one the
/// process had, which still reports every other panic (a Rust host's own, for one).
fn silence_caught_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let on_worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with(WORKER_THREAD_PREFIX));
            if !(IN_GUARD.get() || on_worker) {
                previous(info);
            }
        }));
    });
}

/// Runs an exported function's body: a failure or a caught panic becomes a status and
/// the sentence `tpla_last_error_message` returns.
fn guard(body: impl FnOnce() -> Outcome) -> tpla_status {
    silence_caught_panics();
    let outer = IN_GUARD.replace(true);
    let outcome = catch_unwind(AssertUnwindSafe(body));
    IN_GUARD.set(outer);
    match outcome {
        Ok(Ok(())) => tpla_status::Ok,
        Ok(Err(failure)) => {
            record(&failure.message);
            failure.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".into());
            record(&format!("internal error (panic) in libtpla: {what}"));
            tpla_status::Panic
        }
    }
}

/// For the functions without a status (destroy, queries returning a value): runs `body`,
/// returning `fallback` if it panics.
fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    silence_caught_panics();
    let outer = IN_GUARD.replace(true);
    let outcome = catch_unwind(AssertUnwindSafe(body));
    IN_GUARD.set(outer);
    outcome.unwrap_or(fallback)
}

// ---- argument checks shared by the submodules -------------------------------------------

/// Structs the caller passes by pointer: they begin with `size_t struct_size`.
///
/// # Safety
/// Implementors are `#[repr(C)]` structs whose first field is `struct_size: usize`.
unsafe trait Versioned: Sized {
    const NAME: &'static str;
}

fn check_aligned<T>(ptr: *const T, what: &str) -> Outcome {
    if !(ptr as usize).is_multiple_of(align_of::<T>()) {
        return Err(Failure::invalid(format!(
            "{what} is not aligned to {} bytes",
            align_of::<T>()
        )));
    }
    Ok(())
}

/// Reads a versioned struct: non-NULL, aligned, and `struct_size` equal to the size of
/// the version this library knows (the only version so far).
///
/// # Safety
/// `ptr` is NULL or points to at least `size_t` readable bytes, and to a whole `T` when
/// its `struct_size` says so.
unsafe fn versioned<'a, T: Versioned>(ptr: *const T, what: &str) -> Outcome<&'a T> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    check_aligned(ptr, what)?;
    // SAFETY: non-NULL and aligned; every version starts with `size_t struct_size`.
    let size = unsafe { ptr.cast::<usize>().read() };
    if size != size_of::<T>() {
        return Err(Failure::new(
            tpla_status::WrongStructSize,
            format!(
                "{what}: struct_size is {size}, but this library's {} is {} bytes (set \
                 struct_size = sizeof({}))",
                T::NAME,
                size_of::<T>(),
                T::NAME
            ),
        ));
    }
    // SAFETY: the caller's struct is a whole `T`, as its struct_size says.
    Ok(unsafe { &*ptr })
}

/// A versioned struct the library fills: the caller sets its `struct_size`.
///
/// # Safety
/// As [`versioned`], and the struct is writable.
unsafe fn versioned_out<'a, T: Versioned>(ptr: *mut T, what: &str) -> Outcome<&'a mut T> {
    // SAFETY: forwarded contract.
    unsafe { versioned(ptr, what)? };
    // SAFETY: checked above: a whole, aligned, writable `T`.
    Ok(unsafe { &mut *ptr })
}

/// An opaque handle passed in.
///
/// # Safety
/// `ptr` is NULL or a live handle of type `T` made by this library.
unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Outcome<&'a T> {
    // SAFETY: forwarded contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// An opaque handle passed in for modification.
///
/// # Safety
/// `ptr` is NULL or a live handle of type `T` not used by another thread during the call.
unsafe fn handle_mut<'a, T>(ptr: *mut T, what: &str) -> Outcome<&'a mut T> {
    // SAFETY: forwarded contract.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// Stores `value` through an out pointer.
///
/// # Safety
/// `ptr` is NULL or valid for writing a `T`.
unsafe fn write_out<T>(ptr: *mut T, value: T, what: &str) -> Outcome {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    check_aligned(ptr, what)?;
    // SAFETY: non-NULL, aligned, writable by contract.
    unsafe { ptr.write(value) };
    Ok(())
}

/// Hands a new handle to the caller through `out`, which is checked before the handle
/// is made so that nothing leaks.
///
/// # Safety
/// `out` is NULL or valid for writing a pointer.
unsafe fn hand_out<T>(out: *mut *mut T, make: impl FnOnce() -> Outcome<T>) -> Outcome {
    if out.is_null() {
        return Err(Failure::null("out"));
    }
    check_aligned(out, "out")?;
    let handle = Box::into_raw(Box::new(make()?));
    // SAFETY: checked above.
    unsafe { out.write(handle) };
    Ok(())
}

/// Takes back a handle given out by [`hand_out`]; NULL is a no-op.
///
/// # Safety
/// `ptr` is NULL or a handle of type `T` made by this library and not yet destroyed.
unsafe fn destroy<T>(ptr: *mut T) {
    if !ptr.is_null() {
        // SAFETY: forwarded contract.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

/// Bytes `[start, end)` a buffer argument occupies, for overlap checks.
type Span = (usize, usize, &'static str);

fn span<T>(ptr: *const T, count: usize, what: &'static str) -> Span {
    // Saturating: an absurd count is refused later by `input`/`output`.
    let start = ptr as usize;
    let end = start.saturating_add(count.saturating_mul(size_of::<T>()));
    (start, end, what)
}

/// Refuses outputs that overlap each other or any input.
fn check_disjoint(outputs: &[Span], inputs: &[Span]) -> Outcome {
    for (i, o) in outputs.iter().enumerate() {
        let others = outputs[i + 1..].iter().chain(inputs);
        for x in others {
            if o.0 < o.1 && x.0 < x.1 && o.0 < x.1 && x.0 < o.1 {
                return Err(Failure::invalid(format!(
                    "{} overlaps {}: an output buffer must not share memory with another \
                     argument",
                    o.2, x.2
                )));
            }
        }
    }
    Ok(())
}

/// Refuses the first NULL of `pointers` (addresses with their names), in their order.
fn check_non_null(pointers: &[(usize, &str)]) -> Outcome {
    match pointers.iter().find(|(p, _)| *p == 0) {
        Some((_, what)) => Err(Failure::null(what)),
        None => Ok(()),
    }
}

fn check_count<T>(ptr: *const T, count: usize, what: &str) -> Outcome {
    if count > 0 && ptr.is_null() {
        return Err(Failure::null(what));
    }
    if count
        .checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Failure::invalid(format!(
            "{what}: {count} elements is too many"
        )));
    }
    check_aligned(ptr, what)
}

/// An input array of `count` elements; NULL is allowed when `count` is 0.
///
/// # Safety
/// `ptr` is NULL or valid for reading `count` elements for the duration of the call.
unsafe fn input<'a, T>(ptr: *const T, count: usize, what: &str) -> Outcome<&'a [T]> {
    check_count(ptr, count, what)?;
    if count == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-NULL, aligned, size checked, readable by contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, count) })
}

/// An output array of `count` elements; NULL is allowed when `count` is 0. Callers check
/// it is disjoint from the call's other buffers.
///
/// # Safety
/// `ptr` is NULL or valid for writing `count` elements, used by nothing else during the
/// call.
unsafe fn output<'a, T>(ptr: *mut T, count: usize, what: &str) -> Outcome<&'a mut [T]> {
    check_count(ptr, count, what)?;
    if count == 0 {
        return Ok(&mut []);
    }
    // SAFETY: non-NULL, aligned, size checked, writable and unaliased by contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, count) })
}

/// A NUL-terminated string argument.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn c_string<'a>(ptr: *const c_char, what: &str) -> Outcome<&'a CStr> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: NUL-terminated by contract.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

fn to_usize(value: u32) -> usize {
    value as usize
}

// ---- version and errors ------------------------------------------------------------------

static VERSION: &CStr = c"0.1.0";

/// The library's version as "MAJOR.MINOR.PATCH" (a static string; never free it).
/// Thread-safe.
#[no_mangle]
pub extern "C" fn tpla_version() -> *const c_char {
    guard_value(c"".as_ptr(), || VERSION.as_ptr())
}

/// The library's `TPLA_ABI_VERSION`. A program compiled against this header should
/// refuse to run when the two differ. Thread-safe.
#[no_mangle]
pub extern "C" fn tpla_abi_version() -> u32 {
    guard_value(TPLA_ABI_VERSION, || TPLA_ABI_VERSION)
}

/// A short static description of `status` (a `tpla_status` value), for example
/// "invalid argument"; "unknown status" for values this library does not define. Never
/// NULL; never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn tpla_status_str(status: u32) -> *const c_char {
    guard_value(c"unknown status".as_ptr(), || status_text(status).as_ptr())
}

fn status_text(status: u32) -> &'static CStr {
    match status {
        0 => c"ok",
        1 => c"invalid argument",
        2 => c"unsupported",
        3 => c"I/O error",
        4 => c"corrupt file",
        5 => c"mismatch",
        6 => c"out of capacity",
        7 => c"out of range",
        8 => c"backend failure",
        9 => c"NULL argument",
        10 => c"wrong struct size",
        11 => c"buffer too small",
        12 => c"internal error (panic)",
        _ => c"unknown status",
    }
}

/// The sentence describing the last failed call made by the calling thread ("" if none
/// failed yet). Successful calls leave it unchanged. The string belongs to the library
/// and stays valid until the calling thread's next failing call or its exit; copy it to
/// keep it. Never NULL. Thread-safe (each thread has its own message).
#[no_mangle]
pub extern "C" fn tpla_last_error_message() -> *const c_char {
    guard_value(c"".as_ptr(), || {
        LAST_ERROR.with(|last| last.borrow().as_ptr())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_follow_the_package_version() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(VERSION.to_str().unwrap(), v);
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(
            parts,
            [TPLA_VERSION_MAJOR, TPLA_VERSION_MINOR, TPLA_VERSION_PATCH]
        );
    }

    #[test]
    fn c_enum_codes_are_the_rust_codes() {
        use crate::transform::TransformKind;
        use crate::DType;
        use context::{tpla_dtype, tpla_transform_kind};
        for (c, r) in [
            (tpla_dtype::Bf16, DType::Bf16),
            (tpla_dtype::F16, DType::F16),
            (tpla_dtype::F32, DType::F32),
            (tpla_dtype::Fp8E4m3, DType::Fp8E4m3),
        ] {
            assert_eq!(c as u32, r.code());
        }
        for (c, r) in [
            (tpla_transform_kind::Identity, TransformKind::Identity),
            (tpla_transform_kind::Hadamard, TransformKind::Hadamard),
            (tpla_transform_kind::Pca, TransformKind::Pca),
        ] {
            assert_eq!(c as u32, r.code());
        }
    }

    #[test]
    fn status_descriptions_cover_every_status() {
        for code in 0..=tpla_status::Panic as u32 {
            // SAFETY: tpla_status_str returns a static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(tpla_status_str(code)) };
            assert_ne!(s.to_str().unwrap(), "unknown status", "{code}");
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(tpla_status_str(999)) };
        assert_eq!(s.to_str().unwrap(), "unknown status");
    }

    fn last_error() -> String {
        // SAFETY: the message is a NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(tpla_last_error_message()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("boom {}", 7));
        assert_eq!(status, tpla_status::Panic);
        assert!(last_error().contains("boom 7"), "{}", last_error());
        let status = guard(|| Err(Error::out_of_range("sequence 3 is not in the cache").into()));
        assert_eq!(status, tpla_status::OutOfRange);
        assert_eq!(last_error(), "sequence 3 is not in the cache");
        assert_eq!(guard(|| Ok(())), tpla_status::Ok);
        assert_eq!(
            last_error(),
            "sequence 3 is not in the cache",
            "success keeps it"
        );
        assert_eq!(guard_value(5, || panic!("x")), 5);
    }

    /// Run by `caught_panics_print_nothing` in a child process, whose stderr it reads.
    #[test]
    fn panicking_child() {
        if std::env::var_os("TPLA_PANIC_CHILD").is_none() {
            return;
        }
        assert_eq!(guard(|| panic!("boom in the child")), tpla_status::Panic);
        assert_eq!(guard_value(3, || panic!("boom again")), 3);
        // a panic on a libtpla worker thread, caught where the call waits for it
        let worker = std::thread::Builder::new()
            .name(format!("{WORKER_THREAD_PREFIX}test"))
            .spawn(|| panic!("boom on a worker"))
            .unwrap();
        assert!(
            guard(|| {
                worker.join().map_err(|_| Failure::invalid("joined"))?;
                Ok(())
            }) == tpla_status::InvalidArgument
        );
        eprintln!("child done");
    }

    #[test]
    fn caught_panics_print_nothing() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ffi::tests::panicking_child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("TPLA_PANIC_CHILD", "1")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("child done"), "{stderr}");
        assert!(
            !stderr.contains("boom"),
            "a caught panic reached stderr:\n{stderr}"
        );
    }

    #[test]
    fn messages_are_per_thread() {
        let _ = guard(|| Err(Failure::invalid("main thread")));
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            let _ = guard(|| Err(Failure::invalid("other thread")));
            assert_eq!(last_error(), "other thread");
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), "main thread");
    }

    #[test]
    fn overlapping_buffers_are_refused() {
        let buf = [0.0f32; 8];
        let p = buf.as_ptr();
        let a = span(p, 4, "a");
        let b = span(p.wrapping_add(4), 4, "b");
        let c = span(p.wrapping_add(3), 2, "c");
        assert!(check_disjoint(&[a], &[b]).is_ok());
        assert!(check_disjoint(&[a, b], &[]).is_ok());
        let e = check_disjoint(&[a], &[c]).unwrap_err();
        assert_eq!(e.status, tpla_status::InvalidArgument);
        assert!(e.message.contains("a overlaps c"), "{}", e.message);
        assert!(check_disjoint(&[b, c], &[]).is_err());
        // empty buffers overlap nothing
        assert!(check_disjoint(&[span(p, 0, "e")], &[a]).is_ok());
        // counts that overflow the address space saturate instead of wrapping
        assert!(check_disjoint(&[span(p, usize::MAX, "huge")], &[a]).is_err());
    }
}

//! Combining the ranks' partial outputs (the TPLA all-reduce).

use super::{check_disjoint, guard, input, output, span, tpla_status, Failure};
use crate::combine::{all_reduce_in_process, all_reduce_with};
use crate::error::{Error, ErrorKind};
use std::ffi::c_void;

/// Sums the partial outputs of `ranks` ranks living in one process: `buffers` holds
/// `ranks` pointers to `count` floats each; afterwards every buffer holds the
/// element-wise sum, in rank order, so all ranks get bit-identical values.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT (buffers or one of them NULL) or
/// TPLA_STATUS_INVALID_ARGUMENT (ranks 0, misaligned or overlapping buffers).
/// Thread-safe for disjoint buffers.
///
/// # Safety
/// `buffers` is NULL or holds `ranks` pointers, each NULL or writable for `count`
/// floats and not used elsewhere during the call.
#[no_mangle]
pub unsafe extern "C" fn tpla_all_reduce_in_process(
    buffers: *const *mut f32,
    ranks: usize,
    count: usize,
) -> tpla_status {
    guard(|| {
        if buffers.is_null() {
            return Err(Failure::null("buffers"));
        }
        // SAFETY: caller contract.
        let ptrs = unsafe { input(buffers, ranks, "buffers") }?;
        let spans: Vec<_> = ptrs
            .iter()
            .map(|&p| span(p, count, "a rank's buffer"))
            .collect();
        check_disjoint(&spans, &[])?;
        let mut views = ptrs
            .iter()
            // SAFETY: caller contract; the buffers are disjoint (checked above).
            .map(|&p| unsafe { output(p, count, "a rank's buffer") })
            .collect::<Result<Vec<&mut [f32]>, _>>()?;
        Ok(all_reduce_in_process(&mut views)?)
    })
}

/// The engine's all-reduce, called by `tpla_all_reduce_with`: replace the `count`
/// floats at `buffer` in place by their sum over the ranks, and return 0 on success or
/// any other value on failure.
pub type tpla_all_reduce_fn =
    Option<unsafe extern "C" fn(buffer: *mut f32, count: usize, user: *mut c_void) -> i32>;

/// Hands this rank's partial outputs (`count` floats at `buffer`) to the engine's own
/// communicator `reduce`, called once with `user`, which must sum them over the ranks in
/// place.
///
/// Returns TPLA_STATUS_NULL_ARGUMENT, TPLA_STATUS_INVALID_ARGUMENT (misaligned buffer)
/// or TPLA_STATUS_BACKEND (the callback returned nonzero; the buffer's contents are then
/// whatever the callback left). Thread-safety is the callback's.
///
/// # Safety
/// `buffer` is NULL or writable for `count` floats; `reduce` is a valid function.
#[no_mangle]
pub unsafe extern "C" fn tpla_all_reduce_with(
    buffer: *mut f32,
    count: usize,
    reduce: tpla_all_reduce_fn,
    user: *mut c_void,
) -> tpla_status {
    guard(|| {
        let reduce = reduce.ok_or_else(|| Failure::null("reduce"))?;
        // SAFETY: caller contract.
        let buf = unsafe { output(buffer, count, "buffer") }?;
        Ok(all_reduce_with(buf, |b| {
            // SAFETY: the engine's callback, given the buffer it was promised.
            match unsafe { reduce(b.as_mut_ptr(), b.len(), user) } {
                0 => Ok(()),
                rc => Err(Error::new(
                    ErrorKind::Backend,
                    format!("the all-reduce callback failed with {rc}"),
                )),
            }
        })?)
    })
}

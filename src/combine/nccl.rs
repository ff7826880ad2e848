//! The TPLA all-reduce on GPUs through NCCL (feature `nccl`), loaded at run time.
//!
//! Communicators come two ways:
//! - one process (or thread) per GPU: rank 0 makes a [`UniqueId`], hands its bytes
//!   ([`UniqueId::as_bytes`]; a file with [`UniqueId::publish`] / [`UniqueId::wait_for`],
//!   or the engine's own channel) to the other ranks, and every rank calls
//!   [`Communicator::init_rank`];
//! - one process driving several GPUs: [`Communicator::init_all`], then either one
//!   thread per communicator, or [`all_reduce_across`] from one thread (a group call).
//!
//! Every sum is f32, in place, enqueued on the caller's stream with no host
//! synchronisation (capturable in a CUDA graph); several buffers (layers) reduced together
//! go out as one NCCL group call.

use crate::attention::cuda::{device_extent, CUstream, CudaDevice, DeviceBuffer, Stream};
use crate::error::{Error, ErrorKind, Result};
use cudarc::nccl::sys;
use std::ffi::{c_void, CStr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Fails with a clear error where libnccl cannot be loaded (cudarc panics on first use of
/// a missing library, so every entry point looks first).
pub fn check_library() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::unsupported(
        "the NCCL library (libnccl.so) was not found on the library path; NCCL packages \
         often install only libnccl.so.2: a libnccl.so link to it on LD_LIBRARY_PATH will do",
    ))
}

/// The version of the loaded NCCL as `major * 10000 + minor * 100 + patch`.
pub fn version() -> Result<i32> {
    check_library()?;
    let mut v = 0;
    // SAFETY: writes one int.
    unsafe { sys::ncclGetVersion(&mut v) }
        .result()
        .map_err(|e| nccl_error("reading the NCCL version", e.0, None))?;
    Ok(v)
}

fn nccl_error(what: &str, code: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> Error {
    // SAFETY: NCCL returns static (or per-thread) NUL-terminated strings.
    let describe = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let text = describe(unsafe { sys::ncclGetErrorString(code) }).unwrap_or_default();
    let last = comm
        .and_then(|c| describe(unsafe { sys::ncclGetLastError(c) }))
        .filter(|s| !s.is_empty())
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    Error::new(
        ErrorKind::Backend,
        format!("NCCL: {what} failed: {code:?}: {text}{last}"),
    )
}

/// The rendezvous token of one communicator: made once (by rank 0), given to every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// A fresh id (ncclGetUniqueId: it also starts NCCL's bootstrap listener in this
    /// process, so the process that makes it must stay alive until every rank has joined).
    pub fn new() -> Result<Self> {
        check_library()?;
        let id = cudarc::nccl::result::get_uniqueid()
            .map_err(|e| nccl_error("creating a unique id", e.0, None))?;
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }

    /// An id from the bytes another rank got with [`Self::as_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
            Error::invalid(format!(
                "an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(UniqueId(arr))
    }

    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    /// Writes the id to `path` atomically (a temporary file renamed into place), so a
    /// reader polling for the file never sees part of it.
    pub fn publish(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let at = |e: std::io::Error| Error::from(e).context(path.display());
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(at)?;
        std::io::Write::write_all(&mut temp, &self.0).map_err(at)?;
        temp.as_file().sync_all().map_err(at)?;
        temp.persist(path).map_err(|e| at(e.error))?;
        Ok(())
    }

    /// Reads the id rank 0 published at `path`, waiting up to `timeout` for the file.
    pub fn wait_for(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref();
        let start = Instant::now();
        loop {
            match std::fs::read(path) {
                Ok(bytes) => {
                    return Self::from_bytes(&bytes).map_err(|e| e.context(path.display()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if start.elapsed() >= timeout {
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!(
                                "{}: no NCCL unique id appeared within {:.0?}",
                                path.display(),
                                timeout
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::from(e).context(path.display())),
            }
        }
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// One rank's NCCL communicator, bound to one GPU. Use it from one thread at a time.
#[derive(Debug)]
pub struct Communicator {
    raw: sys::ncclComm_t,
    device: Arc<CudaDevice>,
    rank: usize,
    ranks: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (which `&mut`
// and the single-owner API give); the device handle is thread-safe.
unsafe impl Send for Communicator {}

fn check_rank(ranks: usize, rank: usize) -> Result<()> {
    if ranks == 0 || ranks > i32::MAX as usize || rank >= ranks {
        return Err(Error::invalid(format!(
            "rank {rank} of {ranks} ranks: need 0 <= rank < ranks"
        )));
    }
    Ok(())
}

impl Communicator {
    /// Joins the communicator of `ranks` ranks named by `id` as rank `rank`, on `device`.
    /// Blocks until every rank has joined.
    pub fn init_rank(
        id: &UniqueId,
        ranks: usize,
        rank: usize,
        device: &Arc<CudaDevice>,
    ) -> Result<Self> {
        check_library()?;
        check_rank(ranks, rank)?;
        device.bind()?; // NCCL takes the device from the calling thread's context
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one communicator handle.
        unsafe { sys::ncclCommInitRank(&mut raw, ranks as i32, id.raw(), rank as i32) }
            .result()
            .map_err(|e| {
                nccl_error(
                    &format!("joining as rank {rank} of {ranks} on {}", device.name()),
                    e.0,
                    None,
                )
            })?;
        Ok(Communicator {
            raw,
            device: device.clone(),
            rank,
            ranks,
        })
    }

    /// One communicator per device of this process (rank `i` on `devices[i]`), for one
    /// process that drives several GPUs. The devices must be distinct.
    pub fn init_all(devices: &[Arc<CudaDevice>]) -> Result<Vec<Self>> {
        check_library()?;
        check_rank(devices.len(), 0)?;
        let ordinals: Vec<i32> = devices.iter().map(|d| d.ordinal() as i32).collect();
        if (1..ordinals.len()).any(|i| ordinals[..i].contains(&ordinals[i])) {
            return Err(Error::invalid(format!(
                "NCCL needs one rank per GPU; devices {ordinals:?} repeat one"
            )));
        }
        let mut raw = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `raw` and `ordinals` hold one entry per device.
        unsafe { sys::ncclCommInitAll(raw.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr()) }
            .result()
            .map_err(|e| {
                nccl_error(
                    &format!("creating communicators on devices {ordinals:?}"),
                    e.0,
                    None,
                )
            })?;
        Ok(raw
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (raw, device))| Communicator {
                raw,
                device: device.clone(),
                rank,
                ranks: devices.len(),
            })
            .collect())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn ranks(&self) -> usize {
        self.ranks
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// Sums every buffer over the ranks, in place, on `stream` (one group call for
    /// several buffers). Every rank must pass buffers of the same lengths, in the same
    /// order. The buffers and the stream must belong to this communicator's device.
    pub fn all_reduce(
        &self,
        buffers: &mut [&mut DeviceBuffer<f32>],
        stream: &Stream,
    ) -> Result<()> {
        let spans: Vec<(u64, usize)> = buffers.iter().map(|b| (b.ptr(), b.len())).collect();
        for &(ptr, _) in &spans {
            let ordinal = device_extent(ptr)?.0;
            if ordinal != self.device.ordinal() {
                return Err(Error::mismatch(format!(
                    "a buffer on device {ordinal} given to rank {}'s communicator on device {}",
                    self.rank,
                    self.device.ordinal()
                )));
            }
        }
        // SAFETY: the spans are whole live device buffers of this device; `stream` is a
        // live stream (its device's context is checked by NCCL against the communicator).
        unsafe { self.all_reduce_raw(&spans, stream.raw()) }
    }

    /// [`Self::all_reduce`] on raw device addresses `(address, f32 count)` and a raw
    /// stream: the engine-facing form (the C ABI passes engine-owned buffers).
    ///
    /// # Safety
    /// Each address must hold `count` f32 on this communicator's device, valid until the
    /// stream passes this point; `stream` must be a live stream of that device.
    pub unsafe fn all_reduce_raw(&self, spans: &[(u64, usize)], stream: CUstream) -> Result<()> {
        let calls: Vec<_> = spans.iter().map(|&(p, n)| (self, p, n, stream)).collect();
        all_reduce_across(&calls)
    }

    /// An in-place f64 sum of the `count` values at `ptr` over the ranks (the packed
    /// partials of a sequence-shard merge, [`crate::combine::sequence_device`]).
    ///
    /// # Safety
    /// `ptr` must hold `count` f64 on this communicator's device, valid until the stream
    /// passes this point; `stream` must be a live stream of that device.
    pub unsafe fn all_reduce_f64_raw(
        &self,
        ptr: u64,
        count: usize,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe {
            grouped(
                &[(self, ptr, count, stream)],
                "an f64 all-reduce",
                |comm, ptr, count, stream| {
                    sys::ncclAllReduce(
                        ptr as *const c_void,
                        ptr as *mut c_void,
                        count,
                        sys::ncclDataType_t::ncclFloat64,
                        sys::ncclRedOp_t::ncclSum,
                        comm.raw,
                        stream as sys::cudaStream_t,
                    )
                },
            )
        }
    }

    /// Gathers `count` f32 at `send` of every rank into `recv` (`ranks * count` f32,
    /// rank `r`'s at `recv + 4 * r * count`) on every rank.
    ///
    /// # Safety
    /// `send` must hold `count` and `recv` `ranks * count` f32 on this communicator's
    /// device, not overlapping unless `send` is `recv`'s own slot, valid until the stream
    /// passes this point; `stream` must be a live stream of that device.
    pub unsafe fn all_gather_raw(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        stream: CUstream,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe {
            grouped(
                &[(self, send, count, stream)],
                "an all-gather",
                |comm, ptr, count, stream| {
                    sys::ncclAllGather(
                        ptr as *const c_void,
                        recv as *mut c_void,
                        count,
                        sys::ncclDataType_t::ncclFloat32,
                        comm.raw,
                        stream as sys::cudaStream_t,
                    )
                },
            )
        }
    }
}

/// Issues `call` for each `(communicator, address, count, stream)` as one NCCL group.
///
/// # Safety
/// What `call` passes NCCL must be valid for it (the callers' contracts).
unsafe fn grouped(
    calls: &[(&Communicator, u64, usize, CUstream)],
    what: &str,
    call: impl Fn(&Communicator, u64, usize, CUstream) -> sys::ncclResult_t,
) -> Result<()> {
    if calls.is_empty() {
        return Err(Error::invalid(format!("{what} needs at least one buffer")));
    }
    if let Some(&(c, _, _, _)) = calls.iter().find(|c| c.2 == 0) {
        return Err(Error::invalid(format!(
            "rank {}: {what} of an empty buffer",
            c.rank
        )));
    }
    // SAFETY: group calls take no pointers.
    unsafe { sys::ncclGroupStart() }
        .result()
        .map_err(|e| nccl_error("starting a group", e.0, None))?;
    let mut first_error = None;
    for &(comm, ptr, count, stream) in calls {
        let issued = comm.device.bind().and_then(|()| {
            call(comm, ptr, count, stream)
                .result()
                .map(|_| ())
                .map_err(|e| {
                    nccl_error(
                        &format!("{what} of {count} values on rank {}", comm.rank),
                        e.0,
                        Some(comm.raw),
                    )
                })
        });
        if let Err(e) = issued {
            first_error = Some(e);
            break;
        }
    }
    // SAFETY: closes the group opened above.
    let ended = unsafe { sys::ncclGroupEnd() }
        .result()
        .map_err(|e| nccl_error(&format!("{what} group"), e.0, Some(calls[0].0.raw)));
    match first_error {
        Some(e) => Err(e),
        None => ended.map(|_| ()),
    }
}

/// Enqueues in-place f32 sums `(communicator, address, count, stream)` as one NCCL
/// group: any mix of several buffers of one communicator (layers reduced together) and
/// of several communicators driven by this thread (one process, several GPUs).
///
/// # Safety
/// Each address must hold `count` f32 on its communicator's device, valid until its
/// stream passes this point; each stream must be a live stream of that device.
pub unsafe fn all_reduce_across(calls: &[(&Communicator, u64, usize, CUstream)]) -> Result<()> {
    if calls.is_empty() {
        return Err(Error::invalid("an all-reduce needs at least one buffer"));
    }
    if let Some(&(c, _, _, _)) = calls.iter().find(|c| c.2 == 0) {
        return Err(Error::invalid(format!(
            "rank {}: an all-reduce of an empty buffer",
            c.rank
        )));
    }
    sys::ncclGroupStart()
        .result()
        .map_err(|e| nccl_error("starting a group", e.0, None))?;
    let mut first_error = None;
    for &(comm, ptr, count, stream) in calls {
        let issued = comm.device.bind().and_then(|()| {
            sys::ncclAllReduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm.raw,
                stream as sys::cudaStream_t,
            )
            .result()
            .map(|_| ())
            .map_err(|e| {
                nccl_error(
                    &format!("an all-reduce of {count} values on rank {}", comm.rank),
                    e.0,
                    Some(comm.raw),
                )
            })
        });
        if let Err(e) = issued {
            first_error = Some(e);
            break;
        }
    }
    // The group is always closed, also after a failed call.
    let ended = sys::ncclGroupEnd()
        .result()
        .map_err(|e| nccl_error("an all-reduce group", e.0, Some(calls[0].0.raw)));
    match first_error {
        Some(e) => Err(e),
        None => ended.map(|_| ()),
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: destroyed once; pending operations complete first (NCCL waits).
            let _ = unsafe { sys::ncclCommDestroy(self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_bytes_round_trip_and_wrong_lengths_are_errors() {
        let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES as u32).map(|i| (i * 7) as u8).collect();
        let id = UniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(&id.as_bytes()[..], &bytes[..]);
        let e = UniqueId::from_bytes(&bytes[1..]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("128"), "{e}");
    }

    #[test]
    fn published_ids_are_read_back_and_a_missing_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl.id");
        let id = UniqueId::from_bytes(&[3u8; UNIQUE_ID_BYTES]).unwrap();
        let e = UniqueId::wait_for(&path, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        id.publish(&path).unwrap();
        assert_eq!(
            UniqueId::wait_for(&path, Duration::from_secs(1)).unwrap(),
            id
        );
        std::fs::write(&path, [1u8; 5]).unwrap();
        let e = UniqueId::wait_for(&path, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn rank_arguments_are_checked() {
        assert!(check_rank(2, 1).is_ok());
        assert!(check_rank(2, 2).is_err());
        assert!(check_rank(0, 0).is_err());
    }
}

//! The CUDA driver as the backend uses it: one device context, owned device and pinned
//! host buffers, streams and events, raw kernel launches.
//!
//! Everything goes through cudarc's driver-level bindings with raw `CUstream`s, so the
//! same calls work on the backend's own stream and on a stream an engine hands in (and
//! may be capturing into a CUDA graph).

use super::kernels::PAGE_SIZE;
use crate::error::{Error, ErrorKind, Result};
use cudarc::driver::{result, sys};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

pub use sys::CUstream;

pub(crate) fn driver_err(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| {
        Error::new(
            ErrorKind::Backend,
            format!("CUDA driver: {what} failed: {e}"),
        )
    }
}

/// One GPU: its primary context and the properties the kernels are specialised for.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<cudarc::driver::CudaContext>,
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    multiprocessors: usize,
    max_shared_per_block: usize,
    max_shared_per_sm: usize,
    l2_bytes: usize,
}

impl CudaDevice {
    /// Opens GPU `ordinal`. A missing driver library, no such device, or a device older
    /// than compute capability 8.0 (the kernels use bf16 tensor-core instructions) is an
    /// error, never a panic.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        // cudarc panics on first use when the library is absent: look before touching it.
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::unsupported(
                "the CUDA driver library (libcuda.so) was not found: is an NVIDIA driver installed?",
            ));
        }
        result::init().map_err(driver_err("initialisation (cuInit)"))?;
        let count = result::device::get_count().map_err(driver_err("counting devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("CUDA device {ordinal} does not exist: the driver sees {count} device(s)"),
            ));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(driver_err("creating the device context"))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(driver_err("reading a device attribute"))
        };
        use sys::CUdevice_attribute as A;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let name = ctx.name().map_err(driver_err("reading the device name"))?;
        if cc.0 < 8 {
            return Err(Error::unsupported(format!(
                "{name} has compute capability {}.{}; the decode kernels need 8.0 or newer \
                 (bf16 tensor-core instructions)",
                cc.0, cc.1
            )));
        }
        Ok(Arc::new(CudaDevice {
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            max_shared_per_block: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize,
            max_shared_per_sm: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?
                as usize,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            ctx,
            ordinal,
            name,
            compute_capability: cc,
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }
    pub fn max_shared_per_block(&self) -> usize {
        self.max_shared_per_block
    }
    pub fn max_shared_per_sm(&self) -> usize {
        self.max_shared_per_sm
    }
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }

    /// Makes the device's context current on the calling thread (every entry point
    /// calls this first: the caller may be on any thread).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("binding the device context"))
    }

    /// Checks that `stream` is a stream of this device's context (NULL, the legacy default
    /// stream, is one). Binds the context.
    ///
    /// # Safety
    /// `stream` is NULL or a stream handle not yet destroyed (the driver cannot tell a
    /// destroyed handle from a live one).
    pub unsafe fn check_stream(&self, stream: CUstream) -> Result<()> {
        self.bind()?;
        if stream.is_null() {
            return Ok(());
        }
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes one context handle; `stream` is live by contract.
        unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }
            .result()
            .map_err(|e| Error::invalid(format!("{stream:p} is not a CUDA stream: {e}")))?;
        if ctx != self.ctx.cu_ctx() {
            return Err(Error::mismatch(format!(
                "the stream belongs to another CUDA context than device {}'s primary context",
                self.ordinal
            )));
        }
        Ok(())
    }

    /// Waits for all work on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        result::ctx::synchronize().map_err(driver_err("synchronising the device"))
    }
}

/// Where device address `ptr` lies: the ordinal of its device and the bytes of its
/// allocation from `ptr` to the allocation's end. An address the driver does not know
/// (host memory, freed memory, 0) is an invalid-argument error.
pub fn device_extent(ptr: u64) -> Result<(usize, usize)> {
    let query = |attribute, value: *mut c_void| {
        // SAFETY: writes one value of the attribute's type; the driver checks the address.
        unsafe { sys::cuPointerGetAttribute(value, attribute, ptr) }
            .result()
            .map_err(|e| Error::invalid(format!("{ptr:#x} is not a device address: {e}")))
    };
    let (mut ordinal, mut start, mut size): (i32, sys::CUdeviceptr, usize) = (-1, 0, 0);
    use sys::CUpointer_attribute as A;
    query(
        A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        &mut ordinal as *mut i32 as *mut c_void,
    )?;
    query(
        A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        &mut start as *mut sys::CUdeviceptr as *mut c_void,
    )?;
    query(
        A::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        &mut size as *mut usize as *mut c_void,
    )?;
    let left = (start + size as u64).saturating_sub(ptr) as usize;
    Ok((ordinal.max(0) as usize, left))
}

/// Plain-data element types that may live in device buffers.
pub trait Pod: Copy + Default + 'static {}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for u16 {}
impl Pod for i32 {}
impl Pod for u32 {}
impl Pod for u8 {}

/// `len` elements of `T` in device memory (cuMemAlloc; freed on drop).
#[derive(Debug)]
pub struct DeviceBuffer<T: Pod> {
    device: Arc<CudaDevice>,
    ptr: sys::CUdeviceptr,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> DeviceBuffer<T> {
    pub fn new(device: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        device.bind()?;
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            Error::invalid(format!("a device buffer of {len} elements overflows"))
        })?;
        // SAFETY: plain allocation; a zero-length buffer gets one byte so the pointer is valid.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            Error::new(
                ErrorKind::OutOfCapacity,
                format!("allocating {bytes} bytes on {}: {e}", device.name),
            )
        })?;
        Ok(DeviceBuffer {
            device: device.clone(),
            ptr,
            len,
            _t: PhantomData,
        })
    }

    /// A buffer holding a copy of `data` (synchronous).
    pub fn from_host(device: &Arc<CudaDevice>, data: &[T]) -> Result<Self> {
        let mut buf = Self::new(device, data.len())?;
        buf.upload(data)?;
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The raw device address, for kernel arguments and engine interop.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Synchronous copy of all of `data` into the start of the buffer.
    pub fn upload(&mut self, data: &[T]) -> Result<()> {
        self.check_fits(0, data.len())?;
        self.device.bind()?;
        // SAFETY: the destination holds at least data.len() elements (checked above).
        unsafe { result::memcpy_htod_sync(self.ptr, data) }
            .map_err(driver_err("copying to the device"))?;
        // The copy runs on the legacy stream, which work on non-blocking streams does not
        // wait for: finish it before returning.
        result::ctx::synchronize().map_err(driver_err("finishing a copy to the device"))
    }

    /// Copy of the start of the buffer into `out`, after all queued device work.
    pub fn download(&self, out: &mut [T]) -> Result<()> {
        self.check_fits(0, out.len())?;
        self.device.bind()?;
        // Work on every stream (non-blocking ones included) finishes first, so what is
        // read is what the kernels wrote.
        result::ctx::synchronize().map_err(driver_err("waiting for the device"))?;
        // SAFETY: the source holds at least out.len() elements (checked above).
        unsafe { result::memcpy_dtoh_sync(out, self.ptr) }
            .map_err(driver_err("copying from the device"))
    }

    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len];
        self.download(&mut v)?;
        Ok(v)
    }

    /// Fills the buffer with the byte `value` (synchronous); used to poison outputs.
    pub fn fill_bytes(&mut self, value: u8) -> Result<()> {
        self.device.bind()?;
        // SAFETY: writes exactly the buffer's bytes.
        unsafe { result::memset_d8_sync(self.ptr, value, self.bytes()) }
            .map_err(driver_err("filling a device buffer"))?;
        // cuMemsetD8 is asynchronous on the legacy stream: finish it (see upload).
        result::ctx::synchronize().map_err(driver_err("finishing a device fill"))
    }

    fn check_fits(&self, offset: usize, count: usize) -> Result<()> {
        if !matches!(offset.checked_add(count), Some(end) if end <= self.len) {
            return Err(Error::invalid(format!(
                "{count} elements at offset {offset} do not fit a device buffer of {}",
                self.len
            )));
        }
        Ok(())
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: ptr came from malloc_sync and is freed once. A failure here (a
            // context already torn down) cannot be reported from drop.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory, the staging area of asynchronous uploads.
#[derive(Debug)]
pub struct PinnedBuffer {
    device: Arc<CudaDevice>,
    ptr: *mut u8,
    len: usize,
}

impl PinnedBuffer {
    pub fn new(device: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        device.bind()?;
        // SAFETY: plain pinned allocation (portable, not write-combined: the CPU writes it).
        let ptr = unsafe { result::malloc_host(len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver_err("allocating pinned host memory"))? as *mut u8;
        // SAFETY: freshly allocated, len bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(PinnedBuffer {
            device: device.clone(),
            ptr,
            len,
        })
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// Asynchronous copy of `bytes` bytes from `offset` to device address `dst`.
    ///
    /// # Safety
    /// `dst` must hold `bytes` bytes; neither side may be touched until `stream` passes
    /// this point.
    pub unsafe fn copy_to_device_async_from(
        &self,
        offset: usize,
        dst: u64,
        bytes: usize,
        stream: CUstream,
    ) -> Result<()> {
        assert!(offset + bytes <= self.len);
        sys::cuMemcpyHtoDAsync_v2(dst, self.ptr.add(offset) as *const c_void, bytes, stream)
            .result()
            .map_err(driver_err("an asynchronous copy to the device"))
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: ptr came from malloc_host and is freed once.
            let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// A stream the backend owns (non-blocking with respect to the legacy default stream).
#[derive(Debug)]
pub struct Stream {
    device: Arc<CudaDevice>,
    raw: CUstream,
}

// SAFETY: a CUDA stream is not tied to the thread that made it, only to its context; every
// driver call on `raw` (here and in the launches that take it) binds the device's context
// to the calling thread first (`CudaDevice::bind`), so moving the owner to another thread
// is sound. It is not `Sync`: concurrent use goes through one owner at a time.
unsafe impl Send for Stream {}

impl Stream {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        device.bind()?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver_err("creating a stream"))?;
        Ok(Stream {
            device: device.clone(),
            raw,
        })
    }
    pub fn raw(&self) -> CUstream {
        self.raw
    }
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: raw is a live stream owned by self.
        unsafe { result::stream::synchronize(self.raw) }.map_err(driver_err("waiting for a stream"))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: raw is destroyed once; pending work still completes.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// A timing event.
#[derive(Debug)]
pub struct Event {
    device: Arc<CudaDevice>,
    raw: sys::CUevent,
}

impl Event {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        device.bind()?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(driver_err("creating an event"))?;
        Ok(Event {
            device: device.clone(),
            raw,
        })
    }
    /// Records the event on `stream`.
    ///
    /// # Safety
    /// `stream` must be a live stream of this device's context (or null, the legacy one).
    pub unsafe fn record(&self, stream: CUstream) -> Result<()> {
        result::event::record(self.raw, stream).map_err(driver_err("recording an event"))
    }
    /// Waits until the stream has passed the recorded point.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: live event.
        unsafe { result::event::synchronize(self.raw) }.map_err(driver_err("waiting for an event"))
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.device.bind()?;
        // SAFETY: both events are live.
        unsafe {
            result::event::synchronize(end.raw).map_err(driver_err("waiting for an event"))?;
            result::event::elapsed(self.raw, end.raw).map_err(driver_err("reading an event time"))
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: destroyed once.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}

/// A loaded module (cubin) and the kernels looked up in it.
#[derive(Debug)]
pub struct Module {
    device: Arc<CudaDevice>,
    raw: sys::CUmodule,
}

// SAFETY: a CUmodule is usable from any thread of its context.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

impl Module {
    pub fn load(device: &Arc<CudaDevice>, image: &[u8]) -> Result<Self> {
        device.bind()?;
        // SAFETY: image is a complete cubin produced by NVRTC for this device.
        let raw = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(driver_err("loading the compiled kernels"))?;
        Ok(Module {
            device: device.clone(),
            raw,
        })
    }

    pub fn function(&self, name: &str) -> Result<Function> {
        let cname = std::ffi::CString::new(name).expect("kernel names have no NUL");
        // SAFETY: live module.
        let raw = unsafe { result::module::get_function(self.raw, cname) }
            .map_err(driver_err("looking up a kernel"))?;
        Ok(Function { raw })
    }

    /// Reads a 32-bit `__constant__` of the module.
    pub fn global_i32(&self, name: &str) -> Result<i32> {
        let cname = std::ffi::CString::new(name).expect("symbol names have no NUL");
        self.device.bind()?;
        // SAFETY: live module; the symbol is read only when it is exactly 4 bytes.
        unsafe {
            let (ptr, size) = result::module::get_global(self.raw, cname)
                .map_err(driver_err("looking up a module constant"))?;
            if size != 4 {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!("module constant {name} is {size} bytes, expected 4"),
                ));
            }
            let mut v = [0i32];
            result::memcpy_dtoh_sync(&mut v, ptr)
                .map_err(driver_err("reading a module constant"))?;
            Ok(v[0])
        }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: unloaded once, after every Function of it (they live in the same owner).
            let _ = unsafe { result::module::unload(self.raw) };
        }
    }
}

/// A kernel of a [`Module`]; valid while its module is loaded.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    raw: sys::CUfunction,
}

// SAFETY: a CUfunction handle is usable from any thread of its context.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

impl Function {
    pub fn raw(&self) -> sys::CUfunction {
        self.raw
    }

    /// Allows `bytes` of dynamic shared memory per block (needed above 48 KiB).
    pub fn set_max_dynamic_shared(&self, bytes: usize) -> Result<()> {
        // SAFETY: live function handle.
        unsafe {
            result::function::set_function_attribute(
                self.raw,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(driver_err("raising a kernel's shared-memory limit"))
    }

    /// Launches the kernel.
    ///
    /// # Safety
    /// `args` must point at values matching the kernel's parameters, and every device
    /// address among them must be valid for what the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: usize,
        stream: CUstream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        result::launch_kernel(
            self.raw,
            grid,
            (block, 1, 1),
            shared_bytes as u32,
            stream,
            args,
        )
        .map_err(driver_err("launching a kernel"))
    }

    /// Launches the kernel as the programmatic dependent of the kernel launched before it
    /// on `stream` (programmatic dependent launch, sm_90): its blocks may start once every
    /// block of that kernel has run `griddepcontrol.launch_dependents` or exited, so the
    /// launch's latency hides behind that kernel's tail. The kernel must run
    /// `griddepcontrol.wait` before reading anything that kernel writes.
    ///
    /// # Safety
    /// As [`Self::launch`].
    pub unsafe fn launch_programmatic_dependent(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        shared_bytes: usize,
        stream: CUstream,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_bytes as u32,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: `config` and `attribute` outlive the call; the arguments are the
        // caller's contract.
        unsafe { sys::cuLaunchKernelEx(&config, self.raw, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(driver_err("launching a kernel as a programmatic dependent"))
    }
}

/// The tensor map of a pool of `pages` pages of [`PAGE_SIZE`] bf16 rows of `row_width`
/// values at device address `ptr`, page `p` at `ptr + p * page_stride` bytes (the rows of
/// a page back to back), read by the Hopper kernel in boxes of 64 columns x one page's
/// rows with the 128-byte swizzle (the shared-memory layout wgmma reads); reads outside
/// the pool (a page index past `pages`) give zeros.
pub(crate) fn bf16_pages_tensor_map(
    ptr: u64,
    row_width: usize,
    pages: usize,
    page_stride: usize,
) -> Result<sys::CUtensorMap> {
    let row_bytes = row_width * 2;
    if ptr % 16 != 0
        || row_width % 64 != 0
        || pages == 0
        || pages > u32::MAX as usize
        || page_stride % 16 != 0
        || page_stride < PAGE_SIZE * row_bytes
        || page_stride as u64 >= 1 << 40
    {
        return Err(Error::invalid(format!(
            "a tensor map needs a 16-byte aligned pool of 1 to 2^32 pages whose row width is a \
             multiple of 64 and whose page stride is a multiple of 16 of at least a page's rows \
             (below 2^40); got address {ptr:#x}, {pages} pages of {PAGE_SIZE} rows of {row_width}, \
             page stride {page_stride}"
        )));
    }
    let dims = [row_width as u64, PAGE_SIZE as u64, pages as u64];
    let strides = [row_bytes as u64, page_stride as u64];
    let boxes = [64u32, PAGE_SIZE as u32, 1];
    let element_strides = [1u32, 1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local of the rank (3) given; the driver
    // only encodes (no device access).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(driver_err("encoding the cache pool's tensor map"))?;
        Ok(map.assume_init())
    }
}

/// Pointer to a kernel argument, as `cuLaunchKernel` takes them.
pub(crate) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

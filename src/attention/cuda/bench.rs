//! Decode benchmark on the GPU: CUDA-event timings of [`DecodePlan::launch`] (or of the
//! engine API's device path) against
//! ceilings measured in the same run (device read bandwidth, cuBLAS bf16 matrix rate).
//!
//! Inputs are rotated over enough copies of the batch to exceed the L2 several times,
//! so small shapes are timed from device memory, not from the cache.

use super::cache::DeviceCacheConfig;
use super::decode::{CudaBackend, DecodePlan, PoolRef};
use super::driver::{arg, DeviceBuffer, Event};
use super::kernels::{Kernels, PAGE_SIZE, ROPE_WIDTH};
use crate::attention::LatentShape;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// Ceilings of this GPU, measured now.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Device-memory read bandwidth, GB/s (bytes read once by a streaming kernel).
    pub read_gbps: f64,
    /// bf16 dense matrix-product rate through cuBLAS, TFLOP/s (None: no libcublas).
    pub bf16_tflops: Option<f64>,
}

/// One decode shape.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub heads: usize,
    pub slice_width: usize,
    pub context: usize,
    pub batch: usize,
    /// The cache's row type: bf16 or fp8_e4m3.
    pub dtype: DType,
}

/// What one shape measured.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub case: Case,
    /// The plan's description of its kernel (kind, specialisation, splits).
    pub kernel: String,
    /// The decode kernel's short name.
    pub kernel_kind: &'static str,
    pub splits: usize,
    pub median_us: f64,
    pub min_us: f64,
    /// Cache bytes read per step (the cost model's bytes: rows once).
    pub bytes: f64,
    /// Matrix flops per step: 2 H (row_width + slice_width) per token.
    pub flops: f64,
}

impl Measurement {
    pub fn gbps(&self) -> f64 {
        self.bytes / self.median_us / 1e3
    }
    pub fn tflops(&self) -> f64 {
        self.flops / self.median_us / 1e6
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn launch_fill_f32(
    k: &Kernels,
    ptr: u64,
    count: usize,
    seed: u64,
    scale: f32,
    stream: super::CUstream,
) -> Result<()> {
    let count = count as u64;
    let mut args = [arg(&ptr), arg(&count), arg(&seed), arg(&scale)];
    // SAFETY: ptr holds count f32 (callers pass their own buffers).
    unsafe { k.fill_f32.launch((1024, 1, 1), 256, 0, stream, &mut args) }
}

/// Measures the read bandwidth (a 4 GiB buffer read once per launch, median of 20)
/// and the cuBLAS bf16 rate (8192^3 products, median of 10).
pub fn measure_ceilings(backend: &CudaBackend) -> Result<Ceilings> {
    let dev = backend.device();
    let k = backend.kernels(64, 512, ROPE_WIDTH)?;
    let stream = backend.stream();
    let bytes = 4usize << 30;
    let data = DeviceBuffer::<u16>::new(dev, bytes / 2)?;
    {
        let (ptr, count, seed, scale) = (data.ptr(), (bytes / 2) as u64, 7u64, 1.0f32);
        let mut args = [arg(&ptr), arg(&count), arg(&seed), arg(&scale)];
        // SAFETY: fills exactly the buffer.
        unsafe {
            k.fill_bf16
                .launch((4096, 1, 1), 256, 0, stream, &mut args)?
        };
    }
    let sink = DeviceBuffer::<u32>::new(dev, 1)?;
    let (start, end) = (Event::new(dev)?, Event::new(dev)?);
    let blocks = (dev.multiprocessors() * 8) as u32;
    let mut times = Vec::new();
    for i in 0..25 {
        let (ptr, words, never, sink_ptr) =
            (data.ptr(), (bytes / 16) as u64, 0x9e37_79b9u32, sink.ptr());
        let mut args = [arg(&ptr), arg(&words), arg(&never), arg(&sink_ptr)];
        // SAFETY: the backend's own live stream.
        unsafe { start.record(stream)? };
        // SAFETY: reads the buffer, writes at most the one-word sink.
        unsafe {
            k.read_probe
                .launch((blocks, 1, 1), 256, 0, stream, &mut args)?
        };
        // SAFETY: the backend's own live stream.
        unsafe { end.record(stream)? };
        let ms = start.elapsed_ms(&end)? as f64;
        if i >= 5 {
            times.push(ms);
        }
    }
    let read_gbps = bytes as f64 / median(times) / 1e6;
    drop(data);
    Ok(Ceilings {
        read_gbps,
        bf16_tflops: cublas_bf16_tflops(backend, &k)?,
    })
}

fn cublas_bf16_tflops(backend: &CudaBackend, k: &Arc<Kernels>) -> Result<Option<f64>> {
    use cudarc::cublas::{result as cb, sys as cbs};
    // SAFETY: only tries to dlopen libcublas.
    if !unsafe { cbs::is_culib_present() } {
        return Ok(None);
    }
    let blas = |e: cb::CublasError| Error::new(ErrorKind::Backend, format!("cuBLAS: {e}"));
    let dev = backend.device();
    let stream = backend.stream();
    let n = 8192usize;
    let a = DeviceBuffer::<u16>::new(dev, n * n)?;
    let b = DeviceBuffer::<u16>::new(dev, n * n)?;
    let c = DeviceBuffer::<u16>::new(dev, n * n)?;
    for (buf, seed) in [(&a, 1u64), (&b, 2u64)] {
        let (ptr, count, scale) = (buf.ptr(), (n * n) as u64, 1.0f32);
        let mut args = [arg(&ptr), arg(&count), arg(&seed), arg(&scale)];
        // SAFETY: fills exactly the buffer.
        unsafe {
            k.fill_bf16
                .launch((4096, 1, 1), 256, 0, stream, &mut args)?
        };
    }
    dev.bind()?;
    let handle = cb::create_handle().map_err(blas)?;
    let run = || -> Result<f64> {
        // SAFETY: live handle; the stream is the backend's.
        unsafe { cb::set_stream(handle, stream as _) }.map_err(blas)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (start, end) = (Event::new(dev)?, Event::new(dev)?);
        let mut times = Vec::new();
        for i in 0..13 {
            // SAFETY: the backend's own live stream.
            unsafe { start.record(stream)? };
            // SAFETY: three n x n bf16 matrices, f32 scalars on the host.
            unsafe {
                cb::gemm_ex(
                    handle,
                    cbs::cublasOperation_t::CUBLAS_OP_N,
                    cbs::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    n as i32,
                    n as i32,
                    &alpha as *const f32 as *const _,
                    a.ptr() as *const _,
                    cbs::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    b.ptr() as *const _,
                    cbs::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    &beta as *const f32 as *const _,
                    c.ptr() as *mut _,
                    cbs::cudaDataType::CUDA_R_16BF,
                    n as i32,
                    cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cbs::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(blas)?;
            // SAFETY: the backend's own live stream.
            unsafe { end.record(stream)? };
            let ms = start.elapsed_ms(&end)? as f64;
            if i >= 3 {
                times.push(ms);
            }
        }
        Ok(2.0 * (n as f64).powi(3) / median(times) / 1e9)
    };
    let r = run();
    // SAFETY: destroyed once.
    let _ = unsafe { cb::destroy_handle(handle) };
    r.map(Some)
}

/// Times one decode shape: `runs` timed launches (after warm-up), inputs rotated over
/// copies of the batch totalling at least 4x the L2.
pub fn measure(backend: &CudaBackend, case: Case, runs: usize) -> Result<Measurement> {
    measure_api(backend, case, runs, false)
}

/// [`measure`] through the engine API's device path (`crate::engine_device`): each
/// timed step is the plan kernel, then the decode over the same pool with the batch's
/// block table rows and lengths (the check kernel, the decode and its merge, the fix-up),
/// so the difference from [`measure`] is the API's cost on the GPU.
pub fn measure_engine(backend: &CudaBackend, case: Case, runs: usize) -> Result<Measurement> {
    measure_api(backend, case, runs, true)
}

fn measure_api(
    backend: &CudaBackend,
    case: Case,
    runs: usize,
    engine_api: bool,
) -> Result<Measurement> {
    let dev = backend.device().clone();
    let stream = backend.stream();
    let shape = LatentShape {
        heads: case.heads,
        slice_width: case.slice_width,
        d_r: ROPE_WIDTH,
    };
    let rw = shape.row_width();
    let row_bytes = case.dtype.row_bytes(case.slice_width, ROPE_WIDTH);
    let set_bytes = case.batch * case.context * row_bytes;
    let copies = (4 * dev.l2_bytes()).div_ceil(set_bytes).clamp(1, 128);
    let pages_per_seq = case.context.div_ceil(PAGE_SIZE);
    let slots = copies * case.batch;
    let mut cache = backend.new_cache_for(
        DeviceCacheConfig {
            slice_width: case.slice_width,
            pages: slots * pages_per_seq,
            slots,
            max_pages_per_slot: pages_per_seq,
        },
        case.dtype,
    )?;
    for s in 0..slots {
        cache.fill_synthetic(s, case.context, 0x5eed_0000 + s as u64)?;
    }
    let plan = backend.plan_for(shape, case.dtype, case.batch, case.context)?;
    let k = backend.kernels_for(case.heads, case.slice_width, ROPE_WIDTH, case.dtype)?;
    let q_len = case.batch * case.heads * rw;
    let q = DeviceBuffer::<f32>::new(&dev, copies * q_len)?;
    // scores of standard deviation ~1: q entries ~ U(-a, a) against rows ~ U(-1, 1)
    let scale = (3.0 / rw as f64).sqrt() as f32 * 1.7;
    launch_fill_f32(&k, q.ptr(), copies * q_len, 99, scale, stream)?;
    let slot_ids: Vec<i32> = (0..slots as i32).collect();
    let slots_dev = DeviceBuffer::from_host(&dev, &slot_ids)?;
    let out = DeviceBuffer::<f32>::new(&dev, case.batch * case.heads * case.slice_width)?;
    let lse = DeviceBuffer::<f32>::new(&dev, case.batch * case.heads)?;
    // the engine path: its own workspace and plan over it, block table rows and lengths
    // of copy c as the batch's
    let engine_kernels = match engine_api {
        true => Some(backend.engine_kernels(case.slice_width)?),
        false => None,
    };
    let workspace =
        DeviceBuffer::<u8>::new(&dev, if engine_api { plan.layout().bytes } else { 0 })?;
    let engine_plan = DecodePlan::borrowed(
        &dev,
        k.clone(),
        shape,
        case.batch,
        plan.splits(),
        workspace.ptr(),
    )?;
    let pool = cache.pool_ref();
    let step = |i: usize| -> Result<()> {
        let c = i % copies;
        let q_c = q.ptr() + (c * q_len * 4) as u64;
        if let Some(engine_kernels) = &engine_kernels {
            let rows = PoolRef {
                table: pool.table + (c * case.batch * pool.max_pages * 4) as u64,
                lens: pool.lens + (c * case.batch * 4) as u64,
                num_slots: case.batch,
                ..pool
            };
            // SAFETY: the workspace holds the plan's layout; copy c's table rows, lengths
            // and queries are in range; outputs sized for the batch.
            return unsafe {
                engine_kernels.launch_plan(&engine_plan, pool.max_pages, stream)?;
                engine_kernels.launch_decode(
                    &engine_plan,
                    &rows,
                    0,
                    q_c,
                    out.ptr(),
                    lse.ptr(),
                    stream,
                )
            };
        }
        // SAFETY: copy c's slots and queries are in range; outputs sized for the batch.
        unsafe {
            plan.launch(
                &cache,
                slots_dev.ptr() + (c * case.batch * 4) as u64,
                q_c,
                out.ptr(),
                lse.ptr(),
                stream,
            )
        }
    };
    for i in 0..copies.max(5) {
        step(i)?;
    }
    // Back-to-back steps, each between its own pair of events, read after the last:
    // the protocol of the FlashMLA anchor (../shared/anchors/gpu_common.py), so both
    // are timed under the same clocks (the H200 here slows down after 40-90 ms of
    // back-to-back steps).
    let events = (0..runs)
        .map(|_| Ok((Event::new(&dev)?, Event::new(&dev)?)))
        .collect::<Result<Vec<_>>>()?;
    for (i, (start, end)) in events.iter().enumerate() {
        // SAFETY: the backend's own live stream.
        unsafe { start.record(stream)? };
        step(i)?;
        // SAFETY: the backend's own live stream.
        unsafe { end.record(stream)? };
    }
    dev.synchronize()?;
    let times = events
        .iter()
        .map(|(start, end)| Ok(start.elapsed_ms(end)? as f64 * 1e3))
        .collect::<Result<Vec<_>>>()?;
    let lse_host = lse.to_vec()?;
    if lse_host.iter().any(|v| !v.is_finite()) {
        return Err(Error::new(
            ErrorKind::Backend,
            "decode benchmark produced a non-finite log-sum-exp",
        ));
    }
    let tokens = (case.batch * case.context) as f64;
    let min_us = times.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Measurement {
        case,
        kernel: if engine_api {
            format!("{} through the engine API", plan.kernel_name())
        } else {
            plan.kernel_name()
        },
        kernel_kind: k.config.kernel.name(),
        splits: plan.splits(),
        median_us: median(times),
        min_us,
        bytes: tokens * row_bytes as f64,
        flops: tokens * 2.0 * (case.heads * (rw + case.slice_width)) as f64,
    })
}

//! CUDA backend (cargo feature `cuda`): latent-attention decode on NVIDIA GPUs.
//!
//! - [`CudaDevice`] opens a GPU through the driver API, loaded at run time: a machine
//!   without the driver, without libnvrtc, or with a GPU older than compute capability
//!   8.0 gets an error, never a panic.
//! - Kernels (the `.cu`/`.cuh` files here, embedded) are compiled by NVRTC for the
//!   device's own architecture, specialised per (decode kernel, slice width, heads per
//!   block, pipeline depth), and the cubins are cached on disk ([`default_cache_dir`]).
//!   Two decode kernels ([`DecodeKernel`]): `wgmma` on Hopper (decode_sm90.cu: TMA
//!   tiles, wgmma from shared memory, two warpgroups) for heads in multiples of 64;
//!   `mma.sync` v3 (decode_v3.cu) elsewhere and on Ampere/Ada.
//! - [`DeviceCache`] mirrors the CPU page layout (pages of 64 bf16 rows
//!   `[slice_width + d_r]`, or FP8 rows, DESIGN 7.1) with device block tables; sequences
//!   are uploaded from any [`RowSource`](crate::attention::RowSource), decode rows
//!   appended on the device (FP8: quantised there to the host's bytes).
//! - [`DecodePlan::launch`] takes device addresses and a raw `CUstream` and never
//!   synchronises, so an engine can capture decode steps in a CUDA graph.
//! - [`CudaBackend`] implements [`LatentAttention`](crate::attention::LatentAttention)
//!   by uploading the host cache, so the reference comparison tests apply unchanged.
//!
//! - [`SequenceKernels`] (sequence.cu): the sequence-shard merges on the device.
//!
//! Kernel design, measured figures and limits: benches/RESULTS.md, "CUDA decode".

pub mod bench;
mod cache;
mod compile;
mod decode;
mod driver;
mod engine;
mod kernels;
mod sequence;

pub use cache::{DeviceCache, DeviceCacheConfig};
pub use compile::{default_cache_dir, nvrtc_version, Origin};
pub use decode::{CudaBackend, DecodePlan};
pub(crate) use decode::{PoolRef, WorkspaceLayout};
pub(crate) use driver::arg;
pub use driver::{device_extent, CUstream, CudaDevice, DeviceBuffer, Event, Stream};
pub use engine::EngineKernels;
pub(crate) use engine::APPEND_THREADS;
pub use kernels::{
    DecodeKernel, KernelConfig, Kernels, MAX_STAGES, PAGE_SIZE, ROPE_WIDTH, SLICE_WIDTHS,
};
pub(crate) use sequence::RankBuffers;
pub use sequence::{SequenceKernels, MAX_IN_PROCESS_RANKS};

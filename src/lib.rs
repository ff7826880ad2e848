//! libtpla: decode attention of MLA models under Tensor-Parallel Latent Attention.
//!
//! Data flows one way: [`geometry`] (dims and shard plan) -> [`transform`] and
//! [`convert`] (per-rank folded weights) -> cache -> [`attention`] backends -> combine.
//! docs/DESIGN.md explains the maths.

pub mod attention;
pub mod cache;
pub mod calibration;
pub mod checkpoint;
pub mod combine;
pub mod convert;
pub mod decode;
#[cfg(feature = "cuda")]
pub mod device_rank;
pub mod dtype;
pub mod engine;
#[cfg(feature = "cuda")]
pub mod engine_device;
pub mod error;
pub mod ffi;
pub mod fidelity;
mod files;
pub mod geometry;
mod le;
pub mod synthetic;
pub mod transform;
pub mod weights_file;

pub use dtype::DType;
pub use error::{Error, ErrorKind, Result};
pub use geometry::{HybridPlan, ModelDims, SequenceSharding, ShardPlan};

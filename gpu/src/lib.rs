//! lipstream-gpu: everything CUDA — device discovery, NVRTC kernels (sources in `gpu/kernels/`),
//! cuDNN / cuBLASLt calls, the arena planner, graph capture and the CUDA executor of the
//! `lipstream-engines` IR.
//!
//! The only crate with `unsafe`; each use carries a `// SAFETY:` line. It must never panic on a
//! machine without CUDA: libraries are probed before cudarc touches them.

// Launchers mirror the kernels' parameter lists (buffers, shape, epsilon, flags).
#![allow(clippy::too_many_arguments)]

pub mod arena;
pub mod blas;
pub mod conv;
pub mod conv_graph;
pub mod device;
pub mod error;
pub mod executor;
pub mod kernels;
pub mod plan;

pub use device::Device;
pub use error::GpuError;
pub use executor::{
    ConvAsGemm, ConvGraphs, Executor, FuseConv, MmaConv, MmaKey, NormedConvs, Options, Runtime,
    Scratch, Staging, ThinConvs, Tuning,
};

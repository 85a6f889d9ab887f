//! lipstream-gpu: everything CUDA — device discovery, NVRTC kernels (sources in `gpu/kernels/`),
//! and (to come) cuDNN / cuBLASLt calls, the arena, graph capture and the CUDA executor of the
//! `lipstream-engines` IR.
//!
//! The only crate with `unsafe`; each use carries a `// SAFETY:` line. It must never panic on a
//! machine without CUDA: libraries are probed before cudarc touches them.

// Launchers mirror the kernels' parameter lists (buffers, shape, epsilon, flags).
#![allow(clippy::too_many_arguments)]

pub mod blas;
pub mod conv;
pub mod device;
pub mod error;
pub mod kernels;

pub use device::Device;
pub use error::GpuError;

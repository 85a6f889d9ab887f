//! The GPU crate's one error type.

/// What can go wrong on the GPU side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// A CUDA library is not installed or not on the loader path.
    #[error("CUDA library {name} not found (looked in the loader path; set LD_LIBRARY_PATH, e.g. /usr/local/cuda/lib64)")]
    LibraryMissing { name: &'static str },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC rejected a kernel source: a bug in our .cu files or an unsupported GPU.
    #[error("NVRTC compiling {kernel} for {arch}: {log}")]
    Compile {
        kernel: &'static str,
        arch: String,
        log: String,
    },
    #[error("cuDNN: {0}")]
    Cudnn(String),
    #[error("cuBLASLt: {0}")]
    Blas(String),
    /// A launch was asked for shapes the kernel does not take.
    #[error("{kernel}: {reason}")]
    Shape {
        kernel: &'static str,
        reason: String,
    },
    /// The graph has a node the CUDA executor does not run.
    #[error("node {node} ({op}): {reason}")]
    Unsupported {
        node: String,
        op: &'static str,
        reason: String,
    },
    /// An input or output name or size that the executor does not have.
    #[error("binding {name}: {reason}")]
    Binding { name: String, reason: String },
    /// CUDA graph capture or replay failed.
    #[error("CUDA graph: {0}")]
    Capture(String),
}

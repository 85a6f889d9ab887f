//! lipstream-gpu: everything CUDA (device, arena, pinned ring buffers, NVRTC kernels, cuDNN /
//! cuBLASLt, graph capture) — the CUDA executor of the `lipstream-engines` IR.
//!
//! Not built yet; the only crate where `unsafe` will be allowed, each use with a `// SAFETY:` line.

//! Our NVRTC kernels: each family's CUDA source lives in `gpu/kernels/<op>.cu`, beside the Rust
//! launcher here that owns it. Sources are compiled for the device's exact SM when loaded.

pub mod attention;
pub mod elementwise;
pub mod group_norm;
pub mod layer_norm;

use std::sync::Arc;

use cudarc::driver::CudaModule;
use cudarc::nvrtc::CompileOptions;

use crate::device::Device;
use crate::error::GpuError;

/// Where cuda_fp16.h lives on the machines we run on.
const CUDA_INCLUDE: &str = "/usr/local/cuda/include";

/// Compiles one kernel source for `device` and loads it.
pub fn compile(
    device: &Device,
    kernel: &'static str,
    src: &str,
) -> Result<Arc<CudaModule>, GpuError> {
    let arch = device.arch();
    let opts = CompileOptions {
        // The exact SM: NVRTC emits code for this GPU only (engine files are per GPU anyway).
        options: vec![format!("--gpu-architecture={arch}")],
        include_paths: vec![std::env::var("CUDA_INCLUDE").unwrap_or_else(|_| CUDA_INCLUDE.into())],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| GpuError::Compile {
        kernel,
        arch,
        log: e.to_string(),
    })?;
    Ok(device.ctx.load_module(ptx)?)
}

//! LayerNorm over the last axis (transformer blocks, whisper) on fp16 rows.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/layer_norm.cu");
const ROWS_PER_BLOCK: u32 = 8;

/// The compiled kernel.
pub struct LayerNorm {
    func: CudaFunction,
}

impl LayerNorm {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "layer_norm", SRC)?;
        Ok(LayerNorm {
            func: module.load_function("layer_norm_f16")?,
        })
    }

    /// y = layernorm(x) * gamma + beta over rows of `cols`.
    pub fn launch(
        &self,
        device: &Device,
        x: &CudaSlice<f16>,
        gamma: &CudaSlice<f16>,
        beta: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        cols: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        if cols == 0
            || !x.len().is_multiple_of(cols)
            || y.len() != x.len()
            || gamma.len() != cols
            || beta.len() != cols
        {
            return Err(GpuError::Shape {
                kernel: "layer_norm",
                reason: format!("{} elements in rows of {cols}", x.len()),
            });
        }
        let rows = x.len() / cols;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(ROWS_PER_BLOCK), 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, c) = (rows as i32, cols as i32);
        let mut launch = device.stream.launch_builder(&self.func);
        launch
            .arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(y)
            .arg(&r)
            .arg(&c)
            .arg(&eps);
        // SAFETY: arguments match layer_norm_f16 (3 const half*, half*, int, int, float); buffers
        // hold rows*cols / cols elements as checked; rows past the end return early in the kernel.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

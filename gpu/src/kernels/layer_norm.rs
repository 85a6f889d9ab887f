//! LayerNorm over the last axis (transformer blocks, whisper) on fp16 rows.

use cudarc::driver::{CudaFunction, CudaStream};

use super::{grid, launch, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/layer_norm.cu")
);
const ROWS_PER_BLOCK: u32 = 8;

/// The compiled kernel.
pub struct LayerNorm {
    func: CudaFunction,
    func8: CudaFunction,
}

impl LayerNorm {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "layer_norm", SRC)?;
        Ok(LayerNorm {
            func: module.load_function("layer_norm_f16")?,
            func8: module.load_function("layer_norm_f16x8")?,
        })
    }

    /// y = layernorm(x) * gamma + beta over rows of `cols`.
    ///
    /// # Safety
    /// x and y must hold rows*cols elements, gamma and beta cols.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        x: Ptr,
        gamma: Ptr,
        beta: Ptr,
        y: Ptr,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        let wide = cols.is_multiple_of(8) && super::elementwise::aligned16(&[x, gamma, beta, y]);
        let (func, width) = match wide {
            true => (&self.func8, cols / 8),
            false => (&self.func, cols),
        };
        let args = [
            Arg::P(x),
            Arg::P(gamma),
            Arg::P(beta),
            Arg::P(y),
            Arg::I(rows as i32),
            Arg::I(width as i32),
            Arg::F(eps),
        ];
        // SAFETY: matches layer_norm_f16 and layer_norm_f16x8 (3 const half* or uint4*, half*
        // or uint4*, int, int, float), the latter given whole 8-column vectors at 16-byte
        // aligned addresses (checked); one warp per row, surplus warps return.
        unsafe { launch(stream, func, grid(rows * 32, 32 * ROWS_PER_BLOCK), &args) }
    }
}

//! The row softmax between attention's two batched GEMMs (see `plan`: scores = q kᵀ / sqrt(d)
//! and out = p v run through cuBLASLt).

use cudarc::driver::{CudaFunction, CudaStream};

use super::{grid, launch, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/attention.cu");
const WARPS_PER_BLOCK: u32 = 8;
/// The kernel keeps a row in registers: 48 values per lane.
pub const MAX_COLS: usize = 48 * 32;

/// The compiled kernel.
pub struct Softmax {
    func: CudaFunction,
}

impl Softmax {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        Ok(Softmax {
            func: module.load_function("softmax_rows_f16")?,
        })
    }

    /// x [rows, cols] = softmax(x) along each row, in place.
    ///
    /// # Safety
    /// x must hold rows*cols elements.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        x: Ptr,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        if cols == 0 || cols > MAX_COLS {
            return Err(super::shape_err(
                "softmax",
                format!("{cols} columns (1..={MAX_COLS})"),
            ));
        }
        let args = [Arg::P(x), Arg::L(rows as i64), Arg::I(cols as i32)];
        // SAFETY: matches softmax_rows_f16 (half*, long, int); one warp per row, surplus warps
        // return before touching memory.
        unsafe {
            launch(
                stream,
                &self.func,
                grid(rows * 32, 32 * WARPS_PER_BLOCK),
                &args,
            )
        }
    }
}

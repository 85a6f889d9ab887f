//! The row softmax between attention's two batched GEMMs (see `plan`: scores = q kᵀ / sqrt(d)
//! and out = p v run through cuBLASLt).

use cudarc::driver::{CudaFunction, CudaStream};

use super::{grid, launch, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/attention.cu");
const WARPS_PER_BLOCK: u32 = 8;
/// The widest row the attention lowering sends here (whisper's 1500 keys fit).
pub const MAX_COLS: usize = 1536;

/// The compiled kernel.
pub struct Softmax {
    any: CudaFunction,
    upto1024: CudaFunction,
    upto1536: CudaFunction,
}

impl Softmax {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        Ok(Softmax {
            any: module.load_function("softmax_rows_f16")?,
            upto1024: module.load_function("softmax_rows_f16x2_1024")?,
            upto1536: module.load_function("softmax_rows_f16x2_1536")?,
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
        // SAFETY: each kernel takes (half or half2*, long, int); one warp per row, surplus warps
        // return before touching memory; the register kernels get even widths within their
        // capacity and 4-byte aligned rows (checked above).
        unsafe {
            launch(
                stream,
                if !cols.is_multiple_of(2) || !x.is_multiple_of(4) {
                    &self.any
                } else if cols <= 1024 {
                    &self.upto1024
                } else {
                    &self.upto1536
                },
                grid(rows * 32, 32 * WARPS_PER_BLOCK),
                &args,
            )
        }
    }
}

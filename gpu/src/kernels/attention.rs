//! Attention: a fused flash-style kernel for the head dims the models use (the UNet's 40/80/160,
//! whisper's 64), and, for the rest (the VAE's single 512-wide head), the row softmax between
//! two batched cuBLASLt GEMMs (see `plan`: scores = q kᵀ / sqrt(d), out = p v).

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{grid, launch, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = include_str!("../../kernels/attention.cu");
const WARPS_PER_BLOCK: u32 = 8;
/// The widest row the attention lowering sends here (whisper's 1500 keys fit).
pub const MAX_COLS: usize = 1536;

/// Head dims the fused kernel is instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 4] = [40, 64, 80, 160];
/// Queries per warp of the fused kernel, and warps per block.
const FLASH_WARP_QUERIES: usize = 16;
const FLASH_WARPS: usize = 4;

/// Whether the fused kernel runs attention with head dim `d` (values as wide as keys).
pub fn flash_supports(d: usize, dv: usize) -> bool {
    d == dv && FLASH_HEAD_DIMS.contains(&d)
}

/// The compiled kernels.
pub struct Attention {
    any: CudaFunction,
    upto1024: CudaFunction,
    upto1536: CudaFunction,
    flash: Vec<(usize, CudaFunction)>,
}

impl Attention {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        let mut flash = Vec::new();
        for d in FLASH_HEAD_DIMS {
            flash.push((d, module.load_function(&format!("flash_attention_{d}"))?));
        }
        Ok(Attention {
            any: module.load_function("softmax_rows_f16")?,
            upto1024: module.load_function("softmax_rows_f16x2_1024")?,
            upto1536: module.load_function("softmax_rows_f16x2_1536")?,
            flash,
        })
    }

    /// o = softmax(q kᵀ / sqrt(d)) v per image and head, fused. q, o [batch, lq, heads*d],
    /// k, v [batch, lk, heads*d], token-major.
    ///
    /// # Safety
    /// Each address must hold its tensor at that shape, 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn flash(
        &self,
        stream: &CudaStream,
        (q, k, v, o): (Ptr, Ptr, Ptr, Ptr),
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        d: usize,
    ) -> Result<(), GpuError> {
        let Some((_, func)) = self.flash.iter().find(|(hd, _)| *hd == d) else {
            return Err(super::shape_err(
                "flash_attention",
                format!("head dim {d} (built for {FLASH_HEAD_DIMS:?})"),
            ));
        };
        if [q, k, v, o].iter().any(|p| !p.is_multiple_of(16)) || lk == 0 {
            return Err(super::shape_err(
                "flash_attention",
                format!(
                    "{lk} keys, operands {q:#x} {k:#x} {v:#x} {o:#x} (16-byte aligned, keys > 0)"
                ),
            ));
        }
        // Four warps share each key tile they load. (Fewer warps per block for grids smaller
        // than two blocks per SM measured slower on an H100: every block reloads the keys.)
        let warps = FLASH_WARPS;
        let cfg = LaunchConfig {
            grid_dim: (
                lq.div_ceil(warps * FLASH_WARP_QUERIES) as u32,
                heads as u32,
                batch as u32,
            ),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let args = [
            Arg::P(q),
            Arg::P(k),
            Arg::P(v),
            Arg::P(o),
            Arg::I(lq as i32),
            Arg::I(lk as i32),
            Arg::I(heads as i32),
            Arg::F(scale_log2),
        ];
        // SAFETY: (const half* x3, half*, int, int, int, float) as the kernel declares; one
        // block per 16 x warps queries of one (head, image), rows past lq and keys past lk are never
        // read or written; the caller vouches for the operands' sizes, alignment checked above
        // (head offsets are multiples of d, itself a multiple of 8 halves).
        unsafe { launch(stream, func, cfg, &args) }
    }

    /// x [rows, cols] = softmax(x) along each row, in place.
    ///
    /// # Safety
    /// x must hold rows*cols elements.
    pub unsafe fn softmax(
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

//! 3x3 convolutions to 8 (padded) output channels on the tensor cores' smallest shape (the
//! VAE's conv_out to RGB and the UNet's to its latents), where a library convolution computes
//! mostly channel padding. The engine build times it against the library path per convolution
//! kind and batch (`ThinConvs`): on an H100 it lost at one image and won at 16.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::elementwise::aligned16;
use super::{launch, shape_err, Arg, Ptr};
use crate::conv::ConvShape;
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/mma.cuh"),
    include_str!("../../kernels/conv_out.cu")
);

/// Warps per block (`__launch_bounds__(128)`); each takes 16 pixels of one or two rows.
const WARPS: usize = 4;
const TILE_PIXELS: usize = 16;
/// Output rows a warp may take (`forward`'s `rows`).
pub const TILE_ROWS: [usize; 2] = [1, 2];

/// Whether the kernel computes convolution `s`: 3x3, stride 1, padding 1, one group,
/// channels-last, eight (padded) outputs, input channels a multiple of 32.
pub fn fits(s: &ConvShape) -> bool {
    s.same_3x3()
        && s.o == 8
        && s.c > 0
        && s.c.is_multiple_of(32)
        && tiles(s, 1) <= i32::MAX as usize
        && s.h * s.w * s.c <= i32::MAX as usize
}

fn tiles(s: &ConvShape, rows: usize) -> usize {
    s.n * s.h.div_ceil(rows) * s.w.div_ceil(TILE_PIXELS)
}

/// Output rows and pixels of a row a block of the normed kernel takes (`NO_ROWS`, `NO_PIX`).
const NORMED_ROWS: usize = 6;
const NORMED_PIXELS: usize = 64;

/// Whether the normed kernel computes convolution `s` of a `groups`-group norm's output: as
/// `fits`, in whole groups; and whether it pays: a block's 4 warps each take 16 pixels of a
/// row, so an image narrower than NORMED_PIXELS leaves warps idle (the UNet's 32x32 conv_out
/// at 24 images took 0.085 ms this way, against 0.02 for the norm's pass and 0.022 for the
/// convolution; H100, 2026-12-07).
pub fn fits_normed(s: &ConvShape, groups: usize) -> bool {
    fits(s)
        && s.w >= NORMED_PIXELS
        && groups > 0
        && s.c.is_multiple_of(groups)
        && s.n <= u16::MAX as usize
        && s.h.div_ceil(NORMED_ROWS) <= u16::MAX as usize
}

/// Blocks the normed kernel's grid needs before it pays: a block stages and multiplies its
/// channel chunks one after another, so a grid of a block or so per SM leaves it waiting on
/// loads. At one 256x256 image (172 blocks) it took 0.040 ms where the convolution took 0.024
/// after the norm's pass of 0.020 (of which the statistics it still needs are 0.009); at 24
/// images (4128 blocks) 0.40 ms against 0.39 after a pass of 0.29 (H100, 2026-12-07).
const NORMED_MIN_BLOCKS: usize = 512;

/// Whether the normed kernel's grid for `s` is large enough to pay (`NORMED_MIN_BLOCKS`).
pub fn normed_pays(s: &ConvShape) -> bool {
    s.n * s.h.div_ceil(NORMED_ROWS) * s.w.div_ceil(NORMED_PIXELS) >= NORMED_MIN_BLOCKS
}

/// What the normed kernel needs of the group norm whose output it convolves: the norm's input,
/// its statistics (`GroupNorm::launch_stats`), gamma and beta, groups and whether SiLU follows.
#[derive(Clone, Copy, Debug)]
pub struct NormIn {
    pub x: Ptr,
    pub stats: Ptr,
    pub gamma: Ptr,
    pub beta: Ptr,
    pub groups: usize,
    pub silu: bool,
}

/// The compiled kernels.
pub struct ConvOut {
    func: CudaFunction,
    normed: CudaFunction,
}

impl ConvOut {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "conv_out", SRC)?;
        Ok(ConvOut {
            func: m.load_function("conv3x3_out8_nhwc_f16")?,
            normed: m.load_function("conv3x3_out8_normed_nhwc_f16")?,
        })
    }

    /// y [n, h, w, 8] = conv3x3(x [n, h, w, c], w [8, 3, 3, c]) + bias [8] (`bias` may be 0),
    /// each warp taking `rows` (one of TILE_ROWS) output rows.
    ///
    /// # Safety
    /// x, w, bias and y must hold those shapes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &self,
        stream: &CudaStream,
        s: &ConvShape,
        x: Ptr,
        w: Ptr,
        bias: Ptr,
        y: Ptr,
        rows: usize,
    ) -> Result<(), GpuError> {
        if !fits(s) || !aligned16(&[x, w]) || !y.is_multiple_of(4) || !TILE_ROWS.contains(&rows) {
            return Err(shape_err(
                "conv3x3_out8",
                format!(
                    "{s:?}, {rows} rows a warp (x {x:#x} and w 16-byte aligned, y {y:#x} 4-byte)"
                ),
            ));
        }
        let tiles = tiles(s, rows);
        let cfg = LaunchConfig {
            grid_dim: (tiles.div_ceil(WARPS) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(x),
            Arg::P(w),
            Arg::P(bias),
            Arg::P(y),
            Arg::I(tiles as i32),
            Arg::I(s.h as i32),
            Arg::I(s.w as i32),
            Arg::I(s.c as i32),
            Arg::I(rows as i32),
        ];
        // SAFETY: matches conv3x3_out8_nhwc_f16 (3 const half*, half*, 5 int); one warp per 16
        // pixels of `rows` rows of one image, warps past `tiles` return, rows past the image's
        // end and pixels past the row's end are neither read nor written; c is a multiple of 32, so every lane runs the same MMA steps (`fits`,
        // checked); x and w are read as aligned 16-byte vectors, y written as half2 (checked);
        // the caller vouches for the sizes.
        unsafe { launch(stream, &self.func, cfg, &args) }
    }

    /// y [n, h, w, 8] = conv3x3(silu?(groupnorm(norm.x)) [n, h, w, c], w [8, 3, 3, c]) + bias
    /// (`bias` may be 0): the convolution of a group norm's output read from the norm's input,
    /// which is normalised on its way into shared memory (the norm's output is never written).
    ///
    /// # Safety
    /// norm.x, w, bias and y must hold those shapes; norm.stats n * groups (mean, 1/std) float2s
    /// as `GroupNorm::launch_stats` leaves them, gamma and beta c halves.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_normed(
        &self,
        stream: &CudaStream,
        s: &ConvShape,
        norm: &NormIn,
        w: Ptr,
        bias: Ptr,
        y: Ptr,
    ) -> Result<(), GpuError> {
        if !fits_normed(s, norm.groups)
            || !aligned16(&[norm.x, norm.gamma, norm.beta])
            || !norm.stats.is_multiple_of(8)
            || ![w, y].iter().all(|p| p.is_multiple_of(4))
        {
            return Err(shape_err(
                "conv3x3_out8_normed",
                format!(
                    "{s:?} of a {}-group norm (x, gamma and beta {:#x}, {:#x}, {:#x} 16-byte aligned, stats {:#x} 8-byte, w {w:#x} and y {y:#x} 4-byte)",
                    norm.groups, norm.x, norm.gamma, norm.beta, norm.stats
                ),
            ));
        }
        let cfg = LaunchConfig {
            grid_dim: (
                s.w.div_ceil(NORMED_PIXELS) as u32,
                s.h.div_ceil(NORMED_ROWS) as u32,
                s.n as u32,
            ),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(norm.x),
            Arg::P(norm.stats),
            Arg::P(norm.gamma),
            Arg::P(norm.beta),
            Arg::P(w),
            Arg::P(bias),
            Arg::P(y),
            Arg::I(s.h as i32),
            Arg::I(s.w as i32),
            Arg::I(s.c as i32),
            Arg::I(norm.groups as i32),
            Arg::I(i32::from(norm.silu)),
        ];
        // SAFETY: matches conv3x3_out8_normed_nhwc_f16 (const half*, const float2*, 4 const
        // half*, half*, 5 int); one block per NORMED_ROWS x NORMED_PIXELS outputs of one image,
        // reads and writes past the image's rows and pixels skipped; c is a multiple of 32 (one
        // staged chunk of 32 channels a step) in whole groups (`fits_normed`, checked); x,
        // gamma and beta read as aligned 16-byte vectors, stats as float2, w and y as 4-byte
        // pairs (checked); the caller vouches for the sizes.
        unsafe { launch(stream, &self.normed, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, c: usize, hw: usize, o: usize) -> ConvShape {
        ConvShape::same_3x3_square(n, c, hw, o)
    }

    #[test]
    fn the_models_output_convolutions_fit_and_others_do_not() {
        // The VAE's conv_out (128 -> 3, padded to 8) and the UNet's (320 -> 4).
        assert!(fits(&shape(16, 128, 256, 8)));
        assert!(fits(&shape(1, 320, 32, 8)));
        // Wider outputs, channel counts the lanes cannot split evenly, other geometry.
        assert!(!fits(&shape(1, 128, 256, 16)));
        assert!(!fits(&shape(1, 48, 64, 8)));
        assert!(!fits(&shape(1, 8, 64, 8)));
        let mut strided = shape(1, 128, 64, 8);
        strided.stride = [2, 2];
        assert!(!fits(&strided));
        let mut nchw = shape(1, 128, 64, 8);
        nchw.nhwc = false;
        assert!(!fits(&nchw));
        // The normed kernel: the VAE's; not the UNet's 32x32 (too narrow for a block's warps),
        // nor groups that split channels unevenly.
        assert!(fits_normed(&shape(24, 128, 256, 8), 32));
        assert!(fits_normed(&shape(2, 640, 64, 8), 32));
        assert!(!fits_normed(&shape(24, 320, 32, 8), 32));
        assert!(!fits_normed(&shape(1, 128, 64, 8), 48));
        assert!(!fits_normed(&shape(1, 128, 64, 16), 32));
        // It pays from three 256x256 images on (172 blocks an image).
        assert!(!normed_pays(&shape(2, 128, 256, 8)));
        assert!(normed_pays(&shape(3, 128, 256, 8)));
        assert!(normed_pays(&shape(24, 128, 256, 8)));
        // 16 pixels of one or two rows a warp: a 33 x 33 image is 33 rows, or 17 row pairs (the
        // last one row), of three tiles.
        assert_eq!(tiles(&shape(2, 128, 33, 8), 1), 2 * 33 * 3);
        assert_eq!(tiles(&shape(2, 128, 33, 8), 2), 2 * 17 * 3);
    }
}

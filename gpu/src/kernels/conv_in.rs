//! 3x3 convolutions from at most three input channels (the VAE encoder's conv_in on RGB) on the
//! tensor cores, each pixel's whole window one 32-slot row of an im2col matrix held in
//! registers. A library convolution pads such thin inputs and ran at about four times the time
//! its output write needs on an H100. The engine build times it against the library path per
//! convolution kind and batch (`ThinConvs`), as it does the thin-output kernel (`conv_out`),
//! the epilogue kernel's group-norm sums after it counted on both sides. The op sweep
//! (`thin_convolutions_match`) checks it on the GPU, also in front of a group norm. On an H100 it
//! loses to cuDNN at the VAE encoder's conv_in (0.99 against 0.73 ms for 32 crops, 0.069 against
//! 0.048 for 2; bench/results/2026-12-06_h100_pad_conv), so engines built there do not take it.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{launch, shape_err, Arg, Ptr};
use crate::conv::ConvShape;
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/mma.cuh"),
    include_str!("../../kernels/conv_in.cu")
);

/// Warps per block (`__launch_bounds__(128)`); each takes 16 pixels of a row at a time.
const WARPS: usize = 4;
const TILE_PIXELS: usize = 16;
/// Shared-memory halves per output channel: the padded filter row (`CONV_IN_KS`) and the bias.
const SMEM_HALVES_PER_OUTPUT: usize = 40 + 1;
/// Most outputs: the filter and bias stay within the default 48 KiB of shared memory.
const MAX_OUTPUTS: usize = 512;
/// Blocks launched at most; each loops over its share of the tiles, so the filter is loaded
/// into shared memory once per block, not once per 64 pixels.
const MAX_BLOCKS: usize = 4096;

/// Whether the kernel computes convolution `s`: 3x3, stride 1, padding 1, one group,
/// channels-last, 1 to 3 input channels, outputs a multiple of 8 up to MAX_OUTPUTS.
pub fn fits(s: &ConvShape) -> bool {
    s.same_3x3()
        && (1..=3).contains(&s.c)
        && s.o > 0
        && s.o.is_multiple_of(8)
        && s.o <= MAX_OUTPUTS
        && tiles(s) <= i32::MAX as usize
}

fn tiles(s: &ConvShape) -> usize {
    s.n * s.h * s.w.div_ceil(TILE_PIXELS)
}

/// The compiled kernel.
pub struct ConvIn {
    func: CudaFunction,
}

impl ConvIn {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "conv_in", SRC)?;
        Ok(ConvIn {
            func: m.load_function("conv3x3_in_nhwc_f16")?,
        })
    }

    /// y [n, h, w, o] = conv3x3(x [n, h, w, c], w [o, 3, 3, c]) + bias [o] (`bias` may be 0).
    ///
    /// # Safety
    /// x, w, bias and y must hold those shapes.
    pub unsafe fn forward(
        &self,
        stream: &CudaStream,
        s: &ConvShape,
        x: Ptr,
        w: Ptr,
        bias: Ptr,
        y: Ptr,
    ) -> Result<(), GpuError> {
        if !fits(s) || !y.is_multiple_of(4) {
            return Err(shape_err(
                "conv3x3_in",
                format!("{s:?} (y {y:#x} 4-byte aligned)"),
            ));
        }
        let tiles = tiles(s);
        let cfg = LaunchConfig {
            grid_dim: (tiles.div_ceil(WARPS).min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: (2 * SMEM_HALVES_PER_OUTPUT * s.o) as u32,
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
            Arg::I(s.o as i32),
        ];
        // SAFETY: matches conv3x3_in_nhwc_f16 (3 const half*, half*, 5 int); the dynamic shared
        // memory holds the padded filter and the bias of `o` outputs (at most 41 KiB for
        // MAX_OUTPUTS); every warp loops over whole 16-pixel tiles below `tiles`, reads only
        // window taps inside the image and writes only pixels inside the row; y is written as
        // aligned half2 (o even, y 4-byte aligned, checked); the caller vouches for the sizes.
        unsafe { launch(stream, &self.func, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, c: usize, hw: usize, o: usize) -> ConvShape {
        ConvShape::same_3x3_square(n, c, hw, o)
    }

    #[test]
    fn the_encoders_input_convolution_fits_and_others_do_not() {
        // The VAE encoder's conv_in (RGB -> 128) at any batch.
        assert!(fits(&shape(32, 3, 256, 128)));
        assert!(fits(&shape(1, 1, 16, 8)));
        // Four or more input channels, outputs not in whole 8-channel tiles or too many.
        assert!(!fits(&shape(1, 4, 64, 128)));
        assert!(!fits(&shape(1, 3, 64, 12)));
        assert!(!fits(&shape(1, 3, 64, 1024)));
        let mut strided = shape(1, 3, 64, 128);
        strided.stride = [2, 2];
        assert!(!fits(&strided));
        let mut nchw = shape(1, 3, 64, 128);
        nchw.nhwc = false;
        assert!(!fits(&nchw));
        // 16 pixels a warp: a 33-wide row is three tiles.
        assert_eq!(tiles(&shape(2, 3, 33, 8)), 2 * 33 * 3);
    }
}

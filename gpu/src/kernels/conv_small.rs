//! 3x3 convolutions with only a few input or output channels (the VAE's conv_in from RGB and
//! conv_out to RGB) on the CUDA cores, where a library convolution spends most of its work on
//! channel padding. The executor takes these for every convolution `SmallConv::of` accepts.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::elementwise::{aligned16, Elementwise};
use super::{launch, shape_err, vector_grid, Arg, Ptr, VECTOR_BLOCKS};
use crate::conv::ConvShape;
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/group_sums.cuh"),
    include_str!("../../kernels/conv_small.cu")
);

/// Filter values the few-input kernel holds in shared memory (`FEW_IN_MAX_WEIGHTS`).
const FEW_IN_MAX_WEIGHTS: usize = 6144;
/// Filter values the few-output kernel holds in shared memory (`FEW_OUT_MAX_WEIGHTS`).
const FEW_OUT_MAX_WEIGHTS: usize = 9216;
/// Threads per block of the few-output kernel.
const FEW_OUT_THREADS: u32 = 256;
/// Pixels of a row one lane group of the few-output kernel takes (`FEW_OUT_PIXELS`).
const FEW_OUT_PIXELS: usize = 8;

/// Which small-channel kernel runs a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmallConv {
    /// Three input channels (RGB), outputs in whole 8-channel vectors.
    FewIn,
    /// Eight stored output channels, of which the first `real` have non-zero filters.
    FewOut { real: usize },
}

impl SmallConv {
    /// The kernel for convolution `s` (its filter's first `real_out` rows non-zero, its bias
    /// one per channel or none, no residual), if one fits; `stats`: the group norm reading the
    /// output wants its sums (only the few-input kernel writes them).
    pub fn of(s: &ConvShape, real_out: usize, stats: bool) -> Option<SmallConv> {
        let three = s.nhwc
            && s.groups == 1
            && s.kh == 3
            && s.kw == 3
            && s.stride == [1, 1]
            && s.pad == [1, 1]
            && s.n * s.h * s.w <= i32::MAX as usize / s.o.max(8);
        if !three {
            return None;
        }
        if s.c == 3 && s.o.is_multiple_of(8) && 9 * s.c * s.o <= FEW_IN_MAX_WEIGHTS {
            return Some(SmallConv::FewIn);
        }
        let c8 = s.c / 8;
        let lanes_fit = c8.is_power_of_two() && c8 <= 32 || c8.is_multiple_of(32);
        let out = if real_out <= 4 { 4 } else { 8 };
        (s.o == 8
            && real_out <= 8
            && !stats
            && s.c.is_multiple_of(8)
            && c8 > 0
            && lanes_fit
            && out * 9 * s.c <= FEW_OUT_MAX_WEIGHTS)
            .then_some(SmallConv::FewOut { real: real_out })
    }
}

/// The compiled kernels.
pub struct ConvSmall {
    few_in: CudaFunction,
    few_out4: CudaFunction,
    few_out8: CudaFunction,
}

impl ConvSmall {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "conv_small", SRC)?;
        Ok(ConvSmall {
            few_in: m.load_function("conv3x3_few_in_nhwc_f16x8")?,
            few_out4: m.load_function("conv3x3_few_out4_nhwc_f16")?,
            few_out8: m.load_function("conv3x3_few_out8_nhwc_f16")?,
        })
    }

    /// y [n, h, w, o] = conv3x3(x [n, h, w, c], w [o, 3, 3, c]) + bias [o] (`bias` may be 0) as
    /// `kind` says (`SmallConv::of(s, ..)`); with `stats` = (partial, groups) the few-input
    /// kernel also writes the group norm's sums as the convolution epilogue does
    /// (`Elementwise::epilogue_blocks(h * w * o, o, n)` pairs per image and group).
    ///
    /// # Safety
    /// x, w, bias, y and partial must hold those shapes.
    pub unsafe fn forward(
        &self,
        stream: &CudaStream,
        kind: SmallConv,
        s: &ConvShape,
        x: Ptr,
        w: Ptr,
        bias: Ptr,
        y: Ptr,
        stats: Option<(Ptr, usize)>,
    ) -> Result<(), GpuError> {
        let real = match kind {
            SmallConv::FewOut { real } => real,
            SmallConv::FewIn => s.o,
        };
        if SmallConv::of(s, real, stats.is_some()) != Some(kind) {
            return Err(shape_err(
                "conv3x3_small",
                format!("{kind:?} does not take {s:?}"),
            ));
        }
        let (h, wd) = (s.h as i32, s.w as i32);
        match kind {
            SmallConv::FewIn => {
                let image8 = s.h * s.w * s.o / 8;
                let (threads, per_block, blocks) = vector_grid(image8, s.o / 8, s.n);
                let cfg = LaunchConfig {
                    grid_dim: (blocks as u32, s.n as u32, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (partial, groups) = stats.unwrap_or((0, 0));
                if stats.is_some()
                    && (!Elementwise::epilogue_stats_fit(s.o, groups) || partial % 8 != 0)
                {
                    return Err(shape_err(
                        "conv3x3_few_in",
                        format!("sums of {} channels in {groups} groups", s.o),
                    ));
                }
                if !aligned16(&[y]) {
                    return Err(shape_err(
                        "conv3x3_few_in",
                        "y is not 16-byte aligned".into(),
                    ));
                }
                let args = [
                    Arg::P(x),
                    Arg::P(w),
                    Arg::P(bias),
                    Arg::P(y),
                    Arg::I(h),
                    Arg::I(wd),
                    Arg::I(s.o as i32),
                    Arg::P(partial),
                    Arg::I(groups as i32),
                    Arg::I(per_block as i32),
                ];
                // SAFETY: matches conv3x3_few_in_nhwc_f16x8 (3 const pointers, uint4*, 3 int,
                // float2*, 2 int); x has 3 channels, the filter fits its shared array and the output is whole
                // aligned vectors (`SmallConv::of`, checked above); threads and per_block are
                // multiples of o / 8 (vector_grid); grid y covers the n images; partial holds
                // the epilogue's sums (the caller's contract) for groups the kernel's shared
                // arrays hold (checked).
                unsafe { launch(stream, &self.few_in, cfg, &args) }
            }
            SmallConv::FewOut { real } => {
                if !aligned16(&[x, y]) {
                    return Err(shape_err(
                        "conv3x3_few_out",
                        "x or y is not 16-byte aligned".into(),
                    ));
                }
                let strips = s.n * s.h * s.w.div_ceil(FEW_OUT_PIXELS);
                let lanes = (s.c / 8).min(32);
                let per_block = FEW_OUT_THREADS as usize / lanes;
                let blocks = strips.div_ceil(per_block).clamp(1, VECTOR_BLOCKS);
                let cfg = LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (FEW_OUT_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let args = [
                    Arg::P(x),
                    Arg::P(w),
                    Arg::P(bias),
                    Arg::P(y),
                    Arg::I(s.n as i32),
                    Arg::I(h),
                    Arg::I(wd),
                    Arg::I(s.c as i32),
                ];
                let f = if real <= 4 {
                    &self.few_out4
                } else {
                    &self.few_out8
                };
                // SAFETY: matches conv3x3_few_out{4,8}_nhwc_f16 (const uint4*, const half*,
                // const half*, uint4*, 4 int); c / 8 lanes a pixel divide the warp or are
                // whole warps and the filter's first 4 or 8 rows fit the shared array
                // (`SmallConv::of`, checked above); x and y aligned (checked); the filter's
                // rows beyond `real` are zero (the caller's contract), so computing 4 or 8
                // of them is exact.
                unsafe { launch(stream, f, cfg, &args) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, c: usize, hw: usize, o: usize) -> ConvShape {
        ConvShape {
            n,
            c,
            h: hw,
            w: hw,
            o,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad: [1, 1],
            groups: 1,
            nhwc: true,
        }
    }

    #[test]
    fn the_vae_ends_take_the_small_kernels_and_wide_convolutions_do_not() {
        // conv_in from RGB (with the norm's sums), conv_out to RGB (8 stored, 3 real).
        assert_eq!(
            SmallConv::of(&shape(32, 3, 256, 128), 128, true),
            Some(SmallConv::FewIn)
        );
        assert_eq!(
            SmallConv::of(&shape(16, 128, 256, 8), 3, false),
            Some(SmallConv::FewOut { real: 3 })
        );
        // The few-output kernel writes no sums; filters too large for shared memory; the
        // UNet's conv_in (8 -> 320) and conv_out (320 -> 4); wide ones; other geometry.
        assert_eq!(SmallConv::of(&shape(16, 128, 256, 8), 3, true), None);
        assert_eq!(SmallConv::of(&shape(1, 8, 32, 320), 320, false), None);
        assert_eq!(SmallConv::of(&shape(1, 320, 32, 8), 4, false), None);
        assert_eq!(SmallConv::of(&shape(1, 512, 32, 8), 8, false), None);
        assert_eq!(SmallConv::of(&shape(1, 128, 64, 128), 128, false), None);
        let mut strided = shape(1, 3, 64, 128);
        strided.stride = [2, 2];
        assert_eq!(SmallConv::of(&strided, 128, false), None);
        let mut nchw = shape(1, 128, 64, 8);
        nchw.nhwc = false;
        assert_eq!(SmallConv::of(&nchw, 3, false), None);
        // 48 input channels: six vectors a pixel do not split a warp evenly.
        assert_eq!(SmallConv::of(&shape(1, 48, 64, 8), 3, false), None);
        // Only RGB in: the few-input kernel is written for three channels.
        assert_eq!(SmallConv::of(&shape(1, 4, 64, 128), 128, false), None);
    }
}

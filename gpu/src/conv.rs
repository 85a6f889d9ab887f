//! Convolutions through cuDNN: NCHW fp16 tensors, fp32 accumulation, tensor-core math, the
//! algorithm from cuDNN's heuristics (engine builds will time candidates instead).

use std::sync::Arc;

use cudarc::cudnn::{sys, ConvForward, Cudnn};
use cudarc::driver::{CudaSlice, CudaStream};
use half::f16;

use crate::error::GpuError;

/// One convolution's shape.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    /// Symmetric padding (height, width); asymmetric padding is a separate pad step.
    pub pad: [usize; 2],
    pub groups: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad[0] - self.kh) / self.stride[0] + 1,
            (self.w + 2 * self.pad[1] - self.kw) / self.stride[1] + 1,
        )
    }
}

/// A cuDNN handle bound to one stream.
pub struct Conv {
    cudnn: Arc<Cudnn>,
    stream: Arc<CudaStream>,
}

fn cudnn_err(e: cudarc::cudnn::result::CudnnError) -> GpuError {
    GpuError::Cudnn(format!("{e:?}"))
}

impl Conv {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        if !crate::device::libraries().cudnn {
            return Err(GpuError::LibraryMissing {
                name: "libcudnn.so.9 (cuDNN 9)",
            });
        }
        let cudnn = Cudnn::new(stream.clone()).map_err(cudnn_err)?;
        Ok(Conv { cudnn, stream })
    }

    /// y = conv(x, w) (bias is added by the caller's fused elementwise step).
    pub fn forward(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        s: ConvShape,
    ) -> Result<(), GpuError> {
        let (ho, wo) = s.out_hw();
        let bad = |reason: String| GpuError::Shape {
            kernel: "conv2d",
            reason,
        };
        if s.groups == 0 || !s.c.is_multiple_of(s.groups) || !s.o.is_multiple_of(s.groups) {
            return Err(bad(format!(
                "{} -> {} channels in {} groups",
                s.c, s.o, s.groups
            )));
        }
        if x.len() != s.n * s.c * s.h * s.w
            || w.len() != s.o * (s.c / s.groups) * s.kh * s.kw
            || y.len() != s.n * s.o * ho * wo
        {
            return Err(bad(format!("buffers do not match {s:?}")));
        }
        let i = |v: usize| v as std::ffi::c_int;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let xd = self
            .cudnn
            .create_4d_tensor::<f16>(nchw, [i(s.n), i(s.c), i(s.h), i(s.w)])
            .map_err(cudnn_err)?;
        let wd = self
            .cudnn
            .create_4d_filter::<f16>(nchw, [i(s.o), i(s.c / s.groups), i(s.kh), i(s.kw)])
            .map_err(cudnn_err)?;
        let yd = self
            .cudnn
            .create_4d_tensor::<f16>(nchw, [i(s.n), i(s.o), i(ho), i(wo)])
            .map_err(cudnn_err)?;
        // fp32 compute over fp16 data (cuDNN's pseudo-half configuration).
        let mut cd = self
            .cudnn
            .create_conv2d::<f32>(
                [i(s.pad[0]), i(s.pad[1])],
                [i(s.stride[0]), i(s.stride[1])],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cudnn_err)?;
        cd.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
            .map_err(cudnn_err)?;
        cd.set_group_count(i(s.groups)).map_err(cudnn_err)?;
        let op = ConvForward {
            conv: &cd,
            x: &xd,
            w: &wd,
            y: &yd,
        };
        let algo = op.pick_algorithm().map_err(cudnn_err)?;
        let bytes = op.get_workspace_size(algo).map_err(cudnn_err)?;
        let mut workspace = self.stream.alloc_zeros::<u8>(bytes.max(1))?;
        // SAFETY: the descriptors describe exactly the buffers checked above (NCHW fp16 x, y and
        // filter), and the workspace holds the bytes cuDNN asked for this algorithm.
        unsafe { op.launch(algo, Some(&mut workspace), (f16::ONE, f16::ZERO), x, w, y) }
            .map_err(cudnn_err)
    }
}

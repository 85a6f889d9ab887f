//! Convolutions through cuDNN: fp16 tensors (NHWC for images, NCHW for whisper's 1-d convs seen
//! as 1-row images), fp32 accumulation, tensor-core math. A `ConvPlan` holds the descriptors and
//! the algorithm, chosen by timing every candidate on the real buffers at engine build
//! (`tune`) or by cuDNN's heuristics when not tuned.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;

use crate::error::GpuError;
use crate::kernels::Ptr;

/// One convolution's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConvShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    /// Padding before the image (top, left), and as much after it plus `pad_end`.
    pub pad: [usize; 2],
    pub groups: usize,
    /// Channels-last activations and a [o, kh, kw, c] filter; otherwise NCHW and [o, c, kh, kw].
    pub nhwc: bool,
    /// Padding after the image (bottom, right) beyond `pad`: the VAE encoder's downsampling
    /// convolutions pad (0, 1) per axis. The legacy cuDNN call pads symmetrically only, so steps
    /// carry such padding as a pad step; only a graph-API convolution that absorbs that step
    /// (`Executor`) has a shape with `pad_end`. Engine files from before it have none.
    #[serde(default)]
    pub pad_end: [usize; 2],
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad[0] + self.pad_end[0] - self.kh) / self.stride[0] + 1,
            (self.w + 2 * self.pad[1] + self.pad_end[1] - self.kw) / self.stride[1] + 1,
        )
    }

    /// "n x c x h x w -> o kKxK sS", and the padding when it is asymmetric, for reports.
    pub fn label(&self) -> String {
        let mut l = format!(
            "{}x{}x{}x{} -> {} k{}x{} s{}",
            self.n, self.c, self.h, self.w, self.o, self.kh, self.kw, self.stride[0]
        );
        if self.pad_end != [0, 0] {
            l += &format!(" pad {:?}/{:?}", self.pad, self.post_pad());
        }
        l
    }

    /// Padding after the image (bottom, right).
    pub fn post_pad(&self) -> [usize; 2] {
        [self.pad[0] + self.pad_end[0], self.pad[1] + self.pad_end[1]]
    }

    /// A channels-last 3x3 convolution, stride 1, padding 1, one group: the shape our
    /// thin-convolution kernels (`kernels::conv_in`, `kernels::conv_out`) take.
    pub fn same_3x3(&self) -> bool {
        self.nhwc
            && self.groups == 1
            && (self.kh, self.kw) == (3, 3)
            && self.stride == [1, 1]
            && self.pad == [1, 1]
            && self.pad_end == [0, 0]
    }

    /// Such a convolution of n square hw x hw images, c channels to o.
    pub fn same_3x3_square(n: usize, c: usize, hw: usize, o: usize) -> ConvShape {
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
            pad_end: [0, 0],
        }
    }
}

fn cudnn_err(e: result::CudnnError) -> GpuError {
    GpuError::Cudnn(format!("{e:?}"))
}

/// A cuDNN handle bound to one stream.
pub struct Conv {
    handle: sys::cudnnHandle_t,
    _stream: Arc<CudaStream>,
}

/// One convolution's descriptors and algorithm.
pub struct ConvPlan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    pub algo: sys::cudnnConvolutionFwdAlgo_t,
    /// The math type the algorithm was chosen with.
    pub math: sys::cudnnMathType_t,
    /// Workspace the algorithm needs.
    pub workspace_bytes: usize,
    pub shape: ConvShape,
    /// Set when the bias (and residual) ride on cuDNN's fused call instead of an epilogue kernel.
    pub fused: Option<FusedCall>,
    /// Set when the convolution runs through the graph API's timed engine instead (`conv_graph`);
    /// it takes precedence over `fused`.
    pub graph: Option<crate::conv_graph::GraphCall>,
}

/// cuDNN's y = conv(x, w) + z + bias in one call (`cudnnConvolutionBiasActivationForward` with
/// the identity activation): its own algorithm, as only some algorithms take the fused epilogue.
pub struct FusedCall {
    bias: sys::cudnnTensorDescriptor_t,
    act: sys::cudnnActivationDescriptor_t,
    pub algo: sys::cudnnConvolutionFwdAlgo_t,
    pub math: sys::cudnnMathType_t,
    pub workspace_bytes: usize,
}

// SAFETY: as for ConvPlan.
unsafe impl Send for FusedCall {}

impl Drop for FusedCall {
    fn drop(&mut self) {
        // SAFETY: created in `Conv::fused`, destroyed once here; teardown errors are ignored.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.bias);
            let _ = sys::cudnnDestroyActivationDescriptor(self.act);
        }
    }
}

// SAFETY: cuDNN handles and descriptors are used from the executor's one thread at a time.
unsafe impl Send for Conv {}
// SAFETY: as above.
unsafe impl Send for ConvPlan {}

impl Conv {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        if !crate::device::libraries().cudnn {
            return Err(GpuError::LibraryMissing {
                name: "libcudnn.so.9 (cuDNN 9)",
            });
        }
        let handle = result::create_handle().map_err(cudnn_err)?;
        // SAFETY: the handle was just created; the stream outlives it (held in `_stream`).
        unsafe { result::set_stream(handle, stream.cu_stream() as *mut _) }.map_err(cudnn_err)?;
        Ok(Conv {
            handle,
            _stream: stream,
        })
    }

    /// The raw handle, for the graph API's calls (`conv_graph`), on this handle's stream.
    pub fn handle(&self) -> sys::cudnnHandle_t {
        self.handle
    }

    /// Descriptors for `s`, with cuDNN's heuristic algorithm.
    pub fn plan(&self, s: ConvShape) -> Result<ConvPlan, GpuError> {
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
        if s.pad_end != [0, 0] {
            return Err(bad(format!(
                "padding {:?} before and {:?} after: the legacy call pads symmetrically",
                s.pad,
                s.post_pad()
            )));
        }
        let (ho, wo) = s.out_hw();
        let i = |v: usize| v as c_int;
        let format = if s.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let half = sys::cudnnDataType_t::CUDNN_DATA_HALF;
        let mut plan = ConvPlan {
            x: result::create_tensor_descriptor().map_err(cudnn_err)?,
            w: result::create_filter_descriptor().map_err(cudnn_err)?,
            y: result::create_tensor_descriptor().map_err(cudnn_err)?,
            conv: result::create_convolution_descriptor().map_err(cudnn_err)?,
            algo: sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            math: sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            workspace_bytes: 0,
            shape: s,
            fused: None,
            graph: None,
        };
        // SAFETY: every descriptor was created above and is owned by `plan` (destroyed on drop).
        unsafe {
            result::set_tensor4d_descriptor(plan.x, format, half, [i(s.n), i(s.c), i(s.h), i(s.w)])
                .map_err(cudnn_err)?;
            result::set_filter4d_descriptor(
                plan.w,
                half,
                format,
                [i(s.o), i(s.c / s.groups), i(s.kh), i(s.kw)],
            )
            .map_err(cudnn_err)?;
            result::set_tensor4d_descriptor(plan.y, format, half, [i(s.n), i(s.o), i(ho), i(wo)])
                .map_err(cudnn_err)?;
            // fp32 compute over fp16 data (cuDNN's pseudo-half configuration).
            result::set_convolution2d_descriptor(
                plan.conv,
                i(s.pad[0]),
                i(s.pad[1]),
                i(s.stride[0]),
                i(s.stride[1]),
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(cudnn_err)?;
            result::set_convolution_math_type(
                plan.conv,
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            )
            .map_err(cudnn_err)?;
            result::set_convolution_group_count(plan.conv, i(s.groups)).map_err(cudnn_err)?;
            let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
            let mut count: c_int = 0;
            result::get_convolution_forward_algorithm(
                self.handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                perf.len() as c_int,
                &mut count,
                perf.as_mut_ptr(),
            )
            .map_err(cudnn_err)?;
            let best = perf[..count.max(0) as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .ok_or_else(|| bad(format!("cuDNN offers no algorithm for {s:?}")))?;
            plan.algo = best.algo;
            // The algorithm's numbers hold for the math type cuDNN found it with.
            result::set_convolution_math_type(plan.conv, best.mathType).map_err(cudnn_err)?;
            plan.math = best.mathType;
            plan.workspace_bytes = result::get_convolution_forward_workspace_size(
                self.handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                plan.algo,
            )
            .map_err(cudnn_err)?;
        }
        Ok(plan)
    }

    /// Times every algorithm on the real buffers and keeps the fastest that fits in
    /// `workspace_bytes`; returns its time in ms.
    ///
    /// # Safety
    /// x, w and y must hold the plan's shapes (y is overwritten), workspace `workspace_bytes`.
    pub unsafe fn tune(
        &self,
        plan: &mut ConvPlan,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        workspace: Ptr,
        workspace_bytes: usize,
    ) -> Result<f32, GpuError> {
        // SAFETY: descriptors are live; addresses per the caller's contract.
        unsafe {
            let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 10];
            let mut count: c_int = 0;
            // Twice, keeping the second ranking: CUDA loads kernels lazily, so in the first
            // search every algorithm whose kernels were not loaded yet pays for loading them
            // (measured on an H100: a 320-channel 32x32 conv tuned cold picked an algorithm
            // 13x slower than the warm choice).
            for _ in 0..2 {
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    self.handle,
                    plan.x,
                    x as *const c_void,
                    plan.w,
                    w as *const c_void,
                    plan.conv,
                    plan.y,
                    y as *mut c_void,
                    perf.len() as c_int,
                    &mut count,
                    perf.as_mut_ptr(),
                    workspace as *mut c_void,
                    workspace_bytes,
                )
                .result()
                .map_err(cudnn_err)?;
            }
            if let Some(best) = perf[..count.max(0) as usize].iter().find(|p| {
                p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= workspace_bytes
            }) {
                plan.algo = best.algo;
                plan.workspace_bytes = best.memory;
                // The time holds for the math type cuDNN measured it with.
                result::set_convolution_math_type(plan.conv, best.mathType).map_err(cudnn_err)?;
                plan.math = best.mathType;
                return Ok(best.time);
            }
        }
        Ok(f32::NAN)
    }

    /// Uses a known algorithm (from an earlier tuning of the same shape).
    pub fn set_algo(
        &self,
        plan: &mut ConvPlan,
        algo: sys::cudnnConvolutionFwdAlgo_t,
        math: sys::cudnnMathType_t,
        workspace_bytes: usize,
    ) -> Result<(), GpuError> {
        // SAFETY: the descriptor is live (owned by `plan`).
        unsafe { result::set_convolution_math_type(plan.conv, math) }.map_err(cudnn_err)?;
        plan.algo = algo;
        plan.math = math;
        plan.workspace_bytes = workspace_bytes;
        Ok(())
    }

    /// y = conv(x, w).
    ///
    /// # Safety
    /// x, w, y must hold the plan's shapes, the workspace `plan.workspace_bytes`.
    pub unsafe fn forward(
        &self,
        plan: &ConvPlan,
        x: Ptr,
        w: Ptr,
        y: Ptr,
        workspace: Ptr,
    ) -> Result<(), GpuError> {
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: per the caller's contract; alpha/beta are f32 as cuDNN wants for fp32 compute.
        unsafe {
            result::convolution_forward(
                self.handle,
                &alpha as *const f32 as *const c_void,
                plan.x,
                x as *const c_void,
                plan.w,
                w as *const c_void,
                plan.conv,
                plan.algo,
                workspace as *mut c_void,
                plan.workspace_bytes,
                &beta as *const f32 as *const c_void,
                plan.y,
                y as *mut c_void,
            )
        }
        .map_err(cudnn_err)
    }
}

impl Conv {
    /// Sets `plan` up for the fused bias (+ residual) call with `algo`, or `None` when this
    /// cuDNN has no workspace answer for it (the algorithm cannot take the shape). Whether the
    /// call itself runs is only known by trying it (`forward_fused`).
    pub fn fused(
        &self,
        plan: &ConvPlan,
        algo: sys::cudnnConvolutionFwdAlgo_t,
        math: sys::cudnnMathType_t,
    ) -> Result<Option<FusedCall>, GpuError> {
        let s = plan.shape;
        let format = if s.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let mut call = FusedCall {
            bias: result::create_tensor_descriptor().map_err(cudnn_err)?,
            act: result::create_activation_descriptor().map_err(cudnn_err)?,
            algo,
            math,
            workspace_bytes: 0,
        };
        // SAFETY: the descriptors were just created and are owned by `call` (destroyed on drop);
        // plan's descriptors are live.
        unsafe {
            result::set_tensor4d_descriptor(
                call.bias,
                format,
                sys::cudnnDataType_t::CUDNN_DATA_HALF,
                [1, s.o as c_int, 1, 1],
            )
            .map_err(cudnn_err)?;
            result::set_activation_descriptor(
                call.act,
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
                sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                0.0,
            )
            .map_err(cudnn_err)?;
            result::set_convolution_math_type(plan.conv, math).map_err(cudnn_err)?;
            let ws = result::get_convolution_forward_workspace_size(
                self.handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                algo,
            );
            // The plain algorithm's math type stays the descriptor's until a fused call is kept.
            result::set_convolution_math_type(plan.conv, plan.math).map_err(cudnn_err)?;
            match ws {
                Ok(bytes) => {
                    call.workspace_bytes = bytes;
                    Ok(Some(call))
                }
                Err(_) => Ok(None),
            }
        }
    }

    /// Keeps `call` for `plan`: its launches go through `forward_fused` from now on.
    pub fn keep_fused(&self, plan: &mut ConvPlan, call: FusedCall) -> Result<(), GpuError> {
        // SAFETY: the descriptor is live (owned by `plan`).
        unsafe { result::set_convolution_math_type(plan.conv, call.math) }.map_err(cudnn_err)?;
        plan.fused = Some(call);
        Ok(())
    }

    /// y = conv(x, w) + bias (+ residual) through `call` (the plan's descriptors with the
    /// call's algorithm); `residual` 0 for none.
    ///
    /// # Safety
    /// x, w, y, residual must hold the plan's shapes, bias `o` halves, the workspace
    /// `call.workspace_bytes`; the plan's math type must be the call's (`keep_fused`, or set by
    /// the caller while trying it).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_fused(
        &self,
        plan: &ConvPlan,
        call: &FusedCall,
        x: Ptr,
        w: Ptr,
        bias: Ptr,
        residual: Ptr,
        y: Ptr,
        workspace: Ptr,
    ) -> Result<(), GpuError> {
        let one = 1f32;
        // No residual: alpha2 0 and z = y, which cuDNN then does not read.
        let (alpha2, z) = if residual == 0 {
            (0f32, y)
        } else {
            (1f32, residual)
        };
        // SAFETY: per the caller's contract; alphas are f32 as cuDNN wants for fp32 compute.
        unsafe {
            sys::cudnnConvolutionBiasActivationForward(
                self.handle,
                &one as *const f32 as *const c_void,
                plan.x,
                x as *const c_void,
                plan.w,
                w as *const c_void,
                plan.conv,
                call.algo,
                workspace as *mut c_void,
                call.workspace_bytes,
                &alpha2 as *const f32 as *const c_void,
                plan.y,
                z as *const c_void,
                call.bias,
                bias as *const c_void,
                call.act,
                plan.y,
                y as *mut c_void,
            )
        }
        .result()
        .map_err(cudnn_err)
    }

    /// Sets the plan's math type (to try a fused call's algorithm before keeping it).
    pub fn set_math(&self, plan: &ConvPlan, math: sys::cudnnMathType_t) -> Result<(), GpuError> {
        // SAFETY: the descriptor is live (owned by `plan`).
        unsafe { result::set_convolution_math_type(plan.conv, math) }.map_err(cudnn_err)
    }
}

impl Drop for ConvPlan {
    fn drop(&mut self) {
        // SAFETY: created in `plan`, destroyed once here; teardown errors are ignored.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

impl Drop for Conv {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

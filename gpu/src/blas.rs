//! Matmuls through cuBLASLt: `nn.Linear` on fp16 rows with fp32 accumulation, the bias fused in
//! the epilogue and an optional residual fused as the C operand (D = x·wᵀ + bias + residual).
//!
//! A `LinearPlan` is made once per graph node (descriptors, bias address, algorithm), so a run
//! only calls `cublasLtMatmul`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::GpuError;
use crate::kernels::Ptr;

/// cuBLASLt's workspace: 32 MiB covers every algorithm it proposes for our shapes on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(e: cudarc::cublaslt::result::CublasError) -> GpuError {
    GpuError::Blas(format!("{e:?}"))
}

/// A cuBLASLt handle with its workspace, bound to one stream.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
}

/// One linear layer's prepared call.
pub struct LinearPlan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
    residual: bool,
    /// Rows, input features, output features.
    pub shape: [usize; 3],
}

// SAFETY: the handle and descriptors are plain cuBLASLt objects used from the executor's one
// thread at a time; nothing in them is tied to the creating thread.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Send for LinearPlan {}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        if !crate::device::libraries().cublaslt {
            return Err(GpuError::LibraryMissing {
                name: "libcublasLt.so (CUDA toolkit)",
            });
        }
        let handle = result::create_handle().map_err(blas_err)?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(Blas {
            handle,
            stream,
            workspace,
        })
    }

    /// Plans y [rows, n] = x [rows, k] · w [n, k]ᵀ (+ bias [n]) (+ residual [rows, n]).
    pub fn plan(
        &self,
        rows: usize,
        k: usize,
        n: usize,
        bias: Option<Ptr>,
        residual: bool,
    ) -> Result<LinearPlan, GpuError> {
        let f16 = sys::cudaDataType_t::CUDA_R_16F;
        // cuBLASLt is column-major: the row-major y [rows, n] is a column-major [n, rows] = w · xᵀ
        // with w read transposed from its column-major [k, n] view.
        let a =
            result::create_matrix_layout(f16, k as u64, n as u64, k as i64).map_err(blas_err)?;
        let b =
            result::create_matrix_layout(f16, k as u64, rows as u64, k as i64).map_err(blas_err)?;
        let c =
            result::create_matrix_layout(f16, n as u64, rows as u64, n as i64).map_err(blas_err)?;
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_err)?;
        let mut plan = LinearPlan {
            desc,
            layouts: [a, b, c],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            residual,
            shape: [rows, k, n],
        };
        let set = |attr, value: *const c_void, size| {
            // SAFETY: `desc` is live; `value` points at `size` bytes of the attribute's type.
            unsafe { result::set_matmul_desc_attribute(desc, attr, value, size) }.map_err(blas_err)
        };
        // cublasOperation_t: 1 is CUBLAS_OP_T.
        let trans: i32 = 1;
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans as *const _ as *const c_void,
            std::mem::size_of_val(&trans),
        )?;
        if let Some(ptr) = bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const c_void,
                std::mem::size_of_val(&epilogue),
            )?;
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &ptr as *const _ as *const c_void,
                std::mem::size_of_val(&ptr),
            )?;
        }
        let pref = result::create_matmul_pref().map_err(blas_err)?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: pref is live; the attribute is a u64 byte count.
        let found = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .and_then(|_| result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref))
        };
        // SAFETY: pref was created above and is not used again.
        unsafe { result::destroy_matmul_pref(pref) }.map_err(blas_err)?;
        plan.algo = found.map_err(blas_err)?.algo;
        Ok(plan)
    }

    /// Runs a planned linear layer; `residual` is 0 unless the plan has one.
    ///
    /// # Safety
    /// x [rows, k], w [n, k], y [rows, n] and residual [rows, n] must be there (the bias was
    /// fixed at planning and must still be there).
    pub unsafe fn linear(
        &self,
        p: &LinearPlan,
        x: Ptr,
        w: Ptr,
        residual: Ptr,
        y: Ptr,
    ) -> Result<(), GpuError> {
        let (alpha, beta) = (1f32, if p.residual { 1f32 } else { 0f32 });
        let c = if p.residual { residual } else { y };
        let (ws, _sync) = self.workspace.device_ptr(&self.stream);
        // SAFETY: descriptors and algorithm come from `plan` for exactly these shapes; addresses
        // per the caller's contract; the workspace holds WORKSPACE_BYTES, the plan's limit.
        unsafe {
            result::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                p.layouts[0],
                x as *const c_void,
                p.layouts[1],
                c as *const c_void,
                p.layouts[2],
                y as *mut c_void,
                p.layouts[2],
                &p.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(blas_err)
    }
}

impl Drop for LinearPlan {
    fn drop(&mut self) {
        // SAFETY: created in `plan`, destroyed once here; errors on teardown are ignored.
        unsafe {
            for l in self.layouts {
                let _ = result::destroy_matrix_layout(l);
            }
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

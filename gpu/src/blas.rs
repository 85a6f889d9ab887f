//! Matmuls through cuBLASLt on fp16 with fp32 accumulation: `nn.Linear` (the bias fused in the
//! epilogue, an optional residual fused as the C operand: D = x·wᵀ + bias + residual) and the
//! batched per-head products of attention.
//!
//! A `GemmPlan` is made once per graph node (descriptors, bias address, algorithm), so a run
//! only calls `cublasLtMatmul`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::GpuError;
use crate::kernels::Ptr;

/// cuBLASLt's workspace: 32 MiB covers every algorithm it proposes for our shapes on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;
/// Algorithms asked of the heuristic and timed at engine build. (A 2026-12-06 run found 32 no
/// faster than 8, but then engine files kept no linear layer's choice, so only the im2col
/// lowerings could have gained.)
const CANDIDATES: usize = 16;

fn blas_err(e: cudarc::cublaslt::result::CublasError) -> GpuError {
    GpuError::Blas(format!("{e:?}"))
}

/// A cuBLASLt handle with its workspace, bound to one stream.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
}

/// A row-major (batched) GEMM: c[i] (m x n) = alpha * a[i] (m x k) · op(b[i]) (+ bias [n])
/// (+ residual[i]), where op(b) is bᵀ for a [n, k] b (`b_trans`, like `nn.Linear` weights) and b
/// for a [k, n] b; matrix i of each operand starts `stride_*` elements after matrix i-1, and
/// rows of a matrix are `ld*` elements apart (0: packed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_trans: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
}

impl Gemm {
    /// `nn.Linear` on `rows` rows.
    pub fn linear(rows: usize, k: usize, n: usize) -> Self {
        Gemm {
            m: rows,
            n,
            k,
            b_trans: true,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            lda: 0,
            ldb: 0,
            ldc: 0,
            alpha: 1.0,
        }
    }

    /// Row strides with 0 replaced by the packed ones.
    fn leading(&self) -> (i64, i64, i64) {
        let or = |ld: usize, packed: usize| if ld == 0 { packed } else { ld } as i64;
        (
            or(self.lda, self.k),
            or(self.ldb, if self.b_trans { self.k } else { self.n }),
            or(self.ldc, self.n),
        )
    }
}

/// One GEMM's prepared call.
pub struct GemmPlan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's proposals, best first, for `tune`.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    residual: bool,
    alpha: f32,
    pub gemm: Gemm,
}

// SAFETY: the handle and descriptors are plain cuBLASLt objects used from the executor's one
// thread at a time; nothing in them is tied to the creating thread.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Send for GemmPlan {}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        if !crate::device::libraries().cublaslt {
            return Err(GpuError::LibraryMissing {
                name: "libcublasLt.so (CUDA toolkit)",
            });
        }
        let handle = result::create_handle().map_err(blas_err)?;
        let workspace = Self::new_workspace(&stream)?;
        Ok(Blas {
            handle,
            stream,
            workspace,
        })
    }

    /// Trades this handle's workspace for `other` (same size): GEMMs captured after the trade
    /// use `other`'s memory, so two captured replays of one executor can run at once.
    pub fn swap_workspace(&mut self, other: &mut CudaSlice<u8>) {
        std::mem::swap(&mut self.workspace, other);
    }

    /// A fresh workspace of this handle's size, on `stream`.
    pub fn new_workspace(stream: &Arc<CudaStream>) -> Result<CudaSlice<u8>, GpuError> {
        Ok(stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?)
    }

    /// Plans `g` (+ bias [n], fixed now) (+ a residual given at run time), then with `gelu`
    /// cuBLASLt's GELU of the whole sum (its tanh form, within 3e-4 of the exact one).
    pub fn plan(
        &self,
        g: Gemm,
        bias: Option<Ptr>,
        residual: bool,
        gelu: bool,
    ) -> Result<GemmPlan, GpuError> {
        let f16 = sys::cudaDataType_t::CUDA_R_16F;
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        // cuBLASLt is column-major: the row-major c [m, n] is a column-major [n, m] = op(b)ᵀ · aᵀ.
        // A row-major [r, c] matrix reads as a column-major [c, r] one, so: b [n, k] (b_trans)
        // is a column-major [k, n] taken transposed; b [k, n] a column-major [n, k] taken as is;
        // a [m, k] is a column-major [k, m].
        let (lda, ldb, ldc) = g.leading();
        let (first, trans) = if g.b_trans {
            (result::create_matrix_layout(f16, k, n, ldb), 1i32)
        } else {
            (result::create_matrix_layout(f16, n, k, ldb), 0i32)
        };
        let first = first.map_err(blas_err)?;
        let second = result::create_matrix_layout(f16, k, m, lda).map_err(blas_err)?;
        let out = result::create_matrix_layout(f16, n, m, ldc).map_err(blas_err)?;
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(blas_err)?;
        let mut plan = GemmPlan {
            desc,
            layouts: [first, second, out],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            candidates: Vec::new(),
            residual,
            alpha: g.alpha,
            gemm: g,
        };
        if g.batch > 1 {
            let count = g.batch as i32;
            for (layout, stride) in [(first, g.stride_b), (second, g.stride_a), (out, g.stride_c)] {
                let stride = stride as i64;
                // SAFETY: the layout is live; the attributes are an i32 count and an i64 stride.
                unsafe {
                    result::set_matrix_layout_attribute(
                        layout,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const _ as *const c_void,
                        std::mem::size_of_val(&count),
                    )
                    .and_then(|_| {
                        result::set_matrix_layout_attribute(
                            layout,
                            sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const _ as *const c_void,
                            std::mem::size_of_val(&stride),
                        )
                    })
                }
                .map_err(blas_err)?;
            }
        }
        let set = |attr, value: *const c_void, size| {
            // SAFETY: `desc` is live; `value` points at `size` bytes of the attribute's type.
            unsafe { result::set_matmul_desc_attribute(desc, attr, value, size) }.map_err(blas_err)
        };
        // cublasOperation_t: 1 is CUBLAS_OP_T, 0 CUBLAS_OP_N.
        set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans as *const _ as *const c_void,
            std::mem::size_of_val(&trans),
        )?;
        let epilogue = match (bias.is_some(), gelu) {
            (true, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS),
            (true, false) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
            (false, true) => Some(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU),
            (false, false) => None,
        };
        if let Some(epilogue) = epilogue {
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const c_void,
                std::mem::size_of_val(&epilogue),
            )?;
        }
        if let Some(ptr) = bias {
            set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &ptr as *const _ as *const c_void,
                std::mem::size_of_val(&ptr),
            )?;
        }
        let pref = result::create_matmul_pref().map_err(blas_err)?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: pref is live; the attribute is a u64 byte count.
        let mut found =
            [const { std::mem::MaybeUninit::<sys::cublasLtMatmulHeuristicResult_t>::uninit() };
                CANDIDATES];
        let mut count: i32 = 0;
        let asked = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .and_then(|_| {
                // SAFETY: every handle is live; `found` has room for CANDIDATES results and
                // `count` says how many were written.
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    first,
                    second,
                    out,
                    out,
                    pref,
                    CANDIDATES as i32,
                    found.as_mut_ptr() as *mut sys::cublasLtMatmulHeuristicResult_t,
                    &mut count,
                )
                .result()
            })
        };
        // SAFETY: pref was created above and is not used again.
        unsafe { result::destroy_matmul_pref(pref) }.map_err(blas_err)?;
        asked.map_err(blas_err)?;
        plan.candidates = found[..count.clamp(0, CANDIDATES as i32) as usize]
            .iter()
            // SAFETY: cuBLASLt wrote the first `count` results.
            .map(|r| unsafe { r.assume_init() })
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        plan.algo = *plan
            .candidates
            .first()
            .ok_or_else(|| GpuError::Blas(format!("cuBLASLt offers no algorithm for {g:?}")))?;
        Ok(plan)
    }

    /// Runs a planned GEMM; `residual` is 0 unless the plan has one.
    ///
    /// # Safety
    /// a, b, c and residual must hold the plan's (batched) shapes; the bias fixed at planning
    /// must still be there.
    pub unsafe fn gemm(
        &self,
        p: &GemmPlan,
        a: Ptr,
        b: Ptr,
        residual: Ptr,
        c: Ptr,
    ) -> Result<(), GpuError> {
        let beta = if p.residual { 1f32 } else { 0f32 };
        let src = if p.residual { residual } else { c };
        let (ws, _sync) = self.workspace.device_ptr(&self.stream);
        // SAFETY: descriptors and algorithm come from `plan` for exactly these shapes; addresses
        // per the caller's contract; the workspace holds WORKSPACE_BYTES, the plan's limit.
        unsafe {
            result::matmul(
                self.handle,
                p.desc,
                &p.alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                p.layouts[0],
                a as *const c_void,
                p.layouts[1],
                src as *const c_void,
                p.layouts[2],
                c as *mut c_void,
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

impl GemmPlan {
    /// How many algorithms the heuristic proposed for the plan (`pick` takes one of them).
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Uses the heuristic's `i`-th proposal (an engine file's record of a timed choice: the
    /// same GPU and cuBLASLt propose the same list); false when there is no such proposal.
    pub fn pick(&mut self, i: usize) -> bool {
        match self.candidates.get(i) {
            Some(a) => {
                self.algo = *a;
                true
            }
            None => false,
        }
    }
}

impl Drop for GemmPlan {
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

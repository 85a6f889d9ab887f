//! Matmuls through cuBLASLt: `nn.Linear` on fp16 rows with fp32 accumulation and a fused bias.

use std::sync::Arc;

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaSlice, CudaStream};
use half::f16;

use crate::error::GpuError;

/// A cuBLASLt handle with its workspace, bound to one stream.
pub struct Blas {
    lt: CudaBlasLT,
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, GpuError> {
        if !crate::device::libraries().cublaslt {
            return Err(GpuError::LibraryMissing {
                name: "libcublasLt.so (CUDA toolkit)",
            });
        }
        let lt = CudaBlasLT::new(stream).map_err(|e| GpuError::Blas(e.to_string()))?;
        Ok(Blas { lt })
    }

    /// y [m, n] = x [m, k] · w [n, k]^T (+ bias [n]), row-major like `nn.Linear`.
    pub fn linear(
        &self,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        y: &mut CudaSlice<f16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        if x.len() != m * k
            || w.len() != n * k
            || y.len() != m * n
            || bias.is_some_and(|b| b.len() != n)
        {
            return Err(GpuError::Shape {
                kernel: "linear",
                reason: format!("buffers do not match [{m},{k}] x [{n},{k}]^T"),
            });
        }
        // cuBLASLt is column-major: the row-major y [m,n] is a column-major [n,m] = w · x^T,
        // with w read transposed from its column-major [k,n] view. The bias runs along n.
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the layouts above describe exactly the checked buffer sizes (w: k x n, x: k x m,
        // y: n x m, all column-major with the given leading dimensions; bias of n).
        unsafe { self.lt.matmul(cfg, w, x, y, bias, None) }
            .map_err(|e| GpuError::Blas(e.to_string()))
    }
}

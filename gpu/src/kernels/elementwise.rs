//! Elementwise fp16 kernels: GEGLU, broadcast add (residuals and biases), nearest 2x upsample.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/elementwise.cu");

/// The compiled kernels.
pub struct Elementwise {
    geglu: CudaFunction,
    add: CudaFunction,
    upsample: CudaFunction,
}

fn shape(kernel: &'static str, reason: String) -> GpuError {
    GpuError::Shape { kernel, reason }
}

impl Elementwise {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "elementwise", SRC)?;
        Ok(Elementwise {
            geglu: m.load_function("geglu_f16")?,
            add: m.load_function("add_broadcast_f16")?,
            upsample: m.load_function("upsample2x_f16")?,
        })
    }

    /// x [rows, 2d] -> y [rows, d] = x[:, :d] * gelu(x[:, d:]).
    pub fn geglu(
        &self,
        device: &Device,
        x: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        d: usize,
    ) -> Result<(), GpuError> {
        if d == 0 || !x.len().is_multiple_of(2 * d) || y.len() * 2 != x.len() {
            return Err(shape(
                "geglu",
                format!("{} -> {} elements with d={d}", x.len(), y.len()),
            ));
        }
        let rows = (x.len() / (2 * d)) as i64;
        let di = d as i32;
        let cfg = LaunchConfig::for_num_elems(y.len() as u32);
        let mut l = device.stream.launch_builder(&self.geglu);
        l.arg(x).arg(y).arg(&rows).arg(&di);
        // SAFETY: matches geglu_f16 (const half*, half*, long, int); y holds rows*d elements and the
        // kernel bounds-checks its index.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    /// y = a + b, with b repeating: b's element for a[i] is b[(i / inner) % b.len()].
    pub fn add(
        &self,
        device: &Device,
        a: &CudaSlice<f16>,
        b: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        inner: usize,
    ) -> Result<(), GpuError> {
        if inner == 0
            || b.is_empty()
            || y.len() != a.len()
            || !a.len().is_multiple_of(inner * b.len())
        {
            return Err(shape(
                "add_broadcast",
                format!("{} + {} (inner {inner})", a.len(), b.len()),
            ));
        }
        let (n, inner, period) = (a.len() as i64, inner as i64, b.len() as i64);
        let mut l = device.stream.launch_builder(&self.add);
        l.arg(a).arg(b).arg(y).arg(&n).arg(&inner).arg(&period);
        // SAFETY: matches add_broadcast_f16 (2 const half*, half*, 3 long); indices into b stay
        // below period = b.len(), into a and y below n.
        unsafe { l.launch(LaunchConfig::for_num_elems(a.len() as u32)) }?;
        Ok(())
    }

    /// x [planes, h, w] -> y [planes, 2h, 2w].
    pub fn upsample2x(
        &self,
        device: &Device,
        x: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        h: usize,
        w: usize,
    ) -> Result<(), GpuError> {
        if h == 0 || w == 0 || !x.len().is_multiple_of(h * w) || y.len() != 4 * x.len() {
            return Err(shape(
                "upsample2x",
                format!("{} -> {} at {h}x{w}", x.len(), y.len()),
            ));
        }
        let planes = (x.len() / (h * w)) as i64;
        let (hi, wi) = (h as i32, w as i32);
        let cfg = LaunchConfig::for_num_elems(y.len() as u32);
        let mut l = device.stream.launch_builder(&self.upsample);
        l.arg(x).arg(y).arg(&planes).arg(&hi).arg(&wi);
        // SAFETY: matches upsample2x_f16 (const half*, half*, long, int, int); y holds 4x the
        // elements of x and the kernel bounds-checks.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

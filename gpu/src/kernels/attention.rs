//! Multi-head attention (self and cross) on fp16 token rows: the row-wise baseline kernel.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/attention.cu");
/// Largest head dimension the kernel keeps in registers.
pub const MAX_HEAD_DIM: usize = 512;
const WARPS_PER_BLOCK: u32 = 4;

/// The compiled kernel.
pub struct Attention {
    func: CudaFunction,
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    /// Channels of q and k.
    pub c: usize,
    /// Channels of v and the output.
    pub cv: usize,
}

impl Attention {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        Ok(Attention {
            func: module.load_function("attention_rowwise_f16")?,
        })
    }

    /// o = softmax(q k^T / sqrt(c / heads)) v, per head.
    pub fn launch(
        &self,
        device: &Device,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        o: &mut CudaSlice<f16>,
        s: AttentionShape,
    ) -> Result<(), GpuError> {
        let bad = |reason: String| GpuError::Shape {
            kernel: "attention",
            reason,
        };
        if s.heads == 0 || !s.c.is_multiple_of(s.heads) || !s.cv.is_multiple_of(s.heads) {
            return Err(bad(format!(
                "{} / {} channels in {} heads",
                s.c, s.cv, s.heads
            )));
        }
        if s.c / s.heads > MAX_HEAD_DIM || s.cv / s.heads > MAX_HEAD_DIM {
            return Err(bad(format!("head dimension over {MAX_HEAD_DIM}")));
        }
        if q.len() != s.batch * s.lq * s.c
            || k.len() != s.batch * s.lk * s.c
            || v.len() != s.batch * s.lk * s.cv
            || o.len() != s.batch * s.lq * s.cv
        {
            return Err(bad(format!("buffers do not match {s:?}")));
        }
        let warps = (s.batch * s.heads * s.lq) as u32;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(WARPS_PER_BLOCK), 1, 1),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale = 1.0 / ((s.c / s.heads) as f32).sqrt();
        let dims = [s.batch, s.lq, s.lk, s.heads, s.c, s.cv].map(|v| v as i32);
        let mut l = device.stream.launch_builder(&self.func);
        l.arg(q).arg(k).arg(v).arg(o);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&scale);
        // SAFETY: arguments match attention_rowwise_f16 (3 const half*, half*, 6 int, float); the
        // buffer lengths were checked against the shape, head dims fit the kernel's registers, and
        // surplus warps of the last block return before touching memory.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

//! Multi-head attention (self and cross) on fp16 token rows: the row-wise kernel.

use cudarc::driver::{CudaFunction, CudaStream};

use super::{grid, launch, shape_err, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/attention.cu");
/// Largest head dimension the kernel keeps in registers.
pub const MAX_HEAD_DIM: usize = 512;
const WARPS_PER_BLOCK: u32 = 4;

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

impl AttentionShape {
    /// Whether the kernel takes this shape.
    pub fn check(&self) -> Result<(), GpuError> {
        if self.heads == 0
            || !self.c.is_multiple_of(self.heads)
            || !self.cv.is_multiple_of(self.heads)
        {
            return Err(shape_err(
                "attention",
                format!("{} / {} channels in {} heads", self.c, self.cv, self.heads),
            ));
        }
        if self.c / self.heads > MAX_HEAD_DIM || self.cv / self.heads > MAX_HEAD_DIM {
            return Err(shape_err(
                "attention",
                format!("head dimension over {MAX_HEAD_DIM}"),
            ));
        }
        Ok(())
    }
}

/// The compiled kernel.
pub struct Attention {
    func: CudaFunction,
}

impl Attention {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        Ok(Attention {
            func: module.load_function("attention_rowwise_f16")?,
        })
    }

    /// o = softmax(q k^T / sqrt(c / heads)) v, per head.
    ///
    /// # Safety
    /// q [batch, lq, c], k [batch, lk, c], v [batch, lk, cv], o [batch, lq, cv] must be there.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        q: Ptr,
        k: Ptr,
        v: Ptr,
        o: Ptr,
        s: &AttentionShape,
    ) -> Result<(), GpuError> {
        s.check()?;
        let warps = s.batch * s.heads * s.lq;
        let scale = 1.0 / ((s.c / s.heads) as f32).sqrt();
        let mut args = vec![Arg::P(q), Arg::P(k), Arg::P(v), Arg::P(o)];
        args.extend(
            [s.batch, s.lq, s.lk, s.heads, s.c, s.cv]
                .iter()
                .map(|&d| Arg::I(d as i32)),
        );
        args.push(Arg::F(scale));
        // SAFETY: matches attention_rowwise_f16 (3 const half*, half*, 6 int, float); head dims
        // fit the kernel's registers (checked) and surplus warps return before touching memory.
        unsafe {
            launch(
                stream,
                &self.func,
                grid(warps * 32, 32 * WARPS_PER_BLOCK),
                &args,
            )
        }
    }
}

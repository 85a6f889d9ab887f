//! GroupNorm (+ fused SiLU) on fp16 NCHW activations.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use crate::device::Device;
use crate::error::GpuError;

const SRC: &str = include_str!("../../kernels/group_norm.cu");
const THREADS: u32 = 256;

/// The compiled kernel.
pub struct GroupNorm {
    func: CudaFunction,
}

impl GroupNorm {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "group_norm", SRC)?;
        Ok(GroupNorm {
            func: module.load_function("group_norm_f16")?,
        })
    }

    /// y = groupnorm(x) * gamma + beta (then SiLU), x and y [n, channels, inner].
    pub fn launch(
        &self,
        device: &Device,
        x: &CudaSlice<f16>,
        gamma: &CudaSlice<f16>,
        beta: &CudaSlice<f16>,
        y: &mut CudaSlice<f16>,
        n: usize,
        channels: usize,
        groups: usize,
        inner: usize,
        eps: f32,
        silu: bool,
    ) -> Result<(), GpuError> {
        let bad = |reason: String| GpuError::Shape {
            kernel: "group_norm",
            reason,
        };
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(bad(format!("{channels} channels in {groups} groups")));
        }
        if x.len() != n * channels * inner
            || y.len() != x.len()
            || gamma.len() != channels
            || beta.len() != channels
        {
            return Err(bad(format!(
                "buffers do not match [{n}, {channels}, {inner}]"
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: ((n * groups) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (c, g, i, s) = (
            channels as i32,
            groups as i32,
            inner as i32,
            i32::from(silu),
        );
        let mut launch = device.stream.launch_builder(&self.func);
        launch
            .arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(y)
            .arg(&c)
            .arg(&g)
            .arg(&i)
            .arg(&eps)
            .arg(&s);
        // SAFETY: the argument list matches group_norm_f16's signature (3 const half*, half*,
        // int, int, int, float, int), every buffer holds the element counts checked above, and
        // the grid has one block per (image, group) as the kernel indexes.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

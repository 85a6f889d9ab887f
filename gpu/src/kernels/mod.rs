//! Our NVRTC kernels: each family's CUDA source lives in `gpu/kernels/<op>.cu`, beside the Rust
//! launcher here that owns it. Each family compiles by NVRTC to a cubin for the device's exact SM
//! (no PTX left for the driver to JIT at start); an engine file carries the cubins, so a server
//! started from one needs neither NVRTC nor the CUDA headers.
//!
//! Launchers take raw device addresses (`Ptr`): the executor places every activation inside one
//! arena allocation, so an operand is an address, not a buffer of its own. Each launcher checks
//! the shape arguments it can; the executor guarantees that the addresses hold those shapes.

pub mod attention;
pub mod conv_in;
pub mod conv_out;
pub mod elementwise;
pub mod group_norm;
pub mod image;
pub mod layer_norm;
pub mod layout;

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{sys, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use crate::device::Device;
use crate::error::GpuError;

/// A device address (`CUdeviceptr`); 0 stands for "none" where a kernel takes an optional operand.
pub type Ptr = u64;

/// Where cuda_fp16.h lives on the machines we run on.
const CUDA_INCLUDE: &str = "/usr/local/cuda/include";
/// Threads per block of the one-thread-per-element kernels.
const THREADS: u32 = 256;

/// Every kernel the executor launches. (`image::Image`, the face path's pixel kernels, is loaded
/// on its own by the pipeline that uses it.)
pub struct Kernels {
    pub attention: attention::Attention,
    pub conv_in: conv_in::ConvIn,
    pub conv_out: conv_out::ConvOut,
    pub elementwise: elementwise::Elementwise,
    pub group_norm: group_norm::GroupNorm,
    pub layer_norm: layer_norm::LayerNorm,
    pub layout: layout::Layout,
}

impl Kernels {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        Ok(Kernels {
            attention: attention::Attention::load(device)?,
            conv_in: conv_in::ConvIn::load(device)?,
            conv_out: conv_out::ConvOut::load(device)?,
            elementwise: elementwise::Elementwise::load(device)?,
            group_norm: group_norm::GroupNorm::load(device)?,
            layer_norm: layer_norm::LayerNorm::load(device)?,
            layout: layout::Layout::load(device)?,
        })
    }
}

/// Every kernel family's name and CUDA source: what an engine file carries compiled.
pub const SOURCES: [(&str, &str); 8] = [
    ("attention", attention::SRC),
    ("conv_in", conv_in::SRC),
    ("conv_out", conv_out::SRC),
    ("elementwise", elementwise::SRC),
    ("group_norm", group_norm::SRC),
    ("image", image::SRC),
    ("layer_norm", layer_norm::SRC),
    ("layout", layout::SRC),
];

/// The GPU architectures the kernels are written for: tensor-core `mma.sync m16n8k16` needs
/// sm_80 or later (A100, A10/RTX 30, L4/RTX 40, H100/H200).
pub const ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];

/// The family's kernel image on `device` (from its engine file, or compiled now), loaded.
pub fn compile(
    device: &Device,
    kernel: &'static str,
    src: &str,
) -> Result<Arc<CudaModule>, GpuError> {
    let image = device.kernel_image(kernel, src)?;
    Ok(device.ctx.load_module(Ptx::from_binary(image))?)
}

/// Compiles one family's source to a cubin for `arch` (e.g. `sm_90`). Needs NVRTC and the CUDA
/// headers (`CUDA_INCLUDE`, else /usr/local/cuda/include), not a GPU.
pub fn cubin(kernel: &'static str, src: &str, arch: &str) -> Result<Vec<u8>, GpuError> {
    // SAFETY: only tries to dlopen NVRTC; cudarc's loader would panic where this says false.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(GpuError::LibraryMissing {
            name: "libnvrtc.so (CUDA toolkit), needed to compile kernels (an engine file carries them compiled)",
        });
    }
    let fail = |log: String| GpuError::Compile {
        kernel,
        arch: arch.to_string(),
        log,
    };
    let src_c = CString::new(src).map_err(|_| fail("the source contains a NUL byte".into()))?;
    let name = CString::new(format!("{kernel}.cu")).map_err(|_| fail("bad kernel name".into()))?;
    let prog = nvrtc::create_program(&src_c, Some(&name)).map_err(|e| fail(e.to_string()))?;
    let include = std::env::var("CUDA_INCLUDE").unwrap_or_else(|_| CUDA_INCLUDE.into());
    // A real architecture (not compute_XX): NVRTC emits SASS for this SM, nothing to JIT.
    let options = [
        format!("--gpu-architecture={arch}"),
        format!("--include-path={include}"),
    ];
    // SAFETY: `prog` was created above from `src_c`/`name`, which outlive it, and is destroyed
    // exactly once below; the size/copy pair writes at most `size` bytes into `image`.
    let image = unsafe {
        let image = nvrtc::compile_program(prog, &options)
            .map_err(|e| {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                fail(format!("{e}: {log}"))
            })
            .and_then(|()| {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail(format!("no cubin: {e}")))?;
                let mut image = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char)
                    .result()
                    .map_err(|e| fail(format!("no cubin: {e}")))?;
                Ok(image)
            });
        nvrtc::destroy_program(prog).ok();
        image
    }?;
    if !image.starts_with(b"\x7fELF") {
        return Err(fail(format!(
            "NVRTC gave {} bytes that are not a cubin (was {arch} a real architecture?)",
            image.len()
        )));
    }
    Ok(image)
}

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device address.
    P(Ptr),
    L(i64),
    I(i32),
    F(f32),
}

/// A 1-d launch of `threads` threads in blocks of `block`.
pub(crate) fn grid(threads: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((threads as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape of the NHWC kernels that take one 8-channel vector per thread and loop: for
/// `image8` vectors per image of `c8` (= channels / 8) vectors a pixel over `n` images,
/// (threads per block, vectors per block, blocks per image). Threads and vectors per block are
/// multiples of c8, so each thread keeps one channel vector for its whole loop; the batch spreads
/// over about `VECTOR_BLOCKS` blocks.
pub(crate) fn vector_grid(image8: usize, c8: usize, n: usize) -> (usize, usize, usize) {
    let c8 = c8.max(1);
    let threads = if c8 >= 256 { c8 } else { 256 / c8 * c8 };
    let blocks = VECTOR_BLOCKS
        .div_ceil(n.max(1))
        .min(image8.div_ceil(threads))
        .max(1);
    let per_block = image8.div_ceil(blocks).div_ceil(threads) * threads;
    (threads, per_block, image8.div_ceil(per_block).max(1))
}

/// Eight blocks per SM of an H100 (132 SMs): enough in flight for memory-bound passes.
const VECTOR_BLOCKS: usize = 1056;

/// A one-thread-per-element launch.
pub(crate) fn elems(n: usize) -> LaunchConfig {
    grid(n, THREADS)
}

/// Whether launches on `stream` use programmatic dependent launch: only with `LIPSTREAM_PDL=1`,
/// and only on sm_90 and later (where every kernel's `LS_PDL_ENTER` waits for the grid before
/// it). Off by default: the op sweep and face tests pass with it on an H100, but it changed no
/// frame time there (bench/results/2026-12-06_h100_shortcut_first/pdl/): half of a frame's
/// launches are cuDNN's and cuBLASLt's, which take no part.
fn programmatic(stream: &CudaStream) -> bool {
    Experiment::Pdl.on() && sm90(stream)
}

/// Kernel choices not yet measured to pay on the GPU machine: off by default, each switched on
/// by its environment variable set to 1 (read once per process). scripts/device/env_ab.sh times
/// one engine file without and with each; scripts/device/test.sh (EXPERIMENTS=1) runs the op
/// sweep with all of them on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experiment {
    /// Programmatic dependent launches (`programmatic`).
    Pdl,
    /// Group norms that write the next convolution's im2col patches (`group_norm`).
    NormCols,
    /// Fused attention warps that own 32 queries instead of 16 (`attention`).
    FlashRows32,
}

impl Experiment {
    pub const ALL: [Experiment; 3] = [
        Experiment::Pdl,
        Experiment::NormCols,
        Experiment::FlashRows32,
    ];

    /// Its environment variable.
    pub fn var(self) -> &'static str {
        match self {
            Experiment::Pdl => "LIPSTREAM_PDL",
            Experiment::NormCols => "LIPSTREAM_NORM_COLS",
            Experiment::FlashRows32 => "LIPSTREAM_FLASH_ROWS32",
        }
    }

    /// What it changes, in a line (`lipstream doctor`).
    pub fn about(self) -> &'static str {
        match self {
            Experiment::Pdl => "programmatic dependent launches of our kernels (sm_90)",
            Experiment::NormCols => {
                "group norms write the next convolution's im2col patches (16-byte groups)"
            }
            Experiment::FlashRows32 => {
                "fused attention warps own 32 queries (head dims 40, 64, 80): K and V read half as often"
            }
        }
    }

    /// Whether this process runs with it.
    pub fn on(self) -> bool {
        static ON: [OnceLock<bool>; Experiment::ALL.len()] =
            [const { OnceLock::new() }; Experiment::ALL.len()];
        *ON[self as usize].get_or_init(|| std::env::var(self.var()).is_ok_and(|v| v == "1"))
    }
}

/// The experiments this process runs with, for reports.
pub fn experiments_on() -> Vec<&'static str> {
    Experiment::ALL
        .into_iter()
        .filter(|e| e.on())
        .map(Experiment::var)
        .collect()
}

/// Launches `func` with `args`, as a programmatic dependent launch where asked for: the
/// kernel may then be scheduled while the one before it finishes (it waits for that one's
/// results itself, `gpu/kernels/pdl.cuh`); inside a capture this becomes a programmatic edge of
/// the CUDA graph.
///
/// # Safety
/// `args` must match the kernel's parameter list in order and type, and every address must hold
/// what the kernel reads or writes for the given sizes. The kernel starts with `LS_PDL_ENTER`.
pub(crate) unsafe fn launch(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<(), GpuError> {
    // SAFETY: forwarded to the caller.
    unsafe { launch_clustered(stream, func, cfg, 1, args) }
}

/// Whether the stream's GPU is sm_90 or later (thread-block clusters, programmatic launches).
pub(crate) fn sm90(stream: &CudaStream) -> bool {
    stream
        .context()
        .compute_capability()
        .is_ok_and(|(major, _)| major >= 9)
}

/// `launch`, in clusters of `cluster` consecutive blocks along x (1: no clusters; more needs
/// `sm90(stream)` and a grid x that `cluster` divides, at most 8).
///
/// # Safety
/// As for `launch`.
pub(crate) unsafe fn launch_clustered(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    cluster: u32,
    args: &[Arg],
) -> Result<(), GpuError> {
    let pdl = programmatic(stream);
    if pdl || cluster > 1 {
        // Each parameter in an 8-byte slot: the driver reads 4 bytes for an int or a float,
        // the low ones on this little-endian machine.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::L(v) => v as u64,
                Arg::I(v) => v as u32 as u64,
                Arg::F(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let mut attrs = Vec::with_capacity(2);
        if pdl {
            // SAFETY: an all-zero attribute is a valid value of the C struct; id and value set
            // next.
            let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            attrs.push(a);
        }
        if cluster > 1 {
            // SAFETY: as above.
            let mut a: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            a.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            a.value.clusterDim.x = cluster;
            a.value.clusterDim.y = 1;
            a.value.clusterDim.z = 1;
            attrs.push(a);
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: `params` points at one slot per kernel parameter (the caller's contract
        // matches them to the kernel), alive for the call, as are the attributes; the function
        // belongs to the stream's context.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        return Ok(());
    }
    let mut l = stream.launch_builder(func);
    for a in args {
        match a {
            Arg::P(p) => l.arg(p),
            Arg::L(v) => l.arg(v),
            Arg::I(v) => l.arg(v),
            Arg::F(v) => l.arg(v),
        };
    }
    // SAFETY: forwarded to the caller (see above).
    unsafe { l.launch(cfg) }?;
    Ok(())
}

fn shape_err(kernel: &'static str, reason: String) -> GpuError {
    GpuError::Shape { kernel, reason }
}

/// Pads a shape to rank 5 with leading 1s (and strides with leading 0s).
pub(crate) fn rank5(dims: &[usize], strides: &[usize]) -> Result<([i64; 5], [i64; 5]), GpuError> {
    if dims.len() > 5 || dims.len() != strides.len() {
        return Err(shape_err(
            "permute",
            format!("rank {} (at most 5)", dims.len()),
        ));
    }
    let mut d = [1i64; 5];
    let mut s = [0i64; 5];
    let off = 5 - dims.len();
    for i in 0..dims.len() {
        d[off + i] = dims[i] as i64;
        s[off + i] = strides[i] as i64;
    }
    Ok((d, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel launched as a programmatic dependent launch that touched memory before waiting
    /// for the grid before it would race with it: every kernel must begin with LS_PDL_ENTER.
    #[test]
    fn every_kernel_waits_for_the_one_before_it_first() {
        for (family, src) in SOURCES {
            let mut rest = src;
            let mut kernels = 0;
            while let Some(at) = rest.find("__global__") {
                let body = &rest[at..];
                let open = body.find('{').expect("a kernel has a body");
                let first =
                    body[open + 1..].trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                assert!(
                    first.starts_with("LS_PDL_ENTER();"),
                    "{family}: a kernel starts with {:?}",
                    &first[..first.len().min(60)]
                );
                kernels += 1;
                rest = &body[open..];
            }
            assert!(kernels > 0, "{family} has no kernel");
        }
    }

    #[test]
    fn vector_blocks_keep_one_channel_vector_per_thread_and_cover_the_image() {
        for (hw, c, n) in [
            (65536, 128, 16),
            (64, 1280, 1),
            (1024, 640, 2),
            (16384, 2560, 1),
            (4, 8, 3),
        ] {
            let (image8, c8) = (hw * c / 8, c / 8);
            let (threads, per_block, blocks) = vector_grid(image8, c8, n);
            assert!(
                threads <= 1024 && threads.is_multiple_of(c8),
                "{c} channels: {threads} threads"
            );
            assert!(per_block.is_multiple_of(threads), "{per_block} per block");
            assert!(blocks * per_block >= image8 && (blocks - 1) * per_block < image8);
        }
    }
}

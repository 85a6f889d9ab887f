//! GroupNorm (+ fused SiLU) on fp16 NHWC activations: partial sums over pixel chunks, per-group
//! statistics, then the elementwise apply.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{elems, grid, launch, launch_clustered, shape_err, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/group_norm.cu")
);
const STATS_THREADS: usize = 256;
/// Aim for eight blocks per SM (of 132 on an H100) across the images of a batch: the pass is
/// bound by memory bandwidth, which needs the occupancy.
const TARGET_BLOCKS: usize = 1056;
/// Fewer pixels than this per block leaves most of its threads idle.
const MIN_CHUNK_PIXELS: usize = 16;
/// A group of at most this many elements is normalised by one block in one launch (read twice,
/// the second time from L2): below it, the three launches of the split form cost more than the
/// re-read. The UNet's groups (32x32 x 10 channels = 10240 at most) all fit; the VAE's 64x64 and
/// larger images do not, and keep the whole GPU busy the split way.
const SMALL_GROUP_ELEMS: usize = 16384;
/// A norm of more elements than this takes the split form even where its groups are small: a
/// block per (group, image) reads its group's 10-40 channels of every pixel (20-80 bytes, a row
/// of the tensor apart), which the profile of a 24-frame avatar batch puts at 0.7 TB/s on the
/// UNet's 32x32 norms, against 2.8 for the split form on the VAE's; the split form also lets the
/// producing epilogue sum the groups (50 of that batch's 91 norms instead of 19). Avatar
/// batches of 16 and 24 frames, H200, 2026-12-07: -1.3 % / -1.4 % and -0.3 % / -2.1 %.
const SPLIT_BATCH_ELEMS: usize = 1 << 21;
/// Threads of a one-launch block: enough loads in flight to hide L2 latency for a whole group.
const SMALL_THREADS: usize = 512;
/// Blocks the one-launch form aims for when it may split groups over clusters: one a group at
/// one image a batch (32 groups) leaves three quarters of an H100's 132 SMs idle.
const CLUSTER_TARGET_BLOCKS: usize = 128;
/// Fewest pixels a block of a split group takes.
const MIN_PART_PIXELS: usize = 16;

/// One GroupNorm's shape and the scratch it needs.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormShape {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
    /// Partial sums per image already written by the producing convolution's epilogue (0: the
    /// norm sums its input itself).
    pub fused_chunks: usize,
}

impl GroupNormShape {
    /// Whether the norm runs as one launch of one block per (group, image); such a norm sums its
    /// input itself, so its producer need not.
    pub fn one_launch(&self) -> bool {
        self.fused_chunks == 0
            && self.hw * (self.c / self.groups.max(1)) <= SMALL_GROUP_ELEMS
            && self.n * self.hw * self.c <= SPLIT_BATCH_ELEMS
    }

    /// Blocks (a cluster, at most 8) per (group, image) of the one-launch form on a GPU with
    /// clusters: doubled while the grid stays under CLUSTER_TARGET_BLOCKS and each block keeps
    /// MIN_PART_PIXELS pixels.
    pub fn parts(&self) -> usize {
        let mut k = 1;
        while k < 8
            && self.n * self.groups * k < CLUSTER_TARGET_BLOCKS
            && self.hw / (2 * k) >= MIN_PART_PIXELS
        {
            k *= 2;
        }
        k
    }

    /// Pixel chunks per image for the statistics pass.
    pub fn chunks(&self) -> usize {
        if self.fused_chunks > 0 {
            return self.fused_chunks;
        }
        TARGET_BLOCKS
            .div_ceil(self.n)
            .min(self.hw.div_ceil(MIN_CHUNK_PIXELS))
            .max(1)
    }

    /// Where the two-pass form's (mean, 1/std) start in its scratch, in bytes: after the
    /// partial sums.
    pub fn stats_offset(&self) -> usize {
        8 * self.n * self.groups * self.chunks()
    }

    /// Bytes of scratch: partial (sum, sum of squares) per chunk and group, then (mean, 1/std);
    /// none for the one-launch form, which keeps its sums in the block.
    pub fn scratch_bytes(&self) -> usize {
        if self.one_launch() {
            return 0;
        }
        8 * self.n * self.groups * (self.chunks() + 1)
    }

    fn check(&self) -> Result<(), GpuError> {
        let ok = self.groups > 0
            && self.c.is_multiple_of(self.groups)
            && (self.c / self.groups).is_multiple_of(2)
            && STATS_THREADS.is_multiple_of(self.groups);
        if ok {
            Ok(())
        } else {
            Err(shape_err(
                "group_norm",
                format!(
                    "{} channels in {} groups (needs an even group width and groups dividing {STATS_THREADS})",
                    self.c, self.groups
                ),
            ))
        }
    }
}

/// The compiled kernels.
pub struct GroupNorm {
    stats: CudaFunction,
    finalize: CudaFunction,
    apply: CudaFunction,
    apply8: CudaFunction,
    small2: CudaFunction,
    small8: CudaFunction,
}

impl GroupNorm {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "group_norm", SRC)?;
        Ok(GroupNorm {
            stats: m.load_function("group_norm_nhwc_stats_f16")?,
            finalize: m.load_function("group_norm_nhwc_finalize")?,
            apply: m.load_function("group_norm_nhwc_apply_f16")?,
            apply8: m.load_function("group_norm_nhwc_apply_f16x8")?,
            small2: m.load_function("group_norm_nhwc_small_f16x2")?,
            small8: m.load_function("group_norm_nhwc_small_f16x8")?,
        })
    }

    /// Checks a shape before an executor commits to it.
    pub fn supports(s: &GroupNormShape) -> Result<(), GpuError> {
        s.check()
    }

    /// y = groupnorm(x) * gamma + beta (then SiLU); x, y [n, hw, c].
    ///
    /// # Safety
    /// x and y must hold n*hw*c elements, gamma and beta c, scratch `s.scratch_bytes()` bytes
    /// (8-byte aligned).
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        x: Ptr,
        gamma: Ptr,
        beta: Ptr,
        y: Ptr,
        scratch: Ptr,
        s: &GroupNormShape,
    ) -> Result<(), GpuError> {
        s.check()?;
        if s.one_launch() {
            // SAFETY: per the caller's contract.
            return unsafe { self.launch_small(stream, x, gamma, beta, y, s, None) };
        }
        // SAFETY: per the caller's contract.
        let stats = unsafe { self.launch_stats(stream, x, scratch, s) }?;
        let i = |v: usize| Arg::I(v as i32);
        if s.c.is_multiple_of(8) && super::elementwise::aligned16(&[x, gamma, beta, y]) {
            let image8 = s.hw * s.c / 8;
            let (threads, per_block, blocks) = super::vector_grid(image8, s.c / 8, s.n);
            // SAFETY: matches group_norm_nhwc_apply_f16x8 (const uint4*, const float2*, 2 const
            // half*, uint4*, 5 int); whole 8-wide channel vectors, aligned (checked); grid y
            // covers the n images, stats hold n*groups entries; threads and per_block are
            // multiples of c / 8 (vector_grid).
            return unsafe {
                launch(
                    stream,
                    &self.apply8,
                    LaunchConfig {
                        grid_dim: (blocks as u32, s.n as u32, 1),
                        block_dim: (threads as u32, 1, 1),
                        shared_mem_bytes: 0,
                    },
                    &[
                        Arg::P(x),
                        Arg::P(stats),
                        Arg::P(gamma),
                        Arg::P(beta),
                        Arg::P(y),
                        i(image8),
                        i(s.c),
                        i(s.groups),
                        i(usize::from(s.silu)),
                        i(per_block),
                    ],
                )
            };
        }
        let n2 = s.n * s.hw * s.c / 2;
        // SAFETY: matches group_norm_nhwc_apply_f16 (const half2*, const float2*, 2 const half*,
        // half2*, 2 long, 3 int); c is even and each channel pair shares a group (checked).
        unsafe {
            launch(
                stream,
                &self.apply,
                elems(n2),
                &[
                    Arg::P(x),
                    Arg::P(stats),
                    Arg::P(gamma),
                    Arg::P(beta),
                    Arg::P(y),
                    Arg::L(n2 as i64),
                    Arg::L(s.hw as i64),
                    i(s.c),
                    i(s.groups),
                    i(usize::from(s.silu)),
                ],
            )
        }
    }

    /// The two-pass form's statistics alone (its sums, unless the producing convolution left
    /// them, then the per-(image, group) mean and 1/std), for a kernel that normalises x on
    /// its own way in (`conv_out`'s normed convolution). Returns where they are: n * groups
    /// (mean, 1/std) float2s in the scratch.
    ///
    /// # Safety
    /// x must hold n*hw*c elements, scratch `s.scratch_bytes()` bytes (8-byte aligned).
    pub unsafe fn launch_stats(
        &self,
        stream: &CudaStream,
        x: Ptr,
        scratch: Ptr,
        s: &GroupNormShape,
    ) -> Result<Ptr, GpuError> {
        s.check()?;
        if s.one_launch() || !scratch.is_multiple_of(8) {
            return Err(shape_err(
                "group_norm statistics",
                format!("{s:?} (the two-pass form only; scratch {scratch:#x} 8-byte aligned)"),
            ));
        }
        let i = |v: usize| Arg::I(v as i32);
        let chunks = s.chunks();
        let chunk = s.hw.div_ceil(chunks);
        let partial = scratch;
        let vec8 = (s.c / s.groups).is_multiple_of(8) && super::elementwise::aligned16(&[x]);
        let stats = scratch + s.stats_offset() as u64;
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, s.n as u32, 1),
            block_dim: (STATS_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if s.fused_chunks == 0 {
            // SAFETY: matches group_norm_nhwc_stats_f16 (const half*, float2*, 5 int); partial holds
            // n*chunks*groups float2s; blockDim is a multiple of groups (checked).
            unsafe {
                launch(
                    stream,
                    &self.stats,
                    cfg,
                    &[
                        Arg::P(x),
                        Arg::P(partial),
                        i(s.hw),
                        i(s.c),
                        i(s.groups),
                        i(chunk),
                        i(usize::from(vec8)),
                    ],
                )
            }?;
        }
        let count = (s.hw * (s.c / s.groups)) as f32;
        // SAFETY: matches group_norm_nhwc_finalize (const float2*, float2*, 3 int, 2 float); one
        // warp per (image, group), surplus warps return.
        unsafe {
            launch(
                stream,
                &self.finalize,
                grid(s.n * s.groups * 32, 256),
                &[
                    Arg::P(partial),
                    Arg::P(stats),
                    i(s.n),
                    i(s.groups),
                    i(chunks),
                    Arg::F(count),
                    Arg::F(s.eps),
                ],
            )
        }?;
        Ok(stats)
    }

    /// The norm (one-launch form) written straight into the patch matrix of the k x k,
    /// stride-1, padding-(k-1)/2 convolution of the [n, hw / w, w, c] result (`Layout::im2col`'s
    /// layout, zeros included), instead of into y: the convolution's GEMM reads `cols` without
    /// an im2col launch of its own.
    ///
    /// # Safety
    /// As for `launch`, with cols holding n * hw * k * k * c elements (16-byte aligned) in
    /// place of y.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_to_cols(
        &self,
        stream: &CudaStream,
        x: Ptr,
        gamma: Ptr,
        beta: Ptr,
        cols: Ptr,
        s: &GroupNormShape,
        w: usize,
        k: usize,
    ) -> Result<(), GpuError> {
        s.check()?;
        if !Self::fits_cols(s, w, k) || !cols.is_multiple_of(16) {
            return Err(shape_err(
                "group_norm",
                format!(
                    "{s:?} into the patches of a {k}x{k} convolution at width {w} (cols {cols:#x})"
                ),
            ));
        }
        // SAFETY: per the caller's contract: cols takes y's place.
        unsafe { self.launch_small(stream, x, gamma, beta, cols, s, Some((w, k))) }
    }

    /// Whether `launch_to_cols` takes the norm `s` of an image `w` wide for a k x k convolution:
    /// the one-launch form, an odd k, whole rows.
    pub fn fits_cols(s: &GroupNormShape, w: usize, k: usize) -> bool {
        s.one_launch()
            && k % 2 == 1
            && w > 0
            && s.hw.is_multiple_of(w)
            && s.n * s.hw * k * k * s.c <= i32::MAX as usize
    }

    /// The one-launch form (`s.one_launch()`), into y: the normalised image or, with `cols` =
    /// (image width, kernel size), a convolution's patches.
    ///
    /// # Safety
    /// As for `launch` (and `launch_to_cols` with `cols`).
    unsafe fn launch_small(
        &self,
        stream: &CudaStream,
        x: Ptr,
        gamma: Ptr,
        beta: Ptr,
        y: Ptr,
        s: &GroupNormShape,
        cols: Option<(usize, usize)>,
    ) -> Result<(), GpuError> {
        let cg = s.c / s.groups;
        let wide = cg.is_multiple_of(8) && super::elementwise::aligned16(&[x, y]);
        let v = if wide { 8 } else { 2 };
        let aligned4 = x.is_multiple_of(4) && y.is_multiple_of(4);
        if !(wide || aligned4) {
            return Err(shape_err("group_norm", "x or y not 4-byte aligned".into()));
        }
        // Clusters need sm_90. At one image a batch they took 1-2 % off an H100's avatar frame
        // and ~0.8 % off its camera frame (same engine file, 4 rounds, 2026-12-06).
        let parts = if super::sm90(stream) { s.parts() } else { 1 };
        let units = s.hw.div_ceil(parts) * cg / v;
        let threads = units.next_multiple_of(32).min(SMALL_THREADS);
        let i = |v: usize| Arg::I(v as i32);
        let (cols, (w, k)) = match cols {
            Some(geometry) => (y, geometry),
            None => (0, (1, 0)),
        };
        // SAFETY: matches group_norm_nhwc_small_f16x{2,8} (const half*, 2 const half*, half*, 3
        // int, float, 2 int, half*, 2 int); `parts` blocks per (group, image), a cluster when
        // more than one (at most 8, on sm_90, dividing the grid's x); with cols, the caller's
        // patch matrix in place of y (`launch_to_cols`); at most 1024 threads (32 warps, the
        // reduction's shared arrays); 16-byte loads only where the group width is a multiple of
        // 8 and x and y are 16-byte aligned (so is every row: c = groups * width), else 4-byte
        // loads on an even width (checked) at 4-byte aligned addresses.
        unsafe {
            launch_clustered(
                stream,
                if wide { &self.small8 } else { &self.small2 },
                LaunchConfig {
                    grid_dim: ((s.groups * parts) as u32, s.n as u32, 1),
                    block_dim: (threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
                parts as u32,
                &[
                    Arg::P(x),
                    Arg::P(gamma),
                    Arg::P(beta),
                    Arg::P(y),
                    i(s.hw),
                    i(s.c),
                    i(s.groups),
                    Arg::F(s.eps),
                    i(usize::from(s.silu)),
                    i(parts),
                    Arg::P(cols),
                    i(w),
                    i(k),
                ],
            )
        }
    }
}

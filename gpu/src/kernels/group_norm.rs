//! GroupNorm (+ fused SiLU) on fp16 NHWC activations: partial sums over pixel chunks, per-group
//! statistics, then the elementwise apply.

use std::sync::OnceLock;

use cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};

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
/// The streamed form's unit (an image, or a slice of its channels) at most, unless
/// `LIPSTREAM_GN_STREAM_UNIT_MIB` says otherwise: a quarter of a 256x256 image of 128 channels.
/// Each unit pays a chain (sums, their reduction, the release of its normalise blocks) that
/// units of 16 MiB, two at a time, ran one after another at 7-27 µs each (H100, 2026-12-07):
/// smaller units let several chains overlap in the same L2.
const STREAM_UNIT_BYTES: usize = 4 << 20;
/// Channels a streamed unit's slice holds at least: 32 bytes a pixel, a whole sector. Slices
/// of 8 channels (1 MiB units of a 256x256 image of 128) read half sectors and took an avatar
/// batch of 24 from 38.5 to 47.2 ms (H100, 2026-12-07); with the default unit (4 MiB) the
/// VAE's slices hold 32 channels or more anyway.
const STREAM_MIN_SLICE: usize = 16;
/// The share of L2 the streamed form's units between their two reads may take: half, so the
/// producer's output and the weights of the next step keep some.
const STREAM_L2_SHARE: usize = 2;
/// Threads of a streamed block at most (the kernel's GN_STREAM_THREADS).
const STREAM_THREADS: usize = 256;
/// Vectors a streamed block's thread reads per tile: 64 KiB tiles at 256 threads.
const STREAM_PER_THREAD: usize = 16;
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
    /// The streamed form (`can_stream`): one launch that reads x from memory once.
    pub streamed: bool,
}

/// Environment variable `var` as a whole number within `range`: the streamed form's knobs for
/// experiments. Anything else leaves the default.
fn env_count(var: &str, range: std::ops::RangeInclusive<usize>) -> Option<usize> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| range.contains(n))
}

/// The streamed form's unit at most, in bytes: `STREAM_UNIT_BYTES`, or
/// `LIPSTREAM_GN_STREAM_UNIT_MIB` (1 to 64) for experiments on it. Read once a process, so the
/// plan's scratch and every launch agree.
fn stream_unit_bytes() -> usize {
    static UNIT: OnceLock<usize> = OnceLock::new();
    *UNIT.get_or_init(|| {
        env_count("LIPSTREAM_GN_STREAM_UNIT_MIB", 1..=64).map_or(STREAM_UNIT_BYTES, |m| m << 20)
    })
}

/// `LIPSTREAM_GN_STREAM_LEAD_UNITS`: how many units the streamed form's sums run ahead of its
/// normalisations, for experiments (`Streamed::order` keeps it within what is safe).
fn stream_lead_units() -> Option<usize> {
    static LEAD: OnceLock<Option<usize>> = OnceLock::new();
    *LEAD.get_or_init(|| env_count("LIPSTREAM_GN_STREAM_LEAD_UNITS", 1..=usize::MAX))
}

/// `LIPSTREAM_GN_STREAM_WINDOW_MIB`: the bytes of units the streamed form keeps between their
/// two reads, in place of `l2 / STREAM_L2_SHARE`, for experiments (two units at least).
fn stream_window_mib() -> Option<usize> {
    static WINDOW: OnceLock<Option<usize>> = OnceLock::new();
    *WINDOW.get_or_init(|| env_count("LIPSTREAM_GN_STREAM_WINDOW_MIB", 1..=1024))
}

/// How the streamed form cuts a norm: `units` (an image, or a slice of `slices` of its
/// channels) of `unit_bytes`, each of `tiles` tiles of `tile_px` pixels, `threads` a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Streamed {
    slices: usize,
    threads: usize,
    tile_px: usize,
    tiles: usize,
    units: usize,
    unit_bytes: usize,
}

/// The order the streamed form's blocks take their items in (group_norm.cu): the first `lead`
/// tiles' sums, then sums and normalisations by turns; a unit's sums wait until unit
/// `u - gate` is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StreamOrder {
    lead: usize,
    gate: usize,
}

impl Streamed {
    /// Tiles of the whole batch.
    fn items(&self) -> usize {
        self.units * self.tiles
    }

    /// The order for an L2 of `l2` bytes: as many units in flight as `l2 / STREAM_L2_SHARE`
    /// holds (two at least), each unit's normalisations about half that far behind its sums
    /// (`LIPSTREAM_GN_STREAM_LEAD_UNITS` to try others). At the whole distance a unit's sums
    /// came right after the normalisations they wait for and spun through them (H100,
    /// 2026-12-07); half leaves slack on both sides: the sums a normalisation waits for and the
    /// normalisations a sum waits for both started about a quarter of the window before.
    fn order(&self, l2: usize) -> StreamOrder {
        let window = stream_window_mib().map_or(l2 / STREAM_L2_SHARE, |m| m << 20);
        let gate = (window / self.unit_bytes.max(1)).max(2);
        let units = stream_lead_units().unwrap_or(gate.div_ceil(2));
        StreamOrder {
            lead: (units * self.tiles)
                .clamp(self.tiles, (gate - 1) * self.tiles)
                .min(self.items()),
            gate,
        }
    }

    /// Item of the block with `ticket`: (normalise, tile of the batch), as the kernel maps it.
    #[cfg(test)]
    fn item(&self, o: StreamOrder, ticket: usize) -> (bool, usize) {
        let m = self.items();
        if ticket < o.lead {
            (false, ticket)
        } else if ticket - o.lead < 2 * (m - o.lead) {
            let r = ticket - o.lead;
            if r % 2 == 1 {
                (true, r / 2)
            } else {
                (false, o.lead + r / 2)
            }
        } else {
            (true, ticket - m)
        }
    }
}

impl GroupNormShape {
    /// Whether the norm runs as one launch of one block per (group, image); such a norm sums its
    /// input itself, so its producer need not.
    pub fn one_launch(&self) -> bool {
        !self.streamed
            && self.fused_chunks == 0
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
    /// none for the one-launch form, which keeps its sums in the block. Where the norm could
    /// stream (`can_stream`), enough for either form, so the executor may pick after placing.
    pub fn scratch_bytes(&self) -> usize {
        if self.one_launch() {
            return 0;
        }
        let split = if self.streamed {
            0
        } else {
            8 * self.n * self.groups * (self.chunks() + 1)
        };
        let streamed = self.streamed_layout().map_or(0, |l| {
            Self::counter_bytes(&l) + 8 * self.n * self.groups * (l.tiles + 1)
        });
        split.max(streamed)
    }

    /// Whether the streamed form saves a read from memory on a GPU with `l2` bytes of L2: x is
    /// larger than that L2. A smaller x is still there when the split form reads it again (the
    /// UNet's norms of 24 images took 11-13 µs more each streamed, H100, 2026-12-07).
    pub fn stream_pays(&self, l2: usize) -> bool {
        2 * self.n * self.hw * self.c > l2
    }

    /// Whether the norm may take the streamed form on a GPU with `l2` bytes of L2: the split
    /// form's shape (too large for one launch a group), whole 8-channel vectors, and a slice of
    /// its channels (whole groups, `STREAM_MIN_SLICE` channels at least) at most
    /// `stream_unit_bytes()` an image, of which two fit the form's share of that L2 (below
    /// that its second read would come from memory).
    pub fn can_stream(&self, l2: usize) -> bool {
        let split = GroupNormShape {
            fused_chunks: 0,
            streamed: false,
            ..*self
        };
        !split.one_launch()
            && self
                .streamed_layout()
                .is_some_and(|l| 2 * l.unit_bytes <= l2 / STREAM_L2_SHARE)
    }

    /// The streamed form's cut (`Streamed`), where one exists.
    fn streamed_layout(&self) -> Option<Streamed> {
        self.streamed_layout_within(stream_unit_bytes())
    }

    /// The streamed form's cut with units of at most `unit_bytes`.
    fn streamed_layout_within(&self, unit_bytes: usize) -> Option<Streamed> {
        if self.groups == 0
            || !self.c.is_multiple_of(8)
            || !self.c.is_multiple_of(self.groups)
            || !(self.c / self.groups).is_multiple_of(2)
            || self.hw == 0
        {
            return None;
        }
        let slices = (1..=self.groups)
            .filter(|s| self.groups.is_multiple_of(*s))
            .find(|s| {
                let cs = self.c / s;
                cs.is_multiple_of(8)
                    && cs / 8 <= STREAM_THREADS
                    && cs >= STREAM_MIN_SLICE.min(self.c)
                    && self.hw * cs * 2 <= unit_bytes
            })?;
        let cs8 = self.c / slices / 8;
        let threads = STREAM_THREADS / cs8 * cs8;
        let tile_px = threads / cs8 * STREAM_PER_THREAD;
        let tiles = self.hw.div_ceil(tile_px);
        let units = self.n * slices;
        // Tickets and element offsets in 32 bits where the kernel keeps them so.
        (2 * units * tiles < i32::MAX as usize && self.n * self.hw * self.c < 1 << 40).then_some(
            Streamed {
                slices,
                threads,
                tile_px,
                tiles,
                units,
                unit_bytes: self.hw * self.c / slices * 2,
            },
        )
    }

    /// The streamed form's counters: the ticket, then three a unit.
    fn counter_words(l: &Streamed) -> usize {
        1 + 3 * l.units
    }

    /// Bytes of the streamed form's counters, rounded to 16 (where its sums start).
    fn counter_bytes(l: &Streamed) -> usize {
        (4 * Self::counter_words(l)).next_multiple_of(16)
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
    streamed: CudaFunction,
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
            streamed: m.load_function("group_norm_nhwc_streamed_f16x8")?,
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
        if s.streamed {
            // SAFETY: per the caller's contract.
            return unsafe { self.launch_streamed(stream, x, gamma, beta, y, scratch, s) };
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

    /// The streamed form (`s.streamed`): the counters zeroed, then one launch of two blocks per
    /// tile, one summing it and one normalising it (group_norm.cu says how they take turns).
    ///
    /// # Safety
    /// As for `launch`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_streamed(
        &self,
        stream: &CudaStream,
        x: Ptr,
        gamma: Ptr,
        beta: Ptr,
        y: Ptr,
        scratch: Ptr,
        s: &GroupNormShape,
    ) -> Result<(), GpuError> {
        let Some(l) = s.streamed_layout() else {
            return Err(shape_err(
                "group_norm",
                format!("{s:?} has no streamed form"),
            ));
        };
        if !super::elementwise::aligned16(&[x, y, scratch]) {
            return Err(shape_err(
                "group_norm",
                "the streamed form reads x and writes y and its scratch 16 bytes at a time".into(),
            ));
        }
        let order = l.order(super::l2_bytes(stream));
        let words = GroupNormShape::counter_words(&l);
        // SAFETY: the scratch holds `scratch_bytes()`, of which the counters are the first
        // `counter_bytes` (at least 4 * words); the stream is live. A memset is a node of a
        // capture like a launch.
        unsafe { sys::cuMemsetD32Async(scratch, 0, words, stream.cu_stream()) }.result()?;
        let i = |v: usize| Arg::I(v as i32);
        // SAFETY: matches group_norm_nhwc_streamed_f16x8 (const uint4*, 2 const half*, uint4*,
        // unsigned*, float2*, 10 int, float); two blocks a tile of every unit, blockDim a
        // multiple of the slice's vectors a pixel (at most 256, the kernel's shared arrays),
        // tile_px a multiple of the pixels a block step covers; tiles <= lead <= (gate - 1) *
        // tiles (`Streamed::order`); counters zeroed just before on the same stream, the sums
        // after them (16-byte aligned), sized by `scratch_bytes`.
        unsafe {
            launch(
                stream,
                &self.streamed,
                LaunchConfig {
                    grid_dim: ((2 * l.units * l.tiles) as u32, 1, 1),
                    block_dim: (l.threads as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::P(x),
                    Arg::P(gamma),
                    Arg::P(beta),
                    Arg::P(y),
                    Arg::P(scratch),
                    Arg::P(scratch + GroupNormShape::counter_bytes(&l) as u64),
                    i(s.hw),
                    i(s.c),
                    i(s.groups),
                    i(l.slices),
                    i(l.tile_px),
                    i(l.tiles),
                    i(l.units),
                    i(order.lead),
                    i(order.gate),
                    i(usize::from(s.silu)),
                    Arg::F(s.eps),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(n: usize, hw: usize, c: usize) -> GroupNormShape {
        GroupNormShape {
            n,
            hw,
            c,
            groups: 32,
            eps: 1e-6,
            silu: true,
            fused_chunks: 0,
            streamed: false,
        }
    }

    const H100_L2: usize = 50 << 20;

    #[test]
    fn the_streamed_form_cuts_units_of_a_few_mib_into_whole_tiles() {
        // The VAE's 256x256 images: 128 channels are four slices of 8 groups (4 MiB each), 64
        // tiles of 1024 pixels; 256 channels eight.
        let l = shape(24, 65536, 128).streamed_layout().unwrap();
        assert_eq!(
            (
                l.slices,
                l.threads,
                l.tile_px,
                l.tiles,
                l.units,
                l.unit_bytes
            ),
            (4, 256, 1024, 64, 96, 4 << 20)
        );
        let l = shape(24, 65536, 256).streamed_layout().unwrap();
        assert_eq!(
            (l.slices, l.threads, l.tile_px, l.units),
            (8, 256, 1024, 192)
        );
        // 320 channels: 40 vectors a pixel, six pixels a step.
        let l = shape(2, 64 * 96, 320).streamed_layout().unwrap();
        assert_eq!((l.slices, l.threads, l.tile_px), (1, 240, 96));
        assert_eq!(l.tiles, (64 * 96usize).div_ceil(96));
        // Smaller units cut thinner slices, down to 16 channels (a 32-byte sector a pixel):
        // 2 MiB units of that image hold 16, 1 MiB ones would need 8 and there are none.
        let l = shape(24, 65536, 128)
            .streamed_layout_within(2 << 20)
            .unwrap();
        assert_eq!((l.slices, l.units, l.unit_bytes), (8, 192, 2 << 20));
        assert!(shape(24, 65536, 128)
            .streamed_layout_within(1 << 20)
            .is_none());
        // Odd channel vectors or group widths have none; small norms keep their one launch.
        assert!(shape(1, 4096, 100).streamed_layout().is_none());
        assert!(!shape(2, 1024, 320).can_stream(H100_L2));
        assert!(shape(1, 4096, 512).can_stream(H100_L2));
        // Two units must fit the form's share of L2: not on a GPU with 6 MiB.
        assert!(!shape(1, 4096, 512).can_stream(6 << 20));
        // It pays where x outgrows L2: 24 of the VAE's 64x64 images of 512 (96 MiB), not one.
        assert!(shape(24, 4096, 512).stream_pays(H100_L2));
        assert!(!shape(1, 4096, 512).stream_pays(H100_L2));
        assert!(!shape(24, 1024, 320).stream_pays(H100_L2));
        // Sums from an epilogue do not stop it: the executor turns them off.
        let fused = GroupNormShape {
            fused_chunks: 44,
            ..shape(24, 65536, 128)
        };
        assert!(fused.can_stream(H100_L2));
    }

    #[test]
    fn the_streamed_order_keeps_as_many_units_in_flight_as_half_the_l2_holds() {
        // 4 MiB units on an H100: six units between their two reads, the normalisations three
        // units behind the sums.
        let l = shape(24, 65536, 128).streamed_layout().unwrap();
        assert_eq!(l.order(H100_L2), StreamOrder { lead: 192, gate: 6 });
        // 1 MiB units: 25 in flight, the normalisations 13 behind.
        let l = shape(24, 1024, 512).streamed_layout().unwrap();
        assert_eq!(
            l.order(H100_L2),
            StreamOrder {
                lead: 208,
                gate: 25
            }
        );
        // Never fewer than two units, whatever the L2, nor less than a unit ahead.
        assert_eq!(l.order(0), StreamOrder { lead: 16, gate: 2 });
    }

    #[test]
    fn every_streamed_block_waits_only_for_blocks_that_took_their_tickets_before_it() {
        for (s, l2) in [
            (shape(24, 65536, 128), H100_L2),
            (shape(24, 65536, 128), 0),
            (shape(24, 1024, 512), H100_L2),
            (shape(3, 4096, 256), 12 << 20),
            (shape(2, 64 * 96, 320), 0),
            (shape(1, 16384, 512), H100_L2),
        ] {
            let l = s.streamed_layout().unwrap();
            let o = l.order(l2);
            let (m, t) = (l.items(), l.tiles);
            assert!(t <= o.lead && o.lead <= (o.gate - 1) * t, "{s:?} {o:?}");
            // Every ticket is one item, every item one ticket.
            let (mut sum_at, mut norm_at) = (vec![usize::MAX; m], vec![usize::MAX; m]);
            for ticket in 0..2 * m {
                let (normalise, i) = l.item(o, ticket);
                let at = if normalise { &mut norm_at } else { &mut sum_at };
                assert_eq!(at[i], usize::MAX, "{s:?}: tile {i} twice");
                at[i] = ticket;
            }
            assert!(sum_at.iter().chain(&norm_at).all(|&at| at < 2 * m));
            for i in 0..m {
                let u = i / t;
                // A normalisation waits for its unit's sums...
                let sums = sum_at[u * t..(u + 1) * t].iter().max().unwrap();
                assert!(*sums < norm_at[i], "{s:?}: N({i}) before its sums");
                // ... and a sum for unit u - gate's normalisations.
                if u >= o.gate {
                    let w = u - o.gate;
                    let written = norm_at[w * t..(w + 1) * t].iter().max().unwrap();
                    assert!(
                        *written < sum_at[i],
                        "{s:?}: S({i}) before unit {w} is written"
                    );
                }
            }
        }
    }

    #[test]
    fn the_scratch_holds_either_form() {
        for s in [
            shape(24, 65536, 128),
            shape(1, 16384, 512),
            shape(3, 4096, 256),
        ] {
            let l = s.streamed_layout().unwrap();
            let streamed = GroupNormShape::counter_bytes(&l) + 8 * s.n * s.groups * (l.tiles + 1);
            let split = 8 * s.n * s.groups * (s.chunks() + 1);
            assert_eq!(s.scratch_bytes(), streamed.max(split), "{s:?}");
            let on = GroupNormShape {
                streamed: true,
                ..s
            };
            assert_eq!(on.scratch_bytes(), streamed, "{s:?}");
            assert!(!on.one_launch());
        }
    }
}

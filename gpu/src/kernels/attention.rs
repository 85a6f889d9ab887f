//! Attention: a fused flash-style kernel for the head dims the models use (the UNet's 40/80/160,
//! whisper's 64), and, for the rest (the VAE's single 512-wide head), the row softmax between
//! two batched cuBLASLt GEMMs (see `plan`: scores = q kᵀ / sqrt(d), out = p v).

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{grid, launch, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/mma.cuh"),
    include_str!("../../kernels/attention.cu")
);
const WARPS_PER_BLOCK: u32 = 8;
/// The widest row the attention lowering sends here (whisper's 1500 keys fit).
pub const MAX_COLS: usize = 1536;

/// Head dims the fused kernel is instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 4] = [40, 64, 80, 160];
/// Queries per MMA tile of the fused kernel, and warps per block.
const FLASH_WARP_QUERIES: usize = 16;
const FLASH_WARPS: usize = 4;
/// Head dims with a kernel whose warps own two tiles of 16 queries (`flash_attention_{d}_x2`).
const FLASH_X2_HEAD_DIMS: [usize; 3] = [40, 64, 80];

/// Tiles of 16 queries each warp of the fused kernel owns at head dim `d`: two (every K and V
/// fragment read from shared memory then feeds two products) with the experiment
/// `LIPSTREAM_FLASH_ROWS32` where that kernel exists, else one. Timed on an H100 (2026-12-07),
/// two tiles were slower: avatar batches of 16 and 24 +0.5 / +0.6 % and -0.3 / +1.1 %, whisper's
/// one window +8.7 / +4.4 %; 16 windows -3.6 / -0.9 %.
fn flash_tiles(d: usize) -> usize {
    if super::Experiment::FlashRows32.on() && FLASH_X2_HEAD_DIMS.contains(&d) {
        2
    } else {
        1
    }
}

/// Queries per block of the fused kernel at head dim `d`.
fn flash_block_queries(d: usize) -> usize {
    FLASH_WARPS * FLASH_WARP_QUERIES * flash_tiles(d)
}

/// Whether the fused kernel runs attention with head dim `d` (values as wide as keys).
pub fn flash_supports(d: usize, dv: usize) -> bool {
    d == dv && FLASH_HEAD_DIMS.contains(&d)
}

/// Keys per tile of the fused kernel.
const FLASH_KEYS: usize = 64;
/// Blocks the fused kernel is given at least, where splitting the keys allows: every block
/// walks its keys one tile after another, so a grid of a block or so per SM (whisper's one
/// window: 24 x 6 blocks of 1500 keys) leaves most of each SM idle.
const FLASH_MIN_BLOCKS: usize = 512;
/// The most key splits, and the fewest key tiles a split walks.
const FLASH_MAX_SPLITS: usize = 8;
const FLASH_MIN_SPLIT_TILES: usize = 2;

/// Into how many runs of key tiles the fused kernel splits each (image, head), every run
/// non-empty: 1 when the grid is large enough already.
pub fn flash_splits(batch: usize, lq: usize, lk: usize, heads: usize, d: usize) -> usize {
    let blocks = lq.div_ceil(flash_block_queries(d)) * heads * batch;
    let tiles = lk.div_ceil(FLASH_KEYS);
    let want = FLASH_MIN_BLOCKS
        .div_ceil(blocks.max(1))
        .min(FLASH_MAX_SPLITS)
        .min(tiles / FLASH_MIN_SPLIT_TILES)
        .max(1);
    // Equal runs of tiles; the last may be shorter, never empty.
    tiles.div_ceil(tiles.div_ceil(want))
}

/// fp32 scratch bytes the fused kernel's key splits leave for the join: each split's
/// unnormalised output and its rows' (max, sum).
pub fn flash_scratch_bytes(
    batch: usize,
    lq: usize,
    heads: usize,
    d: usize,
    splits: usize,
) -> usize {
    if splits <= 1 {
        return 0;
    }
    4 * splits * batch * lq * heads * (d + 2)
}

/// The compiled kernels.
pub struct Attention {
    any: CudaFunction,
    upto1024: CudaFunction,
    upto1536: CudaFunction,
    /// (head dim, query tiles per warp, kernel).
    flash: Vec<(usize, usize, CudaFunction)>,
    join: CudaFunction,
}

impl Attention {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let module = super::compile(device, "attention", SRC)?;
        let mut flash = Vec::new();
        for d in FLASH_HEAD_DIMS {
            flash.push((d, 1, module.load_function(&format!("flash_attention_{d}"))?));
        }
        for d in FLASH_X2_HEAD_DIMS {
            flash.push((
                d,
                2,
                module.load_function(&format!("flash_attention_{d}_x2"))?,
            ));
        }
        Ok(Attention {
            any: module.load_function("softmax_rows_f16")?,
            upto1024: module.load_function("softmax_rows_f16x2_1024")?,
            upto1536: module.load_function("softmax_rows_f16x2_1536")?,
            flash,
            join: module.load_function("flash_attention_join")?,
        })
    }

    /// o = softmax(q kᵀ / sqrt(d)) v per image and head, fused. q, o [batch, lq, heads*d],
    /// k, v [batch, lk, heads*d], token-major. With `splits` > 1 (`flash_splits`), the keys
    /// are walked in that many runs side by side, left in `part`, then joined.
    ///
    /// # Safety
    /// Each address must hold its tensor at that shape, 16-byte aligned; with splits > 1,
    /// `part` must hold `flash_scratch_bytes`, 8-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn flash(
        &self,
        stream: &CudaStream,
        (q, k, v, o): (Ptr, Ptr, Ptr, Ptr),
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        d: usize,
        (ldq, ldkv): (usize, usize),
        (splits, part): (usize, Ptr),
    ) -> Result<(), GpuError> {
        let tiles = flash_tiles(d);
        let Some((_, _, func)) = self
            .flash
            .iter()
            .find(|(hd, mt, _)| *hd == d && *mt == tiles)
        else {
            return Err(super::shape_err(
                "flash_attention",
                format!("head dim {d} (built for {FLASH_HEAD_DIMS:?})"),
            ));
        };
        let key_tiles = lk.div_ceil(FLASH_KEYS);
        if splits == 0
            || (splits > 1
                && (!part.is_multiple_of(8)
                    || (splits - 1) * key_tiles.div_ceil(splits) >= key_tiles))
        {
            return Err(super::shape_err(
                "flash_attention",
                format!("{splits} key splits of {key_tiles} tiles (scratch {part:#x})"),
            ));
        }
        if ldq < heads * d || ldkv < heads * d || !ldq.is_multiple_of(8) || !ldkv.is_multiple_of(8)
        {
            return Err(super::shape_err(
                "flash_attention",
                format!("row strides {ldq}/{ldkv} for {heads} heads of {d} (whole 16-byte rows)"),
            ));
        }
        if [q, k, v, o].iter().any(|p| !p.is_multiple_of(16)) || lk == 0 {
            return Err(super::shape_err(
                "flash_attention",
                format!(
                    "{lk} keys, operands {q:#x} {k:#x} {v:#x} {o:#x} (16-byte aligned, keys > 0)"
                ),
            ));
        }
        // Four warps share each key tile they load. (Fewer warps per block for grids smaller
        // than two blocks per SM measured slower on an H100: every block reloads the keys.
        // Eight warps at head dim 40 for the UNet's 32x32 self-attention at 16 images measured
        // no faster, 2026-12-06.)
        let warps = FLASH_WARPS;
        let cfg = LaunchConfig {
            grid_dim: (
                lq.div_ceil(warps * FLASH_WARP_QUERIES * tiles) as u32,
                heads as u32,
                (batch * splits) as u32,
            ),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let args = [
            Arg::P(q),
            Arg::P(k),
            Arg::P(v),
            Arg::P(o),
            Arg::I(lq as i32),
            Arg::I(lk as i32),
            Arg::I(heads as i32),
            Arg::I(ldq as i32),
            Arg::I(ldkv as i32),
            Arg::F(scale_log2),
            Arg::I(splits as i32),
            Arg::P(part),
        ];
        // SAFETY: (const half* x3, half*, int x5, float, int, float*) as the kernel
        // declares; one block per 16 x tiles x warps queries of one (head, image, key split),
        // the kernel of that many tiles a warp (found above), rows past
        // lq and keys past lk are never read or written, every split's run of keys is non-empty
        // (checked above); the caller vouches for the operands' sizes and the scratch's,
        // alignment checked above (head offsets are multiples of d, itself a multiple of 8).
        unsafe { launch(stream, func, cfg, &args) }?;
        if splits == 1 {
            return Ok(());
        }
        let join = [
            Arg::P(part),
            Arg::P(o),
            Arg::I(batch as i32),
            Arg::I(lq as i32),
            Arg::I(heads as i32),
            Arg::I(d as i32),
            Arg::I(splits as i32),
            Arg::F(scale_log2),
        ];
        // SAFETY: (const float*, half*, int x5, float) as the kernel declares; one thread per
        // pair of o's elements (d is even), threads past them return; `part` holds what the
        // launch above left, at the layout both kernels share.
        unsafe {
            launch(
                stream,
                &self.join,
                grid(batch * lq * heads * d / 2, 256),
                &join,
            )
        }
    }

    /// x [rows, cols] = softmax(x) along each row, in place.
    ///
    /// # Safety
    /// x must hold rows*cols elements.
    pub unsafe fn softmax(
        &self,
        stream: &CudaStream,
        x: Ptr,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        if cols == 0 || cols > MAX_COLS {
            return Err(super::shape_err(
                "softmax",
                format!("{cols} columns (1..={MAX_COLS})"),
            ));
        }
        let args = [Arg::P(x), Arg::L(rows as i64), Arg::I(cols as i32)];
        // SAFETY: each kernel takes (half or half2*, long, int); one warp per row, surplus warps
        // return before touching memory; the register kernels get even widths within their
        // capacity and 4-byte aligned rows (checked above).
        unsafe {
            launch(
                stream,
                if !cols.is_multiple_of(2) || !x.is_multiple_of(4) {
                    &self.any
                } else if cols <= 1024 {
                    &self.upto1024
                } else {
                    &self.upto1536
                },
                grid(rows * 32, 32 * WARPS_PER_BLOCK),
                &args,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_splits_fill_small_grids_and_are_never_empty() {
        // Whisper's window, the UNet's 32x32 self-attention alone and at 16 images, its
        // cross-attention (50 keys: one tile, nothing to split).
        assert_eq!(flash_splits(1, 1500, 1500, 6, 64), 4);
        assert_eq!(flash_splits(1, 1024, 1024, 8, 40), 4);
        assert_eq!(flash_splits(16, 1024, 1024, 8, 40), 1);
        assert_eq!(flash_splits(1, 1024, 50, 8, 40), 1);
        for batch in [1, 2, 16] {
            for lq in [1, 64, 300, 1500] {
                for lk in [1, 49, 64, 65, 200, 1000, 1500, 4096] {
                    let s = flash_splits(batch, lq, lk, 6, 64);
                    let tiles = lk.div_ceil(FLASH_KEYS);
                    assert!((1..=FLASH_MAX_SPLITS).contains(&s));
                    // The last split starts before the last tile.
                    assert!(
                        (s - 1) * tiles.div_ceil(s) < tiles,
                        "{batch} {lq} {lk}: {s}"
                    );
                    assert_eq!(flash_scratch_bytes(batch, lq, 6, 64, s) == 0, s == 1);
                }
            }
        }
    }
}

//! GEMMs of at most 64 rows against a weight matrix, split over K so that every SM streams a
//! slice of the weights (`gpu/kernels/skinny_gemm.cu`): `nn.Linear` on 16 or 64 tokens and
//! the convolutions of 4x4 and 8x8 images (their im2col done on the fly) at one image a batch.
//! An experiment (`LIPSTREAM_SKINNY=1`, off by default) until it is measured on the GPU machine.
//!
//! The slices' sums meet in an fp32 buffer with one counter per 64-column tile, both owned by
//! the runtime: each launch leaves them zero again, so GEMMs on one stream share them.

use cudarc::driver::{sys, CudaFunction, CudaStream, LaunchConfig};

use super::elementwise::aligned16;
use super::{launch, shape_err, Arg, Ptr};
use crate::conv::ConvShape;
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/skinny_gemm.cu")
);

/// The most rows a GEMM may have.
pub const MAX_ROWS: usize = 64;
/// Columns of W a block covers.
const TILE_COLS: usize = 64;
/// Warps splitting a block's slice of K, each 32 k at a time.
const WARPS_K: usize = 4;
const CHUNK: usize = 32;
/// The fewest k a slice keeps: one chunk for each of the block's warps.
const MIN_SLICE: usize = WARPS_K * CHUNK;
/// Blocks per SM the split aims for: two keep enough loads in flight to stream at the memory's
/// speed. The 64-row kernel's block has twice the warps and (at 186 registers a thread on sm_90)
/// only one fits an SM, so it aims for one.
fn blocks_per_sm(m: usize) -> usize {
    if m > 32 {
        1
    } else {
        2
    }
}
/// Column tiles the counters cover (n <= 65536).
pub const MAX_TILES: usize = 1024;
/// Bytes of the counters at the start of the runtime's buffer (the sums follow).
pub const COUNTER_BYTES: usize = 4 * MAX_TILES;

/// The left operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// A row-major [m, k] matrix, rows `lda` elements apart.
    Matrix { lda: usize },
    /// The implicit im2col of convolution `shape`'s NHWC input: m = n·ho·wo, k = kh·kw·c.
    Conv(ConvShape),
}

/// d [m, n] (rows `ldc` apart) = rows · w [n, k]ᵀ (rows `ldw` apart) (+ bias [n]) (+ residual,
/// rows `ldc` apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkinnyGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub rows: Rows,
    pub ldw: usize,
    pub ldc: usize,
}

impl SkinnyGemm {
    /// A channels-last convolution against its [o, kh, kw, c] filter.
    pub fn conv(s: &ConvShape) -> Self {
        let (ho, wo) = s.out_hw();
        let k = s.kh * s.kw * s.c;
        SkinnyGemm {
            m: s.n * ho * wo,
            n: s.o,
            k,
            rows: Rows::Conv(*s),
            ldw: k,
            ldc: s.o,
        }
    }

    /// `nn.Linear` on `m` rows (`lda`, `ldc`: row strides of x and of the output).
    pub fn linear(m: usize, k: usize, n: usize, lda: usize, ldc: usize) -> Self {
        SkinnyGemm {
            m,
            n,
            k,
            rows: Rows::Matrix { lda },
            ldw: k,
            ldc,
        }
    }

    /// Whether the kernel computes it: 1..=64 rows, whole 64-column tiles, whole 32-k chunks,
    /// 16-byte rows (8-channel vectors that never straddle a filter tap), 32-bit indices.
    pub fn fits(&self) -> bool {
        let rows_ok = match self.rows {
            Rows::Matrix { lda } => lda >= self.k && lda.is_multiple_of(8),
            Rows::Conv(s) => {
                s.nhwc
                    && s.groups == 1
                    && s.c.is_multiple_of(8)
                    && s.n * s.h * s.w * s.c <= i32::MAX as usize
            }
        };
        rows_ok
            && (1..=MAX_ROWS).contains(&self.m)
            && self.n.is_multiple_of(TILE_COLS)
            && self.n / TILE_COLS <= MAX_TILES
            && self.k > 0
            && self.k.is_multiple_of(CHUNK)
            && self.ldw >= self.k
            && self.ldw.is_multiple_of(8)
            && self.ldc >= self.n
            && self.ldc.is_multiple_of(4)
            && self.n * self.ldw <= i32::MAX as usize
            && self.m * self.ldc <= i32::MAX as usize
    }

    /// (slices of K, k per slice) on a GPU of `sms` SMs: enough blocks to fill every SM
    /// (`blocks_per_sm`), no slice under MIN_SLICE, and the slices' fp32 sums (slices · m · n · 4
    /// bytes) under a quarter of the weights' bytes (n · k · 2).
    pub fn split(&self, sms: usize) -> (usize, usize) {
        let (per_sm, grain) = match self.form() {
            Form::Registers => (blocks_per_sm(self.m), CHUNK),
            Form::Staged => (STAGED_BLOCKS_PER_SM, STAGED_K),
        };
        let tiles = self.n / TILE_COLS;
        let wanted = (per_sm * sms.max(1)).div_ceil(tiles.max(1));
        let slices = wanted
            .min(self.k / (8 * self.m.max(1)))
            .min(self.k / MIN_SLICE)
            .max(1);
        let ks = self.k.div_ceil(slices).next_multiple_of(grain);
        (self.k.div_ceil(ks), ks)
    }

    /// The staged form wherever k is whole 64-k stages.
    pub fn form(&self) -> Form {
        if self.k.is_multiple_of(STAGED_K) {
            Form::Staged
        } else {
            Form::Registers
        }
    }

    /// Bytes of the runtime's buffer it needs: the counters, then [m, n] fp32 sums.
    pub fn scratch_bytes(&self) -> usize {
        COUNTER_BYTES + 4 * self.m * self.n
    }
}

/// How a block brings its tiles in: straight into registers (two chunks of 32 k ahead), or
/// through shared memory by cp.async, STAGES stages of 64 k (k a multiple of 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Registers,
    Staged,
}

/// Stages of the staged form (as compiled: `SK_STAGED(.., NS)` in the source).
const STAGES: usize = 4;
/// Bytes of one staged row: 64 k plus 8 of padding, as halves.
const STAGED_ROW_BYTES: usize = 144;
const STAGED_K: usize = 64;
/// Blocks per SM the staged form's split aims for: three of the 64-row kernel's fit an H100's
/// shared memory.
const STAGED_BLOCKS_PER_SM: usize = 3;

/// Dynamic shared memory of the staged form for `rows` (16, 32 or 64) rows.
fn staged_smem_bytes(rows: usize) -> usize {
    STAGES * (TILE_COLS + rows) * STAGED_ROW_BYTES
}

/// The compiled kernels (16, 32 and 64 rows, each form) and the GPU's SM count.
pub struct Skinny {
    registers: [CudaFunction; 3],
    staged: [CudaFunction; 3],
    sms: usize,
}

impl Skinny {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "skinny_gemm", SRC)?;
        let sms = device
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let load = |name: &str| m.load_function(name);
        let staged = [
            load("skinny_staged_m16")?,
            load("skinny_staged_m32")?,
            load("skinny_staged_m64")?,
        ];
        for (f, rows) in staged.iter().zip([16, 32, 64]) {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                staged_smem_bytes(rows) as i32,
            )?;
        }
        Ok(Skinny {
            registers: [
                load("skinny_gemm_m16")?,
                load("skinny_gemm_m32")?,
                load("skinny_gemm_m64")?,
            ],
            staged,
            sms: sms.max(1) as usize,
        })
    }

    /// Runs `g`. `scratch` is the runtime's zeroed buffer of at least `g.scratch_bytes()`
    /// (left zero again); `bias` and `residual` may be 0.
    ///
    /// # Safety
    /// a, w, bias, residual and d must hold `g`'s operands; nothing else may use `scratch`
    /// while the launch runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        stream: &CudaStream,
        g: &SkinnyGemm,
        a: Ptr,
        w: Ptr,
        bias: Ptr,
        residual: Ptr,
        d: Ptr,
        scratch: Ptr,
    ) -> Result<(), GpuError> {
        let aligned =
            aligned16(&[a, w, scratch]) && [bias, residual, d].iter().all(|p| p.is_multiple_of(8));
        if !g.fits() || !aligned {
            return Err(shape_err(
                "skinny_gemm",
                format!("{g:?} (a {a:#x}, w {w:#x}, scratch {scratch:#x} 16-byte aligned; bias {bias:#x}, residual {residual:#x}, d {d:#x} 8-byte)"),
            ));
        }
        let form = g.form();
        let size = match g.m {
            0..=16 => 0,
            17..=32 => 1,
            _ => 2,
        };
        let (slices, ks) = g.split(self.sms);
        let cfg = match form {
            Form::Registers => LaunchConfig {
                grid_dim: ((g.n / TILE_COLS) as u32, slices as u32, 1),
                block_dim: (32 * (if size == 2 { 2 } else { 1 } * WARPS_K) as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            Form::Staged => LaunchConfig {
                grid_dim: ((g.n / TILE_COLS) as u32, slices as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: staged_smem_bytes(16 << size) as u32,
            },
        };
        let func = match form {
            Form::Registers => &self.registers[size],
            Form::Staged => &self.staged[size],
        };
        // The image geometry, all zero for a plain matrix.
        let (lda, conv, geo) = match g.rows {
            Rows::Matrix { lda } => (lda, 0, [0usize; 10]),
            Rows::Conv(s) => {
                let (ho, wo) = s.out_hw();
                let geo = [
                    s.h,
                    s.w,
                    s.c,
                    ho,
                    wo,
                    s.kw,
                    s.stride[0],
                    s.stride[1],
                    s.pad[0],
                    s.pad[1],
                ];
                (0, 1, geo)
            }
        };
        let mut args = vec![
            Arg::P(a),
            Arg::P(w),
            Arg::P(bias),
            Arg::P(residual),
            Arg::P(d),
            Arg::P(scratch + COUNTER_BYTES as u64),
            Arg::P(scratch),
            Arg::I(g.m as i32),
            Arg::I(g.n as i32),
            Arg::I(g.k as i32),
            Arg::I(ks as i32),
            Arg::I(lda as i32),
            Arg::I(g.ldw as i32),
            Arg::I(g.ldc as i32),
            Arg::I(conv),
        ];
        args.extend(geo.iter().map(|&v| Arg::I(v as i32)));
        // SAFETY: matches skinny_gemm_m{16,32,64} and skinny_staged_m{16,32,64} (5 half pointers,
        // float*, unsigned*, 18 int), the staged ones given their dynamic shared memory (its
        // limit raised at load); slices are whole 32-k chunks (64-k stages for the staged
        // form, whose k `form` checked);
        // `fits` (checked) bounds every index to 32 bits, the rows to the kernel's tile and
        // the columns to whole tiles; the vectors read and written are aligned (checked); the
        // scratch holds the counters and [m, n] sums (caller), which the kernel leaves zero.
        unsafe { launch(stream, func, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(n: usize, c: usize, hw: usize, o: usize, k: usize, stride: usize) -> ConvShape {
        ConvShape {
            n,
            c,
            h: hw,
            w: hw,
            o,
            kh: k,
            kw: k,
            stride: [stride, stride],
            pad: [k / 2, k / 2],
            groups: 1,
            nhwc: true,
        }
    }

    #[test]
    fn the_unets_small_stages_fit_and_larger_ones_do_not() {
        // 4x4 and 8x8 3x3 convolutions at one image, a strided one, and 16- and 64-row linears.
        assert!(SkinnyGemm::conv(&conv(1, 1280, 4, 1280, 3, 1)).fits());
        assert!(SkinnyGemm::conv(&conv(1, 2560, 8, 1280, 3, 1)).fits());
        assert!(SkinnyGemm::conv(&conv(1, 1280, 8, 1280, 3, 2)).fits());
        assert!(SkinnyGemm::linear(64, 1280, 10240, 1280, 10240).fits());
        assert!(SkinnyGemm::linear(16, 5120, 1280, 5120, 1280).fits());
        // 256 rows, columns off the 64 grid, channels off the 8 grid, NCHW.
        assert!(!SkinnyGemm::conv(&conv(1, 640, 16, 640, 3, 1)).fits());
        assert!(!SkinnyGemm::linear(64, 1280, 1000, 1280, 1000).fits());
        assert!(!SkinnyGemm::conv(&conv(1, 4, 4, 64, 3, 1)).fits());
        let mut nchw = conv(1, 1280, 4, 1280, 3, 1);
        nchw.nhwc = false;
        assert!(!SkinnyGemm::conv(&nchw).fits());
        assert!(!SkinnyGemm::linear(0, 1280, 1280, 1280, 1280).fits());
    }

    #[test]
    fn splits_cover_k_in_whole_chunks_and_bound_the_sums() {
        for (m, k, n) in [
            (16, 11520, 1280),
            (64, 11520, 1280),
            (64, 1280, 10240),
            (64, 1280, 1280),
            (16, 128, 64),
            (25, 5120, 5120),
            (50, 384, 640),
        ] {
            let g = SkinnyGemm::linear(m, k, n, k, n);
            let (slices, ks) = g.split(132);
            assert!(ks.is_multiple_of(CHUNK), "{m}x{k}x{n}: {ks}");
            assert!(slices * ks >= k && (slices - 1) * ks < k, "{m}x{k}x{n}");
            assert!(
                slices == 1 || 4 * (slices * m * n * 4) <= n * k * 2,
                "{m}x{k}x{n}"
            );
            assert!(slices == 1 || ks >= MIN_SLICE, "{m}x{k}x{n}: {ks}");
        }
        // The 4x4 1280-channel convolution spreads over both blocks of every SM.
        let g = SkinnyGemm::conv(&conv(1, 1280, 4, 1280, 3, 1));
        let (slices, _) = g.split(132);
        assert!(20 * slices >= 264, "{slices}");
    }
}

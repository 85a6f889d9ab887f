//! Data movement: permutes (layout changes), strided row copies (concat, slice), NHWC padding,
//! convolution patches (im2col) for convolutions lowered to one GEMM.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{elems, launch, rank5, Arg, Ptr};
use crate::conv::ConvShape;
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/layout.cu")
);

/// Most inputs `Layout::concat_rows` joins in one launch.
const CONCAT_PARTS: usize = 4;

/// One input of a row concatenation: `cols` elements of each row, rows `xs` elements apart.
#[derive(Clone, Copy, Debug)]
pub struct RowsPart {
    pub x: Ptr,
    pub cols: usize,
    pub xs: usize,
}

/// Whether rows copy as 16-byte vectors: every address, width and stride a multiple of 8
/// halves, and the vector count small enough for the kernel's int indices.
fn vector_rows(parts: &[RowsPart], y: Ptr, rows: usize, ys: usize) -> bool {
    let cols: usize = parts.iter().map(|p| p.cols).sum();
    !parts.is_empty()
        && ys.is_multiple_of(8)
        && cols <= ys
        && rows
            .checked_mul(cols / 8)
            .is_some_and(|n| n < i32::MAX as usize)
        && parts
            .iter()
            .all(|p| p.cols.is_multiple_of(8) && p.xs.is_multiple_of(8))
        && super::elementwise::aligned16(&[y])
        && parts.iter().all(|p| super::elementwise::aligned16(&[p.x]))
}

/// The compiled kernels.
pub struct Layout {
    permute: CudaFunction,
    permute8: CudaFunction,
    copy_rows: CudaFunction,
    gather_rows: CudaFunction,
    concat_rows: CudaFunction,
    pad_nhwc: CudaFunction,
    pad_nhwc_x8: CudaFunction,
    im2col: CudaFunction,
}

impl Layout {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "layout", SRC)?;
        Ok(Layout {
            permute: m.load_function("permute_f16")?,
            permute8: m.load_function("permute_f16x8")?,
            copy_rows: m.load_function("copy_rows_f16")?,
            gather_rows: m.load_function("gather_rows_f16")?,
            concat_rows: m.load_function("concat_rows_f16x8")?,
            pad_nhwc: m.load_function("pad_nhwc_f16")?,
            pad_nhwc_x8: m.load_function("pad_nhwc_f16x8")?,
            im2col: m.load_function("im2col_nhwc_f16x8")?,
        })
    }

    /// y (contiguous, `dims`) gathers x through `strides` (elements, one per output axis).
    ///
    /// # Safety
    /// x must hold every element the strides reach; y must hold `dims`' product.
    pub unsafe fn permute(
        &self,
        stream: &CudaStream,
        x: Ptr,
        y: Ptr,
        dims: &[usize],
        strides: &[usize],
    ) -> Result<(), GpuError> {
        let (d, s) = rank5(dims, strides)?;
        let n: usize = dims.iter().product();
        if s[4] == 1
            && d[4] % 8 == 0
            && s[..4].iter().all(|v| v % 8 == 0)
            && super::elementwise::aligned16(&[x, y])
        {
            let mut args = vec![Arg::P(x), Arg::P(y), Arg::L((n / 8) as i64)];
            args.extend(d[1..4].iter().map(|&v| Arg::I(v as i32)));
            args.push(Arg::I((d[4] / 8) as i32));
            args.extend(s[..4].iter().map(|&v| Arg::L(v)));
            // SAFETY: matches permute_f16x8 (const half*, half*, long, 4 int, 4 long); the
            // innermost axis is contiguous in x and every offset a multiple of 8 elements from
            // 16-byte aligned bases (checked), so each uint4 access is aligned and in bounds.
            return unsafe { launch(stream, &self.permute8, elems(n / 8), &args) };
        }
        let mut args = vec![Arg::P(x), Arg::P(y), Arg::L(n as i64)];
        args.extend(d[1..].iter().map(|&v| Arg::I(v as i32)));
        args.extend(s.iter().map(|&v| Arg::L(v)));
        // SAFETY: matches permute_f16 (const half*, half*, long, 4 int, 5 long); sizes per the
        // caller's contract.
        unsafe { launch(stream, &self.permute, elems(n), &args) }
    }

    /// y[r * ys + c] = x[r * xs + c] for r < rows, c < cols.
    ///
    /// # Safety
    /// x and y must hold the rows at their strides.
    pub unsafe fn copy_rows(
        &self,
        stream: &CudaStream,
        x: Ptr,
        y: Ptr,
        rows: usize,
        cols: usize,
        xs: usize,
        ys: usize,
    ) -> Result<(), GpuError> {
        let part = [RowsPart { x, cols, xs }];
        if vector_rows(&part, y, rows, ys) {
            // SAFETY: per this function's contract; alignment checked above.
            return unsafe { self.concat_rows_x8(stream, &part, y, rows, ys) };
        }
        let args = [
            Arg::P(x),
            Arg::P(y),
            Arg::L(rows as i64),
            Arg::L(cols as i64),
            Arg::L(xs as i64),
            Arg::L(ys as i64),
        ];
        // SAFETY: matches copy_rows_f16 (const half*, half*, 4 long).
        unsafe { launch(stream, &self.copy_rows, elems(rows * cols), &args) }
    }

    /// y [batch, rows, cols] = rows f .. f + rows of each x[b] ([batch, t, cols], rows `xs`
    /// apart), f = first[b] (fp16) rounded and clamped into [0, t - rows]: the first rows are
    /// read on the device, so a captured graph takes new ones with its inputs.
    ///
    /// # Safety
    /// x must hold batch * t rows at stride xs, first `batch` halves, y batch * rows * cols.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows(
        &self,
        stream: &CudaStream,
        x: Ptr,
        first: Ptr,
        y: Ptr,
        batch: usize,
        t: usize,
        rows: usize,
        cols: usize,
        xs: usize,
    ) -> Result<(), GpuError> {
        let n = batch * rows * cols;
        let shape = |reason: String| GpuError::Shape {
            kernel: "gather_rows",
            reason,
        };
        let int = |v: usize| i32::try_from(v).map_err(|_| shape(format!("{v} is too large")));
        if rows == 0 || rows > t {
            return Err(shape(format!("{rows} rows of {t}")));
        }
        let args = [
            Arg::P(x),
            Arg::P(first),
            Arg::P(y),
            Arg::I(int(t)?),
            Arg::I(int(rows)?),
            Arg::I(int(cols)?),
            Arg::L(xs as i64),
            Arg::I(int(n)?),
        ];
        // SAFETY: matches gather_rows_f16 (const half*, const half*, half*, 3 int, long, int);
        // every row read lies in x (its start is clamped to t - rows), sizes per the contract.
        unsafe { launch(stream, &self.gather_rows, elems(n), &args) }
    }

    /// The parts' rows side by side: y[r * ys + at + c] = part.x[r * part.xs + c] for c <
    /// part.cols, each part starting where the one before it ends (at = the widths before it).
    /// One launch when every width and stride keeps 16-byte vectors and there are at most
    /// four parts (every concatenation of the models), else one row copy per part.
    ///
    /// # Safety
    /// Each part's x must hold its rows at its stride, y the rows at ys.
    pub unsafe fn concat_rows(
        &self,
        stream: &CudaStream,
        parts: &[RowsPart],
        y: Ptr,
        rows: usize,
        ys: usize,
    ) -> Result<(), GpuError> {
        if parts.len() <= CONCAT_PARTS && vector_rows(parts, y, rows, ys) {
            // SAFETY: per this function's contract; alignment and part count checked above.
            return unsafe { self.concat_rows_x8(stream, parts, y, rows, ys) };
        }
        let mut at = 0;
        for part in parts {
            // SAFETY: per this function's contract; part i's columns start `at` into y's rows.
            unsafe {
                self.copy_rows(
                    stream,
                    part.x,
                    y + 2 * at as u64,
                    rows,
                    part.cols,
                    part.xs,
                    ys,
                )
            }?;
            at += part.cols;
        }
        Ok(())
    }

    /// # Safety
    /// As for `concat_rows`, with `vector_rows` true and at most CONCAT_PARTS parts.
    unsafe fn concat_rows_x8(
        &self,
        stream: &CudaStream,
        parts: &[RowsPart],
        y: Ptr,
        rows: usize,
        ys: usize,
    ) -> Result<(), GpuError> {
        let cols: usize = parts.iter().map(|p| p.cols / 8).sum();
        let mut args = vec![
            Arg::P(y),
            Arg::L((ys / 8) as i64),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
        ];
        let last = *parts
            .last()
            .ok_or_else(|| GpuError::Capture("a concatenation of nothing".into()))?;
        let mut at = 0;
        for i in 0..CONCAT_PARTS {
            // Slots past the last part repeat it, starting past every column: never taken.
            let (p, start) = match parts.get(i) {
                Some(p) => (*p, at),
                None => (last, cols),
            };
            args.push(Arg::P(p.x));
            args.push(Arg::L((p.xs / 8) as i64));
            if i > 0 {
                args.push(Arg::I(start as i32));
            }
            at += p.cols / 8;
        }
        // SAFETY: matches concat_rows_f16x8 (uint4*, long, 2 int, then (ptr, long) and three
        // (ptr, long, int)); every part's base, width and stride is a multiple of 16 bytes
        // (vector_rows), and rows * cols fits an int, so every uint4 access is aligned and inside
        // the rows the caller vouches for.
        unsafe { launch(stream, &self.concat_rows, elems(rows * cols), &args) }
    }

    /// x [n, h, w, c] -> y [n, h + top + bottom, w + left + right, c], zeros around.
    ///
    /// # Safety
    /// x and y must hold those shapes.
    pub unsafe fn pad_nhwc(
        &self,
        stream: &CudaStream,
        x: Ptr,
        y: Ptr,
        nhwc: [usize; 4],
        pad: [usize; 4],
    ) -> Result<(), GpuError> {
        let [n, h, w, c] = nhwc;
        let (ho, wo) = (h + pad[0] + pad[2], w + pad[1] + pad[3]);
        // The VAE encoder's downsamplers (128..512 channels): 16-byte copies, one output row
        // per block row. (Per element, with a division per index, it ran at a tenth of the
        // memory's speed: 1.6 ms for a batch of 32 crops at 256x256.)
        if c.is_multiple_of(8)
            && x.is_multiple_of(16)
            && y.is_multiple_of(16)
            && n * ho <= u16::MAX as usize
        {
            let c8 = c / 8;
            let args = [h, w, c8, ho, wo, pad[0], pad[1]].map(|v| Arg::I(v as i32));
            let mut all = vec![Arg::P(x), Arg::P(y)];
            all.extend(args);
            let cfg = LaunchConfig {
                grid_dim: ((wo * c8).div_ceil(256) as u32, (n * ho) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches pad_nhwc_f16x8 (const uint4*, uint4*, 7 int); 16-byte aligned
            // (checked), c a multiple of 8 so every uint4 is 8 channels of one pixel; one block
            // row per output row (n * ho within the grid's y limit), threads past wo * c8 return.
            return unsafe { launch(stream, &self.pad_nhwc_x8, cfg, &all) };
        }
        let mut args = vec![Arg::P(x), Arg::P(y)];
        args.extend(
            [n, h, w, c, ho, wo, pad[0], pad[1]]
                .iter()
                .map(|&v| Arg::I(v as i32)),
        );
        // SAFETY: matches pad_nhwc_f16 (const half*, half*, 8 int).
        unsafe { launch(stream, &self.pad_nhwc, elems(n * ho * wo * c), &args) }
    }

    /// Whether `im2col` takes convolution `s`: channels-last, ungrouped, whole 8-channel
    /// vectors, at most one grid row per patch row.
    pub fn im2col_fits(s: &ConvShape) -> bool {
        let (ho, wo) = s.out_hw();
        s.nhwc && s.groups == 1 && s.c.is_multiple_of(8) && s.n * ho * wo <= u16::MAX as usize
    }

    /// Bytes of convolution `s`'s patch matrix: [n * ho * wo, kh * kw * c] halves.
    pub fn im2col_bytes(s: &ConvShape) -> usize {
        let (ho, wo) = s.out_hw();
        2 * s.n * ho * wo * s.kh * s.kw * s.c
    }

    /// cols [n * ho * wo, kh * kw * c] = the patches of x [n, h, w, c] under convolution `s`,
    /// in its [o, kh, kw, c] filter's order: cols · filterᵀ is the convolution.
    ///
    /// # Safety
    /// x must hold `s`'s input, cols `im2col_bytes(s)`.
    pub unsafe fn im2col(
        &self,
        stream: &CudaStream,
        x: Ptr,
        cols: Ptr,
        s: &ConvShape,
    ) -> Result<(), GpuError> {
        if !Self::im2col_fits(s) || !x.is_multiple_of(16) || !cols.is_multiple_of(16) {
            return Err(GpuError::Shape {
                kernel: "im2col",
                reason: format!("{s:?} (x {x:#x}, cols {cols:#x})"),
            });
        }
        let (ho, wo) = s.out_hw();
        let c8 = s.c / 8;
        let k8 = s.kh * s.kw * c8;
        let mut args = vec![Arg::P(x), Arg::P(cols)];
        args.extend(
            [
                s.h,
                s.w,
                c8,
                ho,
                wo,
                s.kw,
                k8,
                s.stride[0],
                s.stride[1],
                s.pad[0],
                s.pad[1],
            ]
            .map(|v| Arg::I(v as i32)),
        );
        let cfg = LaunchConfig {
            grid_dim: (k8.div_ceil(256) as u32, (s.n * ho * wo) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches im2col_nhwc_f16x8 (const uint4*, uint4*, 11 int); 16-byte aligned and
        // whole 8-channel vectors (checked), one block row per patch row (within the grid's y
        // limit, checked), threads past k8 return; sizes per the caller's contract.
        unsafe { launch(stream, &self.im2col, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(x: Ptr, cols: usize) -> RowsPart {
        RowsPart { x, cols, xs: cols }
    }

    #[test]
    fn rows_copy_as_vectors_only_when_every_part_keeps_16_byte_alignment() {
        // A skip concatenation: 1280 + 640 channels into rows of 1920.
        let parts = [part(0x1000, 1280), part(0x9000, 640)];
        assert!(vector_rows(&parts, 0x20000, 1024, 1920));
        // A width, a stride or an address off the 8-half grid takes the row copies.
        assert!(!vector_rows(
            &[part(0x1000, 3), part(0x9000, 5)],
            0x20000,
            64,
            8
        ));
        let strided = RowsPart {
            x: 0x1000,
            cols: 8,
            xs: 12,
        };
        assert!(!vector_rows(&[strided], 0x20000, 64, 8));
        assert!(!vector_rows(&[part(0x1008, 8)], 0x20000, 64, 8));
        assert!(!vector_rows(&[part(0x1000, 8)], 0x20004, 64, 8));
        // Parts wider than y's rows, nothing to copy, more vectors than an int counts.
        assert!(!vector_rows(&[part(0x1000, 16)], 0x20000, 64, 8));
        assert!(!vector_rows(&[], 0x20000, 64, 8));
        assert!(!vector_rows(&[part(0x1000, 16)], 0x20000, 1 << 31, 16));
    }
}

//! Elementwise fp16 kernels: GEGLU, unary ops, adds (same-shape and broadcasting), the
//! convolution bias/residual epilogue, nearest 2x upsampling of NHWC images and the interleave of
//! an upsampling convolution run on the small image.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};

use super::{elems, launch, rank5, shape_err, Arg, Ptr};
use crate::device::Device;
use crate::error::GpuError;

pub(crate) const SRC: &str = concat!(
    include_str!("../../kernels/pdl.cuh"),
    include_str!("../../kernels/elementwise.cu")
);

/// The unary ops of `unary_f16`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Gelu,
    Silu,
    Affine { scale: f32, shift: f32 },
    Clamp { min: f32, max: f32 },
}

/// The binary ops of `binary_f16`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Binary {
    Add,
    Mul,
}

/// The compiled kernels.
pub struct Elementwise {
    geglu: CudaFunction,
    geglu8: CudaFunction,
    unary: CudaFunction,
    unary8: CudaFunction,
    add2: CudaFunction,
    binary: CudaFunction,
    binary8: CudaFunction,
    bias_residual: CudaFunction,
    bias_residual_nhwc8: CudaFunction,
    bias_residual_stats8: CudaFunction,
    upsample_nhwc: CudaFunction,
    upsample_nhwc8: CudaFunction,
    subpixel8: CudaFunction,
}

/// Whether every address is 16-byte aligned (0, "none", counts as aligned).
pub(crate) fn aligned16(ptrs: &[Ptr]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

/// A launch of `per_image` threads per image, images on grid y.
pub(crate) fn per_image(per_image: usize, images: usize) -> LaunchConfig {
    let mut cfg = elems(per_image);
    cfg.grid_dim.1 = images as u32;
    cfg
}

impl Elementwise {
    pub fn load(device: &Device) -> Result<Self, GpuError> {
        let m = super::compile(device, "elementwise", SRC)?;
        Ok(Elementwise {
            geglu: m.load_function("geglu_f16")?,
            geglu8: m.load_function("geglu_f16x8")?,
            unary: m.load_function("unary_f16")?,
            unary8: m.load_function("unary_f16x8")?,
            add2: m.load_function("add_f16x2")?,
            binary: m.load_function("binary_f16")?,
            binary8: m.load_function("binary_f16x8")?,
            bias_residual: m.load_function("bias_residual_f16")?,
            bias_residual_nhwc8: m.load_function("bias_residual_nhwc_f16x8")?,
            bias_residual_stats8: m.load_function("bias_residual_stats_nhwc_f16x8")?,
            upsample_nhwc: m.load_function("upsample2x_nhwc_f16")?,
            upsample_nhwc8: m.load_function("upsample2x_nhwc_f16x8")?,
            subpixel8: m.load_function("subpixel_nhwc_f16x8")?,
        })
    }

    /// x [rows, 2d] -> y [rows, d] = x[:, :d] * gelu(x[:, d:]).
    ///
    /// # Safety
    /// x and y must hold those shapes.
    pub unsafe fn geglu(
        &self,
        stream: &CudaStream,
        x: Ptr,
        y: Ptr,
        rows: usize,
        d: usize,
    ) -> Result<(), GpuError> {
        if d.is_multiple_of(8) && rows <= 65535 && aligned16(&[x, y]) {
            // SAFETY: matches geglu_f16x8 (const half*, half*, int); whole aligned 8-wide vectors
            // (checked), grid y covers the rows.
            return unsafe {
                launch(
                    stream,
                    &self.geglu8,
                    per_image(d / 8, rows),
                    &[Arg::P(x), Arg::P(y), Arg::I(d as i32)],
                )
            };
        }
        let args = [Arg::P(x), Arg::P(y), Arg::L(rows as i64), Arg::I(d as i32)];
        // SAFETY: matches geglu_f16 (const half*, half*, long, int).
        unsafe { launch(stream, &self.geglu, elems(rows * d), &args) }
    }

    /// y = op(x) over n elements.
    ///
    /// # Safety
    /// x and y must hold n elements.
    pub unsafe fn unary(
        &self,
        stream: &CudaStream,
        op: Unary,
        x: Ptr,
        y: Ptr,
        n: usize,
    ) -> Result<(), GpuError> {
        let (mode, a, b) = match op {
            Unary::Gelu => (0, 0.0, 0.0),
            Unary::Silu => (1, 0.0, 0.0),
            Unary::Affine { scale, shift } => (2, scale, shift),
            Unary::Clamp { min, max } => (3, min, max),
        };
        // Eight values per thread in one 16-byte access where the shape and addresses allow.
        let (kernel, count) = if n.is_multiple_of(8) && aligned16(&[x, y]) {
            (&self.unary8, n / 8)
        } else {
            (&self.unary, n)
        };
        let args = [
            Arg::P(x),
            Arg::P(y),
            Arg::L(count as i64),
            Arg::I(mode),
            Arg::F(a),
            Arg::F(b),
        ];
        // SAFETY: matches unary_f16 (const half*, half*, long, int, float, float) and
        // unary_f16x8 (the same over uint4); the vector form only on n / 8 whole vectors at
        // aligned addresses (checked).
        unsafe { launch(stream, kernel, elems(count), &args) }
    }

    /// y = a + b over n elements (n even, addresses 4-byte aligned).
    ///
    /// # Safety
    /// a, b and y must hold n elements.
    pub unsafe fn add(
        &self,
        stream: &CudaStream,
        a: Ptr,
        b: Ptr,
        y: Ptr,
        n: usize,
    ) -> Result<(), GpuError> {
        if !n.is_multiple_of(2) || !(a | b | y).is_multiple_of(4) {
            return Err(shape_err("add", format!("{n} elements, unaligned or odd")));
        }
        let args = [Arg::P(a), Arg::P(b), Arg::P(y), Arg::L((n / 2) as i64)];
        // SAFETY: matches add_f16x2 (2 const half2*, half2*, long); n/2 pairs, aligned (checked).
        unsafe { launch(stream, &self.add2, elems(n / 2), &args) }
    }

    /// y (contiguous, `dims`) = a op b, each read through its own strides (0 = broadcast).
    ///
    /// # Safety
    /// a and b must hold every element their strides reach; y the product of `dims`.
    pub unsafe fn binary(
        &self,
        stream: &CudaStream,
        op: Binary,
        a: (Ptr, &[usize]),
        b: (Ptr, &[usize]),
        y: Ptr,
        dims: &[usize],
    ) -> Result<(), GpuError> {
        let (d, sa) = rank5(dims, a.1)?;
        let (_, sb) = rank5(dims, b.1)?;
        let n: usize = dims.iter().product();
        // Whole 16-byte vectors along a last axis both operands walk densely: binary_f16x8
        // counts that axis in vectors and takes no stride for it (it is 1).
        let vectors = d[4] % 8 == 0
            && sa[4] == 1
            && sb[4] == 1
            && sa[..4].iter().chain(&sb[..4]).all(|s| s % 8 == 0)
            && aligned16(&[a.0, b.0, y]);
        let (kernel, count, last, strided) = if vectors {
            (&self.binary8, n / 8, d[4] / 8, 4)
        } else {
            (&self.binary, n, d[4], 5)
        };
        let mut args = vec![
            Arg::P(a.0),
            Arg::P(b.0),
            Arg::P(y),
            Arg::L(count as i64),
            Arg::I(match op {
                Binary::Add => 0,
                Binary::Mul => 1,
            }),
        ];
        args.extend(d[1..4].iter().chain([&last]).map(|&v| Arg::I(v as i32)));
        args.extend(
            sa[..strided]
                .iter()
                .chain(&sb[..strided])
                .map(|&v| Arg::L(v)),
        );
        // SAFETY: matches binary_f16 (2 const half*, half*, long, int, 4 int, 10 long) and
        // binary_f16x8 (the same with 8 long); the vector form only where every vector is
        // aligned and whole (checked above).
        unsafe { launch(stream, kernel, elems(count), &args) }
    }

    /// Blocks per image of the NHWC epilogue: the chunks of its group-norm partial sums.
    pub fn epilogue_blocks(image: usize, c: usize, n: usize) -> usize {
        super::vector_grid(image / 8, c / 8, n).2
    }

    /// Whether the NHWC epilogue can sum `groups` groups of `c` channels for a group norm.
    pub fn epilogue_stats_fit(c: usize, groups: usize) -> bool {
        let cg = c / groups.max(1);
        groups > 0
            && groups <= 64
            && c.is_multiple_of(8)
            && c.is_multiple_of(groups)
            && cg.is_multiple_of(2)
            && (cg == 4 || cg >= 8)
    }

    /// The convolution epilogue: y[i] += bias[(i / image) * bias_stride + (i / inner) % period]
    /// (+ res[i]); `bias` or `res` may be 0. With `stats` = (partial, groups) (NHWC only), it
    /// also writes per-block sums for the group norm that reads y next: `epilogue_blocks(image, c, n)`
    /// (sum, sum of squares) float pairs per image and group.
    ///
    /// # Safety
    /// y and res must hold n elements, bias every index the formula reaches, partial its sums.
    pub unsafe fn bias_residual(
        &self,
        stream: &CudaStream,
        y: Ptr,
        bias: Ptr,
        res: Ptr,
        n: usize,
        image: usize,
        bias_stride: usize,
        inner: usize,
        period: usize,
        stats: Option<(Ptr, usize)>,
    ) -> Result<(), GpuError> {
        if image == 0 || inner == 0 || period == 0 {
            return Err(shape_err("bias_residual", "zero extent".into()));
        }
        let vector = inner == 1
            && period.is_multiple_of(8)
            && image.is_multiple_of(period)
            && bias_stride.is_multiple_of(8)
            && n.is_multiple_of(image)
            && image / 8 <= i32::MAX as usize
            && aligned16(&[y, bias, res]);
        if stats.is_some() && !vector {
            return Err(shape_err(
                "bias_residual_stats",
                "group-norm sums need the 8-wide NHWC epilogue".into(),
            ));
        }
        if vector {
            let images = n / image;
            let (threads, per_block, blocks) = super::vector_grid(image / 8, period / 8, images);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, images as u32, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut args = vec![
                Arg::P(y),
                Arg::P(bias),
                Arg::P(res),
                Arg::I((image / 8) as i32),
                Arg::I(period as i32),
                Arg::I(bias_stride as i32),
            ];
            if let Some((partial, groups)) = stats {
                if !Self::epilogue_stats_fit(period, groups) || partial % 8 != 0 {
                    return Err(shape_err(
                        "bias_residual_stats",
                        format!("{period} channels in {groups} groups"),
                    ));
                }
                args.push(Arg::P(partial));
                args.push(Arg::I(groups as i32));
                args.push(Arg::I(per_block as i32));
                // SAFETY: matches bias_residual_stats_nhwc_f16x8 (uint4*, const half*, const
                // uint4*, 3 int, float2*, 2 int); as below, plus partial holding
                // epilogue_blocks(image, period, images) * groups float2s per image (the
                // caller's contract) and groups within the kernel's shared arrays (checked).
                return unsafe { launch(stream, &self.bias_residual_stats8, cfg, &args) };
            }
            args.push(Arg::I(per_block as i32));
            // SAFETY: matches bias_residual_nhwc_f16x8 (uint4*, const half*, const uint4*, 4
            // int); channels are whole 8-wide vectors, every operand 16-byte aligned (checked),
            // grid y covers the n / image images; threads and per_block are multiples of
            // period / 8 (vector_grid).
            return unsafe { launch(stream, &self.bias_residual_nhwc8, cfg, &args) };
        }
        let mut args = vec![Arg::P(y), Arg::P(bias), Arg::P(res)];
        args.extend(
            [n, image, bias_stride, inner, period]
                .iter()
                .map(|&v| Arg::L(v as i64)),
        );
        // SAFETY: matches bias_residual_f16 (half*, 2 const half*, 5 long).
        unsafe { launch(stream, &self.bias_residual, elems(n), &args) }
    }

    /// x [n, h, w, c] -> y [n, 2h, 2w, c], nearest.
    ///
    /// # Safety
    /// x and y must hold those shapes.
    pub unsafe fn upsample2x_nhwc(
        &self,
        stream: &CudaStream,
        x: Ptr,
        y: Ptr,
        nhwc: [usize; 4],
    ) -> Result<(), GpuError> {
        let [n, h, w, c] = nhwc;
        if c.is_multiple_of(8) && aligned16(&[x, y]) {
            let args = [
                Arg::P(x),
                Arg::P(y),
                Arg::I(h as i32),
                Arg::I(w as i32),
                Arg::I((c / 8) as i32),
            ];
            // SAFETY: matches upsample2x_nhwc_f16x8 (const uint4*, uint4*, 3 int); whole 8-wide
            // channel vectors, aligned (checked); grid y covers the n images.
            return unsafe {
                launch(
                    stream,
                    &self.upsample_nhwc8,
                    per_image(4 * h * w * c / 8, n),
                    &args,
                )
            };
        }
        let args = [
            Arg::P(x),
            Arg::P(y),
            Arg::L(n as i64),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
        ];
        // SAFETY: matches upsample2x_nhwc_f16 (const half*, half*, long, 3 int).
        unsafe { launch(stream, &self.upsample_nhwc, elems(4 * n * h * w * c), &args) }
    }

    /// The interleave of an upsample + 3x3 convolution run on the small image (`plan::Step::Subpixel`):
    /// t [n, h+1, w+1, 4c] -> y [n, 2h, 2w, c] plus `bias` [c] (0: none). With `stats` =
    /// (partial, groups) it also writes the epilogue's group sums of y (`epilogue_blocks(4hwc,
    /// c, n)` blocks per image).
    ///
    /// # Safety
    /// t, y and bias must hold those shapes, partial its sums.
    pub unsafe fn subpixel(
        &self,
        stream: &CudaStream,
        t: Ptr,
        y: Ptr,
        bias: Ptr,
        nhwc: [usize; 4],
        stats: Option<(Ptr, usize)>,
    ) -> Result<(), GpuError> {
        let [n, h, w, c] = nhwc;
        let image8 = 4 * h * w * c / 8;
        if n == 0 || h == 0 || w == 0 || !c.is_multiple_of(8) || !aligned16(&[t, y, bias]) {
            return Err(shape_err(
                "subpixel",
                format!("{nhwc:?} needs whole aligned 8-channel vectors"),
            ));
        }
        if (h + 1) * (w + 1) * 4 * c / 8 > i32::MAX as usize || n > 65535 {
            return Err(shape_err("subpixel", format!("{nhwc:?} is too large")));
        }
        let (partial, groups) = stats.unwrap_or((0, 0));
        if stats.is_some() && (!Self::epilogue_stats_fit(c, groups) || partial % 8 != 0) {
            return Err(shape_err(
                "subpixel_stats",
                format!("{c} channels in {groups} groups"),
            ));
        }
        let (threads, per_block, blocks) = super::vector_grid(image8, c / 8, n);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, n as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::P(t),
            Arg::P(y),
            Arg::P(bias),
            Arg::I(h as i32),
            Arg::I(w as i32),
            Arg::I(c as i32),
            Arg::P(partial),
            Arg::I(groups as i32),
            Arg::I(per_block as i32),
        ];
        // SAFETY: matches subpixel_nhwc_f16x8 (const uint4*, uint4*, const half*, 3 int,
        // float2*, 2 int); whole aligned 8-wide vectors (checked), extents within int (checked),
        // grid y covers the n images; threads and per_block are multiples of c / 8
        // (vector_grid); partial, when given, holds blocks * groups float2s per image (the
        // caller's contract) and groups fit the kernel's shared arrays (checked).
        unsafe { launch(stream, &self.subpixel8, cfg, &args) }
    }
}

//! The CPU reference kernels: one function per op, f32, clear before fast.
//!
//! Convolutions and matmuls go through a real GEMM (ndarray's matrixmultiply) with rayon across
//! output rows / tiles; everything else is straightforward loops, parallel where it is free.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::graph::Op;
use crate::tensor::{numel, strides, Tensor};

/// Output columns per im2col tile: bounds the scratch buffer and gives rayon work units.
const CONV_TILE: usize = 1024;

/// Evaluates one op on concrete inputs. Shapes were checked at build (`graph::infer`).
pub fn eval(op: &Op, x: &[&Tensor], out_shape: &[usize]) -> Tensor {
    let data = match op {
        Op::Input | Op::Const(_) => unreachable!("inputs and constants are not evaluated"),
        Op::Conv2d {
            stride,
            padding,
            groups,
        } => conv2d(
            x[0],
            x[1],
            x.get(2).copied(),
            *stride,
            *padding,
            *groups,
            out_shape,
        ),
        Op::Conv1d { stride, padding } => {
            // A 1-d convolution is a 2-d one over a height of 1.
            let (xs, ws) = (&x[0].shape, &x[1].shape);
            let x4 = Tensor::new(vec![xs[0], xs[1], 1, xs[2]], x[0].data.clone());
            let w4 = Tensor::new(vec![ws[0], ws[1], 1, ws[2]], x[1].data.clone());
            let o4 = [out_shape[0], out_shape[1], 1, out_shape[2]];
            conv2d(
                &x4,
                &w4,
                x.get(2).copied(),
                [1, *stride],
                [0, *padding, 0, *padding],
                1,
                &o4,
            )
        }
        Op::Linear => linear(x[0], x[1], x.get(2).copied()),
        Op::GroupNorm { groups, eps, silu } => group_norm(x[0], x[1], x[2], *groups, *eps, *silu),
        Op::LayerNorm { eps } => layer_norm(x[0], x[1], x[2], *eps),
        Op::Attention { heads } => attention(x[0], x[1], x[2], *heads),
        Op::Gelu => x[0].data.iter().map(|&v| gelu(v)).collect(),
        Op::Silu => x[0].data.iter().map(|&v| silu(v)).collect(),
        Op::Geglu => {
            let d = *out_shape.last().unwrap_or(&1);
            x[0].data
                .chunks(2 * d)
                .flat_map(|row| (0..d).map(move |i| row[i] * gelu(row[d + i])))
                .collect()
        }
        Op::PRelu => {
            let (c, inner) = (x[0].shape[1], numel(&x[0].shape[2..]));
            let alpha = &x[1].data;
            let mut out = x[0].data.clone();
            // One channel plane at a time: its slope is fixed.
            for (i, plane) in out.chunks_mut(inner.max(1)).enumerate() {
                let a = alpha[i % c];
                for v in plane.iter_mut().filter(|v| **v < 0.0) {
                    *v *= a;
                }
            }
            out
        }
        Op::Softmax { axis } => softmax(x[0], *axis),
        Op::Add => broadcast_binary(x[0], x[1], out_shape, |a, b| a + b),
        Op::Mul => broadcast_binary(x[0], x[1], out_shape, |a, b| a * b),
        Op::Affine { scale, shift } => x[0].data.iter().map(|&v| v * scale + shift).collect(),
        Op::Clamp { min, max } => x[0].data.iter().map(|&v| v.clamp(*min, *max)).collect(),
        Op::Concat { axis } => concat(x, *axis, out_shape),
        Op::UpsampleNearest2x => upsample2x(x[0]),
        Op::MaxPool2d { kernel, stride, .. } => max_pool(x[0], *kernel, *stride, out_shape),
        Op::Reshape { .. } => x[0].data.clone(),
        Op::Permute { perm } => permute(x[0], perm, out_shape),
        Op::Slice { axis, start, end } => {
            let outer = numel(&x[0].shape[..*axis]);
            let inner = numel(&x[0].shape[axis + 1..]);
            let len = x[0].shape[*axis];
            let mut out = Vec::with_capacity(numel(out_shape));
            for o in 0..outer {
                let base = o * len * inner;
                out.extend_from_slice(&x[0].data[base + start * inner..base + end * inner]);
            }
            out
        }
        Op::GatherRows { rows } => gather_rows(x[0], x[1], *rows),
    };
    Tensor::new(out_shape.to_vec(), data)
}

/// Rows first[b] .. first[b] + rows of each x[b] ([B,T,D]); a first row rounds to a whole
/// number and clamps into [0, T - rows] (`Op::GatherRows`).
fn gather_rows(x: &Tensor, first: &Tensor, rows: usize) -> Vec<f32> {
    let (t, d) = (x.shape[1], x.shape[2]);
    let mut out = Vec::with_capacity(x.shape[0] * rows * d);
    for (b, f) in first.data.iter().enumerate() {
        let f = gather_start(*f, t, rows);
        let at = (b * t + f) * d;
        out.extend_from_slice(&x.data[at..at + rows * d]);
    }
    out
}

/// `Op::GatherRows`' first row from its value: rounded, then clamped into [0, t - rows] (NaN
/// reads as 0).
fn gather_start(f: f32, t: usize, rows: usize) -> usize {
    let f = f.round();
    if f.is_nan() || f <= 0.0 {
        0
    } else {
        (f as usize).min(t - rows)
    }
}

pub fn gelu(v: f32) -> f32 {
    (0.5 * f64::from(v) * (1.0 + libm::erf(f64::from(v) / std::f64::consts::SQRT_2))) as f32
}

pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// c[m,n] (+)= a[m,k] · b, with b either [k,n] or, if `b_t`, [n,k] read transposed.
fn gemm(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    b_t: bool,
    accumulate: bool,
) {
    let av = ArrayView2::from_shape((m, k), a).expect("gemm: a has m*k elements");
    let mut cv = ArrayViewMut2::from_shape((m, n), c).expect("gemm: c has m*n elements");
    let beta = if accumulate { 1.0 } else { 0.0 };
    if b_t {
        let bv = ArrayView2::from_shape((n, k), b).expect("gemm: b has n*k elements");
        general_mat_mul(1.0, &av, &bv.t(), beta, &mut cv);
    } else {
        let bv = ArrayView2::from_shape((k, n), b).expect("gemm: b has k*n elements");
        general_mat_mul(1.0, &av, &bv, beta, &mut cv);
    }
}

/// Rows of `a` (and `c`) handed to each rayon task.
fn row_chunk(m: usize) -> usize {
    m.div_ceil(rayon::current_num_threads() * 4).max(1)
}

/// c[m,n] = a[m,k] · b (parallel over rows of a).
fn par_gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, b_t: bool) {
    let rows = row_chunk(m);
    c.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(c, a)| {
            let mm = c.len() / n;
            gemm(a, b, c, mm, k, n, b_t, false);
        });
}

fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    let m = x.numel() / k;
    let mut out = vec![0.0; m * n];
    if m < rayon::current_num_threads() * 16 {
        // Few rows (a batch of face crops, one token): splitting the rows would pack the whole
        // weight matrix once per row; split its output features instead, each packed once.
        let cols = n.div_ceil(rayon::current_num_threads() * 4).max(16);
        let parts: Vec<(usize, Vec<f32>)> = w
            .data
            .par_chunks(cols * k)
            .enumerate()
            .map(|(j, wj)| {
                let nj = wj.len() / k;
                let mut part = vec![0.0; m * nj];
                gemm(&x.data, wj, &mut part, m, k, nj, true, false);
                (j * cols, part)
            })
            .collect();
        for (j0, part) in parts {
            let nj = part.len() / m.max(1);
            for (row, src) in out.chunks_mut(n).zip(part.chunks(nj.max(1))) {
                row[j0..j0 + nj].copy_from_slice(src);
            }
        }
    } else {
        par_gemm(&x.data, &w.data, &mut out, m, k, n, true);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(n)
            .for_each(|row| row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: [usize; 2],
    pad: [usize; 4],
    groups: usize,
    out_shape: &[usize],
) -> Vec<f32> {
    let [n, c, h, wd] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [o, cg, kh, kw] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    let (ho, wo) = (out_shape[2], out_shape[3]);
    let og = o / groups;
    let kk = cg * kh * kw;
    let pixels = ho * wo;
    let mut out = vec![0.0f32; n * o * pixels];
    let tiles = pixels.div_ceil(CONV_TILE);
    // One task per (image, group, tile of output pixels): im2col the tile, one GEMM, scatter.
    let tasks: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| (0..groups).flat_map(move |g| (0..tiles).map(move |t| (b, g, t))))
        .collect();
    let results: Vec<(usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(b, g, t)| {
            let p0 = t * CONV_TILE;
            let np = CONV_TILE.min(pixels - p0);
            let mut col = vec![0.0f32; kk * np];
            for ci in 0..cg {
                let plane = &x.data[(b * c + g * cg + ci) * h * wd..][..h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = &mut col[((ci * kh + ky) * kw + kx) * np..][..np];
                        // One output row's run of the tile at a time: the input row is fixed,
                        // and at stride 1 its in-bounds columns are one contiguous copy.
                        let mut j = 0;
                        while j < np {
                            let (oy, ox0) = ((p0 + j) / wo, (p0 + j) % wo);
                            let run = (wo - ox0).min(np - j);
                            let iy = (oy * stride[0] + ky) as isize - pad[0] as isize;
                            if iy >= 0 && (iy as usize) < h {
                                let src = &plane[iy as usize * wd..][..wd];
                                let dst = &mut row[j..j + run];
                                let x_of =
                                    |ox: usize| (ox * stride[1] + kx) as isize - pad[1] as isize;
                                if stride[1] == 1 {
                                    // ox + kx - pad within [0, wd): a contiguous range of ox.
                                    let lo = (pad[1] as isize - kx as isize).max(ox0 as isize);
                                    let hi = (wd as isize + pad[1] as isize - kx as isize)
                                        .min((ox0 + run) as isize);
                                    if lo < hi {
                                        let (a, b) = (
                                            (lo - ox0 as isize) as usize,
                                            (hi - ox0 as isize) as usize,
                                        );
                                        let x0 = x_of(lo as usize) as usize;
                                        dst[a..b].copy_from_slice(&src[x0..x0 + (b - a)]);
                                    }
                                } else {
                                    for (d, ox) in dst.iter_mut().zip(ox0..) {
                                        let ix = x_of(ox);
                                        if ix >= 0 && (ix as usize) < wd {
                                            *d = src[ix as usize];
                                        }
                                    }
                                }
                            }
                            j += run;
                        }
                    }
                }
            }
            let wg = &w.data[g * og * kk..][..og * kk];
            let mut tile = vec![0.0f32; og * np];
            gemm(wg, &col, &mut tile, og, kk, np, false, false);
            (b, g, p0, tile)
        })
        .collect();
    for (b, g, p0, tile) in results {
        let np = tile.len() / og;
        for oc in 0..og {
            let ch = g * og + oc;
            let dst = &mut out[(b * o + ch) * pixels + p0..][..np];
            let bv = bias.map_or(0.0, |bb| bb.data[ch]);
            for (d, s) in dst.iter_mut().zip(&tile[oc * np..][..np]) {
                *d = s + bv;
            }
        }
    }
    out
}

fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu_after: bool,
) -> Vec<f32> {
    let (n, c) = (x.shape[0], x.shape[1]);
    let inner = numel(&x.shape[2..]);
    let cg = c / groups;
    let mut out = vec![0.0f32; x.numel()];
    out.par_chunks_mut(cg * inner)
        .enumerate()
        .for_each(|(i, dst)| {
            let (b, g) = (i / groups, i % groups);
            let src = &x.data[(b * c + g * cg) * inner..][..cg * inner];
            let mean = src.iter().map(|&v| f64::from(v)).sum::<f64>() / src.len() as f64;
            let var = src
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / src.len() as f64;
            let inv = 1.0 / (var + f64::from(eps)).sqrt();
            for ci in 0..cg {
                let ch = g * cg + ci;
                let (ga, be) = (f64::from(gamma.data[ch]), f64::from(beta.data[ch]));
                for j in 0..inner {
                    let v = ((f64::from(src[ci * inner + j]) - mean) * inv * ga + be) as f32;
                    dst[ci * inner + j] = if silu_after { silu(v) } else { v };
                }
            }
        });
    let _ = n;
    out
}

fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Vec<f32> {
    let c = gamma.numel();
    let mut out = vec![0.0f32; x.numel()];
    out.par_chunks_mut(c)
        .zip(x.data.par_chunks(c))
        .for_each(|(dst, src)| {
            let mean = src.iter().map(|&v| f64::from(v)).sum::<f64>() / c as f64;
            let var = src
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / c as f64;
            let inv = 1.0 / (var + f64::from(eps)).sqrt();
            for i in 0..c {
                dst[i] = ((f64::from(src[i]) - mean) * inv * f64::from(gamma.data[i])
                    + f64::from(beta.data[i])) as f32;
            }
        });
    out
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Vec<f32> {
    let (b, lq, c) = (q.shape[0], q.shape[1], q.shape[2]);
    let (lk, cv) = (k.shape[1], v.shape[2]);
    let (d, dv) = (c / heads, cv / heads);
    let scale = 1.0 / (d as f32).sqrt();
    let gather =
        |t: &Tensor, bi: usize, h: usize, len: usize, width: usize, dh: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(len * dh);
            for i in 0..len {
                out.extend_from_slice(&t.data[(bi * len + i) * width + h * dh..][..dh]);
            }
            out
        };
    let per_head: Vec<Vec<f32>> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let (qh, kh, vh) = (
                gather(q, bi, h, lq, c, d),
                gather(k, bi, h, lk, c, d),
                gather(v, bi, h, lk, cv, dv),
            );
            let mut s = vec![0.0f32; lq * lk];
            gemm(&qh, &kh, &mut s, lq, d, lk, true, false);
            for row in s.chunks_mut(lk) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0.0f64;
                for x in row.iter_mut() {
                    *x = (*x * scale - max).exp();
                    sum += f64::from(*x);
                }
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
            }
            let mut o = vec![0.0f32; lq * dv];
            gemm(&s, &vh, &mut o, lq, lk, dv, false, false);
            o
        })
        .collect();
    let mut out = vec![0.0f32; b * lq * cv];
    for (bh, o) in per_head.iter().enumerate() {
        let (bi, h) = (bh / heads, bh % heads);
        for i in 0..lq {
            out[(bi * lq + i) * cv + h * dv..][..dv].copy_from_slice(&o[i * dv..][..dv]);
        }
    }
    out
}

fn softmax(x: &Tensor, axis: usize) -> Vec<f32> {
    let len = x.shape[axis];
    let inner = numel(&x.shape[axis + 1..]);
    let outer = numel(&x.shape[..axis]);
    let mut out = x.data.clone();
    for o in 0..outer {
        for i in 0..inner {
            let idx = |j: usize| (o * len + j) * inner + i;
            let max = (0..len)
                .map(|j| out[idx(j)])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f64;
            for j in 0..len {
                let e = (out[idx(j)] - max).exp();
                out[idx(j)] = e;
                sum += f64::from(e);
            }
            for j in 0..len {
                out[idx(j)] = (f64::from(out[idx(j)]) / sum) as f32;
            }
        }
    }
    out
}

fn broadcast_binary(
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    if a.shape == b.shape {
        return a.data.iter().zip(&b.data).map(|(x, y)| f(*x, *y)).collect();
    }
    let rank = out_shape.len();
    let bstrides = |t: &Tensor| -> Vec<usize> {
        let s = strides(&t.shape);
        let off = rank - t.shape.len();
        (0..rank)
            .map(|i| {
                if i < off || t.shape[i - off] == 1 {
                    0
                } else {
                    s[i - off]
                }
            })
            .collect()
    };
    let (sa, sb) = (bstrides(a), bstrides(b));
    let so = strides(out_shape);
    let mut out = vec![0.0f32; numel(out_shape)];
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let (mut ia, mut ib, mut rem) = (0, 0, i);
        for d in 0..rank {
            let q = rem / so[d];
            rem %= so[d];
            ia += q * sa[d];
            ib += q * sb[d];
        }
        *o = f(a.data[ia], b.data[ib]);
    });
    out
}

fn concat(x: &[&Tensor], axis: usize, out_shape: &[usize]) -> Vec<f32> {
    let outer = numel(&out_shape[..axis]);
    let inner = numel(&out_shape[axis + 1..]);
    let mut out = Vec::with_capacity(numel(out_shape));
    for o in 0..outer {
        for t in x {
            let len = t.shape[axis] * inner;
            out.extend_from_slice(&t.data[o * len..][..len]);
        }
    }
    out
}

fn upsample2x(x: &Tensor) -> Vec<f32> {
    let (h, w) = (x.shape[2], x.shape[3]);
    let mut out = vec![0.0f32; x.numel() * 4];
    out.par_chunks_mut(4 * h * w)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for y in 0..2 * h {
                for xx in 0..2 * w {
                    dst[y * 2 * w + xx] = src[(y / 2) * w + xx / 2];
                }
            }
        });
    out
}

fn max_pool(x: &Tensor, kernel: usize, stride: usize, out_shape: &[usize]) -> Vec<f32> {
    let (h, w) = (x.shape[2], x.shape[3]);
    let (ho, wo) = (out_shape[2], out_shape[3]);
    let mut out = vec![0.0f32; numel(out_shape)];
    out.par_chunks_mut(ho * wo)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut m = f32::NEG_INFINITY;
                    // ceil_mode windows may hang over the edge: clip them.
                    for y in oy * stride..(oy * stride + kernel).min(h) {
                        for xx in ox * stride..(ox * stride + kernel).min(w) {
                            m = m.max(src[y * w + xx]);
                        }
                    }
                    dst[oy * wo + ox] = m;
                }
            }
        });
    out
}

fn permute(x: &Tensor, perm: &[usize], out_shape: &[usize]) -> Vec<f32> {
    let sx = strides(&x.shape);
    let src_strides: Vec<usize> = perm.iter().map(|&p| sx[p]).collect();
    let so = strides(out_shape);
    let mut out = vec![0.0f32; x.numel()];
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let (mut src, mut rem) = (0, i);
        for d in 0..out_shape.len() {
            src += (rem / so[d]) * src_strides[d];
            rem %= so[d];
        }
        *o = x.data[src];
    });
    out
}

#[cfg(test)]
mod tests {
    //! Each kernel against a direct, loop-by-definition version of the op.
    use super::*;

    fn ramp(shape: &[usize], k: f32) -> Tensor {
        let n = numel(shape);
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| (i as f32 * k).sin() * 2.0).collect(),
        )
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn grouped_strided_padded_conv_matches_the_definition() {
        // Small and larger than a tile (tiles then start mid-row), stride 1 (the contiguous
        // im2col copies) and 2, symmetric and lopsided padding.
        for (h, w, stride, pad) in [
            (9, 7, [2, 1], [1, 2, 0, 1]),
            (40, 37, [1, 1], [1, 1, 1, 1]),
            (33, 45, [2, 2], [0, 1, 1, 0]),
            (35, 31, [1, 2], [2, 0, 1, 2]),
        ] {
            conv_case(h, w, stride, pad);
        }
    }

    fn conv_case(h: usize, w: usize, stride: [usize; 2], pad: [usize; 4]) {
        let (n, c, o, groups, k) = (2, 6, 4, 2, 3);
        let x = ramp(&[n, c, h, w], 0.37);
        let wt = ramp(&[o, c / groups, k, k], 0.91);
        let b = ramp(&[o], 1.3);
        let op = Op::Conv2d {
            stride,
            padding: pad,
            groups,
        };
        let shape = crate::graph::infer(&op, &[&x.shape, &wt.shape, &b.shape]).unwrap();
        let got = eval(&op, &[&x, &wt, &b], &shape);
        let (ho, wo) = (shape[2], shape[3]);
        let mut want = vec![0f32; numel(&shape)];
        for bi in 0..n {
            for oc in 0..o {
                let g = oc / (o / groups);
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = b.data[oc];
                        for ci in 0..c / groups {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride[0] + ky) as isize - pad[0] as isize;
                                    let ix = (ox * stride[1] + kx) as isize - pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((bi * c + g * (c / groups) + ci) * h + iy as usize)
                                        * w
                                        + ix as usize;
                                    s += x.data[xi]
                                        * wt.data[((oc * (c / groups) + ci) * k + ky) * k + kx];
                                }
                            }
                        }
                        want[((bi * o + oc) * ho + oy) * wo + ox] = s;
                    }
                }
            }
        }
        close(&got.data, &want);
    }

    #[test]
    fn attention_matches_the_definition() {
        let (b, lq, lk, c, heads) = (2, 5, 7, 6, 3);
        let (q, k, v) = (
            ramp(&[b, lq, c], 0.3),
            ramp(&[b, lk, c], 0.7),
            ramp(&[b, lk, c], 1.1),
        );
        let got = eval(&Op::Attention { heads }, &[&q, &k, &v], &[b, lq, c]);
        let d = c / heads;
        let mut want = vec![0f32; b * lq * c];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..lq {
                    let scores: Vec<f32> = (0..lk)
                        .map(|j| {
                            (0..d)
                                .map(|t| {
                                    q.data[(bi * lq + i) * c + h * d + t]
                                        * k.data[(bi * lk + j) * c + h * d + t]
                                })
                                .sum::<f32>()
                                / (d as f32).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for t in 0..d {
                        want[(bi * lq + i) * c + h * d + t] = (0..lk)
                            .map(|j| e[j] / z * v.data[(bi * lk + j) * c + h * d + t])
                            .sum();
                    }
                }
            }
        }
        close(&got.data, &want);
    }

    #[test]
    fn norms_match_the_definition() {
        let x = ramp(&[2, 6, 3, 2], 0.53);
        let (gamma, beta) = (ramp(&[6], 0.2), ramp(&[6], 0.9));
        let got = eval(
            &Op::GroupNorm {
                groups: 3,
                eps: 1e-5,
                silu: true,
            },
            &[&x, &gamma, &beta],
            &x.shape,
        );
        let mut want = vec![0f32; x.numel()];
        for b in 0..2 {
            for g in 0..3 {
                let idx: Vec<usize> = (0..2)
                    .flat_map(|ci| (0..6).map(move |j| ((b * 6 + g * 2 + ci) * 6) + j))
                    .collect();
                let mean = idx.iter().map(|&i| x.data[i]).sum::<f32>() / 12.0;
                let var = idx.iter().map(|&i| (x.data[i] - mean).powi(2)).sum::<f32>() / 12.0;
                for &i in &idx {
                    let ch = (i / 6) % 6;
                    want[i] = silu(
                        (x.data[i] - mean) / (var + 1e-5).sqrt() * gamma.data[ch] + beta.data[ch],
                    );
                }
            }
        }
        close(&got.data, &want);

        let t = ramp(&[3, 4], 0.77);
        let (g4, b4) = (ramp(&[4], 0.1), ramp(&[4], 0.4));
        let got = eval(&Op::LayerNorm { eps: 1e-5 }, &[&t, &g4, &b4], &t.shape);
        for r in 0..3 {
            let row = &t.data[r * 4..r * 4 + 4];
            let mean = row.iter().sum::<f32>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            for (i, v) in row.iter().enumerate() {
                let want = (v - mean) / (var + 1e-5).sqrt() * g4.data[i] + b4.data[i];
                assert!((got.data[r * 4 + i] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn layout_ops_move_elements_where_they_belong() {
        let x = ramp(&[2, 3, 4], 0.1);
        let p = eval(
            &Op::Permute {
                perm: vec![2, 0, 1],
            },
            &[&x],
            &[4, 2, 3],
        );
        for a in 0..2 {
            for b in 0..3 {
                for c in 0..4 {
                    assert_eq!(p.data[(c * 2 + a) * 3 + b], x.data[(a * 3 + b) * 4 + c]);
                }
            }
        }
        let s = eval(
            &Op::Slice {
                axis: 1,
                start: 1,
                end: 3,
            },
            &[&x],
            &[2, 2, 4],
        );
        assert_eq!(&s.data[..4], &x.data[4..8]);
        assert_eq!(&s.data[8..12], &x.data[16..20]);
        let y = ramp(&[2, 1, 4], 0.2);
        let cat = eval(&Op::Concat { axis: 1 }, &[&x, &y], &[2, 4, 4]);
        assert_eq!(&cat.data[12..16], &y.data[..4]);
        let bias = ramp(&[3, 1], 0.5);
        let sum = eval(&Op::Add, &[&x, &bias], &x.shape);
        assert!(
            (sum.data[(3 + 2) * 4 + 1] - (x.data[(3 + 2) * 4 + 1] + bias.data[2])).abs() < 1e-6
        );
        let img = ramp(&[1, 1, 2, 3], 0.3);
        let up = eval(&Op::UpsampleNearest2x, &[&img], &[1, 1, 4, 6]);
        assert_eq!(up.data[6 * 3 + 5], img.data[3 + 2]);
        let pool_in = ramp(&[1, 1, 5, 5], 0.9);
        let pooled = eval(
            &Op::MaxPool2d {
                kernel: 2,
                stride: 2,
                ceil_mode: true,
            },
            &[&pool_in],
            &[1, 1, 3, 3],
        );
        assert_eq!(
            pooled.data[8], pool_in.data[24],
            "the ceil-mode edge window holds one element"
        );
        let sm = eval(&Op::Softmax { axis: 1 }, &[&x], &x.shape);
        let col: f32 = (0..3).map(|b| sm.data[(3 + b) * 4 + 2]).sum();
        assert!((col - 1.0).abs() < 1e-6);
    }

    #[test]
    fn gathered_rows_start_where_each_batch_item_says_and_stay_in_range() {
        // [3 items, 5 rows, 2 columns]; item b row r holds 10b + r.
        let data = (0..3)
            .flat_map(|b| (0..5).flat_map(move |r| [(10 * b + r) as f32; 2]))
            .collect();
        let x = Tensor::new(vec![3, 5, 2], data);
        // 1.4 rounds to 1; 9 clamps to the last start (5 - 2 = 3); a negative start to 0.
        let first = Tensor::new(vec![3], vec![1.4, 9.0, -2.0]);
        let got = eval(&Op::GatherRows { rows: 2 }, &[&x, &first], &[3, 2, 2]);
        assert_eq!(
            got.data,
            vec![1., 1., 2., 2., 13., 13., 14., 14., 20., 20., 21., 21.]
        );
        assert_eq!(gather_start(f32::NAN, 5, 2), 0);
    }

    #[test]
    fn activations_match_their_formulas() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-2.0) + 0.045_500_26).abs() < 1e-6);
        let x = Tensor::new(vec![1, 4], vec![1.0, -1.0, 2.0, -3.0]);
        let g = eval(&Op::Geglu, &[&x], &[1, 2]);
        close(&g.data, &[gelu(2.0), -gelu(-3.0)]);
        let a = Tensor::new(vec![2], vec![0.5, 0.1]);
        let pr = eval(
            &Op::PRelu,
            &[&Tensor::new(vec![1, 2, 1], vec![-2.0, -2.0]), &a],
            &[1, 2, 1],
        );
        close(&pr.data, &[-1.0, -0.2]);
    }
}

//! Lowering an engines `Graph` to the CUDA executor's steps — pure data, no GPU needed, so CI
//! checks it.
//!
//! Layouts: 4-d activations live channels-last (NHWC) between convolutions, group norms and
//! upsamples, which is what cuDNN's tensor-core convolutions want; the graph's
//! NCHW->tokens permute and its inverse then cost nothing (the NHWC buffer already is the token
//! matrix). Graph inputs and outputs stay in the graph's own (row-major) layout.
//!
//! Fusions: a convolution's bias, and a residual add whose other operand is ready before the
//! convolution, run in its epilogue; the UNet's constant time-embedding add folds into the
//! convolution's bias (one per image only where the images' differ); a linear layer's bias and
//! residual run inside cuBLASLt.
//!
//! Memory: every activation is a buffer whose lifetime is the span of steps that touch it;
//! `arena::place` packs them into one allocation.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lipstream_engines::graph::{Graph, Op, ValueId};
use lipstream_engines::tensor::{numel, Tensor};

use crate::arena::Lifetime;
use crate::blas::Gemm;
use crate::conv::ConvShape;
use crate::error::GpuError;
use crate::kernels::elementwise::{Binary, Elementwise, Unary};
use crate::kernels::group_norm::{GroupNorm, GroupNormShape};

/// How a value's elements are ordered in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Row-major in the graph's shape.
    Plain,
    /// Channels last: a 4-d [N,C,H,W] value stored as [N,H,W,C], a 3-d [N,C,W] one (whisper's
    /// 1-d convolutions) as [N,W,C].
    Nhwc,
}

/// Where an operand lives: an arena buffer or an uploaded weight, plus an element offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    None,
    Arena(usize, usize),
    Weight(usize, usize),
}

impl Loc {
    /// The same base, `elems` further.
    pub fn at(self, elems: usize) -> Loc {
        match self {
            Loc::None => Loc::None,
            Loc::Arena(b, o) => Loc::Arena(b, o + elems),
            Loc::Weight(w, o) => Loc::Weight(w, o + elems),
        }
    }
}

/// How a weight is laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightForm {
    Plain,
    /// [O,C,kh,kw] filters (or [N,C,H,W] constants) stored channels-last.
    ChannelsLast,
    /// A channels-last filter, or a bias, with O zero-padded to this many outputs.
    PaddedOut(usize),
}

/// One weight to upload: the graph's constant (or one derived from constants) and its form.
#[derive(Clone, Debug)]
pub struct WeightUse {
    /// Unique across the graphs of one engine, so profiles share uploads.
    pub key: String,
    pub tensor: Arc<Tensor>,
    pub form: WeightForm,
}

/// One executor step.
#[derive(Clone, Debug)]
pub enum Step {
    Conv {
        shape: ConvShape,
        x: Loc,
        w: Loc,
        y: Loc,
        /// Bias and its per-image stride (0: one bias for all images).
        bias: Option<(Loc, usize)>,
        residual: Option<Loc>,
        /// Where the epilogue writes group sums for the group norm reading y, and its groups.
        stats: Option<(Loc, usize)>,
    },
    Pad {
        x: Loc,
        y: Loc,
        nhwc: [usize; 4],
        pad: [usize; 4],
    },
    /// A nearest 2x upsample + 3x3 convolution computed on the small image (`subpixel_filters`):
    /// x holds the 2x2 convolution's [n, h+1, w+1, 4c] output, y gets the [n, 2h, 2w, c] image
    /// with the bias added (and group sums for the norm reading y, as a conv epilogue's).
    Subpixel {
        x: Loc,
        y: Loc,
        bias: Option<Loc>,
        /// The small image's n, h, w and the output's channels.
        nhwc: [usize; 4],
        stats: Option<(Loc, usize)>,
    },
    /// c = alpha * a · op(b) (+ bias) (+ residual), then GELU with `gelu`: linear layers and
    /// attention's products.
    Gemm {
        gemm: Gemm,
        a: Loc,
        b: Loc,
        bias: Option<Loc>,
        residual: Option<Loc>,
        gelu: bool,
        c: Loc,
    },
    GroupNorm {
        shape: GroupNormShape,
        x: Loc,
        gamma: Loc,
        beta: Loc,
        y: Loc,
        scratch: Loc,
    },
    LayerNorm {
        x: Loc,
        gamma: Loc,
        beta: Loc,
        y: Loc,
        rows: usize,
        cols: usize,
        eps: f32,
    },
    /// Fused attention over token-major q, k, v [batch, l, heads*d] -> o [batch, lq, heads*d].
    Attention {
        q: Loc,
        k: Loc,
        v: Loc,
        o: Loc,
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        d: usize,
        /// Row strides of q and of k/v, in elements: wider than heads*d when one projection
        /// GEMM wrote them side by side.
        ldq: usize,
        ldkv: usize,
        /// Key splits and their fp32 scratch (`Loc::None` with one split).
        splits: usize,
        part: Loc,
    },
    /// Row softmax in place.
    Softmax {
        x: Loc,
        rows: usize,
        cols: usize,
    },
    Unary {
        op: Unary,
        x: Loc,
        y: Loc,
        n: usize,
    },
    Add {
        a: Loc,
        b: Loc,
        y: Loc,
        n: usize,
    },
    Binary {
        op: Binary,
        a: Loc,
        a_strides: Vec<usize>,
        b: Loc,
        b_strides: Vec<usize>,
        y: Loc,
        dims: Vec<usize>,
    },
    Geglu {
        x: Loc,
        y: Loc,
        rows: usize,
        d: usize,
    },
    Upsample {
        x: Loc,
        y: Loc,
        nhwc: [usize; 4],
    },
    Permute {
        x: Loc,
        y: Loc,
        dims: Vec<usize>,
        strides: Vec<usize>,
    },
    CopyRows {
        x: Loc,
        y: Loc,
        rows: usize,
        cols: usize,
        xs: usize,
        ys: usize,
    },
    /// y [batch, rows, cols] = rows first[b] .. first[b] + rows of each x[b] ([batch, t, cols],
    /// rows `xs` apart); `first` is a graph input ([batch] fp16 whole numbers), read by the
    /// kernel at replay (`Op::GatherRows`).
    GatherRows {
        x: Loc,
        first: Loc,
        y: Loc,
        batch: usize,
        t: usize,
        rows: usize,
        cols: usize,
        xs: usize,
    },
    /// A concatenation on the innermost storage axis: the parts' rows side by side in y, rows
    /// `ys` apart, in one launch (`Layout::concat_rows`).
    Concat {
        parts: Vec<ConcatPart>,
        y: Loc,
        rows: usize,
        ys: usize,
    },
}

/// One input of `Step::Concat`: `cols` elements of each row, rows `xs` apart.
#[derive(Clone, Copy, Debug)]
pub struct ConcatPart {
    pub x: Loc,
    pub cols: usize,
    pub xs: usize,
}

impl Step {
    /// Every operand the step reads or writes.
    pub fn locs(&self) -> Vec<Loc> {
        let mut v = match self {
            Step::Conv {
                x,
                w,
                y,
                bias,
                residual,
                stats,
                ..
            } => vec![
                *x,
                *w,
                *y,
                bias.map_or(Loc::None, |b| b.0),
                residual.unwrap_or(Loc::None),
                stats.map_or(Loc::None, |s| s.0),
            ],
            Step::Pad { x, y, .. }
            | Step::Unary { x, y, .. }
            | Step::Geglu { x, y, .. }
            | Step::Upsample { x, y, .. }
            | Step::Permute { x, y, .. }
            | Step::CopyRows { x, y, .. } => vec![*x, *y],
            Step::Gemm {
                a,
                b,
                bias,
                residual,
                c,
                ..
            } => vec![
                *a,
                *b,
                *c,
                bias.unwrap_or(Loc::None),
                residual.unwrap_or(Loc::None),
            ],
            Step::Subpixel {
                x, y, bias, stats, ..
            } => vec![
                *x,
                *y,
                bias.unwrap_or(Loc::None),
                stats.map_or(Loc::None, |s| s.0),
            ],
            Step::Concat { parts, y, .. } => parts.iter().map(|p| p.x).chain([*y]).collect(),
            Step::GatherRows { x, first, y, .. } => vec![*x, *first, *y],
            Step::Softmax { x, .. } => vec![*x],
            Step::Attention {
                q, k, v, o, part, ..
            } => vec![*q, *k, *v, *o, *part],
            Step::GroupNorm {
                x,
                gamma,
                beta,
                y,
                scratch,
                ..
            } => vec![*x, *gamma, *beta, *y, *scratch],
            Step::LayerNorm {
                x, gamma, beta, y, ..
            } => vec![*x, *gamma, *beta, *y],
            Step::Add { a, b, y, .. } | Step::Binary { a, b, y, .. } => vec![*a, *b, *y],
        };
        v.retain(|l| *l != Loc::None);
        v
    }

    /// Floating-point operations of the step's multiply-adds (two per multiply-add), for the
    /// profile's TFLOP/s: the convolutions, GEMMs and attention that tensor cores run. Every
    /// other step moves memory and counts none.
    pub fn flops(&self) -> f64 {
        match self {
            Step::Conv { shape: s, .. } => {
                let (ho, wo) = s.out_hw();
                let per_output = (s.c / s.groups.max(1)) * s.kh * s.kw;
                2.0 * (s.n * ho * wo * s.o) as f64 * per_output as f64
            }
            Step::Gemm { gemm: g, .. } => 2.0 * (g.batch * g.m * g.n) as f64 * g.k as f64,
            Step::Attention {
                batch,
                lq,
                lk,
                heads,
                d,
                ..
            } => {
                // q·kᵀ and p·v, each lq x lk x d per head (the values' width equals d here).
                4.0 * (batch * heads * lq * lk) as f64 * *d as f64
            }
            _ => 0.0,
        }
    }

    /// The step with its shape, for profiles.
    pub fn describe(&self) -> String {
        match self {
            Step::Conv { shape: s, .. } => format!(
                "conv {}x{}x{}x{} -> {} k{}x{} s{} g{}",
                s.n, s.c, s.h, s.w, s.o, s.kh, s.kw, s.stride[1], s.groups
            ),
            Step::Gemm { gemm: g, gelu, .. } => format!(
                "gemm {}x[{}x{}]·[{}x{}]{}{}",
                g.batch,
                g.m,
                g.k,
                g.k,
                g.n,
                if g.b_trans { "ᵀ" } else { "" },
                if *gelu { " gelu" } else { "" }
            ),
            Step::GroupNorm { shape: s, .. } => {
                format!("group_norm {}x{}x{} g{}", s.n, s.hw, s.c, s.groups)
            }
            Step::Softmax { rows, cols, .. } => format!("softmax {rows}x{cols}"),
            Step::Attention {
                batch,
                lq,
                lk,
                heads,
                d,
                splits,
                ldq,
                ldkv,
                ..
            } => {
                let packed = if *ldq > heads * d {
                    " qkv"
                } else if *ldkv > heads * d {
                    " kv"
                } else {
                    ""
                };
                format!("attention {batch}x{heads} q{lq} k{lk} d{d} split{splits}{packed}")
            }
            Step::Permute { dims, .. } => format!("permute {dims:?}"),
            Step::Upsample { nhwc, .. } => format!("upsample {nhwc:?}"),
            Step::Subpixel {
                nhwc: [n, h, w, c], ..
            } => {
                format!("subpixel {n}x{h}x{w} -> {}x{}x{c}", 2 * h, 2 * w)
            }
            Step::Concat { parts, rows, .. } => {
                let cols: Vec<String> = parts.iter().map(|p| p.cols.to_string()).collect();
                format!("concat {rows}x[{}]", cols.join("+"))
            }
            other => other.name().to_string(),
        }
    }

    /// Short name for timing tables.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Conv { .. } => "conv",
            Step::Pad { .. } => "pad",
            Step::Gemm { gemm, .. } if gemm.batch > 1 => "attention_gemm",
            Step::Gemm { .. } => "linear",
            Step::Softmax { .. } => "softmax",
            Step::Attention { .. } => "attention",
            Step::GroupNorm { .. } => "group_norm",
            Step::LayerNorm { .. } => "layer_norm",
            Step::Unary { .. } => "unary",
            Step::Add { .. } => "add",
            Step::Binary { .. } => "binary",
            Step::Geglu { .. } => "geglu",
            Step::Upsample { .. } => "upsample",
            Step::Subpixel { .. } => "subpixel",
            Step::Permute { .. } => "permute",
            Step::CopyRows { .. } => "copy",
            Step::Concat { .. } => "concat",
            Step::GatherRows { .. } => "gather_rows",
        }
    }
}

/// A graph input or output: where it lives and its (row-major) shape.
#[derive(Clone, Debug)]
pub struct Binding {
    pub name: String,
    pub loc: Loc,
    pub shape: Vec<usize>,
}

/// A lowered graph.
#[derive(Clone, Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Bytes of each arena buffer.
    pub buffers: Vec<usize>,
    pub lifetimes: Vec<Lifetime>,
    pub weights: Vec<WeightUse>,
    pub inputs: Vec<Binding>,
    pub outputs: Vec<Binding>,
}

#[derive(Clone, Debug)]
struct Val {
    loc: Loc,
    layout: Layout,
    shape: Vec<usize>,
    /// Number of steps emitted when the value became available.
    ready: usize,
}

struct Lower<'g> {
    g: &'g Graph,
    vals: Vec<Option<Val>>,
    steps: Vec<Step>,
    buffers: Vec<usize>,
    weights: Vec<WeightUse>,
    weight_index: HashMap<(usize, WeightForm), usize>,
    converted: HashMap<(usize, Layout), Loc>,
    uses: Vec<usize>,
    /// The conv / linear step that produced a value, for epilogue fusions.
    producer: HashMap<usize, usize>,
    prefix: String,
    /// Attention projections computed by one GEMM: each member linear's group and column.
    packed: HashMap<usize, (usize, usize)>,
    groups: Vec<Vec<usize>>,
    /// Row stride of values that are column slices of a packed projection's output.
    row_stride: HashMap<usize, usize>,
    /// Convolutions that run on the small image, each with the upsample it absorbs.
    subpixel: HashMap<usize, usize>,
    /// Those upsamples: never materialized.
    absorbed: HashSet<usize>,
}

/// A convolution's input as its pad step had it: the step before the convolution padded x
/// (zeros around, at least as many after the image as before it) into the buffer the
/// convolution reads. A graph-API convolution can take that padding itself and read x, which
/// therefore lives through the convolution's step too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PadInput {
    pub x: Loc,
    /// x's shape, [n, h, w, c].
    pub nhwc: [usize; 4],
    /// Zeros (top, left, bottom, right).
    pub pad: [usize; 4],
}

impl PadInput {
    /// The pad step feeding convolution step `s`, if the step before it is one.
    pub fn of(steps: &[Step], s: usize) -> Option<PadInput> {
        let (Some(Step::Pad { x, y, nhwc, pad }), Some(Step::Conv { x: cx, shape, .. })) =
            (s.checked_sub(1).and_then(|p| steps.get(p)), steps.get(s))
        else {
            return None;
        };
        (cx == y && shape.pad == [0, 0] && pad[2] >= pad[0] && pad[3] >= pad[1]).then_some(
            PadInput {
                x: *x,
                nhwc: *nhwc,
                pad: *pad,
            },
        )
    }

    /// Convolution `shape` (of the padded image) as one of x that pads it itself.
    pub fn conv_shape(&self, shape: &ConvShape) -> ConvShape {
        let [_, h, w, _] = self.nhwc;
        let [top, left, bottom, right] = self.pad;
        ConvShape {
            h,
            w,
            pad: [top, left],
            pad_end: [bottom - top, right - left],
            ..*shape
        }
    }
}

/// A two-pass group norm whose only reader is the next step, a convolution to 8 (padded)
/// outputs that `conv_out`'s normed kernel takes: that kernel can read the norm's input and
/// statistics instead of its output, so the norm's input and scratch live through the
/// convolution's step too.
#[derive(Clone, Copy, Debug)]
pub struct NormInput {
    pub x: Loc,
    pub gamma: Loc,
    pub beta: Loc,
    pub scratch: Loc,
    pub shape: GroupNormShape,
}

impl NormInput {
    /// The norm feeding convolution step `s`, if the step before it is one that nothing else
    /// reads (no other step, no graph output).
    pub fn of(steps: &[Step], outputs: &[Binding], s: usize) -> Option<NormInput> {
        let (
            Some(Step::GroupNorm {
                shape: norm,
                x,
                gamma,
                beta,
                y,
                scratch,
            }),
            Some(Step::Conv {
                shape,
                x: cx,
                bias,
                residual: None,
                ..
            }),
        ) = (s.checked_sub(1).and_then(|p| steps.get(p)), steps.get(s))
        else {
            return None;
        };
        let Loc::Arena(buffer, 0) = *y else {
            return None;
        };
        let fits = cx == y
            && !norm.one_launch()
            && shape.nhwc
            && (shape.n, shape.h * shape.w, shape.c) == (norm.n, norm.hw, norm.c)
            && bias.is_none_or(|(_, stride)| stride == 0 || shape.n == 1)
            && crate::kernels::conv_out::fits_normed(shape, norm.groups);
        let in_y = |l: &Loc| matches!(*l, Loc::Arena(b, _) if b == buffer);
        let read_elsewhere = || {
            steps
                .iter()
                .enumerate()
                .any(|(i, st)| i + 1 != s && i != s && st.locs().iter().any(in_y))
                || outputs.iter().any(|o| in_y(&o.loc))
        };
        (fits && !read_elsewhere()).then_some(NormInput {
            x: *x,
            gamma: *gamma,
            beta: *beta,
            scratch: *scratch,
            shape: *norm,
        })
    }
}

/// The linear layers feeding fused attentions that can run as one GEMM: q, k and v of a
/// self-attention (one input), or k and v of every cross-attention over one context. Each member is used by the
/// attention alone, reads the same input with the same width, and its output width keeps
/// 16-byte rows.
fn projection_groups(g: &Graph, uses: &[usize]) -> Vec<Vec<usize>> {
    let linear = |v: ValueId| -> Option<(usize, ValueId, usize)> {
        let i = v.0 as usize;
        let n = &g.nodes[i];
        let weight_const = n.inputs.get(1).is_some_and(|w| g.const_value(*w).is_some());
        let bias_const = n.inputs.get(2).is_none_or(|b| g.const_value(*b).is_some());
        (matches!(n.op, Op::Linear) && weight_const && bias_const && uses[i] == 1)
            .then(|| (i, n.inputs[0], g.shape(n.inputs[1])[1]))
    };
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut kv_groups: HashMap<(ValueId, usize), usize> = HashMap::new();
    for n in &g.nodes {
        let Op::Attention { heads } = n.op else {
            continue;
        };
        let (qs, ks) = (g.shape(n.inputs[0]), g.shape(n.inputs[1]));
        let d = qs[2] / heads;
        if !crate::kernels::attention::flash_supports(d, n.shape[2] / heads) || ks[2] != qs[2] {
            continue;
        }
        let [q, k, v] = [0, 1, 2].map(|j| linear(n.inputs[j]));
        let (Some(k), Some(v)) = (k, v) else {
            continue;
        };
        if k.1 != v.1 || k.2 != v.2 || !qs[2].is_multiple_of(8) {
            continue;
        }
        match q {
            Some(q) if q.1 == k.1 && q.2 == k.2 => groups.push(vec![q.0, k.0, v.0]),
            // Cross-attentions reading one context (the UNet's 16 over the audio prompt) share
            // one GEMM for all their keys and values.
            _ => match kv_groups.get(&(k.1, k.2)) {
                Some(&gi) => groups[gi].extend([k.0, v.0]),
                None => {
                    kv_groups.insert((k.1, k.2), groups.len());
                    groups.push(vec![k.0, v.0]);
                }
            },
        }
    }
    groups
}

/// The 3x3 convolutions (stride 1, padding 1, one group, constant filters, whole 8-channel
/// vectors in and out) whose input is a nearest 2x upsample read by nothing else: conv node ->
/// upsample node. They run on the small image (`subpixel_filters`).
fn subpixel_pairs(g: &Graph, uses: &[usize]) -> HashMap<usize, usize> {
    let mut pairs = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Op::Conv2d {
            stride: [1, 1],
            padding: [1, 1, 1, 1],
            groups: 1,
        } = n.op
        else {
            continue;
        };
        let up = n.inputs[0].0 as usize;
        let ws = g.shape(n.inputs[1]);
        let consts = n.inputs[1..].iter().all(|v| g.const_value(*v).is_some());
        if matches!(g.nodes[up].op, Op::UpsampleNearest2x)
            && uses[up] == 1
            && consts
            && ws.len() == 4
            && ws[2] == 3
            && ws[3] == 3
            && ws[0].is_multiple_of(8)
            && ws[1].is_multiple_of(8)
        {
            pairs.insert(i, up);
        }
    }
    pairs
}

/// A 3x3 convolution (padding 1) of a nearest 2x upsampled image, as one 2x2 convolution
/// (padding 1) of the image itself. An output pixel of parity (py, px) sees only two distinct
/// input rows and columns through its 3x3 window: rows i-1, i for py = 0 (taps 0 | 1+2), rows
/// i, i+1 for py = 1 (taps 0+1 | 2), likewise columns. So filter `w` [O, C, 3, 3] becomes
/// [4O, C, 2, 2], parity (py, px) at outputs (2py + px)·O.., and the small convolution's output at
/// (i + py, j + px) is the big one's at (2i + py, 2j + px): 16/36 of the multiply-adds, and the
/// upsampled image is never written.
pub fn subpixel_filters(w: &Tensor) -> Tensor {
    let (o, c) = (w.shape[0], w.shape[1]);
    // Which 3x3 taps fold into 2x2 tap `a` for parity `p`.
    let taps = |p: usize, a: usize| -> &'static [usize] {
        match (p, a) {
            (0, 0) => &[0],
            (0, _) => &[1, 2],
            (_, 0) => &[0, 1],
            _ => &[2],
        }
    };
    let mut out = vec![0.0f32; 4 * o * c * 4];
    for (py, px) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        for oc in 0..o {
            let dst_o = (2 * py + px) * o + oc;
            for ic in 0..c {
                let src = &w.data[(oc * c + ic) * 9..][..9];
                for a in 0..2 {
                    for b in 0..2 {
                        let mut acc = 0.0f64;
                        for &dy in taps(py, a) {
                            for &dx in taps(px, b) {
                                acc += src[dy * 3 + dx] as f64;
                            }
                        }
                        out[((dst_o * c + ic) * 2 + a) * 2 + b] = acc as f32;
                    }
                }
            }
        }
    }
    Tensor::new(vec![4 * o, c, 2, 2], out)
}

fn unsupported(node: &str, op: &'static str, reason: impl Into<String>) -> GpuError {
    GpuError::Unsupported {
        node: node.to_string(),
        op,
        reason: reason.into(),
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The semantic axis held by each storage axis of a value in `layout`.
fn storage_order(rank: usize, layout: Layout) -> Vec<usize> {
    match layout {
        Layout::Nhwc if rank >= 3 => {
            let mut v: Vec<usize> = (0..rank).filter(|&a| a != 1).collect();
            v.push(1);
            v
        }
        _ => (0..rank).collect(),
    }
}

/// The storage axis of semantic axis `axis`.
fn storage_axis(rank: usize, layout: Layout, axis: usize) -> usize {
    storage_order(rank, layout)
        .iter()
        .position(|&a| a == axis)
        .unwrap_or(axis)
}

/// Storage dims of a value in `layout`.
fn storage_dims(shape: &[usize], layout: Layout) -> Vec<usize> {
    storage_order(shape.len(), layout)
        .iter()
        .map(|&a| shape[a])
        .collect()
}

/// Element strides of each semantic axis of a value stored in `layout`.
fn semantic_strides(shape: &[usize], layout: Layout) -> Vec<usize> {
    let st = strides(&storage_dims(shape, layout));
    (0..shape.len())
        .map(|a| st[storage_axis(shape.len(), layout, a)])
        .collect()
}

impl<'g> Lower<'g> {
    fn node_name(&self, v: usize) -> &str {
        &self.g.nodes[v].name
    }

    fn buffer(&mut self, bytes: usize) -> Loc {
        self.buffers.push(bytes.max(2));
        Loc::Arena(self.buffers.len() - 1, 0)
    }

    fn act(&mut self, shape: &[usize]) -> Loc {
        self.buffer(2 * numel(shape))
    }

    fn push(&mut self, step: Step) -> usize {
        self.steps.push(step);
        self.steps.len() - 1
    }

    fn set(&mut self, v: usize, loc: Loc, layout: Layout) {
        let shape = self.g.nodes[v].shape.clone();
        self.vals[v] = Some(Val {
            loc,
            layout,
            shape,
            ready: self.steps.len(),
        });
    }

    fn weight(&mut self, v: ValueId, form: WeightForm) -> Result<Loc, GpuError> {
        let i = v.0 as usize;
        let node = &self.g.nodes[i];
        let Op::Const(t) = &node.op else {
            return Err(unsupported(
                &node.name,
                node.op.name(),
                "weights must be constants",
            ));
        };
        let ok = match form {
            WeightForm::Plain => true,
            WeightForm::ChannelsLast => t.shape.len() == 4 || t.shape.len() == 3,
            WeightForm::PaddedOut(o) => {
                (t.shape.len() == 4 || t.shape.len() == 1) && o >= t.shape[0]
            }
        };
        if !ok {
            return Err(unsupported(
                &node.name,
                "const",
                format!("{form:?} does not fit {:?}", t.shape),
            ));
        }
        let key = (i, form);
        if let Some(&w) = self.weight_index.get(&key) {
            return Ok(Loc::Weight(w, 0));
        }
        self.weights.push(WeightUse {
            key: format!("{}{}:{:?}:{:?}", self.prefix, node.name, t.shape, form),
            tensor: t.clone(),
            form,
        });
        self.weight_index.insert(key, self.weights.len() - 1);
        Ok(Loc::Weight(self.weights.len() - 1, 0))
    }

    fn val(&mut self, v: ValueId) -> Result<Val, GpuError> {
        let i = v.0 as usize;
        if let Some(val) = &self.vals[i] {
            return Ok(val.clone());
        }
        if matches!(self.g.nodes[i].op, Op::Const(_)) {
            let loc = self.weight(v, WeightForm::Plain)?;
            return Ok(Val {
                loc,
                layout: Layout::Plain,
                shape: self.g.nodes[i].shape.clone(),
                ready: 0,
            });
        }
        Err(unsupported(
            self.node_name(i),
            "value",
            "used before it is computed",
        ))
    }

    /// The value in `want` layout, converting (once) when needed.
    fn operand(&mut self, v: ValueId, want: Layout) -> Result<Loc, GpuError> {
        let val = self.val(v)?;
        if val.layout == want {
            return Ok(val.loc);
        }
        let i = v.0 as usize;
        if matches!(self.g.nodes[i].op, Op::Const(_)) {
            return self.weight(v, WeightForm::ChannelsLast);
        }
        if let Some(&loc) = self.converted.get(&(i, want)) {
            return Ok(loc);
        }
        let s = &val.shape;
        // Walk the wanted storage order, reading each axis at its stride where it is now.
        let now = semantic_strides(s, val.layout);
        let order = storage_order(s.len(), want);
        let dims = storage_dims(s, want);
        let st = order.iter().map(|&a| now[a]).collect();
        let y = self.act(s);
        self.push(Step::Permute {
            x: val.loc,
            y,
            dims,
            strides: st,
        });
        self.converted.insert((i, want), y);
        Ok(y)
    }

    /// A packed projection group's GEMM, at its first member: the members' weights (and
    /// biases, zero where one has none) stacked, one output row per token holding every
    /// member's columns; each member's value is its column slice (`row_stride`).
    fn lower_packed(&mut self, i: usize) -> Result<(), GpuError> {
        let (gi, _) = self.packed[&i];
        if self.vals[i].is_some() {
            return Ok(());
        }
        let g = self.g;
        let members = self.groups[gi].clone();
        let first = &g.nodes[members[0]];
        let x = self.operand(first.inputs[0], Layout::Plain)?;
        let k = g.shape(first.inputs[1])[1];
        let widths: Vec<usize> = members
            .iter()
            .map(|&m| g.shape(g.nodes[m].inputs[1])[0])
            .collect();
        let total: usize = widths.iter().sum();
        let tensor = |v: Option<&ValueId>, n: usize| -> Vec<f32> {
            v.and_then(|v| g.const_value(*v))
                .map_or_else(|| vec![0.0; n], |t| t.data.clone())
        };
        let mut w = Vec::with_capacity(total * k);
        let mut b = Vec::with_capacity(total);
        let any_bias = members.iter().any(|&m| g.nodes[m].inputs.len() > 2);
        for (&m, &n) in members.iter().zip(&widths) {
            w.extend(tensor(g.nodes[m].inputs.get(1), n * k));
            b.extend(tensor(g.nodes[m].inputs.get(2), n));
        }
        let names: Vec<&str> = members.iter().map(|&m| g.nodes[m].name.as_str()).collect();
        let names = match names.as_slice() {
            [first, .., last] if names.len() > 3 => format!("{first}+{}+{last}", names.len() - 2),
            _ => names.join("+"),
        };
        let key = format!("{}{names}:packed:{total}x{k}", self.prefix);
        let mut derived = |key: String, shape: Vec<usize>, data: Vec<f32>| {
            self.weights.push(WeightUse {
                key,
                tensor: Arc::new(Tensor::new(shape, data)),
                form: WeightForm::Plain,
            });
            Loc::Weight(self.weights.len() - 1, 0)
        };
        let wl = derived(format!("{key}:w"), vec![total, k], w);
        let bias = any_bias.then(|| derived(format!("{key}:b"), vec![total], b));
        let rows = numel(&g.nodes[i].shape) / widths[0];
        let y = self.buffer(2 * rows * total);
        self.push(Step::Gemm {
            gemm: Gemm::linear(rows, k, total),
            a: x,
            b: wl,
            bias,
            residual: None,
            gelu: false,
            c: y,
        });
        let mut col = 0;
        for (&m, &n) in members.iter().zip(&widths) {
            self.set(m, y.at(col), Layout::Plain);
            self.row_stride.insert(m, total);
            col += n;
        }
        Ok(())
    }

    /// Conv node `i` over an absorbed upsample: the 2x2 convolution on the small image into a
    /// scratch buffer, then the interleave (+ bias) into the value.
    fn lower_subpixel(&mut self, i: usize) -> Result<(), GpuError> {
        let g = self.g;
        let node = &g.nodes[i];
        let up = self.subpixel[&i];
        let small = g.nodes[up].inputs[0];
        let xs = g.shape(small).to_vec();
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let o = g.shape(node.inputs[1])[0];
        let x = self.operand(small, Layout::Nhwc)?;
        let Some(filters) = g.const_value(node.inputs[1]) else {
            return Err(unsupported(
                &node.name,
                "conv2d",
                "filters must be constants",
            ));
        };
        self.weights.push(WeightUse {
            key: format!("{}{}:subpixel:{}x{c}", self.prefix, node.name, 4 * o),
            tensor: Arc::new(subpixel_filters(filters)),
            form: WeightForm::ChannelsLast,
        });
        let wl = Loc::Weight(self.weights.len() - 1, 0);
        let bias = match node.inputs.get(2) {
            Some(b) => Some(self.weight(*b, WeightForm::Plain)?),
            None => None,
        };
        let shape = ConvShape {
            n,
            c,
            h,
            w,
            o: 4 * o,
            kh: 2,
            kw: 2,
            stride: [1, 1],
            pad: [1, 1],
            groups: 1,
            nhwc: true,
            pad_end: [0, 0],
        };
        let t = self.buffer(2 * n * (h + 1) * (w + 1) * 4 * o);
        self.push(Step::Conv {
            shape,
            x,
            w: wl,
            y: t,
            bias: None,
            residual: None,
            stats: None,
        });
        let y = self.act(&node.shape);
        let s = self.push(Step::Subpixel {
            x: t,
            y,
            bias,
            nhwc: [n, h, w, o],
            stats: None,
        });
        self.producer.insert(i, s);
        self.set(i, y, Layout::Nhwc);
        Ok(())
    }

    fn const_tensor(&self, v: ValueId) -> Option<&Arc<Tensor>> {
        self.g.const_value(v)
    }

    /// Tries to run `Add(p, other)` inside p's producing conv/linear step.
    /// GELU node `node` of value `p` in the epilogue of the GEMM that made `p`, when nothing
    /// else reads `p`: cuBLASLt applies it after the bias and any residual, so a fused residual
    /// add stays inside it (`gelu(x·wᵀ + b + r)`). Nothing fuses into that GEMM afterwards.
    /// cuBLASLt's GELU is the tanh form, within 3e-4 of the exact one: whisper's fc1 (the only
    /// such pair in the models) saves its own pass, 5-7 % of a batch of windows on an H100,
    /// and the hidden states stay as close to the CPU executor's (6e-4 .. 8e-4 rel L2).
    fn fuse_gelu(&mut self, node: usize, p: ValueId) -> Result<bool, GpuError> {
        let pi = p.0 as usize;
        let Some(&s) = self.producer.get(&pi) else {
            return Ok(false);
        };
        if self.uses[pi] != 1 || self.row_stride.contains_key(&pi) {
            return Ok(false);
        }
        let pv = self.val(p)?;
        match &mut self.steps[s] {
            Step::Gemm { gemm, gelu, .. } if gemm.batch == 1 && !*gelu => *gelu = true,
            _ => return Ok(false),
        }
        self.vals[node] = Some(Val {
            ready: self.steps.len(),
            ..pv
        });
        Ok(true)
    }

    fn fuse_add(&mut self, node: usize, p: ValueId, other: ValueId) -> Result<bool, GpuError> {
        let pi = p.0 as usize;
        let Some(&s) = self.producer.get(&pi) else {
            return Ok(false);
        };
        if self.uses[pi] != 1 {
            return Ok(false);
        }
        let out_shape = self.g.nodes[node].shape.clone();
        let pv = self.val(p)?;
        if pv.shape != out_shape {
            return Ok(false);
        }
        // The UNet's time embedding: a constant [N|1, O, 1, 1] folded into a conv's bias, one
        // per image only when the images' embeddings differ: a bias shared by all images is
        // what cuDNN's fused call, its graph engines and the GEMM epilogue take (at timestep
        // 0 every image's is the same).
        if let (Some(t), Step::Conv { bias, shape, .. }) =
            (self.const_tensor(other).cloned(), self.steps[s].clone())
        {
            let o = shape.o;
            let n = shape.n;
            if shape.nhwc
                && t.shape.len() == 4
                && t.shape[1] == o
                && t.shape[2] == 1
                && t.shape[3] == 1
                && (t.shape[0] == n || t.shape[0] == 1)
            {
                let base: Vec<f32> = match bias {
                    Some((Loc::Weight(w, 0), 0)) => self.weights[w].tensor.data.clone(),
                    None => vec![0.0; o],
                    _ => return Ok(false),
                };
                let images = if t.shape[0] == 1 { 1 } else { n };
                let mut data = Vec::with_capacity(images * o);
                for img in 0..images {
                    data.extend((0..o).map(|c| base[c] + t.data[img * o + c]));
                }
                self.weights.push(WeightUse {
                    key: format!(
                        "{}{}:folded-bias:{}",
                        self.prefix,
                        self.g.nodes[node].name,
                        images * o
                    ),
                    tensor: Arc::new(Tensor::new(vec![images * o], data)),
                    form: WeightForm::Plain,
                });
                let w = Loc::Weight(self.weights.len() - 1, 0);
                let stride = if images == 1 { 0 } else { o };
                if let Step::Conv { bias, .. } = &mut self.steps[s] {
                    *bias = Some((w, stride));
                }
                self.vals[node] = Some(Val {
                    ready: self.steps.len(),
                    ..pv
                });
                self.producer.insert(node, s);
                return Ok(true);
            }
        }
        let ov = self.val(other)?;
        if ov.shape != out_shape || ov.layout != pv.layout || ov.ready > s {
            return Ok(false);
        }
        let fused = match &mut self.steps[s] {
            Step::Conv { residual, .. } if residual.is_none() => {
                *residual = Some(ov.loc);
                true
            }
            // A residual joins before the epilogue's GELU, not after it.
            Step::Gemm { residual, gelu, .. } if residual.is_none() && !*gelu => {
                *residual = Some(ov.loc);
                true
            }
            _ => false,
        };
        if fused {
            self.vals[node] = Some(Val {
                ready: self.steps.len(),
                ..pv
            });
            // The sum is the step's output now: a group norm reading it may take its sums.
            self.producer.insert(node, s);
        }
        Ok(fused)
    }

    fn lower(&mut self, i: usize) -> Result<(), GpuError> {
        let g = self.g;
        let node = &g.nodes[i];
        let name = node.name.as_str();
        let ins = &node.inputs;
        let out = node.shape.clone();
        match &node.op {
            Op::Const(_) => {}
            Op::Input => {
                let loc = self.act(&out);
                self.set(i, loc, Layout::Plain);
            }
            Op::Conv2d { .. } if self.subpixel.contains_key(&i) => {
                return self.lower_subpixel(i);
            }
            Op::Conv2d {
                stride,
                padding,
                groups,
            } => {
                let xs = g.shape(ins[0]).to_vec();
                let ws = g.shape(ins[1]).to_vec();
                let mut x = self.operand(ins[0], Layout::Nhwc)?;
                let (mut h, mut wd) = (xs[2], xs[3]);
                let symmetric = padding[0] == padding[2] && padding[1] == padding[3];
                let pad = if symmetric {
                    [padding[0], padding[1]]
                } else {
                    let y = self.buffer(
                        2 * xs[0]
                            * xs[1]
                            * (h + padding[0] + padding[2])
                            * (wd + padding[1] + padding[3]),
                    );
                    self.push(Step::Pad {
                        x,
                        y,
                        nhwc: [xs[0], h, wd, xs[1]],
                        pad: *padding,
                    });
                    h += padding[0] + padding[2];
                    wd += padding[1] + padding[3];
                    x = y;
                    [0, 0]
                };
                // Tensor-core convolutions want whole 8-channel vectors out: a 3- or 4-channel
                // output (conv_out of the UNet and of the VAE) runs padded, then sliced.
                let o8 = ws[0].div_ceil(8) * 8;
                let one_by_one =
                    ws[2] == 1 && ws[3] == 1 && *stride == [1, 1] && pad == [0, 0] && *groups == 1;
                let (w_form, b_form) = if one_by_one {
                    (WeightForm::Plain, WeightForm::Plain)
                } else if o8 != ws[0] {
                    (WeightForm::PaddedOut(o8), WeightForm::PaddedOut(o8))
                } else {
                    (WeightForm::ChannelsLast, WeightForm::Plain)
                };
                let w = self.weight(ins[1], w_form)?;
                let bias = match ins.get(2) {
                    Some(b) => Some(self.weight(*b, b_form)?),
                    None => None,
                };
                let y = self.act(&out);
                if one_by_one {
                    // A 1x1 convolution over NHWC pixels is a linear layer on [pixels, C]:
                    // cuBLASLt then carries the bias and any residual in its epilogue.
                    let s = self.push(Step::Gemm {
                        gemm: Gemm::linear(xs[0] * h * wd, xs[1], ws[0]),
                        a: x,
                        b: w,
                        bias,
                        residual: None,
                        gelu: false,
                        c: y,
                    });
                    self.producer.insert(i, s);
                    self.set(i, y, Layout::Nhwc);
                    return Ok(());
                }
                let shape = ConvShape {
                    n: xs[0],
                    c: xs[1],
                    h,
                    w: wd,
                    o: o8,
                    kh: ws[2],
                    kw: ws[3],
                    stride: *stride,
                    pad,
                    groups: *groups,
                    nhwc: true,
                    pad_end: [0, 0],
                };
                let (ho, wo) = shape.out_hw();
                // A padded convolution writes a wider buffer that one row copy slices; its
                // output is not the value's, so no epilogue fusion may target it.
                let conv_y = if o8 == ws[0] {
                    y
                } else {
                    self.buffer(2 * xs[0] * ho * wo * o8)
                };
                let s = self.push(Step::Conv {
                    shape,
                    x,
                    w,
                    y: conv_y,
                    bias: bias.map(|b| (b, 0)),
                    residual: None,
                    stats: None,
                });
                if o8 == ws[0] {
                    self.producer.insert(i, s);
                } else {
                    self.push(Step::CopyRows {
                        x: conv_y,
                        y,
                        rows: xs[0] * ho * wo,
                        cols: ws[0],
                        xs: o8,
                        ys: ws[0],
                    });
                }
                self.set(i, y, Layout::Nhwc);
            }
            Op::Conv1d { stride, padding } => {
                let xs = g.shape(ins[0]).to_vec();
                let ws = g.shape(ins[1]).to_vec();
                // Channels last, as one-row NHWC images: cuDNN's NCHW fp16 path transposes around
                // its tensor-core kernels (measured on an H100: 66 us for whisper's first conv),
                // and the tokens that follow are then already in row order.
                let nhwc = xs[1].is_multiple_of(8) && ws[0].is_multiple_of(8);
                let layout = if nhwc { Layout::Nhwc } else { Layout::Plain };
                let x = self.operand(ins[0], layout)?;
                let form = if nhwc {
                    WeightForm::ChannelsLast
                } else {
                    WeightForm::Plain
                };
                let w = self.weight(ins[1], form)?;
                let bias = match ins.get(2) {
                    Some(b) => Some((self.weight(*b, WeightForm::Plain)?, 0)),
                    None => None,
                };
                let shape = ConvShape {
                    n: xs[0],
                    c: xs[1],
                    h: 1,
                    w: xs[2],
                    o: ws[0],
                    kh: 1,
                    kw: ws[2],
                    stride: [1, *stride],
                    pad: [0, *padding],
                    groups: 1,
                    nhwc,
                    pad_end: [0, 0],
                };
                let y = self.act(&out);
                self.push(Step::Conv {
                    shape,
                    x,
                    w,
                    y,
                    bias,
                    residual: None,
                    stats: None,
                });
                self.set(i, y, layout);
            }
            Op::Linear if self.packed.contains_key(&i) => return self.lower_packed(i),
            Op::Linear => {
                let ws = g.shape(ins[1]).to_vec();
                let x = self.operand(ins[0], Layout::Plain)?;
                let w = self.weight(ins[1], WeightForm::Plain)?;
                let bias = match ins.get(2) {
                    Some(b) => Some(self.weight(*b, WeightForm::Plain)?),
                    None => None,
                };
                let (n, k) = (ws[0], ws[1]);
                let y = self.act(&out);
                let s = self.push(Step::Gemm {
                    gemm: Gemm::linear(numel(&out) / n, k, n),
                    a: x,
                    b: w,
                    bias,
                    residual: None,
                    gelu: false,
                    c: y,
                });
                self.producer.insert(i, s);
                self.set(i, y, Layout::Plain);
            }
            Op::GroupNorm { groups, eps, silu } => {
                if out.len() != 4 {
                    return Err(unsupported(name, "group_norm", "only 4-d inputs"));
                }
                let mut shape = GroupNormShape {
                    n: out[0],
                    hw: out[2] * out[3],
                    c: out[1],
                    groups: *groups,
                    eps: *eps,
                    silu: *silu,
                    fused_chunks: 0,
                };
                GroupNorm::supports(&shape)
                    .map_err(|e| unsupported(name, "group_norm", e.to_string()))?;
                let x = self.operand(ins[0], Layout::Nhwc)?;
                let gamma = self.weight(ins[1], WeightForm::Plain)?;
                let beta = self.weight(ins[2], WeightForm::Plain)?;
                // When a convolution's epilogue wrote x, it sums x's groups on the way.
                let producer = self.producer.get(&(ins[0].0 as usize)).copied();
                let fits = Elementwise::epilogue_stats_fit(shape.c, shape.groups);
                let fusable = match producer.map(|s| &self.steps[s]) {
                    Some(Step::Conv {
                        shape: cs,
                        bias: Some(_),
                        stats: None,
                        ..
                    }) => cs.nhwc && fits && cs.o == shape.c,
                    Some(Step::Subpixel {
                        nhwc, stats: None, ..
                    }) => fits && nhwc[3] == shape.c,
                    _ => false,
                } && !shape.one_launch();
                if fusable {
                    shape.fused_chunks =
                        Elementwise::epilogue_blocks(shape.hw * shape.c, shape.c, shape.n);
                }
                let scratch = self.buffer(shape.scratch_bytes());
                if let (true, Some(s)) = (fusable, producer) {
                    if let Step::Conv { stats, .. } | Step::Subpixel { stats, .. } =
                        &mut self.steps[s]
                    {
                        *stats = Some((scratch, shape.groups));
                    }
                }
                let y = self.act(&out);
                self.push(Step::GroupNorm {
                    shape,
                    x,
                    gamma,
                    beta,
                    y,
                    scratch,
                });
                self.set(i, y, Layout::Nhwc);
            }
            Op::LayerNorm { eps } => {
                let cols = *out.last().unwrap_or(&1);
                let x = self.operand(ins[0], Layout::Plain)?;
                let gamma = self.weight(ins[1], WeightForm::Plain)?;
                let beta = self.weight(ins[2], WeightForm::Plain)?;
                let y = self.act(&out);
                self.push(Step::LayerNorm {
                    x,
                    gamma,
                    beta,
                    y,
                    rows: numel(&out) / cols.max(1),
                    cols,
                    eps: *eps,
                });
                self.set(i, y, Layout::Plain);
            }
            Op::Attention { heads } => {
                let (qs, ks) = (g.shape(ins[0]).to_vec(), g.shape(ins[1]).to_vec());
                let (batch, lq, lk, h) = (qs[0], qs[1], ks[1], *heads);
                let (d, dv) = (qs[2] / h, out[2] / h);
                let fused = crate::kernels::attention::flash_supports(d, dv);
                if !fused && lk > crate::kernels::attention::MAX_COLS {
                    return Err(unsupported(
                        name,
                        "attention",
                        format!(
                            "{lk} keys (the softmax holds at most {})",
                            crate::kernels::attention::MAX_COLS
                        ),
                    ));
                }
                let q = self.operand(ins[0], Layout::Plain)?;
                let k = self.operand(ins[1], Layout::Plain)?;
                let v = self.operand(ins[2], Layout::Plain)?;
                let stride = |v: ValueId, width: usize| {
                    self.row_stride
                        .get(&(v.0 as usize))
                        .copied()
                        .unwrap_or(width)
                };
                let (ldq, ldkv) = (stride(ins[0], h * d), stride(ins[1], h * d));
                if fused {
                    let o = self.act(&out);
                    let splits = crate::kernels::attention::flash_splits(batch, lq, lk, h, d);
                    let part = if splits > 1 {
                        self.buffer(crate::kernels::attention::flash_scratch_bytes(
                            batch, lq, h, d, splits,
                        ))
                    } else {
                        Loc::None
                    };
                    self.push(Step::Attention {
                        q,
                        k,
                        v,
                        o,
                        batch,
                        lq,
                        lk,
                        heads: h,
                        d,
                        ldq,
                        ldkv,
                        splits,
                        part,
                    });
                    self.set(i, o, Layout::Plain);
                    return Ok(());
                }
                // Each (image, head) is one matrix of a strided-batched GEMM. With one image the
                // heads sit at a fixed stride inside the token rows (row stride C); with more,
                // head-major copies [B, H, L, d] give every (image, head) a fixed stride.
                let strided = batch == 1 || h == 1;
                let mut head_major = |x: Loc, l: usize, d: usize| -> Loc {
                    if strided {
                        return x;
                    }
                    let y = self.buffer(2 * batch * l * h * d);
                    self.push(Step::Permute {
                        x,
                        y,
                        dims: vec![batch, h, l, d],
                        strides: vec![l * h * d, d, h * d, 1],
                    });
                    y
                };
                let (qh, kh, vh) = (
                    head_major(q, lq, d),
                    head_major(k, lk, d),
                    head_major(v, lk, dv),
                );
                // Matrix strides and row strides of q/k, v/o in the layout chosen above.
                let (sq, sk, sv, ld_qk, ld_vo) = if strided && h > 1 {
                    (d, d, dv, h * d, h * dv)
                } else {
                    (lq * d, lk * d, lk * dv, 0, 0)
                };
                let scores = self.buffer(2 * batch * h * lq * lk);
                self.push(Step::Gemm {
                    gemm: Gemm {
                        m: lq,
                        n: lk,
                        k: d,
                        b_trans: true,
                        batch: batch * h,
                        stride_a: sq,
                        stride_b: sk,
                        stride_c: lq * lk,
                        lda: ld_qk,
                        ldb: ld_qk,
                        ldc: 0,
                        alpha: 1.0 / (d as f32).sqrt(),
                    },
                    a: qh,
                    b: kh,
                    bias: None,
                    residual: None,
                    gelu: false,
                    c: scores,
                });
                self.push(Step::Softmax {
                    x: scores,
                    rows: batch * h * lq,
                    cols: lk,
                });
                let o = self.act(&out);
                let oh = if strided {
                    o
                } else {
                    self.buffer(2 * batch * h * lq * dv)
                };
                self.push(Step::Gemm {
                    gemm: Gemm {
                        m: lq,
                        n: dv,
                        k: lk,
                        b_trans: false,
                        batch: batch * h,
                        stride_a: lq * lk,
                        stride_b: sv,
                        stride_c: if strided && h > 1 { dv } else { lq * dv },
                        lda: 0,
                        ldb: ld_vo,
                        ldc: ld_vo,
                        alpha: 1.0,
                    },
                    a: scores,
                    b: vh,
                    bias: None,
                    residual: None,
                    gelu: false,
                    c: oh,
                });
                if !strided {
                    self.push(Step::Permute {
                        x: oh,
                        y: o,
                        dims: vec![batch, lq, h, dv],
                        strides: vec![h * lq * dv, dv, lq * dv, 1],
                    });
                }
                self.set(i, o, Layout::Plain);
            }
            Op::Gelu if self.fuse_gelu(i, ins[0])? => {}
            Op::Gelu | Op::Silu | Op::Affine { .. } | Op::Clamp { .. } => {
                let op = match &node.op {
                    Op::Gelu => Unary::Gelu,
                    Op::Silu => Unary::Silu,
                    Op::Affine { scale, shift } => Unary::Affine {
                        scale: *scale,
                        shift: *shift,
                    },
                    Op::Clamp { min, max } => Unary::Clamp {
                        min: *min,
                        max: *max,
                    },
                    _ => unreachable!("matched above"),
                };
                let xv = self.val(ins[0])?;
                let y = self.act(&out);
                self.push(Step::Unary {
                    op,
                    x: xv.loc,
                    y,
                    n: numel(&out),
                });
                self.set(i, y, xv.layout);
            }
            Op::Geglu => {
                let x = self.operand(ins[0], Layout::Plain)?;
                let d = *out.last().unwrap_or(&1);
                let y = self.act(&out);
                self.push(Step::Geglu {
                    x,
                    y,
                    rows: numel(&out) / d.max(1),
                    d,
                });
                self.set(i, y, Layout::Plain);
            }
            Op::Add | Op::Mul => {
                let (a, b) = (ins[0], ins[1]);
                if matches!(node.op, Op::Add)
                    && (self.fuse_add(i, a, b)? || self.fuse_add(i, b, a)?)
                {
                    return Ok(());
                }
                let op = if matches!(node.op, Op::Add) {
                    Binary::Add
                } else {
                    Binary::Mul
                };
                let (av, bv) = (self.val(a)?, self.val(b)?);
                if av.shape == bv.shape {
                    let layout = av.layout;
                    let bl = self.operand(b, layout)?;
                    let y = self.act(&out);
                    let n = numel(&out);
                    if op == Binary::Add && n.is_multiple_of(2) {
                        self.push(Step::Add {
                            a: av.loc,
                            b: bl,
                            y,
                            n,
                        });
                    } else {
                        let st = strides(&storage_dims(&out, layout));
                        self.push(Step::Binary {
                            op,
                            a: av.loc,
                            a_strides: st.clone(),
                            b: bl,
                            b_strides: st,
                            y,
                            dims: storage_dims(&out, layout),
                        });
                    }
                    self.set(i, y, layout);
                    return Ok(());
                }
                let layout = [&av, &bv]
                    .iter()
                    .find(|v| v.shape == out)
                    .map_or(Layout::Plain, |v| v.layout);
                let order = storage_order(out.len(), layout);
                let broadcast = |v: &Val| -> Vec<usize> {
                    let st = semantic_strides(&v.shape, v.layout);
                    let pad = out.len() - v.shape.len();
                    let sem: Vec<usize> = (0..out.len())
                        .map(|ax| {
                            if ax < pad || v.shape[ax - pad] == 1 {
                                0
                            } else {
                                st[ax - pad]
                            }
                        })
                        .collect();
                    order.iter().map(|&ax| sem[ax]).collect()
                };
                let (sa, sb) = (broadcast(&av), broadcast(&bv));
                let y = self.act(&out);
                self.push(Step::Binary {
                    op,
                    a: av.loc,
                    a_strides: sa,
                    b: bv.loc,
                    b_strides: sb,
                    y,
                    dims: storage_dims(&out, layout),
                });
                self.set(i, y, layout);
            }
            Op::Concat { axis } => {
                let vals: Vec<Val> = ins.iter().map(|v| self.val(*v)).collect::<Result<_, _>>()?;
                let layout = if out.len() == 4 && vals.iter().all(|v| v.layout == Layout::Nhwc) {
                    Layout::Nhwc
                } else {
                    Layout::Plain
                };
                let sa = storage_axis(out.len(), layout, *axis);
                let od = storage_dims(&out, layout);
                let inner: usize = od[sa + 1..].iter().product();
                let rows: usize = od[..sa].iter().product();
                let y = self.act(&out);
                let mut parts = Vec::with_capacity(ins.len());
                for (v, val) in ins.iter().zip(&vals) {
                    let x = self.operand(*v, layout)?;
                    let cols = storage_dims(&val.shape, layout)[sa] * inner;
                    parts.push(ConcatPart { x, cols, xs: cols });
                }
                self.push(Step::Concat {
                    parts,
                    y,
                    rows,
                    ys: od[sa] * inner,
                });
                self.set(i, y, layout);
            }
            Op::Slice { axis, start, end } => {
                let xv = self.val(ins[0])?;
                let sa = storage_axis(xv.shape.len(), xv.layout, *axis);
                let xd = storage_dims(&xv.shape, xv.layout);
                let inner: usize = xd[sa + 1..].iter().product();
                let rows: usize = xd[..sa].iter().product();
                let len = end - start;
                let y = self.act(&out);
                self.push(Step::CopyRows {
                    x: xv.loc.at(start * inner),
                    y,
                    rows,
                    cols: len * inner,
                    xs: xd[sa] * inner,
                    ys: len * inner,
                });
                self.set(i, y, xv.layout);
            }
            Op::GatherRows { rows } => {
                let xs = g.shape(ins[0]).to_vec();
                let x = self.operand(ins[0], Layout::Plain)?;
                let first = self.operand(ins[1], Layout::Plain)?;
                let y = self.act(&out);
                self.push(Step::GatherRows {
                    x,
                    first,
                    y,
                    batch: xs[0],
                    t: xs[1],
                    rows: *rows,
                    cols: xs[2],
                    // A packed projection's column slice keeps its GEMM's row stride.
                    xs: self
                        .row_stride
                        .get(&(ins[0].0 as usize))
                        .copied()
                        .unwrap_or(xs[2]),
                });
                self.set(i, y, Layout::Plain);
            }
            Op::UpsampleNearest2x if self.absorbed.contains(&i) => {}
            Op::UpsampleNearest2x => {
                let xs = g.shape(ins[0]).to_vec();
                let x = self.operand(ins[0], Layout::Nhwc)?;
                let y = self.act(&out);
                self.push(Step::Upsample {
                    x,
                    y,
                    nhwc: [xs[0], xs[2], xs[3], xs[1]],
                });
                self.set(i, y, Layout::Nhwc);
            }
            Op::Reshape { .. } => {
                let x = self.operand(ins[0], Layout::Plain)?;
                self.set(i, x, Layout::Plain);
            }
            Op::Permute { perm } => {
                let xv = self.val(ins[0])?;
                if xv.layout == Layout::Nhwc && perm == &storage_order(perm.len(), Layout::Nhwc) {
                    // Channels last to the front of the storage: the tokens are stored already.
                    self.set(i, xv.loc, Layout::Plain);
                } else if xv.layout == Layout::Plain && xv.shape.len() == 4 && perm == &[0, 3, 1, 2]
                {
                    self.set(i, xv.loc, Layout::Nhwc);
                } else {
                    let x = self.operand(ins[0], Layout::Plain)?;
                    let xst = strides(&xv.shape);
                    let y = self.act(&out);
                    self.push(Step::Permute {
                        x,
                        y,
                        dims: out.clone(),
                        strides: perm.iter().map(|&p| xst[p]).collect(),
                    });
                    self.set(i, y, Layout::Plain);
                }
            }
            op @ (Op::PRelu | Op::Softmax { .. } | Op::MaxPool2d { .. }) => {
                return Err(unsupported(
                    name,
                    op.name(),
                    "not in the CUDA executor (MTCNN runs on the CPU executor)",
                ));
            }
        }
        Ok(())
    }
}

/// Lowers `graph`; `prefix` namespaces weight keys of graphs that share an upload.
pub fn lower(graph: &Graph, prefix: &str) -> Result<Plan, GpuError> {
    let mut uses = vec![0usize; graph.nodes.len()];
    for n in &graph.nodes {
        for v in &n.inputs {
            uses[v.0 as usize] += 1;
        }
    }
    for (_, v) in &graph.outputs {
        uses[v.0 as usize] += 1;
    }
    let mut l = Lower {
        g: graph,
        vals: vec![None; graph.nodes.len()],
        steps: Vec::new(),
        buffers: Vec::new(),
        weights: Vec::new(),
        weight_index: HashMap::new(),
        converted: HashMap::new(),
        uses,
        producer: HashMap::new(),
        prefix: prefix.to_string(),
        packed: HashMap::new(),
        groups: Vec::new(),
        row_stride: HashMap::new(),
        subpixel: HashMap::new(),
        absorbed: HashSet::new(),
    };
    l.groups = projection_groups(graph, &l.uses);
    l.subpixel = subpixel_pairs(graph, &l.uses);
    l.absorbed = l.subpixel.values().copied().collect();
    for (gi, members) in l.groups.iter().enumerate() {
        for (col, &m) in members.iter().enumerate() {
            l.packed.insert(m, (gi, col));
        }
    }
    for i in 0..graph.nodes.len() {
        l.lower(i)?;
    }
    let inputs = graph
        .inputs
        .iter()
        .map(|(name, v)| {
            let val = l.val(*v)?;
            Ok(Binding {
                name: name.clone(),
                loc: val.loc,
                shape: val.shape,
            })
        })
        .collect::<Result<Vec<_>, GpuError>>()?;
    let mut outputs = Vec::new();
    for (name, v) in &graph.outputs {
        let loc = l.operand(*v, Layout::Plain)?;
        if !matches!(loc, Loc::Arena(..)) {
            return Err(unsupported(
                name,
                "output",
                "an output must be computed, not a constant",
            ));
        }
        outputs.push(Binding {
            name: name.clone(),
            loc,
            shape: graph.shape(*v).to_vec(),
        });
    }
    let end = l.steps.len();
    let mut lifetimes: Vec<Lifetime> = l
        .buffers
        .iter()
        .map(|&bytes| Lifetime {
            bytes,
            first: usize::MAX,
            last: 0,
        })
        .collect();
    for (s, step) in l.steps.iter().enumerate() {
        // A convolution may read its pad step's input instead (`PadInput`), or its norm's
        // input and statistics (`NormInput`).
        let unpadded = PadInput::of(&l.steps, s).map(|p| p.x);
        let normed = NormInput::of(&l.steps, &outputs, s).map(|n| [n.x, n.scratch]);
        for loc in step
            .locs()
            .into_iter()
            .chain(unpadded)
            .chain(normed.into_iter().flatten())
        {
            if let Loc::Arena(b, _) = loc {
                lifetimes[b].first = lifetimes[b].first.min(s);
                lifetimes[b].last = lifetimes[b].last.max(s);
            }
        }
    }
    for b in &inputs {
        if let Loc::Arena(i, _) = b.loc {
            lifetimes[i].first = 0;
        }
    }
    for b in &outputs {
        if let Loc::Arena(i, _) = b.loc {
            lifetimes[i].last = end;
        }
    }
    for lt in &mut lifetimes {
        if lt.first == usize::MAX {
            lt.first = 0;
        }
        lt.last = lt.last.max(lt.first);
    }
    Ok(Plan {
        steps: l.steps,
        buffers: l.buffers,
        lifetimes,
        weights: l.weights,
        inputs,
        outputs,
    })
}

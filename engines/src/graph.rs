//! The static graph IR: one closed op set, nodes with shapes known at build time.
//!
//! A `Graph` is built for one batch size. `Graph::push` infers and checks every node's shape (a
//! mismatch is an error naming the node), and folds any node whose inputs are all constants —
//! so MuseTalk's t=0 time embedding and every resnet's projection of it become plain constants.
//! Layout is PyTorch's: NCHW for images, [batch, tokens, channels] for sequences.

use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::tensor::{numel, Tensor};

/// A value in a graph: the output of node `.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// The closed op set every executor implements.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input, fed per run.
    Input,
    /// A weight or a folded constant.
    Const(Arc<Tensor>),
    /// x [N,C,H,W], w [O,C/groups,kh,kw], optional bias [O]; padding (top, left, bottom, right).
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 4],
        groups: usize,
    },
    /// x [N,C,L], w [O,C,k], optional bias [O].
    Conv1d {
        stride: usize,
        padding: usize,
    },
    /// x [...,K], w [N,K], optional bias [N] -> [...,N].
    Linear,
    /// x [N,C,...], gamma [C], beta [C]; `silu` applies SiLU after the affine.
    GroupNorm {
        groups: usize,
        eps: f32,
        silu: bool,
    },
    /// x [...,C], gamma [C], beta [C].
    LayerNorm {
        eps: f32,
    },
    /// q [B,Lq,C], k [B,Lk,C], v [B,Lk,Cv] -> [B,Lq,Cv]; softmax(q k^T / sqrt(C/heads)) v per head.
    Attention {
        heads: usize,
    },
    /// Exact (erf) GELU.
    Gelu,
    /// x [...,2D] -> x[...,:D] * gelu(x[...,D:]).
    Geglu,
    Silu,
    /// Per-channel PReLU: x [N,C,...], alpha [C].
    PRelu,
    /// Softmax along one axis.
    Softmax {
        axis: usize,
    },
    /// Elementwise with NumPy broadcasting.
    Add,
    Mul,
    /// x * scale + shift.
    Affine {
        scale: f32,
        shift: f32,
    },
    Clamp {
        min: f32,
        max: f32,
    },
    Concat {
        axis: usize,
    },
    /// [N,C,H,W] -> [N,C,2H,2W].
    UpsampleNearest2x,
    /// PyTorch MaxPool2d without padding.
    MaxPool2d {
        kernel: usize,
        stride: usize,
        ceil_mode: bool,
    },
    Reshape {
        shape: Vec<usize>,
    },
    Permute {
        perm: Vec<usize>,
    },
    /// x[..., start..end, ...] along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// x [B,T,D], first [B] -> [B,rows,D]: rows first[b] .. first[b]+rows of each x[b]. The
    /// first rows are data, so one fixed-shape graph serves windows whose wanted rows move
    /// (whisper's last layer computes only the rows a hop reads). A first row is rounded to a
    /// whole number and clamped into [0, T - rows], as a GPU kernel must (it cannot fail):
    /// callers pass rows in range. T is at most `GATHER_ROWS_MAX_T`, since GPU inputs are fp16.
    GatherRows {
        rows: usize,
    },
}

/// Longest axis `Op::GatherRows` indexes: fp16 holds every whole number up to 2048 exactly, and
/// the GPU executor's inputs are fp16.
pub const GATHER_ROWS_MAX_T: usize = 2048;

impl Op {
    /// Short name for errors and op sweeps.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "input",
            Op::Const(_) => "const",
            Op::Conv2d { .. } => "conv2d",
            Op::Conv1d { .. } => "conv1d",
            Op::Linear => "linear",
            Op::GroupNorm { .. } => "group_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Attention { .. } => "attention",
            Op::Gelu => "gelu",
            Op::Geglu => "geglu",
            Op::Silu => "silu",
            Op::PRelu => "prelu",
            Op::Softmax { .. } => "softmax",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Affine { .. } => "affine",
            Op::Clamp { .. } => "clamp",
            Op::Concat { .. } => "concat",
            Op::UpsampleNearest2x => "upsample_nearest2x",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Slice { .. } => "slice",
            Op::GatherRows { .. } => "gather_rows",
        }
    }
}

/// One node: an op applied to earlier values.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub shape: Vec<usize>,
}

/// A whole model step at fixed shapes.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub inputs: Vec<(String, ValueId)>,
    pub outputs: Vec<(String, ValueId)>,
}

impl Graph {
    pub fn new() -> Self {
        Graph::default()
    }

    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.nodes[v.0 as usize].shape
    }

    fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.0 as usize]
    }

    /// Declares an input fed at run time.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let id = self.add(Node {
            name: name.into(),
            op: Op::Input,
            inputs: vec![],
            shape: shape.to_vec(),
        });
        self.inputs.push((name.into(), id));
        id
    }

    /// Adds a constant (a weight, or anything computed at build).
    pub fn constant(&mut self, name: &str, t: Tensor) -> ValueId {
        let shape = t.shape.clone();
        self.add(Node {
            name: name.into(),
            op: Op::Const(Arc::new(t)),
            inputs: vec![],
            shape,
        })
    }

    /// Marks a value as a named output.
    pub fn output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.into(), v));
    }

    fn add(&mut self, node: Node) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(node);
        id
    }

    /// The constant behind a value, if it is one.
    pub fn const_value(&self, v: ValueId) -> Option<&Arc<Tensor>> {
        match &self.node(v).op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    /// Adds `op(inputs)` after checking shapes; folds it when every input is a constant.
    pub fn push(&mut self, name: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|v| self.shape(*v)).collect();
        let shape = infer(&op, &shapes).map_err(|reason| EngineError::Shape {
            node: name.to_string(),
            op: op.name(),
            reason,
        })?;
        let consts: Option<Vec<&Tensor>> = inputs
            .iter()
            .map(|v| self.const_value(*v).map(|t| t.as_ref()))
            .collect();
        if let Some(consts) = consts.filter(|c| !c.is_empty()) {
            let folded = crate::cpu::kernels::eval(&op, &consts, &shape);
            return Ok(self.constant(name, folded));
        }
        Ok(self.add(Node {
            name: name.into(),
            op,
            inputs: inputs.to_vec(),
            shape,
        }))
    }

    /// Number of multiply-accumulates per run, for reports.
    pub fn macs(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                let s = |i: usize| self.shape(n.inputs[i]);
                match &n.op {
                    Op::Conv2d { .. } | Op::Conv1d { .. } => {
                        let w = s(1);
                        (numel(&n.shape) * numel(&w[1..])) as u64
                    }
                    Op::Linear => (numel(&n.shape) * s(1)[1]) as u64,
                    Op::Attention { .. } => {
                        let (q, k) = (s(0), s(1));
                        (q[0] * q[1] * k[1] * (q[2] + n.shape[2])) as u64
                    }
                    _ => 0,
                }
            })
            .sum()
    }
}

fn want(cond: bool, msg: impl FnOnce() -> String) -> std::result::Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

fn arity(shapes: &[&[usize]], min: usize, max: usize) -> std::result::Result<(), String> {
    want((min..=max).contains(&shapes.len()), || {
        format!("takes {min}..={max} inputs, got {}", shapes.len())
    })
}

/// NumPy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("cannot broadcast {a:?} with {b:?}")),
        };
    }
    Ok(out)
}

fn pool_out(len: usize, kernel: usize, stride: usize, ceil_mode: bool) -> usize {
    let span = len.saturating_sub(kernel);
    let mut out = if ceil_mode {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    // PyTorch: the last window must start inside the input.
    if ceil_mode && (out - 1) * stride >= len {
        out -= 1;
    }
    out
}

/// The output shape of `op` on inputs of `shapes`, or why there is none.
pub fn infer(op: &Op, shapes: &[&[usize]]) -> std::result::Result<Vec<usize>, String> {
    match op {
        Op::Input | Op::Const(_) => Err("inputs and constants are added directly".into()),
        Op::Conv2d {
            stride,
            padding,
            groups,
        } => {
            arity(shapes, 2, 3)?;
            let (x, w) = (shapes[0], shapes[1]);
            want(x.len() == 4 && w.len() == 4, || {
                format!("x {x:?} and w {w:?} must be 4-d")
            })?;
            want(
                *groups > 0 && x[1] == w[1] * groups && w[0].is_multiple_of(*groups),
                || format!("x has {} channels, w {w:?} with {groups} groups", x[1]),
            )?;
            want(shapes.get(2).is_none_or(|b| *b == [w[0]]), || {
                format!("bias must be [{}]", w[0])
            })?;
            let h = x[2] + padding[0] + padding[2];
            let wd = x[3] + padding[1] + padding[3];
            want(
                h >= w[2] && wd >= w[3] && stride[0] > 0 && stride[1] > 0,
                || format!("kernel {:?} larger than padded input {h}x{wd}", &w[2..]),
            )?;
            Ok(vec![
                x[0],
                w[0],
                (h - w[2]) / stride[0] + 1,
                (wd - w[3]) / stride[1] + 1,
            ])
        }
        Op::Conv1d { stride, padding } => {
            arity(shapes, 2, 3)?;
            let (x, w) = (shapes[0], shapes[1]);
            want(x.len() == 3 && w.len() == 3 && x[1] == w[1], || {
                format!("x {x:?} vs w {w:?}")
            })?;
            want(shapes.get(2).is_none_or(|b| *b == [w[0]]), || {
                format!("bias must be [{}]", w[0])
            })?;
            let l = x[2] + 2 * padding;
            want(l >= w[2] && *stride > 0, || {
                format!("kernel {} longer than input {l}", w[2])
            })?;
            Ok(vec![x[0], w[0], (l - w[2]) / stride + 1])
        }
        Op::Linear => {
            arity(shapes, 2, 3)?;
            let (x, w) = (shapes[0], shapes[1]);
            want(w.len() == 2 && x.last() == Some(&w[1]), || {
                format!("x {x:?} vs w {w:?}")
            })?;
            want(shapes.get(2).is_none_or(|b| *b == [w[0]]), || {
                format!("bias must be [{}]", w[0])
            })?;
            let mut out = x.to_vec();
            *out.last_mut().unwrap_or(&mut 0) = w[0];
            Ok(out)
        }
        Op::GroupNorm { groups, .. } => {
            arity(shapes, 3, 3)?;
            let x = shapes[0];
            want(
                x.len() >= 2 && *groups > 0 && x[1].is_multiple_of(*groups),
                || {
                    format!(
                        "{} channels do not split into {groups} groups",
                        x.get(1).unwrap_or(&0)
                    )
                },
            )?;
            want(shapes[1] == [x[1]] && shapes[2] == [x[1]], || {
                "gamma/beta must be [C]".into()
            })?;
            Ok(x.to_vec())
        }
        Op::LayerNorm { .. } => {
            arity(shapes, 3, 3)?;
            let c = *shapes[0].last().unwrap_or(&0);
            want(shapes[1] == [c] && shapes[2] == [c], || {
                format!("gamma/beta must be [{c}]")
            })?;
            Ok(shapes[0].to_vec())
        }
        Op::Attention { heads } => {
            arity(shapes, 3, 3)?;
            let (q, k, v) = (shapes[0], shapes[1], shapes[2]);
            want(q.len() == 3 && k.len() == 3 && v.len() == 3, || {
                "q, k, v must be 3-d".into()
            })?;
            want(
                q[0] == k[0] && k[0] == v[0] && q[2] == k[2] && k[1] == v[1],
                || format!("q {q:?} k {k:?} v {v:?} do not match"),
            )?;
            want(
                *heads > 0 && q[2].is_multiple_of(*heads) && v[2].is_multiple_of(*heads),
                || format!("{} channels do not split into {heads} heads", q[2]),
            )?;
            Ok(vec![q[0], q[1], v[2]])
        }
        Op::Gelu | Op::Silu | Op::Affine { .. } | Op::Clamp { .. } => {
            arity(shapes, 1, 1)?;
            Ok(shapes[0].to_vec())
        }
        Op::Softmax { axis } => {
            arity(shapes, 1, 1)?;
            want(*axis < shapes[0].len(), || {
                format!("axis {axis} of {:?}", shapes[0])
            })?;
            Ok(shapes[0].to_vec())
        }
        Op::Geglu => {
            arity(shapes, 1, 1)?;
            let mut out = shapes[0].to_vec();
            let last = out.last_mut().ok_or("geglu of a scalar")?;
            want(last.is_multiple_of(2), || format!("last dim {last} is odd"))?;
            *last /= 2;
            Ok(out)
        }
        Op::PRelu => {
            arity(shapes, 2, 2)?;
            want(shapes[0].len() >= 2 && shapes[1] == [shapes[0][1]], || {
                format!("alpha {:?} must be [C] of {:?}", shapes[1], shapes[0])
            })?;
            Ok(shapes[0].to_vec())
        }
        Op::Add | Op::Mul => {
            arity(shapes, 2, 2)?;
            broadcast(shapes[0], shapes[1])
        }
        Op::Concat { axis } => {
            want(!shapes.is_empty(), || "concat of nothing".into())?;
            let first = shapes[0];
            want(*axis < first.len(), || format!("axis {axis} of {first:?}"))?;
            let mut out = first.to_vec();
            out[*axis] = 0;
            for s in shapes {
                want(
                    s.len() == first.len()
                        && s.iter()
                            .zip(first)
                            .enumerate()
                            .all(|(i, (a, b))| i == *axis || a == b),
                    || format!("{s:?} does not concat with {first:?} on axis {axis}"),
                )?;
                out[*axis] += s[*axis];
            }
            Ok(out)
        }
        Op::UpsampleNearest2x => {
            arity(shapes, 1, 1)?;
            let x = shapes[0];
            want(x.len() == 4, || format!("{x:?} must be 4-d"))?;
            Ok(vec![x[0], x[1], x[2] * 2, x[3] * 2])
        }
        Op::MaxPool2d {
            kernel,
            stride,
            ceil_mode,
        } => {
            arity(shapes, 1, 1)?;
            let x = shapes[0];
            want(
                x.len() == 4 && x[2] >= *kernel && x[3] >= *kernel && *stride > 0,
                || format!("{x:?} with kernel {kernel}"),
            )?;
            Ok(vec![
                x[0],
                x[1],
                pool_out(x[2], *kernel, *stride, *ceil_mode),
                pool_out(x[3], *kernel, *stride, *ceil_mode),
            ])
        }
        Op::Reshape { shape } => {
            arity(shapes, 1, 1)?;
            want(numel(shape) == numel(shapes[0]), || {
                format!("{:?} into {shape:?}", shapes[0])
            })?;
            Ok(shape.clone())
        }
        Op::Permute { perm } => {
            arity(shapes, 1, 1)?;
            let x = shapes[0];
            let mut seen = vec![false; x.len()];
            want(
                perm.len() == x.len()
                    && perm
                        .iter()
                        .all(|&p| p < x.len() && !std::mem::replace(&mut seen[p], true)),
                || format!("{perm:?} is not a permutation of {} axes", x.len()),
            )?;
            Ok(perm.iter().map(|&p| x[p]).collect())
        }
        Op::Slice { axis, start, end } => {
            arity(shapes, 1, 1)?;
            let x = shapes[0];
            want(*axis < x.len() && start < end && *end <= x[*axis], || {
                format!("{start}..{end} on axis {axis} of {x:?}")
            })?;
            let mut out = x.to_vec();
            out[*axis] = end - start;
            Ok(out)
        }
        Op::GatherRows { rows } => {
            arity(shapes, 2, 2)?;
            let (x, first) = (shapes[0], shapes[1]);
            want(x.len() == 3 && first == [x[0]], || {
                format!("x {x:?} must be [B,T,D] and first rows {first:?} [B]")
            })?;
            want(
                *rows > 0 && *rows <= x[1] && x[1] <= GATHER_ROWS_MAX_T,
                || {
                    format!(
                        "{rows} rows of {} (at most {GATHER_ROWS_MAX_T} rows to gather from)",
                        x[1]
                    )
                },
            )?;
            Ok(vec![x[0], *rows, x[2]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_and_errors_name_the_node() {
        let mut g = Graph::new();
        let x = g.input("x", &[1, 8, 32, 32]);
        let w = g.constant("w", Tensor::zeros(&[320, 8, 3, 3]));
        let y = g
            .push(
                "conv_in",
                Op::Conv2d {
                    stride: [1, 1],
                    padding: [1; 4],
                    groups: 1,
                },
                &[x, w],
            )
            .unwrap();
        assert_eq!(g.shape(y), [1, 320, 32, 32]);
        let bad = g.constant("w2", Tensor::zeros(&[4, 7, 3, 3]));
        let err = g
            .push(
                "down.conv",
                Op::Conv2d {
                    stride: [2, 2],
                    padding: [1; 4],
                    groups: 1,
                },
                &[y, bad],
            )
            .unwrap_err();
        assert!(
            err.to_string().starts_with("node down.conv (conv2d):"),
            "{err}"
        );
    }

    #[test]
    fn constant_inputs_fold() {
        let mut g = Graph::new();
        let a = g.constant("a", Tensor::new(vec![2], vec![1.0, -2.0]));
        let b = g.push("silu", Op::Silu, &[a]).unwrap();
        let t = g.const_value(b).expect("folded");
        assert!((t.data[0] - 0.7310586).abs() < 1e-6);
        assert_eq!(
            g.nodes
                .iter()
                .filter(|n| !matches!(n.op, Op::Const(_)))
                .count(),
            0
        );
    }

    #[test]
    fn pooling_follows_pytorch_ceil_mode() {
        assert_eq!(pool_out(12, 2, 2, true), 6);
        assert_eq!(pool_out(11, 3, 2, true), 5);
        assert_eq!(pool_out(23, 3, 2, true), 11);
        assert_eq!(pool_out(5, 2, 2, true), 3);
        assert_eq!(pool_out(5, 2, 2, false), 2);
    }
}

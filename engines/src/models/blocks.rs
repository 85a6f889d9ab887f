//! Building blocks shared by the model graphs, named after their upstream modules so the weight
//! keys line up (`vb` is the module's prefix in the checkpoint).

use crate::error::Result;
use crate::graph::{Graph, Op, ValueId};
use crate::weights::Vb;

fn konst(g: &mut Graph, vb: &Vb, name: &str, shape: &[usize]) -> Result<ValueId> {
    let t = vb.get(name, shape)?;
    Ok(g.constant(&vb.key(name), t))
}

/// `nn.Conv2d(cin, cout, k, stride, padding)` with bias.
pub fn conv2d(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<ValueId> {
    conv2d_padded(g, vb, x, cin, cout, k, stride, [pad; 4])
}

/// Like `conv2d` with explicit (top, left, bottom, right) padding.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_padded(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: [usize; 4],
) -> Result<ValueId> {
    let w = konst(g, vb, "weight", &[cout, cin, k, k])?;
    let b = konst(g, vb, "bias", &[cout])?;
    g.push(
        &vb.key("conv"),
        Op::Conv2d {
            stride: [stride; 2],
            padding,
            groups: 1,
        },
        &[x, w, b],
    )
}

/// `nn.Conv1d(cin, cout, k, stride, padding)` with bias.
pub fn conv1d(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<ValueId> {
    let w = konst(g, vb, "weight", &[cout, cin, k])?;
    let b = konst(g, vb, "bias", &[cout])?;
    g.push(
        &vb.key("conv"),
        Op::Conv1d {
            stride,
            padding: pad,
        },
        &[x, w, b],
    )
}

/// `nn.Linear(cin, cout, bias)`.
pub fn linear(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    cin: usize,
    cout: usize,
    bias: bool,
) -> Result<ValueId> {
    let w = konst(g, vb, "weight", &[cout, cin])?;
    let mut inputs = vec![x, w];
    if bias {
        inputs.push(konst(g, vb, "bias", &[cout])?);
    }
    g.push(&vb.key("linear"), Op::Linear, &inputs)
}

/// `nn.GroupNorm(groups, c, eps)`, optionally followed by SiLU (fused: it always is upstream).
pub fn group_norm(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    c: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<ValueId> {
    let gamma = konst(g, vb, "weight", &[c])?;
    let beta = konst(g, vb, "bias", &[c])?;
    g.push(
        &vb.key("group_norm"),
        Op::GroupNorm { groups, eps, silu },
        &[x, gamma, beta],
    )
}

/// `nn.LayerNorm(c, eps)`.
pub fn layer_norm(g: &mut Graph, vb: &Vb, x: ValueId, c: usize, eps: f32) -> Result<ValueId> {
    let gamma = konst(g, vb, "weight", &[c])?;
    let beta = konst(g, vb, "bias", &[c])?;
    g.push(
        &vb.key("layer_norm"),
        Op::LayerNorm { eps },
        &[x, gamma, beta],
    )
}

/// diffusers `ResnetBlock2D`; `temb` is the (constant) time embedding, `None` in the VAE.
#[allow(clippy::too_many_arguments)]
pub fn resnet(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    cin: usize,
    cout: usize,
    temb: Option<(ValueId, usize)>,
    groups: usize,
    eps: f32,
) -> Result<ValueId> {
    // The shortcut comes first so that the residual sum can ride on conv2, the last step:
    // an executor fusing the sum into its producer then also has conv2's epilogue take the
    // group sums of the next norm, instead of that norm reading the sum once more for them.
    let shortcut = if cin != cout {
        conv2d(g, &vb.pp("conv_shortcut"), x, cin, cout, 1, 1, 0)?
    } else {
        x
    };
    let h = group_norm(g, &vb.pp("norm1"), x, cin, groups, eps, true)?;
    let mut h = conv2d(g, &vb.pp("conv1"), h, cin, cout, 3, 1, 1)?;
    if let Some((t, tdim)) = temb {
        let silu_t = g.push(&vb.key("time_emb_silu"), Op::Silu, &[t])?;
        let proj = linear(g, &vb.pp("time_emb_proj"), silu_t, tdim, cout, true)?;
        let n = g.shape(proj)[0];
        let proj = g.push(
            &vb.key("time_emb_4d"),
            Op::Reshape {
                shape: vec![n, cout, 1, 1],
            },
            &[proj],
        )?;
        h = g.push(&vb.key("time_emb_add"), Op::Add, &[h, proj])?;
    }
    let h = group_norm(g, &vb.pp("norm2"), h, cout, groups, eps, true)?;
    let h = conv2d(g, &vb.pp("conv2"), h, cout, cout, 3, 1, 1)?;
    g.push(&vb.key("residual"), Op::Add, &[shortcut, h])
}

/// [N,C,H,W] -> [N,H*W,C].
pub fn to_tokens(g: &mut Graph, name: &str, x: ValueId) -> Result<ValueId> {
    let s = g.shape(x).to_vec();
    let t = g.push(
        &format!("{name}.nhwc"),
        Op::Permute {
            perm: vec![0, 2, 3, 1],
        },
        &[x],
    )?;
    g.push(
        &format!("{name}.tokens"),
        Op::Reshape {
            shape: vec![s[0], s[2] * s[3], s[1]],
        },
        &[t],
    )
}

/// [N,H*W,C] -> [N,C,H,W].
pub fn from_tokens(g: &mut Graph, name: &str, x: ValueId, h: usize, w: usize) -> Result<ValueId> {
    let s = g.shape(x).to_vec();
    let t = g.push(
        &format!("{name}.nhwc"),
        Op::Reshape {
            shape: vec![s[0], h, w, s[2]],
        },
        &[x],
    )?;
    g.push(
        &format!("{name}.nchw"),
        Op::Permute {
            perm: vec![0, 3, 1, 2],
        },
        &[t],
    )
}

/// diffusers `Attention` without norms: q from `x`, k/v from `ctx`, multi-head, output projection.
/// `qkv_bias` is false in the UNet, true in the VAE; `names` are the q/k/v/out module names.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    ctx: ValueId,
    dim: usize,
    ctx_dim: usize,
    heads: usize,
    qkv_bias: bool,
) -> Result<ValueId> {
    let q = linear(g, &vb.pp("to_q"), x, dim, dim, qkv_bias)?;
    let k = linear(g, &vb.pp("to_k"), ctx, ctx_dim, dim, qkv_bias)?;
    let v = linear(g, &vb.pp("to_v"), ctx, ctx_dim, dim, qkv_bias)?;
    let o = g.push(&vb.key("attention"), Op::Attention { heads }, &[q, k, v])?;
    linear(g, &vb.pp("to_out.0"), o, dim, dim, true)
}

//! MuseTalk 1.5's UNet: diffusers `UNet2DConditionModel` at timestep 0, as a graph.
//!
//! Inputs: `sample` [B, in, 32, 32] (masked + reference latents) and `encoder_hidden_states`
//! [B, 50, cross_dim] (the audio prompt). Output: `sample_out` [B, out, 32, 32]. The time
//! embedding of t=0 and every resnet's projection of it fold into constants at build.

use crate::error::{EngineError, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::models::blocks::{
    attention, conv2d, from_tokens, group_norm, layer_norm, linear, resnet, to_tokens,
};
use crate::models::config::UNetConfig;
use crate::tensor::Tensor;
use crate::weights::Vb;

/// Tokens of the audio prompt MuseTalk feeds: 10 whisper frames x 5 hidden states.
pub const AUDIO_TOKENS: usize = 50;

/// Builds the UNet for `batch` at `size`x`size` latents.
pub fn build(vb: &Vb, cfg: &UNetConfig, batch: usize, size: usize) -> Result<Graph> {
    check(cfg)?;
    let mut g = Graph::new();
    let sample = g.input("sample", &[batch, cfg.in_channels, size, size]);
    let ctx = g.input(
        "encoder_hidden_states",
        &[batch, AUDIO_TOKENS, cfg.cross_attention_dim],
    );
    let out = forward(&mut g, vb, cfg, sample, ctx)?;
    g.output("sample_out", out);
    Ok(g)
}

fn check(cfg: &UNetConfig) -> Result<()> {
    let bad = |reason: String| EngineError::Config {
        path: "musetalk.json".into(),
        reason,
    };
    let n = cfg.block_out_channels.len();
    if cfg.down_block_types.len() != n || cfg.up_block_types.len() != n || n == 0 {
        return Err(bad(format!(
            "{n} block_out_channels but {} down / {} up blocks",
            cfg.down_block_types.len(),
            cfg.up_block_types.len()
        )));
    }
    for t in cfg.down_block_types.iter().chain(&cfg.up_block_types) {
        if !matches!(
            t.as_str(),
            "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
        ) {
            return Err(bad(format!("block type {t} is not built")));
        }
    }
    Ok(())
}

/// The t=0 sinusoidal timestep projection (diffusers `Timesteps`): cos(0)=1 then sin(0)=0 halves
/// when `flip_sin_to_cos`.
fn time_proj_t0(dim: usize, flip_sin_to_cos: bool) -> Tensor {
    let half = dim / 2;
    let (cos, sin) = (vec![1.0f32; half], vec![0.0f32; half]);
    let data = if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    };
    Tensor::new(vec![1, dim], data)
}

struct Ctx {
    ctx: ValueId,
    temb: ValueId,
    temb_dim: usize,
    heads: usize,
    groups: usize,
    eps: f32,
    cross_dim: usize,
    linear_proj: bool,
}

/// The UNet on graph values (for composing it into a whole frame step).
pub fn forward(
    g: &mut Graph,
    vb: &Vb,
    cfg: &UNetConfig,
    sample: ValueId,
    ctx: ValueId,
) -> Result<ValueId> {
    let ch = &cfg.block_out_channels;
    let temb_dim = ch[0] * 4;
    let t = g.constant("time_proj", time_proj_t0(ch[0], cfg.flip_sin_to_cos));
    let t = linear(
        g,
        &vb.pp("time_embedding.linear_1"),
        t,
        ch[0],
        temb_dim,
        true,
    )?;
    let t = g.push("time_embedding.act", Op::Silu, &[t])?;
    let temb = linear(
        g,
        &vb.pp("time_embedding.linear_2"),
        t,
        temb_dim,
        temb_dim,
        true,
    )?;
    let c = Ctx {
        ctx,
        temb,
        temb_dim,
        heads: cfg.attention_head_dim,
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        cross_dim: cfg.cross_attention_dim,
        linear_proj: cfg.use_linear_projection,
    };

    let mut x = conv2d(
        g,
        &vb.pp("conv_in"),
        sample,
        cfg.in_channels,
        ch[0],
        3,
        1,
        1,
    )?;
    let mut skips = vec![(x, ch[0])];
    let mut cin = ch[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let vbb = vb.pp(format!("down_blocks.{i}"));
        let cout = ch[i];
        for j in 0..cfg.layers_per_block {
            x = c.resnet(g, &vbb.pp(format!("resnets.{j}")), x, cin, cout)?;
            cin = cout;
            if kind == "CrossAttnDownBlock2D" {
                x = transformer(g, &vbb.pp(format!("attentions.{j}")), x, cout, &c)?;
            }
            skips.push((x, cout));
        }
        if i + 1 < ch.len() {
            let pad = cfg.downsample_padding;
            x = conv2d(g, &vbb.pp("downsamplers.0.conv"), x, cout, cout, 3, 2, pad)?;
            skips.push((x, cout));
        }
    }

    let mid = *ch.last().unwrap_or(&0);
    let vbm = vb.pp("mid_block");
    x = c.resnet(g, &vbm.pp("resnets.0"), x, mid, mid)?;
    x = transformer(g, &vbm.pp("attentions.0"), x, mid, &c)?;
    x = c.resnet(g, &vbm.pp("resnets.1"), x, mid, mid)?;

    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut prev = rev[0];
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let vbb = vb.pp(format!("up_blocks.{i}"));
        let cout = rev[i];
        for j in 0..=cfg.layers_per_block {
            let (skip, skip_c) = skips.pop().ok_or_else(|| EngineError::Shape {
                node: vbb.key("resnets"),
                op: "concat",
                reason: "more up-block layers than skip connections".into(),
            })?;
            let in_c = if j == 0 { prev } else { cout };
            x = g.push(
                &vbb.key(&format!("cat.{j}")),
                Op::Concat { axis: 1 },
                &[x, skip],
            )?;
            x = c.resnet(g, &vbb.pp(format!("resnets.{j}")), x, in_c + skip_c, cout)?;
            if kind == "CrossAttnUpBlock2D" {
                x = transformer(g, &vbb.pp(format!("attentions.{j}")), x, cout, &c)?;
            }
        }
        if i + 1 < ch.len() {
            x = g.push(&vbb.key("upsample"), Op::UpsampleNearest2x, &[x])?;
            x = conv2d(g, &vbb.pp("upsamplers.0.conv"), x, cout, cout, 3, 1, 1)?;
        }
        prev = cout;
    }
    let x = group_norm(g, &vb.pp("conv_norm_out"), x, ch[0], c.groups, c.eps, true)?;
    conv2d(g, &vb.pp("conv_out"), x, ch[0], cfg.out_channels, 3, 1, 1)
}

impl Ctx {
    /// A `ResnetBlock2D` with the (folded) time embedding and the UNet's norm settings.
    fn resnet(
        &self,
        g: &mut Graph,
        vb: &Vb,
        x: ValueId,
        cin: usize,
        cout: usize,
    ) -> Result<ValueId> {
        resnet(
            g,
            vb,
            x,
            cin,
            cout,
            Some((self.temb, self.temb_dim)),
            self.groups,
            self.eps,
        )
    }
}

/// diffusers `Transformer2DModel` with one `BasicTransformerBlock` (self-attn, cross-attn, GEGLU).
fn transformer(g: &mut Graph, vb: &Vb, x: ValueId, c: usize, k: &Ctx) -> Result<ValueId> {
    let s = g.shape(x).to_vec();
    let (h, w) = (s[2], s[3]);
    let n = group_norm(g, &vb.pp("norm"), x, c, k.groups, 1e-6, false)?;
    let mut t = if k.linear_proj {
        let t = to_tokens(g, &vb.key("in"), n)?;
        linear(g, &vb.pp("proj_in"), t, c, c, true)?
    } else {
        let p = conv2d(g, &vb.pp("proj_in"), n, c, c, 1, 1, 0)?;
        to_tokens(g, &vb.key("in"), p)?
    };
    let b = vb.pp("transformer_blocks.0");
    let n1 = layer_norm(g, &b.pp("norm1"), t, c, 1e-5)?;
    let a1 = attention(g, &b.pp("attn1"), n1, n1, c, c, k.heads, false)?;
    t = g.push(&b.key("attn1.residual"), Op::Add, &[a1, t])?;
    let n2 = layer_norm(g, &b.pp("norm2"), t, c, 1e-5)?;
    let a2 = attention(g, &b.pp("attn2"), n2, k.ctx, c, k.cross_dim, k.heads, false)?;
    t = g.push(&b.key("attn2.residual"), Op::Add, &[a2, t])?;
    let n3 = layer_norm(g, &b.pp("norm3"), t, c, 1e-5)?;
    let inner = 4 * c;
    let f = linear(g, &b.pp("ff.net.0.proj"), n3, c, 2 * inner, true)?;
    let f = g.push(&b.key("ff.geglu"), Op::Geglu, &[f])?;
    let f = linear(g, &b.pp("ff.net.2"), f, inner, c, true)?;
    t = g.push(&b.key("ff.residual"), Op::Add, &[f, t])?;
    let out = if k.linear_proj {
        let p = linear(g, &vb.pp("proj_out"), t, c, c, true)?;
        from_tokens(g, &vb.key("out"), p, h, w)?
    } else {
        let t = from_tokens(g, &vb.key("out"), t, h, w)?;
        conv2d(g, &vb.pp("proj_out"), t, c, c, 1, 1, 0)?
    };
    g.push(&vb.key("residual"), Op::Add, &[out, x])
}

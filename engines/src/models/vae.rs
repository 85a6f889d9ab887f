//! SD-VAE (`AutoencoderKL`, sd-vae-ft-mse): the encoder up to the latent mean and the decoder.
//!
//! Encode: `image` [B,3,H,W] in [-1,1] -> `latent_mean` [B,4,H/8,W/8] (the distribution's mean,
//! unscaled). Decode: `latent` [B,4,h,w] (unscaled) -> `image` [B,3,8h,8w] in about [-1,1].
//! MuseTalk's 0.18215 scaling and the (x/2+0.5).clamp(0,1) belong to the pipeline, not here.

use crate::error::Result;
use crate::graph::{Graph, Op, ValueId};
use crate::models::blocks::{
    conv2d, conv2d_padded, from_tokens, group_norm, linear, resnet, to_tokens,
};
use crate::models::config::VaeConfig;
use crate::weights::Vb;

const EPS: f32 = 1e-6;

/// The encoder graph for `batch` images of `size`x`size`.
pub fn build_encoder(vb: &Vb, cfg: &VaeConfig, batch: usize, size: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let x = g.input("image", &[batch, cfg.in_channels, size, size]);
    let y = encoder(&mut g, vb, cfg, x)?;
    g.output("latent_mean", y);
    Ok(g)
}

/// The decoder graph for `batch` latents of `size`x`size`.
pub fn build_decoder(vb: &Vb, cfg: &VaeConfig, batch: usize, size: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let z = g.input("latent", &[batch, cfg.latent_channels, size, size]);
    let y = decoder(&mut g, vb, cfg, z)?;
    g.output("image", y);
    Ok(g)
}

/// Encoder + quant_conv, keeping the mean half of the moments.
pub fn encoder(g: &mut Graph, vb: &Vb, cfg: &VaeConfig, x: ValueId) -> Result<ValueId> {
    let ch = &cfg.block_out_channels;
    let groups = cfg.norm_num_groups;
    let e = vb.pp("encoder");
    let mut x = conv2d(g, &e.pp("conv_in"), x, cfg.in_channels, ch[0], 3, 1, 1)?;
    let mut cin = ch[0];
    for (i, &cout) in ch.iter().enumerate() {
        let b = e.pp(format!("down_blocks.{i}"));
        for j in 0..cfg.layers_per_block {
            x = resnet(
                g,
                &b.pp(format!("resnets.{j}")),
                x,
                cin,
                cout,
                None,
                groups,
                EPS,
            )?;
            cin = cout;
        }
        if i + 1 < ch.len() {
            // diffusers pads (0,1,0,1) then convolves with stride 2 and no padding.
            x = conv2d_padded(
                g,
                &b.pp("downsamplers.0.conv"),
                x,
                cout,
                cout,
                3,
                2,
                [0, 0, 1, 1],
            )?;
        }
    }
    let top = cin;
    x = mid_block(g, &e.pp("mid_block"), x, top, groups)?;
    x = group_norm(g, &e.pp("conv_norm_out"), x, top, groups, EPS, true)?;
    let moments = 2 * cfg.latent_channels;
    x = conv2d(g, &e.pp("conv_out"), x, top, moments, 3, 1, 1)?;
    x = conv2d(g, &vb.pp("quant_conv"), x, moments, moments, 1, 1, 0)?;
    g.push(
        "latent_dist.mean",
        Op::Slice {
            axis: 1,
            start: 0,
            end: cfg.latent_channels,
        },
        &[x],
    )
}

/// post_quant_conv + decoder.
pub fn decoder(g: &mut Graph, vb: &Vb, cfg: &VaeConfig, z: ValueId) -> Result<ValueId> {
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let groups = cfg.norm_num_groups;
    let lc = cfg.latent_channels;
    let z = conv2d(g, &vb.pp("post_quant_conv"), z, lc, lc, 1, 1, 0)?;
    let d = vb.pp("decoder");
    let mut x = conv2d(g, &d.pp("conv_in"), z, lc, rev[0], 3, 1, 1)?;
    x = mid_block(g, &d.pp("mid_block"), x, rev[0], groups)?;
    let mut cin = rev[0];
    for (i, &cout) in rev.iter().enumerate() {
        let b = d.pp(format!("up_blocks.{i}"));
        for j in 0..=cfg.layers_per_block {
            x = resnet(
                g,
                &b.pp(format!("resnets.{j}")),
                x,
                cin,
                cout,
                None,
                groups,
                EPS,
            )?;
            cin = cout;
        }
        if i + 1 < rev.len() {
            x = g.push(&b.key("upsample"), Op::UpsampleNearest2x, &[x])?;
            x = conv2d(g, &b.pp("upsamplers.0.conv"), x, cout, cout, 3, 1, 1)?;
        }
    }
    x = group_norm(g, &d.pp("conv_norm_out"), x, cin, groups, EPS, true)?;
    conv2d(g, &d.pp("conv_out"), x, cin, cfg.out_channels, 3, 1, 1)
}

/// `UNetMidBlock2D`: resnet, single-head spatial self-attention, resnet.
fn mid_block(g: &mut Graph, vb: &Vb, x: ValueId, c: usize, groups: usize) -> Result<ValueId> {
    let x = resnet(g, &vb.pp("resnets.0"), x, c, c, None, groups, EPS)?;
    let x = spatial_attention(g, &vb.pp("attentions.0"), x, c, groups)?;
    resnet(g, &vb.pp("resnets.1"), x, c, c, None, groups, EPS)
}

/// The VAE's attention block. Checkpoints use either the current diffusers names
/// (to_q/to_k/to_v/to_out.0) or the older ones (query/key/value/proj_attn); both load.
fn spatial_attention(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    c: usize,
    groups: usize,
) -> Result<ValueId> {
    let s = g.shape(x).to_vec();
    let n = group_norm(g, &vb.pp("group_norm"), x, c, groups, EPS, false)?;
    let t = to_tokens(g, &vb.key("in"), n)?;
    let proj = |g: &mut Graph, names: [&str; 2], input: ValueId| -> Result<ValueId> {
        let name = if vb.contains(&format!("{}.weight", names[0]))
            || !vb.contains(&format!("{}.weight", names[1]))
        {
            names[0]
        } else {
            names[1]
        };
        linear(g, &vb.pp(name), input, c, c, true)
    };
    // Upstream sd-vae-ft-mse files carry the older names: synthesised checkpoints write those.
    let q = proj(g, ["query", "to_q"], t)?;
    let k = proj(g, ["key", "to_k"], t)?;
    let v = proj(g, ["value", "to_v"], t)?;
    let o = g.push(&vb.key("attention"), Op::Attention { heads: 1 }, &[q, k, v])?;
    let o = proj(g, ["proj_attn", "to_out.0"], o)?;
    let o = from_tokens(g, &vb.key("out"), o, s[2], s[3])?;
    g.push(&vb.key("residual"), Op::Add, &[o, x])
}

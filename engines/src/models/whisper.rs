//! whisper-tiny's encoder (transformers `WhisperEncoder`) returning all hidden states.
//!
//! Input: `input_features` [B, 80, 3000] (log-mel, 30 s). Outputs `hidden_state_0..=L` [B,1500,d]:
//! the embeddings, the outputs of layers 0..L-2, and the final layer's output after `layer_norm`
//! — exactly transformers' `hidden_states` tuple, which MuseTalk stacks.

use crate::error::Result;
use crate::graph::{Graph, Op, ValueId};
use crate::models::blocks::{conv1d, layer_norm, linear};
use crate::models::config::WhisperConfig;
use crate::weights::Vb;

/// Mel frames in Whisper's 30 s window.
pub const MEL_FRAMES: usize = 3000;

/// Builds the encoder; `vb` is the encoder's prefix (e.g. `model.encoder`).
pub fn build(vb: &Vb, cfg: &WhisperConfig, batch: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let d = cfg.d_model;
    let mel = g.input("input_features", &[batch, cfg.num_mel_bins, MEL_FRAMES]);
    let x = conv1d(&mut g, &vb.pp("conv1"), mel, cfg.num_mel_bins, d, 3, 1, 1)?;
    let x = g.push("conv1.gelu", Op::Gelu, &[x])?;
    let x = conv1d(&mut g, &vb.pp("conv2"), x, d, d, 3, 2, 1)?;
    let x = g.push("conv2.gelu", Op::Gelu, &[x])?;
    let x = g.push(
        "tokens",
        Op::Permute {
            perm: vec![0, 2, 1],
        },
        &[x],
    )?;
    let positions = g.shape(x)[1];
    let pos = vb
        .pp("embed_positions")
        .get("weight", &[cfg.max_source_positions, d])?;
    let pos = crate::Tensor::new(vec![positions, d], pos.data[..positions * d].to_vec());
    let pos = g.constant(&vb.key("embed_positions.weight"), pos);
    let mut x = g.push("embed", Op::Add, &[x, pos])?;
    let mut states = vec![x];
    for i in 0..cfg.encoder_layers {
        x = layer(&mut g, &vb.pp(format!("layers.{i}")), x, cfg)?;
        states.push(x);
    }
    let last = states.len() - 1;
    states[last] = layer_norm(&mut g, &vb.pp("layer_norm"), x, d, 1e-5)?;
    for (i, s) in states.iter().enumerate() {
        g.output(&format!("hidden_state_{i}"), *s);
    }
    Ok(g)
}

/// Pre-norm encoder layer: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x)))).
fn layer(g: &mut Graph, vb: &Vb, x: ValueId, cfg: &WhisperConfig) -> Result<ValueId> {
    let d = cfg.d_model;
    let a = vb.pp("self_attn");
    let h = layer_norm(g, &vb.pp("self_attn_layer_norm"), x, d, 1e-5)?;
    let q = linear(g, &a.pp("q_proj"), h, d, d, true)?;
    let k = linear(g, &a.pp("k_proj"), h, d, d, false)?;
    let v = linear(g, &a.pp("v_proj"), h, d, d, true)?;
    let o = g.push(
        &a.key("attention"),
        Op::Attention {
            heads: cfg.encoder_attention_heads,
        },
        &[q, k, v],
    )?;
    let o = linear(g, &a.pp("out_proj"), o, d, d, true)?;
    let x = g.push(&vb.key("attn.residual"), Op::Add, &[x, o])?;
    let h = layer_norm(g, &vb.pp("final_layer_norm"), x, d, 1e-5)?;
    let h = linear(g, &vb.pp("fc1"), h, d, cfg.encoder_ffn_dim, true)?;
    let h = g.push(&vb.key("fc1.gelu"), Op::Gelu, &[h])?;
    let h = linear(g, &vb.pp("fc2"), h, cfg.encoder_ffn_dim, d, true)?;
    g.push(&vb.key("ffn.residual"), Op::Add, &[x, h])
}

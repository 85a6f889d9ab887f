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

/// Positions (rows of every hidden state) of a window: the stride-2 stem halves the mel frames.
pub const POSITIONS: usize = MEL_FRAMES / 2;

/// Graph input of `build_rows`: each window's first wanted row, [B].
pub const FIRST_ROW: &str = "first_row";

/// Rows of each window `build_rows` returns by default: a hop of h frames reads 2h + 8 of them
/// (`audio::stream`), so 64 serve every hop up to 28 frames.
pub const SERVED_ROWS: usize = 64;

/// Builds the encoder; `vb` is the encoder's prefix (e.g. `model.encoder`).
pub fn build(vb: &Vb, cfg: &WhisperConfig, batch: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let mut x = embed(&mut g, vb, cfg, batch)?;
    let mut states = vec![x];
    for i in 0..cfg.encoder_layers {
        x = layer(&mut g, &vb.pp(format!("layers.{i}")), x, None, cfg)?;
        states.push(x);
    }
    finish(g, vb, cfg, states)
}

/// The encoder with the same outputs cut to `rows` rows from each window's `first_row` input
/// ([B, rows, d] each): what a streaming hop reads. Every layer but the last must still see
/// all 1500 positions (each feeds the next layer's keys and values); the last computes its
/// queries, MLP and final norm for those rows alone, about a fifth of the work of a window.
pub fn build_rows(vb: &Vb, cfg: &WhisperConfig, batch: usize, rows: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let mut x = embed(&mut g, vb, cfg, batch)?;
    let first = g.input(FIRST_ROW, &[batch]);
    let gather = Op::GatherRows { rows };
    let mut states = Vec::new();
    for i in 0..cfg.encoder_layers {
        states.push(g.push(
            &format!("hidden_state_{i}.rows"),
            gather.clone(),
            &[x, first],
        )?);
        let last = i + 1 == cfg.encoder_layers;
        let queries = last.then_some((first, rows));
        x = layer(&mut g, &vb.pp(format!("layers.{i}")), x, queries, cfg)?;
    }
    if cfg.encoder_layers == 0 {
        x = g.push("hidden_state_0.rows", gather, &[x, first])?;
    }
    states.push(x);
    finish(g, vb, cfg, states)
}

/// The input and the embeddings: two 1-d convolutions with GELUs, tokens, positions.
fn embed(g: &mut Graph, vb: &Vb, cfg: &WhisperConfig, batch: usize) -> Result<ValueId> {
    let d = cfg.d_model;
    let mel = g.input("input_features", &[batch, cfg.num_mel_bins, MEL_FRAMES]);
    let x = conv1d(g, &vb.pp("conv1"), mel, cfg.num_mel_bins, d, 3, 1, 1)?;
    let x = g.push("conv1.gelu", Op::Gelu, &[x])?;
    let x = conv1d(g, &vb.pp("conv2"), x, d, d, 3, 2, 1)?;
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
    g.push("embed", Op::Add, &[x, pos])
}

/// The final layer norm on the last state, and every state as an output.
fn finish(mut g: Graph, vb: &Vb, cfg: &WhisperConfig, mut states: Vec<ValueId>) -> Result<Graph> {
    let last = states.len() - 1;
    states[last] = layer_norm(
        &mut g,
        &vb.pp("layer_norm"),
        states[last],
        cfg.d_model,
        1e-5,
    )?;
    for (i, s) in states.iter().enumerate() {
        g.output(&format!("hidden_state_{i}"), *s);
    }
    Ok(g)
}

/// Pre-norm encoder layer: x + attn(ln(x)), then x + fc2(gelu(fc1(ln(x)))). With `queries`
/// (first rows, count) only those rows of each window query and come out; keys and values
/// still come from every row.
fn layer(
    g: &mut Graph,
    vb: &Vb,
    x: ValueId,
    queries: Option<(ValueId, usize)>,
    cfg: &WhisperConfig,
) -> Result<ValueId> {
    let d = cfg.d_model;
    let a = vb.pp("self_attn");
    let h = layer_norm(g, &vb.pp("self_attn_layer_norm"), x, d, 1e-5)?;
    let (hq, x) = match queries {
        Some((first, rows)) => {
            let gather = Op::GatherRows { rows };
            (
                g.push(&vb.key("queries.rows"), gather.clone(), &[h, first])?,
                g.push(&vb.key("residual.rows"), gather, &[x, first])?,
            )
        }
        None => (h, x),
    };
    let q = linear(g, &a.pp("q_proj"), hq, d, d, true)?;
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

//! MuseTalk 1.5's whole frame step as one graph, the unit an executor replays per batch.
//!
//! Avatar mode: cached latents [B,8,32,32] + audio features [B,50,d] -> UNet -> VAE decode ->
//! `image` [B,3,256,256] in [0,1]. Camera mode first encodes the masked and the reference crop
//! ([B,3,256,256] each, in [-1,1]) with the VAE. The audio positional encoding is a constant of
//! the graph, computed once at build.

use crate::error::Result;
use crate::graph::{Graph, Op, ValueId};
use crate::models::config::{UNetConfig, VaeConfig};
use crate::models::{unet, vae};
use crate::tensor::Tensor;
use crate::weights::Vb;

/// Face crop side in pixels, and its latent side.
pub const CROP: usize = 256;
pub const LATENT: usize = CROP / 8;

/// MuseTalk's sinusoidal `PositionalEncoding` (sin on even, cos on odd channels), first `len` rows.
pub fn audio_pe(len: usize, d: usize) -> Tensor {
    let mut data = vec![0f32; len * d];
    for pos in 0..len {
        for i in (0..d).step_by(2) {
            let div = (i as f32 * (-(10000f32).ln() / d as f32)).exp();
            let angle = pos as f32 * div;
            data[pos * d + i] = angle.sin();
            if i + 1 < d {
                data[pos * d + i + 1] = angle.cos();
            }
        }
    }
    Tensor::new(vec![1, len, d], data)
}

/// The weights and configs of one model set.
pub struct Models<'a> {
    pub unet: Vb<'a>,
    pub unet_cfg: &'a UNetConfig,
    pub vae: Vb<'a>,
    pub vae_cfg: &'a VaeConfig,
}

fn denoise_and_decode(
    g: &mut Graph,
    m: &Models,
    latents: ValueId,
    audio: ValueId,
) -> Result<ValueId> {
    let d = m.unet_cfg.cross_attention_dim;
    let pe = g.constant("audio_pe", audio_pe(unet::AUDIO_TOKENS, d));
    let prompt = g.push("audio_prompt", Op::Add, &[audio, pe])?;
    let pred = unet::forward(g, &m.unet, m.unet_cfg, latents, prompt)?;
    let z = g.push(
        "unscale",
        Op::Affine {
            scale: 1.0 / m.vae_cfg.scaling_factor,
            shift: 0.0,
        },
        &[pred],
    )?;
    let img = vae::decoder(g, &m.vae, m.vae_cfg, z)?;
    let img = g.push(
        "to_unit",
        Op::Affine {
            scale: 0.5,
            shift: 0.5,
        },
        &[img],
    )?;
    g.push("clamp", Op::Clamp { min: 0.0, max: 1.0 }, &[img])
}

/// Avatar mode: latents cached at avatar preparation.
pub fn avatar_step(m: &Models, batch: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let latents = g.input("latents", &[batch, m.unet_cfg.in_channels, LATENT, LATENT]);
    let audio = g.input(
        "audio_features",
        &[batch, unet::AUDIO_TOKENS, m.unet_cfg.cross_attention_dim],
    );
    let image = denoise_and_decode(&mut g, m, latents, audio)?;
    g.output("image", image);
    Ok(g)
}

/// Camera mode: both crops encoded in one batch of 2B, scaled, and stacked as the UNet input
/// (masked latents first, then the reference's, as MuseTalk concatenates them).
pub fn camera_step(m: &Models, batch: usize) -> Result<Graph> {
    let mut g = Graph::new();
    let masked = g.input("masked", &[batch, 3, CROP, CROP]);
    let reference = g.input("reference", &[batch, 3, CROP, CROP]);
    let audio = g.input(
        "audio_features",
        &[batch, unet::AUDIO_TOKENS, m.unet_cfg.cross_attention_dim],
    );
    let both = g.push("crops", Op::Concat { axis: 0 }, &[masked, reference])?;
    let mean = vae::encoder(&mut g, &m.vae, m.vae_cfg, both)?;
    let z = g.push(
        "scale",
        Op::Affine {
            scale: m.vae_cfg.scaling_factor,
            shift: 0.0,
        },
        &[mean],
    )?;
    let lc = m.vae_cfg.latent_channels;
    let z = g.push(
        "split",
        Op::Reshape {
            shape: vec![2, batch, lc, LATENT, LATENT],
        },
        &[z],
    )?;
    let z = g.push(
        "stack",
        Op::Permute {
            perm: vec![1, 0, 2, 3, 4],
        },
        &[z],
    )?;
    let latents = g.push(
        "latents",
        Op::Reshape {
            shape: vec![batch, 2 * lc, LATENT, LATENT],
        },
        &[z],
    )?;
    let image = denoise_and_decode(&mut g, m, latents, audio)?;
    g.output("image", image);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;
    use crate::presets::Preset;
    use crate::weights::Weights;

    #[test]
    fn positional_encoding_matches_musetalk_values() {
        let pe = audio_pe(50, 384);
        // Row 0: sin(0)=0, cos(0)=1 alternate.
        assert_eq!(&pe.data[..4], &[0.0, 1.0, 0.0, 1.0]);
        // Row 1, channels 0/1: sin(1), cos(1) (div term 1 at i=0).
        assert!(
            (pe.data[384] - 1f32.sin()).abs() < 1e-6 && (pe.data[385] - 1f32.cos()).abs() < 1e-6
        );
        // Row 3, channel 2: sin(3 * 10000^(-2/384)).
        let want = (3.0 * (-(10000f32).ln() * 2.0 / 384.0).exp()).sin();
        assert!((pe.data[3 * 384 + 2] - want).abs() < 1e-6);
    }

    #[test]
    fn the_camera_step_is_the_avatar_step_on_encoded_crops() {
        let set = Preset::Tiny.configs();
        let (wu, wv) = (Weights::synth(1), Weights::synth(2));
        let m = Models {
            unet: wu.root(""),
            unet_cfg: &set.unet,
            vae: wv.root(""),
            vae_cfg: &set.vae,
        };
        let camera = camera_step(&m, 1).unwrap();
        let avatar = avatar_step(&m, 1).unwrap();
        let encoder = vae::build_encoder(&wv.root(""), &set.vae, 1, CROP).unwrap();
        let img = |k: f32| {
            Tensor::new(
                vec![1, 3, CROP, CROP],
                (0..3 * CROP * CROP).map(|i| (i as f32 * k).sin()).collect(),
            )
        };
        let (masked, reference) = (img(0.013), img(0.029));
        let audio = Tensor::new(
            vec![1, 50, 16],
            (0..800).map(|i| (i as f32 * 0.1).cos()).collect(),
        );
        let out = cpu::run(
            &camera,
            &[
                ("masked", &masked),
                ("reference", &reference),
                ("audio_features", &audio),
            ],
        )
        .unwrap();
        let lm = cpu::run(&encoder, &[("image", &masked)])
            .unwrap()
            .remove(0)
            .1;
        let lr = cpu::run(&encoder, &[("image", &reference)])
            .unwrap()
            .remove(0)
            .1;
        let mut latents = Vec::new();
        for b in 0..1 {
            for t in [&lm, &lr] {
                latents.extend(
                    t.data[b * 4 * 32 * 32..(b + 1) * 4 * 32 * 32]
                        .iter()
                        .map(|v| v * set.vae.scaling_factor),
                );
            }
        }
        let latents = Tensor::new(vec![1, 8, 32, 32], latents);
        let want = cpu::run(
            &avatar,
            &[("latents", &latents), ("audio_features", &audio)],
        )
        .unwrap()
        .remove(0)
        .1;
        assert_eq!(out[0].1.shape, vec![1, 3, CROP, CROP]);
        assert!(out[0].1.rel_l2(&want) < 1e-5);
        assert!(want.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

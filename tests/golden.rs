//! The CPU reference executor against PyTorch: tiny-config models with random weights, inputs and
//! outputs written by scripts/reference/make_fixtures.py (diffusers / transformers on CPU, f32).
//! Each output must match within a relative L2 error of 1e-4.

use std::path::{Path, PathBuf};

use lipstream_engines::models::config::{self, UNetConfig, VaeConfig, WhisperConfig};
use lipstream_engines::models::{unet, vae, whisper};
use lipstream_engines::weights::{Checkpoint, Weights};
use lipstream_engines::{cpu, Tensor};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny")
}

fn golden(key: &str) -> Tensor {
    Checkpoint::open(&fixtures().join("golden.safetensors"))
        .unwrap()
        .load(key)
        .unwrap()
}

fn check(name: &str, got: &Tensor, key: &str) {
    let want = golden(key);
    assert_eq!(got.shape, want.shape, "{name}: shape");
    let err = got.rel_l2(&want);
    println!("golden {name}: relative L2 error {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "{name}: relative L2 error {err:.3e} > {TOLERANCE:e}"
    );
}

#[test]
fn unet_matches_diffusers() {
    let dir = fixtures().join("musetalkV15");
    let cfg: UNetConfig = config::read(&dir.join("musetalk.json")).unwrap();
    let weights = Weights::open(&dir.join("unet.pth")).unwrap();
    let graph = unet::build(&weights.root(""), &cfg, 2, 32).unwrap();
    weights.finish("").unwrap();
    let (sample, ctx) = (golden("unet.sample"), golden("unet.encoder_hidden_states"));
    let out = cpu::run(
        &graph,
        &[("sample", &sample), ("encoder_hidden_states", &ctx)],
    )
    .unwrap();
    check("unet", &out[0].1, "unet.out");
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let dir = fixtures().join("sd-vae");
    let cfg: VaeConfig = config::read(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let enc = vae::build_encoder(&weights.root(""), &cfg, 1, 128).unwrap();
    let dec = vae::build_decoder(&weights.root(""), &cfg, 1, 16).unwrap();
    weights.finish("").unwrap();
    let out = cpu::run(&enc, &[("image", &golden("vae.image"))]).unwrap();
    check("vae encode (latent mean)", &out[0].1, "vae.latent_mean");
    let out = cpu::run(&dec, &[("latent", &golden("vae.latent"))]).unwrap();
    check("vae decode", &out[0].1, "vae.decoded");
}

#[test]
fn whisper_encoder_matches_transformers() {
    let dir = fixtures().join("whisper");
    let cfg: WhisperConfig = config::read(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir.join("model.safetensors")).unwrap();
    let graph = whisper::build(&weights.root("model.encoder"), &cfg, 1).unwrap();
    weights.finish("model.encoder.").unwrap();
    let out = cpu::run(
        &graph,
        &[("input_features", &golden("whisper.input_features"))],
    )
    .unwrap();
    assert_eq!(out.len(), cfg.encoder_layers + 1);
    for (i, (name, t)) in out.iter().enumerate() {
        check(name, t, &format!("whisper.hidden_state_{i}"));
    }
}

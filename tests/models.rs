//! `models synth` round trips, and every way a checkpoint can be wrong.

use std::path::{Path, PathBuf};

use lipstream_engines::models::config::{self, UNetConfig, VaeConfig, WhisperConfig};
use lipstream_engines::models::{unet, vae, whisper};
use lipstream_engines::presets::{self, Preset};
use lipstream_engines::weights::{Checkpoint, Weights};
use lipstream_engines::{cpu, EngineError, Tensor};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lipstream-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ramp(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::new(
        shape.to_vec(),
        (0..n).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect(),
    )
}

fn sane(t: &Tensor) {
    assert!(t.data.iter().all(|v| v.is_finite()), "non-finite output");
    assert!(t.data.iter().any(|v| *v != 0.0), "all-zero output");
}

#[test]
fn synth_tiny_loads_back_builds_and_runs() {
    let dir = temp("synth");
    let mut files = Vec::new();
    presets::synth(Preset::Tiny, 7, &dir, |p| files.push(p.to_path_buf())).unwrap();
    assert_eq!(files.len(), 6);

    let cfg: UNetConfig = config::read(&dir.join("musetalkV15/musetalk.json")).unwrap();
    assert_eq!(cfg, Preset::Tiny.configs().unet);
    let w = Weights::open(&dir.join("musetalkV15/unet.pth")).unwrap();
    let g = unet::build(&w.root(""), &cfg, 1, 32).unwrap();
    w.finish("").unwrap();
    let out = cpu::run(
        &g,
        &[
            ("sample", &ramp(&[1, 8, 32, 32])),
            ("encoder_hidden_states", &ramp(&[1, 50, 16])),
        ],
    )
    .unwrap();
    sane(&out[0].1);

    let cfg: VaeConfig = config::read(&dir.join("sd-vae/config.json")).unwrap();
    let w = Weights::open(&dir.join("sd-vae/diffusion_pytorch_model.safetensors")).unwrap();
    let dec = vae::build_decoder(&w.root(""), &cfg, 1, 4).unwrap();
    vae::build_encoder(&w.root(""), &cfg, 1, 32).unwrap();
    w.finish("").unwrap();
    sane(&cpu::run(&dec, &[("latent", &ramp(&[1, 4, 4, 4]))]).unwrap()[0].1);

    let cfg: WhisperConfig = config::read(&dir.join("whisper/config.json")).unwrap();
    let w = Weights::open(&dir.join("whisper/model.safetensors")).unwrap();
    whisper::build(&w.root("model.encoder"), &cfg, 1).unwrap();
    w.finish("model.encoder.").unwrap();

    // The same seed writes the same bytes; another seed does not.
    let again = temp("synth-again");
    presets::synth(Preset::Tiny, 7, &again, |_| {}).unwrap();
    let other = temp("synth-other");
    presets::synth(Preset::Tiny, 8, &other, |_| {}).unwrap();
    let read =
        |d: &Path| std::fs::read(d.join("sd-vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(read(&dir), read(&again));
    assert_ne!(read(&dir), read(&other));
}

#[test]
fn bad_checkpoints_are_errors_that_name_the_cause() {
    let dir = temp("bad");
    presets::synth(Preset::Tiny, 1, &dir, |_| {}).unwrap();
    let vae_file = dir.join("sd-vae/diffusion_pytorch_model.safetensors");
    let unet_file = dir.join("musetalkV15/unet.pth");
    let bytes = std::fs::read(&vae_file).unwrap();

    // Truncated safetensors: the index notices.
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = Checkpoint::open(&cut)
        .err()
        .expect("truncated file must fail")
        .to_string();
    assert!(
        err.contains("truncated") || err.contains("past the end"),
        "{err}"
    );

    // Garbage header length.
    std::fs::write(&cut, [0xffu8; 64]).unwrap();
    assert!(matches!(
        Checkpoint::open(&cut),
        Err(EngineError::Format { .. })
    ));

    // A truncated torch zip, and a non-zip .pth.
    let zip = std::fs::read(&unet_file).unwrap();
    let cut_pth = dir.join("cut.pth");
    std::fs::write(&cut_pth, &zip[..zip.len() / 2]).unwrap();
    let err = Checkpoint::open(&cut_pth)
        .err()
        .expect("truncated zip must fail")
        .to_string();
    assert!(err.contains("cut.pth"), "{err}");
    std::fs::write(&cut_pth, b"not a checkpoint at all").unwrap();
    let err = Checkpoint::open(&cut_pth)
        .err()
        .expect("a text file must fail")
        .to_string();
    assert!(err.contains("not a zip"), "{err}");

    // A truncated legacy (pre-1.6) torch file, like facenet-pytorch's pnet.pt.
    let pnet = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mtcnn/pnet.pt"),
    )
    .unwrap();
    let cut_pt = dir.join("pnet.pt");
    std::fs::write(&cut_pt, &pnet[..pnet.len() - 500]).unwrap();
    let err = Checkpoint::open(&cut_pt)
        .err()
        .expect("a truncated legacy file must fail")
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    std::fs::write(&cut_pt, &pnet[..200]).unwrap();
    assert!(Checkpoint::open(&cut_pt).is_err());

    // The right file for the wrong model: missing keys are named.
    let cfg = Preset::Tiny.configs();
    let w = Weights::open(&vae_file).unwrap();
    let err = unet::build(&w.root(""), &cfg.unet, 1, 32)
        .expect_err("a VAE is not a UNet")
        .to_string();
    assert!(
        err.contains("weight time_embedding.linear_1.weight is missing"),
        "{err}"
    );

    // The right model at the wrong size: both shapes are named.
    let w = Weights::open(&unet_file).unwrap();
    let err = unet::build(&w.root(""), &Preset::MuseTalk15.configs().unet, 1, 32)
        .expect_err("tiny is not full size");
    match err {
        EngineError::WeightShape { key, expected, got } => {
            assert_eq!(key, "time_embedding.linear_1.weight");
            assert_eq!((expected, got), (vec![1280, 320], vec![64, 16]));
        }
        other => panic!("{other}"),
    }

    // Keys the model does not use are reported after building.
    let w = Weights::open(&vae_file).unwrap();
    vae::build_decoder(&w.root(""), &cfg.vae, 1, 4).unwrap();
    let err = w
        .finish("")
        .expect_err("the encoder's weights were not taken")
        .to_string();
    assert!(err.contains("encoder."), "{err}");
}

/// The encoder the server runs (the last layer on a hop's rows alone) gives exactly the full
/// encoder's hidden states at those rows, for each window of a batch: rows inside the window
/// and a first row past the last start, which clamps to the window's end.
#[test]
fn served_whisper_rows_are_the_full_encoders_rows() {
    let set = Preset::Tiny.configs();
    let w = Weights::synth(5);
    let root = w.root("model.encoder");
    let rows = 12;
    let full = whisper::build(&root, &set.whisper, 2).unwrap();
    let served = whisper::build_rows(&root, &set.whisper, 2, rows).unwrap();
    let mel = ramp(&[2, set.whisper.num_mel_bins, whisper::MEL_FRAMES]);
    let t = whisper::MEL_FRAMES / 2;
    let first = Tensor::new(vec![2], vec![37.0, (t + 40) as f32]);
    let want = cpu::run(&full, &[("input_features", &mel)]).unwrap();
    let got = cpu::run(
        &served,
        &[("input_features", &mel), (whisper::FIRST_ROW, &first)],
    )
    .unwrap();
    assert_eq!(got.len(), set.whisper.encoder_layers + 1);
    for ((name, g), (wname, f)) in got.iter().zip(&want) {
        assert_eq!(name, wname);
        let d = f.shape[2];
        assert_eq!(g.shape, vec![2, rows, d]);
        for (b, start) in [(0, 37), (1, t - rows)] {
            let a = &g.data[b * rows * d..(b + 1) * rows * d];
            let e = &f.data[(b * t + start) * d..(b * t + start + rows) * d];
            let err = a
                .iter()
                .zip(e)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let scale = e.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "{name} window {b}: max difference {err} (values to {scale})"
            );
        }
    }
}

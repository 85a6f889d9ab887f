//! Avatar bundles from a real photo (scikit-image's astronaut.png) with the real MTCNN weights
//! and the tiny random VAE: the face box, the two latent halves, the file round trip, and the
//! error for a picture without a face.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lipstream_engines::avatar::{crop_rgb, mask_lower_half, prepare, Bundle, LATENT_SCALE};
use lipstream_engines::image::LowerFace;
use lipstream_engines::models::config::{self, VaeConfig};
use lipstream_engines::models::mtcnn::{Mtcnn, MtcnnParams};
use lipstream_engines::models::vae;
use lipstream_engines::weights::{safetensors, Checkpoint, DType, Weights};
use lipstream_engines::{cpu, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn astronaut() -> (Vec<u8>, usize, usize) {
    let file = std::fs::File::open(fixtures().join("mtcnn/astronaut.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (buf, info.width as usize, info.height as usize)
}

#[test]
fn a_photo_becomes_a_bundle_and_a_blank_one_is_refused() {
    let mut detector = Mtcnn::open(&fixtures().join("mtcnn"), MtcnnParams::default()).unwrap();
    let dir = fixtures().join("tiny/sd-vae");
    let cfg: VaeConfig = config::read(&dir.join("config.json")).unwrap();
    let w = Weights::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let enc = vae::build_encoder(&w.root(""), &cfg, 2, 256).unwrap();
    let encode = |x: &Tensor| Ok(cpu::run(&enc, &[("image", x)])?.remove(0).1);

    let (rgb, width, height) = astronaut();
    let faces = detector.detect(&rgb, width, height).unwrap();
    let mut done = 0;
    let bundle = prepare(
        vec![(rgb.clone(), width, height)],
        &mut detector,
        encode,
        |n| done = n,
    )
    .unwrap();
    assert_eq!(done, 1);
    let f = &bundle.frames[0];
    // The detector's box, 10 px longer below the chin (MuseTalk 1.5).
    let b = faces[0].box_xyxy;
    assert_eq!([f.face.x0, f.face.y0, f.face.x1], [b[0], b[1], b[2]]);
    assert!((f.face.y1 - (b[3] + 10.0)).abs() < 1e-3);
    assert_eq!(bundle.latents.shape, vec![1, 8, 32, 32]);
    // The blend mask comes from the landmarks: it starts at the nose tip.
    let nose_v = (faces[0].landmarks[2][1] - f.face.y0) / (f.face.y1 - f.face.y0);
    assert!((f.mask.top - nose_v).abs() < 1e-5, "{:?}", f.mask);
    assert_ne!(f.mask, LowerFace::DEFAULT);

    // The reference half is the scaled VAE mean of the crop; the masked half differs from it
    // (its lower half was blacked out) — computed here the long way.
    let crop = crop_rgb(&rgb, width, height, &f.face, 256);
    let masked = mask_lower_half(&crop);
    let mut both = masked.data.clone();
    both.extend_from_slice(&crop.data);
    let means = cpu::run(&enc, &[("image", &Tensor::new(vec![2, 3, 256, 256], both))]).unwrap();
    let want: Vec<f32> = means[0].1.data.iter().map(|v| v * LATENT_SCALE).collect();
    assert_eq!(bundle.latents.data, want);
    let (m, r) = bundle.latents.data.split_at(4 * 32 * 32);
    let diff: f32 = m.iter().zip(r).map(|(a, b)| (a - b).abs()).sum::<f32>() / m.len() as f32;
    assert!(diff > 1e-4, "masked and reference latents differ ({diff})");

    let out = std::env::temp_dir().join(format!(
        "lipstream-avatar-{}.safetensors",
        std::process::id()
    ));
    bundle
        .write(
            &out,
            &BTreeMap::from([("source".to_string(), "astronaut.png".to_string())]),
        )
        .unwrap();
    let back = Bundle::read(&out).unwrap();
    assert_eq!(back.frames[0].rgb, rgb);
    assert_eq!(back.frames[0].face, f.face);
    assert_eq!(back.frames[0].mask, f.mask);
    assert_eq!(back.latents, bundle.latents);
    // The frames are stored as bytes, [N, H, W, 3].
    let pictures = Checkpoint::open(&out).unwrap();
    let entry = pictures.entry("rgb").unwrap();
    assert_eq!(entry.dtype, DType::Other("U8".into()));
    assert_eq!(entry.shape, vec![1, height, width, 3]);
    drop(pictures);

    // A version 1 bundle (frames in F16) still reads; an unknown version says to prepare again.
    let v1 = std::env::temp_dir().join(format!(
        "lipstream-avatar-v1-{}.safetensors",
        std::process::id()
    ));
    let f16_rgb = Tensor::new(
        vec![1, height, width, 3],
        rgb.iter().map(|&b| f32::from(b)).collect(),
    );
    std::fs::copy(
        out.with_extension("latents.safetensors"),
        v1.with_extension("latents.safetensors"),
    )
    .unwrap();
    let version = |v: &str| BTreeMap::from([("lipstream.avatar".to_string(), v.to_string())]);
    safetensors::write_with_metadata(
        &v1,
        &BTreeMap::from([("rgb".to_string(), f16_rgb.clone())]),
        DType::F16,
        &version("1"),
    )
    .unwrap();
    let old = Bundle::read(&v1).unwrap();
    assert_eq!(old.frames[0].rgb, rgb);
    assert_eq!(old.latents, bundle.latents);
    safetensors::write_with_metadata(
        &v1,
        &BTreeMap::from([("rgb".to_string(), f16_rgb)]),
        DType::F16,
        &version("9"),
    )
    .unwrap();
    let err = Bundle::read(&v1).err().unwrap().to_string();
    assert!(
        err.contains("version 9") && err.contains("prepare it again"),
        "{err}"
    );
    let _ = std::fs::remove_file(&v1);
    let _ = std::fs::remove_file(v1.with_extension("latents.safetensors"));

    // A bundle from before masks were kept reads with the default mask; a nonsense mask is an
    // error that says so.
    let side = out.with_extension("latents.safetensors");
    let c = Checkpoint::open(&side).unwrap();
    let mut tensors: BTreeMap<String, Tensor> = ["boxes", "latents"]
        .iter()
        .map(|k| (k.to_string(), c.load(k).unwrap()))
        .collect();
    drop(c);
    safetensors::write(&side, &tensors, DType::F32).unwrap();
    assert_eq!(
        Bundle::read(&out).unwrap().frames[0].mask,
        LowerFace::DEFAULT
    );
    tensors.insert(
        "masks".into(),
        Tensor::new(vec![1, 6], vec![0.5, 0.1, 0.9, 0.1, 0.1, 0.1]),
    );
    safetensors::write(&side, &tensors, DType::F32).unwrap();
    let err = Bundle::read(&out).err().unwrap().to_string();
    assert!(err.contains("is no mask"), "{err}");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(out.with_extension("latents.safetensors"));

    // A grey picture has no face: a clear error, not a bundle.
    let grey = vec![128u8; 160 * 120 * 3];
    let err = prepare(vec![(grey, 160, 120)], &mut detector, encode, |_| {}).unwrap_err();
    assert!(err.to_string().contains("no face found"), "{err}");
}

//! MTCNN with the real facenet-pytorch weights on scikit-image's astronaut.png: the same faces,
//! boxes and landmarks within 1 px; each net's raw outputs within 1e-4 relative L2.

use std::path::{Path, PathBuf};

use lipstream_engines::cpu;
use lipstream_engines::models::mtcnn::{self, Mtcnn, MtcnnParams};
use lipstream_engines::weights::{Checkpoint, Weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mtcnn")
}

fn astronaut() -> (Vec<u8>, usize, usize) {
    let file = std::fs::File::open(fixtures().join("astronaut.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (buf, info.width as usize, info.height as usize)
}

#[test]
fn each_net_matches_facenet_pytorch() {
    let golden = Checkpoint::open(&fixtures().join("nets.safetensors")).unwrap();
    for name in ["pnet", "rnet", "onet"] {
        let w = Weights::load_all(&fixtures().join(format!("{name}.pt"))).unwrap();
        let input = golden.load(&format!("{name}.input")).unwrap();
        let s = input.shape.clone();
        let g = match name {
            "pnet" => mtcnn::pnet(&w.root(""), s[2], s[3]),
            "rnet" => mtcnn::rnet(&w.root(""), s[0]),
            _ => mtcnn::onet(&w.root(""), s[0]),
        }
        .unwrap();
        w.finish("").unwrap();
        let out = cpu::run(&g, &[("image", &input)]).unwrap();
        for (i, (oname, t)) in out.iter().enumerate() {
            let want = golden.load(&format!("{name}.output_{i}")).unwrap();
            let err = t.rel_l2(&want);
            println!("golden mtcnn {name}.{oname}: relative L2 error {err:.2e}");
            assert!(err <= 1e-4, "{name}.{oname}: {err:e}");
        }
    }
}

#[test]
fn finds_the_astronaut_like_facenet_pytorch() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap())
            .unwrap();
    let want = golden["faces"].as_array().unwrap();
    let (rgb, w, h) = astronaut();
    let mut detector = Mtcnn::open(&fixtures(), MtcnnParams::default()).unwrap();
    let faces = detector.detect(&rgb, w, h).unwrap();
    println!("mtcnn on astronaut.png: {faces:?}");
    assert_eq!(faces.len(), want.len(), "face count");
    for (got, want) in faces.iter().zip(want) {
        let wb: Vec<f32> = want["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let box_err = got
            .box_xyxy
            .iter()
            .zip(&wb)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let wl: Vec<[f32; 2]> = want["landmarks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| [p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32])
            .collect();
        let lm_err = got
            .landmarks
            .iter()
            .zip(&wl)
            .flat_map(|(a, b)| [(a[0] - b[0]).abs(), (a[1] - b[1]).abs()])
            .fold(0f32, f32::max);
        println!(
            "box max error {box_err:.4} px, landmark max error {lm_err:.4} px, score {} vs {}",
            got.score, want["prob"]
        );
        assert!(box_err <= 1.0, "box {:?} vs {wb:?}", got.box_xyxy);
        assert!(lm_err <= 1.0, "landmarks {:?} vs {wl:?}", got.landmarks);
        assert!((f64::from(got.score) - want["prob"].as_f64().unwrap()).abs() < 1e-4);
    }
}

#[test]
fn an_empty_image_has_no_faces_and_a_wrong_buffer_is_an_error() {
    let mut detector = Mtcnn::open(&fixtures(), MtcnnParams::default()).unwrap();
    assert!(detector
        .detect(&vec![128; 64 * 48 * 3], 64, 48)
        .unwrap()
        .is_empty());
    assert!(detector.detect(&[0; 10], 64, 48).is_err());
}

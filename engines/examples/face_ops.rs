//! Times the CPU work of camera mode's face path: the crop (I420 box -> 256x256 RGB model input)
//! and the blend (the rendered face back into the frame under the mask), at three frame sizes
//! with a face box of a typical size for each, the whole frame to RGB (the detector's input), and
//! one MTCNN detection (the tracker's every fifth
//! frame) on the 512x512 astronaut photo with the server's default 64 px smallest face. Prints
//! one JSON object.
//!
//! `cargo run --release -p lipstream-engines --example face_ops`

use std::time::Instant;

use std::path::Path;

use lipstream_engines::image::{blend_with, crop, FaceBox, LowerFace, Planes, PlanesMut};
use lipstream_engines::models::mtcnn::{Mtcnn, MtcnnParams};
use lipstream_engines::Tensor;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[runs / 2]
}

fn main() {
    let size = 256;
    let face = Tensor::new(
        vec![3, size, size],
        (0..3 * size * size)
            .map(|i| (i % 251) as f32 / 250.0)
            .collect(),
    );
    let mask = LowerFace::from_landmarks(&[
        [0.3, 0.35],
        [0.7, 0.35],
        [0.5, 0.55],
        [0.35, 0.75],
        [0.65, 0.75],
    ]);
    let mut rows = Vec::new();
    for (w, h, side) in [
        (512usize, 512usize, 220.0f32),
        (1280, 720, 300.0),
        (1920, 1080, 450.0),
    ] {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let y: Vec<u8> = (0..w * h).map(|i| (i * 7 % 220 + 16) as u8).collect();
        let u: Vec<u8> = (0..cw * ch).map(|i| (i * 3 % 200 + 28) as u8).collect();
        let v: Vec<u8> = (0..cw * ch).map(|i| (i * 5 % 200 + 28) as u8).collect();
        let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
        let b = FaceBox {
            x0: cx - side / 2.0,
            y0: cy - side / 2.0,
            x1: cx + side / 2.0,
            y1: cy + side / 2.0 + 10.0,
        };
        let planes = Planes {
            width: w,
            height: h,
            y: &y,
            u: &u,
            v: &v,
        };
        let crop_ms = median_ms(31, || {
            std::hint::black_box(crop(&planes, &b, size));
        });
        let (mut yy, mut uu, mut vv) = (y.clone(), u.clone(), v.clone());
        let blend_ms = median_ms(31, || {
            let mut out = PlanesMut {
                width: w,
                height: h,
                y: &mut yy,
                u: &mut uu,
                v: &mut vv,
            };
            blend_with(&mut out, &face, &b, &mask, 1.0);
        });
        // The whole frame as RGB for the detector (every detection).
        let mut rgb_out = Vec::new();
        let rgb_ms = median_ms(31, || {
            lipstream_engines::image::to_rgb(&planes, &mut rgb_out)
        });
        eprintln!(
            "{w}x{h}, {side:.0} px face: crop {crop_ms:.2} ms, blend {blend_ms:.2} ms, frame to RGB {rgb_ms:.2} ms"
        );
        rows.push(format!(
            "{{\"frame\": \"{w}x{h}\", \"face_px\": {side}, \"crop_ms\": {crop_ms:.3}, \"blend_ms\": {blend_ms:.3}, \"to_rgb_ms\": {rgb_ms:.3}}}"
        ));
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mtcnn");
    let file = std::fs::File::open(fixtures.join("astronaut.png")).expect("astronaut.png");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("a PNG");
    let mut rgb = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut rgb).expect("a frame");
    rgb.truncate(info.buffer_size());
    let (w, h) = (info.width as usize, info.height as usize);
    let params = MtcnnParams {
        min_face_size: 64.0,
        ..MtcnnParams::default()
    };
    let mut mtcnn = Mtcnn::open(&fixtures, params).expect("the MTCNN weights");
    let detect_ms = median_ms(15, || {
        std::hint::black_box(mtcnn.detect(&rgb, w, h).expect("a detection"));
    });
    eprintln!("{w}x{h} MTCNN detection: {detect_ms:.2} ms");
    println!(
        "{{\"face\": [{}], \"mtcnn_detect_ms\": {{\"frame\": \"{w}x{h}\", \"ms\": {detect_ms:.3}}}}}",
        rows.join(", ")
    );
}

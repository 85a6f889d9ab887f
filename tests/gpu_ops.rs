//! GPU kernels against the CPU reference executor, op by op (ggml test-backend-ops style).
//! Without a CUDA driver these tests say so and pass: CI has no GPU; the GPU machine runs them
//! through scripts/device/test.sh.

use half::f16;
use lipstream_engines::cpu::kernels::eval;
use lipstream_engines::{Op, Tensor};
use lipstream_gpu::device::{libraries, Device};
use lipstream_gpu::kernels::group_norm::GroupNorm;

fn device() -> Option<Device> {
    let libs = libraries();
    if !libs.driver || !libs.nvrtc {
        eprintln!("SKIPPED: no CUDA driver/NVRTC here ({libs:?})");
        return None;
    }
    Some(Device::open(0).expect("a CUDA driver is present, so GPU 0 must open"))
}

fn random(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // f16-exact values in [-2, 2].
            f16::from_f32((s as f32 / u32::MAX as f32) * 4.0 - 2.0).to_f32()
        })
        .collect();
    Tensor::new(shape.to_vec(), data)
}

fn to_f16(t: &Tensor) -> Vec<f16> {
    t.data.iter().map(|&v| f16::from_f32(v)).collect()
}

#[test]
fn group_norm_matches_the_cpu_executor() {
    let Some(dev) = device() else { return };
    println!("GPU: {} ({})", dev.name, dev.arch());
    let kernel = GroupNorm::load(&dev).expect("compile group_norm");
    // The shape classes the models use: UNet (32 groups, 320..1280 ch at 32..4 px), VAE (512 ch at
    // 32 px, 128 ch at 256 px), tiny configs.
    for (i, &(n, c, hw, groups, silu, eps)) in [
        (1, 320, 32, 32, true, 1e-5f32),
        (16, 640, 16, 32, true, 1e-5),
        (2, 1280, 4, 32, false, 1e-6),
        (1, 512, 32, 32, true, 1e-6),
        (1, 128, 256, 32, true, 1e-6),
        (3, 16, 8, 8, false, 1e-5),
    ]
    .iter()
    .enumerate()
    {
        let x = random(&[n, c, hw, hw], i as u32 + 1);
        let gamma = random(&[c], 100 + i as u32);
        let beta = random(&[c], 200 + i as u32);
        let want = eval(
            &Op::GroupNorm { groups, eps, silu },
            &[&x, &gamma, &beta],
            &x.shape,
        );
        let s = &dev.stream;
        let (xd, gd, bd) = (
            s.clone_htod(&to_f16(&x)).unwrap(),
            s.clone_htod(&to_f16(&gamma)).unwrap(),
            s.clone_htod(&to_f16(&beta)).unwrap(),
        );
        let mut yd = s.alloc_zeros::<f16>(x.numel()).unwrap();
        kernel
            .launch(
                &dev,
                &xd,
                &gd,
                &bd,
                &mut yd,
                n,
                c,
                groups,
                hw * hw,
                eps,
                silu,
            )
            .unwrap();
        let y: Vec<f32> = s
            .clone_dtoh(&yd)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let err = Tensor::new(x.shape.clone(), y).rel_l2(&want);
        println!(
            "group_norm [{n},{c},{hw},{hw}] g{groups} silu={silu}: relative L2 error {err:.2e}"
        );
        assert!(err < 2e-3, "{err:e}");
    }
    // A shape the kernel does not take is an error, not a crash.
    let bad = dev.stream.alloc_zeros::<f16>(10).unwrap();
    let mut out = dev.stream.alloc_zeros::<f16>(10).unwrap();
    assert!(kernel
        .launch(&dev, &bad, &bad, &bad, &mut out, 1, 10, 3, 1, 1e-5, false)
        .is_err());
}

/// Compares a device result with the CPU executor's.
fn check(name: &str, got: Vec<f16>, want: &Tensor, tol: f64) {
    let got = Tensor::new(want.shape.clone(), got.iter().map(|v| v.to_f32()).collect());
    let err = got.rel_l2(want);
    println!("{name}: relative L2 error {err:.2e}");
    assert!(err < tol, "{name}: {err:e}");
}

#[test]
fn layer_norm_matches_the_cpu_executor() {
    let Some(dev) = device() else { return };
    let kernel =
        lipstream_gpu::kernels::layer_norm::LayerNorm::load(&dev).expect("compile layer_norm");
    // Transformer tokens at the UNet's widths and whisper's 1500 x 384.
    for (i, &(rows, cols)) in [
        (1024usize, 320usize),
        (256, 640),
        (16, 1280),
        (1500, 384),
        (50, 16),
    ]
    .iter()
    .enumerate()
    {
        let x = random(&[rows, cols], 300 + i as u32);
        let (gamma, beta) = (
            random(&[cols], 400 + i as u32),
            random(&[cols], 500 + i as u32),
        );
        let want = eval(&Op::LayerNorm { eps: 1e-5 }, &[&x, &gamma, &beta], &x.shape);
        let s = &dev.stream;
        let (xd, gd, bd) = (
            s.clone_htod(&to_f16(&x)).unwrap(),
            s.clone_htod(&to_f16(&gamma)).unwrap(),
            s.clone_htod(&to_f16(&beta)).unwrap(),
        );
        let mut yd = s.alloc_zeros::<f16>(x.numel()).unwrap();
        kernel
            .launch(&dev, &xd, &gd, &bd, &mut yd, cols, 1e-5)
            .unwrap();
        check(
            &format!("layer_norm [{rows},{cols}]"),
            s.clone_dtoh(&yd).unwrap(),
            &want,
            2e-3,
        );
    }
}

#[test]
fn elementwise_kernels_match_the_cpu_executor() {
    let Some(dev) = device() else { return };
    let k =
        lipstream_gpu::kernels::elementwise::Elementwise::load(&dev).expect("compile elementwise");
    let s = &dev.stream;

    // GEGLU at the UNet's feed-forward widths (inner = 4 x channels).
    for &(rows, d) in &[(1024usize, 1280usize), (16, 5120), (50, 64)] {
        let x = random(&[rows, 2 * d], d as u32);
        let want = eval(&Op::Geglu, &[&x], &[rows, d]);
        let xd = s.clone_htod(&to_f16(&x)).unwrap();
        let mut yd = s.alloc_zeros::<f16>(rows * d).unwrap();
        k.geglu(&dev, &xd, &mut yd, d).unwrap();
        check(
            &format!("geglu [{rows},{}]", 2 * d),
            s.clone_dtoh(&yd).unwrap(),
            &want,
            2e-3,
        );
    }

    // A residual add (same shape) and a per-channel bias over NCHW.
    let a = random(&[2, 320, 32, 32], 7);
    for (name, b, inner) in [
        ("add residual", random(&[2, 320, 32, 32], 8), 1usize),
        ("add channel bias", random(&[320], 9), 32 * 32),
    ] {
        let b4 = if b.shape.len() == 1 {
            Tensor::new(vec![1, 320, 1, 1], b.data.clone())
        } else {
            b.clone()
        };
        let want = eval(&Op::Add, &[&a, &b4], &a.shape);
        let (ad, bd) = (
            s.clone_htod(&to_f16(&a)).unwrap(),
            s.clone_htod(&to_f16(&b)).unwrap(),
        );
        let mut yd = s.alloc_zeros::<f16>(a.numel()).unwrap();
        k.add(&dev, &ad, &bd, &mut yd, inner).unwrap();
        check(name, s.clone_dtoh(&yd).unwrap(), &want, 2e-3);
    }

    // Nearest 2x upsample (UNet up blocks, VAE decoder).
    let x = random(&[1, 512, 64, 64], 11);
    let want = eval(&Op::UpsampleNearest2x, &[&x], &[1, 512, 128, 128]);
    let xd = s.clone_htod(&to_f16(&x)).unwrap();
    let mut yd = s.alloc_zeros::<f16>(x.numel() * 4).unwrap();
    k.upsample2x(&dev, &xd, &mut yd, 64, 64).unwrap();
    check(
        "upsample2x [1,512,64,64]",
        s.clone_dtoh(&yd).unwrap(),
        &want,
        1e-6,
    );

    // Wrong shapes are errors.
    assert!(k.geglu(&dev, &xd, &mut yd, 3).is_err());
    assert!(k.upsample2x(&dev, &xd, &mut yd, 7, 64).is_err());
}

#[test]
fn attention_matches_the_cpu_executor() {
    use lipstream_gpu::kernels::attention::{Attention, AttentionShape};
    let Some(dev) = device() else { return };
    let kernel = Attention::load(&dev).expect("compile attention");
    let s = &dev.stream;
    // UNet self- and cross-attention at each width (head dims 40/80/160), the VAE's single
    // 512-wide head, whisper's 6 heads of 64.
    for (i, &(batch, lq, lk, heads, c)) in [
        (2usize, 1024usize, 1024usize, 8usize, 320usize),
        (2, 1024, 50, 8, 320),
        (2, 256, 50, 8, 640),
        (4, 64, 64, 8, 1280),
        (1, 1024, 1024, 1, 512),
        (1, 1500, 1500, 6, 384),
    ]
    .iter()
    .enumerate()
    {
        let q = random(&[batch, lq, c], 600 + i as u32);
        let k = random(&[batch, lk, c], 700 + i as u32);
        let v = random(&[batch, lk, c], 800 + i as u32);
        let want = eval(&Op::Attention { heads }, &[&q, &k, &v], &[batch, lq, c]);
        let (qd, kd, vd) = (
            s.clone_htod(&to_f16(&q)).unwrap(),
            s.clone_htod(&to_f16(&k)).unwrap(),
            s.clone_htod(&to_f16(&v)).unwrap(),
        );
        let mut od = s.alloc_zeros::<f16>(batch * lq * c).unwrap();
        let shape = AttentionShape {
            batch,
            lq,
            lk,
            heads,
            c,
            cv: c,
        };
        kernel.launch(&dev, &qd, &kd, &vd, &mut od, shape).unwrap();
        check(
            &format!("attention {shape:?}"),
            s.clone_dtoh(&od).unwrap(),
            &want,
            3e-3,
        );
    }
}

#[test]
fn linear_through_cublaslt_matches_the_cpu_executor() {
    let Some(dev) = device() else { return };
    let blas = lipstream_gpu::blas::Blas::new(dev.stream.clone()).expect("cuBLASLt");
    let s = &dev.stream;
    // to_q at 320, cross-attention to_k from the 384-wide audio prompt, GEGLU's up projection,
    // whisper's fc1, a batch-16 row count.
    for (i, &(m, k, n, bias)) in [
        (1024usize, 320usize, 320usize, false),
        (50, 384, 1280, false),
        (1024, 320, 2560, true),
        (1500, 384, 1536, true),
        (16 * 64, 1280, 1280, true),
    ]
    .iter()
    .enumerate()
    {
        let x = random(&[m, k], 900 + i as u32);
        // Weights scaled like trained ones so outputs stay in fp16 range.
        let mut w = random(&[n, k], 950 + i as u32);
        let scale = 1.0 / (k as f32).sqrt();
        w.data
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v * scale).to_f32());
        let b = random(&[n], 990 + i as u32);
        let inputs: Vec<&Tensor> = if bias { vec![&x, &w, &b] } else { vec![&x, &w] };
        let want = eval(&Op::Linear, &inputs, &[m, n]);
        let (xd, wd, bd) = (
            s.clone_htod(&to_f16(&x)).unwrap(),
            s.clone_htod(&to_f16(&w)).unwrap(),
            s.clone_htod(&to_f16(&b)).unwrap(),
        );
        let mut yd = s.alloc_zeros::<f16>(m * n).unwrap();
        blas.linear(&xd, &wd, bias.then_some(&bd), &mut yd, m, k, n)
            .unwrap();
        check(
            &format!("linear [{m},{k}] x [{n},{k}]^T bias={bias}"),
            s.clone_dtoh(&yd).unwrap(),
            &want,
            2e-3,
        );
    }
}

#[test]
fn convolution_through_cudnn_matches_the_cpu_executor() {
    use lipstream_gpu::conv::{Conv, ConvShape};
    let Some(dev) = device() else { return };
    let conv = Conv::new(dev.stream.clone()).expect("cuDNN");
    let s = &dev.stream;
    // conv_in-sized with unequal h/w padding, a 3x3 at 320, the stride-2 downsampler, a 1x1 shortcut; the VAE's 128-channel
    // 3x3 at 256x256; whisper's conv1 as a 1x3 over 3000 frames; a grouped conv.
    let cases = [
        (
            1usize, 8usize, 32usize, 32usize, 320usize, 3usize, 3usize, 1usize, 1usize, 0usize,
            1usize,
        ),
        (2, 320, 32, 32, 320, 3, 3, 1, 1, 1, 1),
        (2, 320, 32, 32, 320, 3, 3, 2, 1, 1, 1),
        (2, 640, 16, 16, 320, 1, 1, 1, 0, 0, 1),
        (1, 128, 256, 256, 128, 3, 3, 1, 1, 1, 1),
        (1, 80, 1, 3000, 384, 1, 3, 1, 0, 1, 1),
        (1, 64, 16, 16, 64, 3, 3, 1, 1, 1, 4),
    ];
    for (i, &(n, c, h, w, o, kh, kw, stride, pad_h, pad_w, groups)) in cases.iter().enumerate() {
        let x = random(&[n, c, h, w], 1000 + i as u32);
        let mut wt = random(&[o, c / groups, kh, kw], 1100 + i as u32);
        let scale = 1.0 / ((c / groups * kh * kw) as f32).sqrt();
        wt.data
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v * scale).to_f32());
        let shape = ConvShape {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            stride: [stride, stride],
            pad: [pad_h, pad_w],
            groups,
        };
        let (ho, wo) = shape.out_hw();
        let op = Op::Conv2d {
            stride: [stride, stride],
            padding: [pad_h, pad_w, pad_h, pad_w],
            groups,
        };
        let want = eval(&op, &[&x, &wt], &[n, o, ho, wo]);
        let (xd, wd) = (
            s.clone_htod(&to_f16(&x)).unwrap(),
            s.clone_htod(&to_f16(&wt)).unwrap(),
        );
        let mut yd = s.alloc_zeros::<f16>(n * o * ho * wo).unwrap();
        conv.forward(&xd, &wd, &mut yd, shape).unwrap();
        check(
            &format!("conv2d {shape:?}"),
            s.clone_dtoh(&yd).unwrap(),
            &want,
            2e-3,
        );
    }
}

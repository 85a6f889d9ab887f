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

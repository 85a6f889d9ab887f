//! The CUDA executor against the CPU reference executor, op by op over every shape class the
//! models use (ggml test-backend-ops style), then the tiny models whole (also against the
//! PyTorch goldens). Each case runs eagerly and again replayed from a captured CUDA graph.
//! Without a CUDA driver the GPU tests say SKIPPED and pass (CI has no GPU; the GPU machine runs
//! them through scripts/device/test.sh); the lowering test runs everywhere.
// Case tables and graph helpers mirror the ops' parameter lists.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

use std::path::{Path, PathBuf};

use half::f16;
use lipstream_engines::models::config::{self, UNetConfig, VaeConfig, WhisperConfig};
use lipstream_engines::models::{unet, vae, whisper};
use lipstream_engines::weights::{Checkpoint, Weights};
use lipstream_engines::{cpu, Graph, Op, Tensor, ValueId};
use lipstream_gpu::device::{libraries, Device};
use lipstream_gpu::plan::{self, Step};
use lipstream_gpu::{
    ConvAsGemm, ConvGraphs, Executor, FuseConv, NormedConvs, Options, Runtime, ThinConvs,
};

fn runtime() -> Option<Runtime> {
    let libs = libraries();
    if !libs.driver || !libs.nvrtc || !libs.cudnn || !libs.cublaslt {
        eprintln!("SKIPPED: no CUDA driver/libraries here ({libs:?})");
        return None;
    }
    let dev = Device::open(0).expect("a CUDA driver is present, so GPU 0 must open");
    Some(Runtime::new(dev).expect("kernels compile and libraries load"))
}

fn random(shape: &[usize], seed: u32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // f16-exact values in [-scale, scale].
            f16::from_f32(((s as f32 / u32::MAX as f32) * 2.0 - 1.0) * scale).to_f32()
        })
        .collect();
    Tensor::new(shape.to_vec(), data)
}

/// Runs `g` on both executors (CUDA eagerly, then from a captured graph) and compares, with
/// convolution epilogues on our kernel, then on cuDNN's fused call wherever it runs, then with
/// every convolution the lowering takes as im2col + cuBLASLt GEMM, then on cuDNN's graph-API
/// engines wherever one runs, then on our thin-convolution kernels, then with every convolution
/// to 8 outputs of a group norm normalising the norm's input itself; returns how many
/// convolutions the second build fused.
fn compare(rt: &mut Runtime, name: &str, g: &Graph, inputs: &[(&str, &Tensor)], tol: f64) -> usize {
    let want = cpu::run(g, inputs).unwrap();
    let fused_opts = Options {
        fuse: FuseConv::Always,
        ..Options::HEURISTIC
    };
    let gemm_opts = Options {
        gemm: ConvAsGemm::Always,
        ..Options::HEURISTIC
    };
    let graph_opts = Options {
        graphs: ConvGraphs::Always,
        ..Options::HEURISTIC
    };
    let mma_opts = |rows| Options {
        mma: ThinConvs::Always { rows },
        ..Options::HEURISTIC
    };
    let normed_opts = Options {
        normed: NormedConvs::Always,
        ..Options::HEURISTIC
    };
    let mut fused = 0;
    let builds = [
        (Options::HEURISTIC, "plain"),
        (fused_opts, "fused"),
        (gemm_opts, "gemm"),
        (graph_opts, "graph"),
        (mma_opts(1), "mma1"),
        (mma_opts(2), "mma2"),
        (normed_opts, "normed"),
    ];
    for (opts, how) in builds {
        let mut ex =
            Executor::new(rt, g, name, opts).unwrap_or_else(|e| panic!("{name} ({how}): {e}"));
        if how == "fused" {
            fused = ex.fused_convs().0;
            if fused == 0 {
                continue;
            }
        }
        if how == "gemm" && ex.gemm_convs().0 == 0 {
            continue;
        }
        if how == "graph" && ex.graph_convs().0 == 0 {
            continue;
        }
        if how.starts_with("mma") && ex.mma_convs().0 == 0 {
            continue;
        }
        if how == "normed" && ex.normed_convs() == 0 {
            continue;
        }
        for captured in [false, true] {
            if captured {
                ex.capture(rt)
                    .unwrap_or_else(|e| panic!("{name}: capture: {e}"));
            }
            let got = ex
                .run_f32(rt, inputs)
                .unwrap_or_else(|e| panic!("{name} ({how}): {e}"));
            for ((n, a), (_, b)) in got.iter().zip(&want) {
                assert_eq!(a.shape, b.shape, "{name}/{n}");
                let err = a.rel_l2(b);
                println!(
                    "{name:<44} {n:<16} {how} {} rel L2 {err:.2e}",
                    if captured { "graph" } else { "eager" }
                );
                assert!(
                    err <= tol,
                    "{name}/{n} ({how}): relative L2 {err:.3e} > {tol:e}"
                );
            }
        }
    }
    fused
}

fn konst(g: &mut Graph, name: &str, shape: &[usize], seed: u32, scale: f32) -> ValueId {
    g.constant(name, random(shape, seed, scale))
}

fn conv(
    g: &mut Graph,
    x: ValueId,
    c: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: [usize; 4],
    seed: u32,
) -> ValueId {
    let w = konst(
        g,
        &format!("w{seed}"),
        &[o, c, k, k],
        seed,
        1.0 / ((c * k * k) as f32).sqrt(),
    );
    let b = konst(g, &format!("b{seed}"), &[o], seed + 1, 0.5);
    g.push(
        &format!("conv{seed}"),
        Op::Conv2d {
            stride: [stride; 2],
            padding: pad,
            groups: 1,
        },
        &[x, w, b],
    )
    .unwrap()
}

#[test]
fn convolutions_match() {
    let Some(mut rt) = runtime() else { return };
    // (input shape, out channels, kernel, stride, padding): UNet conv_in, a 3x3 at 320, the
    // stride-2 downsampler, a 1x1 shortcut, the VAE's 3x3 at 256x256, its asymmetric stride-2
    // pads, conv_in on RGB and conv_out to RGB; the UNet's innermost 3x3s (filter-bound at
    // B=1, where the lowering to im2col + GEMM pays) and its stride-2 one onto them.
    let cases: [(&[usize], usize, usize, usize, [usize; 4]); 12] = [
        (&[1, 1280, 4, 4], 1280, 3, 1, [1; 4]),
        (&[2, 640, 8, 8], 1280, 3, 2, [1; 4]),
        (&[1, 8, 32, 32], 320, 3, 1, [1; 4]),
        (&[2, 320, 32, 32], 320, 3, 1, [1; 4]),
        (&[2, 320, 32, 32], 320, 3, 2, [1; 4]),
        (&[2, 640, 16, 16], 320, 1, 1, [0; 4]),
        (&[1, 128, 256, 256], 128, 3, 1, [1; 4]),
        (&[1, 128, 64, 64], 128, 3, 2, [0, 0, 1, 1]),
        // The padding copy 8 channels at a time over a batch, and one channel at a time.
        (&[3, 256, 32, 32], 256, 3, 2, [0, 0, 1, 1]),
        (&[2, 12, 16, 16], 8, 3, 2, [0, 0, 1, 1]),
        (&[2, 3, 64, 64], 128, 3, 1, [1; 4]),
        (&[1, 128, 64, 64], 3, 3, 1, [1; 4]),
    ];
    for (i, (shape, o, k, stride, pad)) in cases.iter().enumerate() {
        let mut g = Graph::new();
        let x = g.input("x", shape);
        let y = conv(&mut g, x, shape[1], *o, *k, *stride, *pad, 10 * i as u32);
        g.output("y", y);
        let xt = random(shape, i as u32, 1.0);
        compare(
            &mut rt,
            &format!("conv2d {shape:?}->{o} k{k} s{stride} {pad:?}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
        if pad[0] != pad[2] {
            // compare's "graph" build ran the convolution padding itself where cuDNN has an
            // engine for it: which it did is worth a line in the log.
            let graph_opts = Options {
                graphs: ConvGraphs::Always,
                ..Options::HEURISTIC
            };
            let ex = Executor::new(&mut rt, &g, "pad", graph_opts).unwrap();
            println!(
                "conv2d {shape:?}->{o} {pad:?}: pads itself on a graph-API engine: {}",
                ex.padding_convs().0 == 1
            );
        }
    }
}

/// The VAE encoder's downsamplers pad (0, 1) and convolve with stride 2, as a pad step and a
/// convolution: the convolution knows its pad step's input (`PadInput`), which lives through
/// the convolution's step, so that a graph-API convolution padding itself can read it.
#[test]
fn a_padded_convolution_knows_its_unpadded_input() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 128, 16, 16]);
    let a = conv(&mut g, x, 128, 128, 3, 1, [1; 4], 1);
    let y = conv(&mut g, a, 128, 128, 3, 2, [0, 0, 1, 1], 2);
    g.output("y", y);
    let p = plan::lower(&g, "").unwrap();
    let pads: Vec<usize> = (0..p.steps.len())
        .filter(|&s| plan::PadInput::of(&p.steps, s).is_some())
        .collect();
    assert_eq!(pads.len(), 1, "one convolution reads a pad step's output");
    let s = pads[0];
    assert!(matches!(p.steps[s - 1], Step::Pad { .. }));
    let input = plan::PadInput::of(&p.steps, s).unwrap();
    assert_eq!((input.nhwc, input.pad), ([2, 16, 16, 128], [0, 0, 1, 1]));
    let Step::Conv { shape, .. } = &p.steps[s] else {
        panic!("step {s} is the convolution");
    };
    let own = input.conv_shape(shape);
    assert_eq!(
        (own.h, own.w, own.pad, own.post_pad()),
        (16, 16, [0, 0], [1, 1])
    );
    assert_eq!(own.out_hw(), (8, 8));
    assert_eq!(own.out_hw(), shape.out_hw());
    // The first convolution's output, the pad's input, must outlive the padded convolution.
    let plan::Loc::Arena(b, _) = input.x else {
        panic!("the pad reads an arena buffer");
    };
    assert_eq!(p.lifetimes[b].last, s);
}

/// Thin convolutions on the library path and on our tensor-core kernels (which the engine build
/// picks per kind when they time faster): to 3 and 4 channels (padded to 8), as the VAE's and the
/// UNet's conv_out, and from 1 to 3 channels, as the VAE encoder's conv_in on RGB, at row widths
/// that end in a partial 16-pixel tile and an odd image height; from RGB also with a group norm
/// after it, whose sums the convolution step leaves.
/// A 32-group norm of `x` ([n, c, h, w]) named "norm", gamma and beta random from `seeds`.
fn group_norm(
    g: &mut Graph,
    x: ValueId,
    c: usize,
    seeds: (u32, u32),
    eps: f32,
    silu: bool,
) -> ValueId {
    let gm = konst(g, "gamma", &[c], seeds.0, 1.0);
    let bt = konst(g, "beta", &[c], seeds.1, 0.5);
    g.push(
        "norm",
        Op::GroupNorm {
            groups: 32,
            eps,
            silu,
        },
        &[x, gm, bt],
    )
    .unwrap()
}

#[test]
fn thin_convolutions_match() {
    let cases: [(&[usize], usize); 8] = [
        (&[1, 128, 33, 33], 3),
        (&[2, 128, 64, 64], 3),
        (&[2, 320, 16, 16], 4),
        (&[1, 256, 8, 40], 3),
        (&[2, 3, 65, 67], 128),
        (&[1, 3, 70, 75], 128),
        (&[2, 1, 17, 20], 8),
        (&[1, 2, 9, 40], 24),
    ];
    let graphs: Vec<Graph> = cases
        .iter()
        .enumerate()
        .map(|(i, (shape, o))| thin_graph(i as u32, shape, *o))
        .collect();
    let Some(mut rt) = runtime() else { return };
    for (i, ((shape, o), g)) in cases.iter().zip(&graphs).enumerate() {
        for (mma, want) in [
            (ThinConvs::Never, 0),
            (ThinConvs::Always { rows: 1 }, 1),
            (ThinConvs::Always { rows: 2 }, 1),
        ] {
            let opts = Options {
                mma,
                ..Options::HEURISTIC
            };
            let ex = Executor::new(&mut rt, g, "thin", opts).unwrap();
            assert_eq!(ex.mma_convs(), (want, 1), "{shape:?} -> {o} ({mma:?})");
        }
        let xt = random(shape, 100 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("thin conv {shape:?}->{o}"),
            g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

/// Case `i` of `thin_convolutions_match`: one 3x3 convolution of `shape` to `o` channels. From
/// RGB to 32-channel groups it is the VAE encoder's conv_in, and the resnet norm after it is
/// returned too: the convolution step then also leaves the norm's sums (checked here, so that
/// the kernels are tested with them; the images are large enough for the norm's two-pass form,
/// which takes its sums from the convolution).
fn thin_graph(i: u32, shape: &[usize], o: usize) -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", shape);
    let y = conv(&mut g, x, shape[1], o, 3, 1, [1; 4], 90 + 2 * i);
    g.output("y", y);
    if shape[1] <= 3 && o.is_multiple_of(32) {
        let h = group_norm(&mut g, y, o, (60 + i, 70 + i), 1e-6, true);
        g.output("h", h);
        let p = plan::lower(&g, "thin").unwrap();
        let sums = p
            .steps
            .iter()
            .any(|s| matches!(s, Step::Conv { stats: Some(_), .. }));
        assert!(
            sums,
            "{shape:?} -> {o}: the norm's sums ride on the convolution"
        );
    }
    g
}

/// Group norm + SiLU into a 3x3 convolution, as the resnets' at the UNet's small stages: with
/// LIPSTREAM_NORM_COLS=1 (an experiment, scripts/device/test.sh EXPERIMENTS=1) the norm writes
/// the convolution's im2col patches itself wherever the convolution runs as im2col + GEMM and
/// reads nothing else of the norm, which is checked, and must match the CPU executor.
#[test]
fn norms_writing_convolution_patches_match() {
    let Some(mut rt) = runtime() else { return };
    let on = lipstream_gpu::kernels::Experiment::NormCols.on();
    // (input, out channels, kernel, norm also an output): 16-byte vectors (40 and 80 channels
    // a group: taken), 4-byte ones (10 and 20, two images: left to im2col, where the scatter
    // cost more than it saved), a 1x1 convolution (no patches), a norm the graph also returns
    // (it must be written).
    let cases: [(&[usize], usize, usize, bool); 6] = [
        (&[1, 1280, 4, 4], 1280, 3, false),
        (&[1, 320, 16, 16], 320, 3, false),
        (&[2, 640, 8, 8], 640, 3, false),
        (&[1, 2560, 8, 8], 1280, 3, false),
        (&[1, 640, 8, 8], 320, 1, false),
        (&[1, 1280, 4, 4], 1280, 3, true),
    ];
    let gemm = Options {
        gemm: ConvAsGemm::Always,
        ..Options::HEURISTIC
    };
    for (i, (shape, o, k, norm_out)) in cases.iter().enumerate() {
        let c = shape[1];
        let mut g = Graph::new();
        let x = g.input("x", shape);
        let seeds = (700 + i as u32, 710 + i as u32);
        let h = group_norm(&mut g, x, c, seeds, 1e-5, true);
        let pad = [k / 2; 4];
        let y = conv(&mut g, h, c, *o, *k, 1, pad, 720 + 10 * i as u32);
        g.output("y", y);
        if *norm_out {
            g.output("h", h);
        }
        let ex = Executor::new(&mut rt, &g, "norm_cols", gemm).unwrap();
        let lowered = ex.gemm_convs().0 == 1;
        let wide = (c / 32).is_multiple_of(8);
        let want = usize::from(on && lowered && wide && *k == 3 && !norm_out);
        assert_eq!(ex.norms_to_cols(), want, "{shape:?} -> {o} k{k}");
        let xt = random(shape, 730 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("norm -> conv {shape:?}->{o} k{k} out={norm_out}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

/// Group norm (+ SiLU) into a convolution to 3 or 4 outputs, as the VAE decoder's norm_out ->
/// conv_out and the UNet's: where the norm takes its two-pass form and nothing else reads it,
/// the plan keeps its input and statistics alive through the convolution (`NormInput`, checked
/// everywhere), and the convolution may normalise the norm's input itself (`NormedConvs`:
/// wherever it fits, and by default where the grid is large), which must match the CPU
/// executor (`compare`'s "normed" build).
#[test]
fn convolutions_normalising_their_input_match() {
    // (input, outputs, SiLU, a convolution before the norm (which then takes its sums from
    // that convolution's epilogue), norm also an output, normalised by the convolution).
    let cases: [(&[usize], usize, bool, bool, bool, bool); 8] = [
        (&[2, 128, 128, 128], 3, true, false, false, true),
        (&[2, 128, 128, 128], 3, true, true, false, true),
        (&[1, 128, 100, 70], 3, true, false, false, true),
        (&[2, 128, 128, 128], 3, false, false, false, true),
        (&[2, 320, 64, 96], 4, true, false, false, true),
        // A norm the graph returns is written; a one-launch norm has no statistics to share;
        // an image narrower than a block's warps stays on the norm's pass.
        (&[2, 128, 128, 128], 3, true, false, true, false),
        (&[1, 128, 64, 64], 3, true, false, false, false),
        (&[8, 320, 32, 32], 4, true, false, false, false),
    ];
    let mut graphs = Vec::new();
    for (i, (shape, o, silu, pre, norm_out, want)) in cases.iter().enumerate() {
        let c = shape[1];
        let i = i as u32;
        let mut g = Graph::new();
        let mut x = g.input("x", shape);
        if *pre {
            x = conv(&mut g, x, c, c, 3, 1, [1; 4], 800 + 10 * i);
        }
        let h = group_norm(&mut g, x, c, (860 + i, 870 + i), 1e-6, *silu);
        let y = conv(&mut g, h, c, *o, 3, 1, [1; 4], 880 + 10 * i);
        g.output("y", y);
        if *norm_out {
            g.output("h", h);
        }
        let p = plan::lower(&g, "normed").unwrap();
        let found: Vec<(usize, plan::NormInput)> = (0..p.steps.len())
            .filter_map(|s| plan::NormInput::of(&p.steps, &p.outputs, s).map(|n| (s, n)))
            .collect();
        assert_eq!(found.len(), usize::from(*want), "{shape:?} -> {o}");
        for (s, n) in &found {
            // The norm's input and scratch outlive the convolution's step.
            for l in [n.x, n.scratch] {
                if let plan::Loc::Arena(b, _) = l {
                    assert!(
                        p.lifetimes[b].last >= *s,
                        "{shape:?}: buffer {b} dies early"
                    );
                }
            }
            assert_eq!(
                n.shape.fused_chunks > 0,
                *pre,
                "{shape:?}: sums from the epilogue"
            );
        }
        graphs.push(g);
    }
    let Some(mut rt) = runtime() else { return };
    for (i, ((shape, o, silu, pre, norm_out, want), g)) in cases.iter().zip(&graphs).enumerate() {
        let always = Options {
            normed: NormedConvs::Always,
            ..Options::HEURISTIC
        };
        let ex = Executor::new(&mut rt, g, "normed", always).unwrap();
        assert_eq!(ex.normed_convs(), usize::from(*want), "{shape:?} -> {o}");
        // These grids are too small to pay by default.
        let ex = Executor::new(&mut rt, g, "normed", Options::HEURISTIC).unwrap();
        assert_eq!(ex.normed_convs(), 0, "{shape:?} -> {o} (by default)");
        let xt = random(shape, 890 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("norm -> conv {shape:?}->{o} silu={silu} pre={pre} out={norm_out}"),
            g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

/// Large group norms (+ SiLU), the VAE's 64x64 .. 256x256 images, in the split form (sums,
/// often in the producing convolution's epilogue; statistics; apply): 128 and 256 channels at
/// 256x256, a last chunk part full (100x70), groups of 10 channels (320), with and without a
/// convolution before the norm.
#[test]
fn large_group_norms_match() {
    // (images, channels, height, width, a convolution from 8 channels before the norm, SiLU).
    let cases: [(usize, usize, usize, usize, bool, bool); 6] = [
        (2, 128, 256, 256, true, true),
        (1, 256, 256, 256, false, true),
        (3, 256, 128, 128, true, false),
        (2, 512, 64, 64, true, true),
        (1, 128, 100, 70, false, true),
        (2, 320, 64, 96, true, true),
    ];
    let Some(mut rt) = runtime() else { return };
    for (i, &(n, c, h, w, pre, silu)) in cases.iter().enumerate() {
        let i = i as u32;
        let mut g = Graph::new();
        let shape = [n, if pre { 8 } else { c }, h, w];
        let mut x = g.input("x", &shape);
        if pre {
            x = conv(&mut g, x, 8, c, 3, 1, [1; 4], 900 + 10 * i);
        }
        let y = group_norm(&mut g, x, c, (960 + i, 970 + i), 1e-6, silu);
        g.output("y", y);
        let xt = random(&shape, 990 + i, 1.0);
        compare(
            &mut rt,
            &format!("large norm [{n}, {c}, {h}, {w}] pre={pre} silu={silu}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

#[test]
fn fused_epilogues_and_layouts_match() {
    let Some(mut rt) = runtime() else { return };
    let xt = random(&[2, 64, 16, 16], 1, 1.0);
    // resnet: conv + residual (fused), conv_shortcut fused with the other branch, time-embedding
    // constant folded into the bias, group norm + SiLU, upsample, concat on channels, slice.
    let mut g = Graph::new();
    let x = g.input("x", &[2, 64, 16, 16]);
    let h = conv(&mut g, x, 64, 64, 3, 1, [1; 4], 1);
    let temb = konst(&mut g, "temb", &[2, 64, 1, 1], 3, 1.0);
    let h = g.push("temb_add", Op::Add, &[h, temb]).unwrap();
    let gm = konst(&mut g, "gamma", &[64], 4, 1.0);
    let bt = konst(&mut g, "beta", &[64], 5, 0.5);
    let h = g
        .push(
            "gn",
            Op::GroupNorm {
                groups: 32,
                eps: 1e-5,
                silu: true,
            },
            &[h, gm, bt],
        )
        .unwrap();
    let h2 = conv(&mut g, h, 64, 64, 3, 1, [1; 4], 6);
    let r = g.push("residual", Op::Add, &[x, h2]).unwrap();
    let sc = conv(&mut g, r, 64, 96, 1, 1, [0; 4], 8);
    let h3 = conv(&mut g, r, 64, 96, 3, 1, [1; 4], 10);
    let r2 = g.push("residual2", Op::Add, &[sc, h3]).unwrap();
    let up = g.push("up", Op::UpsampleNearest2x, &[r2]).unwrap();
    let c2 = conv(&mut g, up, 96, 32, 3, 1, [1; 4], 12);
    let skip = g.push("skip_up", Op::UpsampleNearest2x, &[x]).unwrap();
    let cat = g.push("cat", Op::Concat { axis: 1 }, &[c2, skip]).unwrap();
    let sl = g
        .push(
            "slice",
            Op::Slice {
                axis: 1,
                start: 8,
                end: 40,
            },
            &[cat],
        )
        .unwrap();
    let bias = konst(&mut g, "chan_bias", &[32, 1, 1], 14, 1.0);
    let m = g.push("mul", Op::Mul, &[sl, bias]).unwrap();
    let s = g.push("silu", Op::Silu, &[m]).unwrap();
    g.output("y", s);
    g.output("residual", r);
    let fused = compare(&mut rt, "resnet-like block", &g, &[("x", &xt)], 5e-3);
    // The time embedding makes conv 1's bias per image (not cuDNN's), the upsampling conv adds
    // its bias in the interleave; the two residual convolutions take cuDNN's fused call.
    assert!(
        fused >= 2,
        "cuDNN's fused call ran for {fused} convolutions"
    );

    // Group norms that take their sums from the producing convolution's epilogue: 4 and 8
    // channels per group, after a bias, after a bias + residual, and one whose input is also
    // read elsewhere (groups too large for the one-launch norm, which sums its own input).
    let xt2 = random(&[1, 64, 96, 96], 2, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[1, 64, 96, 96]);
    let a = conv(&mut g, x, 64, 128, 3, 1, [1; 4], 30);
    let gm = konst(&mut g, "g1", &[128], 31, 1.0);
    let bt = konst(&mut g, "b1", &[128], 32, 0.5);
    let n1 = g
        .push(
            "gn1",
            Op::GroupNorm {
                groups: 32,
                eps: 1e-6,
                silu: true,
            },
            &[a, gm, bt],
        )
        .unwrap();
    let b = conv(&mut g, n1, 128, 128, 3, 1, [1; 4], 33);
    let r = g.push("res", Op::Add, &[a, b]).unwrap();
    let c = conv(&mut g, r, 128, 256, 3, 1, [1; 4], 35);
    let gm2 = konst(&mut g, "g2", &[256], 36, 1.0);
    let bt2 = konst(&mut g, "b2", &[256], 37, 0.5);
    let n2 = g
        .push(
            "gn2",
            Op::GroupNorm {
                groups: 32,
                eps: 1e-6,
                silu: false,
            },
            &[c, gm2, bt2],
        )
        .unwrap();
    g.output("y", n2);
    g.output("c", c);
    let p = plan::lower(&g, "").unwrap();
    let fused = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::GroupNorm { shape, .. } if shape.fused_chunks > 0))
        .count();
    assert_eq!(fused, 2, "both norms take the epilogue's sums");
    compare(
        &mut rt,
        "group norms on epilogue sums",
        &g,
        &[("x", &xt2)],
        5e-3,
    );

    // transformer plumbing: NCHW -> tokens (free in NHWC), layer norm, linear + residual,
    // GEGLU, gelu, tokens -> NCHW, and a 5-d permute like the camera step's latent stacking.
    let mut g = Graph::new();
    let x = g.input("x", &[2, 64, 16, 16]);
    let c = conv(&mut g, x, 64, 64, 1, 1, [0; 4], 20);
    let t = g
        .push(
            "nhwc",
            Op::Permute {
                perm: vec![0, 2, 3, 1],
            },
            &[c],
        )
        .unwrap();
    let t = g
        .push(
            "tokens",
            Op::Reshape {
                shape: vec![2, 256, 64],
            },
            &[t],
        )
        .unwrap();
    let gm = konst(&mut g, "ln.g", &[64], 21, 1.0);
    let bt = konst(&mut g, "ln.b", &[64], 22, 0.5);
    let n = g
        .push("ln", Op::LayerNorm { eps: 1e-5 }, &[t, gm, bt])
        .unwrap();
    let w = konst(&mut g, "ff.w", &[256, 64], 23, 0.125);
    let b = konst(&mut g, "ff.b", &[256], 24, 0.5);
    let f = g.push("ff", Op::Linear, &[n, w, b]).unwrap();
    let f = g.push("geglu", Op::Geglu, &[f]).unwrap();
    let w2 = konst(&mut g, "ff2.w", &[64, 128], 25, 0.09);
    let f = g.push("ff2", Op::Linear, &[f, w2]).unwrap();
    let t = g.push("ff.residual", Op::Add, &[f, t]).unwrap();
    let t = g.push("gelu", Op::Gelu, &[t]).unwrap();
    let t = g
        .push(
            "nhwc2",
            Op::Reshape {
                shape: vec![2, 16, 16, 64],
            },
            &[t],
        )
        .unwrap();
    let y = g
        .push(
            "nchw",
            Op::Permute {
                perm: vec![0, 3, 1, 2],
            },
            &[t],
        )
        .unwrap();
    let y = g
        .push(
            "affine",
            Op::Affine {
                scale: 0.5,
                shift: 0.5,
            },
            &[y],
        )
        .unwrap();
    let y = g
        .push("clamp", Op::Clamp { min: 0.0, max: 1.0 }, &[y])
        .unwrap();
    let z = g
        .push(
            "split",
            Op::Reshape {
                shape: vec![2, 1, 64, 16, 16],
            },
            &[y],
        )
        .unwrap();
    let z = g
        .push(
            "stack",
            Op::Permute {
                perm: vec![1, 0, 2, 3, 4],
            },
            &[z],
        )
        .unwrap();
    g.output("y", y);
    g.output("stacked", z);
    compare(&mut rt, "transformer plumbing", &g, &[("x", &xt)], 5e-3);
}

/// An upsample, a 3x3 convolution of it and the group norm + resnet that read the result, as in
/// the VAE decoder's up blocks: the graph the small-image lowering changes most.
fn upsampling_block(n: usize, c: usize, o: usize, hw: usize) -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", &[n, c, hw, hw]);
    let up = g.push("up", Op::UpsampleNearest2x, &[x]).unwrap();
    let u = conv(&mut g, up, c, o, 3, 1, [1; 4], 40);
    let gm = konst(&mut g, "g", &[o], 41, 1.0);
    let bt = konst(&mut g, "b", &[o], 42, 0.5);
    let nrm = g
        .push(
            "gn",
            Op::GroupNorm {
                groups: 32,
                eps: 1e-6,
                silu: true,
            },
            &[u, gm, bt],
        )
        .unwrap();
    let h = conv(&mut g, nrm, o, o, 3, 1, [1; 4], 43);
    let r = g.push("res", Op::Add, &[u, h]).unwrap();
    g.output("y", r);
    g
}

/// Runs everywhere: a 3x3 convolution of a nearest 2x upsample equals the 2x2 convolution of the
/// small image with `subpixel_filters` (padding 1, four parities side by side) read back at
/// (i + py, j + px), on the CPU executor in f32; and such a pair lowers to that convolution and
/// one interleave that also sums the groups for the norm after it, with no upsampled image.
#[test]
fn concatenations_match() {
    let Some(mut rt) = runtime() else { return };
    // Channel concatenations of convolution outputs (channels-last rows): three parts of whole
    // 16-byte vectors (one launch), widths of 3 and 5 channels (row copies), and five parts
    // (more than one launch takes).
    let xt = random(&[2, 8, 6, 6], 40, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[2, 8, 6, 6]);
    let widths = [16, 8, 24, 3, 5];
    let outs: Vec<_> = widths
        .iter()
        .enumerate()
        .map(|(i, &o)| conv(&mut g, x, 8, o, 3, 1, [1; 4], 41 + i as u32))
        .collect();
    let three = g.push("cat3", Op::Concat { axis: 1 }, &outs[..3]).unwrap();
    let odd = g
        .push("cat_odd", Op::Concat { axis: 1 }, &outs[3..])
        .unwrap();
    let five = g.push("cat5", Op::Concat { axis: 1 }, &outs).unwrap();
    g.output("three", three);
    g.output("odd", odd);
    g.output("five", five);
    compare(&mut rt, "concatenations", &g, &[("x", &xt)], 5e-3);
}

#[test]
fn upsampling_convolutions_run_on_the_small_image() {
    let (n, c, o, hw) = (2, 16, 24, 5);
    let x = random(&[n, c, hw, hw], 50, 1.0);
    let w = random(&[o, c, 3, 3], 51, 0.3);
    let b = random(&[o], 52, 0.5);
    let mut g = Graph::new();
    let xi = g.input("x", &[n, c, hw, hw]);
    let up = g.push("up", Op::UpsampleNearest2x, &[xi]).unwrap();
    let (wc, bc) = (g.constant("w", w.clone()), g.constant("b", b.clone()));
    let conv3 = Op::Conv2d {
        stride: [1, 1],
        padding: [1; 4],
        groups: 1,
    };
    let y = g.push("conv", conv3.clone(), &[up, wc, bc]).unwrap();
    g.output("y", y);
    let want = cpu::run(&g, &[("x", &x)]).unwrap().remove(0).1;

    let mut small = Graph::new();
    let xi = small.input("x", &[n, c, hw, hw]);
    let w4 = small.constant("w4", plan::subpixel_filters(&w));
    let t = small.push("conv2x2", conv3, &[xi, w4]).unwrap();
    small.output("t", t);
    let t = cpu::run(&small, &[("x", &x)]).unwrap().remove(0).1;
    assert_eq!(t.shape, vec![n, 4 * o, hw + 1, hw + 1]);
    let (h2, s1) = (2 * hw, hw + 1);
    let mut got = vec![0.0f32; n * o * h2 * h2];
    for img in 0..n {
        for oc in 0..o {
            for oy in 0..h2 {
                for ox in 0..h2 {
                    let (py, px) = (oy % 2, ox % 2);
                    let ch = (2 * py + px) * o + oc;
                    let src = ((img * 4 * o + ch) * s1 + oy / 2 + py) * s1 + ox / 2 + px;
                    got[((img * o + oc) * h2 + oy) * h2 + ox] = t.data[src] + b.data[oc];
                }
            }
        }
    }
    let err = Tensor::new(want.shape.clone(), got).rel_l2(&want);
    assert!(
        err < 1e-5,
        "small-image convolution differs: rel L2 {err:e}"
    );

    // 128 channels: four per group, which the interleave can sum (at an image whose groups
    // are too large for the one-launch norm, which sums its own input).
    let g = upsampling_block(2, 128, 128, 48);
    let p = plan::lower(&g, "").unwrap();
    let upsamples = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Upsample { .. }))
        .count();
    let subpixel = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Subpixel { stats: Some(_), .. }))
        .count();
    let small_conv = p.steps.iter().any(|s| {
        matches!(s, Step::Conv { shape, .. }
            if shape.kh == 2 && shape.o == 4 * 128 && shape.h == 48 && shape.pad == [1, 1])
    });
    assert_eq!(
        (upsamples, subpixel, small_conv),
        (0, 1, true),
        "{:#?}",
        p.steps.iter().map(|s| s.describe()).collect::<Vec<_>>()
    );
}

#[test]
fn upsampling_convolutions_match() {
    let Some(mut rt) = runtime() else { return };
    // Group sums in the interleave (4 and 8 channels per group), without (2 per group), a batch,
    // an odd side.
    for (n, c, o, hw) in [(1, 128, 128, 16), (3, 96, 64, 7), (2, 256, 256, 8)] {
        let g = upsampling_block(n, c, o, hw);
        let xt = random(&[n, c, hw, hw], 60 + n as u32, 1.0);
        compare(
            &mut rt,
            &format!("upsample + conv {n}x{c}x{hw}x{hw} -> {o}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

#[test]
fn norms_attention_and_linears_match() {
    let Some(mut rt) = runtime() else { return };
    for (i, (shape, groups, silu)) in [
        (vec![2, 320, 32, 32], 32, true),
        // One image: on sm_90 each group splits over a cluster of 4 blocks
        // (256 pixels of 10 channels a block; 16 of 40); the 4x4 image keeps one block a group.
        (vec![1, 320, 32, 32], 32, true),
        (vec![1, 1280, 8, 8], 32, false),
        (vec![1, 1280, 4, 4], 32, true),
        (vec![1, 128, 256, 256], 32, false),
        (vec![2, 2560, 8, 8], 32, true),
        (vec![1, 512, 32, 32], 32, false),
        // Fewer than 8 channels per vector: the two-channel one-launch kernel, and the
        // two-channel apply kernel of a group too large for one launch.
        (vec![2, 12, 16, 16], 2, true),
        (vec![1, 12, 64, 64], 2, false),
        // One launch at 8 channels a group, and just past its limit (2 x 16384 elements).
        (vec![2, 256, 32, 32], 32, true),
        (vec![2, 512, 32, 64], 32, false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut g = Graph::new();
        let x = g.input("x", &shape);
        let gm = konst(&mut g, "g", &[shape[1]], 30 + i as u32, 1.0);
        let bt = konst(&mut g, "b", &[shape[1]], 40 + i as u32, 0.5);
        let y = g
            .push(
                "gn",
                Op::GroupNorm {
                    groups,
                    eps: 1e-6,
                    silu,
                },
                &[x, gm, bt],
            )
            .unwrap();
        g.output("y", y);
        let mut xt = random(&shape, 50 + i as u32, 2.0);
        // An offset mean, as activations have, checks the statistics' numerics.
        xt.data
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v + 3.0).to_f32());
        compare(
            &mut rt,
            &format!("group_norm {shape:?} silu={silu}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
    // Layer norms: eight columns per load (the UNet's widest rows, whisper's), and a width that
    // takes the two-byte path; offset means, as activations have.
    for (i, shape) in [[2, 64, 1280], [1, 1500, 384], [3, 5, 30]]
        .into_iter()
        .enumerate()
    {
        let cols = shape[2];
        let mut g = Graph::new();
        let x = g.input("x", &shape);
        let gm = konst(&mut g, "g", &[cols], 60 + i as u32, 1.0);
        let bt = konst(&mut g, "b", &[cols], 70 + i as u32, 0.5);
        let y = g
            .push("ln", Op::LayerNorm { eps: 1e-5 }, &[x, gm, bt])
            .unwrap();
        g.output("y", y);
        let mut xt = random(&shape, 80 + i as u32, 2.0);
        xt.data
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v + 3.0).to_f32());
        compare(
            &mut rt,
            &format!("layer_norm {shape:?}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
    for (i, (q, kv, heads)) in [
        ([2, 1024, 320], [2, 1024, 320], 8),
        // The same at 16 images.
        ([16, 1024, 320], [16, 1024, 320], 8),
        ([2, 1024, 320], [2, 50, 320], 8),
        ([1, 64, 1280], [1, 50, 1280], 8),
        ([2, 256, 640], [2, 256, 640], 8),
        ([2, 256, 640], [2, 50, 640], 8),
        // An odd key count: the fused kernel masks a partial key tile.
        ([2, 64, 320], [2, 49, 320], 8),
        // Head dim 4 takes the GEMM path and its three-pass softmax.
        ([2, 64, 32], [2, 49, 32], 8),
        ([1, 1024, 512], [1, 1024, 512], 1),
        // Whisper's window: the keys walked in 4 splits, then joined.
        ([1, 1500, 384], [1, 1500, 384], 6),
        // 8 splits, the last one a partial tile; 2 splits of head dim 80.
        ([1, 300, 384], [1, 1000, 384], 6),
        ([1, 64, 640], [1, 200, 640], 8),
        // Head dim 160 holds one key tile at a time (two do not fit): 4 tiles in 2 splits.
        ([1, 64, 1280], [1, 200, 1280], 8),
    ]
    .into_iter()
    .enumerate()
    {
        let mut g = Graph::new();
        let qi = g.input("q", &q);
        let ki = g.input("k", &kv);
        let vi = g.input("v", &kv);
        let o = g
            .push("attn", Op::Attention { heads }, &[qi, ki, vi])
            .unwrap();
        g.output("o", o);
        let (qt, kt, vt) = (
            random(&q, 60 + i as u32, 1.0),
            random(&kv, 70 + i as u32, 1.0),
            random(&kv, 80 + i as u32, 1.0),
        );
        compare(
            &mut rt,
            &format!("attention q{q:?} kv{kv:?} h{heads}"),
            &g,
            &[("q", &qt), ("k", &kt), ("v", &vt)],
            5e-3,
        );
    }
    for (i, (x, n, bias)) in [
        ([2, 1024, 320], 320, true),
        ([1, 50, 384], 320, false),
        ([1, 1500, 384], 1536, true),
        // 63 outputs: the GELU's one-element-per-thread form.
        ([1, 7, 24], 9, true),
    ]
    .into_iter()
    .enumerate()
    {
        let mut g = Graph::new();
        let xi = g.input("x", &x);
        let w = konst(
            &mut g,
            "w",
            &[n, x[2]],
            90 + i as u32,
            1.0 / (x[2] as f32).sqrt(),
        );
        let mut ins = vec![xi, w];
        if bias {
            ins.push(konst(&mut g, "b", &[n], 95 + i as u32, 0.5));
        }
        let y = g.push("linear", Op::Linear, &ins).unwrap();
        let y = g.push("gelu", Op::Gelu, &[y]).unwrap();
        g.output("y", y);
        let xt = random(&x, 100 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("linear {x:?}->{n} bias={bias}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
    for (i, (x, stride)) in [([1, 80, 3000], 1), ([1, 384, 3000], 2)]
        .into_iter()
        .enumerate()
    {
        let mut g = Graph::new();
        let xi = g.input("x", &x);
        let o = 384;
        let w = konst(
            &mut g,
            "w",
            &[o, x[1], 3],
            110 + i as u32,
            1.0 / ((3 * x[1]) as f32).sqrt(),
        );
        let b = konst(&mut g, "b", &[o], 115 + i as u32, 0.5);
        let y = g
            .push("conv1d", Op::Conv1d { stride, padding: 1 }, &[xi, w, b])
            .unwrap();
        let y = g
            .push(
                "perm",
                Op::Permute {
                    perm: vec![0, 2, 1],
                },
                &[y],
            )
            .unwrap();
        g.output("y", y);
        let xt = random(&x, 120 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("conv1d {x:?} s{stride}"),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

/// The tiny fixtures; LIPSTREAM_FIXTURES points there when the test binary runs on another
/// machine than the one that built it (scripts/device/test.sh).
fn fixtures() -> PathBuf {
    std::env::var_os("LIPSTREAM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny"))
}

fn golden(key: &str) -> Tensor {
    Checkpoint::open(&fixtures().join("golden.safetensors"))
        .unwrap()
        .load(key)
        .unwrap()
}

fn tiny_unet() -> Graph {
    let dir = fixtures().join("musetalkV15");
    let cfg: UNetConfig = config::read(&dir.join("musetalk.json")).unwrap();
    let weights = Weights::open(&dir.join("unet.pth")).unwrap();
    unet::build(&weights.root(""), &cfg, 2, 32).unwrap()
}

#[test]
fn tiny_models_match_the_cpu_executor_and_pytorch() {
    let Some(mut rt) = runtime() else { return };
    let (sample, ctx) = (golden("unet.sample"), golden("unet.encoder_hidden_states"));
    let g = tiny_unet();
    compare(
        &mut rt,
        "tiny unet",
        &g,
        &[("sample", &sample), ("encoder_hidden_states", &ctx)],
        1e-2,
    );
    let mut ex = Executor::new(&mut rt, &g, "unet", Options::TUNED).unwrap();
    ex.capture(&rt).unwrap();
    let got = ex
        .run_f32(
            &mut rt,
            &[("sample", &sample), ("encoder_hidden_states", &ctx)],
        )
        .unwrap();
    let err = got[0].1.rel_l2(&golden("unet.out"));
    println!("tiny unet vs diffusers (tuned algorithms, graph): rel L2 {err:.2e}");
    assert!(err <= 1e-2);

    let dir = fixtures().join("sd-vae");
    let cfg: VaeConfig = config::read(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let enc = vae::build_encoder(&weights.root(""), &cfg, 1, 128).unwrap();
    let dec = vae::build_decoder(&weights.root(""), &cfg, 1, 16).unwrap();
    compare(
        &mut rt,
        "tiny vae encoder",
        &enc,
        &[("image", &golden("vae.image"))],
        1e-2,
    );
    compare(
        &mut rt,
        "tiny vae decoder",
        &dec,
        &[("latent", &golden("vae.latent"))],
        1e-2,
    );
    let ex = Executor::new(&mut rt, &dec, "dec", Options::HEURISTIC).unwrap();
    let got = ex
        .run_f32(&mut rt, &[("latent", &golden("vae.latent"))])
        .unwrap();
    let err = got[0].1.rel_l2(&golden("vae.decoded"));
    println!("tiny vae decoder vs diffusers: rel L2 {err:.2e}");
    assert!(err <= 1e-2);

    let dir = fixtures().join("whisper");
    let cfg: WhisperConfig = config::read(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir.join("model.safetensors")).unwrap();
    let g = whisper::build(&weights.root("model.encoder"), &cfg, 1).unwrap();
    compare(
        &mut rt,
        "tiny whisper",
        &g,
        &[("input_features", &golden("whisper.input_features"))],
        1e-2,
    );
    // The encoder the server runs: two windows (the second quieter), the rows a hop reads
    // gathered on the device from each window's first row, one past the last start.
    let served = whisper::build_rows(
        &weights.root("model.encoder"),
        &cfg,
        2,
        whisper::SERVED_ROWS,
    )
    .unwrap();
    let one = golden("whisper.input_features");
    let mut shape = one.shape.clone();
    shape[0] = 2;
    let data = one
        .data
        .iter()
        .copied()
        .chain(one.data.iter().map(|v| 0.5 * v - 0.5));
    let mel = Tensor::new(shape, data.collect());
    let first = Tensor::new(vec![2], vec![37.0, 1490.0]);
    compare(
        &mut rt,
        "tiny whisper, served rows",
        &served,
        &[("input_features", &mel), (whisper::FIRST_ROW, &first)],
        1e-2,
    );
}

/// Two batches queued back to back through pinned staging buffers (upload, replay, download,
/// no wait in between), as the renderer runs them: each set reads back its own batch's result
/// only once the GPU wrote it.
#[test]
fn staged_batches_queue_back_to_back_and_read_their_own_outputs() {
    let Some(mut rt) = runtime() else { return };
    let mut g = Graph::new();
    let x = g.input("x", &[4, 64, 128, 128]);
    let mut y = x;
    for i in 0..4 {
        y = conv(&mut g, y, 64, 64, 3, 1, [1; 4], 300 + 10 * i);
    }
    g.output("y", y);
    let mut ex = Executor::new(&mut rt, &g, "staged", Options::HEURISTIC).unwrap();
    ex.capture(&rt).unwrap();
    let inputs = [
        random(&[4, 64, 128, 128], 1, 1.0),
        random(&[4, 64, 128, 128], 2, 1.0),
    ];
    let wants: Vec<Tensor> = inputs
        .iter()
        .map(|x| cpu::run(&g, &[("x", x)]).unwrap().remove(0).1)
        .collect();
    let mut sets = [ex.staging(&rt).unwrap(), ex.staging(&rt).unwrap()];
    for round in 0..3 {
        for (set, input) in sets.iter_mut().zip(&inputs) {
            let dst = set.input_mut(0).unwrap();
            for (d, v) in dst.iter_mut().zip(&input.data) {
                *d = f16::from_f32(*v);
            }
            ex.upload(&mut rt, set).unwrap();
            ex.launch(&rt).unwrap();
            ex.download(&rt, set).unwrap();
        }
        for (i, (set, want)) in sets.iter().zip(&wants).enumerate() {
            let out = set.output(0).unwrap();
            let got = Tensor::new(want.shape.clone(), out.iter().map(|v| v.to_f32()).collect());
            let err = got.rel_l2(want);
            println!("staged round {round} set {i}: rel L2 {err:.2e}");
            assert!(err <= 5e-3, "set {i}: relative L2 {err:.3e}");
        }
    }
}

/// Runs everywhere: attention with the head dims the full-size models use lowers to the fused
/// kernel (no score matrix, no head-major copies); other head dims to the two GEMMs.
#[test]
fn attention_lowers_to_the_fused_kernel_for_model_head_dims() {
    for (width, heads, fused) in [
        (320, 8, true),
        (640, 8, true),
        (1280, 8, true),
        (384, 6, true),
        (512, 1, false),
        (32, 8, false),
    ] {
        let mut g = Graph::new();
        let q = g.input("q", &[2, 64, width]);
        let kv = g.input("kv", &[2, 50, width]);
        let o = g
            .push("attn", Op::Attention { heads }, &[q, kv, kv])
            .unwrap();
        g.output("o", o);
        let p = plan::lower(&g, "").unwrap();
        let flash = p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Attention { .. }))
            .count();
        let gemms = p
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Gemm { .. }))
            .count();
        assert_eq!(
            (flash, gemms),
            if fused { (1, 0) } else { (0, 2) },
            "width {width}, {heads} heads"
        );
    }
}

/// Runs everywhere: a plan's steps count the FLOPs of the graph's multiply-adds, so profiles
/// report true TFLOP/s: a 3x3 and a strided convolution, a linear layer and fused attention.
#[test]
fn plan_steps_count_the_graphs_multiply_adds() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 16, 12, 12]);
    let y = conv(&mut g, x, 16, 24, 3, 1, [1; 4], 1);
    let y = conv(&mut g, y, 24, 32, 3, 2, [1; 4], 3);
    g.output("y", y);
    let t = g.input("t", &[2, 64, 80]);
    let w = konst(&mut g, "wl", &[80, 80], 5, 0.1);
    let q = g.push("q", Op::Linear, &[t, w]).unwrap();
    let o = g
        .push("attn", Op::Attention { heads: 2 }, &[q, t, t])
        .unwrap();
    g.output("o", o);
    let p = plan::lower(&g, "").unwrap();
    let flops: f64 = p.steps.iter().map(|s| s.flops()).sum();
    assert!(
        p.steps.iter().any(|s| matches!(s, Step::Attention { .. })),
        "attention lowers to the fused kernel here"
    );
    assert_eq!(flops, 2.0 * g.macs() as f64);
}

/// Runs everywhere: the lowering of the tiny UNet fuses what it should and packs its arena.
#[test]
fn lowering_fuses_epilogues_and_packs_the_arena() {
    let g = tiny_unet();
    let p = plan::lower(&g, "").unwrap();
    let convs = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Conv { .. }))
        .count();
    let residual_convs = p
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::Conv {
                    residual: Some(_),
                    ..
                }
            )
        })
        .count();
    // Convolutions whose bias took a time embedding in, and those of them with one bias per
    // image: none, the embedding being every image's.
    let folded: Vec<usize> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Conv {
                bias: Some((plan::Loc::Weight(w, _), stride)),
                ..
            } if p.weights[*w].key.contains(":folded-bias:") => Some(*stride),
            _ => None,
        })
        .collect();
    let per_image_bias = folded.iter().filter(|&&st| st > 0).count();
    let residual_linears = p
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::Gemm {
                    residual: Some(_),
                    ..
                }
            )
        })
        .count();
    let adds = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Add { .. } | Step::Binary { .. }))
        .count();
    let permutes = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Permute { .. }))
        .count();
    let resnets = g
        .nodes
        .iter()
        .filter(|n| n.name.ends_with("time_emb_add"))
        .count();
    let transformers = g
        .nodes
        .iter()
        .filter(|n| n.name.ends_with("attn1.attention"))
        .count();
    println!(
        "tiny unet: {} steps, {convs} convs ({residual_convs} with residual, {} with the time embedding, {per_image_bias} of them one per image), {residual_linears} linears with residual, {adds} adds, {permutes} permutes",
        p.steps.len(),
        folded.len()
    );
    assert!(resnets > 0 && transformers > 0);
    assert_eq!(
        folded.len(),
        resnets,
        "every time-embedding add folds into conv1's bias"
    );
    assert_eq!(per_image_bias, 0, "one bias serves every image");
    // Each resnet's residual rides on its conv2's epilogue (a 1x1 shortcut runs first, so its
    // output is there for it), each transformer's four residuals (attn1, attn2, feed-forward,
    // proj_out) on cuBLASLt.
    let shortcuts = g
        .nodes
        .iter()
        .filter(|n| n.name.contains("conv_shortcut") && matches!(n.op, Op::Conv2d { .. }))
        .count();
    assert!(shortcuts > 0);
    assert_eq!(residual_convs, resnets);
    assert_eq!(residual_linears, 4 * transformers);
    assert_eq!(adds, 0, "no standalone adds remain");
    // Only the input and output change layout (the token permutes are free); each multi-head
    // attention (two per transformer) makes q, k, v head-major and its output token-major.
    assert_eq!(permutes, 2 + 2 * 4 * transformers);
    // The tiny UNet's groups are all small: each norm is one launch that sums its own input,
    // and no convolution computes sums for it.
    let norms: Vec<_> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::GroupNorm { shape, .. } => Some(shape),
            _ => None,
        })
        .collect();
    let one_launch = norms.iter().filter(|s| s.one_launch()).count();
    println!(
        "{one_launch} of {} group norms run as one launch",
        norms.len()
    );
    assert!(!norms.is_empty());
    assert_eq!(one_launch, norms.len());
    assert!(!p
        .steps
        .iter()
        .any(|s| matches!(s, Step::Conv { stats: Some(_), .. })));
    // Each skip concatenation is one step that reads both parts in place.
    let concats = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Concat { .. }))
        .count();
    let concat_steps: Vec<usize> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Concat { parts, .. } => Some(parts.len()),
            _ => None,
        })
        .collect();
    assert!(concats > 0);
    assert_eq!(concat_steps, vec![2; concats]);
    let (_, arena) = lipstream_gpu::arena::place(&p.lifetimes, 256);
    let total: usize = p.buffers.iter().sum();
    println!("arena {arena} bytes for {total} bytes of buffers");
    assert!(arena * 3 < total);
}

#[test]
fn face_crop_and_blend_match_the_cpu_reference() {
    use lipstream_engines::avatar::mask_lower_half;
    use lipstream_engines::image::{
        blend_with, crop, FaceBox, LowerFace, Planes, PlanesMut, Region,
    };
    use lipstream_gpu::kernels::image::{FaceFrame, Faces, Image};
    let Some(rt) = runtime() else { return };
    let image = Image::load(&rt.device).expect("image kernels compile");
    let mut faces = Faces::new(&rt.device).unwrap();
    let s = rt.device.stream.clone();
    let size = 256;
    // One batch of frames of different sizes: 320x240 with a box past the right edge, an odd
    // 97x61 frame whose box is smaller than the crop (upsampled), and a 640x480 one.
    let frames: Vec<(usize, usize, FaceBox)> = vec![
        (
            320,
            240,
            FaceBox {
                x0: 180.5,
                y0: 40.25,
                x1: 340.0,
                y1: 210.0,
            },
        ),
        (
            97,
            61,
            FaceBox {
                x0: 20.3,
                y0: 11.7,
                x1: 70.2,
                y1: 52.9,
            },
        ),
        (
            640,
            480,
            FaceBox {
                x0: 201.0,
                y0: 120.5,
                x1: 433.0,
                y1: 390.0,
            },
        ),
    ];
    let planes: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = frames
        .iter()
        .map(|&(w, h, _)| {
            let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
            let y = (0..w * h).map(|i| ((i % w) * 255 / w) as u8).collect();
            let u = (0..cw * ch)
                .map(|i| (64 + (i / cw) * 128 / ch) as u8)
                .collect();
            let v = (0..cw * ch)
                .map(|i| (200 - (i % cw) * 100 / cw) as u8)
                .collect();
            (y, u, v)
        })
        .collect();
    let view = |k: usize| Planes {
        width: frames[k].0,
        height: frames[k].1,
        y: &planes[k].0,
        u: &planes[k].1,
        v: &planes[k].2,
    };
    let mask = LowerFace::from_landmarks(&[
        [0.3, 0.35],
        [0.7, 0.35],
        [0.52, 0.58],
        [0.33, 0.76],
        [0.69, 0.78],
    ]);
    assert_ne!(mask, LowerFace::DEFAULT);
    let regions: Vec<(Region, Vec<u8>)> = (0..frames.len())
        .map(|k| {
            let (w, h, b) = frames[k];
            let r = Region::around(&b, w, h).unwrap();
            let mut packed = Vec::new();
            assert!(r.copy_out(&view(k), &mut packed));
            (r, packed)
        })
        .collect();
    // The second frame's face fades in (an avatar between silence and speech).
    let strength = |k: usize| if k == 1 { 0.6 } else { 1.0 };
    let batch: Vec<FaceFrame> = (0..frames.len())
        .map(|k| FaceFrame {
            region: regions[k].0,
            pixels: &regions[k].1,
            face: frames[k].2,
            mask,
            strength: strength(k),
        })
        .collect();
    let n = frames.len() * 3 * size * size;
    let reference = s.alloc_zeros::<f16>(n).unwrap();
    let masked = s.alloc_zeros::<f16>(n).unwrap();
    let faces_in: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let face_dev = s
        .clone_htod(
            &faces_in
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let ptr = |d: &cudarc::driver::CudaSlice<f16>| {
        use cudarc::driver::DevicePtr;
        d.device_ptr(&s).0
    };
    faces.upload(&s, &batch).unwrap();
    // SAFETY (test): the outputs and the faces hold the batch at 3 x size x size.
    unsafe {
        faces
            .crop(&image, &s, size, ptr(&reference), ptr(&masked))
            .unwrap();
        faces.blend(&image, &s, ptr(&face_dev), size).unwrap();
    }
    let (got_ref, got_masked) = (
        s.clone_dtoh(&reference).unwrap(),
        s.clone_dtoh(&masked).unwrap(),
    );
    let per = 3 * size * size;
    for (k, &(w, h, b)) in frames.iter().enumerate() {
        let want = crop(&view(k), &b, size);
        let want_masked = mask_lower_half(&want);
        for (what, got, want) in [
            ("reference", &got_ref, &want),
            ("masked", &got_masked, &want_masked),
        ] {
            let worst = got[k * per..(k + 1) * per]
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a.to_f32() - b).abs())
                .fold(0f32, f32::max);
            println!("face crop {w}x{h} -> {size}x{size} ({what}): max abs difference {worst:.2e}");
            assert!(worst < 4e-3, "{what} {k}: {worst}");
        }
        // The blend: every byte of the frame within 1 of the CPU reference's.
        let face = Tensor::new(
            vec![3, size, size],
            faces_in[k * per..(k + 1) * per]
                .iter()
                .map(|&v| f16::from_f32(v).to_f32())
                .collect(),
        );
        let (mut cy, mut cu, mut cv) = planes[k].clone();
        let mut cpu = PlanesMut {
            width: w,
            height: h,
            y: &mut cy,
            u: &mut cu,
            v: &mut cv,
        };
        blend_with(&mut cpu, &face, &b, &mask, strength(k));
        let (r, blended) = faces.region(k).unwrap();
        assert_eq!(r, regions[k].0);
        let (mut gy, mut gu, mut gv) = planes[k].clone();
        let mut gpu = PlanesMut {
            width: w,
            height: h,
            y: &mut gy,
            u: &mut gu,
            v: &mut gv,
        };
        assert!(r.copy_in(blended, &mut gpu));
        for (name, gpu, cpu, orig) in [
            ("y", &gy, &cy, &planes[k].0),
            ("u", &gu, &cu, &planes[k].1),
            ("v", &gv, &cv, &planes[k].2),
        ] {
            let off = gpu
                .iter()
                .zip(cpu)
                .filter(|(a, b)| a.abs_diff(**b) > 1)
                .count();
            let changed = cpu.iter().zip(orig).filter(|(a, b)| a != b).count();
            println!(
                "blend {w}x{h} plane {name}: {changed} bytes changed, {off} differ from the CPU by more than 1"
            );
            assert!(changed > 100 && off == 0, "{k} {name}");
        }
    }
    // A region that does not hold its box is refused before anything is queued, and nothing
    // runs on the refused batch.
    let mut bad = batch[0];
    bad.region.width -= 20;
    bad.pixels = &regions[0].1[..bad.region.bytes()];
    let err = faces.upload(&s, &[batch[1], bad]).unwrap_err().to_string();
    assert!(err.contains("frame 1"), "{err}");
    // SAFETY (test): as above.
    assert!(unsafe { faces.crop(&image, &s, size, ptr(&reference), 0) }.is_err());
}

/// Broadcasting adds like whisper's positional embedding: a last axis of whole 8-element
/// vectors (one 16-byte load per thread) and one of 12 (an element per thread).
#[test]
fn broadcast_adds_match() {
    let Some(mut rt) = runtime() else { return };
    for (i, x) in [[2, 40, 48], [2, 5, 12]].into_iter().enumerate() {
        let mut g = Graph::new();
        let xi = g.input("x", &x);
        let pos = konst(&mut g, "pos", &x[1..], 130 + i as u32, 1.0);
        let y = g.push("pos_add", Op::Add, &[xi, pos]).unwrap();
        let y = g.push("gelu", Op::Gelu, &[y]).unwrap();
        g.output("y", y);
        let xt = random(&x, 140 + i as u32, 1.0);
        compare(
            &mut rt,
            &format!("add {x:?} + {:?}", &x[1..]),
            &g,
            &[("x", &xt)],
            5e-3,
        );
    }
}

/// Whisper's stem — conv1d, GELU, stride-2 conv1d, GELU, to tokens — lowers to channels-last
/// convolutions: the one permute left is the mel input's, the tokens come out stored already.
#[test]
fn whisper_stem_lowers_channels_last_with_one_permute() {
    let mut g = Graph::new();
    let x = g.input("mel", &[1, 80, 3000]);
    let w1 = konst(&mut g, "w1", &[384, 80, 3], 1, 0.1);
    let b1 = konst(&mut g, "b1", &[384], 2, 0.1);
    let h = g
        .push(
            "conv1",
            Op::Conv1d {
                stride: 1,
                padding: 1,
            },
            &[x, w1, b1],
        )
        .unwrap();
    let h = g.push("gelu1", Op::Gelu, &[h]).unwrap();
    let w2 = konst(&mut g, "w2", &[384, 384, 3], 3, 0.1);
    let b2 = konst(&mut g, "b2", &[384], 4, 0.1);
    let h = g
        .push(
            "conv2",
            Op::Conv1d {
                stride: 2,
                padding: 1,
            },
            &[h, w2, b2],
        )
        .unwrap();
    let h = g.push("gelu2", Op::Gelu, &[h]).unwrap();
    let t = g
        .push(
            "tokens",
            Op::Permute {
                perm: vec![0, 2, 1],
            },
            &[h],
        )
        .unwrap();
    g.output("tokens", t);
    let p = plan::lower(&g, "").unwrap();
    let permutes = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Permute { .. }))
        .count();
    let nhwc = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Conv { shape, .. } if shape.nhwc))
        .count();
    assert_eq!(
        (nhwc, permutes),
        (2, 1),
        "{:#?}",
        p.steps.iter().map(|s| s.describe()).collect::<Vec<_>>()
    );
}

/// A GELU on a linear layer's output runs in that GEMM's epilogue (whisper's fc1); a linear
/// output read by anything else keeps its own GELU pass.
#[test]
fn a_linear_layers_gelu_rides_on_its_gemm() {
    let mut g = Graph::new();
    let x = g.input("x", &[1, 30, 384]);
    let w = konst(&mut g, "w", &[1536, 384], 1, 0.05);
    let b = konst(&mut g, "b", &[1536], 2, 0.1);
    let h = g.push("fc1", Op::Linear, &[x, w, b]).unwrap();
    let h = g.push("fc1.gelu", Op::Gelu, &[h]).unwrap();
    g.output("y", h);
    let w2 = konst(&mut g, "w2", &[384, 384], 3, 0.05);
    let k = g.push("k", Op::Linear, &[x, w2]).unwrap();
    let kg = g.push("k.gelu", Op::Gelu, &[k]).unwrap();
    g.output("k", k);
    g.output("kg", kg);
    let p = plan::lower(&g, "").unwrap();
    let gelus: Vec<bool> = p
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Gemm { gelu, .. } => Some(*gelu),
            _ => None,
        })
        .collect();
    let unary = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Unary { .. }))
        .count();
    assert_eq!(
        (gelus, unary),
        (vec![true, false], 1),
        "{:#?}",
        p.steps.iter().map(|s| s.describe()).collect::<Vec<_>>()
    );
}

/// A transformer block's two attentions at MuseTalk's widths, then a wider block's
/// cross-attention over the same context: the self-attention's q, k and v come from one GEMM,
/// both cross-attentions' k and v from another (the fused kernel reads them at the packed row
/// stride); on a GPU everything matches the CPU executor, biases and all.
#[test]
fn attention_projections_pack_into_one_gemm() {
    let mut g = Graph::new();
    let x = g.input("x", &[2, 64, 320]);
    let ctx = g.input("ctx", &[2, 50, 384]);
    let x3 = g.input("x3", &[2, 16, 640]);
    let lin = |g: &mut Graph, name: &str, x: ValueId, k: usize, n: usize, bias: bool, seed: u32| {
        let w = konst(
            g,
            &format!("{name}.w"),
            &[n, k],
            seed,
            1.0 / (k as f32).sqrt(),
        );
        let mut ins = vec![x, w];
        if bias {
            ins.push(konst(g, &format!("{name}.b"), &[n], seed + 1, 0.5));
        }
        g.push(name, Op::Linear, &ins).unwrap()
    };
    let q = lin(&mut g, "q", x, 320, 320, false, 1);
    let k = lin(&mut g, "k", x, 320, 320, false, 3);
    let v = lin(&mut g, "v", x, 320, 320, true, 5);
    let a = g
        .push("attn1", Op::Attention { heads: 8 }, &[q, k, v])
        .unwrap();
    let q2 = lin(&mut g, "q2", a, 320, 320, false, 7);
    let k2 = lin(&mut g, "k2", ctx, 384, 320, true, 9);
    let v2 = lin(&mut g, "v2", ctx, 384, 320, false, 11);
    let o = g
        .push("attn2", Op::Attention { heads: 8 }, &[q2, k2, v2])
        .unwrap();
    let q3 = lin(&mut g, "q3", x3, 640, 640, false, 13);
    let k3 = lin(&mut g, "k3", ctx, 384, 640, false, 15);
    let v3 = lin(&mut g, "v3", ctx, 384, 640, true, 17);
    let o3 = g
        .push("attn3", Op::Attention { heads: 8 }, &[q3, k3, v3])
        .unwrap();
    g.output("o", o);
    g.output("o3", o3);
    let p = plan::lower(&g, "").unwrap();
    let shapes: Vec<String> = p.steps.iter().map(|s| s.describe()).collect();
    let linears = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Gemm { .. }))
        .count();
    assert_eq!(linears, 4, "{shapes:#?}");
    assert!(shapes.iter().any(|s| s.ends_with(" qkv")), "{shapes:#?}");
    let kv = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Attention { ldkv, .. } if *ldkv == 2 * (320 + 640)))
        .count();
    assert_eq!(kv, 2, "{shapes:#?}");
    let Some(mut rt) = runtime() else { return };
    let (xt, ct, x3t) = (
        random(&[2, 64, 320], 20, 1.0),
        random(&[2, 50, 384], 21, 1.0),
        random(&[2, 16, 640], 22, 1.0),
    );
    compare(
        &mut rt,
        "packed projections",
        &g,
        &[("x", &xt), ("ctx", &ct), ("x3", &x3t)],
        5e-3,
    );
}

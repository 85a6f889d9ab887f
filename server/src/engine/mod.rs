//! MuseTalk on the GPU: which graphs each pipeline stage needs, built per batch profile on one
//! GPU's runtime and replayed as CUDA graphs; engine files (`file`); the engine benchmark
//! (`lipstream bench engine`) and the full-size numerical check against the CPU reference
//! executor (`lipstream engine check`).
//!
//! Never on the network path: building takes seconds and runs on the caller's thread.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use half::f16;
use lipstream_engines::models::config::{self, UNetConfig, VaeConfig, WhisperConfig};
use lipstream_engines::models::musetalk::{self, Models, CROP, LATENT};
use lipstream_engines::models::{unet, vae, whisper};
use lipstream_engines::presets::{ModelSet, Preset};
use lipstream_engines::weights::Weights;
use lipstream_engines::{cpu, Graph, Tensor};
use lipstream_gpu::device::Device;
use lipstream_gpu::{
    ConvAsGemm, ConvGraphs, Executor, FuseConv, NormedConvs, Options, Runtime, ThinConvs, Tuning,
};
use serde_json::{json, Value};

pub mod file;

/// One unit of GPU work, per batch of frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Avatar frame: UNet -> VAE decode.
    Avatar,
    /// Camera frame: 2 VAE encodes -> UNet -> VAE decode.
    Camera,
    Unet,
    VaeDecode,
    /// Both crops of each frame: 2x the batch.
    VaeEncode,
    /// whisper-tiny over one 30 s window (batch = windows): every hidden state of every row.
    Whisper,
    /// What the server runs: whisper-tiny over one 30 s window, returning only the 64 rows
    /// from each window's first row that a hop's prompts read, its last layer computed for
    /// those rows alone.
    WhisperRows,
}

impl Stage {
    /// The batch profiles a CUDA renderer of this mode captures unless told otherwise: powers of
    /// two to 16, and for avatar frames also 24. One avatar batch of 24 renders a frame of each
    /// of 24 sessions in 1.64 ms a frame on an H100, where 16 + 8 take 1.70 (late frames at 24
    /// sessions 5.0 -> 3.3 %), and the engine stays under 4 GB; a camera frame costs 1.8x as
    /// much, so a GPU never gathers 24 of them in time.
    pub fn default_batches(self) -> Vec<usize> {
        match self {
            Stage::Avatar => vec![1, 2, 4, 8, 16, 24],
            _ => vec![1, 2, 4, 8, 16],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Avatar => "avatar_frame",
            Stage::Camera => "camera_frame",
            Stage::Unet => "unet",
            Stage::VaeDecode => "vae_dec",
            Stage::VaeEncode => "vae_enc_2x",
            Stage::Whisper => "whisper_30s",
            Stage::WhisperRows => "whisper_rows",
        }
    }

    /// Whether the stage is a whisper window (batched by window, not by frame).
    pub fn is_whisper(self) -> bool {
        matches!(self, Stage::Whisper | Stage::WhisperRows)
    }
}

/// The three models' configs and weights, from a models folder or made up in memory.
pub struct Sources {
    pub set: ModelSet,
    unet: Weights,
    vae: Weights,
    whisper: Weights,
    /// Where the weights came from, for reports.
    pub origin: String,
}

/// Where each model's keys start in its weights (whisper's checkpoint holds the decoder too).
const WHISPER_ROOT: &str = "model.encoder";

impl Sources {
    /// A models folder as `lipstream models synth|pull` writes it.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let read = |p: &str| dir.join(p);
        let unet: UNetConfig = config::read(&read("musetalkV15/musetalk.json"))?;
        let vae_cfg: VaeConfig = config::read(&read("sd-vae/config.json"))?;
        let whisper_cfg: WhisperConfig = config::read(&read("whisper/config.json"))?;
        Ok(Sources {
            set: ModelSet {
                unet,
                vae: vae_cfg,
                whisper: whisper_cfg,
            },
            unet: Weights::open(&read("musetalkV15/unet.pth"))?,
            vae: Weights::open(&read("sd-vae/diffusion_pytorch_model.safetensors"))?,
            whisper: Weights::open(&read("whisper/model.safetensors"))?,
            origin: dir.display().to_string(),
        })
    }

    /// Random weights for `preset`, made in memory (timing does not depend on values).
    pub fn synth(preset: Preset, seed: u64) -> Self {
        Sources {
            set: preset.configs(),
            unet: Weights::synth(seed),
            vae: Weights::synth(seed + 1),
            whisper: Weights::synth(seed + 2),
            origin: format!("random weights in memory (seed {seed})"),
        }
    }

    fn models(&self) -> Models<'_> {
        Models {
            unet: self.unet.root(""),
            unet_cfg: &self.set.unet,
            vae: self.vae.root(""),
            vae_cfg: &self.set.vae,
        }
    }

    /// The graph of `stage` for `batch` frames.
    pub fn graph(&self, stage: Stage, batch: usize) -> anyhow::Result<Graph> {
        let g = match stage {
            Stage::Avatar => musetalk::avatar_step(&self.models(), batch)?,
            Stage::Camera => musetalk::camera_step(&self.models(), batch)?,
            Stage::Unet => unet::build(&self.unet.root(""), &self.set.unet, batch, LATENT)?,
            Stage::VaeDecode => {
                vae::build_decoder(&self.vae.root(""), &self.set.vae, batch, LATENT)?
            }
            Stage::VaeEncode => {
                vae::build_encoder(&self.vae.root(""), &self.set.vae, 2 * batch, CROP)?
            }
            Stage::Whisper => {
                whisper::build(&self.whisper.root(WHISPER_ROOT), &self.set.whisper, batch)?
            }
            Stage::WhisperRows => whisper::build_rows(
                &self.whisper.root(WHISPER_ROOT),
                &self.set.whisper,
                batch,
                whisper::SERVED_ROWS,
            )?,
        };
        Ok(g)
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data = (0..shape.iter().product::<usize>())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::new(shape.to_vec(), data)
}

/// Random inputs in range for every input of `g`: values in [-1, 1], and whisper's first rows
/// spread over the window (its first, its last and rows between).
fn inputs_for(g: &Graph, seed: u64) -> Vec<(String, Tensor)> {
    g.inputs
        .iter()
        .enumerate()
        .map(|(i, (name, v))| {
            let shape = g.shape(*v);
            let t = if name == whisper::FIRST_ROW {
                let last = (whisper::POSITIONS - whisper::SERVED_ROWS) as u64;
                let n = shape.iter().product::<usize>();
                let data = (0..n)
                    .map(|j| match j % 3 {
                        0 => last as f32,
                        1 => 0.0,
                        _ => ((j as u64 * 997 + seed) % last) as f32,
                    })
                    .collect();
                Tensor::new(shape.to_vec(), data)
            } else {
                random(shape, seed + i as u64)
            };
            (name.clone(), t)
        })
        .collect()
}

/// One GPU's executors for a pipeline stage: a frame-step executor per batch profile and the
/// whisper window, sharing one runtime (weights, arena, workspace).
pub struct Executors {
    pub rt: Runtime,
    pub profiles: Vec<(usize, Executor)>,
    pub whisper: Executor,
}

/// Builds `stage` for every batch in `batches` plus whisper on `device`; convolution algorithms
/// come from `preload` (an engine file's) or, when it is empty, are timed now. With `graphs`
/// each executor is captured as a CUDA graph.
pub fn executors(
    device: Device,
    src: &Sources,
    stage: Stage,
    batches: &[usize],
    preload: &Tuning,
    graphs: bool,
) -> anyhow::Result<Executors> {
    let mut rt = Runtime::new(device)?;
    preload.apply(&mut rt);
    let opts = Options {
        tune: preload.is_empty(),
        fuse: FuseConv::Timed,
        gemm: ConvAsGemm::Timed,
        graphs: ConvGraphs::Timed,
        mma: ThinConvs::Timed,
        normed: NormedConvs::Large,
    };
    let mut profiles = Vec::new();
    for &b in batches {
        let g = src.graph(stage, b)?;
        let ex = Executor::new(&mut rt, &g, "", opts)
            .with_context(|| format!("building {} B={b}", stage.name()))?;
        profiles.push((b, ex));
    }
    let g = src.graph(Stage::WhisperRows, 1)?;
    let mut whisper = Executor::new(&mut rt, &g, "", opts).context("building whisper")?;
    rt.finish_building()?;
    if graphs {
        for (b, ex) in &mut profiles {
            ex.capture(&rt)
                .with_context(|| format!("capturing {} B={b}", stage.name()))?;
        }
        whisper.capture(&rt).context("capturing whisper")?;
    }
    Ok(Executors {
        rt,
        profiles,
        whisper,
    })
}

/// Each timed fusion decision: the convolution, its epilogue, both times and the choice.
fn fusion_report(rt: &Runtime) -> Vec<Value> {
    let mut v: Vec<_> = rt.fusions.iter().collect();
    v.sort_by_key(|(k, _)| {
        (
            k.shape.n, k.shape.c, k.shape.h, k.shape.o, k.residual, k.stats,
        )
    });
    v.into_iter()
        .map(|(k, f)| {
            json!({
                "conv": k.shape.label(),
                "residual": k.residual,
                "stats": k.stats,
                "plain_ms": f.plain_ms,
                "fused_ms": if f.fused_ms.is_finite() { json!(f.fused_ms) } else { Value::Null },
                "fused": f.fused.is_some(),
            })
        })
        .collect()
}

/// Each timed graph-API decision: the convolution, its epilogue, the legacy call's and the best
/// graph configuration's time, and the choice.
fn graph_report(rt: &Runtime) -> Vec<Value> {
    let mut v: Vec<_> = rt.graph_convs.iter().collect();
    v.sort_by_key(|(k, _)| {
        (
            k.shape.n, k.shape.c, k.shape.h, k.shape.o, k.residual, k.stats,
        )
    });
    v.into_iter()
        .map(|(k, g)| {
            json!({
                "conv": k.shape.label(),
                "bias_in_graph": k.bias_in_graph,
                "residual": k.residual,
                "stats": k.stats,
                "legacy_ms": g.legacy_ms,
                "graph_ms": g.graph_ms,
                "graph": g.choice.as_ref().map(|c| json!({"engine": c.engine, "knobs": c.knobs})),
            })
        })
        .collect()
}

/// Each timed lowering decision: the convolution, its epilogue, cuDNN's and the best GEMM's
/// time and the choice.
fn gemm_report(rt: &Runtime) -> Vec<Value> {
    let mut v: Vec<_> = rt.gemm_convs.iter().collect();
    v.sort_by_key(|(k, _)| {
        (
            k.shape.n, k.shape.c, k.shape.h, k.shape.o, k.residual, k.stats,
        )
    });
    v.into_iter()
        .map(|(k, g)| {
            json!({
                "conv": k.shape.label(),
                "residual": k.residual,
                "stats": k.stats,
                "cudnn_ms": g.cudnn_ms,
                "gemm_ms": g.gemm_ms,
                "gemm": g.algo.is_some(),
            })
        })
        .collect()
}

/// Each timed GEMM kind: its shape, which of cuBLASLt's proposals won and its time.
fn linear_report(rt: &Runtime) -> Vec<Value> {
    let mut v: Vec<_> = rt.linears.iter().collect();
    v.sort_by_key(|(k, _)| **k);
    v.into_iter()
        .map(|(k, c)| {
            json!({
                "gemm": format!("{}x[{}x{}]·[{}x{}]", k.batch, k.m, k.k, k.k, k.n),
                "bias": k.bias,
                "residual": k.residual,
                "gelu": k.gelu,
                "algo": c.algo,
                "ms": c.ms,
            })
        })
        .collect()
}

fn mma_report(rt: &Runtime) -> Vec<Value> {
    let mut v: Vec<_> = rt.mma_convs.iter().collect();
    v.sort_by_key(|(k, _)| (k.shape.n, k.shape.c, k.shape.h, k.shape.w, k.bias));
    v.into_iter()
        .map(|(k, m)| {
            json!({
                "conv": k.shape.label(),
                "bias": k.bias,
                "library_ms": m.library_ms,
                "mma_ms": m.mma_ms,
                "mma": m.mma,
                "rows": m.rows,
            })
        })
        .collect()
}

/// What `bench engine` measures.
pub struct BenchOptions {
    pub batches: Vec<usize>,
    pub stages: Vec<Stage>,
    /// Timed replays per figure (median reported).
    pub runs: usize,
    /// Replay CUDA graphs (else launch every step eagerly).
    pub graphs: bool,
    /// Per-op-kind time breakdown of every stage's smallest and largest profile.
    pub profile: bool,
    /// Let convolutions run as im2col + GEMM where timing says so (else all on cuDNN).
    pub conv_gemm: bool,
    /// Let convolutions run on cuDNN graph-API engines where timing says so.
    pub conv_graphs: bool,
    /// Also time each frame stage with two replays in flight on two streams.
    pub two_streams: bool,
}

/// Builds every (stage, batch) executor, captures them, and times each; returns the report.
/// `preload`: algorithms from an engine file (then nothing is timed at build).
pub fn bench(src: &Sources, opts: &BenchOptions, preload: &Tuning) -> anyhow::Result<Value> {
    let device = Device::open(0).context("opening GPU 0")?;
    let versions = device.versions()?;
    let (name, sm) = (device.name.clone(), device.sm);
    let mem0 = device.memory_used()?;
    let mut rt = Runtime::new(device)?;
    preload.apply(&mut rt);
    let tune = preload.is_empty();
    let started = Instant::now();
    let mut built: Vec<(Stage, usize, Executor, f64)> = Vec::new();
    let mut order: Vec<(Stage, usize)> = Vec::new();
    for &stage in &opts.stages {
        if stage.is_whisper() {
            // One window alone, and the batches the server runs windows of sessions that wait
            // together in.
            order.push((stage, 1));
            order.extend(
                opts.batches
                    .iter()
                    .filter(|b| crate::lipsync::renderer::WHISPER_BATCHES.contains(b))
                    .map(|&b| (stage, b)),
            );
        } else {
            order.extend(opts.batches.iter().map(|&b| (stage, b)));
        }
    }
    for &(stage, batch) in &order {
        let t = Instant::now();
        let g = src.graph(stage, batch)?;
        let ex = Executor::new(
            &mut rt,
            &g,
            "",
            Options {
                tune,
                fuse: FuseConv::Timed,
                gemm: if opts.conv_gemm {
                    ConvAsGemm::Timed
                } else {
                    ConvAsGemm::Never
                },
                graphs: if opts.conv_graphs {
                    ConvGraphs::Timed
                } else {
                    ConvGraphs::Never
                },
                mma: ThinConvs::Timed,
                normed: NormedConvs::Large,
            },
        )
        .with_context(|| format!("building {} B={batch}", stage.name()))?;
        for (name, t) in inputs_for(&g, 7) {
            let data: Vec<f16> = t.data.iter().map(|&v| f16::from_f32(v)).collect();
            ex.write_input(&mut rt, &name, &data)?;
        }
        let secs = t.elapsed().as_secs_f64();
        let (fused, convs) = ex.fused_convs();
        let (gemms, _) = ex.gemm_convs();
        let (mma, _) = ex.mma_convs();
        let normed = ex.normed_convs();
        eprintln!(
            "built {} B={batch}: {} steps ({fused} of {convs} convolutions fused, {gemms} as im2col + GEMM, {mma} thin ones on our tensor-core kernels, {normed} normalising their input), arena {:.1} MiB (peak live {:.1} MiB), {secs:.1} s",
            stage.name(),
            ex.steps().len(),
            ex.arena_bytes as f64 / (1 << 20) as f64,
            ex.peak_bytes as f64 / (1 << 20) as f64
        );
        built.push((stage, batch, ex, secs));
    }
    // The arena and workspace are final now: capture.
    rt.finish_building()?;
    if opts.graphs {
        for (stage, batch, ex, secs) in &mut built {
            let t = Instant::now();
            ex.capture(&rt)
                .with_context(|| format!("capturing {} B={batch}", stage.name()))?;
            *secs += t.elapsed().as_secs_f64();
        }
    }
    let build_s = started.elapsed().as_secs_f64();
    let mut results = serde_json::Map::new();
    for (stage, batch, ex, secs) in &built {
        let ms = ex.time_ms(&rt, opts.runs)?;
        let key = if stage.is_whisper() && *batch == 1 {
            stage.name().to_string()
        } else {
            format!("B{batch}")
        };
        let entry = report_entry(&mut results, key)?;
        entry.insert(format!("{}_ms", stage.name()), json!(ms));
        if matches!(stage, Stage::Avatar | Stage::Camera) {
            entry.insert(
                format!("{}_per_frame_ms", stage.name()),
                json!(ms / *batch as f64),
            );
        }
        if stage.is_whisper() && *batch > 1 {
            entry.insert(
                format!("{}_per_window_ms", stage.name()),
                json!(ms / *batch as f64),
            );
        }
        entry.insert(
            format!("{}_arena_mib", stage.name()),
            json!(ex.arena_bytes as f64 / (1 << 20) as f64),
        );
        entry.insert(format!("{}_build_s", stage.name()), json!(secs));
        eprintln!(
            "{:<14} B={batch:<3} {ms:8.3} ms  ({:.3} ms/frame)",
            stage.name(),
            ms / *batch as f64
        );
    }
    if opts.two_streams && opts.graphs {
        two_streams(&mut rt, &built, opts.runs, &mut results)?;
    }
    let mut profile = Vec::new();
    if opts.profile {
        for &stage in &opts.stages {
            let of: Vec<&(Stage, usize, Executor, f64)> =
                built.iter().filter(|(s, ..)| *s == stage).collect();
            let mut ends = vec![of.first()];
            if of.len() > 1 {
                ends.push(of.last());
            }
            for (_, batch, ex, _) in ends.into_iter().flatten() {
                profile.push(step_profile(&rt, ex, stage, *batch)?);
            }
        }
    }
    Ok(json!({
        "gpu": name,
        "sm": format!("sm_{}{}", sm.0, sm.1),
        "driver": format!("{}.{}", versions.driver.0, versions.driver.1),
        "cudnn": versions.cudnn,
        "cublaslt": versions.cublaslt,
        "weights": src.origin,
        "graphs": opts.graphs,
        "experiments": lipstream_gpu::kernels::experiments_on(),
        "runs": opts.runs,
        "weight_mib": rt.weight_bytes as f64 / (1 << 20) as f64,
        // Everything this engine holds on the device after capture: weights, the shared arena,
        // workspaces, library handles and the CUDA graphs.
        "device_mib": (rt.device.memory_used()? - mem0) as f64 / (1 << 20) as f64,
        "arena_mib": rt.scratch_bytes() as f64 / (1 << 20) as f64,
        "stages": opts.stages.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "batches": opts.batches,
        "conv_shapes_tuned": rt.tuned.len(),
        "conv_fusions": fusion_report(&rt),
        "conv_graphs": graph_report(&rt),
        "conv_gemms": gemm_report(&rt),
        "conv_mma": mma_report(&rt),
        "linears": linear_report(&rt),
        "build_s": build_s,
        "results": results,
        "profile": profile,
    }))
}

/// The results object under `key` (a batch profile's "B<n>", or a stage's own), made on first use.
fn report_entry(
    results: &mut serde_json::Map<String, Value>,
    key: String,
) -> anyhow::Result<&mut serde_json::Map<String, Value>> {
    results
        .entry(key)
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .context("report entry")
}

/// Each frame stage's replays per frame, back to back on one stream and two at a time on two
/// streams (each executor captured again on a second arena and workspaces), into `results`.
fn two_streams(
    rt: &mut Runtime,
    built: &[(Stage, usize, Executor, f64)],
    runs: usize,
    results: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<()> {
    let frames: Vec<&(Stage, usize, Executor, f64)> = built
        .iter()
        .filter(|(s, ..)| matches!(s, Stage::Avatar | Stage::Camera))
        .collect();
    let mut second = rt
        .second_scratch()
        .context("a second arena and workspaces")?;
    rt.swap_scratch(&mut second);
    let captured: anyhow::Result<Vec<_>> = frames
        .iter()
        .map(|(stage, batch, ex, _)| {
            ex.capture_graph(rt)
                .with_context(|| format!("capturing {} B={batch} again", stage.name()))
        })
        .collect();
    rt.swap_scratch(&mut second);
    for ((stage, batch, ex, _), other) in frames.iter().zip(captured?) {
        let (one, two) = ex.time_two_streams(rt, &other, runs)?;
        let b = *batch as f64;
        eprintln!(
            "{:<14} B={batch:<3} one stream {:.3} ms/frame, two streams {:.3} ms/frame ({:+.1} %)",
            stage.name(),
            one / b,
            two / b,
            (two / one - 1.0) * 100.0
        );
        let entry = report_entry(results, format!("B{batch}"))?;
        entry.insert(
            format!("{}_one_stream_per_frame_ms", stage.name()),
            json!(one / b),
        );
        entry.insert(
            format!("{}_two_streams_per_frame_ms", stage.name()),
            json!(two / b),
        );
    }
    Ok(())
}

/// Per-kind and slowest-step GPU times of one replay (events captured between the steps), with
/// the tensor work's rate: a step far below the card's TFLOP/s is where the next gain is.
fn step_profile(rt: &Runtime, ex: &Executor, stage: Stage, batch: usize) -> anyhow::Result<Value> {
    let times = ex.profile(rt)?;
    let mut by_kind: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
    for (kind, ms) in &times {
        let e = by_kind.entry(kind).or_default();
        e.0 += *ms as f64;
        e.1 += 1;
    }
    // Steps with their total (a convolution with its epilogue) and their FLOPs.
    let mut steps: Vec<(f64, f64, String)> = Vec::new();
    let mut flops_by_kind: std::collections::BTreeMap<&str, f64> = Default::default();
    let mut t = times.iter();
    for (step, choice) in ex.steps().iter().zip(ex.choices()) {
        let mut ms = t.next().map_or(0.0, |x| x.1 as f64);
        let mut d = step.describe();
        if matches!(step, lipstream_gpu::plan::Step::Conv { .. }) {
            ms += t.next().map_or(0.0, |x| x.1 as f64);
            d = format!("{d} {choice}");
        }
        let flops = step.flops();
        *flops_by_kind.entry(step.name()).or_default() += flops;
        steps.push((ms, flops, d));
    }
    steps.sort_by(|a, b| b.0.total_cmp(&a.0));
    let rate = |flops: f64, ms: f64| if ms > 0.0 { flops / ms / 1e9 } else { 0.0 };
    eprintln!(
        "{} B={batch} profile (GPU time per step inside a CUDA graph):",
        stage.name()
    );
    for (k, (ms, n)) in &by_kind {
        match flops_by_kind.get(k).copied().filter(|f| *f > 0.0) {
            Some(f) => eprintln!(
                "  {k:<16} {n:4} steps {ms:8.3} ms {:6.0} TFLOP/s",
                rate(f, *ms)
            ),
            None => eprintln!("  {k:<16} {n:4} steps {ms:8.3} ms"),
        }
    }
    eprintln!("  slowest steps:");
    for (ms, f, d) in steps.iter().take(12) {
        if *f > 0.0 {
            eprintln!("    {ms:7.3} ms {:6.0} TFLOP/s  {d}", rate(*f, *ms));
        } else {
            eprintln!("    {ms:7.3} ms                {d}");
        }
    }
    Ok(json!({
        "stage": stage.name(),
        "batch": batch,
        "ms_by_kind": by_kind
            .iter()
            .map(|(k, (ms, n))| {
                let f = flops_by_kind.get(k).copied().unwrap_or(0.0);
                (k.to_string(), json!({"ms": ms, "steps": n, "gflop": f / 1e9}))
            })
            .collect::<serde_json::Map<_, _>>(),
        // Every step, slowest first: where a profile's time goes, for the next optimisation.
        "slowest_steps": steps
            .iter()
            .map(|(ms, f, d)| json!({"ms": ms, "gflop": f / 1e9, "step": d}))
            .collect::<Vec<_>>(),
    }))
}

/// The VAE encoder avatar preparation runs on each frame's two crops ([2, 3, 256, 256] in
/// [-1, 1] to the latent means [2, 4, 32, 32]): on the GPU (fp16, like the engine that will
/// decode them) or on the CPU reference executor, which takes seconds a frame at full size.
pub enum CropEncoder {
    Cpu(Graph),
    Cuda { rt: Box<Runtime>, ex: Box<Executor> },
}

impl CropEncoder {
    /// The encoder of the VAE in `models` (a `models synth|pull` folder).
    pub fn open(models: &Path, cuda: bool) -> anyhow::Result<Self> {
        let cfg: VaeConfig = config::read(&models.join("sd-vae/config.json"))?;
        let w = Weights::open(&models.join("sd-vae/diffusion_pytorch_model.safetensors"))?;
        let g = vae::build_encoder(&w.root(""), &cfg, 2, CROP)?;
        if !cuda {
            return Ok(CropEncoder::Cpu(g));
        }
        let hint = "(--executor cpu runs it on the CPU)";
        let mut rt =
            Runtime::new(Device::open(0).with_context(|| format!("opening GPU 0 {hint}"))?)?;
        let ex = Executor::new(&mut rt, &g, "", Options::TUNED)
            .with_context(|| format!("building the VAE encoder on the GPU {hint}"))?;
        rt.finish_building()?;
        Ok(CropEncoder::Cuda {
            rt: Box::new(rt),
            ex: Box::new(ex),
        })
    }

    /// Which executor runs it, for logs and the bundle's metadata.
    pub fn executor(&self) -> &'static str {
        match self {
            CropEncoder::Cpu(_) => "cpu",
            CropEncoder::Cuda { .. } => "cuda",
        }
    }

    pub fn encode(&mut self, crops: &Tensor) -> lipstream_engines::Result<Tensor> {
        let mut out = match self {
            CropEncoder::Cpu(g) => cpu::run(g, &[("image", crops)])?,
            CropEncoder::Cuda { rt, ex } => ex
                .run_f32(rt, &[("image", crops)])
                .map_err(|e| lipstream_engines::EngineError::Executor(e.to_string()))?,
        };
        if out.is_empty() {
            return Err(lipstream_engines::EngineError::Executor(
                "the VAE encoder has no output".into(),
            ));
        }
        Ok(out.swap_remove(0).1)
    }
}

/// Runs each model at full size on both executors with the same random inputs and reports the
/// relative L2 error of every output; with `dump`, also writes inputs and both executors'
/// outputs for `scripts/device/torch_check.py`.
pub fn check(src: &Sources, batch: usize, dump: Option<&Path>) -> anyhow::Result<Value> {
    let device = Device::open(0).context("opening GPU 0")?;
    let mut rt = Runtime::new(device)?;
    let mut report = serde_json::Map::new();
    let mut tensors = std::collections::BTreeMap::new();
    for stage in [
        Stage::Unet,
        Stage::VaeEncode,
        Stage::VaeDecode,
        Stage::Whisper,
        Stage::WhisperRows,
    ] {
        let g = src.graph(stage, batch)?;
        let inputs = inputs_for(&g, 11);
        let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let t = Instant::now();
        let want = cpu::run(&g, &refs)?;
        let cpu_s = t.elapsed().as_secs_f64();
        let mut ex = Executor::new(&mut rt, &g, "", Options::TUNED)?;
        ex.capture(&rt)?;
        let got = ex.run_f32(&mut rt, &refs)?;
        let mut worst = 0f64;
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let err = a.rel_l2(b);
            worst = worst.max(err);
            eprintln!(
                "{:<12} {name:<16} CUDA vs CPU rel L2 {err:.2e}",
                stage.name()
            );
            if dump.is_some() {
                tensors.insert(format!("{}.cuda.{name}", stage.name()), a.clone());
                tensors.insert(format!("{}.cpu.{name}", stage.name()), b.clone());
            }
        }
        if dump.is_some() {
            for (name, t) in &inputs {
                tensors.insert(format!("{}.input.{name}", stage.name()), t.clone());
            }
        }
        report.insert(
            stage.name().to_string(),
            json!({"rel_l2_cuda_vs_cpu": worst, "outputs": got.len(), "cpu_s": cpu_s}),
        );
    }
    if let Some(dir) = dump {
        std::fs::create_dir_all(dir)?;
        lipstream_engines::weights::safetensors::write(
            &dir.join("check.safetensors"),
            &tensors,
            lipstream_engines::weights::DType::F32,
        )?;
    }
    Ok(json!({"batch": batch, "weights": src.origin, "stages": report}))
}

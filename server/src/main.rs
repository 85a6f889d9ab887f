//! The `lipstream` command line.
#![forbid(unsafe_code)]

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::path::PathBuf;

use lipstream::config::ServeArgs;
use lipstream_engines::presets::{self, Preset};

/// lipstream: real-time streaming lip-sync over WebRTC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the page, WHIP/WHEP signalling and WebRTC media.
    Serve(ServeArgs),
    /// Model checkpoints: make random-weight ones for tests and benchmarks.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Say which GPU, driver and CUDA libraries this machine has, and which executor would run.
    Doctor,
    /// GPU engines: check the CUDA executor against the CPU reference at full size.
    #[command(subcommand)]
    Engine(EngineCmd),
    /// Avatar bundles for avatar mode.
    #[command(subcommand)]
    Avatar(AvatarCmd),
}

#[derive(Subcommand)]
enum AvatarCmd {
    /// Make an avatar bundle from a picture or a clip: each frame's face box (MTCNN, smoothed
    /// across frames), blend mask and the VAE latents of its masked and reference crops, so
    /// that serving a frame costs the UNet and the decode only.
    #[command(group(clap::ArgGroup::new("input").required(true).args(["image", "video"])))]
    Prepare {
        /// A PNG picture with one face (RGB, RGBA or grey).
        #[arg(long)]
        image: Option<PathBuf>,
        /// A clip with one face: `.mp4` (H.264) or `.y4m`, taken at 25 fps (its pictures
        /// dropped or repeated by their time stamps); the avatar loops it back and forth.
        #[arg(long)]
        video: Option<PathBuf>,
        /// The clip's first seconds taken (each frame is kept whole in the bundle).
        #[arg(long, default_value_t = 10.0)]
        max_seconds: f64,
        /// Runs the VAE encoder: cuda (fp16, the engine's precision), cpu (the reference
        /// executor, seconds a frame at full size) or auto (cuda when present).
        #[arg(long, value_enum, default_value_t = lipstream::config::ExecutorChoice::Auto)]
        executor: lipstream::config::ExecutorChoice,
        /// The models folder whose VAE the engine uses (`models synth|pull`).
        #[arg(long)]
        models: PathBuf,
        /// MTCNN weights (pnet.pt, rnet.pt, onet.pt); default: the models folder's mtcnn/.
        #[arg(long)]
        mtcnn: Option<PathBuf>,
        /// Output bundle (NAME.safetensors; NAME.latents.safetensors is written beside it).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum EngineCmd {
    /// Build an engine for this GPU: time every convolution and GEMM algorithm for each batch
    /// profile, and write the configs, the choices and the fp16 weights to one file.
    Build {
        /// A models folder (`models synth|pull`); default: MuseTalk-size random weights in memory.
        #[arg(long)]
        models: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = EngineMode::Avatar)]
        mode: EngineMode,
        /// Batch profiles, comma separated (default: 1,2,4,8,16,24 for avatar, 1,2,4,8,16 for
        /// camera).
        #[arg(long, value_delimiter = ',')]
        batches: Vec<usize>,
        /// The GPU to build on: the engine runs on every GPU of its model (a host with GPUs of
        /// different models needs one engine per model; `serve --engine a.engine,b.engine`).
        #[arg(long, default_value_t = 0)]
        gpu: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe an engine file (and say whether it runs on this machine).
    Info { file: PathBuf },
    /// Run UNet, VAE encode/decode and whisper on both executors with the same random inputs and
    /// print the relative L2 error of every output (JSON on stdout).
    Check {
        /// A models folder (`models synth|pull`); default: MuseTalk-size random weights in memory.
        #[arg(long)]
        models: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Also write inputs and both executors' outputs to DIR/check.safetensors.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
}

/// What an engine serves.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum EngineMode {
    /// UNet + VAE decode per frame (latents cached in the avatar bundle).
    Avatar,
    /// 2 VAE encodes + UNet + VAE decode per frame.
    Camera,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Open N synthetic WebRTC sessions against a running server and measure glass-to-glass
    /// latency, fps, late frames, jitter and A/V offset; JSON + HTML report.
    Sessions {
        /// Server base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Sessions at once (with --ramp: the first load).
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Seconds each load runs.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        #[arg(long, value_enum, default_value_t = lipstream::bench::Mode::Camera)]
        mode: lipstream::bench::Mode,
        /// synthetic (stamped moving test pattern + click train), or files separated by commas:
        /// a PNG picture (e.g. a face for the lip-sync stage) sent as a still or a .y4m clip
        /// (4:2:0, `ffmpeg -i talk.mp4 -pix_fmt yuv420p talk.y4m`) sent looped, both stamped;
        /// and a .wav recording (`ffmpeg -i talk.mp4 talk.wav`) sent looped as the audio, the
        /// click train laid over it in camera mode. E.g. `talk.y4m,talk.wav`.
        #[arg(long, default_value = "synthetic")]
        media: String,
        /// Double the sessions until p95 exceeds the budget or late frames exceed 1 %, then
        /// bisect down to the largest sustainable count.
        #[arg(long)]
        ramp: bool,
        /// p95 latency budget for --ramp, ms.
        #[arg(long, default_value_t = 200.0)]
        budget_ms: f64,
        /// Folder for sessions.json and sessions.html.
        #[arg(long)]
        out: Option<PathBuf>,
        /// An earlier sessions.json to compare with, figure by figure.
        #[arg(long)]
        compare: Option<PathBuf>,
        #[arg(long, env = "LIPSTREAM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long, default_value_t = 640)]
        width: usize,
        #[arg(long, default_value_t = 480)]
        height: usize,
    },
    /// Time the CUDA engine per stage and batch profile (CUDA graphs, tuned cuDNN algorithms).
    Engine {
        /// A models folder (`models synth|pull`); default: MuseTalk-size random weights in memory.
        #[arg(long, conflicts_with = "engine")]
        models: Option<PathBuf>,
        /// An engine file (`engine build`): its weights and algorithm choices, its profiles.
        #[arg(long)]
        engine: Option<PathBuf>,
        /// Batch profiles, comma separated (default 1,2,4,8,16); with --engine, which of the
        /// file's profiles to time (default all).
        #[arg(long, value_delimiter = ',')]
        batches: Option<Vec<usize>>,
        /// Stages to time, comma separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "avatar,camera,unet,vae-decode,vae-encode,whisper,whisper-rows"
        )]
        stages: Vec<lipstream::engine::Stage>,
        /// Timed replays per figure (the median is reported).
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Launch every step eagerly instead of replaying CUDA graphs (debugging).
        #[arg(long)]
        no_graphs: bool,
        /// Also print a per-op-kind time breakdown of every stage's smallest and largest profile.
        #[arg(long)]
        profile: bool,
        /// Every convolution on cuDNN (no im2col + cuBLASLt lowering), to measure what the
        /// lowering buys on this GPU. Ignored with --engine (the file's choices are replayed).
        #[arg(long)]
        cudnn_only: bool,
        /// Every cuDNN convolution on its legacy call (no graph-API engine), to measure what
        /// the graph API's engines buy on this GPU. Ignored with --engine.
        #[arg(long)]
        legacy_convs: bool,
        /// Also time each frame stage with two replays in flight on two streams (a second
        /// arena and workspaces), against back-to-back replays on one: what a renderer with two
        /// batches in flight would gain in frames per second.
        #[arg(long, conflicts_with = "no_graphs")]
        two_streams: bool,
        /// Write the JSON report here too.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Time the CPU reference executor on one UNet step and one VAE decode (MuseTalk shapes).
    Cpu {
        /// A models folder as `models synth` or `models pull` writes it.
        #[arg(long)]
        models: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed runs per stage (after one warm-up run).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Write random-weight checkpoints in the upstream layout and formats (MuseTalk's models/).
    Synth {
        /// musetalk-1.5 (real sizes, ~4 GB) or tiny (same shapes in and out, few channels).
        #[arg(long)]
        preset: Preset,
        /// Output folder (created).
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed writes the same weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Download the upstream checkpoints into the Hugging Face cache and link them into a
    /// models folder (honours HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN; resumable).
    Pull {
        /// Only musetalk-1.5 exists upstream.
        model: String,
        /// Models folder to link the files into.
        #[arg(long, default_value = "models")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Cmd::Serve(args) => {
            let sub = matches.subcommand_matches("serve").unwrap_or(&matches);
            let config = args.resolve(sub)?;
            tokio::runtime::Runtime::new()?.block_on(lipstream::server::serve(config))
        }
        Cmd::Doctor => {
            doctor();
            Ok(())
        }
        Cmd::Avatar(AvatarCmd::Prepare {
            image,
            video,
            max_seconds,
            executor,
            models,
            mtcnn,
            out,
        }) => {
            let input = match (image, video) {
                (Some(p), None) => AvatarInput::Image(p),
                (None, Some(p)) => AvatarInput::Video(p, max_seconds),
                _ => anyhow::bail!("give one of --image and --video"),
            };
            avatar_prepare(&input, executor, &models, mtcnn.as_deref(), &out)
        }
        Cmd::Engine(EngineCmd::Build {
            models,
            mode,
            batches,
            gpu,
            out,
        }) => {
            let src = sources(models.as_deref())?;
            let stage = match mode {
                EngineMode::Avatar => lipstream::engine::Stage::Avatar,
                EngineMode::Camera => lipstream::engine::Stage::Camera,
            };
            let batches = if batches.is_empty() {
                stage.default_batches()
            } else {
                batches
            };
            lipstream::engine::file::build(&src, stage, &batches, gpu, &out)?;
            print_out(&lipstream::engine::file::describe(&out)?)
        }
        Cmd::Engine(EngineCmd::Info { file }) => {
            let mut text = lipstream::engine::file::describe(&file)?;
            let header = lipstream::engine::file::read_header(&file)?;
            text += &match lipstream_gpu::Device::open(0) {
                Ok(device) => match lipstream::engine::file::incompatibility(&header, &device)? {
                    None => format!("  runs on this machine's GPU 0 ({})\n", device.name),
                    Some(why) => format!("  does not run here: {why}\n"),
                },
                Err(e) => format!("  no GPU here to run it on ({e})\n"),
            };
            print_out(&text)
        }
        Cmd::Engine(EngineCmd::Check {
            models,
            batch,
            dump,
        }) => {
            let src = sources(models.as_deref())?;
            let report = lipstream::engine::check(&src, batch, dump.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::Engine {
            models,
            engine,
            batches,
            stages,
            runs,
            no_graphs,
            profile,
            cudnn_only,
            legacy_convs,
            two_streams,
            out,
        }) => {
            let (src, preload, batches) = match &engine {
                Some(path) => {
                    use lipstream::engine::file;
                    let header = file::read_header(path)?;
                    let device = lipstream_gpu::Device::open(0)?;
                    if let Some(why) = file::incompatibility(&header, &device)? {
                        anyhow::bail!("{}: {why}", path.display());
                    }
                    drop(device);
                    let src = lipstream::engine::Sources::from_engine(path, &header)?;
                    let chosen: Vec<usize> = match &batches {
                        Some(want) => header
                            .batches
                            .iter()
                            .copied()
                            .filter(|b| want.contains(b))
                            .collect(),
                        None => header.batches.clone(),
                    };
                    if chosen.is_empty() {
                        anyhow::bail!(
                            "{} has profiles {:?}, none of {:?}",
                            path.display(),
                            header.batches,
                            batches.unwrap_or_default()
                        );
                    }
                    (src, file::tuned(&header)?, chosen)
                }
                None => (
                    sources(models.as_deref())?,
                    lipstream_gpu::Tuning::default(),
                    batches.unwrap_or_else(|| vec![1, 2, 4, 8, 16]),
                ),
            };
            let opts = lipstream::engine::BenchOptions {
                batches,
                stages,
                runs,
                graphs: !no_graphs,
                profile,
                conv_gemm: !cudnn_only,
                conv_graphs: !legacy_convs,
                two_streams,
            };
            let report = lipstream::engine::bench(&src, &opts, &preload)?;
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(path) = out {
                std::fs::write(&path, &text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            println!("{text}");
            Ok(())
        }
        Cmd::Bench(BenchCmd::Cpu {
            models,
            batch,
            runs,
        }) => bench_cpu(&models, batch, runs),
        Cmd::Bench(BenchCmd::Sessions {
            url,
            sessions,
            duration,
            mode,
            media,
            ramp,
            budget_ms,
            out,
            compare,
            token,
            width,
            height,
        }) => bench_sessions(
            url, sessions, duration, mode, media, ramp, budget_ms, out, compare, token, width,
            height,
        ),
        Cmd::Models(ModelsCmd::Pull { model, out }) => {
            if model != "musetalk-1.5" {
                anyhow::bail!("unknown model {model:?}; lipstream pulls musetalk-1.5");
            }
            let opts = lipstream::pull::PullOptions::from_env(
                out,
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            );
            lipstream::pull::pull_musetalk_15(&opts)?;
            eprintln!(
                "models ready in {} (cache {})",
                opts.out.display(),
                opts.cache.display()
            );
            Ok(())
        }
        Cmd::Models(ModelsCmd::Synth { preset, out, seed }) => {
            let started = std::time::Instant::now();
            presets::synth(preset, seed, &out, |path| {
                let mb = std::fs::metadata(path)
                    .map(|m| m.len() as f64 / 1e6)
                    .unwrap_or(0.0);
                eprintln!("wrote {} ({mb:.1} MB)", path.display());
            })?;
            eprintln!(
                "synthesised {preset:?} (seed {seed}) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Median wall time of `runs` runs of each stage, after a warm-up run; prints a JSON line.
/// Reads a PNG as packed RGB.
fn read_png(path: &std::path::Path) -> anyhow::Result<(Vec<u8>, usize, usize)> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| anyhow::anyhow!("{}: not a PNG picture: {e}", path.display()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow::anyhow!("{}: picture too large", path.display()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| anyhow::anyhow!("{}: corrupt PNG: {e}", path.display()))?;
    buf.truncate(info.buffer_size());
    let (w, h) = (info.width as usize, info.height as usize);
    if info.bit_depth != png::BitDepth::Eight {
        anyhow::bail!("{}: only 8-bit PNGs are read", path.display());
    }
    let rgb = match info.color_type {
        png::ColorType::Rgb => buf,
        png::ColorType::Rgba => buf.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => buf.chunks(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        other => anyhow::bail!("{}: {other:?} PNGs are not read", path.display()),
    };
    Ok((rgb, w, h))
}

/// What `avatar prepare` starts from.
enum AvatarInput {
    Image(PathBuf),
    /// A clip and how many of its first seconds to take.
    Video(PathBuf, f64),
}

fn avatar_prepare(
    input: &AvatarInput,
    executor: lipstream::config::ExecutorChoice,
    models: &std::path::Path,
    mtcnn: Option<&std::path::Path>,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use lipstream_engines::models::mtcnn::{Mtcnn, MtcnnParams};

    let (source, frames) = match input {
        AvatarInput::Image(path) => (path, vec![read_png(path)?]),
        AvatarInput::Video(path, max_seconds) => {
            let clip = lipstream::media::clip::read_at_25fps(path, max_seconds * 1000.0)
                .map_err(|e| anyhow::anyhow!("--video {}: {e}", path.display()))?;
            // Each decoded picture is let go once it is RGB: a clip is large either way.
            let mut rgb = Vec::new();
            let frames = clip
                .into_iter()
                .map(|f| {
                    lipstream_engines::image::to_rgb(&f.planes(), &mut rgb);
                    (std::mem::take(&mut rgb), f.width, f.height)
                })
                .collect();
            (path, frames)
        }
    };
    let mtcnn_dir = mtcnn.map_or_else(|| models.join("mtcnn"), |p| p.to_path_buf());
    let mut detector = Mtcnn::open(&mtcnn_dir, MtcnnParams::default())
        .map_err(|e| anyhow::anyhow!("MTCNN weights in {}: {e}", mtcnn_dir.display()))?;
    let mut encoder = lipstream::engine::CropEncoder::open(models, executor.cuda(true)?)?;
    eprintln!(
        "{} frame(s) from {}, VAE encoder on the {} executor",
        frames.len(),
        source.display(),
        encoder.executor()
    );
    let bar = indicatif::ProgressBar::new(frames.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} frames, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let bundle = lipstream_engines::avatar::prepare(
        frames,
        &mut detector,
        |x| encoder.encode(x),
        |n| bar.set_position(n as u64),
    )?;
    bar.finish();
    let meta = std::collections::BTreeMap::from([
        ("source".to_string(), source.display().to_string()),
        ("models".to_string(), models.display().to_string()),
        ("executor".to_string(), encoder.executor().to_string()),
    ]);
    bundle.write(out, &meta)?;
    let f = &bundle.frames[0];
    println!(
        "wrote {} ({} frame(s) {}x{}, first face box {:.0},{:.0} - {:.0},{:.0})",
        out.display(),
        bundle.frames.len(),
        f.width,
        f.height,
        f.face.x0,
        f.face.y0,
        f.face.x1,
        f.face.y1
    );
    Ok(())
}

fn sources(models: Option<&std::path::Path>) -> anyhow::Result<lipstream::engine::Sources> {
    Ok(match models {
        Some(dir) => lipstream::engine::Sources::open(dir)?,
        None => lipstream::engine::Sources::synth(Preset::MuseTalk15, 0),
    })
}

fn bench_cpu(models: &std::path::Path, batch: usize, runs: usize) -> anyhow::Result<()> {
    use lipstream_engines::models::config::{self, UNetConfig, VaeConfig};
    use lipstream_engines::models::{unet, vae};
    use lipstream_engines::weights::Weights;
    use lipstream_engines::{cpu, Graph, Tensor};

    let time = |name: &str, g: &Graph, inputs: &[(&str, &Tensor)]| -> anyhow::Result<f64> {
        cpu::run(g, inputs)?;
        let mut ms: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                cpu::run(g, inputs).map(|_| t.elapsed().as_secs_f64() * 1000.0)
            })
            .collect::<Result<_, _>>()?;
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        eprintln!(
            "{name}: {median:.0} ms (median of {}), {:.1} GMAC",
            ms.len(),
            g.macs() as f64 / 1e9
        );
        Ok(median)
    };
    let ucfg: UNetConfig = config::read(&models.join("musetalkV15/musetalk.json"))?;
    let w = Weights::open(&models.join("musetalkV15/unet.pth"))?;
    let ug = unet::build(&w.root(""), &ucfg, batch, 32)?;
    w.finish("")?;
    drop(w);
    let sample = Tensor::zeros(&[batch, ucfg.in_channels, 32, 32]);
    let ctx = Tensor::zeros(&[batch, unet::AUDIO_TOKENS, ucfg.cross_attention_dim]);
    let unet_ms = time(
        "unet",
        &ug,
        &[("sample", &sample), ("encoder_hidden_states", &ctx)],
    )?;
    drop(ug);
    let vcfg: VaeConfig = config::read(&models.join("sd-vae/config.json"))?;
    let w = Weights::open(&models.join("sd-vae/diffusion_pytorch_model.safetensors"))?;
    let dg = vae::build_decoder(&w.root(""), &vcfg, batch, 32)?;
    let latent = Tensor::zeros(&[batch, vcfg.latent_channels, 32, 32]);
    let vae_ms = time("vae_decode", &dg, &[("latent", &latent)])?;
    drop(dg);
    let wcfg: config::WhisperConfig = config::read(&models.join("whisper/config.json"))?;
    let w = Weights::open(&models.join("whisper/model.safetensors"))?;
    let wg = lipstream_engines::models::whisper::build(&w.root("model.encoder"), &wcfg, 1)?;
    w.finish("model.encoder.")?;
    let mel = Tensor::zeros(&[
        1,
        wcfg.num_mel_bins,
        lipstream_engines::models::whisper::MEL_FRAMES,
    ]);
    let whisper_ms = time("whisper_encoder_30s", &wg, &[("input_features", &mel)])?;
    // What a server runs: the last layer on the rows one hop reads.
    let rg = lipstream_engines::models::whisper::build_rows(
        &w.root("model.encoder"),
        &wcfg,
        1,
        lipstream_engines::models::whisper::SERVED_ROWS,
    )?;
    let first = Tensor::new(vec![1], vec![0.0]);
    let whisper_rows_ms = time(
        "whisper_encoder_30s_served_rows",
        &rg,
        &[
            ("input_features", &mel),
            (lipstream_engines::models::whisper::FIRST_ROW, &first),
        ],
    )?;
    let report = serde_json::json!({
        "executor": "cpu",
        "threads": rayon_threads(),
        "batch": batch,
        "unet_ms": unet_ms,
        "vae_decode_ms": vae_ms,
        "whisper_encoder_30s_ms": whisper_ms,
        "whisper_encoder_30s_served_rows_ms": whisper_rows_ms,
        "models": models.display().to_string(),
    });
    println!("{report}");
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[allow(clippy::too_many_arguments)]
fn bench_sessions(
    url: String,
    sessions: usize,
    duration: u64,
    mode: lipstream::bench::Mode,
    media: String,
    ramp: bool,
    budget_ms: f64,
    out: Option<PathBuf>,
    compare: Option<PathBuf>,
    token: Option<String>,
    width: usize,
    height: usize,
) -> anyhow::Result<()> {
    let media = read_media(&media)?;
    let old = match &compare {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            let report = serde_json::from_str::<lipstream::bench::BenchReport>(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a sessions report: {e}", p.display()))?;
            Some(report)
        }
        None => None,
    };
    let opts = lipstream::bench::SessionsOptions {
        url,
        token,
        sessions,
        duration: std::time::Duration::from_secs(duration.max(1)),
        mode,
        ramp,
        budget_ms,
        width,
        height,
        fps: 25,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        picture: media.picture,
        clip: media.clip,
        speech: media.speech,
    };
    let report = lipstream::bench::run(&opts)?;
    println!("{}", lipstream::bench::summary(&report));
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        let (json, html) = lipstream::bench::output_paths(&dir);
        std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
        let page = lipstream::bench::report::html(&report)
            .map_err(|e| anyhow::anyhow!("plotting: {e}"))?;
        std::fs::write(&html, page)?;
        eprintln!("wrote {} and {}", json.display(), html.display());
    }
    if let Some(old) = old {
        print!("{}", lipstream::bench::compare(&old, &report));
    }
    Ok(())
}

/// What `bench sessions --media` publishes; `None` is synthetic.
#[derive(Default)]
struct Media {
    picture: Option<std::sync::Arc<lipstream::media::frame::VideoFrame>>,
    clip: Option<std::sync::Arc<Vec<lipstream::media::frame::VideoFrame>>>,
    speech: Option<std::sync::Arc<Vec<i16>>>,
}

/// `--media`: `synthetic`, or files separated by commas — at most one video (a PNG still or a
/// .y4m clip) and one audio (a .wav recording); what is not given stays synthetic.
fn read_media(spec: &str) -> anyhow::Result<Media> {
    use anyhow::{anyhow, bail};
    let mut m = Media::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let lower = item.to_ascii_lowercase();
        let video_twice = || anyhow!("--media {spec}: one video (a PNG or a .y4m) at most");
        if item == "synthetic" {
            continue;
        } else if lower.ends_with(".wav") {
            if m.speech.is_some() {
                bail!("--media {spec}: one .wav at most");
            }
            let bytes = std::fs::read(item).map_err(|e| anyhow!("--media {item}: {e}"))?;
            let wav =
                lipstream::media::wav::parse(&bytes).map_err(|e| anyhow!("--media {item}: {e}"))?;
            let rate = lipstream::client::publisher::AUDIO_RATE;
            let mut pcm = lipstream::media::wav::resample(&wav.pcm, wav.rate, rate);
            lipstream::media::wav::normalize(&mut pcm, lipstream::client::synth::SPEECH_PEAK);
            eprintln!(
                "--media {item}: {:.1} s at {} Hz, looped{}",
                wav.pcm.len() as f64 / f64::from(wav.rate),
                wav.rate,
                if wav.pcm.len() >= lipstream::media::wav::MAX_SECONDS * wav.rate as usize {
                    " (the start of a longer recording)"
                } else {
                    ""
                }
            );
            m.speech = Some(std::sync::Arc::new(pcm));
        } else if lower.ends_with(".y4m") {
            if m.picture.is_some() || m.clip.is_some() {
                return Err(video_twice());
            }
            let c = lipstream::media::y4m::open(std::path::Path::new(item))
                .map_err(|e| anyhow!("--media {item}: {e}"))?;
            if c.frames[0].width < 256 {
                bail!("--media {item}: at least 256 pixels wide, for the frame stamp");
            }
            eprintln!(
                "--media {item}: {} frames of {}x{}, looped{}",
                c.frames.len(),
                c.frames[0].width,
                c.frames[0].height,
                if c.frames.len() == lipstream::media::y4m::MAX_FRAMES {
                    " (the first ones of a longer clip)"
                } else {
                    ""
                }
            );
            m.clip = Some(std::sync::Arc::new(c.frames));
        } else {
            if m.picture.is_some() || m.clip.is_some() {
                return Err(video_twice());
            }
            let (rgb, w, h) = read_png(std::path::Path::new(item)).map_err(|e| {
                anyhow!("--media: {e} (give `synthetic`, a PNG picture, a .y4m clip and/or a .wav recording)")
            })?;
            let frame = lipstream::media::frame::VideoFrame::from_rgb(&rgb, w, h)
                .ok_or_else(|| anyhow!("--media {item}: picture too small"))?;
            if frame.width < 256 {
                bail!("--media {item}: at least 256 pixels wide, for the frame stamp");
            }
            m.picture = Some(std::sync::Arc::new(frame));
        }
    }
    Ok(m)
}

fn doctor() {
    let r = lipstream_gpu::device::report();
    let yes = |b: bool| if b { "found" } else { "missing" };
    let l = &r.libraries;
    println!("NVIDIA driver (libcuda): {}", yes(l.driver));
    if let Some((major, minor)) = r.driver_version {
        println!("  CUDA driver API {major}.{minor}");
    }
    println!("NVRTC: {}", yes(l.nvrtc));
    println!(
        "cuBLAS: {}  cuBLASLt: {}  cuDNN: {}",
        yes(l.cublas),
        yes(l.cublaslt),
        yes(l.cudnn)
    );
    for g in &r.gpus {
        println!("{g}");
    }
    if let Some(e) = &r.error {
        println!("problem: {e}");
    }
    match (
        lipstream_gpu::device::executor_choice(true),
        lipstream_gpu::device::executor_choice(false),
    ) {
        (Ok(gpu), _) => println!("executor: CUDA ({gpu})"),
        (Err(why), Ok(gpu)) => println!(
            "executor: CUDA ({gpu}) for engine files only; models folders and `engine build` need NVRTC ({why})"
        ),
        (Err(why), Err(_)) => println!("executor: CPU reference executor ({why})"),
    }
    // Kernel choices not yet measured to pay, each off unless its variable is 1. The device
    // scripts read this list (scripts/device/env_ab.sh, test.sh EXPERIMENTS=1).
    for e in lipstream_gpu::kernels::Experiment::ALL {
        let state = if e.on() { "on" } else { "off" };
        println!("experiment {}: {state} ({})", e.var(), e.about());
    }
}

/// Writes a report to stdout; a reader that stopped early (`lipstream engine info FILE | head`)
/// is not an error, where `print!` would panic.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

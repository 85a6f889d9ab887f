//! `lipstream serve` settings: flags, then `LIPSTREAM_*` environment variables, then an optional
//! TOML file, then defaults — in that order of precedence.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;

/// Flags of `lipstream serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "LIPSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address (page, WHIP, WHEP, metrics).
    #[arg(long, env = "LIPSTREAM_HTTP", default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// UDP port for all WebRTC media (one socket per host address, all on this port; 0 = any).
    #[arg(long, env = "LIPSTREAM_UDP_PORT", default_value_t = 50_000)]
    pub udp_port: u16,
    /// Host addresses offered as ICE candidates (comma-separated). Default: loopback plus every
    /// non-link-local address of this machine's interfaces.
    #[arg(long, env = "LIPSTREAM_ICE_ADDRS", value_delimiter = ',')]
    pub ice_addrs: Vec<IpAddr>,
    /// Most published sessions at once; more get 503 with Retry-After.
    #[arg(long, env = "LIPSTREAM_MAX_SESSIONS", default_value_t = 32)]
    pub max_sessions: usize,
    /// Most WHEP viewers per session.
    #[arg(long, env = "LIPSTREAM_MAX_VIEWERS", default_value_t = 16)]
    pub max_viewers: usize,
    /// Seconds without any packet from a peer before its session is torn down.
    #[arg(long, env = "LIPSTREAM_ICE_TIMEOUT_S", default_value_t = 15)]
    pub ice_timeout_s: u64,
    /// Per-frame budget of the pipeline stage in ms; later frames go out unprocessed.
    #[arg(long, env = "LIPSTREAM_FRAME_BUDGET_MS", default_value_t = 40)]
    pub frame_budget_ms: u64,
    /// Starting bitrate of the returned video, kbit/s (then it follows the bandwidth estimate).
    #[arg(long, env = "LIPSTREAM_VIDEO_KBPS", default_value_t = 1_200)]
    pub video_kbps: u32,
    /// Ceiling for the returned video's bitrate, kbit/s.
    #[arg(long, env = "LIPSTREAM_VIDEO_MAX_KBPS", default_value_t = 4_000)]
    pub video_max_kbps: u32,
    /// Bearer token required on WHIP/WHEP requests (OBS sends it as "Bearer Token").
    #[arg(long, env = "LIPSTREAM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Lip-sync with this models folder (`lipstream models synth|pull`): the publisher's own face
    /// re-rendered to match its audio (camera mode).
    #[arg(long, env = "LIPSTREAM_MODELS")]
    pub models: Option<PathBuf>,
    /// Lip-sync with this CUDA engine file (`lipstream engine build`) instead of a models folder;
    /// on a host with GPUs of different models, one file per model, comma separated (each GPU
    /// takes the one built for it).
    #[arg(
        long,
        env = "LIPSTREAM_ENGINE",
        conflicts_with = "models",
        value_delimiter = ','
    )]
    pub engine: Vec<PathBuf>,
    /// Avatar mode: this prepared avatar (`lipstream avatar prepare`) speaks the publisher's
    /// audio; video from the publisher is not shown. Needs --models or an avatar --engine.
    #[arg(long, env = "LIPSTREAM_AVATAR")]
    pub avatar: Option<PathBuf>,
    /// Face detector weights (pnet.pt, rnet.pt, onet.pt); default: the models folder's mtcnn/.
    #[arg(long, env = "LIPSTREAM_MTCNN")]
    pub mtcnn: Option<PathBuf>,
    /// Which executor runs a models folder: auto (CUDA when its libraries and a GPU are here,
    /// else the CPU reference executor), cpu, or cuda.
    #[arg(long, env = "LIPSTREAM_EXECUTOR", value_enum, default_value_t = ExecutorChoice::Auto)]
    pub executor: ExecutorChoice,
    /// Batch sizes the renderer runs (default on CUDA: 1,2,4,8,16, and 24 in avatar mode; 1,2 on
    /// the CPU; with --engine, every profile the file holds, and those given must be among them).
    #[arg(long, env = "LIPSTREAM_BATCHES", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// GPUs (CUDA ordinals) that render, one renderer each; new sessions go to the one with
    /// the most headroom. Default: GPU 0.
    #[arg(long, env = "LIPSTREAM_GPUS", value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// Video frames per whisper encode: each more saves GPU time and adds 40 ms of latency.
    #[arg(long, env = "LIPSTREAM_AUDIO_HOP_FRAMES", default_value_t = 2)]
    pub audio_hop_frames: usize,
    /// On a GPU, how long (ms) a whisper window may wait for other sessions' windows so that
    /// they run as one batch (one window alone costs an H100 0.34 ms, each of 8 together
    /// 0.20); the wait comes out of the frame budget. 0 runs each window as it comes.
    #[arg(long, env = "LIPSTREAM_WHISPER_WAIT_MS", default_value_t = 6)]
    pub whisper_wait_ms: u64,
    /// Let frames wait for a fuller batch while the earliest of them would still be out in time
    /// (their output leaves on the media clock either way): below full load the GPU spends a
    /// tenth to a fifth less time on the same frames (the batcher's simulation with the batch
    /// times an H100 server measures: 8 sessions 47 % -> 34 % busy, 16 sessions 77 % -> 67 %,
    /// 23 sessions 99 % -> 94 %; served: 16 sessions 95 % -> 67 %). Not while the GPU's load
    /// is 0.85 or more or it gave up frames in the last second: near full load the wait cost
    /// frames (24 sessions served: 1.08 % -> 1.94 % late). Off: every waiting frame runs as
    /// soon as the GPU is free.
    #[arg(long, env = "LIPSTREAM_HOLD_BATCHES")]
    pub hold_batches: bool,
    /// Refuse a new publisher (503 with Retry-After) unless some GPU is giving up no frames
    /// and would stay within this share of its capacity with one more session
    /// (`lipstream_gpu_load_ratio`: its frames' GPU time in its cheapest batches, over the last
    /// second). E.g. 0.95. Unset: every publisher is taken (up to --max-sessions), and a GPU past
    /// its capacity gives up frames of all its sessions.
    #[arg(long, env = "LIPSTREAM_MAX_GPU_LOAD")]
    pub max_gpu_load: Option<f64>,
    /// Smallest face (pixels) the camera mode looks for; smaller is slower to detect.
    #[arg(long, env = "LIPSTREAM_MIN_FACE_PX", default_value_t = 64.0)]
    pub min_face_px: f64,
    /// Testing only: a stage that holds every frame this long instead of the identity stage.
    #[arg(long, hide = true)]
    pub debug_stage_delay_ms: Option<u64>,
    /// Testing only: a stage that hears this much audio past each frame (held video and audio).
    #[arg(long, hide = true)]
    pub debug_stage_lookahead_ms: Option<u64>,
}

/// Which executor runs the lip-sync model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    Auto,
    Cpu,
    Cuda,
}

impl ExecutorChoice {
    /// Whether the CUDA executor runs: `auto` takes it when the GPU and the libraries it needs
    /// (NVRTC too when kernels must be `compile`d) are here, `cuda` is an error without them.
    pub fn cuda(self, compile: bool) -> anyhow::Result<bool> {
        match self {
            ExecutorChoice::Cpu => Ok(false),
            ExecutorChoice::Auto => Ok(lipstream_gpu::device::executor_choice(compile).is_ok()),
            ExecutorChoice::Cuda => lipstream_gpu::device::executor_choice(compile)
                .map(|_| true)
                .map_err(|why| anyhow::anyhow!("--executor cuda, but no CUDA here: {why}")),
        }
    }
}

/// The lip-sync pipeline's settings (absent: frames pass through).
#[derive(Clone, Debug)]
pub struct LipsyncConfig {
    pub source: crate::lipsync::ModelSource,
    pub mtcnn_dir: PathBuf,
    pub executor: ExecutorChoice,
    /// Empty: the executor's default.
    pub batches: Vec<usize>,
    /// CUDA ordinals, one renderer each (never empty).
    pub gpus: Vec<usize>,
    pub audio_hop_frames: usize,
    /// How long a whisper window may wait to be batched with others (CUDA).
    pub whisper_wait: Duration,
    /// Frames wait for a fuller batch while their deadlines allow.
    pub hold_batches: bool,
    /// The load past which no GPU takes a new session (none: no such limit).
    pub max_gpu_load: Option<f64>,
    pub min_face_px: f64,
    /// Avatar mode's prepared avatar (else camera mode).
    pub avatar: Option<PathBuf>,
}

/// A path or a list of them (TOML `engine = "a.engine"` or `engine = ["a.engine", "b.engine"]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Paths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl From<Paths> for Vec<PathBuf> {
    fn from(p: Paths) -> Self {
        match p {
            Paths::One(p) => vec![p],
            Paths::Many(v) => v,
        }
    }
}

/// The TOML file: every key optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http: Option<SocketAddr>,
    udp_port: Option<u16>,
    ice_addrs: Option<Vec<IpAddr>>,
    max_sessions: Option<usize>,
    max_viewers: Option<usize>,
    ice_timeout_s: Option<u64>,
    frame_budget_ms: Option<u64>,
    video_kbps: Option<u32>,
    video_max_kbps: Option<u32>,
    token: Option<String>,
    models: Option<PathBuf>,
    engine: Option<Paths>,
    avatar: Option<PathBuf>,
    mtcnn: Option<PathBuf>,
    executor: Option<ExecutorChoice>,
    batches: Option<Vec<usize>>,
    gpus: Option<Vec<usize>>,
    audio_hop_frames: Option<usize>,
    whisper_wait_ms: Option<u64>,
    hold_batches: Option<bool>,
    max_gpu_load: Option<f64>,
    min_face_px: Option<f64>,
}

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub http: SocketAddr,
    pub udp_port: u16,
    pub ice_addrs: Vec<IpAddr>,
    pub max_sessions: usize,
    pub max_viewers: usize,
    pub ice_timeout: Duration,
    pub frame_budget: Duration,
    pub video_bps: u32,
    pub video_max_bps: u32,
    pub token: Option<String>,
    pub lipsync: Option<LipsyncConfig>,
    pub debug_stage_delay_ms: Option<u64>,
    pub debug_stage_lookahead_ms: Option<u64>,
}

impl ServeArgs {
    /// Merges in the TOML file; `matches` tells which flags the user set (those win over it).
    pub fn resolve(mut self, matches: &ArgMatches) -> anyhow::Result<ServeConfig> {
        if let Some(path) = &self.config {
            let file = read_file(path)?;
            let unset = |id: &str| {
                matches!(
                    matches.value_source(id),
                    None | Some(ValueSource::DefaultValue)
                )
            };
            macro_rules! merge {
                ($($field:ident),*) => {$(
                    if let Some(v) = file.$field {
                        if unset(stringify!($field)) {
                            self.$field = v.into();
                        }
                    }
                )*};
            }
            merge!(
                http,
                udp_port,
                ice_addrs,
                max_sessions,
                max_viewers,
                ice_timeout_s
            );
            merge!(frame_budget_ms, video_kbps, video_max_kbps, token);
            merge!(
                executor,
                batches,
                gpus,
                audio_hop_frames,
                whisper_wait_ms,
                hold_batches,
                max_gpu_load,
                min_face_px,
                engine
            );
            for (value, from_file, id) in [
                (&mut self.models, file.models, "models"),
                (&mut self.avatar, file.avatar, "avatar"),
                (&mut self.mtcnn, file.mtcnn, "mtcnn"),
            ] {
                if from_file.is_some() && unset(id) {
                    *value = from_file;
                }
            }
        }
        if self.models.is_some() && !self.engine.is_empty() {
            anyhow::bail!("give a models folder or an engine file, not both");
        }
        let most = lipstream_engines::audio::stream::MAX_HOP_FRAMES;
        if !(1..=most).contains(&self.audio_hop_frames) {
            anyhow::bail!(
                "audio_hop_frames is {}: it must be 1 to {most} (one whisper window a second)",
                self.audio_hop_frames
            );
        }
        if let Some(max) = self.max_gpu_load {
            // Also false for NaN.
            if !(max > 0.0 && max <= 4.0) {
                anyhow::bail!(
                    "max_gpu_load is {max}: it must be above 0 and at most 4 (a share of a GPU's \
                     capacity, e.g. 0.95)"
                );
            }
        }
        let source = match (&self.models, self.engine.is_empty()) {
            (Some(dir), _) => Some(crate::lipsync::ModelSource::Models(dir.clone())),
            (None, false) => Some(crate::lipsync::ModelSource::Engine(self.engine.clone())),
            (None, true) => None,
        };
        let lipsync = match source {
            None if self.avatar.is_some() => anyhow::bail!(
                "--avatar needs the model: give --models DIR or an avatar --engine FILE"
            ),
            None if self.max_gpu_load.is_some() => anyhow::bail!(
                "--max-gpu-load limits lip-sync sessions: give --models DIR or --engine FILE"
            ),
            None => None,
            Some(source) => {
                let mtcnn_dir = match (&self.mtcnn, &self.models) {
                    (Some(dir), _) => dir.clone(),
                    (None, Some(models)) => models.join("mtcnn"),
                    // Avatar mode's faces were found when it was prepared.
                    (None, None) if self.avatar.is_some() => PathBuf::new(),
                    (None, None) => anyhow::bail!(
                        "camera lip-sync needs the face detector's weights: give --mtcnn DIR"
                    ),
                };
                Some(LipsyncConfig {
                    source,
                    mtcnn_dir,
                    executor: self.executor,
                    batches: self.batches.clone(),
                    gpus: {
                        let mut g = self.gpus.clone();
                        g.sort_unstable();
                        g.dedup();
                        if g.is_empty() {
                            g.push(0);
                        }
                        g
                    },
                    audio_hop_frames: self.audio_hop_frames,
                    whisper_wait: Duration::from_millis(self.whisper_wait_ms),
                    hold_batches: self.hold_batches,
                    max_gpu_load: self.max_gpu_load,
                    min_face_px: self.min_face_px,
                    avatar: self.avatar.clone(),
                })
            }
        };
        if self.video_kbps == 0 || self.video_max_kbps < self.video_kbps {
            anyhow::bail!(
                "video_kbps ({}) must be > 0 and at most video_max_kbps ({})",
                self.video_kbps,
                self.video_max_kbps
            );
        }
        if self.max_sessions == 0 {
            anyhow::bail!("max_sessions must be at least 1");
        }
        let ice_addrs = if self.ice_addrs.is_empty() {
            host_addresses()
        } else {
            self.ice_addrs
        };
        Ok(ServeConfig {
            http: self.http,
            udp_port: self.udp_port,
            ice_addrs,
            max_sessions: self.max_sessions,
            max_viewers: self.max_viewers,
            ice_timeout: Duration::from_secs(self.ice_timeout_s.max(1)),
            frame_budget: Duration::from_millis(self.frame_budget_ms),
            video_bps: self.video_kbps * 1000,
            video_max_bps: self.video_max_kbps * 1000,
            token: self.token.filter(|t| !t.is_empty()),
            lipsync,
            debug_stage_delay_ms: self.debug_stage_delay_ms,
            debug_stage_lookahead_ms: self.debug_stage_lookahead_ms,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

/// Loopback plus every interface address a peer could reach (IPv4 and global IPv6).
fn host_addresses() -> Vec<IpAddr> {
    let mut addrs = vec![IpAddr::from([127, 0, 0, 1])];
    if let Ok(ifaces) = if_addrs::get_if_addrs() {
        for iface in ifaces {
            let ip = iface.ip();
            let usable = match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
                IpAddr::V6(v6) => {
                    !v6.is_loopback()
                        && (v6.segments()[0] & 0xffc0) != 0xfe80
                        && !v6.is_unspecified()
                }
            };
            if usable && !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn resolve(args: &[&str]) -> anyhow::Result<ServeConfig> {
        let matches = Cli::command().try_get_matches_from(args)?;
        let cli = Cli::from_arg_matches(&matches)?;
        cli.serve.resolve(&matches)
    }

    /// `serve.toml` holding `text` in this process's folder named after `tag`.
    fn config_file(tag: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lipstream-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let path = config_file(
            "flags",
            "max_sessions = 5\nudp_port = 40000\nice_addrs = [\"127.0.0.1\"]\n",
        );
        let p = path.to_str().unwrap();
        let c = resolve(&["x", "--config", p, "--udp-port", "41000"]).unwrap();
        assert_eq!((c.max_sessions, c.udp_port), (5, 41000));
        assert_eq!(c.ice_addrs, vec![IpAddr::from([127, 0, 0, 1])]);

        std::fs::write(&path, "max_sesions = 5\n").unwrap();
        let err = resolve(&["x", "--config", p]).unwrap_err().to_string();
        assert!(err.contains("max_sesions"), "{err}");
        let err = resolve(&["x", "--config", "/nonexistent.toml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent.toml"), "{err}");
    }

    #[test]
    fn holding_batches_comes_from_the_flag_or_the_file_and_is_off_by_default() {
        let hold = |args: &[&str]| resolve(args).unwrap().lipsync.unwrap().hold_batches;
        assert!(!hold(&["x", "--models", "/m"]));
        assert!(hold(&["x", "--models", "/m", "--hold-batches"]));
        let path = config_file("hold", "hold_batches = true\n");
        assert!(hold(&[
            "x",
            "--models",
            "/m",
            "--config",
            path.to_str().unwrap()
        ]));
    }

    #[test]
    fn whisper_wait_comes_from_the_flag_or_the_file() {
        let path = config_file("wait", "whisper_wait_ms = 6\n");
        let p = path.to_str().unwrap();
        let wait = |args: &[&str]| resolve(args).unwrap().lipsync.unwrap().whisper_wait;
        let models = ["x", "--models", "/m", "--config", p];
        assert_eq!(wait(&models), Duration::from_millis(6));
        let flag = [&models[..], &["--whisper-wait-ms", "2"]].concat();
        assert_eq!(wait(&flag), Duration::from_millis(2));
        assert_eq!(wait(&["x", "--models", "/m"]), Duration::from_millis(6));
    }

    #[test]
    fn a_gpu_load_limit_comes_from_the_flag_or_the_file_and_must_make_sense() {
        let path = config_file("load", "max_gpu_load = 0.9\n");
        let p = path.to_str().unwrap();
        let limit = |args: &[&str]| resolve(args).unwrap().lipsync.unwrap().max_gpu_load;
        assert_eq!(limit(&["x", "--models", "/m"]), None);
        let file = ["x", "--models", "/m", "--config", p];
        assert_eq!(limit(&file), Some(0.9));
        let flag = [&file[..], &["--max-gpu-load", "0.95"]].concat();
        assert_eq!(limit(&flag), Some(0.95));
        for bad in ["0", "-1", "5", "NaN"] {
            let flag = format!("--max-gpu-load={bad}");
            let err = resolve(&["x", "--models", "/m", &flag])
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_gpu_load is"), "{bad}: {err}");
        }
        let err = resolve(&["x", "--max-gpu-load", "0.9"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--models DIR or --engine FILE"), "{err}");
    }

    #[test]
    fn engine_files_come_one_per_gpu_model_from_flags_or_the_file() {
        use crate::lipsync::ModelSource;
        let engines = |c: &ServeConfig| match c.lipsync.as_ref().map(|l| &l.source) {
            Some(ModelSource::Engine(p)) => p.clone(),
            _ => vec![],
        };
        let args = [
            "x",
            "--engine",
            "h100.engine,a100.engine",
            "--avatar",
            "a.safetensors",
        ];
        let c = resolve(&args).unwrap();
        assert_eq!(
            engines(&c),
            vec![PathBuf::from("h100.engine"), PathBuf::from("a100.engine")]
        );
        let path = config_file("engines", "");
        let p = path.to_str().unwrap();
        for (toml, want) in [
            ("engine = \"one.engine\"\n", vec!["one.engine"]),
            (
                "engine = [\"a.engine\", \"b.engine\"]\n",
                vec!["a.engine", "b.engine"],
            ),
        ] {
            std::fs::write(&path, format!("{toml}avatar = \"a.safetensors\"\n")).unwrap();
            let c = resolve(&["x", "--config", p]).unwrap();
            let want: Vec<PathBuf> = want.into_iter().map(PathBuf::from).collect();
            assert_eq!(engines(&c), want, "{toml}");
        }
        let err = resolve(&["x", "--engine", "e.engine", "--models", "m"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("models") || err.contains("engine"), "{err}");
        if let Some(dir) = path.parent() {
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn whisper_hops_are_one_to_twenty_five_frames() {
        let hop = |h: &str| resolve(&["x", "--models", "/m", "--audio-hop-frames", h]);
        let lipsync = hop("25").unwrap().lipsync.expect("lip-sync configured");
        assert_eq!(lipsync.audio_hop_frames, 25);
        for bad in ["0", "26"] {
            let err = hop(bad).unwrap_err().to_string();
            assert!(err.contains("must be 1 to 25"), "{bad}: {err}");
        }
    }

    #[test]
    fn defaults_include_loopback() {
        let c = resolve(&["x"]).unwrap();
        assert!(c.ice_addrs.contains(&IpAddr::from([127, 0, 0, 1])));
        assert_eq!(c.max_sessions, 32);
    }
}

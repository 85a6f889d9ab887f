//! Engine files: what one GPU needs to start serving without tuning again — a header (model
//! configs and their hash, the GPU, its SM, driver, cuDNN and cuBLASLt versions, the batch
//! profiles, every convolution's timed algorithm, per-profile step counts and arena sizes), the
//! fp16 weights and every kernel family compiled for the GPU's SM (cubins, stored as byte entries),
//! in one `.safetensors` file whose `__metadata__` carries the header. Serving from an engine file
//! therefore needs neither NVRTC nor the CUDA headers, and starts without compiling.
//!
//! Loading on another GPU or library version, or with kernels compiled from sources other than
//! this build's, is refused with a message that says to rebuild; a corrupt or truncated file is
//! an error (the safetensors reader checks every entry's extent, and each cubin its sha256).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use lipstream_engines::models::config::{UNetConfig, VaeConfig, WhisperConfig};
use lipstream_engines::presets::ModelSet;
use lipstream_engines::weights::{safetensors, Checkpoint, DType, Weights};
use lipstream_gpu::conv::ConvShape;
use lipstream_gpu::device::Device;
use lipstream_gpu::executor::{
    FuseKey, Fusion, GemmConv, GemmKey, GraphConv, GraphConvKey, LinearChoice, LinearKey, MmaConv,
    MmaKey, Tuned, Tuning,
};
use lipstream_gpu::{Executor, Options, Runtime};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{Sources, Stage};

/// The format this build reads and writes.
pub const FORMAT: &str = "lipstream-engine/2";
const META_KEY: &str = "lipstream.engine";
/// Key prefixes of the three models' weights inside the file.
const PREFIXES: [&str; 3] = ["unet.", "vae.", "whisper."];
/// Key prefix of the compiled kernel families.
const KERNELS: &str = "kernels.";

/// One compiled kernel family.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelImage {
    pub family: String,
    /// sha256 of the CUDA source it was compiled from: a lipstream whose source differs
    /// (kernel arguments may differ) must not launch it.
    pub source_sha256: String,
    /// sha256 of the cubin.
    pub image_sha256: String,
    pub bytes: usize,
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// One convolution's timed algorithm.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TunedConv {
    pub shape: ConvShape,
    pub algo: u32,
    pub math: u32,
    pub workspace_bytes: usize,
    pub ms: f32,
}

/// Whether a convolution kind takes cuDNN's fused bias (+ residual) call, as timed at build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusedConv {
    pub key: FuseKey,
    /// The fused call's algorithm and math type (cuDNN codes) when it won.
    pub fused: Option<(u32, u32, usize)>,
    pub fused_ms: f32,
    pub plain_ms: f32,
}

/// One batch profile.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Profile {
    pub batch: usize,
    pub steps: usize,
    pub arena_bytes: usize,
}

/// Everything but the weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    /// `avatar_frame` or `camera_frame`.
    pub stage: String,
    pub batches: Vec<usize>,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub whisper: WhisperConfig,
    /// sha256 of the three configs' JSON.
    pub config_hash: String,
    pub weights_from: String,
    pub gpu: String,
    pub sm: String,
    pub driver: String,
    pub cudnn: usize,
    pub cublaslt: usize,
    pub convs: Vec<TunedConv>,
    /// Files built before fusion decisions existed have none: every epilogue is our kernel.
    #[serde(default)]
    pub fusions: Vec<FusedConv>,
    /// Files built before convolutions could run as im2col + GEMM have none: all on cuDNN.
    #[serde(default)]
    pub gemm_convs: Vec<(GemmKey, GemmConv)>,
    /// Files built before convolutions could run on graph-API engines have none: all legacy.
    #[serde(default)]
    pub graph_convs: Vec<(GraphConvKey, GraphConv)>,
    /// Files built before thin convolutions could run on our tensor-core kernels have none: all
    /// on the library path.
    #[serde(default)]
    pub mma_convs: Vec<(MmaKey, MmaConv)>,
    /// Files built before GEMM choices were kept have none: every GEMM runs cuBLASLt's first
    /// proposal.
    #[serde(default)]
    pub linears: Vec<(LinearKey, LinearChoice)>,
    pub profiles: Vec<Profile>,
    pub kernels: Vec<KernelImage>,
    pub build_s: f64,
    pub built_unix_s: u64,
}

fn config_hash(set: &ModelSet) -> anyhow::Result<String> {
    let json = serde_json::to_vec(&(&set.unet, &set.vae, &set.whisper))?;
    Ok(hex::encode(sha2::Sha256::digest(&json)))
}

fn stage_of(name: &str) -> anyhow::Result<Stage> {
    match name {
        "avatar_frame" => Ok(Stage::Avatar),
        "camera_frame" => Ok(Stage::Camera),
        other => bail!("engine stage {other:?}: expected avatar_frame or camera_frame"),
    }
}

/// Builds an engine for GPU `gpu` (and every GPU of its model): tunes every profile of `stage`
/// and whisper, writes `out`.
pub fn build(
    src: &Sources,
    stage: Stage,
    batches: &[usize],
    gpu: usize,
    out: &Path,
) -> anyhow::Result<Header> {
    if !matches!(stage, Stage::Avatar | Stage::Camera) {
        bail!("an engine serves a frame step: --mode avatar or camera");
    }
    if batches.is_empty() || batches.contains(&0) {
        bail!("--batches needs sizes of 1 or more");
    }
    let started = Instant::now();
    let device = Device::open(gpu).with_context(|| format!("opening GPU {gpu}"))?;
    let versions = device.versions()?;
    let (gpu, sm) = (device.name.clone(), device.sm);
    let mut rt = Runtime::new(device)?;
    let bar = indicatif::ProgressBar::new(batches.len() as u64 + 2);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut profiles = Vec::new();
    for &b in batches {
        bar.set_message(format!("{} B={b}", stage.name()));
        let g = src.graph(stage, b)?;
        let ex = Executor::new(&mut rt, &g, "", Options::TUNED)
            .with_context(|| format!("building {} B={b}", stage.name()))?;
        profiles.push(Profile {
            batch: b,
            steps: ex.steps().len(),
            arena_bytes: ex.arena_bytes,
        });
        bar.inc(1);
    }
    // The renderer runs whisper windows alone and in launches of WHISPER_BATCHES: their
    // convolutions and GEMMs are timed here too, or a server would run them on the libraries'
    // first guesses.
    bar.set_message("whisper windows");
    for b in std::iter::once(1).chain(crate::lipsync::renderer::WHISPER_BATCHES) {
        let g = src.graph(Stage::WhisperRows, b)?;
        Executor::new(&mut rt, &g, "", Options::TUNED)
            .with_context(|| format!("building whisper, {b} windows"))?;
    }
    let images = rt.device.all_kernel_images()?;
    bar.inc(1);
    bar.set_message("writing weights");
    let mut tensors = BTreeMap::new();
    for (prefix, w) in PREFIXES.iter().zip(src.weights()) {
        for (k, t) in w.used_tensors()? {
            tensors.insert(format!("{prefix}{k}"), t);
        }
    }
    let mut convs: Vec<TunedConv> = rt
        .tuned
        .iter()
        .map(|(shape, t)| {
            let (algo, math) = t.codes();
            TunedConv {
                shape: *shape,
                algo,
                math,
                workspace_bytes: t.workspace_bytes,
                ms: t.ms,
            }
        })
        .collect();
    convs.sort_by_key(|c| (c.shape.n, c.shape.c, c.shape.h, c.shape.o, c.shape.kh));
    let mut fusions: Vec<FusedConv> = rt
        .fusions
        .iter()
        .map(|(key, f)| FusedConv {
            key: *key,
            fused: f.fused.map(|t| {
                let (algo, math) = t.codes();
                (algo, math, t.workspace_bytes)
            }),
            fused_ms: f.fused_ms,
            plain_ms: f.plain_ms,
        })
        .collect();
    fusions.sort_by_key(|f| {
        let s = f.key.shape;
        (s.n, s.c, s.h, s.o, s.kh, f.key.residual, f.key.stats)
    });
    let mut gemm_convs: Vec<(GemmKey, GemmConv)> =
        rt.gemm_convs.iter().map(|(k, g)| (*k, *g)).collect();
    gemm_convs.sort_by_key(|(k, _)| {
        let s = k.shape;
        (s.n, s.c, s.h, s.o, s.kh, k.residual, k.stats)
    });
    let mut graph_convs: Vec<(GraphConvKey, GraphConv)> = rt
        .graph_convs
        .iter()
        .map(|(k, g)| (*k, g.clone()))
        .collect();
    graph_convs.sort_by_key(|(k, _)| {
        let s = k.shape;
        (
            s.n,
            s.c,
            s.h,
            s.o,
            s.kh,
            k.bias_in_graph,
            k.residual,
            k.stats,
        )
    });
    let mut mma_convs: Vec<(MmaKey, MmaConv)> =
        rt.mma_convs.iter().map(|(k, m)| (*k, *m)).collect();
    mma_convs.sort_by_key(|(k, _)| {
        let s = k.shape;
        (s.n, s.c, s.h, s.w, k.bias)
    });
    let mut linears: Vec<(LinearKey, LinearChoice)> =
        rt.linears.iter().map(|(k, c)| (*k, *c)).collect();
    linears.sort_by_key(|(k, _)| *k);
    let header = Header {
        format: FORMAT.into(),
        stage: stage.name().into(),
        batches: batches.to_vec(),
        unet: src.set.unet.clone(),
        vae: src.set.vae.clone(),
        whisper: src.set.whisper.clone(),
        config_hash: config_hash(&src.set)?,
        weights_from: src.origin.clone(),
        gpu,
        sm: format!("sm_{}{}", sm.0, sm.1),
        driver: format!("{}.{}", versions.driver.0, versions.driver.1),
        cudnn: versions.cudnn,
        cublaslt: versions.cublaslt,
        convs,
        fusions,
        gemm_convs,
        graph_convs,
        mma_convs,
        linears,
        profiles,
        kernels: kernel_list(&images)?,
        build_s: started.elapsed().as_secs_f64(),
        built_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let meta = BTreeMap::from([(META_KEY.to_string(), serde_json::to_string(&header)?)]);
    let blobs = images
        .into_iter()
        .map(|(family, image)| (format!("{KERNELS}{family}"), image.into()))
        .collect();
    safetensors::write_with_blobs(out, &tensors, DType::F16, &meta, &blobs)
        .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_with_message(format!("wrote {}", out.display()));
    Ok(header)
}

/// The header's record of compiled kernel families (each of this build's sources).
fn kernel_list(images: &BTreeMap<String, Vec<u8>>) -> anyhow::Result<Vec<KernelImage>> {
    lipstream_gpu::kernels::SOURCES
        .iter()
        .map(|(family, src)| {
            let image = images
                .get(*family)
                .with_context(|| format!("kernel family {family} was not compiled"))?;
            Ok(KernelImage {
                family: family.to_string(),
                source_sha256: sha256(src.as_bytes()),
                image_sha256: sha256(image),
                bytes: image.len(),
            })
        })
        .collect()
}

/// An engine file's cubins, checked: one per kernel family of this build, compiled from the
/// same source, intact.
pub fn kernel_images(path: &Path, header: &Header) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let c = Checkpoint::open(path)?;
    let mut images = BTreeMap::new();
    for (family, src) in lipstream_gpu::kernels::SOURCES {
        let k = header
            .kernels
            .iter()
            .find(|k| k.family == family)
            .with_context(|| {
                format!(
                    "{}: no compiled {family} kernels: rebuild it with `lipstream engine build`",
                    path.display()
                )
            })?;
        if k.source_sha256 != sha256(src.as_bytes()) {
            bail!(
                "{}: its {family} kernels were compiled from another lipstream version's source: rebuild it with `lipstream engine build`",
                path.display()
            );
        }
        let image = c.bytes(&format!("{KERNELS}{family}"))?;
        if image.len() != k.bytes || sha256(&image) != k.image_sha256 {
            bail!(
                "{}: the compiled {family} kernels do not match their sha256: the file is corrupt",
                path.display()
            );
        }
        images.insert(family.to_string(), image);
    }
    Ok(images)
}

/// Reads and checks an engine file's header.
pub fn read_header(path: &Path) -> anyhow::Result<Header> {
    let meta = safetensors::read_metadata(path)?;
    let text = meta.get(META_KEY).with_context(|| {
        format!(
            "{} is a safetensors file but not a lipstream engine (no {META_KEY} header)",
            path.display()
        )
    })?;
    let format: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}: engine header is not JSON", path.display()))?;
    if format["format"] != FORMAT {
        bail!(
            "{}: engine format {} (this lipstream reads {FORMAT}): rebuild it with `lipstream engine build`",
            path.display(),
            format["format"]
        );
    }
    let header: Header = serde_json::from_value(format)
        .with_context(|| format!("{}: engine header is malformed", path.display()))?;
    if config_hash(&ModelSet {
        unet: header.unet.clone(),
        vae: header.vae.clone(),
        whisper: header.whisper.clone(),
    })? != header.config_hash
    {
        bail!(
            "{}: the model configs do not match their hash: the file is corrupt",
            path.display()
        );
    }
    Ok(header)
}

/// A GPU and its libraries as an engine header names them: (name, SM, cuDNN, cuBLASLt).
pub type Target = (String, String, usize, usize);

/// What `device` is, as `Target`.
pub fn target(device: &Device) -> anyhow::Result<Target> {
    let v = device.versions()?;
    Ok((
        device.name.clone(),
        format!("sm_{}{}", device.sm.0, device.sm.1),
        v.cudnn,
        v.cublaslt,
    ))
}

/// Why an engine built as `header` says cannot run on `here`, if it cannot.
pub fn mismatch(header: &Header, here: &Target) -> Option<String> {
    let built = (
        header.gpu.clone(),
        header.sm.clone(),
        header.cudnn,
        header.cublaslt,
    );
    (*here != built).then(|| {
        format!(
            "the engine was built for {} ({}) with cuDNN {} and cuBLASLt {}; this machine has {} ({}) with cuDNN {} and cuBLASLt {}: rebuild it here with `lipstream engine build`",
            built.0, built.1, built.2, built.3, here.0, here.1, here.2, here.3
        )
    })
}

/// Why `header` cannot run on this GPU with these libraries, if it cannot.
pub fn incompatibility(header: &Header, device: &Device) -> anyhow::Result<Option<String>> {
    Ok(mismatch(header, &target(device)?))
}

/// Of several engine files (one per GPU model of a mixed host), the one built for `here`, or
/// why none is: each file's reason.
pub fn pick<'a>(
    engines: &'a [(std::path::PathBuf, Header)],
    here: &Target,
) -> Result<&'a Path, String> {
    let mut why = Vec::new();
    for (path, h) in engines {
        match mismatch(h, here) {
            None => return Ok(path),
            Some(reason) => why.push(format!("{}: {reason}", path.display())),
        }
    }
    Err(format!(
        "no engine file for {} ({}); build one on it with `lipstream engine build --gpu N`{}",
        here.0,
        here.1,
        why.iter().map(|w| format!("\n  {w}")).collect::<String>()
    ))
}

/// An engine file loaded on GPU 0: its header, its weights, its built executors.
pub struct Loaded {
    /// The file that was loaded (of those given, the one for this GPU).
    pub path: std::path::PathBuf,
    pub header: Header,
    /// The batch profiles made ready: those asked for, else every one the file holds.
    pub batches: Vec<usize>,
    pub stage: Stage,
    pub sources: Sources,
    pub executors: super::Executors,
}

impl Sources {
    /// The weights and configs inside an engine file.
    pub fn from_engine(path: &Path, header: &Header) -> anyhow::Result<Self> {
        let c = Checkpoint::open(path)?;
        let mut maps: [BTreeMap<String, lipstream_engines::Tensor>; 3] = Default::default();
        for key in c.keys().filter(|k| !k.starts_with(KERNELS)) {
            let Some(i) = PREFIXES.iter().position(|p| key.starts_with(p)) else {
                bail!("{}: unexpected tensor {key}", path.display());
            };
            maps[i].insert(key[PREFIXES[i].len()..].to_string(), c.load(key)?);
        }
        let [u, v, w] = maps;
        Ok(Sources {
            set: ModelSet {
                unet: header.unet.clone(),
                vae: header.vae.clone(),
                whisper: header.whisper.clone(),
            },
            unet: Weights::from_tensors(u),
            vae: Weights::from_tensors(v),
            whisper: Weights::from_tensors(w),
            origin: format!("{} (from {})", path.display(), header.weights_from),
        })
    }

    fn weights(&self) -> [&Weights; 3] {
        [&self.unet, &self.vae, &self.whisper]
    }
}

/// The timed algorithms and fusion decisions of a header, as the runtime keeps them.
pub fn tuned(header: &Header) -> anyhow::Result<Tuning> {
    let unknown = |algo, math| format!("unknown cuDNN algorithm {algo} / math {math}");
    let convs = header
        .convs
        .iter()
        .map(|c| {
            Tuned::from_codes(c.algo, c.math, c.workspace_bytes, c.ms)
                .map(|t| (c.shape, t))
                .with_context(|| unknown(c.algo, c.math))
        })
        .collect::<anyhow::Result<_>>()?;
    let fusions = header
        .fusions
        .iter()
        .map(|f| {
            let fused = match f.fused {
                Some((algo, math, ws)) => Some(
                    Tuned::from_codes(algo, math, ws, f.fused_ms)
                        .with_context(|| unknown(algo, math))?,
                ),
                None => None,
            };
            Ok((
                f.key,
                Fusion {
                    fused,
                    fused_ms: f.fused_ms,
                    plain_ms: f.plain_ms,
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Tuning {
        convs,
        fusions,
        gemm_convs: header.gemm_convs.clone(),
        graph_convs: header.graph_convs.clone(),
        mma_convs: header.mma_convs.clone(),
        linears: header.linears.clone(),
    })
}

/// Loads, of `paths` (one engine file per GPU model), the one built for GPU `gpu` (refusing
/// every file when none matches its model and library versions), builds the profiles `batches`
/// (empty: all the file holds; one it does not hold is an error that says how to rebuild) with
/// the stored algorithms and, with `graphs`, captures them.
pub fn load(
    paths: &[std::path::PathBuf],
    gpu: usize,
    graphs: bool,
    batches: &[usize],
) -> anyhow::Result<Loaded> {
    let device = Device::open(gpu).with_context(|| format!("opening GPU {gpu}"))?;
    let headers = paths
        .iter()
        .map(|p| Ok((p.clone(), read_header(p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let here = target(&device)?;
    let path = match (pick(&headers, &here), headers.as_slice()) {
        (Ok(path), _) => path.to_path_buf(),
        // One file: its own reason, as it always read.
        (Err(_), [(p, h)]) => bail!(
            "{}: {}",
            p.display(),
            mismatch(h, &here).unwrap_or_default()
        ),
        (Err(why), _) => bail!("GPU {gpu}: {why}"),
    };
    let header = headers
        .into_iter()
        .find_map(|(p, h)| (p == path).then_some(h))
        .context("the picked engine file's header")?;
    let stage = stage_of(&header.stage)?;
    let batches = chosen_batches(&header.batches, batches).map_err(|b| {
        anyhow::anyhow!(
            "{} holds batch profiles {:?}, not {b}: leave --batches out to use them, pick from \
             them, or rebuild with `lipstream engine build --batches` naming {b}",
            path.display(),
            header.batches
        )
    })?;
    let images = kernel_images(&path, &header)?;
    tracing::info!(
        "GPU {gpu}: {} ({} kernel families compiled for {}, taken from the file: nothing to compile)",
        path.display(),
        images.len(),
        header.sm
    );
    device.use_kernel_images(images);
    let sources = Sources::from_engine(&path, &header)?;
    let executors = super::executors(device, &sources, stage, &batches, &tuned(&header)?, graphs)?;
    Ok(Loaded {
        path,
        header,
        batches,
        stage,
        sources,
        executors,
    })
}

/// The profiles to make ready of those a file `holds`: `wanted` sorted and deduplicated (empty:
/// all); Err names the first wanted profile the file lacks.
fn chosen_batches(holds: &[usize], wanted: &[usize]) -> Result<Vec<usize>, usize> {
    if wanted.is_empty() {
        return Ok(holds.to_vec());
    }
    let mut chosen = wanted.to_vec();
    chosen.sort_unstable();
    chosen.dedup();
    match chosen.iter().find(|b| !holds.contains(b)) {
        Some(&b) => Err(b),
        None => Ok(chosen),
    }
}

/// A one-screen description of an engine file.
pub fn describe(path: &Path) -> anyhow::Result<String> {
    let h = read_header(path)?;
    let c = Checkpoint::open(path)?;
    let bytes = std::fs::metadata(path)?.len();
    let mut s = format!(
        "{}: {} engine, {FORMAT}\n  built for {} ({}), driver {}, cuDNN {}, cuBLASLt {} in {:.1} s\n  batch profiles {:?}\n",
        path.display(),
        h.stage,
        h.gpu,
        h.sm,
        h.driver,
        h.cudnn,
        h.cublaslt,
        h.build_s,
        h.batches
    );
    for p in &h.profiles {
        s += &format!(
            "    B={:<3} {} steps, arena {:.1} MiB\n",
            p.batch,
            p.steps,
            p.arena_bytes as f64 / (1 << 20) as f64
        );
    }
    s += &format!(
        "  kernels compiled for {}: {}\n",
        h.sm,
        h.kernels
            .iter()
            .map(|k| format!("{} {:.0} KiB", k.family, k.bytes as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let weights = || c.keys().filter(|k| !k.starts_with(KERNELS));
    let timed_first = h.linears.iter().filter(|(_, c)| c.algo == 0).count();
    s += &format!(
        "  {} timed GEMM kinds ({} on a later proposal of cuBLASLt's than its first)\n",
        h.linears.len(),
        h.linears.len() - timed_first
    );
    s += &format!(
        "  {} tuned convolutions ({} of {} bias kinds on cuDNN's fused call, {} of {} kinds as im2col + cuBLASLt GEMM, {} of {} on graph-API engines, {} of {} thin kinds on our tensor-core kernels); {} weight tensors, {:.1} MiB fp16 ({:.1} MiB file)\n  models: UNet {:?} channels, VAE {:?}, whisper d={} ({} layers); config sha256 {}\n  weights from {}\n",
        h.convs.len(),
        h.fusions.iter().filter(|f| f.fused.is_some()).count(),
        h.fusions.len(),
        h.gemm_convs.iter().filter(|(_, g)| g.algo.is_some()).count(),
        h.gemm_convs.len(),
        h.graph_convs.iter().filter(|(_, g)| g.choice.is_some()).count(),
        h.graph_convs.len(),
        h.mma_convs.iter().filter(|(_, m)| m.mma).count(),
        h.mma_convs.len(),
        weights().count(),
        weights().filter_map(|k| c.entry(k)).map(|e| e.bytes).sum::<u64>() as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64,
        h.unet.block_out_channels,
        h.vae.block_out_channels,
        h.whisper.d_model,
        h.whisper.encoder_layers,
        &h.config_hash[..12.min(h.config_hash.len())],
        h.weights_from
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lipstream_engines::presets::Preset;
    use lipstream_gpu::conv_graph::EngineChoice;

    #[test]
    fn served_batches_are_those_asked_for_of_the_files_own() {
        let holds = [1, 2, 4, 8, 16, 24];
        assert_eq!(chosen_batches(&holds, &[]), Ok(holds.to_vec()));
        assert_eq!(
            chosen_batches(&holds, &[16, 1, 24, 16]),
            Ok(vec![1, 16, 24])
        );
        assert_eq!(chosen_batches(&holds, &[1, 12, 32]), Err(12));
    }

    /// Stand-ins for cubins (no NVRTC needed): what matters here is that they round-trip intact.
    fn images() -> BTreeMap<String, Vec<u8>> {
        lipstream_gpu::kernels::SOURCES
            .iter()
            .enumerate()
            .map(|(i, (f, _))| {
                (
                    f.to_string(),
                    [b"\x7fELF".as_slice(), &[i as u8; 40]].concat(),
                )
            })
            .collect()
    }

    fn header(set: &ModelSet) -> Header {
        Header {
            format: FORMAT.into(),
            stage: "avatar_frame".into(),
            batches: vec![1],
            unet: set.unet.clone(),
            vae: set.vae.clone(),
            whisper: set.whisper.clone(),
            config_hash: config_hash(set).unwrap(),
            weights_from: "test".into(),
            gpu: "NVIDIA H100 80GB HBM3".into(),
            sm: "sm_90".into(),
            driver: "13.0".into(),
            cudnn: 91400,
            cublaslt: 130100,
            convs: vec![],
            fusions: vec![],
            gemm_convs: vec![],
            graph_convs: vec![],
            mma_convs: vec![],
            linears: vec![],
            profiles: vec![],
            kernels: kernel_list(&images()).unwrap(),
            build_s: 0.0,
            built_unix_s: 0,
        }
    }

    /// Writes what `build` writes, for a tiny model, without a GPU.
    fn write_engine(path: &Path, src: &Sources, h: &Header) {
        src.graph(Stage::Avatar, 1).unwrap();
        src.graph(Stage::WhisperRows, 1).unwrap();
        let mut tensors = BTreeMap::new();
        for (prefix, w) in PREFIXES.iter().zip(src.weights()) {
            for (k, t) in w.used_tensors().unwrap() {
                tensors.insert(format!("{prefix}{k}"), t);
            }
        }
        let meta = BTreeMap::from([(META_KEY.to_string(), serde_json::to_string(h).unwrap())]);
        let blobs = images()
            .into_iter()
            .map(|(f, i)| (format!("{KERNELS}{f}"), i.into()))
            .collect();
        safetensors::write_with_blobs(path, &tensors, DType::F16, &meta, &blobs).unwrap();
    }

    #[test]
    fn each_gpu_takes_the_engine_file_built_for_its_model() {
        let set = lipstream_engines::presets::Preset::Tiny.configs();
        let h100 = header(&set);
        let mut a100 = header(&set);
        (a100.gpu, a100.sm) = ("NVIDIA A100-SXM4-80GB".into(), "sm_80".into());
        let files = vec![
            (std::path::PathBuf::from("a100.engine"), a100.clone()),
            (std::path::PathBuf::from("h100.engine"), h100.clone()),
        ];
        let here = |h: &Header| -> Target { (h.gpu.clone(), h.sm.clone(), h.cudnn, h.cublaslt) };
        assert_eq!(pick(&files, &here(&h100)), Ok(Path::new("h100.engine")));
        assert_eq!(pick(&files, &here(&a100)), Ok(Path::new("a100.engine")));
        // Same GPU, another cuDNN: neither runs; each file says why.
        let mut newer = here(&h100);
        newer.2 += 100;
        let err = pick(&files, &newer).unwrap_err();
        assert!(
            err.starts_with("no engine file for NVIDIA H100 80GB HBM3 (sm_90)"),
            "{err}"
        );
        assert!(
            err.contains("a100.engine: the engine was built for NVIDIA A100"),
            "{err}"
        );
        assert!(
            err.contains("h100.engine: the engine was built for NVIDIA H100"),
            "{err}"
        );
        assert_eq!(mismatch(&h100, &here(&h100)), None);
    }

    /// A lowering decision where no cuBLASLt proposal ran has no GEMM time; the header must
    /// still write and read it (JSON has no infinity), and read the plain numbers of files
    /// written before.
    #[test]
    fn a_lowering_decision_without_a_gemm_time_survives_the_header() {
        let set = Preset::Tiny.configs();
        let mut h = header(&set);
        let shape = ConvShape::same_3x3_square(1, 1280, 4, 1280);
        let key = GemmKey {
            shape,
            channel_bias: true,
            residual: false,
            stats: false,
        };
        let untimed = GemmConv {
            algo: None,
            gemm_ms: None,
            cudnn_ms: 0.05,
        };
        h.gemm_convs = vec![(key, untimed)];
        let text = serde_json::to_string(&h).unwrap();
        let back: Header = serde_json::from_str(&text).unwrap();
        assert_eq!(back.gemm_convs[0].1.gemm_ms, None);
        let older = text.replace("\"gemm_ms\":null", "\"gemm_ms\":0.25");
        assert_ne!(older, text);
        let back: Header = serde_json::from_str(&older).unwrap();
        assert_eq!(back.gemm_convs[0].1.gemm_ms, Some(0.25));
    }

    /// The GEMM choices an engine build timed come back from the header as the runtime's
    /// Tuning (a served engine runs them, not cuBLASLt's first proposal); files written before
    /// they were kept read as having none.
    #[test]
    fn gemm_choices_survive_the_header_and_older_files_have_none() {
        let set = Preset::Tiny.configs();
        let mut h = header(&set);
        let gemm = lipstream_gpu::blas::Gemm::linear(24576, 320, 320);
        let key = LinearKey::of(&gemm, true, true, false);
        h.linears = vec![(key, LinearChoice { algo: 3, ms: 0.031 })];
        let text = serde_json::to_string(&h).unwrap();
        let back: Header = serde_json::from_str(&text).unwrap();
        let tuning = tuned(&back).unwrap();
        assert_eq!(tuning.linears.len(), 1);
        assert_eq!(tuning.linears[0].0, key);
        assert_eq!(tuning.linears[0].1.algo, 3);
        assert_ne!(key, LinearKey::of(&gemm, true, false, false));
        let mut older: serde_json::Value = serde_json::from_str(&text).unwrap();
        older
            .as_object_mut()
            .and_then(|o| o.remove("linears"))
            .expect("the header writes its GEMM choices");
        let back: Header = serde_json::from_value(older).unwrap();
        assert!(back.linears.is_empty());
        assert!(tuned(&back).unwrap().linears.is_empty());
    }

    /// A graph-API convolution that pads its input itself (the VAE encoder's downsamplers: 0
    /// before, 1 after) is keyed by its unpadded shape with `pad_end`; the header keeps that
    /// apart from the symmetric key of the same size, and files written before `pad_end` read
    /// as symmetric padding.
    #[test]
    fn a_padding_convolution_decision_survives_the_header() {
        let set = Preset::Tiny.configs();
        let mut h = header(&set);
        let symmetric = ConvShape {
            stride: [2, 2],
            pad: [0, 0],
            ..ConvShape::same_3x3_square(32, 128, 256, 128)
        };
        let padding = ConvShape {
            pad_end: [1, 1],
            ..symmetric
        };
        assert_eq!(padding.out_hw(), (128, 128));
        assert_eq!(padding.post_pad(), [1, 1]);
        assert!(
            padding.label().ends_with("pad [0, 0]/[1, 1]"),
            "{}",
            padding.label()
        );
        let key = |shape| GraphConvKey {
            shape,
            bias_in_graph: true,
            residual: false,
            stats: true,
        };
        let decision = |engine| GraphConv {
            choice: Some(EngineChoice {
                engine,
                knobs: vec![(1, 2)],
            }),
            graph_ms: Some(0.3),
            legacy_ms: 0.5,
        };
        h.graph_convs = vec![(key(symmetric), decision(7)), (key(padding), decision(9))];
        let text = serde_json::to_string(&h).unwrap();
        let back: Header = serde_json::from_str(&text).unwrap();
        let engine_of = |h: &Header, k: GraphConvKey| {
            h.graph_convs
                .iter()
                .find(|(kk, _)| *kk == k)
                .and_then(|(_, d)| d.choice.as_ref().map(|c| c.engine))
        };
        assert_eq!(engine_of(&back, key(symmetric)), Some(7));
        assert_eq!(engine_of(&back, key(padding)), Some(9));
        // Written before: no pad_end anywhere.
        h.graph_convs = vec![(key(symmetric), decision(7))];
        let older = serde_json::to_string(&h)
            .unwrap()
            .replace(",\"pad_end\":[0,0]", "");
        assert!(!older.contains("pad_end"));
        let back: Header = serde_json::from_str(&older).unwrap();
        assert_eq!(engine_of(&back, key(symmetric)), Some(7));
    }

    #[test]
    fn engine_files_round_trip_and_refuse_damage() {
        let dir = std::env::temp_dir().join(format!("lipstream-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Sources::synth(Preset::Tiny, 3);
        let h = header(&src.set);
        let path = dir.join("tiny.engine");
        write_engine(&path, &src, &h);

        // The header and the weights come back; the graphs built from them compute what the
        // original weights do (up to the fp16 storage).
        let back = read_header(&path).unwrap();
        assert_eq!(back.config_hash, h.config_hash);
        let loaded = Sources::from_engine(&path, &back).unwrap();
        let (a, b) = (
            src.graph(Stage::Avatar, 1).unwrap(),
            loaded.graph(Stage::Avatar, 1).unwrap(),
        );
        let inputs = super::super::inputs_for(&a, 5);
        let refs: Vec<(&str, &lipstream_engines::Tensor)> =
            inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let want = lipstream_engines::cpu::run(&a, &refs).unwrap();
        let got = lipstream_engines::cpu::run(&b, &refs).unwrap();
        let err = got[0].1.rel_l2(&want[0].1);
        assert!(
            err > 0.0 && err < 1e-2,
            "fp16 weights change the output a little: {err}"
        );
        let text = describe(&path).unwrap();
        assert!(text.contains("avatar_frame engine"), "{text}");
        assert!(
            text.contains("kernels compiled for sm_90: attention"),
            "{text}"
        );
        assert_eq!(kernel_images(&path, &back).unwrap(), images());

        // Kernels compiled from another source, or damaged, are refused before any GPU sees them.
        let mut other = back.clone();
        other.kernels[0].source_sha256 = sha256(b"an older attention.cu");
        let err = kernel_images(&path, &other).unwrap_err().to_string();
        assert!(
            err.contains("another lipstream version") && err.contains("rebuild"),
            "{err}"
        );
        let mut damaged = back.clone();
        damaged.kernels[1].image_sha256 = sha256(b"something else");
        let err = kernel_images(&path, &damaged).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        let mut missing = back.clone();
        missing.kernels.pop();
        let err = kernel_images(&path, &missing).unwrap_err().to_string();
        assert!(err.contains("no compiled layout kernels"), "{err}");

        // A truncated file, an edited header and a plain checkpoint are all refused by name.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.engine");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let err = Sources::from_engine(&cut, &back).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut edited = h.clone();
        edited.unet.block_out_channels[0] += 8;
        let bad = dir.join("edited.engine");
        write_engine(&bad, &src, &edited);
        let err = read_header(&bad).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        let mut old = h.clone();
        old.format = "lipstream-engine/0".into();
        write_engine(&bad, &src, &old);
        let err = read_header(&bad).unwrap_err().to_string();
        assert!(err.contains("rebuild"), "{err}");
        let plain = dir.join("plain.safetensors");
        safetensors::write(&plain, &BTreeMap::new(), DType::F16).unwrap();
        let err = read_header(&plain).unwrap_err().to_string();
        assert!(err.contains("not a lipstream engine"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

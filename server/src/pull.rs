//! `lipstream models pull`: the upstream checkpoints, downloaded into the Hugging Face cache
//! layout (`models--org--name/{blobs,snapshots,refs}`), resumable, checked against the published
//! checksums, then linked into a MuseTalk-style models folder.
//!
//! Hub files come from `$HF_ENDPOINT` (default https://huggingface.co); the MTCNN weights come
//! from the facenet-pytorch wheel on PyPI (`$LIPSTREAM_PYPI_URL`, default https://pypi.org).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;

/// One file of a Hub repository, and where it goes in the models folder.
pub struct HubFile {
    pub repo: &'static str,
    pub path: &'static str,
    pub link_as: &'static str,
}

/// MuseTalk 1.5's files on the Hub (the layout MuseTalk's own download script makes).
pub const MUSETALK_15: &[HubFile] = &[
    HubFile {
        repo: "TMElyralab/MuseTalk",
        path: "musetalkV15/musetalk.json",
        link_as: "musetalkV15/musetalk.json",
    },
    HubFile {
        repo: "TMElyralab/MuseTalk",
        path: "musetalkV15/unet.pth",
        link_as: "musetalkV15/unet.pth",
    },
    HubFile {
        repo: "stabilityai/sd-vae-ft-mse",
        path: "config.json",
        link_as: "sd-vae/config.json",
    },
    HubFile {
        repo: "stabilityai/sd-vae-ft-mse",
        path: "diffusion_pytorch_model.safetensors",
        link_as: "sd-vae/diffusion_pytorch_model.safetensors",
    },
    HubFile {
        repo: "openai/whisper-tiny",
        path: "config.json",
        link_as: "whisper/config.json",
    },
    HubFile {
        repo: "openai/whisper-tiny",
        path: "preprocessor_config.json",
        link_as: "whisper/preprocessor_config.json",
    },
    HubFile {
        repo: "openai/whisper-tiny",
        path: "model.safetensors",
        link_as: "whisper/model.safetensors",
    },
];

/// The wheel that carries MTCNN's weights, and the files taken from it.
const FACENET_WHEEL: (&str, &str) = ("facenet-pytorch", "2.6.0");
const MTCNN_FILES: [&str; 3] = ["pnet.pt", "rnet.pt", "onet.pt"];

const ATTEMPTS: usize = 5;

/// Where to download from and to.
pub struct PullOptions {
    pub hf_endpoint: String,
    pub pypi_url: String,
    pub hf_token: Option<String>,
    /// The Hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// The models folder to link everything into.
    pub out: PathBuf,
    pub progress: bool,
}

impl PullOptions {
    /// Endpoints, token and cache from the environment, as `huggingface_hub` reads them.
    pub fn from_env(out: PathBuf, progress: bool) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let cache = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            var("HF_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/huggingface"))
                .join("hub")
        });
        PullOptions {
            hf_endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            pypi_url: var("LIPSTREAM_PYPI_URL").unwrap_or_else(|| "https://pypi.org".into()),
            hf_token: var("HF_TOKEN"),
            cache,
            out,
            progress,
        }
    }
}

fn agent(redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// Downloads every file of MuseTalk 1.5 and links it under `opts.out`.
pub fn pull_musetalk_15(opts: &PullOptions) -> anyhow::Result<()> {
    for f in MUSETALK_15 {
        let blob = pull_hub_file(opts, f.repo, "main", f.path)?;
        link(&blob, &opts.out.join(f.link_as))?;
    }
    let dir = pull_wheel_files(
        opts,
        FACENET_WHEEL.0,
        FACENET_WHEEL.1,
        "facenet_pytorch/data/",
        &MTCNN_FILES,
    )?;
    for name in MTCNN_FILES {
        link(&dir.join(name), &opts.out.join("mtcnn").join(name))?;
    }
    Ok(())
}

/// Links (symlink) `target` at `at`, replacing what was there.
fn link(target: &Path, at: &Path) -> anyhow::Result<()> {
    if let Some(parent) = at.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let _ = fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).with_context(|| format!("cannot link {}", at.display()))
}

/// What the Hub says about a file before we fetch it.
struct HubHead {
    commit: String,
    /// sha256 (LFS files) or git blob sha1 (small files), lower-case hex.
    etag: String,
    size: Option<u64>,
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
}

/// Fetches one Hub file into the cache; returns its snapshot path.
pub fn pull_hub_file(
    opts: &PullOptions,
    repo: &str,
    revision: &str,
    path: &str,
) -> anyhow::Result<PathBuf> {
    let url = format!(
        "{}/{repo}/resolve/{revision}/{path}",
        opts.hf_endpoint.trim_end_matches('/')
    );
    let mut req = agent(0).head(&url);
    if let Some(t) = &opts.hf_token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.call().with_context(|| format!("HEAD {url}"))?;
    let status = resp.status().as_u16();
    if !(200..400).contains(&status) {
        bail!(
            "HEAD {url}: HTTP {status}{}",
            if status == 401 {
                " (gated or private: set HF_TOKEN)"
            } else {
                ""
            }
        );
    }
    let head = HubHead {
        commit: header(&resp, "x-repo-commit")
            .ok_or_else(|| anyhow!("{url}: no X-Repo-Commit header; is HF_ENDPOINT a Hub?"))?,
        etag: header(&resp, "x-linked-etag")
            .or_else(|| header(&resp, "etag"))
            .ok_or_else(|| anyhow!("{url}: no ETag"))?
            .to_lowercase(),
        size: header(&resp, "x-linked-size")
            .or_else(|| header(&resp, "content-length"))
            .and_then(|s| s.parse().ok()),
    };
    let repo_dir = opts
        .cache
        .join(format!("models--{}", repo.replace('/', "--")));
    let blob = repo_dir.join("blobs").join(&head.etag);
    if !blob.exists() {
        let label = format!("{repo}/{path}");
        download(opts, &url, &blob, head.size, &label)?;
        verify(&blob, &head.etag).inspect_err(|_| {
            let _ = fs::remove_file(&blob);
        })?;
    }
    let snapshot = repo_dir.join("snapshots").join(&head.commit).join(path);
    let depth = path.matches('/').count() + 2;
    let relative: PathBuf = std::iter::repeat_n("..", depth)
        .collect::<PathBuf>()
        .join("blobs")
        .join(&head.etag);
    link(&relative, &snapshot)?;
    fs::create_dir_all(repo_dir.join("refs"))?;
    fs::write(repo_dir.join("refs").join(revision), &head.commit)?;
    Ok(snapshot)
}

/// Downloads `url` to `dest`, resuming a previous partial download (`dest.incomplete`) and
/// retrying broken connections.
fn download(
    opts: &PullOptions,
    url: &str,
    dest: &Path,
    size: Option<u64>,
    label: &str,
) -> anyhow::Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| anyhow!("{} has no folder", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = dest.with_extension("incomplete");
    let bar = if opts.progress {
        ProgressBar::new(size.unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:40!} {bytes:>10}/{total_bytes:10} {bar:30} {bytes_per_sec:>12} {eta:>4}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_string());
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        bar.set_position(have);
        if size.is_some_and(|s| have == s) {
            last_error = None;
            break;
        }
        let mut req = agent(10).get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        if let Some(t) = &opts.hf_token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(e) => {
                last_error = Some(anyhow!("GET {url}: {e}"));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let status = resp.status().as_u16();
        let append = match status {
            206 => true,
            200 => false, // The server ignored the range: start over.
            416 if size.is_none_or(|s| have >= s) => break,
            _ => bail!("GET {url}: HTTP {status}"),
        };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        if !append {
            bar.set_position(0);
        }
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let result: std::io::Result<()> = loop {
            match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = file.write_all(&buf[..n]) {
                        return Err(e)
                            .with_context(|| format!("cannot write {}", partial.display()));
                    }
                    bar.inc(n as u64);
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => {
                last_error = None;
                let got = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                if size.is_none_or(|s| got >= s) {
                    break;
                }
                last_error = Some(anyhow!(
                    "GET {url}: connection closed at {got} of {size:?} bytes"
                ));
            }
            Err(e) => last_error = Some(anyhow!("GET {url}: {e} (will resume)")),
        }
    }
    if let Some(e) = last_error {
        bar.abandon();
        return Err(e.context(format!(
            "giving up after {ATTEMPTS} attempts; run again to resume"
        )));
    }
    bar.finish();
    fs::rename(&partial, dest)
        .with_context(|| format!("cannot move {} into place", partial.display()))
}

/// Checks a file against a published checksum: sha256 (64 hex) or a git blob sha1 (40 hex).
fn verify(path: &Path, expected: &str) -> anyhow::Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let got = match expected.len() {
        64 => {
            let mut h = sha2::Sha256::new();
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            hex::encode(h.finalize())
        }
        40 => {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            hex::encode(h.finalize())
        }
        _ => return Ok(()), // No checksum published in a form we know.
    };
    if got != expected {
        bail!("{}: checksum mismatch (got {got}, published {expected}); the download was removed, run again", path.display());
    }
    Ok(())
}

/// Downloads a wheel from PyPI (checked against PyPI's sha256) and extracts `files` from
/// `inner_dir` into the cache; returns the folder holding them.
fn pull_wheel_files(
    opts: &PullOptions,
    name: &str,
    version: &str,
    inner_dir: &str,
    files: &[&str],
) -> anyhow::Result<PathBuf> {
    let base = opts
        .cache
        .join("lipstream")
        .join(format!("{name}-{version}"));
    if files.iter().all(|f| base.join(f).exists()) {
        return Ok(base);
    }
    let url = format!(
        "{}/pypi/{name}/{version}/json",
        opts.pypi_url.trim_end_matches('/')
    );
    let mut resp = agent(10)
        .get(&url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    if resp.status().as_u16() != 200 {
        bail!("GET {url}: HTTP {}", resp.status().as_u16());
    }
    let meta: serde_json::Value = serde_json::from_str(&resp.body_mut().read_to_string()?)
        .with_context(|| format!("{url}: not JSON"))?;
    let wheel = meta["urls"]
        .as_array()
        .and_then(|u| u.iter().find(|f| f["packagetype"] == "bdist_wheel"))
        .ok_or_else(|| anyhow!("{url}: no wheel listed"))?;
    let wheel_url = wheel["url"]
        .as_str()
        .ok_or_else(|| anyhow!("{url}: wheel without url"))?;
    let sha256 = wheel["digests"]["sha256"]
        .as_str()
        .ok_or_else(|| anyhow!("{url}: wheel without sha256"))?
        .to_lowercase();
    let filename = wheel["filename"].as_str().unwrap_or("package.whl");
    let whl = base.join(filename);
    if !whl.exists() {
        download(opts, wheel_url, &whl, wheel["size"].as_u64(), filename)?;
        verify(&whl, &sha256).inspect_err(|_| {
            let _ = fs::remove_file(&whl);
        })?;
    }
    let mut zip = zip::ZipArchive::new(File::open(&whl)?)
        .with_context(|| format!("{}: not a wheel", whl.display()))?;
    for f in files {
        let inner = format!("{inner_dir}{f}");
        let mut entry = zip
            .by_name(&inner)
            .with_context(|| format!("{}: no {inner}", whl.display()))?;
        let mut out = File::create(base.join(f))?;
        std::io::copy(&mut entry, &mut out).with_context(|| format!("cannot extract {inner}"))?;
    }
    Ok(base)
}

//! `lipstream models pull` against a local stand-in for the Hugging Face Hub and PyPI: the Hub
//! cache layout, checksums, resume after a broken connection, no re-download, and a corrupt file
//! refused.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;
use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Hub {
    files: HashMap<String, Vec<u8>>,
    /// Files whose first GET breaks off half way.
    flaky: Vec<String>,
    /// Files served with other bytes than their checksum says.
    corrupt: Vec<String>,
    gets: Vec<(String, Option<String>)>,
}

type Shared = Arc<Mutex<Hub>>;

fn sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn git_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex::encode(h.finalize())
}

async fn resolve(
    State(hub): State<Shared>,
    method: Method,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let Some((repo_path, file)) = path.split_once("/resolve/main/") else {
        return Response::builder().status(404).body(Body::empty()).unwrap();
    };
    let key = format!("{repo_path}/{file}");
    let mut hub = hub.lock().unwrap();
    let Some(data) = hub.files.get(&key).cloned() else {
        return Response::builder().status(404).body(Body::empty()).unwrap();
    };
    let lfs = data.len() > 1000;
    let mut r = Response::builder().header("x-repo-commit", COMMIT);
    r = if lfs {
        r.header("x-linked-etag", format!("\"{}\"", sha256(&data)))
            .header("x-linked-size", data.len())
    } else {
        r.header("etag", format!("\"{}\"", git_sha1(&data)))
    };
    if method == Method::HEAD {
        return r
            .header("content-length", data.len())
            .body(Body::empty())
            .unwrap();
    }
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    hub.gets.push((key.clone(), range.clone()));
    let first_get = hub.gets.iter().filter(|(k, _)| *k == key).count() == 1;
    let mut body = data.clone();
    if hub.corrupt.contains(&key) {
        body[0] ^= 0xff;
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let rest = body[start..].to_vec();
    if first_get && hub.flaky.contains(&key) {
        // Half the bytes, then the connection breaks.
        // The pause lets the client read the first half before the connection resets (a reset
        // discards unread data).
        use futures_util::StreamExt;
        let half = rest[..rest.len() / 2].to_vec();
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(half)]);
        let broken = futures_util::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            Err(std::io::Error::other("network died"))
        });
        return r
            .status(status)
            .header("content-length", rest.len())
            .body(Body::from_stream(first.chain(broken)))
            .unwrap();
    }
    r.status(status)
        .header("content-length", rest.len())
        .body(Body::from(rest))
        .unwrap()
}

fn wheel(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    for (name, data) in files {
        z.start_file(
            format!("facenet_pytorch/data/{name}"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
    buf.into_inner()
}

fn start(hub: Shared) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let whl = hub
        .lock()
        .unwrap()
        .files
        .get("files/facenet_pytorch-2.6.0-py3-none-any.whl")
        .cloned()
        .unwrap();
    let meta = serde_json::json!({ "urls": [{
        "packagetype": "bdist_wheel",
        "filename": "facenet_pytorch-2.6.0-py3-none-any.whl",
        "url": format!("{base}/files/facenet_pytorch-2.6.0-py3-none-any.whl"),
        "size": whl.len(),
        "digests": { "sha256": sha256(&whl) },
    }]});
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let app = Router::new()
                .route(
                    "/pypi/facenet-pytorch/2.6.0/json",
                    get(move || async move { axum::Json(meta) }),
                )
                .route("/files/{name}", get(move || async move { whl }))
                .route("/{*path}", any(resolve))
                .with_state(hub);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    base
}

fn pull(base: &str, home: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lipstream"))
        .args(["models", "pull", "musetalk-1.5", "--out"])
        .arg(out)
        .env("HF_ENDPOINT", base)
        .env("LIPSTREAM_PYPI_URL", base)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap()
}

fn fake_files() -> HashMap<String, Vec<u8>> {
    let big = |seed: u8, n: usize| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
    };
    let mut files = HashMap::new();
    files.insert(
        "TMElyralab/MuseTalk/musetalkV15/musetalk.json".into(),
        b"{\"in_channels\": 8}".to_vec(),
    );
    files.insert(
        "TMElyralab/MuseTalk/musetalkV15/unet.pth".into(),
        big(1, 300_000),
    );
    files.insert(
        "stabilityai/sd-vae-ft-mse/config.json".into(),
        b"{}".to_vec(),
    );
    files.insert(
        "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors".into(),
        big(2, 50_000),
    );
    files.insert(
        "openai/whisper-tiny/config.json".into(),
        b"{\"d_model\": 384}".to_vec(),
    );
    files.insert(
        "openai/whisper-tiny/preprocessor_config.json".into(),
        b"{}".to_vec(),
    );
    files.insert(
        "openai/whisper-tiny/model.safetensors".into(),
        big(3, 20_000),
    );
    let whl = wheel(&[("pnet.pt", b"p"), ("rnet.pt", b"r"), ("onet.pt", b"o")]);
    files.insert("files/facenet_pytorch-2.6.0-py3-none-any.whl".into(), whl);
    files
}

#[test]
fn pulls_into_the_hub_cache_resumes_and_checks() {
    let files = fake_files();
    let hub = Arc::new(Mutex::new(Hub {
        files: files.clone(),
        flaky: vec!["TMElyralab/MuseTalk/musetalkV15/unet.pth".into()],
        ..Hub::default()
    }));
    let base = start(hub.clone());
    let tmp = std::env::temp_dir().join(format!("lipstream-pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (home, out) = (tmp.join("hf"), tmp.join("models"));

    let run = pull(&base, &home, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let unet = &files["TMElyralab/MuseTalk/musetalkV15/unet.pth"];
    assert_eq!(
        &std::fs::read(out.join("musetalkV15/unet.pth")).unwrap(),
        unet
    );
    assert_eq!(
        std::fs::read(out.join("whisper/config.json")).unwrap(),
        b"{\"d_model\": 384}"
    );
    assert_eq!(std::fs::read(out.join("mtcnn/onet.pt")).unwrap(), b"o");

    // The Hub cache layout: blob named by its checksum, snapshot link, ref.
    let repo = home.join("hub/models--TMElyralab--MuseTalk");
    assert_eq!(
        std::fs::read(repo.join("blobs").join(sha256(unet))).unwrap(),
        *unet
    );
    let snap = repo
        .join("snapshots")
        .join(COMMIT)
        .join("musetalkV15/unet.pth");
    assert!(std::fs::symlink_metadata(&snap)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );

    // The broken download resumed from where it stopped.
    let gets: Vec<_> = hub
        .lock()
        .unwrap()
        .gets
        .iter()
        .filter(|(k, _)| k.ends_with("unet.pth"))
        .cloned()
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].1, None);
    assert_eq!(gets[1].1.as_deref(), Some("bytes=150000-"), "{gets:?}");

    // A second pull downloads nothing.
    let before = hub.lock().unwrap().gets.len();
    assert!(pull(&base, &home, &out).status.success());
    assert_eq!(hub.lock().unwrap().gets.len(), before);

    // A file that does not match its published checksum is refused and not kept.
    let hub2 = Arc::new(Mutex::new(Hub {
        files,
        corrupt: vec!["stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors".into()],
        ..Hub::default()
    }));
    let base2 = start(hub2);
    let home2 = tmp.join("hf2");
    let run = pull(&base2, &home2, &tmp.join("models2"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    let blobs = home2.join("hub/models--stabilityai--sd-vae-ft-mse/blobs");
    assert!(!blobs
        .join(sha256(
            &fake_files()["stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors"]
        ))
        .exists());
}

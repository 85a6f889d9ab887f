//! `lipstream serve`: binds the sockets, starts the driver and the HTTP server, stops on a signal.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::{LipsyncConfig, ServeConfig};
use crate::http::{router, Admission, AppState};
use crate::lipsync::{
    AvatarAssets, AvatarStage, CameraStage, CameraStageConfig, ModelSource, Renderer,
    RendererConfig,
};
use crate::media::stage::{Delay, Identity, Lookahead};
use crate::media::worker::WorkerConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rtc::driver::{Driver, DriverParts, StageFactory};

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    crate::rtc::init_crypto();
    // An engine file brings its kernels compiled; a models folder needs NVRTC to compile them.
    let compile = !matches!(
        config.lipsync.as_ref().map(|l| &l.source),
        Some(ModelSource::Engine(_))
    );
    match lipstream_gpu::device::executor_choice(compile) {
        Ok(gpu) => tracing::info!("model executor: CUDA ({gpu})"),
        Err(why) => tracing::info!("model executor: CPU reference executor, no CUDA here ({why})"),
    }
    let sockets = bind_udp(&config.ice_addrs, config.udp_port).await?;
    let local_addrs: Vec<SocketAddr> = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
    let listener = TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http))?;
    let http_addr = listener.local_addr()?;

    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Mutex::new(Registry::new(
        config.max_sessions,
        config.max_viewers,
    )));
    let mut admission: Option<Admission> = None;
    let stage: StageFactory = match (
        config.debug_stage_delay_ms,
        config.debug_stage_lookahead_ms,
        &config.lipsync,
    ) {
        (None, None, Some(lipsync)) => {
            let (stage, admit) =
                lipsync_stage(lipsync.clone(), config.frame_budget, metrics.clone()).await?;
            admission = admit;
            stage
        }
        (Some(ms), _, _) => {
            tracing::warn!(ms, "testing: every frame is held by a delay stage");
            Arc::new(move || Box::new(Delay { ms }))
        }
        (None, Some(ms), _) => {
            tracing::warn!(
                ms,
                "testing: a stage that hears ahead; video and audio are held"
            );
            Arc::new(move || Box::new(Lookahead { ms: ms as f64 }))
        }
        (None, None, None) => Arc::new(|| Box::new(Identity)),
    };
    let (commands, command_rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = Driver::new(
        DriverParts {
            sockets,
            registry: registry.clone(),
            metrics: metrics.clone(),
            ice_timeout: config.ice_timeout,
            worker: WorkerConfig {
                frame_budget: config.frame_budget,
                bitrate_start_bps: config.video_bps,
                bitrate_max_bps: config.video_max_bps,
            },
            stage,
        },
        command_rx,
    );
    let driver = tokio::spawn(driver.run());

    let udp: Vec<String> = local_addrs.iter().map(ToString::to_string).collect();
    tracing::info!(http = %http_addr, udp = %udp.join(","), "lipstream serving; open http://{http_addr}/");
    // One machine-readable line on stdout, for scripts and tests that start us on port 0.
    println!("lipstream listening http={http_addr} udp={}", udp.join(","));

    let state = AppState {
        registry,
        commands,
        metrics,
        config: Arc::new(config),
        local_addrs: Arc::new(local_addrs),
        admission,
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server failed")?;
    // The router (and its command sender) is gone: the driver closes every peer and returns.
    driver.await.context("the WebRTC driver panicked")?;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the renderer (loading, maybe building, the model) and makes the sessions' camera or
/// avatar stages for it, and, with a load limit, the check a new publisher must pass.
async fn lipsync_stage(
    config: LipsyncConfig,
    frame_budget: std::time::Duration,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(StageFactory, Option<Admission>)> {
    let compile = matches!(config.source, ModelSource::Models(_));
    let cuda = config.executor.cuda(compile)?;
    let mode = if config.avatar.is_some() {
        crate::engine::Stage::Avatar
    } else {
        crate::engine::Stage::Camera
    };
    // An engine file brings its profiles (empty here: all of them; else those of its asked for).
    let batches = if !config.batches.is_empty() || matches!(config.source, ModelSource::Engine(_)) {
        config.batches.clone()
    } else if cuda {
        mode.default_batches()
    } else {
        vec![1, 2]
    };
    // Fail at start, not at the first session, on files that do not load.
    let avatar = match &config.avatar {
        Some(path) => Some(Arc::new(AvatarAssets::load(path)?)),
        None => {
            lipstream_engines::models::mtcnn::Mtcnn::open(&config.mtcnn_dir, Default::default())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "face detector weights in {}: {e}",
                        config.mtcnn_dir.display()
                    )
                })?;
            None
        }
    };
    let stage_config = CameraStageConfig {
        mtcnn_dir: config.mtcnn_dir.clone(),
        hop_frames: config.audio_hop_frames,
        tracker: Default::default(),
        min_face_px: config.min_face_px,
    };
    // One renderer per GPU (the CPU executor: one for the machine), and how refusals name it.
    let on_gpus = cuda || matches!(config.source, ModelSource::Engine(_));
    let (gpus, names): (Vec<usize>, Vec<String>) = if on_gpus {
        let gpus = config.gpus.clone();
        let names = gpus.iter().map(|g| format!("GPU {g}")).collect();
        (gpus, names)
    } else {
        (vec![0], vec!["the CPU executor".into()])
    };
    let mut renderers = Vec::with_capacity(gpus.len());
    for gpu in gpus {
        let renderer_config = RendererConfig {
            source: config.source.clone(),
            mode,
            profiles: batches.clone(),
            cuda,
            gpu,
            frame_budget,
            whisper_wait: config.whisper_wait,
            hold_batches: config.hold_batches,
        };
        let renderer_metrics = metrics.clone();
        let renderer =
            tokio::task::spawn_blocking(move || Renderer::start(renderer_config, renderer_metrics))
                .await
                .context("the renderer start panicked")?
                .with_context(|| format!("the renderer for GPU {gpu}"))?;
        renderers.push(renderer);
    }
    tracing::info!(
        "lip-sync: {} on {}; whisper every {} frames (on a GPU, windows wait up to {} ms to run together), so video and audio leave {:.0} ms after they arrive ({:.0} ms lookahead + {} ms frame budget)",
        match &config.avatar {
            Some(p) => format!("avatar mode ({})", p.display()),
            None => "camera mode".into(),
        },
        renderers
            .iter()
            .map(|r| format!("the {}", r.executor))
            .collect::<Vec<_>>()
            .join(" and "),
        config.audio_hop_frames,
        config.whisper_wait.as_millis(),
        crate::lipsync::AudioFeed::lookahead_ms(config.audio_hop_frames)
            + frame_budget.as_secs_f64() * 1000.0,
        crate::lipsync::AudioFeed::lookahead_ms(config.audio_hop_frames),
        frame_budget.as_millis()
    );
    let admission = config.max_gpu_load.map(|max| -> Admission {
        let renderers = renderers.clone();
        Arc::new(move || {
            let mut why = Vec::with_capacity(renderers.len());
            for (r, name) in renderers.iter().zip(&names) {
                match r.load().room(max) {
                    Ok(()) => return Ok(()),
                    Err(e) => why.push(format!("{name} {e}")),
                }
            }
            Err(why.join("; "))
        })
    });
    let hop = config.audio_hop_frames;
    let stage: StageFactory = Arc::new(move || -> Box<dyn crate::media::stage::Stage> {
        // The GPU with the most headroom takes the new session.
        let loads: Vec<_> = renderers.iter().map(|r| r.load()).collect();
        let pick = crate::placement::choose(&loads).unwrap_or(0);
        let Some(renderer) = renderers.get(pick) else {
            tracing::error!("no renderer: frames pass through");
            return Box::new(Identity);
        };
        if renderers.len() > 1 {
            tracing::info!(gpu = pick, load = ?loads[pick], "session placed");
        }
        if let Some(assets) = &avatar {
            return match AvatarStage::new(renderer.clone(), assets.clone(), hop, metrics.clone()) {
                Ok(s) => Box::new(s),
                Err(e) => {
                    tracing::error!("lip-sync stage unavailable, frames pass through: {e}");
                    Box::new(Identity)
                }
            };
        }
        match CameraStage::new(renderer.clone(), &stage_config, metrics.clone()) {
            Ok(s) => Box::new(s),
            Err(e) => {
                tracing::error!("lip-sync stage unavailable, frames pass through: {e:#}");
                Box::new(Identity)
            }
        }
    });
    Ok((stage, admission))
}

/// One UDP socket per host address, all on one port where possible.
async fn bind_udp(addrs: &[IpAddr], port: u16) -> anyhow::Result<Vec<Arc<UdpSocket>>> {
    let mut sockets = Vec::new();
    let mut port = port;
    for ip in addrs {
        let socket = match UdpSocket::bind((*ip, port)).await {
            Ok(s) => s,
            Err(e) if sockets.is_empty() => {
                return Err(e).with_context(|| format!("cannot bind UDP {ip}:{port}"));
            }
            Err(e) => {
                tracing::warn!(%ip, port, "skipping this address for media: {e}");
                continue;
            }
        };
        if port == 0 {
            port = socket.local_addr()?.port();
        }
        sockets.push(Arc::new(socket));
    }
    if sockets.is_empty() {
        anyhow::bail!("no address to bind UDP media on");
    }
    Ok(sockets)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

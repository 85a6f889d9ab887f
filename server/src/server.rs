//! `lipstream serve`: binds the sockets, starts the driver and the HTTP server, stops on a signal.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::ServeConfig;
use crate::http::{router, AppState};
use crate::media::stage::{Delay, Identity, Lookahead};
use crate::media::worker::WorkerConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rtc::driver::{Driver, DriverParts, StageFactory};

/// Runs the server until SIGINT/SIGTERM.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    crate::rtc::init_crypto();
    match lipstream_gpu::device::executor_choice() {
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
    let stage: StageFactory = match (config.debug_stage_delay_ms, config.debug_stage_lookahead_ms) {
        (Some(ms), _) => {
            tracing::warn!(ms, "testing: every frame is held by a delay stage");
            Arc::new(move || Box::new(Delay { ms }))
        }
        (None, Some(ms)) => {
            tracing::warn!(
                ms,
                "testing: a stage that hears ahead; video and audio are held"
            );
            Arc::new(move || Box::new(Lookahead { ms: ms as f64 }))
        }
        (None, None) => Arc::new(|| Box::new(Identity)),
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

//! The driver: one task that owns every `Rtc` and moves bytes between them, the UDP sockets and
//! the media workers.
//!
//! str0m is sans-IO, so all sessions share this one loop and one socket per host address: no task
//! per connection, nothing to leak when a peer goes away. The loop never waits on a media worker
//! (it hands them media through bounded queues) and never blocks on a socket (sends are
//! `try_send_to`; a full socket buffer drops the datagram, as the network would).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::media::{KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::media::stage::Stage;
use crate::media::worker::{self, WorkerConfig, WorkerHandle, WorkerInput, WorkerOutput};
use crate::metrics::Metrics;
use crate::registry::{Registry, SessionId, ViewerId};
use crate::rtc::{pick_audio_pt, pick_video_pt};

/// Largest datagram we read; WebRTC stays under ~1200-1500 bytes.
const DATAGRAM_MAX: usize = 2048;
/// Do not ask the publisher for keyframes more often than this.
const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(500);
/// Wake up at least this often even when no peer asked to.
const IDLE_TICK: Duration = Duration::from_millis(500);

/// What the HTTP handlers ask of the driver.
pub enum Command {
    AddPublisher {
        session: SessionId,
        rtc: Box<Rtc>,
    },
    AddViewer {
        viewer: ViewerId,
        session: SessionId,
        rtc: Box<Rtc>,
    },
    CloseSession(SessionId),
    CloseViewer(ViewerId),
}

/// Makes the pipeline stage for each new session (on the session's media worker thread: a
/// stage may load files).
pub type StageFactory = Arc<dyn Fn() -> Box<dyn Stage> + Send + Sync>;

/// Everything the driver needs to start.
pub struct DriverParts {
    pub sockets: Vec<Arc<UdpSocket>>,
    pub registry: Arc<Mutex<Registry>>,
    pub metrics: Arc<Metrics>,
    pub ice_timeout: Duration,
    pub worker: WorkerConfig,
    pub stage: StageFactory,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum PeerKey {
    Publisher(SessionId),
    Viewer(ViewerId),
}

struct Peer {
    session: SessionId,
    rtc: Rtc,
    /// Mids we send on, from `MediaAdded` with a sending direction.
    audio_tx: Option<Mid>,
    video_tx: Option<Mid>,
    /// The publisher's incoming video mid, for keyframe requests.
    video_rx: Option<Mid>,
    connected: bool,
    last_rx: Instant,
    timeout: Instant,
    bitrate_bps: Option<u64>,
    keyframe_requested: Option<Instant>,
}

struct Session {
    worker: WorkerHandle,
    viewers: Vec<ViewerId>,
}

struct Datagram {
    data: Vec<u8>,
    source: SocketAddr,
    destination: SocketAddr,
}

/// The running driver.
pub struct Driver {
    parts: DriverParts,
    /// The sockets with their local addresses, looked up per datagram sent.
    sockets: Vec<(SocketAddr, Arc<UdpSocket>)>,
    peers: HashMap<PeerKey, Peer>,
    sessions: HashMap<SessionId, Session>,
    /// Which peer a remote address talks to; checked with `accepts` before use.
    routes: HashMap<(SocketAddr, SocketAddr), PeerKey>,
    commands: UnboundedReceiver<Command>,
    datagrams: UnboundedReceiver<Datagram>,
    worker_rx: UnboundedReceiver<WorkerOutput>,
    worker_tx: UnboundedSender<WorkerOutput>,
}

impl Driver {
    /// Spawns the socket readers and returns the driver, ready to `run`.
    pub fn new(parts: DriverParts, commands: UnboundedReceiver<Command>) -> Self {
        let (datagram_tx, datagrams) = tokio::sync::mpsc::unbounded_channel();
        for socket in &parts.sockets {
            tokio::spawn(read_socket(
                socket.clone(),
                datagram_tx.clone(),
                parts.metrics.clone(),
            ));
        }
        let (worker_tx, worker_rx) = tokio::sync::mpsc::unbounded_channel();
        let sockets = parts
            .sockets
            .iter()
            .filter_map(|s| Some((s.local_addr().ok()?, s.clone())))
            .collect();
        Driver {
            parts,
            sockets,
            peers: HashMap::new(),
            sessions: HashMap::new(),
            routes: HashMap::new(),
            commands,
            datagrams,
            worker_rx,
            worker_tx,
        }
    }

    /// Runs until the command channel closes (server shutdown).
    pub async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(d) = self.datagrams.recv() => self.receive(d),
                Some(out) = self.worker_rx.recv() => self.worker_output(out),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            self.tick(Instant::now());
            self.reap();
        }
        for peer in self.peers.values_mut() {
            peer.rtc.disconnect();
        }
        self.reap();
    }

    fn next_wake(&self) -> Instant {
        let ice = self.parts.ice_timeout;
        self.peers
            .values()
            .map(|p| p.timeout.min(p.last_rx + ice))
            .min()
            .unwrap_or_else(|| Instant::now() + IDLE_TICK)
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::AddPublisher { session, rtc } => {
                let handle = match worker::spawn(
                    session.clone(),
                    self.parts.worker.clone(),
                    self.parts.stage.clone(),
                    self.parts.metrics.clone(),
                    self.worker_tx.clone(),
                ) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::error!(%session, "cannot start a media worker: {e}");
                        self.forget_session(&session);
                        return;
                    }
                };
                tracing::info!(%session, "publisher added");
                self.sessions.insert(
                    session.clone(),
                    Session {
                        worker: handle,
                        viewers: Vec::new(),
                    },
                );
                self.add_peer(PeerKey::Publisher(session.clone()), session, *rtc);
            }
            Command::AddViewer {
                viewer,
                session,
                rtc,
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    // The session ended between the HTTP answer and now.
                    self.parts
                        .registry
                        .lock()
                        .map(|mut r| r.close_viewer(&viewer))
                        .ok();
                    return;
                };
                tracing::info!(%session, %viewer, "viewer added");
                s.viewers.push(viewer.clone());
                self.add_peer(PeerKey::Viewer(viewer), session, *rtc);
            }
            Command::CloseSession(session) => {
                if let Some(p) = self.peers.get_mut(&PeerKey::Publisher(session)) {
                    p.rtc.disconnect();
                }
            }
            Command::CloseViewer(viewer) => {
                if let Some(p) = self.peers.get_mut(&PeerKey::Viewer(viewer)) {
                    p.rtc.disconnect();
                }
            }
        }
        self.update_gauges();
    }

    fn add_peer(&mut self, key: PeerKey, session: SessionId, rtc: Rtc) {
        let now = Instant::now();
        self.peers.insert(
            key.clone(),
            Peer {
                session,
                rtc,
                audio_tx: None,
                video_tx: None,
                video_rx: None,
                connected: false,
                last_rx: now,
                timeout: now,
                bitrate_bps: None,
                keyframe_requested: None,
            },
        );
        self.poll(&key);
    }

    fn receive(&mut self, d: Datagram) {
        let Ok(contents) = d.data.as_slice().try_into() else {
            return; // Not STUN, DTLS, RTP or RTCP: stray traffic.
        };
        let now = Instant::now();
        let input = Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source: d.source,
                destination: d.destination,
                contents,
            },
        );
        let route = (d.source, d.destination);
        let cached = self
            .routes
            .get(&route)
            .filter(|k| self.peers.get(*k).is_some_and(|p| p.rtc.accepts(&input)))
            .cloned();
        let key = match cached {
            Some(k) => k,
            None => match self.peers.iter().find(|(_, p)| p.rtc.accepts(&input)) {
                Some((k, _)) => {
                    self.routes.insert(route, k.clone());
                    k.clone()
                }
                None => return, // Often a STUN check racing the HTTP answer; the peer retries.
            },
        };
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.last_rx = now;
            if let Err(e) = peer.rtc.handle_input(input) {
                tracing::warn!(session = %peer.session, "closing a peer after bad input: {e}");
                peer.rtc.disconnect();
            }
        }
        self.poll(&key);
    }

    /// Advances time in every peer that asked for it, and drops peers that went silent.
    fn tick(&mut self, now: Instant) {
        let ice_timeout = self.parts.ice_timeout;
        let due: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.timeout <= now || now.duration_since(p.last_rx) >= ice_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(peer) = self.peers.get_mut(&key) else {
                continue;
            };
            if now.duration_since(peer.last_rx) >= ice_timeout {
                tracing::info!(session = %peer.session, ?key, "peer silent for {ice_timeout:?}, closing it");
                peer.rtc.disconnect();
                continue;
            }
            if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                tracing::warn!(session = %peer.session, "closing a peer: {e}");
                peer.rtc.disconnect();
            }
            self.poll(&key);
        }
    }

    /// Drains a peer's output: datagrams go out, events are handled, the next timeout is kept.
    fn poll(&mut self, key: &PeerKey) {
        let mut events = Vec::new();
        {
            let Some(peer) = self.peers.get_mut(key) else {
                return;
            };
            while peer.rtc.is_alive() {
                match peer.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        peer.timeout = t;
                        break;
                    }
                    Ok(Output::Transmit(t)) => send(&self.sockets, &self.parts.metrics, t),
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        tracing::warn!(session = %peer.session, "closing a peer: {e}");
                        peer.rtc.disconnect();
                    }
                }
            }
        }
        for e in events {
            self.event(key, e);
        }
    }

    fn event(&mut self, key: &PeerKey, event: Event) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let session = peer.session.clone();
        match event {
            Event::Connected => {
                peer.connected = true;
                // Let the estimator probe up to what the encoder may use; no padding floor.
                let desired = Bitrate::bps(u64::from(self.parts.worker.bitrate_max_bps));
                peer.rtc.bwe().set_bitrate(Bitrate::bps(0), desired);
                tracing::info!(%session, ?key, "connected");
                // A new receiver needs a keyframe to start decoding.
                self.to_worker(&session, WorkerInput::Keyframe);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                tracing::info!(%session, ?key, "ICE disconnected");
                peer.rtc.disconnect();
            }
            Event::MediaAdded(m) if m.direction.is_sending() => match m.kind {
                MediaKind::Audio => peer.audio_tx = Some(m.mid),
                MediaKind::Video => peer.video_tx = Some(m.mid),
            },
            Event::MediaData(data) if matches!(key, PeerKey::Publisher(_)) => {
                let input = if data.params.spec().codec.is_audio() {
                    WorkerInput::Audio {
                        rtp_time: data.time,
                        arrival: data.network_time,
                        data: data.data,
                    }
                } else {
                    peer.video_rx = Some(data.mid);
                    if !data.contiguous {
                        self.request_keyframe(&session);
                    }
                    WorkerInput::Video {
                        rtp_time: data.time,
                        arrival: data.network_time,
                        data: data.data,
                    }
                };
                self.to_worker(&session, input);
            }
            Event::KeyframeRequest(_) => self.to_worker(&session, WorkerInput::Keyframe),
            Event::EgressBitrateEstimate(
                BweKind::Twcc { estimate, .. } | BweKind::Remb { estimate, .. },
            ) => {
                tracing::debug!(%session, ?key, bps = estimate.as_u64(), "bandwidth estimate");
                peer.bitrate_bps = Some(estimate.as_u64());
                let lowest = self
                    .peers
                    .values()
                    .filter(|p| p.session == session && p.connected)
                    .filter_map(|p| p.bitrate_bps)
                    .min();
                if let Some(bps) = lowest {
                    self.to_worker(&session, WorkerInput::Bitrate(bps));
                }
            }
            _ => {}
        }
    }

    fn to_worker(&self, session: &SessionId, input: WorkerInput) {
        if let Some(s) = self.sessions.get(session) {
            s.worker.send(input);
        }
    }

    fn request_keyframe(&mut self, session: &SessionId) {
        let key = PeerKey::Publisher(session.clone());
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let now = Instant::now();
        if peer
            .keyframe_requested
            .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_GAP)
        {
            return;
        }
        let Some(mid) = peer.video_rx else { return };
        if let Some(mut writer) = peer.rtc.writer(mid) {
            if writer
                .request_keyframe(None, KeyframeRequestKind::Pli)
                .is_ok()
            {
                peer.keyframe_requested = Some(now);
                self.parts.metrics.keyframes_requested.inc();
            }
        }
        self.poll(&key);
    }

    fn worker_output(&mut self, out: WorkerOutput) {
        let (session, kind, rtp_time, wallclock, data) = match out {
            WorkerOutput::NeedKeyframe { session } => return self.request_keyframe(&session),
            WorkerOutput::Audio {
                session,
                rtp_time,
                wallclock,
                data,
            } => (session, MediaKind::Audio, rtp_time, wallclock, data),
            WorkerOutput::Video {
                session,
                rtp_time,
                wallclock,
                data,
            } => (session, MediaKind::Video, rtp_time, wallclock, data),
        };
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let mut keys = vec![PeerKey::Publisher(session.clone())];
        keys.extend(s.viewers.iter().cloned().map(PeerKey::Viewer));
        for key in keys {
            if let Some(peer) = self.peers.get_mut(&key) {
                write_media(peer, kind, rtp_time, wallclock, &data);
            }
            self.poll(&key);
        }
    }

    /// Removes dead peers; a dead publisher ends its session and its viewers.
    fn reap(&mut self) {
        let dead: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.rtc.is_alive())
            .map(|(k, _)| k.clone())
            .collect();
        if dead.is_empty() {
            return;
        }
        for key in dead {
            self.peers.remove(&key);
            match key {
                PeerKey::Publisher(session) => {
                    tracing::info!(%session, "session closed");
                    if let Some(s) = self.sessions.remove(&session) {
                        for v in s.viewers {
                            if let Some(p) = self.peers.get_mut(&PeerKey::Viewer(v)) {
                                p.rtc.disconnect();
                            }
                        }
                    }
                    self.forget_session(&session);
                }
                PeerKey::Viewer(viewer) => {
                    tracing::info!(%viewer, "viewer closed");
                    for s in self.sessions.values_mut() {
                        s.viewers.retain(|v| *v != viewer);
                    }
                    self.parts
                        .registry
                        .lock()
                        .map(|mut r| r.close_viewer(&viewer))
                        .ok();
                }
            }
        }
        // Viewers of a closed session were just disconnected: remove them in the same pass.
        self.reap();
        self.routes.retain(|_, k| self.peers.contains_key(k));
        self.update_gauges();
    }

    fn forget_session(&self, session: &SessionId) {
        self.parts
            .registry
            .lock()
            .map(|mut r| r.close_session(session))
            .ok();
    }

    fn update_gauges(&self) {
        if let Ok(r) = self.parts.registry.lock() {
            self.parts.metrics.sessions.set(r.session_count() as i64);
            self.parts.metrics.viewers.set(r.viewer_count() as i64);
        }
    }
}

fn write_media(
    peer: &mut Peer,
    kind: MediaKind,
    rtp_time: MediaTime,
    wallclock: Instant,
    data: &Arc<[u8]>,
) {
    if !peer.connected {
        return;
    }
    let mid = match kind {
        MediaKind::Audio => peer.audio_tx,
        MediaKind::Video => peer.video_tx,
    };
    let Some(writer) = mid.and_then(|m| peer.rtc.writer(m)) else {
        return;
    };
    let pt = match kind {
        MediaKind::Audio => pick_audio_pt(writer.payload_params()),
        MediaKind::Video => pick_video_pt(writer.payload_params()),
    };
    let Some(pt) = pt else { return };
    if let Err(e) = writer.write(pt, wallclock, rtp_time, data.clone()) {
        tracing::warn!(session = %peer.session, "closing a peer that cannot take media: {e}");
        peer.rtc.disconnect();
    }
}

fn send(sockets: &[(SocketAddr, Arc<UdpSocket>)], metrics: &Metrics, t: str0m::net::Transmit) {
    let Some((_, socket)) = sockets.iter().find(|(a, _)| *a == t.source) else {
        return; // str0m only sends from the candidates we gave it.
    };
    match socket.try_send_to(&t.contents, t.destination) {
        Ok(n) => {
            metrics.bytes_out.inc_by(n as u64);
        }
        Err(e) => tracing::debug!(destination = %t.destination, "UDP send failed: {e}"),
    }
}

async fn read_socket(socket: Arc<UdpSocket>, tx: UnboundedSender<Datagram>, metrics: Arc<Metrics>) {
    let Ok(destination) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; DATAGRAM_MAX];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, source)) => {
                metrics.bytes_in.inc_by(n as u64);
                let d = Datagram {
                    data: buf[..n].to_vec(),
                    source,
                    destination,
                };
                if tx.send(d).is_err() {
                    return; // The driver stopped.
                }
            }
            // ICMP port-unreachable from a vanished peer surfaces here on Linux; keep reading.
            Err(e) => tracing::debug!(%destination, "UDP receive error: {e}"),
        }
    }
}

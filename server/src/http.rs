//! HTTP: the page, WHIP/WHEP signalling, health and metrics.
//!
//! Handlers validate everything that came over the network, answer with a precise status and
//! reason, and hand accepted peers to the driver; they never touch media.

// Helpers return the refusal itself as the error: it is the cold path, built once per request.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use str0m::change::SdpOffer;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::registry::{Refusal, Registry, SessionId, ViewerId};
use crate::rtc::driver::Command;
use crate::rtc::new_rtc;
use crate::sdp::{OfferProblem, OfferSummary};

/// Seconds a client is told to wait when the server is full.
const RETRY_AFTER_S: &str = "5";
/// Largest SDP body accepted; real offers are a few KB.
const SDP_MAX_BYTES: usize = 64 * 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Mutex<Registry>>,
    pub commands: UnboundedSender<Command>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ServeConfig>,
    /// The UDP sockets' addresses: the host candidates of every answer.
    pub local_addrs: Arc<Vec<SocketAddr>>,
    /// The check a new publisher must pass (`--max-gpu-load`); none: no such check.
    pub admission: Option<Admission>,
}

/// Whether the GPUs have room for one more session; else why not, for the refusal.
pub type Admission = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| page("index.html")))
        .route("/viewer", get(|| page("viewer.html")))
        .route(
            "/web/{file}",
            get(|Path(file): Path<String>| page_owned(file)),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/sessions", get(sessions))
        .route("/whip", post(whip_post))
        .route("/whip/{id}", delete(whip_delete))
        .route("/whep", post(whep_post))
        .route("/whep/{id}", delete(whep_delete))
        .layer(axum::extract::DefaultBodyLimit::max(SDP_MAX_BYTES))
        .with_state(state)
}

/// The page's files, built into the binary so it runs from anywhere.
const WEB_FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "viewer.html",
        "text/html; charset=utf-8",
        include_str!("../../web/viewer.html"),
    ),
    (
        "app.js",
        "text/javascript",
        include_str!("../../web/app.js"),
    ),
    (
        "viewer.js",
        "text/javascript",
        include_str!("../../web/viewer.js"),
    ),
    (
        "webrtc.js",
        "text/javascript",
        include_str!("../../web/webrtc.js"),
    ),
    ("style.css", "text/css", include_str!("../../web/style.css")),
];

async fn page(name: &'static str) -> Response {
    page_owned(name.to_string()).await
}

async fn page_owned(name: String) -> Response {
    match WEB_FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime)], *body).into_response(),
        None => text(StatusCode::NOT_FOUND, format!("no such file: {name}")),
    }
}

fn text(status: StatusCode, reason: impl Into<String>) -> Response {
    let mut reason = reason.into();
    reason.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason,
    )
        .into_response()
}

/// Health, and whether a new publisher would be taken now (`accepting`, else `full`: why not),
/// for a load balancer in front of several servers.
async fn healthz(State(st): State<AppState>) -> Response {
    let (sessions, viewers, room) = match st.registry.lock() {
        Ok(r) => (r.session_count(), r.viewer_count(), r.session_room()),
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "registry lock poisoned"),
    };
    let full = match room {
        Err(Refusal::SessionLimit { max }) => Some(format!("at its session limit ({max})")),
        _ => st.admission.as_ref().and_then(|admit| admit().err()),
    };
    let mut body = serde_json::json!({
        "status": "ok",
        "sessions": sessions,
        "viewers": viewers,
        "accepting": full.is_none(),
    });
    if let Some(why) = full {
        body["full"] = why.into();
    }
    axum::Json(body).into_response()
}

/// The open sessions, for viewers to pick one (ids allow DELETE: behind the token when one is set).
async fn sessions(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = st.authorize(&headers) {
        return r;
    }
    let listing = st.registry().listing();
    axum::Json(serde_json::json!({ "sessions": listing })).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

impl AppState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = &self.config.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "a valid \"Authorization: Bearer <token>\" header is required",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Err(r)
    }

    fn refuse(&self, status: StatusCode, reason: impl Into<String>) -> Response {
        self.metrics.sessions_rejected.inc();
        let reason = reason.into();
        tracing::info!(%status, "refused an offer: {reason}");
        text(status, reason)
    }

    /// Checks the media type and parses the body as an SDP offer.
    fn read_offer(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(String, SdpOffer), Response> {
        let ctype = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ctype
            .trim()
            .to_ascii_lowercase()
            .starts_with("application/sdp")
        {
            return Err(self.refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("the offer must be sent as Content-Type: application/sdp (got {ctype:?})"),
            ));
        }
        let Ok(sdp) = std::str::from_utf8(body) else {
            return Err(self.refuse(
                StatusCode::BAD_REQUEST,
                "malformed SDP offer: the body is not UTF-8",
            ));
        };
        match SdpOffer::from_sdp_string(sdp) {
            Ok(offer) => Ok((sdp.to_string(), offer)),
            Err(e) => Err(self.refuse(
                StatusCode::BAD_REQUEST,
                format!("malformed SDP offer: {}", tidy_parse_error(&e.to_string())),
            )),
        }
    }

    fn offer_problem(&self, problem: OfferProblem) -> Response {
        let status = match problem {
            OfferProblem::NoAudio => StatusCode::BAD_REQUEST,
            OfferProblem::NoSupportedCodec { .. } => StatusCode::NOT_ACCEPTABLE,
        };
        self.refuse(status, problem.to_string())
    }

    fn refusal(&self, refusal: Refusal) -> Response {
        match refusal {
            Refusal::SessionLimit { max } | Refusal::ViewerLimit { max } => {
                let what = if matches!(refusal, Refusal::SessionLimit { .. }) {
                    "sessions"
                } else {
                    "viewers of this session"
                };
                self.unavailable(format!(
                    "the server is at its limit of {max} {what}; retry later"
                ))
            }
            Refusal::NoSuchSession => self.refuse(StatusCode::NOT_FOUND, "no such session"),
        }
    }

    /// 503 with Retry-After: a limit, not a fault; the same request may pass later.
    fn unavailable(&self, reason: String) -> Response {
        let mut r = self.refuse(StatusCode::SERVICE_UNAVAILABLE, reason);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        r
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock would be a bug in a few lines of map updates; the
        // maps are still consistent, so keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The SDP parser's message spans lines and carries a pointer value; keep one readable line.
fn tidy_parse_error(message: &str) -> String {
    let without_pointer = match (message.find(" at PointerOffset("), message.find(')')) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &message[..start], &message[end + 1..])
        }
        _ => message.to_string(),
    };
    without_pointer
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn created(location: String, answer: String) -> Response {
    let mut r = (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/sdp")],
        answer,
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn whip_post(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = st.authorize(&headers) {
        return r;
    }
    let (sdp, offer) = match st.read_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let Err(p) = OfferSummary::parse(&sdp).check_publish() {
        return st.offer_problem(p);
    }
    // Every session on a GPU past its capacity would lose frames: the new one waits instead.
    if let Some(Err(why)) = st.admission.as_ref().map(|admit| admit()) {
        return st.unavailable(format!(
            "no GPU has room for another lip-sync session ({why}); retry later"
        ));
    }
    let session = match st.registry().open_session() {
        Ok(id) => id,
        Err(refusal) => return st.refusal(refusal),
    };
    let mut rtc = new_rtc(&st.local_addrs, st.config.video_bps);
    let answer = match rtc.sdp_api().accept_offer(offer) {
        Ok(a) => a,
        Err(e) => {
            st.registry().close_session(&session);
            return st.refuse(
                StatusCode::BAD_REQUEST,
                format!("the offer cannot be negotiated: {e}"),
            );
        }
    };
    let command = Command::AddPublisher {
        session: session.clone(),
        rtc: Box::new(rtc),
    };
    if st.commands.send(command).is_err() {
        st.registry().close_session(&session);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    st.metrics.sessions_started.inc();
    st.metrics
        .sessions
        .set(st.registry().session_count() as i64);
    created(format!("/whip/{session}"), answer.to_sdp_string())
}

async fn whip_delete(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = st.authorize(&headers) {
        return r;
    }
    let session = SessionId(id);
    if st.registry().close_session(&session).is_none() {
        return text(StatusCode::NOT_FOUND, format!("no session {session}"));
    }
    let _ = st.commands.send(Command::CloseSession(session));
    StatusCode::OK.into_response()
}

#[derive(Deserialize)]
struct WhepQuery {
    session: Option<String>,
}

async fn whep_post(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<WhepQuery>,
    body: Bytes,
) -> Response {
    if let Err(r) = st.authorize(&headers) {
        return r;
    }
    let Some(session) = q.session.map(SessionId) else {
        return st.refuse(
            StatusCode::BAD_REQUEST,
            "which session? POST /whep?session=ID (ID from the publisher's Location)",
        );
    };
    let (sdp, offer) = match st.read_offer(&headers, &body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let Err(p) = OfferSummary::parse(&sdp).check_view() {
        return st.offer_problem(p);
    }
    let viewer = match st.registry().open_viewer(&session) {
        Ok(id) => id,
        Err(Refusal::NoSuchSession) => {
            return st.refuse(
                StatusCode::NOT_FOUND,
                format!("no published session {session}"),
            );
        }
        Err(refusal) => return st.refusal(refusal),
    };
    let mut rtc = new_rtc(&st.local_addrs, st.config.video_bps);
    let answer = match rtc.sdp_api().accept_offer(offer) {
        Ok(a) => a,
        Err(e) => {
            st.registry().close_viewer(&viewer);
            return st.refuse(
                StatusCode::BAD_REQUEST,
                format!("the offer cannot be negotiated: {e}"),
            );
        }
    };
    let command = Command::AddViewer {
        viewer: viewer.clone(),
        session,
        rtc: Box::new(rtc),
    };
    if st.commands.send(command).is_err() {
        st.registry().close_viewer(&viewer);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    created(format!("/whep/{viewer}"), answer.to_sdp_string())
}

async fn whep_delete(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = st.authorize(&headers) {
        return r;
    }
    let viewer = ViewerId(id);
    if st.registry().close_viewer(&viewer).is_none() {
        return text(StatusCode::NOT_FOUND, format!("no viewer {viewer}"));
    }
    let _ = st.commands.send(Command::CloseViewer(viewer));
    StatusCode::OK.into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parse_errors_read_as_one_line() {
        let raw = "SDP parse: Parse error at PointerOffset(0x7f583c003706)\nUnexpected `t`\nExpected `v`\n";
        assert_eq!(
            super::tidy_parse_error(raw),
            "SDP parse: Parse error; Unexpected `t`; Expected `v`"
        );
    }
}

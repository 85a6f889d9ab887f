//! Every refusal the signalling endpoints make, against a real server: each names its cause and
//! leaves the server serving.

mod common;

use common::offer;
use str0m::media::MediaKind;

struct Reply {
    status: u16,
    body: String,
    location: Option<String>,
    retry_after: Option<String>,
}

fn request(method: &str, url: &str, ctype: Option<&str>, body: &str, token: Option<&str>) -> Reply {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(c) = ctype {
        req = req.header("Content-Type", c);
    }
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = agent
        .run(req.body(body.to_string()).expect("request"))
        .expect("HTTP");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (location, retry_after) = (header("location"), header("retry-after"));
    Reply {
        status: resp.status().as_u16(),
        body: resp.body_mut().read_to_string().unwrap_or_default(),
        location,
        retry_after,
    }
}

fn post(server: &common::Server, path: &str, body: &str) -> Reply {
    request(
        "POST",
        &format!("{}{path}", server.base_url),
        Some("application/sdp"),
        body,
        None,
    )
}

#[test]
fn signalling_errors_are_precise() {
    let server = common::Server::start(&["--max-sessions", "1"]);
    let av = offer(&[MediaKind::Audio, MediaKind::Video]);

    let r = post(&server, "/whip", "this is not SDP");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.starts_with("malformed SDP offer"), "{}", r.body);

    let r = post(&server, "/whip", &offer(&[MediaKind::Video]));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no audio"), "{}", r.body);

    // Rewrite the codecs to ones we do not speak.
    let vp9_pcmu = av
        .replace("opus/48000/2", "PCMU/8000")
        .replace("H264/90000", "VP9/90000");
    let r = post(&server, "/whip", &vp9_pcmu);
    assert_eq!(r.status, 406, "{}", r.body);
    assert!(
        r.body.contains("PCMU") && r.body.contains("VP9"),
        "lists what was offered: {}",
        r.body
    );
    assert!(
        r.body.contains("opus/48000/2") && r.body.contains("H264"),
        "lists what we accept: {}",
        r.body
    );

    let r = request(
        "POST",
        &format!("{}/whip", server.base_url),
        Some("text/plain"),
        &av,
        None,
    );
    assert_eq!(r.status, 415, "{}", r.body);

    for path in ["/whip/0123", "/whep/0123"] {
        let r = request(
            "DELETE",
            &format!("{}{path}", server.base_url),
            None,
            "",
            None,
        );
        assert_eq!(r.status, 404, "DELETE {path}: {}", r.body);
    }
    let r = post(&server, "/whep?session=nope", &av);
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("nope"), "{}", r.body);
    let r = post(&server, "/whep", &av);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("session="), "{}", r.body);

    // The limit: one session is open, the next is refused with Retry-After.
    let first = post(&server, "/whip", &av);
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(
        first.body.starts_with("v=0"),
        "an SDP answer: {}",
        first.body
    );
    let location = first.location.expect("Location");
    assert!(location.starts_with("/whip/"), "{location}");
    let r = post(&server, "/whip", &av);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.retry_after.as_deref(), Some("5"));
    let health = |server: &common::Server| {
        let (status, body) = server.get("/healthz");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")
    };
    let h = health(&server);
    assert_eq!(h["accepting"], false, "{h}");
    assert_eq!(h["full"], "at its session limit (1)", "{h}");

    // A WHEP viewer of the open session is accepted, and DELETE frees the slot.
    let id = location.trim_start_matches("/whip/");
    let viewer = post(
        &server,
        &format!("/whep?session={id}"),
        &offer(&[MediaKind::Audio, MediaKind::Video]),
    );
    assert_eq!(viewer.status, 201, "{}", viewer.body);
    let r = request(
        "DELETE",
        &format!("{}{location}", server.base_url),
        None,
        "",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        "DELETE",
        &format!("{}{location}", server.base_url),
        None,
        "",
        None,
    );
    assert_eq!(r.status, 404, "a second DELETE finds nothing");
    let h = health(&server);
    assert_eq!(
        (h["accepting"].clone(), h.get("full")),
        (true.into(), None),
        "{h}"
    );
    let again = post(&server, "/whip", &av);
    assert_eq!(again.status, 201, "the slot is free again: {}", again.body);

    assert!(server.metric("lipstream_sessions_rejected_total") >= 7.0);
}

#[test]
fn a_token_guards_signalling() {
    let server = common::Server::start(&["--token", "s3cret"]);
    let av = offer(&[MediaKind::Audio, MediaKind::Video]);
    let url = format!("{}/whip", server.base_url);
    let r = request("POST", &url, Some("application/sdp"), &av, None);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = request("POST", &url, Some("application/sdp"), &av, Some("wrong"));
    assert_eq!(r.status, 401, "{}", r.body);
    let r = request("POST", &url, Some("application/sdp"), &av, Some("s3cret"));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(server.get("/sessions").0, 401);
}

#[test]
fn the_page_and_its_files_are_served() {
    let server = common::Server::start(&[]);
    let (status, body) = server.get("/");
    assert_eq!(status, 200);
    assert!(body.contains("<script type=\"module\""), "{body}");
    for path in [
        "/viewer",
        "/web/app.js",
        "/web/viewer.js",
        "/web/webrtc.js",
        "/web/style.css",
    ] {
        let (status, body) = server.get(path);
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty(), "{path} is empty");
    }
    assert_eq!(server.get("/web/nope.js").0, 404);
}

//! Churn: sessions opened and closed one after another must leave nothing behind — no sessions,
//! no media worker threads, no sockets, and resident memory near where it started.

mod common;

use std::time::Duration;

use lipstream::client::{publish, PublishOptions};

const SESSIONS: usize = 50;
/// Resident memory may grow this much over 50 sessions (allocator caches, lazily built tables);
/// a leaked session (codec state, buffers) costs several MiB each and would blow through it.
const RSS_GROWTH_LIMIT_KIB: u64 = 24 * 1024;

#[test]
fn fifty_sessions_in_sequence_leave_nothing_behind() {
    let server = common::Server::start(&[]);
    let options = PublishOptions {
        base_url: server.base_url.clone(),
        duration: Duration::from_millis(400),
        linger: Duration::from_millis(300),
        ..PublishOptions::default()
    };
    let settled = |s: &common::Server| {
        s.metric("lipstream_sessions") == 0.0 && s.metric("lipstream_media_workers") == 0.0
    };

    // One session first: the first use of each codec allocates tables kept for the process life.
    publish(&options).expect("warm-up session");
    assert!(server.wait_until(Duration::from_secs(5), settled));
    let (threads0, fds0, rss0) = server.resources();

    let mut received = 0;
    for i in 0..SESSIONS {
        let report = publish(&options).unwrap_or_else(|e| panic!("session {i}: {e}"));
        assert!(
            !report.received.frames.is_empty(),
            "session {i} got no frames back"
        );
        received += report.received.frames.len();
    }
    assert!(
        server.wait_until(Duration::from_secs(10), settled),
        "sessions or workers remain"
    );
    // Thread exit and socket close are asynchronous to the metrics; give them a moment.
    assert!(server.wait_until(Duration::from_secs(5), |s| {
        let (threads, fds, _) = s.resources();
        threads <= threads0 && fds <= fds0
    }));
    let (threads1, fds1, rss1) = server.resources();
    println!(
        "churn: {SESSIONS} sessions, {received} frames back; threads {threads0} -> {threads1}, \
         fds {fds0} -> {fds1}, RSS {rss0} KiB -> {rss1} KiB ({:+} KiB)",
        rss1 as i64 - rss0 as i64
    );
    assert_eq!(
        server.metric("lipstream_sessions_started_total"),
        (SESSIONS + 1) as f64
    );
    assert!(
        rss1 <= rss0 + RSS_GROWTH_LIMIT_KIB,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}

//! The media path end to end: the str0m test client publishes to a real `lipstream serve` over
//! UDP on 127.0.0.1 and matches every returned frame by the id stamped into it.

mod common;

use std::time::Duration;

use lipstream::client::{publish, view, PublishOptions};

fn options(server: &common::Server, seconds: u64) -> PublishOptions {
    PublishOptions {
        base_url: server.base_url.clone(),
        duration: Duration::from_secs(seconds),
        ..PublishOptions::default()
    }
}

#[test]
fn ten_seconds_of_video_come_back_in_order_to_the_publisher_and_a_viewer() {
    let server = common::Server::start(&[]);
    let opts = options(&server, 10);
    let publisher = std::thread::spawn(move || publish(&opts));

    // A WHEP viewer joins the session a second in, once it exists.
    assert!(
        server.wait_until(Duration::from_secs(5), |s| s.metric("lipstream_sessions")
            == 1.0)
    );
    let (_, health) = server.get("/healthz");
    assert!(health.contains("\"sessions\":1"), "{health}");
    let session = server.only_session_id();
    std::thread::sleep(Duration::from_secs(1));
    let watched = view(
        &server.base_url,
        &session,
        None,
        [127, 0, 0, 1].into(),
        Duration::from_secs(5),
        false,
    )
    .expect("view");

    let report = publisher
        .join()
        .expect("publisher thread")
        .expect("publish");
    let rx = &report.received;
    let p50 = rx.latency_percentile(50.0).expect("frames came back");
    let p95 = rx.latency_percentile(95.0).expect("frames came back");
    println!(
        "loopback: sent {} frames, received {} ({} lost, {} unstamped, {} out of order); \
         latency p50 {p50:.1} ms p95 {p95:.1} ms; setup {:.0} ms; audio {} sent / {} received",
        report.frames_sent,
        rx.frames.len(),
        report.lost(),
        rx.frames_unstamped,
        rx.out_of_order(),
        rx.setup_ms.unwrap_or(f64::NAN),
        report.audio_packets_sent,
        rx.audio_packets,
    );
    assert!(
        report.frames_sent >= 245,
        "sent only {} frames in 10 s at 25 fps",
        report.frames_sent
    );
    // Loopback loses nothing; allow 1 % for a scheduler hiccup on a loaded CI machine.
    assert!(
        report.lost() <= report.frames_sent / 100,
        "lost {} frames",
        report.lost()
    );
    assert_eq!(rx.out_of_order(), 0, "frames came back out of order");
    assert_eq!(rx.frames_unstamped, 0, "returned frames lost their stamp");
    assert!(p95 < 250.0, "p95 latency {p95:.1} ms");
    assert!(
        rx.audio_packets + 10 >= report.audio_packets_sent,
        "audio: sent {} received {}",
        report.audio_packets_sent,
        rx.audio_packets
    );
    // 20 ms of 16 kHz audio per packet came back decodable.
    assert!(rx.audio_samples_16k >= u64::from(rx.audio_packets) * 300);

    // The viewer joined mid-stream: it needs a keyframe, then sees frames in order.
    println!(
        "viewer: {} frames, first id {:?}, latency p50 {:?} ms, audio {} packets",
        watched.frames.len(),
        watched.frames.first().map(|f| f.frame_id),
        watched.latency_percentile(50.0),
        watched.audio_packets
    );
    assert!(
        watched.frames.len() >= 100,
        "viewer got {} frames in 5 s",
        watched.frames.len()
    );
    assert_eq!(watched.out_of_order(), 0);
    assert!(
        watched.frames[0].frame_id > 0,
        "the viewer joined late, so it cannot start at frame 0"
    );
    assert!(watched.audio_packets >= 200);

    assert!(
        server.wait_until(Duration::from_secs(5), |s| s.metric("lipstream_sessions")
            == 0.0)
    );
    assert!(server.metric("lipstream_frames_out_total") >= rx.frames.len() as f64);
    assert_eq!(server.metric("lipstream_viewers"), 0.0);
    // Loopback has room: the estimator probes up and the encoder follows it.
    assert!(server.metric("lipstream_video_bitrate_changes_total") >= 1.0);
}

#[test]
fn a_corrupt_frame_gets_a_keyframe_request_and_the_session_goes_on() {
    let server = common::Server::start(&[]);
    let opts = PublishOptions {
        corrupt_frames: vec![30, 31],
        ..options(&server, 4)
    };
    let report = publish(&opts).expect("publish");
    let rx = &report.received;
    println!(
        "corrupt: sent {} received {} keyframe requests {}",
        report.frames_sent,
        rx.frames.len(),
        rx.keyframe_requests
    );
    assert!(server.metric("lipstream_frames_undecodable_total") >= 1.0);
    assert!(server.metric("lipstream_keyframes_requested_total") >= 1.0);
    assert!(
        rx.keyframe_requests >= 1,
        "the server never asked the publisher for a keyframe"
    );
    // Frames after the damage come back once the keyframe arrives.
    let last = rx.frames.last().expect("frames").frame_id;
    assert!(
        last + 5 >= report.frames_sent,
        "stream stopped at frame {last} of {}",
        report.frames_sent
    );
    assert!(rx.frames.iter().any(|f| f.frame_id > 40));
    assert!(
        report.lost() < 20,
        "lost {} frames around 2 damaged ones",
        report.lost()
    );
}

#[test]
fn a_vanished_peer_is_torn_down_after_the_ice_timeout() {
    let server = common::Server::start(&["--ice-timeout-s", "2"]);
    let opts = PublishOptions {
        vanish: true,
        linger: Duration::ZERO,
        ..options(&server, 1)
    };
    publish(&opts).expect("publish");
    assert_eq!(
        server.metric("lipstream_sessions"),
        1.0,
        "no DELETE was sent: the session is still there"
    );
    assert!(
        server.wait_until(Duration::from_secs(8), |s| s.metric("lipstream_sessions")
            == 0.0
            && s.metric("lipstream_media_workers") == 0.0),
        "the silent session was not reaped"
    );
    let (_, health) = server.get("/healthz");
    assert!(health.contains("\"sessions\":0"), "{health}");
}

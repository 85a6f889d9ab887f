//! The media path end to end: the str0m test client publishes to a real `lipstream serve` over
//! UDP on 127.0.0.1 and matches every returned frame by the id stamped into it.

mod common;

use std::time::Duration;

use lipstream::client::{publish, PublishOptions};

#[test]
fn ten_seconds_of_video_come_back_in_order() {
    let server = common::Server::start(&[]);
    let options = PublishOptions {
        base_url: server.base_url.clone(),
        duration: Duration::from_secs(10),
        ..PublishOptions::default()
    };
    let report = publish(&options).expect("publish");
    let p50 = report.latency_percentile(50.0).expect("frames came back");
    let p95 = report.latency_percentile(95.0).expect("frames came back");
    println!(
        "loopback: sent {} frames, received {} ({} lost, {} unstamped, {} out of order); \
         latency p50 {p50:.1} ms p95 {p95:.1} ms; setup {:.0} ms; audio {} sent / {} received",
        report.frames_sent,
        report.frames.len(),
        report.lost(),
        report.frames_unstamped,
        report.out_of_order(),
        report.setup_ms.unwrap_or(f64::NAN),
        report.audio_packets_sent,
        report.audio_packets_received,
    );
    assert!(report.frames_sent >= 245, "sent only {} frames in 10 s at 25 fps", report.frames_sent);
    // Loopback loses nothing; allow 1 % for a scheduler hiccup on a loaded CI machine.
    assert!(report.lost() <= report.frames_sent / 100, "lost {} frames", report.lost());
    assert_eq!(report.out_of_order(), 0, "frames came back out of order");
    assert_eq!(report.frames_unstamped, 0, "returned frames lost their stamp");
    assert!(p95 < 250.0, "p95 latency {p95:.1} ms");
    assert!(
        report.audio_packets_received + 10 >= report.audio_packets_sent,
        "audio: sent {} received {}",
        report.audio_packets_sent,
        report.audio_packets_received
    );
    assert!(server.wait_until(Duration::from_secs(5), |s| s.metric("lipstream_sessions") == 0.0));
    assert!(server.metric("lipstream_frames_out_total") >= report.frames.len() as f64);
}

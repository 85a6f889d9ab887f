//! `lipstream bench sessions` against a real server on loopback: sane figures, an injected
//! server delay visible in them, and an HTML report that opens in headless Chromium.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lipstream::bench::{self, Mode, SessionsOptions};

fn options(url: &str, sessions: usize, seconds: u64) -> SessionsOptions {
    SessionsOptions {
        url: url.to_string(),
        token: None,
        sessions,
        duration: Duration::from_secs(seconds),
        mode: Mode::Camera,
        ramp: false,
        budget_ms: 200.0,
        width: 320,
        height: 240,
        fps: 25,
        progress: false,
        picture: None,
        clip: None,
        speech: None,
    }
}

/// `bench sessions --media clip.y4m,speech.wav`: a raw 4:2:0 clip (here ten frames of rising
/// grey) published looped and stamped, every frame timed on its way back; a 16 kHz stereo
/// recording as the audio, under the click train that times the audio.
#[test]
fn a_y4m_clip_and_a_wav_recording_are_published_looped_and_timed() {
    let server = common::Server::start(&[]);
    let dir = std::env::temp_dir().join(format!("lipstream-y4m-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (w, h) = (320usize, 240usize);
    let mut bytes = format!("YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n").into_bytes();
    for i in 0..10u8 {
        bytes.extend_from_slice(b"FRAME\n");
        bytes.extend(std::iter::repeat_n(40 + 15 * i, w * h));
        bytes.extend(std::iter::repeat_n(128, w * h / 2));
    }
    let clip = dir.join("grey.y4m");
    std::fs::write(&clip, &bytes).unwrap();
    // 1.5 s of a warbling tone with pauses, stereo at 16 kHz.
    let pcm: Vec<i16> = (0..24_000)
        .flat_map(|i| {
            let t = f64::from(i) / 16_000.0;
            let on = (i / 4000) % 2 == 0;
            let v = if on {
                ((t * (300.0 + 80.0 * (t * 5.0).sin()) * std::f64::consts::TAU).sin() * 12_000.0)
                    as i16
            } else {
                0
            };
            [v, v / 2]
        })
        .collect();
    let wav = dir.join("speech.wav");
    std::fs::write(&wav, lipstream::media::wav::encode(&pcm, 16_000, 2)).unwrap();
    let mut media = clip.clone().into_os_string();
    media.push(",");
    media.push(&wav);
    let out = Command::new(env!("CARGO_BIN_EXE_lipstream"))
        .args([
            "bench",
            "sessions",
            "--url",
            &server.base_url,
            "--sessions",
            "1",
        ])
        .args(["--duration", "4", "--media"])
        .arg(&media)
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run bench sessions");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("10 frames of 320x240, looped"), "{stderr}");
    assert!(stderr.contains("1.5 s at 16000 Hz, looped"), "{stderr}");
    let (json, _) = bench::output_paths(&dir);
    let report: bench::BenchReport =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let o = &report.overall;
    assert_eq!(o.failed_sessions, 0, "{:?}", o.failures);
    assert!(o.latency_ms.is_some(), "the clip's frames carry the stamp");
    assert!(
        o.av_offset_samples >= 2 && o.av_offset_ms_max_abs.is_some_and(|m| m < 40.0),
        "the clicks over the recording come back in sync: {o:?}"
    );
    assert!(o.loss_pct <= 1.0 && o.fps_per_session_mean > 20.0, "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn figures_are_sane_and_the_report_opens_in_chromium() {
    let server = common::Server::start(&[]);
    let report = bench::run(&options(&server.base_url, 2, 5)).expect("bench");
    println!("{}", bench::summary(&report));
    let o = &report.overall;
    assert_eq!((o.sessions, o.failed_sessions), (2, 0), "{:?}", o.failures);
    let lat = o.latency_ms.clone().expect("latency");
    assert!(lat.p50 > 0.0 && lat.p95 < 250.0, "{lat:?}");
    assert!(
        (22.0..=26.0).contains(&o.fps_per_session_mean),
        "fps {}",
        o.fps_per_session_mean
    );
    assert!(o.loss_pct <= 1.0, "lost {} %", o.loss_pct);
    assert!(
        o.av_offset_samples >= 6,
        "only {} clicks matched",
        o.av_offset_samples
    );
    let offset = o.av_offset_ms_mean.expect("offset");
    assert!(offset.abs() < 40.0, "pass-through A/V offset {offset} ms");
    // The clicks time the audio on their own too (avatar sessions have nothing else): through
    // the pass-through it arrives about when the video does.
    let audio = o.audio_latency_ms.clone().expect("audio latency");
    assert!(
        audio.p50 > 0.0 && (audio.p50 - lat.p50).abs() < 40.0,
        "audio {audio:?}, video {lat:?}"
    );
    assert!(
        report.server.stage_ms.contains_key("encode"),
        "{:?}",
        report.server.stage_ms
    );
    assert!(!report.server.timeline.is_empty());

    let dir = std::env::temp_dir().join(format!("lipstream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = bench::output_paths(&dir);
    std::fs::write(&json, serde_json::to_string(&report).unwrap()).unwrap();
    std::fs::write(&html, bench::report::html(&report).unwrap()).unwrap();
    let back: bench::BenchReport =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let table = bench::compare(&back, &report);
    assert!(
        table.contains("latency p95") && table.contains("+0.0 %"),
        "{table}"
    );

    if std::env::var_os("LIPSTREAM_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED the Chromium check: LIPSTREAM_SKIP_BROWSER is set");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser/open_report.mjs");
    let out = Command::new("node")
        .arg(script)
        .arg(&html)
        .output()
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(page["svgs"].as_u64(), Some(3), "{page}");
    assert_eq!(
        page["requests"].as_array().map(Vec::len),
        Some(0),
        "the page fetched: {page}"
    );
    assert!(
        page["summary"]
            .as_str()
            .unwrap_or("")
            .contains("latency p50"),
        "{page}"
    );
}

#[test]
fn an_injected_server_delay_shows_in_latency_and_late_frames() {
    let fast = common::Server::start(&[]);
    let base = bench::run(&options(&fast.base_url, 1, 4)).expect("bench");
    drop(fast);
    // 30 ms per frame keeps up with 25 fps; a 20 ms budget makes every frame late.
    let slow = common::Server::start(&["--debug-stage-delay-ms", "30", "--frame-budget-ms", "20"]);
    let delayed = bench::run(&options(&slow.base_url, 1, 4)).expect("bench");
    let (b, d) = (
        base.overall.latency_ms.unwrap(),
        delayed.overall.latency_ms.unwrap(),
    );
    println!("p50 {:.1} ms -> {:.1} ms with a 30 ms stage", b.p50, d.p50);
    assert!(d.p50 >= b.p50 + 25.0, "p50 {} -> {}", b.p50, d.p50);
    assert!(
        delayed.overall.loss_pct <= 1.0,
        "lost {} %",
        delayed.overall.loss_pct
    );
    // Every frame took longer than the budget: each went out unprocessed and was counted.
    assert!(
        delayed.overall.late_pct > 90.0,
        "late {} %",
        delayed.overall.late_pct
    );
    assert_eq!(base.overall.late_pct, 0.0);
}

/// A stage that hears 120 ms ahead (as the lip-sync model does): every frame waits for its
/// audio, the audio waits as long, so latency grows by the lookahead and the A/V offset does not.
#[test]
fn a_lookahead_delays_video_and_audio_alike() {
    let plain = common::Server::start(&[]);
    let base = bench::run(&options(&plain.base_url, 1, 5)).expect("bench");
    drop(plain);
    let ahead = common::Server::start(&["--debug-stage-lookahead-ms", "120"]);
    let held = bench::run(&options(&ahead.base_url, 1, 5)).expect("bench");
    let (b, h) = (
        base.overall.latency_ms.unwrap(),
        held.overall.latency_ms.unwrap(),
    );
    let (ob, oh) = (
        base.overall.av_offset_ms_mean.expect("offset measured"),
        held.overall.av_offset_ms_mean.expect("offset measured"),
    );
    println!(
        "p50 {:.1} -> {:.1} ms, A/V offset {ob:.1} -> {oh:.1} ms with a 120 ms lookahead",
        b.p50, h.p50
    );
    // Frames wait for audio up to their time + 120 ms on the audio clock; each stream's clock is
    // anchored at its first packet, so the wait is the lookahead minus that anchoring skew
    // (tens of ms), which also bounds how far the A/V offset may move: within one frame.
    assert!(
        h.p50 >= b.p50 + 60.0 && h.p50 <= b.p50 + 200.0,
        "p50 {} -> {}",
        b.p50,
        h.p50
    );
    assert!((oh - ob).abs() < 40.0, "A/V offset moved {ob} -> {oh}");
    assert!(
        held.overall.loss_pct <= 1.0,
        "lost {} %",
        held.overall.loss_pct
    );
}

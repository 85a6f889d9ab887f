//! Lip-sync end to end over WebRTC loopback, on the CPU reference executor with the tiny
//! random-weight model: a real photo (scikit-image's astronaut) is published with a click train,
//! the real MTCNN finds the face, and the frames that come back have their mouth region
//! re-rendered while the rest of the picture is unchanged within codec noise, with audio and
//! video still together.
//!
//! The CPU renders a tiny-model frame in one to two seconds, far from 25 fps: the server gets a
//! long frame budget, renders what it can and sends the rest unprocessed at the same fixed
//! delay (counted late) — the deadline policy at work.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lipstream::bench::stats::SessionFigures;
use lipstream::client::publisher::AUDIO_RATE;
use lipstream::client::synth::tone_pcm;
use lipstream::client::{publish, signal, AudioSignal, ClientError, PublishOptions};
use lipstream::media::frame::VideoFrame;
use lipstream_engines::image::lower_face_mask;

/// The CPU renders a frame in one to two seconds on two cores: tests sharing them would each
/// render too few frames to check anything, so they take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one still runs.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The astronaut photo (512x512) as packed RGB.
fn astronaut_rgb() -> (Vec<u8>, usize, usize) {
    let file = std::fs::File::open(fixtures().join("mtcnn/astronaut.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let rgb = buf[..info.buffer_size()]
        .chunks(ch)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    (rgb, info.width as usize, info.height as usize)
}

/// The astronaut photo's top-left 448x256 (the face sits at x 181-268, y 62-172) as I420.
fn astronaut_frame() -> VideoFrame {
    let (full, iw, _) = astronaut_rgb();
    let (w, h, x0) = (448usize, 256usize, 32usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        rgb.extend_from_slice(&full[(y * iw + x0) * 3..(y * iw + x0 + w) * 3]);
    }
    VideoFrame::from_rgb(&rgb, w, h).unwrap()
}

/// `lipstream serve` on the CPU executor with the tiny model, one whisper window per second
/// (on two cores a 30 s window takes ~0.2 s), the given batch sizes and frame budget; `mode`
/// is `--mtcnn DIR` (camera) or `--avatar FILE`.
fn cpu_server(mode: [&str; 2], batches: &str, budget_ms: &str) -> common::Server {
    cpu_server_with(mode, batches, budget_ms, &[])
}

/// `cpu_server` with more flags.
fn cpu_server_with(
    mode: [&str; 2],
    batches: &str,
    budget_ms: &str,
    extra: &[&str],
) -> common::Server {
    let models = fixtures().join("tiny");
    let mut args = vec![
        "--models",
        models.to_str().unwrap(),
        mode[0],
        mode[1],
        "--executor",
        "cpu",
        "--batches",
        batches,
        "--audio-hop-frames",
        "25",
        "--frame-budget-ms",
        budget_ms,
    ];
    args.extend_from_slice(extra);
    common::Server::start(&args)
}

/// `lipstream avatar prepare` on the CPU with the tiny model and the real MTCNN; `input` is
/// `--image FILE` or `--video FILE` and more flags.
fn prepare(input: &[&str], out: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lipstream"))
        .args(["avatar", "prepare", "--executor", "cpu"])
        .args(input)
        .arg("--models")
        .arg(fixtures().join("tiny"))
        .arg("--mtcnn")
        .arg(fixtures().join("mtcnn"))
        .arg("--out")
        .arg(out)
        .output()
        .expect("run avatar prepare")
}

/// The astronaut photo's face crop as `avatar prepare` finds it (MuseTalk 1.5: 10 px below the
/// chin).
const ASTRONAUT_FACE: [f32; 4] = [181.05, 62.16, 267.75, 172.05 + 10.0];

/// A fresh folder of this test process's, named after `tag`.
fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lipstream-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An avatar bundle of the astronaut photo in a fresh folder (named after `tag`), served on the
/// CPU with a 3 s frame budget: the folder and the server.
fn astronaut_avatar_server(tag: &str) -> (PathBuf, common::Server) {
    astronaut_avatar_server_with(tag, &[])
}

/// `astronaut_avatar_server` with more flags.
fn astronaut_avatar_server_with(tag: &str, extra: &[&str]) -> (PathBuf, common::Server) {
    let dir = scratch_dir(&format!("avatar-{tag}"));
    let bundle = dir.join("astronaut.safetensors");
    let photo = fixtures().join("mtcnn/astronaut.png");
    let prepared = prepare(&["--image", photo.to_str().unwrap()], &bundle);
    assert!(prepared.status.success(), "{prepared:?}");
    let server = cpu_server_with(["--avatar", bundle.to_str().unwrap()], "1", "3000", extra);
    (dir, server)
}

/// Mean absolute luma difference inside and outside the face box's blend region.
fn region_diffs(a: &VideoFrame, b: &VideoFrame, face: [f32; 4]) -> (f64, f64) {
    let [x0, y0, x1, y1] = face;
    let (mut inside, mut ni, mut outside, mut no) = (0f64, 0usize, 0f64, 0usize);
    // Skip the stamp rows: they differ frame to frame by design.
    for y in 48..a.height {
        for x in 0..a.width {
            let d = (f64::from(a.y[y * a.width + x]) - f64::from(b.y[y * b.width + x])).abs();
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let in_box = fx >= x0 && fx < x1 && fy >= y0 && fy < y1;
            let m = if in_box {
                lower_face_mask((fx - x0) / (x1 - x0), (fy - y0) / (y1 - y0))
            } else {
                0.0
            };
            // Well inside the mask, or well away from the box (codec ringing spreads a little).
            let margin = 8.0;
            let far =
                fx < x0 - margin || fx >= x1 + margin || fy < y0 - margin || fy >= y1 + margin;
            if m > 0.9 {
                inside += d;
                ni += 1;
            } else if far {
                outside += d;
                no += 1;
            }
        }
    }
    (inside / ni.max(1) as f64, outside / no.max(1) as f64)
}

#[test]
fn camera_mode_re_renders_the_mouth_and_keeps_the_rest_and_the_sync() {
    let _turn = one_at_a_time();
    let mtcnn = fixtures().join("mtcnn");
    let server = cpu_server(["--mtcnn", mtcnn.to_str().unwrap()], "1,2", "3000");
    let background = Arc::new(astronaut_frame());
    let seconds = 10;
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        width: background.width,
        height: background.height,
        // The CPU shares two cores between the model, the face detector and whisper: a lighter
        // stream keeps the session's worker within real time.
        fps: 10,
        duration: Duration::from_secs(seconds),
        // Frames leave 1080 ms (lookahead) + 3 s (budget) after they arrive.
        linger: Duration::from_millis(5500),
        audio: AudioSignal::Clicks { period_ms: 1000 },
        video_bps: 1_500_000,
        background: Some(background.clone()),
        keep_pictures: true,
        ..Default::default()
    })
    .expect("publish");

    let (_, metrics) = server.get("/metrics");
    for line in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "dropped",
                "frames_",
                "stage_seconds_sum",
                "stage_seconds_count",
                "batch_frames_sum",
            ]
            .iter()
            .any(|k| l.contains(k))
    }) {
        eprintln!("  {line}");
    }
    let rendered = server.metric("lipstream_frames_rendered_total");
    let late = server.metric("lipstream_frames_late_total");
    let no_face = server.metric("lipstream_frames_no_face_total");
    let failed = server.metric("lipstream_frames_failed_total");
    eprintln!(
        "sent {} frames, {} back; rendered {rendered}, late {late}, no face {no_face}, failed {failed}",
        report.frames_sent,
        report.received.frames.len()
    );
    assert_eq!(failed, 0.0);
    assert!(
        report.received.frames.len() as f64 >= 0.9 * f64::from(report.frames_sent),
        "every frame comes back, rendered or not"
    );
    // Two cores render 2 to 7 tiny-model frames in these 10 s, depending on how whisper, the
    // face detector and the codecs share them.
    assert!(
        rendered >= 2.0,
        "the CPU renders a few frames in {seconds} s"
    );
    // The per-device figures: every face that came back was run by the one (CPU) renderer.
    let ran = server.metric("lipstream_gpu_frames_rendered_total{gpu=\"cpu\"}");
    assert!(ran >= rendered, "{ran} frames run, {rendered} rendered");

    // MuseTalk 1.5's crop of the detector's box (y1 + 10), in this frame's coordinates.
    let face = [181.05 - 32.0, 62.16, 267.75 - 32.0, 172.05 + 10.0];
    let mut changed = 0;
    for (id, picture) in &report.received.pictures {
        let (inside, outside) = region_diffs(picture, &background, face);
        assert!(
            outside < 4.0,
            "frame {id}: the picture away from the face changed by {outside:.1} on average"
        );
        if inside > 12.0 {
            changed += 1;
        }
    }
    eprintln!("{changed} returned frames with the mouth region re-rendered");
    assert!(
        changed as f64 >= rendered.min(3.0),
        "{changed} frames came back with a new mouth, the server rendered {rendered}"
    );

    let figures = SessionFigures::of(&report, seconds as f64);
    eprintln!("latency {:?}", figures.latency_ms);
    let offsets: Vec<f64> = figures.av_offset_ms.iter().map(|(_, o)| *o).collect();
    eprintln!("A/V offsets (ms): {offsets:?}");
    assert!(offsets.len() >= 5, "clicks matched to frames");
    let mut sorted = offsets.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!(
        median.abs() <= 40.0,
        "audio and video stay within a frame of each other (median offset {median:.1} ms)"
    );
}

#[test]
fn frames_without_a_face_pass_through_untouched_and_are_counted() {
    let _turn = one_at_a_time();
    let mtcnn = fixtures().join("mtcnn");
    let server = cpu_server(["--mtcnn", mtcnn.to_str().unwrap()], "1", "500");
    // The moving test pattern: bands and a grey ellipse, nothing MTCNN takes for a face.
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        fps: 10,
        duration: Duration::from_secs(4),
        // Frames leave 1080 ms (lookahead) + 500 ms (budget) after they arrive.
        linger: Duration::from_millis(2500),
        ..Default::default()
    })
    .expect("publish");
    let no_face = server.metric("lipstream_frames_no_face_total");
    let rendered = server.metric("lipstream_frames_rendered_total");
    let frames_in = server.metric("lipstream_frames_in_total");
    eprintln!(
        "sent {}, back {}, in {frames_in}, no face {no_face}, rendered {rendered}",
        report.frames_sent,
        report.received.frames.len()
    );
    assert_eq!(report.lost(), 0, "every frame comes back");
    assert_eq!(rendered, 0.0);
    assert!(
        no_face >= 0.8 * frames_in,
        "frames without a face are counted ({no_face} of {frames_in})"
    );
}

/// Avatar mode: `avatar prepare` on the photo (tiny VAE), then a publisher speaking (a tone) gets
/// the avatar back at 25 fps made from its audio clock, whatever video it sends: its mouth
/// re-rendered, the rest of the picture as prepared.
#[test]
fn avatar_mode_makes_the_prepared_face_speak_the_published_audio() {
    let _turn = one_at_a_time();
    let (dir, server) = astronaut_avatar_server("e2e");
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        // The publisher's own video is not shown in avatar mode: keep it small.
        width: 64,
        height: 48,
        fps: 5,
        duration: Duration::from_secs(8),
        linger: Duration::from_millis(5500),
        // A voice that never pauses, with the click train over it that times the session (as
        // `bench sessions --mode avatar` publishes).
        audio: AudioSignal::Speech {
            pcm: Arc::new(tone_pcm(220.0, AUDIO_RATE)),
            click_period_ms: Some(1000),
        },
        keep_pictures: true,
        ..Default::default()
    })
    .expect("publish");
    // Audio leaves 1080 ms (lookahead) + 3 s (budget) after it arrives, like the avatar's
    // frames: longer than the click period, each click still paired with its own.
    let figures = SessionFigures::of(&report, 8.0);
    let latencies: Vec<f64> = figures.audio_latency_ms.iter().map(|(_, l)| *l).collect();
    eprintln!("audio latency (ms): {latencies:?}");
    assert!(
        latencies.len() >= 4,
        "clicks come back over the avatar's voice"
    );
    assert!(
        latencies
            .iter()
            .all(|l| (4080.0 - 40.0..4080.0 + 250.0).contains(l)),
        "every click comes back after the session's constant delay: {latencies:?}"
    );
    let rendered = server.metric("lipstream_frames_rendered_total");
    let made = server.metric("lipstream_frames_in_total");
    let out = server.metric("lipstream_frames_out_total");
    let pictures = &report.received.unstamped_pictures;
    eprintln!(
        "avatar: {made} frames made, {out} sent, {} received, {rendered} rendered",
        pictures.len()
    );
    // 25 fps from the audio clock, whatever the publisher's video rate (5 fps here).
    assert!(made >= 25.0 * 7.0, "{made} frames made in 8 s of audio");
    assert!(
        pictures.len() as f64 >= 0.9 * out,
        "the avatar frames come back"
    );
    assert!(rendered >= 2.0, "the CPU renders a few frames");

    // The photo as prepared (the avatar's own frame), for pixel comparisons.
    let (rgb, w, h) = astronaut_rgb();
    let base = VideoFrame::from_rgb(&rgb, w, h).expect("picture");
    let face = ASTRONAUT_FACE;
    let mut changed = 0;
    for (_, picture) in pictures {
        assert_eq!((picture.width, picture.height), (base.width, base.height));
        let (inside, outside) = region_diffs(picture, &base, face);
        assert!(
            outside < 4.0,
            "the avatar away from its face changed by {outside:.1}"
        );
        if inside > 12.0 {
            changed += 1;
        }
    }
    eprintln!("{changed} avatar frames with the mouth re-rendered");
    assert!(changed >= 1, "rendered mouths reach the viewer");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--max-gpu-load`, a publisher is refused (503, Retry-After, the reason) while the
/// renderer is past its capacity — the CPU executor always is, far from 25 fps — and the
/// session it already serves keeps being served; once that one is gone, publishers are taken
/// again.
#[test]
fn a_new_publisher_waits_while_the_renderer_is_past_its_load_limit() {
    let _turn = one_at_a_time();
    let (dir, server) = astronaut_avatar_server_with("limit", &["--max-gpu-load", "0.95"]);
    let options = PublishOptions {
        base_url: server.base_url.clone(),
        width: 64,
        height: 48,
        fps: 5,
        duration: Duration::from_secs(6),
        linger: Duration::from_millis(3500),
        audio: AudioSignal::Speech {
            pcm: Arc::new(tone_pcm(220.0, AUDIO_RATE)),
            click_period_ms: None,
        },
        ..Default::default()
    };
    let first = std::thread::spawn(move || publish(&options));
    // The renderer's load, once a second of its batches has been measured.
    let load = |s: &common::Server| {
        let (_, text) = s.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with("lipstream_gpu_load_ratio{"))
            .find_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        server.wait_until(Duration::from_secs(30), |s| load(s) > 0.95),
        "the CPU renderer's load passes 0.95 (it reads {})",
        load(&server)
    );
    let whip = format!("{}/whip", server.base_url);
    let audio = common::offer(&[str0m::media::MediaKind::Audio]);
    let refused = signal::post_offer(&whip, &audio, None).err();
    let Some(ClientError::Http {
        status,
        body,
        retry_after,
        ..
    }) = refused
    else {
        panic!("an HTTP refusal, not {refused:?}");
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        retry_after.is_some(),
        "a refusal for load says when to retry"
    );
    assert!(
        body.contains("no GPU has room for another lip-sync session (the CPU executor "),
        "{body}"
    );
    assert_eq!(server.metric("lipstream_sessions_rejected_total"), 1.0);
    let (_, health) = server.get("/healthz");
    let health: serde_json::Value = serde_json::from_str(&health).expect("JSON");
    assert_eq!(health["accepting"], false, "{health}");
    assert!(
        health["full"]
            .as_str()
            .is_some_and(|w| w.starts_with("the CPU executor ")),
        "{health}"
    );
    let report = first.join().expect("publisher thread").expect("publish");
    let received = &report.received;
    assert!(
        received.audio_packets > 100 && received.frames_unstamped > 25,
        "the session already there was served throughout: {} audio packets, {} frames",
        received.audio_packets,
        received.frames_unstamped
    );
    // Its frames done, the renderer idles and its load reads nothing: a publisher is taken.
    let mut taken = None;
    server.wait_until(Duration::from_secs(40), |_| {
        taken = signal::post_offer(&whip, &audio, None).ok();
        taken.is_some()
    });
    let answer = taken.expect("a publisher is taken once the renderer has room");
    signal::delete(&answer.resource_url, None).expect("DELETE");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Avatar mode keeps the mouth with its sound: the publisher speaks in bursts (1 s of voice,
/// 2 s of silence) with a click every second: on each burst's start, as it ends, and in the
/// silence. Every sound after silence opens the mouth (a lone click for one frame), and that
/// frame reaches the viewer when the click does, within a frame.
#[test]
fn avatar_mode_shows_speech_starting_with_its_sound() {
    let _turn = one_at_a_time();
    let (dir, server) = astronaut_avatar_server("av");
    let mut pcm = tone_pcm(220.0, AUDIO_RATE);
    pcm.resize(3 * AUDIO_RATE as usize, 0);
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        width: 64,
        height: 48,
        fps: 5,
        // A frame renders once 1080 ms of audio past it has come (see `cpu_server`): the
        // last burst's start needs that much after it.
        duration: Duration::from_millis(9_500),
        linger: Duration::from_millis(5000),
        audio: AudioSignal::Speech {
            pcm: Arc::new(pcm),
            click_period_ms: Some(1000),
        },
        keep_pictures: true,
        ..Default::default()
    })
    .expect("publish");
    let figures = SessionFigures::of(&report, 9.5);
    let mut audio: Vec<f64> = figures.audio_latency_ms.iter().map(|(_, l)| *l).collect();
    audio.sort_by(f64::total_cmp);
    assert!(audio.len() >= 6, "clicks come back: {audio:?}");
    let audio_ms = audio[audio.len() / 2];

    let (rgb, w, h) = astronaut_rgb();
    let base = VideoFrame::from_rgb(&rgb, w, h).expect("picture");
    let face = ASTRONAUT_FACE;
    let diffs: Vec<(f64, f64)> = report
        .received
        .unstamped_pictures
        .iter()
        .map(|(at, p)| (*at, region_diffs(p, &base, face).0))
        .collect();
    let mut offsets = Vec::new();
    let first = report.clicks_sent_ms.first().copied().unwrap_or(0.0);
    let mut measured = 0;
    // Click 0 starts the stream too, and clicks 1, 4, 7 come as a burst ends: no silence
    // before them. The last second's frames never render (their lookahead never comes).
    for (k, sent) in report.clicks_sent_ms.iter().enumerate() {
        if k == 0 || k % 3 == 1 || sent - first > 9_500.0 - 1_200.0 {
            continue;
        }
        measured += 1;
        let due = sent + audio_ms;
        let near: Vec<usize> = (1..diffs.len())
            .filter(|&i| (due - 120.0..due + 200.0).contains(&diffs[i].0))
            .collect();
        eprintln!(
            "click {k} sent at {sent:.0} ms, due back at {due:.0}: frames {:?}",
            near.iter()
                .map(|&i| format!("{:+.0} ms: {:.1}", diffs[i].0 - due, diffs[i].1))
                .collect::<Vec<_>>()
        );
        // The first frame with its mouth changed, after one untouched (codec noise aside: the
        // encoder's first seconds are coarser).
        if let Some(&i) = near.iter().find(|&&i| diffs[i].1 > diffs[i - 1].1 + 4.0) {
            offsets.push(audio_ms - (diffs[i].0 - sent));
        }
    }
    eprintln!("audio latency {audio_ms:.0} ms; audio minus video at each click: {offsets:?}");
    assert!(measured >= 4, "{} clicks sent", report.clicks_sent_ms.len());
    assert_eq!(
        offsets.len(),
        measured,
        "every sound after silence opens the mouth: {offsets:?}"
    );
    for o in &offsets {
        assert!(o.abs() <= 40.0, "A/V offset {o:.1} ms: {offsets:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `avatar prepare --video` on a real H.264 clip (High profile, B-frames, 30 fps, the picture
/// panning): 25 fps frames whose face boxes follow the pan smoothly; served for a publisher that
/// offers audio only, the avatar plays the clip back and forth to a WHEP viewer. Bad inputs are
/// refused with a reason.
#[test]
fn a_prepared_clip_follows_its_face_and_the_avatar_plays_it_back_and_forth() {
    let _turn = one_at_a_time();
    let dir = scratch_dir("clip-e2e");
    let bundle = dir.join("clip.safetensors");
    let clip = fixtures().join("clip/talk.mp4");
    let made = prepare(&["--video", clip.to_str().unwrap()], &bundle);
    assert!(made.status.success(), "{made:?}");
    let said = String::from_utf8_lossy(&made.stdout);
    // 1.2 s at 30 fps is 36 pictures; at 25 fps, 30 frames.
    assert!(said.contains("30 frame(s) 320x320"), "{said}");

    let b = lipstream_engines::avatar::Bundle::read(&bundle).unwrap();
    assert_eq!(b.frames.len(), 30);
    let centres: Vec<f32> = b
        .frames
        .iter()
        .map(|f| (f.face.x0 + f.face.x1) / 2.0)
        .collect();
    let (lo, hi) = centres
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    // The crop swings 24 px either way in the 448 px source, 17 px in the clip: the face
    // moves the other way by as much.
    assert!(hi - lo > 15.0, "the face boxes follow the pan: {centres:?}");
    let steps: Vec<f32> = centres.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    assert!(
        steps.iter().all(|&s| s < 6.0),
        "no box jumps between frames: {steps:?}"
    );

    for (input, why) in [
        (
            vec![
                "--video",
                fixtures().join("mtcnn/astronaut.png").to_str().unwrap(),
            ],
            "neither a YUV4MPEG2",
        ),
        (
            vec![
                "--video",
                clip.to_str().unwrap(),
                "--image",
                fixtures().join("mtcnn/astronaut.png").to_str().unwrap(),
            ],
            "cannot be used with",
        ),
        (
            vec!["--video", clip.to_str().unwrap(), "--max-seconds", "0"],
            "positive number",
        ),
    ] {
        let refused = prepare(
            &input.iter().map(|s| &**s).collect::<Vec<_>>(),
            &dir.join("x"),
        );
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && err.contains(why),
            "{input:?}: {err}"
        );
    }

    // Silence: no inference, the clip itself plays (and the CPU stays free for the timing).
    // The publisher offers audio only, as an agent would: the avatar goes to the viewers.
    let server = cpu_server(["--avatar", bundle.to_str().unwrap()], "1", "200");
    let options = PublishOptions {
        base_url: server.base_url.clone(),
        duration: Duration::from_secs(6),
        audio_only: true,
        audio: AudioSignal::Speech {
            pcm: Arc::new(vec![0; AUDIO_RATE as usize]),
            click_period_ms: None,
        },
        ..Default::default()
    };
    let publisher = std::thread::spawn(move || publish(&options));
    // A WHEP viewer of the session sees the avatar, with its sound.
    assert!(
        server.wait_until(Duration::from_secs(5), |s| s.metric("lipstream_sessions")
            == 1.0)
    );
    std::thread::sleep(Duration::from_secs(1));
    let watched = lipstream::client::view(
        &server.base_url,
        &server.only_session_id(),
        None,
        [127, 0, 0, 1].into(),
        Duration::from_secs(4),
        true,
    )
    .expect("view");
    let report = publisher
        .join()
        .expect("publisher thread")
        .expect("publish");
    eprintln!(
        "publisher: {} frames sent, {} audio packets back; viewer: {} avatar frames, {} audio \
         packets in 4 s",
        report.frames_sent,
        report.received.audio_packets,
        watched.frames_unstamped,
        watched.audio_packets
    );
    assert_eq!(report.frames_sent, 0, "audio only");
    assert!(
        f64::from(report.received.audio_packets) >= 0.9 * f64::from(report.audio_packets_sent),
        "the publisher gets its audio back"
    );
    assert!(watched.frames_unstamped >= 75, "the viewer sees the avatar");
    assert!(watched.audio_packets >= 150, "and hears it");
    let pictures = &watched.unstamped_pictures;
    let frames: Vec<VideoFrame> = b
        .frames
        .iter()
        .map(|f| VideoFrame::from_rgb(&f.rgb, f.width, f.height).unwrap())
        .collect();
    let nearest: Vec<usize> = pictures
        .iter()
        .map(|(_, p)| {
            let diff = |f: &VideoFrame| -> f64 {
                p.y.iter()
                    .zip(&f.y)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
                    .sum::<f64>()
                    / f.y.len() as f64
            };
            (0..frames.len())
                .min_by(|&i, &j| diff(&frames[i]).total_cmp(&diff(&frames[j])))
                .unwrap()
        })
        .collect();
    eprintln!("clip frames shown: {nearest:?}");
    assert!(pictures.len() >= 75, "{} pictures in 4 s", pictures.len());
    let mut seen = nearest.clone();
    seen.sort_unstable();
    seen.dedup();
    assert!(seen.len() >= 28, "the whole clip plays: {seen:?}");
    // Back and forth: each picture is the clip frame next to the one before (lost packets
    // aside), never a jump back to the start.
    let steps_ok = nearest
        .windows(2)
        .filter(|w| w[0].abs_diff(w[1]) <= 2)
        .count();
    assert!(
        steps_ok as f64 >= 0.9 * (nearest.len() - 1) as f64,
        "the clip plays in order, back and forth: {nearest:?}"
    );
    assert!(
        nearest.windows(3).any(|w| w[0] < w[1] && w[1] > w[2])
            && nearest.windows(3).any(|w| w[0] > w[1] && w[1] < w[2]),
        "it turns at both ends: {nearest:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Camera mode through a 2 s audio outage and a 10 s jump of the video timestamps: the stream
/// goes on — every frame comes back, the audio resumes, the jumped video is re-anchored.
#[test]
fn camera_mode_rides_out_an_audio_gap_and_a_timestamp_jump() {
    let _turn = one_at_a_time();
    let mtcnn = fixtures().join("mtcnn");
    let server = cpu_server(["--mtcnn", mtcnn.to_str().unwrap()], "1", "1500");
    let background = Arc::new(astronaut_frame());
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        width: background.width,
        height: background.height,
        fps: 10,
        duration: Duration::from_secs(8),
        // Frames leave 1080 ms (lookahead) + 1.5 s (budget) after they arrive.
        linger: Duration::from_millis(4000),
        audio: AudioSignal::Tone { hz: 220.0 },
        background: Some(background),
        audio_pause: Some((Duration::from_millis(2500), Duration::from_secs(2))),
        video_jump: Some((60, 900_000)),
        ..Default::default()
    })
    .expect("publish");
    let got: Vec<u32> = report.received.frames.iter().map(|f| f.frame_id).collect();
    let after_jump = got.iter().filter(|&&id| id >= 60).count();
    eprintln!(
        "sent {} frames, {} back ({after_jump} after the jump); audio {} packets sent, {} back; audio short {}",
        report.frames_sent,
        got.len(),
        report.audio_packets_sent,
        report.received.audio_packets,
        server.metric("lipstream_frames_audio_short_total"),
    );
    assert!(
        got.len() as f64 >= 0.95 * f64::from(report.frames_sent),
        "frames keep coming back through the gap and the jump"
    );
    assert!(after_jump >= 15, "the video after the jump comes back");
    assert!(
        f64::from(report.received.audio_packets) >= 0.9 * f64::from(report.audio_packets_sent),
        "the audio resumes after the gap"
    );
}

/// Camera mode while the face leaves the picture for 2 s and comes back: the frames without it
/// pass through (counted), the tracker drops the face and finds it again, and the mouth is
/// rendered again after it returns.
#[test]
fn camera_mode_follows_a_face_that_leaves_and_comes_back() {
    let _turn = one_at_a_time();
    let mtcnn = fixtures().join("mtcnn");
    let server = cpu_server(["--mtcnn", mtcnn.to_str().unwrap()], "1", "3000");
    let background = Arc::new(astronaut_frame());
    // 10 fps: the face in frames 0-29, gone in 30-49 (the moving test pattern), back from 50.
    let gap = 30..50;
    let report = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        width: background.width,
        height: background.height,
        fps: 10,
        duration: Duration::from_secs(12),
        linger: Duration::from_millis(5500),
        audio: AudioSignal::Tone { hz: 220.0 },
        background: Some(background.clone()),
        background_gap: Some(gap.clone()),
        keep_pictures: true,
        ..Default::default()
    })
    .expect("publish");
    let no_face = server.metric("lipstream_frames_no_face_total");
    let rendered = server.metric("lipstream_frames_rendered_total");
    let face = [181.05 - 32.0, 62.16, 267.75 - 32.0, 172.05 + 10.0];
    let rendered_after: Vec<u32> = report
        .received
        .pictures
        .iter()
        .filter(|(id, _)| *id >= gap.end + 5)
        .filter(|(_, p)| region_diffs(p, &background, face).0 > 12.0)
        .map(|(id, _)| *id)
        .collect();
    eprintln!(
        "sent {}, back {}, no face {no_face}, rendered {rendered}, rendered after the face came back: {rendered_after:?}",
        report.frames_sent,
        report.received.frames.len()
    );
    assert_eq!(report.lost(), 0, "every frame comes back");
    assert!(
        no_face >= 10.0,
        "frames without the face are counted ({no_face})"
    );
    assert!(
        !rendered_after.is_empty(),
        "the face is found again and its mouth rendered"
    );
}

/// Camera mode with one of the two tracks silent: a publisher that sends only audio gets its
/// audio back; one that sends only video gets every frame back untouched (nothing to
/// lip-sync to), counted as short of audio. The server serves both and stays up.
#[test]
fn camera_mode_serves_audio_only_and_video_only_publishers() {
    let _turn = one_at_a_time();
    let mtcnn = fixtures().join("mtcnn");
    let server = cpu_server(["--mtcnn", mtcnn.to_str().unwrap()], "1", "1000");
    let seconds = Duration::from_secs(4);
    let audio_only = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        duration: seconds,
        linger: Duration::from_millis(3000),
        video_pause: Some((Duration::ZERO, seconds)),
        ..Default::default()
    })
    .expect("publish audio only");
    eprintln!(
        "audio only: {} frames sent, audio {} packets sent, {} back",
        audio_only.frames_sent, audio_only.audio_packets_sent, audio_only.received.audio_packets
    );
    assert_eq!(audio_only.frames_sent, 0);
    assert!(
        f64::from(audio_only.received.audio_packets)
            >= 0.9 * f64::from(audio_only.audio_packets_sent),
        "the audio comes back without any video"
    );

    let background = Arc::new(astronaut_frame());
    let video_only = publish(&PublishOptions {
        base_url: server.base_url.clone(),
        width: background.width,
        height: background.height,
        fps: 10,
        duration: seconds,
        linger: Duration::from_millis(3000),
        background: Some(background),
        audio_pause: Some((Duration::ZERO, seconds)),
        ..Default::default()
    })
    .expect("publish video only");
    let rendered = server.metric("lipstream_frames_rendered_total");
    let short = server.metric("lipstream_frames_audio_short_total");
    eprintln!(
        "video only: {} frames sent, {} back, audio {} packets sent; rendered {rendered}, audio short {short}",
        video_only.frames_sent,
        video_only.received.frames.len(),
        video_only.audio_packets_sent
    );
    assert_eq!(video_only.audio_packets_sent, 0);
    assert_eq!(video_only.lost(), 0, "every frame comes back");
    assert_eq!(rendered, 0.0, "no audio, no lip-sync");
    assert!(
        short >= 0.8 * f64::from(video_only.frames_sent),
        "the frames are counted as short of audio ({short})"
    );
}

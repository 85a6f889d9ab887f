//! `lipstream bench sessions`: N synthetic publishers against a running server, measured frame by
//! frame (stamped video) and click by click (audio), with server figures scraped from /metrics.

pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::{publish, AudioSignal, PublishOptions, PublishReport};
use stats::{percentile, Latency, SessionFigures};

/// Which pipeline the sessions exercise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Publish camera-like video + audio; the server returns the processed video.
    Camera,
    /// Publish audio only; the server renders an avatar.
    Avatar,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SessionsOptions {
    pub url: String,
    pub token: Option<String>,
    pub sessions: usize,
    pub duration: Duration,
    pub mode: Mode,
    pub ramp: bool,
    /// p95 glass-to-glass latency a sustainable load must stay under.
    pub budget_ms: f64,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    pub progress: bool,
    /// A still picture to publish (stamped) instead of the moving test pattern: a face, for
    /// the lip-sync stage. Its size wins over `width` x `height`.
    pub picture: Option<Arc<crate::media::frame::VideoFrame>>,
    /// A clip to publish (looped, stamped) instead: a `.y4m` file's frames.
    pub clip: Option<Arc<Vec<crate::media::frame::VideoFrame>>>,
    /// A recording to publish (looped) as the audio: mono, 48 kHz, scaled to
    /// `client::synth::SPEECH_PEAK`. Camera mode lays the click train over it.
    pub speech: Option<Arc<Vec<i16>>>,
}

/// The ramp's verdict for one load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RampStep {
    pub sessions: usize,
    pub p95_ms: Option<f64>,
    pub late_pct: f64,
    pub loss_pct: f64,
    pub failed_sessions: usize,
    pub sustainable: bool,
}

/// Figures over all sessions of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Overall {
    pub sessions: usize,
    pub failed_sessions: usize,
    pub failures: Vec<String>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub loss_pct: f64,
    pub latency_ms: Option<Latency>,
    pub fps_per_session_mean: f64,
    pub fps_delivered_total: f64,
    pub jitter_ms_mean: f64,
    pub setup_ms_p50: Option<f64>,
    pub setup_ms_max: Option<f64>,
    /// Returned-audio latency minus returned-video latency, over every matched click.
    pub av_offset_ms_mean: Option<f64>,
    pub av_offset_ms_max_abs: Option<f64>,
    pub av_offset_samples: usize,
    /// Glass-to-glass latency of the returned clicks: the latency of avatar sessions, whose
    /// frames carry no stamp.
    #[serde(default)]
    pub audio_latency_ms: Option<Latency>,
    /// Frames the server sent unprocessed because the stage missed its budget (from /metrics).
    pub frames_late: f64,
    pub late_pct: f64,
    /// Faces the lip-sync stage rendered and blended back (from /metrics).
    #[serde(default)]
    pub frames_rendered: f64,
    /// Frames sent unprocessed because no face was found in them.
    #[serde(default)]
    pub frames_no_face: f64,
    /// Mean frames per renderer batch: how much cross-session batching happened.
    #[serde(default)]
    pub batch_frames_mean: Option<f64>,
}

/// Server figures scraped from /metrics over the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    /// Mean time per frame in each stage, ms.
    pub stage_ms: BTreeMap<String, f64>,
    /// (seconds since start, frames out per second, late frames per second).
    pub timeline: Vec<(f64, f64, f64)>,
    /// (seconds since start, the highest renderer load, `lipstream_gpu_load_ratio`): the share
    /// of its GPU the sessions' frames take in its cheapest batches (above 1: more than it has).
    #[serde(default)]
    pub gpu_load: Vec<(f64, f64)>,
}

impl ServerFigures {
    /// The median and highest of the run's GPU load samples (idle seconds left out).
    pub fn load_median_max(&self) -> Option<(f64, f64)> {
        let mut v: Vec<f64> = self
            .gpu_load
            .iter()
            .map(|&(_, l)| l)
            .filter(|l| *l > 0.0)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some((v[v.len() / 2], v[v.len() - 1]))
    }
}

/// One run's results: what `--out` writes as JSON and `--compare` reads back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub tool: String,
    pub date: String,
    pub url: String,
    pub mode: Mode,
    pub duration_s: f64,
    pub video: String,
    pub overall: Overall,
    pub server: ServerFigures,
    pub per_session: Vec<SessionFigures>,
    pub ramp: Vec<RampStep>,
    /// The largest session count that met the budget (ramp only).
    pub sustainable_sessions: Option<usize>,
}

/// A snapshot of the counters we read from /metrics.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    frames_out: f64,
    frames_late: f64,
    frames_rendered: f64,
    frames_no_face: f64,
    batch_sum: f64,
    batch_count: f64,
    stage_sum: [f64; 4],
    stage_count: [f64; 4],
    /// The highest of the renderers' load gauges.
    gpu_load: Option<f64>,
}

const STAGES: [&str; 4] = ["decode", "process", "encode", "render_batch"];

fn scrape(url: &str) -> Option<Counters> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .new_agent();
    let text = agent
        .get(format!("{}/metrics", url.trim_end_matches('/')))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    let mut c = Counters::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        match name {
            "lipstream_frames_out_total" => c.frames_out = v,
            "lipstream_frames_late_total" => c.frames_late = v,
            "lipstream_frames_rendered_total" => c.frames_rendered = v,
            "lipstream_frames_no_face_total" => c.frames_no_face = v,
            "lipstream_batch_frames_sum" => c.batch_sum = v,
            "lipstream_batch_frames_count" => c.batch_count = v,
            _ if name.starts_with("lipstream_gpu_load_ratio{") => {
                c.gpu_load = Some(c.gpu_load.map_or(v, |l| l.max(v)));
            }
            _ => {
                for (i, s) in STAGES.iter().enumerate() {
                    if name == format!("lipstream_stage_seconds_sum{{stage=\"{s}\"}}") {
                        c.stage_sum[i] = v;
                    } else if name == format!("lipstream_stage_seconds_count{{stage=\"{s}\"}}") {
                        c.stage_count[i] = v;
                    }
                }
            }
        }
    }
    Some(c)
}

/// Runs `n` sessions at once for the duration; returns their reports (or errors) and the server
/// figures over the same time.
fn run_step(
    o: &SessionsOptions,
    n: usize,
) -> (Vec<Result<PublishReport, String>>, ServerFigures, Counters) {
    let before = scrape(&o.url).unwrap_or_default();
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let timeline = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let sampler = {
        let (done, timeline, url) = (done.clone(), timeline.clone(), o.url.clone());
        std::thread::spawn(move || {
            let mut last = scrape(&url).unwrap_or_default();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                if let Some(c) = scrape(&url) {
                    let t = start.elapsed().as_secs_f64();
                    if let Ok(mut tl) = timeline.lock() {
                        tl.0.push((
                            t,
                            c.frames_out - last.frames_out,
                            c.frames_late - last.frames_late,
                        ));
                        if let Some(load) = c.gpu_load {
                            tl.1.push((t, load));
                        }
                    }
                    last = c;
                }
            }
        })
    };
    let bar = if o.progress {
        indicatif::ProgressBar::new(o.duration.as_secs().max(1))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} s")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{n} session(s)"));
    let options = match o.mode {
        Mode::Camera => PublishOptions {
            base_url: o.url.clone(),
            token: o.token.clone(),
            width: o.width,
            height: o.height,
            fps: o.fps,
            duration: o.duration,
            linger: Duration::from_millis(1000),
            audio: match &o.speech {
                Some(pcm) => AudioSignal::Speech {
                    pcm: pcm.clone(),
                    click_period_ms: Some(1000),
                },
                None => AudioSignal::Clicks { period_ms: 1000 },
            },
            background: o.picture.clone(),
            clip: o.clip.clone(),
            ..PublishOptions::default()
        },
        // The server makes the video from the audio: the publisher speaks (the recording, else a
        // tone so the avatar is never idle) and sends a token video the server does not show.
        // The avatar's frames carry no stamp: they are counted (fps), and the click train over
        // the speech times the session (the server delays audio and video alike).
        Mode::Avatar => PublishOptions {
            base_url: o.url.clone(),
            token: o.token.clone(),
            width: 64,
            height: 48,
            fps: 5,
            duration: o.duration,
            linger: Duration::from_millis(1000),
            audio: AudioSignal::Speech {
                pcm: o.speech.clone().unwrap_or_else(|| {
                    std::sync::Arc::new(crate::client::synth::tone_pcm(
                        220.0,
                        crate::client::publisher::AUDIO_RATE,
                    ))
                }),
                click_period_ms: Some(1000),
            },
            ..PublishOptions::default()
        },
    };
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let opts = options.clone();
            // Staggered starts: keyframes and setups do not all land in the same tick.
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(37 * i as u64 % 1000));
                publish(&opts).map_err(|e| e.to_string())
            })
        })
        .collect();
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        bar.set_position(start.elapsed().as_secs().min(o.duration.as_secs()));
    }
    bar.finish_and_clear();
    let results = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("client thread panicked".into()))
        })
        .collect();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let after = scrape(&o.url).unwrap_or_default();
    let mut stage_ms = BTreeMap::new();
    for (i, s) in STAGES.iter().enumerate() {
        let count = after.stage_count[i] - before.stage_count[i];
        if count > 0.0 {
            stage_ms.insert(
                s.to_string(),
                (after.stage_sum[i] - before.stage_sum[i]) / count * 1000.0,
            );
        }
    }
    let delta = Counters {
        frames_out: after.frames_out - before.frames_out,
        frames_late: after.frames_late - before.frames_late,
        frames_rendered: after.frames_rendered - before.frames_rendered,
        frames_no_face: after.frames_no_face - before.frames_no_face,
        batch_sum: after.batch_sum - before.batch_sum,
        batch_count: after.batch_count - before.batch_count,
        ..Counters::default()
    };
    let (timeline, gpu_load) = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    (
        results,
        ServerFigures {
            stage_ms,
            timeline,
            gpu_load,
        },
        delta,
    )
}

fn overall(
    results: &[Result<PublishReport, String>],
    figures: &[SessionFigures],
    delta: Counters,
) -> Overall {
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    let lat: Vec<f64> = figures
        .iter()
        .flat_map(|f| f.frames.iter().map(|(_, l)| *l))
        .collect();
    let sent: u64 = figures.iter().map(|f| u64::from(f.frames_sent)).sum();
    let received: u64 = figures.iter().map(|f| f.frames_received as u64).sum();
    let offsets: Vec<f64> = figures
        .iter()
        .flat_map(|f| f.av_offset_ms.iter().map(|(_, o)| *o))
        .collect();
    let setups: Vec<f64> = figures.iter().filter_map(|f| f.setup_ms).collect();
    let audio: Vec<f64> = figures
        .iter()
        .flat_map(|f| f.audio_latency_ms.iter().map(|(_, l)| *l))
        .collect();
    let n = figures.len().max(1) as f64;
    Overall {
        sessions: results.len(),
        failed_sessions: failures.len(),
        failures,
        frames_sent: sent,
        frames_received: received,
        loss_pct: if sent > 0 {
            100.0 * sent.saturating_sub(received) as f64 / sent as f64
        } else {
            0.0
        },
        latency_ms: Latency::of(&lat),
        fps_per_session_mean: figures.iter().map(|f| f.fps_delivered).sum::<f64>() / n,
        fps_delivered_total: figures.iter().map(|f| f.fps_delivered).sum(),
        jitter_ms_mean: figures.iter().map(|f| f.jitter_ms).sum::<f64>() / n,
        setup_ms_p50: percentile(&setups, 50.0),
        setup_ms_max: setups.iter().copied().reduce(f64::max),
        av_offset_ms_mean: (!offsets.is_empty())
            .then(|| offsets.iter().sum::<f64>() / offsets.len() as f64),
        av_offset_ms_max_abs: offsets.iter().map(|o| o.abs()).reduce(f64::max),
        av_offset_samples: offsets.len(),
        audio_latency_ms: Latency::of(&audio),
        frames_late: delta.frames_late,
        late_pct: if delta.frames_out > 0.0 {
            100.0 * delta.frames_late / delta.frames_out
        } else {
            0.0
        },
        frames_rendered: delta.frames_rendered,
        frames_no_face: delta.frames_no_face,
        batch_frames_mean: (delta.batch_count > 0.0).then(|| delta.batch_sum / delta.batch_count),
    }
}

/// The p95 latency a load is judged by: the returned frames' where they carry stamps, else
/// (avatar mode: the avatar is the server's picture) the returned clicks'.
fn judged_p95(o: &Overall) -> Option<f64> {
    o.latency_ms
        .as_ref()
        .or(o.audio_latency_ms.as_ref())
        .map(|l| l.p95)
}

/// Whether a load's p95 latency meets the budget. An avatar load with nothing timed (no click
/// came back: a recording without clicks) is judged by late and lost frames alone.
fn latency_within(mode: Mode, p95_ms: Option<f64>, budget_ms: f64) -> bool {
    match (mode, p95_ms) {
        (_, Some(p)) => p <= budget_ms,
        (Mode::Avatar, None) => true,
        (_, None) => false,
    }
}

/// The ramp's next session count: doubling while every load was sustainable, then halving the
/// gap between the largest sustainable and the smallest unsustainable count; `None` once they
/// are neighbours (or nothing was sustainable).
fn next_ramp_step(sustainable: Option<usize>, too_many: Option<usize>) -> Option<usize> {
    match (sustainable, too_many) {
        (Some(ok), None) => Some(ok * 2),
        (Some(ok), Some(bad)) if bad > ok + 1 => Some(ok + (bad - ok) / 2),
        _ => None,
    }
}

/// Runs the benchmark (one load, or a ramp) and returns the report.
pub fn run(o: &SessionsOptions) -> anyhow::Result<BenchReport> {
    let duration_s = o.duration.as_secs_f64();
    let mut ramp = Vec::new();
    let mut sustainable = None;
    let mut n = o.sessions.max(1);
    let mut too_many: Option<usize> = None;
    let (results, server, delta) = loop {
        let (results, server, delta) = run_step(o, n);
        if !o.ramp {
            break (results, server, delta);
        }
        let figures: Vec<SessionFigures> = results
            .iter()
            .flatten()
            .map(|r| SessionFigures::of(r, duration_s))
            .collect();
        let all = overall(&results, &figures, delta);
        let p95 = judged_p95(&all);
        let ok = all.failed_sessions == 0
            && latency_within(o.mode, p95, o.budget_ms)
            && all.late_pct <= 1.0
            && all.loss_pct <= 1.0;
        eprintln!(
            "ramp: {n} sessions: p95 {} ms, late {:.2} %, lost {:.2} %, failed {} -> {}",
            p95.map_or("-".into(), |p| format!("{p:.1}")),
            all.late_pct,
            all.loss_pct,
            all.failed_sessions,
            if ok { "sustainable" } else { "over budget" }
        );
        ramp.push(RampStep {
            sessions: n,
            p95_ms: p95,
            late_pct: all.late_pct,
            loss_pct: all.loss_pct,
            failed_sessions: all.failed_sessions,
            sustainable: ok,
        });
        if ok {
            sustainable = Some(n);
        } else {
            too_many = Some(n);
        }
        match next_ramp_step(sustainable, too_many) {
            Some(next) => n = next,
            None => break (results, server, delta),
        }
    };
    let per_session: Vec<SessionFigures> = results
        .iter()
        .flatten()
        .map(|r| SessionFigures::of(r, duration_s))
        .collect();
    Ok(BenchReport {
        tool: format!("lipstream {} bench sessions", env!("CARGO_PKG_VERSION")),
        date: now_utc(),
        url: o.url.clone(),
        mode: o.mode,
        duration_s,
        video: format!(
            "{}x{} @ {} fps, synthetic stamped",
            o.width, o.height, o.fps
        ),
        overall: overall(&results, &per_session, delta),
        server,
        per_session,
        ramp,
        sustainable_sessions: sustainable,
    })
}

/// UTC date and time, ISO 8601 (from the system clock; no time-zone database needed).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Figure-by-figure change against an earlier report.
pub fn compare(old: &BenchReport, new: &BenchReport) -> String {
    let mut out = String::new();
    let mut row = |name: &str, a: Option<f64>, b: Option<f64>, unit: &str| {
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
        let change = match (a, b) {
            (Some(a), Some(b)) if a.abs() > 1e-12 => format!("{:+.1} %", (b - a) / a.abs() * 100.0),
            (Some(a), Some(b)) => format!("{:+.2}{unit}", b - a),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{name:<28} {:>14} {:>14} {change:>10}\n",
            fmt(a),
            fmt(b)
        ));
    };
    let (o, n) = (&old.overall, &new.overall);
    // Returned frames' latency, then returned clicks' (the only timing of avatar loads).
    type Stat = fn(&Latency) -> f64;
    let stats: [(&str, Stat); 4] = [
        ("p50", |l| l.p50),
        ("p95", |l| l.p95),
        ("p99", |l| l.p99),
        ("max", |l| l.max),
    ];
    row(
        "sessions",
        Some(o.sessions as f64),
        Some(n.sessions as f64),
        "",
    );
    for (what, f) in stats {
        let (a, b) = (o.latency_ms.as_ref().map(f), n.latency_ms.as_ref().map(f));
        row(&format!("latency {what}"), a, b, " ms");
    }
    for (what, f) in &stats[..2] {
        let (a, b) = (
            o.audio_latency_ms.as_ref().map(f),
            n.audio_latency_ms.as_ref().map(f),
        );
        row(&format!("audio latency {what}"), a, b, " ms");
    }
    row(
        "fps per session",
        Some(o.fps_per_session_mean),
        Some(n.fps_per_session_mean),
        "",
    );
    row("frames lost", Some(o.loss_pct), Some(n.loss_pct), " %");
    row("frames late", Some(o.late_pct), Some(n.late_pct), " %");
    row(
        "jitter",
        Some(o.jitter_ms_mean),
        Some(n.jitter_ms_mean),
        " ms",
    );
    row("setup p50", o.setup_ms_p50, n.setup_ms_p50, " ms");
    row(
        "A/V offset mean",
        o.av_offset_ms_mean,
        n.av_offset_ms_mean,
        " ms",
    );
    row(
        "A/V offset max |.|",
        o.av_offset_ms_max_abs,
        n.av_offset_ms_max_abs,
        " ms",
    );
    for stage in STAGES {
        row(
            &format!("server {stage}"),
            old.server.stage_ms.get(stage).copied(),
            new.server.stage_ms.get(stage).copied(),
            " ms",
        );
    }
    if old.sustainable_sessions.is_some() || new.sustainable_sessions.is_some() {
        row(
            "sustainable sessions",
            old.sustainable_sessions.map(|v| v as f64),
            new.sustainable_sessions.map(|v| v as f64),
            "",
        );
    }
    format!(
        "{:<28} {:>14} {:>14} {:>10}\n{out}",
        "figure", "before", "now", "change"
    )
}

/// One line per headline figure, for the terminal.
pub fn summary(r: &BenchReport) -> String {
    let o = &r.overall;
    // Frames without stamps (an avatar the server made) are counted; the clicks time them.
    let mut latency = o.latency_ms.as_ref().map_or_else(
        || "video latency not timed (no stamped frames)".to_string(),
        |l| {
            format!(
                "latency p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms",
                l.p50, l.p95, l.p99, l.max
            )
        },
    );
    if let Some(l) = &o.audio_latency_ms {
        latency.push_str(&format!(
            "; audio latency p50 {:.1} / p95 {:.1} / max {:.1} ms",
            l.p50, l.p95, l.max
        ));
    }
    let mut s = format!(
        "{} session(s), {:.0} s: {latency}; {:.1} fps per session; \
         lost {:.2} %, late {:.2} %; jitter {:.1} ms; setup p50 {} ms; A/V offset mean {} ms (max |{}| ms, {} clicks)",
        o.sessions,
        r.duration_s,
        o.fps_per_session_mean,
        o.loss_pct,
        o.late_pct,
        o.jitter_ms_mean,
        o.setup_ms_p50.map_or("-".into(), |v| format!("{v:.0}")),
        o.av_offset_ms_mean.map_or("-".into(), |v| format!("{v:.1}")),
        o.av_offset_ms_max_abs.map_or("-".into(), |v| format!("{v:.1}")),
        o.av_offset_samples,
    );
    if o.frames_rendered > 0.0 || o.frames_no_face > 0.0 {
        s.push_str(&format!(
            "\nlip-sync: {:.0} faces rendered, {:.0} frames without a face, {} frames per batch on average; render {} ms per batch",
            o.frames_rendered,
            o.frames_no_face,
            o.batch_frames_mean.map_or("-".into(), |v| format!("{v:.1}")),
            r.server
                .stage_ms
                .get("render_batch")
                .map_or("-".into(), |v| format!("{v:.1}")),
        ));
        if let Some((median, max)) = r.server.load_median_max() {
            s.push_str(&format!(
                "; GPU load {median:.2} (median second; highest {max:.2})"
            ));
        }
    }
    if o.failed_sessions > 0 {
        s.push_str(&format!(
            "\n{} session(s) failed: {}",
            o.failed_sessions,
            o.failures.join("; ")
        ));
    }
    if let Some(n) = r.sustainable_sessions {
        s.push_str(&format!(
            "\nsustainable: {n} sessions within p95 <= budget and <= 1 % late"
        ));
    }
    s
}

/// Where `--out` puts its files.
pub fn output_paths(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    (dir.join("sessions.json"), dir.join("sessions.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_doubles_then_bisects_to_the_largest_sustainable_count() {
        // A server that holds 13 sessions: 1, 2, 4, 8, 16 (over), 12, 14 (over), 13, stop.
        let holds = |n: usize| n <= 13;
        let (mut ok, mut bad, mut n, mut tried) = (None, None, 1, Vec::new());
        loop {
            tried.push(n);
            if holds(n) {
                ok = Some(n);
            } else {
                bad = Some(n);
            }
            match next_ramp_step(ok, bad) {
                Some(next) => n = next,
                None => break,
            }
        }
        assert_eq!(tried, [1, 2, 4, 8, 16, 12, 14, 13]);
        assert_eq!(ok, Some(13));
        // Nothing sustainable: one step.
        assert_eq!(next_ramp_step(None, Some(1)), None);
    }

    #[test]
    fn loads_are_timed_by_their_frames_else_by_their_clicks() {
        let l = |p95: f64| {
            Some(Latency {
                p95,
                ..Latency::default()
            })
        };
        let mut o = Overall {
            audio_latency_ms: l(240.0),
            ..Overall::default()
        };
        assert_eq!(judged_p95(&o), Some(240.0), "avatar: the clicks");
        o.latency_ms = l(250.0);
        assert_eq!(judged_p95(&o), Some(250.0), "stamped frames first");
        o = Overall::default();
        assert_eq!(judged_p95(&o), None);
    }

    #[test]
    fn avatar_loads_without_stamps_are_judged_by_late_frames_alone() {
        assert!(latency_within(Mode::Avatar, None, 200.0));
        assert!(!latency_within(Mode::Camera, None, 200.0));
        assert!(!latency_within(Mode::Avatar, Some(250.0), 200.0));
        assert!(latency_within(Mode::Camera, Some(150.0), 200.0));
    }

    #[test]
    fn the_gpu_load_summary_leaves_idle_seconds_out() {
        let mut f = ServerFigures::default();
        assert_eq!(f.load_median_max(), None);
        f.gpu_load = vec![
            (1.0, 0.0),
            (2.0, 0.98),
            (3.0, 1.04),
            (4.0, 1.01),
            (5.0, 0.0),
        ];
        assert_eq!(f.load_median_max(), Some((1.01, 1.04)));
    }

    #[test]
    fn dates_are_iso() {
        let d = now_utc();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'));
    }
}

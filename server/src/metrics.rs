//! Prometheus metrics for the whole server, registered once and shared by every task.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label naming a media-path stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// Label naming a renderer's device: a CUDA ordinal, or "cpu".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub gpu: String,
}

/// Label naming a media kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub sessions: Gauge,
    pub viewers: Gauge,
    pub media_workers: Gauge,
    pub sessions_started: Counter,
    pub sessions_rejected: Counter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    /// Frames whose stage missed the frame budget and went out unprocessed.
    pub frames_late: Counter,
    pub frames_undecodable: Counter,
    /// Frames the renderer failed on (an executor error), sent unprocessed.
    pub frames_failed: Counter,
    /// Frames sent unprocessed because no face was found in them.
    pub frames_no_face: Counter,
    /// Faces rendered by the lip-sync model and blended back.
    pub frames_rendered: Counter,
    /// Avatar frames shown as prepared, without inference (the audio is silent).
    pub frames_idle: Counter,
    /// Frames per batch the renderer ran.
    pub batch_frames: Histogram,
    /// Whisper windows per launch of the CUDA whisper thread.
    pub whisper_windows: Histogram,
    /// Time the CUDA whisper thread spent on launches (upload, encoder, read-back).
    pub whisper_seconds: Counter<f64, AtomicU64>,
    /// Frames processed before the audio their stage hears ahead had arrived (it stopped).
    pub frames_audio_short: Counter,
    /// Media the worker could not take because it was behind (bounded queue full).
    pub media_dropped: Family<KindLabel, Counter>,
    pub keyframes_requested: Counter,
    /// Times a session's video encoder moved to follow the bandwidth estimate.
    pub bitrate_changes: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub stage_seconds: Family<StageLabel, Histogram>,
    /// Per renderer device, over its last second of batches: share of time spent on batches,
    /// share of frames given up, sessions placed on it, frames rendered.
    pub gpu_busy: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_load: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_late: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    pub gpu_sessions: Family<GpuLabel, Gauge>,
    pub gpu_frames_rendered: Family<GpuLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lipstream");
        let m = Metrics {
            sessions: Gauge::default(),
            viewers: Gauge::default(),
            media_workers: Gauge::default(),
            sessions_started: Counter::default(),
            sessions_rejected: Counter::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            frames_late: Counter::default(),
            frames_undecodable: Counter::default(),
            frames_failed: Counter::default(),
            frames_no_face: Counter::default(),
            frames_rendered: Counter::default(),
            frames_idle: Counter::default(),
            batch_frames: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            whisper_windows: Histogram::new(exponential_buckets(1.0, 2.0, 5)),
            whisper_seconds: Counter::default(),
            frames_audio_short: Counter::default(),
            media_dropped: Family::default(),
            keyframes_requested: Counter::default(),
            bitrate_changes: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            // 50 us .. ~1.6 s: codec steps at the low end, a stalled model at the top.
            stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(50e-6, 2.0, 16))
            }),
            gpu_busy: Family::default(),
            gpu_load: Family::default(),
            gpu_late: Family::default(),
            gpu_sessions: Family::default(),
            gpu_frames_rendered: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "gpu_busy_ratio",
            "Share of the last second each renderer's device spent on frame batches",
            m.gpu_busy.clone(),
        );
        registry.register(
            "gpu_load_ratio",
            "Share of each renderer's device its last second of frames would take in its cheapest \
             batches: the capacity the sessions use (above 1 it cannot keep up)",
            m.gpu_load.clone(),
        );
        registry.register(
            "gpu_late_ratio",
            "Share of frames each renderer gave up in its last second",
            m.gpu_late.clone(),
        );
        registry.register(
            "gpu_sessions",
            "Sessions placed on each renderer's device",
            m.gpu_sessions.clone(),
        );
        registry.register(
            "gpu_frames_rendered",
            "Frames each renderer's device ran in batches",
            m.gpu_frames_rendered.clone(),
        );
        registry.register(
            "sessions",
            "Published sessions now open",
            m.sessions.clone(),
        );
        registry.register("viewers", "WHEP viewers now open", m.viewers.clone());
        registry.register(
            "media_workers",
            "Media worker threads alive",
            m.media_workers.clone(),
        );
        registry.register(
            "sessions_started",
            "Sessions accepted",
            m.sessions_started.clone(),
        );
        registry.register(
            "sessions_rejected",
            "Offers refused (bad SDP, no codec, limit)",
            m.sessions_rejected.clone(),
        );
        registry.register(
            "frames_in",
            "Video frames decoded from publishers",
            m.frames_in.clone(),
        );
        registry.register(
            "frames_out",
            "Video frames encoded for receivers",
            m.frames_out.clone(),
        );
        registry.register(
            "frames_late",
            "Frames passed through unprocessed because the stage missed its budget",
            m.frames_late.clone(),
        );
        registry.register(
            "frames_undecodable",
            "Video access units the decoder rejected (a keyframe was requested)",
            m.frames_undecodable.clone(),
        );
        registry.register(
            "frames_failed",
            "Frames sent unprocessed because the model executor failed on them",
            m.frames_failed.clone(),
        );
        registry.register(
            "frames_no_face",
            "Frames sent unprocessed because no face was found in them",
            m.frames_no_face.clone(),
        );
        registry.register(
            "frames_rendered",
            "Faces rendered by the lip-sync model and blended back",
            m.frames_rendered.clone(),
        );
        registry.register(
            "frames_idle",
            "Avatar frames shown as prepared, without inference, during silence",
            m.frames_idle.clone(),
        );
        registry.register(
            "batch_frames",
            "Frames in each batch the renderer ran",
            m.batch_frames.clone(),
        );
        registry.register(
            "whisper_windows",
            "Whisper windows in each launch of a GPU's whisper encoder",
            m.whisper_windows.clone(),
        );
        registry.register(
            "whisper_seconds",
            "Time GPUs' whisper threads spent encoding windows",
            m.whisper_seconds.clone(),
        );
        registry.register(
            "frames_audio_short",
            "Frames sent without lip-sync because the audio they need had not arrived (stream start, a pause, the end)",
            m.frames_audio_short.clone(),
        );
        registry.register(
            "media_dropped",
            "Media dropped because a session's worker was behind",
            m.media_dropped.clone(),
        );
        registry.register(
            "keyframes_requested",
            "Keyframe requests sent to publishers",
            m.keyframes_requested.clone(),
        );
        registry.register(
            "video_bitrate_changes",
            "Encoder bitrate changes following the bandwidth estimate",
            m.bitrate_changes.clone(),
        );
        registry.register(
            "udp_bytes_in",
            "UDP payload bytes received",
            m.bytes_in.clone(),
        );
        registry.register(
            "udp_bytes_out",
            "UDP payload bytes sent",
            m.bytes_out.clone(),
        );
        registry.register(
            "stage_seconds",
            "Time per frame in each media stage (decode, process, encode)",
            m.stage_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one stage's time for one frame.
    pub fn observe_stage(&self, stage: &'static str, took: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

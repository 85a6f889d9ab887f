//! Figures from what the test clients saw: latency percentiles, fps, jitter, A/V offset.

use serde::{Deserialize, Serialize};

use crate::client::PublishReport;

/// Nearest-rank percentile of unsorted values; `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Latency distribution in ms.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn of(values: &[f64]) -> Option<Self> {
        Some(Latency {
            p50: percentile(values, 50.0)?,
            p95: percentile(values, 95.0)?,
            p99: percentile(values, 99.0)?,
            max: values.iter().copied().fold(f64::MIN, f64::max),
            mean: values.iter().sum::<f64>() / values.len() as f64,
        })
    }
}

/// One session's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionFigures {
    pub frames_sent: u32,
    pub frames_received: usize,
    pub frames_lost: u32,
    pub latency_ms: Option<Latency>,
    pub fps_delivered: f64,
    /// RFC 3550-style interarrival jitter of the returned frames, ms.
    pub jitter_ms: f64,
    pub setup_ms: Option<f64>,
    /// (ms since connected, returned-audio latency minus returned-video latency) per click.
    pub av_offset_ms: Vec<(f64, f64)>,
    /// (ms since connected, glass-to-glass latency of the audio) per returned click: the
    /// latency of an avatar session, whose frames carry no stamp.
    #[serde(default)]
    pub audio_latency_ms: Vec<(f64, f64)>,
    /// Per-frame (ms since connected, latency) for plots.
    pub frames: Vec<(f64, f64)>,
}

impl SessionFigures {
    pub fn of(r: &PublishReport, duration_s: f64) -> Self {
        let rx = &r.received;
        let lat: Vec<f64> = rx.frames.iter().map(|f| f.latency_ms).collect();
        let mut jitter = 0.0;
        for w in rx.frames.windows(2) {
            // Transit-time difference of consecutive frames: (arrival2 - arrival1) - (sent2 - sent1).
            let d = (w[1].latency_ms - w[0].latency_ms).abs();
            jitter += (d - jitter) / 16.0;
        }
        // Frames the server made itself (avatar mode) carry no stamp: counted, not timed.
        let received = rx.frames.len().max(rx.frames_unstamped as usize);
        let lost = if rx.frames.is_empty() && rx.frames_unstamped > 0 {
            0
        } else {
            r.lost()
        };
        SessionFigures {
            frames_sent: r.frames_sent,
            frames_received: received,
            frames_lost: lost,
            latency_ms: Latency::of(&lat),
            fps_delivered: received as f64 / duration_s.max(1e-9),
            jitter_ms: jitter,
            setup_ms: rx.setup_ms,
            av_offset_ms: av_offsets(r),
            audio_latency_ms: audio_latencies(r),
            frames: rx.frames.iter().map(|f| (f.at_ms, f.latency_ms)).collect(),
        }
    }
}

/// For each click that came back: its audio latency minus the video latency of the frames
/// captured within ±100 ms of it. Positive: the audio trails the video.
///
/// Clicks are periodic, so a returned onset is matched to the click it is nearest to once the
/// video's own latency is allowed for: offsets are measured modulo the click period and are
/// meaningful within half of it, whatever the absolute latency (a lip-sync stage holds both
/// streams for hundreds of ms).
fn av_offsets(r: &PublishReport) -> Vec<(f64, f64)> {
    let rx = &r.received;
    let mut gaps: Vec<f64> = r.clicks_sent_ms.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_by(f64::total_cmp);
    let half_period = gaps.get(gaps.len() / 2).copied().unwrap_or(1000.0) / 2.0;
    let mut out = Vec::new();
    for &sent in &r.clicks_sent_ms {
        let near: Vec<f64> = rx
            .frames
            .iter()
            .filter(|f| (f.capture_ms - sent).abs() <= 100.0)
            .map(|f| f.latency_ms)
            .collect();
        if near.is_empty() {
            continue;
        }
        let video = near.iter().sum::<f64>() / near.len() as f64;
        let Some(offset) = rx
            .audio_onsets_ms
            .iter()
            .map(|&a| (a - sent) - video)
            .min_by(|a, b| a.abs().total_cmp(&b.abs()))
            .filter(|o| o.abs() < half_period)
        else {
            continue;
        };
        let since_connected = sent - rx.connected_ms.unwrap_or(sent);
        out.push((since_connected, offset));
    }
    out
}

/// Each returned click's glass-to-glass latency: its onset minus the sending of its click.
///
/// Clicks are alike, so an onset is paired with the click sent before it whose latency is
/// nearest the stream's own: the first returned audio packet's arrival minus the first sent
/// one's (the server holds audio for a constant delay). That pairs right whatever the delay,
/// also past the click period (a CPU renderer's budget of seconds); where the first packets
/// say nothing (none returned), the last click before the onset is taken.
fn audio_latencies(r: &PublishReport) -> Vec<(f64, f64)> {
    let rx = &r.received;
    let stream = match (r.audio_started_ms, rx.audio_first_ms) {
        (Some(sent), Some(back)) => (back - sent).max(0.0),
        _ => 0.0,
    };
    let connected = rx.connected_ms.unwrap_or(0.0);
    rx.audio_onsets_ms
        .iter()
        .filter_map(|&onset| {
            let latency = r
                .clicks_sent_ms
                .iter()
                .filter(|&&sent| sent <= onset)
                .map(|&sent| onset - sent)
                .min_by(|a, b| (a - stream).abs().total_cmp(&(b - stream).abs()))?;
            Some((onset - latency - connected, latency))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 95.0), Some(95.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
        let l = Latency::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((l.p50, l.max, l.mean), (2.0, 3.0, 2.0));
    }

    #[test]
    fn audio_latency_pairs_each_onset_with_its_click_whatever_the_delay() {
        // Clicks every 1000 ms; the audio comes back 3240 ms late (longer than the period),
        // one click lost on the way.
        let mut r = PublishReport {
            audio_started_ms: Some(1000.0),
            ..PublishReport::default()
        };
        r.received.connected_ms = Some(900.0);
        r.received.audio_first_ms = Some(1000.0 + 3240.0);
        for k in 0..8 {
            let sent = 1000.0 + 1000.0 * f64::from(k);
            r.clicks_sent_ms.push(sent);
            if k != 3 {
                r.received
                    .audio_onsets_ms
                    .push(sent + 3240.0 + f64::from(k % 2));
            }
        }
        let got = audio_latencies(&r);
        assert_eq!(got.len(), 7);
        for (since, latency) in &got {
            assert!((3240.0..=3241.0).contains(latency), "{got:?}");
            assert!((since - 100.0) % 1000.0 == 0.0, "{got:?}");
        }
        // A short delay, the first packets unknown: the last click before each onset.
        r.received.audio_first_ms = None;
        r.received.audio_onsets_ms = r.clicks_sent_ms.iter().map(|s| s + 250.0).collect();
        assert!(audio_latencies(&r).iter().all(|(_, l)| *l == 250.0));
        // Nothing returned, nothing measured.
        r.received.audio_onsets_ms.clear();
        assert!(audio_latencies(&r).is_empty());
    }

    #[test]
    fn a_click_is_matched_across_a_delay_longer_than_its_period() {
        use crate::client::ReceivedFrame;
        // Clicks every 500 ms; both streams come back 3 s late, the audio 12 ms after the video.
        let mut r = PublishReport::default();
        for k in 0..10 {
            let sent = 1000.0 + 500.0 * f64::from(k);
            r.clicks_sent_ms.push(sent);
            r.received.audio_onsets_ms.push(sent + 3012.0);
            r.received.frames.push(ReceivedFrame {
                frame_id: k as u32,
                latency_ms: 3000.0,
                at_ms: 0.0,
                capture_ms: sent + 10.0,
            });
        }
        let offsets = av_offsets(&r);
        assert_eq!(offsets.len(), 10);
        assert!(
            offsets.iter().all(|(_, o)| (o - 12.0).abs() < 1e-9),
            "{offsets:?}"
        );
    }
}

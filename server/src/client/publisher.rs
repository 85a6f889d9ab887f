//! One synthetic publisher: stamped video at a fixed frame rate and a 20 ms Opus tone over WHIP,
//! with the returned stream decoded and matched.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use str0m::media::{Direction, Frequency, MediaTime};

use crate::client::marker::Stamp;
use crate::client::peer::{stamp_clock_ms, Peer, Received};
use crate::client::{signal, synth, ClientError};
use crate::media::codec::{H264Encoder, OpusEncoder};
use crate::rtc::{pick_audio_pt, pick_video_pt};

/// The published audio's sample rate (Opus at its native rate).
pub const AUDIO_RATE: u32 = 48_000;
const AUDIO_FRAME: Duration = Duration::from_millis(20);

/// What the published audio carries.
#[derive(Clone, Debug, PartialEq)]
pub enum AudioSignal {
    /// A continuous sine.
    Tone { hz: f64 },
    /// A click every `period_ms`, on the stamp clock: returned clicks give the audio latency.
    Clicks { period_ms: u32 },
    /// A recording (mono at 48 kHz, scaled to `synth::SPEECH_PEAK`), looped, with the click
    /// train on top when a period is given.
    Speech {
        pcm: std::sync::Arc<Vec<i16>>,
        click_period_ms: Option<u32>,
    },
}

/// What to publish and how.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Server base URL, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    pub token: Option<String>,
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    /// How long to send media once connected.
    pub duration: Duration,
    /// How long to keep receiving after the last frame was sent.
    pub linger: Duration,
    pub audio: AudioSignal,
    pub video_bps: u32,
    /// Local address for the client's UDP socket.
    pub bind_ip: IpAddr,
    /// Leave without DELETE and without any goodbye, like a peer whose network died.
    pub vanish: bool,
    /// Frame ids sent damaged (truncated), as a broken encoder or a bad link would.
    pub corrupt_frames: Vec<u32>,
    /// A picture to send (with the stamp drawn over its top rows) instead of the moving test
    /// pattern, e.g. a face for the lip-sync stage; its size overrides `width` x `height`.
    pub background: Option<std::sync::Arc<crate::media::frame::VideoFrame>>,
    /// Keep every returned decoded picture (`Received::pictures`), for pixel checks.
    pub keep_pictures: bool,
    /// Stop sending audio for a while (start after connecting, length), as a muted or broken
    /// microphone would; RTP time runs on meanwhile.
    pub audio_pause: Option<(Duration, Duration)>,
    /// From this frame id on, video RTP times jump by this many 90 kHz ticks (a sender restart).
    pub video_jump: Option<(u32, u64)>,
    /// Stop sending video for a while (start after connecting, length), as a camera switched
    /// off would; the whole duration: an audio-only publisher on a video track.
    pub video_pause: Option<(Duration, Duration)>,
    /// Offer no video at all (an agent's audio-only WHIP session): nothing is sent or comes
    /// back on a video track.
    pub audio_only: bool,
    /// Frame ids sent with the moving test pattern instead of `background`: the face leaves the
    /// picture and comes back.
    pub background_gap: Option<std::ops::Range<u32>>,
    /// A clip to send (looped, each frame stamped) instead of `background` or the test pattern;
    /// its size overrides `width` x `height`.
    pub clip: Option<std::sync::Arc<Vec<crate::media::frame::VideoFrame>>>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            base_url: "http://127.0.0.1:8080".into(),
            token: None,
            width: 320,
            height: 240,
            fps: 25,
            duration: Duration::from_secs(5),
            linger: Duration::from_millis(1500),
            audio: AudioSignal::Tone { hz: 440.0 },
            video_bps: 600_000,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            vanish: false,
            corrupt_frames: Vec::new(),
            background: None,
            keep_pictures: false,
            audio_pause: None,
            video_jump: None,
            video_pause: None,
            audio_only: false,
            background_gap: None,
            clip: None,
        }
    }
}

/// What one publisher saw.
#[derive(Clone, Debug, Default)]
pub struct PublishReport {
    pub resource_url: String,
    pub frames_sent: u32,
    /// Stamp-clock times (ms) at which clicks were sent, for `AudioSignal::Clicks`.
    pub clicks_sent_ms: Vec<f64>,
    pub audio_packets_sent: u32,
    /// When the first audio packet was sent, on the stamp clock (ms).
    pub audio_started_ms: Option<f64>,
    /// The stream that came back on the publisher's own PeerConnection.
    pub received: Received,
}

impl PublishReport {
    /// Sent frames that never came back.
    pub fn lost(&self) -> u32 {
        self.frames_sent
            .saturating_sub(self.received.frames.len() as u32)
    }
}

/// Publishes for `options.duration` and reports what came back.
pub fn publish(options: &PublishOptions) -> Result<PublishReport, ClientError> {
    let url = format!("{}/whip", options.base_url.trim_end_matches('/'));
    let mut peer = Peer::open(
        &url,
        Direction::SendRecv,
        !options.audio_only,
        options.token.as_deref(),
        options.bind_ip,
    )?;
    peer.keep_pictures = options.keep_pictures;
    let mut report = PublishReport {
        resource_url: peer.resource_url.clone(),
        ..Default::default()
    };
    let result = run(&mut peer, options, &mut report);
    if !options.vanish {
        // Best effort: the server also reaps silent peers.
        let _ = signal::delete(&peer.resource_url, options.token.as_deref());
    }
    report.received = std::mem::take(&mut peer.received);
    result.map(|()| report)
}

/// The audio generator behind an `AudioSignal`.
enum Source {
    Tone(synth::Tone),
    Clicks(synth::Clicks),
    Speech(synth::Speech),
}

fn run(
    peer: &mut Peer,
    options: &PublishOptions,
    report: &mut PublishReport,
) -> Result<(), ClientError> {
    let mut h264_out = H264Encoder::new(options.video_bps)?;
    let mut opus_out = OpusEncoder::new(AUDIO_RATE)?;
    let (mut tone, click_period_ms) = match &options.audio {
        AudioSignal::Tone { hz } => (Source::Tone(synth::Tone::new(*hz, AUDIO_RATE)), None),
        AudioSignal::Clicks { period_ms } => (
            Source::Clicks(synth::Clicks::new(*period_ms, AUDIO_RATE)),
            Some(*period_ms),
        ),
        AudioSignal::Speech {
            pcm,
            click_period_ms,
        } => (
            Source::Speech(synth::Speech::new(
                pcm.clone(),
                *click_period_ms,
                AUDIO_RATE,
            )),
            *click_period_ms,
        ),
    };
    let mut pcm = vec![0i16; (AUDIO_RATE / 50) as usize];
    let fps = options.fps.max(1);
    let frame_interval = Duration::from_secs_f64(1.0 / f64::from(fps));
    let mut next_video = None::<Instant>;
    let mut next_audio = None::<Instant>;
    let mut audio_rtp = 0u64;
    // Frame intervals since the start, sent or not (video RTP time).
    let mut video_slots = 0u64;
    let mut keyframe_requests_seen = 0;

    loop {
        let timeout = peer.drain()?;
        peer.check_connect_timeout()?;
        let now = Instant::now();
        let Some(connected) = peer.connected_at else {
            peer.wait(timeout.min(now + Duration::from_millis(50)))?;
            continue;
        };
        if peer.received.keyframe_requests > keyframe_requests_seen {
            keyframe_requests_seen = peer.received.keyframe_requests;
            h264_out.request_keyframe();
        }
        let end_send = connected + options.duration;
        let end = end_send + options.linger;
        if now >= end {
            return Ok(());
        }
        let sending = now < end_send;
        let nv = *next_video.get_or_insert(connected);
        let na = *next_audio.get_or_insert(connected);
        let video_paused = options.audio_only
            || options.video_pause.is_some_and(|(from, len)| {
                let t = now.saturating_duration_since(connected);
                t >= from && t < from + len
            });
        if sending && video_paused && now >= nv {
            // The camera's clock runs on while it sends nothing.
            video_slots += 1;
            next_video = Some(nv + frame_interval);
            continue;
        }
        if sending && now >= nv {
            let id = report.frames_sent;
            let stamp = Stamp {
                frame_id: id,
                capture_ms: stamp_clock_ms(now) as u32,
            };
            let gap = options
                .background_gap
                .as_ref()
                .is_some_and(|g| g.contains(&id));
            let base = match &options.clip {
                Some(clip) if !clip.is_empty() => Some(&clip[id as usize % clip.len()]),
                _ => options.background.as_deref(),
            };
            let picture = match base {
                Some(bg) if !gap => {
                    let mut f = bg.clone();
                    stamp.draw(&mut f);
                    f
                }
                Some(bg) => synth::picture(bg.width, bg.height, stamp),
                None => synth::picture(options.width, options.height, stamp),
            };
            let au = h264_out.encode(&picture)?;
            let mut data = au.data;
            if options.corrupt_frames.contains(&id) {
                data.truncate(data.len() / 2);
            }
            let jump = options
                .video_jump
                .filter(|(from, _)| id >= *from)
                .map_or(0, |(_, ticks)| ticks);
            let rtp = MediaTime::from_90khz(video_slots * 90_000 / u64::from(fps) + jump);
            video_slots += 1;
            if let Some(w) = peer.video_mid.and_then(|m| peer.rtc.writer(m)) {
                if let Some(pt) = pick_video_pt(w.payload_params()) {
                    w.write(pt, now, rtp, data)?;
                }
            }
            report.frames_sent += 1;
            next_video = Some(nv + frame_interval);
            continue;
        }
        if sending && now >= na {
            if report.audio_started_ms.is_none() {
                report.audio_started_ms = Some(stamp_clock_ms(now));
            }
            // A click starts in this packet when its first sample is on a period boundary.
            if let Some(period_ms) = click_period_ms {
                if audio_rtp % (u64::from(period_ms) * u64::from(AUDIO_RATE) / 1000)
                    < pcm.len() as u64
                {
                    report.clicks_sent_ms.push(stamp_clock_ms(now));
                }
            }
            match &mut tone {
                Source::Tone(t) => t.fill(&mut pcm),
                Source::Clicks(c) => c.fill(&mut pcm),
                Source::Speech(s) => s.fill(&mut pcm),
            }
            let mut packet = Vec::new();
            opus_out.encode(&pcm, |_, p| packet = p.to_vec())?;
            let rtp = MediaTime::new(audio_rtp, Frequency::FORTY_EIGHT_KHZ);
            let paused = options.audio_pause.is_some_and(|(from, len)| {
                let t = now.saturating_duration_since(connected);
                t >= from && t < from + len
            });
            if paused {
                audio_rtp += pcm.len() as u64;
                next_audio = Some(na + AUDIO_FRAME);
                continue;
            }
            if let Some(w) = peer.rtc.writer(peer.audio_mid) {
                if let Some(pt) = pick_audio_pt(w.payload_params()) {
                    w.write(pt, now, rtp, packet)?;
                }
            }
            audio_rtp += pcm.len() as u64;
            report.audio_packets_sent += 1;
            next_audio = Some(na + AUDIO_FRAME);
            continue;
        }
        let until = if sending {
            timeout.min(nv).min(na)
        } else {
            timeout.min(end)
        };
        peer.wait(until)?;
    }
}

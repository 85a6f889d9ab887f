//! The client side of one PeerConnection: str0m over a real UDP socket, signalled over WHIP or
//! WHEP, with the returned video decoded and matched by its stamps.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::client::marker::Stamp;
use crate::client::{signal, ClientError};
use crate::media::codec::{H264Decoder, OpusDecoder};

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stamps carry milliseconds since this instant, so every client in the process (publishers
/// and viewers) measures latency on one clock.
pub fn process_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds on the stamp clock.
pub fn stamp_clock_ms(at: Instant) -> f64 {
    at.saturating_duration_since(process_epoch()).as_secs_f64() * 1000.0
}

/// A returned frame whose stamp was read.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedFrame {
    pub frame_id: u32,
    /// Stamped-to-decoded time, in ms.
    pub latency_ms: f64,
    /// When it was decoded, ms after the connection came up.
    pub at_ms: f64,
    /// When it was made, on the stamp clock (ms).
    pub capture_ms: f64,
}

/// What came back on one PeerConnection.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// From the start of signalling to the first returned, decoded, stamped frame.
    pub setup_ms: Option<f64>,
    pub frames: Vec<ReceivedFrame>,
    /// Returned frames that decoded but whose stamp did not read.
    pub frames_unstamped: u32,
    pub audio_packets: u32,
    /// When the first audio packet came back, on the stamp clock (ms).
    pub audio_first_ms: Option<f64>,
    pub audio_samples_16k: u64,
    /// Keyframe requests (PLI/FIR) the server sent us.
    pub keyframe_requests: u32,
    /// Stamp-clock times (ms) at which click onsets arrived in the returned audio.
    pub audio_onsets_ms: Vec<f64>,
    /// When the connection came up, on the stamp clock (ms).
    pub connected_ms: Option<f64>,
    /// Returned access units our decoder rejected (each asks the server for a keyframe).
    pub frames_undecodable: u32,
    /// Returned pictures by frame id, when the session keeps them.
    pub pictures: Vec<(u32, crate::media::frame::VideoFrame)>,
    /// Returned pictures without a stamp (an avatar the server made) and when each was decoded,
    /// on the stamp clock (ms), when the session keeps them.
    pub unstamped_pictures: Vec<(f64, crate::media::frame::VideoFrame)>,
}

impl Received {
    /// Frame ids that came back out of order (each counted once).
    pub fn out_of_order(&self) -> usize {
        self.frames
            .windows(2)
            .filter(|w| w[1].frame_id <= w[0].frame_id)
            .count()
    }

    /// Latency percentile `p` in 0..=100 (nearest rank), ms.
    pub fn latency_percentile(&self, p: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.frames.iter().map(|f| f.latency_ms).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }
}

pub(crate) struct Peer {
    pub rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
    pub audio_mid: Mid,
    /// None when the offer had no video (an audio-only publisher).
    pub video_mid: Option<Mid>,
    pub connected_at: Option<Instant>,
    started: Instant,
    h264_in: H264Decoder,
    opus_in: OpusDecoder,
    onsets: crate::client::synth::OnsetDetector,
    keyframe_requested: Option<Instant>,
    pub resource_url: String,
    pub received: Received,
    pub keep_pictures: bool,
}

impl Peer {
    /// Offers audio + video in `direction` to `endpoint` (a WHIP or WHEP URL) and applies the answer.
    /// Offers audio, and video when `video`, in `direction`, and connects.
    pub fn open(
        endpoint: &str,
        direction: Direction,
        video: bool,
        token: Option<&str>,
        bind_ip: IpAddr,
    ) -> Result<Peer, ClientError> {
        crate::rtc::init_crypto();
        let started = Instant::now();
        let socket = UdpSocket::bind((bind_ip, 0))?;
        let local = socket.local_addr()?;
        let mut rtc = RtcConfig::new()
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(true)
            .build(started);
        let candidate =
            Candidate::host(local, "udp").map_err(|e| ClientError::Sdp(e.to_string()))?;
        rtc.add_local_candidate(candidate);

        let mut change = rtc.sdp_api();
        let audio_mid = change.add_media(MediaKind::Audio, direction, None, None, None);
        let video_mid =
            video.then(|| change.add_media(MediaKind::Video, direction, None, None, None));
        let (offer, pending) = change
            .apply()
            .ok_or_else(|| ClientError::Sdp("no offer to make".into()))?;
        let answer = signal::post_offer(endpoint, &offer.to_sdp_string(), token)?;
        let sdp =
            SdpAnswer::from_sdp_string(&answer.sdp).map_err(|e| ClientError::Sdp(e.to_string()))?;
        rtc.sdp_api().accept_answer(pending, sdp)?;
        Ok(Peer {
            rtc,
            socket,
            local,
            buf: vec![0; 2048],
            audio_mid,
            video_mid,
            connected_at: None,
            started,
            h264_in: H264Decoder::new()?,
            opus_in: OpusDecoder::new()?,
            onsets: crate::client::synth::OnsetDetector::new(16_000, 100),
            keyframe_requested: None,
            resource_url: answer.resource_url,
            received: Received::default(),
            keep_pictures: false,
        })
    }

    /// Fails once the connection has not come up within the timeout.
    pub fn check_connect_timeout(&self) -> Result<(), ClientError> {
        if self.connected_at.is_none() && self.started.elapsed() > CONNECT_TIMEOUT {
            return Err(ClientError::ConnectTimeout(CONNECT_TIMEOUT));
        }
        Ok(())
    }

    /// Polls str0m until it wants time to pass; returns when.
    pub fn drain(&mut self) -> Result<Instant, ClientError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    self.socket.send_to(&t.contents, t.destination)?;
                }
                Output::Event(e) => self.event(e)?,
            }
        }
    }

    fn event(&mut self, event: Event) -> Result<(), ClientError> {
        match event {
            Event::Connected => {
                let now = Instant::now();
                self.connected_at = Some(now);
                self.received.connected_ms = Some(stamp_clock_ms(now));
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                return Err(ClientError::Sdp("ICE disconnected".into()));
            }
            Event::KeyframeRequest(_) => self.received.keyframe_requests += 1,
            Event::MediaData(d) if Some(d.mid) == self.video_mid => {
                let frame = match self.h264_in.decode(&d.data) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return Ok(()),
                    Err(_) => {
                        // Loss under load: carry on and ask for a keyframe, as a browser would.
                        self.received.frames_undecodable += 1;
                        let now = Instant::now();
                        let due = self
                            .keyframe_requested
                            .is_none_or(|t| now - t > Duration::from_millis(300));
                        let writer = self.video_mid.and_then(|m| self.rtc.writer(m));
                        if let (true, Some(mut w)) = (due, writer) {
                            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
                            self.keyframe_requested = Some(now);
                        }
                        return Ok(());
                    }
                };
                let now = Instant::now();
                match Stamp::read(&frame) {
                    Some(stamp) => {
                        if self.received.setup_ms.is_none() {
                            self.received.setup_ms =
                                Some((now - self.started).as_secs_f64() * 1000.0);
                        }
                        let at_ms = self
                            .connected_at
                            .map_or(0.0, |c| (now - c).as_secs_f64() * 1000.0);
                        self.received.frames.push(ReceivedFrame {
                            frame_id: stamp.frame_id,
                            latency_ms: stamp_clock_ms(now) - f64::from(stamp.capture_ms),
                            at_ms,
                            capture_ms: f64::from(stamp.capture_ms),
                        });
                        if self.keep_pictures {
                            self.received.pictures.push((stamp.frame_id, frame));
                        }
                    }
                    None => {
                        self.received.frames_unstamped += 1;
                        if self.keep_pictures {
                            self.received
                                .unstamped_pictures
                                .push((stamp_clock_ms(now), frame));
                        }
                    }
                }
            }
            Event::MediaData(d) if d.mid == self.audio_mid => {
                self.received.audio_packets += 1;
                // The packet's first sample plays at its arrival; later ones follow it.
                let at = stamp_clock_ms(d.network_time);
                self.received.audio_first_ms.get_or_insert(at);
                if let Ok(pcm) = self.opus_in.decode(&d.data) {
                    self.received.audio_samples_16k += pcm.len() as u64;
                    let onsets = self.onsets.feed(pcm);
                    self.received
                        .audio_onsets_ms
                        .extend(onsets.into_iter().map(|ms| at + ms));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Waits for a datagram until `until`, feeding str0m whatever happens.
    pub fn wait(&mut self, until: Instant) -> Result<(), ClientError> {
        let wait = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait))?;
        self.buf.resize(2048, 0);
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, source)) => {
                if let Ok(contents) = self.buf[..n].try_into() {
                    let input = Input::Receive(
                        Instant::now(),
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: self.local,
                            contents,
                        },
                    );
                    self.rtc.handle_input(input)?;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        self.rtc.handle_input(Input::Timeout(Instant::now()))?;
        Ok(())
    }

    /// Receives until `until`, sending nothing of our own.
    pub fn receive_until(&mut self, until: Instant) -> Result<(), ClientError> {
        loop {
            let timeout = self.drain()?;
            self.check_connect_timeout()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            self.wait(timeout.min(until))?;
        }
    }
}

//! One synthetic publisher: WHIP offer, str0m over a real UDP socket, stamped video at a fixed
//! frame rate and a 20 ms Opus tone, and the returned stream decoded and matched.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::client::marker::Stamp;
use crate::client::{signal, synth, ClientError};
use crate::media::codec::{H264Decoder, H264Encoder, OpusDecoder, OpusEncoder};
use crate::rtc::{pick_audio_pt, pick_video_pt};

const AUDIO_RATE: u32 = 48_000;
const AUDIO_FRAME: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub tone_hz: f64,
    pub video_bps: u32,
    /// Local address for the client's UDP socket.
    pub bind_ip: IpAddr,
    /// Leave without DELETE and without any goodbye, like a peer whose network died.
    pub vanish: bool,
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
            tone_hz: 440.0,
            video_bps: 600_000,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            vanish: false,
        }
    }
}

/// A returned frame whose stamp was read.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedFrame {
    pub frame_id: u32,
    /// Sent-to-decoded time on the client's clock, in ms.
    pub latency_ms: f64,
    /// When it was decoded, ms after the connection came up.
    pub at_ms: f64,
}

/// What one publisher saw.
#[derive(Clone, Debug, Default)]
pub struct PublishReport {
    pub resource_url: String,
    /// POST to the first returned, decoded frame.
    pub setup_ms: Option<f64>,
    pub frames_sent: u32,
    pub frames: Vec<ReceivedFrame>,
    /// Returned frames that decoded but whose stamp did not read.
    pub frames_unstamped: u32,
    pub audio_packets_sent: u32,
    pub audio_packets_received: u32,
    pub audio_samples_16k_received: u64,
}

impl PublishReport {
    /// Frame ids that came back out of order (each counted once).
    pub fn out_of_order(&self) -> usize {
        self.frames.windows(2).filter(|w| w[1].frame_id <= w[0].frame_id).count()
    }

    /// Sent frames that never came back.
    pub fn lost(&self) -> u32 {
        self.frames_sent.saturating_sub(self.frames.len() as u32)
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

struct Client {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    buf: Vec<u8>,
    audio_mid: Mid,
    video_mid: Mid,
    connected_at: Option<Instant>,
    epoch: Instant,
    h264_in: H264Decoder,
    opus_in: OpusDecoder,
    report: PublishReport,
}

/// Publishes for `options.duration` and reports what came back.
pub fn publish(options: &PublishOptions) -> Result<PublishReport, ClientError> {
    crate::rtc::init_crypto();
    let epoch = Instant::now();
    let socket = UdpSocket::bind((options.bind_ip, 0))?;
    let local = socket.local_addr()?;
    let mut rtc = RtcConfig::new().clear_codecs().enable_opus(true, false).enable_h264(true).build(epoch);
    let candidate = Candidate::host(local, "udp").map_err(|e| ClientError::Sdp(e.to_string()))?;
    rtc.add_local_candidate(candidate);

    let mut change = rtc.sdp_api();
    let audio_mid = change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let video_mid = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, pending) = change.apply().ok_or_else(|| ClientError::Sdp("no offer to make".into()))?;
    let url = format!("{}/whip", options.base_url.trim_end_matches('/'));
    let answer = signal::post_offer(&url, &offer.to_sdp_string(), options.token.as_deref())?;
    let sdp = SdpAnswer::from_sdp_string(&answer.sdp).map_err(|e| ClientError::Sdp(e.to_string()))?;
    rtc.sdp_api().accept_answer(pending, sdp)?;

    let mut client = Client {
        rtc,
        socket,
        local,
        buf: vec![0; 2048],
        audio_mid,
        video_mid,
        connected_at: None,
        epoch,
        h264_in: H264Decoder::new()?,
        opus_in: OpusDecoder::new()?,
        report: PublishReport { resource_url: answer.resource_url.clone(), ..Default::default() },
    };
    let result = client.run(options);
    if !options.vanish {
        // Best effort: the server also reaps silent peers.
        let _ = signal::delete(&answer.resource_url, options.token.as_deref());
    }
    result.map(|()| client.report)
}

impl Client {
    fn run(&mut self, options: &PublishOptions) -> Result<(), ClientError> {
        let mut h264_out = H264Encoder::new(options.video_bps)?;
        let mut opus_out = OpusEncoder::new(AUDIO_RATE)?;
        let mut tone = synth::Tone::new(options.tone_hz, AUDIO_RATE);
        let mut pcm = vec![0i16; (AUDIO_RATE / 50) as usize];
        let frame_interval = Duration::from_secs_f64(1.0 / f64::from(options.fps.max(1)));
        let mut next_video = None::<Instant>;
        let mut next_audio = None::<Instant>;
        let mut audio_rtp = 0u64;

        loop {
            let timeout = self.drain()?;
            let now = Instant::now();
            let Some(connected) = self.connected_at else {
                if now - self.epoch > CONNECT_TIMEOUT {
                    return Err(ClientError::ConnectTimeout(CONNECT_TIMEOUT));
                }
                self.wait(timeout.min(now + Duration::from_millis(50)))?;
                continue;
            };
            let sending = now - connected < options.duration;
            if !sending && now - connected >= options.duration + options.linger {
                return Ok(());
            }
            let nv = *next_video.get_or_insert(connected);
            let na = *next_audio.get_or_insert(connected);
            if sending && now >= nv {
                let id = self.report.frames_sent;
                let capture_ms = (now - self.epoch).as_millis() as u32;
                let picture = synth::picture(options.width, options.height, Stamp { frame_id: id, capture_ms });
                let au = h264_out.encode(&picture)?;
                let rtp = MediaTime::from_90khz(u64::from(id) * 90_000 / u64::from(options.fps.max(1)));
                if let Some(w) = self.rtc.writer(self.video_mid) {
                    if let Some(pt) = pick_video_pt(w.payload_params()) {
                        w.write(pt, now, rtp, au.data)?;
                    }
                }
                self.report.frames_sent += 1;
                next_video = Some(nv + frame_interval);
                continue;
            }
            if sending && now >= na {
                tone.fill(&mut pcm);
                let mut packet = Vec::new();
                opus_out.encode(&pcm, |_, p| packet = p.to_vec())?;
                let rtp = MediaTime::new(audio_rtp, str0m::media::Frequency::FORTY_EIGHT_KHZ);
                if let Some(w) = self.rtc.writer(self.audio_mid) {
                    if let Some(pt) = pick_audio_pt(w.payload_params()) {
                        w.write(pt, now, rtp, packet)?;
                    }
                }
                audio_rtp += pcm.len() as u64;
                self.report.audio_packets_sent += 1;
                next_audio = Some(na + AUDIO_FRAME);
                continue;
            }
            let mut until = timeout;
            if sending {
                until = until.min(nv).min(na);
            } else {
                until = until.min(connected + options.duration + options.linger);
            }
            self.wait(until)?;
        }
    }

    /// Polls str0m until it wants time to pass; returns when.
    fn drain(&mut self) -> Result<Instant, ClientError> {
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
            Event::Connected => self.connected_at = Some(Instant::now()),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                return Err(ClientError::Sdp("ICE disconnected".into()));
            }
            Event::MediaData(d) if d.mid == self.video_mid => {
                let Some(frame) = self.h264_in.decode(&d.data)? else { return Ok(()) };
                let now = Instant::now();
                match Stamp::read(&frame) {
                    Some(stamp) => {
                        let now_ms = (now - self.epoch).as_secs_f64() * 1000.0;
                        if self.report.setup_ms.is_none() {
                            self.report.setup_ms = Some(now_ms);
                        }
                        let at_ms = self.connected_at.map_or(0.0, |c| (now - c).as_secs_f64() * 1000.0);
                        self.report.frames.push(super::ReceivedFrame {
                            frame_id: stamp.frame_id,
                            latency_ms: now_ms - f64::from(stamp.capture_ms),
                            at_ms,
                        });
                    }
                    None => self.report.frames_unstamped += 1,
                }
            }
            Event::MediaData(d) if d.mid == self.audio_mid => {
                self.report.audio_packets_received += 1;
                if let Ok(pcm) = self.opus_in.decode(&d.data) {
                    self.report.audio_samples_16k_received += pcm.len() as u64;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Waits for a datagram until `until`, feeding str0m whatever happens.
    fn wait(&mut self, until: Instant) -> Result<(), ClientError> {
        let now = Instant::now();
        let wait = until.saturating_duration_since(now).max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait))?;
        self.buf.resize(2048, 0);
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, source)) => {
                if let Ok(contents) = self.buf[..n].try_into() {
                    let input = Input::Receive(
                        Instant::now(),
                        Receive { proto: Protocol::Udp, source, destination: self.local, contents },
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
}

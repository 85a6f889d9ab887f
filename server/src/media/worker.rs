//! One media worker thread per published session: decode, stage, re-encode.
//!
//! The driver hands it depacketized media through a bounded queue and never waits on it: when the
//! queue is full the media is dropped and counted. The worker never touches the network; what it
//! produces goes back to the driver as `WorkerOutput` messages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::media::MediaTime;
use tokio::sync::mpsc::UnboundedSender;

use crate::media::audio::AudioRing;
use crate::media::codec::{
    H264Decoder, H264Encoder, OpusDecoder, OpusEncoder, OPUS_RTP_RATE, SAMPLE_RATE_16K,
};
use crate::media::frame::VideoFrame;
use crate::media::hold::AvHold;
use crate::media::stage::{Completion, Rendered, Stage, StageInput, StageOutput};
use crate::metrics::{KindLabel, Metrics};
use crate::registry::SessionId;

/// Depth of the worker's queue: about one second of audio and video together.
const QUEUE_DEPTH: usize = 100;
/// Audio kept for the stage to read around frames.
const AUDIO_RING_MS: u32 = 10_000;
/// Bitrate bounds for the returned video.
const BITRATE_MIN_BPS: u32 = 150_000;
/// Re-creating the encoder costs a keyframe, so only follow the estimate when it moved this much
/// and not more often than `BITRATE_HOLD`.
const BITRATE_STEP: f64 = 0.25;
const BITRATE_HOLD: Duration = Duration::from_secs(2);

/// What the driver sends a worker.
pub enum WorkerInput {
    Audio {
        rtp_time: MediaTime,
        arrival: Instant,
        data: Arc<[u8]>,
    },
    Video {
        rtp_time: MediaTime,
        arrival: Instant,
        data: Arc<[u8]>,
    },
    /// A receiver asked for a keyframe (PLI/FIR, or a new viewer).
    Keyframe,
    /// The bandwidth estimate of the session's receivers, bits per second.
    Bitrate(u64),
    /// An asynchronous stage's result for the frame it answered `Pending(ticket)`.
    Rendered { ticket: u64, result: Rendered },
    /// The session is over (sent as the handle drops; the flag covers a full queue).
    Close,
}

/// What a worker sends back to the driver.
pub enum WorkerOutput {
    Audio {
        session: SessionId,
        rtp_time: MediaTime,
        wallclock: Instant,
        data: Arc<[u8]>,
    },
    Video {
        session: SessionId,
        rtp_time: MediaTime,
        wallclock: Instant,
        data: Arc<[u8]>,
    },
    /// The decoder cannot go on without a keyframe from the publisher.
    NeedKeyframe { session: SessionId },
}

/// Settings for one worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub frame_budget: Duration,
    pub bitrate_start_bps: u32,
    pub bitrate_max_bps: u32,
}

/// The driver's end of a worker: dropping it stops the thread.
pub struct WorkerHandle {
    tx: SyncSender<WorkerInput>,
    metrics: Arc<Metrics>,
    /// Set when the handle drops: the stage holds a sender to the same queue for its results,
    /// so the queue alone never disconnects.
    closed: Arc<AtomicBool>,
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.tx.try_send(WorkerInput::Close);
    }
}

impl WorkerHandle {
    /// Queues media without waiting; full queue = dropped and counted.
    pub fn send(&self, input: WorkerInput) {
        let kind = match &input {
            WorkerInput::Audio { .. } => "audio",
            WorkerInput::Video { .. } => "video",
            _ => "control",
        };
        match self.tx.try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics
                    .media_dropped
                    .get_or_create(&KindLabel { kind })
                    .inc();
            }
            // The worker died (it logged why); the driver tears the session down on its own.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Starts a worker thread for `session`.
pub fn spawn(
    session: SessionId,
    config: WorkerConfig,
    stage: crate::rtc::driver::StageFactory,
    metrics: Arc<Metrics>,
    out: UnboundedSender<WorkerOutput>,
) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_DEPTH);
    let worker_metrics = metrics.clone();
    let closed = Arc::new(AtomicBool::new(false));
    let (done, worker_closed) = (Completion { tx: tx.clone() }, closed.clone());
    std::thread::Builder::new()
        .name(format!("media-{session}"))
        .spawn(move || {
            worker_metrics.media_workers.inc();
            let mut stage = stage();
            stage.attach(done);
            if let Err(e) = Worker::new(session.clone(), config, stage, worker_metrics.clone(), out)
                .and_then(|mut w| w.run(rx, &worker_closed))
            {
                tracing::error!(%session, "media worker stopped: {e}");
            }
            worker_metrics.media_workers.dec();
        })?;
    Ok(WorkerHandle {
        tx,
        metrics,
        closed,
    })
}

/// Maps one stream's RTP time onto the session's millisecond clock.
///
/// Each stream is anchored at the arrival of its first packet, so audio and video line up to
/// within their first packets' network jitter.
#[derive(Default)]
struct StreamClock {
    anchor: Option<(u64, f64)>,
}

impl StreamClock {
    fn ms(&mut self, epoch: Instant, rtp_time: MediaTime, arrival: Instant) -> f64 {
        let (rtp0, ms0) = *self.anchor.get_or_insert_with(|| {
            let ms = arrival.saturating_duration_since(epoch).as_secs_f64() * 1000.0;
            (rtp_time.numer(), ms)
        });
        let ticks = rtp_time.numer() as i64 - rtp0 as i64;
        ms0 + ticks as f64 * 1000.0 / rtp_time.denom() as f64
    }

    /// Maps `rtp_time` to `at_ms` from now on (after a timestamp jump).
    fn reanchor(&mut self, rtp_time: MediaTime, at_ms: f64) {
        self.anchor = Some((rtp_time.numer(), at_ms));
    }
}

/// One video frame at 25 fps, ms.
const FRAME_MS: f64 = 40.0;

/// Video this far from the audio clock has jumped (a sender restart, an RTP discontinuity):
/// it is re-anchored to the audio, the session's one media clock.
const CLOCK_JUMP_MS: f64 = 2_000.0;

/// Where a frame stamped `frame_ms` belongs when the audio has arrived up to `audio_end_ms`:
/// `None` while the two clocks agree, else the audio's time.
fn video_clock_jump(frame_ms: f64, audio_end_ms: f64) -> Option<f64> {
    ((frame_ms - audio_end_ms).abs() > CLOCK_JUMP_MS).then_some(audio_end_ms)
}

struct Worker {
    session: SessionId,
    config: WorkerConfig,
    stage: Box<dyn Stage>,
    metrics: Arc<Metrics>,
    out: UnboundedSender<WorkerOutput>,
    epoch: Instant,
    audio_clock: StreamClock,
    video_clock: StreamClock,
    audio: AudioRing,
    audio_window: Vec<i16>,
    opus_in: OpusDecoder,
    opus_out: OpusEncoder,
    h264_in: H264Decoder,
    h264_out: H264Encoder,
    bitrate_changed: Option<Instant>,
    /// For a stage that hears ahead: frames wait for their audio, audio waits as long.
    hold: Option<AvHold<HeldFrame, WorkerOutput>>,
    /// Frames an asynchronous stage is working on, in order, each with its output time.
    pending: VecDeque<PendingFrame>,
    /// A stage that makes the video: the session time of the next frame to make, and the
    /// time its video clock starts at.
    next_made: Option<(f64, f64)>,
}

/// A frame whose stage result is due back by `due`.
struct PendingFrame {
    ticket: u64,
    held: HeldFrame,
    due: Instant,
    result: Option<Rendered>,
}

/// How often a worker waiting on nothing checks that its session still exists.
const CLOSED_POLL: Duration = Duration::from_millis(250);

/// A decoded frame waiting for its audio.
struct HeldFrame {
    frame: VideoFrame,
    rtp_time: MediaTime,
    arrival: Instant,
}

impl Worker {
    fn new(
        session: SessionId,
        config: WorkerConfig,
        stage: Box<dyn Stage>,
        metrics: Arc<Metrics>,
        out: UnboundedSender<WorkerOutput>,
    ) -> Result<Self, crate::media::codec::CodecError> {
        let frame_budget = config.frame_budget;
        Ok(Worker {
            h264_out: H264Encoder::new(config.bitrate_start_bps)?,
            h264_in: H264Decoder::new()?,
            opus_in: OpusDecoder::new()?,
            opus_out: OpusEncoder::new(SAMPLE_RATE_16K)?,
            session,
            config,
            metrics,
            out,
            epoch: Instant::now(),
            audio_clock: StreamClock::default(),
            video_clock: StreamClock::default(),
            audio: AudioRing::new(AUDIO_RING_MS),
            audio_window: Vec::new(),
            bitrate_changed: None,
            hold: (stage.audio_after_ms() > 0.0 || stage.asynchronous()).then(|| {
                let processing = if stage.asynchronous() {
                    frame_budget.as_secs_f64() * 1000.0
                } else {
                    0.0
                };
                AvHold::new(stage.audio_after_ms(), processing)
            }),
            pending: VecDeque::new(),
            next_made: None,
            stage,
        })
    }

    fn run(
        &mut self,
        rx: Receiver<WorkerInput>,
        closed: &AtomicBool,
    ) -> Result<(), crate::media::codec::CodecError> {
        loop {
            // Sleep until new media, the hold's next release or a pending frame's output time.
            let now = Instant::now();
            let deadline = [
                self.hold.as_ref().and_then(|h| h.next_deadline()),
                self.pending.front().map(|p| p.due),
                Some(now + CLOSED_POLL),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + CLOSED_POLL);
            let input = rx.recv_timeout(deadline.saturating_duration_since(now));
            // The driver dropped the handle: the session is over.
            if closed.load(Ordering::Acquire) {
                return Ok(());
            }
            let input = match input {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout) => {
                    self.release(Instant::now())?;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            match input {
                WorkerInput::Audio {
                    rtp_time,
                    arrival,
                    data,
                } => self.audio(rtp_time, arrival, &data),
                WorkerInput::Video {
                    rtp_time,
                    arrival,
                    data,
                } => self.video(rtp_time, arrival, &data)?,
                WorkerInput::Keyframe => self.h264_out.request_keyframe(),
                WorkerInput::Bitrate(bps) => self.bitrate(bps)?,
                WorkerInput::Rendered { ticket, result } => {
                    if let Some(p) = self.pending.iter_mut().find(|p| p.ticket == ticket) {
                        p.result = Some(result);
                    }
                }
                WorkerInput::Close => return Ok(()),
            }
            self.release(Instant::now())?;
        }
    }

    /// Lets out what the hold no longer needs to keep: audio whose delay is over, frames whose
    /// audio has arrived (or stopped coming).
    fn release(&mut self, now: Instant) -> Result<(), crate::media::codec::CodecError> {
        self.send_pending(now)?;
        let Some(hold) = self.hold.as_mut() else {
            return Ok(());
        };
        while let Some(packet) = hold.pop_audio(now) {
            let _ = self.out.send(packet);
        }
        while let Some(r) = self
            .hold
            .as_mut()
            .and_then(|h| h.pop_frame(self.audio.end_ms(), now))
        {
            let HeldFrame {
                frame,
                rtp_time,
                arrival,
            } = r.frame;
            self.process(frame, rtp_time, arrival, r.frame_ms, r.audio_complete)?;
        }
        self.send_pending(now)
    }

    /// Sends the pending frames whose output time has come, in order: rendered, or as they came
    /// in when the result is late or missing.
    fn send_pending(&mut self, now: Instant) -> Result<(), crate::media::codec::CodecError> {
        while self.pending.front().is_some_and(|p| p.due <= now) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let HeldFrame {
                frame,
                rtp_time,
                arrival,
            } = p.held;
            let picture = match p.result {
                Some(Rendered::Unchanged) => frame,
                Some(Rendered::Failed(why)) => {
                    tracing::debug!(session = %self.session, "frame not rendered: {why}");
                    self.metrics.frames_failed.inc();
                    frame
                }
                Some(Rendered::Late) | None => {
                    tracing::debug!(
                        session = %self.session,
                        ticket = p.ticket,
                        given_up = p.result.is_some(),
                        "frame late: not rendered by its output time"
                    );
                    self.metrics.frames_late.inc();
                    frame
                }
                Some(face) => match self.stage.finish(p.ticket, face, &frame) {
                    StageOutput::Frame(out) => out,
                    _ => frame,
                },
            };
            self.encode_and_send(&picture, rtp_time, arrival)?;
        }
        Ok(())
    }

    fn audio(&mut self, rtp_time: MediaTime, arrival: Instant, packet: &[u8]) {
        let at_ms = self.audio_clock.ms(self.epoch, rtp_time, arrival);
        let pcm = match self.opus_in.decode(packet) {
            Ok(pcm) => pcm,
            Err(e) => {
                tracing::debug!(session = %self.session, "dropping an Opus packet: {e}");
                return;
            }
        };
        self.audio.push(at_ms, pcm);
        self.stage.audio(at_ms, pcm);
        let end_ms = at_ms + pcm.len() as f64 / 16.0;
        // Re-encode packet for packet so every output packet keeps its input's RTP time.
        let (session, out, hold) = (&self.session, &self.out, &mut self.hold);
        let result = self.opus_out.encode(pcm, |offset_16k, packet| {
            let ticks = offset_16k as u64 * u64::from(OPUS_RTP_RATE / SAMPLE_RATE_16K);
            let packet = WorkerOutput::Audio {
                session: session.clone(),
                rtp_time: MediaTime::new(rtp_time.numer() + ticks, rtp_time.frequency()),
                wallclock: arrival,
                data: packet.into(),
            };
            match hold.as_mut() {
                // Held from its arrival, not from when this thread got to it: a backlog in the
                // queue must not shift audio against video.
                Some(h) => h.push_audio(packet, arrival),
                None => {
                    let _ = out.send(packet);
                }
            }
        });
        if let Err(e) = result {
            tracing::debug!(session = %self.session, "dropping audio: {e}");
        }
        if self.stage.makes_video() {
            self.make_frames(at_ms, end_ms, arrival);
        }
    }

    /// Avatar mode: a frame for every 40 ms of audio that has arrived (up to `audio_end_ms`),
    /// into the hold like a received frame, so it waits for its audio and leaves with it.
    fn make_frames(&mut self, at_ms: f64, audio_end_ms: f64, arrival: Instant) {
        let (mut next, origin) = *self.next_made.get_or_insert((at_ms, at_ms));
        // A jump of the audio clock (a new stream): frames follow from there.
        if (audio_end_ms - next).abs() > CLOCK_JUMP_MS {
            next = at_ms;
        }
        while next + FRAME_MS <= audio_end_ms + 1e-6 {
            if let Some(frame) = self.stage.synthesize(next) {
                let ticks = ((next - origin).max(0.0) * 90.0).round() as u64;
                if let Some(hold) = self.hold.as_mut() {
                    hold.push_frame(
                        HeldFrame {
                            frame,
                            rtp_time: MediaTime::from_90khz(ticks),
                            arrival,
                        },
                        next,
                        Instant::now(),
                    );
                }
                self.metrics.frames_in.inc();
            }
            next += FRAME_MS;
        }
        self.next_made = Some((next, origin));
    }

    fn video(
        &mut self,
        rtp_time: MediaTime,
        arrival: Instant,
        access_unit: &[u8],
    ) -> Result<(), crate::media::codec::CodecError> {
        if self.stage.makes_video() {
            // The stage makes the picture; what the publisher sends is not shown.
            return Ok(());
        }
        let t0 = Instant::now();
        let frame = match self.h264_in.decode(access_unit) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::debug!(session = %self.session, "undecodable video, asking for a keyframe: {e}");
                self.metrics.frames_undecodable.inc();
                let _ = self.out.send(WorkerOutput::NeedKeyframe {
                    session: self.session.clone(),
                });
                return Ok(());
            }
        };
        let t1 = Instant::now();
        self.metrics.observe_stage("decode", t1 - t0);
        self.metrics.frames_in.inc();

        let mut frame_ms = self.video_clock.ms(self.epoch, rtp_time, arrival);
        if let Some(hold) = self.hold.as_mut() {
            // Frames wait for audio by media time, so the clocks must agree.
            if let Some(at) = (!self.audio.is_empty())
                .then(|| video_clock_jump(frame_ms, self.audio.end_ms()))
                .flatten()
            {
                tracing::warn!(
                    session = %self.session,
                    jump_ms = frame_ms - at,
                    "video timestamps left the audio clock; video re-anchored to the audio"
                );
                self.video_clock.reanchor(rtp_time, at);
                frame_ms = at;
            }
            hold.push_frame(
                HeldFrame {
                    frame,
                    rtp_time,
                    arrival,
                },
                frame_ms,
                t1,
            );
            return Ok(());
        }
        self.process(frame, rtp_time, arrival, frame_ms, true)
    }

    /// Runs the stage on a frame and sends the encoded result. `audio_complete` is false for a
    /// frame released without all the audio it waited for.
    fn process(
        &mut self,
        frame: VideoFrame,
        rtp_time: MediaTime,
        arrival: Instant,
        frame_ms: f64,
        audio_complete: bool,
    ) -> Result<(), crate::media::codec::CodecError> {
        let t1 = Instant::now();
        let audio_start_ms = frame_ms - self.stage.audio_before_ms();
        self.audio.read(
            audio_start_ms,
            self.stage.audio_before_ms() + self.stage.audio_after_ms(),
            &mut self.audio_window,
        );
        // An asynchronous stage's frame leaves a fixed time after it arrived (its lookahead plus
        // the budget), as its audio does, however long the worker took to get to it.
        let due = if self.stage.asynchronous() {
            arrival
                + Duration::from_secs_f64(self.stage.audio_after_ms().max(0.0) / 1000.0)
                + self.config.frame_budget
        } else {
            t1 + self.config.frame_budget
        };
        // A frame that waited for audio that never came in full (the sender stopped or
        // paused) and whose output time has already come goes out as it is: it could not be
        // rendered in time (counted short of audio, not late). With time left, the stage
        // decides (and counts it when it has no audio for it).
        let processed = if audio_complete || due > t1 {
            self.stage.process(StageInput {
                frame: &frame,
                frame_ms,
                audio_16k: &self.audio_window,
                audio_start_ms,
                deadline: due,
            })
        } else {
            self.metrics.frames_audio_short.inc();
            StageOutput::Unchanged
        };
        let t2 = Instant::now();
        self.metrics.observe_stage("process", t2 - t1);
        let picture = match processed {
            StageOutput::Frame(out) if t2 - t1 <= self.config.frame_budget => out,
            StageOutput::Frame(_) => {
                self.metrics.frames_late.inc();
                frame
            }
            StageOutput::Unchanged if !self.stage.asynchronous() => frame,
            // An asynchronous stage's frames all wait for their output time, so the delay stays
            // constant: the ones it passes through are already decided, the others come back.
            out @ (StageOutput::Unchanged | StageOutput::Pending(_)) => {
                let (ticket, result) = match out {
                    StageOutput::Pending(ticket) => (ticket, None),
                    _ => (u64::MAX, Some(Rendered::Unchanged)),
                };
                self.pending.push_back(PendingFrame {
                    ticket,
                    held: HeldFrame {
                        frame,
                        rtp_time,
                        arrival,
                    },
                    due,
                    result,
                });
                return Ok(());
            }
        };
        self.encode_and_send(&picture, rtp_time, arrival)
    }

    fn encode_and_send(
        &mut self,
        picture: &VideoFrame,
        rtp_time: MediaTime,
        arrival: Instant,
    ) -> Result<(), crate::media::codec::CodecError> {
        let t2 = Instant::now();
        let encoded = self.h264_out.encode(picture)?;
        self.metrics.observe_stage("encode", t2.elapsed());
        self.metrics.frames_out.inc();
        let _ = self.out.send(WorkerOutput::Video {
            session: self.session.clone(),
            rtp_time,
            wallclock: arrival,
            data: encoded.data.into(),
        });
        Ok(())
    }

    fn bitrate(&mut self, estimate_bps: u64) -> Result<(), crate::media::codec::CodecError> {
        // Leave headroom for audio, RTP overhead and the estimate's own error.
        let target = ((estimate_bps as f64 * 0.85) as u64).clamp(
            u64::from(BITRATE_MIN_BPS),
            u64::from(self.config.bitrate_max_bps),
        ) as u32;
        let current = self.h264_out.bitrate_bps() as f64;
        let moved = (target as f64 - current).abs() / current;
        let held = self
            .bitrate_changed
            .is_none_or(|t| t.elapsed() >= BITRATE_HOLD);
        if moved >= BITRATE_STEP && held {
            tracing::debug!(session = %self.session, target, "video bitrate follows the estimate");
            self.h264_out.set_bitrate(target)?;
            self.bitrate_changed = Some(Instant::now());
            self.metrics.bitrate_changes.inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_video_timestamp_jump_is_re_anchored_to_the_audio_clock() {
        let epoch = Instant::now();
        let mut clock = StreamClock::default();
        let t = |ticks: u64| MediaTime::new(ticks, str0m::media::Frequency::NINETY_KHZ);
        assert_eq!(clock.ms(epoch, t(90_000), epoch), 0.0);
        assert_eq!(clock.ms(epoch, t(93_600), epoch), 40.0);
        // Jitter between the streams is not a jump; 10 s is.
        assert_eq!(video_clock_jump(40.0, 900.0), None);
        let jumped = clock.ms(epoch, t(93_600 + 900_000), epoch);
        assert_eq!(jumped, 10_040.0);
        let at = video_clock_jump(jumped, 80.0).expect("a jump");
        clock.reanchor(t(93_600 + 900_000), at);
        // From now on the video follows on from the audio's time.
        assert_eq!(clock.ms(epoch, t(93_600 + 900_000 + 3_600), epoch), 120.0);
    }
}

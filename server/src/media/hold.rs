//! Exact A/V timing around a stage that hears ahead: a frame waits until the audio its prompt
//! needs (up to its media time + the stage's lookahead) has arrived, and audio is held for the
//! same lookahead, so a frame and the audio of its own media time leave the worker together and
//! the delay stays constant for the session's life. Audio that stops (a video-only stretch)
//! releases frames after `lookahead + MAX_EXTRA_WAIT`, counted as short of audio.
//!
//! Sans-IO: time comes in as `Instant`s; the worker drives it and sleeps until `next_deadline`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How much longer than its lookahead a frame waits for audio that is not coming.
const MAX_EXTRA_WAIT: Duration = Duration::from_millis(100);

/// A frame let go, and whether its audio had all arrived.
pub struct Released<F> {
    pub frame: F,
    pub frame_ms: f64,
    pub audio_complete: bool,
}

/// The hold of one session.
pub struct AvHold<F, A> {
    lookahead_ms: f64,
    lookahead: Duration,
    /// Audio's delay: the lookahead plus the processing budget of an asynchronous stage.
    audio_delay: Duration,
    frames: VecDeque<(F, f64, Instant)>,
    audio: VecDeque<(A, Instant)>,
}

impl<F, A> AvHold<F, A> {
    /// Frames wait for `lookahead_ms` of audio past them; audio is held that long plus
    /// `processing_ms`, the time a frame may spend in the stage once released.
    pub fn new(lookahead_ms: f64, processing_ms: f64) -> Self {
        let lookahead_ms = lookahead_ms.max(0.0);
        AvHold {
            lookahead_ms,
            lookahead: Duration::from_secs_f64(lookahead_ms / 1000.0),
            audio_delay: Duration::from_secs_f64((lookahead_ms + processing_ms.max(0.0)) / 1000.0),
            frames: VecDeque::new(),
            audio: VecDeque::new(),
        }
    }

    /// The constant delay both streams get, ms.
    pub fn delay_ms(&self) -> f64 {
        self.audio_delay.as_secs_f64() * 1000.0
    }

    pub fn push_frame(&mut self, frame: F, frame_ms: f64, now: Instant) {
        self.frames.push_back((frame, frame_ms, now));
    }

    pub fn push_audio(&mut self, packet: A, now: Instant) {
        self.audio.push_back((packet, now + self.audio_delay));
    }

    /// The oldest frame whose audio (up to `audio_end_ms`, media time) has arrived, or that has
    /// waited too long. Frames leave in order.
    pub fn pop_frame(&mut self, audio_end_ms: f64, now: Instant) -> Option<Released<F>> {
        let (_, frame_ms, arrived) = self.frames.front()?;
        let complete = audio_end_ms >= frame_ms + self.lookahead_ms;
        let overdue = now >= *arrived + self.lookahead + MAX_EXTRA_WAIT;
        if !(complete || overdue) {
            return None;
        }
        let (frame, frame_ms, _) = self.frames.pop_front()?;
        Some(Released {
            frame,
            frame_ms,
            audio_complete: complete,
        })
    }

    /// The oldest audio packet whose hold is over.
    pub fn pop_audio(&mut self, now: Instant) -> Option<A> {
        match self.audio.front() {
            Some((_, at)) if *at <= now => self.audio.pop_front().map(|(a, _)| a),
            _ => None,
        }
    }

    /// When something will be due without new input: the next audio release or frame timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let audio = self.audio.front().map(|(_, at)| *at);
        let frame = self
            .frames
            .front()
            .map(|(_, _, arrived)| *arrived + self.lookahead + MAX_EXTRA_WAIT);
        match (audio, frame) {
            (Some(a), Some(f)) => Some(a.min(f)),
            (a, f) => a.or(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, v: u64) -> Instant {
        t0 + Duration::from_millis(v)
    }

    #[test]
    fn a_frame_and_its_audio_leave_together_after_the_lookahead() {
        let t0 = Instant::now();
        let mut h: AvHold<u32, u32> = AvHold::new(120.0, 0.0);
        // Audio packets of 20 ms arrive on time; frame 0 (media 0 ms) arrives at t0 + 5 ms.
        h.push_frame(0, 0.0, ms(t0, 5));
        let mut released_frame = None;
        let mut audio_out = Vec::new();
        for k in 0..10u64 {
            let now = ms(t0, 20 * k);
            h.push_audio(k as u32, now);
            let end_ms = 20.0 * (k + 1) as f64;
            while let Some(a) = h.pop_audio(now) {
                audio_out.push((a, 20 * k));
            }
            if let Some(r) = h.pop_frame(end_ms, now) {
                assert!(r.audio_complete);
                released_frame = Some(20 * k);
            }
        }
        // Audio up to 120 ms is in after the packet of t0+100 ms: the frame leaves then, and the
        // audio of media time 0 (arrived at t0) leaves 120 ms after arriving, ~the same moment.
        assert_eq!(released_frame, Some(100));
        assert_eq!(audio_out.first(), Some(&(0, 120)));
    }

    #[test]
    fn audio_also_waits_out_the_processing_budget_frames_do_not() {
        let t0 = Instant::now();
        let mut h: AvHold<u32, u32> = AvHold::new(120.0, 80.0);
        assert_eq!(h.delay_ms(), 200.0);
        h.push_frame(0, 0.0, t0);
        h.push_audio(0, t0);
        // The frame goes to the stage as soon as its audio is in; the stage has 80 ms more.
        assert!(h.pop_frame(120.0, ms(t0, 100)).is_some());
        assert!(h.pop_audio(ms(t0, 199)).is_none());
        assert_eq!(h.pop_audio(ms(t0, 200)), Some(0));
    }

    #[test]
    fn frames_without_audio_leave_late_and_say_so() {
        let t0 = Instant::now();
        let mut h: AvHold<u32, u32> = AvHold::new(120.0, 0.0);
        h.push_frame(7, 0.0, t0);
        assert!(h.pop_frame(0.0, ms(t0, 219)).is_none());
        assert_eq!(h.next_deadline(), Some(ms(t0, 220)));
        let r = h.pop_frame(0.0, ms(t0, 220)).expect("overdue");
        assert!(!r.audio_complete && r.frame == 7);
        assert_eq!(h.next_deadline(), None);
    }

    #[test]
    fn no_lookahead_means_no_delay() {
        let t0 = Instant::now();
        let mut h: AvHold<u32, u32> = AvHold::new(0.0, 0.0);
        h.push_audio(1, t0);
        assert_eq!(h.pop_audio(t0), Some(1));
        h.push_frame(2, 40.0, t0);
        assert!(h.pop_frame(40.0, t0).is_some());
    }
}

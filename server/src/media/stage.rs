//! The pipeline stage: where a frame is transformed between decode and encode.
//!
//! The lip-sync engine plugs in here; `Identity` passes frames through. A stage runs on the
//! session's media worker and must never block on the network.

use crate::media::frame::VideoFrame;

/// What a stage sees for one frame.
pub struct StageInput<'a> {
    pub frame: &'a VideoFrame,
    /// Media time of the frame, in ms on the session clock shared with the audio.
    pub frame_ms: f64,
    /// 16 kHz mono PCM around the frame: `[audio_start_ms, audio_start_ms + len / 16)`.
    pub audio_16k: &'a [i16],
    pub audio_start_ms: f64,
}

/// What a stage returns for one frame.
pub enum StageOutput {
    /// Send the input frame as it is (no copy).
    Unchanged,
    Frame(VideoFrame),
}

/// A frame transformer.
pub trait Stage: Send {
    /// Name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Audio the stage wants before the frame's time, in ms.
    fn audio_before_ms(&self) -> f64;
    /// Audio the stage wants after the frame's time, in ms.
    fn audio_after_ms(&self) -> f64;
    fn process(&mut self, input: StageInput<'_>) -> StageOutput;
}

/// Pass-through: the transport path without any model.
pub struct Identity;

impl Stage for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn audio_before_ms(&self) -> f64 {
        0.0
    }

    fn audio_after_ms(&self) -> f64 {
        0.0
    }

    fn process(&mut self, _input: StageInput<'_>) -> StageOutput {
        StageOutput::Unchanged
    }
}

/// A test stage: holds each frame for a fixed time and returns a copy, like a model that takes
/// that long. Lets tests see an injected delay in measured latency and in late-frame counts.
pub struct Delay {
    pub ms: u64,
}

impl Stage for Delay {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn audio_before_ms(&self) -> f64 {
        0.0
    }

    fn audio_after_ms(&self) -> f64 {
        0.0
    }

    fn process(&mut self, input: StageInput<'_>) -> StageOutput {
        std::thread::sleep(std::time::Duration::from_millis(self.ms));
        StageOutput::Frame(input.frame.clone())
    }
}

/// A test stage that hears `ms` of audio past each frame, like the lip-sync model's lookahead,
/// and returns a copy: the worker must hold video and audio alike for it.
pub struct Lookahead {
    pub ms: f64,
}

impl Stage for Lookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }

    fn audio_before_ms(&self) -> f64 {
        0.0
    }

    fn audio_after_ms(&self) -> f64 {
        self.ms
    }

    fn process(&mut self, input: StageInput<'_>) -> StageOutput {
        StageOutput::Frame(input.frame.clone())
    }
}

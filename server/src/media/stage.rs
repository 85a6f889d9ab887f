//! The pipeline stage: where a frame is transformed between decode and encode.
//!
//! The lip-sync engine plugs in here; `Identity` passes frames through. A stage runs on the
//! session's media worker and must never block on the network. A stage may answer a frame
//! later (`StageOutput::Pending`): the GPU renders frames of many sessions in one batch, and the
//! result comes back through the worker's queue (`Completion`) while the worker goes on
//! decoding; the worker sends the frame out at its fixed output time either way.

use std::sync::mpsc::SyncSender;
use std::time::Instant;

use lipstream_engines::Tensor;

use crate::media::frame::VideoFrame;
use crate::media::worker::WorkerInput;

/// What a stage sees for one frame.
pub struct StageInput<'a> {
    pub frame: &'a VideoFrame,
    /// Media time of the frame, in ms on the session clock shared with the audio.
    pub frame_ms: f64,
    /// 16 kHz mono PCM around the frame: `[audio_start_ms, audio_start_ms + len / 16)`.
    pub audio_16k: &'a [i16],
    pub audio_start_ms: f64,
    /// When the frame goes out: a pending result must be back by then.
    pub deadline: Instant,
}

/// What a stage returns for one frame.
pub enum StageOutput {
    /// Send the input frame as it is (no copy).
    Unchanged,
    Frame(VideoFrame),
    /// The result comes later through the `Completion` with this ticket.
    Pending(u64),
}

/// A rendered face, or why there is none.
pub enum Rendered {
    /// [3, 256, 256] RGB in [0, 1].
    Face(Tensor),
    /// The frame's face region with the face already blended in (on the GPU), packed like
    /// `Region::copy_out`: written back into the frame as it is.
    Blended(lipstream_engines::image::Region, Vec<u8>),
    /// The renderer gave the frame up: it could not make its deadline.
    Late,
    Failed(String),
    /// Nothing to render (no face, no audio yet): the frame goes out as it came in.
    Unchanged,
}

/// Where an asynchronous stage's results go: the session worker's own queue.
#[derive(Clone)]
pub struct Completion {
    pub(crate) tx: SyncSender<WorkerInput>,
}

impl Completion {
    /// Never waits: a worker too far behind to take the result sends the frame unprocessed.
    pub fn done(&self, ticket: u64, result: Rendered) {
        let _ = self.tx.try_send(WorkerInput::Rendered { ticket, result });
    }
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
    /// Whether `process` may answer `Pending`: then the worker holds audio for the frame budget
    /// too, so both streams keep one constant delay.
    fn asynchronous(&self) -> bool {
        false
    }
    /// Hands the stage the channel its pending results come back on (once, at start).
    fn attach(&mut self, _done: Completion) {}
    /// Each decoded audio packet, at its time on the session clock (ms), 16 kHz mono.
    fn audio(&mut self, _at_ms: f64, _pcm: &[i16]) {}
    /// Whether the stage makes the video itself (avatar mode): the worker then drops incoming
    /// video and asks `synthesize` for a frame every 40 ms of the session's audio.
    fn makes_video(&self) -> bool {
        false
    }
    /// The picture for session time `frame_ms` (a stage that makes the video).
    fn synthesize(&mut self, _frame_ms: f64) -> Option<VideoFrame> {
        None
    }
    /// Turns a pending result into the frame to send (`frame` is the input frame).
    fn finish(&mut self, _ticket: u64, _result: Rendered, _frame: &VideoFrame) -> StageOutput {
        StageOutput::Unchanged
    }
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

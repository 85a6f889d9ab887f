//! Lip-sync in the live stream: the renderer (one per executor, batching frames across
//! sessions) and the per-session stages that feed it — camera mode (the publisher's own face,
//! re-rendered around the mouth) and avatar mode (a prepared face speaking the published audio).
//!
//! Per session, on its media worker: audio goes into a `FeatureStream` (whisper-tiny windows,
//! one encode per hop of frames); each frame, once the audio its prompt hears has arrived, is
//! cropped around the tracked face and submitted; the rendered face is blended back under the
//! lower-face mask when it returns. On the CUDA executor the crop and the blend run on the GPU
//! over the face's region of the frame, which is all that goes to the renderer and comes back.
//! Timing is the worker's: a frame goes out a fixed budget after its audio arrived, rendered or
//! not.

pub mod avatar;
pub mod camera;
mod prep;
pub mod renderer;
pub mod slots;

pub use avatar::{AvatarAssets, AvatarStage};
pub use camera::{CameraStage, CameraStageConfig};
pub use renderer::{ModelSource, Renderer, RendererConfig};

use lipstream_engines::audio::stream::FeatureStream;

/// Audio of a 25 fps frame, ms.
const FRAME_MS: f64 = 40.0;
/// Audio arriving this far from where the stream expects it restarts the features (a sender
/// restart or a long outage); smaller gaps are filled with silence, as `AudioRing` does.
const MAX_GAP_MS: f64 = 5_000.0;
const CONTINUITY_MS: f64 = 30.0;

/// One session's audio on its way to whisper windows, on the session clock.
pub(crate) struct AudioFeed {
    pub stream: FeatureStream,
    hop_frames: usize,
    /// Session time of the stream's first sample.
    origin_ms: Option<f64>,
    end_ms: f64,
    /// Times the stream restarted after a discontinuity.
    pub restarts: u64,
}

impl AudioFeed {
    pub fn new(hop_frames: usize) -> Self {
        AudioFeed {
            stream: FeatureStream::new(hop_frames),
            hop_frames,
            origin_ms: None,
            end_ms: 0.0,
            restarts: 0,
        }
    }

    /// Audio a frame waits for past its own time: MuseTalk's 120 ms window end, plus the rest
    /// of its hop (one whisper encode serves `hop_frames` frames).
    pub fn lookahead_ms(hop_frames: usize) -> f64 {
        3.0 * FRAME_MS + (hop_frames.max(1) - 1) as f64 * FRAME_MS
    }

    pub fn push(&mut self, at_ms: f64, pcm: &[i16]) {
        let gap = at_ms - self.end_ms;
        match self.origin_ms {
            Some(_) if (-CONTINUITY_MS..=MAX_GAP_MS).contains(&gap) => {
                if gap > CONTINUITY_MS {
                    let silence = (gap * 16.0) as usize;
                    self.stream.push(&vec![0.0; silence]);
                    self.end_ms += silence as f64 / 16.0;
                }
            }
            first_or_jump => {
                if first_or_jump.is_some() {
                    self.restarts += 1;
                    self.stream = FeatureStream::new(self.hop_frames);
                }
                self.origin_ms = Some(at_ms);
                self.end_ms = at_ms;
            }
        }
        let samples: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
        self.stream.push(&samples);
        self.end_ms += pcm.len() as f64 / 16.0;
    }

    /// The 25 fps frame index of session time `frame_ms` in this stream (None before it).
    pub fn frame_index(&self, frame_ms: f64) -> Option<usize> {
        let origin = self.origin_ms?;
        let i = ((frame_ms - origin) / FRAME_MS).round();
        (i >= 0.0).then_some(i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_filled_and_jumps_restart_the_stream() {
        let mut a = AudioFeed::new(2);
        assert_eq!(AudioFeed::lookahead_ms(2), 160.0);
        assert_eq!(a.frame_index(0.0), None);
        a.push(1000.0, &[0; 320]);
        a.push(1020.0, &[0; 320]);
        assert_eq!(a.stream.received(), 640);
        // 100 ms missing: filled, so frame times keep their place in the stream.
        a.push(1140.0, &[0; 320]);
        assert_eq!(a.stream.received(), 640 + 1600 + 320);
        assert_eq!(a.frame_index(1080.0), Some(2));
        assert_eq!(a.frame_index(900.0), None);
        // 10 s later: a new stream from there.
        a.push(11_160.0, &[0; 320]);
        assert_eq!((a.restarts, a.stream.received()), (1, 320));
        assert_eq!(a.frame_index(11_200.0), Some(1));
    }
}

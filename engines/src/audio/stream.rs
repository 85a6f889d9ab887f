//! MuseTalk's audio prompts from a live 16 kHz stream.
//!
//! Whisper sees 30 s at once. Frames go in hops of `hop_frames` ([k*h, (k+1)*h)); once the audio
//! the hop's last frame needs has arrived (frame i needs audio up to 40i + 120 ms), the stream
//! encodes one window that ends there: while the stream is shorter than 30 s the window starts at
//! its beginning and is zero-padded after, exactly as an offline clip is; later it slides, the
//! newest audio at its end. The hop's prompts are sliced from that window's features, so the
//! encoder runs once per hop (a 30 s window costs ~0.6 ms on an H100, ~0.5 s on two CPU cores),
//! and a hop's first frame waits `hop_frames - 1` frames longer for its prompt: the trade between
//! encoder time and latency that `hop_frames` sets.
//!
//! Sans-IO: audio comes in as samples continuing the stream (the caller fills gaps with silence),
//! the encoder is a closure (CPU reference, CUDA executor, or a test double), nothing sleeps.

use crate::audio::mel::{LogMel, MelCache, FRAMES, N_MELS, SAMPLE_RATE, WINDOW_SAMPLES};
use crate::audio::prompt::{STATES, WINDOW};
use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

use std::ops::Range;

/// Samples per whisper feature frame (20 ms).
const FEATURE_SAMPLES: usize = SAMPLE_RATE / 50;
/// Samples per video frame (40 ms at 25 fps).
const FRAME_SAMPLES: usize = SAMPLE_RATE / 25;
/// Audio past a frame's start that its prompt hears: 120 ms.
const LOOKAHEAD_SAMPLES: usize = 3 * FRAME_SAMPLES;
/// Feature frames of zero padding before the first (MuseTalk's left pad of 2 video frames).
const PAD_BEFORE: usize = 4;

/// Longest hop the server's encoder serves: one whisper window a second. A hop of h frames
/// reads 2h + 8 window rows, which must fit in what that encoder returns (an offline stream,
/// one hop for a whole clip, encodes every row).
pub const MAX_HOP_FRAMES: usize = 25;
const _: () = assert!(2 * (MAX_HOP_FRAMES - 1) + WINDOW <= crate::models::whisper::SERVED_ROWS);

/// Features of one encoded window.
struct Window {
    /// The window row of `features`' first row.
    row0: usize,
    /// Video frames [first, end) this window serves.
    frames: std::ops::Range<usize>,
    /// Absolute sample where the window starts (a multiple of 20 ms).
    start: usize,
    /// [T, STATES, d]
    features: Tensor,
    /// Feature frames that hold real audio (the rest is the zero padding of a young stream).
    valid: usize,
}

/// Rows `range` of stacked hidden states [T, STATES, d]: for encoders that compute them all.
pub fn rows(features: &Tensor, range: Range<usize>) -> Tensor {
    let per: usize = features.shape[1..].iter().product();
    let mut shape = features.shape.clone();
    shape[0] = range.len();
    Tensor::new(
        shape,
        features.data[range.start * per..range.end * per].to_vec(),
    )
}

/// The streaming feature front end of one session.
pub struct FeatureStream {
    hop_frames: usize,
    mel: LogMel,
    mel_cache: MelCache,
    /// Samples kept, starting at absolute sample `kept_from`.
    audio: Vec<f32>,
    kept_from: usize,
    received: usize,
    window: Option<Window>,
    /// No more audio will come (the utterance or the stream ended).
    ended: bool,
    /// Windows encoded so far (one per hop).
    pub encodes: usize,
}

impl FeatureStream {
    /// `hop_frames`: video frames served per encoded window (25 = one encode per second; a
    /// server's encoder returns the rows of hops up to `MAX_HOP_FRAMES`).
    pub fn new(hop_frames: usize) -> Self {
        FeatureStream {
            hop_frames: hop_frames.max(1),
            mel: LogMel::new(),
            mel_cache: MelCache::default(),
            audio: Vec::new(),
            kept_from: 0,
            received: 0,
            window: None,
            ended: false,
            encodes: 0,
        }
    }

    /// Appends samples (16 kHz mono in [-1, 1]) that continue the stream.
    pub fn push(&mut self, pcm: &[f32]) {
        self.audio.extend_from_slice(pcm);
        self.received += pcm.len();
        // Keep one window of history plus what is still to come; drop the rest in big steps.
        let keep_from = self
            .received
            .saturating_sub(WINDOW_SAMPLES + 4 * SAMPLE_RATE);
        if keep_from >= self.kept_from + 4 * SAMPLE_RATE {
            self.audio.drain(..keep_from - self.kept_from);
            self.kept_from = keep_from;
        }
    }

    /// Samples received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// The stream sample up to which frame `frame`'s prompt hears audio.
    pub fn needed(frame: usize) -> usize {
        frame * FRAME_SAMPLES + LOOKAHEAD_SAMPLES
    }

    /// The last frame of `frame`'s hop: its prompt needs that frame's audio too.
    fn hop_last(&self, frame: usize) -> usize {
        (frame / self.hop_frames + 1) * self.hop_frames - 1
    }

    /// Whether frame `frame`'s prompt can be made: the audio its hop needs has arrived, or the
    /// stream has ended and the frame's own audio is all there is.
    pub fn ready(&self, frame: usize) -> bool {
        self.received >= Self::needed(self.hop_last(frame))
            || (self.ended && self.received >= Self::needed(frame))
    }

    /// Says no more audio will come: the last hop is served from what there is, zero-padded
    /// after, as an offline clip is.
    pub fn finish(&mut self) {
        self.ended = true;
    }

    /// How many frames longer than its own lookahead a frame may wait for its prompt.
    pub fn wait_frames(&self) -> usize {
        self.hop_frames - 1
    }

    /// The prompt [WINDOW * STATES, d] of frame `frame` (features without the positional
    /// encoding, which the frame graph adds), or `None` until its audio has arrived. `encode`
    /// turns a log-mel window [1, 80, 3000] into the stacked hidden states [1500, STATES, d]
    /// and returns the rows in the range it is given: the ones the hop's frames read (a GPU
    /// encoder copies back only those).
    pub fn prompt(
        &mut self,
        frame: usize,
        encode: impl FnOnce(&Tensor, Range<usize>) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        if !self.ready(frame) {
            return Ok(None);
        }
        if !self
            .window
            .as_ref()
            .is_some_and(|w| w.frames.contains(&frame))
        {
            self.encode_hop(frame, encode)?;
        }
        let w = self.window.as_ref().ok_or_else(|| EngineError::Input {
            name: "audio window".into(),
            expected: vec![],
            got: vec![],
        })?;
        let (t, s, d) = (
            w.features.shape[0],
            w.features.shape[1],
            w.features.shape[2],
        );
        let per = s * d;
        let first = w.start / FEATURE_SAMPLES + w.row0;
        let mut data = vec![0f32; WINDOW * per];
        for k in 0..WINDOW {
            // Index in the padded offline sequence, then the stream's feature frame, then the
            // window's.
            let Some(src) = (2 * frame + k).checked_sub(PAD_BEFORE) else {
                continue;
            };
            let Some(at) = src.checked_sub(first) else {
                continue;
            };
            if at < t.min(w.valid) {
                data[k * per..(k + 1) * per]
                    .copy_from_slice(&w.features.data[at * per..(at + 1) * per]);
            }
        }
        Ok(Some(Tensor::new(vec![WINDOW * s, d], data)))
    }

    fn encode_hop(
        &mut self,
        frame: usize,
        encode: impl FnOnce(&Tensor, Range<usize>) -> Result<Tensor>,
    ) -> Result<()> {
        let first = frame / self.hop_frames * self.hop_frames;
        let frames = first..first + self.hop_frames;
        let end = Self::needed(frames.end - 1).min(self.received);
        let start = end.saturating_sub(WINDOW_SAMPLES) / FEATURE_SAMPLES * FEATURE_SAMPLES;
        let from = start.max(self.kept_from) - self.kept_from;
        let to = (end - self.kept_from).min(self.audio.len());
        // Audio before `kept_from` was dropped only when it is older than any window needs.
        let mel = self.mel.window_at(
            &self.audio[from.min(to)..to],
            self.kept_from + from.min(to),
            &mut self.mel_cache,
        );
        let input = Tensor::new(vec![1, N_MELS, FRAMES], mel.data);
        // Window rows the hop's frames read: frame f takes stream rows [2f - 4, 2f + 6).
        let first_row = start / FEATURE_SAMPLES;
        let rows_total = FRAMES / 2;
        let lo = (2 * frames.start)
            .saturating_sub(PAD_BEFORE)
            .saturating_sub(first_row)
            .min(rows_total);
        let hi = (2 * (frames.end - 1) + WINDOW - PAD_BEFORE)
            .saturating_sub(first_row)
            .clamp(lo, rows_total);
        let features = encode(&input, lo..hi)?;
        if features.shape.len() != 3 || features.shape[1] != STATES || features.shape[0] != hi - lo
        {
            return Err(EngineError::Input {
                name: "whisper hidden states".into(),
                expected: vec![hi - lo, STATES, 0],
                got: features.shape.clone(),
            });
        }
        self.encodes += 1;
        self.window = Some(Window {
            frames,
            start,
            row0: lo,
            valid: ((end - start) / FEATURE_SAMPLES).saturating_sub(lo),
            features,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoder double: feature frame j of a window holds j in every state and channel, so a
    /// prompt says exactly which window frames it took.
    fn positions(_mel: &Tensor, range: Range<usize>) -> Result<Tensor> {
        let (t, d) = (FRAMES / 2, 2);
        let data = (0..t)
            .flat_map(|j| std::iter::repeat_n(j as f32, STATES * d))
            .collect();
        Ok(rows(&Tensor::new(vec![t, STATES, d], data), range))
    }

    fn taken(p: &Tensor) -> Vec<f32> {
        (0..WINDOW).map(|k| p.data[k * STATES * 2]).collect()
    }

    #[test]
    fn prompts_wait_for_their_hop_and_encode_once_per_hop() {
        let mut s = FeatureStream::new(5);
        assert_eq!(s.wait_frames(), 4);
        // Frame 0's hop ends with frame 4, which needs audio up to 280 ms.
        s.push(&vec![0.1; 280 * 16 - 1]);
        assert!(s.prompt(0, positions).unwrap().is_none());
        s.push(&[0.1]);
        let p = s.prompt(0, positions).unwrap().expect("ready at 280 ms");
        assert_eq!(p.shape, vec![WINDOW * STATES, 2]);
        // Four padding frames, then feature frames 0..6.
        assert_eq!(
            taken(&p),
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
        for f in 1..5 {
            s.prompt(f, positions).unwrap().expect("ready");
        }
        // Frame 4 hears 120 ms past its start: feature frames up to 13, all real audio.
        let p4 = s.prompt(4, positions).unwrap().unwrap();
        assert_eq!(taken(&p4), (4..14).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(s.encodes, 1, "one window serves the hop");
        assert!(s.prompt(5, positions).unwrap().is_none());
        s.push(&vec![0.1; 5 * FRAME_SAMPLES]);
        s.prompt(5, positions).unwrap().expect("ready");
        assert_eq!(s.encodes, 2);
    }

    #[test]
    fn a_long_stream_slides_its_window_and_keeps_alignment() {
        let mut s = FeatureStream::new(5);
        let total = 41 * SAMPLE_RATE;
        for _ in 0..total / 320 {
            s.push(&[0.0; 320]);
        }
        // Frame 800 (32 s): its hop [800, 805) ends at frame 804, which needs audio up to
        // 32.28 s, so the window starts at 2.28 s = feature frame 114; frame 800 takes stream
        // feature frames 1596..1606 = window frames 1482..1492.
        let p = s.prompt(800, positions).unwrap().unwrap();
        let want: Vec<f32> = (1482..1492).map(|v| v as f32).collect();
        assert_eq!(taken(&p), want);
        // Memory stays bounded: about one window plus a few seconds.
        assert!(s.audio.len() <= WINDOW_SAMPLES + 8 * SAMPLE_RATE);
        // A frame far past the audio is simply not ready.
        assert!(s.prompt(2000, positions).unwrap().is_none());
    }

    #[test]
    fn an_encoder_with_the_wrong_shape_is_an_error() {
        let mut s = FeatureStream::new(5);
        s.push(&vec![0.0; SAMPLE_RATE]);
        let err = s
            .prompt(0, |_, _| Ok(Tensor::zeros(&[1500, 4, 2])))
            .unwrap_err();
        assert!(err.to_string().contains("whisper hidden states"), "{err}");
    }
}

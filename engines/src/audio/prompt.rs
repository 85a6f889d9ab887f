//! MuseTalk 1.5's per-frame audio prompt: whisper-tiny hidden states at 50 Hz, sliced per video
//! frame at 25 fps.
//!
//! The features [T,5,d] (T frames of 20 ms, all 5 hidden states) get 4 zero frames before and 12
//! after; video frame i takes frames [2i, 2i+10) and flattens them, frame-major, to [50, d]. So
//! frame i hears audio [40i - 80, 40i + 120) ms: 80 ms past its own end.

use crate::tensor::Tensor;

/// Hidden states per whisper frame (embeddings + 4 layers).
pub const STATES: usize = 5;
/// Whisper frames per prompt.
pub const WINDOW: usize = 10;
/// Zero frames before the features; the 12 after need no constant: reads past the end are zeros.
const PAD_BEFORE: usize = 4;

/// Stacks the encoder's hidden states ([1,T,d] each, `STATES` of them) into [T, STATES, d].
pub fn stack_states(states: &[&Tensor]) -> Tensor {
    let (t, d) = (states[0].shape[1], states[0].shape[2]);
    let mut data = Vec::with_capacity(t * STATES * d);
    for i in 0..t {
        for s in states {
            data.extend_from_slice(&s.data[i * d..(i + 1) * d]);
        }
    }
    Tensor::new(vec![t, states.len(), d], data)
}

/// The prompt of video frame `frame` from features [T, STATES, d] (zeros outside them).
pub fn frame_prompt(features: &Tensor, frame: usize) -> Tensor {
    let (t, s, d) = (features.shape[0], features.shape[1], features.shape[2]);
    let per = s * d;
    let mut data = vec![0f32; WINDOW * per];
    for w in 0..WINDOW {
        // Index into the padded sequence, then back into the unpadded one.
        let padded = 2 * frame + w;
        if padded < PAD_BEFORE {
            continue;
        }
        let src = padded - PAD_BEFORE;
        if src < t {
            data[w * per..(w + 1) * per]
                .copy_from_slice(&features.data[src * per..(src + 1) * per]);
        }
    }
    Tensor::new(vec![WINDOW * s, d], data)
}

/// Video frames MuseTalk renders for `samples` of 16 kHz audio at 25 fps, and the whisper
/// frames it keeps (`floor(seconds * 25)`, `floor(seconds * 50)`).
pub fn frame_counts(samples: usize) -> (usize, usize) {
    (samples * 25 / 16_000, samples * 50 / 16_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_padded_and_frame_major() {
        // T=6 frames, 5 states, d=1: value = 10*frame + state.
        let data: Vec<f32> = (0..6)
            .flat_map(|t| (0..5).map(move |s| (10 * t + s) as f32))
            .collect();
        let f = Tensor::new(vec![6, 5, 1], data);
        let p0 = frame_prompt(&f, 0);
        assert_eq!(p0.shape, vec![50, 1]);
        // Frame 0: four zero frames of padding, then frames 0..5, then zeros (past T=6).
        assert!(p0.data[..20].iter().all(|&v| v == 0.0));
        assert_eq!(&p0.data[20..25], &[0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(&p0.data[45..50], &[50.0, 51.0, 52.0, 53.0, 54.0]);
        // Frame 2 starts at padded index 4, which is feature frame 0.
        let p2 = frame_prompt(&f, 2);
        assert_eq!(&p2.data[..5], &[0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(&p2.data[5..10], &[10.0, 11.0, 12.0, 13.0, 14.0]);
        assert_eq!(frame_counts(16_000 * 3 + 100), (75, 150));
    }
}

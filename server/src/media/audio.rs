//! The session's recent 16 kHz audio, addressed by media time, for the stage to read around a frame.

use std::collections::VecDeque;

use crate::media::codec::SAMPLE_RATE_16K;

const SAMPLES_PER_MS: f64 = SAMPLE_RATE_16K as f64 / 1000.0;
/// Chunks that start further than this from where the ring ends are a gap (filled with silence)
/// or a timestamp jump back (the ring restarts); closer ones are jitter and append directly.
const CONTINUITY_TOLERANCE_MS: f64 = 30.0;
/// A jump forward longer than this restarts the ring instead of writing seconds of silence.
const MAX_GAP_MS: f64 = 5_000.0;

/// A bounded window of 16 kHz mono PCM with the media time of its first sample.
pub struct AudioRing {
    samples: VecDeque<i16>,
    start_ms: f64,
    capacity: usize,
}

impl AudioRing {
    /// Keeps the most recent `capacity_ms` of audio.
    pub fn new(capacity_ms: u32) -> Self {
        let capacity = (capacity_ms as f64 * SAMPLES_PER_MS) as usize;
        AudioRing {
            samples: VecDeque::with_capacity(capacity),
            start_ms: 0.0,
            capacity,
        }
    }

    /// Whether no audio has arrived (or the ring just restarted and holds none).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Media time just past the newest sample.
    pub fn end_ms(&self) -> f64 {
        self.start_ms + self.samples.len() as f64 / SAMPLES_PER_MS
    }

    /// Appends a chunk whose first sample belongs to media time `at_ms`.
    pub fn push(&mut self, at_ms: f64, pcm: &[i16]) {
        let end = self.end_ms();
        let gap_ms = at_ms - end;
        if self.samples.is_empty() || !(-CONTINUITY_TOLERANCE_MS..=MAX_GAP_MS).contains(&gap_ms) {
            self.samples.clear();
            self.start_ms = at_ms;
        } else if gap_ms > CONTINUITY_TOLERANCE_MS {
            let silence = (gap_ms * SAMPLES_PER_MS) as usize;
            self.samples.extend(std::iter::repeat_n(0, silence));
        }
        self.samples.extend(pcm.iter().copied());
        if self.samples.len() > self.capacity {
            let excess = self.samples.len() - self.capacity;
            self.samples.drain(..excess);
            self.start_ms += excess as f64 / SAMPLES_PER_MS;
        }
    }

    /// Copies `[from_ms, from_ms + len_ms)` into `out`, with silence where the ring has nothing.
    pub fn read(&self, from_ms: f64, len_ms: f64, out: &mut Vec<i16>) {
        let n = (len_ms * SAMPLES_PER_MS).round() as usize;
        out.clear();
        out.resize(n, 0);
        let offset = ((from_ms - self.start_ms) * SAMPLES_PER_MS).round() as i64;
        for (i, slot) in out.iter_mut().enumerate() {
            let idx = offset + i as i64;
            if idx >= 0 {
                if let Some(s) = self.samples.get(idx as usize) {
                    *slot = *s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_was_written_at_its_time() {
        let mut ring = AudioRing::new(1000);
        ring.push(100.0, &[1; 320]);
        ring.push(120.0, &[2; 320]);
        let mut out = Vec::new();
        ring.read(110.0, 20.0, &mut out);
        assert_eq!(out.len(), 320);
        assert!(out[..160].iter().all(|&s| s == 1) && out[160..].iter().all(|&s| s == 2));
        // Outside the ring reads as silence.
        ring.read(90.0, 10.0, &mut out);
        assert!(out.iter().all(|&s| s == 0));
    }

    #[test]
    fn fills_gaps_with_silence_and_restarts_on_a_jump_back() {
        let mut ring = AudioRing::new(10_000);
        ring.push(0.0, &[5; 320]);
        ring.push(1020.0, &[6; 320]); // 1 s of lost packets
        assert!((ring.end_ms() - 1040.0).abs() < 0.1);
        let mut out = Vec::new();
        ring.read(500.0, 10.0, &mut out);
        assert!(out.iter().all(|&s| s == 0));
        ring.push(200.0, &[7; 320]); // the sender's clock jumped back
        assert!((ring.end_ms() - 220.0).abs() < 0.1);
    }

    #[test]
    fn keeps_only_its_capacity() {
        let mut ring = AudioRing::new(100);
        for i in 0..20 {
            ring.push(i as f64 * 20.0, &[i as i16; 320]);
        }
        assert!((ring.end_ms() - 400.0).abs() < 0.1);
        let mut out = Vec::new();
        ring.read(250.0, 20.0, &mut out);
        assert!(
            out.iter().all(|&s| s == 0),
            "evicted audio must read as silence"
        );
        ring.read(380.0, 20.0, &mut out);
        assert!(out.iter().all(|&s| s == 19));
    }
}

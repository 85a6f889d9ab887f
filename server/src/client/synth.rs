//! Synthetic media: a moving test picture carrying a stamp, a sine tone, a click train, and a
//! recording looped under the click train.

use std::sync::Arc;

use crate::client::marker::Stamp;
use crate::media::frame::VideoFrame;

/// Makes frame `frame_id`: diagonal bands that move each frame (so the encoder has real work),
/// a grey face-sized ellipse in the middle, and the stamp on top.
pub fn picture(width: usize, height: usize, stamp: Stamp) -> VideoFrame {
    let mut f = VideoFrame::filled(width, height, 0, 128, 128);
    let shift = stamp.frame_id as usize * 4;
    let (cx, cy) = (width as f64 / 2.0, height as f64 * 0.55);
    let (rx, ry) = (width as f64 * 0.18, height as f64 * 0.3);
    for row in 0..height {
        for col in 0..width {
            let band = ((row + col + shift) / 16) % 8;
            let (dx, dy) = ((col as f64 - cx) / rx, (row as f64 - cy) / ry);
            f.y[row * width + col] = if dx * dx + dy * dy <= 1.0 {
                150
            } else {
                60 + band as u8 * 16
            };
        }
    }
    for row in 0..height / 2 {
        for col in 0..width / 2 {
            f.u[row * (width / 2) + col] = 100 + ((row + shift / 2) % 32) as u8;
        }
    }
    stamp.draw(&mut f);
    f
}

/// A continuous sine tone, produced in chunks.
pub struct Tone {
    phase: f64,
    step: f64,
    amplitude: f64,
}

impl Tone {
    pub fn new(hz: f64, sample_rate: u32) -> Self {
        Self::with_amplitude(hz, sample_rate, 8000.0)
    }

    pub fn with_amplitude(hz: f64, sample_rate: u32, amplitude: f64) -> Self {
        Tone {
            phase: 0.0,
            step: hz * std::f64::consts::TAU / sample_rate as f64,
            amplitude,
        }
    }

    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            *s = (self.phase.sin() * self.amplitude) as i16;
            self.phase = (self.phase + self.step) % std::f64::consts::TAU;
        }
    }
}

/// A click every `period_ms`: 10 ms of a 2 kHz burst on silence, easy to find again after Opus.
pub struct Clicks {
    sample_rate: u32,
    period: usize,
    burst: usize,
    pos: usize,
}

impl Clicks {
    pub fn new(period_ms: u32, sample_rate: u32) -> Self {
        Clicks {
            sample_rate,
            period: (period_ms as usize * sample_rate as usize) / 1000,
            burst: sample_rate as usize / 100,
            pos: 0,
        }
    }

    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            let phase = self.pos % self.period.max(1);
            *s = if phase < self.burst {
                let t = phase as f64 / f64::from(self.sample_rate);
                ((t * 2000.0 * std::f64::consts::TAU).sin() * 20_000.0) as i16
            } else {
                0
            };
            self.pos += 1;
        }
    }
}

/// Peak of a recording under the click train: well below the onset detector's threshold (and
/// Opus's overshoot), so speech never reads as a click and a click over speech does not clip.
pub const SPEECH_PEAK: i16 = 4000;

/// One second of a sine at `SPEECH_PEAK`, to loop as `Speech` (`hz` whole: the loop is
/// seamless): a voice that never pauses, quiet enough for clicks laid over it to be found.
pub fn tone_pcm(hz: f64, sample_rate: u32) -> Vec<i16> {
    let mut pcm = vec![0; sample_rate as usize];
    Tone::with_amplitude(hz, sample_rate, f64::from(SPEECH_PEAK)).fill(&mut pcm);
    pcm
}

/// A recording, looped, with a click every `period_ms` on top (none without a period).
pub struct Speech {
    pcm: Arc<Vec<i16>>,
    pos: usize,
    clicks: Option<Clicks>,
}

impl Speech {
    /// `pcm`: mono at `sample_rate`, already scaled to `SPEECH_PEAK`.
    pub fn new(pcm: Arc<Vec<i16>>, click_period_ms: Option<u32>, sample_rate: u32) -> Self {
        Speech {
            pcm,
            pos: 0,
            clicks: click_period_ms.map(|p| Clicks::new(p, sample_rate)),
        }
    }

    pub fn fill(&mut self, out: &mut [i16]) {
        match &mut self.clicks {
            Some(c) => c.fill(out),
            None => out.fill(0),
        }
        if self.pcm.is_empty() {
            return;
        }
        for s in out {
            *s = s.saturating_add(self.pcm[self.pos]);
            self.pos = (self.pos + 1) % self.pcm.len();
        }
    }
}

/// Finds click onsets in a stream of PCM: the first loud sample after at least `quiet_ms` of
/// near-silence.
pub struct OnsetDetector {
    sample_rate: u32,
    quiet_needed: usize,
    quiet_run: usize,
}

impl OnsetDetector {
    pub fn new(sample_rate: u32, quiet_ms: u32) -> Self {
        let quiet_needed = (quiet_ms as usize * sample_rate as usize) / 1000;
        OnsetDetector {
            sample_rate,
            quiet_needed,
            quiet_run: quiet_needed,
        }
    }

    /// Offsets (ms from the chunk's start) of onsets in this chunk.
    pub fn feed(&mut self, pcm: &[i16]) -> Vec<f64> {
        let mut onsets = Vec::new();
        for (i, &s) in pcm.iter().enumerate() {
            if s.unsigned_abs() > 6000 {
                if self.quiet_run >= self.quiet_needed {
                    onsets.push(i as f64 * 1000.0 / f64::from(self.sample_rate));
                }
                self.quiet_run = 0;
            } else {
                self.quiet_run += 1;
            }
        }
        onsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two seconds of `fill` at 16 kHz in 20 ms chunks: clicks every 500 ms are found, at their
    /// times.
    fn assert_clicks_every_500_ms(mut fill: impl FnMut(&mut [i16])) {
        let mut det = OnsetDetector::new(16_000, 100);
        let mut found = Vec::new();
        let mut pcm = vec![0i16; 320];
        for chunk in 0..100 {
            fill(&mut pcm);
            found.extend(
                det.feed(&pcm)
                    .into_iter()
                    .map(|ms| chunk as f64 * 20.0 + ms),
            );
        }
        assert_eq!(found.len(), 4, "{found:?}");
        for (k, t) in found.iter().enumerate() {
            assert!((t - k as f64 * 500.0).abs() < 1.0, "{found:?}");
        }
    }

    #[test]
    fn clicks_are_found_where_they_were_made() {
        let mut clicks = Clicks::new(500, 16_000);
        assert_clicks_every_500_ms(|pcm| clicks.fill(pcm));
    }

    #[test]
    fn clicks_over_a_recording_are_found_and_the_recording_is_not() {
        // Speech-like: loud noise bursts at the recording peak, with pauses, never silent long.
        let mut x = 12345u32;
        let pcm: Vec<i16> = (0..16_000)
            .map(|i| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = ((x >> 16) as i32 - 32768) * i32::from(SPEECH_PEAK) / 32768;
                let v = if (i / 1600) % 3 == 2 { v / 8 } else { v };
                v.clamp(-4000, 4000) as i16
            })
            .collect();
        let mut speech = Speech::new(Arc::new(pcm.clone()), Some(500), 16_000);
        assert_clicks_every_500_ms(|out| speech.fill(out));
        // Without a period: the recording alone, looped sample for sample.
        let mut plain = Speech::new(Arc::new(pcm.clone()), None, 16_000);
        let mut out = vec![0i16; 20_000];
        plain.fill(&mut out);
        assert_eq!(out[..16_000], pcm[..]);
        assert_eq!(out[16_000..], pcm[..4000]);
        assert!(OnsetDetector::new(16_000, 100).feed(&out).is_empty());
    }
}

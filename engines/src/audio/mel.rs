//! Whisper's log-mel spectrogram, exactly as `WhisperFeatureExtractor` computes it: 16 kHz audio
//! padded or cut to 30 s, a 400-point periodic-Hann STFT every 160 samples (centred, reflect
//! padded, last frame dropped), power spectrum, 80 Slaney mel filters (0-8 kHz, Slaney norm),
//! log10 with a 1e-10 floor, clamped to (max - 8), then (x + 4) / 4.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::tensor::Tensor;

pub const SAMPLE_RATE: usize = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
pub const N_MELS: usize = 80;
/// Samples in Whisper's window: 30 s.
pub const WINDOW_SAMPLES: usize = 30 * SAMPLE_RATE;
/// Mel frames in the window.
pub const FRAMES: usize = WINDOW_SAMPLES / HOP;
const BINS: usize = N_FFT / 2 + 1;

/// Reusable state: window, filter bank and FFT plan.
pub struct LogMel {
    window: Vec<f64>,
    /// Each mel filter's nonzero span: first FFT bin and weights. The triangles cover a few
    /// bins each, so the filterbank costs ~2 multiplies per bin instead of 80.
    filters: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn Fft<f64>>,
}

impl Default for LogMel {
    fn default() -> Self {
        Self::new()
    }
}

fn hz_to_mel(f: f64) -> f64 {
    // Slaney: linear below 1 kHz, logarithmic above.
    if f < 1000.0 {
        3.0 * f / 200.0
    } else {
        15.0 + (f / 1000.0).ln() * 27.0 / 6.4f64.ln()
    }
}

fn mel_to_hz(m: f64) -> f64 {
    if m < 15.0 {
        200.0 * m / 3.0
    } else {
        1000.0 * (6.4f64.ln() * (m - 15.0) / 27.0).exp()
    }
}

/// transformers' `mel_filter_bank(201, 80, 0, 8000, 16000, norm="slaney", mel_scale="slaney")`.
fn slaney_filters() -> Vec<f64> {
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE as f64 / 2.0));
    let edges: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..BINS)
        .map(|k| k as f64 * (SAMPLE_RATE as f64 / 2.0) / (BINS - 1) as f64)
        .collect();
    let mut filters = vec![0.0; N_MELS * BINS];
    for m in 0..N_MELS {
        let enorm = 2.0 / (edges[m + 2] - edges[m]);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let down = (f - edges[m]) / (edges[m + 1] - edges[m]);
            let up = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]);
            filters[m * BINS + k] = down.min(up).max(0.0) * enorm;
        }
    }
    filters
}

impl LogMel {
    pub fn new() -> Self {
        // Periodic Hann, as torch.hann_window(400) and window_function(400, "hann").
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / N_FFT as f64).cos())
            .collect();
        LogMel {
            window,
            filters: slaney_filters()
                .chunks(BINS)
                .map(|row| {
                    let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                    let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |l| l + 1);
                    (first, row[first..last].to_vec())
                })
                .collect(),
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
        }
    }

    /// Features of one 30 s window: `samples` (16 kHz mono, [-1, 1]) are zero-padded or cut to
    /// 30 s. Returns [80, 3000].
    pub fn window(&self, samples: &[f32]) -> Tensor {
        self.compute(samples, None)
    }

    /// The same window, for audio that starts at sample `at` of a longer stream: frames lying
    /// wholly inside the audio are the same in every window that holds them, so they are kept
    /// in `cache` (by their stream position) and computed once. Only frames at the window's
    /// edges, new audio and the silence after it are computed again. Equal to `window`.
    pub fn window_at(&self, samples: &[f32], at: usize, cache: &mut MelCache) -> Tensor {
        // Frames before this window will not come back: windows only move forward.
        cache.frames = cache.frames.split_off(&at);
        self.compute(samples, Some((at, cache)))
    }

    fn compute(&self, samples: &[f32], mut cache: Option<(usize, &mut MelCache)>) -> Tensor {
        let real = samples.len().min(WINDOW_SAMPLES);
        let mut audio: Vec<f64> = samples
            .iter()
            .take(WINDOW_SAMPLES)
            .map(|&s| f64::from(s))
            .collect();
        audio.resize(WINDOW_SAMPLES, 0.0);
        let pad = N_FFT / 2;
        let n = audio.len();
        let padded: Vec<f64> = (0..n + 2 * pad)
            .map(|i| {
                let j = i as isize - pad as isize;
                let j = if j < 0 {
                    -j
                } else if j >= n as isize {
                    2 * (n as isize - 1) - j
                } else {
                    j
                };
                audio[j as usize]
            })
            .collect();
        let mut mel = vec![0f64; N_MELS * FRAMES];
        let mut buf = vec![Complex::new(0.0, 0.0); N_FFT];
        let mut power = vec![0f64; BINS];
        let mut column = [0f64; N_MELS];
        for t in 0..FRAMES {
            let start = t * HOP;
            // Frame t reads audio [start - pad, start + pad): cacheable when that is real audio.
            let inside = start >= pad && start + pad <= real;
            let key = cache.as_ref().map(|(at, _)| at + start);
            let cached = match (&cache, key, inside) {
                (Some((_, c)), Some(k), true) => c.frames.get(&k).copied(),
                _ => None,
            };
            match cached {
                Some(col) => column = col,
                None => {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = Complex::new(padded[start + i] * self.window[i], 0.0);
                    }
                    self.fft.process(&mut buf);
                    for (k, p) in power.iter_mut().enumerate() {
                        *p = buf[k].norm_sqr();
                    }
                    for (c, (first, weights)) in column.iter_mut().zip(&self.filters) {
                        *c = weights
                            .iter()
                            .zip(&power[*first..])
                            .map(|(f, p)| f * p)
                            .sum::<f64>()
                            .max(1e-10)
                            .log10();
                    }
                    if let (Some((_, c)), Some(k), true) = (cache.as_mut(), key, inside) {
                        c.frames.insert(k, column);
                    }
                }
            }
            for (m, v) in column.iter().enumerate() {
                mel[m * FRAMES + t] = *v;
            }
        }
        let max = mel.iter().copied().fold(f64::MIN, f64::max);
        let data = mel
            .iter()
            .map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect();
        Tensor::new(vec![N_MELS, FRAMES], data)
    }
}

/// Log-mel frames already computed for a stream, by sample position (see `LogMel::window_at`).
#[derive(Default)]
pub struct MelCache {
    frames: std::collections::BTreeMap<usize, [f64; N_MELS]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mel_scale_round_trips_and_is_slaney() {
        for f in [0.0, 500.0, 1000.0, 4000.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(f)) - f).abs() < 1e-6);
        }
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
    }

    #[test]
    fn cached_windows_equal_fresh_ones() {
        let audio: Vec<f32> = (0..40 * SAMPLE_RATE)
            .map(|i| ((i as f32 * 0.013).sin() + (i as f32 * 0.0007).cos()) * 0.3)
            .collect();
        let m = LogMel::new();
        let mut cache = MelCache::default();
        // A growing window, then one that slides: each equals the window computed afresh.
        for (at, end) in [
            (0, 3 * SAMPLE_RATE),
            (0, 3 * SAMPLE_RATE + 1280),
            (0, WINDOW_SAMPLES),
        ]
        .into_iter()
        .chain([
            (9600, 9600 + WINDOW_SAMPLES),
            (10_880, 10_880 + WINDOW_SAMPLES - 320),
        ]) {
            let fresh = m.window(&audio[at..end]);
            let cached = m.window_at(&audio[at..end], at, &mut cache);
            assert_eq!(fresh.data, cached.data, "window at {at}..{end}");
        }
        assert!(!cache.frames.is_empty());
    }

    #[test]
    fn a_tone_lights_up_its_mel_band() {
        let tone: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| (i as f32 * 1000.0 * std::f32::consts::TAU / 16_000.0).sin() * 0.5)
            .collect();
        let m = LogMel::new().window(&tone);
        assert_eq!(m.shape, vec![N_MELS, FRAMES]);
        // Frame 50 (0.5 s in): the loudest band is the one around 1 kHz.
        let col: Vec<f32> = (0..N_MELS).map(|b| m.data[b * FRAMES + 50]).collect();
        let loudest = col
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap();
        let centre = mel_to_hz(hz_to_mel(8000.0) * (loudest + 1) as f64 / 81.0);
        assert!(
            (800.0..1250.0).contains(&centre),
            "band {loudest} centred at {centre} Hz"
        );
        // Past the audio (zero padding) everything sits at the clamp floor.
        assert!((0..N_MELS).all(|b| m.data[b * FRAMES + 2500] <= m.data[b * FRAMES + 50] + 1e-6));
    }
}

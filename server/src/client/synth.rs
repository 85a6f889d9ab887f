//! Synthetic media: a moving test picture carrying a stamp, and a sine tone.

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
        Tone {
            phase: 0.0,
            step: hz * std::f64::consts::TAU / sample_rate as f64,
            amplitude: 8000.0,
        }
    }

    pub fn fill(&mut self, out: &mut [i16]) {
        for s in out {
            *s = (self.phase.sin() * self.amplitude) as i16;
            self.phase = (self.phase + self.step) % std::f64::consts::TAU;
        }
    }
}

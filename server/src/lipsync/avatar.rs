//! Avatar mode: a prepared face (`lipstream avatar prepare`) speaks the publisher's audio.
//!
//! The worker asks for a picture every 40 ms of audio (`Stage::synthesize`); the clip's frames
//! loop ping-pong. While the audio is silent no inference runs and the prepared frame shows as
//! it is; speech fades the rendered mouth in over a few frames and silence fades it out, so the
//! face never jumps.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use lipstream_engines::avatar::Bundle;
use lipstream_engines::image::{FaceBox, LowerFace};
use lipstream_engines::models::musetalk::LATENT;
use lipstream_engines::Tensor;

use crate::lipsync::prep::{Inputs, Prep};
use crate::lipsync::renderer::Renderer;
use crate::lipsync::slots::Slot;
use crate::media::frame::VideoFrame;
use crate::media::stage::{Completion, Rendered, Stage, StageInput, StageOutput};
use crate::metrics::Metrics;

/// Frames over which the rendered mouth fades in at speech and out at silence (200 ms).
const FADE_FRAMES: f32 = 5.0;
/// RMS of 16-bit audio above which a frame counts as speech (about -40 dBFS).
const SPEECH_RMS: f64 = 330.0;

/// A prepared avatar as the stage uses it: I420 frames, face boxes, latents per frame.
pub struct AvatarAssets {
    frames: Vec<VideoFrame>,
    boxes: Vec<FaceBox>,
    masks: Vec<LowerFace>,
    /// [8, 32, 32] each: masked then reference latents.
    latents: Vec<Tensor>,
}

impl AvatarAssets {
    /// Reads a bundle and checks it against the model's latent shape.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bundle = Bundle::read(path).with_context(|| format!("avatar {}", path.display()))?;
        let n = bundle.frames.len();
        let per = 8 * LATENT * LATENT;
        if n == 0 || bundle.latents.shape != [n, 8, LATENT, LATENT] {
            anyhow::bail!(
                "avatar {}: latents {:?} do not match its {n} frames (want [{n}, 8, {LATENT}, {LATENT}])",
                path.display(),
                bundle.latents.shape
            );
        }
        let mut frames = Vec::with_capacity(n);
        let mut boxes = Vec::with_capacity(n);
        let mut masks = Vec::with_capacity(n);
        let mut latents = Vec::with_capacity(n);
        for (i, f) in bundle.frames.iter().enumerate() {
            let frame = VideoFrame::from_rgb(&f.rgb, f.width, f.height)
                .with_context(|| format!("avatar {}: frame {i} is too small", path.display()))?;
            frames.push(frame);
            boxes.push(f.face);
            masks.push(f.mask);
            latents.push(Tensor::new(
                vec![8, LATENT, LATENT],
                bundle.latents.data[i * per..(i + 1) * per].to_vec(),
            ));
        }
        Ok(AvatarAssets {
            frames,
            boxes,
            masks,
            latents,
        })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Frame `i`'s latents [8, 32, 32].
    pub(crate) fn latents(&self, i: usize) -> Option<&Tensor> {
        self.latents.get(i)
    }

    /// Puts frame `i`'s face region, box and mask in `slot`, for the GPU's blend at
    /// `strength`.
    pub(crate) fn set_face(&self, slot: &mut Slot, i: usize, strength: f32) -> Result<(), String> {
        match (self.frames.get(i), self.boxes.get(i), self.masks.get(i)) {
            (Some(f), Some(b), Some(m)) => slot.set_face(&f.planes(), *b, *m, strength),
            _ => Err(format!("the clip has no frame {i}")),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frame shown at step `k`: 0, 1, .. n-1, n-2, .. 1, 0, 1, ..
    fn ping_pong(&self, k: u64) -> usize {
        let n = self.frames.len() as u64;
        if n <= 1 {
            return 0;
        }
        let r = k % (2 * (n - 1));
        (if r < n { r } else { 2 * (n - 1) - r }) as usize
    }
}

/// One avatar session's stage.
pub struct AvatarStage {
    /// Keeps the clip frame and mouth strength of each frame at the renderer.
    prep: Prep<(usize, f32)>,
    assets: Arc<AvatarAssets>,
    /// Session time of the first frame made: frame k is at `origin + 40 k`.
    origin_ms: Option<f64>,
    /// 0 silent .. 1 speaking: how much of the rendered mouth shows.
    level: f32,
    metrics: Arc<Metrics>,
}

impl AvatarStage {
    pub fn new(
        renderer: Arc<Renderer>,
        assets: Arc<AvatarAssets>,
        hop_frames: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(AvatarStage {
            prep: Prep::start(renderer, hop_frames, metrics.clone())?,
            assets,
            origin_ms: None,
            level: 0.0,
            metrics,
        })
    }

    fn index_of(&self, frame_ms: f64) -> usize {
        let k = ((frame_ms - self.origin_ms.unwrap_or(frame_ms)) / 40.0)
            .round()
            .max(0.0);
        self.assets.ping_pong(k as u64)
    }
}

/// RMS of the first 40 ms of `pcm` (the frame's own audio).
fn frame_rms(pcm: &[i16]) -> f64 {
    let own = &pcm[..pcm.len().min(640)];
    if own.is_empty() {
        return 0.0;
    }
    let sum: f64 = own.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / own.len() as f64).sqrt()
}

impl Stage for AvatarStage {
    fn name(&self) -> &'static str {
        "lipsync-avatar"
    }

    fn audio_before_ms(&self) -> f64 {
        0.0
    }

    fn audio_after_ms(&self) -> f64 {
        self.prep.lookahead_ms()
    }

    fn asynchronous(&self) -> bool {
        true
    }

    fn attach(&mut self, done: Completion) {
        self.prep.attach(done);
    }

    fn audio(&mut self, at_ms: f64, pcm: &[i16]) {
        self.prep.audio(at_ms, pcm);
    }

    fn makes_video(&self) -> bool {
        true
    }

    fn synthesize(&mut self, frame_ms: f64) -> Option<VideoFrame> {
        self.origin_ms.get_or_insert(frame_ms);
        let i = self.index_of(frame_ms);
        self.assets.frames.get(i).cloned()
    }

    fn process(&mut self, input: StageInput<'_>) -> StageOutput {
        let speaking = frame_rms(input.audio_16k) > SPEECH_RMS;
        self.level = if speaking {
            (self.level + 1.0 / FADE_FRAMES).min(1.0)
        } else {
            (self.level - 1.0 / FADE_FRAMES).max(0.0)
        };
        if self.level <= 0.0 {
            self.metrics.frames_idle.inc();
            return StageOutput::Unchanged;
        }
        let i = self.index_of(input.frame_ms);
        let inputs = Inputs::Avatar {
            clip: self.assets.clone(),
            index: i,
            strength: self.level,
        };
        self.prep
            .submit((i, self.level), input.frame_ms, input.deadline, inputs)
    }

    fn finish(&mut self, ticket: u64, result: Rendered, frame: &VideoFrame) -> StageOutput {
        let (boxes, masks) = (&self.assets.boxes, &self.assets.masks);
        self.prep.finish(ticket, result, frame, |(i, strength)| {
            (boxes[i], masks[i], strength)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clip_loops_ping_pong_and_speech_is_measured_on_the_frame_s_own_audio() {
        let assets = AvatarAssets {
            frames: vec![VideoFrame::filled(2, 2, 0, 128, 128); 4],
            boxes: vec![
                FaceBox {
                    x0: 0.0,
                    y0: 0.0,
                    x1: 1.0,
                    y1: 1.0
                };
                4
            ],
            masks: vec![LowerFace::DEFAULT; 4],
            latents: vec![Tensor::new(vec![1], vec![0.0]); 4],
        };
        let seq: Vec<usize> = (0..10).map(|k| assets.ping_pong(k)).collect();
        assert_eq!(seq, vec![0, 1, 2, 3, 2, 1, 0, 1, 2, 3]);
        let mut pcm = vec![0i16; 640];
        pcm.extend(vec![8000i16; 2000]);
        assert!(
            frame_rms(&pcm) < SPEECH_RMS,
            "loud audio after the frame is not its own"
        );
        assert!(frame_rms(&[1000; 640]) > SPEECH_RMS);
    }
}

//! Camera mode: the publisher's own face, its lower half re-rendered to match its audio.
//!
//! Per frame: the face box from MTCNN (every few frames, smoothed in between by `FaceTracker`),
//! the MuseTalk 1.5 crop to 256x256 (masked lower half + reference), the frame's audio prompt,
//! then the renderer; the returned face is blended back under the feathered lower-face mask.
//! A frame without a face, or before any audio, goes out as it came in and is counted.

use std::path::PathBuf;
use std::sync::Arc;

use lipstream_engines::face::{Crop, FaceTracker, TrackerConfig};
use lipstream_engines::image::{self, FaceBox, LowerFace};
use lipstream_engines::models::mtcnn::{Mtcnn, MtcnnParams};

use crate::lipsync::prep::{Inputs, Prep};
use crate::lipsync::renderer::Renderer;
use crate::media::frame::VideoFrame;
use crate::media::stage::{Completion, Rendered, Stage, StageInput, StageOutput};
use crate::metrics::Metrics;

/// Settings shared by every camera session.
#[derive(Clone, Debug)]
pub struct CameraStageConfig {
    /// MTCNN weights (pnet.pt, rnet.pt, onet.pt).
    pub mtcnn_dir: PathBuf,
    /// Frames per whisper encode.
    pub hop_frames: usize,
    pub tracker: TrackerConfig,
    /// Smallest face the detector looks for, in pixels. The re-rendered face is 256x256: a
    /// face much smaller than this is not worth lip-syncing, and every halving of this size
    /// adds pyramid levels that cost the session's CPU time (64 px: ~10x cheaper than 20).
    pub min_face_px: f64,
}

/// One camera session's lip-sync stage.
pub struct CameraStage {
    /// Keeps the face box of each frame at the renderer.
    prep: Prep<(FaceBox, LowerFace)>,
    detector: Detector,
    tracker: FaceTracker,
    metrics: Arc<Metrics>,
}

/// MTCNN on its own thread, so a detection (tens of ms on a busy CPU) never holds up the
/// session's frames: the tracker keeps the last box until the new one comes back. The frame's
/// conversion to RGB (several ms at 720p) runs there too, off the media worker.
struct Detector {
    /// Pictures to look at (one at a time: a picture sent while one is in work is skipped).
    tx: std::sync::mpsc::SyncSender<VideoFrame>,
    rx: std::sync::mpsc::Receiver<Vec<lipstream_engines::models::mtcnn::Face>>,
    busy: bool,
}

impl Detector {
    fn start(mut mtcnn: Mtcnn) -> std::io::Result<Self> {
        let (tx, jobs) = std::sync::mpsc::sync_channel::<VideoFrame>(1);
        let (found, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("face-detector".into())
            .spawn(move || {
                let mut last_error: Option<String> = None;
                let mut rgb = Vec::new();
                // Ends when the stage (the sender) is dropped.
                for frame in jobs {
                    image::to_rgb(&frame.planes(), &mut rgb);
                    let (w, h) = (frame.width, frame.height);
                    let faces = mtcnn.detect(&rgb, w, h).unwrap_or_else(|e| {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!("face detection failed: {e}");
                            last_error = Some(e);
                        }
                        Vec::new()
                    });
                    if found.send(faces).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Detector {
            tx,
            rx,
            busy: false,
        })
    }

    /// A detection that finished since the last call.
    fn poll(&mut self) -> Option<Vec<lipstream_engines::models::mtcnn::Face>> {
        let faces = self.rx.try_recv().ok()?;
        self.busy = false;
        Some(faces)
    }

    /// Starts looking at `frame` unless a detection is under way.
    fn look(&mut self, frame: &VideoFrame) {
        if self.busy {
            return;
        }
        self.busy = self.tx.try_send(frame.clone()).is_ok();
    }
}

impl CameraStage {
    pub fn new(
        renderer: Arc<Renderer>,
        config: &CameraStageConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let params = MtcnnParams {
            min_face_size: config.min_face_px.max(12.0),
            ..MtcnnParams::default()
        };
        let detector = Mtcnn::open(&config.mtcnn_dir, params).map_err(|e| {
            anyhow::anyhow!(
                "face detector weights in {}: {e}",
                config.mtcnn_dir.display()
            )
        })?;
        Ok(CameraStage {
            prep: Prep::start(renderer, config.hop_frames, metrics.clone())?,
            detector: Detector::start(detector)?,
            tracker: FaceTracker::new(config.tracker),
            metrics,
        })
    }

    /// The tracked face box of `frame` and its blend mask: the latest detection, smoothed; a new
    /// one is started when the tracker asks for it and comes in a few frames later.
    fn face(&mut self, frame: &VideoFrame) -> Option<(FaceBox, LowerFace)> {
        let (w, h) = (frame.width, frame.height);
        let crop = match self.detector.poll() {
            Some(faces) => self.tracker.update(Some(&faces), w, h),
            None => self.tracker.update(None, w, h),
        };
        if self.tracker.wants_detection() {
            self.detector.look(frame);
        }
        match crop {
            Crop::Face(b, mask) => Some((b, mask)),
            Crop::NoFace => None,
        }
    }
}

impl Stage for CameraStage {
    fn name(&self) -> &'static str {
        "lipsync-camera"
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

    fn process(&mut self, input: StageInput<'_>) -> StageOutput {
        let Some((b, mask)) = self.face(input.frame) else {
            self.metrics.frames_no_face.inc();
            return StageOutput::Unchanged;
        };
        let inputs = Inputs::Camera {
            frame: input.frame.clone(),
            face: b,
            mask,
        };
        self.prep
            .submit((b, mask), input.frame_ms, input.deadline, inputs)
    }

    fn finish(&mut self, ticket: u64, result: Rendered, frame: &VideoFrame) -> StageOutput {
        self.prep
            .finish(ticket, result, frame, |(b, mask)| (b, mask, 1.0))
    }
}

//! Face tracking for camera mode: which box each frame's crop uses.
//!
//! The detector (MTCNN) runs every `redetect_every` frames, on every frame while no face is
//! tracked, and on every frame while the tracked face was last seen with a score under
//! `confident`. Its best face becomes the track; later detections near the track are smoothed
//! into it (an exponential moving average of the corners and landmarks, so the crop and the
//! mask do not jitter frame to frame), a detection far away (the face moved fast, or another
//! face) replaces it. A face that is missing for `lost_after` detection runs in a row is
//! dropped: those frames pass through untouched. The crop follows MuseTalk 1.5: the box with y1
//! pushed down 10 px, inside the frame; the blend mask follows the landmarks.
//!
//! Sans-IO: the caller runs the detector when asked and feeds what it found; no clock, no I/O.

use crate::image::{FaceBox, LowerFace};
use crate::models::mtcnn::Face;

/// Tracking settings.
#[derive(Clone, Copy, Debug)]
pub struct TrackerConfig {
    /// Frames between detector runs while a face is tracked.
    pub redetect_every: usize,
    /// Faces scoring below this are ignored.
    pub min_score: f32,
    /// A tracked face last scored below this is looked for again on every frame.
    pub confident: f32,
    /// Weight of a new detection in the smoothed box (1: no smoothing).
    pub smoothing: f32,
    /// A detection whose centre moved more than this fraction of the box size replaces the
    /// track instead of being smoothed into it.
    pub max_jump: f32,
    /// Detector runs in a row without the face before it counts as gone.
    pub lost_after: usize,
    /// MuseTalk 1.5's extra crop below the chin, in pixels.
    pub chin_px: f32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            redetect_every: 5,
            min_score: 0.9,
            confident: 0.97,
            smoothing: 0.5,
            max_jump: 0.5,
            lost_after: 2,
            chin_px: 10.0,
        }
    }
}

/// The tracker of one session.
pub struct FaceTracker {
    cfg: TrackerConfig,
    /// Smoothed detector box (x0, y0, x1, y1) and landmarks (pixels).
    track: Option<[f32; 4]>,
    marks: [[f32; 2]; 5],
    /// The last detection's score.
    score: f32,
    misses: usize,
    since_detection: usize,
}

/// What a frame gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Crop {
    /// The crop box, and the part of it the rendered face replaces.
    Face(FaceBox, LowerFace),
    /// No face: the frame passes through untouched.
    NoFace,
}

impl FaceTracker {
    pub fn new(cfg: TrackerConfig) -> Self {
        FaceTracker {
            cfg,
            track: None,
            marks: [[0.0; 2]; 5],
            score: 0.0,
            misses: 0,
            since_detection: 0,
        }
    }

    /// Whether the caller should run the detector on the coming frame.
    pub fn wants_detection(&self) -> bool {
        self.track.is_none()
            || self.score < self.cfg.confident
            || self.since_detection + 1 >= self.cfg.redetect_every.max(1)
    }

    /// Advances one frame: `detected` is the detector's output if it ran on this frame.
    pub fn update(&mut self, detected: Option<&[Face]>, width: usize, height: usize) -> Crop {
        match detected {
            None => self.since_detection += 1,
            Some(faces) => {
                self.since_detection = 0;
                let best = faces
                    .iter()
                    .filter(|f| f.score >= self.cfg.min_score && f.score.is_finite())
                    .max_by(|a, b| a.score.total_cmp(&b.score));
                match best {
                    Some(f) => {
                        self.misses = 0;
                        self.score = f.score;
                        match self.track {
                            Some(t) if !self.jumped(&t, &f.box_xyxy) => {
                                let a = self.cfg.smoothing.clamp(0.0, 1.0);
                                self.track =
                                    Some([0, 1, 2, 3].map(|i| t[i] + a * (f.box_xyxy[i] - t[i])));
                                for (m, n) in self.marks.iter_mut().zip(&f.landmarks) {
                                    *m = [0, 1].map(|i| m[i] + a * (n[i] - m[i]));
                                }
                            }
                            _ => {
                                self.track = Some(f.box_xyxy);
                                self.marks = f.landmarks;
                            }
                        }
                    }
                    None => {
                        self.misses += 1;
                        if self.misses >= self.cfg.lost_after.max(1) {
                            self.track = None;
                        }
                    }
                }
            }
        }
        match self.track {
            Some(t) => self.crop(&t, width, height),
            None => Crop::NoFace,
        }
    }

    fn jumped(&self, t: &[f32; 4], b: &[f32; 4]) -> bool {
        let size = ((t[2] - t[0]) + (t[3] - t[1])) / 2.0;
        let (dx, dy) = (
            (b[0] + b[2] - t[0] - t[2]) / 2.0,
            (b[1] + b[3] - t[1] - t[3]) / 2.0,
        );
        (dx * dx + dy * dy).sqrt() > self.cfg.max_jump * size
    }

    fn crop(&self, t: &[f32; 4], width: usize, height: usize) -> Crop {
        let (w, h) = (width as f32, height as f32);
        let b = FaceBox {
            x0: t[0].clamp(0.0, w),
            y0: t[1].clamp(0.0, h),
            x1: t[2].clamp(0.0, w),
            y1: (t[3] + self.cfg.chin_px).clamp(0.0, h),
        };
        // A box squeezed to almost nothing at the frame's edge is no face to re-render.
        if b.x1 - b.x0 < 16.0 || b.y1 - b.y0 < 16.0 {
            return Crop::NoFace;
        }
        let relative = self
            .marks
            .map(|[x, y]| [(x - b.x0) / (b.x1 - b.x0), (y - b.y0) / (b.y1 - b.y0)]);
        Crop::Face(b, LowerFace::from_landmarks(&relative))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A face with its landmarks where an upright face has them.
    fn face(x: f32, y: f32, size: f32, score: f32) -> Face {
        let at = |u: f32, v: f32| [x + u * size, y + v * size];
        Face {
            box_xyxy: [x, y, x + size, y + size],
            score,
            landmarks: [
                at(0.3, 0.35),
                at(0.7, 0.35),
                at(0.5, 0.55),
                at(0.35, 0.75),
                at(0.65, 0.75),
            ],
        }
    }

    #[test]
    fn detections_are_smoothed_and_the_crop_reaches_below_the_chin() {
        let mut t = FaceTracker::new(TrackerConfig::default());
        assert!(t.wants_detection());
        let c = t.update(Some(&[face(100.0, 80.0, 120.0, 0.99)]), 640, 480);
        let Crop::Face(b, mask) = c else {
            panic!("no face")
        };
        assert_eq!(
            b,
            FaceBox {
                x0: 100.0,
                y0: 80.0,
                x1: 220.0,
                y1: 210.0
            }
        );
        // The mask starts at the nose (66 px down the 130 px crop) and spans past the mouth.
        assert!((mask.top - 66.0 / 130.0).abs() < 1e-5, "{mask:?}");
        assert!((mask.left - 0.125).abs() < 1e-5 && (mask.right - 0.875).abs() < 1e-5);
        // Between detector runs the box holds still.
        for _ in 0..4 {
            assert!(!t.wants_detection());
            let held = t.update(None, 640, 480);
            assert_eq!(held, c);
        }
        assert!(t.wants_detection());
        // A 6 px jitter moves the crop 3 px (smoothing 0.5), not 6.
        let Crop::Face(b, _) = t.update(Some(&[face(106.0, 80.0, 120.0, 0.98)]), 640, 480) else {
            panic!("face lost")
        };
        assert_eq!(b.x0, 103.0);
        // A far jump (another place in the frame) replaces the track at once.
        let Crop::Face(b, _) = t.update(Some(&[face(400.0, 200.0, 120.0, 0.97)]), 640, 480) else {
            panic!("face lost")
        };
        assert_eq!(b.x0, 400.0);
    }

    #[test]
    fn a_face_that_leaves_passes_frames_through_and_is_found_again() {
        let mut t = FaceTracker::new(TrackerConfig::default());
        t.update(Some(&[face(100.0, 80.0, 120.0, 0.99)]), 640, 480);
        // One empty detector run is tolerated, the second drops the face.
        assert!(matches!(t.update(Some(&[]), 640, 480), Crop::Face(..)));
        // A weak detection does not count as the face.
        assert_eq!(
            t.update(Some(&[face(100.0, 80.0, 120.0, 0.5)]), 640, 480),
            Crop::NoFace
        );
        // Without a track the detector runs on every frame.
        assert!(t.wants_detection());
        assert_eq!(t.update(Some(&[]), 640, 480), Crop::NoFace);
        let back = t.update(Some(&[face(300.0, 100.0, 100.0, 0.95)]), 640, 480);
        let Crop::Face(b, _) = back else {
            panic!("not found again")
        };
        assert_eq!(
            b,
            FaceBox {
                x0: 300.0,
                y0: 100.0,
                x1: 400.0,
                y1: 210.0
            }
        );
        // A face cut by the frame's edge is clamped into it; a sliver of one is no face.
        assert!(matches!(
            t.update(Some(&[face(600.0, 100.0, 100.0, 0.95)]), 640, 480),
            Crop::Face(FaceBox { x1: 640.0, .. }, _)
        ));
        assert_eq!(
            t.update(Some(&[face(632.0, 300.0, 100.0, 0.95)]), 640, 480),
            Crop::NoFace
        );
    }

    #[test]
    fn a_doubtful_face_is_looked_for_on_every_frame() {
        let mut t = FaceTracker::new(TrackerConfig::default());
        // Good enough to track (>= 0.9), not to trust for five frames (< 0.97).
        assert!(matches!(
            t.update(Some(&[face(100.0, 80.0, 120.0, 0.93)]), 640, 480),
            Crop::Face(..)
        ));
        assert!(t.wants_detection());
        assert!(matches!(t.update(None, 640, 480), Crop::Face(..)));
        assert!(t.wants_detection());
        // A confident detection: every fifth frame again.
        t.update(Some(&[face(100.0, 80.0, 120.0, 0.99)]), 640, 480);
        assert!(!t.wants_detection());
        // Landmarks smooth like the box: a nose 6 px lower moves the mask's top half as far.
        let Crop::Face(_, before) = t.update(None, 640, 480) else {
            panic!("lost")
        };
        let mut lower = face(100.0, 80.0, 120.0, 0.99);
        lower.landmarks[2][1] += 6.0;
        let Crop::Face(_, after) = t.update(Some(&[lower]), 640, 480) else {
            panic!("lost")
        };
        assert!(
            (after.top - before.top - 3.0 / 130.0).abs() < 1e-5,
            "{before:?} {after:?}"
        );
    }
}

//! A session's model-input preparation, on a thread of its own: audio features (a whisper
//! window per hop — ~0.2 s on a busy CPU, a round trip to the GPU otherwise), the face crops (or,
//! where the GPU crops and blends, the face's region of the frame), and the hand-off to the
//! renderer. The media worker only queues work here, so it keeps releasing
//! audio and frames on time while a window is being encoded.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use lipstream_engines::avatar::mask_lower_half;
use lipstream_engines::image::{self, FaceBox, LowerFace};
use lipstream_engines::models::musetalk::CROP;
use lipstream_engines::{EngineError, Tensor};

use crate::lipsync::avatar::AvatarAssets;
use crate::lipsync::renderer::{Job, Missed, Output, Renderer};
use crate::lipsync::slots::SessionSlots;
use crate::lipsync::AudioFeed;
use crate::media::frame::VideoFrame;
use crate::media::stage::{Completion, Rendered, StageOutput};
use crate::metrics::Metrics;

/// About five seconds of audio packets and frames: beyond that the session is too far behind
/// for its frames to be rendered in time anyway.
const QUEUE: usize = 400;

/// What a frame brings besides its audio.
pub(crate) enum Inputs {
    /// Camera mode: the frame, its face box and blend mask (cropped here, or on the GPU).
    Camera {
        frame: VideoFrame,
        face: FaceBox,
        mask: LowerFace,
    },
    /// Avatar mode: frame `index` of the clip (its prepared latents, and where the GPU blends:
    /// its picture, box and mask), the mouth shown at `strength`.
    Avatar {
        clip: Arc<AvatarAssets>,
        index: usize,
        strength: f32,
    },
}

enum Msg {
    Attach(Completion),
    Audio(f64, Vec<i16>),
    Frame {
        ticket: u64,
        frame_ms: f64,
        deadline: Instant,
        inputs: Inputs,
    },
}

/// More frames than this at the renderer at once means results were lost on the way back.
const MAX_IN_FLIGHT: usize = 256;

/// The stage's end of a session's preparation thread (dropping it ends the thread), with what
/// the stage keeps of each frame at the renderer (`T`: its face box, its mouth strength) until
/// the result comes back.
pub(crate) struct Prep<T> {
    tx: SyncSender<Msg>,
    hop_frames: usize,
    in_flight: HashMap<u64, T>,
    next_ticket: u64,
    metrics: Arc<Metrics>,
    /// Counts this session on its renderer's GPU while it lives (placement).
    _placed: crate::lipsync::renderer::Placed,
}

impl<T> Prep<T> {
    pub fn start(
        renderer: Arc<Renderer>,
        hop_frames: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread_metrics = metrics.clone();
        let (placed, slots) = renderer.place_session();
        std::thread::Builder::new()
            .name("lipsync-prep".into())
            .spawn(move || {
                run(
                    rx,
                    renderer,
                    AudioFeed::new(hop_frames),
                    thread_metrics,
                    slots,
                )
            })?;
        Ok(Prep {
            tx,
            hop_frames,
            in_flight: HashMap::new(),
            next_ticket: 0,
            metrics,
            _placed: placed,
        })
    }

    /// Audio a frame waits for past its own time (the stage's `audio_after_ms`).
    pub fn lookahead_ms(&self) -> f64 {
        AudioFeed::lookahead_ms(self.hop_frames)
    }

    pub fn attach(&self, done: Completion) {
        let _ = self.tx.try_send(Msg::Attach(done));
    }

    /// Audio on the session clock; dropped when the thread is that far behind (the feed fills
    /// the gap with silence).
    pub fn audio(&self, at_ms: f64, pcm: &[i16]) {
        let _ = self.tx.try_send(Msg::Audio(at_ms, pcm.to_vec()));
    }

    /// Queues a frame for the renderer, keeping `keep` for its return: `Pending`, or
    /// `Unchanged` (counted late) when the thread is too far behind to take it.
    pub fn submit(
        &mut self,
        keep: T,
        frame_ms: f64,
        deadline: Instant,
        inputs: Inputs,
    ) -> StageOutput {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let msg = Msg::Frame {
            ticket,
            frame_ms,
            deadline,
            inputs,
        };
        if self.tx.try_send(msg).is_err() {
            self.metrics.frames_late.inc();
            return StageOutput::Unchanged;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // Frames whose results never came back: forget the oldest.
            let oldest = ticket.saturating_sub(MAX_IN_FLIGHT as u64 / 2);
            self.in_flight.retain(|&t, _| t >= oldest);
        }
        self.in_flight.insert(ticket, keep);
        StageOutput::Pending(ticket)
    }

    /// A result back from the renderer: the rendered face blended into a copy of `frame` inside
    /// the box, under the mask (at the strength) `place` gives for what was kept, or `Unchanged`.
    pub fn finish(
        &mut self,
        ticket: u64,
        result: Rendered,
        frame: &VideoFrame,
        place: impl FnOnce(T) -> (FaceBox, LowerFace, f32),
    ) -> StageOutput {
        // Frames before this one went out late: what was kept for them goes too.
        self.in_flight.retain(|&t, _| t >= ticket);
        let Some(keep) = self.in_flight.remove(&ticket) else {
            return StageOutput::Unchanged;
        };
        match result {
            Rendered::Face(face) if face.shape == [3, CROP, CROP] => {
                self.metrics.frames_rendered.inc();
                let (b, mask, strength) = place(keep);
                let mut out = frame.clone();
                image::blend_with(&mut out.planes_mut(), &face, &b, &mask, strength);
                StageOutput::Frame(out)
            }
            Rendered::Blended(region, pixels) => {
                let mut out = frame.clone();
                if region.copy_in(&pixels, &mut out.planes_mut()) {
                    self.metrics.frames_rendered.inc();
                    StageOutput::Frame(out)
                } else {
                    tracing::warn!(
                        "a blended face region {region:?} of {} bytes does not fit its {}x{} frame",
                        pixels.len(),
                        frame.width,
                        frame.height
                    );
                    self.metrics.frames_failed.inc();
                    StageOutput::Unchanged
                }
            }
            _ => StageOutput::Unchanged,
        }
    }
}

fn run(
    rx: Receiver<Msg>,
    renderer: Arc<Renderer>,
    mut feed: AudioFeed,
    metrics: Arc<Metrics>,
    mut slots: SessionSlots,
) {
    let mut done: Option<Completion> = None;
    for msg in rx {
        match msg {
            Msg::Attach(d) => done = Some(d),
            Msg::Audio(at_ms, pcm) => {
                let restarts = feed.restarts;
                feed.push(at_ms, &pcm);
                if feed.restarts > restarts {
                    tracing::info!(
                        "audio jumped on the session clock; whisper features start over"
                    );
                }
            }
            Msg::Frame {
                ticket,
                frame_ms,
                deadline,
                inputs,
            } => {
                let reply = |r: Rendered| {
                    if let Some(d) = &done {
                        d.done(ticket, r);
                    }
                };
                let t0 = Instant::now();
                let encodes = feed.stream.encodes;
                let prompt = match feed
                    .frame_index(frame_ms)
                    .map(|i| prompt(&mut feed, &renderer, i))
                {
                    Some(Ok(Some(p))) => p,
                    None | Some(Ok(None)) => {
                        metrics.frames_audio_short.inc();
                        reply(Rendered::Unchanged);
                        continue;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("audio features failed: {e}");
                        metrics.frames_failed.inc();
                        reply(Rendered::Unchanged);
                        continue;
                    }
                };
                let t1 = Instant::now();
                let Some(mut slot) = slots.take() else {
                    // Every slot of this session is still at the renderer: this frame could
                    // not be rendered in time anyway.
                    tracing::debug!("no free input slot: the frame is given up");
                    reply(Rendered::Late);
                    continue;
                };
                let mut face_set = Ok(());
                let model_inputs = match inputs {
                    // The GPU crops the face from the slot's region.
                    Inputs::Camera { frame, face, mask } if renderer.faces_on_gpu => {
                        face_set = slot.set_face(&frame.planes(), face, mask, 1.0);
                        vec![prompt]
                    }
                    Inputs::Camera { frame, face, .. } => {
                        let reference = image::crop(&frame.planes(), &face, CROP);
                        vec![mask_lower_half(&reference), reference, prompt]
                    }
                    Inputs::Avatar {
                        clip,
                        index,
                        strength,
                    } => {
                        if renderer.faces_on_gpu {
                            face_set = clip.set_face(&mut slot, index, strength);
                        }
                        match clip.latents(index) {
                            Some(latents) => vec![latents.clone(), prompt],
                            None => {
                                face_set = Err(format!("the clip has no frame {index}"));
                                Vec::new()
                            }
                        }
                    }
                };
                let written = face_set.and_then(|()| {
                    model_inputs
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, t)| slot.write(&renderer.layout, i, &t.data))
                });
                if let Err(e) = written {
                    tracing::warn!("model inputs do not fit the renderer's slots: {e}");
                    slots.put_back(slot);
                    metrics.frames_failed.inc();
                    reply(Rendered::Unchanged);
                    continue;
                }
                tracing::debug!(
                    audio_ms = (t1 - t0).as_secs_f64() * 1e3,
                    whisper = feed.stream.encodes > encodes,
                    crop_ms = t1.elapsed().as_secs_f64() * 1e3,
                    "frame submitted"
                );
                let done = done.clone();
                renderer.submit(
                    Job {
                        slot,
                        reply: Box::new(move |result| {
                            if let Some(done) = done {
                                done.done(
                                    ticket,
                                    match result {
                                        Ok(Output::Face(face)) => Rendered::Face(face),
                                        Ok(Output::Blended(r, pixels)) => {
                                            Rendered::Blended(r, pixels)
                                        }
                                        Err(Missed::Late) => Rendered::Late,
                                        Err(Missed::Failed(why)) => Rendered::Failed(why),
                                    },
                                );
                            }
                        }),
                    },
                    deadline,
                );
            }
        }
    }
}

/// The audio prompt of frame `index`, encoding a whisper window when its hop needs one.
fn prompt(
    feed: &mut AudioFeed,
    renderer: &Renderer,
    index: usize,
) -> Result<Option<Tensor>, EngineError> {
    feed.stream.prompt(index, |mel, rows| {
        renderer
            .encode_audio(mel, rows)
            .map_err(|e| EngineError::Executor(format!("{e:#}")))
    })
}

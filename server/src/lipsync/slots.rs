//! Fixed input slots between the sessions and their renderer.
//!
//! Each session owns a ring of slots allocated once when it is placed: one slot holds one frame's
//! model inputs in fp16, laid out as the engine takes them (camera: masked crop, reference crop,
//! audio prompt; avatar: latents, audio prompt). The session's preparation thread takes a free
//! slot, converts its inputs straight into it and submits it; the renderer copies the batch's
//! slots into its page-locked staging and gives each slot back to its session's ring. Nothing is
//! allocated per frame, the fp16 conversion runs on the sessions' threads instead of the one
//! renderer thread, and a session can never hold more than its slots: a session that far behind
//! has its next frames given up.
//!
//! The rings are `ringbuf`'s lock-free single-producer single-consumer queues: only the renderer
//! thread gives slots back, only the session's preparation thread takes them.
//!
//! Where the renderer crops and blends faces on the GPU (camera mode on CUDA), a slot carries
//! the frame's face region instead of the two crops: its packed I420 pixels (a buffer that grows
//! to the largest face the session has shown, then is reused), the box and the blend mask.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use half::f16;
use half::slice::HalfFloatSliceExt;
use lipstream_engines::image::{FaceBox, LowerFace, Planes, Region};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

/// Slots per session for a frame budget: a frame reaches the renderer once its audio is in and
/// must be done within the budget, so a session has at most a budget's worth of 25 fps frames
/// there; four more absorb the preparation thread's jitter. Only a session whose frames are
/// late anyway runs out.
pub fn per_session(frame_budget: Duration) -> usize {
    (frame_budget.as_secs_f64() * 25.0).ceil() as usize + 4
}

/// Where each input sits in a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Each input's shape, without the batch axis, in the engine's input order.
    pub shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    len: usize,
}

impl Layout {
    pub fn new(shapes: Vec<Vec<usize>>) -> Self {
        let mut offsets = Vec::with_capacity(shapes.len());
        let mut len = 0;
        for s in &shapes {
            offsets.push(len);
            len += s.iter().product::<usize>();
        }
        Layout {
            shapes,
            offsets,
            len,
        }
    }

    /// Values in one slot.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Input `i`'s values within a slot.
    pub fn range(&self, i: usize) -> Range<usize> {
        match (self.offsets.get(i), self.shapes.get(i)) {
            (Some(&o), Some(s)) => o..o + s.iter().product::<usize>(),
            _ => 0..0,
        }
    }
}

/// A slot's memory, going round between a session and the renderer.
pub struct Buffers {
    data: Box<[f16]>,
    pixels: Vec<u8>,
}

/// A frame's face for the GPU's crop and blend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    pub region: Region,
    pub face: FaceBox,
    pub mask: LowerFace,
    /// How strongly the rendered face replaces the frame's (0..1).
    pub strength: f32,
}

/// One frame's inputs on their way to the renderer.
pub struct Slot {
    session: u64,
    bufs: Buffers,
    face: Option<Face>,
}

impl Slot {
    /// Writes input `i`, converted to fp16; `values` must be exactly its size.
    pub fn write(&mut self, layout: &Layout, i: usize, values: &[f32]) -> Result<(), String> {
        let r = layout.range(i);
        let data = &mut self.bufs.data;
        if r.is_empty() || values.len() != r.len() || r.end > data.len() {
            return Err(format!(
                "input {i} has {} values; its slot holds {}",
                values.len(),
                r.len()
            ));
        }
        data[r].convert_from_f32_slice(values);
        Ok(())
    }

    /// Takes the face region of `frame` around `face` (see `Region`), with the blend's `mask`
    /// and `strength`.
    pub fn set_face(
        &mut self,
        frame: &Planes,
        face: FaceBox,
        mask: LowerFace,
        strength: f32,
    ) -> Result<(), String> {
        self.face = None;
        let region = Region::around(&face, frame.width, frame.height).ok_or_else(|| {
            format!(
                "no face region for {face:?} in a {}x{} frame",
                frame.width, frame.height
            )
        })?;
        if !region.copy_out(frame, &mut self.bufs.pixels) {
            return Err(format!(
                "a {}x{} frame with planes of {}, {}, {} bytes",
                frame.width,
                frame.height,
                frame.y.len(),
                frame.u.len(),
                frame.v.len()
            ));
        }
        self.face = Some(Face {
            region,
            face,
            mask,
            strength,
        });
        Ok(())
    }

    /// The whole slot, inputs one after the other.
    pub fn data(&self) -> &[f16] {
        &self.bufs.data
    }

    /// The face set by `set_face`, with its packed pixels.
    pub fn face(&self) -> Option<(&Face, &[u8])> {
        self.face.as_ref().map(|f| (f, self.bufs.pixels.as_slice()))
    }
}

/// A session's end of its ring: it takes free slots.
pub struct SessionSlots {
    session: u64,
    free: HeapCons<Buffers>,
    /// Slots taken but not sent (their frame failed before the renderer): used first.
    kept: Vec<Buffers>,
}

impl SessionSlots {
    /// A free slot, or none when every slot is at the renderer.
    pub fn take(&mut self) -> Option<Slot> {
        self.kept
            .pop()
            .or_else(|| self.free.try_pop())
            .map(|bufs| Slot {
                session: self.session,
                bufs,
                face: None,
            })
    }

    /// A slot taken for a frame that then never went to the renderer.
    pub fn put_back(&mut self, slot: Slot) {
        self.kept.push(slot.bufs);
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.free.occupied_len() + self.kept.len()
    }
}

/// Makes session `session`'s ring of `slots` slots (all free) for `layout`: the session's end,
/// and the end the renderer gives slots back through.
pub fn ring(session: u64, layout: &Layout, slots: usize) -> (SessionSlots, HeapProd<Buffers>) {
    let (mut back, free) = HeapRb::new(slots.max(1)).split();
    for _ in 0..slots.max(1) {
        // Cannot fail: the ring was made this size.
        let _ = back.try_push(Buffers {
            data: vec![f16::ZERO; layout.len()].into_boxed_slice(),
            pixels: Vec::new(),
        });
    }
    (
        SessionSlots {
            session,
            free,
            kept: Vec::new(),
        },
        back,
    )
}

/// The renderer's ends of every session's ring.
#[derive(Default)]
pub struct Returns {
    rings: HashMap<u64, HeapProd<Buffers>>,
}

impl Returns {
    pub fn add(&mut self, session: u64, back: HeapProd<Buffers>) {
        self.rings.insert(session, back);
    }

    /// The session ended: its slots still at the renderer are freed when they come back.
    pub fn remove(&mut self, session: u64) {
        self.rings.remove(&session);
    }

    /// Puts a used slot back in its session's ring.
    pub fn give_back(&mut self, slot: Slot) {
        if let Some(back) = self.rings.get_mut(&slot.session) {
            // A ring never holds more slots than it was made with, so this cannot be full.
            let _ = back.try_push(slot.bufs);
        }
    }

    pub fn sessions(&self) -> usize {
        self.rings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_round_between_a_session_and_the_renderer() {
        let layout = Layout::new(vec![vec![2, 2], vec![3]]);
        assert_eq!(
            (layout.len(), layout.range(0), layout.range(1)),
            (7, 0..4, 4..7)
        );
        assert_eq!(layout.range(2), 0..0);
        assert_eq!(per_session(Duration::from_millis(80)), 6);
        assert_eq!(per_session(Duration::from_secs(3)), 79);
        let (mut session, back) = ring(7, &layout, 2);
        let mut returns = Returns::default();
        returns.add(7, back);

        let mut a = session.take().unwrap();
        a.write(&layout, 0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        a.write(&layout, 1, &[0.5, -0.25, 65504.0]).unwrap();
        let b = session.take().unwrap();
        // Both slots are at the renderer: the next frame finds none.
        assert!(session.take().is_none());
        assert_eq!(
            a.data().iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
            vec![1.0, 2.0, 3.0, 4.0, 0.5, -0.25, 65504.0]
        );
        // Wrong sizes are refused, naming both.
        let err = a.write(&layout, 1, &[1.0]).unwrap_err();
        assert!(err.contains("1 values") && err.contains("holds 3"), "{err}");
        assert!(a.write(&layout, 5, &[]).is_err());
        // A slot whose frame never left is put back, and taken first.
        session.put_back(b);
        assert_eq!(session.free(), 1);
        let b = session.take().unwrap();
        assert_eq!(session.free(), 0);

        returns.give_back(a);
        assert_eq!(session.free(), 1);
        // The slot comes back as it was written: the next frame overwrites what it uses.
        let again = session.take().unwrap();
        assert_eq!(again.data()[6].to_f32(), 65504.0);

        // After the session ends, its slots still in flight are dropped, not returned.
        returns.remove(7);
        returns.give_back(b);
        returns.give_back(again);
        assert_eq!(returns.sessions(), 0);
        assert_eq!(session.free(), 0);
    }

    #[test]
    fn a_slot_carries_a_face_region_and_keeps_its_pixel_buffer() {
        let layout = Layout::new(vec![vec![2]]);
        let (mut session, back) = ring(3, &layout, 1);
        let mut returns = Returns::default();
        returns.add(3, back);
        let (w, h) = (64usize, 48usize);
        let y: Vec<u8> = (0..w * h).map(|i| (i % 251) as u8).collect();
        let (u, v) = (vec![90u8; 32 * 24], vec![160u8; 32 * 24]);
        let frame = Planes {
            width: w,
            height: h,
            y: &y,
            u: &u,
            v: &v,
        };
        let b = FaceBox {
            x0: 10.0,
            y0: 8.0,
            x1: 40.0,
            y1: 44.0,
        };
        let mut slot = session.take().unwrap();
        assert!(slot.face().is_none());
        slot.set_face(&frame, b, LowerFace::DEFAULT, 1.0).unwrap();
        let (face, pixels) = slot.face().unwrap();
        assert_eq!(face.region, Region::around(&b, w, h).unwrap());
        assert_eq!(pixels.len(), face.region.bytes());
        // Luma row 0 of the region is the frame's row at its origin.
        let r = face.region;
        assert_eq!(
            &pixels[..r.width],
            &y[r.y * w + r.x..r.y * w + r.x + r.width]
        );
        let capacity = slot.bufs.pixels.capacity();
        returns.give_back(slot);
        // The buffer comes back with the slot; a new frame's face replaces the old one, and a
        // frame whose planes are short is refused without a face left behind.
        let mut slot = session.take().unwrap();
        assert!(slot.face().is_none());
        assert_eq!(slot.bufs.pixels.capacity(), capacity);
        let short = Planes {
            width: w,
            height: h,
            y: &y[..100],
            u: &u,
            v: &v,
        };
        assert!(slot.set_face(&short, b, LowerFace::DEFAULT, 1.0).is_err());
        assert!(slot.face().is_none());
        let nan = FaceBox { x0: f32::NAN, ..b };
        assert!(slot.set_face(&frame, nan, LowerFace::DEFAULT, 1.0).is_err());
    }

    #[test]
    fn sessions_get_their_own_slots_back() {
        let layout = Layout::new(vec![vec![1]]);
        let mut returns = Returns::default();
        let (mut s1, b1) = ring(1, &layout, 1);
        let (mut s2, b2) = ring(2, &layout, 1);
        returns.add(1, b1);
        returns.add(2, b2);
        let (x, y) = (s1.take().unwrap(), s2.take().unwrap());
        returns.give_back(y);
        assert_eq!((s1.free(), s2.free()), (0, 1));
        returns.give_back(x);
        assert_eq!((s1.free(), s2.free()), (1, 1));
    }
}

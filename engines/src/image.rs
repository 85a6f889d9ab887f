//! The face path's pixel operations, as the CPU reference the CUDA kernels are checked against:
//! an I420 frame's face box resampled (bilinear) to the model's 256x256 RGB input in [-1, 1], and
//! the model's face blended back into the I420 frame under a feathered lower-face mask.
//!
//! Colour: BT.601 limited range, what openh264 and browsers use for these streams. Coordinates:
//! pixel i covers [i, i+1), its centre is i + 0.5; a box is [x0, x1) x [y0, y1) in luma pixels.

use crate::tensor::Tensor;

/// A face box in luma pixels (MuseTalk 1.5's crop: the detector's box with y1 pushed 10 px down).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaceBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// An I420 picture with packed planes (luma stride = width, chroma stride = ceil(width / 2)).
pub struct Planes<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
}

/// The same, writable.
pub struct PlanesMut<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a mut [u8],
    pub u: &'a mut [u8],
    pub v: &'a mut [u8],
}

/// BT.601 limited-range YUV (0..255) to RGB in 0..255 (not clamped).
pub fn yuv_to_rgb(y: f32, u: f32, v: f32) -> [f32; 3] {
    let (c, d, e) = (y - 16.0, u - 128.0, v - 128.0);
    [
        1.164 * c + 1.596 * e,
        1.164 * c - 0.392 * d - 0.813 * e,
        1.164 * c + 2.017 * d,
    ]
}

/// RGB in [0, 1] to BT.601 limited-range YUV (0..255, not rounded).
pub fn rgb_to_yuv(r: f32, g: f32, b: f32) -> [f32; 3] {
    [
        16.0 + 65.481 * r + 128.553 * g + 24.966 * b,
        128.0 - 37.797 * r - 74.203 * g + 112.0 * b,
        128.0 + 112.0 * r - 93.786 * g - 18.214 * b,
    ]
}

/// The whole picture as packed 8-bit RGB (rows of `width` x 3), e.g. for the face detector.
/// Row by row, without a libm rounding call per channel: the same bytes as rounding each
/// channel with `f32::round` but for one-ulp edge cases (at most 1 apart).
pub fn to_rgb(frame: &Planes, out: &mut Vec<u8>) {
    let (w, h) = (frame.width, frame.height);
    let cw = w.div_ceil(2);
    out.clear();
    if frame.y.len() < w * h || frame.u.len().min(frame.v.len()) < cw * h.div_ceil(2) {
        return;
    }
    out.resize(w * h * 3, 0);
    // Rounding without a libm call per channel: the value is clamped first, so it is never
    // negative and `as u8` truncates.
    let byte = |v: f32| (v.clamp(0.0, 255.0) + 0.5) as u8;
    for (y, dst) in out.chunks_exact_mut(w * 3).enumerate() {
        let luma = &frame.y[y * w..][..w];
        let (u, v) = (
            &frame.u[(y / 2) * cw..][..cw],
            &frame.v[(y / 2) * cw..][..cw],
        );
        // Two pixels per chroma sample (the last one alone in an odd width).
        for (((pair, ys), &cu), &cv) in dst.chunks_mut(6).zip(luma.chunks(2)).zip(u).zip(v) {
            let (d, e) = (f32::from(cu) - 128.0, f32::from(cv) - 128.0);
            let (rv, gu, gv, bu) = (1.596 * e, 0.392 * d, 0.813 * e, 2.017 * d);
            for (px, &yy) in pair.chunks_exact_mut(3).zip(ys) {
                // yuv_to_rgb's terms, in its order.
                let c = 1.164 * (f32::from(yy) - 16.0);
                px[0] = byte(c + rv);
                px[1] = byte(c - gu - gv);
                px[2] = byte(c + bu);
            }
        }
    }
}

/// One axis of a bilinear resample (edges clamp): for output index `o`, the source position is
/// `(start + (o + 0.5) * step) / scale`, minus half a sample; gives the two source indices and
/// the second one's weight. The pixel loops below then do no coordinate work per pixel, and
/// compute exactly what sampling each pixel's position on its own would.
fn taps(start: f32, step: f32, scale: f32, n_out: usize, n_src: usize) -> Vec<(usize, usize, f32)> {
    let last = n_src.saturating_sub(1);
    (0..n_out)
        .map(|o| {
            let pos = (start + (o as f32 + 0.5) * step) / scale;
            let f = (pos - 0.5).clamp(0.0, last as f32);
            let i = f.floor() as usize;
            (i, (i + 1).min(last), f - i as f32)
        })
        .collect()
}

/// Bilinear interpolation between a row pair (`r0`, `r1`) at column taps `x`, row weight `ay`.
#[inline]
fn lerp2(plane: &[u8], r0: usize, r1: usize, x: (usize, usize, f32), ay: f32) -> f32 {
    let p = |i: usize| f32::from(plane[i]);
    let (x0, x1, ax) = x;
    let top = p(r0 + x0) * (1.0 - ax) + p(r0 + x1) * ax;
    let bottom = p(r1 + x0) * (1.0 - ax) + p(r1 + x1) * ax;
    top * (1.0 - ay) + bottom * ay
}

/// The box resampled to `size` x `size` RGB, [3, size, size] in [-1, 1] (x / 127.5 - 1).
pub fn crop(frame: &Planes, b: &FaceBox, size: usize) -> Tensor {
    let (w, h) = (frame.width, frame.height);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let (sx, sy) = ((b.x1 - b.x0) / size as f32, (b.y1 - b.y0) / size as f32);
    let mut out = vec![0f32; 3 * size * size];
    if w == 0 || h == 0 || frame.y.len() < w * h || frame.u.len().min(frame.v.len()) < cw * ch {
        return Tensor::new(vec![3, size, size], out);
    }
    let (lx, ly) = (taps(b.x0, sx, 1.0, size, w), taps(b.y0, sy, 1.0, size, h));
    let (cx, cy) = (taps(b.x0, sx, 2.0, size, cw), taps(b.y0, sy, 2.0, size, ch));
    let plane = size * size;
    for oy in 0..size {
        let (l0, l1, lay) = ly[oy];
        let (c0, c1, cay) = cy[oy];
        let (l0, l1, c0, c1) = (l0 * w, l1 * w, c0 * cw, c1 * cw);
        for ox in 0..size {
            let yy = lerp2(frame.y, l0, l1, lx[ox], lay);
            let u = lerp2(frame.u, c0, c1, cx[ox], cay);
            let v = lerp2(frame.v, c0, c1, cx[ox], cay);
            let rgb = yuv_to_rgb(yy, u, v);
            let at = oy * size + ox;
            for (c, val) in rgb.iter().enumerate() {
                out[c * plane + at] = val.clamp(0.0, 255.0) / 127.5 - 1.0;
            }
        }
    }
    Tensor::new(vec![3, size, size], out)
}

/// The rectangle of a frame that the crop of a face box reads and its blend writes, with
/// two pixels to spare for the bilinear taps of both planes. The GPU path moves only this part
/// of a frame: packed as its luma rows, then its U rows, then its V rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The whole frame's size.
    pub frame_width: usize,
    pub frame_height: usize,
    /// Luma origin (even, so the chroma origin is exactly half of it) and size.
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

impl Region {
    /// The region of a `w` x `h` frame around `b`; none for an empty frame or a box that is
    /// not finite. A box (partly) outside the frame gives the frame's edge pixels its taps
    /// clamp to.
    pub fn around(b: &FaceBox, w: usize, h: usize) -> Option<Region> {
        let finite = [b.x0, b.y0, b.x1, b.y1].iter().all(|v| v.is_finite());
        if w == 0 || h == 0 || !finite {
            return None;
        }
        let span = |lo: f32, hi: f32, n: usize| {
            let first = ((lo.floor() - 4.0).max(0.0) as usize).min(n - 1) & !1;
            let end = ((hi.ceil() + 4.0).max(0.0) as usize).clamp(first + 1, n);
            (first, end - first)
        };
        let (x, width) = span(b.x0, b.x1, w);
        let (y, height) = span(b.y0, b.y1, h);
        Some(Region {
            frame_width: w,
            frame_height: h,
            x,
            y,
            width,
            height,
        })
    }

    /// The chroma rectangle: origin and size in chroma pixels.
    pub fn chroma(&self) -> (usize, usize, usize, usize) {
        let (x, y) = (self.x / 2, self.y / 2);
        let w = (self.x + self.width).div_ceil(2) - x;
        let h = (self.y + self.height).div_ceil(2) - y;
        (x, y, w, h)
    }

    /// Bytes of the packed region.
    pub fn bytes(&self) -> usize {
        let (_, _, cw, ch) = self.chroma();
        self.width * self.height + 2 * cw * ch
    }

    fn fits(&self, width: usize, height: usize) -> bool {
        self.frame_width == width
            && self.frame_height == height
            && self.x + self.width <= width
            && self.y + self.height <= height
    }

    /// The three planes' rectangles: (plane index 0..3, origin x, origin y, width, height,
    /// frame plane stride).
    fn rects(&self) -> [(usize, usize, usize, usize, usize, usize); 3] {
        let (cx, cy, cw, ch) = self.chroma();
        let stride = self.frame_width.div_ceil(2);
        [
            (0, self.x, self.y, self.width, self.height, self.frame_width),
            (1, cx, cy, cw, ch, stride),
            (2, cx, cy, cw, ch, stride),
        ]
    }

    /// Packs the region of `frame` into `out` (resized to `bytes()`); false when the frame is
    /// not the size the region was made for.
    pub fn copy_out(&self, frame: &Planes, out: &mut Vec<u8>) -> bool {
        let cw = frame.width.div_ceil(2);
        let whole = frame.y.len() >= frame.width * frame.height
            && frame.u.len().min(frame.v.len()) >= cw * frame.height.div_ceil(2);
        if !whole || !self.fits(frame.width, frame.height) {
            return false;
        }
        out.clear();
        out.reserve(self.bytes());
        for (plane, x, y, w, h, stride) in self.rects() {
            let src = [frame.y, frame.u, frame.v][plane];
            for row in y..y + h {
                out.extend_from_slice(&src[row * stride + x..row * stride + x + w]);
            }
        }
        true
    }

    /// Writes a packed region back into `frame`; false (and nothing written) when the sizes do
    /// not match.
    pub fn copy_in(&self, packed: &[u8], frame: &mut PlanesMut) -> bool {
        let cw = frame.width.div_ceil(2);
        let whole = frame.y.len() >= frame.width * frame.height
            && frame.u.len().min(frame.v.len()) >= cw * frame.height.div_ceil(2);
        if !whole || !self.fits(frame.width, frame.height) || packed.len() != self.bytes() {
            return false;
        }
        let mut at = 0;
        for (plane, x, y, w, h, stride) in self.rects() {
            let dst: &mut [u8] = match plane {
                0 => frame.y,
                1 => frame.u,
                _ => frame.v,
            };
            for row in y..y + h {
                dst[row * stride + x..row * stride + x + w].copy_from_slice(&packed[at..at + w]);
                at += w;
            }
        }
        true
    }
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The part of a face box the rendered face replaces, in box-relative units [0, 1]: from `top`
/// (fully in by `top + top_feather`) down to the box's bottom, between `left` and `right`; the
/// sides fade over `side_feather`, the bottom over `bottom_feather`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowerFace {
    pub top: f32,
    pub top_feather: f32,
    pub left: f32,
    pub right: f32,
    pub side_feather: f32,
    pub bottom_feather: f32,
}

impl LowerFace {
    /// Without landmarks: the lower face by proportion, below 45-60 % of the box height, over
    /// the box's width.
    pub const DEFAULT: LowerFace = LowerFace {
        top: 0.45,
        top_feather: 0.15,
        left: 0.0,
        right: 1.0,
        side_feather: 0.1,
        bottom_feather: 0.1,
    };

    /// From MTCNN's five landmarks (left eye, right eye, nose, left and right mouth corner) in
    /// box-relative units: the mask starts at the nose tip and is fully in before the mouth (the
    /// upper lip moves with speech), and reaches three quarters of a mouth width past each
    /// corner, toward the jaw. Landmarks that cannot be a face looking at the camera (eyes below
    /// the nose, the mouth above it, a mouth narrower than a tenth of the box) give `DEFAULT`.
    pub fn from_landmarks(marks: &[[f32; 2]; 5]) -> LowerFace {
        let [eye_l, eye_r, nose, mouth_l, mouth_r] = *marks;
        let mouth_v = (mouth_l[1] + mouth_r[1]) / 2.0;
        let width = mouth_r[0] - mouth_l[0];
        let plausible = marks
            .iter()
            .flatten()
            .all(|c| c.is_finite() && (0.0..=1.0).contains(c))
            && eye_l[1].max(eye_r[1]) < nose[1]
            && nose[1] < mouth_v
            && width > 0.1;
        if !plausible {
            return LowerFace::DEFAULT;
        }
        LowerFace {
            top: nose[1].clamp(0.3, 0.7),
            top_feather: (0.6 * (mouth_v - nose[1])).clamp(0.05, 0.2),
            left: (mouth_l[0] - 0.75 * width).clamp(0.0, 0.4),
            right: (mouth_r[0] + 0.75 * width).clamp(0.6, 1.0),
            side_feather: 0.1,
            bottom_feather: 0.1,
        }
    }

    /// The blend weight at box-relative (u, v).
    pub fn weight(&self, u: f32, v: f32) -> f32 {
        smoothstep(0.0, self.top_feather, v - self.top)
            * smoothstep(0.0, self.side_feather, u - self.left)
            * smoothstep(0.0, self.side_feather, self.right - u)
            * smoothstep(0.0, self.bottom_feather, 1.0 - v)
    }

    /// As six numbers (top, top feather, left, right, side feather, bottom feather): for the GPU
    /// kernel and the avatar bundle.
    pub fn to_array(&self) -> [f32; 6] {
        [
            self.top,
            self.top_feather,
            self.left,
            self.right,
            self.side_feather,
            self.bottom_feather,
        ]
    }

    /// From `to_array`'s numbers; `None` when they cannot describe a mask.
    pub fn from_array(a: [f32; 6]) -> Option<LowerFace> {
        let m = LowerFace {
            top: a[0],
            top_feather: a[1],
            left: a[2],
            right: a[3],
            side_feather: a[4],
            bottom_feather: a[5],
        };
        let ok = a.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v))
            && m.left < m.right
            && [m.top_feather, m.side_feather, m.bottom_feather]
                .iter()
                .all(|&f| f > 0.0);
        ok.then_some(m)
    }
}

/// `LowerFace::DEFAULT`'s weight at box-relative (u, v).
pub fn lower_face_mask(u: f32, v: f32) -> f32 {
    LowerFace::DEFAULT.weight(u, v)
}

/// Blends `face` ([3, size, size] RGB in [0, 1]) into the box of `frame` under the default
/// lower-face mask: luma per pixel, chroma per 2x2 block (sampled at the block's centre).
pub fn blend(frame: &mut PlanesMut, face: &Tensor, b: &FaceBox) {
    blend_with(frame, face, b, &LowerFace::DEFAULT, 1.0);
}

/// `blend` under `mask`, scaled by `strength` in [0, 1]: fades between the frame's own face (0)
/// and the rendered one (1), for transitions in and out of speech.
pub fn blend_with(
    frame: &mut PlanesMut,
    face: &Tensor,
    b: &FaceBox,
    mask: &LowerFace,
    strength: f32,
) {
    let strength = strength.clamp(0.0, 1.0);
    let size = face.shape.get(1).copied().unwrap_or(0);
    let (w, h) = (frame.width, frame.height);
    let (cw, chh) = (w.div_ceil(2), h.div_ceil(2));
    if size == 0
        || face.data.len() < 3 * size * size
        || frame.y.len() < w * h
        || frame.u.len().min(frame.v.len()) < cw * chh
    {
        return;
    }
    // Per column and per row of one plane (`scale` 1: luma, 2: chroma): the box-relative
    // position, the mask's factors there (`LowerFace::weight` is top * left * right * bottom,
    // multiplied in that order below), and the face's bilinear taps. Columns and rows outside
    // the box, or where a factor is 0, are left out: their weight is 0.
    struct Line {
        at: usize,
        a: f32,
        b: f32,
        tap: (usize, usize, f32),
    }
    let lines = |lo: f32, hi: f32, n: usize, scale: f32, row: bool| -> Vec<Line> {
        let extent = hi - lo;
        let first = ((lo / scale).floor().max(0.0) as usize).min(n);
        let end = ((hi / scale).ceil().max(0.0) as usize).min(n);
        (first..end)
            .filter_map(|i| {
                let c = (i as f32 + 0.5) * scale;
                let t = (c - lo) / extent;
                if !(0.0..1.0).contains(&t) {
                    return None;
                }
                let (a, b) = if row {
                    (
                        smoothstep(0.0, mask.top_feather, t - mask.top),
                        smoothstep(0.0, mask.bottom_feather, 1.0 - t),
                    )
                } else {
                    (
                        smoothstep(0.0, mask.side_feather, t - mask.left),
                        smoothstep(0.0, mask.side_feather, mask.right - t),
                    )
                };
                if a <= 0.0 || b <= 0.0 {
                    return None;
                }
                let f = (t * size as f32 - 0.5).clamp(0.0, (size - 1) as f32);
                let k = f.floor() as usize;
                Some(Line {
                    at: i,
                    a,
                    b,
                    tap: (k, (k + 1).min(size - 1), f - k as f32),
                })
            })
            .collect()
    };
    let plane = size * size;
    let face_rgb = |row: &Line, col: &Line| -> [f32; 3] {
        let (y0, y1, ay) = row.tap;
        [0, 1, 2].map(|c| {
            let p = |y: usize, x: usize| face.data[c * plane + y * size + x];
            let (x0, x1, ax) = col.tap;
            let top = p(y0, x0) * (1.0 - ax) + p(y0, x1) * ax;
            let bottom = p(y1, x0) * (1.0 - ax) + p(y1, x1) * ax;
            top * (1.0 - ay) + bottom * ay
        })
    };
    let mixed = |old: u8, want: f32, m: f32| {
        let old = f32::from(old);
        (old + (want - old) * m).round().clamp(0.0, 255.0) as u8
    };
    // One pass per plane (luma: scale 1; chroma: scale 2, U and V together), each pixel the mask
    // reaches given its YUV target and weight. Generic, not `dyn`: the write inlines.
    fn pass(
        rows: &[Line],
        cols: &[Line],
        pw: usize,
        strength: f32,
        face_rgb: &impl Fn(&Line, &Line) -> [f32; 3],
        mut write: impl FnMut(usize, [f32; 3], f32),
    ) {
        for r in rows {
            for c in cols {
                let m = r.a * c.a * c.b * r.b * strength;
                if m <= 0.0 {
                    continue;
                }
                let rgb = face_rgb(r, c);
                write(r.at * pw + c.at, rgb_to_yuv(rgb[0], rgb[1], rgb[2]), m);
            }
        }
    }
    let (rows, cols) = (
        lines(b.y0, b.y1, h, 1.0, true),
        lines(b.x0, b.x1, w, 1.0, false),
    );
    pass(&rows, &cols, w, strength, &face_rgb, |at, yuv, m| {
        frame.y[at] = mixed(frame.y[at], yuv[0], m);
    });
    let (rows, cols) = (
        lines(b.y0, b.y1, chh, 2.0, true),
        lines(b.x0, b.x1, cw, 2.0, false),
    );
    pass(&rows, &cols, cw, strength, &face_rgb, |at, yuv, m| {
        frame.u[at] = mixed(frame.u[at], yuv[1], m);
        frame.v[at] = mixed(frame.v[at], yuv[2], m);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole picture as packed 8-bit RGB (rows of `width` x 3), e.g. for the face detector.
    fn reference_to_rgb(frame: &Planes, out: &mut Vec<u8>) {
        let (w, h) = (frame.width, frame.height);
        let cw = w.div_ceil(2);
        out.clear();
        out.reserve(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let c = (y / 2) * cw + x / 2;
                let rgb = yuv_to_rgb(
                    f32::from(frame.y[y * w + x]),
                    f32::from(frame.u[c]),
                    f32::from(frame.v[c]),
                );
                out.extend(rgb.iter().map(|v| v.round().clamp(0.0, 255.0) as u8));
            }
        }
    }

    #[test]
    fn the_fast_rgb_conversion_is_the_per_pixel_one_within_a_rounding() {
        let mut x = 5u32;
        for (w, h) in [(64usize, 48usize), (97, 61)] {
            let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
            let mut bytes = |n: usize| -> Vec<u8> {
                (0..n)
                    .map(|_| {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (x >> 24) as u8
                    })
                    .collect()
            };
            let (y, u, v) = (bytes(w * h), bytes(cw * ch), bytes(cw * ch));
            let p = Planes {
                width: w,
                height: h,
                y: &y,
                u: &u,
                v: &v,
            };
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            to_rgb(&p, &mut fast);
            reference_to_rgb(&p, &mut slow);
            assert_eq!(fast.len(), slow.len());
            let off = fast.iter().zip(&slow).filter(|(a, b)| a != b).count();
            let worst = fast.iter().zip(&slow).map(|(a, b)| a.abs_diff(*b)).max();
            assert!(
                worst <= Some(1) && off * 1000 <= fast.len(),
                "{off} differ, worst {worst:?}"
            );
        }
    }

    // The per-pixel implementations `crop` and `blend_with` were written as: the loops above
    // must give exactly their bytes and values.
    /// Bilinear sample of a plane at continuous coordinates (edges clamp).
    fn sample(plane: &[u8], w: usize, h: usize, x: f32, y: f32) -> f32 {
        let fx = (x - 0.5).clamp(0.0, (w - 1) as f32);
        let fy = (y - 0.5).clamp(0.0, (h - 1) as f32);
        let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
        let p = |x: usize, y: usize| f32::from(plane[y * w + x]);
        let top = p(x0, y0) * (1.0 - ax) + p(x1, y0) * ax;
        let bottom = p(x0, y1) * (1.0 - ax) + p(x1, y1) * ax;
        top * (1.0 - ay) + bottom * ay
    }

    /// Bilinear sample of face channel `c` ([3, size, size] in [0, 1]) at box-relative (u, v).
    fn face_at(face: &Tensor, size: usize, c: usize, u: f32, v: f32) -> f32 {
        let fx = (u * size as f32 - 0.5).clamp(0.0, (size - 1) as f32);
        let fy = (v * size as f32 - 0.5).clamp(0.0, (size - 1) as f32);
        let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
        let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
        let p = |x: usize, y: usize| face.data[(c * size + y) * size + x];
        let top = p(x0, y0) * (1.0 - ax) + p(x1, y0) * ax;
        let bottom = p(x0, y1) * (1.0 - ax) + p(x1, y1) * ax;
        top * (1.0 - ay) + bottom * ay
    }

    /// The box resampled to `size` x `size` RGB, [3, size, size] in [-1, 1] (x / 127.5 - 1).
    fn reference_crop(frame: &Planes, b: &FaceBox, size: usize) -> Tensor {
        let (w, h) = (frame.width, frame.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (sx, sy) = ((b.x1 - b.x0) / size as f32, (b.y1 - b.y0) / size as f32);
        let mut out = vec![0f32; 3 * size * size];
        for oy in 0..size {
            for ox in 0..size {
                let x = b.x0 + (ox as f32 + 0.5) * sx;
                let y = b.y0 + (oy as f32 + 0.5) * sy;
                let yy = sample(frame.y, w, h, x, y);
                let u = sample(frame.u, cw, ch, x / 2.0, y / 2.0);
                let v = sample(frame.v, cw, ch, x / 2.0, y / 2.0);
                let rgb = yuv_to_rgb(yy, u, v);
                for (c, val) in rgb.iter().enumerate() {
                    out[(c * size + oy) * size + ox] = val.clamp(0.0, 255.0) / 127.5 - 1.0;
                }
            }
        }
        Tensor::new(vec![3, size, size], out)
    }

    fn reference_blend(
        frame: &mut PlanesMut,
        face: &Tensor,
        b: &FaceBox,
        mask: &LowerFace,
        strength: f32,
    ) {
        let strength = strength.clamp(0.0, 1.0);
        let size = face.shape[1];
        let (w, h) = (frame.width, frame.height);
        let (bw, bh) = (b.x1 - b.x0, b.y1 - b.y0);
        let span = |lo: f32, hi: f32, n: usize, scale: f32| {
            ((lo / scale).floor().max(0.0) as usize)..((hi / scale).ceil().max(0.0) as usize).min(n)
        };
        let mix = |plane: &mut [u8], stride: usize, x: usize, y: usize, scale: f32, ch: usize| {
            let (cx, cy) = ((x as f32 + 0.5) * scale, (y as f32 + 0.5) * scale);
            let (u, v) = ((cx - b.x0) / bw, (cy - b.y0) / bh);
            if !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
                return;
            }
            let m = mask.weight(u, v) * strength;
            if m <= 0.0 {
                return;
            }
            let rgb = [0, 1, 2].map(|c| face_at(face, size, c, u, v));
            let want = rgb_to_yuv(rgb[0], rgb[1], rgb[2])[ch];
            let at = y * stride + x;
            let old = f32::from(plane[at]);
            plane[at] = (old + (want - old) * m).round().clamp(0.0, 255.0) as u8;
        };
        for y in span(b.y0, b.y1, h, 1.0) {
            for x in span(b.x0, b.x1, w, 1.0) {
                mix(frame.y, w, x, y, 1.0, 0);
            }
        }
        let (cw, chh) = (w.div_ceil(2), h.div_ceil(2));
        for y in span(b.y0, b.y1, chh, 2.0) {
            for x in span(b.x0, b.x1, cw, 2.0) {
                mix(frame.u, cw, x, y, 2.0, 1);
                mix(frame.v, cw, x, y, 2.0, 2);
            }
        }
    }

    #[test]
    fn the_fast_crop_and_blend_give_exactly_what_per_pixel_sampling_gives() {
        let mut x = 99u32;
        let mut rnd = move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as f32 / (1u32 << 24) as f32
        };
        let mut changed = 0;
        for (w, h) in [(64usize, 48usize), (97, 61), (320, 240)] {
            let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
            let mut bytes =
                |n: usize| -> Vec<u8> { (0..n).map(|_| (rnd() * 255.0) as u8).collect() };
            let (y, u, v) = (bytes(w * h), bytes(cw * ch), bytes(cw * ch));
            for k in 0..12 {
                // Boxes inside, across the edges and past them, at fractional positions.
                let (bw, bh) = (
                    (0.2 + 0.9 * rnd()) * w as f32,
                    (0.2 + 0.9 * rnd()) * h as f32,
                );
                let b = FaceBox {
                    x0: (rnd() - 0.3) * w as f32,
                    y0: (rnd() - 0.3) * h as f32,
                    x1: 0.0,
                    y1: 0.0,
                };
                let b = FaceBox {
                    x1: b.x0 + bw,
                    y1: b.y0 + bh,
                    ..b
                };
                let p = Planes {
                    width: w,
                    height: h,
                    y: &y,
                    u: &u,
                    v: &v,
                };
                let size = [16, 33, 64][k % 3];
                assert_eq!(
                    crop(&p, &b, size),
                    reference_crop(&p, &b, size),
                    "{w}x{h} {b:?}"
                );

                let face = Tensor::new(
                    vec![3, size, size],
                    (0..3 * size * size).map(|_| rnd()).collect(),
                );
                let mask = if k % 2 == 0 {
                    LowerFace::DEFAULT
                } else {
                    LowerFace::from_landmarks(&[
                        [0.3, 0.35],
                        [0.7, 0.35],
                        [0.45 + 0.1 * rnd(), 0.5 + 0.1 * rnd()],
                        [0.3 + 0.05 * rnd(), 0.75],
                        [0.65 + 0.05 * rnd(), 0.78],
                    ])
                };
                let strength = [1.0, 0.37, 0.0][k % 3];
                let (mut fast, mut slow) = (
                    (y.clone(), u.clone(), v.clone()),
                    (y.clone(), u.clone(), v.clone()),
                );
                for (planes, f) in [(&mut fast, true), (&mut slow, false)] {
                    let mut pm = PlanesMut {
                        width: w,
                        height: h,
                        y: &mut planes.0,
                        u: &mut planes.1,
                        v: &mut planes.2,
                    };
                    if f {
                        blend_with(&mut pm, &face, &b, &mask, strength);
                    } else {
                        reference_blend(&mut pm, &face, &b, &mask, strength);
                    }
                }
                assert!(fast == slow, "{w}x{h} {b:?} {mask:?} {strength}");
                changed += usize::from(fast.0 != y && fast.1 != u);
            }
        }
        assert!(changed >= 12, "only {changed} blends changed the frame");
    }

    #[test]
    fn colour_conversion_round_trips() {
        for rgb in [
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [0.8, 0.3, 0.1],
            [0.2, 0.6, 0.9],
        ] {
            let [y, u, v] = rgb_to_yuv(rgb[0], rgb[1], rgb[2]);
            let back = yuv_to_rgb(y, u, v);
            for c in 0..3 {
                assert!(
                    (back[c] / 255.0 - rgb[c]).abs() < 4e-3,
                    "{rgb:?} -> {back:?}"
                );
            }
        }
    }

    #[test]
    fn the_mask_follows_the_landmarks_and_falls_back_without_them() {
        // The default is the proportional lower face it always was.
        for (u, v) in [
            (0.5, 0.3),
            (0.5, 0.52),
            (0.05, 0.8),
            (0.5, 0.95),
            (0.97, 0.7),
        ] {
            let old = smoothstep(0.45, 0.6, v)
                * smoothstep(0.0, 0.1, u)
                * smoothstep(0.0, 0.1, 1.0 - u)
                * smoothstep(0.0, 0.1, 1.0 - v);
            assert!((lower_face_mask(u, v) - old).abs() < 1e-6, "({u}, {v})");
        }
        // A face lower in its box (nose at 0.6, mouth at 0.8): the mask starts at the nose.
        let marks = [
            [0.3, 0.35],
            [0.7, 0.35],
            [0.5, 0.6],
            [0.35, 0.8],
            [0.65, 0.8],
        ];
        let m = LowerFace::from_landmarks(&marks);
        assert!(
            (m.top - 0.6).abs() < 1e-6 && (m.top_feather - 0.12).abs() < 1e-6,
            "{m:?}"
        );
        assert!(
            (m.left - 0.125).abs() < 1e-6 && (m.right - 0.875).abs() < 1e-6,
            "{m:?}"
        );
        assert_eq!(
            m.weight(0.5, 0.55),
            0.0,
            "above the nose stays the frame's own"
        );
        assert!(m.weight(0.5, 0.75) > 0.99, "the mouth is the model's");
        assert_eq!(
            m.weight(0.1, 0.8),
            0.0,
            "the cheek beyond the jaw line stays"
        );
        // Landmarks that are no upright face fall back to the default.
        let upside_down = [[0.3, 0.8], [0.7, 0.8], [0.5, 0.6], [0.35, 0.3], [0.65, 0.3]];
        assert_eq!(LowerFace::from_landmarks(&upside_down), LowerFace::DEFAULT);
        assert_eq!(
            LowerFace::from_landmarks(&[[0.0; 2]; 5]),
            LowerFace::DEFAULT
        );
        let outside = [
            [0.3, 0.35],
            [0.7, 0.35],
            [0.5, 0.6],
            [0.35, 0.8],
            [1.65, 0.8],
        ];
        assert_eq!(LowerFace::from_landmarks(&outside), LowerFace::DEFAULT);
        // Six numbers there and back; nonsense is refused.
        assert_eq!(LowerFace::from_array(m.to_array()), Some(m));
        assert_eq!(LowerFace::from_array([0.5, 0.0, 0.0, 1.0, 0.1, 0.1]), None);
        assert_eq!(LowerFace::from_array([0.5, 0.1, 0.9, 0.2, 0.1, 0.1]), None);
        assert_eq!(
            LowerFace::from_array([f32::NAN, 0.1, 0.0, 1.0, 0.1, 0.1]),
            None
        );
    }

    #[test]
    fn a_crop_of_a_flat_frame_is_flat_and_blending_touches_only_the_lower_face() {
        let (w, h) = (64, 48);
        let (mut y, mut u, mut v) = (
            vec![81u8; w * h],
            vec![90u8; w * h / 4],
            vec![240u8; w * h / 4],
        );
        let b = FaceBox {
            x0: 16.0,
            y0: 8.0,
            x1: 48.0,
            y1: 40.0,
        };
        let c = crop(
            &Planes {
                width: w,
                height: h,
                y: &y,
                u: &u,
                v: &v,
            },
            &b,
            16,
        );
        // YUV (81, 90, 240) is pure red.
        assert!((c.data[0] - 1.0).abs() < 0.02 && (c.data[16 * 16] + 1.0).abs() < 0.02);
        let green = Tensor::new(
            vec![3, 16, 16],
            [0.0f32, 1.0, 0.0]
                .iter()
                .flat_map(|&v| vec![v; 256])
                .collect(),
        );
        blend(
            &mut PlanesMut {
                width: w,
                height: h,
                y: &mut y,
                u: &mut u,
                v: &mut v,
            },
            &green,
            &b,
        );
        let at = |x: usize, yy: usize| y[yy * w + x];
        assert_eq!(at(32, 12), 81, "upper face untouched");
        assert_eq!(at(5, 30), 81, "outside the box untouched");
        let g = rgb_to_yuv(0.0, 1.0, 0.0)[0].round() as u8;
        assert_eq!(at(32, 30), g, "lower face centre replaced");
        let edge = at(17, 30);
        assert!(edge > 81 && edge < g, "feathered edge {edge}");
    }

    #[test]
    fn a_region_holds_every_pixel_the_crop_reads_and_the_blend_writes() {
        let mut seed = 11u32;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 24) as u8
                })
                .collect()
        };
        let mask = LowerFace::from_landmarks(&[
            [0.3, 0.35],
            [0.7, 0.35],
            [0.52, 0.58],
            [0.33, 0.76],
            [0.69, 0.78],
        ]);
        let face = Tensor::new(
            vec![3, 32, 32],
            bytes(3 * 32 * 32)
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect(),
        );
        // Inside, across every edge, odd sizes and odd origins, and wholly outside.
        let cases = [
            (97usize, 61usize, [20.3f32, 11.7, 70.2, 52.9]),
            (96, 64, [-13.0, -7.5, 30.0, 41.0]),
            (97, 61, [60.5, 30.0, 120.0, 75.0]),
            (64, 48, [0.0, 0.0, 64.0, 48.0]),
            (64, 48, [70.0, 50.0, 90.0, 80.0]),
            (65, 49, [-40.0, -30.0, -5.0, -2.0]),
            (33, 17, [1.5, 1.5, 32.5, 16.5]),
            (80, 64, [30.1, 20.05, 50.2, 41.3]),
        ];
        for (w, h, [x0, y0, x1, y1]) in cases {
            let b = FaceBox { x0, y0, x1, y1 };
            let r = Region::around(&b, w, h).unwrap();
            assert_eq!((r.x % 2, r.y % 2), (0, 0), "{r:?}");
            assert!(r.x + r.width <= w && r.y + r.height <= h && r.width * r.height > 0);
            let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
            let (y, u, v) = (bytes(w * h), bytes(cw * ch), bytes(cw * ch));
            let planes = Planes {
                width: w,
                height: h,
                y: &y,
                u: &u,
                v: &v,
            };
            let mut packed = Vec::new();
            assert!(r.copy_out(&planes, &mut packed));
            assert_eq!(packed.len(), r.bytes());
            // The same frame with noise everywhere outside the region.
            let (mut ny, mut nu, mut nv) = (bytes(w * h), bytes(cw * ch), bytes(cw * ch));
            let mut noisy = PlanesMut {
                width: w,
                height: h,
                y: &mut ny,
                u: &mut nu,
                v: &mut nv,
            };
            assert!(r.copy_in(&packed, &mut noisy));
            let noisy = Planes {
                width: w,
                height: h,
                y: &ny,
                u: &nu,
                v: &nv,
            };
            assert_eq!(
                crop(&planes, &b, 16),
                crop(&noisy, &b, 16),
                "crop {w}x{h} {b:?}"
            );
            // A blend changes nothing outside the region: blending the region alone and
            // writing it back gives the whole frame's blend.
            let (mut by, mut bu, mut bv) = (y.clone(), u.clone(), v.clone());
            let mut whole = PlanesMut {
                width: w,
                height: h,
                y: &mut by,
                u: &mut bu,
                v: &mut bv,
            };
            blend_with(&mut whole, &face, &b, &mask, 1.0);
            let (mut ry, mut ru, mut rv) = (ny.clone(), nu.clone(), nv.clone());
            let mut part = PlanesMut {
                width: w,
                height: h,
                y: &mut ry,
                u: &mut ru,
                v: &mut rv,
            };
            blend_with(&mut part, &face, &b, &mask, 1.0);
            let part = Planes {
                width: w,
                height: h,
                y: &ry,
                u: &ru,
                v: &rv,
            };
            assert!(r.copy_out(&part, &mut packed));
            let (mut oy, mut ou, mut ov) = (y.clone(), u.clone(), v.clone());
            let mut out = PlanesMut {
                width: w,
                height: h,
                y: &mut oy,
                u: &mut ou,
                v: &mut ov,
            };
            assert!(r.copy_in(&packed, &mut out));
            assert!(
                (oy, ou, ov) == (by, bu, bv),
                "blend outside the region: {w}x{h} {b:?}"
            );
        }
        // Wrong sizes are refused, not written.
        let r = Region::around(
            &FaceBox {
                x0: 1.0,
                y0: 1.0,
                x1: 9.0,
                y1: 9.0,
            },
            16,
            16,
        )
        .unwrap();
        let (mut y, mut u, mut v) = (vec![0u8; 8 * 8], vec![0u8; 16], vec![0u8; 16]);
        let mut small = PlanesMut {
            width: 8,
            height: 8,
            y: &mut y,
            u: &mut u,
            v: &mut v,
        };
        assert!(!r.copy_in(&vec![1; r.bytes()], &mut small));
        assert!(y.iter().all(|&p| p == 0));
        assert!(Region::around(
            &FaceBox {
                x0: f32::NAN,
                y0: 0.0,
                x1: 1.0,
                y1: 1.0
            },
            8,
            8
        )
        .is_none());
    }
}

//! Decoded media as the pipeline sees it: I420 pictures and 16 kHz mono PCM.

use openh264::formats::YUVSource;

/// One decoded picture in I420 with tightly packed planes (stride == width).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoFrame {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl VideoFrame {
    /// A frame of one flat colour; `width` and `height` must be even (I420 chroma is 2x2 subsampled).
    pub fn filled(width: usize, height: usize, y: u8, u: u8, v: u8) -> Self {
        let chroma = (width / 2) * (height / 2);
        VideoFrame {
            width,
            height,
            y: vec![y; width * height],
            u: vec![u; chroma],
            v: vec![v; chroma],
        }
    }

    /// A packed 8-bit RGB picture (`height` rows of `width` x 3) in BT.601 limited range, as the
    /// codecs carry it; an odd last row or column is dropped (I420 needs even sizes).
    pub fn from_rgb(rgb: &[u8], width: usize, height: usize) -> Option<Self> {
        use lipstream_engines::image::rgb_to_yuv;
        if rgb.len() < width * height * 3 || width < 2 || height < 2 {
            return None;
        }
        let (w, h) = (width & !1, height & !1);
        let mut f = VideoFrame::filled(w, h, 0, 128, 128);
        let px = |x: usize, y: usize| {
            let i = (y * width + x) * 3;
            rgb_to_yuv(
                f32::from(rgb[i]) / 255.0,
                f32::from(rgb[i + 1]) / 255.0,
                f32::from(rgb[i + 2]) / 255.0,
            )
        };
        for y in 0..h {
            for x in 0..w {
                f.y[y * w + x] = px(x, y)[0].round() as u8;
            }
        }
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                let (mut u, mut v) = (0f32, 0f32);
                for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let p = px(2 * x + dx, 2 * y + dy);
                    u += p[1] / 4.0;
                    v += p[2] / 4.0;
                }
                f.u[y * (w / 2) + x] = u.round() as u8;
                f.v[y * (w / 2) + x] = v.round() as u8;
            }
        }
        Some(f)
    }

    /// The planes as the image operations read them.
    pub fn planes(&self) -> lipstream_engines::image::Planes<'_> {
        lipstream_engines::image::Planes {
            width: self.width,
            height: self.height,
            y: &self.y,
            u: &self.u,
            v: &self.v,
        }
    }

    /// The planes as the image operations write them.
    pub fn planes_mut(&mut self) -> lipstream_engines::image::PlanesMut<'_> {
        lipstream_engines::image::PlanesMut {
            width: self.width,
            height: self.height,
            y: &mut self.y,
            u: &mut self.u,
            v: &mut self.v,
        }
    }

    /// The picture turned `quarter_turns` times a quarter counter-clockwise (a video's display
    /// matrix: phones store portrait clips on their side).
    pub fn turned_counter_clockwise(&self, quarter_turns: u8) -> VideoFrame {
        let (w, h) = (self.width, self.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let turn = |plane: &[u8], w: usize, h: usize| -> Vec<u8> {
            let at = |x: usize, y: usize| plane.get(y * w + x).copied().unwrap_or(0);
            match quarter_turns % 4 {
                0 => plane.to_vec(),
                // The top row becomes the left column, read from the bottom up.
                1 => (0..w)
                    .flat_map(|y| (0..h).map(move |x| (x, y)))
                    .map(|(x, y)| at(w - 1 - y, x))
                    .collect(),
                2 => (0..h)
                    .flat_map(|y| (0..w).map(move |x| (x, y)))
                    .map(|(x, y)| at(w - 1 - x, h - 1 - y))
                    .collect(),
                _ => (0..w)
                    .flat_map(|y| (0..h).map(move |x| (x, y)))
                    .map(|(x, y)| at(y, h - 1 - x))
                    .collect(),
            }
        };
        let (width, height) = if quarter_turns % 2 == 1 {
            (h, w)
        } else {
            (w, h)
        };
        VideoFrame {
            width,
            height,
            y: turn(&self.y, w, h),
            u: turn(&self.u, cw, ch),
            v: turn(&self.v, cw, ch),
        }
    }

    /// Copies a picture out of any strided YUV source (e.g. the decoder's buffers).
    pub fn from_yuv(src: &impl YUVSource) -> Self {
        let (width, height) = src.dimensions();
        let (stride_y, stride_u, stride_v) = src.strides();
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        VideoFrame {
            width,
            height,
            y: copy_plane(src.y(), stride_y, width, height),
            u: copy_plane(src.u(), stride_u, cw, ch),
            v: copy_plane(src.v(), stride_v, cw, ch),
        }
    }
}

fn copy_plane(src: &[u8], stride: usize, width: usize, height: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height);
    for row in 0..height {
        let start = row * stride;
        match src.get(start..start + width) {
            Some(line) => out.extend_from_slice(line),
            // A short buffer from the decoder would be a bug there; keep the frame's size anyway.
            None => out.resize(out.len() + width, 0),
        }
    }
    out
}

impl YUVSource for VideoFrame {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.width.div_ceil(2), self.width.div_ceil(2))
    }

    fn y(&self) -> &[u8] {
        &self.y
    }

    fn u(&self) -> &[u8] {
        &self.u
    }

    fn v(&self) -> &[u8] {
        &self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarter_turns_move_every_plane_and_swap_the_size() {
        // 4x2, every byte its own: luma 0..8, chroma 2x1 per plane.
        let f = VideoFrame {
            width: 4,
            height: 2,
            y: (0..8).collect(),
            u: vec![100, 101],
            v: vec![200, 201],
        };
        let ccw = f.turned_counter_clockwise(1);
        assert_eq!((ccw.width, ccw.height), (2, 4));
        // The top row (0 1 2 3) becomes the left column, read from the bottom up.
        assert_eq!(ccw.y, vec![3, 7, 2, 6, 1, 5, 0, 4]);
        assert_eq!(
            (ccw.u.clone(), ccw.v.clone()),
            (vec![101, 100], vec![201, 200])
        );
        assert_eq!(ccw.turned_counter_clockwise(3), f);
        let half = f.turned_counter_clockwise(2);
        assert_eq!(half.y, vec![7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(half.turned_counter_clockwise(2), f);
        assert_eq!(f.turned_counter_clockwise(4), f);
        assert_eq!(
            ccw.turned_counter_clockwise(1),
            half,
            "two quarters are a half"
        );
    }
}

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

//! A machine-readable stamp drawn into video frames: frame id + capture time as luma blocks.
//!
//! The stamp sits in the top rows of the picture, far from the mouth region the lip-sync stage
//! rewrites, and uses 16x16 blocks of near-black / near-white so it survives H.264 at any sane
//! bitrate. A checksum rejects frames whose stamp was damaged.

use crate::media::frame::VideoFrame;

/// What a stamped frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub frame_id: u32,
    /// Milliseconds on the sender's clock when the frame was made.
    pub capture_ms: u32,
}

const BLOCK: usize = 16;
const BITS: usize = 32 + 32 + 16;
const DARK: u8 = 32;
const LIGHT: u8 = 224;

/// The smallest frame width a stamp fits in with at least one block per row.
pub const MIN_WIDTH: usize = BLOCK;

impl Stamp {
    fn bits(&self) -> [bool; BITS] {
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&self.frame_id.to_be_bytes());
        payload[4..].copy_from_slice(&self.capture_ms.to_be_bytes());
        let check = checksum(&payload);
        let mut bits = [false; BITS];
        for (i, bit) in bits.iter_mut().enumerate() {
            let byte = if i < 64 {
                payload[i / 8]
            } else {
                check.to_be_bytes()[(i - 64) / 8]
            };
            *bit = byte & (0x80 >> (i % 8)) != 0;
        }
        bits
    }

    /// Draws the stamp into the frame's top block rows.
    pub fn draw(&self, frame: &mut VideoFrame) {
        let per_row = frame.width / BLOCK;
        if per_row == 0 {
            return;
        }
        for (i, bit) in self.bits().iter().enumerate() {
            let (bx, by) = ((i % per_row) * BLOCK, (i / per_row) * BLOCK);
            if by + BLOCK > frame.height {
                return;
            }
            let luma = if *bit { LIGHT } else { DARK };
            for row in by..by + BLOCK {
                let start = row * frame.width + bx;
                frame.y[start..start + BLOCK].fill(luma);
            }
            let cw = frame.width / 2;
            for row in by / 2..(by + BLOCK) / 2 {
                let start = row * cw + bx / 2;
                frame.u[start..start + BLOCK / 2].fill(128);
                frame.v[start..start + BLOCK / 2].fill(128);
            }
        }
    }

    /// Reads a stamp back; `None` when the frame carries none or it was damaged.
    pub fn read(frame: &VideoFrame) -> Option<Stamp> {
        let per_row = frame.width / BLOCK;
        if per_row == 0 || BITS.div_ceil(per_row) * BLOCK > frame.height {
            return None;
        }
        let mut bytes = [0u8; BITS / 8];
        for i in 0..BITS {
            let (bx, by) = ((i % per_row) * BLOCK, (i / per_row) * BLOCK);
            // The inner 8x8 of each block: edges blur under the codec's deblocking filter.
            let mut sum = 0u32;
            for row in by + 4..by + 12 {
                let start = row * frame.width + bx + 4;
                sum += frame.y[start..start + 8]
                    .iter()
                    .map(|&p| p as u32)
                    .sum::<u32>();
            }
            if sum / 64 > u32::from(DARK / 2 + LIGHT / 2) {
                bytes[i / 8] |= 0x80 >> (i % 8);
            }
        }
        let payload: [u8; 8] = bytes[..8].try_into().ok()?;
        let check = u16::from_be_bytes([bytes[8], bytes[9]]);
        if check != checksum(&payload) {
            return None;
        }
        Some(Stamp {
            frame_id: u32::from_be_bytes(payload[..4].try_into().ok()?),
            capture_ms: u32::from_be_bytes(payload[4..].try_into().ok()?),
        })
    }
}

/// Fletcher-16, cheap and enough to catch the flipped block a codec artefact causes; the constant
/// keeps an all-dark or all-light area from reading as a valid stamp.
fn checksum(data: &[u8]) -> u16 {
    let (mut a, mut b) = (0u16, 0u16);
    for &d in data {
        a = (a + u16::from(d)) % 255;
        b = (b + a) % 255;
    }
    ((b << 8) | a) ^ 0xa55a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_frame() {
        let mut frame = VideoFrame::filled(320, 240, 90, 100, 140);
        let stamp = Stamp {
            frame_id: 0xdead_beef,
            capture_ms: 123_456,
        };
        stamp.draw(&mut frame);
        assert_eq!(Stamp::read(&frame), Some(stamp));
    }

    #[test]
    fn rejects_a_damaged_stamp() {
        let mut frame = VideoFrame::filled(320, 240, 90, 100, 140);
        Stamp {
            frame_id: 7,
            capture_ms: 9,
        }
        .draw(&mut frame);
        // Flip block 3 (a bit of the frame id) by painting it the other colour.
        let flip = if frame.y[3 * BLOCK + 8 * 320 + 8] > 128 {
            DARK
        } else {
            LIGHT
        };
        for row in 0..BLOCK {
            frame.y[row * 320 + 3 * BLOCK..row * 320 + 4 * BLOCK].fill(flip);
        }
        assert_eq!(Stamp::read(&frame), None);
    }

    #[test]
    fn unstamped_frames_read_as_none() {
        assert_eq!(
            Stamp::read(&VideoFrame::filled(320, 240, 16, 128, 128)),
            None
        );
        assert_eq!(Stamp::read(&VideoFrame::filled(8, 8, 16, 128, 128)), None);
    }
}

//! YUV4MPEG2 (`.y4m`) clips: raw 4:2:0 frames behind a one-line header, what `ffmpeg -i in.mp4
//! -pix_fmt yuv420p out.y4m` writes. The session benchmark publishes them as its video; no
//! decoder is needed to read them.

use crate::media::frame::VideoFrame;

/// Frames read at most from one clip (20 s at 25 fps): sessions loop it.
pub const MAX_FRAMES: usize = 500;
/// Larger frames are refused (8K is 7680 wide).
const MAX_SIDE: usize = 8192;

/// A clip: its frames and frame rate (numerator, denominator) when the header gives one.
#[derive(Debug)]
pub struct Clip {
    pub frames: Vec<VideoFrame>,
    pub fps: Option<(u32, u32)>,
}

/// Parses a whole `.y4m` file (the first `MAX_FRAMES` frames).
pub fn parse(bytes: &[u8]) -> Result<Clip, String> {
    first_frames(bytes)
}

/// Reads a `.y4m` file's first `MAX_FRAMES` frames (and no more of the file).
pub fn open(path: &std::path::Path) -> Result<Clip, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    first_frames(std::io::BufReader::new(file))
}

fn first_frames(input: impl std::io::BufRead) -> Result<Clip, String> {
    let mut reader = Reader::new(input)?;
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES {
        match reader.next_frame()? {
            Some(f) => frames.push(f),
            None => break,
        }
    }
    if frames.is_empty() {
        return Err("no frames".into());
    }
    Ok(Clip {
        frames,
        fps: reader.fps,
    })
}

/// Longest header or FRAME line read: real ones are tens of bytes.
const MAX_LINE: u64 = 4096;

/// A clip read frame by frame from a stream (a file of any length holds one frame in memory at
/// a time).
pub struct Reader<R> {
    input: R,
    pub width: usize,
    pub height: usize,
    pub fps: Option<(u32, u32)>,
    frames_read: usize,
}

impl<R: std::io::BufRead> Reader<R> {
    /// Reads and checks the header line.
    pub fn new(mut input: R) -> Result<Self, String> {
        let header = read_line(&mut input)?.ok_or("no YUV4MPEG2 header line")?;
        let header = std::str::from_utf8(&header).map_err(|_| "header is not text")?;
        let mut fields = header.split(' ');
        if fields.next() != Some("YUV4MPEG2") {
            return Err("not a YUV4MPEG2 file (it must start with `YUV4MPEG2 `)".into());
        }
        let (mut width, mut height, mut fps) = (0usize, 0usize, None);
        for f in fields.filter(|f| !f.is_empty()) {
            // The tag is the first byte; a field starting with anything else is refused below.
            let (Some(tag), Some(value)) = (f.get(..1), f.get(1..)) else {
                return Err(format!("bad header field {f:?}"));
            };
            match tag {
                "W" => width = value.parse().map_err(|_| format!("bad width {value:?}"))?,
                "H" => height = value.parse().map_err(|_| format!("bad height {value:?}"))?,
                "F" => {
                    let (n, d) = value
                        .split_once(':')
                        .ok_or_else(|| format!("bad frame rate {value:?}"))?;
                    let n: u32 = n.parse().map_err(|_| format!("bad frame rate {value:?}"))?;
                    let d: u32 = d.parse().map_err(|_| format!("bad frame rate {value:?}"))?;
                    if n > 0 && d > 0 {
                        fps = Some((n, d));
                    }
                }
                "C" if !value.starts_with("420") => {
                    return Err(format!(
                    "colour space C{value}: only 4:2:0 clips are read (convert with -pix_fmt yuv420p)"
                ))
                }
                // Interlacing, aspect, comments and 4:2:0 siting variants do not change the bytes.
                _ => {}
            }
        }
        if width == 0 || height == 0 || width % 2 != 0 || height % 2 != 0 {
            return Err(format!(
                "frame size {width}x{height}: needs an even, non-zero width and height"
            ));
        }
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(format!(
                "frame size {width}x{height}: at most {MAX_SIDE} pixels a side"
            ));
        }
        Ok(Reader {
            input,
            width,
            height,
            fps,
            frames_read: 0,
        })
    }

    /// The next frame, or `None` at the end of the clip.
    pub fn next_frame(&mut self) -> Result<Option<VideoFrame>, String> {
        let n = self.frames_read;
        let Some(line) = read_line(&mut self.input)? else {
            return Ok(None);
        };
        if !line.starts_with(b"FRAME") {
            return Err(format!("frame {n}: expected a FRAME line"));
        }
        let (luma, chroma) = (
            self.width * self.height,
            (self.width / 2) * (self.height / 2),
        );
        let mut planes = vec![0u8; luma + 2 * chroma];
        self.input
            .read_exact(&mut planes)
            .map_err(|_| format!("frame {n}: truncated"))?;
        let v = planes.split_off(luma + chroma);
        let u = planes.split_off(luma);
        self.frames_read += 1;
        Ok(Some(VideoFrame {
            width: self.width,
            height: self.height,
            y: planes,
            u,
            v,
        }))
    }
}

/// One line without its newline; `None` at the end of the input; an error for a line that
/// does not end (within `MAX_LINE` bytes).
fn read_line<B: std::io::BufRead>(input: &mut B) -> Result<Option<Vec<u8>>, String> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    input
        .by_ref()
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read: {e}"))?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(format!(
            "a header or FRAME line without its end (at most {MAX_LINE} bytes)"
        ));
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(header: &str, frames: &[u8], w: usize, h: usize) -> Vec<u8> {
        let mut b = format!("{header}\n").into_bytes();
        for &f in frames {
            b.extend_from_slice(b"FRAME\n");
            b.extend(std::iter::repeat_n(f, w * h));
            b.extend(std::iter::repeat_n(f + 1, w * h / 4));
            b.extend(std::iter::repeat_n(f + 2, w * h / 4));
        }
        b
    }

    #[test]
    fn reads_frames_size_and_rate() {
        let bytes = clip(
            "YUV4MPEG2 W4 H2 F25:1 Ip A1:1 C420jpeg XYSCSS=420JPEG",
            &[10, 50],
            4,
            2,
        );
        let c = parse(&bytes).unwrap();
        assert_eq!(c.fps, Some((25, 1)));
        assert_eq!(c.frames.len(), 2);
        let f = &c.frames[1];
        assert_eq!((f.width, f.height), (4, 2));
        assert_eq!((f.y[7], f.u[1], f.v[0]), (50, 51, 52));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let cases = [
            (b"P6\n".to_vec(), "not a YUV4MPEG2"),
            (clip("YUV4MPEG2 W4 H2 C444", &[1], 4, 2), "only 4:2:0"),
            (clip("YUV4MPEG2 W3 H2", &[], 3, 2), "even"),
            (clip("YUV4MPEG2 W4 H2", &[], 4, 2), "no frames"),
        ];
        for (bytes, why) in cases {
            let e = parse(&bytes).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
        let mut cut = clip("YUV4MPEG2 W4 H2", &[1, 2], 4, 2);
        cut.truncate(cut.len() - 3);
        assert!(parse(&cut).unwrap_err().contains("frame 1: truncated"));
        for (header, why) in [
            ("YUV4MPEG2 W99999999998 H99999999998", "at most 8192"),
            ("YUV4MPEG2 \u{e9}4 H2", "bad header field"),
        ] {
            let e = parse(&clip(header, &[1], 4, 2)).unwrap_err();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }

    #[test]
    fn damaged_clips_are_errors_not_panics() {
        let good = clip("YUV4MPEG2 W4 H2 F25:1 C420jpeg", &[10, 50, 90], 4, 2);
        crate::media::damage_sweep(&good, good.len(), 7, parse);
    }
}

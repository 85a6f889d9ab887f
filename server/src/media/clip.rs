//! Video files read whole for preparation work (`avatar prepare --video`): a `.y4m` (raw 4:2:0)
//! or an `.mp4` (H.264), told apart by their first bytes, resampled to the pipeline's 25 fps by
//! presentation time so that a 30 or 60 fps clip plays at its own speed when the avatar loops it.

use std::io::Read;
use std::path::Path;

use crate::media::frame::VideoFrame;
use crate::media::{mp4, y4m};

/// The pipeline's frame period (25 fps).
pub const FRAME_MS: f64 = 40.0;

/// Clips are read for at most this long (ten minutes).
pub const MAX_MS: f64 = 600_000.0;

/// The frames of `path` at 25 fps, the first `max_ms` of them (0 < `max_ms` <= `MAX_MS`).
pub fn read_at_25fps(path: &Path, max_ms: f64) -> Result<Vec<VideoFrame>, String> {
    if !(max_ms > 0.0 && max_ms <= MAX_MS) {
        return Err(format!(
            "{} s: give a positive number of seconds, at most {} (every frame is kept whole)",
            max_ms / 1000.0,
            MAX_MS / 1000.0
        ));
    }
    let mut magic = [0u8; 12];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| format!("cannot open: {e}"))?;
    let magic = &magic[..n];
    // Each source picture that shows is kept once (and cloned only where a slower clip repeats
    // it); the others are let go as soon as they are read.
    let (picks, pictures): (Vec<usize>, Vec<(usize, VideoFrame)>) =
        if magic.starts_with(b"YUV4MPEG2") {
            let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
            let mut clip = y4m::Reader::new(std::io::BufReader::new(file))?;
            // Without an F field the clip is taken to be at the pipeline's rate.
            let (num, den) = clip.fps.unwrap_or((25, 1));
            let period_ms = 1000.0 * f64::from(den) / f64::from(num);
            // Only the pictures that show before `max_ms` are read: raw video is large. Their
            // times are known before reading them.
            let wanted = (max_ms / period_ms).ceil() as usize;
            let times: Vec<f64> = (0..wanted).map(|i| i as f64 * period_ms).collect();
            let picks = at_rate(&times, FRAME_MS, max_ms);
            let mut pictures = Vec::new();
            let mut read = 0;
            while read < wanted {
                let Some(f) = clip.next_frame()? else { break };
                if picks.binary_search(&read).is_ok() {
                    pictures.push((read, f));
                }
                read += 1;
            }
            // A clip that ends sooner only shortens the picks: they begin like a longer one's.
            (at_rate(&times[..read], FRAME_MS, max_ms), pictures)
        } else if magic.get(4..8) == Some(b"ftyp") {
            let mut picks = Vec::new();
            let pictures = mp4::read_kept(path, max_ms, |times| {
                picks = at_rate(times, FRAME_MS, max_ms);
                let mut keep = vec![false; times.len()];
                for &i in &picks {
                    keep[i] = true;
                }
                keep
            })?;
            (
                picks,
                pictures.into_iter().map(|p| (p.index, p.frame)).collect(),
            )
        } else {
            return Err(
                "neither a YUV4MPEG2 (.y4m) nor an MP4 file: convert it with \
                 `ffmpeg -i IN -c:v libx264 OUT.mp4` (or `-pix_fmt yuv420p OUT.y4m`)"
                    .into(),
            );
        };
    if picks.is_empty() {
        return Err("the clip has no pictures".into());
    }
    let mut pictures: std::collections::BTreeMap<usize, VideoFrame> =
        pictures.into_iter().collect();
    let mut out = Vec::with_capacity(picks.len());
    for (k, &i) in picks.iter().enumerate() {
        let repeated = picks.get(k + 1) == Some(&i);
        let frame = if repeated {
            pictures.get(&i).cloned()
        } else {
            pictures.remove(&i)
        };
        out.push(frame.ok_or_else(|| format!("picture {i} of the clip was not decoded"))?);
    }
    if out
        .iter()
        .any(|f| (f.width, f.height) != (out[0].width, out[0].height))
    {
        return Err("the clip's pictures change size".into());
    }
    Ok(out)
}

/// For output frames at 0, `period_ms`, 2 `period_ms`, .. below `max_ms` and the clip's end:
/// the index of the source picture showing at each (the last one starting at or before it).
/// `times_ms` are the source pictures' start times, ascending; the last one lasts as long as
/// the one before it.
pub fn at_rate(times_ms: &[f64], period_ms: f64, max_ms: f64) -> Vec<usize> {
    let Some(&last) = times_ms.last() else {
        return Vec::new();
    };
    let tail = match times_ms {
        [.., a, b] => b - a,
        _ => period_ms,
    };
    let end_ms = (last + tail).min(max_ms);
    let mut out = Vec::new();
    let mut i = 0;
    // A picture counts as showing from slightly before its time stamp: time stamps in ticks of
    // 1/30 s do not land exactly on multiples of 40 ms.
    let eps = 1e-6;
    let mut k = 0u64;
    loop {
        let t = k as f64 * period_ms;
        if t >= end_ms - eps {
            break;
        }
        while i + 1 < times_ms.len() && times_ms[i + 1] <= t + eps {
            i += 1;
        }
        out.push(i);
        k += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faster_clips_drop_pictures_slower_ones_repeat_them() {
        let t30: Vec<f64> = (0..30).map(|i| i as f64 * 1000.0 / 30.0).collect();
        let p = at_rate(&t30, 40.0, 10_000.0);
        // One second of 30 fps makes 25 frames, the picture showing at each 40 ms.
        assert_eq!(p.len(), 25);
        assert_eq!(&p[..6], &[0, 1, 2, 3, 4, 6]);
        assert_eq!(p[24], 28);

        let t10: Vec<f64> = (0..5).map(|i| i as f64 * 100.0).collect();
        assert_eq!(
            at_rate(&t10, 40.0, 10_000.0),
            vec![0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4]
        );

        // Same rate: every picture once; and the limit cuts.
        let t25: Vec<f64> = (0..50).map(|i| i as f64 * 40.0).collect();
        assert_eq!(at_rate(&t25, 40.0, 10_000.0), (0..50).collect::<Vec<_>>());
        assert_eq!(at_rate(&t25, 40.0, 400.0), (0..10).collect::<Vec<_>>());
        assert_eq!(at_rate(&[0.0], 40.0, 1000.0), vec![0]);
        assert!(at_rate(&[], 40.0, 1000.0).is_empty());
    }

    #[test]
    fn a_y4m_clip_is_read_only_as_far_as_it_is_taken() {
        let dir = std::env::temp_dir().join(format!("lipstream-y4m-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clip.y4m");
        // 50 frames at 50 fps (1 s), each frame's luma its index; the last one damaged.
        let mut b = b"YUV4MPEG2 W4 H2 F50:1\n".to_vec();
        for i in 0..50u8 {
            b.extend_from_slice(b"FRAME\n");
            b.extend(std::iter::repeat_n(i, 8));
            b.extend([128u8; 4]);
        }
        b.truncate(b.len() - 3);
        std::fs::write(&path, &b).unwrap();
        // 0.4 s at 25 fps: every other picture, and the damaged end is never reached.
        let frames = read_at_25fps(&path, 400.0).unwrap();
        let lumas: Vec<u8> = frames.iter().map(|f| f.y[0]).collect();
        assert_eq!(lumas, vec![0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
        let err = read_at_25fps(&path, 10_000.0).unwrap_err();
        assert!(err.contains("frame 49: truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_mp4_clip_at_30_fps_keeps_the_pictures_that_show_at_25() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip/talk.mp4");
        let all = mp4::read(&path, 60_000.0).unwrap();
        let times: Vec<f64> = all.iter().map(|p| p.ms).collect();
        let picks = at_rate(&times, FRAME_MS, 60_000.0);
        let frames = read_at_25fps(&path, 60_000.0).unwrap();
        assert_eq!(frames.len(), 30);
        for (f, &i) in frames.iter().zip(&picks) {
            assert!(*f == all[i].frame, "frame for picture {i}");
        }
    }

    #[test]
    fn files_that_are_no_video_say_what_to_do() {
        let dir = std::env::temp_dir().join(format!("lipstream-clip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("x.png");
        std::fs::write(&png, b"\x89PNG\r\n\x1a\n....").unwrap();
        let e = read_at_25fps(&png, 1000.0).unwrap_err();
        assert!(e.contains("ffmpeg"), "{e}");
        let fake = dir.join("x.mp4");
        std::fs::write(&fake, b"\0\0\0\x18ftypisom\0\0\0\0").unwrap();
        let e = read_at_25fps(&fake, 1000.0).unwrap_err();
        assert!(e.contains("MP4") || e.contains("video track"), "{e}");
        assert!(read_at_25fps(&dir.join("missing.mp4"), 1000.0)
            .unwrap_err()
            .contains("cannot open"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

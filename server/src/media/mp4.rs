//! MP4 clips: the pictures of a file's H.264 video track with their presentation times, what
//! `avatar prepare --video clip.mp4` reads. The boxes are parsed by Mozilla's mp4parse (the
//! parser Firefox ships, fuzzed there, with fallible allocation); the avcC record and the
//! length-prefixed NAL units it frames are ours, turned into the Annex B stream openh264 decodes.
//!
//! Decoding runs in the file's decode order and lets the decoder reorder B-frames itself; the
//! k-th picture out is the one with the k-th earliest presentation time. Pictures come out as
//! they are shown: a track's display matrix (a phone's portrait clip is stored on its side) is
//! applied.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use mp4parse::unstable::{create_sample_table, CheckedInteger};
use mp4parse::{CodecType, SampleEntry, TrackType, VideoCodecSpecific};
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::OpenH264API;

use crate::media::frame::VideoFrame;

/// One decoded picture, its place in presentation order and when it shows, in ms from the
/// clip's first picture.
#[derive(Debug)]
pub struct Picture {
    pub index: usize,
    pub ms: f64,
    pub frame: VideoFrame,
}

/// A sample larger than this is refused (an uncompressed 8K picture is ~50 MB).
const MAX_SAMPLE_BYTES: u64 = 64 << 20;
const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// What the avcC record (the track's decoder configuration) says.
#[derive(Debug, PartialEq)]
struct AvcConfig {
    profile: u8,
    /// Bytes before each NAL unit giving its length: 1, 2 or 4.
    length_size: usize,
    /// SPS and PPS units, in the record's order.
    parameter_sets: Vec<Vec<u8>>,
}

impl AvcConfig {
    /// Parses an AVCDecoderConfigurationRecord (ISO 14496-15 §5.3.3.1).
    fn parse(b: &[u8]) -> Result<Self, String> {
        let short = || "the avcC record is cut short".to_string();
        let (&version, &profile) = (b.first().ok_or_else(short)?, b.get(1).ok_or_else(short)?);
        if version != 1 {
            return Err(format!("avcC version {version} (only 1 exists)"));
        }
        let length_size = usize::from(b.get(4).ok_or_else(short)? & 3) + 1;
        if length_size == 3 {
            return Err("avcC gives 3-byte NAL lengths, which H.264 does not allow".into());
        }
        let mut at = 5;
        let mut parameter_sets = Vec::new();
        // SPS count sits in the low 5 bits of its byte; the PPS count is a whole byte.
        for mask in [0x1f, 0xff] {
            let count = b.get(at).ok_or_else(short)? & mask;
            at += 1;
            for _ in 0..count {
                let len = usize::from(u16::from_be_bytes([
                    *b.get(at).ok_or_else(short)?,
                    *b.get(at + 1).ok_or_else(short)?,
                ]));
                let unit = b.get(at + 2..at + 2 + len).ok_or_else(short)?;
                parameter_sets.push(unit.to_vec());
                at += 2 + len;
            }
        }
        if parameter_sets.is_empty() {
            return Err("the avcC record holds no SPS or PPS".into());
        }
        Ok(AvcConfig {
            profile,
            length_size,
            parameter_sets,
        })
    }

    /// The parameter sets as an Annex B stream.
    fn annex_b(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for unit in &self.parameter_sets {
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(unit);
        }
        out
    }

    /// One sample's length-prefixed NAL units as Annex B, appended to `out`.
    fn sample_to_annex_b(&self, sample: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        while at < sample.len() {
            let prefix = sample
                .get(at..at + self.length_size)
                .ok_or("a NAL unit's length is cut short")?;
            let len = prefix
                .iter()
                .fold(0usize, |n, &b| (n << 8) | usize::from(b));
            at += self.length_size;
            let unit = sample
                .get(at..at + len)
                .ok_or_else(|| format!("a NAL unit of {len} bytes runs past its sample"))?;
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(unit);
            at += len;
        }
        Ok(())
    }
}

/// The profiles openh264 decodes: 8-bit 4:2:0 ones.
fn profile_supported(profile: u8) -> Result<(), String> {
    match profile {
        66 | 77 | 100 => Ok(()),
        110 => Err("High 10".into()),
        122 => Err("High 4:2:2".into()),
        244 => Err("High 4:4:4".into()),
        other => Err(format!("number {other}")),
    }
    .map_err(|name| {
        format!(
            "H.264 profile {name}: only 8-bit 4:2:0 video is read (Baseline, Main, High); \
             re-encode with `ffmpeg -i IN -pix_fmt yuv420p -c:v libx264 OUT.mp4`"
        )
    })
}

/// Where each sample is and when it shows, in the track's ticks.
struct Sample {
    offset: u64,
    bytes: u64,
    pts: i64,
}

/// Decodes the pictures of `path`'s first video track that show before `max_ms`.
pub fn read(path: &Path, max_ms: f64) -> Result<Vec<Picture>, String> {
    read_kept(path, max_ms, |times| vec![true; times.len()])
}

/// Like `read`, keeping only the pictures `keep` marks, given every picture's time (ms, in
/// presentation order): the others are decoded (later ones may refer to them) and let go, so
/// a 60 fps clip taken at 25 fps holds 25 pictures a second, not 60.
pub fn read_kept(
    path: &Path,
    max_ms: f64,
    keep: impl FnOnce(&[f64]) -> Vec<bool>,
) -> Result<Vec<Picture>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let context = mp4parse::read_mp4(&mut BufReader::new(&mut file))
        .map_err(|e| format!("not a readable MP4 file: {e:?}"))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read: {e}"))?;
    let track = context
        .tracks
        .iter()
        .find(|t| t.track_type == TrackType::Video)
        .ok_or("the file has no video track")?;
    let entry = match track.stsd.as_ref().and_then(|s| s.descriptions.first()) {
        Some(SampleEntry::Video(entry)) => entry,
        // The parser names the codecs it knows; HEVC (what phones often record) is not one.
        Some(_) => {
            return Err(
                "the video is in a codec lipstream does not read (only H.264; HEVC, as phones \
                 often record, is not): re-encode it with `ffmpeg -i IN -c:v libx264 OUT.mp4`"
                    .into(),
            )
        }
        None => return Err("the video track has no sample description".into()),
    };
    let avcc = match (&entry.codec_type, &entry.codec_specific) {
        (CodecType::H264, VideoCodecSpecific::AVCConfig(b)) => b,
        (other, _) => {
            return Err(format!(
            "the video is {other:?}, not H.264: re-encode with `ffmpeg -i IN -c:v libx264 OUT.mp4`"
        ))
        }
    };
    let config = AvcConfig::parse(avcc)?;
    profile_supported(config.profile)?;
    let turns = match &track.tkhd {
        Some(t) => quarter_turns(&t.matrix)?,
        None => 0,
    };
    let ticks_per_s = track
        .timescale
        .map(|t| t.0)
        .filter(|&t| t > 0)
        .ok_or("the video track has no time scale")?;
    let samples: Vec<Sample> = create_sample_table(track, CheckedInteger(0))
        .ok_or(
            "the video track has no sample table (a fragmented MP4?): remux it with \
             `ffmpeg -i IN -c copy -movflags +faststart OUT.mp4`",
        )?
        .iter()
        .map(|s| Sample {
            offset: s.start_offset.0,
            bytes: s.end_offset.0.saturating_sub(s.start_offset.0),
            pts: s.start_composition.0,
        })
        .collect();
    let mut pictures = decode(&file, &config, &samples, ticks_per_s, max_ms, keep)?;
    if turns != 0 {
        for p in &mut pictures {
            p.frame = p.frame.turned_counter_clockwise(turns);
        }
    }
    Ok(pictures)
}

/// The quarter turns counter-clockwise that a track's display matrix asks for (phones store
/// portrait video on its side and say so here).
fn quarter_turns(m: &mp4parse::Matrix) -> Result<u8, String> {
    // 16.16 fixed point: 1.0 is 0x10000.
    const ONE: i32 = 1 << 16;
    match (m.a, m.b, m.c, m.d) {
        (ONE, 0, 0, ONE) => Ok(0),
        (0, b, c, 0) if b == -ONE && c == ONE => Ok(1),
        (a, 0, 0, d) if a == -ONE && d == -ONE => Ok(2),
        (0, b, c, 0) if b == ONE && c == -ONE => Ok(3),
        (a, b, c, d) => Err(format!(
            "the video's display matrix ({a}, {b}, {c}, {d} in 16.16) mirrors or scales it: \
             re-encode it with `ffmpeg -i IN -c:v libx264 OUT.mp4`, which applies it"
        )),
    }
}

fn decode(
    file: &File,
    config: &AvcConfig,
    samples: &[Sample],
    ticks_per_s: u64,
    max_ms: f64,
    keep: impl FnOnce(&[f64]) -> Vec<bool>,
) -> Result<Vec<Picture>, String> {
    let first_pts = samples
        .iter()
        .map(|s| s.pts)
        .min()
        .ok_or("the video track has no samples")?;
    let ms = |pts: i64| (pts - first_pts) as f64 * 1000.0 / ticks_per_s as f64;
    // Pictures shown before `max_ms` can reference ones decoded later: decode up to the last of
    // them in decode order.
    let Some(last) = samples.iter().rposition(|s| ms(s.pts) < max_ms) else {
        return Ok(Vec::new());
    };
    let samples = &samples[..=last];
    let mut times: Vec<f64> = samples.iter().map(|s| ms(s.pts)).collect();
    times.sort_by(f64::total_cmp);
    let shown = times.iter().filter(|&&t| t < max_ms).count();
    let kept = keep(&times[..shown]);
    // The k-th picture out of the decoder is the k-th in presentation order.
    let mut out = 0usize;
    let mut pictures = Vec::new();
    let mut take = |yuv: &openh264::decoder::DecodedYUV<'_>| {
        if kept.get(out).copied().unwrap_or(false) {
            pictures.push(Picture {
                index: out,
                ms: times[out],
                frame: VideoFrame::from_yuv(yuv),
            });
        }
        out += 1;
    };

    // No flushing after each unit: that would hand out a picture before a later B-frame that
    // shows earlier has been decoded.
    let mut decoder = Decoder::with_api_config(
        OpenH264API::from_source(),
        DecoderConfig::new().flush_after_decode(Flush::NoFlush),
    )
    .map_err(|e| format!("H.264 decoder: {e}"))?;
    let mut unit = config.annex_b();
    let mut buf = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if s.bytes > MAX_SAMPLE_BYTES {
            return Err(format!(
                "sample {i}: {} bytes, more than a picture",
                s.bytes
            ));
        }
        buf.resize(s.bytes as usize, 0);
        file.read_exact_at(&mut buf, s.offset)
            .map_err(|e| format!("sample {i} (at byte {}): {e}", s.offset))?;
        config
            .sample_to_annex_b(&buf, &mut unit)
            .map_err(|e| format!("sample {i}: {e}"))?;
        match decoder.decode(&unit) {
            Ok(Some(yuv)) => take(&yuv),
            Ok(None) => {}
            Err(e) => return Err(format!("sample {i}: the H.264 decoder refused it: {e}")),
        }
        unit.clear();
    }
    let rest = decoder
        .flush_remaining()
        .map_err(|e| format!("H.264 decoder at the end of the clip: {e}"))?;
    rest.iter().for_each(&mut take);
    if out != times.len() {
        return Err(format!(
            "{} samples decoded to {out} pictures (interlaced or damaged video?)",
            times.len()
        ));
    }
    Ok(pictures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avcc(length_size_minus_one: u8, sps: &[&[u8]], pps: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![1, 100, 0, 31, 0xfc | length_size_minus_one];
        b.push(0xe0 | sps.len() as u8);
        for s in sps {
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s);
        }
        b.push(pps.len() as u8);
        for p in pps {
            b.extend_from_slice(&(p.len() as u16).to_be_bytes());
            b.extend_from_slice(p);
        }
        b
    }

    #[test]
    fn the_avcc_record_gives_parameter_sets_and_framing() {
        let c = AvcConfig::parse(&avcc(3, &[&[0x67, 1, 2]], &[&[0x68, 3]])).unwrap();
        assert_eq!(c.profile, 100);
        assert_eq!(c.length_size, 4);
        assert_eq!(c.parameter_sets, vec![vec![0x67, 1, 2], vec![0x68, 3]]);
        assert_eq!(
            c.annex_b(),
            vec![0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x68, 3]
        );

        // Two units, 2-byte lengths.
        let c = AvcConfig::parse(&avcc(1, &[&[0x67]], &[&[0x68]])).unwrap();
        let mut out = Vec::new();
        c.sample_to_annex_b(&[0, 2, 0x65, 9, 0, 1, 0x41], &mut out)
            .unwrap();
        assert_eq!(out, vec![0, 0, 0, 1, 0x65, 9, 0, 0, 0, 1, 0x41]);
        let err = c.sample_to_annex_b(&[0, 5, 0x65], &mut out).unwrap_err();
        assert!(err.contains("5 bytes runs past"), "{err}");
        assert!(c.sample_to_annex_b(&[0], &mut out).is_err());
    }

    #[test]
    fn damaged_avcc_records_are_errors() {
        let good = avcc(3, &[&[0x67, 1, 2, 3]], &[&[0x68, 3, 4]]);
        for cut in 0..good.len() {
            assert!(AvcConfig::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(AvcConfig::parse(&v2).unwrap_err().contains("version 2"));
        let mut three = good.clone();
        three[4] = 0xfe;
        assert!(AvcConfig::parse(&three).unwrap_err().contains("3-byte"));
        assert!(AvcConfig::parse(&avcc(3, &[], &[]))
            .unwrap_err()
            .contains("no SPS"));
        crate::media::damage_sweep(&good, good.len(), 7, AvcConfig::parse);
    }

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip")
    }

    /// scripts/reference/make_clip.sh made the clip with x264 and the hashes with ffmpeg's
    /// decoder: H.264 decoding is exact, so every picture must match, in the same order.
    #[test]
    fn a_high_profile_clip_with_b_frames_decodes_like_ffmpeg_in_presentation_order() {
        use sha2::{Digest, Sha256};
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
        let want: Vec<&str> = golden["luma_sha256"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let pictures = read(&fixture().join("talk.mp4"), 60_000.0).unwrap();
        assert_eq!(pictures.len(), want.len());
        for (k, (p, want)) in pictures.iter().zip(&want).enumerate() {
            assert_eq!((p.frame.width, p.frame.height), (320, 320));
            assert!(
                (p.ms - k as f64 * 1000.0 / 30.0).abs() < 0.01,
                "{k}: {} ms",
                p.ms
            );
            assert_eq!(
                hex::encode(Sha256::digest(&p.frame.y)),
                *want,
                "picture {k}"
            );
        }
        // Cut at 0.5 s: the pictures before it, whatever had to be decoded to get them.
        let first = read(&fixture().join("talk.mp4"), 500.0).unwrap();
        assert_eq!(first.len(), 15);
        assert!(first.iter().zip(&pictures).all(|(a, b)| a.frame == b.frame));
    }

    /// A phone's portrait clip, stored on its side: turned upright as ffmpeg turns it.
    #[test]
    fn a_clip_stored_on_its_side_comes_out_upright() {
        use sha2::{Digest, Sha256};
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap();
        let want = golden["portrait"]["luma_sha256"].as_array().unwrap();
        let pictures = read(&fixture().join("portrait.mp4"), 60_000.0).unwrap();
        assert_eq!(pictures.len(), want.len());
        for (k, (p, want)) in pictures.iter().zip(want).enumerate() {
            assert_eq!((p.frame.width, p.frame.height), (288, 336), "upright");
            assert_eq!(
                hex::encode(Sha256::digest(&p.frame.y)),
                want.as_str().unwrap(),
                "picture {k}"
            );
        }
        let m = |a, b, c, d| mp4parse::Matrix {
            a,
            b,
            u: 0,
            c,
            d,
            v: 0,
            x: 0,
            y: 0,
            w: 1 << 30,
        };
        let one = 1 << 16;
        assert_eq!(quarter_turns(&m(one, 0, 0, one)), Ok(0));
        assert_eq!(quarter_turns(&m(0, -one, one, 0)), Ok(1));
        assert_eq!(quarter_turns(&m(-one, 0, 0, -one)), Ok(2));
        assert_eq!(quarter_turns(&m(0, one, -one, 0)), Ok(3));
        let mirrored = quarter_turns(&m(-one, 0, 0, one)).unwrap_err();
        assert!(mirrored.contains("mirrors"), "{mirrored}");
    }

    #[test]
    fn damaged_clips_are_errors_or_pictures_never_a_crash() {
        let good = std::fs::read(fixture().join("talk.mp4")).unwrap();
        let dir = std::env::temp_dir().join(format!("lipstream-mp4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("damaged.mp4");
        let try_read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            read(&path, 60_000.0)
        };
        let cut = try_read(&good[..good.len() / 2]);
        assert!(
            cut.is_err(),
            "half a file reads as {:?} pictures",
            cut.map(|p| p.len())
        );
        for k in 1..48 {
            let _ = try_read(&good[..good.len() * k / 48]);
        }
        let mut x = 99u32;
        for round in 0..200 {
            let mut b = good.clone();
            for _ in 0..3 {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                // Half the flips land in the first 4 KB, where the boxes are (moov first).
                let span = if round % 2 == 0 { 4096 } else { b.len() };
                let i = (x >> 8) as usize % span;
                b[i] = (x >> 24) as u8;
            }
            let _ = try_read(&b);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_codecs_say_how_to_re_encode() {
        // scripts/reference/make_clip.sh: 3 pictures of HEVC, as an iPhone records.
        let err = read(&fixture().join("hevc.mp4"), 60_000.0).unwrap_err();
        assert!(err.contains("HEVC") && err.contains("libx264"), "{err}");
    }

    #[test]
    fn only_8_bit_4_2_0_profiles_are_taken() {
        for p in [66, 77, 100] {
            assert!(profile_supported(p).is_ok());
        }
        let err = profile_supported(110).unwrap_err();
        assert!(err.contains("High 10") && err.contains("yuv420p"), "{err}");
        assert!(profile_supported(244).unwrap_err().contains("4:4:4"));
    }
}

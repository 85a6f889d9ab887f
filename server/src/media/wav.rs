//! `.wav` recordings: RIFF/WAVE with 16-bit integer or 32-bit float PCM, any rate and channel
//! count — what `ffmpeg -i talk.mp4 talk.wav` or `espeak-ng -w` write. The session benchmark
//! publishes them as its audio, mixed down to mono and resampled to the 48 kHz Opus runs at.

/// Seconds read at most from one recording: sessions loop it.
pub const MAX_SECONDS: usize = 600;

/// A recording mixed down to mono.
#[derive(Debug)]
pub struct Wav {
    pub rate: u32,
    pub pcm: Vec<i16>,
}

const PCM: u16 = 1;
const FLOAT: u16 = 3;
const EXTENSIBLE: u16 = 0xFFFE;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a whole `.wav` file (its first `MAX_SECONDS`).
pub fn parse(bytes: &[u8]) -> Result<Wav, String> {
    if bytes.get(..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err("not a WAV file (it must start with RIFF....WAVE)".into());
    }
    // (format, channels, rate, bits) from `fmt `, then the `data` chunk.
    let mut fmt = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32_at(bytes, at + 4).unwrap_or(0) as usize;
        let body = at + 8;
        if id == b"fmt " {
            let f = bytes
                .get(body..body + len.min(40))
                .filter(|f| f.len() >= 16)
                .ok_or("the fmt chunk is truncated")?;
            let mut format = u16_at(f, 0).unwrap_or(0);
            if format == EXTENSIBLE {
                // The sub-format GUID starts with the plain format code.
                format = u16_at(f, 24).ok_or("the extensible fmt chunk is truncated")?;
            }
            let channels = u16_at(f, 2).unwrap_or(0);
            let rate = u32_at(f, 4).unwrap_or(0);
            let bits = u16_at(f, 14).unwrap_or(0);
            fmt = Some((format, channels, rate, bits));
        } else if id == b"data" {
            let (format, channels, rate, bits) =
                fmt.ok_or("the data chunk comes before any fmt chunk")?;
            // A size of 0 or 0xFFFFFFFF is what a writer that could not seek leaves: take the
            // rest of the file.
            let end = if len == 0 || len == u32::MAX as usize {
                bytes.len()
            } else {
                body.checked_add(len).ok_or("bad data chunk size")?
            };
            let data = bytes.get(body..end).ok_or_else(|| {
                format!(
                    "the data chunk says {len} bytes but the file ends after {}: truncated",
                    bytes.len() - body
                )
            })?;
            return decode(data, format, channels, rate, bits);
        }
        // Chunks are padded to an even length.
        at = body.saturating_add(len).saturating_add(len & 1);
    }
    Err(if fmt.is_none() {
        "no fmt chunk".into()
    } else {
        "no data chunk".into()
    })
}

fn decode(data: &[u8], format: u16, channels: u16, rate: u32, bits: u16) -> Result<Wav, String> {
    if channels == 0 || !(4000..=384_000).contains(&rate) {
        return Err(format!("{channels} channels at {rate} Hz"));
    }
    let sample: fn(&[u8]) -> f32 = match (format, bits) {
        (PCM, 16) => |b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0,
        (FLOAT, 32) => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        _ => {
            return Err(format!(
                "{bits}-bit {} samples: give 16-bit or 32-bit float PCM (ffmpeg -c:a pcm_s16le)",
                match format {
                    PCM => "integer",
                    FLOAT => "float",
                    _ => "compressed or unknown",
                }
            ))
        }
    };
    let width = usize::from(bits / 8) * usize::from(channels);
    let frames = (data.len() / width).min(MAX_SECONDS * rate as usize);
    if frames == 0 {
        return Err("no samples".into());
    }
    let pcm = data
        .chunks_exact(width)
        .take(frames)
        .map(|f| {
            let sum: f32 = f.chunks_exact(usize::from(bits / 8)).map(sample).sum();
            let v = sum / f32::from(channels);
            (v.clamp(-1.0, 1.0) * 32767.0).round() as i16
        })
        .collect();
    Ok(Wav { rate, pcm })
}

/// `pcm` at `from` Hz resampled to `to` Hz by linear interpolation (plenty for speech that Opus
/// then codes).
pub fn resample(pcm: &[i16], from: u32, to: u32) -> Vec<i16> {
    if from == to || pcm.is_empty() {
        return pcm.to_vec();
    }
    let n = (pcm.len() as u64 * u64::from(to) / u64::from(from)).max(1) as usize;
    let step = f64::from(from) / f64::from(to);
    (0..n)
        .map(|i| {
            let x = i as f64 * step;
            let j = x as usize;
            let a = f64::from(pcm[j.min(pcm.len() - 1)]);
            let b = f64::from(pcm[(j + 1).min(pcm.len() - 1)]);
            (a + (b - a) * (x - j as f64)).round() as i16
        })
        .collect()
}

/// `pcm` scaled so its loudest sample is `peak` (silence stays silence).
pub fn normalize(pcm: &mut [i16], peak: i16) {
    let max = pcm.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
    if max == 0 {
        return;
    }
    let gain = f64::from(peak) / f64::from(max);
    for s in pcm {
        *s = (f64::from(*s) * gain).round() as i16;
    }
}

/// A WAV file's bytes (for tests and tools): 16-bit PCM, interleaved `channels`.
pub fn encode(pcm: &[i16], rate: u32, channels: u16) -> Vec<u8> {
    let data_len = (pcm.len() * 2) as u32;
    let mut b = Vec::with_capacity(44 + pcm.len() * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&PCM.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2 * u32::from(channels)).to_le_bytes());
    b.extend_from_slice(&(2 * channels).to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in pcm {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_stereo_is_mixed_down() {
        // Left 1000, right 3000 -> 2000; an odd-sized chunk before fmt is skipped with its pad.
        let mut b = encode(&[1000, 3000, -1000, -3000], 44_100, 2);
        let junk = [b"LIST".as_slice(), &3u32.to_le_bytes(), b"abc\0"].concat();
        b.splice(12..12, junk);
        let w = parse(&b).unwrap();
        assert_eq!(w.rate, 44_100);
        assert_eq!(w.pcm, vec![2000, -2000]);
    }

    #[test]
    fn float_and_extensible_files_read() {
        let mut b = encode(&[0; 4], 16_000, 1);
        // Rewrite as 32-bit float mono: format 3, 4-byte blocks, two samples.
        b[20..22].copy_from_slice(&FLOAT.to_le_bytes());
        b[28..32].copy_from_slice(&64_000u32.to_le_bytes());
        b[32..34].copy_from_slice(&4u16.to_le_bytes());
        b[34..36].copy_from_slice(&32u16.to_le_bytes());
        b.truncate(44);
        for v in [0.5f32, -0.25] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(parse(&b).unwrap().pcm, vec![16384, -8192]);

        // The same as WAVE_FORMAT_EXTENSIBLE: a 40-byte fmt whose sub-format names float.
        let mut e = b[..20].to_vec();
        e[16..20].copy_from_slice(&40u32.to_le_bytes());
        let mut fmt = b[20..36].to_vec();
        fmt[0..2].copy_from_slice(&EXTENSIBLE.to_le_bytes());
        fmt.extend_from_slice(&22u16.to_le_bytes());
        fmt.extend_from_slice(&[0; 6]);
        fmt.extend_from_slice(&FLOAT.to_le_bytes());
        fmt.extend_from_slice(&[0; 14]);
        e.extend_from_slice(&fmt);
        e.extend_from_slice(&b[36..]);
        assert_eq!(parse(&e).unwrap().pcm, vec![16384, -8192]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let good = encode(&[1, 2, 3, 4], 48_000, 1);
        let err = |b: &[u8]| parse(b).unwrap_err();
        assert!(err(b"ID3\x03 an mp3").contains("not a WAV"));
        assert!(err(&good[..good.len() - 2]).contains("truncated"));
        let mut eight = good.clone();
        eight[34..36].copy_from_slice(&8u16.to_le_bytes());
        assert!(err(&eight).contains("8-bit integer"), "{}", err(&eight));
        let mut alaw = good.clone();
        alaw[20..22].copy_from_slice(&6u16.to_le_bytes());
        assert!(err(&alaw).contains("compressed"), "{}", err(&alaw));
        let mut silent = good.clone();
        silent[22..24].copy_from_slice(&0u16.to_le_bytes());
        assert!(err(&silent).contains("0 channels"));
        assert!(err(&good[..36]).contains("no data chunk"));
        let mut empty = good[..44].to_vec();
        empty[40..44].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(&empty).contains("no samples"));
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let pcm: Vec<i16> = (0..300).map(|i| (i * 37 % 2000) as i16).collect();
        let good = encode(&pcm, 16_000, 2);
        // Half the flips in the 44-byte header (and the data's first bytes).
        crate::media::damage_sweep(&good, 48, 1, parse);
    }

    #[test]
    fn resampling_keeps_pitch_and_length() {
        // One second of 440 Hz at 16 kHz -> 48 kHz: 48000 samples, 880 zero crossings.
        let sine: Vec<i16> = (0..16_000)
            .map(|i| {
                ((i as f64 * 440.0 * std::f64::consts::TAU / 16_000.0).sin() * 10_000.0) as i16
            })
            .collect();
        let up = resample(&sine, 16_000, 48_000);
        assert_eq!(up.len(), 48_000);
        let crossings = up.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((878..=882).contains(&crossings), "{crossings}");
        let mut loud = vec![100, -400, 200];
        normalize(&mut loud, 4000);
        assert_eq!(loud, vec![1000, -4000, 2000]);
    }
}

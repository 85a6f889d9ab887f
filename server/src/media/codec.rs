//! Codec wrappers: H.264 through openh264, Opus through libopus, with errors that name the cause.

use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    RateControlMode, UsageType,
};
use openh264::OpenH264API;

use crate::media::frame::VideoFrame;

/// The pipeline's audio rate: what the lip-sync models consume.
pub const SAMPLE_RATE_16K: u32 = 16_000;
/// Opus RTP timestamps always tick at 48 kHz, whatever rate the codec runs at.
pub const OPUS_RTP_RATE: u32 = 48_000;
/// Longest Opus packet: 120 ms.
const OPUS_MAX_SAMPLES_16K: usize = 1920;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("H.264 decoder: {0}")]
    H264Decode(String),
    #[error("H.264 encoder: {0}")]
    H264Encode(String),
    #[error("Opus decoder: {0}")]
    OpusDecode(opus::Error),
    #[error("Opus encoder: {0}")]
    OpusEncode(opus::Error),
    #[error("cannot encode {samples} samples as Opus: not a multiple of 2.5 ms")]
    OpusFrameSize { samples: usize },
}

/// H.264 Annex-B access units in, I420 pictures out.
pub struct H264Decoder {
    inner: Decoder,
}

impl H264Decoder {
    pub fn new() -> Result<Self, CodecError> {
        let inner = Decoder::new().map_err(|e| CodecError::H264Decode(e.to_string()))?;
        Ok(H264Decoder { inner })
    }

    /// Decodes one access unit; `Ok(None)` when it completed no picture (e.g. SPS/PPS only).
    pub fn decode(&mut self, access_unit: &[u8]) -> Result<Option<VideoFrame>, CodecError> {
        match self.inner.decode(access_unit) {
            Ok(Some(yuv)) => Ok(Some(VideoFrame::from_yuv(&yuv))),
            Ok(None) => Ok(None),
            Err(e) => Err(CodecError::H264Decode(e.to_string())),
        }
    }
}

/// One encoded picture.
pub struct EncodedVideo {
    /// Annex-B NAL units, start codes included (what str0m's packetizer takes).
    pub data: Vec<u8>,
    pub keyframe: bool,
}

/// I420 pictures in, Constrained Baseline H.264 out: every WebRTC receiver decodes it.
pub struct H264Encoder {
    inner: Encoder,
    bitrate_bps: u32,
    force_keyframe: bool,
}

impl H264Encoder {
    pub fn new(bitrate_bps: u32) -> Result<Self, CodecError> {
        Ok(H264Encoder {
            inner: Self::make(bitrate_bps)?,
            bitrate_bps,
            force_keyframe: false,
        })
    }

    fn make(bitrate_bps: u32) -> Result<Encoder, CodecError> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(30.0))
            .usage_type(UsageType::CameraVideoRealTime)
            .rate_control_mode(RateControlMode::Bitrate)
            .profile(Profile::Baseline)
            // Every picture must come out: the receiver matches frames one to one.
            .skip_frames(false)
            // Keyframes on request (PLI/FIR) and, as a safety net, every 10 s at 25 fps.
            .intra_frame_period(IntraFramePeriod::from_num_frames(250));
        Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| CodecError::H264Encode(e.to_string()))
    }

    pub fn bitrate_bps(&self) -> u32 {
        self.bitrate_bps
    }

    /// Changes the target bitrate. openh264's safe API only sets it at creation, so the encoder
    /// is rebuilt and the next picture is a keyframe; callers should not do this on every estimate.
    pub fn set_bitrate(&mut self, bitrate_bps: u32) -> Result<(), CodecError> {
        self.inner = Self::make(bitrate_bps)?;
        self.bitrate_bps = bitrate_bps;
        Ok(())
    }

    /// The next picture will be a keyframe.
    pub fn request_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    pub fn encode(&mut self, frame: &VideoFrame) -> Result<EncodedVideo, CodecError> {
        if self.force_keyframe {
            self.inner.force_intra_frame();
            self.force_keyframe = false;
        }
        let bitstream = self
            .inner
            .encode(frame)
            .map_err(|e| CodecError::H264Encode(e.to_string()))?;
        let keyframe = matches!(bitstream.frame_type(), FrameType::IDR | FrameType::I);
        Ok(EncodedVideo {
            data: bitstream.to_vec(),
            keyframe,
        })
    }
}

/// Opus packets in, 16 kHz mono PCM out (libopus resamples and downmixes internally).
pub struct OpusDecoder {
    inner: opus::Decoder,
    pcm: Vec<i16>,
}

impl OpusDecoder {
    pub fn new() -> Result<Self, CodecError> {
        let inner = opus::Decoder::new(SAMPLE_RATE_16K, opus::Channels::Mono)
            .map_err(CodecError::OpusDecode)?;
        Ok(OpusDecoder {
            inner,
            pcm: vec![0; OPUS_MAX_SAMPLES_16K],
        })
    }

    pub fn decode(&mut self, packet: &[u8]) -> Result<&[i16], CodecError> {
        let n = self
            .inner
            .decode(packet, &mut self.pcm, false)
            .map_err(CodecError::OpusDecode)?;
        Ok(&self.pcm[..n])
    }
}

/// Mono PCM in, Opus packets out.
pub struct OpusEncoder {
    inner: opus::Encoder,
    sample_rate: u32,
    packet: Vec<u8>,
}

impl OpusEncoder {
    /// `sample_rate` is one libopus takes: 8, 12, 16, 24 or 48 kHz.
    pub fn new(sample_rate: u32) -> Result<Self, CodecError> {
        let mut inner =
            opus::Encoder::new(sample_rate, opus::Channels::Mono, opus::Application::Voip)
                .map_err(CodecError::OpusEncode)?;
        inner
            .set_bitrate(opus::Bitrate::Bits(32_000))
            .map_err(CodecError::OpusEncode)?;
        Ok(OpusEncoder {
            inner,
            sample_rate,
            packet: vec![0; 1500],
        })
    }

    /// Encodes `pcm` as one or more packets, calling `out(offset_samples, packet)` for each, so
    /// the caller can stamp each with its own RTP time.
    pub fn encode(
        &mut self,
        pcm: &[i16],
        mut out: impl FnMut(usize, &[u8]),
    ) -> Result<(), CodecError> {
        // libopus frames: 2.5, 5, 10, 20, 40 or 60 ms.
        let unit = self.sample_rate as usize / 400;
        let ms20 = unit * 8;
        let chunk = if [1, 2, 4, 8, 16, 24].iter().any(|k| k * unit == pcm.len()) {
            pcm.len()
        } else if pcm.len().is_multiple_of(ms20) {
            ms20
        } else if pcm.len().is_multiple_of(unit) {
            unit
        } else {
            return Err(CodecError::OpusFrameSize { samples: pcm.len() });
        };
        for (i, part) in pcm.chunks(chunk).enumerate() {
            let n = self
                .inner
                .encode(part, &mut self.packet)
                .map_err(CodecError::OpusEncode)?;
            out(i * chunk, &self.packet[..n]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_round_trip_keeps_the_picture() {
        let mut frame = VideoFrame::filled(320, 240, 60, 110, 150);
        for row in 0..240 {
            for col in 0..320 {
                frame.y[row * 320 + col] = ((row + col) % 200) as u8 + 20;
            }
        }
        let mut enc = H264Encoder::new(1_000_000).unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let au = enc.encode(&frame).unwrap();
        assert!(au.keyframe, "the first picture must be a keyframe");
        let out = dec.decode(&au.data).unwrap().expect("a picture");
        assert_eq!((out.width, out.height), (320, 240));
        let mean_abs: f64 = out
            .y
            .iter()
            .zip(&frame.y)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / frame.y.len() as f64;
        assert!(mean_abs < 4.0, "luma error {mean_abs}");
    }

    #[test]
    fn a_damaged_access_unit_is_an_error_until_the_next_keyframe() {
        let mut enc = H264Encoder::new(500_000).unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let picture = |i: usize| {
            let mut f = VideoFrame::filled(320, 240, 60, 110, 150);
            for (j, p) in f.y.iter_mut().enumerate() {
                *p = ((j + i * 7) % 200) as u8;
            }
            f
        };
        for i in 0..3 {
            let au = enc.encode(&picture(i)).unwrap();
            assert!(dec.decode(&au.data).unwrap().is_some());
        }
        let au = enc.encode(&picture(3)).unwrap();
        assert!(
            dec.decode(&au.data[..au.data.len() / 2]).is_err(),
            "a truncated frame must not decode"
        );
        let au = enc.encode(&picture(4)).unwrap();
        assert!(
            dec.decode(&au.data).is_err(),
            "a frame referencing a lost one must not decode"
        );
        enc.request_keyframe();
        let au = enc.encode(&picture(5)).unwrap();
        assert!(au.keyframe);
        assert!(
            dec.decode(&au.data).unwrap().is_some(),
            "a keyframe restarts decoding"
        );
    }

    #[test]
    fn a_high_profile_stream_decodes() {
        // OBS sends High profile; openh264's encoder can label its stream so (SPS profile_idc 100).
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(800_000))
            .profile(Profile::High);
        let mut enc = Encoder::with_api_config(OpenH264API::from_source(), config).unwrap();
        let mut dec = H264Decoder::new().unwrap();
        let frame = VideoFrame::filled(320, 240, 80, 120, 140);
        let au = enc.encode(&frame).unwrap().to_vec();
        let sps_at = au
            .windows(5)
            .position(|w| w[..4] == [0, 0, 0, 1] && w[4] & 0x1f == 7)
            .expect("an SPS");
        assert_eq!(au[sps_at + 5], 100, "profile_idc");
        let out = dec.decode(&au).unwrap().expect("a picture");
        assert_eq!((out.width, out.height), (320, 240));
    }

    #[test]
    fn opus_round_trip_20ms() {
        let mut enc = OpusEncoder::new(SAMPLE_RATE_16K).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let tone: Vec<i16> = (0..320)
            .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin() * 8000.0) as i16)
            .collect();
        let mut packets = Vec::new();
        enc.encode(&tone, |off, p| packets.push((off, p.to_vec())))
            .unwrap();
        assert_eq!(packets.len(), 1);
        assert_eq!(dec.decode(&packets[0].1).unwrap().len(), 320);
        assert!(matches!(
            enc.encode(&tone[..100], |_, _| {}),
            Err(CodecError::OpusFrameSize { samples: 100 })
        ));
    }
}

//! WebRTC with str0m: building a peer for an offer, and the driver that runs every peer.

pub mod driver;

use std::net::SocketAddr;
use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::format::{Codec, PayloadParams};
use str0m::{Candidate, Rtc, RtcConfig};

/// Installs the crypto backend once per process (later calls do nothing).
pub fn init_crypto() {
    str0m::crypto::from_feature_flags().install_process_default();
}

/// A peer that speaks exactly the codecs lipstream decodes and encodes, with bandwidth estimation
/// on (the returned video follows it), and a host candidate per local socket.
pub fn new_rtc(local_addrs: &[SocketAddr], start_bitrate_bps: u32) -> Rtc {
    let mut rtc = RtcConfig::new()
        .clear_codecs()
        .enable_opus(true, false)
        .enable_h264(true)
        .enable_bwe(Some(Bitrate::bps(u64::from(start_bitrate_bps))))
        .build(Instant::now());
    for addr in local_addrs {
        match Candidate::host(*addr, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
            }
            Err(e) => tracing::warn!(%addr, "not offering this address as a candidate: {e}"),
        }
    }
    rtc
}

/// The payload type to send our Constrained Baseline H.264 on: prefer an exact profile match,
/// then any packetization-mode=1 H.264 (every H.264 decoder handles the baseline subset).
pub fn pick_video_pt<'a>(
    params: impl Iterator<Item = &'a PayloadParams>,
) -> Option<str0m::media::Pt> {
    let params: Vec<&PayloadParams> = params.collect();
    let params = params.iter().copied();
    let h264_mode1 = |p: &&PayloadParams| {
        let spec = p.spec();
        spec.codec == Codec::H264 && spec.format.packetization_mode == Some(1)
    };
    let profile = |p: &PayloadParams| p.spec().format.profile_level_id.map(|id| id >> 8);
    params
        .clone()
        .filter(h264_mode1)
        .find(|p| profile(p) == Some(0x42e0))
        .or_else(|| {
            params
                .clone()
                .filter(h264_mode1)
                .find(|p| profile(p) == Some(0x4200))
        })
        .or_else(|| params.clone().find(h264_mode1))
        .or_else(|| params.clone().find(|p| p.spec().codec == Codec::H264))
        .map(|p| p.pt())
}

/// The payload type for Opus.
pub fn pick_audio_pt<'a>(
    mut params: impl Iterator<Item = &'a PayloadParams>,
) -> Option<str0m::media::Pt> {
    params
        .find(|p| p.spec().codec == Codec::Opus)
        .map(|p| p.pt())
}

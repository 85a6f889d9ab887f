//! What an offer asks for, read before str0m answers it, so a refusal can say precisely why.
//!
//! str0m parses and answers the SDP; this module only summarises the m-sections of an offer str0m
//! already parsed, to turn "no audio" and "no codec we speak" into 400 / 406 answers.

/// The codecs lipstream decodes and encodes, as listed in a 406 answer.
pub const ACCEPTED_CODECS: &str = "audio: opus/48000/2; video: H264/90000 (packetization-mode=1)";

/// One m-section of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `audio`, `video`, `application`...
    pub kind: String,
    /// Upper-cased codec names from the a=rtpmap lines, e.g. `OPUS`, `H264`, `VP8`.
    pub codecs: Vec<String>,
    /// Port 0: the section is rejected/disabled by the offerer.
    pub disabled: bool,
}

/// What a whole offer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSummary {
    pub sections: Vec<Section>,
}

/// Why an offer is refused before negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferProblem {
    /// 400: lip-sync needs the speaker's audio.
    NoAudio,
    /// 406: nothing we can decode; carries what was offered, per kind.
    NoSupportedCodec { offered: String },
}

impl std::fmt::Display for OfferProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OfferProblem::NoAudio => f.write_str(
                "the offer has no audio m-section; lipstream needs the speaker's audio track",
            ),
            OfferProblem::NoSupportedCodec { offered } => write!(
                f,
                "no supported codec in the offer ({offered}); lipstream accepts {ACCEPTED_CODECS}"
            ),
        }
    }
}

impl OfferSummary {
    /// Reads the m-sections and their rtpmap codec names.
    pub fn parse(sdp: &str) -> Self {
        let mut sections: Vec<Section> = Vec::new();
        for line in sdp.lines().map(str::trim) {
            if let Some(m) = line.strip_prefix("m=") {
                let mut fields = m.split_whitespace();
                let kind = fields.next().unwrap_or_default().to_string();
                let disabled = fields.next() == Some("0");
                sections.push(Section {
                    kind,
                    codecs: Vec::new(),
                    disabled,
                });
            } else if let Some(rtpmap) = line.strip_prefix("a=rtpmap:") {
                let codec = rtpmap
                    .split_whitespace()
                    .nth(1)
                    .and_then(|enc| enc.split('/').next())
                    .map(str::to_ascii_uppercase);
                if let (Some(section), Some(codec)) = (sections.last_mut(), codec) {
                    section.codecs.push(codec);
                }
            }
        }
        OfferSummary { sections }
    }

    fn live<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Section> + 'a {
        self.sections
            .iter()
            .filter(move |s| s.kind == kind && !s.disabled)
    }

    fn offers(&self, kind: &str, codec: &str) -> bool {
        self.live(kind).any(|s| s.codecs.iter().any(|c| c == codec))
    }

    fn offered(&self) -> String {
        let mut parts = Vec::new();
        for kind in ["audio", "video"] {
            let mut codecs: Vec<&str> = self
                .live(kind)
                .flat_map(|s| s.codecs.iter().map(String::as_str))
                .filter(|c| {
                    !matches!(
                        *c,
                        "RTX" | "RED" | "ULPFEC" | "FLEXFEC-03" | "CN" | "TELEPHONE-EVENT"
                    )
                })
                .collect();
            codecs.dedup();
            if !codecs.is_empty() {
                parts.push(format!("{kind}: {}", codecs.join(", ")));
            }
        }
        if parts.is_empty() {
            "no audio or video".to_string()
        } else {
            parts.join("; ")
        }
    }

    /// A publisher (WHIP) must send Opus audio; if it sends video, it must be H.264.
    pub fn check_publish(&self) -> Result<(), OfferProblem> {
        if self.live("audio").next().is_none() {
            return Err(OfferProblem::NoAudio);
        }
        let audio_ok = self.offers("audio", "OPUS");
        let video_ok = self.live("video").next().is_none() || self.offers("video", "H264");
        if audio_ok && video_ok {
            Ok(())
        } else {
            Err(OfferProblem::NoSupportedCodec {
                offered: self.offered(),
            })
        }
    }

    /// A viewer (WHEP) must be able to receive Opus or H.264.
    pub fn check_view(&self) -> Result<(), OfferProblem> {
        if self.offers("audio", "OPUS") || self.offers("video", "H264") {
            Ok(())
        } else {
            Err(OfferProblem::NoSupportedCodec {
                offered: self.offered(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROWSER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=rtpmap:102 H264/90000\r\n";

    #[test]
    fn a_browser_offer_passes() {
        let s = OfferSummary::parse(BROWSER);
        assert_eq!(s.sections.len(), 2);
        assert_eq!(s.sections[1].codecs, ["VP8", "RTX", "H264"]);
        assert_eq!(s.check_publish(), Ok(()));
        assert_eq!(s.check_view(), Ok(()));
    }

    #[test]
    fn refusals_name_the_cause() {
        let video_only = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\na=rtpmap:102 H264/90000\r\n";
        assert_eq!(
            OfferSummary::parse(video_only).check_publish(),
            Err(OfferProblem::NoAudio)
        );
        let disabled_audio = BROWSER.replace("m=audio 9", "m=audio 0");
        assert_eq!(
            OfferSummary::parse(&disabled_audio).check_publish(),
            Err(OfferProblem::NoAudio)
        );

        let vp9 = "v=0\r\nm=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\nm=video 9 RTP/AVP 98 99\r\na=rtpmap:98 VP9/90000\r\na=rtpmap:99 rtx/90000\r\n";
        let err = OfferSummary::parse(vp9).check_publish().unwrap_err();
        assert_eq!(
            err,
            OfferProblem::NoSupportedCodec {
                offered: "audio: PCMU; video: VP9".into()
            }
        );
        assert!(err.to_string().contains("opus/48000/2"));
        assert!(OfferSummary::parse(vp9).check_view().is_err());
    }
}

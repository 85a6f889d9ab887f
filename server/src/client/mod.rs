//! The WebRTC test client: publishes synthetic stamped video and a tone over WHIP (str0m, real
//! UDP), receives the returned stream and matches it frame by frame.
//!
//! Used by the integration tests and by `lipstream bench`. Blocking and single-threaded per
//! session: the caller runs one thread per simulated publisher.

pub mod marker;
pub mod peer;
pub mod publisher;
pub mod signal;
pub mod synth;
pub mod viewer;

pub use peer::{Received, ReceivedFrame};
pub use publisher::{publish, AudioSignal, PublishOptions, PublishReport};
pub use viewer::view;

/// Why a test-client session failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("{method} {url}: HTTP {status}: {body}")]
    Http {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
        /// The server's Retry-After, when it gave one: a limit was reached, not a fault.
        retry_after: Option<String>,
    },
    #[error("{method} {url}: {reason}")]
    Request {
        method: &'static str,
        url: String,
        reason: String,
    },
    #[error("SDP: {0}")]
    Sdp(String),
    #[error("WebRTC: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0}")]
    Codec(#[from] crate::media::codec::CodecError),
    #[error("no ICE/DTLS connection within {0:?}")]
    ConnectTimeout(std::time::Duration),
}

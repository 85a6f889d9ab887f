//! A WHEP viewer: receives a published session's returned stream and matches its stamps.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use str0m::media::Direction;

use crate::client::peer::{Peer, Received};
use crate::client::{signal, ClientError};

/// Watches session `session_id` on `base_url` for `duration`, keeping the decoded pictures
/// when `keep_pictures`.
pub fn view(
    base_url: &str,
    session_id: &str,
    token: Option<&str>,
    bind_ip: IpAddr,
    duration: Duration,
    keep_pictures: bool,
) -> Result<Received, ClientError> {
    let url = format!(
        "{}/whep?session={session_id}",
        base_url.trim_end_matches('/')
    );
    let mut peer = Peer::open(&url, Direction::RecvOnly, true, token, bind_ip)?;
    peer.keep_pictures = keep_pictures;
    let result = peer.receive_until(Instant::now() + duration);
    let _ = signal::delete(&peer.resource_url, token);
    result.map(|()| peer.received)
}

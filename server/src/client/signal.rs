//! WHIP/WHEP signalling as a client: POST the offer, read the answer and Location, DELETE.

use std::time::Duration;

use crate::client::ClientError;

/// What the server answered to an offer.
pub struct Answer {
    pub sdp: String,
    /// Absolute URL of the created resource (for DELETE).
    pub resource_url: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// POSTs an SDP offer to `url` (a WHIP or WHEP endpoint).
pub fn post_offer(url: &str, offer_sdp: &str, token: Option<&str>) -> Result<Answer, ClientError> {
    let mut req = agent().post(url).header("Content-Type", "application/sdp");
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let fail = |reason: String| ClientError::Request {
        method: "POST",
        url: url.to_string(),
        reason,
    };
    let mut resp = req.send(offer_sdp).map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (location, retry_after) = (header("location"), header("retry-after"));
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| fail(e.to_string()))?;
    if status != 201 {
        return Err(ClientError::Http {
            method: "POST",
            url: url.to_string(),
            status,
            body,
            retry_after,
        });
    }
    let location = location.ok_or_else(|| fail("201 without a Location header".into()))?;
    Ok(Answer {
        sdp: body,
        resource_url: absolute(url, &location),
    })
}

/// DELETEs a WHIP/WHEP resource.
pub fn delete(resource_url: &str, token: Option<&str>) -> Result<(), ClientError> {
    let mut req = agent().delete(resource_url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| ClientError::Request {
        method: "DELETE",
        url: resource_url.to_string(),
        reason: e.to_string(),
    })?;
    match resp.status().as_u16() {
        200 | 204 => Ok(()),
        status => Err(ClientError::Http {
            method: "DELETE",
            url: resource_url.to_string(),
            status,
            body: String::new(),
            retry_after: None,
        }),
    }
}

/// Resolves a Location header (usually a path) against the endpoint URL.
fn absolute(endpoint: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_string();
    }
    let origin_end = endpoint
        .find("://")
        .and_then(|i| endpoint[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(endpoint.len());
    format!("{}{location}", &endpoint[..origin_end])
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolves_locations() {
        assert_eq!(
            super::absolute("http://h:1/whip", "/whip/ab"),
            "http://h:1/whip/ab"
        );
        assert_eq!(
            super::absolute("http://h:1", "/whip/ab"),
            "http://h:1/whip/ab"
        );
        assert_eq!(
            super::absolute("http://h:1/whip", "http://o/x"),
            "http://o/x"
        );
    }
}

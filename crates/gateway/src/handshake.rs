//! The WebSocket opening handshake, checked strictly before any work
//! (RFC 6455 §4.2.1): what is wrong gets a plain answer, never a half-open
//! socket.
//!
//! | request | answer |
//! |---|---|
//! | not a `GET` with `Connection: upgrade` and `Upgrade: websocket` | 400 |
//! | no `Host` | 400 |
//! | `Sec-WebSocket-Version` other than 13 | 426, with `Sec-WebSocket-Version: 13` (§4.4) |
//! | `Sec-WebSocket-Key` not the base64 of 16 bytes | 400 |
//! | an `Origin` the allow-list refuses ([`crate::origin`]) | 403 |

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};

use crate::origin::AllowedOrigins;

/// The only version we speak, and what a 426 names.
pub const VERSION: &str = "13";

/// Why a handshake was refused: the status and the short text the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotUpgrade,
    NoHost,
    Version,
    BadKey,
    Origin,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::NotUpgrade | Refusal::NoHost | Refusal::BadKey => StatusCode::BAD_REQUEST,
            Refusal::Version => StatusCode::UPGRADE_REQUIRED,
            Refusal::Origin => StatusCode::FORBIDDEN,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Refusal::NotUpgrade => "expected a WebSocket upgrade (version 13)\n",
            Refusal::NoHost => "missing Host header\n",
            Refusal::Version => "unsupported WebSocket version: use 13\n",
            Refusal::BadKey => "Sec-WebSocket-Key must be the base64 of 16 bytes\n",
            Refusal::Origin => "origin not allowed\n",
        }
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks an upgrade request; on success returns its `Sec-WebSocket-Key`.
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    origins: &AllowedOrigins,
) -> Result<HeaderValue, Refusal> {
    if method != Method::GET
        || !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(Refusal::NotUpgrade);
    }
    let host = match headers.get(header::HOST).map(|h| h.to_str()) {
        Some(Ok(h)) if !h.trim().is_empty() => h,
        _ => return Err(Refusal::NoHost),
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes().trim_ascii())
        != Some(VERSION.as_bytes())
    {
        return Err(Refusal::Version);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| {
            STANDARD
                .decode(k.as_bytes().trim_ascii())
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or(Refusal::BadKey)?;
    // An Origin that is not text is not an origin we could allow.
    let origin = match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => None,
        Some(Ok(o)) => Some(o),
        Some(Err(_)) => return Err(Refusal::Origin),
    };
    if !origins.allows(origin, host) {
        return Err(Refusal::Origin);
    }
    Ok(key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &[(&str, &str)], without: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "chat.example:8080"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            if !without.contains(&k) {
                h.insert(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
        }
        h
    }

    fn answer(extra: &[(&str, &str)], without: &[&str]) -> Result<HeaderValue, Refusal> {
        check(
            &Method::GET,
            &request(extra, without),
            &AllowedOrigins::default(),
        )
    }

    #[test]
    fn each_fault_gets_its_answer() {
        assert!(answer(&[], &[]).is_ok());
        assert!(answer(&[("origin", "http://chat.example:8080")], &[]).is_ok());
        assert_eq!(answer(&[], &["upgrade"]), Err(Refusal::NotUpgrade));
        assert_eq!(answer(&[], &["host"]), Err(Refusal::NoHost));
        assert_eq!(
            answer(&[("sec-websocket-version", "8")], &[]),
            Err(Refusal::Version)
        );
        assert_eq!(
            answer(&[], &["sec-websocket-version"]),
            Err(Refusal::Version)
        );
        assert_eq!(answer(&[], &["sec-websocket-key"]), Err(Refusal::BadKey));
        assert_eq!(
            answer(&[("sec-websocket-key", "abc")], &[]),
            Err(Refusal::BadKey)
        );
        // Base64, but of 15 bytes.
        assert_eq!(
            answer(&[("sec-websocket-key", "dGhlIHNhbXBsZSBub25j")], &[]),
            Err(Refusal::BadKey)
        );
        assert_eq!(
            answer(&[("origin", "http://evil.example")], &[]),
            Err(Refusal::Origin)
        );
        assert_eq!(
            check(
                &Method::POST,
                &request(&[], &[]),
                &AllowedOrigins::default()
            ),
            Err(Refusal::NotUpgrade)
        );
        assert_eq!(Refusal::Version.status(), StatusCode::UPGRADE_REQUIRED);
    }
}

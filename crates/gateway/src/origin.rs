//! Which pages may open a WebSocket here: the `Origin` check.
//!
//! A browser sends `Origin` with every WebSocket handshake and lets any page
//! open a socket to any host, so without this check a page on another site
//! could chat as the visitor. Non-browser clients send no `Origin` and are
//! let in. By default a page is let in when it came from this very host (its
//! origin's host and port are the request's `Host`); `--allowed-origins`
//! adds others, or `*` lets every origin in.

use std::fmt;

/// The allow-list, parsed once from `--allowed-origins`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// No `Origin`, the request's own host, or one of these (normalized by
    /// [`normalize`]: lowercase, no default port, no trailing slash).
    #[default]
    SameHost,
    Listed(Vec<String>),
    /// `*`: every origin.
    Any,
}

impl AllowedOrigins {
    /// Parses the flag's comma-separated entries: `*`, or origins like
    /// `https://chat.example` and `http://localhost:3000`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut listed = Vec::new();
        for entry in entries.iter().map(|e| e.as_ref().trim()) {
            match entry {
                "" => continue,
                "*" => return Ok(AllowedOrigins::Any),
                _ => listed.push(
                    normalize(entry)
                        .ok_or_else(|| {
                            format!("{entry:?} is not an origin like https://host[:port]")
                        })?
                        .to_string(),
                ),
            }
        }
        Ok(if listed.is_empty() {
            AllowedOrigins::SameHost
        } else {
            AllowedOrigins::Listed(listed)
        })
    }

    /// Whether a handshake with this `Origin` (if any) and `Host` may go on.
    pub fn allows(&self, origin: Option<&str>, host: &str) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if *self == AllowedOrigins::Any {
            return true;
        }
        // "null" (a sandboxed page, a file://) and garbage are not origins.
        let Some(origin) = normalize(origin) else {
            return false;
        };
        if origin.same_host(host) {
            return true;
        }
        match self {
            AllowedOrigins::Listed(list) => {
                let origin = origin.to_string();
                list.contains(&origin)
            }
            _ => false,
        }
    }
}

/// An origin taken apart: `scheme://host[:port]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    /// `None` when the origin names none, or names its scheme's default.
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `(host, port)` of an authority such as `example.com:8080` or `[::1]:80`.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&authority[..host.len() + 2], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let bracketed = host.starts_with('[');
    if host.is_empty() || host.contains(['/', '@', ' ']) || (!bracketed && host.contains(':')) {
        return None;
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse().ok()?),
    };
    Some((host, port))
}

/// Parses an `Origin` value or an allow-list entry; `None` if it is not one.
pub fn normalize(origin: &str) -> Option<Origin> {
    let origin = origin.trim().trim_end_matches('/');
    let (scheme, authority) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return None;
    }
    let (host, port) = split_authority(authority)?;
    let port = port.filter(|p| Some(*p) != default_port(&scheme));
    Some(Origin {
        scheme,
        host: host.to_ascii_lowercase(),
        port,
    })
}

impl Origin {
    /// Whether this origin is the host the request was sent to. A `Host`
    /// without a port matches the origin's default port: behind a proxy that
    /// terminates TLS, `https://chat.example` arrives as `Host: chat.example`.
    fn same_host(&self, host: &str) -> bool {
        let Some((host, port)) = split_authority(host.trim()) else {
            return false;
        };
        let port = port.filter(|p| Some(*p) != default_port(&self.scheme));
        host.eq_ignore_ascii_case(&self.host) && port == self.port
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::AllowedOrigins;

    #[test]
    fn no_origin_and_the_same_host_are_allowed_by_default() {
        let a = AllowedOrigins::default();
        assert!(a.allows(None, "127.0.0.1:8080"));
        assert!(a.allows(Some("http://127.0.0.1:8080"), "127.0.0.1:8080"));
        assert!(a.allows(Some("https://Chat.Example"), "chat.example"));
        assert!(a.allows(Some("http://chat.example"), "chat.example:80"));
        assert!(a.allows(Some("http://[::1]:8080"), "[::1]:8080"));
        assert!(!a.allows(Some("http://127.0.0.1:8081"), "127.0.0.1:8080"));
        assert!(!a.allows(Some("http://evil.example"), "127.0.0.1:8080"));
        assert!(!a.allows(Some("http://chat.example.evil"), "chat.example"));
        assert!(!a.allows(Some("null"), "chat.example"));
        assert!(!a.allows(Some("http://chat.example"), ""));
    }

    #[test]
    fn listed_origins_and_the_wildcard() {
        let a = AllowedOrigins::parse(&["https://app.example/", " HTTP://localhost:3000"]).unwrap();
        assert!(a.allows(Some("https://app.example"), "gw.internal:8080"));
        assert!(a.allows(Some("https://app.example:443"), "gw.internal:8080"));
        assert!(a.allows(Some("http://localhost:3000"), "gw.internal:8080"));
        assert!(!a.allows(Some("http://app.example"), "gw.internal:8080"));
        assert!(a.allows(Some("http://gw.internal:8080"), "gw.internal:8080"));
        let any = AllowedOrigins::parse(&["*"]).unwrap();
        assert!(any.allows(Some("http://evil.example"), "chat.example"));
        assert!(any.allows(Some("null"), "chat.example"));
        assert_eq!(
            AllowedOrigins::parse::<&str>(&[]).unwrap(),
            AllowedOrigins::SameHost
        );
        assert!(AllowedOrigins::parse(&["app.example"]).is_err());
        assert!(AllowedOrigins::parse(&["https://app.example:99999"]).is_err());
    }
}

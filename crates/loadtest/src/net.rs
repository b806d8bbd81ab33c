//! Where load goes and where it comes from.
//!
//! Load only ever targets this machine: a [`Target`] refuses any host outside
//! 127.0.0.0/8. Clients are spread over several 127.0.0.x source addresses by
//! a [`SourcePool`], so one machine can open more sockets to one server than a
//! single ephemeral port range allows.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, bail, ensure};

/// A `since` far above any message id the server will have issued: the server
/// replays no history, so every Chat frame a client sees belongs to this run
/// (foreign ones are ignored anyway, by the run id in the text).
/// 2^53 - 1 keeps it exact in a JavaScript client too.
pub const SKIP_HISTORY_SINCE: u64 = 9_007_199_254_740_991;

/// A WebSocket endpoint on the loopback network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL the handshake requests, `?since=` added when absent.
    pub url: String,
    /// Where to connect.
    pub addr: SocketAddrV4,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH[?QUERY]`, refusing anything but a loopback
    /// IPv4 host (or `localhost`). Adds `since=` to skip history unless the
    /// URL already says where to start.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = match url.split_once("://") {
            Some(("ws", rest)) => rest,
            Some((scheme, _)) => {
                bail!(
                    "{url}: only ws:// is supported (got {scheme}://); load stays on this machine"
                )
            }
            None => bail!("{url}: expected ws://127.0.0.1:PORT/ws"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        let (host, port) = authority
            .rsplit_once(':')
            .with_context(|| format!("{url}: the port is missing"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("{url}: bad port {port:?}"))?;
        let ip = if host.eq_ignore_ascii_case("localhost") {
            Ipv4Addr::LOCALHOST
        } else {
            host.parse::<Ipv4Addr>()
                .with_context(|| format!("{url}: the host must be an IPv4 loopback address"))?
        };
        ensure!(
            ip.is_loopback(),
            "{url}: refusing to load {ip}; load only ever targets 127.0.0.0/8"
        );
        ensure!(port != 0, "{url}: port 0 is not a server");
        let mut path = if path.starts_with('?') {
            format!("/ws{path}")
        } else {
            path.to_string()
        };
        if !path.contains("since=") {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&format!("since={SKIP_HISTORY_SINCE}"));
        }
        Ok(Target {
            url: format!("ws://{ip}:{port}{path}"),
            addr: SocketAddrV4::new(ip, port),
        })
    }
}

/// Source addresses 127.0.0.x for the clients, assigned round-robin.
#[derive(Debug, Clone, Copy)]
pub struct SourcePool {
    first: Ipv4Addr,
    count: u32,
}

impl SourcePool {
    /// `count` addresses starting at `first`, all inside 127.0.0.0/8.
    pub fn new(first: Ipv4Addr, count: u32) -> anyhow::Result<SourcePool> {
        ensure!(count > 0, "at least one source address is needed");
        let last = u32::from(first)
            .checked_add(count - 1)
            .map(Ipv4Addr::from)
            .context("source address range overflows")?;
        ensure!(
            first.is_loopback() && last.is_loopback(),
            "source addresses {first}..={last} must stay inside 127.0.0.0/8"
        );
        Ok(SourcePool { first, count })
    }

    /// The address client `index` binds to.
    pub fn addr(&self, index: usize) -> Ipv4Addr {
        let offset = (index % self.count as usize) as u32;
        Ipv4Addr::from(u32::from(self.first) + offset)
    }

    /// A pool of `count` addresses starting `skip` addresses after this one's
    /// first, for a child process that must not share ports with its siblings.
    pub fn shifted(&self, skip: u32, count: u32) -> anyhow::Result<SourcePool> {
        SourcePool::new(Ipv4Addr::from(u32::from(self.first) + skip), count)
    }

    pub fn first(&self) -> Ipv4Addr {
        self.first
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

/// File descriptors the tool keeps for itself besides one per client socket
/// (runtime, stdio, /proc reads, child pipes).
pub const FD_HEADROOM: u64 = 128;

/// Raises the open-file limit and checks `sockets` fit under it, with a clear
/// answer when they do not.
pub fn ensure_fd_budget(sockets: usize) -> anyhow::Result<u64> {
    let limit = crate::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let needed = sockets as u64 + FD_HEADROOM;
    if needed > limit {
        bail!(
            "{sockets} client sockets need about {needed} open files, but this process may \
             open at most {limit} (RLIMIT_NOFILE hard limit); use fewer clients, `idle --procs N` \
             to spread them over several loadtest processes, or raise the hard limit \
             (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=)"
        );
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_urls_and_skips_history() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            t.url,
            format!("ws://127.0.0.1:8080/ws?since={SKIP_HISTORY_SINCE}")
        );
        let t = Target::parse("ws://localhost:9/ws?since=5").unwrap();
        assert_eq!(t.url, "ws://127.0.0.1:9/ws?since=5");
        let t = Target::parse("ws://127.3.2.1:9").unwrap();
        assert!(t.url.starts_with("ws://127.3.2.1:9/ws?since="));
        let t = Target::parse("ws://127.0.0.1:9/ws?x=1").unwrap();
        assert!(t.url.starts_with("ws://127.0.0.1:9/ws?x=1&since="));
    }

    #[test]
    fn refuses_anything_off_this_machine() {
        for url in [
            "ws://10.0.0.1:80/ws",
            "ws://192.168.1.1:80/ws",
            "ws://8.8.8.8:80/ws",
            "ws://example.com:80/ws",
            "wss://127.0.0.1:443/ws",
            "http://127.0.0.1:80/ws",
            "ws://127.0.0.1/ws",
            "ws://127.0.0.1:0/ws",
        ] {
            assert!(Target::parse(url).is_err(), "{url} should be refused");
        }
    }

    #[test]
    fn source_pool_stays_on_loopback() {
        let pool = SourcePool::new(Ipv4Addr::new(127, 0, 0, 1), 4).unwrap();
        assert_eq!(pool.addr(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(pool.addr(5), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(
            pool.shifted(4, 2).unwrap().addr(1),
            Ipv4Addr::new(127, 0, 0, 6)
        );
        assert!(SourcePool::new(Ipv4Addr::new(127, 255, 255, 255), 2).is_err());
        assert!(SourcePool::new(Ipv4Addr::new(10, 0, 0, 1), 1).is_err());
    }
}

//! Gateway settings. The binary fills them from flags and environment.

use std::time::Duration;

pub use sharedconn_proto::Mode as ProtoMode;

use crate::origin::AllowedOrigins;
use crate::tls::Tls;

/// How sockets travel to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `SharedConnection=1`: one stream per worker carries every socket.
    #[default]
    Shared,
    /// `SharedConnection=0`: one stream per socket.
    Private,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" | "1" => Ok(Mode::Shared),
            "private" | "0" => Ok(Mode::Private),
            _ => Err(format!("unknown mode {s:?}: use shared or private")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Private => "private",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC addresses of the workers, e.g. `http://127.0.0.1:50051`. A socket
    /// goes to one of them, chosen by its WebSocket ID.
    pub workers: Vec<String>,
    pub mode: Mode,
    /// High 32 bits of every WebSocket ID this gateway issues. Random when
    /// `None`; set it to keep IDs stable across restarts or to rule out a
    /// clash between gateways.
    pub gateway_tag: Option<u32>,
    /// Largest text frame a client may send, in bytes (larger: close 1009).
    pub max_frame_bytes: usize,
    /// Most sockets held at once (more: HTTP 503).
    pub max_connections: usize,
    /// Frames per second a socket may send, sustained; excess waits in the
    /// client's TCP buffer, it is not dropped.
    pub frames_per_sec: u32,
    /// Frames a socket may send in a burst above the sustained rate.
    pub frame_burst: u32,
    /// Frames queued for one socket; past it (or past `socket_queue_bytes`)
    /// the socket falls behind and catches up from the log.
    pub socket_queue: usize,
    /// Bytes queued for one socket (the worst-case memory of its queue).
    pub socket_queue_bytes: usize,
    /// A write to a client that makes no progress for this long closes the
    /// socket (1008).
    pub stall_timeout: Duration,
    /// A client silent this long is pinged; silent `pong_timeout` longer,
    /// it is closed (1001), so a vanished client leaves the list.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// A frame begun and not finished within this closes its socket (1008).
    pub frame_timeout: Duration,
    /// The cluster's shared secret, sent in every `Hello`.
    pub link_token: Option<String>,
    /// A hung worker or a cut link is found within this (HTTP/2 pings).
    pub link_timeout: Duration,
    /// How long a socket may wait for a worker before it is closed (1012).
    pub reattach_grace: Duration,
    /// How long shutdown waits for sockets to close.
    pub drain_grace: Duration,
    /// How long a client may take to send its HTTP request head (and, with
    /// TLS, its handshake).
    pub header_read_timeout: Duration,
    /// Which `Origin`s may open a WebSocket (default: none sent, or this host).
    pub allowed_origins: AllowedOrigins,
    /// Serve https/wss with this certificate; plain http/ws when `None`.
    pub tls: Option<Tls>,
}

impl Config {
    pub fn new(workers: Vec<String>) -> Self {
        Config {
            workers,
            mode: Mode::Shared,
            gateway_tag: None,
            max_frame_bytes: 64 * 1024,
            max_connections: 100_000,
            frames_per_sec: 100,
            frame_burst: 200,
            socket_queue: 1024,
            socket_queue_bytes: 1 << 20,
            stall_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(20),
            frame_timeout: Duration::from_secs(10),
            link_token: None,
            link_timeout: Duration::from_secs(2),
            reattach_grace: Duration::from_secs(30),
            drain_grace: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            allowed_origins: AllowedOrigins::SameHost,
            tls: None,
        }
    }

    /// Checks the settings before anything is bound.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |m: &str| Err(crate::Error::Config(m.to_owned()));
        if self.workers.is_empty() {
            return bad("at least one worker address is needed");
        }
        for w in &self.workers {
            if tonic::transport::Endpoint::from_shared(w.clone()).is_err() {
                return Err(crate::Error::WorkerAddress(w.clone(), "not a URI".into()));
            }
        }
        if self.max_frame_bytes < 128 {
            return bad("max frame size must be at least 128 bytes");
        }
        if self.frames_per_sec == 0 || self.frame_burst == 0 {
            return bad("frame rate and burst must be positive");
        }
        if self.ping_interval.is_zero() || self.frame_timeout.is_zero() {
            return bad("ping interval and frame timeout must be positive");
        }
        if self.link_timeout < Duration::from_millis(200) {
            return bad("link timeout must be at least 200 ms");
        }
        if self.socket_queue_bytes < self.max_frame_bytes {
            return bad("socket queue bytes must hold at least one largest frame");
        }
        if self.socket_queue == 0 || self.max_connections == 0 {
            return bad("socket queue and max connections must be positive");
        }
        Ok(())
    }
}

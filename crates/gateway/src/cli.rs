//! The gateway's limits and edge settings as command-line flags (each also
//! an environment variable), shared by the `gateway` binary and the
//! all-in-one `sharedconn`.

use std::path::PathBuf;
use std::time::Duration;

use crate::origin::AllowedOrigins;
use crate::tls::Tls;
use crate::{Config, Error};

/// Per-socket and per-gateway limits.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Largest frame a client may send, in bytes (larger: close 1009).
    #[arg(long, env = "SHAREDCONN_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Most sockets held at once (more: HTTP 503).
    #[arg(long, env = "SHAREDCONN_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Frames per second one socket may send (sustained).
    #[arg(long, env = "SHAREDCONN_MAX_FRAMES_PER_SEC", default_value_t = 100)]
    pub max_frames_per_sec: u32,
    /// Frames one socket may send in a burst.
    #[arg(long, env = "SHAREDCONN_FRAME_BURST", default_value_t = 200)]
    pub frame_burst: u32,
    /// Frames queued for one socket; past it the socket falls behind and
    /// catches up from the log.
    #[arg(long, env = "SHAREDCONN_SOCKET_QUEUE", default_value_t = 1024)]
    pub socket_queue: usize,
    /// Bytes queued for one socket: the worst-case memory of its queue.
    #[arg(long, env = "SHAREDCONN_SOCKET_QUEUE_BYTES", default_value_t = 1 << 20)]
    pub socket_queue_bytes: usize,
    /// Seconds a write to a client may make no progress before the socket
    /// is closed (1008).
    #[arg(long, env = "SHAREDCONN_STALL_TIMEOUT_SECS", default_value_t = 30)]
    pub stall_timeout_secs: u64,
    /// Seconds of silence before a client is pinged.
    #[arg(long, env = "SHAREDCONN_PING_INTERVAL_SECS", default_value_t = 25)]
    pub ping_interval_secs: u64,
    /// Seconds a pinged client may stay silent before it is closed (1001).
    #[arg(long, env = "SHAREDCONN_PONG_TIMEOUT_SECS", default_value_t = 20)]
    pub pong_timeout_secs: u64,
    /// Seconds a client may take to finish a frame it began (else 1008).
    #[arg(long, env = "SHAREDCONN_FRAME_TIMEOUT_SECS", default_value_t = 10)]
    pub frame_timeout_secs: u64,
    /// Milliseconds to find a hung worker or a cut link (HTTP/2 pings).
    #[arg(long, env = "SHAREDCONN_LINK_TIMEOUT_MS", default_value_t = 2000)]
    pub link_timeout_ms: u64,
    /// Seconds a socket may wait for a worker before it is closed (1012).
    #[arg(long, env = "SHAREDCONN_REATTACH_GRACE_SECS", default_value_t = 30)]
    pub reattach_grace_secs: u64,
    /// Seconds shutdown waits for sockets to close (after SIGTERM).
    #[arg(long, env = "SHAREDCONN_DRAIN_GRACE_SECS", default_value_t = 5)]
    pub drain_grace_secs: u64,
}

impl Limits {
    /// Writes these limits into `config`.
    pub fn apply(&self, config: &mut Config) {
        config.max_frame_bytes = self.max_frame_bytes;
        config.max_connections = self.max_connections;
        config.frames_per_sec = self.max_frames_per_sec;
        config.frame_burst = self.frame_burst;
        config.socket_queue = self.socket_queue;
        config.socket_queue_bytes = self.socket_queue_bytes;
        config.stall_timeout = Duration::from_secs(self.stall_timeout_secs);
        config.link_timeout = Duration::from_millis(self.link_timeout_ms);
        config.ping_interval = Duration::from_secs(self.ping_interval_secs);
        config.pong_timeout = Duration::from_secs(self.pong_timeout_secs);
        config.frame_timeout = Duration::from_secs(self.frame_timeout_secs);
        config.reattach_grace = Duration::from_secs(self.reattach_grace_secs);
        config.drain_grace = Duration::from_secs(self.drain_grace_secs);
    }
}

/// What the gateway lets in at its edge: page origins, and TLS.
#[derive(clap::Args, Debug, Clone)]
pub struct Edge {
    /// Origins (like https://chat.example) whose pages may open WebSockets,
    /// besides the gateway's own host; `*` allows every origin. Clients that
    /// send no Origin (not browsers) are always let in.
    #[arg(long, env = "SHAREDCONN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// PEM certificate chain: serve https and wss (needs --tls-key).
    #[arg(long, env = "SHAREDCONN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SHAREDCONN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Edge {
    /// Writes these settings into `config`, reading and checking the TLS
    /// files now, before anything is bound.
    pub fn apply(&self, config: &mut Config) -> Result<(), Error> {
        config.allowed_origins = AllowedOrigins::parse(&self.allowed_origins)
            .map_err(|e| Error::Config(format!("--allowed-origins: {e}")))?;
        config.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Tls::from_pem_files(cert, key)?),
            (None, None) => None,
            _ => {
                return Err(Error::Config("--tls-cert and --tls-key go together".into()));
            }
        };
        Ok(())
    }
}

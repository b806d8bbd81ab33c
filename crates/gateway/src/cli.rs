//! The gateway's limits as command-line flags (each also an environment
//! variable), shared by the `gateway` binary and the all-in-one `sharedconn`.

use std::time::Duration;

use crate::Config;

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
    /// Frames queued for one socket before it is closed as too slow (1008).
    #[arg(long, env = "SHAREDCONN_SOCKET_QUEUE", default_value_t = 1024)]
    pub socket_queue: usize,
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
        config.drain_grace = Duration::from_secs(self.drain_grace_secs);
    }
}

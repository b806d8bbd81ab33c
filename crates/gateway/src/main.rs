//! `gateway`: holds browser WebSockets and forwards them to workers.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use sharedconn_gateway::{Config, Mode};

/// Terminates browser WebSockets and links them to workers over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address for HTTP and WebSockets.
    #[arg(long, env = "SHAREDCONN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Worker gRPC address; repeat or separate with commas for several.
    #[arg(
        long = "worker",
        env = "SHAREDCONN_WORKERS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    workers: Vec<String>,
    /// shared: one stream per worker for all sockets; private: one per socket.
    #[arg(long, env = "SHAREDCONN_MODE", default_value = "shared")]
    mode: Mode,
    /// Fixed gateway tag (hex, the high half of WebSocket IDs); random if unset.
    #[arg(long, env = "SHAREDCONN_GATEWAY_TAG", value_parser = parse_hex)]
    gateway_tag: Option<u32>,
    /// Largest frame a client may send, in bytes.
    #[arg(long, env = "SHAREDCONN_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
    /// Most sockets held at once.
    #[arg(long, env = "SHAREDCONN_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Frames per second one socket may send (sustained).
    #[arg(long, env = "SHAREDCONN_MAX_FRAMES_PER_SEC", default_value_t = 100)]
    max_frames_per_sec: u32,
    /// Frames one socket may send in a burst.
    #[arg(long, env = "SHAREDCONN_FRAME_BURST", default_value_t = 200)]
    frame_burst: u32,
    /// Seconds shutdown waits for sockets to close (after SIGTERM).
    #[arg(long, env = "SHAREDCONN_DRAIN_GRACE_SECS", default_value_t = 5)]
    drain_grace_secs: u64,
    /// Frames queued for one socket before it is closed as too slow.
    #[arg(long, env = "SHAREDCONN_SOCKET_QUEUE", default_value_t = 1024)]
    socket_queue: usize,
}

fn parse_hex(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| e.to_string())
}

impl Cli {
    fn config(self) -> Config {
        let mut config = Config::new(self.workers);
        config.mode = self.mode;
        config.gateway_tag = self.gateway_tag;
        config.max_frame_bytes = self.max_frame_bytes;
        config.max_connections = self.max_connections;
        config.frames_per_sec = self.max_frames_per_sec;
        config.frame_burst = self.frame_burst;
        config.socket_queue = self.socket_queue;
        config.drain_grace = std::time::Duration::from_secs(self.drain_grace_secs);
        config
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    let cli = Cli::parse();
    let listen = cli.listen;
    let config = cli.config();
    config.validate().context("invalid configuration")?;
    let listener =
        sharedconn_common::listen(listen).with_context(|| format!("cannot listen on {listen}"))?;
    sharedconn_gateway::run(listener, config, sharedconn_common::shutdown_signal())
        .await
        .context("gateway failed")
}

//! `worker`: serves the chat to gateways over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sharedconn_worker::BackplaneKind;

/// jemalloc, as in the gateway (`crates/gateway/src/main.rs` says why).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs the chat application for the sockets that gateways hold.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address for the gRPC server.
    #[arg(
        long,
        env = "SHAREDCONN_WORKER_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: SocketAddr,
    /// Directory of the message log.
    #[arg(long, env = "SHAREDCONN_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Recent messages sent to every socket that opens.
    #[arg(long, env = "SHAREDCONN_HISTORY", default_value_t = 50)]
    history: usize,
    /// Shortest gap between online-list broadcasts, in milliseconds.
    #[arg(long, env = "SHAREDCONN_USERLIST_INTERVAL_MS", default_value_t = 100)]
    userlist_interval_ms: u64,
    /// Where the chat's state lives: `embedded` (one worker, the log under
    /// --data-dir) or `redis://HOST:PORT[/DB]` (any number of workers).
    #[arg(long, env = "SHAREDCONN_BACKPLANE", default_value = "embedded")]
    backplane: BackplaneKind,
    /// Prefix of every Redis key (several chats can share one Redis).
    #[arg(long, env = "SHAREDCONN_REDIS_PREFIX", default_value = "sharedconn:")]
    redis_prefix: String,
    /// Approximate number of messages the log keeps (older ones are trimmed).
    #[arg(long, env = "SHAREDCONN_MAX_LOG_MESSAGES", default_value_t = 1_000_000)]
    max_log_messages: u64,
    /// Posts per second this worker takes (past it: `busy`); 0 for no ceiling.
    #[arg(long, env = "SHAREDCONN_MAX_POSTS_PER_SEC", default_value_t = 20_000)]
    max_posts_per_sec: u32,
    /// The embedded log's page cache, in MiB.
    #[arg(long, env = "SHAREDCONN_CACHE_MIB", default_value_t = 64)]
    cache_mib: usize,
    /// Seconds a dead gateway's users stay in the online list.
    #[arg(long, env = "SHAREDCONN_PRESENCE_LEASE_SECS", default_value_t = 10)]
    presence_lease_secs: u64,
    /// Shared secret every gateway must present (unset: any gateway may link).
    #[arg(long, env = "SHAREDCONN_LINK_TOKEN", hide_env_values = true)]
    link_token: Option<String>,
    /// Seconds a stopping worker waits for gateways to move their sockets.
    #[arg(long, env = "SHAREDCONN_DRAIN_GRACE_SECS", default_value_t = 5)]
    drain_grace_secs: u64,
    /// Address for HTTP `/metrics` (Prometheus) and `/healthz`; off when unset.
    #[arg(long, env = "SHAREDCONN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Sockets one gateway may hold open on this worker (past it: 1013).
    #[arg(
        long,
        env = "SHAREDCONN_MAX_SOCKETS_PER_GATEWAY",
        default_value_t = 100_000
    )]
    max_sockets_per_gateway: usize,
    /// Frames per second one socket may send through its gateway, sustained;
    /// past it and the burst the socket is closed (1008). Keep it above the
    /// gateways' own limit (default twice theirs).
    #[arg(long, env = "SHAREDCONN_SOCKET_FRAMES_PER_SEC", default_value_t = 200)]
    socket_frames_per_sec: u32,
    /// Frames one socket may send in a burst above that rate.
    #[arg(long, env = "SHAREDCONN_SOCKET_FRAME_BURST", default_value_t = 400)]
    socket_frame_burst: u32,
    /// Largest frame one socket may send (past it: 1009). Keep it at least
    /// the gateways' --max-frame-bytes.
    #[arg(long, env = "SHAREDCONN_MAX_FRAME_BYTES", default_value_t = 65536)]
    max_frame_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    sharedconn_common::panic::exit_on_panic();
    let cli = Cli::parse();
    sharedconn_common::fdlimit::raise_nofile_limit();
    sharedconn_common::metrics::install();
    let mut config = sharedconn_worker::Config::new(cli.data_dir);
    config.history = cli.history;
    config.userlist_interval = Duration::from_millis(cli.userlist_interval_ms);
    config.backplane = cli.backplane;
    config.redis_prefix = cli.redis_prefix;
    config.max_log_messages = cli.max_log_messages;
    config.max_posts_per_sec = cli.max_posts_per_sec;
    config.cache_bytes = cli.cache_mib << 20;
    config.presence_lease = Duration::from_secs(cli.presence_lease_secs.max(1));
    config.link_token = cli.link_token.filter(|t| !t.is_empty());
    config.drain_grace = Duration::from_secs(cli.drain_grace_secs);
    config.metrics_listen = cli.metrics_listen;
    config.limits = sharedconn_worker::Limits {
        sockets_per_gateway: cli.max_sockets_per_gateway.max(1),
        frames_per_sec: cli.socket_frames_per_sec.max(1),
        frame_burst: cli.socket_frame_burst.max(1),
        frame_bytes: cli.max_frame_bytes.max(1),
    };
    let listener = sharedconn_common::listen(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    sharedconn_worker::run(listener, config, sharedconn_common::shutdown_signal())
        .await
        .context("worker failed")
}

//! `gateway`: holds browser WebSockets and forwards them to workers.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use sharedconn_gateway::cli::{Edge, Limits};
use sharedconn_gateway::{Config, Mode};

/// jemalloc, not glibc's malloc: a private-mode failover opens and drops
/// thousands of HTTP/2 streams at once, and glibc spent much of it merging
/// freed buffers (`malloc_consolidate`); BENCHMARKS.md has the numbers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Shared secret sent to workers (their --link-token).
    #[arg(long, env = "SHAREDCONN_LINK_TOKEN", hide_env_values = true)]
    link_token: Option<String>,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    edge: Edge,
}

fn parse_hex(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| e.to_string())
}

impl Cli {
    fn config(self) -> anyhow::Result<Config> {
        let mut config = Config::new(self.workers);
        config.mode = self.mode;
        config.gateway_tag = self.gateway_tag;
        config.link_token = self.link_token.filter(|t| !t.is_empty());
        self.limits.apply(&mut config);
        self.edge.apply(&mut config)?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    sharedconn_common::panic::exit_on_panic();
    let cli = Cli::parse();
    sharedconn_common::fdlimit::raise_nofile_limit();
    sharedconn_common::metrics::install();
    let listen = cli.listen;
    let config = cli.config().context("invalid configuration")?;
    config.validate().context("invalid configuration")?;
    let listener =
        sharedconn_common::listen(listen).with_context(|| format!("cannot listen on {listen}"))?;
    sharedconn_gateway::run(listener, config, sharedconn_common::shutdown_signal())
        .await
        .context("gateway failed")
}

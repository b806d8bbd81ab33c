//! `worker`: serves the chat to gateways over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    sharedconn_common::panic::exit_on_panic();
    let cli = Cli::parse();
    sharedconn_common::fdlimit::raise_nofile_limit();
    let mut config = sharedconn_worker::Config::new(cli.data_dir);
    config.history = cli.history;
    config.userlist_interval = Duration::from_millis(cli.userlist_interval_ms);
    let listener = sharedconn_common::listen(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    sharedconn_worker::run(listener, config, sharedconn_common::shutdown_signal())
        .await
        .context("worker failed")
}

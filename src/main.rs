//! `sharedconn`: the whole chat in one process, for trying it out.
//!
//! Starts a worker (embedded message log) on a loopback port and a gateway
//! linked to it over real gRPC, exactly as the separate `worker` and
//! `gateway` binaries would run, and prints the URL to open.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sharedconn_gateway::Mode;
use sharedconn_gateway::cli::Limits;
use tokio::sync::watch;
use tracing::info;

/// Runs one worker and one gateway in this process.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address for HTTP and WebSockets.
    #[arg(long, env = "SHAREDCONN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// shared (SharedConnection=1) or private (SharedConnection=0).
    #[arg(long, env = "SHAREDCONN_MODE", default_value = "shared")]
    mode: Mode,
    /// Directory of the message log.
    #[arg(long, env = "SHAREDCONN_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Recent messages sent to every socket that opens.
    #[arg(long, env = "SHAREDCONN_HISTORY", default_value_t = 50)]
    history: usize,
    #[command(flatten)]
    limits: Limits,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    let cli = Cli::parse();

    let mut worker_config = sharedconn_worker::Config::new(&cli.data_dir);
    worker_config.history = cli.history;
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let worker_url = format!("http://{}", worker_listener.local_addr()?);
    let mut gateway_config = sharedconn_gateway::Config::new(vec![worker_url]);
    gateway_config.mode = cli.mode;
    cli.limits.apply(&mut gateway_config);
    gateway_config.validate().context("invalid configuration")?;
    let listener = sharedconn_common::listen(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;

    // The gateway drains first (its sockets close with 1001), then the worker.
    let (stop_worker, mut worker_stopped) = watch::channel(false);
    let worker = tokio::spawn(sharedconn_worker::run(
        worker_listener,
        worker_config,
        async move {
            let _ = worker_stopped.wait_for(|stop| *stop).await;
        },
    ));
    let gateway = sharedconn_gateway::run(
        listener,
        gateway_config,
        sharedconn_common::shutdown_signal(),
    );
    info!("chat at http://{}/ (mode {})", cli.listen, cli.mode);
    eprintln!("\n  sharedconn is running: open http://{}/\n", cli.listen);
    let result = gateway.await;
    let _ = stop_worker.send(true);
    worker.await.context("worker task")??;
    result.context("gateway failed")
}

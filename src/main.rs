//! `sharedconn`: the whole chat in one process, for trying it out.
//!
//! Starts a worker (embedded message log) on a loopback port and a gateway
//! linked to it over real gRPC, exactly as the separate `worker` and
//! `gateway` binaries would run, and prints the URL to open.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Parser;
use sharedconn_gateway::Mode;
use sharedconn_gateway::cli::{Edge, Limits};
use tokio::sync::{oneshot, watch};
use tracing::{error, info};

/// jemalloc, as in the gateway (`crates/gateway/src/main.rs` says why).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Where the chat's state lives: `embedded` (the log under --data-dir)
    /// or `redis://HOST:PORT[/DB]` (shared with other workers).
    #[arg(long, env = "SHAREDCONN_BACKPLANE", default_value = "embedded")]
    backplane: sharedconn_worker::BackplaneKind,
    #[command(flatten)]
    limits: Limits,
    #[command(flatten)]
    edge: Edge,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sharedconn_common::init_tracing();
    sharedconn_common::panic::exit_on_panic();
    let cli = Cli::parse();
    sharedconn_common::fdlimit::raise_nofile_limit();
    // One recorder for both halves: the gateway's /metrics shows the worker's too.
    sharedconn_common::metrics::install();

    let mut worker_config = sharedconn_worker::Config::new(&cli.data_dir);
    worker_config.history = cli.history;
    worker_config.backplane = cli.backplane.clone();
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let worker_url = format!("http://{}", worker_listener.local_addr()?);
    let mut gateway_config = sharedconn_gateway::Config::new(vec![worker_url]);
    gateway_config.mode = cli.mode;
    cli.limits.apply(&mut gateway_config);
    cli.edge
        .apply(&mut gateway_config)
        .context("invalid configuration")?;
    gateway_config.validate().context("invalid configuration")?;
    // The worker's own limits never below what its one gateway lets through.
    worker_config.limits = worker_config.limits.covering(
        gateway_config.frames_per_sec,
        gateway_config.frame_burst,
        gateway_config.max_frame_bytes,
        gateway_config.max_connections,
    );
    let scheme = if gateway_config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let listener = sharedconn_common::listen(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr()?;

    // The gateway drains first (its sockets close with 1001), then the worker.
    // A worker that stops on its own (it could not open the message log, its
    // server failed) stops the gateway too: a process that only answers 503
    // must not pass for a running chat.
    let (stop_worker, worker_stop) = watch::channel(false);
    let (worker_ended, worker_ended_rx) = oneshot::channel::<()>();
    let data_dir = cli.data_dir.clone();
    let worker = tokio::spawn(async move {
        let mut stop = worker_stop.clone();
        let result = sharedconn_worker::run(worker_listener, worker_config, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
        let asked = *worker_stop.borrow();
        drop(worker_ended);
        match result {
            Ok(()) if !asked => Err(anyhow!("worker stopped unexpectedly")),
            r => r.with_context(|| format!("worker failed (data dir {})", data_dir.display())),
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = sharedconn_common::shutdown_signal() => {}
            _ = worker_ended_rx => error!("worker stopped, stopping the gateway"),
        }
    };
    let gateway = sharedconn_gateway::run(listener, gateway_config, shutdown);
    info!("chat at {scheme}://{addr}/ (mode {})", cli.mode);
    eprintln!("\n  sharedconn is running: open {scheme}://{addr}/\n");
    let result = gateway.await;
    let _ = stop_worker.send(true);
    worker.await.context("worker task")??;
    result.context("gateway failed")
}

//! Process plumbing shared by the sharedconn binaries.
//!
//! Modules:
//! - [`fdlimit`]: raise the open-file limit at start, and read it.
//! - [`metrics`]: the process's Prometheus recorder, installed and rendered.
//! - [`panic`]: the binaries' panic hook, which logs and ends the process.
//! - [`rate`]: the token bucket both the gateway and the worker limit
//!   sockets with.

pub mod fdlimit;
pub mod metrics;
pub mod panic;
pub mod rate;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tracing::info;

/// Accept queue length. tokio's `TcpListener::bind` asks for far less, which
/// a join storm overflows at once: the kernel drops the SYNs and the clients
/// retry only after a 1 s timeout. The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener with a [`LISTEN_BACKLOG`] accept queue.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); colours only
/// when stderr is a terminal (not in `docker logs` or files).
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => info!("SIGINT received, shutting down"),
            _ = term.recv() => info!("SIGTERM received, shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

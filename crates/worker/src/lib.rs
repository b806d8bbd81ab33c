//! The worker: a tonic server that runs the application for every socket that
//! the gateways hold, and addresses every reply by WebSocket ID.
//!
//! How it works: each gateway opens `Link` streams ([`link`]). In shared mode a
//! gateway sends all its sockets over one stream; in private mode each socket
//! has a stream of its own. Either way the stream handlers turn protobuf
//! events into [`runtime::Input`]s and queue them for one task, the runtime,
//! which owns the application and the [`router`] (which socket lives on which
//! stream). Because one task sees every event in order, the chat has a single
//! total order without locks. The application writes through an
//! [`app::Outbox`]; a broadcast becomes one `Deliver` per stream carrying every
//! WebSocket ID on that stream, so it crosses a shared stream once.
//!
//! Modules:
//! - [`app`]: the `%CSP.WebSocket`-shaped trait an application implements.
//! - [`chat`]: the seed's `Chat.Server` on top of that trait; [`chat::rules`]
//!   parses and renders frames and does no I/O.
//! - [`backplane`]: what IRIS keeps in globals (connections, users, the
//!   message log) behind a trait; [`backplane::embedded`] keeps the log in redb.
//! - [`router`]: WebSocket ID → stream, and the per-stream send queues.
//! - [`link`]: the gRPC service; protobuf stays at this edge.
//! - [`runtime`]: the single task that drives the application.

pub mod app;
pub mod backplane;
pub mod chat;
pub mod config;
pub mod error;
pub mod link;
pub mod router;
pub mod runtime;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use config::Config;
pub use error::Error;

/// Accepted gateway connections, without Nagle's delay: a private-mode
/// stream carries one socket's small frames, which Nagle would hold back
/// waiting for acknowledgements.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    })
}

/// Serves the worker on `listener` until `shutdown` completes, then ends every
/// link stream (gateways reconnect elsewhere or later) and flushes the log.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let backplane = backplane::embedded::Embedded::open(&config.data_dir, config.history)?;
    let app = chat::Chat::new(backplane, config.history, config.userlist_interval);
    let (runtime, inbox) = runtime::Runtime::new(app);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::spawn(runtime.run(stop_rx));

    info!(%addr, data_dir = %config.data_dir.display(), "worker listening");
    let service = link::service(inbox);
    let result = tonic::transport::Server::builder()
        // Private mode opens one stream per browser socket on one connection.
        .max_concurrent_streams(Some(link::MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            shutdown.await;
            info!("worker draining");
            // Ending the runtime drops every response stream, which lets the
            // server's graceful shutdown finish.
            let _ = stop_tx.send(());
        })
        .await;
    runtime.await.ok();
    info!("worker stopped");
    result.map_err(Error::Transport)
}

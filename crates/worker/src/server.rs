//! The gRPC server, with every connection's HTTP/2 on a thread of its own.
//!
//! A connection's task reads what its gateway sends, answers the gateway's
//! keepalive pings and writes out what the streams queued. The streams' own
//! tasks (in private mode one per browser socket) encode what they send. On
//! one runtime, an online list for 5,000 private streams made 5,000 stream
//! tasks runnable at once, each encoding its copy, and a ping that came in
//! then waited its turn behind them for over a second: the gateway took a
//! busy worker for a hung one and moved its sockets. So the connections run
//! on a single-threaded runtime of their own, and hand their streams' tasks
//! to the main runtime: the thread that answers pings never waits behind a
//! stream, only for the CPU. Each connection's socket is registered with
//! that runtime's own I/O driver, so its readiness is not delivered late by
//! a busy main runtime either.
//!
//! This is what `tonic::transport::Server` does, less the features the worker
//! does not use (TLS, HTTP/1, connection ages, a concurrency limit), with the
//! one difference of where each task runs.

use std::future::Future;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_stream::StreamExt;
use tonic::service::Routes;
use tracing::debug;

use crate::error::Error;

/// HTTP/2 settings of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    /// Streams reset by the peer, or by us, before h2 calls it abuse.
    pub max_reset_streams: usize,
    /// How often an idle connection is pinged (finds a gateway that is gone).
    pub keepalive_interval: Duration,
}

/// Spawns a connection's stream tasks onto the main runtime.
#[derive(Clone)]
struct StreamExecutor(Handle);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// Serves `routes` on every connection from `incoming` until `signal`
/// completes, then shuts each connection down gracefully (GOAWAY) and waits
/// for them all to end. Stream tasks run on the runtime this is called on.
pub async fn serve(
    incoming: impl tokio_stream::Stream<Item = std::io::Result<TcpStream>>,
    routes: Routes,
    settings: Settings,
    signal: impl Future<Output = ()>,
) -> Result<(), Error> {
    let connections = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = connections.handle().clone();
    let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("link-connections".into())
        .spawn(move || {
            connections.block_on(async {
                let _ = stop.await;
            })
        })?;

    let mut builder = http2::Builder::new(StreamExecutor(Handle::current()));
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_pending_accept_reset_streams(settings.max_reset_streams)
        .max_local_error_reset_streams(settings.max_reset_streams)
        .keep_alive_interval(settings.keepalive_interval);
    let service = TowerToHyperService::new(routes.prepare());

    // Each connection holds a receiver; `closed` tells when all are gone.
    let (shutting_down, watch) = tokio::sync::watch::channel(false);
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut signal = std::pin::pin!(signal);
        loop {
            let io = tokio::select! {
                _ = &mut signal => break,
                io = incoming.next() => io,
            };
            let io = match io {
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    debug!(error = %e, "cannot accept a connection");
                    continue;
                }
                None => break,
            };
            let builder = builder.clone();
            let service = service.clone();
            let mut watch = watch.clone();
            handle.spawn(async move {
                // Accepted on the main runtime; registered again here, so
                // that this thread's own driver wakes it, not a busy one.
                let io = match io.into_std().and_then(TcpStream::from_std) {
                    Ok(io) => io,
                    Err(e) => {
                        debug!(error = %e, "cannot move a connection to its thread");
                        return;
                    }
                };
                let conn = builder.serve_connection(TokioIo::new(io), service);
                let mut conn = std::pin::pin!(conn);
                let served = tokio::select! {
                    served = &mut conn => served,
                    _ = watch.changed() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = served {
                    debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }
    drop(watch);
    let _ = shutting_down.send(true);
    shutting_down.closed().await;
    let _ = stopped.send(());
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
}

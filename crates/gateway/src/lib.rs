//! The gateway: holds every browser WebSocket and forwards it to a worker.
//!
//! How it works: [`http`] serves the chat page and upgrades WebSockets at
//! `/ws` and at the seed page's `/csp/user/Chat.Server.cls`. Each socket gets
//! a WebSocket ID unique across gateways (this gateway's random 32-bit tag,
//! then a counter) and is attached to a worker by [`upstream`]: over the one
//! shared stream to that worker (`--mode shared`, the seed's
//! `SharedConnection=1`) or over a stream of its own (`--mode private`). A
//! [`session`] task per socket moves frames both ways. The gateway has no
//! chat logic: it forwards open / frame / close and writes whatever a worker
//! addresses to a WebSocket ID.
//!
//! Modules:
//! - [`http`]: routes, upgrade handshake, admission control.
//! - [`session`]: one socket's state machine, rate limit, close codes.
//! - [`frames`]: reading through tungstenite, writing frames without copies.
//! - [`upstream`]: the links to workers, finding them, re-attaching sockets
//!   when a worker dies or drains; [`liveness`]: telling a silent worker
//!   from a busy gateway.
//! - [`socket`]: what the gateway keeps per socket so any worker can serve
//!   it (parked state, unacknowledged frames).
//! - [`queue`]: a socket's outbound queue, bounded in frames and bytes, its
//!   place in the message log, and catching up when it fell behind.
//! - [`handshake`]: the strict upgrade checks; [`origin`]: the `Origin` allow-list.
//! - [`tls`]: https/wss with a PEM certificate; [`io`]: a plain or TLS connection.
//! - [`accept`]: the socket budget and answering when file descriptors run out.
//! - [`metrics`]: what is recorded for Prometheus (served at `/metrics`).
//! - [`config`], [`error`]: settings, and the one place errors become close codes;
//!   [`cli`]: the limits as flags, for the binaries.

pub mod accept;
pub mod cli;
pub mod config;
pub mod error;
pub mod frames;
pub mod handshake;
pub mod http;
pub mod io;
pub mod liveness;
pub mod metrics;
pub mod origin;
pub mod queue;
pub mod session;
pub mod socket;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{Config, Mode};
pub use error::Error;
use upstream::Upstream;

/// Idle time before the kernel probes a silent connection, the gap between
/// probes, and how many unanswered probes end it: a dead peer is found
/// within about 90 s.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_PROBES: u32 = 3;

/// How often the gateway logs what it holds.
const STATUS_EVERY: Duration = Duration::from_secs(60);

/// What every connection of one gateway shares.
pub struct Gateway {
    config: Config,
    /// The chat page, rendered once for this configuration.
    page: bytes::Bytes,
    tag: u32,
    next_ws: AtomicU32,
    upstream: Arc<Upstream>,
    /// One permit per open socket: `max_connections`, or fewer if the
    /// open-file limit is lower ([`accept::socket_budget`]).
    permits: Arc<Semaphore>,
    max_sockets: usize,
    /// Cancelled on shutdown: every socket closes with 1001.
    drain: CancellationToken,
    tracker: TaskTracker,
}

impl Gateway {
    fn open_sockets(&self) -> usize {
        self.max_sockets - self.permits.available_permits()
    }

    fn next_ws_id(&self) -> u64 {
        sharedconn_proto::ws_id(self.tag, self.next_ws.fetch_add(1, Ordering::Relaxed))
    }
}

/// Serves on `listener` until `shutdown` completes; then closes every socket
/// with 1001 "going away" and waits for them up to the drain grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    metrics::describe();
    let tag = config
        .gateway_tag
        .unwrap_or_else(|| rand::random::<u32>().max(1));
    let stop_links = CancellationToken::new();
    let upstream = Upstream::start(&config, tag, stop_links.clone())?;
    let nofile = sharedconn_common::fdlimit::nofile_limit().map(|l| l.soft);
    let max_sockets = accept::socket_budget(config.max_connections, nofile);
    if max_sockets < config.max_connections {
        info!(
            max_sockets,
            max_connections = config.max_connections,
            open_file_limit = nofile,
            "open-file limit caps the sockets below max-connections"
        );
    }
    let gateway = Arc::new(Gateway {
        page: http::index_page(config.max_frame_bytes),
        tag,
        // A random start: a gateway restarted with a fixed tag does not issue
        // the IDs of its previous run again (with half the space left before
        // the counter wraps).
        next_ws: AtomicU32::new((rand::random::<u32>() >> 1).max(1)),
        upstream,
        permits: Arc::new(Semaphore::new(max_sockets)),
        max_sockets,
        drain: CancellationToken::new(),
        tracker: TaskTracker::new(),
        config,
    });
    let addr = listener.local_addr()?;
    info!(%addr, gateway_tag = format!("{tag:08x}"), mode = %gateway.config.mode, workers = ?gateway.config.workers, tls = gateway.config.tls.is_some(), "gateway listening");
    let mut spare = accept::Spare::new();

    tokio::pin!(shutdown);
    let mut status =
        tokio::time::interval_at(tokio::time::Instant::now() + STATUS_EVERY, STATUS_EVERY);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        spare.refill();
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            _ = status.tick() => {
                let states = gateway.upstream.socket_states();
                info!(
                    sockets = gateway.open_sockets(),
                    linked = gateway.upstream.linked(),
                    behind = states.behind,
                    fetching = states.fetching,
                    unserved = states.unserved,
                    "gateway status"
                );
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if accept::out_of_descriptors(&e) => {
                    // The connection waiting in the queue gets a 503 instead
                    // of hanging until its client gives up.
                    spare.shed(&listener, gateway.config.tls.is_some()).await;
                    continue;
                }
                Err(e) => {
                    // Back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // A client that vanished without closing (a laptop lid, a dead
        // network) is found by the kernel, at no cost to an idle socket.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL)
            .with_retries(TCP_KEEPALIVE_PROBES);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let gateway = gateway.clone();
        let drain = gateway.drain.clone();
        let header_timeout = gateway.config.header_read_timeout;
        gateway.tracker.clone().spawn(async move {
            let stream = match &gateway.config.tls {
                None => io::ServerIo::Plain(stream),
                // The handshake shares the request head's deadline.
                Some(tls) => {
                    match tokio::time::timeout(header_timeout, tls.acceptor().accept(stream)).await
                    {
                        Ok(Ok(stream)) => io::ServerIo::Tls(Box::new(stream)),
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "tls handshake timed out");
                            return;
                        }
                    }
                }
            };
            let service = service_fn(move |req| http::handle(gateway.clone(), req));
            let conn = http1::Builder::new()
                // A client that never finishes its request is dropped.
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = drain.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection ended");
            }
        });
    }

    info!(sockets = gateway.open_sockets(), "gateway draining");
    drop(listener);
    gateway.drain.cancel();
    gateway.tracker.close();
    if tokio::time::timeout(gateway.config.drain_grace, gateway.tracker.wait())
        .await
        .is_err()
    {
        warn!("drain grace period over, dropping remaining sockets");
    }
    stop_links.cancel();
    info!("gateway stopped");
    Ok(())
}

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
//!   message log) behind a trait; [`backplane::embedded`] keeps the log in
//!   redb for one worker, [`backplane::redis`] shares it between workers.
//! - [`router`]: WebSocket ID → stream, and the per-stream send queues.
//! - [`link`]: the gRPC service; protobuf stays at this edge.
//! - [`runtime`]: the single task that drives the application.
//! - [`server`]: the gRPC server, its connections on a thread of their own.
//! - [`metrics`]: what is recorded for Prometheus; [`admin`]: the optional
//!   HTTP listener serving it and `/healthz`.

pub mod admin;
pub mod app;
pub mod backplane;
pub mod chat;
pub mod config;
pub mod error;
pub mod link;
pub mod metrics;
pub mod router;
pub mod runtime;
pub mod server;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use backplane::redis::RedisConfig;
pub use config::{BackplaneKind, Config};
pub use error::Error;
pub use runtime::Limits;

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

/// Serves the worker on `listener` until `shutdown` completes, then asks
/// every gateway to move its sockets elsewhere (up to the drain grace) and
/// flushes the log.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    match &config.backplane {
        BackplaneKind::Embedded => {
            let backplane = backplane::embedded::Embedded::open(
                &config.data_dir,
                backplane::embedded::Options {
                    history: config.history,
                    lease: config.presence_lease,
                    max_messages: config.max_log_messages,
                    cache_bytes: config.cache_bytes,
                },
            )?;
            info!(data_dir = %config.data_dir.display(), "embedded backplane");
            serve(listener, &config, backplane, shutdown).await
        }
        BackplaneKind::Redis(url) => {
            let backplane = backplane::redis::RedisBackplane::connect(RedisConfig {
                url: url.clone(),
                prefix: config.redis_prefix.clone(),
                lease: config.presence_lease,
                max_log: config.max_log_messages,
                history: config.history,
            })
            .await?;
            serve(listener, &config, backplane, shutdown).await
        }
    }
}

async fn serve<B: backplane::Backplane>(
    listener: TcpListener,
    config: &Config,
    backplane: B,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let app = chat::Chat::new(backplane, config.history, config.userlist_interval)
        .with_ingest_ceiling(config.max_posts_per_sec);
    let (runtime, inbox, health) = runtime::Runtime::new(app, config.limits);
    metrics::describe();
    let admin = match config.metrics_listen {
        Some(addr) => Some(tokio::spawn(admin::serve(
            admin_listener(addr).await?,
            health.clone(),
        ))),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (runtime_done_tx, runtime_done) = tokio::sync::oneshot::channel::<()>();
    let grace = config.drain_grace;
    // The chat runs on a thread of its own, with its own single-threaded
    // runtime: it is the one busy task, and on the shared runtime a long
    // turn of it (a backlog of broadcasts) would delay the HTTP/2 tasks that
    // answer the gateways' keepalive pings, so a busy worker would look hung.
    let runtime = std::thread::Builder::new()
        .name("chat-runtime".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(runtime.run(stop_rx, grace)),
                Err(e) => tracing::error!(error = %e, "cannot start the chat runtime"),
            }
            let _ = runtime_done_tx.send(());
        })?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(reporter, health));

    info!(%addr, "worker listening");
    let service = link::service(inbox, config.link_token.clone());
    let routes = tonic::service::Routes::new(health_service).add_service(service);
    let settings = server::Settings {
        // Private mode opens one stream per browser socket on one connection.
        max_concurrent_streams: link::MAX_STREAMS_PER_CONNECTION,
        // Private mode: thousands of sockets closing at once reset as many
        // streams. h2's defaults (20 pending, 1024 local) read that as an
        // attack and end the whole connection; these limits are set for
        // one stream per browser socket.
        max_reset_streams: link::MAX_RESET_STREAMS,
        keepalive_interval: std::time::Duration::from_secs(10),
    };
    let result = server::serve(incoming(listener), routes, settings, async move {
        shutdown.await;
        info!("worker draining");
        // The runtime asks every gateway to move its sockets, waits for
        // the streams to end (or the grace period), and stops; dropping
        // its response streams lets the connections' graceful shutdown end.
        let _ = stop_tx.send(());
        let _ = runtime_done.await;
    })
    .await;
    let _ = tokio::task::spawn_blocking(move || runtime.join()).await;
    if let Some(admin) = admin {
        // Waits until its port is free again, for a worker started next.
        admin.abort();
        let _ = admin.await;
    }
    info!("worker stopped");
    result
}

/// Binds the metrics listener, naming the address when that fails.
async fn admin_listener(addr: std::net::SocketAddr) -> Result<TcpListener, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for metrics: {e}"),
        ))
    })?;
    info!(addr = %listener.local_addr()?, "metrics listening");
    Ok(listener)
}

/// Keeps the gRPC health service in step with the backplane.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut health: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let status = if *health.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status("sharedconn.v1.Worker", status)
            .await;
        if health.changed().await.is_err() {
            return;
        }
    }
}

//! The operator's HTTP listener (`--metrics-listen`): `/metrics` in the
//! Prometheus text format and `/healthz`, which answers 200 while the
//! backplane is healthy and 503 otherwise, from the same watch channel that
//! feeds the gRPC health service. Plain HTTP/1.1 for scrapers and probes;
//! it serves nothing to browsers or gateways.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// A scraper that does not finish its request in this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until the task is aborted; aborting it ends every connection too
/// (they live in its `JoinSet`).
pub async fn serve(listener: TcpListener, health: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let health = health.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(req, health.clone()));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    health: watch::Receiver<bool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match sharedconn_common::metrics::render() {
            Some(page) => respond(
                StatusCode::OK,
                sharedconn_common::metrics::CONTENT_TYPE,
                page.into(),
            ),
            None => plain(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        (&Method::GET, "/healthz") => {
            if *health.borrow() {
                plain(StatusCode::OK, "ok\n")
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, "backplane unavailable\n")
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

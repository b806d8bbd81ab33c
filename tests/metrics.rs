//! Metrics an operator scrapes: the gateway's `/metrics` on its HTTP port,
//! and the worker's metrics listener (`/metrics`, `/healthz`), read from a
//! running cluster while clients chat.
//!
//! The recorder is global to the process, so it is installed once (the
//! install is idempotent) and this file holds a single scenario: under
//! `cargo test` its tests would share one process and one set of numbers.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use support::{Client, Cluster, Ended, http_get, http_get_with_headers};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Samples of a Prometheus text page: `name{labels}` → value.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = http_get_with_headers(addr, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(status, 200, "/metrics: {body}");
    let content_type = headers
        .iter()
        .find(|(name, _)| name == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        content_type,
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    samples(&body)
}

/// Scrapes `addr` until `key` satisfies `pred` (gauges sampled every half
/// second, counters bumped by another task); returns the value.
async fn until(addr: SocketAddr, key: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let value = scrape(addr).await.get(key).copied();
        if let Some(v) = value
            && pred(v)
        {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} at {addr} is {value:?}, still not as expected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_worker_metrics_follow_the_chat() {
    sharedconn_common::metrics::install();
    let cluster = Cluster::builder().worker_metrics().start().await;
    let gateway = cluster.gateway_addr(0);
    let worker = cluster.worker_metrics_addr();

    // Help text comes with the samples.
    let (_, page) = http_get(gateway, "/metrics").await.unwrap();
    assert!(
        page.contains("# HELP sharedconn_gateway_open_sockets "),
        "{page}"
    );
    let linked = scrape(gateway)
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("sharedconn_gateway_worker_linked{"))
        .collect::<Vec<_>>();
    assert_eq!(linked.len(), 1, "one worker address: {linked:?}");
    assert_eq!(linked[0].1, 1.0, "linked: {linked:?}");

    // The worker's listener reports its backplane healthy.
    assert_eq!(
        http_get(worker, "/healthz").await,
        Some((200, "ok\n".to_owned()))
    );
    until(worker, "sharedconn_worker_backplane_healthy", |v| v == 1.0).await;

    const N: usize = 3;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(Client::connect(&cluster.ws_url(0)).await);
    }
    until(gateway, "sharedconn_gateway_open_sockets", |v| {
        v == N as f64
    })
    .await;
    until(gateway, "sharedconn_gateway_sockets_opened_total", |v| {
        v == N as f64
    })
    .await;
    until(worker, "sharedconn_worker_sockets", |v| v == N as f64).await;
    until(worker, "sharedconn_worker_streams", |v| v == 1.0).await;

    let committed_before = scrape(worker)
        .await
        .get("sharedconn_worker_messages_committed_total")
        .copied()
        .unwrap_or(0.0);
    const M: usize = 5;
    for i in 0..M {
        clients[0].say(&format!("hello {i}")).await;
    }
    for c in &mut clients {
        assert_eq!(c.chats(M).await.len(), M);
    }
    until(worker, "sharedconn_worker_messages_committed_total", |v| {
        v >= committed_before + M as f64
    })
    .await;
    // Each message reached every socket through the one shared stream.
    until(worker, "sharedconn_worker_deliver_recipients_total", |v| {
        v >= (M * N) as f64
    })
    .await;
    // A histogram with buckets (not a summary), so it sums across workers.
    until(
        worker,
        "sharedconn_worker_post_commit_seconds_bucket{le=\"+Inf\"}",
        |v| v >= M as f64,
    )
    .await;
    until(gateway, "sharedconn_gateway_frames_in_total", |v| {
        v >= M as f64
    })
    .await;
    until(gateway, "sharedconn_gateway_frames_out_total", |v| {
        v >= (M * N) as f64
    })
    .await;
    assert!(scrape(gateway).await["sharedconn_gateway_bytes_out_total"] > 0.0);

    // A client that closes is counted by its close code.
    let mut gone = clients.pop().unwrap();
    gone.ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await
        .unwrap();
    assert_eq!(gone.ended().await, Ended::Closed(1000));
    until(gateway, "sharedconn_gateway_open_sockets", |v| {
        v == (N - 1) as f64
    })
    .await;
    until(
        gateway,
        "sharedconn_gateway_sockets_closed_total{code=\"1000\"}",
        |v| v == 1.0,
    )
    .await;
    until(worker, "sharedconn_worker_sockets", |v| v == (N - 1) as f64).await;

    cluster.shutdown().await;
}

//! The HTTP side: the chat page, `/healthz`, and WebSocket upgrades.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, warn};

use crate::Gateway;
use crate::frames::{FrameWriter, ReadHalf};
use crate::handshake::{self, Refusal};
use crate::io::ServerIo;
use crate::metrics;
use crate::session::{self, RateLimit};

/// The chat page, served from the binary: no other asset, no CDN.
const INDEX_HTML: &str = include_str!("../assets/index.html");
/// Where the page learns the gateway's frame limit (see [`index_page`]).
const MAX_FRAME_ATTR: &str = "data-max-frame=\"65536\"";
/// What the page may do: run its own inline `<script>` and `<style>`, allowed
/// by their SHA-256 so that nothing injected into it (a `<script>`, an
/// `onerror=` attribute) would run, and talk to this gateway's WebSocket.
/// Nothing else: no other source, no framing, no form posts.
///
/// The hashes must follow the page: after changing its script or style,
/// `tests/browser.rs` fails and prints the hashes to put here.
const CONTENT_SECURITY_POLICY: &str = concat!(
    "default-src 'none'; ",
    "script-src 'sha256-7JpwBa9wqdJfrN0472Ip7EgQqoHEBFAUVh/Mkviwoy4='; ",
    "style-src 'sha256-Ag19RPKEdAe1X++2XGfL8/jfCjjucIjHO55Jlrf2SGA='; ",
    "connect-src 'self' ws: wss:; ",
    "base-uri 'none'; ",
    "form-action 'none'; ",
    "frame-ancestors 'none'",
);

/// The page with this gateway's frame limit written in, so the page refuses
/// an oversize message itself instead of having its socket closed (1009).
pub fn index_page(max_frame_bytes: usize) -> Bytes {
    INDEX_HTML
        .replacen(
            MAX_FRAME_ATTR,
            &format!("data-max-frame=\"{max_frame_bytes}\""),
            1,
        )
        .into()
}
/// Our WebSocket path, and the seed page's, which works unchanged.
pub const WS_PATHS: [&str; 2] = ["/ws", "/csp/user/Chat.Server.cls"];
/// Bytes read from a socket at a time. Small, because an idle socket keeps
/// this buffer for its whole life; frames larger than it are read in steps.
const READ_BUFFER: usize = 512;

pub type Body = Full<Bytes>;

pub async fn handle(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let response = match (req.method(), path) {
        (&Method::GET, "/" | "/index.html") => {
            let mut r = Response::new(Full::new(gateway.page.clone()));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
            // For browsers that predate CSP's frame-ancestors.
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            r
        }
        (&Method::GET, "/healthz") => {
            if gateway.upstream.healthy().await {
                // The count lets an operator (and a test) see every replica linked.
                let body = format!("ok\nlinked workers: {}\n", gateway.upstream.linked());
                text(StatusCode::OK, body)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no worker linked\n")
            }
        }
        (&Method::GET, "/metrics") => match metrics::scrape(
            gateway.upstream.link_queues(),
            gateway.upstream.socket_states(),
        ) {
            Some(page) => {
                let mut r = Response::new(Full::new(Bytes::from(page)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(sharedconn_common::metrics::CONTENT_TYPE),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        (_, p) if WS_PATHS.contains(&p) => upgrade(gateway, req),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `?since=N`: the client already has messages up to id N.
fn since(query: Option<&str>) -> u64 {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn upgrade(gateway: Arc<Gateway>, mut req: Request<Incoming>) -> Response<Body> {
    let key = match handshake::check(req.method(), req.headers(), &gateway.config.allowed_origins) {
        Ok(key) => key,
        Err(refusal) => {
            debug!(?refusal, origin = ?req.headers().get(header::ORIGIN), "handshake refused");
            metrics::upgrade_refused(refusal.status().as_u16());
            let mut r = text(refusal.status(), refusal.text());
            if refusal == Refusal::Version {
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static(handshake::VERSION),
                );
            }
            return r;
        }
    };
    // Admission before any work: a full gateway says so plainly.
    let Ok(permit) = gateway.permits.clone().try_acquire_owned() else {
        metrics::upgrade_refused(503);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway is full, try again later\n",
        );
    };
    if !gateway.upstream.ready() {
        metrics::upgrade_refused(503);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker available, try again later\n",
        );
    }
    let since = since(req.uri().query());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let accept = derive_accept_key(key.as_bytes());

    let tracker = gateway.tracker.clone();
    tracker.spawn(async move {
        // Everything before the session is set up inside this block, so its
        // locals are gone while the session runs: a task is as big as its
        // biggest state for its whole life, and locals still in scope
        // (even moved from) would sit beside the session in every socket.
        let setup = async {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "upgrade failed");
                    return None;
                }
            };
            // Split the stream: tungstenite reads, our FrameWriter writes.
            let (io, leftover) = match upgraded.downcast::<TokioIo<ServerIo>>() {
                // Copy what the client sent behind its handshake, and let go of
                // hyper's read buffer: held for the socket's life it would
                // double an idle socket's memory.
                Ok(parts) => (parts.io, parts.read_buf.to_vec()),
                Err(_) => {
                    warn!("upgraded connection is not a ServerIo");
                    return None;
                }
            };
            let (read, write) = io.into_inner().into_split();
            let mut writer = FrameWriter::new(write);
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(gateway.config.max_frame_bytes))
                .max_frame_size(Some(gateway.config.max_frame_bytes));
            let reader = WebSocketStream::from_partially_read(
                ReadHalf::new(read),
                leftover,
                Role::Server,
                Some(config),
            )
            .await;
            let ws_id = gateway.next_ws_id();
            metrics::socket_opened();
            // Boxed for the same reason: attaching (a gRPC call in private
            // mode) needs far more state than the session that follows.
            match Box::pin(gateway.upstream.attach(ws_id, since)).await {
                Ok(socket) => {
                    debug!(ws_id, "socket opened");
                    let limit =
                        RateLimit::new(gateway.config.frames_per_sec, gateway.config.frame_burst);
                    // Boxed too: a future handed out by value is moved,
                    // and a moved future takes its room twice in the task.
                    Some(Box::pin(session::run(
                        reader,
                        writer,
                        socket,
                        gateway.upstream.clone(),
                        limit,
                        gateway.drain.clone(),
                        session::Timing {
                            stall: gateway.config.stall_timeout,
                            ping_interval: gateway.config.ping_interval,
                            pong_timeout: gateway.config.pong_timeout,
                            frame_timeout: gateway.config.frame_timeout,
                        },
                    )))
                }
                Err(reason) => {
                    metrics::socket_closed(Some(reason.code().into()));
                    let _ = writer.close(reason.code().into(), reason.text()).await;
                    None
                }
            }
        };
        if let Some(session) = Box::pin(setup).await {
            session.await;
        }
        drop(permit);
    });

    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::{MAX_FRAME_ATTR, index_page, since};

    #[test]
    fn the_page_carries_the_frame_limit() {
        assert!(super::INDEX_HTML.contains(MAX_FRAME_ATTR));
        let page = index_page(1000);
        let page = std::str::from_utf8(&page).unwrap();
        assert!(page.contains("data-max-frame=\"1000\""));
    }

    #[test]
    fn since_is_read_from_the_query() {
        assert_eq!(since(None), 0);
        assert_eq!(since(Some("since=42")), 42);
        assert_eq!(since(Some("a=1&since=7")), 7);
        assert_eq!(since(Some("since=x")), 0);
    }
}

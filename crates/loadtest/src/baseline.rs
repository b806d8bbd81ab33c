//! The no-hop baseline: a minimal single-process broadcast chat server that
//! speaks the same client protocol as sharedconn's gateway, so the cost of the
//! gateway/worker split is always measured against the same reference in the
//! same run.
//!
//! It is meant to be efficient and honest, the way a careful single-process
//! server would be written:
//! - one serialization per broadcast: the Chat frame is built once into a
//!   `Utf8Bytes` and every socket's queue gets a reference-counted clone;
//! - a bounded queue per socket ([`SOCKET_QUEUE`]); a socket whose queue is
//!   full is a slow reader and is closed with 1008, as sharedconn does;
//! - one task per socket, reading and writing; queued frames are written in
//!   batches and flushed once;
//! - no chat storage (no history): only the message counter;
//! - userlist frames are paced by the worker's own `Pacer` (see
//!   [`USERLIST_MIN_INTERVAL`]) and published through a `watch`, so a
//!   busy socket skips to the latest list instead of queueing stale ones.
//!
//! `run` takes a bound listener and a shutdown future (mini-redis style), so
//! tests run it in-process on port 0; `loadtest baseline` runs it as its own
//! process so its CPU and memory are measured apart from the load.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sharedconn_worker::chat::pacer::Pacer;
use sharedconn_worker::chat::rules;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Frames queued per socket before it counts as a slow reader and is closed
/// (1008). 1024 frames is several seconds of a busy chat for a reader that
/// keeps up at all, and 1024 reference-counted frames are a few tens of KiB
/// at most, so one stuck reader cannot grow the server without bound.
pub const SOCKET_QUEUE: usize = 1024;

/// Queued frames written per flush: bounds one socket's turn in its task.
const WRITE_BATCH: usize = 64;

/// Read buffer per socket. tungstenite keeps it for the socket's life and
/// zero-fills it before every read attempt (each wake of the socket's task),
/// so the default of 128 KiB would cost that much RSS per socket and a 128 KiB
/// memset per delivery. Client frames are small: 1 KiB, as the gateway uses,
/// reads them in one go.
const READ_BUFFER: usize = 1024;

/// Bytes buffered before tungstenite writes to the socket on its own; batches
/// are flushed explicitly anyway.
const WRITE_BUFFER: usize = 64 * 1024;

/// Largest frame a client may send; chat messages are short.
const MAX_INBOUND_FRAME: usize = 64 * 1024;

/// Shortest gap between userlists. The lists themselves are paced by
/// sharedconn's own [`Pacer`] (the whole list goes to every socket, so its
/// cost is quadratic), so a join storm compares transports, not coalescing.
const USERLIST_MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Binds with the same accept queue as the gateway.
pub use sharedconn_common::listen as bind;

/// Settings of the baseline server.
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    /// Connections admitted at once; later ones get 503.
    pub max_connections: usize,
    /// How long shutdown waits for sockets to close.
    pub shutdown_grace: Duration,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            max_connections: 200_000,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `/ws` (and the seed's `/csp/user/Chat.Server.cls`) and `/healthz`
/// on `listener` until `shutdown` completes, then closes every socket with
/// 1001 and waits up to the grace period for them.
pub async fn run(
    listener: TcpListener,
    config: BaselineConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let hub = Arc::new(Hub::new());
    let drain = CancellationToken::new();
    let tasks = TaskTracker::new();
    let admission = Arc::new(Semaphore::new(config.max_connections));
    tasks.spawn(publish_userlists(Arc::clone(&hub), drain.clone()));

    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning; connections in flight keep working.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            hub: Arc::clone(&hub),
            drain: drain.clone(),
            tasks: tasks.clone(),
            admission: Arc::clone(&admission),
        };
        tasks.spawn(async move {
            let drain = conn.drain.clone();
            let service = service_fn(move |req| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(conn.handle(req)) }
            });
            let http = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::select! {
                result = http => if let Err(e) = result {
                    debug!(%peer, error = %e, "http connection ended");
                },
                _ = drain.cancelled() => {}
            }
        });
    }

    info!(sockets = hub.len(), "baseline draining");
    drain.cancel();
    tasks.close();
    if tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            left = tasks.len(),
            "grace period over, dropping remaining sockets"
        );
    }
    Ok(())
}

/// What every HTTP connection needs.
#[derive(Clone)]
struct Conn {
    hub: Arc<Hub>,
    drain: CancellationToken,
    tasks: TaskTracker,
    admission: Arc<Semaphore>,
}

impl Conn {
    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok"),
            "/ws" | "/csp/user/Chat.Server.cls" => self.upgrade(req),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn upgrade(&self, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let headers = req.headers();
        let is_upgrade = req.method() == Method::GET
            && header_has(headers.get(header::CONNECTION), "upgrade")
            && header_has(headers.get(header::UPGRADE), "websocket")
            && headers
                .get(header::SEC_WEBSOCKET_VERSION)
                .is_some_and(|v| v == "13");
        let Some(key) = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .filter(|_| is_upgrade)
        else {
            return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade");
        };
        let accept = derive_accept_key(key.as_bytes());
        let Ok(permit) = Arc::clone(&self.admission).try_acquire_owned() else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "too many connections");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let hub = Arc::clone(&self.hub);
        let drain = self.drain.clone();
        self.tasks.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                    // The common case: back to the plain TcpStream, so the hot
                    // path has no dynamic dispatch.
                    Ok(parts) => {
                        let ws = WebSocketStream::from_partially_read(
                            parts.io.into_inner(),
                            parts.read_buf.to_vec(),
                            Role::Server,
                            Some(ws_config()),
                        )
                        .await;
                        session(ws, hub, drain, permit).await;
                    }
                    Err(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            Some(ws_config()),
                        )
                        .await;
                        session(ws, hub, drain, permit).await;
                    }
                },
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        res
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(MAX_INBOUND_FRAME))
        .max_frame_size(Some(MAX_INBOUND_FRAME))
}

fn header_has(value: Option<&HeaderValue>, token: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res
}

/// Why a session ended, and what to tell the client.
enum End {
    /// The client closed or vanished; nothing to send.
    Gone,
    /// We close with this code.
    Close(CloseCode, &'static str),
}

/// One socket: registers with the hub, sends Status, then serves inbound
/// frames, its queue and userlist changes until either side ends.
async fn session<S>(
    mut ws: WebSocketStream<S>,
    hub: Arc<Hub>,
    drain: CancellationToken,
    _permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = hub.next_socket_id();
    let (tx, mut rx) = mpsc::channel(SOCKET_QUEUE);
    let (evict_tx, mut evicted) = oneshot::channel();
    let mut userlist = hub.userlist.subscribe();
    hub.join(id, tx, evict_tx);

    let status = format!(r#"{{"Type":"Status","WSID":"{id}"}}"#);
    let end = if ws.send(Message::text(status)).await.is_err() {
        End::Gone
    } else {
        let drained = drain.cancelled_owned();
        tokio::pin!(drained);
        loop {
            tokio::select! {
                biased;
                _ = &mut drained => break End::Close(CloseCode::Away, "going away"),
                _ = &mut evicted => break End::Close(CloseCode::Policy, "too slow"),
                inbound = ws.next() => match inbound {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(reply) = hub.on_text(id, &t)
                            && ws.send(Message::text(reply)).await.is_err()
                        {
                            break End::Gone;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = error_frame("binary frames are not supported; send JSON text");
                        if ws.send(Message::text(reply)).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break End::Gone,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(socket = id, error = %e, "socket read failed");
                        break End::Gone;
                    }
                },
                Some(first) = rx.recv() => {
                    tokio::select! {
                        written = write_batch(&mut ws, first, &mut rx) => if written.is_err() {
                            break End::Gone;
                        },
                        _ = &mut evicted => break End::Close(CloseCode::Policy, "too slow"),
                    }
                }
                Ok(()) = userlist.changed() => {
                    let list = userlist.borrow_and_update().clone();
                    if ws.send(Message::Text(list)).await.is_err() {
                        break End::Gone;
                    }
                }
            }
        }
    };
    hub.leave(id);
    if let End::Close(code, reason) = end {
        let close = ws.close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        // A slow reader may never take the close frame: don't wait for it.
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
    }
}

/// Writes `first` and whatever else is queued (up to a batch), then flushes
/// once: under load one syscall carries many frames.
async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    first: Utf8Bytes,
    rx: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.feed(Message::Text(first)).await?;
    for _ in 1..WRITE_BATCH {
        match rx.try_recv() {
            Ok(frame) => ws.feed(Message::Text(frame)).await?,
            Err(_) => break,
        }
    }
    ws.flush().await
}

fn error_frame(error: &str) -> String {
    #[derive(Serialize)]
    struct ErrorOut<'a> {
        #[serde(rename = "Type")]
        kind: &'static str,
        #[serde(rename = "Error")]
        error: &'a str,
    }
    serde_json::to_string(&ErrorOut {
        kind: "Error",
        error,
    })
    .expect("serializing strs cannot fail")
}

/// A client frame: sets the alias or posts a message.
#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "User", borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(rename = "Message", borrow, default)]
    message: Option<Cow<'a, str>>,
}

/// A connected socket as the hub sees it.
struct Member {
    queue: mpsc::Sender<Utf8Bytes>,
    alias: Option<Arc<str>>,
    /// Fired (or dropped) to close the socket as a slow reader.
    evict: Option<oneshot::Sender<()>>,
}

/// Every socket and the message counter. Broadcasts happen under the lock, so
/// the ID order is the order every queue receives: one total order.
struct Hub {
    state: Mutex<HubState>,
    next_socket: AtomicU64,
    /// Wakes the userlist publisher; a stored permit means "changed since".
    userlist_changed: Notify,
    userlist: watch::Sender<Utf8Bytes>,
}

struct HubState {
    last_message_id: u64,
    members: HashMap<u64, Member>,
}

impl Hub {
    fn new() -> Hub {
        Hub {
            state: Mutex::new(HubState {
                last_message_id: 0,
                members: HashMap::new(),
            }),
            next_socket: AtomicU64::new(1),
            userlist_changed: Notify::new(),
            userlist: watch::Sender::new(Utf8Bytes::from_static(
                r#"{"Type":"userlist","Users":[]}"#,
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().members.len()
    }

    fn next_socket_id(&self) -> u64 {
        self.next_socket.fetch_add(1, Ordering::Relaxed)
    }

    fn join(&self, id: u64, queue: mpsc::Sender<Utf8Bytes>, evict: oneshot::Sender<()>) {
        self.lock().members.insert(
            id,
            Member {
                queue,
                alias: None,
                evict: Some(evict),
            },
        );
    }

    fn leave(&self, id: u64) {
        let had_alias = self
            .lock()
            .members
            .remove(&id)
            .is_some_and(|m| m.alias.is_some());
        if had_alias {
            self.userlist_changed.notify_one();
        }
    }

    /// Handles one text frame; returns an Error frame to send back, if any.
    fn on_text(&self, id: u64, text: &str) -> Option<String> {
        let Ok(inbound) = serde_json::from_str::<Inbound<'_>>(text) else {
            return Some(error_frame("malformed JSON"));
        };
        if let Some(user) = inbound.user {
            let alias: Arc<str> = if user.is_empty() {
                "default".into()
            } else {
                user.as_ref().into()
            };
            if let Some(member) = self.lock().members.get_mut(&id) {
                member.alias = Some(alias);
            }
            self.userlist_changed.notify_one();
            return None;
        }
        let Some(message) = inbound.message else {
            return Some(error_frame("expected {\"User\":..} or {\"Message\":..}"));
        };
        if B64.decode(message.as_bytes()).is_err() {
            return Some(error_frame("Message is not valid base64"));
        }
        self.broadcast_chat(id, &message);
        None
    }

    /// Numbers, serializes (once) and queues a Chat frame to every socket.
    fn broadcast_chat(&self, from: u64, message: &str) {
        let sent = rules::sent_stamp(time::OffsetDateTime::now_utc());
        let mut state = self.lock();
        let state = &mut *state;
        state.last_message_id += 1;
        let author = state
            .members
            .get(&from)
            .and_then(|m| m.alias.clone())
            .unwrap_or_else(|| "default".into());
        let frame = rules::chat_frame_of(state.last_message_id, &author, message, &sent);
        let frame = Utf8Bytes::from(frame);
        let mut slow = Vec::new();
        for (&id, member) in &state.members {
            if member.queue.try_send(frame.clone()).is_err() {
                slow.push(id);
            }
        }
        let mut alias_gone = false;
        for id in slow {
            if let Some(mut member) = state.members.remove(&id) {
                alias_gone |= member.alias.is_some();
                if let Some(evict) = member.evict.take() {
                    let _ = evict.send(());
                }
            }
        }
        if alias_gone {
            self.userlist_changed.notify_one();
        }
    }

    /// The current userlist frame, serialized once for everyone.
    fn userlist_frame(&self) -> (Utf8Bytes, usize) {
        let (aliases, sockets) = {
            let state = self.lock();
            let aliases: Vec<Arc<str>> = state
                .members
                .values()
                .filter_map(|m| m.alias.clone())
                .collect();
            (aliases, state.members.len())
        };
        let users: Vec<&str> = aliases.iter().map(|a| &**a).collect();
        let frame = rules::userlist_frame(&users);
        (Utf8Bytes::from(frame), sockets)
    }
}

/// Publishes a fresh userlist when the pacing allows.
async fn publish_userlists(hub: Arc<Hub>, drain: CancellationToken) {
    use tokio::time::Instant;
    let mut pacer = Pacer::new(USERLIST_MIN_INTERVAL, Instant::now());
    loop {
        let due = pacer.due();
        tokio::select! {
            _ = drain.cancelled() => return,
            _ = hub.userlist_changed.notified() => pacer.changed(Instant::now()),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let (frame, sockets) = hub.userlist_frame();
                debug!(sockets, bytes = frame.len(), "userlist published");
                pacer.sent(Instant::now(), frame.len(), sockets);
                hub.userlist.send_replace(frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_is_serialized_once_in_protocol_shape() {
        let hub = Hub::new();
        let (tx, mut rx) = mpsc::channel(4);
        let (evict, _evicted) = oneshot::channel();
        hub.join(1, tx, evict);
        assert_eq!(hub.on_text(1, r#"{"User":"ann"}"#), None);
        assert_eq!(hub.on_text(1, r#"{"Message":"aGk=","Author":"x"}"#), None);
        let frame = rx.try_recv().unwrap();
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["Type"], "Chat");
        assert_eq!(v["Author"], "ann");
        assert_eq!(v["Message"], "aGk=");
        assert_eq!(v["ID"], 1);
        assert!(hub.on_text(1, "{").unwrap().contains("Error"));
        assert!(
            hub.on_text(1, r#"{"Message":"%%%"}"#)
                .unwrap()
                .contains("base64")
        );
        assert!(hub.on_text(1, r#"{"x":1}"#).unwrap().contains("Error"));
        let (list, _) = hub.userlist_frame();
        assert_eq!(&*list, r#"{"Type":"userlist","Users":[{"User":"ann"}]}"#);
    }

    #[test]
    fn full_queue_evicts_the_slow_reader_only() {
        let hub = Hub::new();
        let (slow_tx, _slow_rx) = mpsc::channel(1);
        let (slow_evict, mut slow_evicted) = oneshot::channel();
        hub.join(1, slow_tx, slow_evict);
        let (fast_tx, mut fast_rx) = mpsc::channel(8);
        let (fast_evict, mut fast_evicted) = oneshot::channel();
        hub.join(2, fast_tx, fast_evict);
        hub.broadcast_chat(2, "YQ==");
        hub.broadcast_chat(2, "Yg==");
        assert_eq!(slow_evicted.try_recv(), Ok(()));
        assert!(fast_evicted.try_recv().is_err());
        assert_eq!(hub.len(), 1);
        assert!(fast_rx.try_recv().is_ok() && fast_rx.try_recv().is_ok());
    }
}

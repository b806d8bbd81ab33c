//! The links to workers, and the table of sockets they deliver to.
//!
//! Shared mode keeps one `Link` stream per worker, opened by a task that
//! reconnects with backoff. Every socket routed to that worker is in the
//! link's [`Registry`]; a `Deliver` is fanned out by looking each WebSocket ID
//! up there. When the stream breaks, every socket on it is closed with 1012
//! (their clients reconnect and replay what they missed from the log), and
//! the registry is retired so no socket can join a dead link.
//!
//! Private mode opens a stream per socket on the same HTTP/2 connection; a
//! small pump task moves that stream's deliveries into the socket's queue, so
//! both modes share one overflow policy.
//!
//! Either way the socket's session gets an [`Attachment`]: a sender for its
//! events towards the worker, and its outbound [`SocketQueue`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sharedconn_proto::gateway_event::Event;
use sharedconn_proto::worker_client::WorkerClient;
use sharedconn_proto::worker_command::Command;
use sharedconn_proto::{Close, Frame, GatewayEvent, Hello, Open, WorkerCommand};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::config::{Config, Mode};
use crate::error::{CloseReason, Error};
use crate::queue::{Kill, Push, SocketQueue};

/// Events queued towards a worker on a shared stream. Sessions wait when it
/// is full (HTTP/2 flow control is pushing back), so it only needs to cover
/// a burst; a waiting session stops reading its socket, pushing back on
/// that client alone.
const SHARED_EVENT_QUEUE: usize = 4096;
/// Events queued on a private stream: one socket's frames.
const PRIVATE_EVENT_QUEUE: usize = 16;
/// HTTP/2 flow-control windows: big enough that a burst of broadcasts is
/// not held back by round trips on the shared stream.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// How long the private-mode health probe may take to reach a worker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// WebSocket ID → the socket's queue, for one shared link.
#[derive(Default)]
struct Registry {
    inner: RwLock<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    slots: HashMap<u64, Arc<SocketQueue>>,
    /// Set when the link broke: nothing may join any more.
    retired: bool,
}

impl Registry {
    fn insert(&self, ws: u64, queue: Arc<SocketQueue>) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.retired {
            return false;
        }
        inner.slots.insert(ws, queue);
        true
    }

    fn remove(&self, ws: u64) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.slots.remove(&ws);
    }

    fn kill(&self, ws: u64, kill: Kill) {
        let slot = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            inner.slots.remove(&ws)
        };
        if let Some(queue) = slot {
            queue.kill(kill);
        }
    }

    /// Queues `text` for every listed socket. Never waits: a socket whose
    /// queue is full is closed as too slow (dropping a frame instead would
    /// break the one order every client must see).
    fn deliver(&self, ids: &[u64], texts: &[Utf8Bytes]) {
        let mut overflowed = Vec::new();
        {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            for ws in ids {
                let Some(queue) = inner.slots.get(ws) else {
                    continue;
                };
                if texts.iter().any(|t| queue.push(t.clone()) == Push::Full) {
                    overflowed.push(*ws);
                }
            }
        }
        for ws in overflowed {
            debug!(ws_id = ws, "socket queue full");
            self.kill(ws, CloseReason::TooSlow.into());
        }
    }

    fn retire(&self, reason: CloseReason) -> usize {
        let slots = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            inner.retired = true;
            std::mem::take(&mut inner.slots)
        };
        let n = slots.len();
        for (_, queue) in slots {
            queue.kill(reason.into());
        }
        n
    }
}

/// What a session gets when its socket is attached to a worker.
pub struct Attachment {
    pub link: SocketLink,
    /// Frames addressed to this socket, and the order to close it from
    /// outside (overflow, worker lost, the worker's `Disconnect`).
    pub queue: Arc<SocketQueue>,
}

/// A socket's way to the worker.
pub struct SocketLink {
    pub ws_id: u64,
    events: mpsc::Sender<GatewayEvent>,
    /// Shared mode: the registry to leave on close.
    registry: Option<Arc<Registry>>,
}

impl SocketLink {
    /// Forwards a text frame; false when the link is gone.
    pub async fn frame(&self, text: Bytes) -> bool {
        let event = Event::Frame(Frame {
            ws_id: self.ws_id,
            text,
        });
        self.events
            .send(GatewayEvent { event: Some(event) })
            .await
            .is_ok()
    }

    /// Tells the worker the socket is gone and leaves the registry.
    pub async fn close(self, queue: &SocketQueue) {
        // Whatever still feeds the queue (a private pump) stops.
        queue.kill(CloseReason::GoingAway.into());
        if let Some(registry) = &self.registry {
            registry.remove(self.ws_id);
        }
        let event = Event::Close(Close { ws_id: self.ws_id });
        let _ = self.events.send(GatewayEvent { event: Some(event) }).await;
    }
}

/// The current stream of one shared link, while it is up.
struct LiveLink {
    events: mpsc::Sender<GatewayEvent>,
    registry: Arc<Registry>,
}

/// One worker, as the gateway sees it.
struct WorkerLink {
    url: String,
    /// `host:port`, for the private-mode health probe.
    authority: String,
    channel: Channel,
    /// Shared mode: the live stream, if any.
    live: RwLock<Option<LiveLink>>,
}

impl WorkerLink {
    fn linked(&self) -> bool {
        self.live.read().map(|l| l.is_some()).unwrap_or(false)
    }
}

/// All workers, and how sockets reach them.
pub struct Upstream {
    mode: Mode,
    gateway_tag: u32,
    socket_queue: usize,
    workers: Vec<Arc<WorkerLink>>,
}

impl Upstream {
    /// Creates the links. In shared mode a task per worker keeps a stream up
    /// until `stop` is cancelled.
    pub fn start(
        config: &Config,
        gateway_tag: u32,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, Error> {
        let mut workers = Vec::new();
        for url in &config.workers {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::WorkerAddress(url.clone(), e.to_string()))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW);
            let uri = endpoint.uri();
            let port = uri.port_u16().unwrap_or(80);
            let authority = format!("{}:{port}", uri.host().unwrap_or("localhost"));
            workers.push(Arc::new(WorkerLink {
                url: url.clone(),
                authority,
                channel: endpoint.connect_lazy(),
                live: RwLock::new(None),
            }));
        }
        let upstream = Arc::new(Upstream {
            mode: config.mode,
            gateway_tag,
            socket_queue: config.socket_queue,
            workers,
        });
        if config.mode == Mode::Shared {
            for worker in &upstream.workers {
                tokio::spawn(keep_linked(worker.clone(), gateway_tag, stop.clone()));
            }
        }
        Ok(upstream)
    }

    /// Whether a socket opened now could be attached without waiting: in
    /// shared mode, whether every worker's link is up. Private mode opens a
    /// stream per socket and has nothing to look at here.
    pub fn ready(&self) -> bool {
        match self.mode {
            Mode::Shared => self.workers.iter().all(|w| w.linked()),
            Mode::Private => true,
        }
    }

    /// For `/healthz`: in shared mode the links' state; in private mode a
    /// connection to every worker, made now (bounded by a short timeout).
    pub async fn healthy(&self) -> bool {
        match self.mode {
            Mode::Shared => self.ready(),
            Mode::Private => {
                for worker in &self.workers {
                    let probe = tokio::net::TcpStream::connect(worker.authority.as_str());
                    if !matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_))) {
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Attaches a new socket to its worker and sends `Open`.
    pub async fn attach(&self, ws_id: u64, since: u64) -> Result<Attachment, CloseReason> {
        let worker = &self.workers[(ws_id as usize) % self.workers.len()];
        let queue = Arc::new(SocketQueue::new(self.socket_queue));
        let open = GatewayEvent {
            event: Some(Event::Open(Open { ws_id, since })),
        };
        match self.mode {
            Mode::Shared => {
                let (events, registry) = {
                    let live = worker.live.read().unwrap_or_else(|e| e.into_inner());
                    let live = live.as_ref().ok_or(CloseReason::NoWorker)?;
                    (live.events.clone(), live.registry.clone())
                };
                if !registry.insert(ws_id, queue.clone()) {
                    return Err(CloseReason::NoWorker);
                }
                if events.send(open).await.is_err() {
                    registry.remove(ws_id);
                    return Err(CloseReason::NoWorker);
                }
                Ok(Attachment {
                    link: SocketLink {
                        ws_id,
                        events,
                        registry: Some(registry),
                    },
                    queue,
                })
            }
            Mode::Private => {
                let (events, rx) = mpsc::channel(PRIVATE_EVENT_QUEUE);
                let hello = hello(self.gateway_tag, Mode::Private);
                // Both fit: the queue is empty and holds more than two.
                let _ = events.try_send(hello);
                let _ = events.try_send(open);
                let mut client = WorkerClient::new(worker.channel.clone());
                let response = client
                    .link(ReceiverStream::new(rx))
                    .await
                    .map_err(|status| {
                        debug!(ws_id, %status, "private link refused");
                        CloseReason::NoWorker
                    })?;
                tokio::spawn(pump_private(response.into_inner(), queue.clone()));
                Ok(Attachment {
                    link: SocketLink {
                        ws_id,
                        events,
                        registry: None,
                    },
                    queue,
                })
            }
        }
    }
}

fn hello(gateway_tag: u32, mode: Mode) -> GatewayEvent {
    let mode = match mode {
        Mode::Shared => sharedconn_proto::Mode::Shared,
        Mode::Private => sharedconn_proto::Mode::Private,
    };
    GatewayEvent {
        event: Some(Event::Hello(Hello {
            gateway_tag,
            mode: mode.into(),
        })),
    }
}

/// A Deliver's frames as WebSocket text, checked once per payload and then
/// shared by every socket; `None` (and a warning) if one is not UTF-8.
fn checked(texts: Vec<Bytes>) -> Option<Vec<Utf8Bytes>> {
    let checked: Result<Vec<_>, _> = texts.into_iter().map(Utf8Bytes::try_from).collect();
    checked
        .inspect_err(|_| warn!("worker sent a frame that is not UTF-8"))
        .ok()
}

/// Moves one private stream's deliveries into its socket's queue.
async fn pump_private(mut commands: tonic::Streaming<WorkerCommand>, queue: Arc<SocketQueue>) {
    let reason = loop {
        match commands.message().await {
            Ok(Some(WorkerCommand {
                command: Some(Command::Deliver(d)),
            })) => {
                let Some(texts) = checked(d.texts) else {
                    continue;
                };
                let pushed = texts
                    .into_iter()
                    .map(|t| queue.push(t))
                    .find(|p| *p != Push::Queued);
                match pushed {
                    None => {}
                    Some(Push::Full) => break Kill::from(CloseReason::TooSlow),
                    // The session ended.
                    Some(_) => return,
                }
            }
            Ok(Some(WorkerCommand {
                command: Some(Command::Disconnect(d)),
            })) => {
                break Kill {
                    code: d.code as u16,
                    reason: d.reason,
                };
            }
            Ok(Some(_)) => {}
            // The worker cut this socket's stream: its queue there overflowed
            // because the socket was not read fast enough.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                break Kill::from(CloseReason::TooSlow);
            }
            Ok(None) | Err(_) => break Kill::from(CloseReason::WorkerLost),
        }
    };
    queue.kill(reason);
}

/// Keeps one shared stream to `worker` up until `stop`.
async fn keep_linked(worker: Arc<WorkerLink>, gateway_tag: u32, stop: CancellationToken) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let linked = tokio::select! {
            _ = stop.cancelled() => break,
            linked = run_link(&worker, gateway_tag) => linked,
        };
        // Nothing may join the dead registry; its sockets are told to go.
        let retired = worker
            .live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|live| live.registry.retire(CloseReason::WorkerLost))
            .unwrap_or(0);
        if linked {
            warn!(worker = %worker.url, sockets = retired, "worker link lost");
            backoff = RECONNECT_MIN;
        } else {
            debug!(worker = %worker.url, ?backoff, "worker not reachable");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
    if let Some(live) = worker
        .live
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        live.registry.retire(CloseReason::GoingAway);
    }
}

/// Opens the stream and serves it until it ends. Returns whether it was up.
async fn run_link(worker: &WorkerLink, gateway_tag: u32) -> bool {
    let (events, rx) = mpsc::channel(SHARED_EVENT_QUEUE);
    let _ = events.try_send(hello(gateway_tag, Mode::Shared));
    let mut client = WorkerClient::new(worker.channel.clone());
    let mut commands = match client.link(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            debug!(worker = %worker.url, %status, "link refused");
            return false;
        }
    };
    let registry = Arc::new(Registry::default());
    *worker.live.write().unwrap_or_else(|e| e.into_inner()) = Some(LiveLink {
        events,
        registry: registry.clone(),
    });
    info!(worker = %worker.url, "worker linked");
    loop {
        match commands.message().await {
            Ok(Some(WorkerCommand {
                command: Some(Command::Deliver(d)),
            })) => {
                if let Some(texts) = checked(d.texts) {
                    registry.deliver(&d.ws_ids, &texts);
                }
            }
            Ok(Some(WorkerCommand {
                command: Some(Command::Disconnect(d)),
            })) => registry.kill(
                d.ws_id,
                Kill {
                    code: d.code as u16,
                    reason: d.reason,
                },
            ),
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                warn!(worker = %worker.url, "worker cut the link: this gateway fell behind");
                return true;
            }
            Err(status) => {
                debug!(worker = %worker.url, %status, "link ended");
                return true;
            }
        }
    }
}

//! The links to workers, and the gateway-wide table of sockets.
//!
//! Every socket lives in one table for its whole life ([`Socket`]),
//! whichever worker serves it. Workers are found by resolving the `--worker`
//! addresses (a compose service name resolves to every replica) every few
//! seconds; each address gets a [`WorkerLink`] whose task keeps one stream
//! up. In shared mode that stream carries every socket the gateway attached
//! to the worker; in private mode it carries none (it tells the gateway the
//! worker is alive, which log it serves, and when it drains), and each
//! socket opens a stream of its own, spread over a few HTTP/2 connections so
//! one GOAWAY cannot take every socket down.
//!
//! A link that breaks (the worker died, hung past the HTTP/2 keepalive
//! timeout, or was cut off) detaches its sockets; no browser socket closes.
//! The mover task re-attaches them to live workers, with bounded
//! concurrency, handing back each socket's parked state, its last message
//! id and its unacknowledged frames. Only a socket left with no worker for
//! the whole re-attach grace is closed (1012). A link that drains (the
//! worker is stopping) keeps serving its sockets while the mover attaches
//! them elsewhere, and ends when the last has moved (make before break).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use sharedconn_proto::gateway_event::Event;
use sharedconn_proto::worker_client::WorkerClient;
use sharedconn_proto::worker_command::Command;
use sharedconn_proto::{Close, Fetch, Frame, GatewayEvent, Hello, Open, Synced, WorkerCommand};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::config::{Config, Mode};
use crate::error::{CloseReason, Error};
use crate::liveness::Watchdog;
use crate::metrics::SocketStates;
use crate::queue::{Delivery, Kill, Limits};
use crate::socket::{Finish, Resume, Route, Socket, StreamHandle};

/// Events queued towards a worker on a shared stream. Sessions wait when it
/// is full (HTTP/2 flow control is pushing back), so it only needs to cover
/// a burst; a waiting session stops reading its socket, pushing back on
/// that client alone.
const SHARED_EVENT_QUEUE: usize = 4096;
/// Events queued on a private stream: one socket's frames, and on a
/// re-attach its unacknowledged ones.
const PRIVATE_EVENT_QUEUE: usize = 64;
/// HTTP/2 flow-control windows: big enough that a burst of broadcasts is
/// not held back by round trips on the shared stream.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// The same for the connections of private streams, where each socket's
/// stream carries its own copy of every frame. Small on purpose: what is in
/// flight on a connection is read before the answer to a keepalive ping
/// behind it, so a big window full of online lists (a join storm) delayed
/// the answers past the link timeout and a busy worker looked dead. It also
/// bounds what the private streams of one worker hold in flight.
const PRIVATE_STREAM_WINDOW: u32 = 256 << 10;
const PRIVATE_CONNECTION_WINDOW: u32 = 2 << 20;
/// Streams one connection may reset before h2 ends it (see `new_link`).
const MAX_RESET_STREAMS: usize = 1 << 20;
/// HTTP/2 connections per worker for private streams. Opening a stream
/// waits for the one before it on the same connection to be written out
/// (h2 lets one stream be pending open at a time), two task hops each: on a
/// busy gateway 10,000 re-attaches over 4 connections queued for seconds.
/// More connections open more streams at once, and a GOAWAY takes fewer
/// sockets with it.
const PRIVATE_CONNECTIONS: usize = 16;
/// Sockets re-attached at once: a private-mode re-attach opens a stream
/// each, and 10,000 opening together would be a storm. Each open waits a
/// round trip through two busy runtimes, so fewer than this (256 before)
/// left 5,000 private re-attaches seconds behind; 2,048 over
/// [`PRIVATE_CONNECTIONS`] connections is 128 opening on each.
const REATTACH_CONCURRENCY: usize = 2048;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How often worker addresses are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(2);
/// How long a worker may take to answer `Hello` with `Welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);

/// How a hung worker (SIGSTOP) or a cut link is found within
/// `link_timeout`: hyper pings a connection that read nothing for the first
/// duration; the watchdog ([`crate::liveness`]) ends a connection on which
/// a ping went out and nothing came back, read or waiting to be read, for
/// the second.
///
/// The ping's delay, the silence bound and the watchdog's two looks (a
/// twentieth of the bound each) add up to under 90% of the timeout; the
/// rest is room for the gateway to act.
/// Waiting data counts as heard, so a busy gateway that has not read its
/// worker's answer no longer takes the worker for dead, as hyper's own
/// timeout did (it looks at the clock before it reads).
fn keepalive(link_timeout: Duration) -> (Duration, Duration) {
    (link_timeout / 40, link_timeout * 3 / 4)
}

/// hyper's own keepalive timeout, a backstop only: the watchdog acts long
/// before, and hyper's rule misreads a busy gateway as a dead worker.
fn keepalive_backstop(link_timeout: Duration) -> Duration {
    link_timeout * 10
}

/// What became of one socket in a re-attach pass.
enum Moved {
    /// On a new stream: the worker it went to holds back its online list
    /// until told the pass is done.
    To(StreamHandle),
    /// No worker took it: it waits for the next pass.
    Back(u64),
    /// Closed meanwhile, or already moving.
    Gone,
}

/// A worker address as configured, split for resolving.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
}

/// One worker (one resolved address), as the gateway sees it.
pub struct WorkerLink {
    addr: SocketAddr,
    /// Which configured address resolved to this one.
    target: usize,
    /// Carries the shared (or control) stream.
    channel: Channel,
    /// Private mode: the connections the sockets' own streams are spread
    /// over (none in shared mode).
    private: Vec<Channel>,
    /// The shared (or control) stream, while up and accepted.
    live: RwLock<Option<StreamHandle>>,
    /// How many times the worker's link was welcomed (upper bits), and
    /// whether it is draining (low bit: it asked for its sockets to move, so
    /// no new ones). One word, so that a private stream opened before the
    /// worker restarted cannot mark the new process draining.
    state: AtomicU64,
    /// When a connection under one of the worker's socket streams last
    /// failed (private mode); cleared when its link is welcomed again.
    failed_at: Mutex<Option<Instant>>,
    /// The worker's log name, from its `Welcome`.
    log: Mutex<String>,
    /// Sockets attached, for spreading new ones.
    load: Arc<AtomicUsize>,
    /// Cancelled when the address no longer resolves.
    gone: CancellationToken,
}

impl WorkerLink {
    /// A connection to this worker failed: a hang shows on every one of them
    /// within a few milliseconds, and the link may be the last to notice.
    fn failed(&self) {
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Its link came up again: whatever failed before is over.
    fn trust(&self) {
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// No connection to the worker failed within `within`, or the link came
    /// up since.
    fn trusted(&self, within: Duration) -> bool {
        self.failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| at.elapsed() >= within)
    }

    /// Its link was welcomed: a new process, or the same one again, and
    /// not draining. Returns the new generation.
    fn welcomed(&self) -> u64 {
        let before = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some((s | 1) + 1))
            .unwrap_or_else(|s| s);
        ((before | 1) + 1) >> 1
    }

    /// Which welcome of its link the worker is at.
    fn generation(&self) -> u64 {
        self.state.load(Ordering::Relaxed) >> 1
    }

    /// The worker drains, if it is still the process of welcome `generation`.
    fn drains(&self, generation: u64) {
        let _ = self.state.compare_exchange(
            generation << 1,
            generation << 1 | 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn draining(&self) -> bool {
        self.state.load(Ordering::Relaxed) & 1 == 1
    }

    fn live(&self) -> Option<StreamHandle> {
        if self.draining() {
            return None;
        }
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// All workers, and every socket.
pub struct Upstream {
    mode: Mode,
    tag: u32,
    /// Names this run of the gateway; workers purge a previous run's users.
    boot: u64,
    token: String,
    limits: Limits,
    link_timeout: Duration,
    reattach_grace: Duration,
    targets: Vec<Target>,
    /// Watches every connection to a worker for silence.
    watchdog: Watchdog,
    table: RwLock<HashMap<u64, Arc<Socket>>>,
    workers: RwLock<Vec<Arc<WorkerLink>>>,
    next_stream: AtomicU64,
    next_pick: AtomicUsize,
    /// Sockets waiting for a worker.
    detached: Mutex<Vec<u64>>,
    /// Sockets that closed while detached: their `Close` goes out on the next
    /// live stream, so their users leave the list.
    pending_closes: Mutex<Vec<u64>>,
    /// Wakes the mover: sockets were detached, or a worker came up.
    moved: Notify,
    stop: CancellationToken,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn event(e: Event) -> GatewayEvent {
    GatewayEvent { event: Some(e) }
}

impl Upstream {
    /// Starts resolving the workers and linking to them, until `stop`.
    pub fn start(config: &Config, tag: u32, stop: CancellationToken) -> Result<Arc<Self>, Error> {
        let mut targets = Vec::new();
        for url in &config.workers {
            let uri: tonic::codegen::http::Uri = url
                .parse()
                .map_err(|e| Error::WorkerAddress(url.clone(), format!("{e}")))?;
            let host = uri
                .host()
                .ok_or_else(|| Error::WorkerAddress(url.clone(), "no host".into()))?;
            targets.push(Target {
                host: host.trim_matches(['[', ']']).to_owned(),
                port: uri.port_u16().unwrap_or(50051),
            });
        }
        let upstream = Arc::new(Upstream {
            mode: config.mode,
            tag,
            boot: rand::random::<u64>().max(1),
            token: config.link_token.clone().unwrap_or_default(),
            limits: Limits {
                frames: config.socket_queue,
                bytes: config.socket_queue_bytes,
            },
            link_timeout: config.link_timeout,
            reattach_grace: config.reattach_grace,
            targets,
            watchdog: Watchdog::start(keepalive(config.link_timeout).1)?,
            table: RwLock::new(HashMap::new()),
            workers: RwLock::new(Vec::new()),
            next_stream: AtomicU64::new(1),
            next_pick: AtomicUsize::new(0),
            detached: Mutex::new(Vec::new()),
            pending_closes: Mutex::new(Vec::new()),
            moved: Notify::new(),
            stop,
        });
        tokio::spawn(upstream.clone().resolve_loop());
        tokio::spawn(upstream.clone().mover());
        Ok(upstream)
    }

    pub fn boot(&self) -> u64 {
        self.boot
    }

    fn workers(&self) -> Vec<Arc<WorkerLink>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many workers are linked now.
    pub fn linked(&self) -> usize {
        self.workers().iter().filter(|w| w.live().is_some()).count()
    }

    /// Whether a socket can be served now: some worker is linked.
    pub fn ready(&self) -> bool {
        self.linked() > 0
    }

    /// For `/healthz`: healthy while linked to at least one worker.
    pub async fn healthy(&self) -> bool {
        self.ready()
    }

    /// How many sockets are behind, have a fetch on its way, or have no
    /// worker now (detached or moving); for the status log and `/metrics`,
    /// which is how a socket left without messages shows.
    pub fn socket_states(&self) -> SocketStates {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut states = SocketStates::default();
        for socket in table.values() {
            let (behind, fetching) = socket.queue.catching_up();
            states.behind += usize::from(behind);
            states.fetching += usize::from(fetching);
            states.unserved += usize::from(!socket.is_served());
        }
        states
    }

    pub fn socket_count(&self) -> usize {
        self.table.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Events queued on each linked worker's shared (or control) stream.
    pub fn link_queues(&self) -> Vec<(SocketAddr, usize)> {
        self.workers()
            .iter()
            .filter_map(|w| {
                let live = w.live.read().unwrap_or_else(|e| e.into_inner()).clone()?;
                Some((w.addr, live.events.max_capacity() - live.events.capacity()))
            })
            .collect()
    }

    fn socket(&self, ws: u64) -> Option<Arc<Socket>> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ws)
            .cloned()
    }

    /// The live worker with the fewest sockets (ties rotate). A worker one
    /// of whose connections just failed is passed over while another is
    /// live: re-attaching a hung worker's sockets to it again would wait for
    /// each of its connections to time out.
    fn pick(&self) -> Option<Arc<WorkerLink>> {
        let workers = self.workers();
        let live: Vec<_> = workers.iter().filter(|w| w.live().is_some()).collect();
        if live.is_empty() {
            return None;
        }
        let start = self.next_pick.fetch_add(1, Ordering::Relaxed) % live.len();
        (0..live.len())
            .map(|i| live[(start + i) % live.len()])
            .min_by_key(|w| {
                let doubted = !w.trusted(self.link_timeout);
                (doubted, w.load.load(Ordering::Relaxed))
            })
            .map(|w| (*w).clone())
    }

    fn hello(&self, mode: Mode, resuming: bool) -> GatewayEvent {
        let mode = match mode {
            Mode::Shared => sharedconn_proto::Mode::Shared,
            Mode::Private => sharedconn_proto::Mode::Private,
        };
        event(Event::Hello(Hello {
            gateway_tag: self.tag,
            mode: mode.into(),
            boot_id: self.boot,
            token: self.token.clone(),
            resuming,
        }))
    }

    /// Registers a new socket and attaches it to a worker (sends `Open`).
    pub async fn attach(
        self: &Arc<Self>,
        ws_id: u64,
        since: u64,
    ) -> Result<Arc<Socket>, CloseReason> {
        let socket = Arc::new(Socket::new(ws_id, now_ms(), self.limits));
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ws_id, socket.clone());
        let open = Open {
            ws_id,
            since,
            opened_ms: socket.opened_ms,
            ..Open::default()
        };
        let attached = self
            .open_on_a_worker(&socket, open, Vec::new(), false)
            .await;
        match attached {
            Ok(_) => Ok(socket),
            Err(reason) => {
                self.table
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&ws_id);
                Err(reason)
            }
        }
    }

    /// Sends `open` and then `frames` to a live worker, and attaches the
    /// socket to that stream. The socket must be `Moving`.
    async fn open_on_a_worker(
        self: &Arc<Self>,
        socket: &Arc<Socket>,
        open: Open,
        frames: Vec<(u64, Bytes)>,
        resuming: bool,
    ) -> Result<StreamHandle, CloseReason> {
        let worker = self.pick().ok_or(CloseReason::NoWorker)?;
        let stream = match self.mode {
            Mode::Shared => worker.live().ok_or(CloseReason::NoWorker)?,
            Mode::Private => self.open_private(&worker, socket.ws_id, resuming).await?,
        };
        if let Err(reason) = send_open(&stream, socket, open, frames).await {
            // The stream is gone (its events are no longer read), or was
            // opened for nothing: a private stream's pump stops.
            stream.ended.cancel();
            return Err(reason);
        }
        stream.load.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Opens a socket's own stream to `worker` (private mode).
    async fn open_private(
        self: &Arc<Self>,
        worker: &Arc<WorkerLink>,
        ws_id: u64,
        resuming: bool,
    ) -> Result<StreamHandle, CloseReason> {
        let generation = worker.generation();
        let (events, rx) = mpsc::channel(PRIVATE_EVENT_QUEUE);
        let _ = events.try_send(self.hello(Mode::Private, resuming));
        let channel = worker.private[(ws_id as usize) % worker.private.len()].clone();
        let mut client = WorkerClient::new(channel);
        let response = tokio::time::timeout(WELCOME_TIMEOUT, client.link(ReceiverStream::new(rx)))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer to the link")))
            .map_err(|status| {
                debug!(ws_id, %status, "private link refused");
                if connection_failed(&status) {
                    worker.failed();
                }
                CloseReason::NoWorker
            })?;
        let stream = StreamHandle::new(
            self.next_stream.fetch_add(1, Ordering::Relaxed),
            events,
            worker.load.clone(),
        );
        tokio::spawn(self.clone().pump_private(
            worker.clone(),
            generation,
            stream.clone(),
            ws_id,
            response.into_inner(),
        ));
        Ok(stream)
    }

    /// Moves one private stream's commands to its socket until the stream
    /// ends or the socket leaves it (dropping the response resets the
    /// stream, and the worker lets the socket go).
    async fn pump_private(
        self: Arc<Self>,
        worker: Arc<WorkerLink>,
        generation: u64,
        stream: StreamHandle,
        ws_id: u64,
        mut commands: tonic::Streaming<WorkerCommand>,
    ) {
        let ended = stream.ended.cancelled();
        tokio::pin!(ended);
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut ended => return,
                next = commands.message() => next,
            };
            match next {
                Ok(Some(WorkerCommand {
                    command: Some(command),
                })) => {
                    if matches!(command, Command::Draining(_)) {
                        // The whole worker is stopping, whichever of its
                        // streams says so first: no socket goes to it now.
                        worker.drains(generation);
                        if self.hand_over(&worker, &stream, self.socket(ws_id).as_ref()) {
                            continue;
                        }
                        break;
                    }
                    self.on_command(&worker, command);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(status) if is_draining(&status) => {
                    // Opened as the worker began to drain, and cut.
                    worker.drains(generation);
                    break;
                }
                Err(status) => {
                    debug!(stream_id = stream.id, %status, "private stream ended");
                    if connection_failed(&status) {
                        worker.failed();
                    }
                    break;
                }
            }
        }
        stream.ended.cancel();
        // The stream served this socket alone: no need to look at the rest.
        let lost = self
            .socket(ws_id)
            .filter(|s| s.detach_from(stream.id))
            .map(|s| s.ws_id);
        self.detached_from(&worker, lost.into_iter().collect());
    }

    /// Applies one command from a worker.
    fn on_command(&self, worker: &WorkerLink, command: Command) {
        match command {
            Command::Deliver(d) => {
                let Some(texts) = checked(d.texts) else {
                    return;
                };
                let delivery = Delivery {
                    texts: &texts,
                    ids: &d.ids,
                    log: &d.log,
                    fetched: d.fetched,
                    complete: d.complete,
                    version: d.version,
                    place: d.place,
                    behind: d.behind,
                };
                let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                for ws in &d.ws_ids {
                    if let Some(socket) = table.get(ws) {
                        socket.queue.deliver(&delivery);
                    }
                }
            }
            Command::Disconnect(d) => {
                if let Some(socket) = self.socket(d.ws_id) {
                    socket.queue.kill(Kill {
                        code: d.code as u16,
                        reason: d.reason,
                    });
                }
            }
            Command::Ack(a) => {
                let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                for (ws, seq) in a.ws_ids.iter().zip(&a.seqs) {
                    if let Some(socket) = table.get(ws) {
                        socket.ack(*seq);
                    }
                }
            }
            Command::Park(p) => {
                if let Some(socket) = self.socket(p.ws_id) {
                    socket.park(p.state);
                }
            }
            Command::Welcome(w) => {
                *worker.log.lock().unwrap_or_else(|e| e.into_inner()) = w.log;
            }
            Command::Draining(_) => {}
        }
    }

    /// The shared (or control) stream to `worker` ended: the sockets it
    /// served wait for the mover.
    fn link_lost(&self, worker: &WorkerLink, stream_id: u64) {
        let lost: Vec<u64> = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.detach_from(stream_id))
            .map(|s| s.ws_id)
            .collect();
        self.detached_from(worker, lost);
    }

    /// These sockets lost their stream to `worker`: they wait for the mover.
    fn detached_from(&self, worker: &WorkerLink, lost: Vec<u64>) {
        if lost.is_empty() {
            return;
        }
        release_load(&worker.load, lost.len());
        debug!(worker = %worker.addr, sockets = lost.len(), "sockets detached");
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(lost);
        self.moved.notify_one();
    }

    /// The worker behind `stream` drains. While another worker is live, the
    /// `sockets` attached to `stream` stay on it, served, while the mover
    /// attaches them elsewhere; the stream ends once the last has moved,
    /// and so a drain pauses no socket. Returns false when no other worker
    /// is live: they then wait for one detached, as after a crash, and the
    /// stream should end now so that the worker can exit and be restarted.
    fn hand_over<'a>(
        &self,
        worker: &WorkerLink,
        stream: &StreamHandle,
        sockets: impl IntoIterator<Item = &'a Arc<Socket>>,
    ) -> bool {
        if !self.ready() {
            return false;
        }
        // Held while the sockets are counted, so that one moved at once
        // cannot end the stream before the rest are counted.
        stream.leaving.fetch_add(1, Ordering::AcqRel);
        let leaving: Vec<u64> = sockets
            .into_iter()
            .filter(|s| s.leave(stream))
            .map(|s| s.ws_id)
            .collect();
        release_load(&worker.load, leaving.len());
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(leaving);
        self.moved.notify_one();
        stream.left();
        true
    }

    /// Forwards a client frame, or keeps it for the next worker. Waits while
    /// the socket has too many frames unacknowledged.
    pub async fn send_frame(&self, socket: &Socket, text: Bytes) {
        let (seq, stream) = socket.hold_frame(text.clone()).await;
        if let Some(stream) = stream {
            let frame = Event::Frame(Frame {
                ws_id: socket.ws_id,
                text,
                seq,
            });
            // A failed send means the stream is gone: the frame is held and
            // goes with the re-attach.
            let _ = stream.events.send(event(frame)).await;
        }
    }

    /// Asks the worker for the messages a socket that fell behind missed.
    pub async fn fetch(&self, socket: &Socket, after: u64) {
        match socket.route() {
            Route::Attached(stream) | Route::Leaving { from: stream, .. } => {
                // Room for the answer and a little live traffic behind it.
                let fetch = Event::Fetch(Fetch {
                    ws_id: socket.ws_id,
                    after,
                    max_messages: (self.limits.frames / 2).max(1) as u32,
                    max_bytes: (self.limits.bytes / 2) as u64,
                });
                if stream.events.send(event(fetch)).await.is_err() {
                    socket.queue.fetch_failed();
                }
            }
            // The re-attach replays, and the fetch is asked again after it.
            _ => socket.queue.fetch_failed(),
        }
    }

    /// The socket is gone: tell its worker, or the next one.
    pub async fn close(&self, socket: &Socket) {
        socket.queue.kill(CloseReason::GoingAway.into());
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&socket.ws_id);
        let close = event(Event::Close(Close {
            ws_id: socket.ws_id,
        }));
        match socket.close() {
            Route::Attached(stream) => {
                release_load(&stream.load, 1);
                let _ = stream.events.send(close).await;
            }
            // Its load went with the drain that made it leave.
            Route::Leaving { from, .. } => {
                let _ = from.events.send(close).await;
                from.left();
            }
            Route::Moving { .. } | Route::Detached(_) => {
                self.pending_closes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(socket.ws_id);
                self.moved.notify_one();
            }
        }
    }

    /// Resolves the worker addresses now and every few seconds; links to
    /// new ones, lets go of those that are gone.
    async fn resolve_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RESOLVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (i, target) in self.targets.iter().enumerate() {
                let found = match tokio::net::lookup_host((target.host.as_str(), target.port)).await
                {
                    Ok(found) => found.collect::<Vec<_>>(),
                    Err(e) => {
                        debug!(host = %target.host, error = %e, "cannot resolve worker address");
                        continue;
                    }
                };
                self.reconcile(i, target, found);
            }
        }
        for worker in self.workers() {
            worker.gone.cancel();
        }
    }

    fn reconcile(self: &Arc<Self>, index: usize, target: &Target, found: Vec<SocketAddr>) {
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| {
            if w.target == index && !found.contains(&w.addr) {
                info!(worker = %w.addr, host = %target.host, "worker address gone");
                w.gone.cancel();
                return false;
            }
            true
        });
        for addr in found {
            if workers.iter().any(|w| w.addr == addr) {
                continue;
            }
            match self.new_link(addr, index) {
                Ok(link) => {
                    info!(worker = %addr, host = %target.host, "worker found");
                    crate::metrics::worker_linked(addr, false);
                    tokio::spawn(self.clone().keep_linked(link.clone()));
                    workers.push(link);
                }
                Err(e) => warn!(worker = %addr, error = %e, "cannot link to worker"),
            }
        }
    }

    fn new_link(&self, addr: SocketAddr, target: usize) -> Result<Arc<WorkerLink>, Error> {
        let url = format!("http://{addr}");
        let (ping_every, _) = keepalive(self.link_timeout);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::WorkerAddress(url.clone(), e.to_string()))?
            .http2_keep_alive_interval(ping_every)
            .keep_alive_timeout(keepalive_backstop(self.link_timeout))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // Private mode: a socket's stream is reset when its socket goes
            // away mid-stream; thousands at once are churn, not abuse.
            .http2_max_local_error_reset_streams(MAX_RESET_STREAMS);
        let private = match self.mode {
            Mode::Shared => Vec::new(),
            Mode::Private => {
                let endpoint = endpoint
                    .clone()
                    .initial_stream_window_size(PRIVATE_STREAM_WINDOW)
                    .initial_connection_window_size(PRIVATE_CONNECTION_WINDOW);
                (0..PRIVATE_CONNECTIONS)
                    .map(|_| endpoint.connect_with_connector_lazy(self.watchdog.connector(addr)))
                    .collect()
            }
        };
        Ok(Arc::new(WorkerLink {
            addr,
            target,
            channel: endpoint.connect_with_connector_lazy(self.watchdog.connector(addr)),
            private,
            live: RwLock::new(None),
            state: AtomicU64::new(0),
            failed_at: Mutex::new(None),
            log: Mutex::new(String::new()),
            load: Arc::new(AtomicUsize::new(0)),
            gone: self.stop.child_token(),
        }))
    }

    /// Keeps the shared (or control) stream to one worker up until the
    /// worker's address is gone.
    async fn keep_linked(self: Arc<Self>, worker: Arc<WorkerLink>) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let linked = tokio::select! {
                _ = worker.gone.cancelled() => break,
                linked = self.run_link(&worker) => linked,
            };
            if linked {
                backoff = RECONNECT_MIN;
            }
            tokio::select! {
                _ = worker.gone.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
        self.unlink(&worker);
    }

    fn unlink(&self, worker: &WorkerLink) {
        crate::metrics::worker_linked(worker.addr, false);
        let live = worker
            .live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stream) = live {
            stream.ended.cancel();
            self.link_lost(worker, stream.id);
        }
    }

    /// Opens the stream and serves it until it ends. Returns whether it was up.
    async fn run_link(self: &Arc<Self>, worker: &Arc<WorkerLink>) -> bool {
        let (events, rx) = mpsc::channel(SHARED_EVENT_QUEUE);
        let resuming = !self
            .detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        let _ = events.try_send(self.hello(Mode::Shared, resuming));
        let mut client = WorkerClient::new(worker.channel.clone());
        // A worker that accepts the connection but never answers (hung
        // mid-handshake) must not hold this link's task for ever.
        let linked = tokio::time::timeout(WELCOME_TIMEOUT, client.link(ReceiverStream::new(rx)));
        let linked = linked
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer to the link")));
        let mut commands = match linked {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    error!(worker = %worker.addr, "worker refused the link token");
                } else {
                    debug!(worker = %worker.addr, %status, "link refused");
                }
                return false;
            }
        };
        // The first command names the worker's log.
        let log = match tokio::time::timeout(WELCOME_TIMEOUT, commands.message()).await {
            Ok(Ok(Some(WorkerCommand {
                command: Some(Command::Welcome(w)),
            }))) => w.log,
            Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
                error!(
                    worker = %worker.addr,
                    gateway_tag = format!("{:08x}", self.tag),
                    "worker refused the link: another live gateway has this tag; \
                     give each gateway its own --gateway-tag (or none)"
                );
                return false;
            }
            // It is draining: its sockets are moving away, none come back.
            Ok(Err(status)) if is_draining(&status) => {
                debug!(worker = %worker.addr, %status, "link refused");
                return false;
            }
            _ => {
                warn!(worker = %worker.addr, "worker did not welcome the link");
                return false;
            }
        };
        if let Some(other) = self.other_log(worker, &log) {
            error!(
                worker = %worker.addr,
                log = %log,
                linked_log = %other,
                "worker serves another chat (a different message log): not linking to it; \
                 workers of one chat must share one backplane"
            );
            return false;
        }
        *worker.log.lock().unwrap_or_else(|e| e.into_inner()) = log.clone();
        let generation = worker.welcomed();
        worker.trust();
        let stream = StreamHandle::new(
            self.next_stream.fetch_add(1, Ordering::Relaxed),
            events,
            worker.load.clone(),
        );
        *worker.live.write().unwrap_or_else(|e| e.into_inner()) = Some(stream.clone());
        info!(worker = %worker.addr, log = %log, resuming, "worker linked");
        crate::metrics::worker_linked(worker.addr, true);
        self.moved.notify_one();
        let mut draining = false;
        loop {
            let next = tokio::select! {
                biased;
                // Every socket it carried is attached elsewhere.
                _ = stream.ended.cancelled(), if draining => break,
                next = commands.message() => next,
            };
            match next {
                Ok(Some(WorkerCommand {
                    command: Some(Command::Draining(_)),
                })) => {
                    info!(worker = %worker.addr, "worker draining, moving its sockets");
                    worker.drains(generation);
                    let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                    if !self.hand_over(worker, &stream, table.values()) {
                        break;
                    }
                    draining = true;
                }
                Ok(Some(WorkerCommand {
                    command: Some(command),
                })) => self.on_command(worker, command),
                Ok(Some(_)) => {}
                Ok(None) => {
                    info!(worker = %worker.addr, "worker ended the link");
                    break;
                }
                Err(status) => {
                    warn!(worker = %worker.addr, %status, "worker link lost");
                    break;
                }
            }
        }
        self.unlink(worker);
        true
    }

    /// The log of another linked worker, when it differs from `log`.
    fn other_log(&self, worker: &WorkerLink, log: &str) -> Option<String> {
        self.workers()
            .iter()
            .filter(|w| !std::ptr::eq(w.as_ref(), worker) && w.live().is_some())
            .map(|w| w.log.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .find(|l| !l.is_empty() && l != log)
    }

    /// Re-attaches detached sockets whenever a worker is live, and closes
    /// those that waited longer than the grace.
    async fn mover(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.moved.notified() => {}
                _ = tick.tick() => {}
            }
            self.flush_closes().await;
            let waiting =
                std::mem::take(&mut *self.detached.lock().unwrap_or_else(|e| e.into_inner()));
            crate::metrics::sockets_waiting(waiting.len());
            if waiting.is_empty() {
                continue;
            }
            if !self.ready() {
                self.expire(waiting);
                continue;
            }
            let left = self.move_pass(waiting).await;
            self.expire(left);
        }
    }

    /// Re-attaches `waiting`, and the sockets that detach while it runs;
    /// returns those no worker took.
    ///
    /// Each re-attach is a task of its own, so a pass spreads over every
    /// runtime thread (polled from one task, 10,000 private opens ran on one
    /// core while the other had room), and at most [`REATTACH_CONCURRENCY`]
    /// run at once. A socket that detaches meanwhile joins the pass at
    /// once: a hung worker's connections are cut over a few of the
    /// watchdog's looks, and a draining one's streams say so one by one, so
    /// its sockets come in batches, and a batch that waited for the whole
    /// pass before it added that pass to its own time.
    async fn move_pass(self: &Arc<Self>, waiting: Vec<u64>) -> Vec<u64> {
        let started = Instant::now();
        let mut queue = VecDeque::from(waiting);
        let mut moves = JoinSet::new();
        let mut moved = 0;
        let mut left = Vec::new();
        let mut synced = HashMap::new();
        loop {
            while moves.len() < REATTACH_CONCURRENCY
                && let Some(ws) = queue.pop_front()
            {
                moves.spawn(self.clone().move_one(ws));
            }
            tokio::select! {
                done = moves.join_next() => match done {
                    // Nothing in flight, nothing queued.
                    None => break,
                    Some(Ok(Moved::To(stream))) => {
                        moved += 1;
                        synced.insert(stream.id, stream.events);
                    }
                    Some(Ok(Moved::Back(ws))) => left.push(ws),
                    Some(Ok(Moved::Gone) | Err(_)) => {}
                },
                _ = self.moved.notified() => queue.extend(std::mem::take(
                    &mut *self.detached.lock().unwrap_or_else(|e| e.into_inner()),
                )),
            }
        }
        // Each worker may now send the online list it held back.
        for (_, events) in synced {
            let _ = events.send(event(Event::Synced(Synced {}))).await;
        }
        crate::metrics::sockets_reattached(moved);
        crate::metrics::sockets_waiting(left.len());
        info!(
            sockets = moved,
            waiting = left.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "sockets re-attached"
        );
        left
    }

    /// Re-attaches one waiting socket, if it is still there to move.
    async fn move_one(self: Arc<Self>, ws: u64) -> Moved {
        let Some(socket) = self.socket(ws) else {
            return Moved::Gone;
        };
        let Some(resume) = socket.begin_move() else {
            return Moved::Gone;
        };
        match self.reattach(&socket, resume).await {
            Ok(stream) => Moved::To(stream),
            Err(_) => {
                socket.set_detached();
                Moved::Back(ws)
            }
        }
    }

    async fn reattach(
        self: &Arc<Self>,
        socket: &Arc<Socket>,
        resume: Resume,
    ) -> Result<StreamHandle, CloseReason> {
        let open = Open {
            ws_id: socket.ws_id,
            since: resume.place.last_id,
            resume: true,
            log: resume.place.log,
            state: resume.parked,
            opened_ms: socket.opened_ms,
            version: resume.place.version,
        };
        let stream = self
            .open_on_a_worker(socket, open, resume.unacked, true)
            .await?;
        // A socket that was behind fetches again on its new stream.
        socket.queue.wake();
        Ok(stream)
    }

    /// Puts sockets back to wait, closing those past the re-attach grace.
    fn expire(&self, waiting: Vec<u64>) {
        let mut keep = Vec::with_capacity(waiting.len());
        let mut closed = 0;
        for ws in waiting {
            let Some(socket) = self.socket(ws) else {
                continue;
            };
            match socket.route() {
                Route::Detached(since) if since.elapsed() >= self.reattach_grace => {
                    socket.queue.kill(CloseReason::WorkerLost.into());
                    closed += 1;
                }
                _ => keep.push(ws),
            }
        }
        if closed > 0 {
            warn!(
                sockets = closed,
                grace = ?self.reattach_grace,
                "no worker within the re-attach grace, sockets closed"
            );
        }
        self.detached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(keep);
    }

    /// Sends the closes of sockets that closed while detached.
    async fn flush_closes(&self) {
        let Some(stream) = self.pick().and_then(|w| w.live()) else {
            return;
        };
        let closes = std::mem::take(
            &mut *self
                .pending_closes
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for ws_id in closes {
            let _ = stream
                .events
                .send(event(Event::Close(Close { ws_id })))
                .await;
        }
    }
}

/// Sends `open` and then `frames` on `stream`, and attaches the socket to
/// it once no newer frame waits.
async fn send_open(
    stream: &StreamHandle,
    socket: &Socket,
    open: Open,
    frames: Vec<(u64, Bytes)>,
) -> Result<(), CloseReason> {
    let ws_id = socket.ws_id;
    if stream.events.send(event(Event::Open(open))).await.is_err() {
        return Err(CloseReason::NoWorker);
    }
    let mut sent = 0;
    let mut frames = frames;
    loop {
        for (seq, text) in frames {
            let frame = Event::Frame(Frame { ws_id, text, seq });
            if stream.events.send(event(frame)).await.is_err() {
                return Err(CloseReason::NoWorker);
            }
            sent = seq;
        }
        match socket.finish_move(stream, sent) {
            Finish::Attached => return Ok(()),
            Finish::Newer(newer) => frames = newer,
            Finish::Ended => return Err(CloseReason::NoWorker),
        }
    }
}

/// Whether a draining worker cut the stream (it came up as the drain began).
fn is_draining(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status.message() == sharedconn_proto::DRAINING_STATUS
}

/// Whether a stream ended because its connection did (a keepalive ping
/// unanswered, a reset, a refused connect), or a worker that is shutting
/// down refused it; not a stream the worker cut or a socket that left.
fn connection_failed(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    )
}

/// Takes `n` sockets off a worker's load (never below zero: a socket may
/// be counted off by its close and by its stream's loss).
fn release_load(load: &AtomicUsize, n: usize) {
    let _ = load.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
        Some(now.saturating_sub(n))
    });
}

/// A Deliver's frames as WebSocket text, checked once per payload and then
/// shared by every socket; `None` (and a warning) if one is not UTF-8.
fn checked(texts: Vec<Bytes>) -> Option<Vec<Utf8Bytes>> {
    let checked: Result<Vec<_>, _> = texts.into_iter().map(Utf8Bytes::try_from).collect();
    checked
        .inspect_err(|_| warn!("worker sent a frame that is not UTF-8"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hang_is_found_within_the_link_timeout_with_room_to_spare() {
        for ms in [200, 2_000, 30_000] {
            let timeout = Duration::from_millis(ms);
            let (ping_every, silence) = keepalive(timeout);
            assert!(!ping_every.is_zero());
            // The watchdog looks every twentieth of the silence bound.
            assert!(
                ping_every + silence + silence / 10 <= timeout * 9 / 10,
                "{ms} ms"
            );
            assert!(silence >= timeout * 3 / 4, "{ms} ms");
            // A live worker is asked many times before it could look silent.
            assert!(ping_every * 10 <= silence, "{ms} ms");
            assert!(keepalive_backstop(timeout) >= timeout * 5, "{ms} ms");
        }
    }

    /// Two workers that look linked (their addresses are never dialled).
    fn two_linked_workers(upstream: &Upstream) -> Vec<Arc<WorkerLink>> {
        let links: Vec<_> = (1..=2)
            .map(|port| {
                let link = upstream
                    .new_link(SocketAddr::from(([127, 0, 0, 1], port)), 0)
                    .unwrap();
                *link.live.write().unwrap() = Some(StreamHandle::new(
                    u64::from(port),
                    mpsc::channel(1).0,
                    link.load.clone(),
                ));
                link
            })
            .collect();
        *upstream.workers.write().unwrap() = links.clone();
        links
    }

    #[tokio::test]
    async fn a_worker_whose_connection_just_failed_is_passed_over_while_another_is_live() {
        let mut config = Config::new(Vec::new());
        config.mode = Mode::Private;
        let stop = CancellationToken::new();
        let upstream = Upstream::start(&config, 1, stop.clone()).unwrap();
        let links = two_linked_workers(&upstream);

        links[0].failed();
        for _ in 0..8 {
            let picked = upstream.pick().unwrap();
            assert!(Arc::ptr_eq(&picked, &links[1]));
        }
        // With every live worker in doubt, one of them still serves.
        links[1].failed();
        let picked: Vec<_> = (0..8).map(|_| upstream.pick().unwrap()).collect();
        assert!(picked.iter().any(|w| Arc::ptr_eq(w, &links[0])));
        assert!(picked.iter().any(|w| Arc::ptr_eq(w, &links[1])));
        // The doubt lasts a link timeout.
        assert!(!links[0].trusted(config.link_timeout));
        assert!(links[0].trusted(Duration::ZERO));
        stop.cancel();
    }

    /// A drain heard on a stream opened before the worker restarted says
    /// nothing of the new process: it stays live. One heard from the current
    /// process takes it out of the pick until its link is welcomed again.
    #[tokio::test]
    async fn a_drain_from_before_a_restart_leaves_the_new_process_live() {
        let config = Config::new(Vec::new());
        let stop = CancellationToken::new();
        let upstream = Upstream::start(&config, 1, stop.clone()).unwrap();
        let links = two_linked_workers(&upstream);
        let worker = &links[0];

        worker.welcomed();
        let before_restart = worker.generation();
        worker.welcomed();
        worker.drains(before_restart);
        assert!(
            worker.live().is_some(),
            "a stale drain marked the new process"
        );

        worker.drains(worker.generation());
        assert!(worker.live().is_none());
        assert!(upstream.pick().is_some_and(|w| Arc::ptr_eq(&w, &links[1])));
        worker.welcomed();
        assert!(worker.live().is_some(), "welcomed again, not draining");
        stop.cancel();
    }
}

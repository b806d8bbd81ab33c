//! The one task that drives the application.
//!
//! Stream handlers queue [`Input`]s; the runtime applies them in arrival
//! order, interleaved with the application's own events, and owns the
//! [`Router`]. This single consumer is what gives the chat one total order.
//!
//! A stream that ends detaches its sockets instead of closing them: their
//! gateway keeps them open and re-attaches them (here or to another worker).
//! On shutdown the runtime asks every gateway to move its sockets elsewhere
//! (`Draining`) and waits, up to a grace period, for the streams to end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use sharedconn_common::rate::RateLimit;

use crate::app::{Handled, OpenInfo, Outbox, WebSocketApp, WsId};
use crate::router::{Peer, Router, StreamId, StreamTx};

/// Events queued for the runtime. Capacity bounds the memory a burst of
/// frames can take; when full, stream readers wait, which pushes back through
/// HTTP/2 flow control to the gateways and from there to the browsers' TCP.
pub const INBOX_CAPACITY: usize = 4096;
/// Close code for a refused open: 1013, try again later.
const REFUSED_CODE: u16 = 1013;
/// How often a congested runtime looks whether its streams drained.
const CONGESTION_POLL: Duration = Duration::from_millis(2);
/// How often the worker logs what it holds.
const STATUS_EVERY: Duration = Duration::from_secs(60);
/// Longest a re-attaching gateway may hold back online lists: its sockets
/// are re-attached in well under this, and a gateway that never says
/// `Synced` must not freeze the list.
const HOLD_LISTS_MAX: Duration = Duration::from_secs(5);
/// Close code for a socket whose gateway let through more frames than the
/// worker's limit: 1008, policy violation.
const TOO_MANY_FRAMES_CODE: u16 = 1008;
/// Close code for a frame over the worker's size limit: 1009, too big.
const TOO_BIG_CODE: u16 = 1009;

/// What the worker allows each gateway, whatever the gateway's own limits
/// say: holding the link token lets a process link, it does not make what
/// it sends right.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sockets one run of a gateway may hold open on this worker.
    pub sockets_per_gateway: usize,
    /// Frames one socket may send per second, sustained.
    pub frames_per_sec: u32,
    /// Frames one socket may send in a burst above the sustained rate.
    pub frame_burst: u32,
    /// Largest frame (bytes of text) a socket may send.
    pub frame_bytes: usize,
}

impl Default for Limits {
    /// Twice what a gateway allows by default (100 frames/s, a burst of
    /// 200), so an honest gateway never meets them: it also re-sends up to
    /// 32 unacknowledged frames on a re-attach. Sockets and frame size: the
    /// gateway's defaults (100,000 sockets, 64 KiB).
    fn default() -> Self {
        Limits {
            sockets_per_gateway: 100_000,
            frames_per_sec: 200,
            frame_burst: 400,
            frame_bytes: 64 << 10,
        }
    }
}

impl Limits {
    /// These limits raised, where needed, to cover a gateway that allows
    /// this much: twice its frame rate and burst, its frame size and its
    /// sockets. For a worker started beside its gateways (the all-in-one).
    pub fn covering(
        self,
        frames_per_sec: u32,
        frame_burst: u32,
        frame_bytes: usize,
        sockets: usize,
    ) -> Self {
        Limits {
            sockets_per_gateway: self.sockets_per_gateway.max(sockets),
            frames_per_sec: self.frames_per_sec.max(frames_per_sec.saturating_mul(2)),
            frame_burst: self.frame_burst.max(frame_burst.saturating_mul(2)),
            frame_bytes: self.frame_bytes.max(frame_bytes),
        }
    }
}

/// One thing that happened on a link stream.
#[derive(Debug)]
pub enum Input {
    StreamUp {
        stream: StreamId,
        peer: Peer,
        /// The gateway will re-attach sockets and then send `Synced`.
        resuming: bool,
        tx: StreamTx,
        backlog: Arc<crate::router::Backlog>,
        cut: oneshot::Sender<tonic::Status>,
    },
    StreamDown {
        stream: StreamId,
    },
    Open {
        stream: StreamId,
        ws: WsId,
        open: OpenInfo,
    },
    /// An open the stream's gateway had no right to send (a foreign ID).
    Refuse {
        stream: StreamId,
        ws: WsId,
    },
    Frame {
        stream: StreamId,
        ws: WsId,
        seq: u64,
        text: Bytes,
    },
    Close {
        stream: StreamId,
        ws: WsId,
    },
    Synced {
        stream: StreamId,
    },
    Fetch {
        stream: StreamId,
        ws: WsId,
        after: u64,
        max_messages: usize,
        max_bytes: usize,
    },
}

pub struct Runtime<A> {
    app: A,
    router: Router,
    inbox: mpsc::Receiver<Input>,
    /// Streams whose gateway is still re-attaching, and since when.
    resuming: HashMap<StreamId, Instant>,
    /// The application's health, for the health service.
    health: watch::Sender<bool>,
    limits: Limits,
    /// Each open socket's frame allowance; `None` once it went over and
    /// its close was ordered (frames still on their way are dropped).
    buckets: HashMap<WsId, Option<RateLimit>>,
    /// Set once the worker asked its gateways to move their sockets: until it
    /// stops, no new stream is taken (a gateway would move sockets back).
    draining_until: Option<Instant>,
}

impl<A: WebSocketApp> Runtime<A> {
    pub fn new(app: A, limits: Limits) -> (Self, mpsc::Sender<Input>, watch::Receiver<bool>) {
        let (tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let (health, health_rx) = watch::channel(app.healthy());
        let runtime = Runtime {
            app,
            router: Router::default(),
            inbox,
            resuming: HashMap::new(),
            health,
            limits,
            buckets: HashMap::new(),
            draining_until: None,
        };
        (runtime, tx, health_rx)
    }

    /// Runs until `stop` fires (then drains, up to `grace`) or every stream
    /// handler is gone. Dropping the router on return ends every response
    /// stream.
    pub async fn run(mut self, mut stop: oneshot::Receiver<()>, grace: Duration) {
        let mut status = tokio::time::interval_at(Instant::now() + STATUS_EVERY, STATUS_EVERY);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(until) = self.draining_until
                && (self.router.stream_count() == 0 || Instant::now() >= until)
            {
                break;
            }
            // Backpressure: while a gateway's stream is far behind, take no
            // new events (posts wait in the inbox, then in HTTP/2 flow
            // control, then in the senders' sockets) and deliver nothing
            // more; the stream drains, and the chat goes on more slowly.
            let congested = self.router.congested();
            // Unbiased: a steady stream of socket events (a join storm, many
            // senders) must not starve the application's own events, which
            // carry the broadcasts every client is waiting for.
            tokio::select! {
                input = self.inbox.recv(), if !congested => match input {
                    Some(input) => self.apply(input).await,
                    None => break,
                },
                event = self.app.next_event(), if !congested => {
                    self.app.on_event(event, &mut Outbox::new(&mut self.router)).await;
                }
                _ = tokio::time::sleep(CONGESTION_POLL), if congested => {
                    crate::metrics::congested(CONGESTION_POLL);
                }
                _ = tick.tick() => self.housekeeping(),
                _ = status.tick() => info!(
                    sockets = self.router.socket_count(),
                    streams = self.router.stream_count(),
                    "worker status"
                ),
                _ = &mut stop, if self.draining_until.is_none() => {
                    info!(
                        streams = self.router.stream_count(),
                        sockets = self.router.socket_count(),
                        "asking gateways to move their sockets"
                    );
                    self.router.drain();
                    self.draining_until = Some(Instant::now() + grace);
                }
            }
            self.router.flush_acks();
        }
        info!(sockets = self.router.socket_count(), "runtime stopped");
    }

    fn housekeeping(&mut self) {
        let healthy = self.app.healthy();
        crate::metrics::backplane_healthy(healthy);
        crate::metrics::held(self.router.stream_count(), self.router.socket_count());
        self.health
            .send_if_modified(|h| std::mem::replace(h, healthy) != healthy);
        let before = self.resuming.len();
        self.resuming
            .retain(|_, since| since.elapsed() < HOLD_LISTS_MAX);
        if before != self.resuming.len() {
            warn!("a gateway did not finish re-attaching in time; sending lists again");
            self.app.hold_lists(!self.resuming.is_empty());
        }
    }

    /// Answers an open we cannot take (its ID is in use, or not its
    /// gateway's), so the socket is closed instead of left without a Status.
    fn refuse(&mut self, stream: StreamId, ws: WsId) {
        if self.router.peer(stream).is_none() {
            // Its stream was cut (the worker drains) or is gone: nothing to
            // answer on, and nothing wrong with the open.
            debug!(stream, ws_id = ws, "open on a stream not taken");
            return;
        }
        warn!(
            stream,
            ws_id = ws,
            "open refused: WebSocket ID in use or foreign"
        );
        self.router.disconnect_on(
            stream,
            ws,
            REFUSED_CODE,
            "cannot open this socket, reconnect",
        );
    }

    async fn apply(&mut self, input: Input) {
        match input {
            Input::StreamUp {
                stream,
                peer,
                resuming,
                tx,
                backlog,
                cut,
            } => {
                if self.draining_until.is_some() {
                    let _ = cut.send(tonic::Status::unavailable(
                        sharedconn_proto::DRAINING_STATUS,
                    ));
                    return;
                }
                if self.router.tag_held_by_another(peer.tag, peer.boot) {
                    warn!(
                        gateway_tag = format!("{:08x}", peer.tag),
                        boot_id = format!("{:016x}", peer.boot),
                        "link refused: another live gateway holds this tag"
                    );
                    let _ = cut.send(tonic::Status::already_exists(
                        "another live gateway holds this gateway tag",
                    ));
                    return;
                }
                // A gateway's first stream here starts holding its lease; its
                // later ones (a private stream per socket) change nothing.
                let first = !self.router.boot_linked(peer.boot);
                self.router.add_stream(stream, peer, tx, backlog, cut);
                self.router.welcome(stream, self.app.log_id());
                if first {
                    info!(
                        stream,
                        gateway_tag = format!("{:08x}", peer.tag),
                        boot_id = format!("{:016x}", peer.boot),
                        resuming,
                        "gateway linked"
                    );
                    self.app.gateway_up(peer.boot, peer.tag);
                }
                if resuming {
                    self.resuming.insert(stream, Instant::now());
                    self.app.hold_lists(true);
                }
            }
            Input::StreamDown { stream } => {
                let peer = self.router.peer(stream);
                let detached = self.router.remove_stream(stream);
                debug!(stream, sockets = detached.len(), "stream down");
                for ws in detached {
                    self.buckets.remove(&ws);
                    self.app.on_detach(ws);
                }
                if let Some(peer) = peer
                    && !self.router.boot_linked(peer.boot)
                {
                    self.app.gateway_down(peer.boot);
                }
                self.synced(stream);
            }
            Input::Open { stream, ws, open } => {
                let over_cap = self.router.stream_of(ws).is_none()
                    && self.router.peer(stream).is_some_and(|peer| {
                        self.router.gateway_sockets(peer.boot) >= self.limits.sockets_per_gateway
                    });
                if over_cap {
                    warn!(
                        stream,
                        ws_id = ws,
                        cap = self.limits.sockets_per_gateway,
                        "open refused: the gateway holds as many sockets here as it may"
                    );
                    self.router
                        .disconnect_on(stream, ws, REFUSED_CODE, "server full, reconnect");
                } else if self.router.add_socket(ws, stream) {
                    self.buckets.insert(
                        ws,
                        Some(RateLimit::new(
                            self.limits.frames_per_sec,
                            self.limits.frame_burst,
                        )),
                    );
                    self.app
                        .on_open(ws, open, &mut Outbox::new(&mut self.router))
                        .await;
                } else {
                    self.refuse(stream, ws);
                }
            }
            Input::Refuse { stream, ws } => self.refuse(stream, ws),
            Input::Frame {
                stream,
                ws,
                seq,
                text,
            } => {
                // A stream speaks only for its own sockets. A frame for a
                // socket not open here is not acknowledged: its gateway
                // sends it again once the socket is attached.
                if self.router.stream_of(ws) != Some(stream) {
                    return;
                }
                if text.len() > self.limits.frame_bytes {
                    warn!(
                        stream,
                        ws_id = ws,
                        bytes = text.len(),
                        "frame over the worker's size limit: its gateway does not limit it"
                    );
                    self.router.ack_on(stream, ws, seq);
                    self.router.disconnect(ws, TOO_BIG_CODE, "message too big");
                    return;
                }
                if let Some(cut_now) = self.over_frame_rate(ws) {
                    // Frames already on their way after the cut are dropped.
                    if cut_now {
                        warn!(
                            stream,
                            ws_id = ws,
                            "socket over the worker's frame rate: its gateway does not limit it"
                        );
                        self.router
                            .disconnect(ws, TOO_MANY_FRAMES_CODE, "too many messages");
                    }
                    self.router.ack_on(stream, ws, seq);
                    return;
                }
                // The gateway forwards text frames only, checked as UTF-8.
                let handled = match std::str::from_utf8(&text) {
                    Ok(text) => {
                        self.app
                            .on_frame(ws, seq, text, &mut Outbox::new(&mut self.router))
                            .await
                    }
                    Err(_) => Handled::Now,
                };
                if handled == Handled::Now {
                    self.router.ack_on(stream, ws, seq);
                }
            }
            Input::Close { stream, ws } => {
                let Some(peer) = self.router.peer(stream) else {
                    return;
                };
                match self.router.stream_of(ws) {
                    Some(s) if s == stream => {
                        self.router.remove_socket(ws);
                        self.buckets.remove(&ws);
                    }
                    // Open on another stream: that stream speaks for it.
                    Some(_) => return,
                    // Closed while it had no worker: forget it all the same.
                    None if (ws >> 32) as u32 != peer.tag => return,
                    None => {}
                }
                self.app
                    .on_close(ws, peer.boot, &mut Outbox::new(&mut self.router));
            }
            Input::Synced { stream } => self.synced(stream),
            Input::Fetch {
                stream,
                ws,
                after,
                max_messages,
                max_bytes,
            } => {
                if self.router.stream_of(ws) == Some(stream) {
                    let budget = crate::app::Budget {
                        messages: max_messages,
                        bytes: max_bytes,
                    };
                    self.app
                        .on_fetch(ws, after, budget, &mut Outbox::new(&mut self.router));
                }
            }
        }
    }

    /// Takes one frame from `ws`'s allowance. `None`: within it;
    /// `Some(true)`: over it for the first time (the socket is to be closed);
    /// `Some(false)`: over it again, already closing.
    fn over_frame_rate(&mut self, ws: WsId) -> Option<bool> {
        let slot = self.buckets.get_mut(&ws)?;
        let Some(limit) = slot else {
            return Some(false);
        };
        if limit.try_take() {
            return None;
        }
        *slot = None;
        Some(true)
    }

    fn synced(&mut self, stream: StreamId) {
        if self.resuming.remove(&stream).is_some() {
            self.app.hold_lists(!self.resuming.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use sharedconn_proto::worker_command::Command;

    use super::*;
    use crate::backplane::embedded::{Embedded, Options};
    use crate::chat::Chat;

    /// A gateway's stream going up: what the runtime will send on it, and
    /// the status it is cut with, if it is.
    fn stream_up(
        stream: StreamId,
    ) -> (
        Input,
        mpsc::Receiver<sharedconn_proto::WorkerCommand>,
        oneshot::Receiver<tonic::Status>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let (cut, cut_rx) = oneshot::channel();
        let input = Input::StreamUp {
            stream,
            peer: Peer { tag: 7, boot: 1 },
            resuming: false,
            tx,
            backlog: Arc::new(crate::router::Backlog::new(1 << 20)),
            cut,
        };
        (input, rx, cut_rx)
    }

    /// Once it has asked its gateways to move their sockets, a worker takes
    /// no new stream: a gateway re-linking would see it live and move
    /// sockets back to it, only to move them again when it exits.
    #[tokio::test]
    async fn a_draining_worker_takes_no_new_stream() {
        let dir = tempfile::tempdir().unwrap();
        let app = Chat::new(
            Embedded::open(dir.path(), Options::new(50)).unwrap(),
            50,
            Duration::from_millis(100),
        );
        let (runtime, inbox, _health) = Runtime::new(app, Limits::default());
        let (stop, stop_rx) = oneshot::channel();
        let running = tokio::spawn(runtime.run(stop_rx, Duration::from_secs(60)));

        let (up, mut first, _first_cut) = stream_up(1);
        inbox.send(up).await.unwrap();
        let welcome = first.recv().await.unwrap().command;
        assert!(matches!(welcome, Some(Command::Welcome(_))), "{welcome:?}");
        stop.send(()).unwrap();
        let draining = first.recv().await.unwrap().command;
        assert!(
            matches!(draining, Some(Command::Draining(_))),
            "{draining:?}"
        );

        let (up, mut second, cut) = stream_up(2);
        inbox.send(up).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), cut)
            .await
            .expect("the new stream is cut at once, not left open")
            .expect("the new stream is cut");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), sharedconn_proto::DRAINING_STATUS);
        assert!(second.try_recv().is_err(), "nothing sent on the new stream");

        // The first stream ending is the last: the worker stops.
        inbox.send(Input::StreamDown { stream: 1 }).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the runtime stops once its streams are gone")
            .unwrap();
    }
}

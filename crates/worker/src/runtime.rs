//! The one task that drives the application.
//!
//! Stream handlers queue [`Input`]s; the runtime applies them in arrival
//! order, interleaved with the application's own events, and owns the
//! [`Router`]. This single consumer is what gives the chat one total order.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::app::{Outbox, WebSocketApp, WsId};
use crate::router::{Router, StreamId, StreamTx};

/// Events queued for the runtime. Capacity bounds the memory a burst of
/// frames can take; when full, stream readers wait, which pushes back through
/// HTTP/2 flow control to the gateways and from there to the browsers' TCP.
pub const INBOX_CAPACITY: usize = 4096;
/// Close code for a refused open: 1013, try again later.
const REFUSED_CODE: u16 = 1013;
/// How often the worker logs what it holds.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One thing that happened on a link stream.
#[derive(Debug)]
pub enum Input {
    StreamUp {
        stream: StreamId,
        tx: StreamTx,
        backlog: Arc<AtomicUsize>,
        cut: oneshot::Sender<()>,
    },
    StreamDown {
        stream: StreamId,
    },
    Open {
        stream: StreamId,
        ws: WsId,
        since: u64,
    },
    /// An open the stream's gateway had no right to send (a foreign ID).
    Refuse {
        stream: StreamId,
        ws: WsId,
    },
    Frame {
        stream: StreamId,
        ws: WsId,
        text: Bytes,
    },
    Close {
        stream: StreamId,
        ws: WsId,
    },
}

pub struct Runtime<A> {
    app: A,
    router: Router,
    inbox: mpsc::Receiver<Input>,
}

impl<A: WebSocketApp> Runtime<A> {
    pub fn new(app: A) -> (Self, mpsc::Sender<Input>) {
        let (tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let runtime = Runtime {
            app,
            router: Router::default(),
            inbox,
        };
        (runtime, tx)
    }

    /// Runs until `stop` fires or every stream handler is gone. Dropping the
    /// router on return ends every response stream.
    pub async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut status =
            tokio::time::interval_at(tokio::time::Instant::now() + STATUS_EVERY, STATUS_EVERY);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Unbiased: a steady stream of socket events (a join storm, many
            // senders) must not starve the application's own events, which
            // carry the broadcasts every client is waiting for.
            tokio::select! {
                input = self.inbox.recv() => match input {
                    Some(input) => self.apply(input).await,
                    None => break,
                },
                event = self.app.next_event() => {
                    self.app.on_event(event, &mut Outbox::new(&mut self.router)).await;
                }
                _ = status.tick() => info!(
                    sockets = self.router.socket_count(),
                    streams = self.router.stream_count(),
                    "worker status"
                ),
                _ = &mut stop => break,
            }
        }
        info!(sockets = self.router.socket_count(), "runtime stopped");
    }

    /// Answers an open we cannot take (its ID is in use, or not its
    /// gateway's), so the socket is closed instead of left without a Status.
    fn refuse(&mut self, stream: StreamId, ws: WsId) {
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
                tx,
                backlog,
                cut,
            } => self.router.add_stream(stream, tx, backlog, cut),
            Input::StreamDown { stream } => {
                let orphans = self.router.remove_stream(stream);
                debug!(stream, sockets = orphans.len(), "stream down");
                for ws in orphans {
                    self.app
                        .on_close(ws, &mut Outbox::new(&mut self.router))
                        .await;
                }
            }
            Input::Open { stream, ws, since } => {
                if self.router.add_socket(ws, stream) {
                    self.app
                        .on_open(ws, since, &mut Outbox::new(&mut self.router))
                        .await;
                } else {
                    self.refuse(stream, ws);
                }
            }
            Input::Refuse { stream, ws } => self.refuse(stream, ws),
            Input::Frame { stream, ws, text } => {
                // A stream speaks only for its own sockets.
                if self.router.stream_of(ws) != Some(stream) {
                    return;
                }
                // The gateway forwards text frames only, checked as UTF-8.
                let Ok(text) = std::str::from_utf8(&text) else {
                    return;
                };
                self.app
                    .on_frame(ws, text, &mut Outbox::new(&mut self.router))
                    .await;
            }
            Input::Close { stream, ws } => {
                if self.router.stream_of(ws) == Some(stream) && self.router.remove_socket(ws) {
                    self.app
                        .on_close(ws, &mut Outbox::new(&mut self.router))
                        .await;
                }
            }
        }
    }
}

//! The application trait, shaped like IRIS's `%CSP.WebSocket`.
//!
//! `on_open` is `OnPreServer` plus the start of `Server()`, `on_frame` is one
//! `Read()` that returned data, `on_close` is the `$$$CSPWebSocketClosed`
//! branch, and [`Outbox`] is `OpenServer(wsid)` + `Write()`: the application
//! may write to any WebSocket ID, not only the one whose event it handles.
//!
//! Every method runs on the single runtime task, one event at a time, so an
//! application sees one total order of events and needs no locks. It must not
//! block: slow work belongs behind [`WebSocketApp::next_event`].

use std::future::Future;

use bytes::Bytes;

use crate::router::Router;

/// A cluster-unique WebSocket ID (high 32 bits: the issuing gateway's tag).
pub type WsId = u64;

/// An application served over the gateway/worker split.
pub trait WebSocketApp: Send + 'static {
    /// Something the application waits for besides socket events (its
    /// backplane, a timer).
    type Event: Send;

    /// A socket opened. `since` is the last message id the client already has
    /// (0 when it has none).
    fn on_open(
        &mut self,
        ws: WsId,
        since: u64,
        out: &mut Outbox<'_>,
    ) -> impl Future<Output = ()> + Send;

    /// A text frame arrived from `ws`.
    fn on_frame(
        &mut self,
        ws: WsId,
        text: &str,
        out: &mut Outbox<'_>,
    ) -> impl Future<Output = ()> + Send;

    /// `ws` is gone; nothing more can be written to it.
    fn on_close(&mut self, ws: WsId, out: &mut Outbox<'_>) -> impl Future<Output = ()> + Send;

    /// Waits for the application's next own event. Must be cancel-safe: the
    /// runtime drops it whenever a socket event arrives first.
    fn next_event(&mut self) -> impl Future<Output = Self::Event> + Send;

    /// Handles an event returned by `next_event`.
    fn on_event(
        &mut self,
        event: Self::Event,
        out: &mut Outbox<'_>,
    ) -> impl Future<Output = ()> + Send;
}

/// Writes to sockets by WebSocket ID. Writing never waits: a stream whose
/// queue is full is cut (see [`Router`]), so one slow gateway or socket cannot
/// stall the application.
pub struct Outbox<'a> {
    router: &'a mut Router,
}

impl<'a> Outbox<'a> {
    pub(crate) fn new(router: &'a mut Router) -> Self {
        Outbox { router }
    }

    /// Writes one text frame (UTF-8) to one socket.
    pub fn write(&mut self, ws: WsId, text: impl Into<Bytes>) {
        self.router.write(&[ws], text.into());
    }

    /// Writes several text frames to one socket, in order, as one command
    /// on its stream (an opening socket's Status, history and list).
    pub fn write_frames(&mut self, ws: WsId, texts: Vec<Bytes>) {
        self.router.write_frames(ws, texts);
    }

    /// Writes one text frame to several sockets; each stream carries it once.
    pub fn write_many(&mut self, ids: &[WsId], text: impl Into<Bytes>) {
        self.router.write(ids, text.into());
    }

    /// Writes one text frame to every open socket on this worker.
    pub fn broadcast(&mut self, text: impl Into<Bytes>) {
        self.router.broadcast(text.into());
    }

    /// Closes a socket with a WebSocket close code.
    pub fn disconnect(&mut self, ws: WsId, code: u16, reason: &str) {
        self.router.disconnect(ws, code, reason);
    }

    /// How many sockets are open on this worker.
    pub fn open_sockets(&self) -> usize {
        self.router.socket_count()
    }
}

//! The application trait, shaped like IRIS's `%CSP.WebSocket`.
//!
//! `on_open` is `OnPreServer` plus the start of `Server()`, `on_frame` is one
//! `Read()` that returned data, `on_close` is the `$$$CSPWebSocketClosed`
//! branch, and [`Outbox`] is `OpenServer(wsid)` + `Write()`: the application
//! may write to any WebSocket ID, not only the one whose event it handles.
//!
//! Unlike IRIS, a socket outlives the worker serving it: when a worker dies
//! the gateway re-attaches the socket to another one (`on_open` with
//! [`OpenInfo::resume`]) and hands back what the application parked with
//! [`Outbox::park`]. So an application keeps nothing about a socket that it
//! cannot rebuild from its parked state and its backplane.
//!
//! Every method runs on the single runtime task, one event at a time, so an
//! application sees one total order of events and needs no locks. It must not
//! block: slow work belongs behind [`WebSocketApp::next_event`].

use std::future::Future;

use bytes::Bytes;

use crate::router::Router;

/// A cluster-unique WebSocket ID (high 32 bits: the issuing gateway's tag).
pub type WsId = u64;

/// What the gateway tells about a socket that opens or is re-attached.
#[derive(Debug, Clone, Default)]
pub struct OpenInfo {
    /// The last message id the client already has (0 when it has none).
    pub since: u64,
    /// The socket was served before (by another worker, or by this one
    /// before a restart): it has had its Status frame and is in the list.
    pub resume: bool,
    /// The log name `since` belongs to.
    pub log: String,
    /// What the application parked for this socket.
    pub state: Bytes,
    /// When the socket opened, in ms since the Unix epoch.
    pub opened_ms: u64,
    /// The run of the gateway holding the socket.
    pub boot: u64,
    /// The version of the last state frame (the online list) its gateway
    /// queued for it (0: none, or unknown).
    pub version: u64,
}

/// How much a socket that fell behind can take in one answer (0: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    pub messages: usize,
    pub bytes: usize,
}

/// What became of a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done: the runtime acknowledges it to the gateway now.
    Now,
    /// The application acknowledges it later with [`Outbox::ack`] (a post,
    /// once it is stored).
    Later,
}

/// An application served over the gateway/worker split.
pub trait WebSocketApp: Send + 'static {
    /// Something the application waits for besides socket events (its
    /// backplane, a timer).
    type Event: Send;

    /// Names the data that message ids refer to (the chat's log); sent to
    /// every gateway that links, so it never joins two different chats.
    fn log_id(&self) -> &str;

    /// Whether the application can do its work (its backplane is reachable).
    fn healthy(&self) -> bool;

    /// A gateway's run (`boot`) has a stream to this worker, or has none
    /// left. The application holds that gateway's sockets while it is up.
    fn gateway_up(&mut self, boot: u64, tag: u32);
    fn gateway_down(&mut self, boot: u64);

    /// A socket opened or was re-attached.
    fn on_open(
        &mut self,
        ws: WsId,
        open: OpenInfo,
        out: &mut Outbox<'_>,
    ) -> impl Future<Output = ()> + Send;

    /// A text frame arrived from `ws`, the `seq`th of that socket.
    fn on_frame(
        &mut self,
        ws: WsId,
        seq: u64,
        text: &str,
        out: &mut Outbox<'_>,
    ) -> impl Future<Output = Handled> + Send;

    /// A socket that fell behind asks for the messages after `after`, as
    /// many as fit its `budget`.
    fn on_fetch(&mut self, ws: WsId, after: u64, budget: Budget, out: &mut Outbox<'_>);

    /// `ws` is gone; nothing more can be written to it. `boot` is the run of
    /// the gateway that held it (the socket may not be open on this worker:
    /// it closed while it had no worker).
    fn on_close(&mut self, ws: WsId, boot: u64, out: &mut Outbox<'_>);

    /// `ws` is no longer served by this worker but still open at its
    /// gateway (its stream ended); another worker may take it over.
    fn on_detach(&mut self, ws: WsId);

    /// Online-list broadcasts wait while `held` (a gateway is re-attaching
    /// its sockets after a restart), so the list does not flap.
    fn hold_lists(&mut self, held: bool);

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

/// Frames for one socket, sent in order as one command.
#[derive(Debug, Default, Clone)]
pub struct Frames {
    pub texts: Vec<Bytes>,
    /// The message id each text carries (0: none); see the proto's `Deliver`.
    pub ids: Vec<u64>,
    /// Set when the texts start the socket over on this log (a Status frame).
    pub log: String,
    /// With `log`: the socket's place in the log as it starts (see the
    /// proto's `Deliver.place`).
    pub place: u64,
    /// An answer to a fetch, and whether it reaches the newest message.
    pub fetched: bool,
    pub complete: bool,
    /// The version of the last text, when it is the latest state of
    /// something (the online list); see the proto's `Deliver.version`.
    pub version: u64,
    /// Not all the socket is owed could be read from the log: it fetches
    /// the rest (see the proto's `Deliver.behind`).
    pub behind: bool,
}

impl Frames {
    pub fn push(&mut self, text: impl Into<Bytes>, id: u64) {
        self.texts.push(text.into());
        self.ids.push(id);
    }
}

/// Writes to sockets by WebSocket ID. Writing never waits (see [`Router`]),
/// so one slow gateway or socket cannot stall the application.
pub struct Outbox<'a> {
    router: &'a mut Router,
}

impl<'a> Outbox<'a> {
    pub(crate) fn new(router: &'a mut Router) -> Self {
        Outbox { router }
    }

    /// Writes one text frame (UTF-8) to one socket.
    pub fn write(&mut self, ws: WsId, text: impl Into<Bytes>) {
        let mut frames = Frames::default();
        frames.push(text, 0);
        self.router.write_frames(ws, frames);
    }

    /// Writes several frames to one socket, in order, as one command on its
    /// stream (an opening socket's Status, history and list).
    pub fn write_frames(&mut self, ws: WsId, frames: Frames) {
        self.router.write_frames(ws, frames);
    }

    /// Writes one text frame to several sockets; each stream carries it once.
    pub fn write_many(&mut self, ids: &[WsId], text: impl Into<Bytes>) {
        self.router.write(ids, text.into());
    }

    /// Writes one text frame to every open socket on this worker; `id` is
    /// the message id it carries (0: none).
    pub fn broadcast(&mut self, text: impl Into<Bytes>, id: u64) {
        self.router.broadcast(text.into(), id, 0);
    }

    /// Writes the newest state of something every socket needs only the
    /// latest of (the online list), tagged with its `version` so that a
    /// socket re-attached later is sent it again only if it missed it.
    pub fn broadcast_state(&mut self, text: impl Into<Bytes>, version: u64) {
        self.router.broadcast(text.into(), 0, version);
    }

    /// Closes a socket with a WebSocket close code.
    pub fn disconnect(&mut self, ws: WsId, code: u16, reason: &str) {
        self.router.disconnect(ws, code, reason);
    }

    /// Acknowledges a frame handled later (see [`Handled::Later`]).
    pub fn ack(&mut self, ws: WsId, seq: u64) {
        self.router.ack(ws, seq);
    }

    /// Parks state with the socket's gateway, handed back on re-attach.
    pub fn park(&mut self, ws: WsId, state: Bytes) {
        self.router.park(ws, state);
    }

    /// Whether `ws` is open on this worker.
    pub fn is_open(&self, ws: WsId) -> bool {
        self.router.stream_of(ws).is_some()
    }

    /// How many sockets are open on this worker.
    pub fn open_sockets(&self) -> usize {
        self.router.socket_count()
    }

    /// How many link streams are up (in private mode, one per socket).
    pub fn open_streams(&self) -> usize {
        self.router.stream_count()
    }

    /// Frame bytes written and not yet taken by the gateways' streams: how
    /// far behind the gateways are. Costs a pass over the streams.
    pub fn queued_bytes(&self) -> usize {
        self.router.queued_bytes()
    }
}

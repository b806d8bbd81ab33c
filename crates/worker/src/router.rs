//! Which socket lives on which link stream, and the queues to those streams.
//!
//! Owned by the runtime task alone, so it needs no lock. A write groups its
//! WebSocket IDs by stream and sends one `Deliver` per stream: a broadcast to
//! a thousand sockets behind one shared stream is one protobuf message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use sharedconn_proto::{
    Ack, Deliver, Disconnect, Draining, Park, Welcome, WorkerCommand, worker_command::Command,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::warn;

use crate::app::{Frames, WsId};

/// Most WebSocket IDs queued towards one stream (8 bytes each: 32 MiB).
/// About 400 broadcasts to 10,000 sockets behind one gateway, or seconds of
/// a busy chat; a gateway that far behind is cut, and re-attaches its
/// sockets (they stay open and replay what they missed).
pub const MAX_QUEUED_IDS: usize = 4 << 20;

/// A stream holding more IDs than this is congested: the runtime takes no
/// new socket events or posts until it drains (see `Runtime::run`), so a
/// gateway that cannot keep up slows the chat down instead of being cut.
/// Well under [`MAX_QUEUED_IDS`], so what is already committed still fits.
pub const CONGESTED_IDS: usize = MAX_QUEUED_IDS / 8;

/// Bytes of frames queued towards one private stream (one socket) before it
/// is cut: the worst-case memory a slow socket costs the worker. Its gateway
/// re-attaches it, and it replays from the log.
pub const MAX_QUEUED_BYTES_PRIVATE: usize = 1 << 20;
/// The same for a shared stream, which carries a whole gateway.
pub const MAX_QUEUED_BYTES_SHARED: usize = 256 << 20;

/// What is queued towards one stream and not yet taken by its response:
/// counted by the router as it queues, by the response as it sends.
#[derive(Debug)]
pub struct Backlog {
    pub ids: AtomicUsize,
    pub bytes: AtomicUsize,
    pub max_bytes: usize,
}

impl Backlog {
    pub fn new(max_bytes: usize) -> Self {
        Backlog {
            ids: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_bytes,
        }
    }

    /// Takes a sent command off the count.
    pub fn sent(&self, command: &Command) {
        self.ids
            .fetch_sub(command_weight(command), Ordering::Relaxed);
        self.bytes
            .fetch_sub(command_bytes(command), Ordering::Relaxed);
    }
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog::new(MAX_QUEUED_BYTES_SHARED)
    }
}

/// Identifies one link stream for the life of the worker process.
pub type StreamId = u64;

/// What the runtime pushes into a stream's response. Plain commands, not
/// `Result`s: a `Status` would make every queue slot several times bigger.
pub type StreamTx = mpsc::Sender<WorkerCommand>;

/// Who is at the other end of a stream.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub tag: u32,
    pub boot: u64,
}

struct Stream {
    tx: StreamTx,
    peer: Peer,
    /// What is queued for this stream and not yet taken by its response
    /// (see [`MAX_QUEUED_IDS`], [`Backlog::max_bytes`]).
    backlog: Arc<Backlog>,
    /// Tells the response to end with this status at once, ahead of
    /// whatever is queued.
    cut_tx: Option<oneshot::Sender<Status>>,
    /// Open sockets on this stream, in no particular order (`swap_remove`).
    members: Vec<WsId>,
    /// Set when the queue overflowed and the stream was cut; the stream's
    /// sockets are released when its reader reports it down.
    cut: bool,
    /// Acknowledgements gathered during one runtime turn, sent as one command.
    acks: Ack,
}

/// One run of a gateway (one boot id) with streams here.
struct Gateway {
    tag: u32,
    streams: usize,
    sockets: usize,
}

/// WebSocket ID → stream, plus every stream's members.
#[derive(Default)]
pub struct Router {
    streams: HashMap<StreamId, Stream>,
    /// For each open socket: its stream and its index in that stream's members.
    sockets: HashMap<WsId, (StreamId, usize)>,
    /// The gateways with a stream up, by boot id: counted as streams come
    /// and go, since private mode has one stream per socket and a scan of
    /// them all on every stream change would cost O(sockets) each.
    gateways: HashMap<u64, Gateway>,
    /// Streams with acknowledgements waiting for [`Router::flush_acks`].
    acking: Vec<StreamId>,
    /// Set when a push left some stream over [`CONGESTED_IDS`]; only then
    /// does [`Router::congested`] look at every stream (there is one per
    /// socket in private mode, and it is asked once per runtime turn).
    maybe_congested: bool,
}

impl Router {
    pub fn add_stream(
        &mut self,
        id: StreamId,
        peer: Peer,
        tx: StreamTx,
        backlog: Arc<Backlog>,
        cut_tx: oneshot::Sender<Status>,
    ) {
        self.gateways
            .entry(peer.boot)
            .or_insert(Gateway {
                tag: peer.tag,
                streams: 0,
                sockets: 0,
            })
            .streams += 1;
        self.streams.insert(
            id,
            Stream {
                tx,
                peer,
                backlog,
                cut_tx: Some(cut_tx),
                members: Vec::new(),
                cut: false,
                acks: Ack::default(),
            },
        );
    }

    /// Forgets a stream and returns the sockets that were open on it.
    pub fn remove_stream(&mut self, id: StreamId) -> Vec<WsId> {
        let Some(stream) = self.streams.remove(&id) else {
            return Vec::new();
        };
        for ws in &stream.members {
            self.sockets.remove(ws);
        }
        let boot = stream.peer.boot;
        if let Some(gateway) = self.gateways.get_mut(&boot) {
            gateway.streams -= 1;
            gateway.sockets -= stream.members.len();
            if gateway.streams == 0 {
                self.gateways.remove(&boot);
            }
        }
        stream.members
    }

    /// Who is at the other end of `stream`.
    pub fn peer(&self, stream: StreamId) -> Option<Peer> {
        self.streams.get(&stream).map(|s| s.peer)
    }

    /// Whether another stream from the same run of a gateway is up.
    pub fn boot_linked(&self, boot: u64) -> bool {
        self.gateways.contains_key(&boot)
    }

    /// Whether another run of a gateway with this tag has a stream up: a
    /// tag names the WebSocket IDs a gateway issues, so two live holders
    /// would open each other's sockets.
    pub fn tag_held_by_another(&self, tag: u32, boot: u64) -> bool {
        self.gateways
            .iter()
            .any(|(b, g)| g.tag == tag && *b != boot)
    }

    /// Sockets open here from one run of a gateway.
    pub fn gateway_sockets(&self, boot: u64) -> usize {
        self.gateways.get(&boot).map_or(0, |g| g.sockets)
    }

    /// Registers an open socket. A socket open on another stream of the same
    /// gateway run moves here (the gateway re-attached it before this worker
    /// saw the old stream end). Returns false when the stream is unknown (it
    /// went down while the open was queued) or another gateway holds the ID.
    pub fn add_socket(&mut self, ws: WsId, stream: StreamId) -> bool {
        let Some(boot) = self.streams.get(&stream).map(|s| s.peer.boot) else {
            return false;
        };
        if let Some(&(old, _)) = self.sockets.get(&ws) {
            let same_gateway = self.streams.get(&old).is_some_and(|s| s.peer.boot == boot);
            if !same_gateway {
                return false;
            }
            self.remove_socket(ws);
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            return false;
        };
        self.sockets.insert(ws, (stream, s.members.len()));
        s.members.push(ws);
        if let Some(gateway) = self.gateways.get_mut(&boot) {
            gateway.sockets += 1;
        }
        true
    }

    /// Unregisters a socket; false when it was not open.
    pub fn remove_socket(&mut self, ws: WsId) -> bool {
        let Some((stream, index)) = self.sockets.remove(&ws) else {
            return false;
        };
        if let Some(s) = self.streams.get_mut(&stream) {
            s.members.swap_remove(index);
            if let Some(&moved) = s.members.get(index) {
                self.sockets.insert(moved, (stream, index));
            }
            if let Some(gateway) = self.gateways.get_mut(&s.peer.boot) {
                gateway.sockets -= 1;
            }
        }
        true
    }

    /// The stream `ws` is open on.
    pub fn stream_of(&self, ws: WsId) -> Option<StreamId> {
        self.sockets.get(&ws).map(|&(stream, _)| stream)
    }

    /// Whether some stream is too far behind to take more (see
    /// [`CONGESTED_IDS`]).
    pub fn congested(&mut self) -> bool {
        if !self.maybe_congested {
            return false;
        }
        self.maybe_congested = self
            .streams
            .values()
            .any(|s| !s.cut && s.backlog.ids.load(Ordering::Relaxed) > CONGESTED_IDS);
        self.maybe_congested
    }

    /// Frame bytes queued towards every stream and not yet taken by their
    /// responses (one pass over the streams: ask it seldom).
    pub fn queued_bytes(&self) -> usize {
        self.streams
            .values()
            .map(|s| s.backlog.bytes.load(Ordering::Relaxed))
            .sum()
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Writes `frames`, in order, to one socket, as one command.
    pub fn write_frames(&mut self, ws: WsId, frames: Frames) {
        if let Some(&(stream, _)) = self.sockets.get(&ws) {
            crate::metrics::deliver(1);
            self.push(
                stream,
                Command::Deliver(Deliver {
                    ws_ids: vec![ws],
                    texts: frames.texts,
                    ids: frames.ids,
                    log: frames.log,
                    fetched: frames.fetched,
                    complete: frames.complete,
                    version: frames.version,
                    place: frames.place,
                    behind: frames.behind,
                }),
            );
        }
    }

    pub fn write(&mut self, ids: &[WsId], text: Bytes) {
        if let [ws] = ids {
            // The common single-recipient case needs no grouping.
            let mut frames = Frames::default();
            frames.push(text, 0);
            self.write_frames(*ws, frames);
            return;
        }
        let mut by_stream: HashMap<StreamId, Vec<WsId>> = HashMap::new();
        for ws in ids {
            if let Some(&(stream, _)) = self.sockets.get(ws) {
                by_stream.entry(stream).or_default().push(*ws);
            }
        }
        for (stream, ids) in by_stream {
            self.send(stream, ids, text.clone(), 0, 0);
        }
    }

    /// Writes to every open socket; `id` is the message id `text` carries,
    /// `version` its state version (see the proto's `Deliver.version`).
    pub fn broadcast(&mut self, text: Bytes, id: u64, version: u64) {
        let targets: Vec<(StreamId, Vec<WsId>)> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.cut && !s.members.is_empty())
            .map(|(id, s)| (*id, s.members.clone()))
            .collect();
        for (stream, ids) in targets {
            self.send(stream, ids, text.clone(), id, version);
        }
    }

    pub fn disconnect(&mut self, ws: WsId, code: u16, reason: &str) {
        if let Some(&(stream, _)) = self.sockets.get(&ws) {
            self.disconnect_on(stream, ws, code, reason);
        }
    }

    /// Closes `ws` through `stream`, whether or not it is open there: the
    /// answer to an open the worker refuses.
    pub fn disconnect_on(&mut self, stream: StreamId, ws: WsId, code: u16, reason: &str) {
        let command = Command::Disconnect(Disconnect {
            ws_id: ws,
            code: code.into(),
            reason: reason.to_owned(),
        });
        self.push(stream, command);
    }

    /// Acknowledges frame `seq` of `ws` (sent with the turn's other acks).
    pub fn ack(&mut self, ws: WsId, seq: u64) {
        if let Some(&(stream, _)) = self.sockets.get(&ws) {
            self.ack_on(stream, ws, seq);
        }
    }

    /// Acknowledges on `stream` whether or not `ws` is open there (a frame
    /// the worker ignored).
    pub fn ack_on(&mut self, stream: StreamId, ws: WsId, seq: u64) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.acks.ws_ids.is_empty() {
                self.acking.push(stream);
            }
            s.acks.ws_ids.push(ws);
            s.acks.seqs.push(seq);
        }
    }

    /// Sends the acknowledgements gathered since the last call.
    pub fn flush_acks(&mut self) {
        for stream in std::mem::take(&mut self.acking) {
            let Some(s) = self.streams.get_mut(&stream) else {
                continue;
            };
            let acks = std::mem::take(&mut s.acks);
            if !acks.ws_ids.is_empty() {
                self.push(stream, Command::Ack(acks));
            }
        }
    }

    pub fn park(&mut self, ws: WsId, state: Bytes) {
        if let Some(&(stream, _)) = self.sockets.get(&ws) {
            self.push(stream, Command::Park(Park { ws_id: ws, state }));
        }
    }

    pub fn welcome(&mut self, stream: StreamId, log: &str) {
        let log = log.to_owned();
        self.push(stream, Command::Welcome(Welcome { log }));
    }

    /// Tells every gateway to move its sockets elsewhere.
    pub fn drain(&mut self) {
        let streams: Vec<StreamId> = self.streams.keys().copied().collect();
        for stream in streams {
            self.push(stream, Command::Draining(Draining {}));
        }
    }

    fn send(&mut self, stream: StreamId, ws_ids: Vec<WsId>, text: Bytes, id: u64, version: u64) {
        crate::metrics::deliver(ws_ids.len());
        let deliver = Deliver {
            ws_ids,
            texts: vec![text],
            ids: vec![id],
            version,
            ..Deliver::default()
        };
        self.push(stream, Command::Deliver(deliver));
    }

    /// Never waits. A full queue means the gateway (shared mode) or the socket
    /// (private mode) is not keeping up; waiting would stall every other
    /// socket, and dropping one message would break the total order, so the
    /// stream is cut instead: it ends with `RESOURCE_EXHAUSTED`, and its
    /// gateway re-attaches the affected sockets, which replay what they
    /// missed from the log. No socket closes.
    fn push(&mut self, stream: StreamId, command: Command) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.cut {
            return;
        }
        let ids = command_weight(&command);
        let bytes = command_bytes(&command);
        // The queue's length bounds commands; these bound what they hold: a
        // broadcast to 10,000 sockets carries 10,000 IDs, a history replay
        // hundreds of kilobytes. Counted before the send, so the response
        // (which counts off what it takes) never sees the counters dip
        // below zero; taken back if the command is not queued.
        let queued = s.backlog.ids.fetch_add(ids, Ordering::Relaxed) + ids;
        let queued_bytes = s.backlog.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let over_budget = queued > MAX_QUEUED_IDS || queued_bytes > s.backlog.max_bytes;
        let message = WorkerCommand {
            command: Some(command),
        };
        let sent = if over_budget {
            Err(mpsc::error::TrySendError::Full(message))
        } else {
            s.tx.try_send(message)
        };
        if sent.is_err() {
            s.backlog.ids.fetch_sub(ids, Ordering::Relaxed);
            s.backlog.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => self.maybe_congested |= queued > CONGESTED_IDS,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    stream,
                    sockets = s.members.len(),
                    "stream queue full, cutting the stream"
                );
                s.cut = true;
                crate::metrics::stream_cut();
                if let Some(cut) = s.cut_tx.take() {
                    let _ = cut.send(Status::resource_exhausted(
                        "stream queue full: the peer is not keeping up",
                    ));
                }
            }
            // The response went away; the stream reader reports it down soon.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// The frame bytes a command carries (shared between the sockets it names,
/// so counted once).
pub fn command_bytes(command: &Command) -> usize {
    match command {
        Command::Deliver(d) => d.texts.iter().map(|t| t.len()).sum(),
        _ => 0,
    }
}

/// What a command counts against a stream's budget: the IDs it carries.
pub fn command_weight(command: &Command) -> usize {
    match command {
        Command::Deliver(d) => d.ws_ids.len(),
        Command::Ack(a) => a.ws_ids.len(),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Peer = Peer { tag: 1, boot: 9 };

    #[test]
    fn a_stream_over_its_id_budget_is_cut() {
        let mut router = Router::default();
        let (tx, mut rx) = mpsc::channel(16);
        let (cut_tx, mut cut_rx) = oneshot::channel();
        let backlog = Arc::new(Backlog::default());
        router.add_stream(1, PEER, tx, backlog.clone(), cut_tx);
        assert!(router.add_socket(7, 1));
        assert!(router.add_socket(8, 1));
        router.broadcast(Bytes::from_static(b"hi"), 0, 0);
        assert_eq!(backlog.ids.load(Ordering::Relaxed), 2);
        assert!(rx.try_recv().is_ok());
        assert!(cut_rx.try_recv().is_err(), "not cut yet");
        // The response fell this far behind: the next broadcast cuts it.
        backlog.ids.store(MAX_QUEUED_IDS - 1, Ordering::Relaxed);
        router.broadcast(Bytes::from_static(b"again"), 0, 0);
        assert!(cut_rx.try_recv().is_ok(), "cut");
        assert!(rx.try_recv().is_err(), "nothing queued past the budget");
    }

    #[test]
    fn a_private_stream_over_its_byte_budget_is_cut() {
        let mut router = Router::default();
        let (tx, _rx) = mpsc::channel(1024);
        let (cut_tx, mut cut_rx) = oneshot::channel();
        let backlog = Arc::new(Backlog::new(MAX_QUEUED_BYTES_PRIVATE));
        router.add_stream(1, PEER, tx, backlog.clone(), cut_tx);
        assert!(router.add_socket(7, 1));
        let big = Bytes::from(vec![b'x'; 300 * 1024]);
        for _ in 0..3 {
            router.broadcast(big.clone(), 0, 0);
        }
        assert!(cut_rx.try_recv().is_err(), "900 KiB fits");
        router.broadcast(big, 0, 0);
        assert!(cut_rx.try_recv().is_ok(), "1.2 MiB does not");
        assert!(backlog.bytes.load(Ordering::Relaxed) <= MAX_QUEUED_BYTES_PRIVATE);
    }

    #[test]
    fn a_socket_moves_between_streams_of_one_gateway_only() {
        let mut router = Router::default();
        let stream = |router: &mut Router, id, peer| {
            let (tx, rx) = mpsc::channel(16);
            router.add_stream(id, peer, tx, Default::default(), oneshot::channel().0);
            rx
        };
        let _a = stream(&mut router, 1, PEER);
        let _b = stream(&mut router, 2, PEER);
        let _c = stream(&mut router, 3, Peer { tag: 1, boot: 10 });
        assert!(router.add_socket(7, 1));
        assert!(router.add_socket(7, 2), "re-attached by the same gateway");
        assert_eq!(router.stream_of(7), Some(2));
        assert!(!router.add_socket(7, 3), "another gateway run");
        assert_eq!(router.remove_stream(1), Vec::<WsId>::new());
        assert_eq!(router.remove_stream(2), vec![7]);
    }
}

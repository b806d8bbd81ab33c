//! Which socket lives on which link stream, and the queues to those streams.
//!
//! Owned by the runtime task alone, so it needs no lock. A write groups its
//! WebSocket IDs by stream and sends one `Deliver` per stream: a broadcast to
//! a thousand sockets behind one shared stream is one protobuf message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use sharedconn_proto::{Deliver, Disconnect, WorkerCommand, worker_command::Command};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::app::WsId;

/// Most WebSocket IDs queued towards one stream (8 bytes each: 32 MiB).
/// About 400 broadcasts to 10,000 sockets behind one gateway, or seconds of
/// a busy chat; a gateway that far behind is cut.
pub const MAX_QUEUED_IDS: usize = 4 << 20;

/// Identifies one link stream for the life of the worker process.
pub type StreamId = u64;

/// What the runtime pushes into a stream's response. Plain commands, not
/// `Result`s: a `Status` would make every queue slot several times bigger.
pub type StreamTx = mpsc::Sender<WorkerCommand>;

struct Stream {
    tx: StreamTx,
    /// WebSocket IDs in commands queued for this stream and not yet taken
    /// by its response (see [`MAX_QUEUED_IDS`]).
    backlog: Arc<AtomicUsize>,
    /// Tells the response to end with `RESOURCE_EXHAUSTED` at once, ahead
    /// of whatever is queued.
    cut_tx: Option<oneshot::Sender<()>>,
    /// Open sockets on this stream, in no particular order (`swap_remove`).
    members: Vec<WsId>,
    /// Set when the queue overflowed and the stream was cut; the stream's
    /// sockets are released when its reader reports it down.
    cut: bool,
}

/// WebSocket ID → stream, plus every stream's members.
#[derive(Default)]
pub struct Router {
    streams: HashMap<StreamId, Stream>,
    /// For each open socket: its stream and its index in that stream's members.
    sockets: HashMap<WsId, (StreamId, usize)>,
}

impl Router {
    pub fn add_stream(
        &mut self,
        id: StreamId,
        tx: StreamTx,
        backlog: Arc<AtomicUsize>,
        cut_tx: oneshot::Sender<()>,
    ) {
        self.streams.insert(
            id,
            Stream {
                tx,
                backlog,
                cut_tx: Some(cut_tx),
                members: Vec::new(),
                cut: false,
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
        stream.members
    }

    /// Registers an open socket. Returns false when the stream is unknown (it
    /// went down while the open was queued) or the ID is already taken.
    pub fn add_socket(&mut self, ws: WsId, stream: StreamId) -> bool {
        if self.sockets.contains_key(&ws) {
            return false;
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            return false;
        };
        self.sockets.insert(ws, (stream, s.members.len()));
        s.members.push(ws);
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
        }
        true
    }

    /// The stream `ws` is open on.
    pub fn stream_of(&self, ws: WsId) -> Option<StreamId> {
        self.sockets.get(&ws).map(|&(stream, _)| stream)
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn socket_count(&self) -> usize {
        self.sockets.len()
    }

    /// Writes `texts`, in order, to one socket, as one command.
    pub fn write_frames(&mut self, ws: WsId, texts: Vec<Bytes>) {
        if let Some(&(stream, _)) = self.sockets.get(&ws) {
            self.push(
                stream,
                Command::Deliver(Deliver {
                    ws_ids: vec![ws],
                    texts,
                }),
            );
        }
    }

    pub fn write(&mut self, ids: &[WsId], text: Bytes) {
        if let [ws] = ids {
            // The common single-recipient case needs no grouping.
            self.write_frames(*ws, vec![text]);
            return;
        }
        let mut by_stream: HashMap<StreamId, Vec<WsId>> = HashMap::new();
        for ws in ids {
            if let Some(&(stream, _)) = self.sockets.get(ws) {
                by_stream.entry(stream).or_default().push(*ws);
            }
        }
        for (stream, ids) in by_stream {
            self.send(stream, ids, text.clone());
        }
    }

    pub fn broadcast(&mut self, text: Bytes) {
        let targets: Vec<(StreamId, Vec<WsId>)> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.cut && !s.members.is_empty())
            .map(|(id, s)| (*id, s.members.clone()))
            .collect();
        for (stream, ids) in targets {
            self.send(stream, ids, text.clone());
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

    fn send(&mut self, stream: StreamId, ws_ids: Vec<WsId>, text: Bytes) {
        let texts = vec![text];
        self.push(stream, Command::Deliver(Deliver { ws_ids, texts }));
    }

    /// Never waits. A full queue means the gateway (shared mode) or the socket
    /// (private mode) is not keeping up; waiting would stall every other
    /// socket, and dropping one message would break the total order, so the
    /// stream is cut instead: it ends with `RESOURCE_EXHAUSTED`, its gateway
    /// closes the affected sockets (1008 in private mode, 1012 in shared),
    /// and their clients reconnect and replay from the log.
    fn push(&mut self, stream: StreamId, command: Command) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.cut {
            return;
        }
        let ids = match &command {
            Command::Deliver(d) => d.ws_ids.len(),
            Command::Disconnect(_) => 1,
        };
        // The queue's length bounds commands; this bounds what they hold: a
        // broadcast to 10,000 sockets carries 10,000 IDs.
        let over_budget = s.backlog.load(Ordering::Relaxed) + ids > MAX_QUEUED_IDS;
        let message = WorkerCommand {
            command: Some(command),
        };
        let sent = if over_budget {
            Err(mpsc::error::TrySendError::Full(message))
        } else {
            s.tx.try_send(message)
        };
        match sent {
            Ok(()) => {
                s.backlog.fetch_add(ids, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    stream,
                    sockets = s.members.len(),
                    "stream queue full, cutting the stream"
                );
                s.cut = true;
                if let Some(cut) = s.cut_tx.take() {
                    let _ = cut.send(());
                }
            }
            // The response went away; the stream reader reports it down soon.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_over_its_id_budget_is_cut() {
        let mut router = Router::default();
        let (tx, mut rx) = mpsc::channel(16);
        let (cut_tx, mut cut_rx) = oneshot::channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        router.add_stream(1, tx, backlog.clone(), cut_tx);
        assert!(router.add_socket(7, 1));
        assert!(router.add_socket(8, 1));
        router.broadcast(Bytes::from_static(b"hi"));
        assert_eq!(backlog.load(Ordering::Relaxed), 2);
        assert!(rx.try_recv().is_ok());
        assert!(cut_rx.try_recv().is_err(), "not cut yet");
        // The response fell this far behind: the next broadcast cuts it.
        backlog.store(MAX_QUEUED_IDS - 1, Ordering::Relaxed);
        router.broadcast(Bytes::from_static(b"again"));
        assert!(cut_rx.try_recv().is_ok(), "cut");
        assert!(rx.try_recv().is_err(), "nothing queued past the budget");
    }
}

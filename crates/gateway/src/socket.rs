//! One browser socket as the gateway keeps it, whichever worker serves it.
//!
//! The gateway, not the worker, is the keeper of what it takes to serve a
//! socket: its outbound [`SocketQueue`] (which knows the last message id the
//! socket received), the state the worker parked with it (the alias), and
//! the frames the client sent that no worker has acknowledged yet. So when a
//! worker dies the socket is re-attached to another with nothing lost: the
//! new worker replays from the last id, and the unacknowledged frames are
//! sent again with the same sequence numbers (a post's idempotency key is
//! built from them, so it is stored once).

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sharedconn_proto::GatewayEvent;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::queue::{Limits, Place, SocketQueue};

/// Frames a client may have in flight, sent but not acknowledged. Posts are
/// acknowledged once stored (a millisecond or so), so this only fills while
/// the socket has no worker or the log is slow; then the session stops
/// reading that client, pushing back on it alone.
pub const MAX_UNACKED: usize = 32;

/// A stream to a worker, as a socket is attached to it.
#[derive(Clone, Debug)]
pub struct StreamHandle {
    /// Unique for the life of the gateway.
    pub id: u64,
    pub events: mpsc::Sender<GatewayEvent>,
    /// Sockets attached to the stream's worker (for spreading new ones):
    /// one more per attach, one less per close or loss.
    pub load: Arc<AtomicUsize>,
    /// Cancelled once the stream is over: its link or its pump saw it end,
    /// or an attach on it failed. Always before its sockets are detached,
    /// and a socket is never attached to a cancelled stream. A private
    /// stream's pump stops at it.
    pub ended: CancellationToken,
}

#[derive(Clone, Debug)]
pub enum Route {
    /// Frames go to this stream.
    Attached(StreamHandle),
    /// Being (re-)attached: frames wait in `unacked` and are sent by the
    /// attaching task, in order, before the socket is `Attached`.
    Moving,
    /// No worker serves the socket since this instant.
    Detached(Instant),
}

pub struct Socket {
    pub ws_id: u64,
    /// When the socket opened: its place in the online list.
    pub opened_ms: u64,
    pub queue: SocketQueue,
    up: Mutex<Up>,
    /// Signalled when an acknowledgement makes room in `unacked`.
    room: Notify,
}

struct Up {
    next_seq: u64,
    unacked: VecDeque<(u64, Bytes)>,
    parked: Bytes,
    route: Route,
    closed: bool,
}

/// How an attach ended (see [`Socket::finish_move`]).
pub enum Finish {
    Attached,
    /// These frames came in meanwhile: send them first.
    Newer(Vec<(u64, Bytes)>),
    /// The stream is gone.
    Ended,
}

/// What a worker needs to take a socket over.
pub struct Resume {
    pub place: Place,
    pub parked: Bytes,
    pub unacked: Vec<(u64, Bytes)>,
}

impl Socket {
    pub fn new(ws_id: u64, opened_ms: u64, limits: Limits) -> Self {
        Socket {
            ws_id,
            opened_ms,
            queue: SocketQueue::new(limits),
            up: Mutex::new(Up {
                next_seq: 1,
                unacked: VecDeque::new(),
                parked: Bytes::new(),
                route: Route::Moving,
                closed: false,
            }),
            room: Notify::new(),
        }
    }

    fn up(&self) -> std::sync::MutexGuard<'_, Up> {
        self.up.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers a client frame and keeps it until acknowledged. Returns the
    /// frame's sequence number and, when the socket is attached, the stream
    /// to send it on now; otherwise it goes with the next attach. Waits
    /// while [`MAX_UNACKED`] frames are in flight.
    pub async fn hold_frame(&self, text: Bytes) -> (u64, Option<StreamHandle>) {
        loop {
            let room = self.room.notified();
            {
                let mut up = self.up();
                if up.unacked.len() < MAX_UNACKED || up.closed {
                    let seq = up.next_seq;
                    up.next_seq += 1;
                    up.unacked.push_back((seq, text));
                    let stream = match &up.route {
                        Route::Attached(s) => Some(s.clone()),
                        _ => None,
                    };
                    return (seq, stream);
                }
            }
            room.await;
        }
    }

    /// The worker handled frame `seq`.
    pub fn ack(&self, seq: u64) {
        let mut up = self.up();
        if let Some(i) = up.unacked.iter().position(|(s, _)| *s == seq) {
            up.unacked.remove(i);
            drop(up);
            self.room.notify_one();
        }
    }

    pub fn park(&self, state: Bytes) {
        self.up().parked = state;
    }

    pub fn route(&self) -> Route {
        self.up().route.clone()
    }

    pub fn is_closed(&self) -> bool {
        self.up().closed
    }

    /// The stream `stream_id` is gone: if it served this socket, the socket
    /// is detached now. Returns whether it was.
    pub fn detach_from(&self, stream_id: u64) -> bool {
        let mut up = self.up();
        match &up.route {
            Route::Attached(s) if s.id == stream_id && !up.closed => {
                up.route = Route::Detached(Instant::now());
                true
            }
            _ => false,
        }
    }

    /// An attach failed: the socket waits for a worker again.
    pub fn set_detached(&self) {
        let mut up = self.up();
        if !matches!(up.route, Route::Detached(_)) {
            up.route = Route::Detached(Instant::now());
        }
    }

    /// Starts moving a detached socket to a worker.
    pub fn begin_move(&self) -> Option<Resume> {
        let mut up = self.up();
        if up.closed || !matches!(up.route, Route::Detached(_)) {
            return None;
        }
        up.route = Route::Moving;
        Some(Resume {
            place: self.queue.place(),
            parked: up.parked.clone(),
            unacked: up.unacked.iter().cloned().collect(),
        })
    }

    /// Finishes an attach whose frames up to `sent` went out: attached when
    /// nothing newer waits and the stream is still up.
    pub fn finish_move(&self, stream: &StreamHandle, sent: u64) -> Finish {
        let mut up = self.up();
        // The stream ended while the socket was being attached to it: its
        // end found the socket still moving and could not detach it.
        if stream.ended.is_cancelled() {
            return Finish::Ended;
        }
        let newer: Vec<_> = up
            .unacked
            .iter()
            .filter(|(seq, _)| *seq > sent)
            .cloned()
            .collect();
        if newer.is_empty() {
            up.route = Route::Attached(stream.clone());
            Finish::Attached
        } else {
            Finish::Newer(newer)
        }
    }

    /// Marks the socket closed; returns the stream that served it, if any.
    pub fn close(&self) -> Option<StreamHandle> {
        let mut up = self.up();
        up.closed = true;
        let route = std::mem::replace(&mut up.route, Route::Moving);
        drop(up);
        self.room.notify_one();
        match route {
            Route::Attached(s) => Some(s),
            _ => None,
        }
    }
}

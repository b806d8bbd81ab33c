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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// an attach on it failed, or the last socket leaving it (its worker
    /// drains) is attached elsewhere. Always before its sockets are
    /// detached, and a socket is never attached to a cancelled stream. A
    /// private stream's pump and a draining shared link stop at it.
    pub ended: CancellationToken,
    /// Sockets still served by this stream while they move to another
    /// worker (see [`Route::Leaving`]).
    pub leaving: Arc<AtomicUsize>,
}

impl StreamHandle {
    pub fn new(id: u64, events: mpsc::Sender<GatewayEvent>, load: Arc<AtomicUsize>) -> Self {
        StreamHandle {
            id,
            events,
            load,
            ended: CancellationToken::new(),
            leaving: Arc::default(),
        }
    }

    /// One socket that was leaving this stream is attached elsewhere, or
    /// closed: the last one ends the stream.
    pub fn left(&self) {
        if self.leaving.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ended.cancel();
        }
    }
}

#[derive(Clone, Debug)]
pub enum Route {
    /// Frames go to this stream.
    Attached(StreamHandle),
    /// Its worker drains: frames still go to `from`, and its messages still
    /// come from it, until the mover has attached the socket to another
    /// worker (make before break: a drain pauses nothing). The new worker
    /// is sent every unacknowledged frame, some of which the old one may
    /// also handle: a post's idempotency key stores it once.
    Leaving { from: StreamHandle, moving: bool },
    /// Being (re-)attached: frames wait in `unacked` and are sent by the
    /// attaching task, in order, before the socket is `Attached`. A socket
    /// being re-attached keeps when it lost its worker, so that a failed
    /// move does not start its wait for a worker again.
    Moving { lost_at: Option<Instant> },
    /// No worker serves the socket since this instant (when it lost its
    /// worker: a failed re-attach does not start the wait again).
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
                route: Route::Moving { lost_at: None },
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
                        Route::Attached(s) | Route::Leaving { from: s, .. } => Some(s.clone()),
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

    /// Whether a worker serves the socket now (not moving or detached).
    pub fn is_served(&self) -> bool {
        matches!(self.up().route, Route::Attached(_) | Route::Leaving { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.up().closed
    }

    /// The stream `stream_id` is gone: if it served this socket, the socket
    /// is detached now. Returns whether it was, and so must wait for the
    /// mover (a socket that was leaving the stream is the mover's already).
    pub fn detach_from(&self, stream_id: u64) -> bool {
        let mut up = self.up();
        match &up.route {
            Route::Attached(s) if s.id == stream_id && !up.closed => {
                up.route = Route::Detached(Instant::now());
                true
            }
            Route::Leaving { from, .. } if from.id == stream_id => {
                from.left();
                up.route = Route::Detached(Instant::now());
                false
            }
            _ => false,
        }
    }

    /// The worker behind `stream` drains: if the socket is attached to it,
    /// it stays there, served, until the mover attaches it elsewhere.
    /// Returns whether it was attached to it (it must then be moved).
    pub fn leave(&self, stream: &StreamHandle) -> bool {
        let mut up = self.up();
        match &up.route {
            Route::Attached(s) if s.id == stream.id && !up.closed => {
                stream.leaving.fetch_add(1, Ordering::AcqRel);
                up.route = Route::Leaving {
                    from: stream.clone(),
                    moving: false,
                };
                true
            }
            _ => false,
        }
    }

    /// An attach failed: the socket waits for a worker again (a leaving
    /// one still served by the stream it leaves).
    pub fn set_detached(&self) {
        let mut up = self.up();
        match &mut up.route {
            Route::Leaving { moving, .. } => *moving = false,
            Route::Moving { lost_at } => {
                up.route = Route::Detached(lost_at.unwrap_or_else(Instant::now));
            }
            Route::Attached(_) => up.route = Route::Detached(Instant::now()),
            Route::Detached(_) => {}
        }
    }

    /// Starts moving a detached (or leaving) socket to a worker.
    pub fn begin_move(&self) -> Option<Resume> {
        let mut up = self.up();
        if up.closed {
            return None;
        }
        match &mut up.route {
            Route::Detached(since) => {
                up.route = Route::Moving {
                    lost_at: Some(*since),
                }
            }
            Route::Leaving { moving, .. } if !*moving => *moving = true,
            _ => return None,
        }
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
            let before = std::mem::replace(&mut up.route, Route::Attached(stream.clone()));
            // Served by the new stream now: the old one may end.
            if let Route::Leaving { from, .. } = before {
                from.left();
            }
            Finish::Attached
        } else {
            Finish::Newer(newer)
        }
    }

    /// Marks the socket closed; returns how it was routed: the stream that
    /// served it, if any, must be told (and a `Leaving` one let go of, with
    /// [`StreamHandle::left`], once told).
    pub fn close(&self) -> Route {
        let mut up = self.up();
        up.closed = true;
        let route = std::mem::replace(&mut up.route, Route::Moving { lost_at: None });
        drop(up);
        self.room.notify_one();
        route
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> Socket {
        Socket::new(
            1,
            0,
            Limits {
                frames: 16,
                bytes: 1 << 16,
            },
        )
    }

    fn stream(id: u64) -> StreamHandle {
        StreamHandle::new(id, mpsc::channel(8).0, Arc::default())
    }

    fn attached(stream: &StreamHandle) -> Socket {
        let socket = socket();
        socket.begin_move();
        assert!(matches!(socket.finish_move(stream, 0), Finish::Attached));
        socket
    }

    fn routed_to(socket: &Socket) -> Option<u64> {
        match socket.route() {
            Route::Attached(s) | Route::Leaving { from: s, .. } => Some(s.id),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_leaving_socket_is_served_by_its_old_stream_until_it_moves() {
        let (old, new) = (stream(1), stream(2));
        let socket = attached(&old);
        assert!(socket.leave(&old));
        let resume = socket.begin_move().expect("a leaving socket moves");
        assert!(resume.unacked.is_empty());
        // Mid-move, a client frame still goes to the old stream, and is
        // kept for the new one.
        let (seq, to) = socket.hold_frame(Bytes::from_static(b"x")).await;
        assert_eq!(to.map(|s| s.id), Some(1));
        assert!(socket.begin_move().is_none(), "one move at a time");
        match socket.finish_move(&new, 0) {
            Finish::Newer(frames) => assert_eq!(frames[0].0, seq),
            _ => panic!("the frame sent meanwhile goes to the new stream too"),
        }
        assert!(!old.ended.is_cancelled());
        assert!(matches!(socket.finish_move(&new, seq), Finish::Attached));
        assert_eq!(routed_to(&socket), Some(2));
        assert!(
            old.ended.is_cancelled(),
            "its last socket left the old stream"
        );
    }

    #[test]
    fn a_failed_move_leaves_the_socket_on_its_old_stream() {
        let old = stream(1);
        let socket = attached(&old);
        socket.leave(&old);
        socket.begin_move();
        socket.set_detached();
        assert_eq!(routed_to(&socket), Some(1));
        assert!(
            socket.begin_move().is_some(),
            "moved again on the next pass"
        );
    }

    #[test]
    fn a_leaving_socket_whose_old_stream_ends_waits_detached() {
        let old = stream(1);
        let socket = attached(&old);
        socket.leave(&old);
        assert!(
            !socket.detach_from(1),
            "the mover has it already: not queued twice"
        );
        assert!(matches!(socket.route(), Route::Detached(_)));
        assert!(old.ended.is_cancelled());
    }

    #[test]
    fn the_grace_counts_from_the_loss_not_from_the_last_failed_move() {
        let socket = attached(&stream(1));
        socket.detach_from(1);
        let Route::Detached(lost) = socket.route() else {
            panic!("detached");
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        socket.begin_move();
        socket.set_detached();
        assert!(matches!(socket.route(), Route::Detached(since) if since == lost));
    }

    #[test]
    fn a_stream_ends_when_the_last_of_its_leaving_sockets_has_moved() {
        let (old, new) = (stream(1), stream(2));
        let (a, b) = (attached(&old), attached(&old));
        assert!(a.leave(&old) && b.leave(&old));
        a.begin_move();
        assert!(matches!(a.finish_move(&new, 0), Finish::Attached));
        assert!(!old.ended.is_cancelled(), "b is still on it");
        // b closes: its worker is told on the old stream, which then ends.
        match b.close() {
            Route::Leaving { from, .. } => from.left(),
            _ => panic!("a closing leaving socket names its stream"),
        }
        assert!(old.ended.is_cancelled());
    }
}

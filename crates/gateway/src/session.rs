//! One browser WebSocket, from upgrade to close.
//!
//! A single task per socket selects over: the client's frames, the socket's
//! outbound queue (which also carries the order to close) and the gateway's
//! drain signal. One task instead of a reader and a writer keeps an idle
//! socket small; the price is that while a write to a slow client is blocked
//! we do not read from it, which only slows that client down.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use std::sync::Arc;

pub use sharedconn_common::rate::RateLimit;

use crate::error::CloseReason;
use crate::frames::{FrameWriter, ReadHalf};
use crate::metrics::SessionCounters;
use crate::queue::{Kill, Next};
use crate::socket::Socket;
use crate::upstream::Upstream;

/// Frames written in one vectored write: batches a burst into few syscalls.
const WRITE_BATCH: usize = 64;
/// How long a close handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A look this late is logged (at debug), with what the session last
/// waited on: a socket whose messages come late shows why.
const LATE_LOOK: Duration = Duration::from_secs(1);

/// The client's frames, parsed and checked by tungstenite.
pub type Reader = WebSocketStream<ReadHalf>;

/// The session's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A write that makes no progress for this long closes the socket (1008).
    pub stall: Duration,
    /// A client silent this long is pinged...
    pub ping_interval: Duration,
    /// ...and closed (1001) if it answers no ping within this.
    pub pong_timeout: Duration,
    /// A frame begun and not finished within this closes the socket (1008).
    pub frame_timeout: Duration,
}

/// Runs the socket until either side ends it, then tells the worker.
///
/// An `async` block rather than an `async fn`: the function's arguments
/// would be copied into the future's locals and take their room twice, and
/// this future is most of what an idle socket costs. For the same reason
/// the rare awaits are boxed: a frame to the worker, a fetch, the close.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would copy its arguments into the future"
)]
pub fn run(
    mut reader: Reader,
    mut writer: FrameWriter,
    socket: Arc<Socket>,
    upstream: Arc<Upstream>,
    mut limit: RateLimit,
    drain: CancellationToken,
    timing: Timing,
) -> impl Future<Output = ()> + Send {
    async move {
        let stall = timing.stall;
        // One timer per socket, for the keepalive and for half-sent frames.
        let check_every =
            (timing.frame_timeout.min(timing.ping_interval) / 2).max(Duration::from_millis(10));
        let mut next_check = Instant::now() + check_every;
        let mut alive = Alive::new(Instant::now());
        let mut at_message = reader.get_ref().bytes_read();
        let mut partial_since: Option<Instant> = None;
        let queue = &socket.queue;
        let ws_id = socket.ws_id;
        let counters = SessionCounters::new();
        let mut waited_on = Wait::Nothing;
        // One waiter for the whole session: the token is shared by every socket,
        // and a fresh `cancelled()` each turn would lock its waiter list each turn.
        let drained = drain.cancelled_owned();
        tokio::pin!(drained);
        let close: Option<Kill> = loop {
            let throttle = limit.wait_until();
            let mut batch = Vec::new();
            tokio::select! {
                _ = &mut drained => break Some(CloseReason::GoingAway.into()),
                next = queue.next(&mut batch, WRITE_BATCH) => match next {
                    Err(kill) => break Some(kill),
                    // Behind, and all written: fetch what was missed.
                    Ok(Next::Fetch(after)) => {
                        counters.fetch();
                        waited_on = Wait::Fetch;
                        Box::pin(upstream.fetch(&socket, after)).await
                    }
                    Ok(Next::Frames) => {
                        // A write to a slow client may block; it must not keep the
                        // socket from being killed or drained.
                        waited_on = Wait::Write;
                        tokio::select! {
                            written = tokio::time::timeout(stall, writer.text(&batch)) => match written {
                                Ok(Ok(())) => counters.written(&batch),
                                Ok(Err(_)) => break None,
                                Err(_) => break Some(CloseReason::TooSlow.into()),
                            },
                            kill = queue.killed() => break Some(kill),
                            _ = &mut drained => break Some(CloseReason::GoingAway.into()),
                        }
                    }
                },
                _ = tokio::time::sleep_until(next_check) => {
                    // A look that comes late found the session busy
                    // elsewhere (a write, a line waiting for room, a fetch,
                    // a ping, a busy runtime), reading nothing from its
                    // client meanwhile.
                    let now = Instant::now();
                    let late = alive.excuse(next_check, now);
                    if late >= LATE_LOOK {
                        debug!(ws_id, late_ms = late.as_millis() as u64, ?waited_on, "session was busy, its client unread");
                    }
                    waited_on = Wait::Nothing;
                    next_check = now + check_every;
                    // Bytes came in since the last whole frame and no frame
                    // completed: a frame left half-sent holds its buffer.
                    if reader.get_ref().bytes_read() > at_message {
                        let since = *partial_since.get_or_insert(now);
                        if now - since >= timing.frame_timeout {
                            break Some(CloseReason::FrameTimeout.into());
                        }
                    } else {
                        partial_since = None;
                    }
                    match alive.look(now, &timing) {
                        Look::Fine => {}
                        Look::Unresponsive => break Some(CloseReason::Unresponsive.into()),
                        Look::Ping => {
                            waited_on = Wait::Ping;
                            tokio::select! {
                                written = tokio::time::timeout(stall, writer.ping()) => match written {
                                    Ok(Ok(())) => {}
                                    Ok(Err(_)) => break None,
                                    Err(_) => break Some(CloseReason::TooSlow.into()),
                                },
                                kill = queue.killed() => break Some(kill),
                                _ = &mut drained => break Some(CloseReason::GoingAway.into()),
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(throttle.unwrap_or_else(Instant::now)), if throttle.is_some() => {}
                msg = reader.next(), if throttle.is_none() => {
                    if let Some(Ok(_)) = &msg {
                        // Anything whole from the client: it is alive, and no
                        // frame is half-sent.
                        alive.heard(Instant::now());
                        at_message = reader.get_ref().bytes_read();
                        partial_since = None;
                    }
                    match msg {
                    Some(Ok(Message::Text(text))) => {
                        limit.take();
                        counters.frame_in();
                        // Waits only while this client has too many frames in
                        // flight (its worker is away or slow): it is read no
                        // faster, and nobody else waits.
                        waited_on = Wait::Line;
                        tokio::select! {
                            _ = Box::pin(upstream.send_frame(&socket, text.into())) => {}
                            kill = queue.killed() => break Some(kill),
                            _ = &mut drained => break Some(CloseReason::GoingAway.into()),
                        }
                    }
                    Some(Ok(Message::Binary(_))) => break Some(CloseReason::Binary.into()),
                    Some(Ok(Message::Ping(payload))) => {
                        // Pings count against the rate limit, and the pong, like
                        // any write, must not keep the socket from being killed:
                        // a client that pings and never reads fills its window.
                        limit.take();
                        waited_on = Wait::Pong;
                        tokio::select! {
                            written = tokio::time::timeout(stall, writer.pong(&payload)) => match written {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break None,
                                Err(_) => break Some(CloseReason::TooSlow.into()),
                            },
                            kill = queue.killed() => break Some(kill),
                            _ = &mut drained => break Some(CloseReason::GoingAway.into()),
                        }
                    }
                    Some(Ok(Message::Pong(_))) => limit.take(),
                    Some(Ok(Message::Frame(_))) => {}
                    // Echo the client's close, as RFC 6455 asks.
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or(1000, |f| u16::from(f.code));
                        break Some(Kill { code, reason: String::new() });
                    }
                    None => break None,
                    Some(Err(e)) => match reason_for(&e) {
                        Some(reason) => break Some(reason.into()),
                        None => {
                            debug!(ws_id, error = %e, "socket ended");
                            break None;
                        }
                    },
                }
                },
            }
        };
        crate::metrics::socket_closed(close.as_ref().map(|k| k.code));
        if let Some(kill) = close {
            debug!(ws_id, code = kill.code, reason = %kill.reason, "closing socket");
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, writer.close(kill.code, &kill.reason)).await;
        }
        Box::pin(upstream.close(&socket)).await;
        debug!(ws_id, "socket closed");
    }
}

/// What a session last waited on, besides its client and its queue (one
/// byte in every session, for the debug line of a late look; a late look
/// with nothing waited on since the last is a busy runtime).
#[derive(Debug, Clone, Copy)]
enum Wait {
    Nothing,
    /// A batch written to the client.
    Write,
    /// A client's line waiting for room towards its worker.
    Line,
    /// A fetch of missed messages waiting for room towards its worker.
    Fetch,
    /// A pong written to the client.
    Pong,
    /// A ping written to the client.
    Ping,
}

/// What a session knows of its client's liveness. A client is judged by
/// its answer to a ping, and only over time the session spent reading it:
/// while the session waits on anything else (a write, a line waiting for
/// room while its worker is away or slow, a fetch), it reads nothing from
/// its client, whose answers may be waiting unread. The session's look
/// comes late then, and the lateness is excused: at most one look's
/// interval of such a wait still counts.
struct Alive {
    heard: Instant,
    pinged_at: Option<Instant>,
}

/// What a look at a client's liveness found.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    Fine,
    /// Silent for the ping interval: ping it now.
    Ping,
    /// Pinged, and silent for the pong timeout since.
    Unresponsive,
}

impl Alive {
    fn new(now: Instant) -> Self {
        Alive {
            heard: now,
            pinged_at: None,
        }
    }

    /// Something whole came from the client.
    fn heard(&mut self, now: Instant) {
        self.heard = now;
        self.pinged_at = None;
    }

    /// The session read nothing from its client from `since` to `now`, for
    /// reasons of its own: that time is not the client's silence. Returns it.
    fn excuse(&mut self, since: Instant, now: Instant) -> Duration {
        let waited = now.saturating_duration_since(since);
        self.heard += waited;
        if let Some(at) = &mut self.pinged_at {
            *at += waited;
        }
        waited
    }

    fn look(&mut self, now: Instant, timing: &Timing) -> Look {
        match self.pinged_at {
            Some(at) if now.saturating_duration_since(at) >= timing.pong_timeout => {
                Look::Unresponsive
            }
            None if now.saturating_duration_since(self.heard) >= timing.ping_interval => {
                self.pinged_at = Some(now);
                Look::Ping
            }
            _ => Look::Fine,
        }
    }
}

/// The close we owe the client for a read error, or `None` when the
/// connection is simply gone (a client going away is not an error).
fn reason_for(e: &WsError) -> Option<CloseReason> {
    match e {
        // Over `max_frame_bytes` (a frame or a reassembled message).
        WsError::Capacity(_) => Some(CloseReason::TooBig),
        WsError::Utf8(_) => Some(CloseReason::BadText),
        WsError::Protocol(_) => Some(CloseReason::Protocol),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        stall: Duration::from_secs(30),
        ping_interval: Duration::from_secs(25),
        pong_timeout: Duration::from_secs(20),
        frame_timeout: Duration::from_secs(10),
    };

    fn after(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_pinged_then_judged_by_its_answer() {
        let mut alive = Alive::new(Instant::now());
        assert_eq!(alive.look(after(24), &TIMING), Look::Fine);
        assert_eq!(alive.look(after(25), &TIMING), Look::Ping);
        assert_eq!(alive.look(after(44), &TIMING), Look::Fine);
        assert_eq!(alive.look(after(45), &TIMING), Look::Unresponsive);
        alive.heard(after(45));
        assert_eq!(alive.look(after(50), &TIMING), Look::Fine);
    }

    /// The session waits `secs` on something other than its client.
    async fn session_waits(alive: &mut Alive, secs: u64) {
        let since = Instant::now();
        tokio::time::advance(Duration::from_secs(secs)).await;
        alive.excuse(since, Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_session_spent_waiting_is_not_the_clients_silence() {
        let mut alive = Alive::new(Instant::now());
        // A line waited 60 s for room: the client was not read meanwhile.
        session_waits(&mut alive, 60).await;
        assert_eq!(alive.look(Instant::now(), &TIMING), Look::Fine);
        // Pinged, then a fetch waited 30 s: the answer may be unread.
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(alive.look(Instant::now(), &TIMING), Look::Ping);
        session_waits(&mut alive, 30).await;
        assert_eq!(alive.look(Instant::now(), &TIMING), Look::Fine);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(alive.look(Instant::now(), &TIMING), Look::Unresponsive);
    }
}

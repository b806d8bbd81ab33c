//! What the `chat` and `failover` scenarios' clients do alike: read frames
//! until the run stops or the socket ends, and post a sender's share of the
//! plan on schedule. Each scenario says what a chat frame means to it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::{CloseLog, close_reason, unix_nanos};
use crate::tracker::RunBook;
use crate::wire::{self, FrameKind, Marker};

/// Where a client reports what is not a chat message.
pub struct Outcomes<'a> {
    pub error_frames: &'a AtomicU64,
    /// Messages the server announced it left out (Gap frames).
    pub gap_missed: &'a AtomicU64,
    pub first_error_frame: &'a Mutex<Option<String>>,
    pub closes: &'a CloseLog,
}

/// Reads until `stop` or until the server ends the socket; hands each chat
/// frame's text to `on_chat`.
pub async fn read_frames<S>(
    stream: &mut S,
    stop: &CancellationToken,
    outcomes: Outcomes<'_>,
    mut on_chat: impl FnMut(&str),
) where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => return,
            frame = stream.next() => frame,
        };
        match frame {
            Some(Ok(Message::Text(text))) => match wire::frame_kind(&text) {
                FrameKind::Chat => on_chat(&text),
                FrameKind::Gap => {
                    outcomes
                        .gap_missed
                        .fetch_add(wire::gap_missed(&text).max(1), Ordering::Relaxed);
                }
                FrameKind::Error => {
                    outcomes.error_frames.fetch_add(1, Ordering::Relaxed);
                    outcomes
                        .first_error_frame
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(|| wire::error_text(&text));
                }
                _ => {}
            },
            Some(Ok(Message::Close(frame))) => {
                outcomes.closes.record(close_reason(frame.as_ref()));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                outcomes.closes.record(format!("read error: {e}"));
                return;
            }
            None => {
                outcomes
                    .closes
                    .record("connection ended without close".into());
                return;
            }
        }
    }
}

/// One sender's share of a run's plan.
pub struct Plan<'a> {
    pub book: &'a RunBook,
    /// This sender, of `senders`.
    pub sender: usize,
    pub senders: usize,
    /// Messages per second, all senders together.
    pub rate: f64,
    /// Padding added to each message.
    pub pad: usize,
    pub stop: &'a CancellationToken,
    /// Counts every message sent.
    pub sent: &'a AtomicU64,
}

/// Waits for `go`, then sends on schedule: message `g = seq * senders +
/// sender` is due `g / rate` seconds after the start, so senders take turns
/// and the aggregate rate is even. `on_lag` hears how late each one went.
pub async fn send_planned<K>(
    plan: Plan<'_>,
    sink: &mut K,
    alias: &str,
    go: &mut watch::Receiver<Option<tokio::time::Instant>>,
    mut on_lag: impl FnMut(Duration),
) where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let start = tokio::select! {
        start = go.wait_for(Option::is_some) => start.ok().and_then(|s| *s),
        _ = plan.stop.cancelled() => None,
    };
    let Some(start) = start else { return };
    let senders = plan.senders as u64;
    let mut seq: u32 = 0;
    loop {
        let g = u64::from(seq) * senders + plan.sender as u64;
        if g >= plan.book.planned {
            break;
        }
        let due = start + Duration::from_secs_f64(g as f64 / plan.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = plan.stop.cancelled() => break,
        }
        on_lag(tokio::time::Instant::now().saturating_duration_since(due));
        let marker = Marker {
            run: plan.book.run,
            sender: plan.sender as u32,
            seq,
            sent_nanos: unix_nanos(),
        };
        let frame = wire::post_frame(&marker.text(plan.pad), alias);
        if sink.send(Message::text(frame)).await.is_err() {
            break;
        }
        plan.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
}

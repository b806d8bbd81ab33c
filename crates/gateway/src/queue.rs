//! A socket's outbound queue: bounded, never blocks whoever fills it, and
//! carries the order to close the socket.
//!
//! An idle socket's queue is a few dozen bytes (an empty `VecDeque` does not
//! allocate), which matters at 100,000 sockets per gateway; a channel would
//! allocate a block of slots up front for every socket.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::error::CloseReason;

/// A request to close a socket, from outside its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    pub code: u16,
    pub reason: String,
}

impl From<CloseReason> for Kill {
    fn from(r: CloseReason) -> Self {
        Kill {
            code: r.code().into(),
            reason: r.text().to_owned(),
        }
    }
}

/// What became of a pushed frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue is at capacity; the frame was not queued.
    Full,
    /// The socket is closing; the frame was dropped.
    Closed,
}

pub struct SocketQueue {
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    kill: Option<Kill>,
}

impl SocketQueue {
    pub fn new(capacity: usize) -> Self {
        SocketQueue {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            capacity,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame. Never waits.
    pub fn push(&self, frame: Utf8Bytes) -> Push {
        {
            let mut state = self.state();
            if state.kill.is_some() {
                return Push::Closed;
            }
            if state.frames.len() >= self.capacity {
                return Push::Full;
            }
            state.frames.push_back(frame);
        }
        self.ready.notify_one();
        Push::Queued
    }

    /// Orders the socket closed. The first order wins; queued frames are
    /// dropped, since the socket will not be written to again.
    pub fn kill(&self, kill: Kill) {
        {
            let mut state = self.state();
            if state.kill.is_some() {
                return;
            }
            state.kill = Some(kill);
            state.frames = VecDeque::new();
        }
        self.ready.notify_one();
    }

    /// Waits for frames and moves up to `max` of them into `batch`, or
    /// returns the close order. Cancel-safe: nothing is taken until it
    /// returns.
    pub async fn next(&self, batch: &mut Vec<Utf8Bytes>, max: usize) -> Result<(), Kill> {
        loop {
            {
                let mut state = self.state();
                if let Some(kill) = &state.kill {
                    return Err(kill.clone());
                }
                if !state.frames.is_empty() {
                    let n = state.frames.len().min(max);
                    batch.extend(state.frames.drain(..n));
                    // Give back memory a burst left behind.
                    if state.frames.is_empty() && state.frames.capacity() > 64 {
                        state.frames = VecDeque::new();
                    }
                    return Ok(());
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push
            // between the check above and this await is not missed.
            self.ready.notified().await;
        }
    }
}

impl SocketQueue {
    /// Waits until the socket is ordered closed, taking no frames.
    pub async fn killed(&self) -> Kill {
        loop {
            if let Some(kill) = &self.state().kill {
                return kill.clone();
            }
            // Pushes wake this too; `next` re-checks the frames afterwards,
            // so a permit spent here loses nothing.
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_and_killable() {
        let q = SocketQueue::new(2);
        assert_eq!(q.push("a".into()), Push::Queued);
        assert_eq!(q.push("b".into()), Push::Queued);
        assert_eq!(q.push("c".into()), Push::Full);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, vec![Utf8Bytes::from("a"), Utf8Bytes::from("b")]);
        q.kill(CloseReason::TooSlow.into());
        q.kill(CloseReason::GoingAway.into());
        assert_eq!(q.push("d".into()), Push::Closed);
        assert_eq!(
            q.next(&mut batch, 10).await,
            Err(CloseReason::TooSlow.into())
        );
    }

    #[tokio::test]
    async fn wakes_a_waiting_reader() {
        let q = std::sync::Arc::new(SocketQueue::new(4));
        let reader = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut batch = Vec::new();
                q.next(&mut batch, 4).await.map(|_| batch)
            })
        };
        tokio::task::yield_now().await;
        q.push("x".into());
        assert_eq!(reader.await.unwrap().unwrap(), vec![Utf8Bytes::from("x")]);
    }
}

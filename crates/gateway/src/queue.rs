//! A socket's outbound queue: bounded in frames and bytes, never blocks
//! whoever fills it, and carries the order to close the socket.
//!
//! It also keeps the socket's place in the message log: the id of the last
//! chat message queued (`last_id`) and of the last one written to the client
//! (`written_id`). A message whose id is not above `last_id` is a replay the
//! socket already has and is dropped here, which makes every replay (after a
//! re-attach, a fetch, a reconnect) exactly-once.
//!
//! A socket that does not read fast enough is not closed: when its queue
//! overflows, the queue is emptied and the socket is marked *behind*. Live
//! messages are then dropped for it, and once the client has taken what was
//! written, the session fetches the missed messages from the log by id
//! ([`Next::Fetch`]) until it is caught up. So a slow reader still sees every
//! message, in order, once; it only sees them later.
//!
//! Two kinds of frame are never dropped that way. A socket's Status frame
//! (its WebSocket ID, the first frame it gets) stays through an overflow:
//! nothing would send it again. And a state frame (the online list) that is
//! still queued when a newer one comes is replaced by it: a client that
//! reads slowly gets the newest list, not every list in between, and its
//! chat is not held up behind lists nobody will look at.
//!
//! An idle socket's queue is a few dozen bytes (an empty `VecDeque` does not
//! allocate), which matters at 100,000 sockets per gateway; a channel would
//! allocate a block of slots up front for every socket.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::{Duration, Instant};
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
    /// The queue overflowed: it was emptied and the socket is behind.
    Behind,
    /// The socket is closing; the frame was dropped.
    Closed,
}

/// What the writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Frames were moved into the batch.
    Frames,
    /// The socket is behind and has written all it had: fetch the messages
    /// after this id.
    Fetch(u64),
}

/// One delivery to one socket, as the worker addressed it.
pub struct Delivery<'a> {
    pub texts: &'a [Utf8Bytes],
    /// The message id of each text (0: not a chat message).
    pub ids: &'a [u64],
    /// Set when the texts start the socket over on a (new) log.
    pub log: &'a str,
    pub fetched: bool,
    pub complete: bool,
    /// The last text's state version (0: none); see the proto's `Deliver`.
    pub version: u64,
    /// With `log`: where the socket starts in it (see the proto's
    /// `Deliver.place`).
    pub place: u64,
    /// The worker could not send all the socket is owed: it fetches the
    /// rest after the last message queued (see the proto's `Deliver.behind`).
    pub behind: bool,
}

/// Limits of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frames: usize,
    pub bytes: usize,
}

/// How long a socket waits to fetch again after a fetch that brought
/// nothing (see `State::retry_at`), the first time; each pause in a row
/// doubles it, up to `FETCH_RETRY_MAX`.
const FETCH_RETRY: Duration = Duration::from_secs(1);
const FETCH_RETRY_MAX: Duration = Duration::from_secs(8);

pub struct SocketQueue {
    state: Mutex<State>,
    ready: Notify,
    limits: Limits,
}

/// What a queued frame is, for what may replace or drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A socket's Status frame: kept through an overflow.
    Start,
    /// A whole state (the online list): replaced by a newer one.
    State,
    /// Anything else (a chat message carries its id beside it).
    Other,
}

#[derive(Default)]
struct State {
    frames: VecDeque<(Utf8Bytes, u64, Kind)>,
    bytes: usize,
    kill: Option<Kill>,
    last_id: u64,
    written_id: u64,
    log: String,
    behind: bool,
    /// A fetch is on its way; no second one until it is answered.
    fetching: bool,
    /// No fetch before then: the last one brought nothing (the worker could
    /// not read its log), the worker said it could not replay (`behind`), or
    /// there was no stream to send it on. A re-attach clears it.
    retry_at: Option<Instant>,
    /// Pauses in a row, with no fetch that brought anything between them.
    pauses: u8,
    /// The last state version queued (0: none, or dropped with the queue).
    version: u64,
}

impl State {
    /// Keeps only the queued frames whose kind `keep` accepts.
    fn retain(&mut self, keep: impl Fn(Kind) -> bool) {
        let before = self.frames.len();
        self.frames.retain(|(_, _, kind)| keep(*kind));
        if self.frames.len() != before {
            self.bytes = self.frames.iter().map(|(text, ..)| text.len()).sum();
        }
    }

    /// No fetch for a while: `FETCH_RETRY`, doubled for each pause in a
    /// row, and stretched by up to as much again at random, so that the
    /// sockets a re-attach or an unreadable log left behind together do not
    /// all ask again in the same instant, and a log that stays unreadable is
    /// asked less and less often.
    fn pause_fetches(&mut self) {
        let pause = FETCH_RETRY
            .saturating_mul(1 << self.pauses.min(3))
            .min(FETCH_RETRY_MAX);
        self.pauses = self.pauses.saturating_add(1);
        let stretch = pause.mul_f64(rand::random::<f64>());
        self.retry_at = Some(Instant::now() + pause + stretch);
    }

    /// A fetch may go at once again, and the next pause is the first.
    fn resume_fetches(&mut self) {
        self.retry_at = None;
        self.pauses = 0;
    }
}

/// Where a socket is in the log, for a re-attach.
#[derive(Debug, Clone, Default)]
pub struct Place {
    pub log: String,
    pub last_id: u64,
    /// The last state version queued for the socket (see `Delivery`).
    pub version: u64,
}

impl SocketQueue {
    pub fn new(limits: Limits) -> Self {
        SocketQueue {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            limits,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one frame that carries no message id (an error, a list).
    /// Never waits.
    pub fn push(&self, frame: Utf8Bytes) -> Push {
        self.deliver(&Delivery {
            texts: std::slice::from_ref(&frame),
            ids: &[0],
            log: "",
            fetched: false,
            complete: false,
            version: 0,
            place: 0,
            behind: false,
        })
    }

    /// Queues what a worker sent this socket, dropping messages it already
    /// has. Never waits.
    pub fn deliver(&self, d: &Delivery<'_>) -> Push {
        let result = {
            let mut st = self.state();
            if st.kill.is_some() {
                return Push::Closed;
            }
            let starts = !d.log.is_empty() && d.log != st.log;
            if starts {
                if !st.log.is_empty() {
                    // The socket leaves a log (it was reset): what is still
                    // queued from it is not owed, and its new Status must
                    // come first.
                    st.frames.clear();
                    st.bytes = 0;
                    st.version = 0;
                }
                // A Status frame: ids start over on this log, from the
                // socket's place in it (what is older is not owed to it).
                st.log = d.log.to_owned();
                st.last_id = 0;
                st.written_id = d.place;
                st.behind = false;
                st.fetching = false;
            }
            let last = d.texts.len().saturating_sub(1);
            let mut result = Push::Queued;
            for (i, text) in d.texts.iter().enumerate() {
                let id = d.ids.get(i).copied().unwrap_or(0);
                if id != 0 && (id <= st.last_id || (st.behind && !d.fetched)) {
                    continue;
                }
                let kind = if starts && i == 0 {
                    Kind::Start
                } else if d.version != 0 && i == last {
                    Kind::State
                } else {
                    Kind::Other
                };
                if kind == Kind::State {
                    // The newer list makes a queued one worthless.
                    st.retain(|kind| kind != Kind::State);
                }
                let full = st.frames.len() >= self.limits.frames
                    || st.bytes + text.len() > self.limits.bytes;
                if full {
                    if id == 0 && st.behind {
                        // No room for a list while catching up; a newer
                        // one follows the next change (or the re-attach,
                        // which sees that none is queued).
                        if kind == Kind::State {
                            st.version = 0;
                        }
                        continue;
                    }
                    // Only a Status not yet written stays.
                    st.retain(|kind| kind == Kind::Start);
                    // A queued list may have gone with the rest.
                    st.version = 0;
                    st.last_id = st.written_id;
                    st.behind = true;
                    st.fetching = false;
                    result = Push::Behind;
                    crate::metrics::socket_overflowed();
                    if id != 0 {
                        continue;
                    }
                }
                st.bytes += text.len();
                st.frames.push_back((text.clone(), id, kind));
                if id != 0 {
                    st.last_id = id;
                }
                if d.version != 0 && i + 1 == d.texts.len() {
                    st.version = d.version;
                }
            }
            if starts {
                st.last_id = st.last_id.max(d.place);
            }
            if d.behind {
                // Its log could not be read just now: live messages wait
                // for the fetch, which starts after a pause.
                st.behind = true;
                st.pause_fetches();
            }
            if d.fetched {
                st.fetching = false;
                if d.complete && result == Push::Queued {
                    st.behind = false;
                }
                // Only a log that cannot be read answers with nothing and
                // more to come: ask again later, not at once and forever.
                if d.texts.is_empty() && !d.complete {
                    st.pause_fetches();
                } else {
                    st.resume_fetches();
                }
            }
            result
        };
        self.ready.notify_one();
        result
    }

    /// Whether the socket is behind (catching up from the log), and
    /// whether a fetch for it is on its way; for the status log.
    pub fn catching_up(&self) -> (bool, bool) {
        let st = self.state();
        (st.behind, st.fetching)
    }

    /// Where the socket is in the log: a re-attached socket replays from
    /// here. A socket that is behind fetches again after the re-attach.
    pub fn place(&self) -> Place {
        let mut st = self.state();
        st.fetching = false;
        Place {
            log: st.log.clone(),
            last_id: st.last_id,
            version: st.version,
        }
    }

    /// Orders the socket closed. The first order wins; queued frames are
    /// dropped, since the socket will not be written to again.
    pub fn kill(&self, kill: Kill) {
        {
            let mut st = self.state();
            if st.kill.is_some() {
                return;
            }
            st.kill = Some(kill);
            st.frames = VecDeque::new();
            st.bytes = 0;
        }
        self.ready.notify_one();
    }

    /// Waits for frames and moves up to `max` of them into `batch`, or
    /// asks for a fetch, or returns the close order. Cancel-safe: nothing is
    /// taken until it returns.
    pub async fn next(&self, batch: &mut Vec<Utf8Bytes>, max: usize) -> Result<Next, Kill> {
        let mut retry_at = None;
        loop {
            {
                let mut st = self.state();
                if let Some(kill) = &st.kill {
                    return Err(kill.clone());
                }
                if !st.frames.is_empty() {
                    let n = st.frames.len().min(max);
                    let (mut written, mut bytes) = (st.written_id, 0);
                    for (text, id, _) in st.frames.drain(..n) {
                        // Never below the socket's place: the history a new
                        // socket is shown is older than what it is owed.
                        written = written.max(id);
                        bytes += text.len();
                        batch.push(text);
                    }
                    st.written_id = written;
                    st.bytes -= bytes;
                    // Give back memory a burst left behind.
                    if st.frames.is_empty() && st.frames.capacity() > 64 {
                        st.frames = VecDeque::new();
                    }
                    return Ok(Next::Frames);
                }
                if st.behind && !st.fetching {
                    match st.retry_at {
                        Some(at) if at > Instant::now() => retry_at = Some(at),
                        _ => {
                            st.fetching = true;
                            st.retry_at = None;
                            return Ok(Next::Fetch(st.written_id));
                        }
                    }
                }
            }
            // `notify_one` stores a permit when nobody waits, so a push
            // between the check above and this await is not missed.
            match retry_at.take() {
                Some(at) => {
                    tokio::select! {
                        _ = self.ready.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.ready.notified().await,
            }
        }
    }

    /// A fetch could not be sent (no worker right now): ask again later,
    /// or at once when the socket is re-attached ([`SocketQueue::wake`]).
    pub fn fetch_failed(&self) {
        let mut st = self.state();
        st.fetching = false;
        st.pause_fetches();
    }

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

    /// The socket was re-attached: wakes the writer, whose fetch is due
    /// again at once.
    pub fn wake(&self) {
        self.state().resume_fetches();
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        frames: 2,
        bytes: 1 << 20,
    };

    /// Delivers `texts` (message ids `ids`) that start the socket on `log`
    /// at `place` (`log` empty: no start), flagged `behind` or not.
    fn start(
        q: &SocketQueue,
        texts: &[&str],
        ids: &[u64],
        (log, place): (&str, u64),
        behind: bool,
    ) -> Push {
        let texts: Vec<Utf8Bytes> = texts.iter().map(|&t| t.into()).collect();
        q.deliver(&Delivery {
            texts: &texts,
            ids,
            log,
            fetched: false,
            complete: false,
            version: 0,
            place,
            behind,
        })
    }

    fn chat(q: &SocketQueue, ids: &[u64], fetched: bool, complete: bool) -> Push {
        let texts: Vec<Utf8Bytes> = ids.iter().map(|i| i.to_string().into()).collect();
        q.deliver(&Delivery {
            texts: &texts,
            ids,
            log: "",
            fetched,
            complete,
            version: 0,
            place: 0,
            behind: false,
        })
    }

    #[tokio::test]
    async fn killable_and_the_first_order_wins() {
        let q = SocketQueue::new(LIMITS);
        assert_eq!(q.push("a".into()), Push::Queued);
        let mut batch = Vec::new();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Frames));
        q.kill(CloseReason::TooSlow.into());
        q.kill(CloseReason::GoingAway.into());
        assert_eq!(q.push("d".into()), Push::Closed);
        assert_eq!(
            q.next(&mut batch, 10).await,
            Err(CloseReason::TooSlow.into())
        );
    }

    #[tokio::test]
    async fn replays_are_dropped_by_id() {
        let q = SocketQueue::new(Limits {
            frames: 10,
            bytes: 1 << 20,
        });
        chat(&q, &[1, 2], false, false);
        chat(&q, &[2, 3], false, false);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["1", "2", "3"].map(Utf8Bytes::from));
        assert_eq!(q.place().last_id, 3);
    }

    #[tokio::test]
    async fn an_overflow_falls_behind_and_fetches_in_order() {
        let q = SocketQueue::new(LIMITS);
        chat(&q, &[1], false, false);
        let mut batch = Vec::new();
        q.next(&mut batch, 1).await.unwrap();
        assert_eq!(chat(&q, &[2, 3, 4], false, false), Push::Behind);
        // Live messages are dropped while behind, and the writer is asked
        // to fetch after the last message it wrote.
        chat(&q, &[5], false, false);
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(1)));
        chat(&q, &[2, 3], true, false);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["2", "3"].map(Utf8Bytes::from));
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(3)));
        chat(&q, &[4, 5], true, true);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["4", "5"].map(Utf8Bytes::from));
        chat(&q, &[6], false, false);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["6"].map(Utf8Bytes::from), "live again");
    }

    /// A queue that overflowed before writing anything and has asked for
    /// its first fetch.
    async fn fetching_from_the_start() -> (SocketQueue, Vec<Utf8Bytes>) {
        let q = SocketQueue::new(LIMITS);
        assert_eq!(chat(&q, &[1, 2, 3], false, false), Push::Behind);
        let mut batch = Vec::new();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(0)));
        (q, batch)
    }

    /// A fetch the worker could not answer (its log unreadable: nothing, and
    /// not complete) is asked again after a pause, not at once.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_that_brought_nothing_is_retried_after_a_pause() {
        let (q, mut batch) = fetching_from_the_start().await;
        chat(&q, &[], true, false);
        let asked = Instant::now();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(0)));
        assert!(asked.elapsed() >= FETCH_RETRY, "asked again at once");
        // An answer that brings messages is followed at once.
        chat(&q, &[1], true, false);
        q.next(&mut batch, 10).await.unwrap();
        let asked = Instant::now();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(1)));
        assert_eq!(asked.elapsed(), Duration::ZERO);
    }

    /// While the log stays unreadable, each pause is longer than the last,
    /// up to a ceiling, and sockets that failed together do not ask again
    /// together.
    #[tokio::test(start_paused = true)]
    async fn fetches_that_keep_failing_are_asked_less_often_and_not_in_step() {
        let mut firsts = Vec::new();
        for _ in 0..8 {
            let (q, mut batch) = fetching_from_the_start().await;
            let mut pauses = Vec::new();
            for _ in 0..6 {
                chat(&q, &[], true, false);
                let asked = Instant::now();
                assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(0)));
                pauses.push(asked.elapsed());
            }
            for (n, pause) in pauses.iter().enumerate() {
                let least = (FETCH_RETRY * (1 << n.min(3))).min(FETCH_RETRY_MAX);
                assert!(
                    *pause >= least && *pause <= least * 2,
                    "pause {n}: {pause:?}, not within {least:?} and twice that"
                );
            }
            firsts.push(pauses[0]);
            // One that brings messages starts the count again.
            chat(&q, &[1], true, false);
            q.next(&mut batch, 10).await.unwrap();
            q.next(&mut batch, 10).await.unwrap();
            chat(&q, &[], true, false);
            let asked = Instant::now();
            assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(1)));
            assert!(asked.elapsed() <= FETCH_RETRY * 2);
        }
        firsts.sort();
        firsts.dedup();
        assert!(firsts.len() > 1, "eight sockets paused alike: {firsts:?}");
    }

    /// A worker that could not replay what a re-attached socket is owed says
    /// so: the socket drops live messages and, after a pause, fetches from
    /// the last message it has, so it misses none.
    #[tokio::test(start_paused = true)]
    async fn a_replay_the_worker_could_not_read_is_fetched_after_a_pause() {
        let q = SocketQueue::new(Limits {
            frames: 10,
            bytes: 1 << 20,
        });
        chat(&q, &[1, 2], false, false);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        start(&q, &[], &[], ("", 0), true);
        // Live messages wait for the fetch.
        chat(&q, &[5], false, false);
        let asked = Instant::now();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(2)));
        assert!(asked.elapsed() >= FETCH_RETRY);
        chat(&q, &[3, 4, 5], true, true);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["3", "4", "5"].map(Utf8Bytes::from));

        // A page reconnecting with what it has, on a log that cannot be
        // read: it fetches from its place.
        let q = SocketQueue::new(LIMITS);
        start(&q, &["status"], &[0], ("log", 5), true);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(5)));
    }

    /// A fetch with no stream to go on waits, and goes at once on re-attach.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_with_no_stream_waits_for_the_re_attach() {
        let (q, mut batch) = fetching_from_the_start().await;
        q.fetch_failed();
        let next = tokio::time::timeout(FETCH_RETRY / 2, q.next(&mut batch, 10)).await;
        assert!(next.is_err(), "asked again with no stream: {next:?}");
        q.wake();
        let asked = Instant::now();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(0)));
        assert_eq!(asked.elapsed(), Duration::ZERO);
    }

    /// A socket starts at its place: it is owed what comes after it, and
    /// the history shown before it is not what it falls back to.
    #[tokio::test]
    async fn a_socket_starts_at_its_place() {
        let limits = Limits {
            frames: 3,
            bytes: 1 << 20,
        };
        let q = SocketQueue::new(limits);
        start(&q, &["status", "9", "10"], &[0, 9, 10], ("log", 10), false);
        assert_eq!(q.place().last_id, 10);
        // Its queue overflows before anything is written: it fetches from
        // its place, not from the start of the log, once it has its Status.
        assert_eq!(chat(&q, &[11, 12], false, false), Push::Behind);
        let mut batch = Vec::new();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Frames));
        assert_eq!(batch, ["status"].map(Utf8Bytes::from));
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(10)));

        // A page that reconnects with what it has: owed everything after it.
        let q = SocketQueue::new(limits);
        start(&q, &["status", "4"], &[0, 4], ("log", 3), false);
        assert_eq!(chat(&q, &[5, 6], false, false), Push::Behind);
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(3)));
    }

    /// Queues the online list `text` at state `version`.
    fn list(q: &SocketQueue, text: &str, version: u64) -> Push {
        q.deliver(&Delivery {
            texts: &[text.into()],
            ids: &[0],
            log: "",
            fetched: false,
            complete: false,
            version,
            place: 0,
            behind: false,
        })
    }

    /// A client that reads slowly gets the newest list, not each one in
    /// between, and its messages do not wait behind the stale ones.
    #[tokio::test]
    async fn a_newer_list_replaces_a_queued_one() {
        let q = SocketQueue::new(Limits {
            frames: 4,
            bytes: 1 << 20,
        });
        start(&q, &["status"], &[0], ("log", 0), false);
        list(&q, "list 1", 1);
        chat(&q, &[1], false, false);
        list(&q, "list 2", 2);
        list(&q, "list 3", 3);
        chat(&q, &[2], false, false);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["status", "1", "list 3", "2"].map(Utf8Bytes::from));
        assert_eq!(q.place().version, 3);
        // A written list is the client's: the next one is queued anew.
        list(&q, "list 4", 4);
        batch.clear();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["list 4"].map(Utf8Bytes::from));
    }

    /// A socket whose log was reset starts over with the new log's Status:
    /// what was still queued from the old log does not come before it.
    #[tokio::test]
    async fn a_new_log_starts_with_its_status() {
        let q = SocketQueue::new(Limits {
            frames: 10,
            bytes: 1 << 20,
        });
        start(&q, &["status 1", "5"], &[0, 5], ("log 1", 4), false);
        list(&q, "list", 7);
        start(&q, &["status 2"], &[0], ("log 2", 0), false);
        chat(&q, &[1], false, false);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["status 2", "1"].map(Utf8Bytes::from));
        assert_eq!(q.place().version, 0, "the list went with the old log");
    }

    /// The Status frame carries the socket's WebSocket ID and nothing sends
    /// it again: an overflow before it was written keeps it.
    #[tokio::test]
    async fn a_status_not_yet_written_outlives_an_overflow() {
        let q = SocketQueue::new(LIMITS);
        start(&q, &["status"], &[0], ("log", 0), false);
        assert_eq!(list(&q, "list 1", 1), Push::Queued);
        assert_eq!(chat(&q, &[1, 2], false, false), Push::Behind);
        let mut batch = Vec::new();
        q.next(&mut batch, 10).await.unwrap();
        assert_eq!(batch, ["status"].map(Utf8Bytes::from));
        assert_eq!(q.next(&mut batch, 10).await, Ok(Next::Fetch(0)));
        // The list went with the overflow: a re-attach asks for it again.
        assert_eq!(q.place().version, 0);
    }
}

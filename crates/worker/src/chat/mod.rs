//! The seed's `Chat.Server`, as a [`WebSocketApp`] over a [`Backplane`].
//!
//! - open: Status frame with the WebSocket ID, then recent history, then the
//!   online list;
//! - `{"User":..}`: set the alias; the online list goes to everyone. The
//!   alias is parked with the gateway, so whichever worker serves the socket
//!   next knows it;
//! - `{"Message":..}`: post under the alias the server holds (a client cannot
//!   write as someone else); the message reaches every socket once the log
//!   has given it an id, so every client sees the log's order;
//! - close: drop the user; the online list goes to everyone.
//! - re-attach (a worker died or drained): no Status, no join; the socket
//!   gets what it missed after the last id it received, and carries on.
//!
//! Online-list broadcasts are paced by [`pacer`]: the seed re-sends the whole
//! list on every join, which is quadratic in a join storm.

pub mod pacer;
pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::app::{Budget, Frames, Handled, OpenInfo, Outbox, WebSocketApp, WsId};
use crate::backplane::{self, Backplane, NewMessage, Presence};
use crate::error::Error;
use pacer::Pacer;
use rules::{ClientFrame, DEFAULT_ALIAS};

/// Unsent frame bytes in the streams past which the next online list
/// waits (see `send_userlist`): in shared mode a few lists' worth, in
/// private mode a list of 10,000 names still queued for about a hundred of
/// the sockets.
const LIST_BACKLOG_BYTES: usize = 16 << 20;
/// The last list is gone once the queues hold under this share of what they
/// held right after it went out (chat keeps flowing behind it).
const DRAINED_SHARE: usize = 16;
/// What one stream's copy of a broadcast costs, in sockets' writes: the
/// worker encodes it, HTTP/2 carries it, the gateway decodes and checks it.
/// A 10,000-socket private join storm paced as if it were shared mode
/// saturated both processes for seconds, so long that busy links missed
/// their keepalive deadlines and were declared dead.
const STREAM_COPY_WEIGHT: usize = 4;
/// Most messages replayed to a client that reconnects with `since`, or sent
/// in one answer to a fetch (older ones are announced with a Gap frame).
/// Well under the gateway's default socket queue (1024), so live messages
/// arriving during the replay fit too.
pub const MAX_REPLAY: usize = 500;

pub struct Chat<B> {
    backplane: B,
    history: usize,
    /// This worker's sockets; the backplane has everyone's presence.
    sockets: HashMap<WsId, Socket>,
    /// The highest message id broadcast. History for a new socket stops
    /// here, and live messages start after it: no gap, no duplicate.
    last_delivered: u64,
    userlist: UserlistState,
    /// The worker's ceiling on posts per second (all sockets together).
    ingest: Ingest,
}

/// A token bucket over posts: past the ceiling, a post is answered `busy`
/// rather than queued, so a flood has a clear limit and a clear answer.
struct Ingest {
    per_sec: f64,
    tokens: f64,
    updated: Instant,
}

impl Ingest {
    fn new(per_sec: u32) -> Self {
        Ingest {
            per_sec: per_sec.into(),
            tokens: per_sec.into(),
            updated: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Socket {
    alias: Option<Arc<str>>,
    boot: u64,
    opened_ms: u64,
}

struct UserlistState {
    pacer: Pacer,
    /// The current list and its version, for sockets that open (or are
    /// re-attached) while nothing is pending.
    frame: Option<(Bytes, u64)>,
    /// A gateway is re-attaching its sockets: lists wait.
    held: bool,
    /// Queued bytes at or under which the last list counts as gone.
    drained_at: usize,
}

/// What the chat waits for besides socket events.
#[derive(Debug)]
pub enum ChatEvent {
    Backplane(backplane::Event),
    SendUserlist,
    /// Time to look whether the last list has left the queues.
    ListDrain,
}

impl<B: Backplane> Chat<B> {
    pub fn new(backplane: B, history: usize, userlist_interval: Duration) -> Self {
        let last_delivered = backplane.last_id();
        Chat {
            backplane,
            history,
            sockets: HashMap::new(),
            last_delivered,
            userlist: UserlistState {
                pacer: Pacer::new(userlist_interval, Instant::now()),
                frame: None,
                held: false,
                drained_at: 0,
            },
            ingest: Ingest::new(0),
        }
    }

    /// Caps the posts this worker takes per second (0: no cap).
    pub fn with_ingest_ceiling(mut self, per_sec: u32) -> Self {
        self.ingest = Ingest::new(per_sec);
        self
    }

    fn users_changed(&mut self) {
        self.userlist.pacer.changed(Instant::now());
        self.userlist.frame = None;
    }

    fn send_userlist(&mut self, out: &mut Outbox<'_>) {
        // A list is state, not history: while the streams still hold this
        // much unsent, the next list waits instead of queueing behind the
        // last one. It matters in private mode, where every socket's stream
        // carries its own copy: in a join storm each list of thousands of
        // names goes out thousands of times, faster than the gateway takes
        // it, and the streams would fill up with lists nobody needs.
        if out.queued_bytes() > LIST_BACKLOG_BYTES {
            self.userlist.pacer.retry(Instant::now());
            return;
        }
        let users = self.backplane.users();
        let frame = Bytes::from(rules::userlist_frame(&users));
        debug!(
            users = users.len(),
            bytes = frame.len(),
            sockets = out.open_sockets(),
            "online list sent"
        );
        crate::metrics::online_users(users.len());
        // A socket costs its gateway a write; a stream costs this worker an
        // encode and its gateway a decode of its own copy, so in private
        // mode (a stream per socket) a list costs several times as much.
        let recipients = out.open_sockets() + STREAM_COPY_WEIGHT * out.open_streams();
        self.userlist
            .pacer
            .sent(Instant::now(), frame.len(), recipients);
        let version = list_version(&frame);
        out.broadcast_state(frame.clone(), version);
        self.userlist.frame = Some((frame, version));
        self.userlist.drained_at = out.queued_bytes() / DRAINED_SHARE;
    }

    /// The current list and its version, unless a newer one is pending
    /// (it will reach every socket anyway).
    fn current_list(&mut self) -> Option<(Bytes, u64)> {
        if self.userlist.pacer.is_dirty() {
            return None;
        }
        if self.userlist.frame.is_none() {
            let frame = Bytes::from(rules::userlist_frame(&self.backplane.users()));
            let version = list_version(&frame);
            self.userlist.frame = Some((frame, version));
        }
        self.userlist.frame.clone()
    }

    /// Appends to `frames` the messages after `since`, announcing with a
    /// Gap frame those it leaves out; with no `since`, the most recent ones.
    /// Returns the socket's place: the id after which it is owed every
    /// message (with no `since`, the newest: the history is a courtesy).
    fn replay(&mut self, frames: &mut Frames, since: Option<u64>) -> u64 {
        let (after, limit) = match since {
            Some(since) => (since, MAX_REPLAY),
            None => (0, self.history),
        };
        // A page may claim more than there is (the load generator asks for
        // no history with the largest id a page can hold).
        let mut place = since.map_or(self.last_delivered, |s| s.min(self.last_delivered));
        match self.backplane.history(after, self.last_delivered, limit) {
            Ok(messages) => {
                let first = messages.first().map_or(self.last_delivered + 1, |m| m.id);
                if since.is_some() && first > after + 1 {
                    frames.push(rules::gap_frame(after, first - after - 1), 0);
                    place = first - 1;
                }
                for m in &messages {
                    frames.push(rules::chat_frame(m), m.id);
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read history");
                // What a socket is owed must not be lost with the read:
                // it fetches from its last message once the log reads.
                frames.behind = since.is_some();
            }
        }
        place
    }

    fn presence(&self, ws: WsId, socket: &Socket) -> Option<Presence> {
        socket.alias.as_ref().map(|alias| Presence {
            ws,
            boot: socket.boot,
            alias: alias.clone(),
            opened_ms: socket.opened_ms,
        })
    }
}

impl<B: Backplane> WebSocketApp for Chat<B> {
    type Event = ChatEvent;

    fn log_id(&self) -> &str {
        self.backplane.log_id()
    }

    fn healthy(&self) -> bool {
        self.backplane.healthy()
    }

    fn gateway_up(&mut self, boot: u64, tag: u32) {
        // A restarted gateway's old users may have left.
        if self.backplane.gateway_up(boot, tag) {
            self.users_changed();
        }
    }

    fn gateway_down(&mut self, boot: u64) {
        self.backplane.gateway_down(boot);
    }

    async fn on_open(&mut self, ws: WsId, open: OpenInfo, out: &mut Outbox<'_>) {
        let alias = std::str::from_utf8(&open.state)
            .ok()
            .filter(|a| !a.is_empty())
            .map(Arc::<str>::from);
        let socket = Socket {
            alias,
            boot: open.boot,
            opened_ms: open.opened_ms,
        };
        // A re-attached socket is usually listed already (Redis holds the
        // list, or this worker never restarted): no list goes out for it.
        if let Some(user) = self.presence(ws, &socket)
            && self.backplane.set_user(user)
        {
            self.users_changed();
        }
        self.sockets.insert(ws, socket);

        // Everything an opening socket gets goes out as one command, so a
        // burst of (re)connections costs its stream one slot each.
        let mut frames = Frames::default();
        if open.resume && open.log == self.backplane.log_id() {
            // Served before on this log: only what it missed, and the list
            // if the last one its gateway queued is not the current one (a
            // list lost with a cut stream, or a change while it moved).
            // Its place is exact even at 0: it started on this log with
            // nothing before it, and every message since is owed to it.
            let _ = self.replay(&mut frames, Some(open.since));
            if let Some((list, version)) = self.current_list()
                && version != open.version
            {
                frames.push(list, 0);
                frames.version = version;
            }
            if !frames.texts.is_empty() || frames.behind {
                out.write_frames(ws, frames);
            }
            return;
        }
        let wsid = sharedconn_proto::ws_id_string(ws);
        frames.push(rules::status_frame(&wsid, self.backplane.log_id()), 0);
        frames.log = self.backplane.log_id().to_owned();
        // A page reconnecting says what it has; a socket re-attached to a
        // log that lost its data starts over.
        let since = (!open.resume && open.since > 0).then_some(open.since);
        frames.place = self.replay(&mut frames, since);
        // While a list is pending, it will reach this socket too.
        if let Some((list, version)) = self.current_list() {
            frames.push(list, 0);
            frames.version = version;
        }
        out.write_frames(ws, frames);
    }

    async fn on_frame(&mut self, ws: WsId, seq: u64, text: &str, out: &mut Outbox<'_>) -> Handled {
        if !self.sockets.contains_key(&ws) {
            return Handled::Now;
        }
        match rules::parse(text) {
            Ok(ClientFrame::User(alias)) => {
                let taken = alias != DEFAULT_ALIAS
                    && (self.backplane.alias_holder(&alias, ws).is_some()
                        || self.sockets.iter().any(|(other, s)| {
                            *other != ws && s.alias.as_deref() == Some(alias.as_str())
                        }));
                if taken {
                    let text = "that name is used by someone online; pick another";
                    out.write(ws, rules::error_frame("alias_taken", text));
                    return Handled::Now;
                }
                let Some(socket) = self.sockets.get_mut(&ws) else {
                    return Handled::Now;
                };
                let alias: Arc<str> = alias.into();
                socket.alias = Some(alias.clone());
                let user = Presence {
                    ws,
                    boot: socket.boot,
                    alias: alias.clone(),
                    opened_ms: socket.opened_ms,
                };
                // With Redis the change comes back as UsersChanged once the
                // local copy has it.
                if self.backplane.set_user(user) {
                    self.users_changed();
                }
                out.park(ws, Bytes::copy_from_slice(alias.as_bytes()));
                Handled::Now
            }
            Ok(ClientFrame::Message(message)) => {
                if !self.ingest.take(Instant::now()) {
                    let text = "the chat is taking all the messages it can; message not stored, send it again";
                    out.write(ws, rules::error_frame("busy", text));
                    return Handled::Now;
                }
                let Some(socket) = self.sockets.get(&ws) else {
                    return Handled::Now;
                };
                let author = socket.alias.clone().unwrap_or_else(|| DEFAULT_ALIAS.into());
                let post = NewMessage {
                    from: ws,
                    seq,
                    // Unique across gateway runs and retries of this frame.
                    key: format!("{:016x}:{ws:x}:{seq}", socket.boot),
                    posted: std::time::Instant::now(),
                    author,
                    message,
                };
                let refused = match self.backplane.post(post) {
                    Ok(()) => return Handled::Later,
                    Err(Error::LogBusy) => rules::error_frame(
                        "busy",
                        "server is busy, message not stored; send it again",
                    ),
                    Err(Error::LogUnavailable) => rules::error_frame(
                        "log_unavailable",
                        "the message log is unavailable; message not stored, send it again",
                    ),
                    Err(e) => {
                        warn!(ws_id = ws, error = %e, "cannot post");
                        rules::error_frame("not_stored", "message could not be stored")
                    }
                };
                crate::metrics::posts_refused(1);
                out.write(ws, refused);
                Handled::Now
            }
            Err(e) => {
                debug!(ws_id = ws, error = %e, "bad frame");
                out.write(ws, rules::error_frame(e.code(), &e.to_string()));
                Handled::Now
            }
        }
    }

    fn on_fetch(&mut self, ws: WsId, after: u64, budget: Budget, out: &mut Outbox<'_>) {
        // The oldest missed messages first, so the socket sees every one in
        // order; the gateway asks again until `complete`.
        let limit = match budget.messages {
            0 => MAX_REPLAY,
            n => n.min(MAX_REPLAY),
        };
        let max_bytes = if budget.bytes == 0 {
            usize::MAX
        } else {
            budget.bytes
        };
        let upto = self.last_delivered.min(after.saturating_add(limit as u64));
        let mut frames = Frames {
            fetched: true,
            ..Frames::default()
        };
        let mut reached = after;
        match self.backplane.history(after, upto, limit) {
            Ok(messages) => {
                let first = messages.first().map_or(upto + 1, |m| m.id);
                if first > after + 1 {
                    frames.push(rules::gap_frame(after, first - after - 1), 0);
                    reached = first - 1;
                }
                let mut bytes = 0;
                for m in &messages {
                    let frame = rules::chat_frame(m);
                    bytes += frame.len();
                    // At least one message, so every answer makes progress.
                    if bytes > max_bytes && reached > after {
                        break;
                    }
                    frames.push(frame, m.id);
                    reached = m.id;
                }
            }
            Err(e) => warn!(ws_id = ws, error = %e, "cannot read history"),
        }
        frames.complete = reached >= self.last_delivered;
        out.write_frames(ws, frames);
    }

    fn on_close(&mut self, ws: WsId, boot: u64, _out: &mut Outbox<'_>) {
        self.sockets.remove(&ws);
        self.backplane.remove_user(ws, boot);
        self.users_changed();
    }

    fn on_detach(&mut self, ws: WsId) {
        // Its presence stays: the gateway's lease holds it.
        self.sockets.remove(&ws);
    }

    fn hold_lists(&mut self, held: bool) {
        self.userlist.held = held;
    }

    async fn next_event(&mut self) -> ChatEvent {
        let due = self.userlist.pacer.due().filter(|_| !self.userlist.held);
        let look = self.userlist.pacer.next_look();
        tokio::select! {
            event = self.backplane.next_event() => ChatEvent::Backplane(event),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                ChatEvent::SendUserlist
            }
            _ = tokio::time::sleep_until(look.unwrap_or_else(Instant::now)), if look.is_some() => {
                ChatEvent::ListDrain
            }
        }
    }

    async fn on_event(&mut self, event: ChatEvent, out: &mut Outbox<'_>) {
        match event {
            ChatEvent::Backplane(backplane::Event::Committed(batch)) => {
                for m in batch {
                    if m.id <= self.last_delivered {
                        continue;
                    }
                    out.broadcast(rules::chat_frame(&m), m.id);
                    self.last_delivered = m.id;
                    crate::metrics::message_committed();
                }
            }
            ChatEvent::Backplane(backplane::Event::Stored(acks)) => {
                for (ws, seq) in acks {
                    out.ack(ws, seq);
                }
            }
            ChatEvent::Backplane(backplane::Event::Rejected {
                messages,
                code,
                reason,
            }) => {
                crate::metrics::posts_refused(messages.len());
                for m in messages {
                    out.write(m.from, rules::error_frame(code, &reason));
                    out.ack(m.from, m.seq);
                }
            }
            ChatEvent::Backplane(backplane::Event::UsersChanged) => self.users_changed(),
            ChatEvent::Backplane(backplane::Event::LogReset) => {
                // Every socket starts over on the new log.
                self.last_delivered = self.backplane.last_id();
                let log = self.backplane.log_id().to_owned();
                for ws in self.sockets.keys() {
                    let wsid = sharedconn_proto::ws_id_string(*ws);
                    let mut frames = Frames {
                        log: log.clone(),
                        place: self.last_delivered,
                        ..Frames::default()
                    };
                    frames.push(rules::status_frame(&wsid, &log), 0);
                    out.write_frames(*ws, frames);
                }
            }
            ChatEvent::SendUserlist => self.send_userlist(out),
            ChatEvent::ListDrain => {
                let now = Instant::now();
                if out.queued_bytes() <= self.userlist.drained_at {
                    self.userlist.pacer.drained(now);
                } else {
                    self.userlist.pacer.looked(now);
                }
            }
        }
    }
}

/// A list's version: a hash of its bytes, the same on every worker that
/// builds the same list (never 0, which means "none").
fn list_version(frame: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    hasher.write(frame);
    hasher.finish() | 1
}

#[cfg(test)]
mod tests {
    use sharedconn_proto::worker_command::Command;
    use tokio::sync::mpsc;

    use super::*;
    use crate::backplane::embedded::Embedded;
    use crate::router::{Peer, Router};

    /// A chat over a real embedded log, with one stream whose commands the
    /// test reads.
    fn chat(
        dir: &std::path::Path,
    ) -> (
        Chat<Embedded>,
        Router,
        mpsc::Receiver<sharedconn_proto::WorkerCommand>,
    ) {
        let chat = Chat::new(
            Embedded::open(dir, crate::backplane::embedded::Options::new(50)).unwrap(),
            50,
            Duration::from_millis(100),
        );
        let (router, rx) = one_stream();
        (chat, router, rx)
    }

    /// A router with one stream (id 1) whose commands the test reads.
    fn one_stream() -> (Router, mpsc::Receiver<sharedconn_proto::WorkerCommand>) {
        let mut router = Router::default();
        let (tx, rx) = mpsc::channel(1024);
        let peer = Peer { tag: 0, boot: 1 };
        router.add_stream(
            1,
            peer,
            tx,
            Default::default(),
            tokio::sync::oneshot::channel().0,
        );
        (router, rx)
    }

    fn userlists(rx: &mut mpsc::Receiver<sharedconn_proto::WorkerCommand>) -> Vec<String> {
        let mut lists = Vec::new();
        while let Ok(cmd) = rx.try_recv() {
            if let Some(Command::Deliver(d)) = cmd.command {
                for text in d.texts {
                    let text = String::from_utf8(text.to_vec()).unwrap();
                    if text.contains("\"userlist\"") {
                        lists.push(text);
                    }
                }
            }
        }
        lists
    }

    fn open(boot: u64, opened_ms: u64) -> OpenInfo {
        OpenInfo {
            boot,
            opened_ms,
            ..OpenInfo::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn joins_within_the_interval_make_one_list() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chat, mut router, mut rx) = chat(dir.path());
        for ws in 1..=3 {
            router.add_socket(ws, 1);
            chat.on_open(ws, open(1, ws), &mut Outbox::new(&mut router))
                .await;
        }
        // Each open got the (empty) list on its own.
        assert_eq!(userlists(&mut rx).len(), 3);
        for (ws, name) in [(1, "a"), (2, "b"), (3, "c")] {
            let frame = format!(r#"{{"User":"{name}"}}"#);
            chat.on_frame(ws, 1, &frame, &mut Outbox::new(&mut router))
                .await;
        }
        assert!(
            userlists(&mut rx).is_empty(),
            "nothing sent before the interval"
        );
        let event = until_a_list_is_due(&mut chat, &mut router).await;
        chat.on_event(event, &mut Outbox::new(&mut router)).await;
        let lists = userlists(&mut rx);
        assert_eq!(lists.len(), 1);
        assert_eq!(
            lists[0],
            r#"{"Type":"userlist","Users":[{"User":"a"},{"User":"b"},{"User":"c"}]}"#
        );
        // A change right after a send waits for the next interval.
        chat.on_close(2, 1, &mut Outbox::new(&mut router));
        let before = Instant::now();
        until_a_list_is_due(&mut chat, &mut router).await;
        assert!(Instant::now() - before >= Duration::from_millis(99));
    }

    /// Handles the chat's own events (looks at the queues, the log's
    /// events) until a list is due, and returns that event unhandled.
    async fn until_a_list_is_due(chat: &mut Chat<Embedded>, router: &mut Router) -> ChatEvent {
        loop {
            let event = chat.next_event().await;
            if matches!(event, ChatEvent::SendUserlist) {
                return event;
            }
            chat.on_event(event, &mut Outbox::new(router)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_slow_to_leave_holds_the_next_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chat, _, _) = chat(dir.path());
        let mut router = Router::default();
        let (tx, mut rx) = mpsc::channel(1024);
        let backlog = Arc::new(crate::router::Backlog::default());
        let peer = Peer { tag: 0, boot: 1 };
        let cut = tokio::sync::oneshot::channel().0;
        router.add_stream(1, peer, tx, backlog.clone(), cut);
        for (ws, name) in [(1, "a"), (2, "b")] {
            router.add_socket(ws, 1);
            chat.on_open(ws, open(1, ws), &mut Outbox::new(&mut router))
                .await;
            let frame = format!(r#"{{"User":"{name}"}}"#);
            chat.on_frame(ws, 1, &frame, &mut Outbox::new(&mut router))
                .await;
        }
        let event = until_a_list_is_due(&mut chat, &mut router).await;
        chat.on_event(event, &mut Outbox::new(&mut router)).await;
        // The gateway takes a second to read what is queued.
        tokio::time::sleep(Duration::from_secs(1)).await;
        while let Ok(command) = rx.try_recv() {
            backlog.sent(&command.command.unwrap());
        }
        // The chat sees the list gone at its next look, even while a socket
        // event every 10 ms makes the runtime drop `next_event` each time.
        let mut looked = false;
        for _ in 0..10 {
            let busy = Duration::from_millis(10);
            if let Ok(event) = tokio::time::timeout(busy, chat.next_event()).await {
                looked = matches!(event, ChatEvent::ListDrain);
                chat.on_event(event, &mut Outbox::new(&mut router)).await;
                if looked {
                    break;
                }
            }
        }
        assert!(looked, "no look at the queues under a busy runtime");
        // A change now waits three times as long, not the 100 ms interval.
        chat.on_close(2, 1, &mut Outbox::new(&mut router));
        let drained = Instant::now();
        until_a_list_is_due(&mut chat, &mut router).await;
        let waited = Instant::now() - drained;
        assert!(waited >= Duration::from_secs(3), "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_gateway_whose_lease_runs_out_leaves_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chat, mut router, _rx) = chat(dir.path());
        chat.gateway_up(7, 7);
        router.add_socket(1, 1);
        let mut info = open(7, 1);
        info.state = Bytes::from_static(b"ann");
        info.resume = true;
        chat.on_open(1, info, &mut Outbox::new(&mut router)).await;
        assert_eq!(chat.backplane.users(), ["ann"]);
        chat.on_detach(1);
        chat.gateway_down(7);
        assert_eq!(chat.backplane.users(), ["ann"], "held by the lease");
        loop {
            let event = chat.next_event().await;
            if let ChatEvent::Backplane(backplane::Event::UsersChanged) = event {
                break;
            }
            chat.on_event(event, &mut Outbox::new(&mut router)).await;
        }
        assert!(chat.backplane.users().is_empty());
    }

    /// The version of the last list among the commands read.
    fn last_list_version(rx: &mut mpsc::Receiver<sharedconn_proto::WorkerCommand>) -> u64 {
        let mut version = 0;
        while let Ok(cmd) = rx.try_recv() {
            if let Some(Command::Deliver(d)) = cmd.command
                && d.version != 0
            {
                version = d.version;
            }
        }
        version
    }

    /// The embedded log whose reads fail, as a disk that went bad would.
    struct Unreadable(Embedded);

    impl Backplane for Unreadable {
        fn gateway_up(&mut self, boot: u64, tag: u32) -> bool {
            self.0.gateway_up(boot, tag)
        }
        fn gateway_down(&mut self, boot: u64) {
            self.0.gateway_down(boot)
        }
        fn set_user(&mut self, user: Presence) -> bool {
            self.0.set_user(user)
        }
        fn remove_user(&mut self, ws: WsId, boot: u64) {
            self.0.remove_user(ws, boot)
        }
        fn users(&self) -> Vec<String> {
            self.0.users()
        }
        fn alias_holder(&self, alias: &str, ws: WsId) -> Option<WsId> {
            self.0.alias_holder(alias, ws)
        }
        fn post(&mut self, message: NewMessage) -> Result<(), Error> {
            self.0.post(message)
        }
        fn history(
            &mut self,
            _after: u64,
            _upto: u64,
            _limit: usize,
        ) -> Result<Vec<Arc<backplane::StoredMessage>>, Error> {
            Err(Error::LogClosed)
        }
        fn last_id(&self) -> u64 {
            self.0.last_id()
        }
        fn log_id(&self) -> &str {
            self.0.log_id()
        }
        fn healthy(&self) -> bool {
            self.0.healthy()
        }
        fn next_event(&mut self) -> impl Future<Output = backplane::Event> + Send {
            self.0.next_event()
        }
    }

    #[tokio::test]
    async fn a_replay_the_log_cannot_give_leaves_the_socket_behind_not_short() {
        let dir = tempfile::tempdir().unwrap();
        let embedded =
            Embedded::open(dir.path(), crate::backplane::embedded::Options::new(50)).unwrap();
        let log = embedded.log_id().to_owned();
        let mut chat = Chat::new(Unreadable(embedded), 50, Duration::from_millis(100));
        let (mut router, mut rx) = one_stream();
        router.add_socket(1, 1);
        let info = OpenInfo {
            resume: true,
            log,
            ..open(1, 1)
        };
        chat.on_open(1, info, &mut Outbox::new(&mut router)).await;
        let behind = std::iter::from_fn(|| rx.try_recv().ok())
            .any(|c| matches!(c.command, Some(Command::Deliver(d)) if d.behind && d.ws_ids == [1]));
        assert!(
            behind,
            "a re-attached socket whose replay failed is told it is behind"
        );

        // The history a new socket is shown is a courtesy: nothing is owed.
        let mut frames = Frames::default();
        chat.replay(&mut frames, None);
        assert!(!frames.behind);
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_attached_socket_gets_the_list_only_if_it_missed_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chat, mut router, mut rx) = chat(dir.path());
        router.add_socket(1, 1);
        chat.on_open(1, open(1, 1), &mut Outbox::new(&mut router))
            .await;
        let version = last_list_version(&mut rx);
        assert_ne!(version, 0, "an opening socket's list carries its version");
        let log = chat.backplane.log_id().to_owned();
        let resume = |version| OpenInfo {
            resume: true,
            log: log.clone(),
            version,
            ..open(1, 1)
        };
        // Its gateway queued the current list: nothing to send.
        let info = resume(version);
        router.add_socket(1, 1);
        chat.on_open(1, info, &mut Outbox::new(&mut router)).await;
        assert!(userlists(&mut rx).is_empty(), "no list sent again");
        // Its gateway lost the list (a cut stream, an overflow): sent again.
        let info = resume(0);
        chat.on_open(1, info, &mut Outbox::new(&mut router)).await;
        assert_eq!(userlists(&mut rx).len(), 1, "the missed list is sent");
    }
}

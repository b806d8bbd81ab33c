//! The seed's `Chat.Server`, as a [`WebSocketApp`] over a [`Backplane`].
//!
//! - open: Status frame with the WebSocket ID, then recent history, then the
//!   online list;
//! - `{"User":..}`: set the alias; the online list goes to everyone;
//! - `{"Message":..}`: post under the alias the server holds (a client cannot
//!   write as someone else); the message reaches every socket once the log
//!   has given it an id, so every client sees the log's order;
//! - close: drop the user; the online list goes to everyone.
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

use crate::app::{Outbox, WebSocketApp, WsId};
use crate::backplane::{self, Backplane, NewMessage};
use crate::error::Error;
use pacer::Pacer;
use rules::{ClientFrame, DEFAULT_ALIAS};

/// Most messages replayed to a client that reconnects with `since` (older
/// ones are announced with a Gap frame). Well under the gateway's default
/// socket queue (1024), so live messages arriving during the replay fit too.
pub const MAX_REPLAY: usize = 500;

pub struct Chat<B> {
    backplane: B,
    history: usize,
    /// Aliases of this worker's sockets; the backplane has everyone's.
    aliases: HashMap<WsId, Arc<str>>,
    /// The highest message id broadcast. History for a new socket stops
    /// here, and live messages start after it: no gap, no duplicate.
    last_delivered: u64,
    userlist: UserlistState,
}

struct UserlistState {
    pacer: Pacer,
    /// The current list, for sockets that open while nothing is pending.
    frame: Option<Bytes>,
}

/// What the chat waits for besides socket events.
#[derive(Debug)]
pub enum ChatEvent {
    Backplane(backplane::Event),
    SendUserlist,
}

impl<B: Backplane> Chat<B> {
    pub fn new(backplane: B, history: usize, userlist_interval: Duration) -> Self {
        let last_delivered = backplane.last_id();
        Chat {
            backplane,
            history,
            aliases: HashMap::new(),
            last_delivered,
            userlist: UserlistState {
                pacer: Pacer::new(userlist_interval, Instant::now()),
                frame: None,
            },
        }
    }

    fn users_changed(&mut self) {
        self.userlist.pacer.changed(Instant::now());
        self.userlist.frame = None;
    }

    async fn send_userlist(&mut self, out: &mut Outbox<'_>) {
        let users = match self.backplane.users().await {
            Ok(users) => users,
            Err(e) => {
                warn!(error = %e, "cannot read the online list");
                self.userlist.pacer.retry(Instant::now());
                return;
            }
        };
        let frame = Bytes::from(rules::userlist_frame(&users));
        debug!(
            users = users.len(),
            bytes = frame.len(),
            sockets = out.open_sockets(),
            "online list sent"
        );
        self.userlist
            .pacer
            .sent(Instant::now(), frame.len(), out.open_sockets());
        out.broadcast(frame.clone());
        self.userlist.frame = Some(frame);
    }
}

impl<B: Backplane> WebSocketApp for Chat<B> {
    type Event = ChatEvent;

    async fn on_open(&mut self, ws: WsId, since: u64, out: &mut Outbox<'_>) {
        // Everything an opening socket gets goes out as one command, so a
        // burst of (re)connections costs its stream one slot each.
        let wsid = sharedconn_proto::ws_id_string(ws);
        let mut frames = vec![Bytes::from(rules::status_frame(
            &wsid,
            self.backplane.log_id(),
        ))];
        if let Err(e) = self.backplane.connect(ws).await {
            warn!(ws_id = ws, error = %e, "cannot record connection");
        }
        let (after, limit) = if since > 0 {
            (since, MAX_REPLAY)
        } else {
            (0, self.history)
        };
        match self
            .backplane
            .history(after, self.last_delivered, limit)
            .await
        {
            Ok(messages) => {
                // A reconnecting client that missed more than we replay is
                // told how many it will not see, rather than left with a
                // silent hole.
                if let Some(first) = messages.first()
                    && since > 0
                    && first.id > since + 1
                {
                    frames.push(rules::gap_frame(since, first.id - since - 1).into());
                }
                frames.extend(messages.iter().map(|m| Bytes::from(rules::chat_frame(m))));
            }
            Err(e) => warn!(ws_id = ws, error = %e, "cannot read history"),
        }
        // While a list is pending, it will reach this socket too.
        if !self.userlist.pacer.is_dirty() {
            if self.userlist.frame.is_none() {
                let users = self.backplane.users().await.unwrap_or_default();
                self.userlist.frame = Some(rules::userlist_frame(&users).into());
            }
            frames.extend(self.userlist.frame.clone());
        }
        out.write_frames(ws, frames);
    }

    async fn on_frame(&mut self, ws: WsId, text: &str, out: &mut Outbox<'_>) {
        match rules::parse(text) {
            Ok(ClientFrame::User(alias)) => {
                if let Err(e) = self.backplane.set_alias(ws, &alias).await {
                    warn!(ws_id = ws, error = %e, "cannot set alias");
                }
                self.aliases.insert(ws, alias.into());
                self.users_changed();
            }
            Ok(ClientFrame::Message(message)) => {
                let author = self
                    .aliases
                    .get(&ws)
                    .cloned()
                    .unwrap_or_else(|| DEFAULT_ALIAS.into());
                let post = NewMessage {
                    from: ws,
                    author,
                    message,
                };
                match self.backplane.post(post).await {
                    Ok(()) => {}
                    Err(Error::LogBusy) => out.write(
                        ws,
                        rules::error_frame(
                            "busy",
                            "server is busy, message not stored; send it again",
                        ),
                    ),
                    Err(e) => {
                        warn!(ws_id = ws, error = %e, "cannot post");
                        out.write(
                            ws,
                            rules::error_frame("not_stored", "message could not be stored"),
                        );
                    }
                }
            }
            Err(e) => {
                debug!(ws_id = ws, error = %e, "bad frame");
                out.write(ws, rules::error_frame(e.code(), &e.to_string()));
            }
        }
    }

    async fn on_close(&mut self, ws: WsId, _out: &mut Outbox<'_>) {
        if let Err(e) = self.backplane.disconnect(ws).await {
            warn!(ws_id = ws, error = %e, "cannot forget connection");
        }
        if self.aliases.remove(&ws).is_some() {
            self.users_changed();
        }
    }

    async fn next_event(&mut self) -> ChatEvent {
        let due = self.userlist.pacer.due();
        tokio::select! {
            event = self.backplane.next_event() => ChatEvent::Backplane(event),
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                ChatEvent::SendUserlist
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
                    out.broadcast(rules::chat_frame(&m));
                    self.last_delivered = m.id;
                }
            }
            ChatEvent::Backplane(backplane::Event::Rejected(messages, reason)) => {
                for m in messages {
                    out.write(m.from, rules::error_frame("not_stored", &reason));
                }
            }
            ChatEvent::Backplane(backplane::Event::UsersChanged) => self.users_changed(),
            ChatEvent::SendUserlist => self.send_userlist(out).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use sharedconn_proto::worker_command::Command;
    use tokio::sync::mpsc;

    use super::*;
    use crate::backplane::embedded::Embedded;

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
            Embedded::open(dir, 50).unwrap(),
            50,
            Duration::from_millis(100),
        );
        let mut router = Router::default();
        let (tx, rx) = mpsc::channel(1024);
        router.add_stream(1, tx, Default::default(), tokio::sync::oneshot::channel().0);
        (chat, router, rx)
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

    use crate::router::Router;

    #[tokio::test(start_paused = true)]
    async fn joins_within_the_interval_make_one_list() {
        let dir = tempfile::tempdir().unwrap();
        let (mut chat, mut router, mut rx) = chat(dir.path());
        for ws in 1..=3 {
            router.add_socket(ws, 1);
            chat.on_open(ws, 0, &mut Outbox::new(&mut router)).await;
        }
        // Each open got the (empty) list on its own.
        assert_eq!(userlists(&mut rx).len(), 3);
        for (ws, name) in [(1, "a"), (2, "b"), (3, "c")] {
            let frame = format!(r#"{{"User":"{name}"}}"#);
            chat.on_frame(ws, &frame, &mut Outbox::new(&mut router))
                .await;
        }
        assert!(
            userlists(&mut rx).is_empty(),
            "nothing sent before the interval"
        );
        let event = chat.next_event().await;
        assert!(matches!(event, ChatEvent::SendUserlist));
        chat.on_event(event, &mut Outbox::new(&mut router)).await;
        let lists = userlists(&mut rx);
        assert_eq!(
            lists,
            vec![
                r#"{"Type":"userlist","Users":[{"User":"a"},{"User":"b"},{"User":"c"}]}"#
                    .to_owned()
            ]
        );
        // A change right after a send waits for the next interval.
        chat.on_close(2, &mut Outbox::new(&mut router)).await;
        let before = Instant::now();
        let event = chat.next_event().await;
        assert!(matches!(event, ChatEvent::SendUserlist));
        assert!(Instant::now() - before >= Duration::from_millis(99));
    }
}

//! What IRIS keeps in globals — live connections (`^Chat.WebSocketConnections`),
//! users (`^Chat.Users`), the message log (`^Chat.Messages`) — and how workers
//! hear about each other's changes.
//!
//! The contract: [`Backplane::post`] only queues a message. It comes back,
//! with its id, from [`Backplane::next_event`] once it is durable, in the one
//! order that every worker sharing the backplane sees. The chat delivers what
//! comes back, never what it posted, so all clients see that same order. A
//! post carries an idempotency key: posting it again (a gateway retrying
//! after a worker died) stores it once.
//!
//! Presence belongs to gateways, not to workers: each user is recorded under
//! the run (`boot`) of the gateway holding its socket, and stays while some
//! worker holds that gateway's lease ([`Backplane::gateway_up`]). When every
//! link to a gateway is gone for the lease time, its users leave. Nothing
//! here waits on the network in the runtime's path: writes are queued to a
//! backplane task, and reads come from local state kept current by events.
//!
//! - [`embedded`]: one worker; presence in memory, the log in redb.
//! - [`redis`]: any number of workers sharing one Redis.
//! - [`presence`]: the local copy of the online list both keep.

pub mod embedded;
pub mod presence;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::app::WsId;
use crate::error::Error;

/// A message waiting for its id.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Who sent it, and which of its frames this was: told when it is
    /// stored (an ack) or cannot be.
    pub from: WsId,
    pub seq: u64,
    /// Unique per post across the cluster and gateway restarts: a post sent
    /// again with the same key is stored once.
    pub key: String,
    /// When the chat posted it: the post-to-commit latency starts here.
    pub posted: std::time::Instant,
    pub author: Arc<str>,
    /// Base64, as the client sent it (checked).
    pub message: String,
}

/// A message in the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    pub author: String,
    pub message: String,
    /// `YYYY-MM-DD HH:MM:SS`, UTC, stamped when the id was assigned.
    pub sent: String,
    /// The post's idempotency key (empty in logs written before keys).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
}

/// One entry of the online list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub ws: WsId,
    /// The run of the gateway holding the socket.
    pub boot: u64,
    pub alias: Arc<str>,
    /// When the socket opened: the list is oldest socket first.
    pub opened_ms: u64,
}

/// What a backplane tells the chat.
#[derive(Debug)]
pub enum Event {
    /// These messages are durable, in log order (ids increasing).
    Committed(Vec<Arc<StoredMessage>>),
    /// These posts of this worker are durable (or were already): `(from, seq)`.
    Stored(Vec<(WsId, u64)>),
    /// These messages could not be stored; their senders should be told.
    Rejected {
        messages: Vec<NewMessage>,
        code: &'static str,
        reason: String,
    },
    /// The online list changed.
    UsersChanged,
    /// The log lost its data and has a new name; ids start over.
    LogReset,
}

/// Shared chat state. Called only from the runtime task; no method waits on
/// the network.
pub trait Backplane: Send + 'static {
    /// A stream from gateway run `boot` is up on this worker: hold its lease.
    /// A run with the same `tag` seen before is gone: its users leave now.
    /// Returns whether the local list changed (changes made elsewhere come
    /// as [`Event::UsersChanged`]).
    fn gateway_up(&mut self, boot: u64, tag: u32) -> bool;
    /// No stream from `boot` is left on this worker: stop holding its lease.
    fn gateway_down(&mut self, boot: u64);
    /// Adds or updates a user (an alias was set, or a socket re-attached).
    /// Returns whether the local list changed, as for `gateway_up`.
    fn set_user(&mut self, user: Presence) -> bool;
    /// A socket closed: its user leaves.
    fn remove_user(&mut self, ws: WsId, boot: u64);
    /// The online list: one alias per socket that set one, oldest first.
    fn users(&self) -> Vec<String>;
    /// A socket other than `ws` listed under `alias`, as far as this worker
    /// knows (with Redis, other workers' renames arrive within milliseconds).
    fn alias_holder(&self, alias: &str, ws: WsId) -> Option<WsId>;
    /// Queues a message for the log; see the module docs. Never waits: a full
    /// queue is `Error::LogBusy`, answered to the sender.
    fn post(&mut self, message: NewMessage) -> Result<(), Error>;
    /// Up to `limit` messages with `after < id <= upto`, oldest first; the most
    /// recent ones when more match.
    fn history(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>, Error>;
    /// The newest id in the log that this worker has seen committed.
    fn last_id(&self) -> u64;
    /// Names this message log: a new log (its data wiped) gets a new name, so
    /// a client holding ids from the old one knows to drop them.
    fn log_id(&self) -> &str;
    /// Whether the log can take posts now.
    fn healthy(&self) -> bool;
    /// Waits for the next event. Cancel-safe.
    fn next_event(&mut self) -> impl Future<Output = Event> + Send;
}

/// Up to `limit` messages of `cache` (oldest first) with `after < id <= upto`:
/// the most recent ones when more match.
pub(crate) fn recent(
    cache: &std::collections::VecDeque<Arc<StoredMessage>>,
    after: u64,
    upto: u64,
    limit: usize,
) -> Vec<Arc<StoredMessage>> {
    let picked: Vec<_> = cache
        .iter()
        .filter(|m| m.id > after && m.id <= upto)
        .cloned()
        .collect();
    let skip = picked.len().saturating_sub(limit);
    picked.into_iter().skip(skip).collect()
}

/// Queues a post for a backplane's writer without waiting: a full queue is
/// `LogBusy` (answered to the sender), a closed one `LogClosed`.
pub(crate) fn queue_post(
    posts: &tokio::sync::mpsc::Sender<NewMessage>,
    message: NewMessage,
) -> Result<(), Error> {
    use tokio::sync::mpsc::error::TrySendError;
    posts.try_send(message).map_err(|e| match e {
        TrySendError::Full(_) => Error::LogBusy,
        TrySendError::Closed(_) => Error::LogClosed,
    })
}

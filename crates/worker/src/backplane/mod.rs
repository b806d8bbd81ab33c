//! What IRIS keeps in globals — live connections (`^Chat.WebSocketConnections`),
//! users (`^Chat.Users`), the message log (`^Chat.Messages`) — and how workers
//! hear about each other's changes.
//!
//! The contract: [`Backplane::post`] only queues a message. It comes back,
//! with its id, from [`Backplane::next_event`] once it is durable, in the one
//! order that every worker sharing the backplane sees. The chat delivers what
//! comes back, never what it posted, so all clients see that same order.

pub mod embedded;

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::app::WsId;
use crate::error::Error;

/// A message waiting for its id.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Who sent it; told when it cannot be stored.
    pub from: WsId,
    pub author: Arc<str>,
    /// Base64 of UTF-8 text, as the client sent it (checked).
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
}

/// What a backplane tells the chat.
#[derive(Debug)]
pub enum Event {
    /// These messages are durable, in log order (ids increasing).
    Committed(Vec<Arc<StoredMessage>>),
    /// These messages could not be stored; their senders should be told.
    Rejected(Vec<NewMessage>, String),
    /// Another worker changed the online list.
    UsersChanged,
}

/// Shared chat state. Called only from the runtime task.
pub trait Backplane: Send + 'static {
    /// Records an open socket.
    fn connect(&mut self, ws: WsId) -> impl Future<Output = Result<(), Error>> + Send;
    /// Forgets a socket and its alias.
    fn disconnect(&mut self, ws: WsId) -> impl Future<Output = Result<(), Error>> + Send;
    /// Sets the alias shown in the online list.
    fn set_alias(
        &mut self,
        ws: WsId,
        alias: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// The online list: one alias per socket that set one, oldest socket first.
    fn users(&mut self) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
    /// Queues a message for the log; see the module docs. Never waits: a full
    /// queue is `Error::LogBusy`, answered to the sender.
    fn post(&mut self, message: NewMessage) -> impl Future<Output = Result<(), Error>> + Send;
    /// Up to `limit` messages with `after < id <= upto`, oldest first; the most
    /// recent ones when more match.
    fn history(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Arc<StoredMessage>>, Error>> + Send;
    /// The newest id in the log when the backplane was opened.
    fn last_id(&self) -> u64;
    /// Names this message log: a new log (its data wiped) gets a new name, so
    /// a client holding ids from the old one knows to drop them.
    fn log_id(&self) -> &str;
    /// Waits for the next event. Cancel-safe.
    fn next_event(&mut self) -> impl Future<Output = Event> + Send;
}

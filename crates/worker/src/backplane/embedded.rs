//! The single-worker backplane: presence in memory, the message log in redb.
//!
//! Posts go to a writer thread over a bounded queue. The thread takes
//! whatever is queued (up to [`MAX_BATCH`]), assigns ids, writes the batch in
//! one transaction and fsyncs once (group commit), then reports the batch as
//! `Committed`. Recent messages are cached in memory so a burst of opens does
//! not read the disk.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;
use tracing::{error, info};

use super::{Backplane, Event, NewMessage, StoredMessage};
use crate::app::WsId;
use crate::chat::rules;
use crate::error::Error;

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Posts waiting for the writer. Deep enough to absorb a burst while one
/// fsync is under way; when full, a post is refused with a clear answer
/// rather than stalling the runtime (see `Backplane::post`).
const POST_QUEUE: usize = 16 * 1024;
/// Committed batches waiting for the runtime. The writer waits when full,
/// which backs up `POST_QUEUE`.
const EVENT_QUEUE: usize = 256;
/// Most messages written in one transaction.
const MAX_BATCH: usize = 1024;
/// Fewest recent messages kept in memory.
const MIN_CACHE: usize = 1024;

pub struct Embedded {
    db: Arc<Database>,
    posts: Option<mpsc::Sender<NewMessage>>,
    events: mpsc::Receiver<Event>,
    writer: Option<JoinHandle<()>>,
    /// The most recent committed messages, oldest first.
    cache: VecDeque<Arc<StoredMessage>>,
    cache_size: usize,
    last_id: u64,
    log_id: String,
    /// Alias per socket; `BTreeMap` so the list comes out oldest socket first.
    users: BTreeMap<WsId, String>,
}

impl Embedded {
    /// Opens (or creates) `data_dir/chat.redb`.
    pub fn open(data_dir: &Path, history: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("chat.redb");
        let db = Arc::new(Database::create(&path)?);
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        let log_id = {
            let mut meta = txn.open_table(META)?;
            let existing = meta.get("log_id")?.map(|v| v.value().to_owned());
            match existing {
                Some(id) => id,
                None => {
                    let id = format!("{:016x}", rand::random::<u64>());
                    meta.insert("log_id", id.as_str())?;
                    id
                }
            }
        };
        txn.commit()?;

        let cache_size = history.max(MIN_CACHE);
        let cache = read_range(&db, 0, u64::MAX, cache_size)?;
        let last_id = cache.back().map_or(0, |m| m.id);
        info!(path = %path.display(), last_id, log_id, "message log open");

        let (posts, queue) = mpsc::channel(POST_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("message-log".into())
            .spawn(move || write_loop(writer_db, last_id, queue, events_tx))?;
        Ok(Embedded {
            db,
            posts: Some(posts),
            events,
            writer: Some(writer),
            cache,
            cache_size,
            last_id,
            log_id,
            users: BTreeMap::new(),
        })
    }
}

impl Drop for Embedded {
    /// Lets the writer commit what is queued and close the file, so the next
    /// worker on this directory can open it at once.
    fn drop(&mut self) {
        self.posts.take();
        self.events.close();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Backplane for Embedded {
    async fn connect(&mut self, _ws: WsId) -> Result<(), Error> {
        Ok(())
    }

    async fn disconnect(&mut self, ws: WsId) -> Result<(), Error> {
        self.users.remove(&ws);
        Ok(())
    }

    async fn set_alias(&mut self, ws: WsId, alias: &str) -> Result<(), Error> {
        self.users.insert(ws, alias.to_owned());
        Ok(())
    }

    async fn users(&mut self) -> Result<Vec<String>, Error> {
        Ok(self.users.values().cloned().collect())
    }

    async fn post(&mut self, message: NewMessage) -> Result<(), Error> {
        let posts = self.posts.as_ref().ok_or(Error::LogClosed)?;
        posts.try_send(message).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::LogBusy,
            mpsc::error::TrySendError::Closed(_) => Error::LogClosed,
        })
    }

    async fn history(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>, Error> {
        if limit == 0 || after >= upto {
            return Ok(Vec::new());
        }
        let cached_from = self.cache.front().map_or(u64::MAX, |m| m.id);
        let wanted_from = upto.saturating_sub(limit as u64).max(after) + 1;
        if wanted_from >= cached_from || self.last_id == 0 {
            let picked: Vec<_> = self
                .cache
                .iter()
                .filter(|m| m.id > after && m.id <= upto)
                .cloned()
                .collect();
            let skip = picked.len().saturating_sub(limit);
            return Ok(picked.into_iter().skip(skip).collect());
        }
        Ok(read_range(&self.db, after, upto, limit)?.into())
    }

    fn last_id(&self) -> u64 {
        self.last_id
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    async fn next_event(&mut self) -> Event {
        let Some(event) = self.events.recv().await else {
            // The writer is gone (it only stops on drop); wait forever.
            return std::future::pending().await;
        };
        if let Event::Committed(batch) = &event {
            for m in batch {
                self.cache.push_back(m.clone());
                self.last_id = m.id;
            }
            while self.cache.len() > self.cache_size {
                self.cache.pop_front();
            }
        }
        event
    }
}

/// Up to `limit` messages with `after < id <= upto`, the newest ones, oldest first.
fn read_range(
    db: &Database,
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<VecDeque<Arc<StoredMessage>>, Error> {
    let txn = db.begin_read()?;
    let table = txn.open_table(MESSAGES)?;
    let mut out = VecDeque::with_capacity(limit.min(4096));
    if after >= upto {
        return Ok(out);
    }
    for entry in table.range((after + 1)..=upto)?.rev().take(limit) {
        let (_, value) = entry?;
        out.push_front(Arc::new(serde_json::from_slice(value.value())?));
    }
    Ok(out)
}

fn write_loop(
    db: Arc<Database>,
    mut last_id: u64,
    mut queue: mpsc::Receiver<NewMessage>,
    events: mpsc::Sender<Event>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let sent = rules::sent_stamp(time::OffsetDateTime::now_utc());
        let stored: Vec<Arc<StoredMessage>> = batch
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Arc::new(StoredMessage {
                    id: last_id + 1 + i as u64,
                    author: m.author.to_string(),
                    message: m.message.clone(),
                    sent: sent.clone(),
                })
            })
            .collect();
        let event = match commit(&db, &stored) {
            Ok(()) => {
                last_id += stored.len() as u64;
                batch.clear();
                Event::Committed(stored)
            }
            Err(e) => {
                error!(error = %e, messages = batch.len(), "message log write failed");
                Event::Rejected(
                    std::mem::take(&mut batch),
                    "message could not be stored".into(),
                )
            }
        };
        if events.blocking_send(event).is_err() {
            // The backplane was dropped: keep committing what is queued.
            continue;
        }
    }
}

fn commit(db: &Database, messages: &[Arc<StoredMessage>]) -> Result<(), Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(MESSAGES)?;
        for m in messages {
            table.insert(m.id, serde_json::to_vec(m.as_ref())?.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

//! The single-worker backplane: presence in memory, the message log in redb.
//!
//! Posts go to a writer thread over a bounded queue. The thread takes
//! whatever is queued (up to [`MAX_BATCH`]), assigns ids, writes the batch in
//! one transaction and fsyncs once (group commit), then reports the batch as
//! `Committed`. A post whose idempotency key is already in the log (sent
//! again after a worker restart) is acknowledged, not stored twice. Recent
//! messages are cached in memory so a burst of opens does not read the disk.
//!
//! Presence lives in this process only: a worker restart forgets it, and the
//! gateways rebuild it by re-attaching their sockets with their aliases.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;
use tracing::{error, info};

use super::presence::PresenceTable;
use super::{Backplane, Event, NewMessage, Presence, StoredMessage};
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
/// Messages trimmed at once when the log is over its cap: trimming in steps
/// (a quarter of the cap, at most 4096) keeps it off the path of most commits.
fn trim_step(cap: u64) -> u64 {
    (cap / 4).clamp(1, 4096)
}
/// Idempotency keys remembered by the writer: far more posts than can be in
/// flight when a worker dies (each socket has a few unacknowledged at most).
const KEY_MEMORY: usize = 64 * 1024;

/// How the embedded log is kept.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Recent messages sent to an opening socket (the cache holds more).
    pub history: usize,
    /// Users of a gateway with no stream left leave after this.
    pub lease: Duration,
    /// Messages the log keeps; older ones are trimmed.
    pub max_messages: u64,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
}

impl Options {
    pub fn new(history: usize) -> Self {
        Options {
            history,
            lease: Duration::from_secs(10),
            max_messages: 1_000_000,
            cache_bytes: 64 << 20,
        }
    }
}

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
    users: PresenceTable,
    /// Gateway runs and when their users leave (`None`: a stream is up).
    leases: HashMap<u64, Option<Instant>>,
    /// The latest run of each gateway tag.
    tags: HashMap<u32, u64>,
    lease: Duration,
}

impl Embedded {
    /// Opens (or creates) `data_dir/chat.redb`.
    pub fn open(data_dir: &Path, options: Options) -> Result<Self, Error> {
        let Options {
            history,
            lease,
            max_messages,
            cache_bytes,
        } = options;
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("chat.redb");
        let db = Arc::new(
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(&path)?,
        );
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
        let keys = cache
            .iter()
            .filter(|m| !m.key.is_empty())
            .map(|m| (m.key.clone(), m.id))
            .collect();
        let writer = std::thread::Builder::new()
            .name("message-log".into())
            .spawn(move || write_loop(writer_db, last_id, max_messages, keys, queue, events_tx))?;
        Ok(Embedded {
            db,
            posts: Some(posts),
            events,
            writer: Some(writer),
            cache,
            cache_size,
            last_id,
            log_id,
            users: PresenceTable::default(),
            leases: HashMap::new(),
            tags: HashMap::new(),
            lease,
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

impl Embedded {
    /// The gateway run whose lease runs out first, and when.
    fn next_expiry(&self) -> Option<(u64, Instant)> {
        self.leases
            .iter()
            .filter_map(|(boot, at)| at.map(|at| (*boot, at)))
            .min_by_key(|(_, at)| *at)
    }
}

impl Backplane for Embedded {
    fn gateway_up(&mut self, boot: u64, tag: u32) -> bool {
        self.leases.insert(boot, None);
        if let Some(old) = self.tags.insert(tag, boot)
            && old != boot
        {
            // The same gateway restarted: its old run's users are gone.
            self.leases.remove(&old);
            if self.users.remove_boot(old) {
                info!(
                    boot_id = format!("{old:016x}"),
                    "gateway restarted, its users left"
                );
                return true;
            }
        }
        false
    }

    fn gateway_down(&mut self, boot: u64) {
        if let Some(lease) = self.leases.get_mut(&boot) {
            *lease = Some(Instant::now() + self.lease);
        }
    }

    fn set_user(&mut self, user: Presence) -> bool {
        self.users.set(user)
    }

    fn remove_user(&mut self, ws: WsId, _boot: u64) {
        self.users.remove(ws);
    }

    fn users(&self) -> Vec<String> {
        self.users.list()
    }

    fn alias_holder(&self, alias: &str, ws: WsId) -> Option<WsId> {
        self.users.held_by_other(alias, ws)
    }

    fn healthy(&self) -> bool {
        self.posts.as_ref().is_some_and(|p| !p.is_closed())
    }

    fn post(&mut self, message: NewMessage) -> Result<(), Error> {
        let posts = self.posts.as_ref().ok_or(Error::LogClosed)?;
        super::queue_post(posts, message)
    }

    fn history(
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
            return Ok(super::recent(&self.cache, after, upto, limit));
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
        let expiry = self.next_expiry();
        let received = tokio::select! {
            event = self.events.recv() => event,
            _ = tokio::time::sleep_until(expiry.map_or_else(Instant::now, |(_, at)| at)), if expiry.is_some() => {
                let (boot, _) = expiry.expect("guarded by the if");
                self.leases.remove(&boot);
                self.tags.retain(|_, b| *b != boot);
                let left = self.users.len();
                self.users.remove_boot(boot);
                info!(
                    boot_id = format!("{boot:016x}"),
                    users = left - self.users.len(),
                    "gateway lease ran out, its users left"
                );
                return Event::UsersChanged;
            }
        };
        let Some(event) = received else {
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
    max_messages: u64,
    keys: HashMap<String, u64>,
    mut queue: mpsc::Receiver<NewMessage>,
    events: mpsc::Sender<Event>,
) {
    let mut keys = KeyMemory::new(keys);
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
        let posted: Vec<_> = batch.iter().map(|m| m.posted).collect();
        let mut acks = Vec::with_capacity(batch.len());
        let mut fresh = Vec::with_capacity(batch.len());
        let mut stored: Vec<Arc<StoredMessage>> = Vec::with_capacity(batch.len());
        let mut in_batch = HashSet::new();
        for m in batch.drain(..) {
            acks.push((m.from, m.seq));
            // Sent again after a restart, or twice in one batch: stored once.
            if keys.contains(&m.key) || (!m.key.is_empty() && !in_batch.insert(m.key.clone())) {
                continue;
            }
            stored.push(Arc::new(StoredMessage {
                id: last_id + 1 + stored.len() as u64,
                author: m.author.to_string(),
                message: m.message.clone(),
                sent: sent.clone(),
                key: m.key.clone(),
            }));
            fresh.push(m);
        }
        // Retention: the oldest messages go once the log holds a trim step
        // more than its cap, in the same transaction as the new ones.
        let new_last = last_id + stored.len() as u64;
        let trim =
            (new_last > max_messages).then(|| (new_last - max_messages, trim_step(max_messages)));
        let outcome = match commit(&db, &stored, trim) {
            Ok(()) => {
                last_id += stored.len() as u64;
                crate::metrics::posts_committed(posted);
                for m in &stored {
                    keys.insert(m.key.clone(), m.id);
                }
                vec![Event::Committed(stored), Event::Stored(acks)]
            }
            Err(e) => {
                error!(error = %e, messages = fresh.len(), "message log write failed");
                crate::metrics::backplane_error("commit");
                vec![Event::Rejected {
                    messages: fresh,
                    code: "not_stored",
                    reason: "message could not be stored".into(),
                }]
            }
        };
        for event in outcome {
            // A send fails only once the backplane was dropped: keep
            // committing what is queued.
            let _ = events.blocking_send(event);
        }
    }
}

/// The most recent idempotency keys, oldest forgotten first.
struct KeyMemory {
    ids: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl KeyMemory {
    fn new(ids: HashMap<String, u64>) -> Self {
        let order = ids.keys().cloned().collect();
        KeyMemory { ids, order }
    }

    fn contains(&self, key: &str) -> bool {
        !key.is_empty() && self.ids.contains_key(key)
    }

    fn insert(&mut self, key: String, id: u64) {
        if key.is_empty() {
            return;
        }
        if self.order.len() >= KEY_MEMORY
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        self.order.push_back(key.clone());
        self.ids.insert(key, id);
    }
}

fn commit(
    db: &Database,
    messages: &[Arc<StoredMessage>],
    trim: Option<(u64, u64)>,
) -> Result<(), Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(MESSAGES)?;
        for m in messages {
            table.insert(m.id, serde_json::to_vec(m.as_ref())?.as_slice())?;
        }
        // `trim`: the first id to keep, and the fewest to drop at once.
        if let Some((below, step)) = trim
            && table
                .first()?
                .is_some_and(|(first, _)| first.value() + step <= below)
        {
            table.retain_in(..below, |_, _| false)?;
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;

    #[tokio::test]
    async fn the_log_keeps_its_cap_and_history_starts_at_the_edge() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::new(50);
        options.max_messages = 8;
        let mut log = Embedded::open(dir.path(), options).unwrap();
        for i in 0..40u64 {
            log.post(NewMessage {
                from: 1,
                seq: i,
                key: format!("k{i}"),
                author: "ann".into(),
                message: "aGk=".into(),
                posted: std::time::Instant::now(),
            })
            .unwrap();
            // One commit per post, so the trim runs as it would in a chat.
            loop {
                if let Event::Stored(_) = log.next_event().await {
                    break;
                }
            }
        }
        assert_eq!(log.last_id(), 40);
        let txn = log.db.begin_read().unwrap();
        let table = txn.open_table(MESSAGES).unwrap();
        let first = table.first().unwrap().unwrap().0.value();
        let kept = table.len().unwrap();
        assert!(first > 1, "the oldest messages were trimmed");
        assert!(kept <= 8 + trim_step(8), "kept {kept}");
        drop((table, txn));
        // Reopened, history reaches back only to the edge.
        drop(log);
        let mut log = Embedded::open(dir.path(), options).unwrap();
        let old = log.history(0, 40, 100).unwrap();
        assert_eq!(old.last().unwrap().id, 40);
        assert!(old.first().unwrap().id > 1, "trimmed messages are gone");
    }
}

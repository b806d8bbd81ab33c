//! The cluster backplane: any number of workers share one chat through Redis.
//!
//! - **The log** is a Redis stream. [`lua/post.lua`](lua/post.lua) appends a
//!   batch of posts atomically: the next ids of one cluster-wide sequence
//!   (the stream entry id *is* the message id), an idempotency key per post
//!   (a retry is stored once), and a length cap. Its reply means the post is
//!   durable as far as Redis's AOF policy goes (the compose file runs
//!   `appendfsync always`).
//! - **Delivery**: every worker follows the stream from the last id it
//!   delivered with a blocking `XREAD` on a connection of its own, and after
//!   any error resumes from that id: nothing skipped, nothing twice.
//! - **The log's name** (`Status.Log`) is an epoch in the meta hash. If Redis
//!   loses its data the epoch is created anew, ids start over, and the
//!   follower reports [`Event::LogReset`].
//! - **Presence** is owned by gateways: each user sits in a hash of its
//!   gateway run, listed while that run's lease is renewed by some worker
//!   linked to it ([`lua/presence.lua`](lua/presence.lua)). Changes are
//!   announced on a small notification stream that the follower reads in the
//!   same `XREAD`; the presence task then re-reads the list
//!   ([`lua/users.lua`](lua/users.lua)) and hands the runtime a snapshot.
//!
//! Three tasks talk to Redis; the runtime only queues to them and reads the
//! local copies they keep current, so no Redis round trip sits in the path
//! of a socket event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client, Script, Value};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::presence::PresenceTable;
use super::{Backplane, Event, NewMessage, Presence, StoredMessage};
use crate::app::WsId;
use crate::chat::rules;
use crate::error::Error;

/// Posts waiting for the poster task; when full, a post is refused with a
/// clear answer rather than stalling the runtime.
const POST_QUEUE: usize = 16 * 1024;
/// Most posts appended by one script call (one round trip).
const MAX_BATCH: usize = 256;
/// Events from the tasks to the runtime. The follower waits when it is full,
/// which simply leaves the log in Redis a little longer.
const EVENT_QUEUE: usize = 256;
/// Entries read per `XREAD`.
const READ_BATCH: usize = 512;
/// How long one `XREAD` blocks; also how often an idle follower checks the
/// log's name.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Fewest recent messages kept in memory for history and replay.
const MIN_CACHE: usize = 1024;
/// How long an idempotency key is remembered: far longer than any retry.
const IDEMPOTENCY_SECS: u64 = 300;
/// How long a post batch is retried (with the same keys, so safely) before
/// its senders are told the log is unavailable.
const POST_RETRY_FOR: Duration = Duration::from_secs(3);
/// Shortest gap between two reads of the whole online list.
const RELOAD_MIN: Duration = Duration::from_millis(50);
/// Pause after a failed Redis call before the next try.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between two attempts to reach Redis at start.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where everything lives in Redis.
#[derive(Clone)]
struct Keys {
    meta: String,
    log: String,
    idem_prefix: String,
    gateways: String,
    tags: String,
    notify: String,
    users_prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            meta: format!("{prefix}meta"),
            log: format!("{prefix}log"),
            idem_prefix: format!("{prefix}idem:"),
            gateways: format!("{prefix}gateways"),
            tags: format!("{prefix}tags"),
            notify: format!("{prefix}presence-events"),
            users_prefix: format!("{prefix}users:"),
        }
    }
}

/// The scripts, loaded once; `Script` reloads itself after a Redis restart.
struct Scripts {
    post: Script,
    epoch: Script,
    presence: Script,
    users: Script,
}

fn scripts() -> Arc<Scripts> {
    Arc::new(Scripts {
        post: Script::new(include_str!("lua/post.lua")),
        epoch: Script::new(include_str!("lua/epoch.lua")),
        presence: Script::new(include_str!("lua/presence.lua")),
        users: Script::new(include_str!("lua/users.lua")),
    })
}

/// Settings of the Redis backplane.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key, so several chats can share one Redis.
    pub prefix: String,
    /// How long a gateway's users stay listed after the last renewal.
    pub lease: Duration,
    /// Approximate number of messages the log keeps.
    pub max_log: u64,
    pub history: usize,
}

enum Inner {
    Committed(Vec<Arc<StoredMessage>>),
    Stored(Vec<(WsId, u64)>),
    Rejected(Vec<NewMessage>),
    Users(Vec<Presence>),
    Reset(String),
}

enum PresenceOp {
    Up { boot: u64, tag: u32 },
    Down { boot: u64 },
    Set(Presence),
    Remove { ws: WsId, boot: u64 },
}

pub struct RedisBackplane {
    posts: mpsc::Sender<NewMessage>,
    /// Unbounded, and still bounded in effect: the presence task drains it
    /// at once into a map keyed by socket (the last write wins), so what it
    /// holds is at most one entry per socket even while Redis is away.
    presence: mpsc::UnboundedSender<PresenceOp>,
    events: mpsc::Receiver<Inner>,
    cache: VecDeque<Arc<StoredMessage>>,
    cache_size: usize,
    last_id: u64,
    log_id: String,
    users: PresenceTable,
    healthy: Arc<Health>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn fresh_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn boot_key(boot: u64) -> String {
    format!("{boot:016x}")
}

impl RedisBackplane {
    /// Connects, retrying until Redis answers (saying so in the log), then
    /// loads the log's name, its newest messages and the online list.
    pub async fn connect(config: RedisConfig) -> Result<Self, Error> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| Error::Config(format!("bad Redis URL {:?}: {e}", config.url)))?;
        let keys = Keys::new(&config.prefix);
        let scripts = scripts();
        let cache_size = config.history.max(MIN_CACHE);
        let mut backoff = RETRY_PAUSE;
        let (manager, epoch, last_id, cache, notify_from) = loop {
            match first_contact(&client, &keys, &scripts, cache_size).await {
                Ok(found) => break found,
                Err(e) => {
                    warn!(url = %config.url, error = %e, retry_in = ?backoff, "cannot reach Redis, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
                }
            }
        };
        info!(url = %config.url, log_id = %epoch, last_id, "message log open in Redis");

        let healthy = Arc::new(Health::default());
        let wake = Arc::new(Notify::new());
        let (posts, post_rx) = mpsc::channel(POST_QUEUE);
        let (presence, presence_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let tasks = vec![
            tokio::spawn(post_loop(
                manager.clone(),
                keys.clone(),
                scripts.clone(),
                config.max_log,
                post_rx,
                events_tx.clone(),
                healthy.clone(),
            )),
            tokio::spawn(follow(
                client,
                keys.clone(),
                scripts.clone(),
                Cursor {
                    epoch: epoch.clone(),
                    last: last_id,
                    notify: notify_from,
                },
                events_tx.clone(),
                healthy.clone(),
                wake.clone(),
            )),
            tokio::spawn(presence_loop(
                manager,
                keys,
                scripts,
                config.lease,
                presence_rx,
                wake,
                events_tx,
                healthy.clone(),
            )),
        ];
        Ok(RedisBackplane {
            posts,
            presence,
            events,
            cache,
            cache_size,
            last_id,
            log_id: epoch,
            users: PresenceTable::default(),
            healthy,
            tasks,
        })
    }
}

type Found = (
    ConnectionManager,
    String,
    u64,
    VecDeque<Arc<StoredMessage>>,
    String,
);

async fn first_contact(
    client: &Client,
    keys: &Keys,
    scripts: &Scripts,
    cache_size: usize,
) -> redis::RedisResult<Found> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    let mut manager = ConnectionManager::new_with_config(client.clone(), config).await?;
    let (epoch, last_id): (String, u64) = scripts
        .epoch
        .key(&keys.meta)
        .arg(fresh_epoch())
        .invoke_async(&mut manager)
        .await?;
    let newest: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&keys.log)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(cache_size)
        .query_async(&mut manager)
        .await?;
    let mut cache = VecDeque::with_capacity(newest.ids.len());
    for entry in newest.ids.iter().rev() {
        if let Some(m) = parse_entry(entry) {
            cache.push_back(Arc::new(m));
        }
    }
    let notify: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&keys.notify)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut manager)
        .await?;
    let notify_from = notify
        .ids
        .first()
        .map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
    Ok((manager, epoch, last_id, cache, notify_from))
}

fn parse_entry(entry: &redis::streams::StreamId) -> Option<StoredMessage> {
    let id = entry.id.split('-').next()?.parse().ok()?;
    let field = |name: &str| -> Option<String> {
        match entry.map.get(name)? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    Some(StoredMessage {
        id,
        author: field("a")?,
        message: field("m")?,
        sent: field("t")?,
        key: String::new(),
    })
}

/// Whether Redis answers, and since when it has not.
#[derive(Default)]
struct Health {
    down: AtomicBool,
    /// When it went down, in ms on the process's monotonic clock.
    down_since: std::sync::atomic::AtomicU64,
}

fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Health {
    fn up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// Down for longer than a post is retried: new posts are refused at
    /// once rather than queued behind ones that will fail. A shorter
    /// outage (a Redis restart) is ridden out by the retries.
    fn refusing(&self) -> bool {
        !self.up()
            && clock_ms().saturating_sub(self.down_since.load(Ordering::Relaxed))
                > POST_RETRY_FOR.as_millis() as u64
    }
}

/// Records Redis's health, logging only the changes.
fn set_health(healthy: &Health, ok: bool, what: &str, error: Option<&redis::RedisError>) {
    let was = !healthy.down.swap(!ok, Ordering::Relaxed);
    if was && !ok {
        healthy.down_since.store(clock_ms(), Ordering::Relaxed);
    }
    if !ok {
        crate::metrics::backplane_error(what);
    }
    match (was, ok) {
        (true, false) => {
            warn!(error = %error.map(|e| e.to_string()).unwrap_or_default(), what, "Redis unavailable")
        }
        (false, true) => info!(what, "Redis available again"),
        _ => {}
    }
}

async fn post_loop(
    mut conn: ConnectionManager,
    keys: Keys,
    scripts: Arc<Scripts>,
    max_log: u64,
    mut queue: mpsc::Receiver<NewMessage>,
    events: mpsc::Sender<Inner>,
    healthy: Arc<Health>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let sent = rules::sent_stamp(time::OffsetDateTime::now_utc());
        let started = Instant::now();
        let outcome = loop {
            let mut call = scripts.post.prepare_invoke();
            call.key(&keys.meta)
                .key(&keys.log)
                .arg(fresh_epoch())
                .arg(max_log)
                .arg(IDEMPOTENCY_SECS)
                .arg(&keys.idem_prefix);
            for m in &batch {
                call.arg(&m.key)
                    .arg(m.author.as_ref())
                    .arg(&m.message)
                    .arg(&sent);
            }
            match call.invoke_async::<Vec<Value>>(&mut conn).await {
                Ok(reply) => {
                    set_health(&healthy, true, "post", None);
                    break Ok(reply);
                }
                // The keys make a retry safe: a post that did land is not
                // stored again.
                Err(e) if started.elapsed() < POST_RETRY_FOR => {
                    set_health(&healthy, false, "post", Some(&e));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => break Err(e),
            }
        };
        if outcome.is_ok() {
            crate::metrics::posts_committed(batch.iter().map(|m| m.posted));
        }
        let event = match outcome {
            Ok(_) => Inner::Stored(batch.drain(..).map(|m| (m.from, m.seq)).collect()),
            Err(e) => {
                warn!(error = %e, messages = batch.len(), "posts not stored: Redis unavailable");
                Inner::Rejected(std::mem::take(&mut batch))
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// Where the follower is: the log's name, the last id delivered, the last
/// presence notification seen.
struct Cursor {
    epoch: String,
    last: u64,
    notify: String,
}

async fn follow(
    client: Client,
    keys: Keys,
    scripts: Arc<Scripts>,
    mut cursor: Cursor,
    events: mpsc::Sender<Inner>,
    healthy: Arc<Health>,
    wake: Arc<Notify>,
) {
    // A blocking read holds its connection: it gets one of its own, with a
    // response timeout longer than the block.
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(2)));
    loop {
        let result = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            // Changes made while we were away.
            wake.notify_one();
            loop {
                follow_once(&mut conn, &keys, &scripts, &mut cursor, &events, &wake).await?;
                set_health(&healthy, true, "follow", None);
                if events.is_closed() {
                    return Ok::<(), redis::RedisError>(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                set_health(&healthy, false, "follow", Some(&e));
                debug!(error = %e, last = cursor.last, "log follower reconnecting");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

async fn follow_once(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    scripts: &Scripts,
    cursor: &mut Cursor,
    events: &mpsc::Sender<Inner>,
    wake: &Notify,
) -> redis::RedisResult<()> {
    let (epoch, _): (String, u64) = scripts
        .epoch
        .key(&keys.meta)
        .arg(fresh_epoch())
        .invoke_async(conn)
        .await?;
    if epoch != cursor.epoch {
        warn!(old = %cursor.epoch, new = %epoch, "the message log lost its data: new log, ids start over");
        cursor.epoch = epoch.clone();
        cursor.last = 0;
        let _ = events.send(Inner::Reset(epoch)).await;
    }
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(READ_BATCH)
        .arg("BLOCK")
        .arg(READ_BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(&keys.log)
        .arg(&keys.notify)
        .arg(format!("{}-0", cursor.last))
        .arg(&cursor.notify)
        .query_async(conn)
        .await?;
    for stream in reply.map(|r| r.keys).unwrap_or_default() {
        if stream.key == keys.log {
            let mut batch = Vec::with_capacity(stream.ids.len());
            for entry in &stream.ids {
                match parse_entry(entry) {
                    Some(m) if m.id > cursor.last => {
                        cursor.last = m.id;
                        batch.push(Arc::new(m));
                    }
                    Some(_) => {}
                    None => warn!(entry = %entry.id, "unreadable log entry skipped"),
                }
            }
            if !batch.is_empty() && events.send(Inner::Committed(batch)).await.is_err() {
                return Ok(());
            }
        } else if let Some(last) = stream.ids.last() {
            cursor.notify = last.id.clone();
            wake.notify_one();
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn presence_loop(
    mut conn: ConnectionManager,
    keys: Keys,
    scripts: Arc<Scripts>,
    lease: Duration,
    mut ops: mpsc::UnboundedReceiver<PresenceOp>,
    wake: Arc<Notify>,
    events: mpsc::Sender<Inner>,
    healthy: Arc<Health>,
) {
    let lease_ms = lease.as_millis() as u64;
    let mut held: HashSet<u64> = HashSet::new();
    let mut ups: HashMap<u64, u32> = HashMap::new();
    // The last write per socket wins: a set then a remove is a remove.
    let mut writes: HashMap<(u64, WsId), Option<Presence>> = HashMap::new();
    let mut renew = tokio::time::interval(lease / 3);
    let mut reap = tokio::time::interval(Duration::from_secs(1));
    let mut renew_due = false;
    let mut reap_due = false;
    let mut reload_due = true;
    let mut last_reload = Instant::now() - RELOAD_MIN;
    let mut pause_until: Option<Instant> = None;
    loop {
        let reload_at = last_reload + RELOAD_MIN;
        tokio::select! {
            op = ops.recv() => {
                let Some(op) = op else { return };
                let mut next = Some(op);
                while let Some(op) = next {
                    match op {
                        PresenceOp::Up { boot, tag } => {
                            held.insert(boot);
                            ups.insert(boot, tag);
                        }
                        PresenceOp::Down { boot } => {
                            held.remove(&boot);
                            ups.remove(&boot);
                        }
                        PresenceOp::Set(user) => {
                            writes.insert((user.boot, user.ws), Some(user));
                        }
                        PresenceOp::Remove { ws, boot } => {
                            writes.insert((boot, ws), None);
                        }
                    }
                    next = ops.try_recv().ok();
                }
            }
            _ = renew.tick() => renew_due = true,
            _ = reap.tick() => reap_due = true,
            _ = wake.notified() => reload_due = true,
            _ = tokio::time::sleep_until(reload_at), if reload_due && reload_at > Instant::now() => {}
            _ = tokio::time::sleep_until(pause_until.unwrap_or_else(Instant::now)), if pause_until.is_some() => {}
        }
        if pause_until.is_some_and(|p| p > Instant::now()) {
            continue;
        }
        pause_until = None;
        let result: redis::RedisResult<()> = async {
            for (boot, tag) in ups.clone() {
                presence_call(&scripts, &keys, lease_ms, "up")
                    .arg(boot_key(boot))
                    .arg(format!("{tag:08x}"))
                    .invoke_async::<u64>(&mut conn)
                    .await?;
                ups.remove(&boot);
                reload_due = true;
            }
            if !writes.is_empty() {
                let mut call = presence_call(&scripts, &keys, lease_ms, "write");
                for ((boot, ws), user) in &writes {
                    call.arg(boot_key(*boot)).arg(*ws);
                    match user {
                        Some(u) => call.arg(format!("{} {}", u.opened_ms, u.alias)),
                        None => call.arg(""),
                    };
                }
                let changed: u64 = call.invoke_async(&mut conn).await?;
                writes.clear();
                reload_due |= changed > 0;
            }
            if renew_due && !held.is_empty() {
                let mut call = presence_call(&scripts, &keys, lease_ms, "renew");
                for boot in &held {
                    call.arg(boot_key(*boot));
                }
                call.invoke_async::<u64>(&mut conn).await?;
            }
            renew_due = false;
            if reap_due {
                let purged: u64 = presence_call(&scripts, &keys, lease_ms, "reap")
                    .invoke_async(&mut conn)
                    .await?;
                if purged > 0 {
                    info!(
                        gateways = purged,
                        "gateway leases ran out, their users left"
                    );
                    reload_due = true;
                }
                reap_due = false;
            }
            if reload_due && Instant::now() >= last_reload + RELOAD_MIN {
                let reply: Vec<Value> = scripts
                    .users
                    .key(&keys.gateways)
                    .arg(&keys.users_prefix)
                    .invoke_async(&mut conn)
                    .await?;
                last_reload = Instant::now();
                reload_due = false;
                let _ = events.send(Inner::Users(parse_users(reply))).await;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => set_health(&healthy, true, "presence", None),
            Err(e) => {
                set_health(&healthy, false, "presence", Some(&e));
                pause_until = Some(Instant::now() + RETRY_PAUSE);
            }
        }
    }
}

/// A call of `presence.lua` with its keys and common arguments.
fn presence_call<'a>(
    scripts: &'a Scripts,
    keys: &Keys,
    lease_ms: u64,
    op: &str,
) -> redis::ScriptInvocation<'a> {
    let mut call = scripts.presence.prepare_invoke();
    call.key(&keys.gateways)
        .key(&keys.tags)
        .key(&keys.notify)
        .arg(&keys.users_prefix)
        .arg(lease_ms)
        .arg(op);
    call
}

/// `{ boot, { ws, "opened_ms alias", ... }, ... }` from `users.lua`.
fn parse_users(reply: Vec<Value>) -> Vec<Presence> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut users = Vec::new();
    for pair in reply.chunks(2) {
        let [boot, Value::Array(fields)] = pair else {
            continue;
        };
        let Some(boot) = text(boot).and_then(|b| u64::from_str_radix(&b, 16).ok()) else {
            continue;
        };
        for kv in fields.chunks(2) {
            let [ws, value] = kv else { continue };
            let (Some(ws), Some(value)) = (text(ws), text(value)) else {
                continue;
            };
            let (Ok(ws), Some((opened, alias))) = (ws.parse(), value.split_once(' ')) else {
                continue;
            };
            users.push(Presence {
                ws,
                boot,
                alias: alias.into(),
                opened_ms: opened.parse().unwrap_or(0),
            });
        }
    }
    users
}

impl Backplane for RedisBackplane {
    fn gateway_up(&mut self, boot: u64, tag: u32) -> bool {
        let _ = self.presence.send(PresenceOp::Up { boot, tag });
        false
    }

    fn gateway_down(&mut self, boot: u64) {
        let _ = self.presence.send(PresenceOp::Down { boot });
    }

    fn set_user(&mut self, user: Presence) -> bool {
        let _ = self.presence.send(PresenceOp::Set(user));
        false
    }

    fn remove_user(&mut self, ws: WsId, boot: u64) {
        let _ = self.presence.send(PresenceOp::Remove { ws, boot });
    }

    fn users(&self) -> Vec<String> {
        self.users.list()
    }

    fn alias_holder(&self, alias: &str, ws: WsId) -> Option<WsId> {
        self.users.held_by_other(alias, ws)
    }

    fn post(&mut self, message: NewMessage) -> Result<(), Error> {
        if self.healthy.refusing() {
            return Err(Error::LogUnavailable);
        }
        super::queue_post(&self.posts, message)
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
        // The cache holds the newest messages, more than any replay sends;
        // older ones are announced as a gap by the caller.
        Ok(super::recent(&self.cache, after, upto, limit))
    }

    fn last_id(&self) -> u64 {
        self.last_id
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn healthy(&self) -> bool {
        self.healthy.up()
    }

    async fn next_event(&mut self) -> Event {
        loop {
            let Some(inner) = self.events.recv().await else {
                return std::future::pending().await;
            };
            match inner {
                Inner::Committed(batch) => {
                    for m in &batch {
                        self.cache.push_back(m.clone());
                        self.last_id = m.id;
                    }
                    while self.cache.len() > self.cache_size {
                        self.cache.pop_front();
                    }
                    return Event::Committed(batch);
                }
                Inner::Stored(acks) => return Event::Stored(acks),
                Inner::Rejected(messages) => {
                    return Event::Rejected {
                        messages,
                        code: "log_unavailable",
                        reason: "the message log is unavailable; message not stored, send it again"
                            .into(),
                    };
                }
                Inner::Users(users) => {
                    if self.users.replace(users) {
                        return Event::UsersChanged;
                    }
                }
                Inner::Reset(epoch) => {
                    self.log_id = epoch;
                    self.last_id = 0;
                    self.cache.clear();
                    return Event::LogReset;
                }
            }
        }
    }
}

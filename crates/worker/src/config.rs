//! Worker settings. The binary fills them from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the chat's shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackplaneKind {
    /// One worker: the log in redb under `data_dir`, presence in memory.
    Embedded,
    /// Any number of workers sharing one Redis (`redis://HOST:PORT[/DB]`).
    Redis(String),
}

impl std::str::FromStr for BackplaneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "embedded" {
            Ok(BackplaneKind::Embedded)
        } else if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(BackplaneKind::Redis(s.to_owned()))
        } else {
            Err(format!(
                "unknown backplane {s:?}: use embedded or redis://HOST:PORT[/DB]"
            ))
        }
    }
}

/// How the worker runs. Validated by the binary before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the message log lives (`chat.redb` inside it), embedded only.
    pub data_dir: PathBuf,
    pub backplane: BackplaneKind,
    /// Prefix of every Redis key, so several chats can share one Redis.
    pub redis_prefix: String,
    /// How many recent messages a new socket receives after its Status frame.
    pub history: usize,
    /// Shortest gap between two user-list broadcasts; joins and leaves inside
    /// it are coalesced into one list.
    pub userlist_interval: Duration,
    /// How long a gateway's users stay listed once no worker hears from it.
    pub presence_lease: Duration,
    /// The shared secret every gateway must present (`None`: anyone may link).
    pub link_token: Option<String>,
    /// How long a stopping worker waits for gateways to move their sockets.
    pub drain_grace: Duration,
    /// Approximate number of messages the log keeps (older ones are
    /// trimmed; a replay that reaches past them is told with a Gap frame).
    pub max_log_messages: u64,
    /// Posts per second this worker takes from all sockets together; past
    /// it a post is answered `busy` (0: no ceiling).
    pub max_posts_per_sec: u32,
    /// The embedded log's page cache, in bytes.
    pub cache_bytes: usize,
    /// Where to serve `/metrics` and `/healthz` over HTTP (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// What each gateway may do here, whatever its own limits.
    pub limits: crate::runtime::Limits,
}

impl Config {
    /// Defaults for `data_dir`: 50 messages of history, lists at most 10 per second.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            backplane: BackplaneKind::Embedded,
            redis_prefix: "sharedconn:".into(),
            history: 50,
            userlist_interval: Duration::from_millis(100),
            presence_lease: Duration::from_secs(10),
            link_token: None,
            drain_grace: Duration::from_secs(5),
            max_log_messages: 1_000_000,
            max_posts_per_sec: 20_000,
            cache_bytes: 64 << 20,
            metrics_listen: None,
            limits: crate::runtime::Limits::default(),
        }
    }
}

//! Worker settings. The binary fills them from flags and environment.

use std::path::PathBuf;
use std::time::Duration;

/// How the worker runs. Validated by the binary before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the message log lives (`chat.redb` inside it).
    pub data_dir: PathBuf,
    /// How many recent messages a new socket receives after its Status frame.
    pub history: usize,
    /// Shortest gap between two user-list broadcasts; joins and leaves inside
    /// it are coalesced into one list.
    pub userlist_interval: Duration,
}

impl Config {
    /// Defaults for `data_dir`: 50 messages of history, lists at most 10 per second.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            history: 50,
            userlist_interval: Duration::from_millis(100),
        }
    }
}

//! The scenarios and what they share: where clients connect, the connect
//! phase's bookkeeping, close reasons, and bounded waiting.
//!
//! Every scenario is bounded in count (a fixed number of clients and
//! messages) and in time (each phase has a deadline), and stops by itself.

pub mod chat;
pub mod failover;
pub mod idle;
pub mod join;
pub mod traffic;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;

use crate::cli::{ClientArgs, TargetArgs};
use crate::net::{SourcePool, Target};
use crate::procstat::Watched;
use crate::report::{CloseTally, ConnectReport};

/// Where a scenario's clients go and which processes it measures.
#[derive(Debug, Clone)]
pub struct Setup {
    pub targets: Vec<Target>,
    pub sources: SourcePool,
    /// Server processes to measure (gateway, worker, baseline).
    pub watched: Vec<Watched>,
    pub connect_timeout: Duration,
    pub quiet: bool,
}

impl Setup {
    pub fn new(
        urls: &[String],
        watched: Vec<Watched>,
        client: &ClientArgs,
        quiet: bool,
    ) -> anyhow::Result<Setup> {
        anyhow::ensure!(!urls.is_empty(), "no --url given");
        let targets = urls
            .iter()
            .map(|u| Target::parse(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            client.connect_timeout > 0.0 && client.connect_timeout <= 600.0,
            "--connect-timeout must be in (0, 600] seconds"
        );
        Ok(Setup {
            targets,
            sources: SourcePool::new(client.source_first, client.source_count)?,
            watched,
            connect_timeout: Duration::from_secs_f64(client.connect_timeout),
            quiet,
        })
    }

    pub fn from_target_args(args: &TargetArgs, quiet: bool) -> anyhow::Result<Setup> {
        let mut watched = Vec::new();
        for (role, pids) in [
            ("gateway", &args.gateway_pids),
            ("worker", &args.worker_pids),
            ("baseline", &args.baseline_pids),
        ] {
            for &pid in pids {
                anyhow::ensure!(
                    crate::procstat::sample(pid).is_some(),
                    "--{role}-pid {pid}: no such process (or /proc/{pid} unreadable)"
                );
                watched.push(Watched::new(role, pid));
            }
        }
        Setup::new(&args.urls, watched, &args.client, quiet)
    }

    /// The server client `i` connects to (round-robin over the URLs).
    pub fn target(&self, i: usize) -> &Target {
        &self.targets[i % self.targets.len()]
    }

    /// The source address client `i` binds to.
    pub fn source(&self, i: usize) -> Ipv4Addr {
        self.sources.addr(i / self.targets.len())
    }

    pub fn urls(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.url.clone()).collect()
    }

    /// The server processes plus this process (role `loadtest`).
    pub fn watched_with_self(&self) -> Vec<Watched> {
        let mut all = self.watched.clone();
        all.push(Watched::new("loadtest", std::process::id()));
        all
    }
}

/// Nanoseconds since the Unix epoch: the clock both ends of a latency sample
/// read (they are on one machine, so they share it).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// Counts of the connect phase, shared by the client tasks.
pub struct ConnectTally {
    started: Instant,
    connected: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    errors: Mutex<BTreeMap<String, usize>>,
    /// Nanoseconds after `started` when the latest client connected.
    last_connected: AtomicU64,
}

impl ConnectTally {
    pub fn new(started: Instant) -> ConnectTally {
        ConnectTally {
            started,
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            errors: Mutex::new(BTreeMap::new()),
            last_connected: AtomicU64::new(0),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn ok(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        let at = self.started.elapsed().as_nanos() as u64;
        self.last_connected.fetch_max(at, Ordering::Relaxed);
    }

    pub fn fail(&self, error: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let text = format!("{error:#}");
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(error_kind(&text))
            .or_default() += 1;
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(text);
        }
    }

    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> usize {
        self.connected() + self.failed.load(Ordering::Relaxed)
    }

    /// Waits until each of `clients` has connected or failed, at most as long
    /// as connecting at `rate` per second should take plus `connect_timeout`
    /// and 5 s, then reports.
    pub async fn wait_all(
        &self,
        clients: usize,
        rate: f64,
        connect_timeout: Duration,
        progress: &crate::progress::Progress,
    ) -> ConnectReport {
        let deadline = self.started
            + Duration::from_secs_f64(clients as f64 / rate)
            + connect_timeout
            + Duration::from_secs(5);
        wait_until(
            deadline,
            || self.done() >= clients,
            || progress.set(self.done() as u64),
        )
        .await;
        self.report(clients)
    }

    pub fn report(&self, attempted: usize) -> ConnectReport {
        let connected = self.connected();
        let secs = self.last_connected.load(Ordering::Relaxed) as f64 / 1e9;
        ConnectReport {
            attempted,
            connected,
            failed: self.failed.load(Ordering::Relaxed),
            secs,
            per_sec: if secs > 0.0 {
                connected as f64 / secs
            } else {
                0.0
            },
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// A connect error without its numbers (ports, IDs, durations), cut short,
/// so that failures of one kind count together.
fn error_kind(text: &str) -> String {
    let kind: String = text
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(100)
        .collect();
    kind.trim().to_owned()
}

/// Why sockets ended before the scenario closed them.
#[derive(Default)]
pub struct CloseLog(Mutex<CloseTally>);

impl CloseLog {
    pub fn record(&self, reason: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn closed(&self) -> CloseTally {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// A close frame as a tally key: `1008 too slow`.
pub fn close_reason(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("{}", u16::from(f.code)),
        Some(f) => format!("{} {}", u16::from(f.code), f.reason),
        None => "close without code".into(),
    }
}

/// Spawns `count` client tasks, task `i` at `i / rate` seconds (all at once
/// without a rate), stopping early if `stop` fires. Returns their handles.
pub fn spawn_paced<T, F, Fut>(
    count: usize,
    rate: Option<f64>,
    stop: CancellationToken,
    make: F,
) -> JoinHandle<Vec<JoinHandle<T>>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut handles = Vec::with_capacity(count);
        for i in 0..count {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.cancelled() => break,
                }
            }
            handles.push(tokio::spawn(make(i)));
        }
        handles
    })
}

/// Connects client `i`, holding one of `slots` for the handshake, unless
/// `wanted` says no once the slot is held. A failure is counted in `tally`.
/// Returns the socket and the WebSocket ID the server gave it.
pub async fn connect_client(
    i: usize,
    setup: &Setup,
    slots: &tokio::sync::Semaphore,
    tally: &ConnectTally,
    wanted: impl Fn() -> bool,
) -> Option<(crate::client::Ws, String)> {
    connect_client_with_recv_buffer(i, setup, slots, tally, wanted, None).await
}

/// [`connect_client`] with the socket's receive buffer set (see
/// [`crate::client::connect_with_recv_buffer`]).
pub async fn connect_client_with_recv_buffer(
    i: usize,
    setup: &Setup,
    slots: &tokio::sync::Semaphore,
    tally: &ConnectTally,
    wanted: impl Fn() -> bool,
    recv_buffer: Option<u32>,
) -> Option<(crate::client::Ws, String)> {
    let permit = slots.acquire().await.ok()?;
    if !wanted() {
        return None;
    }
    let connected = crate::client::connect_with_recv_buffer(
        setup.target(i),
        setup.source(i),
        setup.connect_timeout,
        recv_buffer,
    )
    .await;
    drop(permit);
    match connected {
        Ok(connected) => Some(connected),
        Err(e) => {
            tally.fail(&e);
            None
        }
    }
}

/// Polls `done` every 20 ms until it holds or `deadline` passes; `tick` runs
/// on every poll (progress). Returns whether `done` held.
pub async fn wait_until(
    deadline: Instant,
    mut done: impl FnMut() -> bool,
    mut tick: impl FnMut(),
) -> bool {
    loop {
        tick();
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits every client task, in order. A panicked client is a bug: reported.
pub async fn join_all<T>(handles: Vec<JoinHandle<T>>) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.context("client task failed")?);
    }
    Ok(out)
}

/// Checks a duration-like flag.
pub fn seconds(name: &str, value: f64, max: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        value.is_finite() && value >= 0.0 && value <= max,
        "--{name} must be between 0 and {max} seconds (got {value})"
    );
    Ok(Duration::from_secs_f64(value))
}

/// A short random-enough run id: tells this run's messages and aliases from
/// any other run's against the same server.
pub fn new_run_id() -> u32 {
    let nanos = unix_nanos();
    let mixed = (nanos ^ (nanos >> 29) ^ (u64::from(std::process::id()) << 17))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) as u32) % 1_000_000
}

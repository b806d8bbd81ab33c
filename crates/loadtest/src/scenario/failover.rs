//! `failover`: what a worker's death (SIGKILL), hang (SIGSTOP) or drain
//! (SIGTERM) costs the sockets it served, measured from the clients' side.
//!
//! Each run starts its own cluster: a redis-server (append-only, fsync on
//! every write), a *victim* worker, and one gateway given the victim's and a
//! second worker's address. The first half of the sockets connect while only
//! the victim is up, so the gateway attaches every one of them to it; then
//! the second worker starts, the gateway links to it (seen in its log), and
//! the second half connect, each going to the worker with fewer sockets,
//! the new one. Which sockets must be re-attached is therefore known, not
//! guessed. Senders alternate between the halves and post at an aggregate
//! rate; `--before` seconds in, the victim gets the signal; `--after`
//! seconds later sending stops and the drain waits for every delivery.
//!
//! Per re-attached socket: time from the fault to its first Chat frame
//! (often a replayed one), and to the first delivery of a message *posted
//! after* the fault (the chat has resumed for it). Per message: latency
//! before, during (posted within `--after` of the fault) and after. Per
//! process: CPU cores used in the `--before` window and in the failover
//! window. And the contract: sockets closed, lost, duplicated, one order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::chat::close_quietly;
use super::traffic::{Outcomes, Plan, read_frames, send_planned};
use super::{
    CloseLog, ConnectTally, Setup, connect_client, join_all, seconds, spawn_paced, unix_nanos,
    wait_until,
};
use crate::cli::{FailoverArgs, Fault};
use crate::kernel::TcpTrouble;
use crate::launch::{Stack, free_port};
use crate::procstat::{Watched, sample};
use crate::progress::Progress;
use crate::report::{CloseTally, Latency};
use crate::tracker::{ClientTally, MAX_EXPECTED_DELIVERIES, RunBook, Totals};
use crate::wire::{self, ChatFrame, Marker};

/// Latency shards per phase (as in the tracker: few enough to merge, enough
/// that two threads rarely meet).
const SHARDS: usize = 16;
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// The drain ends early when nothing arrived for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(3);
/// How long the gateway may take to link to the second worker.
const LINK_WAIT: Duration = Duration::from_secs(20);
/// The servers together under this many cores are quiet: no online lists
/// going out (an idle cluster of 10,000 sockets uses a few hundredths).
const QUIET_CORES: f64 = 0.15;
/// Longest wait for them to go quiet after `--settle`.
const QUIET_MAX: Duration = Duration::from_secs(120);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Percentiles of one per-socket quantity, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    fn of(mut ms: Vec<f64>) -> Spread {
        if ms.is_empty() {
            return Spread::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Spread {
            count: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms[ms.len() - 1],
        }
    }
}

/// CPU of one process in the window before the fault and in the failover
/// window, as cores (CPU seconds per wall second).
#[derive(Debug, Clone, Serialize)]
pub struct CpuWindows {
    pub role: String,
    pub pid: u32,
    pub before_cores: f64,
    pub during_cores: f64,
}

/// One failover run.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub mode: String,
    pub fault: Fault,
    pub round: usize,
    pub clients: usize,
    pub connected: usize,
    /// Connected sockets that were on the victim.
    pub reattached_sockets: usize,
    pub senders: usize,
    pub rate: f64,
    pub link_timeout_ms: u64,
    /// Fault → first Chat frame, per re-attached socket.
    pub first_frame_after_fault: Spread,
    /// Fault → first delivery of a message posted after the fault, per
    /// re-attached socket: when chat resumed for it.
    pub resumed: Spread,
    /// Re-attached sockets that never got a message posted after the fault.
    pub not_resumed: usize,
    /// The same for the sockets on the surviving worker (they should not notice).
    pub survivors_resumed: Spread,
    /// What the gateway logged: fault → link lost / draining seen.
    pub gateway_detected_ms: Option<f64>,
    /// Fault → the gateway's last "sockets re-attached" line.
    pub gateway_reattached_ms: Option<f64>,
    /// The gateway's own "took_ms" of its re-attach passes.
    pub gateway_reattach_took_ms: Vec<u64>,
    pub latency_before: Latency,
    pub latency_during: Latency,
    /// The same, split: as the re-attached sockets received them, and as
    /// the others did (a drain that pauses nothing makes them alike).
    pub latency_during_moved: Latency,
    pub latency_during_stayed: Latency,
    pub latency_after: Latency,
    pub sent: u64,
    pub deliveries_expected: u64,
    pub deliveries_received: u64,
    pub loss: u64,
    /// Posts no client received (lost before the fan-out).
    pub loss_unseen_posts: u64,
    /// Deliveries the server announced it left out (Gap frames).
    pub gap_missed: u64,
    /// Clients that missed something: on the victim, on the survivor.
    pub loss_clients: [u64; 2],
    pub duplicates: u64,
    pub one_order: bool,
    pub error_frames: u64,
    pub first_error_frame: Option<String>,
    /// Seconds waited past `--settle` for the servers to go quiet (the
    /// joins' online lists still going out).
    pub quiet_wait_secs: f64,
    /// The servers were still busy when that wait gave up.
    pub never_quiet: bool,
    /// Seconds from the end of sending until the drain ended.
    pub drain_secs: f64,
    /// The drain ended because nothing arrived for a while (not all arrived).
    pub drain_went_quiet: bool,
    pub closed_by_server: CloseTally,
    pub cpu: Vec<CpuWindows>,
    pub connect_failed: usize,
    pub first_connect_error: Option<String>,
    /// Connect failures by kind (see `ConnectReport::errors`).
    #[serde(default)]
    pub connect_errors: std::collections::BTreeMap<String, usize>,
    /// What the machine's TCP dropped and sent again during the run, all
    /// processes together (see [`crate::kernel`]); `None` where unreadable.
    #[serde(default)]
    pub tcp: Option<TcpTrouble>,
}

/// Every run of one invocation, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverSummary {
    pub parameters: FailoverArgs,
    pub machine: crate::compare::Machine,
    pub runs: Vec<FailoverReport>,
    pub failed: Vec<String>,
}

/// Runs every (round, mode, fault) and writes the table and the JSON.
pub async fn run(args: &FailoverArgs, quiet: bool) -> anyhow::Result<FailoverSummary> {
    for m in &args.modes {
        ensure!(
            m == "shared" || m == "private",
            "--modes takes shared and/or private, not {m:?}"
        );
    }
    ensure!(!args.faults.is_empty(), "--faults is empty");
    ensure!(
        (1..=20).contains(&args.repeat),
        "--repeat must be between 1 and 20"
    );
    ensure!(args.clients >= 2, "--clients must be at least 2");
    ensure!(
        args.senders >= 2 && args.senders <= args.clients,
        "--senders must be between 2 and --clients (one on each worker at least)"
    );
    ensure!(
        args.rate.is_finite() && args.rate > 0.0 && args.rate <= 100_000.0,
        "--rate must be a positive number of posts per second"
    );
    seconds("before", args.before, 600.0)?;
    seconds("after", args.after, 600.0)?;
    seconds("drain", args.drain, 600.0)?;
    seconds("settle", args.settle, 600.0)?;
    ensure!(args.before >= 0.5, "--before must be at least 0.5 s");
    ensure!(args.connect_rate > 0.0 && args.connect_concurrency > 0);
    let planned = ((args.rate * (args.before + args.after)).round() as u64).max(1);
    ensure!(
        planned.saturating_mul(args.clients as u64) <= MAX_EXPECTED_DELIVERIES,
        "too many deliveries to account for; lower --clients, --rate or the windows"
    );
    crate::net::ensure_fd_budget(args.clients)?;
    crate::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => exe.parent().map(Into::into).unwrap_or_default(),
    };
    let stamp = crate::compare::stamp();
    let log_dir = args.out_dir.join("logs").join(&stamp);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let machine = crate::compare::Machine::collect();

    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for round in 0..args.repeat {
        for mode in &args.modes {
            for &fault in &args.faults {
                let tag = format!("failover-{mode}-{}-r{round}", fault.name());
                info!(mode, fault = fault.name(), round, "failover run starting");
                match run_one(args, mode, fault, round, &bin_dir, &log_dir, &tag, quiet).await {
                    Ok(report) => {
                        eprintln!("--- {tag}\n{}", text(&report));
                        runs.push(report);
                    }
                    Err(e) => {
                        warn!(tag, error = format!("{e:#}"), "failover run failed");
                        failed.push(format!("{tag}: {e:#}"));
                    }
                }
            }
        }
    }
    let summary = FailoverSummary {
        parameters: args.clone(),
        machine,
        runs,
        failed,
    };
    println!("{}", table(&summary));
    std::fs::create_dir_all(&args.out_dir)?;
    let path = args.out_dir.join(format!("failover-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("json:  {}", path.display());
    println!("logs:  {}", log_dir.display());
    if summary.runs.is_empty() {
        bail!("every run failed; see the errors above");
    }
    Ok(summary)
}

struct Ctx {
    setup: Setup,
    book: RunBook,
    senders: usize,
    /// Sockets `0..half` go to the victim.
    half: usize,
    rate: f64,
    alias_prefix: String,
    connect_slots: Semaphore,
    connect: ConnectTally,
    stop: CancellationToken,
    sent: AtomicU64,
    writers_done: AtomicUsize,
    error_frames: AtomicU64,
    gap_missed: AtomicU64,
    first_error_frame: Mutex<Option<String>>,
    closes: CloseLog,
    /// Unix nanos of the fault (0 before it).
    fault_nanos: AtomicU64,
    /// End of the failover window (0 before the fault).
    window_end_nanos: AtomicU64,
    /// Latency by when the message was posted and who received it (see
    /// [`BEFORE`] and the other phases).
    phases: [Box<[Mutex<Histogram<u64>>]>; 4],
}

impl Ctx {
    /// The client index of sender `j`: senders alternate between the halves.
    fn sender_client(&self, j: usize) -> usize {
        if j.is_multiple_of(2) {
            j / 2
        } else {
            self.half + j / 2
        }
    }

    /// The sender id of client `i`, if it sends.
    fn sender_of(&self, i: usize) -> Option<usize> {
        (0..self.senders).find(|&j| self.sender_client(j) == i)
    }

    fn phase_latency(&self, phases: &[usize]) -> Latency {
        let mut all = histogram();
        for shard in phases.iter().flat_map(|&p| self.phases[p].iter()) {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        Latency::from_histogram(&all)
    }
}

/// Latency phases: posted before the fault; within `--after` of it, as
/// received by a re-attached socket and by one of the others; later.
const BEFORE: usize = 0;
const DURING_MOVED: usize = 1;
const DURING_STAYED: usize = 2;
const AFTER: usize = 3;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("static histogram bounds are valid")
}

/// A delivery this late is named in the log, with its client.
const SLOW_DELIVERY_US: u64 = 2_000_000;

/// What one socket saw around the fault.
#[derive(Debug, Default)]
struct Around {
    first_frame_nanos: Option<u64>,
    first_new_post_nanos: Option<u64>,
    /// The slowest delivery to this client, and when its post was sent.
    slowest: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    args: &FailoverArgs,
    mode: &str,
    fault: Fault,
    round: usize,
    bin_dir: &std::path::Path,
    log_dir: &std::path::Path,
    tag: &str,
    quiet: bool,
) -> anyhow::Result<FailoverReport> {
    let mut stack = Stack::external(Vec::new(), Vec::new());
    let result = measure(
        args, mode, fault, round, bin_dir, log_dir, tag, quiet, &mut stack,
    )
    .await;
    stack.stop().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &FailoverArgs,
    mode: &str,
    fault: Fault,
    round: usize,
    bin_dir: &std::path::Path,
    log_dir: &std::path::Path,
    tag: &str,
    quiet: bool,
    stack: &mut Stack,
) -> anyhow::Result<FailoverReport> {
    let tcp_before = TcpTrouble::read();
    let redis = stack
        .start_redis(&log_dir.join(format!("{tag}-redis.log")), STARTUP_TIMEOUT)
        .await?;
    let victim_port = free_port()?;
    let (_, victim_pid) = stack
        .start_worker(
            bin_dir,
            victim_port,
            &redis,
            &args.worker_args,
            &log_dir.join(format!("{tag}-worker-victim.log")),
            STARTUP_TIMEOUT,
        )
        .await?;
    let survivor_port = free_port()?;
    let per_sender = args.rate / args.senders as f64;
    let mut gateway_args = vec![
        "--link-timeout-ms".to_string(),
        args.link_timeout_ms.to_string(),
        "--max-frames-per-sec".to_string(),
        ((per_sender * 4.0).ceil() as u32).max(1000).to_string(),
    ];
    gateway_args.extend(args.gateway_args.iter().cloned());
    let gateway_log = log_dir.join(format!("{tag}-gateway.log"));
    let gateway_port = stack
        .start_gateway(
            bin_dir,
            mode,
            &[victim_port, survivor_port],
            &gateway_args,
            &gateway_log,
            STARTUP_TIMEOUT,
        )
        .await?;
    let gateway_pid = stack.pid_of_last();
    let redis_pid = stack.pid_of_role("redis").context("redis-server pid")?;
    let url = format!("ws://127.0.0.1:{gateway_port}/ws");
    let setup = Setup::new(&[url], Vec::new(), &args.client, quiet)?;

    let planned = ((args.rate * (args.before + args.after)).round() as u64).max(1);
    let run_id = super::new_run_id();
    let half = args.clients / 2;
    let ctx = Arc::new(Ctx {
        setup,
        book: RunBook::new(run_id, args.senders as u32, planned),
        senders: args.senders,
        half,
        rate: args.rate,
        alias_prefix: format!("f{run_id}-"),
        connect_slots: Semaphore::new(args.connect_concurrency),
        connect: ConnectTally::new(Instant::now()),
        stop: CancellationToken::new(),
        sent: AtomicU64::new(0),
        writers_done: AtomicUsize::new(0),
        error_frames: AtomicU64::new(0),
        gap_missed: AtomicU64::new(0),
        first_error_frame: Mutex::new(None),
        closes: CloseLog::default(),
        fault_nanos: AtomicU64::new(0),
        window_end_nanos: AtomicU64::new(0),
        phases: std::array::from_fn(|_| (0..SHARDS).map(|_| Mutex::new(histogram())).collect()),
    });
    let (go_tx, go_rx) = watch::channel(None::<tokio::time::Instant>);
    let progress = Progress::new(quiet, "connect (victim half)", args.clients as u64);

    // The victim's half, while it is the only worker.
    let first = {
        let ctx = Arc::clone(&ctx);
        let go = go_rx.clone();
        spawn_paced(half, Some(args.connect_rate), ctx.stop.clone(), move |i| {
            client_task(i, Arc::clone(&ctx), go.clone())
        })
    };
    let connect_deadline = |n: usize| {
        Instant::now()
            + Duration::from_secs_f64(n as f64 / args.connect_rate)
            + ctx.setup.connect_timeout
            + Duration::from_secs(5)
    };
    wait_until(
        connect_deadline(half),
        || ctx.connect.done() >= half,
        || progress.set(ctx.connect.done() as u64),
    )
    .await;
    let on_victim = ctx.connect.connected();
    ensure!(
        on_victim > 0,
        "no client connected: {}",
        ctx.connect.report(half).first_error.unwrap_or_default()
    );

    // The survivor, then the other half.
    let (_, survivor_pid) = stack
        .start_worker(
            bin_dir,
            survivor_port,
            &redis,
            &args.worker_args,
            &log_dir.join(format!("{tag}-worker-survivor.log")),
            STARTUP_TIMEOUT,
        )
        .await?;
    let linked = format!("127.0.0.1:{survivor_port}");
    let link_deadline = Instant::now() + LINK_WAIT;
    let mut survivor_linked = false;
    while Instant::now() < link_deadline {
        let log = std::fs::read_to_string(&gateway_log).unwrap_or_default();
        if log
            .lines()
            .any(|l| l.contains("worker linked") && l.contains(&linked))
        {
            survivor_linked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        survivor_linked,
        "the gateway did not link to the second worker within {LINK_WAIT:?}"
    );
    progress.set_phase("connect (survivor half)", args.clients as u64);
    let second = {
        let ctx = Arc::clone(&ctx);
        let go = go_rx.clone();
        spawn_paced(
            args.clients - half,
            Some(args.connect_rate),
            ctx.stop.clone(),
            move |k| client_task(half + k, Arc::clone(&ctx), go.clone()),
        )
    };
    wait_until(
        connect_deadline(args.clients - half),
        || ctx.connect.done() >= args.clients,
        || progress.set(ctx.connect.done() as u64),
    )
    .await;
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    // A join storm's online lists can outlast any fixed settle on a slow
    // machine; a fault in the middle of them measures the lists, not the
    // failover.
    let servers = [gateway_pid, victim_pid, survivor_pid, redis_pid];
    let quiet_start = Instant::now();
    let quiet = wait_quiet(&servers).await;
    let quiet_wait_secs = quiet_start.elapsed().as_secs_f64();
    if !quiet {
        warn!(
            waited_secs = quiet_wait_secs,
            "the servers were still busy at the fault: read this run's numbers with that"
        );
    }
    // Read after the settle: a client still connecting at the deadline may
    // finish during it, and it receives (and is owed) the whole run.
    let connected = ctx.connect.connected();
    let connect = ctx.connect.report(args.clients);

    // Send; the fault after --before seconds.
    let watched = [
        Watched::new("gateway", gateway_pid),
        Watched::new("worker-victim", victim_pid),
        Watched::new("worker-survivor", survivor_pid),
        Watched::new("redis", redis_pid),
        Watched::new("loadtest", std::process::id()),
    ];
    let cpu_now = || -> (Instant, Vec<Option<f64>>) {
        (
            Instant::now(),
            watched
                .iter()
                .map(|w| sample(w.pid).map(|s| s.cpu_seconds))
                .collect(),
        )
    };
    let before = Duration::from_secs_f64(args.before);
    let after = Duration::from_secs_f64(args.after);
    let cpu_start = cpu_now();
    let send_start = Instant::now();
    let _ = go_tx.send(Some(tokio::time::Instant::now()));
    progress.set_phase("send, then the fault", (before + after).as_millis() as u64);
    let tick = |ctx: &Ctx| {
        progress.set(send_start.elapsed().as_millis() as u64);
        progress.message(format!(
            "sent {} delivered {}",
            ctx.sent.load(Ordering::Relaxed),
            ctx.book.delivered()
        ));
    };
    wait_until(send_start + before, || false, || tick(&ctx)).await;
    let cpu_fault = cpu_now();
    let fault_nanos = unix_nanos();
    ctx.window_end_nanos
        .store(fault_nanos + after.as_nanos() as u64, Ordering::Relaxed);
    ctx.fault_nanos.store(fault_nanos, Ordering::Relaxed);
    let signal = match fault {
        Fault::Kill => libc::SIGKILL,
        Fault::Stop => libc::SIGSTOP,
        Fault::Term => libc::SIGTERM,
    };
    stack.fault(victim_pid, signal)?;
    info!(
        pid = victim_pid,
        fault = fault.name(),
        "victim worker signalled"
    );
    let window_end = Instant::now() + after;
    wait_until(window_end, || false, || tick(&ctx)).await;
    let cpu_end = cpu_now();
    wait_until(
        Instant::now() + Duration::from_secs(5),
        || ctx.writers_done.load(Ordering::Relaxed) >= args.senders,
        || tick(&ctx),
    )
    .await;

    // Drain.
    let sent = ctx.sent.load(Ordering::Relaxed);
    let expected = sent * connected as u64;
    progress.set_phase("drain", expected);
    let mut last = (ctx.book.delivered(), Instant::now());
    let drain_start = Instant::now();
    wait_until(
        Instant::now() + Duration::from_secs_f64(args.drain),
        || {
            let now = ctx.book.delivered();
            if now != last.0 {
                last = (now, Instant::now());
            }
            now >= expected || last.1.elapsed() >= DRAIN_QUIET
        },
        || progress.set(ctx.book.delivered()),
    )
    .await;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let drain_went_quiet = ctx.book.delivered() < expected;
    let tcp = TcpTrouble::read()
        .zip(tcp_before)
        .map(|(now, before)| now.since(&before));
    if let Some(tcp) = tcp.filter(TcpTrouble::shed) {
        warn!(
            memory_pressures = tcp.memory_pressures,
            rcvq_drops = tcp.rcvq_drops,
            timeouts = tcp.timeouts,
            "the kernel ran short of TCP memory during the run and dropped segments: \
             late deliveries include its retransmission timeouts"
        );
    }
    ctx.stop.cancel();
    progress.finish();

    let mut totals = Totals::default();
    let (mut first_frame, mut resumed, mut survivors) = (Vec::new(), Vec::new(), Vec::new());
    let mut not_resumed = 0;
    let mut reattached = 0;
    let mut short = [0u64; 2];
    for handles in [first, second] {
        let handles = handles.await.context("client spawner failed")?;
        for (i, tally, around) in join_all(handles).await?.into_iter().flatten() {
            totals.add(&tally.counts);
            if tally.counts.received < sent {
                short[usize::from(i >= half)] += 1;
            }
            let ms = |n: Option<u64>| n.map(|n| n.saturating_sub(fault_nanos) as f64 / 1e6);
            if i < half {
                reattached += 1;
                first_frame.extend(ms(around.first_frame_nanos));
                match ms(around.first_new_post_nanos) {
                    Some(v) => resumed.push(v),
                    None => not_resumed += 1,
                }
            } else {
                survivors.extend(ms(around.first_new_post_nanos));
            }
        }
    }
    let cpu = watched
        .iter()
        .enumerate()
        .map(|(k, w)| {
            let rate = |a: &(Instant, Vec<Option<f64>>), b: &(Instant, Vec<Option<f64>>)| {
                let wall = b.0.duration_since(a.0).as_secs_f64();
                match (a.1[k], b.1[k]) {
                    (Some(x), Some(y)) if wall > 0.0 => (y - x).max(0.0) / wall,
                    _ => 0.0,
                }
            };
            CpuWindows {
                role: w.role.clone(),
                pid: w.pid,
                before_cores: rate(&cpu_start, &cpu_fault),
                during_cores: rate(&cpu_fault, &cpu_end),
            }
        })
        .collect();
    let log = std::fs::read_to_string(&gateway_log).unwrap_or_default();
    let victim = format!("127.0.0.1:{victim_port}");
    let detected = log
        .lines()
        .filter(|l| {
            l.contains(&victim)
                && (l.contains("link lost")
                    || l.contains("ended the link")
                    || l.contains("draining"))
        })
        .find_map(|l| since_fault_ms(l, fault_nanos));
    let reattach_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sockets re-attached"))
        .collect();
    let reattached_at = reattach_lines
        .iter()
        .filter_map(|l| since_fault_ms(l, fault_nanos))
        .filter(|ms| *ms >= 0.0)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    let took: Vec<u64> = reattach_lines
        .iter()
        .filter_map(|l| field(l, "took_ms=")?.parse().ok())
        .collect();
    Ok(FailoverReport {
        mode: mode.to_string(),
        fault,
        round,
        clients: args.clients,
        connected,
        reattached_sockets: reattached,
        senders: args.senders,
        rate: args.rate,
        link_timeout_ms: args.link_timeout_ms,
        first_frame_after_fault: Spread::of(first_frame),
        resumed: Spread::of(resumed),
        not_resumed,
        survivors_resumed: Spread::of(survivors),
        gateway_detected_ms: detected,
        gateway_reattached_ms: reattached_at,
        gateway_reattach_took_ms: took,
        latency_before: ctx.phase_latency(&[BEFORE]),
        latency_during: ctx.phase_latency(&[DURING_MOVED, DURING_STAYED]),
        latency_during_moved: ctx.phase_latency(&[DURING_MOVED]),
        latency_during_stayed: ctx.phase_latency(&[DURING_STAYED]),
        latency_after: ctx.phase_latency(&[AFTER]),
        sent,
        deliveries_expected: expected,
        deliveries_received: totals.received,
        loss: expected.saturating_sub(totals.received),
        loss_unseen_posts: ctx.book.unseen(sent),
        loss_clients: short,
        gap_missed: ctx.gap_missed.load(Ordering::Relaxed),
        duplicates: totals.duplicates,
        one_order: totals.one_order(),
        error_frames: ctx.error_frames.load(Ordering::Relaxed),
        first_error_frame: ctx
            .first_error_frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        quiet_wait_secs,
        never_quiet: !quiet,
        drain_secs,
        drain_went_quiet,
        closed_by_server: ctx.closes.closed(),
        cpu,
        connect_failed: connect.failed,
        first_connect_error: connect.first_error,
        connect_errors: connect.errors,
        tcp,
    })
}

/// `key=value` from a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()
}

/// Milliseconds from the fault to the time stamp that starts a log line
/// (`2026-11-27T06:20:01.123456Z ...`, UTC). Time of day only: a run that
/// crosses midnight is handled by the modulo.
fn since_fault_ms(line: &str, fault_nanos: u64) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    let of_day = h * 3600.0 + m * 60.0 + s;
    let fault = (fault_nanos % 86_400_000_000_000) as f64 / 1e9;
    let mut delta = of_day - fault;
    if delta < -43_200.0 {
        delta += 86_400.0;
    }
    Some(delta * 1000.0)
}

type Outcome = Option<(usize, ClientTally, Around)>;

async fn client_task(
    i: usize,
    ctx: Arc<Ctx>,
    go: watch::Receiver<Option<tokio::time::Instant>>,
) -> Outcome {
    let out = client_session(i, &ctx, go).await;
    if out.is_none() && ctx.sender_of(i).is_some() {
        ctx.writers_done.fetch_add(1, Ordering::Relaxed);
    }
    out
}

async fn client_session(
    i: usize,
    ctx: &Ctx,
    mut go: watch::Receiver<Option<tokio::time::Instant>>,
) -> Outcome {
    let wanted = || !ctx.stop.is_cancelled() && go.borrow().is_none();
    let (mut ws, ws_id) =
        connect_client(i, &ctx.setup, &ctx.connect_slots, &ctx.connect, wanted).await?;
    let alias = format!("{}{i}", ctx.alias_prefix);
    if let Err(e) = ws.send(Message::text(wire::alias_frame(&alias))).await {
        ctx.connect
            .fail(&anyhow::Error::new(e).context("setting the alias"));
        return None;
    }
    ctx.connect.ok();
    let mut tally = ClientTally::new(&ctx.book);
    let mut around = Around::default();
    let ws = match ctx.sender_of(i) {
        Some(j) => {
            let (mut sink, mut stream) = ws.split();
            tokio::join!(
                read_loop(i, ctx, &mut stream, &mut tally, &mut around),
                send_loop(j, ctx, &mut sink, &alias, &mut go),
            );
            stream.reunite(sink).expect("halves of one socket")
        }
        None => {
            let mut ws = ws;
            read_loop(i, ctx, &mut ws, &mut tally, &mut around).await;
            ws
        }
    };
    close_quietly(ws).await;
    // What others got and this client did not (a post nobody got is
    // counted as lost in the report, not here).
    let mut missing = tally.missing(ctx.sent.load(Ordering::Relaxed));
    missing.retain(|&g| ctx.book.seen_by_any(g));
    if !missing.is_empty() {
        tracing::warn!(client = i, %ws_id, missed = missing.len(), first = ?&missing[..missing.len().min(12)], "client missed messages");
    }
    if let Some((us, sent_nanos)) = around.slowest
        && us >= SLOW_DELIVERY_US
    {
        let fault = ctx.fault_nanos.load(Ordering::Relaxed);
        tracing::warn!(
            client = i,
            %ws_id,
            slowest_ms = us / 1000,
            posted_since_fault_ms = (sent_nanos as i64 - fault as i64) / 1_000_000,
            "a message reached this client late"
        );
    }
    tally.shrink();
    Some((i, tally, around))
}

async fn read_loop<S>(
    i: usize,
    ctx: &Ctx,
    stream: &mut S,
    tally: &mut ClientTally,
    around: &mut Around,
) where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let outcomes = Outcomes {
        error_frames: &ctx.error_frames,
        gap_missed: &ctx.gap_missed,
        first_error_frame: &ctx.first_error_frame,
        closes: &ctx.closes,
    };
    read_frames(stream, &ctx.stop, outcomes, |text| {
        let now = unix_nanos();
        let Ok(chat) = serde_json::from_str::<ChatFrame<'_>>(text) else {
            tally.counts.foreign += 1;
            return;
        };
        let marker = Marker::from_base64(&chat.message);
        let before = tally.counts.received;
        tally.on_chat(&ctx.book, i, marker, chat.id, now);
        let fresh = tally.counts.received > before;
        let fault = ctx.fault_nanos.load(Ordering::Relaxed);
        if fault != 0 && now >= fault {
            around.first_frame_nanos.get_or_insert(now);
        }
        if let (true, Some(m)) = (fresh, marker) {
            let phase = if fault == 0 || m.sent_nanos < fault {
                BEFORE
            } else if m.sent_nanos < ctx.window_end_nanos.load(Ordering::Relaxed) {
                if i < ctx.half {
                    DURING_MOVED
                } else {
                    DURING_STAYED
                }
            } else {
                AFTER
            };
            if fault != 0 && m.sent_nanos >= fault {
                around.first_new_post_nanos.get_or_insert(now);
            }
            let us = now.saturating_sub(m.sent_nanos) / 1000;
            if around.slowest.is_none_or(|(slowest, _)| us > slowest) {
                around.slowest = Some((us, m.sent_nanos));
            }
            ctx.phases[phase][i % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record(us.max(1));
        }
    })
    .await;
}

/// Sender `j`'s share of the plan (see [`send_planned`]).
async fn send_loop<K>(
    j: usize,
    ctx: &Ctx,
    sink: &mut K,
    alias: &str,
    go: &mut watch::Receiver<Option<tokio::time::Instant>>,
) where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let plan = Plan {
        book: &ctx.book,
        sender: j,
        senders: ctx.senders,
        rate: ctx.rate,
        pad: 0,
        stop: &ctx.stop,
        sent: &ctx.sent,
    };
    send_planned(plan, sink, alias, go, |_| {}).await;
    ctx.writers_done.fetch_add(1, Ordering::Relaxed);
}

fn lat(l: &Latency) -> String {
    format!(
        "p50 {:.1} / p99 {:.1} / max {:.1} ms ({} deliveries)",
        l.p50_us as f64 / 1000.0,
        l.p99_us as f64 / 1000.0,
        l.max_us as f64 / 1000.0,
        l.count
    )
}

fn spread(s: &Spread) -> String {
    format!(
        "p50 {:.1} / p99 {:.1} / max {:.1} ms (n={})",
        s.p50_ms, s.p99_ms, s.max_ms, s.count
    )
}

/// One run as text.
pub fn text(r: &FailoverReport) -> String {
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0} ms"));
    let mut out = format!(
        "failover {} {} round {}: {} of {} sockets connected, {} on the victim; {} senders at {} posts/s; link timeout {} ms\n",
        r.mode,
        r.fault.name(),
        r.round,
        r.connected,
        r.clients,
        r.reattached_sockets,
        r.senders,
        r.rate,
        r.link_timeout_ms
    );
    out += &format!(
        "  fault -> first frame (re-attached)   {}\n",
        spread(&r.first_frame_after_fault)
    );
    out += &format!(
        "  fault -> chat resumed (re-attached)  {}; not resumed {}\n",
        spread(&r.resumed),
        r.not_resumed
    );
    out += &format!(
        "  fault -> chat resumed (survivors)    {}\n",
        spread(&r.survivors_resumed)
    );
    out += &format!(
        "  gateway log: detected {}, last re-attach pass {}, passes took {:?} ms\n",
        opt(r.gateway_detected_ms),
        opt(r.gateway_reattached_ms),
        r.gateway_reattach_took_ms
    );
    out += &format!("  latency posted before   {}\n", lat(&r.latency_before));
    out += &format!("  latency posted during   {}\n", lat(&r.latency_during));
    out += &format!(
        "    to re-attached sockets  {}\n",
        lat(&r.latency_during_moved)
    );
    out += &format!(
        "    to the others           {}\n",
        lat(&r.latency_during_stayed)
    );
    out += &format!("  latency posted after    {}\n", lat(&r.latency_after));
    out += &format!(
        "  sent {}; deliveries {} of {}; lost {}; duplicates {}; one order {}; error frames {}; closed {:?}\n",
        r.sent,
        r.deliveries_received,
        r.deliveries_expected,
        r.loss,
        r.duplicates,
        r.one_order,
        r.error_frames,
        r.closed_by_server
    );
    if r.loss > 0 {
        out += &format!(
            "  lost: {} posts no client received; clients missing some: {} on the victim, {} on the survivor; announced by Gap frames: {}\n",
            r.loss_unseen_posts, r.loss_clients[0], r.loss_clients[1], r.gap_missed
        );
    }
    out += &format!(
        "  settled: quiet after {:.1} s more{}\n",
        r.quiet_wait_secs,
        if r.never_quiet {
            " (gave up: still busy)"
        } else {
            ""
        }
    );
    out += &format!(
        "  drain {:.1} s{}{}\n",
        r.drain_secs,
        if r.drain_went_quiet {
            " (ended: nothing arrived for 3 s)"
        } else {
            ""
        },
        r.first_error_frame
            .as_deref()
            .map(|e| format!("; first error frame: {e}"))
            .unwrap_or_default()
    );
    if let Some(tcp) = &r.tcp {
        out += &format!(
            "  kernel TCP: {} segments sent again, {} timeouts; short of memory {} times, {} segments dropped for it{}\n",
            tcp.retransmitted,
            tcp.timeouts,
            tcp.memory_pressures,
            tcp.rcvq_drops,
            if tcp.shed() {
                " (late deliveries include the kernel's retransmission timeouts)"
            } else {
                ""
            }
        );
    }
    out += "  CPU cores before -> during:";
    for c in &r.cpu {
        out += &format!(" {} {:.2}->{:.2};", c.role, c.before_cores, c.during_cores);
    }
    out += "\n";
    if r.connect_failed > 0 {
        out += &format!(
            "  connect failures {} (first: {})\n",
            r.connect_failed,
            r.first_connect_error.as_deref().unwrap_or("")
        );
        for (kind, n) in &r.connect_errors {
            out += &format!("    {n} x {kind}\n");
        }
    }
    out
}

/// Every run, one line of the headline numbers each.
pub fn table(s: &FailoverSummary) -> String {
    let mut out = format!(
        "\nfailover: {} clients, {} senders, {} posts/s, fault after {} s, window {} s; machine {} CPUs, load at start {}\n",
        s.parameters.clients,
        s.parameters.senders,
        s.parameters.rate,
        s.parameters.before,
        s.parameters.after,
        s.machine.cpus,
        s.machine.loadavg_at_start.as_deref().unwrap_or("?")
    );
    let mut t = crate::report::text_table([
        "run",
        "moved",
        "resumed p50/p99/max ms",
        "detected",
        "during p50/p99/max ms",
        "closed",
        "lost",
        "dups",
        "order",
    ]);
    for r in &s.runs {
        t.add_row([
            format!("{} {} r{}", r.mode, r.fault.name(), r.round),
            r.reattached_sockets.to_string(),
            format!(
                "{:.0}/{:.0}/{:.0}",
                r.resumed.p50_ms, r.resumed.p99_ms, r.resumed.max_ms
            ),
            r.gateway_detected_ms
                .map_or("-".into(), |v| format!("{v:.0} ms")),
            format!(
                "{:.1}/{:.1}/{:.1}",
                r.latency_during.p50_us as f64 / 1000.0,
                r.latency_during.p99_us as f64 / 1000.0,
                r.latency_during.max_us as f64 / 1000.0
            ),
            r.closed_by_server.values().sum::<usize>().to_string(),
            r.loss.to_string(),
            r.duplicates.to_string(),
            if r.one_order { "yes" } else { "NO" }.to_string(),
        ]);
    }
    out += &format!("{t}\n");
    for f in &s.failed {
        out += &format!("failed: {f}\n");
    }
    out
}

/// Waits, up to [`QUIET_MAX`], until `pids` together use under
/// [`QUIET_CORES`] over a second. False if they never did.
async fn wait_quiet(pids: &[u32]) -> bool {
    let used = || -> f64 {
        pids.iter()
            .filter_map(|&pid| sample(pid).map(|s| s.cpu_seconds))
            .sum()
    };
    let deadline = Instant::now() + QUIET_MAX;
    let (mut since, mut before) = (Instant::now(), used());
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (now, cpu) = (Instant::now(), used());
        if (cpu - before) / now.duration_since(since).as_secs_f64() < QUIET_CORES {
            return true;
        }
        (since, before) = (now, cpu);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_nearest_rank() {
        let s = Spread::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.count, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Spread::of(Vec::new()).count, 0);
    }

    #[test]
    fn log_stamps_are_read_against_the_fault() {
        // 06:20:01.5 UTC on some day; the line is 250 ms later.
        let fault = (86_400 * 20_000 + 6 * 3600 + 20 * 60 + 1) * 1_000_000_000 + 500_000_000;
        let line = "2026-11-27T06:20:01.750000Z  INFO sharedconn_gateway::upstream: sockets re-attached sockets=500 waiting=0 took_ms=42";
        let ms = since_fault_ms(line, fault).unwrap();
        assert!((ms - 250.0).abs() < 0.01, "{ms}");
        assert_eq!(field(line, "took_ms="), Some("42"));
    }
}

//! `join`: a join storm. C clients connect and set aliases as fast as they can
//! (up to `--concurrency` handshakes in flight, so the server's accept backlog
//! is not overrun into SYN retries); each watches its userlist frames. A
//! client's list is complete when it holds the alias of every client that
//! connected (clients that failed to connect are reported, not waited for).
//! Reports when every list was complete and the connects/s achieved.
//!
//! Each client records when the count of this run's aliases in its list rose
//! (a few entries: lists are paced), and publishes its latest count, so the
//! storm ends as soon as every count reaches the number connected; the
//! completion times are read from the records afterwards. Aliases are
//! `j<run>-<index>` with a fixed-width index, so a list too short to beat the
//! client's best count is skipped without a scan, and a longer one is counted
//! with one substring search (see [`wire::count_run_aliases`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{
    CloseLog, ConnectTally, Setup, close_reason, connect_client, join_all, seconds, spawn_paced,
    wait_until,
};
use crate::cli::JoinArgs;
use crate::procstat::{Monitor, cpu_of};
use crate::progress::Progress;
use crate::report::{JoinReport, SERVER_ROLES};
use crate::wire::{self, FrameKind};

/// Digits of the alias index: fixed width, enough for 10 million clients.
const INDEX_WIDTH: usize = 7;

struct Ctx {
    setup: Setup,
    alias_prefix: String,
    finder: Finder<'static>,
    /// Bytes one of our aliases takes in a list: quotes, comma, text.
    entry_len: usize,
    connect_slots: Semaphore,
    connect: ConnectTally,
    stop: CancellationToken,
    /// Latest count of this run's aliases in each client's list.
    latest: Box<[AtomicUsize]>,
    userlist_frames: AtomicU64,
    userlist_bytes: AtomicU64,
    closes: CloseLog,
}

pub async fn run(setup: &Setup, args: &JoinArgs) -> anyhow::Result<JoinReport> {
    ensure!(
        (1..10_000_000).contains(&args.clients),
        "--clients must be between 1 and 9,999,999"
    );
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    let timeout = seconds("timeout", args.timeout, 3600.0)?;
    crate::net::ensure_fd_budget(args.clients)?;
    let run_id = super::new_run_id();
    let alias_prefix = format!("j{run_id}-");
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        setup: setup.clone(),
        finder: Finder::new(format!("\"{alias_prefix}").as_bytes()).into_owned(),
        entry_len: alias_prefix.len() + INDEX_WIDTH + wire::USER_ENTRY_OVERHEAD,
        alias_prefix,
        connect_slots: Semaphore::new(args.concurrency),
        connect: ConnectTally::new(started),
        stop: CancellationToken::new(),
        latest: (0..args.clients).map(|_| AtomicUsize::new(0)).collect(),
        userlist_frames: AtomicU64::new(0),
        userlist_bytes: AtomicU64::new(0),
        closes: CloseLog::default(),
    });
    let monitor = Monitor::start(setup.watched_with_self());
    let progress = Progress::new(setup.quiet, "join", args.clients as u64);
    let spawner = {
        let ctx = Arc::clone(&ctx);
        spawn_paced(args.clients, None, ctx.stop.clone(), move |i| {
            client_task(i, Arc::clone(&ctx))
        })
    };
    // Complete: every attempt is over and every connected client's list
    // holds everyone connected.
    let complete_now = || {
        let target = ctx.connect.connected();
        ctx.latest
            .iter()
            .filter(|c| c.load(Ordering::Relaxed) >= target)
            .count()
    };
    wait_until(
        started + timeout,
        || ctx.connect.done() >= args.clients && complete_now() >= ctx.connect.connected(),
        || {
            progress.set(
                ctx.latest
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(0) as u64,
            );
            progress.message(format!("{} connected", ctx.connect.connected()));
        },
    )
    .await;
    let procs = monitor.finish(false).await;
    ctx.stop.cancel();
    progress.finish();
    let handles = spawner.await.context("client spawner failed")?;
    let records = join_all(handles).await?;
    let connect = ctx.connect.report(args.clients);
    let target = connect.connected;
    let mut times: Vec<f64> = records
        .iter()
        .flatten()
        .filter_map(|rises| rises.iter().find(|(_, count)| *count >= target))
        .map(|(at, _)| at.as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let complete = times.len();
    let all = target > 0 && complete == target;
    let quantile = |q: f64| {
        (!times.is_empty()).then(|| times[((times.len() - 1) as f64 * q).round() as usize])
    };
    Ok(JoinReport {
        urls: setup.urls(),
        clients: args.clients,
        concurrency: args.concurrency,
        complete,
        all_complete_secs: if all { times.last().copied() } else { None },
        complete_p50_secs: quantile(0.5),
        complete_p99_secs: quantile(0.99),
        userlist_frames: ctx.userlist_frames.load(Ordering::Relaxed),
        userlist_bytes: ctx.userlist_bytes.load(Ordering::Relaxed),
        closed_by_server: ctx.closes.closed(),
        server_cpu_seconds: cpu_of(&procs, &SERVER_ROLES),
        loadtest_cpu_seconds: cpu_of(&procs, &["loadtest"]),
        processes: procs,
        connect,
    })
}

/// One joining client; returns when the count of this run's aliases in its
/// list rose, and to what (since the storm began), or `None` if it never
/// connected.
async fn client_task(i: usize, ctx: Arc<Ctx>) -> Option<Vec<(Duration, usize)>> {
    let wanted = || !ctx.stop.is_cancelled();
    let (mut ws, _) =
        connect_client(i, &ctx.setup, &ctx.connect_slots, &ctx.connect, wanted).await?;
    let alias = format!("{}{i:0width$}", ctx.alias_prefix, width = INDEX_WIDTH);
    if let Err(e) = ws.send(Message::text(wire::alias_frame(&alias))).await {
        ctx.connect
            .fail(&anyhow::Error::new(e).context("setting the alias"));
        return None;
    }
    ctx.connect.ok();

    let mut rises: Vec<(Duration, usize)> = Vec::new();
    let mut best = 0;
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    let ended_by_us = loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => break true,
            frame = ws.next() => frame,
        };
        match frame {
            Some(Ok(Message::Text(text))) if wire::frame_kind(&text) == FrameKind::UserList => {
                ctx.userlist_frames.fetch_add(1, Ordering::Relaxed);
                ctx.userlist_bytes
                    .fetch_add(text.len() as u64, Ordering::Relaxed);
                let count = wire::count_run_aliases(&text, &ctx.finder, best + 1, ctx.entry_len);
                if count > best {
                    best = count;
                    rises.push((ctx.connect.started().elapsed(), count));
                    ctx.latest[i].store(count, Ordering::Relaxed);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                ctx.closes.record(close_reason(frame.as_ref()));
                break false;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                ctx.closes.record(format!("read error: {e}"));
                break false;
            }
            None => {
                ctx.closes.record("connection ended without close".into());
                break false;
            }
        }
    };
    if ended_by_us {
        super::chat::close_quietly(ws).await;
    }
    Some(rises)
}

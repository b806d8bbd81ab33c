//! `chat`: C clients connect (paced) and set aliases; S of them send at an
//! aggregate rate R for D seconds; every client accounts every Chat frame it
//! receives (see [`crate::tracker`]).
//!
//! Phases, each with a deadline: connect → settle (userlist traffic from the
//! joins dies down) → send → drain (until every expected delivery arrived, or
//! nothing arrived for [`DRAIN_QUIET`], or `--drain` passed). Server CPU is
//! measured from the start of sending to the end of the drain.
//!
//! Each client is one task. A sender's socket is split: the reader and the
//! paced writer are two futures of that task, so reading never waits for a
//! write, and per frame the reader only classifies, parses the marker and
//! updates its own tally.
//!
//! `--non-readers N` adds N clients after the others, connected the same way
//! at the same pace but with a small TCP receive buffer, that set their alias
//! and then read nothing: the servers' writes to them stall, and their RSS
//! shows what such a socket costs. They are no receivers in the accounting.
//! After the drain (and the last /proc sample) each reads what its socket
//! holds, to tell whether the server ended it and how; only then do the
//! readers stop, so their leaving does not reach the non-readers first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::traffic::{Outcomes, Plan, read_frames, send_planned};
use super::{
    CloseLog, ConnectTally, Setup, close_reason, connect_client, connect_client_with_recv_buffer,
    join_all, seconds, spawn_paced, unix_nanos, wait_until,
};
use crate::cli::ChatArgs;
use crate::client::Ws;
use crate::procstat::{Monitor, cpu_of};
use crate::progress::Progress;
use crate::report::{ChatReport, Latency, NonReaderReport, SERVER_ROLES};
use crate::tracker::{ClientTally, MAX_EXPECTED_DELIVERIES, RunBook, Totals};
use crate::wire::{self, ChatFrame, Marker};

/// The drain ends early when no delivery arrived for this long: the rest is
/// lost, not late.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

/// How long a client's close frame may take at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// `SO_RCVBUF` of a non-reader (Linux doubles it): small, so that its side
/// holds a few KiB instead of a loopback window of megabytes. The server's
/// kernel send buffer (up to `net.ipv4.tcp_wmem`'s max, 4 MiB by default)
/// still fills before the server's writes stall, and is not in its RSS.
const NON_READER_RECV_BUFFER: u32 = 4 * 1024;

/// At the end, a non-reader reads what its socket holds: it is still open
/// when nothing more arrives for this long...
const NON_READER_QUIET: Duration = Duration::from_millis(300);

/// ...or when frames still arrive after this long (a server catching it up).
const NON_READER_CHECK: Duration = Duration::from_secs(3);

struct Ctx {
    setup: Setup,
    book: RunBook,
    /// Clients `0..clients` read; the non-readers come after them.
    clients: usize,
    senders: usize,
    rate: f64,
    pad: usize,
    alias_prefix: String,
    connect_slots: Semaphore,
    connect: ConnectTally,
    stop: CancellationToken,
    sent: AtomicU64,
    writers_done: AtomicUsize,
    lag_max_us: AtomicU64,
    error_frames: AtomicU64,
    gap_missed: AtomicU64,
    first_error_frame: Mutex<Option<String>>,
    closes: CloseLog,
    /// The non-readers' connects, apart so that the accounting's receivers
    /// are the readers only.
    non_reader_connect: ConnectTally,
    /// Tells the non-readers to read how their socket ended.
    check_non_readers: CancellationToken,
    non_readers_checked: AtomicUsize,
}

impl Ctx {
    fn outcomes(&self) -> Outcomes<'_> {
        Outcomes {
            error_frames: &self.error_frames,
            gap_missed: &self.gap_missed,
            first_error_frame: &self.first_error_frame,
            closes: &self.closes,
        }
    }
}

/// Runs the scenario against `setup` and reports.
pub async fn run(setup: &Setup, args: &ChatArgs) -> anyhow::Result<ChatReport> {
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(
        (1..=args.clients).contains(&args.senders),
        "--senders must be between 1 and --clients"
    );
    ensure!(
        args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000_000.0,
        "--rate must be a positive number of messages per second"
    );
    let duration = seconds("duration", args.duration, 3600.0)?;
    let settle = seconds("settle", args.settle, 600.0)?;
    let drain = seconds("drain", args.drain, 600.0)?;
    ensure!(args.connect_rate > 0.0, "--connect-rate must be positive");
    ensure!(
        args.connect_concurrency > 0,
        "--connect-concurrency must be positive"
    );
    ensure!(
        args.pad <= 60_000,
        "--pad must stay under the servers' frame limit"
    );
    let planned = ((args.rate * args.duration).round() as u64).max(1);
    ensure!(
        planned.saturating_mul(args.clients as u64) <= MAX_EXPECTED_DELIVERIES,
        "{} clients x {planned} messages is too many deliveries to account for in memory; \
         lower --clients, --rate or --duration",
        args.clients
    );
    crate::net::ensure_fd_budget(args.clients + args.non_readers)?;
    let per_sender = args.rate / args.senders as f64;
    if per_sender > 90.0 {
        info!(
            per_sender,
            "each sender sends more than ~90 msg/s; a gateway with the default \
             --max-frames-per-sec may refuse some"
        );
    }

    let run_id = super::new_run_id();
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        setup: setup.clone(),
        book: RunBook::new(run_id, args.senders as u32, planned),
        clients: args.clients,
        senders: args.senders,
        rate: args.rate,
        pad: args.pad,
        alias_prefix: format!("c{run_id}-"),
        connect_slots: Semaphore::new(args.connect_concurrency),
        connect: ConnectTally::new(started),
        stop: CancellationToken::new(),
        sent: AtomicU64::new(0),
        writers_done: AtomicUsize::new(0),
        lag_max_us: AtomicU64::new(0),
        error_frames: AtomicU64::new(0),
        gap_missed: AtomicU64::new(0),
        first_error_frame: Mutex::new(None),
        closes: CloseLog::default(),
        // The first non-reader is due when the last reader is.
        non_reader_connect: ConnectTally::new(
            started + Duration::from_secs_f64(args.clients as f64 / args.connect_rate),
        ),
        check_non_readers: CancellationToken::new(),
        non_readers_checked: AtomicUsize::new(0),
    });
    // Only with non-readers: a gateway that gives up on a stalled socket
    // cannot send it the close code, so its own count is the one to read.
    let closes_before = if args.non_readers > 0 {
        gateway_closes(setup).await
    } else {
        None
    };
    let monitor = Monitor::start(setup.watched_with_self());
    let (go_tx, go_rx) = watch::channel(None::<tokio::time::Instant>);
    let progress = Progress::new(setup.quiet, "connect", args.clients as u64);

    // Connect.
    let spawner = {
        let ctx = Arc::clone(&ctx);
        spawn_paced(
            args.clients + args.non_readers,
            Some(args.connect_rate),
            ctx.stop.clone(),
            move |i| any_client(i, Arc::clone(&ctx), go_rx.clone()),
        )
    };
    let connect = ctx
        .connect
        .wait_all(
            args.clients,
            args.connect_rate,
            setup.connect_timeout,
            &progress,
        )
        .await;
    let connected = ctx.connect.connected();
    if connected == 0 {
        ctx.stop.cancel();
        progress.finish();
        anyhow::bail!(
            "no client connected to {}: {}",
            setup.urls().join(", "),
            connect.first_error.unwrap_or_default()
        );
    }
    let non_reader_connect = if args.non_readers > 0 {
        progress.set_phase("non-readers", args.non_readers as u64);
        ctx.non_reader_connect
            .wait_all(
                args.non_readers,
                args.connect_rate,
                setup.connect_timeout,
                &progress,
            )
            .await
    } else {
        ctx.non_reader_connect.report(0)
    };

    // Settle.
    progress.set_phase("settle", settle.as_millis() as u64);
    let settle_end = Instant::now() + settle;
    wait_until(
        settle_end,
        || false,
        || {
            progress.set(
                settle
                    .saturating_sub(settle_end.saturating_duration_since(Instant::now()))
                    .as_millis() as u64,
            )
        },
    )
    .await;

    // Send.
    let mut monitor = monitor;
    monitor.mark_cpu_start();
    let send_start_nanos = unix_nanos();
    let send_start = Instant::now();
    let _ = go_tx.send(Some(tokio::time::Instant::now()));
    progress.set_phase("send", duration.as_millis() as u64);
    wait_until(
        send_start + duration + Duration::from_secs(5),
        || {
            ctx.writers_done.load(Ordering::Relaxed) >= args.senders
                && send_start.elapsed() >= duration
        },
        || {
            progress.set(send_start.elapsed().min(duration).as_millis() as u64);
            progress.message(format!(
                "sent {} delivered {}",
                ctx.sent.load(Ordering::Relaxed),
                ctx.book.delivered()
            ));
        },
    )
    .await;

    // Drain.
    let sent = ctx.sent.load(Ordering::Relaxed);
    let expected = sent * connected as u64;
    progress.set_phase("drain", expected);
    let drain_deadline = Instant::now() + drain;
    let mut last = (ctx.book.delivered(), Instant::now());
    wait_until(
        drain_deadline,
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
    let procs = monitor.finish(false).await;
    let closes_during = match (closes_before, gateway_closes(setup).await) {
        (Some(before), Some(after)) if args.non_readers > 0 => Some(
            after
                .into_iter()
                .map(|(code, n)| {
                    let n = n.saturating_sub(before.get(&code).copied().unwrap_or(0));
                    (code, n)
                })
                .filter(|&(_, n)| n > 0)
                .collect(),
        ),
        _ => None,
    };

    // How the non-readers ended, before the readers' leaving reaches them.
    ctx.check_non_readers.cancel();
    wait_until(
        Instant::now() + NON_READER_CHECK + Duration::from_secs(2),
        || ctx.non_readers_checked.load(Ordering::Relaxed) >= ctx.non_reader_connect.connected(),
        || {},
    )
    .await;

    // Stop and collect.
    ctx.stop.cancel();
    progress.finish();
    let handles = spawner.await.context("client spawner failed")?;
    let mut totals = Totals::default();
    let mut non_readers = NonReaderReport {
        requested: args.non_readers,
        connect: non_reader_connect,
        recv_buffer_bytes: NON_READER_RECV_BUFFER,
        ..NonReaderReport::default()
    };
    for end in join_all(handles).await? {
        match end {
            ClientEnd::Reader(Some(tally)) => totals.add(&tally.counts),
            ClientEnd::Reader(None) | ClientEnd::NonReader(NonReaderEnd::NotConnected) => {}
            ClientEnd::NonReader(NonReaderEnd::Open) => non_readers.open_at_end += 1,
            ClientEnd::NonReader(NonReaderEnd::Closed(reason)) => {
                non_readers.closed += 1;
                *non_readers.closed_by.entry(reason).or_default() += 1;
            }
        }
    }
    let latency = Latency::from_histogram(&ctx.book.latency());
    let window_secs = totals
        .last_recv_nanos
        .map(|last| last.saturating_sub(send_start_nanos) as f64 / 1e9)
        .unwrap_or_default();
    let server_cpu = cpu_of(&procs, &SERVER_ROLES);
    let measured_servers = procs.iter().any(|p| p.role != "loadtest");
    Ok(ChatReport {
        urls: setup.urls(),
        clients: args.clients,
        senders: args.senders,
        rate: args.rate,
        duration_secs: args.duration,
        pad: args.pad,
        connect,
        planned,
        sent,
        deliveries_expected: expected,
        deliveries_received: totals.received,
        loss: expected.saturating_sub(totals.received),
        loss_ratio: if expected > 0 {
            expected.saturating_sub(totals.received) as f64 / expected as f64
        } else {
            0.0
        },
        duplicates: totals.duplicates,
        one_order: totals.one_order(),
        order_violations: totals.order_violations,
        id_conflicts: totals.id_conflicts,
        missing_ids: totals.missing_ids,
        foreign_frames: totals.foreign,
        error_frames: ctx.error_frames.load(Ordering::Relaxed),
        first_error_frame: ctx
            .first_error_frame
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        closed_by_server: ctx.closes.closed(),
        non_readers,
        gateway_closes: closes_during,
        deliveries_per_sec: if window_secs > 0.0 {
            totals.received as f64 / window_secs
        } else {
            0.0
        },
        delivery_window_secs: window_secs,
        sender_lag_max_ms: ctx.lag_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        latency,
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_delivery: (measured_servers && totals.received > 0)
            .then(|| server_cpu * 1e6 / totals.received as f64),
        loadtest_cpu_seconds: cpu_of(&procs, &["loadtest"]),
        processes: procs,
    })
}

/// How a client task ended.
enum ClientEnd {
    /// A reader's tally, or `None` if it never connected.
    Reader(Option<ClientTally>),
    NonReader(NonReaderEnd),
}

/// What a non-reader found when it read its socket at the end.
enum NonReaderEnd {
    NotConnected,
    Open,
    /// The server ended it: the close code and reason, or how it ended.
    Closed(String),
}

/// Client `i`: a reader below `--clients`, a non-reader from there on.
async fn any_client(
    i: usize,
    ctx: Arc<Ctx>,
    go: watch::Receiver<Option<tokio::time::Instant>>,
) -> ClientEnd {
    if i < ctx.clients {
        ClientEnd::Reader(client_task(i, ctx, go).await)
    } else {
        ClientEnd::NonReader(non_reader_session(i, &ctx, go).await)
    }
}

/// A non-reader: connects like a reader but with a small receive buffer,
/// sets its alias, reads nothing until told to check its socket, then holds
/// it open until the run stops.
async fn non_reader_session(
    i: usize,
    ctx: &Ctx,
    go: watch::Receiver<Option<tokio::time::Instant>>,
) -> NonReaderEnd {
    let tally = &ctx.non_reader_connect;
    // Like the readers: one that would join after sending began is not part of the run.
    let wanted = || !ctx.stop.is_cancelled() && go.borrow().is_none();
    let Some((mut ws, _)) = connect_client_with_recv_buffer(
        i,
        &ctx.setup,
        &ctx.connect_slots,
        tally,
        wanted,
        Some(NON_READER_RECV_BUFFER),
    )
    .await
    else {
        return NonReaderEnd::NotConnected;
    };
    if go.borrow().is_some() {
        tally.fail(&anyhow::anyhow!("connected only after sending began"));
        close_quietly(ws).await;
        return NonReaderEnd::NotConnected;
    }
    let alias = format!("{}{i}", ctx.alias_prefix);
    if let Err(e) = ws.send(Message::text(wire::alias_frame(&alias))).await {
        tally.fail(&anyhow::Error::new(e).context("setting the alias"));
        return NonReaderEnd::NotConnected;
    }
    tally.ok();
    tokio::select! {
        _ = ctx.check_non_readers.cancelled() => {}
        _ = ctx.stop.cancelled() => {
            close_quietly(ws).await;
            return NonReaderEnd::Open;
        }
    }
    let end = match how_it_ended(&mut ws).await {
        Some(reason) => NonReaderEnd::Closed(reason),
        None => NonReaderEnd::Open,
    };
    ctx.non_readers_checked.fetch_add(1, Ordering::Relaxed);
    if matches!(end, NonReaderEnd::Open) {
        ctx.stop.cancelled().await;
        close_quietly(ws).await;
    }
    end
}

/// Reads what a non-reader's socket holds: a close frame, an error or the
/// end of the stream means the server ended it (returned as in
/// `closed_by_server`); nothing more for [`NON_READER_QUIET`], or frames
/// still coming after [`NON_READER_CHECK`], means it is open (`None`).
async fn how_it_ended(ws: &mut Ws) -> Option<String> {
    let deadline = tokio::time::Instant::now() + NON_READER_CHECK;
    loop {
        let until = (tokio::time::Instant::now() + NON_READER_QUIET).min(deadline);
        let frame = tokio::time::timeout_at(until, ws.next()).await.ok()?;
        match frame {
            Some(Ok(Message::Close(frame))) => return Some(close_reason(frame.as_ref())),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(format!("read error: {e}")),
            None => return Some("connection ended without close".into()),
        }
    }
}

/// Sockets the gateways behind `setup` closed since they started, by close
/// code, summed over them; `None` if one does not answer `/metrics`.
async fn gateway_closes(setup: &Setup) -> Option<CloseCounts> {
    let mut all = CloseCounts::new();
    for target in &setup.targets {
        for (code, n) in crate::launch::gateway_closes(SocketAddr::V4(target.addr)).await? {
            *all.entry(code).or_default() += n;
        }
    }
    Some(all)
}

type CloseCounts = BTreeMap<String, u64>;

/// One client from connect to close. Returns its tally, or `None` if it
/// never connected.
async fn client_task(
    i: usize,
    ctx: Arc<Ctx>,
    go: watch::Receiver<Option<tokio::time::Instant>>,
) -> Option<ClientTally> {
    let tally = client_session(i, &ctx, go).await;
    if tally.is_none() && i < ctx.senders {
        // A sender that never got to send is done too.
        ctx.writers_done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

async fn client_session(
    i: usize,
    ctx: &Ctx,
    mut go: watch::Receiver<Option<tokio::time::Instant>>,
) -> Option<ClientTally> {
    // Clients that would join after sending began are not part of the run.
    let wanted = || !ctx.stop.is_cancelled() && go.borrow().is_none();
    let (mut ws, _) =
        connect_client(i, &ctx.setup, &ctx.connect_slots, &ctx.connect, wanted).await?;
    if go.borrow().is_some() {
        ctx.connect
            .fail(&anyhow::anyhow!("connected only after sending began"));
        close_quietly(ws).await;
        return None;
    }
    let alias = format!("{}{i}", ctx.alias_prefix);
    if let Err(e) = ws.send(Message::text(wire::alias_frame(&alias))).await {
        ctx.connect
            .fail(&anyhow::Error::new(e).context("setting the alias"));
        return None;
    }
    ctx.connect.ok();

    let mut tally = ClientTally::new(&ctx.book);
    let ws: Ws = if i < ctx.senders {
        let (mut sink, mut stream) = ws.split();
        tokio::join!(
            read_loop(i, ctx, &mut stream, &mut tally),
            send_loop(i, ctx, &mut sink, &alias, &mut go),
        );
        stream.reunite(sink).expect("halves of one socket")
    } else {
        read_loop(i, ctx, &mut ws, &mut tally).await;
        ws
    };
    close_quietly(ws).await;
    tally.shrink();
    Some(tally)
}

pub(crate) async fn close_quietly(mut ws: Ws) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
}

/// Reads until the run stops or the server closes the socket.
async fn read_loop<S>(i: usize, ctx: &Ctx, stream: &mut S, tally: &mut ClientTally)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    read_frames(stream, &ctx.stop, ctx.outcomes(), |text| {
        let now = unix_nanos();
        match serde_json::from_str::<ChatFrame<'_>>(text) {
            Ok(chat) => tally.on_chat(
                &ctx.book,
                i,
                Marker::from_base64(&chat.message),
                chat.id,
                now,
            ),
            Err(_) => tally.counts.foreign += 1,
        }
    })
    .await;
}

/// Sends this sender's share of the plan on schedule (see [`send_planned`]).
async fn send_loop<K>(
    i: usize,
    ctx: &Ctx,
    sink: &mut K,
    alias: &str,
    go: &mut watch::Receiver<Option<tokio::time::Instant>>,
) where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let plan = Plan {
        book: &ctx.book,
        sender: i,
        senders: ctx.senders,
        rate: ctx.rate,
        pad: ctx.pad,
        stop: &ctx.stop,
        sent: &ctx.sent,
    };
    send_planned(plan, sink, alias, go, |lag| {
        ctx.lag_max_us
            .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
    })
    .await;
    ctx.writers_done.fetch_add(1, Ordering::Relaxed);
}

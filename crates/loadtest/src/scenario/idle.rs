//! `idle`: hold C connections for H seconds and report what they cost the
//! servers: (RSS at the end of the hold − RSS before connecting) / sockets.
//!
//! One process may open only as many sockets as its open-file limit allows
//! (20,000 here), so `--procs N` spreads the clients over N child loadtest
//! processes, each with its own limit and its own source addresses. The
//! parent measures the servers; a child prints one line when its clients are
//! connected and one with its report when its stdin closes (the parent's
//! "release"), and never outlives its hold by more than
//! [`CHILD_RELEASE_GRACE`].

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{
    CloseLog, ConnectTally, Setup, close_reason, connect_client, join_all, seconds, spawn_paced,
    wait_until,
};
use crate::cli::IdleArgs;
use crate::client::Ws;
use crate::procstat::{Monitor, ProcReport};
use crate::progress::Progress;
use crate::report::{ConnectReport, IdleReport, SERVER_ROLES};
use crate::wire;

/// How long a child waits past its hold for the parent's release.
const CHILD_RELEASE_GRACE: Duration = Duration::from_secs(120);

/// Marks a child's protocol lines on stdout.
const CHILD_LINE: &str = "LOADTEST-CHILD ";

/// A child's lines to its parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum ChildEvent {
    Connected { connect: ConnectReport },
    Done { report: IdleReport },
}

struct Ctx {
    setup: Setup,
    alias: Option<String>,
    connect_slots: Semaphore,
    connect: ConnectTally,
    stop: CancellationToken,
    closes: CloseLog,
}

pub async fn run(setup: &Setup, args: &IdleArgs) -> anyhow::Result<IdleReport> {
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.procs >= 1, "--procs must be at least 1");
    ensure!(args.connect_rate > 0.0, "--connect-rate must be positive");
    ensure!(
        args.connect_concurrency > 0,
        "--connect-concurrency must be positive"
    );
    seconds("hold", args.hold, 24.0 * 3600.0)?;
    if args.procs > 1 && !args.child {
        return run_spread(setup, args).await;
    }
    run_here(setup, args).await
}

/// All clients in this process.
async fn run_here(setup: &Setup, args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let hold = seconds("hold", args.hold, 24.0 * 3600.0)?;
    crate::net::ensure_fd_budget(args.clients)?;
    let started = Instant::now();
    let run_id = super::new_run_id();
    let ctx = Arc::new(Ctx {
        setup: setup.clone(),
        alias: args.alias.then(|| format!("i{run_id}-")),
        connect_slots: Semaphore::new(args.connect_concurrency),
        connect: ConnectTally::new(started),
        stop: CancellationToken::new(),
        closes: CloseLog::default(),
    });
    let monitor = Monitor::start(setup.watched_with_self());
    let quiet = setup.quiet || args.child;
    let progress = Progress::new(quiet, "connect", args.clients as u64);
    let spawner = {
        let ctx = Arc::clone(&ctx);
        spawn_paced(
            args.clients,
            Some(args.connect_rate),
            ctx.stop.clone(),
            move |i| client_task(i, Arc::clone(&ctx)),
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

    if args.child {
        emit(&ChildEvent::Connected {
            connect: connect.clone(),
        })?;
        // Hold until the parent releases us (stdin closes), bounded.
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 64];
        let release = async { while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
        let _ = tokio::time::timeout(hold + CHILD_RELEASE_GRACE, release).await;
    } else {
        progress.set_phase("hold", hold.as_millis() as u64);
        let hold_start = Instant::now();
        wait_until(
            hold_start + hold,
            || false,
            || {
                progress.set(hold_start.elapsed().as_millis() as u64);
                progress.message(format!(
                    "{} open",
                    ctx.connect.connected() - ctx.closes.count()
                ));
            },
        )
        .await;
    }
    let procs = monitor.finish(true).await;
    let open_at_end = ctx.connect.connected().saturating_sub(ctx.closes.count());
    ctx.stop.cancel();
    progress.finish();
    let handles = spawner.await.context("client spawner failed")?;
    join_all(handles).await?;

    let mut rss_per_socket = per_socket(&procs, open_at_end);
    let loadtest_rss_per_socket = rss_per_socket.remove("loadtest");
    let report = IdleReport {
        urls: setup.urls(),
        clients: args.clients,
        hold_secs: args.hold,
        loadtest_procs: 1,
        connect,
        open_at_end,
        closed_by_server: ctx.closes.closed(),
        rss_per_socket_bytes: rss_per_socket,
        loadtest_rss_per_socket_bytes: loadtest_rss_per_socket,
        processes: procs,
    };
    if args.child {
        emit(&ChildEvent::Done {
            report: report.clone(),
        })?;
    }
    Ok(report)
}

/// (end − start) RSS per open socket, per role, over that role's processes.
fn per_socket(procs: &[ProcReport], sockets: usize) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if sockets == 0 {
        return out;
    }
    for role in SERVER_ROLES.iter().copied().chain(["loadtest"]) {
        let mine: Vec<&ProcReport> = procs.iter().filter(|p| p.role == role).collect();
        if mine.is_empty() {
            continue;
        }
        let delta: i64 = mine
            .iter()
            .map(|p| p.rss_end_bytes as i64 - p.rss_start_bytes as i64)
            .sum();
        out.insert(role.to_string(), delta as f64 / sockets as f64);
    }
    out
}

fn emit(event: &ChildEvent) -> anyhow::Result<()> {
    use std::io::Write as _;
    let line = serde_json::to_string(event)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{CHILD_LINE}{line}")?;
    out.flush()?;
    Ok(())
}

async fn client_task(i: usize, ctx: Arc<Ctx>) {
    let wanted = || !ctx.stop.is_cancelled();
    let Some((mut ws, _)) =
        connect_client(i, &ctx.setup, &ctx.connect_slots, &ctx.connect, wanted).await
    else {
        return;
    };
    if let Some(prefix) = &ctx.alias {
        let alias = format!("{prefix}{i}");
        if let Err(e) = ws.send(Message::text(wire::alias_frame(&alias))).await {
            ctx.connect
                .fail(&anyhow::Error::new(e).context("setting the alias"));
            return;
        }
    }
    ctx.connect.ok();
    if hold_reading(&ctx, &mut ws).await {
        super::chat::close_quietly(ws).await;
    }
}

/// Reads (and drops) whatever arrives until the run stops; false when the
/// server ended the socket first.
async fn hold_reading(ctx: &Ctx, ws: &mut Ws) -> bool {
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => return true,
            frame = ws.next() => frame,
        };
        match frame {
            Some(Ok(Message::Close(frame))) => {
                ctx.closes.record(close_reason(frame.as_ref()));
                return false;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                ctx.closes.record(format!("read error: {e}"));
                return false;
            }
            None => {
                ctx.closes.record("connection ended without close".into());
                return false;
            }
        }
    }
}

/// A child loadtest process holding part of the clients.
struct ChildProc {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ChildProc {
    async fn next_event(&mut self) -> anyhow::Result<ChildEvent> {
        while let Some(line) = self.lines.next_line().await? {
            if let Some(json) = line.strip_prefix(CHILD_LINE) {
                return serde_json::from_str(json).context("bad line from a child loadtest");
            }
        }
        bail!("child loadtest exited early (see its stderr above)")
    }
}

/// The clients spread over `args.procs` child processes.
async fn run_spread(setup: &Setup, args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let hold = seconds("hold", args.hold, 24.0 * 3600.0)?;
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    let monitor = Monitor::start(setup.watched.clone());
    let started = Instant::now();
    let per_child = args.clients.div_ceil(args.procs);
    let mut children = Vec::new();
    let mut assigned = 0;
    for k in 0..args.procs {
        let n = per_child.min(args.clients - assigned);
        if n == 0 {
            break;
        }
        assigned += n;
        let pool = setup
            .sources
            .shifted(k as u32 * setup.sources.count(), setup.sources.count())
            .context("not enough 127.0.0.x source addresses for --procs; lower --source-count")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--quiet").arg("idle").arg("--child");
        for t in &setup.targets {
            cmd.arg("--url").arg(&t.url);
        }
        cmd.args(["--clients", &n.to_string()])
            .args(["--hold", &args.hold.to_string()])
            .args([
                "--connect-rate",
                &(args.connect_rate / args.procs as f64).to_string(),
            ])
            .args([
                "--connect-concurrency",
                &(args.connect_concurrency / args.procs).max(1).to_string(),
            ])
            .args(["--source-first", &pool.first().to_string()])
            .args(["--source-count", &pool.count().to_string()])
            .args([
                "--connect-timeout",
                &setup.connect_timeout.as_secs_f64().to_string(),
            ]);
        if args.alias {
            cmd.arg("--alias");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting a child loadtest")?;
        let stdout = child.stdout.take().context("child stdout")?;
        children.push(ChildProc {
            child,
            lines: BufReader::new(stdout).lines(),
        });
    }

    let progress = Progress::new(setup.quiet, "connect", children.len() as u64);
    let connect_deadline = Duration::from_secs_f64(args.clients as f64 / args.connect_rate)
        + setup.connect_timeout
        + Duration::from_secs(30);
    let mut connects = Vec::new();
    for (k, c) in children.iter_mut().enumerate() {
        let left = connect_deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, c.next_event()).await {
            Ok(Ok(ChildEvent::Connected { connect })) => connects.push(connect),
            Ok(Ok(other)) => bail!("child {k} said {other:?} before connecting"),
            Ok(Err(e)) => return Err(e.context(format!("child {k}"))),
            Err(_) => bail!("child {k} did not finish connecting within {connect_deadline:?}"),
        }
        progress.set(k as u64 + 1);
    }
    let connect = ConnectReport {
        attempted: connects.iter().map(|c| c.attempted).sum(),
        connected: connects.iter().map(|c| c.connected).sum(),
        failed: connects.iter().map(|c| c.failed).sum(),
        secs: started.elapsed().as_secs_f64(),
        per_sec: connects.iter().map(|c| c.connected).sum::<usize>() as f64
            / started.elapsed().as_secs_f64(),
        first_error: connects.iter().find_map(|c| c.first_error.clone()),
        errors: connects.iter().fold(BTreeMap::new(), |mut all, c| {
            for (kind, n) in &c.errors {
                *all.entry(kind.clone()).or_default() += n;
            }
            all
        }),
    };

    progress.set_phase("hold", hold.as_millis() as u64);
    let hold_start = Instant::now();
    wait_until(
        hold_start + hold,
        || false,
        || progress.set(hold_start.elapsed().as_millis() as u64),
    )
    .await;
    let procs = monitor.finish(true).await;
    progress.finish();

    // Release the children and collect their reports.
    let mut reports = Vec::new();
    for (k, mut c) in children.into_iter().enumerate() {
        drop(c.child.stdin.take());
        match tokio::time::timeout(Duration::from_secs(60), c.next_event()).await {
            Ok(Ok(ChildEvent::Done { report })) => reports.push(report),
            Ok(Ok(other)) => bail!("child {k} said {other:?} instead of its report"),
            Ok(Err(e)) => return Err(e.context(format!("child {k}"))),
            Err(_) => bail!("child {k} did not report within 60s of release"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), c.child.wait()).await;
    }

    let open_at_end: usize = reports.iter().map(|r| r.open_at_end).sum();
    let mut closed = BTreeMap::new();
    for r in &reports {
        for (reason, n) in &r.closed_by_server {
            *closed.entry(reason.clone()).or_default() += n;
        }
    }
    let loadtest_delta: f64 = reports
        .iter()
        .filter_map(|r| {
            r.loadtest_rss_per_socket_bytes
                .map(|b| b * r.open_at_end as f64)
        })
        .sum();
    let mut processes = procs;
    processes.extend(
        reports
            .iter()
            .flat_map(|r| r.processes.iter().cloned())
            .filter(|p| p.role == "loadtest"),
    );
    Ok(IdleReport {
        urls: setup.urls(),
        clients: args.clients,
        hold_secs: args.hold,
        loadtest_procs: reports.len(),
        connect,
        open_at_end,
        closed_by_server: closed,
        rss_per_socket_bytes: per_socket(
            &processes
                .iter()
                .filter(|p| p.role != "loadtest")
                .cloned()
                .collect::<Vec<_>>(),
            open_at_end,
        ),
        loadtest_rss_per_socket_bytes: (open_at_end > 0)
            .then(|| loadtest_delta / open_at_end as f64),
        processes,
    })
}

//! What a scenario run found, as JSON and as text, and the named metrics that
//! `compare` puts side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use comfy_table::presets::ASCII_MARKDOWN;
use comfy_table::{CellAlignment, Table};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procstat::ProcReport;

/// The connect phase of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    /// From the first connect attempt until the last client got its Status.
    pub secs: f64,
    pub per_sec: f64,
    pub first_error: Option<String>,
    /// Failures by what the client saw (its first words; numbers left out).
    #[serde(default)]
    pub errors: BTreeMap<String, usize>,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// How the server ended sockets before the run did, by close code/reason.
pub type CloseTally = BTreeMap<String, usize>;

/// The chat's non-readers (`--non-readers`): sockets that read their Status
/// frame and nothing after it, to measure what a socket that stops reading
/// costs the servers. They are not receivers of the chat's accounting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NonReaderReport {
    /// How many were asked for.
    pub requested: usize,
    pub connect: ConnectReport,
    /// The `SO_RCVBUF` asked for on their sockets (Linux doubles it).
    pub recv_buffer_bytes: u32,
    /// Found ended by the server when read at the end of the run.
    pub closed: usize,
    /// What that read found: the close code and reason, or how the
    /// connection ended without a close frame (a gateway that gives up on a
    /// stalled write cannot send one: it is stuck behind the stalled frame).
    pub closed_by: CloseTally,
    /// Still open at the end of the run.
    pub open_at_end: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatReport {
    pub urls: Vec<String>,
    pub clients: usize,
    pub senders: usize,
    pub rate: f64,
    pub duration_secs: f64,
    pub pad: usize,
    pub connect: ConnectReport,
    /// Messages the senders were to send.
    pub planned: u64,
    /// Messages the senders did send.
    pub sent: u64,
    /// `sent` x clients connected when sending began (senders receive their own).
    pub deliveries_expected: u64,
    /// Distinct (message, client) deliveries received.
    pub deliveries_received: u64,
    pub loss: u64,
    pub loss_ratio: f64,
    pub duplicates: u64,
    /// Every client saw IDs increasing, each sender in order, and each message
    /// under the same ID as everyone else: one total order.
    pub one_order: bool,
    pub order_violations: u64,
    pub id_conflicts: u64,
    pub missing_ids: u64,
    /// Chat frames not from this run (history, other users).
    pub foreign_frames: u64,
    pub error_frames: u64,
    pub first_error_frame: Option<String>,
    /// Sockets the server closed during the run, by reason.
    pub closed_by_server: CloseTally,
    #[serde(default)]
    pub non_readers: NonReaderReport,
    /// Sockets the gateways closed from the first connect to the end of the
    /// drain, by close code ("1006": the connection just ended), as their
    /// `/metrics` count them: every socket, readers and non-readers. `None`
    /// when a server has no `/metrics` (the baseline).
    #[serde(default)]
    pub gateway_closes: Option<BTreeMap<String, u64>>,
    /// Deliveries per second from the first send to the last delivery.
    pub deliveries_per_sec: f64,
    /// Seconds from the first send to the last delivery.
    pub delivery_window_secs: f64,
    /// How far the slowest sender fell behind its schedule.
    pub sender_lag_max_ms: f64,
    pub latency: Latency,
    pub processes: Vec<ProcReport>,
    /// CPU of the measured server processes (gateway + worker, or baseline)
    /// from the start of sending to the end of the drain.
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub loadtest_cpu_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleReport {
    pub urls: Vec<String>,
    pub clients: usize,
    pub hold_secs: f64,
    pub loadtest_procs: usize,
    pub connect: ConnectReport,
    /// Sockets still open at the end of the hold.
    pub open_at_end: usize,
    pub closed_by_server: CloseTally,
    pub processes: Vec<ProcReport>,
    /// (RSS at the end of the hold - RSS before connecting) / sockets open,
    /// per role, summed over that role's processes.
    pub rss_per_socket_bytes: BTreeMap<String, f64>,
    /// The same for the loadtest process(es) itself.
    pub loadtest_rss_per_socket_bytes: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JoinReport {
    pub urls: Vec<String>,
    pub clients: usize,
    pub concurrency: usize,
    pub connect: ConnectReport,
    /// Clients whose user list came to hold every client that connected.
    pub complete: usize,
    /// From the first connect until every connected client's list was
    /// complete (`None` if some never were before the timeout). Clients that
    /// failed to connect are in `connect.failed`, not waited for.
    pub all_complete_secs: Option<f64>,
    pub complete_p50_secs: Option<f64>,
    pub complete_p99_secs: Option<f64>,
    pub userlist_frames: u64,
    pub userlist_bytes: u64,
    pub closed_by_server: CloseTally,
    pub processes: Vec<ProcReport>,
    pub server_cpu_seconds: f64,
    pub loadtest_cpu_seconds: f64,
}

/// Any scenario's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Report {
    /// Boxed: a chat report is the largest by far.
    Chat(Box<ChatReport>),
    Idle(IdleReport),
    Join(JoinReport),
}

/// One named number for the compare table and chart.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub value: Option<f64>,
}

fn metric(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    value: Option<f64>,
) -> Metric {
    Metric {
        key,
        label,
        unit,
        value,
    }
}

/// Server roles counted as "the server" of a mode.
/// `redis` is the backplane of a cluster topology: part of the server's cost.
pub const SERVER_ROLES: [&str; 4] = ["gateway", "worker", "redis", "baseline"];

fn peak_rss(procs: &[ProcReport], role: &str) -> Option<f64> {
    let peaks: Vec<u64> = procs
        .iter()
        .filter(|p| p.role == role)
        .map(|p| p.rss_peak_bytes)
        .collect();
    (!peaks.is_empty()).then(|| peaks.iter().sum::<u64>() as f64 / (1024.0 * 1024.0))
}

/// Peak RSS of each server role present, then the load generator's CPU.
fn process_metrics(procs: &[ProcReport], loadtest_cpu_seconds: f64) -> Vec<Metric> {
    let mut m: Vec<Metric> = SERVER_ROLES
        .iter()
        .filter_map(|role| {
            let v = peak_rss(procs, role)?;
            Some(metric(
                role_key(role, "peak_rss"),
                role_label(role, "peak RSS"),
                "MiB",
                Some(v),
            ))
        })
        .collect();
    m.push(metric(
        "loadtest_cpu_s",
        "loadtest CPU",
        "s",
        Some(loadtest_cpu_seconds),
    ));
    m
}

impl Report {
    pub fn name(&self) -> &'static str {
        match self {
            Report::Chat(_) => "chat",
            Report::Idle(_) => "idle",
            Report::Join(_) => "join",
        }
    }

    /// The numbers `compare` shows, in display order.
    pub fn metrics(&self) -> Vec<Metric> {
        match self {
            Report::Chat(r) => {
                let ms = |us: u64| (r.latency.count > 0).then_some(us as f64 / 1000.0);
                let mut m = vec![
                    metric("sent", "messages sent", "", Some(r.sent as f64)),
                    metric(
                        "deliveries_received",
                        "deliveries received",
                        "",
                        Some(r.deliveries_received as f64),
                    ),
                    metric("loss", "lost deliveries", "", Some(r.loss as f64)),
                    metric("duplicates", "duplicates", "", Some(r.duplicates as f64)),
                    metric(
                        "one_order",
                        "one order (1 = yes)",
                        "",
                        Some(if r.one_order { 1.0 } else { 0.0 }),
                    ),
                    metric(
                        "deliveries_per_sec",
                        "deliveries/s",
                        "/s",
                        Some(r.deliveries_per_sec),
                    ),
                    // Posts through the worker(s) and backplane: every one
                    // stored once, whatever the number of clients.
                    metric(
                        "posts_per_sec",
                        "posts stored/s",
                        "/s",
                        (r.duration_secs > 0.0).then(|| r.sent as f64 / r.duration_secs),
                    ),
                    metric("p50_ms", "latency p50", "ms", ms(r.latency.p50_us)),
                    metric("p90_ms", "latency p90", "ms", ms(r.latency.p90_us)),
                    metric("p99_ms", "latency p99", "ms", ms(r.latency.p99_us)),
                    metric("p999_ms", "latency p99.9", "ms", ms(r.latency.p999_us)),
                    metric("max_ms", "latency max", "ms", ms(r.latency.max_us)),
                    metric(
                        "server_cpu_s",
                        "server CPU",
                        "s",
                        Some(r.server_cpu_seconds),
                    ),
                    metric(
                        "cpu_us_per_delivery",
                        "server CPU per delivery",
                        "us",
                        r.server_cpu_us_per_delivery,
                    ),
                ];
                for role in SERVER_ROLES {
                    let cpu: Vec<f64> = r
                        .processes
                        .iter()
                        .filter(|p| p.role == role)
                        .map(|p| p.cpu_seconds)
                        .collect();
                    if !cpu.is_empty() {
                        m.push(metric(
                            role_key(role, "cpu"),
                            role_label(role, "CPU"),
                            "s",
                            Some(cpu.iter().sum()),
                        ));
                    }
                }
                m.extend(process_metrics(&r.processes, r.loadtest_cpu_seconds));
                m.push(metric(
                    "sender_lag_ms",
                    "sender lag max",
                    "ms",
                    Some(r.sender_lag_max_ms),
                ));
                let nr = &r.non_readers;
                if nr.requested > 0 {
                    m.push(metric(
                        "non_readers_connected",
                        "non-readers connected",
                        "",
                        Some(nr.connect.connected as f64),
                    ));
                    m.push(metric(
                        "non_readers_closed",
                        "non-readers closed by server",
                        "",
                        Some(nr.closed as f64),
                    ));
                    m.push(metric(
                        "gateway_closes_1008",
                        "gateway closes 1008 (all sockets)",
                        "",
                        r.gateway_closes
                            .as_ref()
                            .map(|c| c.get("1008").copied().unwrap_or(0) as f64),
                    ));
                }
                m
            }
            Report::Idle(r) => {
                let mut m = vec![
                    metric(
                        "connected",
                        "sockets connected",
                        "",
                        Some(r.connect.connected as f64),
                    ),
                    metric(
                        "open_at_end",
                        "sockets open at end",
                        "",
                        Some(r.open_at_end as f64),
                    ),
                ];
                for role in SERVER_ROLES {
                    if let Some(v) = r.rss_per_socket_bytes.get(role) {
                        m.push(metric(
                            role_key(role, "rss_per_socket"),
                            role_label(role, "RSS per socket"),
                            "B",
                            Some(*v),
                        ));
                    }
                }
                for role in SERVER_ROLES {
                    let fds: Vec<usize> = r
                        .processes
                        .iter()
                        .filter(|p| p.role == role)
                        .filter_map(|p| p.open_fds)
                        .collect();
                    if let Some(max) = fds.iter().max() {
                        m.push(metric(
                            role_key(role, "max_fds"),
                            role_label(role, "open files (max per process)"),
                            "",
                            Some(*max as f64),
                        ));
                    }
                }
                // The loadtest's own RSS per socket is left out: in `compare`
                // one process runs every mode, and memory its allocator kept
                // from an earlier run hides the later runs' growth.
                m
            }
            Report::Join(r) => {
                let mut m = vec![
                    metric(
                        "connected",
                        "clients connected",
                        "",
                        Some(r.connect.connected as f64),
                    ),
                    metric(
                        "connects_per_sec",
                        "connects/s",
                        "/s",
                        Some(r.connect.per_sec),
                    ),
                    metric("complete", "lists complete", "", Some(r.complete as f64)),
                    metric(
                        "all_complete_s",
                        "time until all lists complete",
                        "s",
                        r.all_complete_secs,
                    ),
                    metric(
                        "complete_p50_s",
                        "list complete p50",
                        "s",
                        r.complete_p50_secs,
                    ),
                    metric(
                        "userlist_mib",
                        "userlist bytes received",
                        "MiB",
                        Some(r.userlist_bytes as f64 / (1024.0 * 1024.0)),
                    ),
                    metric(
                        "server_cpu_s",
                        "server CPU",
                        "s",
                        Some(r.server_cpu_seconds),
                    ),
                ];
                m.extend(process_metrics(&r.processes, r.loadtest_cpu_seconds));
                m
            }
        }
    }

    /// The report as text for a person.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match self {
            Report::Chat(r) => {
                let _ = writeln!(
                    out,
                    "chat: {} clients, {} senders, {} msg/s for {}s against {}",
                    r.clients,
                    r.senders,
                    r.rate,
                    r.duration_secs,
                    r.urls.join(", ")
                );
                write_connect(&mut out, &r.connect);
                let _ = writeln!(
                    out,
                    "  sent                {} of {} planned",
                    r.sent, r.planned
                );
                let _ = writeln!(
                    out,
                    "  deliveries          {} received of {} expected; loss {} ({:.4}%), duplicates {}",
                    r.deliveries_received,
                    r.deliveries_expected,
                    r.loss,
                    r.loss_ratio * 100.0,
                    r.duplicates
                );
                let _ = writeln!(
                    out,
                    "  one order           {} (order violations {}, id conflicts {}, frames without ID {})",
                    if r.one_order { "yes" } else { "NO" },
                    r.order_violations,
                    r.id_conflicts,
                    r.missing_ids
                );
                let _ = writeln!(
                    out,
                    "  throughput          {:.0} deliveries/s over {:.2}s",
                    r.deliveries_per_sec, r.delivery_window_secs
                );
                let l = &r.latency;
                let _ = writeln!(
                    out,
                    "  latency ms          p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
                    l.p50_us as f64 / 1e3,
                    l.p90_us as f64 / 1e3,
                    l.p99_us as f64 / 1e3,
                    l.p999_us as f64 / 1e3,
                    l.max_us as f64 / 1e3,
                    l.count
                );
                let _ = writeln!(out, "  sender lag max      {:.1} ms", r.sender_lag_max_ms);
                if r.foreign_frames > 0 || r.error_frames > 0 {
                    let _ = writeln!(
                        out,
                        "  other frames        {} foreign Chat, {} Error{}",
                        r.foreign_frames,
                        r.error_frames,
                        r.first_error_frame
                            .as_deref()
                            .map(|e| format!(" (first: {e})"))
                            .unwrap_or_default()
                    );
                }
                write_closed(&mut out, &r.closed_by_server);
                write_non_readers(&mut out, &r.non_readers);
                if let Some(closes) = &r.gateway_closes {
                    let list: Vec<String> =
                        closes.iter().map(|(k, v)| format!("{v} x {k}")).collect();
                    let _ = writeln!(
                        out,
                        "  gateway closes      {} (by code, all sockets, from its /metrics)",
                        if list.is_empty() {
                            "none".to_string()
                        } else {
                            list.join(", ")
                        }
                    );
                }
                write_procs(&mut out, &r.processes);
                if let Some(per) = r.server_cpu_us_per_delivery {
                    let _ = writeln!(
                        out,
                        "  server CPU          {:.3}s = {:.3} us per delivery",
                        r.server_cpu_seconds, per
                    );
                }
                let _ = writeln!(out, "  loadtest CPU        {:.2}s", r.loadtest_cpu_seconds);
            }
            Report::Idle(r) => {
                let _ = writeln!(
                    out,
                    "idle: {} sockets held {}s against {} ({} loadtest process(es))",
                    r.clients,
                    r.hold_secs,
                    r.urls.join(", "),
                    r.loadtest_procs
                );
                write_connect(&mut out, &r.connect);
                let _ = writeln!(out, "  open at end         {}", r.open_at_end);
                write_closed(&mut out, &r.closed_by_server);
                write_procs(&mut out, &r.processes);
                for (role, bytes) in &r.rss_per_socket_bytes {
                    let _ = writeln!(
                        out,
                        "  RSS per socket      {role}: {bytes:.0} B ({:.2} KiB)",
                        bytes / 1024.0
                    );
                }
                if let Some(b) = r.loadtest_rss_per_socket_bytes {
                    let _ = writeln!(out, "  RSS per socket      loadtest: {b:.0} B");
                }
            }
            Report::Join(r) => {
                let _ = writeln!(
                    out,
                    "join: {} clients ({} handshakes in flight) against {}",
                    r.clients,
                    r.concurrency,
                    r.urls.join(", ")
                );
                write_connect(&mut out, &r.connect);
                let _ = writeln!(
                    out,
                    "  lists complete      {} of {} connected; all complete after {}",
                    r.complete,
                    r.connect.connected,
                    r.all_complete_secs
                        .map(|s| format!("{s:.3}s"))
                        .unwrap_or_else(|| "NEVER (timeout)".into())
                );
                if let (Some(p50), Some(p99)) = (r.complete_p50_secs, r.complete_p99_secs) {
                    let _ = writeln!(out, "  complete at         p50 {p50:.3}s  p99 {p99:.3}s");
                }
                let _ = writeln!(
                    out,
                    "  userlist frames     {} ({:.1} MiB)",
                    r.userlist_frames,
                    r.userlist_bytes as f64 / (1024.0 * 1024.0)
                );
                write_closed(&mut out, &r.closed_by_server);
                write_procs(&mut out, &r.processes);
                let _ = writeln!(out, "  server CPU          {:.3}s", r.server_cpu_seconds);
                let _ = writeln!(out, "  loadtest CPU        {:.2}s", r.loadtest_cpu_seconds);
            }
        }
        out
    }
}

fn role_key(role: &str, what: &str) -> &'static str {
    match (role, what) {
        ("gateway", "cpu") => "gateway_cpu_s",
        ("worker", "cpu") => "worker_cpu_s",
        ("baseline", "cpu") => "baseline_cpu_s",
        ("redis", "cpu") => "redis_cpu_s",
        ("redis", "peak_rss") => "redis_peak_rss_mib",
        ("redis", "rss_per_socket") => "redis_rss_per_socket",
        ("redis", "max_fds") => "redis_max_fds",
        ("gateway", "peak_rss") => "gateway_peak_rss_mib",
        ("worker", "peak_rss") => "worker_peak_rss_mib",
        ("baseline", "peak_rss") => "baseline_peak_rss_mib",
        ("gateway", "rss_per_socket") => "gateway_rss_per_socket",
        ("worker", "rss_per_socket") => "worker_rss_per_socket",
        ("baseline", "rss_per_socket") => "baseline_rss_per_socket",
        ("gateway", "max_fds") => "gateway_max_fds",
        ("worker", "max_fds") => "worker_max_fds",
        ("baseline", "max_fds") => "baseline_max_fds",
        _ => "other",
    }
}

fn role_label(role: &str, what: &str) -> &'static str {
    match (role, what) {
        ("gateway", "CPU") => "gateway CPU",
        ("worker", "CPU") => "worker CPU",
        ("baseline", "CPU") => "baseline CPU",
        ("redis", "CPU") => "redis-server CPU",
        ("redis", "peak RSS") => "redis-server peak RSS",
        ("redis", "RSS per socket") => "redis-server RSS per socket",
        ("redis", _) => "redis-server open files (max)",
        ("gateway", "peak RSS") => "gateway peak RSS",
        ("worker", "peak RSS") => "worker peak RSS",
        ("baseline", "peak RSS") => "baseline peak RSS",
        ("gateway", "RSS per socket") => "gateway RSS per socket",
        ("worker", "RSS per socket") => "worker RSS per socket",
        ("baseline", "RSS per socket") => "baseline RSS per socket",
        ("gateway", _) => "gateway open files (max)",
        ("worker", _) => "worker open files (max)",
        ("baseline", _) => "baseline open files (max)",
        _ => "other",
    }
}

fn write_connect(out: &mut String, c: &ConnectReport) {
    let _ = writeln!(
        out,
        "  connect             {} of {} in {:.2}s ({:.0}/s){}",
        c.connected,
        c.attempted,
        c.secs,
        c.per_sec,
        c.first_error
            .as_deref()
            .map(|e| format!("; {} failed, first: {e}", c.failed))
            .unwrap_or_default()
    );
}

fn write_closed(out: &mut String, closed: &CloseTally) {
    if !closed.is_empty() {
        let list: Vec<String> = closed.iter().map(|(k, v)| format!("{v} x {k}")).collect();
        let _ = writeln!(out, "  closed by server    {}", list.join(", "));
    }
}

fn write_non_readers(out: &mut String, nr: &NonReaderReport) {
    if nr.requested == 0 {
        return;
    }
    let c = &nr.connect;
    let _ = writeln!(
        out,
        "  non-readers         {} of {} connected (SO_RCVBUF {} B){}",
        c.connected,
        nr.requested,
        nr.recv_buffer_bytes,
        c.first_error
            .as_deref()
            .map(|e| format!("; {} failed, first: {e}", c.failed))
            .unwrap_or_default()
    );
    let how: Vec<String> = nr
        .closed_by
        .iter()
        .map(|(k, v)| format!("{v} x {k}"))
        .collect();
    let _ = writeln!(
        out,
        "                      {} closed by server{}, {} open at end",
        nr.closed,
        if how.is_empty() {
            String::new()
        } else {
            format!(" ({})", how.join(", "))
        },
        nr.open_at_end
    );
}

fn write_procs(out: &mut String, procs: &[ProcReport]) {
    if procs.is_empty() {
        return;
    }
    let mib = |bytes: u64| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
    let mut t = text_table([
        "process",
        "pid",
        "CPU (s)",
        "RSS start (MiB)",
        "end",
        "peak",
        "fds",
        "",
    ]);
    for p in procs {
        t.add_row([
            p.role.clone(),
            p.pid.to_string(),
            format!("{:.3}", p.cpu_seconds),
            mib(p.rss_start_bytes),
            mib(p.rss_end_bytes),
            mib(p.rss_peak_bytes),
            p.open_fds.map(|n| n.to_string()).unwrap_or_default(),
            if p.alive { "" } else { "EXITED" }.to_string(),
        ]);
    }
    for line in t.lines() {
        let _ = writeln!(out, "  {line}");
    }
}

/// A table for the terminal: the first column left, the others
/// right-aligned, in markdown pipes so that the numbers paste into
/// BENCHMARKS.md as they are.
pub fn text_table<T: ToString>(header: impl IntoIterator<Item = T>) -> Table {
    let mut t = Table::new();
    t.load_style(ASCII_MARKDOWN)
        .set_header(header.into_iter().map(|h| h.to_string()));
    for column in t.column_iter_mut().skip(1) {
        column.set_cell_alignment(CellAlignment::Right);
    }
    t
}

/// Median of the present values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn reports_round_trip_as_json() {
        let r = Report::Chat(Box::new(ChatReport {
            clients: 3,
            one_order: true,
            ..ChatReport::default()
        }));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""scenario":"chat""#));
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.name(), "chat");
        assert!(!back.metrics().is_empty());
        assert!(back.to_text().contains("one order           yes"));
    }
}

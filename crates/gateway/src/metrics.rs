//! What the gateway records for Prometheus, and the names it uses.
//!
//! Every recording is a call to the `metrics` macros: the binaries install
//! the recorder ([`sharedconn_common::metrics`]), and without one (a test
//! that does not look) a call does nothing. Counters and gauges are atomics;
//! a session takes its per-frame counters once when it starts
//! ([`SessionCounters`]) so that a frame costs an atomic add and no lookup.
//!
//! Gauges are kept current where things change, except the link queue
//! depth and the sockets catching up, which are sampled when `/metrics` is
//! scraped.

use std::net::SocketAddr;

use ::metrics::{Counter, counter, describe_counter, describe_gauge, gauge};

pub const OPEN_SOCKETS: &str = "sharedconn_gateway_open_sockets";
pub const SOCKETS_OPENED: &str = "sharedconn_gateway_sockets_opened_total";
pub const SOCKETS_CLOSED: &str = "sharedconn_gateway_sockets_closed_total";
pub const UPGRADES_REFUSED: &str = "sharedconn_gateway_upgrades_refused_total";
pub const FRAMES_IN: &str = "sharedconn_gateway_frames_in_total";
pub const FRAMES_OUT: &str = "sharedconn_gateway_frames_out_total";
pub const BYTES_OUT: &str = "sharedconn_gateway_bytes_out_total";
pub const SOCKET_OVERFLOWS: &str = "sharedconn_gateway_socket_overflows_total";
pub const FETCHES: &str = "sharedconn_gateway_fetches_total";
pub const WORKER_LINKED: &str = "sharedconn_gateway_worker_linked";
pub const SOCKETS_REATTACHED: &str = "sharedconn_gateway_sockets_reattached_total";
pub const SOCKETS_WAITING: &str = "sharedconn_gateway_sockets_waiting";
pub const LINK_QUEUE_DEPTH: &str = "sharedconn_gateway_link_queue_depth";
pub const LINK_READS_BEHIND: &str = "sharedconn_gateway_link_reads_behind_total";
pub const SOCKETS_BEHIND: &str = "sharedconn_gateway_sockets_behind";
pub const SOCKETS_FETCHING: &str = "sharedconn_gateway_sockets_fetching";

/// Registers the help text of every gateway metric, and the unlabelled ones
/// at zero so that a chart shows 0 rather than nothing (once the recorder is
/// installed; without one it does nothing).
pub fn describe() {
    for name in [
        OPEN_SOCKETS,
        SOCKETS_WAITING,
        SOCKETS_BEHIND,
        SOCKETS_FETCHING,
    ] {
        gauge!(name).increment(0);
    }
    for name in [
        SOCKETS_OPENED,
        FRAMES_IN,
        FRAMES_OUT,
        BYTES_OUT,
        SOCKET_OVERFLOWS,
        FETCHES,
        SOCKETS_REATTACHED,
        LINK_READS_BEHIND,
    ] {
        counter!(name).increment(0);
    }
    describe_gauge!(OPEN_SOCKETS, "WebSockets open now");
    describe_counter!(
        SOCKETS_OPENED,
        "WebSocket upgrades completed (a socket refused for want of a worker closes at once with 1013)"
    );
    describe_counter!(
        SOCKETS_CLOSED,
        "WebSockets closed, by close code (1006: the connection ended without a close frame; other: a client's own code)"
    );
    describe_counter!(
        UPGRADES_REFUSED,
        "WebSocket upgrades answered with an HTTP error instead, by status"
    );
    describe_counter!(FRAMES_IN, "text frames read from clients");
    describe_counter!(FRAMES_OUT, "text frames written to clients");
    describe_counter!(
        BYTES_OUT,
        "payload bytes of the text frames written to clients"
    );
    describe_counter!(
        SOCKET_OVERFLOWS,
        "times a socket's queue overflowed: the client fell behind and catches up from the log"
    );
    describe_counter!(
        FETCHES,
        "fetches of missed messages sent for sockets that fell behind"
    );
    describe_gauge!(
        WORKER_LINKED,
        "1 while the link to this worker address is up and accepted, 0 otherwise"
    );
    describe_counter!(
        SOCKETS_REATTACHED,
        "sockets moved to a live worker after their worker died or drained"
    );
    describe_gauge!(
        SOCKETS_WAITING,
        "sockets with no worker, waiting to be re-attached"
    );
    describe_counter!(
        LINK_READS_BEHIND,
        "times a worker's data waited unread past the link timeout: the gateway was too busy to read, the worker was live (not cut)"
    );
    describe_gauge!(
        SOCKETS_BEHIND,
        "sockets that fell behind and catch up from the log, sampled at scrape"
    );
    describe_gauge!(
        SOCKETS_FETCHING,
        "sockets with a fetch of missed messages on its way to their worker, sampled at scrape"
    );
    describe_gauge!(
        LINK_QUEUE_DEPTH,
        "events queued on the shared (private mode: control) stream to a worker, sampled at scrape"
    );
}

/// A WebSocket upgrade completed.
pub fn socket_opened() {
    gauge!(OPEN_SOCKETS).increment(1);
    counter!(SOCKETS_OPENED).increment(1);
}

/// A socket that [`socket_opened`] counted is gone; `code` is the close code
/// sent or echoed, `None` when the connection just ended.
pub fn socket_closed(code: Option<u16>) {
    gauge!(OPEN_SOCKETS).decrement(1);
    counter!(SOCKETS_CLOSED, "code" => close_code_label(code)).increment(1);
}

/// An upgrade request was answered with `status` instead.
pub fn upgrade_refused(status: u16) {
    let status = match status {
        400 => "400",
        403 => "403",
        426 => "426",
        503 => "503",
        _ => "other",
    };
    counter!(UPGRADES_REFUSED, "status" => status).increment(1);
}

/// The label of a close code. Codes a client chose itself (3000–4999 and
/// unassigned ones) share one label, so a client cannot mint new series.
fn close_code_label(code: Option<u16>) -> &'static str {
    match code {
        None | Some(1006) => "1006",
        Some(1000) => "1000",
        Some(1001) => "1001",
        Some(1002) => "1002",
        Some(1003) => "1003",
        Some(1005) => "1005",
        Some(1007) => "1007",
        Some(1008) => "1008",
        Some(1009) => "1009",
        Some(1010) => "1010",
        Some(1011) => "1011",
        Some(1012) => "1012",
        Some(1013) => "1013",
        Some(_) => "other",
    }
}

/// A socket's queue overflowed.
pub fn socket_overflowed() {
    counter!(SOCKET_OVERFLOWS).increment(1);
}

/// The link to `worker` came up (`true`) or went down.
pub fn worker_linked(worker: SocketAddr, up: bool) {
    let worker = worker.to_string();
    gauge!(WORKER_LINKED, "worker" => worker.clone()).set(if up { 1.0 } else { 0.0 });
    if !up {
        gauge!(LINK_QUEUE_DEPTH, "worker" => worker).set(0.0);
    }
}

/// A connection to a worker had data waiting unread past the link timeout.
pub fn link_read_behind() {
    counter!(LINK_READS_BEHIND).increment(1);
}

/// Sockets re-attached in one round of the mover.
pub fn sockets_reattached(n: usize) {
    counter!(SOCKETS_REATTACHED).increment(n as u64);
}

/// Sockets waiting for a worker now.
pub fn sockets_waiting(n: usize) {
    gauge!(SOCKETS_WAITING).set(n as f64);
}

/// Samples what is only read at scrape time (the link queues, the sockets
/// catching up), then renders every metric of the process; `None` when no
/// recorder is installed.
pub fn scrape(
    link_queues: impl IntoIterator<Item = (SocketAddr, usize)>,
    states: SocketStates,
) -> Option<String> {
    for (worker, depth) in link_queues {
        gauge!(LINK_QUEUE_DEPTH, "worker" => worker.to_string()).set(depth as f64);
    }
    gauge!(SOCKETS_BEHIND).set(states.behind as f64);
    gauge!(SOCKETS_FETCHING).set(states.fetching as f64);
    sharedconn_common::metrics::render()
}

/// How many of a gateway's sockets are in each state that keeps messages
/// from them for a while; a count that stays up is sockets left without
/// messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketStates {
    /// Fell behind, catching up from the log.
    pub behind: usize,
    /// A fetch of missed messages on its way to their worker.
    pub fetching: usize,
    /// No worker now (detached, or being attached).
    pub unserved: usize,
}

/// One session's per-frame counters, looked up once when it starts.
pub struct SessionCounters {
    frames_in: Counter,
    frames_out: Counter,
    bytes_out: Counter,
    fetches: Counter,
}

impl SessionCounters {
    pub fn new() -> Self {
        SessionCounters {
            frames_in: counter!(FRAMES_IN),
            frames_out: counter!(FRAMES_OUT),
            bytes_out: counter!(BYTES_OUT),
            fetches: counter!(FETCHES),
        }
    }

    pub fn frame_in(&self) {
        self.frames_in.increment(1);
    }

    /// A batch of text frames was written.
    pub fn written(&self, batch: &[tokio_tungstenite::tungstenite::Utf8Bytes]) {
        self.frames_out.increment(batch.len() as u64);
        self.bytes_out
            .increment(batch.iter().map(|t| t.len() as u64).sum());
    }

    pub fn fetch(&self) {
        self.fetches.increment(1);
    }
}

impl Default for SessionCounters {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::close_code_label;

    #[test]
    fn client_chosen_close_codes_share_a_label() {
        assert_eq!(close_code_label(None), "1006");
        assert_eq!(close_code_label(Some(1008)), "1008");
        assert_eq!(close_code_label(Some(4000)), "other");
        assert_eq!(close_code_label(Some(2999)), "other");
    }
}

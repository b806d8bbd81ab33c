//! What the worker records for Prometheus, and the names it uses.
//!
//! Every recording is a call to the `metrics` macros: the binaries install
//! the recorder ([`sharedconn_common::metrics`]), and without one (a test
//! that does not look) a call does nothing. Counters and gauges are atomics,
//! and nothing here takes a lock of ours on the runtime's path. The
//! operator's HTTP listener that serves them is [`crate::admin`].

use std::time::Instant;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const STREAMS: &str = "sharedconn_worker_streams";
pub const SOCKETS: &str = "sharedconn_worker_sockets";
pub const DELIVER_COMMANDS: &str = "sharedconn_worker_deliver_commands_total";
pub const DELIVER_RECIPIENTS: &str = "sharedconn_worker_deliver_recipients_total";
pub const MESSAGES_COMMITTED: &str = "sharedconn_worker_messages_committed_total";
pub const POST_COMMIT_SECONDS: &str = "sharedconn_worker_post_commit_seconds";
pub const POSTS_REFUSED: &str = "sharedconn_worker_posts_refused_total";
pub const BACKPLANE_HEALTHY: &str = "sharedconn_worker_backplane_healthy";
pub const BACKPLANE_ERRORS: &str = "sharedconn_worker_backplane_errors_total";
pub const ONLINE_USERS: &str = "sharedconn_worker_online_users";
pub const STREAM_CUTS: &str = "sharedconn_worker_stream_cuts_total";
pub const CONGESTED_MS: &str = "sharedconn_worker_congested_milliseconds_total";

/// Registers the help text of every worker metric, and the unlabelled
/// counters at zero so that a chart shows 0 rather than nothing (once the
/// recorder is installed; without one it does nothing).
pub fn describe() {
    for name in [
        DELIVER_COMMANDS,
        DELIVER_RECIPIENTS,
        MESSAGES_COMMITTED,
        POSTS_REFUSED,
        STREAM_CUTS,
        CONGESTED_MS,
    ] {
        counter!(name).increment(0);
    }
    describe_gauge!(
        STREAMS,
        "link streams from gateways (shared mode: one per gateway; private mode: one per socket, plus one per gateway)"
    );
    describe_gauge!(SOCKETS, "sockets this worker serves");
    describe_counter!(
        DELIVER_COMMANDS,
        "Deliver commands queued to gateways (a broadcast is one per stream)"
    );
    describe_counter!(
        DELIVER_RECIPIENTS,
        "WebSocket IDs addressed by Deliver commands: frames the gateways fan out"
    );
    describe_counter!(
        MESSAGES_COMMITTED,
        "chat messages the log committed and this worker broadcast (with Redis, every worker counts every message)"
    );
    describe_histogram!(
        POST_COMMIT_SECONDS,
        ::metrics::Unit::Seconds,
        "from a post to its being durable in the log, for this worker's posts"
    );
    describe_counter!(
        POSTS_REFUSED,
        "posts answered with an error instead of being stored (log busy or unavailable)"
    );
    describe_gauge!(
        BACKPLANE_HEALTHY,
        "1 while the backplane takes posts (what /healthz and the gRPC health report), 0 otherwise"
    );
    describe_counter!(
        BACKPLANE_ERRORS,
        "failed backplane operations, by what failed (commit, post, follow, presence)"
    );
    describe_gauge!(
        ONLINE_USERS,
        "entries in the online list, as last sent to the sockets"
    );
    describe_counter!(
        STREAM_CUTS,
        "streams cut because their queue overflowed (their gateway re-attaches the sockets)"
    );
    describe_counter!(
        CONGESTED_MS,
        "time the chat waited for a gateway far behind, taking no posts (backpressure; latency grows, nothing is cut)"
    );
}

/// What the runtime holds now.
pub fn held(streams: usize, sockets: usize) {
    gauge!(STREAMS).set(streams as f64);
    gauge!(SOCKETS).set(sockets as f64);
}

/// One Deliver command addressed to `recipients` sockets was queued.
pub fn deliver(recipients: usize) {
    counter!(DELIVER_COMMANDS).increment(1);
    counter!(DELIVER_RECIPIENTS).increment(recipients as u64);
}

pub fn message_committed() {
    counter!(MESSAGES_COMMITTED).increment(1);
}

/// Posts made at these instants are durable now.
pub fn posts_committed(posted: impl IntoIterator<Item = Instant>) {
    let latency = histogram!(POST_COMMIT_SECONDS);
    for at in posted {
        latency.record(at.elapsed().as_secs_f64());
    }
}

pub fn posts_refused(n: usize) {
    counter!(POSTS_REFUSED).increment(n as u64);
}

pub fn backplane_healthy(healthy: bool) {
    gauge!(BACKPLANE_HEALTHY).set(if healthy { 1.0 } else { 0.0 });
}

/// A backplane operation failed; `what` is one of a few fixed names.
pub fn backplane_error(what: &str) {
    counter!(BACKPLANE_ERRORS, "what" => what.to_owned()).increment(1);
}

pub fn online_users(n: usize) {
    gauge!(ONLINE_USERS).set(n as f64);
}

pub fn stream_cut() {
    counter!(STREAM_CUTS).increment(1);
}

/// The chat waited this long for a congested stream to drain.
pub fn congested(waited: std::time::Duration) {
    counter!(CONGESTED_MS).increment(waited.as_millis() as u64);
}

//! When to broadcast the online list: the seed re-sends the whole list to
//! everyone on every join, which is quadratic — 10,000 joins would send
//! 10,000 lists of 10,000 names to 10,000 sockets. We keep the protocol (the
//! whole list, to everyone) but pace it:
//!
//! - never more often than `min_interval`;
//! - after sending a list, wait in proportion to what it cost (list bytes ×
//!   sockets) so lists never take more than [`BYTES_PER_SEC`];
//! - and in proportion to how long its copies took to leave this worker's
//!   queues ([`DRAIN_FACTOR`]): the gateways take them only as fast as they
//!   can write them to their sockets, so that time is what a list really
//!   costs on this machine, where [`BYTES_PER_SEC`] is a guess;
//! - once lists are expensive, wait for joins and leaves to pause for
//!   [`QUIET`] (a join storm then costs one big list at its end), but never
//!   hold a change back longer than [`MAX_WAIT`].
//!
//! Pure bookkeeping over instants; the chat owns the clock.

use std::time::Duration;

use tokio::time::Instant;

/// Upper bound on online-list traffic, in list bytes × recipients per second.
pub const BYTES_PER_SEC: f64 = 1024.0 * 1024.0 * 1024.0;
/// The next list waits this many times as long as the last one took to
/// leave the queues, so lists take at most a quarter of what the gateways
/// can carry. Without it, a 10,000-socket private join storm on two slow
/// cores kept the gateway writing lists, and joining sockets timed out
/// waiting for their Status frame behind them.
pub const DRAIN_FACTOR: u32 = 3;
/// Longest wait the drain time adds: a gateway that stopped reading is cut
/// by its stream's budget, and must not hold everyone's lists back for
/// three times as long.
pub const DRAIN_WAIT_MAX: Duration = Duration::from_secs(10);
/// How often the chat looks whether the last list has left the queues (a
/// pass over the streams: 10,000 of them in private mode).
pub const LOOK_EVERY: Duration = Duration::from_millis(25);
/// A list that cost more than this to send waits for a pause in changes.
pub const BIG: f64 = 16.0 * 1024.0 * 1024.0;
/// The pause that ends a storm of joins or leaves.
pub const QUIET: Duration = Duration::from_millis(300);
/// Longest a change waits once it is pending (past the rate bound).
pub const MAX_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Pacer {
    min_interval: Duration,
    /// When the list first changed after the last send, if it has.
    dirty_since: Option<Instant>,
    last_change: Instant,
    /// Earliest next send, from the rate bound.
    next_allowed: Instant,
    /// Bytes × recipients of the last list sent.
    last_cost: f64,
    /// The last list, while its copies may still be queued.
    in_flight: Option<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    sent: Instant,
    /// The next look at the queues. A deadline, not a sleep: the runtime
    /// drops the chat's `next_event` whenever a socket event comes first,
    /// which under load is every time.
    look_at: Instant,
}

impl Pacer {
    pub fn new(min_interval: Duration, now: Instant) -> Self {
        Pacer {
            min_interval,
            dirty_since: None,
            last_change: now,
            next_allowed: now,
            last_cost: 0.0,
            in_flight: None,
        }
    }

    pub fn changed(&mut self, now: Instant) {
        self.dirty_since.get_or_insert(now);
        self.last_change = now;
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty_since.is_some()
    }

    /// When the pending change should go out, or `None` if nothing is pending.
    pub fn due(&self) -> Option<Instant> {
        let since = self.dirty_since?;
        let mut at = self.next_allowed;
        if self.last_cost >= BIG {
            let quiet = self.last_change + QUIET;
            at = at.max(quiet.min(since + MAX_WAIT));
        }
        Some(at)
    }

    /// A list of `bytes` went to `recipients` sockets at `now`.
    pub fn sent(&mut self, now: Instant, bytes: usize, recipients: usize) {
        let cost = bytes as f64 * recipients as f64;
        self.dirty_since = None;
        self.last_cost = cost;
        let gap = Duration::from_secs_f64(cost / BYTES_PER_SEC);
        self.next_allowed = now + self.min_interval.max(gap);
        self.in_flight = Some(InFlight {
            sent: now,
            look_at: now + LOOK_EVERY,
        });
    }

    /// Whether the last list may still be queued.
    #[cfg(test)]
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// When to look at the queues next, while the last list may be in them.
    pub fn next_look(&self) -> Option<Instant> {
        self.in_flight.as_ref().map(|f| f.look_at)
    }

    /// The chat looked at `now` and the list was still there.
    pub fn looked(&mut self, now: Instant) {
        if let Some(f) = &mut self.in_flight {
            f.look_at = now + LOOK_EVERY;
        }
    }

    /// The last list's copies left this worker's queues at `now`.
    pub fn drained(&mut self, now: Instant) {
        if let Some(InFlight { sent, .. }) = self.in_flight.take() {
            let took = now.saturating_duration_since(sent);
            let wait = (took * DRAIN_FACTOR).min(DRAIN_WAIT_MAX);
            self.next_allowed = self.next_allowed.max(now + wait);
        }
    }

    /// Sending failed; try again after the minimum interval.
    pub fn retry(&mut self, now: Instant) {
        self.next_allowed = now + self.min_interval;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn small_lists_go_out_at_the_minimum_interval() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100 * MS, t0);
        assert_eq!(p.due(), None);
        p.changed(t0);
        assert_eq!(p.due(), Some(t0));
        p.sent(t0, 100, 10);
        p.changed(t0 + MS);
        p.changed(t0 + 50 * MS);
        assert_eq!(p.due(), Some(t0 + 100 * MS));
    }

    #[test]
    fn big_lists_wait_for_a_pause_but_not_forever() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100 * MS, t0);
        // 10,000 bytes of names to 2,000 sockets: 20 MB, a big list.
        p.sent(t0, 10_000, 2_000);
        let start = t0 + 100 * MS;
        // Joins keep coming, then pause: the list goes out QUIET after the last.
        p.changed(start);
        p.changed(start + 500 * MS);
        assert_eq!(p.due(), Some(start + 500 * MS + QUIET));
        // A steady trickle cannot hold it back past MAX_WAIT.
        p.changed(start + MAX_WAIT);
        assert_eq!(p.due(), Some(start + MAX_WAIT));
    }

    #[test]
    fn a_list_slow_to_leave_spaces_the_next_by_that_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100 * MS, t0);
        p.sent(t0, 1_000, 100);
        assert!(p.in_flight());
        // The gateways took a second to read it all: the next list waits
        // three more.
        p.drained(t0 + 1000 * MS);
        assert!(!p.in_flight());
        p.changed(t0 + 1000 * MS);
        assert_eq!(p.due(), Some(t0 + 4000 * MS));
        // A list that leaves at once changes nothing.
        let t1 = t0 + 4000 * MS;
        p.sent(t1, 1_000, 100);
        p.drained(t1 + MS);
        p.changed(t1 + MS);
        assert_eq!(p.due(), Some(t1 + 100 * MS));
        // One that never seemed to leave adds at most DRAIN_WAIT_MAX.
        let t2 = t1 + 100 * MS;
        p.sent(t2, 1_000, 100);
        p.drained(t2 + 60_000 * MS);
        p.changed(t2 + 60_000 * MS);
        assert_eq!(p.due(), Some(t2 + 60_000 * MS + DRAIN_WAIT_MAX));
    }

    #[test]
    fn huge_lists_are_spaced_by_their_cost() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100 * MS, t0);
        // 100 kB of names to 10,000 sockets: 1 GB, about a second of budget.
        p.sent(t0, 100_000, 10_000);
        p.changed(t0 + MS);
        let gap = Duration::from_secs_f64(1e9 / BYTES_PER_SEC);
        assert_eq!(p.due(), Some(t0 + gap));
    }
}

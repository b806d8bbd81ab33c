//! Delivery accounting for the `chat` scenario: loss, duplicates, order and
//! latency, from what each client receives.
//!
//! Every planned message has an index `g = seq * senders + sender` (senders
//! take turns, so the aggregate rate is even). Each client keeps its own
//! [`ClientTally`] (no sharing on the hot path): a bitset of the indices it
//! received, the last server `ID` and the last seq per sender. What is shared
//! ([`RunBook`]) is cheap to touch from every client:
//! - `ids[g]`: the server ID of message `g` as first seen by any client. A
//!   client that sees another ID for the same message proves two clients were
//!   told different orders. The common case is a load of a cache line no one
//!   is writing.
//! - latency histograms and delivery counters, sharded by client so two
//!   threads rarely touch the same one.
//!
//! "One order" holds when every client saw IDs strictly increasing, each
//! sender's messages in seq order, and every message under one ID everywhere:
//! then every client's sequence is a subsequence of one total order (and with
//! zero loss, that order itself).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::wire::Marker;

/// Shards for the latency histograms and counters: a few per core keeps two
/// threads off the same lock or cache line almost always.
const SHARDS: usize = 16;

/// Largest latency recorded exactly, in microseconds (an hour); anything
/// above is clamped, which no sane run reaches.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Expected deliveries above which the per-client bitsets (one bit per
/// expected delivery) would take more than 1 GiB.
pub const MAX_EXPECTED_DELIVERIES: u64 = 8 << 30;

/// Cache-line padded counter.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// What the clients of one run share.
pub struct RunBook {
    pub run: u32,
    pub senders: u32,
    /// Messages planned for the whole run (every sender's count summed).
    pub planned: u64,
    /// Server ID + 1 of each planned message as first seen (0: not yet).
    ids: Box<[AtomicU64]>,
    latency: Box<[Mutex<Histogram<u64>>]>,
    delivered: Box<[Padded]>,
}

impl RunBook {
    pub fn new(run: u32, senders: u32, planned: u64) -> RunBook {
        let ids = (0..planned).map(|_| AtomicU64::new(0)).collect();
        let latency = (0..SHARDS)
            .map(|_| {
                Mutex::new(
                    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
                        .expect("static histogram bounds are valid"),
                )
            })
            .collect();
        let delivered = (0..SHARDS).map(|_| Padded::default()).collect();
        RunBook {
            run,
            senders,
            planned,
            ids,
            latency,
            delivered,
        }
    }

    /// Index of a message in the run's plan, if it belongs to the plan.
    pub fn index(&self, marker: &Marker) -> Option<u64> {
        if marker.run != self.run || marker.sender >= self.senders {
            return None;
        }
        let g = u64::from(marker.seq) * u64::from(self.senders) + u64::from(marker.sender);
        (g < self.planned).then_some(g)
    }

    /// Distinct deliveries so far, across all clients.
    pub fn delivered(&self) -> u64 {
        self.delivered
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }

    /// Of the first `n` planned messages, how many no client received: a
    /// post lost before any fan-out (never stored) rather than on its way to
    /// some sockets.
    pub fn unseen(&self, n: u64) -> u64 {
        self.ids
            .iter()
            .take(n as usize)
            .filter(|id| id.load(Ordering::Relaxed) == 0)
            .count() as u64
    }

    /// Whether some client received planned message `g` (a sender that
    /// never connected leaves its share of the plan unsent).
    pub fn seen_by_any(&self, g: u64) -> bool {
        self.ids
            .get(g as usize)
            .is_some_and(|id| id.load(Ordering::Relaxed) != 0)
    }

    /// All clients' latencies merged.
    pub fn latency(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
            .expect("static histogram bounds are valid");
        for shard in self.latency.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        all
    }
}

/// What one client saw. Owned by that client's reader task.
#[derive(Debug, Clone, Default)]
pub struct ClientTally {
    /// Bit `g` set: message `g` received.
    seen: Vec<u64>,
    /// Last seq received per sender (`u32::MAX`: none yet).
    last_seq: Vec<u32>,
    last_id: Option<u64>,
    /// This client's counts, summed over clients into the run's [`Totals`].
    pub counts: Totals,
}

impl ClientTally {
    pub fn new(book: &RunBook) -> ClientTally {
        ClientTally {
            seen: vec![0; book.planned.div_ceil(64) as usize],
            last_seq: vec![u32::MAX; book.senders as usize],
            ..ClientTally::default()
        }
    }

    /// Accounts one Chat frame received at `now_nanos` by client `client`.
    pub fn on_chat(
        &mut self,
        book: &RunBook,
        client: usize,
        marker: Option<Marker>,
        id: Option<u64>,
        now_nanos: u64,
    ) {
        let Some((marker, g)) = marker.and_then(|m| book.index(&m).map(|g| (m, g))) else {
            self.counts.foreign += 1;
            return;
        };
        let (word, bit) = ((g / 64) as usize, 1u64 << (g % 64));
        if self.seen[word] & bit != 0 {
            self.counts.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        self.counts.received += 1;
        let shard = client % SHARDS;
        book.delivered[shard].0.fetch_add(1, Ordering::Relaxed);

        let last = &mut self.last_seq[marker.sender as usize];
        if *last != u32::MAX && marker.seq < *last {
            self.counts.order_violations += 1;
        }
        // Seqs stay far below u32::MAX: the plan's size is bounded.
        *last = if *last == u32::MAX {
            marker.seq
        } else {
            (*last).max(marker.seq)
        };

        match id {
            Some(id) => {
                if self.last_id.is_some_and(|last| id <= last) {
                    self.counts.order_violations += 1;
                }
                self.last_id = Some(self.last_id.map_or(id, |last| last.max(id)));
                let slot = &book.ids[g as usize];
                let tagged = id.wrapping_add(1);
                let known = slot.load(Ordering::Relaxed);
                if known == 0 {
                    if let Err(other) =
                        slot.compare_exchange(0, tagged, Ordering::Relaxed, Ordering::Relaxed)
                        && other != tagged
                    {
                        self.counts.id_conflicts += 1;
                    }
                } else if known != tagged {
                    self.counts.id_conflicts += 1;
                }
            }
            None => self.counts.missing_ids += 1,
        }

        let latency_us = now_nanos.saturating_sub(marker.sent_nanos) / 1_000;
        book.latency[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(latency_us.max(1));
        self.counts.first_recv_nanos.get_or_insert(now_nanos);
        self.counts.last_recv_nanos = Some(now_nanos);
    }

    /// Which of the first `n` planned messages this client did not receive.
    pub fn missing(&self, n: u64) -> Vec<u64> {
        (0..n)
            .filter(|g| {
                self.seen
                    .get((g / 64) as usize)
                    .is_some_and(|w| w & (1u64 << (g % 64)) == 0)
            })
            .collect()
    }

    /// Frees the bitsets once the counts are all that is left to read.
    pub fn shrink(&mut self) {
        self.seen = Vec::new();
        self.last_seq = Vec::new();
    }
}

/// Delivery counts: one client's, or the run's over all clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub received: u64,
    pub duplicates: u64,
    /// IDs going backwards or a sender's messages out of seq order.
    pub order_violations: u64,
    /// A message seen under another ID than another client saw it.
    pub id_conflicts: u64,
    /// Chat frames of this run that carried no `ID`.
    pub missing_ids: u64,
    /// Chat frames not of this run (history, other users).
    pub foreign: u64,
    pub first_recv_nanos: Option<u64>,
    pub last_recv_nanos: Option<u64>,
}

impl Totals {
    pub fn add(&mut self, t: &Totals) {
        self.received += t.received;
        self.duplicates += t.duplicates;
        self.order_violations += t.order_violations;
        self.id_conflicts += t.id_conflicts;
        self.missing_ids += t.missing_ids;
        self.foreign += t.foreign;
        self.first_recv_nanos = min_opt(self.first_recv_nanos, t.first_recv_nanos);
        self.last_recv_nanos = self.last_recv_nanos.max(t.last_recv_nanos);
    }

    /// Every client saw a subsequence of one total order.
    pub fn one_order(&self) -> bool {
        self.order_violations == 0 && self.id_conflicts == 0 && self.missing_ids == 0
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(sender: u32, seq: u32) -> Option<Marker> {
        Some(Marker {
            run: 9,
            sender,
            seq,
            sent_nanos: 1_000,
        })
    }

    #[test]
    fn clean_run_is_one_order() {
        let book = RunBook::new(9, 2, 4);
        let mut totals = Totals::default();
        for client in 0..3 {
            let mut t = ClientTally::new(&book);
            for (i, (s, q)) in [(0, 0), (1, 0), (0, 1), (1, 1)].into_iter().enumerate() {
                t.on_chat(&book, client, m(s, q), Some(10 + i as u64), 2_000_000);
            }
            totals.add(&t.counts);
        }
        assert_eq!(totals.received, 12);
        assert_eq!(book.delivered(), 12);
        assert!(totals.one_order());
        assert_eq!(totals.duplicates, 0);
        let h = book.latency();
        assert_eq!(h.len(), 12);
        assert_eq!(h.max(), h.value_at_quantile(0.5));
    }

    #[test]
    fn duplicates_and_foreign_frames_are_counted_not_delivered() {
        let book = RunBook::new(9, 1, 2);
        let mut t = ClientTally::new(&book);
        t.on_chat(&book, 0, m(0, 0), Some(1), 5_000);
        t.on_chat(&book, 0, m(0, 0), Some(1), 5_000);
        t.on_chat(&book, 0, m(0, 0), Some(2), 5_000);
        t.on_chat(&book, 0, None, Some(3), 5_000);
        t.on_chat(
            &book,
            0,
            Some(Marker {
                run: 8,
                ..m(0, 1).unwrap()
            }),
            Some(4),
            5_000,
        );
        t.on_chat(&book, 0, m(0, 7), Some(5), 5_000);
        assert_eq!(
            (t.counts.received, t.counts.duplicates, t.counts.foreign),
            (1, 2, 3)
        );
    }

    #[test]
    fn different_orders_are_caught() {
        let book = RunBook::new(9, 2, 2);
        let mut a = ClientTally::new(&book);
        a.on_chat(&book, 0, m(0, 0), Some(1), 5_000);
        a.on_chat(&book, 0, m(1, 0), Some(2), 5_000);
        // Client b was told the same messages under swapped IDs: each client's
        // own view is increasing, but the IDs disagree.
        let mut b = ClientTally::new(&book);
        b.on_chat(&book, 1, m(1, 0), Some(1), 5_000);
        b.on_chat(&book, 1, m(0, 0), Some(2), 5_000);
        let mut totals = Totals::default();
        totals.add(&a.counts);
        totals.add(&b.counts);
        assert!(totals.id_conflicts > 0);
        assert!(!totals.one_order());

        // IDs going backwards on one client.
        let book = RunBook::new(9, 2, 2);
        let mut c = ClientTally::new(&book);
        c.on_chat(&book, 0, m(0, 0), Some(2), 5_000);
        c.on_chat(&book, 0, m(1, 0), Some(1), 5_000);
        assert_eq!(c.counts.order_violations, 1);

        // A sender's messages out of order.
        let book = RunBook::new(9, 1, 2);
        let mut d = ClientTally::new(&book);
        d.on_chat(&book, 0, m(0, 1), None, 5_000);
        d.on_chat(&book, 0, m(0, 0), None, 5_000);
        assert_eq!((d.counts.order_violations, d.counts.missing_ids), (1, 2));
    }
}

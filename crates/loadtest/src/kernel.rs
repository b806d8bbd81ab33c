//! What the kernel's TCP did during a run: segments it dropped or sent
//! again, and whether it ran short of TCP memory.
//!
//! Every client of a run shares one machine's TCP memory with the servers
//! (`net.ipv4.tcp_mem`, about 1.5 GB before the kernel starts to shed on a
//! 24 GB machine). A 10,000-socket join storm sends each socket online lists
//! of 10,000 names (about 250 KB each), and at its peak the kernel held
//! 1.4–1.6 GB of them: past the threshold it drops segments even on
//! loopback, and a socket whose segment was dropped waits for its
//! retransmission timer, which backs off from 200 ms to seconds. Its
//! messages then come seconds late, and in a short run some never come
//! before the end. That is the load generator's machine, not the system
//! under test, and a run's report says when it happened.
//!
//! Read from `/proc/net/netstat` (`TcpExt`) and `/proc/net/snmp` (`Tcp`):
//! each holds pairs of lines, names then values, under one prefix.

use serde::{Deserialize, Serialize};

/// The kernel's TCP counters that show trouble, as read at one instant, or
/// the difference between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpTrouble {
    /// Times TCP memory went past the pressure threshold.
    pub memory_pressures: u64,
    /// Segments dropped because a receive queue was over its memory.
    pub rcvq_drops: u64,
    /// Times a receive queue was pruned to make room.
    pub prunes: u64,
    /// Retransmission timeouts (each a wait of 200 ms or more).
    pub timeouts: u64,
    /// Segments sent again.
    pub retransmitted: u64,
}

impl TcpTrouble {
    /// The counters now; `None` where `/proc/net` cannot be read.
    pub fn read() -> Option<TcpTrouble> {
        let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
        let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
        Some(TcpTrouble {
            memory_pressures: counter(&netstat, "TcpExt", "TCPMemoryPressures")?,
            rcvq_drops: counter(&netstat, "TcpExt", "TCPRcvQDrop")?,
            prunes: counter(&netstat, "TcpExt", "PruneCalled")?,
            timeouts: counter(&netstat, "TcpExt", "TCPTimeouts")?,
            retransmitted: counter(&snmp, "Tcp", "RetransSegs")?,
        })
    }

    /// What happened between `before` and this reading.
    pub fn since(&self, before: &TcpTrouble) -> TcpTrouble {
        TcpTrouble {
            memory_pressures: self
                .memory_pressures
                .saturating_sub(before.memory_pressures),
            rcvq_drops: self.rcvq_drops.saturating_sub(before.rcvq_drops),
            prunes: self.prunes.saturating_sub(before.prunes),
            timeouts: self.timeouts.saturating_sub(before.timeouts),
            retransmitted: self.retransmitted.saturating_sub(before.retransmitted),
        }
    }

    /// Whether the kernel ran short of TCP memory and dropped segments: a
    /// run's latencies and late deliveries then include its timeouts.
    pub fn shed(&self) -> bool {
        self.memory_pressures > 0 || self.rcvq_drops > 0
    }
}

/// The value of `name` under `prefix` in a `/proc/net/{netstat,snmp}` text.
fn counter(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let values = lines.next()?;
        let (Some(names), Some(values)) = (
            names.strip_prefix(prefix).and_then(|r| r.strip_prefix(':')),
            values
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(':')),
        ) else {
            continue;
        };
        let at = names.split_whitespace().position(|n| n == name)?;
        return values.split_whitespace().nth(at)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent PruneCalled TCPTimeouts TCPMemoryPressures TCPRcvQDrop
TcpExt: 0 907 543 1 793
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
";

    #[test]
    fn counters_are_read_by_name_under_their_prefix() {
        assert_eq!(counter(NETSTAT, "TcpExt", "TCPRcvQDrop"), Some(793));
        assert_eq!(counter(NETSTAT, "TcpExt", "PruneCalled"), Some(907));
        assert_eq!(counter(NETSTAT, "IpExt", "InTruncatedPkts"), Some(0));
        assert_eq!(counter(NETSTAT, "TcpExt", "NoSuchCounter"), None);
        assert_eq!(counter(NETSTAT, "Udp", "InDatagrams"), None);
    }

    #[test]
    fn this_machine_has_the_counters() {
        let now = TcpTrouble::read().expect("/proc/net/netstat and /proc/net/snmp");
        assert_eq!(now.since(&now), TcpTrouble::default());
        assert!(!TcpTrouble::default().shed());
    }
}

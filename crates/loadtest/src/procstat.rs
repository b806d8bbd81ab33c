//! CPU time and memory of the server processes (and of the tool itself), from
//! `/proc`.
//!
//! CPU is `utime + stime` of `/proc/PID/stat` (all threads, dead ones
//! included), read at the start and end of the measured window. Memory is
//! `VmRSS`, sampled every [`SAMPLE_EVERY`] by a background task that keeps the
//! peak: the kernel's own `VmHWM` is a peak since the process started, which
//! would mix in earlier runs against the same process (it is reported too).

use std::fs;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often RSS is sampled for the peak; 10 Hz catches any peak that lasts
/// long enough to matter and costs one small read per process per sample.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A process to watch, by role (`gateway`, `worker`, `baseline`, `loadtest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watched {
    pub role: String,
    pub pid: u32,
}

impl Watched {
    pub fn new(role: &str, pid: u32) -> Watched {
        Watched {
            role: role.to_string(),
            pid,
        }
    }
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// Reads CPU seconds and RSS of `pid` now.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    Some(Sample {
        cpu_seconds: ticks as f64 / crate::sys::clock_ticks_per_sec() as f64,
        rss_bytes: rss_bytes(pid)?,
    })
}

/// RSS of `pid` from `/proc/PID/statm` (resident pages).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident * crate::sys::page_size())
}

/// `utime + stime` from a `/proc/PID/stat` line. The command name in
/// parentheses may hold spaces and parentheses, so fields are counted after
/// the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state(3) ppid pgrp session tty_nr tpgid flags minflt
    // cminflt majflt cmajflt utime(14) stime(15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmHWM` (peak RSS since start) of `pid`, in bytes.
pub fn hwm_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// What the report says about one process over one measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcReport {
    pub role: String,
    pub pid: u32,
    /// CPU seconds spent inside the measured window.
    pub cpu_seconds: f64,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    /// Highest RSS sampled while the scenario ran.
    pub rss_peak_bytes: u64,
    /// The kernel's peak RSS since the process started.
    pub hwm_bytes: Option<u64>,
    pub open_fds: Option<usize>,
    /// Still running at the end of the window.
    pub alive: bool,
}

/// Samples the watched processes' RSS in the background and marks CPU at the
/// edges of a window.
pub struct Monitor {
    procs: Vec<Watched>,
    peaks: Arc<Mutex<Vec<u64>>>,
    first: Vec<Sample>,
    cpu_start: Vec<f64>,
    stop: CancellationToken,
    sampler: JoinHandle<()>,
}

impl Monitor {
    /// Starts sampling. The first sample is the `rss_start` of the report.
    pub fn start(procs: Vec<Watched>) -> Monitor {
        let first: Vec<Sample> = procs
            .iter()
            .map(|p| sample(p.pid).unwrap_or_default())
            .collect();
        let peaks = Arc::new(Mutex::new(first.iter().map(|s| s.rss_bytes).collect()));
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample_peaks(
            procs.iter().map(|p| p.pid).collect(),
            Arc::clone(&peaks),
            stop.clone(),
        ));
        let cpu_start = first.iter().map(|s| s.cpu_seconds).collect();
        Monitor {
            procs,
            peaks,
            first,
            cpu_start,
            stop,
            sampler,
        }
    }

    /// Starts the CPU window now (by default it starts with the monitor).
    pub fn mark_cpu_start(&mut self) {
        self.cpu_start = self
            .procs
            .iter()
            .map(|p| sample(p.pid).map(|s| s.cpu_seconds).unwrap_or_default())
            .collect();
    }

    /// RSS of each process now.
    pub fn rss_now(&self) -> Vec<u64> {
        self.procs
            .iter()
            .map(|p| rss_bytes(p.pid).unwrap_or_default())
            .collect()
    }

    /// Ends the CPU window and the sampling; one report per process, in the
    /// order they were given.
    pub async fn finish(self, count_fds: bool) -> Vec<ProcReport> {
        let end: Vec<Option<Sample>> = self.procs.iter().map(|p| sample(p.pid)).collect();
        self.stop.cancel();
        let _ = self.sampler.await;
        let peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.procs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let end_sample = end[i].unwrap_or_default();
                ProcReport {
                    role: p.role.clone(),
                    pid: p.pid,
                    cpu_seconds: (end_sample.cpu_seconds - self.cpu_start[i]).max(0.0),
                    rss_start_bytes: self.first[i].rss_bytes,
                    rss_end_bytes: end_sample.rss_bytes,
                    rss_peak_bytes: peaks[i].max(end_sample.rss_bytes),
                    hwm_bytes: hwm_bytes(p.pid),
                    open_fds: if count_fds { open_fds(p.pid) } else { None },
                    alive: end[i].is_some(),
                }
            })
            .collect()
    }
}

async fn sample_peaks(pids: Vec<u32>, peaks: Arc<Mutex<Vec<u64>>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now: Vec<u64> = pids
            .iter()
            .map(|&pid| rss_bytes(pid).unwrap_or_default())
            .collect();
        let mut peaks = peaks.lock().unwrap_or_else(|e| e.into_inner());
        for (peak, rss) in peaks.iter_mut().zip(now) {
            *peak = (*peak).max(rss);
        }
    }
}

/// Sum of CPU seconds over the reports whose role is one of `roles`.
pub fn cpu_of(reports: &[ProcReport], roles: &[&str]) -> f64 {
    reports
        .iter()
        .filter(|r| roles.contains(&r.role.as_str()))
        .map(|r| r.cpu_seconds)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_in_the_name() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let s = sample(me).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
        assert!(hwm_bytes(me).unwrap() >= 1);
        assert!(open_fds(me).unwrap() >= 3);
    }
}

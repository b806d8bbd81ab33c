//! CPU time and memory of the server processes (and of the tool itself), from
//! `/proc`, read and parsed by the `procfs` crate.
//!
//! CPU is `utime + stime` of `/proc/PID/stat` (all threads, dead ones
//! included), read at the start and end of the measured window. Memory is the
//! resident set of `/proc/PID/statm`, sampled every [`SAMPLE_EVERY`] by a
//! background task that keeps the peak: the kernel's own `VmHWM` is a peak
//! since the process started, which would mix in earlier runs against the
//! same process (it is reported too).
//!
//! A [`Monitor`] opens each `/proc/PID` directory once and reads through that
//! handle, so a sample costs the same open, read and close of `statm` as a
//! path would, and a pid the kernel hands to a new process after ours exited
//! reads as gone instead of as the stranger.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use procfs::process::Process;
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
    /// Neither a zombie nor dead: still running.
    pub running: bool,
}

/// Reads CPU seconds and RSS of `pid` now.
pub fn sample(pid: u32) -> Option<Sample> {
    sample_of(&open(pid)?)
}

/// `/proc/PID` of `pid`, if it exists and is readable.
fn open(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

fn sample_of(process: &Process) -> Option<Sample> {
    let stat = process.stat().ok()?;
    Some(Sample {
        cpu_seconds: (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        rss_bytes: rss_of(process)?,
        running: !matches!(stat.state, 'Z' | 'X'),
    })
}

/// RSS of `process` from `/proc/PID/statm` (resident pages).
fn rss_of(process: &Process) -> Option<u64> {
    Some(process.statm().ok()?.resident * procfs::page_size())
}

/// `VmHWM` (peak RSS since start) of `process`, in bytes.
fn hwm_of(process: &Process) -> Option<u64> {
    Some(process.status().ok()?.vmhwm? * 1024)
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
    /// `/proc/PID` of each watched process, `None` where it was not there at
    /// the start; shared with the sampler.
    handles: Arc<Vec<Option<Process>>>,
    peaks: Arc<Mutex<Vec<u64>>>,
    first: Vec<Sample>,
    cpu_start: Vec<f64>,
    stop: CancellationToken,
    sampler: JoinHandle<()>,
}

impl Monitor {
    /// Starts sampling. The first sample is the `rss_start` of the report.
    pub fn start(procs: Vec<Watched>) -> Monitor {
        let handles: Arc<Vec<Option<Process>>> =
            Arc::new(procs.iter().map(|p| open(p.pid)).collect());
        let first = Self::sample_all(&handles);
        let peaks = Arc::new(Mutex::new(first.iter().map(|s| s.rss_bytes).collect()));
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample_peaks(
            Arc::clone(&handles),
            Arc::clone(&peaks),
            stop.clone(),
        ));
        let cpu_start = first.iter().map(|s| s.cpu_seconds).collect();
        Monitor {
            procs,
            handles,
            peaks,
            first,
            cpu_start,
            stop,
            sampler,
        }
    }

    fn sample_all(handles: &[Option<Process>]) -> Vec<Sample> {
        handles
            .iter()
            .map(|h| h.as_ref().and_then(sample_of).unwrap_or_default())
            .collect()
    }

    /// Starts the CPU window now (by default it starts with the monitor).
    pub fn mark_cpu_start(&mut self) {
        self.cpu_start = Self::sample_all(&self.handles)
            .iter()
            .map(|s| s.cpu_seconds)
            .collect();
    }

    /// RSS of each process now.
    pub fn rss_now(&self) -> Vec<u64> {
        rss_all(&self.handles)
    }

    /// Ends the CPU window and the sampling; one report per process, in the
    /// order they were given.
    pub async fn finish(self, count_fds: bool) -> Vec<ProcReport> {
        let end: Vec<Option<Sample>> = self
            .handles
            .iter()
            .map(|h| h.as_ref().and_then(sample_of))
            .collect();
        self.stop.cancel();
        let _ = self.sampler.await;
        let peaks = self.peaks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.procs
            .iter()
            .zip(self.handles.iter())
            .enumerate()
            .map(|(i, (p, handle))| {
                let end_sample = end[i].unwrap_or_default();
                ProcReport {
                    role: p.role.clone(),
                    pid: p.pid,
                    cpu_seconds: (end_sample.cpu_seconds - self.cpu_start[i]).max(0.0),
                    rss_start_bytes: self.first[i].rss_bytes,
                    rss_end_bytes: end_sample.rss_bytes,
                    rss_peak_bytes: peaks[i].max(end_sample.rss_bytes),
                    hwm_bytes: handle.as_ref().and_then(hwm_of),
                    open_fds: handle
                        .as_ref()
                        .filter(|_| count_fds)
                        .and_then(|h| h.fd_count().ok()),
                    alive: end_sample.running,
                }
            })
            .collect()
    }
}

fn rss_all(handles: &[Option<Process>]) -> Vec<u64> {
    handles
        .iter()
        .map(|h| h.as_ref().and_then(rss_of).unwrap_or_default())
        .collect()
}

async fn sample_peaks(
    handles: Arc<Vec<Option<Process>>>,
    peaks: Arc<Mutex<Vec<u64>>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = rss_all(&handles);
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
    fn reads_this_process() {
        let me = std::process::id();
        let s = sample(me).expect("own /proc entry");
        assert!(s.rss_bytes > 0 && s.running);
        let handle = open(me).unwrap();
        assert!(hwm_of(&handle).unwrap() >= s.rss_bytes / 2);
        assert!(handle.fd_count().unwrap() >= 3);
    }

    #[tokio::test]
    async fn a_monitor_reports_its_processes_in_order() {
        let me = std::process::id();
        let mut monitor = Monitor::start(vec![
            Watched::new("loadtest", me),
            // Above any pid_max: never a process.
            Watched::new("gone", u32::MAX / 2),
        ]);
        monitor.mark_cpu_start();
        let burn = std::time::Instant::now();
        while burn.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(burn.elapsed());
        }
        assert!(monitor.rss_now()[0] > 0);
        let reports = monitor.finish(true).await;
        assert_eq!(reports[0].role, "loadtest");
        assert!(reports[0].alive && reports[0].rss_peak_bytes > 0);
        assert!(reports[0].open_fds.unwrap() >= 3);
        assert!(reports[0].cpu_seconds >= 0.0);
        assert!(!reports[1].alive);
        assert_eq!((reports[1].rss_peak_bytes, reports[1].open_fds), (0, None));
    }
}

//! Starting and stopping the servers `compare` measures, each in its own
//! process so its CPU and memory are its own: the baseline
//! (`loadtest baseline`), or a worker and its gateway(s) in shared or private
//! mode. Each gets a free port chosen here, a log file in the output
//! directory, and is ready when `/healthz` answers 200 (the worker: when its
//! port accepts). Stopping sends SIGTERM, waits for a drain, then kills.
//! A gateway's count of the sockets it closed, by code, is read from its
//! `/metrics` ([`gateway_closes`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::cli::Mode;
use crate::procstat::Watched;

/// How long a stopped server may drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What `compare` needs to start servers.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Where `gateway` and `worker` are.
    pub bin_dir: PathBuf,
    /// This binary, for `loadtest baseline`.
    pub loadtest_exe: PathBuf,
    /// Gateway (or baseline, where asked) processes per mode.
    pub gateways: usize,
    pub max_frames_per_sec: Option<u32>,
    pub gateway_args: Vec<String>,
    pub worker_args: Vec<String>,
    pub startup_timeout: Duration,
    pub log_dir: PathBuf,
    /// Workers of a cluster mode (its gateways are `gateways`).
    pub cluster_workers: usize,
}

/// One started process.
struct Server {
    role: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
    /// Killed on purpose (a failover's victim): its exit is no surprise.
    faulted: bool,
}

/// The servers of one mode for one run.
pub struct Stack {
    pub urls: Vec<String>,
    pub watched: Vec<Watched>,
    /// Stopped in this order (gateways before their worker).
    servers: Vec<Server>,
    _data_dirs: Vec<tempfile::TempDir>,
}

/// A free TCP port on 127.0.0.1 (free now; the server binds it next).
pub fn free_port() -> std::io::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Stack {
    /// Servers someone else runs, at `urls`, measured by `watched`.
    pub fn external(urls: Vec<String>, watched: Vec<Watched>) -> Stack {
        Stack {
            urls,
            watched,
            servers: Vec::new(),
            _data_dirs: Vec::new(),
        }
    }

    /// Starts `mode`'s servers; `processes` baselines or gateways. `tag` names
    /// the log files.
    pub async fn start(
        mode: Mode,
        cfg: &LaunchConfig,
        processes: usize,
        tag: &str,
    ) -> anyhow::Result<Stack> {
        std::fs::create_dir_all(&cfg.log_dir)
            .with_context(|| format!("creating {}", cfg.log_dir.display()))?;
        let mut stack = Stack::external(Vec::new(), Vec::new());
        let started = match mode {
            Mode::Baseline => stack.start_baselines(cfg, processes, tag).await,
            Mode::Shared | Mode::Private => stack.start_sharedconn(mode, cfg, processes, tag).await,
            Mode::SharedCluster | Mode::PrivateCluster => {
                stack
                    .start_cluster(mode, cfg, cfg.cluster_workers, processes, tag)
                    .await
            }
        };
        if let Err(e) = started {
            stack.stop().await;
            return Err(e);
        }
        Ok(stack)
    }

    async fn start_baselines(
        &mut self,
        cfg: &LaunchConfig,
        n: usize,
        tag: &str,
    ) -> anyhow::Result<()> {
        for k in 0..n.max(1) {
            let port = free_port()?;
            let mut cmd = Command::new(&cfg.loadtest_exe);
            cmd.args([
                "--quiet",
                "baseline",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ]);
            let log = cfg.log_dir.join(format!("{tag}-baseline{k}.log"));
            self.spawn_ready("baseline", cmd, &log, port, true, cfg.startup_timeout)
                .await?;
            self.urls.push(format!("ws://127.0.0.1:{port}/ws"));
        }
        Ok(())
    }

    async fn start_sharedconn(
        &mut self,
        mode: Mode,
        cfg: &LaunchConfig,
        n: usize,
        tag: &str,
    ) -> anyhow::Result<()> {
        let worker_bin = binary(&cfg.bin_dir, "worker")?;
        let gateway_bin = binary(&cfg.bin_dir, "gateway")?;
        let data_dir = tempfile::Builder::new()
            .prefix("loadtest-worker-")
            .tempdir()
            .context("creating the worker's data dir")?;
        let wport = free_port()?;
        let mut cmd = Command::new(worker_bin);
        cmd.args(["--listen", &format!("127.0.0.1:{wport}")])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(worker_limits(cfg))
            .args(&cfg.worker_args);
        let log = cfg.log_dir.join(format!("{tag}-worker.log"));
        self._data_dirs.push(data_dir);
        self.spawn_ready("worker", cmd, &log, wport, false, cfg.startup_timeout)
            .await?;

        let mut gateways = Vec::new();
        for k in 0..n.max(1) {
            let port = free_port()?;
            let mut cmd = Command::new(&gateway_bin);
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--worker", &format!("http://127.0.0.1:{wport}")])
                .args(["--mode", mode.name()]);
            if let Some(limit) = cfg.max_frames_per_sec {
                cmd.args(["--max-frames-per-sec", &limit.to_string()]);
            }
            cmd.args(&cfg.gateway_args);
            let log = cfg.log_dir.join(format!("{tag}-gateway{k}.log"));
            self.spawn_ready("gateway", cmd, &log, port, true, cfg.startup_timeout)
                .await?;
            gateways.push(port);
        }
        self.urls = gateways
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}/ws"))
            .collect();
        self.order_for_stop();
        Ok(())
    }

    /// Gateways first, so they stop before the workers they drain into, and
    /// redis-server last, so workers stop before their backplane.
    fn order_for_stop(&mut self) {
        let rank = |role: &str| match role {
            "worker" => 1,
            "redis" => 2,
            _ => 0,
        };
        self.servers.sort_by_key(|s| rank(s.role));
    }

    /// redis-server, workers sharing it, and gateways linked to every worker.
    async fn start_cluster(
        &mut self,
        mode: Mode,
        cfg: &LaunchConfig,
        workers: usize,
        gateways: usize,
        tag: &str,
    ) -> anyhow::Result<()> {
        let transport = mode.transport().context("the baseline is not a cluster")?;
        let redis = self
            .start_redis(
                &cfg.log_dir.join(format!("{tag}-redis.log")),
                cfg.startup_timeout,
            )
            .await?;
        let mut worker_args = worker_limits(cfg);
        worker_args.extend(cfg.worker_args.iter().cloned());
        let mut ports = Vec::new();
        for k in 0..workers.max(1) {
            let (port, _pid) = self
                .start_worker(
                    &cfg.bin_dir,
                    free_port()?,
                    &redis,
                    &worker_args,
                    &cfg.log_dir.join(format!("{tag}-worker{k}.log")),
                    cfg.startup_timeout,
                )
                .await?;
            ports.push(port);
        }
        let mut args = cfg.gateway_args.clone();
        if let Some(limit) = cfg.max_frames_per_sec {
            args.extend(["--max-frames-per-sec".into(), limit.to_string()]);
        }
        for k in 0..gateways.max(1) {
            let port = self
                .start_gateway(
                    &cfg.bin_dir,
                    transport,
                    &ports,
                    &args,
                    &cfg.log_dir.join(format!("{tag}-gateway{k}.log")),
                    cfg.startup_timeout,
                )
                .await?;
            self.urls.push(format!("ws://127.0.0.1:{port}/ws"));
        }
        self.order_for_stop();
        Ok(())
    }

    /// A redis-server on a free loopback port, in a directory of its own,
    /// with an append-only file fsynced on every write (what the backplane
    /// promises: nothing acknowledged is lost). Returns its URL.
    pub async fn start_redis(&mut self, log: &Path, timeout: Duration) -> anyhow::Result<String> {
        let dir = tempfile::Builder::new()
            .prefix("loadtest-redis-")
            .tempdir()
            .context("creating redis-server's directory")?;
        let port = free_port()?;
        let mut cmd = Command::new(which("redis-server").context(
            "redis-server is not installed (apt-get install redis-server); the cluster \
             topologies need it",
        )?);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ]);
        self._data_dirs.push(dir);
        self.spawn_ready("redis", cmd, log, port, false, timeout)
            .await?;
        Ok(format!("redis://127.0.0.1:{port}"))
    }

    /// A worker with `backplane` (`redis://…` or `embedded`); returns its
    /// port and pid.
    pub async fn start_worker(
        &mut self,
        bin_dir: &Path,
        port: u16,
        backplane: &str,
        extra: &[String],
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(u16, u32)> {
        let data_dir = tempfile::Builder::new()
            .prefix("loadtest-worker-")
            .tempdir()
            .context("creating the worker's data dir")?;
        let mut cmd = Command::new(binary(bin_dir, "worker")?);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--backplane", backplane])
            .args(extra);
        self._data_dirs.push(data_dir);
        self.spawn_ready("worker", cmd, log, port, false, timeout)
            .await?;
        let pid = self.servers.last().expect("just spawned").pid;
        Ok((port, pid))
    }

    /// A gateway in `mode` linked to the workers on `workers` (ports);
    /// returns its port.
    pub async fn start_gateway(
        &mut self,
        bin_dir: &Path,
        mode: &str,
        workers: &[u16],
        extra: &[String],
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<u16> {
        let port = free_port()?;
        let list = workers
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(binary(bin_dir, "gateway")?);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--worker", &list])
            .args(["--mode", mode])
            .args(extra);
        self.spawn_ready("gateway", cmd, log, port, true, timeout)
            .await?;
        Ok(port)
    }

    /// The pid of the process started last.
    pub fn pid_of_last(&self) -> u32 {
        self.servers.last().map_or(0, |s| s.pid)
    }

    /// The pid of the first started process in `role`.
    pub fn pid_of_role(&self, role: &str) -> Option<u32> {
        self.servers.iter().find(|s| s.role == role).map(|s| s.pid)
    }

    /// The log file of the started process `pid`.
    pub fn log_of(&self, pid: u32) -> Option<PathBuf> {
        self.servers
            .iter()
            .find(|s| s.pid == pid)
            .map(|s| s.log.clone())
    }

    /// Sends `signal` to the started process `pid`, marking it as faulted on
    /// purpose (its exit is then expected). Only processes this stack
    /// started can be signalled.
    pub fn fault(&mut self, pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.pid == pid)
            .context("not a process this stack started")?;
        server.faulted = true;
        crate::sys::send_signal(pid, signal).with_context(|| format!("signal {signal} to {pid}"))
    }

    /// Starts `cmd` (output to `log`) and waits until it serves on
    /// 127.0.0.1:`port` (`/healthz` when `http`, else a TCP connect).
    async fn spawn_ready(
        &mut self,
        role: &'static str,
        cmd: Command,
        log: &Path,
        port: u16,
        http: bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.spawn(role, cmd, log)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = self.servers.last_mut().expect("just spawned");
        wait_ready(server, addr, http, timeout).await
    }

    fn spawn(&mut self, role: &'static str, mut cmd: Command, log: &Path) -> anyhow::Result<()> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {role} ({:?})", cmd.as_std().get_program()))?;
        let pid = child.id().context("started process has no pid")?;
        info!(role, pid, log = %log.display(), "started");
        self.watched.push(Watched::new(role, pid));
        self.servers.push(Server {
            role,
            child,
            pid,
            log: log.to_path_buf(),
            faulted: false,
        });
        Ok(())
    }

    /// SIGTERM to each server in order, a drain of up to [`STOP_GRACE`], then
    /// SIGKILL. Says so when a server needed the kill or exited badly.
    pub async fn stop(mut self) {
        for server in &mut self.servers {
            if let Ok(Some(status)) = server.child.try_wait() {
                if server.faulted {
                    info!(role = server.role, pid = server.pid, %status, "faulted server had exited");
                } else {
                    warn!(role = server.role, pid = server.pid, %status, log = %server.log.display(), "server had already exited");
                }
                continue;
            }
            // A stopped (SIGSTOP) server would sit on the SIGTERM.
            let _ = crate::sys::send_signal(server.pid, libc::SIGCONT);
            let _ = crate::sys::send_signal(server.pid, libc::SIGTERM);
            let began = Instant::now();
            match tokio::time::timeout(STOP_GRACE, server.child.wait()).await {
                Ok(Ok(status)) if status.success() => {
                    info!(
                        role = server.role,
                        pid = server.pid,
                        secs = began.elapsed().as_secs_f64(),
                        "stopped"
                    )
                }
                Ok(Ok(status)) => {
                    warn!(role = server.role, pid = server.pid, %status, log = %server.log.display(), "server exited badly on SIGTERM")
                }
                Ok(Err(e)) => warn!(role = server.role, error = %e, "waiting for server"),
                Err(_) => {
                    warn!(
                        role = server.role,
                        pid = server.pid,
                        "no exit within the grace period after SIGTERM; killing"
                    );
                    let _ = server.child.kill().await;
                }
            }
        }
    }
}

/// `name` on `PATH`, or in /usr/sbin or /usr/bin.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `dir/NAME`, or `dir/sharedconn-NAME` (the default name of the crate's
/// binary).
fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    for candidate in [name.to_string(), format!("sharedconn-{name}")] {
        let path = dir.join(candidate);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "neither {name} nor sharedconn-{name} found in {}: build them with `cargo build --release` \
         (or pass --bin-dir, or a --shared-url/--private-url of a running gateway)",
        dir.display()
    )
}

/// Waits until `addr` accepts (and, with `healthz`, answers 200 on
/// `/healthz`), failing early if the process exits.
async fn wait_ready(
    server: &mut Server,
    addr: SocketAddr,
    healthz: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "{} exited during startup ({status}); log {}:\n{}",
                server.role,
                server.log.display(),
                log_tail(&server.log)
            );
        }
        let ready = if healthz {
            health_ok(addr).await
        } else {
            TcpStream::connect(addr).await.is_ok()
        };
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready on {addr} within {timeout:?}; log {}:\n{}",
                server.role,
                server.log.display(),
                log_tail(&server.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /healthz` answered with 200.
pub async fn health_ok(addr: SocketAddr) -> bool {
    let check = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 16];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The gateway's count of sockets it closed, by close code label (the
/// gateway crate's `SOCKETS_CLOSED`; spelled out here, as this crate does not
/// link the gateway).
const GATEWAY_SOCKETS_CLOSED: &str = "sharedconn_gateway_sockets_closed_total";

/// Sockets a gateway has closed since it started, by close code, from its
/// `/metrics`; `None` when it does not answer them (the baseline has none).
pub async fn gateway_closes(addr: SocketAddr) -> Option<BTreeMap<String, u64>> {
    let scrape = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        // HTTP/1.0: the answer comes whole, never chunked.
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.ok()?;
        let answer = String::from_utf8_lossy(&answer);
        let ok = answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200");
        let (_, body) = answer.split_once("\r\n\r\n")?;
        ok.then(|| closes_by_code(body))
    };
    tokio::time::timeout(Duration::from_secs(2), scrape)
        .await
        .ok()
        .flatten()
}

/// The `code` label and value of every `GATEWAY_SOCKETS_CLOSED` sample in a
/// Prometheus text exposition.
fn closes_by_code(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(GATEWAY_SOCKETS_CLOSED) else {
            continue;
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
            continue;
        };
        let code = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("code=\""))
            .and_then(|c| c.strip_suffix('"'));
        let value = value.trim().parse::<f64>().ok();
        if let (Some(code), Some(value)) = (code, value) {
            *out.entry(code.to_string()).or_default() += value as u64;
        }
    }
    out
}

/// The last few KiB of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(3000)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// The workers' own per-socket frame limit, kept at twice the gateways'
/// (`--max-frames-per-sec`, raised for load), as the README asks.
fn worker_limits(cfg: &LaunchConfig) -> Vec<String> {
    match cfg.max_frames_per_sec {
        Some(limit) => vec![
            "--socket-frames-per-sec".into(),
            limit.saturating_mul(2).to_string(),
            "--socket-frame-burst".into(),
            limit.saturating_mul(2).max(400).to_string(),
        ],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gateway_closes_by_code() {
        let text = "\
# TYPE sharedconn_gateway_sockets_closed_total counter
sharedconn_gateway_sockets_closed_total{code=\"1008\"} 5
sharedconn_gateway_sockets_closed_total{code=\"1001\"} 2
sharedconn_gateway_sockets_closed_total_other{code=\"1000\"} 9
sharedconn_gateway_sockets_opened_total 30
";
        let closes = closes_by_code(text);
        assert_eq!(
            closes,
            BTreeMap::from([("1001".to_string(), 2), ("1008".to_string(), 5)])
        );
    }
}

//! Real processes for failure tests: `redis-server`, `worker` and `gateway`
//! binaries on loopback ports, which a test can SIGKILL, SIGSTOP or SIGTERM.
//! Every process is killed when its handle is dropped, so a failed test
//! leaves nothing running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free loopback port (bound, then released for the process to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The path of one of the workspace's binaries, built (once per test
/// process, quick when up to date) so a test never runs a stale one.
///
/// Built the way the test run builds the workspace (`--workspace --bins
/// --tests`): the tests' dev-dependencies add features to shared crates, and
/// a narrower `cargo build` would compile the binaries a second time with
/// other features, each build undoing the other's.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = Path::new(env!("CARGO_BIN_EXE_sharedconn"))
        .parent()
        .expect("target dir")
        .to_owned();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "-q", "--workspace", "--bins", "--tests"]);
        if dir.ends_with("release") {
            command.arg("--release");
        }
        let status = command
            .status()
            .expect("cannot run cargo to build the worker, gateway and loadtest binaries");
        assert!(
            status.success(),
            "building the worker, gateway and loadtest binaries failed"
        );
    });
    let path = dir.join(name);
    assert!(path.exists(), "binary {} is missing", path.display());
    path
}

/// A child process, killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command) -> Proc {
        command.stdin(Stdio::null());
        // SHAREDCONN_TEST_LOGS=DIR keeps each process's log in DIR.
        match std::env::var_os("SHAREDCONN_TEST_LOGS") {
            Some(dir) => {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = Path::new(&dir).join(format!("{}-{name}-{n}.log", std::process::id()));
                let file = std::fs::File::create(&path).expect("log file");
                command.stdout(Stdio::null()).stderr(file);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a child we started and have not reaped.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.name);
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn cont(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGTERM, and waits (bounded) for a clean exit; returns its status.
    pub async fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.term();
        self.exited(within).await
    }

    /// SIGTERM, without waiting.
    pub fn term(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits (bounded) for the process to exit; returns its status, or
    /// kills it and returns `None` if it did not exit in time.
    pub async fn exited(&mut self, within: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not listening on {addr} within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real `redis-server` with an append-only file fsynced on every write,
/// in a directory of its own.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            proc: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and directory.
    pub async fn restart(&mut self) {
        let server = which("redis-server").unwrap_or_else(|| {
            panic!(
                "redis-server is not installed: run `apt-get install redis-server` (./test.sh does)"
            )
        });
        let mut command = Command::new(server);
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
        ]);
        self.proc = Some(Proc::spawn("redis-server", command));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.command(&["PING"]).await.as_deref() != Some("+PONG") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Sends one command; returns the reply's first line (RESP), if any.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        text.lines().next().map(str::to_owned)
    }

    /// Sends a command whose reply is an integer (`XLEN`, `HLEN`, ...).
    pub async fn integer(&self, args: &[&str]) -> u64 {
        let reply = self.command(args).await;
        reply
            .as_deref()
            .and_then(|r| r.strip_prefix(':'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{args:?} answered {reply:?}, not an integer"))
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

/// A worker process.
pub struct WorkerProc {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl WorkerProc {
    /// Starts a worker on `addr` with these extra flags, and waits until it listens.
    pub async fn start(addr: SocketAddr, args: &[String]) -> WorkerProc {
        let mut command = Command::new(bin("worker"));
        command.arg("--listen").arg(addr.to_string()).args(args);
        let proc = Proc::spawn("worker", command);
        wait_listening(addr, "worker").await;
        WorkerProc { addr, proc }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A gateway process.
pub struct GatewayProc {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl GatewayProc {
    /// Starts a gateway on `addr`, and waits until `/healthz` reports
    /// `linked` workers.
    pub async fn start(addr: SocketAddr, args: &[String], linked: usize) -> GatewayProc {
        let mut command = Command::new(bin("gateway"));
        command.arg("--listen").arg(addr.to_string()).args(args);
        let proc = Proc::spawn("gateway", command);
        let gateway = GatewayProc { addr, proc };
        gateway.wait_linked(linked).await;
        gateway
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn linked(&self) -> Option<usize> {
        let (status, body) = super::http_get(self.addr, "/healthz").await?;
        if status != 200 {
            return Some(0);
        }
        body.lines()
            .find_map(|l| l.strip_prefix("linked workers: "))
            .and_then(|n| n.trim().parse().ok())
    }

    pub async fn wait_linked(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.linked().await == Some(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {} not linked to {n} workers within 20 s (now {:?})",
                self.addr,
                self.linked().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

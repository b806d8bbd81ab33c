//! The docker compose deployment, with real containers.
//!
//! Builds the images without a registry (`deploy/local-images.sh`: cached, so
//! only the first run pays for debootstrap), starts `docker-compose.yml` with
//! two gateways behind HAProxy, and chats through HAProxy's published port:
//! sockets must land on both gateways, and a message must reach every socket,
//! in one order. Then it switches `SHAREDCONN_MODE` to private the way a user
//! would (`up -d` again) and checks the same through the new gateways, against
//! the same worker; it recreates the worker container: the gateways link to
//! the new one, and the message log (ids) lives on in the named volume; and
//! last it scales down to one gateway with sockets open: those on the stopped
//! gateway close with 1001 through HAProxy, the others chat on.
//!
//! Needs docker and docker-compose (v1) and fails loudly without them. Every
//! wait is bounded, and the stack is torn down (`down -v`) even on failure;
//! on failure its logs are printed first.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Building the images: the first run may compile the release binaries and
/// debootstrap a Debian base on a busy machine.
const IMAGES_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// `up` starts (or recreates) containers; `down` stops them within their grace periods.
const COMPOSE_TIMEOUT: Duration = Duration::from_secs(180);
/// From `up` returning until HAProxy sees the gateways up and passes sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Any one expected WebSocket frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

const GATEWAYS: usize = 2;
/// Sockets per phase, spread over the gateways.
const SOCKETS: usize = 6;
/// Messages each socket sends per phase.
const ROUNDS: usize = 5;
/// The compose files, the second one swapping in the locally built HAProxy.
const COMPOSE_FILES: [&str; 2] = ["docker-compose.yml", "deploy/docker-compose.local.yml"];

#[test]
fn compose_stack_spreads_sockets_over_gateways_and_keeps_one_order() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    require_tool("docker", &["info", "--format", "{{.ServerVersion}}"]);
    require_tool("docker-compose", &["version", "--short"]);

    let started = Instant::now();
    run_ok(
        Command::new(root.join("deploy/local-images.sh")).current_dir(&root),
        IMAGES_TIMEOUT,
    );
    println!("images ready in {:.1?}", started.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = unique_token();
    // Dropped last, also when an assertion fails: `down -v`.
    let mut stack = Stack::new(&root, &format!("sharedconn-test-{token}"));

    let started = Instant::now();
    stack.up("shared", GATEWAYS);
    println!("compose up (shared) in {:.1?}", started.elapsed());
    stack.assert_gateways_run("mode=shared");
    let addr = stack.haproxy_addr();
    stack.assert_no_anonymous_volumes();
    let shared = runtime.block_on(chat_through(addr, "shared", &token));

    let started = Instant::now();
    stack.up("private", GATEWAYS);
    println!("compose up (private) in {:.1?}", started.elapsed());
    stack.assert_gateways_run("mode=private");
    // The published port may change when HAProxy is recreated.
    let addr = stack.haproxy_addr();
    let private = runtime.block_on(chat_through(addr, "private", &token));

    assert!(
        shared.gateways.is_disjoint(&private.gateways),
        "switching the mode must replace the gateways: {:?} then {:?}",
        shared.gateways,
        private.gateways
    );
    assert!(
        private.first_id > shared.last_id,
        "the worker's message ids must go on across the switch: \
         shared ended at {}, private began at {}",
        shared.last_id,
        private.first_id
    );

    // A new worker container on the same volume.
    let started = Instant::now();
    run_ok(
        stack.compose().args([
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--force-recreate",
            "worker",
        ]),
        COMPOSE_TIMEOUT,
    );
    println!("worker recreated in {:.1?}", started.elapsed());
    let again = runtime.block_on(chat_through(addr, "recreated", &token));
    assert_eq!(
        again.gateways, private.gateways,
        "only the worker was recreated"
    );
    assert!(
        again.first_id > private.last_id,
        "the message log must survive the worker's container (named volume): \
         ids restarted at {} after {}",
        again.first_id,
        private.last_id
    );

    // Scale down with sockets open on both gateways.
    let (clients, gateways) = runtime.block_on(open_spread(addr, "scaledown"));
    let started = Instant::now();
    stack.up("private", 1);
    println!("scaled down to 1 gateway in {:.1?}", started.elapsed());
    runtime.block_on(survive_scale_down(addr, clients, &gateways, &token));
}

/// After a gateway was scaled away: its sockets must have closed with 1001
/// "going away" (through HAProxy), the other gateway's stay open, and they,
/// with a new socket, still chat in one order.
async fn survive_scale_down(
    addr: SocketAddr,
    mut clients: Vec<Client>,
    gateways: &BTreeSet<String>,
    token: &str,
) {
    let codes = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|c| c.close_code_within(Duration::from_secs(2))),
    )
    .await;
    let mut gone = BTreeSet::new();
    let mut kept = Vec::new();
    for (c, code) in clients.into_iter().zip(codes) {
        match code {
            Some(code) => {
                assert_eq!(code, 1001, "{} closed with {code}, not 1001", c.wsid);
                gone.insert(c.gateway().to_owned());
            }
            None => kept.push(c),
        }
    }
    let stayed: BTreeSet<String> = kept.iter().map(|c| c.gateway().to_owned()).collect();
    assert!(
        gone.len() == 1 && stayed.len() == 1 && gone.is_disjoint(&stayed),
        "sockets of exactly one of {gateways:?} should have closed: closed on {gone:?}, \
         open on {stayed:?}"
    );
    let url = format!("ws://{addr}/ws");
    let deadline = Instant::now() + READY_TIMEOUT;
    let newcomer = loop {
        match Client::connect(&url).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no socket through HAProxy after the scale-down: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert!(
        stayed.contains(newcomer.gateway()),
        "a new socket landed on {}, not on the remaining gateway {stayed:?}",
        newcomer.wsid
    );
    kept.push(newcomer);
    one_order(&mut kept, "scaledown", token).await;
    close_all(&mut kept).await;
}

/// What one phase saw.
struct Phase {
    /// WebSocket ID prefixes: one per gateway.
    gateways: BTreeSet<String>,
    first_id: u64,
    last_id: u64,
}

/// Opens sockets through HAProxy until they sit on both gateways, then has
/// every socket send and checks that all of them saw every message once, in
/// one order.
async fn chat_through(addr: SocketAddr, label: &str, token: &str) -> Phase {
    let (mut clients, gateways) = open_spread(addr, label).await;
    let (first_id, last_id) = one_order(&mut clients, label, token).await;
    println!(
        "{label}: {} sockets on gateways {gateways:?}, messages in one order",
        clients.len()
    );
    close_all(&mut clients).await;
    Phase {
        gateways,
        first_id,
        last_id,
    }
}

/// Opens at least `SOCKETS` sockets through HAProxy, until they sit on all
/// `GATEWAYS` gateways; returns them and the gateways' tags.
async fn open_spread(addr: SocketAddr, label: &str) -> (Vec<Client>, BTreeSet<String>) {
    wait_for_haproxy(addr).await;
    let url = format!("ws://{addr}/ws");
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut clients: Vec<Client> = Vec::new();
    let mut gateways = BTreeSet::new();
    // HAProxy may still route to a gateway that is not linked yet (it answers
    // 503) or has not noticed a new one: keep the sockets that opened, retry.
    while clients.len() < SOCKETS || gateways.len() < GATEWAYS {
        assert!(
            Instant::now() < deadline && clients.len() < 4 * SOCKETS,
            "{label}: sockets did not spread over {GATEWAYS} gateways within {READY_TIMEOUT:?}: \
             {:?}",
            clients.iter().map(|c| &c.wsid).collect::<Vec<_>>()
        );
        match Client::connect(&url).await {
            Ok(client) => {
                gateways.insert(client.gateway().to_owned());
                clients.push(client);
            }
            Err(e) => {
                eprintln!("{label}: connect through HAProxy failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    assert_eq!(
        gateways.len(),
        GATEWAYS,
        "{label}: more gateways than replicas: {gateways:?}"
    );
    let wsids: HashSet<&str> = clients.iter().map(|c| c.wsid.as_str()).collect();
    assert_eq!(
        wsids.len(),
        clients.len(),
        "{label}: a WSID was issued twice"
    );
    (clients, gateways)
}

/// Every socket sets an alias and sends `ROUNDS` messages; all of them must
/// see every message exactly once, in one order, with increasing ids, each
/// under its sender's alias. Returns the first and last id.
async fn one_order(clients: &mut [Client], label: &str, token: &str) -> (u64, u64) {
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(json!({ "User": format!("{label}{i}") })).await;
    }
    // The token keeps this run's messages apart from any history the worker replays.
    let prefix = format!("{label}:{token}:");
    for round in 0..ROUNDS {
        for (i, c) in clients.iter_mut().enumerate() {
            let text = format!("{prefix}{i}:{round} ✓");
            c.send(json!({ "Message": STANDARD.encode(&text), "Author": "spoofed" }))
                .await;
        }
    }

    let total = clients.len() * ROUNDS;
    let mut orders = Vec::new();
    for c in clients.iter_mut() {
        let got = c.chats_with_prefix(&prefix, total).await;
        let ids: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{label}: ids not increasing on {}: {ids:?}",
            c.wsid
        );
        orders.push(got);
    }
    for (c, order) in clients.iter().zip(&orders).skip(1) {
        assert_eq!(
            order, &orders[0],
            "{label}: {} and {} saw different orders",
            c.wsid, clients[0].wsid
        );
    }
    // Every message exactly once; each sender's in the order it sent them,
    // under the alias the server holds.
    let texts: HashSet<&str> = orders[0].iter().map(|m| m.2.as_str()).collect();
    assert_eq!(texts.len(), total, "{label}: duplicates or losses");
    for i in 0..clients.len() {
        let mine: Vec<(&str, &str)> = orders[0]
            .iter()
            .filter(|m| m.2.starts_with(&format!("{prefix}{i}:")))
            .map(|m| (m.1.as_str(), m.2.as_str()))
            .collect();
        let sent: Vec<(String, String)> = (0..ROUNDS)
            .map(|r| (format!("{label}{i}"), format!("{prefix}{i}:{r} ✓")))
            .collect();
        let sent: Vec<(&str, &str)> = sent.iter().map(|(a, t)| (a.as_str(), t.as_str())).collect();
        assert_eq!(mine, sent, "{label}: socket {i}'s messages");
    }
    (orders[0][0].0, orders[0][total - 1].0)
}

/// Closes every socket politely (bounded: the peer may be gone).
async fn close_all(clients: &mut [Client]) {
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.ws.close(None)).await;
    }
}

/// Polls HAProxy's `/haproxy-health` until it reports every gateway up.
async fn wait_for_haproxy(addr: SocketAddr) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let want = format!("{GATEWAYS} gateways up");
    let mut last = None;
    while Instant::now() < deadline {
        last = http_get(addr, "/haproxy-health").await;
        if matches!(&last, Some((200, body)) if body.trim() == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "HAProxy at {addr} did not report {want:?} within {READY_TIMEOUT:?}; last answer {last:?}"
    );
}

/// A minimal HTTP/1.1 GET: (status, body), or None if the server is not there yet.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()?
}

/// A chat client over a real WebSocket.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// From the Status frame: `<gateway tag>-<n>`.
    wsid: String,
}

impl Client {
    /// Connects and reads the Status frame, which must come first.
    async fn connect(url: &str) -> Result<Client, String> {
        let (ws, _) = tokio::time::timeout(FRAME_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut client = Client {
            ws,
            wsid: String::new(),
        };
        let status = client.next().await;
        assert_eq!(
            status["Type"], "Status",
            "first frame must be Status: {status}"
        );
        client.wsid = status["WSID"].as_str().expect("WSID").to_owned();
        let (tag, n) = client.wsid.split_once('-').expect("WSID is <tag>-<n>");
        assert!(
            tag.len() == 8
                && tag.chars().all(|c| c.is_ascii_hexdigit())
                && n.parse::<u64>().is_ok(),
            "WSID {} is not <8 hex>-<n>",
            client.wsid
        );
        Ok(client)
    }

    /// The gateway this socket landed on: its tag, the WSID before the `-`.
    fn gateway(&self) -> &str {
        self.wsid.split_once('-').map_or("", |(tag, _)| tag)
    }

    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send failed");
    }

    /// The next text frame, parsed. Panics on timeout or close.
    async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(FRAME_TIMEOUT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {FRAME_TIMEOUT:?}", self.wsid))
                .unwrap_or_else(|| panic!("{}: socket ended", self.wsid))
                .unwrap_or_else(|e| panic!("{}: socket error: {e}", self.wsid));
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("frame is not JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("{}: unexpected frame {other:?}", self.wsid),
            }
        }
    }

    /// The close code if the socket ends within `idle` of its last frame
    /// (frames before it, user lists say, are skipped); None if it stays open.
    /// A socket that drops without a close frame fails the test.
    async fn close_code_within(&mut self, idle: Duration) -> Option<u16> {
        loop {
            match tokio::time::timeout(idle, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Some(frame.map_or(1005, |f| u16::from(f.code)));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("{}: dropped without a close frame: {e}", self.wsid),
                Ok(None) => panic!("{}: ended without a close frame", self.wsid),
            }
        }
    }

    /// The next `n` Chat frames whose text starts with `prefix`, as (ID,
    /// author, text); other frames (user lists, replayed history) are skipped.
    async fn chats_with_prefix(&mut self, prefix: &str, n: usize) -> Vec<(u64, String, String)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.next().await;
            if v["Type"] != "Chat" {
                continue;
            }
            let b64 = v["Message"].as_str().expect("Chat without Message");
            let text = String::from_utf8(STANDARD.decode(b64).expect("server sent bad base64"))
                .expect("server sent non-UTF-8 text");
            if text.starts_with(prefix) {
                out.push((
                    v["ID"].as_u64().expect("Chat without a numeric ID"),
                    v["Author"]
                        .as_str()
                        .expect("Chat without Author")
                        .to_owned(),
                    text,
                ));
            }
        }
        out
    }
}

/// One compose project, torn down with its volume when dropped.
struct Stack {
    root: PathBuf,
    project: String,
    mode: &'static str,
}

impl Stack {
    fn new(root: &Path, project: &str) -> Stack {
        Stack {
            root: root.to_owned(),
            project: project.to_owned(),
            mode: "shared",
        }
    }

    fn compose(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&self.root)
            // Docker picks the host port: no clash with a stack already on 8080.
            .env("SHAREDCONN_HTTP_PORT", "")
            .env("SHAREDCONN_MODE", self.mode)
            .args(["--ansi", "never", "-p", &self.project]);
        for file in COMPOSE_FILES {
            cmd.args(["-f", file]);
        }
        cmd
    }

    /// `up -d` in `mode` with `gateways` replicas; again later, it recreates
    /// or removes what changed, as a user switching modes or scaling would.
    fn up(&mut self, mode: &'static str, gateways: usize) {
        self.mode = mode;
        let scale = format!("gateway={gateways}");
        run_ok(
            self.compose()
                .args(["up", "-d", "--no-build", "--scale", &scale]),
            COMPOSE_TIMEOUT,
        );
    }

    /// HAProxy's published port on the host.
    fn haproxy_addr(&self) -> SocketAddr {
        let out = run_ok(
            self.compose().args(["port", "haproxy", "8080"]),
            COMPOSE_TIMEOUT,
        );
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("`docker-compose port` said {out:?}: {e}"))
    }

    /// Every volume mounted is the named one (`<project>_worker-data`): a
    /// `VOLUME` in the image would leave an anonymous volume behind per
    /// container, which `down -v` does not always find.
    fn assert_no_anonymous_volumes(&self) {
        let ids = run_ok(self.compose().args(["ps", "-q"]), COMPOSE_TIMEOUT);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        assert!(!ids.is_empty(), "no containers in project {}", self.project);
        let mut cmd = Command::new("docker");
        cmd.args([
            "inspect",
            "--format",
            "{{.Name}}{{range .Mounts}} {{.Type}}:{{.Name}}{{end}}",
        ])
        .args(&ids);
        for line in run_ok(&mut cmd, COMPOSE_TIMEOUT).lines() {
            for mount in line.split_whitespace().skip(1) {
                assert!(
                    !mount.starts_with("volume:") || mount.ends_with("_worker-data"),
                    "unexpected volume in {line}"
                );
            }
        }
    }

    /// Every running gateway logged its start with `needle` (e.g. its mode).
    fn assert_gateways_run(&self, needle: &str) {
        let logs = run_ok(
            self.compose().args(["logs", "--no-color", "gateway"]),
            COMPOSE_TIMEOUT,
        );
        let starts: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("gateway listening"))
            .collect();
        assert!(
            !starts.is_empty() && starts.iter().all(|l| l.contains(needle)),
            "every gateway should log {needle:?} when it starts: {starts:#?}"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let (_, logs, err) = run(
                self.compose()
                    .args(["logs", "--no-color", "--timestamps", "--tail", "150"]),
                COMPOSE_TIMEOUT,
            );
            eprintln!(
                "---- logs of compose project {} ----\n{logs}{err}",
                self.project
            );
        }
        let (ok, out, err) = run(
            self.compose()
                .args(["down", "-v", "--remove-orphans", "--timeout", "20"]),
            COMPOSE_TIMEOUT,
        );
        if !ok {
            eprintln!(
                "docker-compose down failed; remove project {} by hand:\n{out}{err}",
                self.project
            );
        }
    }
}

/// A compose project name of its own per run: lowercase letters, digits, `-`.
fn unique_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{nanos:x}", std::process::id())
}

/// Panics with a clear message unless `tool args` runs and succeeds.
fn require_tool(tool: &str, args: &[&str]) {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    let (ok, out, err) = run(&mut cmd, Duration::from_secs(60));
    assert!(
        ok,
        "this test needs `{tool}` working (docker engine running, docker-compose v1 on PATH, \
         e.g. `apt-get install docker.io docker-compose`); `{tool} {}` gave:\n{out}{err}",
        args.join(" ")
    );
}

/// Runs `cmd` and panics with its output unless it succeeds within `limit`;
/// returns its stdout.
fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let describe = format!("{cmd:?}");
    let started = Instant::now();
    let (ok, out, err) = run(cmd, limit);
    assert!(
        ok,
        "{describe} failed after {:.1?}:\n{out}{err}",
        started.elapsed()
    );
    out
}

/// Runs `cmd` to its end, at most `limit` (then kills its process group):
/// (success, stdout, stderr).
fn run(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills the children too (cargo, docker build).
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return (false, String::new(), format!("cannot run {cmd:?}: {e}")),
    };
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
        let _ = child.wait();
        return (
            false,
            String::new(),
            format!("{cmd:?} did not finish within {limit:?}"),
        );
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    (status.success(), out, err)
}

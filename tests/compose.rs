//! The docker compose deployment, with real containers.
//!
//! Builds the images without a registry (`deploy/local-images.sh`: cached, so
//! only the first run pays for debootstrap), the runtime image from the
//! gateway and worker this test run was built with (no second, release
//! build) and under a tag of its own, `sharedconn:test`, so a user's
//! `sharedconn:latest` is left as it is; starts `docker-compose.yml` with
//! two gateways behind HAProxy and two workers sharing one chat through Redis,
//! and chats through HAProxy's published port:
//!
//! 1. sockets land on both gateways, every gateway links both workers, and a
//!    message reaches every socket once, in one order;
//! 2. with sockets posting, one worker is stopped (`docker stop`: it drains)
//!    and, once it is back, the other is killed (`docker kill`: SIGKILL): no
//!    socket closes, every message reaches every socket exactly once, in one
//!    order, under the alias its sender set before;
//! 3. `SHAREDCONN_MODE=private` and `up` again, the way a user switches:
//!    new gateways, the same checks, the ids going on;
//! 4. Redis's container is recreated: the ids still go on (AOF on the named
//!    volume) and the log keeps its name;
//! 5. scaled down to one gateway with sockets open: those on the stopped
//!    gateway close with 1001 through HAProxy, the others chat on.
//!
//! Needs docker and docker-compose (v1) and fails loudly without them. Every
//! wait is bounded, and the stack is torn down (`down -v`) even on failure;
//! on failure its logs are printed first.

use std::collections::{BTreeSet, HashSet, VecDeque};
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

mod support;

/// Building the images: the first run may debootstrap a Debian base on a
/// busy machine.
const IMAGES_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// `up` starts (or recreates) containers; `down` stops them within their grace periods.
const COMPOSE_TIMEOUT: Duration = Duration::from_secs(180);
/// From `up` returning until HAProxy sees the gateways up and passes sockets.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Any one expected WebSocket frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

const GATEWAYS: usize = 2;
const WORKERS: usize = 2;
/// Sockets per phase, spread over the gateways.
const SOCKETS: usize = 6;
/// Messages each socket sends per phase.
const ROUNDS: usize = 5;
/// While a worker stops or dies: rounds (one message per socket) sent before
/// the stop or kill and after it is over, and the pause between rounds.
const FAILOVER_ROUNDS: usize = 10;
const FAILOVER_PAUSE: Duration = Duration::from_millis(50);
/// The compose files, the second one swapping in the locally built HAProxy and Redis.
const COMPOSE_FILES: [&str; 2] = ["docker-compose.yml", "deploy/docker-compose.local.yml"];
/// The gateway/worker image the test builds and runs (`SHAREDCONN_IMAGE`).
const IMAGE: &str = "sharedconn:test";

#[test]
fn compose_stack_scales_both_tiers_and_survives_losing_a_worker() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    require_tool("docker", &["info", "--format", "{{.ServerVersion}}"]);
    require_tool("docker-compose", &["version", "--short"]);

    let started = Instant::now();
    let bins = support::procs::bin("gateway");
    let bins = bins.parent().expect("binary directory");
    run_ok(
        Command::new(root.join("deploy/local-images.sh"))
            .current_dir(&root)
            .env("SHAREDCONN_IMAGE", IMAGE)
            .env("SHAREDCONN_BIN_DIR", bins),
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
    let workers = stack.container_ids("worker");
    assert_eq!(workers.len(), WORKERS, "worker replicas: {workers:?}");
    for worker in &workers {
        stack.wait_linked(worker, None);
    }
    let addr = stack.haproxy_addr();
    stack.assert_volumes();
    // The gateways' /metrics is for Prometheus on the compose network, not
    // for the public port.
    let metrics = runtime
        .block_on(http_get(addr, "/metrics"))
        .map(|(status, _)| status);
    assert_eq!(metrics, Some(403), "/metrics through HAProxy");
    let shared = runtime.block_on(chat_through(addr, "shared", &token));

    let started = Instant::now();
    let failover = runtime.block_on(survive_worker_loss(addr, &stack, &workers, &token));
    println!("worker stop and kill survived in {:.1?}", started.elapsed());
    assert!(
        failover.first_id > shared.last_id,
        "ids must go on: {} after {}",
        failover.first_id,
        shared.last_id
    );

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
        private.first_id > failover.last_id,
        "the message ids must go on across the switch: \
         the failover ended at {}, private began at {}",
        failover.last_id,
        private.first_id
    );

    // A new Redis container on the same volume.
    let started = Instant::now();
    run_ok(
        stack.compose().args([
            "up",
            "-d",
            "--no-build",
            "--no-deps",
            "--force-recreate",
            "redis",
        ]),
        COMPOSE_TIMEOUT,
    );
    println!("redis recreated in {:.1?}", started.elapsed());
    let started = Instant::now();
    runtime.block_on(wait_for_posts(addr, &token));
    println!(
        "posts stored again {:.1?} after Redis came back",
        started.elapsed()
    );
    let again = runtime.block_on(chat_through(addr, "redis-recreated", &token));
    assert_eq!(again.gateways, private.gateways, "only Redis was recreated");
    assert!(
        again.first_id > private.last_id,
        "the message log must survive Redis's container (AOF, named volume): \
         ids restarted at {} after {}",
        again.first_id,
        private.last_id
    );
    assert_eq!(
        again.log, private.log,
        "the log's name (Status.Log) changed: Redis lost its data"
    );

    // Scale down with sockets open on both gateways.
    let (clients, gateways) = runtime.block_on(open_spread(addr, "scaledown"));
    let started = Instant::now();
    stack.up("private", 1);
    println!("scaled down to 1 gateway in {:.1?}", started.elapsed());
    runtime.block_on(survive_scale_down(addr, clients, &gateways, &token));
}

/// Sockets on both gateways post without pause while one worker is stopped
/// (SIGTERM: it drains, asking the gateways to move its sockets) and, once
/// it is back, the other is killed (SIGKILL: the gateways find the link cut).
/// No socket may close; every message must reach every socket exactly once,
/// in one order, under the alias set before; and the gateways must have
/// moved sockets both times (else the test proved nothing).
async fn survive_worker_loss(
    addr: SocketAddr,
    stack: &Stack,
    workers: &[String],
    token: &str,
) -> Phase {
    let label = "failover";
    let (mut clients, gateways) = open_spread(addr, label).await;
    let aliases: Vec<String> = (0..clients.len()).map(|i| format!("{label}{i}")).collect();
    for (c, alias) in clients.iter_mut().zip(&aliases) {
        c.send(json!({ "User": alias })).await;
    }
    let prefix = format!("{label}:{token}:");
    let mut round = 0;

    // Stop one worker while traffic flows; bring it back.
    let moved = stack.reattached_sockets();
    let (stopped, survivor) = (&workers[0], &workers[1]);
    let stop = {
        let mut cmd = Command::new("docker");
        cmd.args(["stop", "--time", "20", stopped]);
        std::thread::spawn(move || run_ok(&mut cmd, COMPOSE_TIMEOUT))
    };
    let started = Instant::now();
    send_rounds(
        &mut clients,
        &prefix,
        &mut round,
        FAILOVER_ROUNDS,
        Some(&stop),
    )
    .await;
    stop.join().expect("docker stop panicked");
    println!(
        "{label}: worker {} stopped within {:.1?} of traffic",
        short(stopped),
        started.elapsed()
    );
    send_rounds(&mut clients, &prefix, &mut round, FAILOVER_ROUNDS, None).await;
    let after_stop = stack.reattached_sockets();
    assert!(
        after_stop > moved,
        "{label}: no socket was moved off the stopped worker (re-attached before: {moved}, \
         after: {after_stop}): were the sockets spread over the workers?"
    );
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    run_ok(
        Command::new("docker").args(["start", stopped]),
        COMPOSE_TIMEOUT,
    );
    stack.wait_linked(stopped, Some(since));
    println!("{label}: worker {} back and linked", short(stopped));

    // Kill the other one while traffic flows.
    send_rounds(&mut clients, &prefix, &mut round, FAILOVER_ROUNDS, None).await;
    run_ok(
        Command::new("docker").args(["kill", survivor]),
        COMPOSE_TIMEOUT,
    );
    send_rounds(&mut clients, &prefix, &mut round, FAILOVER_ROUNDS, None).await;
    let total = clients.len() * round;
    let (first_id, last_id) = same_order(&mut clients, &aliases, &prefix, round, label).await;
    let after_kill = stack.reattached_sockets();
    assert!(
        after_kill > after_stop,
        "{label}: no socket was moved off the killed worker (re-attached before: \
         {after_stop}, after: {after_kill})"
    );
    // Aliases unchanged: every socket is still listed under its own.
    let want: Vec<String> = {
        let mut a = aliases.clone();
        a.sort();
        a
    };
    for c in clients.iter_mut() {
        c.userlist_until(&want).await;
    }
    println!(
        "{label}: {} sockets on gateways {gateways:?}, {total} messages (ids {first_id}..={last_id}) \
         through a stop and a kill: none closed, none lost or doubled, one order; \
         {} + {} sockets moved",
        clients.len(),
        after_stop - moved,
        after_kill - after_stop
    );
    close_all(&mut clients).await;
    // The killed worker (restarted by docker or not) must not be needed any more.
    Phase {
        gateways,
        first_id,
        last_id,
        log: clients[0].log.clone(),
    }
}

/// `n` rounds, each socket posting once per round with a pause between
/// rounds, reading what has arrived meanwhile (so no queue fills). With
/// `until`, goes on past `n` rounds until that thread has finished.
async fn send_rounds(
    clients: &mut [Client],
    prefix: &str,
    round: &mut usize,
    n: usize,
    until: Option<&std::thread::JoinHandle<String>>,
) {
    let deadline = Instant::now() + COMPOSE_TIMEOUT;
    let mut sent = 0;
    while sent < n || until.is_some_and(|t| !t.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "traffic ran past {COMPOSE_TIMEOUT:?}"
        );
        for (i, c) in clients.iter_mut().enumerate() {
            let text = format!("{prefix}{i}:{round} ✓");
            c.send(json!({ "Message": STANDARD.encode(&text), "Author": "spoofed" }))
                .await;
        }
        *round += 1;
        sent += 1;
        tokio::time::sleep(FAILOVER_PAUSE).await;
        for c in clients.iter_mut() {
            c.read_ready().await;
        }
    }
}

/// Every socket must see the `rounds` messages of every socket exactly once
/// and in the same order, with increasing ids, each under its sender's
/// alias, in the order its sender sent them. Returns the first and last id.
async fn same_order(
    clients: &mut [Client],
    aliases: &[String],
    prefix: &str,
    rounds: usize,
    label: &str,
) -> (u64, u64) {
    let total = clients.len() * rounds;
    let mut orders = Vec::new();
    for c in clients.iter_mut() {
        let got = c.chats_with_prefix(prefix, total).await;
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
    // Nothing more with this prefix: a message twice would show here.
    for c in clients.iter_mut() {
        c.read_ready().await;
        c.assert_no_more_chats(prefix);
    }
    let texts: HashSet<&str> = orders[0].iter().map(|m| m.2.as_str()).collect();
    assert_eq!(texts.len(), total, "{label}: duplicates or losses");
    for (i, alias) in aliases.iter().enumerate() {
        let mine: Vec<(&str, &str)> = orders[0]
            .iter()
            .filter(|m| m.2.starts_with(&format!("{prefix}{i}:")))
            .map(|m| (m.1.as_str(), m.2.as_str()))
            .collect();
        let sent: Vec<String> = (0..rounds).map(|r| format!("{prefix}{i}:{r} ✓")).collect();
        let sent: Vec<(&str, &str)> = sent.iter().map(|t| (alias.as_str(), t.as_str())).collect();
        assert_eq!(mine, sent, "{label}: socket {i}'s messages");
    }
    (orders[0][0].0, orders[0][total - 1].0)
}

/// Until the workers store posts again after Redis restarted: posts one
/// probe message after another until one comes back as a Chat. The workers
/// refuse a post they cannot store with an Error frame (`log_unavailable`:
/// the page sends it again); that is the only refusal allowed meanwhile.
async fn wait_for_posts(addr: SocketAddr, token: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut probe = Client::connect(&format!("ws://{addr}/ws"))
        .await
        .expect("no socket through HAProxy after Redis restarted");
    let mut refused = 0;
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "posts were still refused {READY_TIMEOUT:?} after Redis restarted ({refused} refusals)"
        );
        let text = format!("probe:{token}:{attempt}");
        probe
            .send(json!({ "Message": STANDARD.encode(&text), "Author": "probe" }))
            .await;
        loop {
            let v = probe.next().await;
            if v["Type"] == "Error" {
                assert!(
                    matches!(v["Code"].as_str(), Some("log_unavailable" | "not_stored")),
                    "unexpected answer to a post: {v}"
                );
                refused += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
            let echoed = v["Type"] == "Chat"
                && STANDARD
                    .decode(v["Message"].as_str().unwrap_or_default())
                    .ok()
                    == Some(text.clone().into_bytes());
            if echoed {
                if refused > 0 {
                    println!(
                        "redis-recreated: {refused} probe posts refused (log unavailable) first"
                    );
                }
                close_all(std::slice::from_mut(&mut probe)).await;
                return;
            }
        }
    }
}

/// A container id, shortened for messages.
fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
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
    /// The log's name, from the Status frames (`Log`).
    log: String,
}

/// Opens sockets through HAProxy until they sit on both gateways, then has
/// every socket send and checks that all of them saw every message once, in
/// one order.
async fn chat_through(addr: SocketAddr, label: &str, token: &str) -> Phase {
    let (mut clients, gateways) = open_spread(addr, label).await;
    let (first_id, last_id) = one_order(&mut clients, label, token).await;
    println!(
        "{label}: {} sockets on gateways {gateways:?}, messages {first_id}..={last_id} in one order",
        clients.len()
    );
    close_all(&mut clients).await;
    let logs: BTreeSet<&str> = clients.iter().map(|c| c.log.as_str()).collect();
    assert_eq!(
        logs.len(),
        1,
        "{label}: sockets saw different logs: {logs:?}"
    );
    Phase {
        gateways,
        first_id,
        last_id,
        log: clients[0].log.clone(),
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
    let aliases: Vec<String> = (0..clients.len()).map(|i| format!("{label}{i}")).collect();
    for (c, alias) in clients.iter_mut().zip(&aliases) {
        c.send(json!({ "User": alias })).await;
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
    same_order(clients, &aliases, &prefix, ROUNDS, label).await
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
    /// From the Status frame: the message log's name.
    log: String,
    /// Frames read ahead by [`Client::read_ready`], not yet taken.
    buffered: VecDeque<Value>,
    /// The last online list received, sorted.
    users: Vec<String>,
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
            log: String::new(),
            buffered: VecDeque::new(),
            users: Vec::new(),
        };
        let status = client.next().await;
        assert_eq!(
            status["Type"], "Status",
            "first frame must be Status: {status}"
        );
        client.wsid = status["WSID"].as_str().expect("WSID").to_owned();
        client.log = status["Log"].as_str().expect("Log").to_owned();
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
        if let Some(v) = self.buffered.pop_front() {
            return v;
        }
        self.read(FRAME_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("{}: no frame within {FRAME_TIMEOUT:?}", self.wsid))
    }

    /// A text frame off the socket, parsed, or None if none came within
    /// `limit`. Panics if the socket closes, fails or sends something else.
    async fn read(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Cancel-safe: a frame half read stays in the stream's buffer.
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?
                .unwrap_or_else(|| panic!("{}: socket ended", self.wsid))
                .unwrap_or_else(|e| panic!("{}: socket error: {e}", self.wsid));
            let v: Value = match msg {
                Message::Text(t) => serde_json::from_str(&t).expect("frame is not JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("{}: unexpected frame {other:?}", self.wsid),
            };
            if v["Type"] == "userlist" {
                let mut users: Vec<String> = v["Users"]
                    .as_array()
                    .expect("userlist without Users")
                    .iter()
                    .map(|u| u["User"].as_str().expect("user without User").to_owned())
                    .collect();
                users.sort();
                self.users = users;
            }
            return Some(v);
        }
    }

    /// Reads what has arrived so far into the buffer, so that the server's
    /// queue for this socket never fills while the test is busy sending.
    async fn read_ready(&mut self) {
        while let Some(v) = self.read(Duration::from_millis(1)).await {
            self.buffered.push_back(v);
        }
    }

    /// No Chat frame with `prefix` is left in the buffer.
    fn assert_no_more_chats(&self, prefix: &str) {
        for v in &self.buffered {
            if v["Type"] == "Chat" {
                let text = STANDARD
                    .decode(v["Message"].as_str().unwrap_or_default())
                    .unwrap_or_default();
                assert!(
                    !text.starts_with(prefix.as_bytes()),
                    "{}: a message came twice: {v}",
                    self.wsid
                );
            }
        }
    }

    /// Reads until the last online list received is `want` (sorted).
    async fn userlist_until(&mut self, want: &[String]) {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        while self.users != want {
            assert!(
                Instant::now() < deadline,
                "{}: online list is {:?}, not {want:?}",
                self.wsid,
                self.users
            );
            self.next().await;
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
            .env("SHAREDCONN_IMAGE", IMAGE)
            .args(["--ansi", "never", "-p", &self.project]);
        // The compose files are given here: a COMPOSE_FILE or profile in the
        // caller's environment must not change the stack under test.
        cmd.env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROFILES");
        for file in COMPOSE_FILES {
            cmd.args(["-f", file]);
        }
        cmd
    }

    /// `up -d` in `mode` with `gateways` replicas and `WORKERS` workers;
    /// again later, it recreates or removes what changed, as a user
    /// switching modes or scaling would.
    fn up(&mut self, mode: &'static str, gateways: usize) {
        self.mode = mode;
        let gateways = format!("gateway={gateways}");
        let workers = format!("worker={WORKERS}");
        run_ok(
            self.compose().args([
                "up",
                "--detach",
                "--no-build",
                "--scale",
                &gateways,
                "--scale",
                &workers,
            ]),
            COMPOSE_TIMEOUT,
        );
    }

    /// The ids of `service`'s containers, running or not.
    fn container_ids(&self, service: &str) -> Vec<String> {
        let out = run_ok(self.compose().args(["ps", "-q", service]), COMPOSE_TIMEOUT);
        out.split_whitespace().map(str::to_owned).collect()
    }

    /// A running container's address on the compose network.
    fn ip(&self, container: &str) -> String {
        let out = run_ok(
            Command::new("docker").args([
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ]),
            COMPOSE_TIMEOUT,
        );
        let ip = out.trim().to_owned();
        assert!(
            !ip.is_empty(),
            "container {} has no address",
            short(container)
        );
        ip
    }

    /// Waits until every gateway has logged a link to `worker` (at its
    /// current address), since `since` (seconds since the epoch) if given.
    fn wait_linked(&self, worker: &str, since: Option<f64>) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let gateways = self.container_ids("gateway");
        let needle = format!("worker={}:50051", self.ip(worker));
        loop {
            let linked: Vec<bool> = gateways
                .iter()
                .map(|g| {
                    let mut cmd = Command::new("docker");
                    cmd.arg("logs");
                    if let Some(t) = since {
                        cmd.args(["--since", &format!("{t:.3}")]);
                    }
                    let (_, out, err) = run(cmd.arg(g), COMPOSE_TIMEOUT);
                    format!("{out}{err}")
                        .lines()
                        .any(|l| l.contains("worker linked") && l.contains(&needle))
                })
                .collect();
            if linked.iter().all(|&l| l) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every gateway linked worker {} ({needle}) within {READY_TIMEOUT:?}: {linked:?}",
                short(worker)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sockets the gateways have re-attached to another worker so far, from
    /// their `sockets re-attached sockets=N` log lines.
    fn reattached_sockets(&self) -> usize {
        self.gateway_logs()
            .lines()
            .filter(|l| l.contains("sockets re-attached"))
            .filter_map(|l| {
                let rest = &l[l.find(" sockets=")? + " sockets=".len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<usize>().ok()
            })
            .sum()
    }

    fn gateway_logs(&self) -> String {
        run_ok(
            self.compose().args(["logs", "--no-color", "gateway"]),
            COMPOSE_TIMEOUT,
        )
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

    /// The only volume mounted is Redis's named one (`<project>_redis-data`):
    /// workers keep nothing of their own (they scale), and a `VOLUME` in an
    /// image would leave an anonymous volume behind per container, which
    /// `down -v` does not always find.
    fn assert_volumes(&self) {
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
        let mut redis_data = 0;
        for line in run_ok(&mut cmd, COMPOSE_TIMEOUT).lines() {
            for mount in line.split_whitespace().skip(1) {
                assert!(
                    !mount.starts_with("volume:")
                        || (mount.ends_with("_redis-data") && line.contains("_redis_")),
                    "unexpected volume in {line}"
                );
                redis_data += usize::from(mount.ends_with("_redis-data"));
            }
        }
        assert_eq!(
            redis_data, 1,
            "Redis must keep its data in the named volume"
        );
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

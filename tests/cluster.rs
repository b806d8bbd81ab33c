//! The cluster under failure, with real processes: `redis-server`, `worker`
//! and `gateway` binaries on loopback, killed with real signals (SIGKILL,
//! SIGSTOP, SIGTERM) while clients chat through real WebSockets.
//!
//! What every scenario checks, from the clients' side: no socket closes,
//! every client sees every message with the same gapless ids in the same
//! order, each post is stored exactly once, aliases stay, and the online
//! list does not flap.

#[macro_use]
mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::procs::{GatewayProc, Redis, WorkerProc, bin, free_port};
use support::{Client, Mode};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a scenario may wait for the clients to agree.
const SETTLE: Duration = Duration::from_secs(20);

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Flags giving a worker its own data directory.
fn data_dir(dir: &tempfile::TempDir) -> Vec<String> {
    vec![
        "--data-dir".to_owned(),
        dir.path().to_str().unwrap().to_owned(),
    ]
}

fn mode_flag(mode: Mode) -> String {
    mode.to_string()
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    chats: Vec<(u64, String, String)>,
    lists: Vec<Vec<String>>,
    statuses: Vec<Value>,
    errors: Vec<Value>,
    ended: Option<String>,
}

/// A chat client whose frames a task records, and whose posts the test sends.
struct Peer {
    name: String,
    wsid: String,
    sink: SplitSink<Ws, Message>,
    seen: Arc<Mutex<Seen>>,
    reader: JoinHandle<()>,
}

impl Peer {
    async fn join(url: &str, name: &str) -> Peer {
        let client = Client::connect(url).await;
        let wsid = client.wsid.clone();
        let (mut sink, stream) = client.ws.split();
        sink.send(Message::Text(json!({ "User": name }).to_string().into()))
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reader = tokio::spawn(read(stream, seen.clone()));
        Peer {
            name: name.to_owned(),
            wsid,
            sink,
            seen,
            reader,
        }
    }

    async fn say(&mut self, text: &str) {
        let frame = json!({ "Message": support::b64(text), "Author": self.name });
        let _ = self
            .sink
            .send(Message::Text(frame.to_string().into()))
            .await;
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    fn last_list(&self) -> Option<Vec<String>> {
        self.seen(|s| s.lists.last().cloned())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read(mut stream: SplitStream<Ws>, seen: Arc<Mutex<Seen>>) {
    loop {
        let ended = match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("frame is not JSON");
                let mut s = seen.lock().unwrap();
                match v["Type"].as_str() {
                    Some("Chat") => s.chats.push((
                        v["ID"].as_u64().expect("ID"),
                        v["Author"].as_str().unwrap().to_owned(),
                        support::unb64(v["Message"].as_str().unwrap()),
                    )),
                    Some("userlist") => s.lists.push(support::userlist_names(&v)),
                    Some("Status") => s.statuses.push(v),
                    _ => s.errors.push(v),
                }
                continue;
            }
            Some(Ok(Message::Close(frame))) => format!("closed {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => format!("error {e}"),
            None => "dropped".to_owned(),
        };
        seen.lock().unwrap().ended = Some(ended);
        return;
    }
}

/// Waits until every peer's online list is exactly `names` (in some order
/// that is the same for all).
async fn wait_lists(peers: &[Peer], names: &BTreeSet<String>) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let lists: Vec<_> = peers.iter().map(|p| p.last_list()).collect();
        let first = lists[0].clone();
        let agreed = lists.iter().all(|l| *l == first)
            && first.as_ref().is_some_and(|l| {
                l.iter().cloned().collect::<BTreeSet<_>>() == *names && l.len() == names.len()
            });
        if agreed {
            return first.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "online lists never agreed: {lists:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts from every peer in turn, `rounds` times, `gap` apart; returns
/// the texts sent.
async fn chat(peers: &mut [Peer], rounds: usize, gap: Duration, tag: &str) -> Vec<String> {
    let mut sent = Vec::new();
    for round in 0..rounds {
        for p in peers.iter_mut() {
            let text = format!("{}:{tag}:{round}", p.name);
            p.say(&text).await;
            sent.push(text);
        }
        tokio::time::sleep(gap).await;
    }
    sent
}

/// Waits until every peer has seen `total` messages, then checks the
/// contract: nobody's socket ended, the same gapless ids in the same order
/// for all, every sent text stored exactly once, under its sender's alias.
async fn check_everyone_saw(peers: &[Peer], sent: &[String]) -> Vec<(u64, String, String)> {
    let total = sent.len();
    let deadline = Instant::now() + SETTLE;
    loop {
        let counts: Vec<usize> = peers.iter().map(|p| p.seen(|s| s.chats.len())).collect();
        for p in peers {
            if let Some(ended) = p.seen(|s| s.ended.clone()) {
                panic!("{}'s socket ended: {ended}", p.name);
            }
        }
        if counts.iter().all(|c| *c >= total) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every message arrived: counts {counts:?} of {total}; errors {:?}",
            peers
                .iter()
                .map(|p| p.seen(|s| s.errors.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = peers[0].seen(|s| s.chats.clone());
    for p in peers {
        let chats = p.seen(|s| s.chats.clone());
        assert_eq!(chats, first, "{} saw another order", p.name);
        assert!(
            p.seen(|s| s.errors.is_empty()),
            "{} got errors: {:?}",
            p.name,
            p.seen(|s| s.errors.clone())
        );
    }
    let ids: Vec<u64> = first.iter().map(|c| c.0).collect();
    let expected: Vec<u64> = (ids[0]..ids[0] + ids.len() as u64).collect();
    assert_eq!(ids, expected, "ids are gapless and increasing");
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for (_, author, text) in &first {
        *stored.entry(text.as_str()).or_default() += 1;
        assert!(
            text.starts_with(&format!("{author}:")),
            "{text} stored as {author}"
        );
    }
    for text in sent {
        assert_eq!(stored.get(text.as_str()), Some(&1), "{text} stored once");
    }
    assert_eq!(first.len(), total, "nothing else was stored");
    first
}

/// Asserts that no online list seen since `from` lacked any of `names`.
fn assert_no_flap(peers: &[Peer], from: &[usize], names: &BTreeSet<String>) {
    for (p, &start) in peers.iter().zip(from) {
        p.seen(|s| {
            for list in &s.lists[start..] {
                let have: BTreeSet<String> = list.iter().cloned().collect();
                assert!(
                    have.is_superset(names),
                    "{}'s list flapped: {list:?}",
                    p.name
                );
            }
        });
    }
}

struct Stack {
    redis: Option<Redis>,
    _data: tempfile::TempDir,
    workers: Vec<WorkerProc>,
    worker_args: Vec<String>,
    gateways: Vec<GatewayProc>,
}

impl Stack {
    /// `workers` workers on Redis (or one embedded), `gateways` gateways
    /// linked to all of them.
    async fn start(mode: Mode, redis: bool, workers: usize, gateways: usize) -> Stack {
        Stack::start_with(mode, redis, workers, gateways, &[]).await
    }

    /// The same, with `extra` arguments for every worker.
    async fn start_with(
        mode: Mode,
        redis: bool,
        workers: usize,
        gateways: usize,
        extra: &[&str],
    ) -> Stack {
        let redis = if redis {
            Some(Redis::start().await)
        } else {
            None
        };
        let data = tempfile::tempdir().unwrap();
        let mut worker_args = vec!["--presence-lease-secs".to_owned(), "3".to_owned()];
        match &redis {
            Some(r) => worker_args.extend(["--backplane".to_owned(), r.url()]),
            None => worker_args.extend(data_dir(&data)),
        }
        worker_args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut stack = Stack {
            redis,
            _data: data,
            workers: Vec::new(),
            worker_args,
            gateways: Vec::new(),
        };
        for _ in 0..workers {
            let w = WorkerProc::start(addr(), &stack.worker_args).await;
            stack.workers.push(w);
        }
        let urls: Vec<String> = stack.workers.iter().map(|w| w.url()).collect();
        for _ in 0..gateways {
            let args = vec![
                "--worker".to_owned(),
                urls.join(","),
                "--mode".to_owned(),
                mode_flag(mode),
                "--link-timeout-ms".to_owned(),
                "1000".to_owned(),
            ];
            let g = GatewayProc::start(addr(), &args, workers).await;
            stack.gateways.push(g);
        }
        stack
    }

    /// Starts worker `i` again on its old address.
    async fn restart_worker(&mut self, i: usize) {
        let addr = self.workers[i].addr;
        self.workers[i] = WorkerProc::start(addr, &self.worker_args).await;
    }

    async fn wait_all_linked(&self) {
        for g in &self.gateways {
            g.wait_linked(self.workers.len()).await;
        }
    }

    /// `per_gateway` peers on every gateway, named `g{i}c{j}`, with their
    /// aliases in every list.
    async fn peers(&self, per_gateway: usize) -> (Vec<Peer>, BTreeSet<String>) {
        let mut peers = Vec::new();
        for (i, g) in self.gateways.iter().enumerate() {
            for j in 0..per_gateway {
                peers.push(Peer::join(&g.ws_url(), &format!("g{i}c{j}")).await);
            }
        }
        let names: BTreeSet<String> = peers.iter().map(|p| p.name.clone()).collect();
        wait_lists(&peers, &names).await;
        (peers, names)
    }
}

fn list_marks(peers: &[Peer]) -> Vec<usize> {
    peers.iter().map(|p| p.seen(|s| s.lists.len())).collect()
}

both_modes!(
    two_gateways_two_workers_one_order,
    a_worker_killed_mid_traffic_closes_no_socket,
    a_rolling_restart_of_every_worker_closes_nothing,
    an_embedded_worker_killed_and_restarted_closes_no_socket,
    an_only_worker_stopped_and_started_again_closes_no_socket,
    a_socket_sent_no_message_yet_misses_none_when_its_worker_hangs,
);

/// Posts through both gateways and both workers: one order for everyone,
/// and one online list (the union, oldest socket first).
async fn two_gateways_two_workers_one_order(mode: Mode) {
    let stack = Stack::start(mode, true, 2, 2).await;
    let (mut peers, names) = stack.peers(3).await;
    let sent = chat(&mut peers, 10, Duration::from_millis(10), "a").await;
    check_everyone_saw(&peers, &sent).await;
    let list = wait_lists(&peers, &names).await;
    assert_eq!(
        list,
        ["g0c0", "g0c1", "g0c2", "g1c0", "g1c1", "g1c2"],
        "oldest socket first"
    );
}

/// A socket whose worker hung before sending it any chat message has a
/// place in the log all the same (where it started): re-attached, it is
/// owed every message since, not the few most recent a new socket is shown.
async fn a_socket_sent_no_message_yet_misses_none_when_its_worker_hangs(mode: Mode) {
    // One message of history on open: a re-attach that replayed only "the
    // most recent ones" would lose the rest.
    let stack = Stack::start_with(mode, true, 2, 1, &["--history", "1"]).await;
    let gateway = &stack.gateways[0];
    // Worker 1 hangs while the quiet peer joins, so it lands on worker 0.
    stack.workers[1].proc.stop();
    gateway.wait_linked(1).await;
    let quiet = Peer::join(&gateway.ws_url(), "quiet").await;
    stack.workers[1].proc.cont();
    gateway.wait_linked(2).await;
    // The poster goes to the worker with fewer sockets: worker 1.
    let poster = Peer::join(&gateway.ws_url(), "poster").await;
    let mut peers = vec![quiet, poster];
    let names = ["quiet", "poster"].map(String::from).into();
    wait_lists(&peers, &names).await;
    assert!(peers[0].seen(|s| s.chats.is_empty()), "nothing posted yet");
    stack.workers[0].proc.stop();
    // Stored by worker 1 while the quiet peer's worker hangs, before the
    // gateway finds the hang (link timeout 1 s).
    let sent = chat(&mut peers[1..], 5, Duration::ZERO, "while-hung").await;
    check_everyone_saw(&peers, &sent).await;
    stack.workers[0].proc.cont();
}

/// SIGKILL of a worker while clients post: its sockets move to the other
/// worker; nobody notices.
async fn a_worker_killed_mid_traffic_closes_no_socket(mode: Mode) {
    let mut stack = Stack::start(mode, true, 2, 2).await;
    let (mut peers, names) = stack.peers(3).await;
    let marks = list_marks(&peers);
    let mut sent = chat(&mut peers, 10, Duration::from_millis(20), "before").await;
    stack.workers[0].proc.kill();
    sent.extend(chat(&mut peers, 20, Duration::from_millis(20), "after").await);
    check_everyone_saw(&peers, &sent).await;
    assert_no_flap(&peers, &marks, &names);
    // The killed worker comes back and is linked again.
    stack.restart_worker(0).await;
    stack.wait_all_linked().await;
    let more = chat(&mut peers, 3, Duration::from_millis(10), "back").await;
    sent.extend(more);
    check_everyone_saw(&peers, &sent).await;
    assert!(
        peers.iter().all(|p| p.seen(|s| s.statuses.is_empty())),
        "no new Status"
    );
}

/// SIGTERM of each worker in turn, each started again before the next: the
/// draining worker hands its sockets over; nothing closes, nothing is lost.
/// It exits as soon as they have moved, long before its drain grace: a
/// draining worker takes no new link, so no socket is moved back to it.
async fn a_rolling_restart_of_every_worker_closes_nothing(mode: Mode) {
    let mut stack = Stack::start_with(mode, true, 2, 1, &["--drain-grace-secs", "60"]).await;
    let (mut peers, names) = stack.peers(4).await;
    let marks = list_marks(&peers);
    let mut sent = Vec::new();
    for i in 0..stack.workers.len() {
        sent.extend(chat(&mut peers, 5, Duration::from_millis(20), &format!("w{i}")).await);
        let status = stack.workers[i]
            .proc
            .terminate(Duration::from_secs(15))
            .await;
        assert_eq!(status, Some(0), "worker {i} drained and exited cleanly");
        sent.extend(
            chat(
                &mut peers,
                5,
                Duration::from_millis(20),
                &format!("w{i}down"),
            )
            .await,
        );
        stack.restart_worker(i).await;
        stack.wait_all_linked().await;
    }
    sent.extend(chat(&mut peers, 5, Duration::from_millis(20), "end").await);
    check_everyone_saw(&peers, &sent).await;
    assert_no_flap(&peers, &marks, &names);
}

/// A draining worker serves its sockets until each is attached elsewhere:
/// while the worker they move to hangs, the chat goes on through the
/// draining one, and it exits once they have moved. Private mode, where a
/// socket moves only once its new stream has answered (a shared stream
/// takes an open without a round trip, so there the hang is a second
/// failure after the move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_serves_its_sockets_until_they_have_moved() {
    let mut stack =
        Stack::start_with(Mode::Private, true, 2, 1, &["--drain-grace-secs", "60"]).await;
    // Worker 1 hangs while the peers join, so every one lands on worker 0.
    stack.workers[1].proc.stop();
    stack.gateways[0].wait_linked(1).await;
    let (mut peers, names) = stack.peers(3).await;
    stack.workers[1].proc.cont();
    stack.gateways[0].wait_linked(2).await;
    let marks = list_marks(&peers);
    let mut sent = chat(&mut peers, 3, Duration::from_millis(10), "before").await;
    check_everyone_saw(&peers, &sent).await;
    // The worker they would move to hangs, and theirs drains: the gateway
    // finds the hang and no worker is linked.
    stack.workers[1].proc.stop();
    stack.workers[0].proc.term();
    stack.gateways[0].wait_linked(0).await;
    sent.extend(chat(&mut peers, 3, Duration::from_millis(10), "draining").await);
    check_everyone_saw(&peers, &sent).await;
    // Worker 1 is back: the sockets move, and worker 0 exits long before
    // its drain grace.
    stack.workers[1].proc.cont();
    let status = stack.workers[0].proc.exited(Duration::from_secs(15)).await;
    assert_eq!(status, Some(0), "worker 0 drained and exited cleanly");
    sent.extend(chat(&mut peers, 3, Duration::from_millis(10), "moved").await);
    check_everyone_saw(&peers, &sent).await;
    assert_no_flap(&peers, &marks, &names);
    assert!(
        peers.iter().all(|p| p.seen(|s| s.statuses.is_empty())),
        "no new Status"
    );
}

/// One worker on the embedded log, SIGKILLed and started again: the
/// gateway holds every socket and what their clients sent meanwhile.
async fn an_embedded_worker_killed_and_restarted_closes_no_socket(mode: Mode) {
    the_only_worker_away_and_back(mode, Away::Killed).await;
}

/// The only worker, upgraded in place (SIGTERM, then started again): with
/// no other worker to hand its sockets to, it lets them go at once and
/// exits long before its drain grace, and the gateway holds them, and what
/// their clients send, until the new process is up.
async fn an_only_worker_stopped_and_started_again_closes_no_socket(mode: Mode) {
    the_only_worker_away_and_back(mode, Away::Stopped).await;
}

/// How the only worker goes away.
enum Away {
    /// SIGKILL.
    Killed,
    /// SIGTERM, waiting for a clean exit.
    Stopped,
}

/// The only worker, on the embedded log, goes away while clients post and
/// is started again: nothing closes, nothing is lost, the lists hold.
async fn the_only_worker_away_and_back(mode: Mode, away: Away) {
    let mut stack = Stack::start_with(mode, false, 1, 1, &["--drain-grace-secs", "60"]).await;
    let (mut peers, names) = stack.peers(4).await;
    let mut sent = chat(&mut peers, 5, Duration::from_millis(20), "before").await;
    check_everyone_saw(&peers, &sent).await;
    let marks = list_marks(&peers);
    match away {
        Away::Killed => stack.workers[0].proc.kill(),
        Away::Stopped => {
            let status = stack.workers[0]
                .proc
                .terminate(Duration::from_secs(15))
                .await;
            assert_eq!(status, Some(0), "the worker drained and exited cleanly");
        }
    }
    sent.extend(chat(&mut peers, 3, Duration::from_millis(20), "during").await);
    stack.restart_worker(0).await;
    sent.extend(chat(&mut peers, 5, Duration::from_millis(20), "after").await);
    check_everyone_saw(&peers, &sent).await;
    wait_lists(&peers, &names).await;
    assert_no_flap(&peers, &marks, &names);
}

/// A hung worker (SIGSTOP) is found within the link timeout and its sockets
/// move on; the clients' posts go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_found_within_the_link_timeout() {
    let stack = Stack::start(Mode::Shared, true, 2, 1).await;
    let (mut peers, _) = stack.peers(4).await;
    let sent = chat(&mut peers, 2, Duration::from_millis(10), "before").await;
    check_everyone_saw(&peers, &sent).await;
    stack.workers[0].proc.stop();
    let stopped = Instant::now();
    stack.gateways[0].wait_linked(1).await;
    let detected = stopped.elapsed();
    eprintln!("hung worker detected after {detected:?} (link timeout 1 s)");
    assert!(
        detected < Duration::from_secs(4),
        "detected after {detected:?}"
    );
    let mut all = sent;
    all.extend(chat(&mut peers, 3, Duration::from_millis(10), "after").await);
    check_everyone_saw(&peers, &all).await;
    stack.workers[0].proc.cont();
}

/// A client whose lines the gateway stopped reading (its worker hangs with
/// them unacknowledged, so the session waits for room) is not taken for a
/// silent client once the worker is back: the gateway pings it first, and
/// it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_gateway_stopped_reading_is_pinged_before_it_is_judged() {
    let stack = Stack::start(Mode::Shared, false, 1, 0).await;
    let args = [
        "--worker",
        &stack.workers[0].url(),
        "--ping-interval-secs",
        "1",
        "--pong-timeout-secs",
        "1",
        // The hang is not to be found: it is the worker being slow.
        "--link-timeout-ms",
        "60000",
    ]
    .map(String::from);
    let gateway = GatewayProc::start(addr(), &args, 1).await;
    let mut peers = vec![
        Peer::join(&gateway.ws_url(), "busy").await,
        Peer::join(&gateway.ws_url(), "reader").await,
    ];
    wait_lists(&peers, &["busy", "reader"].map(String::from).into()).await;
    stack.workers[0].proc.stop();
    // One line more than may wait unacknowledged (32): the gateway stops
    // reading this client, for longer than ping interval and pong timeout,
    // and then finds nothing more from it to read.
    let sent = chat(&mut peers[..1], 33, Duration::ZERO, "held").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.workers[0].proc.cont();
    check_everyone_saw(&peers, &sent).await;
}

/// A gateway SIGKILLed: its users leave every list within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_users_leave_within_the_lease() {
    let mut stack = Stack::start(Mode::Shared, true, 2, 2).await;
    let (peers, _) = stack.peers(2).await;
    let (stay, gone): (Vec<Peer>, Vec<Peer>) =
        peers.into_iter().partition(|p| p.name.starts_with("g0"));
    stack.gateways[1].proc.kill();
    let killed = Instant::now();
    let names: BTreeSet<String> = stay.iter().map(|p| p.name.clone()).collect();
    wait_lists(&stay, &names).await;
    let left = killed.elapsed();
    eprintln!("a dead gateway's users left after {left:?} (lease 3 s)");
    assert!(left < Duration::from_secs(3 + 3), "left after {left:?}");
    drop(gone);
}

/// A failover changes nobody's presence. The moved sockets' entries are
/// written again unchanged, and that must not move the notification stream
/// that makes every worker read the whole online list again: at 10,000
/// sockets, one read per moved socket's write was most of Redis's work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_notifies_no_presence_change() {
    const EVENTS: &str = "sharedconn:presence-events";
    let mut stack = Stack::start(Mode::Private, true, 2, 1).await;
    let (mut peers, mut names) = stack.peers(6).await;
    let redis = stack.redis.as_ref().expect("redis");
    let before = redis.integer(&["XLEN", EVENTS]).await;
    stack.workers[0].proc.kill();
    let sent = chat(&mut peers, 5, Duration::from_millis(20), "moved").await;
    check_everyone_saw(&peers, &sent).await;
    // One real change, written after the moves, and seen by everyone: the
    // moves' writes (if any) went before it.
    peers.push(Peer::join(&stack.gateways[0].ws_url(), "late").await);
    names.insert("late".to_owned());
    wait_lists(&peers, &names).await;
    assert_eq!(
        redis.integer(&["XLEN", EVENTS]).await,
        before + 1,
        "only the late join notified the workers"
    );
}

/// A gateway restarted with the same tag purges its previous run's users at
/// once, long before their lease would run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_purges_its_old_users_at_once() {
    let redis = Redis::start().await;
    let args = vec![
        "--backplane".to_owned(),
        redis.url(),
        "--presence-lease-secs".to_owned(),
        "60".to_owned(),
    ];
    let worker = WorkerProc::start(addr(), &args).await;
    let gw = |tag: &str| {
        vec![
            "--worker".to_owned(),
            worker.url(),
            "--gateway-tag".to_owned(),
            tag.to_owned(),
        ]
    };
    let mut g0 = GatewayProc::start(addr(), &gw("0000aaaa"), 1).await;
    let g1 = GatewayProc::start(addr(), &gw("0000bbbb"), 1).await;
    let watcher = Peer::join(&g1.ws_url(), "watcher").await;
    let ghost = Peer::join(&g0.ws_url(), "ghost").await;
    let both: BTreeSet<String> = ["watcher", "ghost"].map(String::from).into();
    wait_lists(std::slice::from_ref(&watcher), &both).await;
    let ghost_wsid = ghost.wsid.clone();
    let g0_addr = g0.addr;
    g0.proc.kill();
    drop(ghost);
    g0 = GatewayProc::start(g0_addr, &gw("0000aaaa"), 1).await;
    let restarted = Instant::now();
    let one: BTreeSet<String> = ["watcher"].map(String::from).into();
    wait_lists(std::slice::from_ref(&watcher), &one).await;
    eprintln!(
        "old users purged {:?} after the restart (lease 60 s)",
        restarted.elapsed()
    );
    assert!(restarted.elapsed() < Duration::from_secs(10));
    // The new run never reuses a WebSocket ID of a live socket.
    let newcomer = Peer::join(&g0.ws_url(), "newcomer").await;
    assert_ne!(newcomer.wsid, ghost_wsid);
}

/// Redis SIGKILLed under traffic and started again on its AOF: every
/// message any client received is still in the log, and ids continue under
/// the same log name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_traffic_loses_nothing() {
    let mut stack = Stack::start(Mode::Shared, true, 2, 1).await;
    let (mut peers, _) = stack.peers(3).await;
    let log = Client::connect(&stack.gateways[0].ws_url()).await.log;
    let sent = chat(&mut peers, 10, Duration::from_millis(5), "before").await;
    let redis = stack.redis.as_mut().unwrap();
    redis.kill();
    // Wait for what was acknowledged before the kill.
    let received = peers[0].seen(|s| s.chats.clone());
    assert!(!received.is_empty());
    redis.restart().await;
    let seq = redis.command(&["HGET", "sharedconn:meta", "seq"]).await;
    let stored = redis.integer(&["XLEN", "sharedconn:log"]).await;
    let max = received.iter().map(|c| c.0).max().unwrap();
    eprintln!("after the restart: seq {seq:?}, XLEN {stored}; clients had received up to id {max}");
    assert!(stored >= max, "a received message is missing from the log");
    // The workers resume by themselves; new posts continue the ids.
    let deadline = Instant::now() + SETTLE;
    let after = loop {
        peers[0].say("g0c0:after-restart").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = peers[1].seen(|s| {
            s.chats
                .iter()
                .find(|c| c.2 == "g0c0:after-restart")
                .cloned()
        });
        if let Some(got) = got {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "no post got through after the restart"
        );
    };
    assert!(after.0 > max, "ids continue: {} after {max}", after.0);
    let again = Client::connect(&stack.gateways[0].ws_url()).await;
    assert_eq!(again.log, log, "the same log name");
    drop(sent);
}

/// Redis loses its data: the log gets a new name, the open sockets are told
/// with a Status frame, and ids start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_data_lost_means_a_new_log() {
    let stack = Stack::start(Mode::Shared, true, 2, 1).await;
    let (mut peers, _) = stack.peers(2).await;
    let before = Client::connect(&stack.gateways[0].ws_url()).await.log;
    let sent = chat(&mut peers, 3, Duration::from_millis(5), "old").await;
    check_everyone_saw(&peers, &sent).await;
    let redis = stack.redis.as_ref().unwrap();
    assert_eq!(redis.command(&["FLUSHALL"]).await.as_deref(), Some("+OK"));
    let deadline = Instant::now() + SETTLE;
    while !peers.iter().all(|p| p.seen(|s| !s.statuses.is_empty())) {
        assert!(Instant::now() < deadline, "no new Status after the wipe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in &peers {
        let status = p.seen(|s| s.statuses[0].clone());
        assert_ne!(status["Log"], before.as_str());
        assert_eq!(status["WSID"], p.wsid.as_str());
    }
    peers[0].say("g0c0:fresh").await;
    let deadline = Instant::now() + SETTLE;
    loop {
        let fresh = peers[1].seen(|s| s.chats.iter().find(|c| c.2 == "g0c0:fresh").cloned());
        if let Some(fresh) = fresh {
            assert_eq!(fresh.0, 1, "ids start over");
            break;
        }
        assert!(Instant::now() < deadline, "the fresh post never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The log's idempotency, against a real Redis: a post sent again with the
/// same key (a gateway retrying after a worker died) is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_sent_twice_with_one_key_is_stored_once() {
    use sharedconn_worker::backplane::redis::{RedisBackplane, RedisConfig};
    use sharedconn_worker::backplane::{Backplane, Event, NewMessage};

    let redis = Redis::start().await;
    let mut log = RedisBackplane::connect(RedisConfig {
        url: redis.url(),
        prefix: "idem-test:".into(),
        lease: Duration::from_secs(3),
        max_log: 1000,
        history: 50,
    })
    .await
    .expect("backplane");
    let post = |key: &str, text: &str| NewMessage {
        from: 7,
        seq: 1,
        key: key.to_owned(),
        author: "ann".into(),
        message: support::b64(text),
        posted: std::time::Instant::now(),
    };
    let mut committed = Vec::new();
    for m in [post("k1", "once"), post("k1", "once"), post("k2", "twice")] {
        log.post(m).expect("queued");
        // Each post is acknowledged, the retry too.
        loop {
            let event = tokio::time::timeout(SETTLE, log.next_event())
                .await
                .expect("no event");
            match event {
                Event::Stored(acks) => {
                    assert_eq!(acks, vec![(7, 1)]);
                    break;
                }
                Event::Committed(batch) => committed.extend(batch),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    while committed.len() < 2 {
        if let Event::Committed(batch) = tokio::time::timeout(SETTLE, log.next_event())
            .await
            .expect("no commit")
        {
            committed.extend(batch);
        }
    }
    let got: Vec<(u64, String)> = committed
        .iter()
        .map(|m| (m.id, support::unb64(&m.message)))
        .collect();
    assert_eq!(got, [(1, "once".to_owned()), (2, "twice".to_owned())]);
    assert_eq!(
        redis.command(&["XLEN", "idem-test:log"]).await.as_deref(),
        Some(":2")
    );
}

/// The only worker hangs (SIGSTOP) for seconds while clients post as fast
/// as they may, then resumes: nobody is cut, nothing is lost or doubled,
/// and nobody is told of a gap. What the clients sent meanwhile waited at
/// the gateway (each client is read more slowly once it has 32 frames in
/// flight), so the burst when the worker resumes is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_with_flooding_clients_cuts_nobody() {
    let stack = Stack::start(Mode::Shared, false, 1, 1).await;
    let (mut peers, names) = stack.peers(5).await;
    let marks = list_marks(&peers);
    let mut sent = chat(&mut peers, 3, Duration::from_millis(10), "before").await;
    stack.workers[0].proc.stop();
    // Flood while it hangs: every peer at its allowed rate (100 frames/s).
    let stopped = Instant::now();
    let mut round = 0;
    while stopped.elapsed() < Duration::from_secs(3) {
        sent.extend(
            chat(
                &mut peers,
                1,
                Duration::from_millis(10),
                &format!("flood{round}"),
            )
            .await,
        );
        round += 1;
    }
    eprintln!("{} posts sent while the worker hung", sent.len());
    stack.workers[0].proc.cont();
    check_everyone_saw(&peers, &sent).await;
    assert_no_flap(&peers, &marks, &names);
}

/// A tag names the WebSocket IDs a gateway issues. While one gateway run
/// holds it, the worker refuses a second live link claiming it (two
/// gateways misconfigured with one tag, or a process posing as a gateway),
/// and the holder chats on. Once the holder is gone, the other links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_second_live_gateway_with_a_held_tag() {
    let data = tempfile::tempdir().unwrap();
    let worker = WorkerProc::start(addr(), &data_dir(&data)).await;
    let args = vec![
        "--worker".to_owned(),
        worker.url(),
        "--gateway-tag".to_owned(),
        "00000abc".to_owned(),
    ];
    let mut holder = GatewayProc::start(addr(), &args, 1).await;
    let other = GatewayProc::start(addr(), &args, 0).await;
    let mut peers = vec![Peer::join(&holder.ws_url(), "ann").await];
    // The other gateway retries (backoff up to 2 s), refused every time.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(other.linked().await, Some(0), "a second holder was let in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = chat(&mut peers, 3, Duration::from_millis(10), "held").await;
    check_everyone_saw(&peers, &sent).await;
    holder.proc.kill();
    other.wait_linked(1).await;
    let mut bob = Client::connect(&other.ws_url()).await;
    bob.say("after the holder left").await;
    let seen = bob.chats(sent.len() + 1).await;
    assert_eq!(seen.last().unwrap().2, "after the holder left");
}

/// The worker applies limits of its own, whatever a gateway lets through:
/// past its socket cap for one gateway an open is refused (1013), a socket
/// sending faster than the worker allows is closed (1008), and so is one
/// sending a frame bigger than it allows (1009); the gateway's other
/// sockets go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_limits_what_a_gateway_lets_through() {
    let data = tempfile::tempdir().unwrap();
    let mut flags = data_dir(&data);
    flags.extend(
        [
            "--max-sockets-per-gateway",
            "2",
            "--socket-frames-per-sec",
            "1",
            "--socket-frame-burst",
            "5",
            "--max-frame-bytes",
            "200",
        ]
        .map(String::from),
    );
    let worker = WorkerProc::start(addr(), &flags).await;
    let gateway = GatewayProc::start(addr(), &["--worker".to_owned(), worker.url()], 1).await;
    let mut flooder = Client::connect(&gateway.ws_url()).await;
    let mut quiet = Client::connect(&gateway.ws_url()).await;
    // A third socket: the worker refuses it, and the gateway closes it.
    let (mut third, _) = tokio_tungstenite::connect_async(gateway.ws_url())
        .await
        .expect("handshake");
    let code = loop {
        match tokio::time::timeout(SETTLE, third.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(Message::Text(t)))) => {
                assert!(!t.contains("\"Status\""), "a third socket was served: {t}")
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("third socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1013));
    // 20 posts at once: within the gateway's burst, past the worker's.
    for i in 0..20 {
        flooder.say(&format!("flood {i}")).await;
    }
    assert_eq!(flooder.ended().await, support::Ended::Closed(1008));
    let flooded = quiet.chats(5).await;
    assert_eq!(flooded.last().map(|c| c.2.as_str()), Some("flood 4"));
    quiet.say("still here").await;
    let mine = loop {
        let chat = quiet.chats(1).await.remove(0);
        if chat.2 == "still here" {
            break chat;
        }
        assert!(chat.2.starts_with("flood"), "unexpected {chat:?}");
    };
    assert_eq!(mine.2, "still here");
    // The flooder's place is free again; a frame past the worker's size
    // limit (the gateway allows 64 KiB) closes its socket with 1009.
    let mut big = Client::connect(&gateway.ws_url()).await;
    big.say(&"x".repeat(300)).await;
    assert_eq!(big.ended().await, support::Ended::Closed(1009));
    quiet.say("after the big one").await;
    let last = loop {
        let chat = quiet.chats(1).await.remove(0);
        if chat.2 == "after the big one" {
            break chat;
        }
    };
    assert_eq!(last.2, "after the big one");
}

/// A crowd beyond what a gateway can write: 100 sockets over two gateways,
/// 1,000 posts/s of 1 KB each (100 MB/s to write) into socket queues of
/// 256 KiB. So that the load is past a gateway's capacity on any machine,
/// one gateway is also stopped (SIGSTOP) for two seconds mid-send while the
/// other's senders go on: the backlog it then faces overflows its sockets'
/// queues. They fall behind and catch up from the log, and the worker waits
/// for that gateway. Nobody is cut, nothing is lost or doubled, one order
/// for all: overload costs latency, not messages. Driven by the project's
/// own load generator, whose report counts every delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_beyond_the_gateways_capacity_cuts_nobody() {
    let data = tempfile::tempdir().unwrap();
    let mut args = data_dir(&data);
    args.extend(
        [
            "--socket-frames-per-sec",
            "4000",
            "--socket-frame-burst",
            "8000",
        ]
        .map(String::from),
    );
    let worker = WorkerProc::start(addr(), &args).await;
    let gateway_args = [
        "--worker",
        &worker.url(),
        "--max-frames-per-sec",
        "2000",
        "--frame-burst",
        "4000",
        // 256 frames of this test's size: the stop's backlog overflows it.
        "--socket-queue-bytes",
        "262144",
    ]
    .map(String::from);
    let steady = GatewayProc::start(addr(), &gateway_args, 1).await;
    let stalled = GatewayProc::start(addr(), &gateway_args, 1).await;
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("crowd.json");
    let (steady_url, stalled_url) = (steady.ws_url(), stalled.ws_url());
    let load = [
        "-q",
        "chat",
        "--url",
        &steady_url,
        "--url",
        &stalled_url,
        "--clients",
        "100",
        "--senders",
        "10",
        "--rate",
        "1000",
        "--duration",
        "5",
        "--pad",
        "1000",
        "--drain",
        "120",
        "--json",
    ];
    let mut child = std::process::Command::new(bin("loadtest"))
        .args(load)
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cannot run loadtest");
    // Connecting 100 clients and the 1 s settle take under 2 s; sending
    // lasts 5 s after that.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stalled.proc.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stalled.proc.cont();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("waiting for loadtest");
    assert!(status.success(), "loadtest failed: {status}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let field = |name: &str| report[name].clone();
    eprintln!(
        "crowd: {} of {} deliveries, latency p99 {} us, max {} us",
        field("deliveries_received"),
        field("deliveries_expected"),
        report["latency"]["p99_us"],
        report["latency"]["max_us"]
    );
    assert_eq!(field("closed_by_server"), json!({}), "sockets were cut");
    assert_eq!(field("loss"), json!(0), "deliveries lost");
    assert_eq!(field("duplicates"), json!(0));
    assert_eq!(field("one_order"), json!(true));
    assert_eq!(field("error_frames"), json!(0));
    assert_eq!(
        field("deliveries_received"),
        field("deliveries_expected"),
        "every delivery arrived"
    );
    // The load was beyond the gateway: sockets fell behind and caught up.
    let (_, metrics) = support::http_get(stalled.addr, "/metrics")
        .await
        .expect("gateway /metrics");
    let overflows: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sharedconn_gateway_socket_overflows_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the overflow counter");
    eprintln!("socket queue overflows at the gateway: {overflows}");
    assert!(
        overflows > 0.0,
        "the crowd never overflowed a queue: not beyond capacity"
    );
}

//! Test support: real workers and gateways in this process, on loopback
//! ports, linked by real gRPC; and a WebSocket client that speaks the chat.
//!
//! ```ignore
//! let mut cluster = Cluster::builder().mode(Mode::Private).gateways(2).start().await;
//! let mut ann = Client::connect(&cluster.ws_url(0)).await;
//! ```

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use sharedconn_gateway::Mode;

pub mod procs;

/// Runs a scenario once per mode, as two tests named `shared` and
/// `private` in a module named after the scenario.
#[allow(unused_macros)]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared() {
                super::$name(Mode::Shared).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn private() {
                super::$name(Mode::Private).await;
            }
        }
    )*};
}

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("server did not stop within 15 s")
            .expect("server task panicked");
    }
}

pub struct ClusterBuilder {
    mode: Mode,
    gateways: usize,
    history: usize,
    tweak: fn(&mut sharedconn_gateway::Config),
    worker_metrics: bool,
}

impl ClusterBuilder {
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    pub fn history(mut self, n: usize) -> Self {
        self.history = n;
        self
    }

    /// Gives the worker a metrics listener (`/metrics`, `/healthz`); its
    /// address is [`Cluster::worker_metrics_addr`].
    pub fn worker_metrics(mut self) -> Self {
        self.worker_metrics = true;
        self
    }

    /// Adjusts every gateway's configuration (limits, queue sizes).
    pub fn gateway_config(mut self, tweak: fn(&mut sharedconn_gateway::Config)) -> Self {
        self.tweak = tweak;
        self
    }

    pub async fn start(self) -> Cluster {
        // Logs show with `RUST_LOG=debug cargo test -- --nocapture`.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let data_dir = tempfile::tempdir().expect("temp dir");
        let worker_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker_addr = worker_listener.local_addr().unwrap();
        // The worker binds this address itself: take a free port and let go.
        let worker_metrics_addr = self.worker_metrics.then(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        });
        let mut cluster = Cluster {
            mode: self.mode,
            history: self.history,
            tweak: self.tweak,
            data_dir,
            worker_addr,
            worker_metrics_addr,
            worker: None,
            gateway_addrs: Vec::new(),
            gateways: Vec::new(),
        };
        cluster.worker = Some(cluster.spawn_worker(worker_listener));
        for i in 0..self.gateways {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            cluster.gateway_addrs.push(listener.local_addr().unwrap());
            cluster.gateways.push(None);
            cluster.gateways[i] = Some(cluster.spawn_gateway(listener));
        }
        for i in 0..self.gateways {
            cluster.wait_ready(i).await;
        }
        cluster
    }
}

/// One worker (embedded backplane, temporary data directory) and N gateways.
pub struct Cluster {
    mode: Mode,
    history: usize,
    tweak: fn(&mut sharedconn_gateway::Config),
    data_dir: tempfile::TempDir,
    worker_addr: SocketAddr,
    worker_metrics_addr: Option<SocketAddr>,
    worker: Option<Running>,
    gateway_addrs: Vec<SocketAddr>,
    gateways: Vec<Option<Running>>,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            mode: Mode::Shared,
            gateways: 1,
            history: 50,
            tweak: |_| {},
            worker_metrics: false,
        }
    }

    pub fn gateway_url(&self, i: usize) -> String {
        format!("http://{}", self.gateway_addrs[i])
    }

    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.gateway_addrs[i])
    }

    pub fn gateway_addr(&self, i: usize) -> SocketAddr {
        self.gateway_addrs[i]
    }

    /// The worker's metrics listener, when the builder asked for one.
    pub fn worker_metrics_addr(&self) -> SocketAddr {
        self.worker_metrics_addr
            .expect("the cluster was built without worker_metrics()")
    }

    fn spawn_worker(&self, listener: TcpListener) -> Running {
        let mut config = sharedconn_worker::Config::new(self.data_dir.path());
        config.history = self.history;
        // The worker's own limits stay above what the gateways allow, as
        // the README asks of an operator.
        let mut gateway = sharedconn_gateway::Config::new(Vec::new());
        (self.tweak)(&mut gateway);
        config.limits = config.limits.covering(
            gateway.frames_per_sec,
            gateway.frame_burst,
            gateway.max_frame_bytes,
            gateway.max_connections,
        );
        config.metrics_listen = self.worker_metrics_addr;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            sharedconn_worker::run(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("worker failed");
        });
        Running { stop, task }
    }

    fn spawn_gateway(&self, listener: TcpListener) -> Running {
        let mut config =
            sharedconn_gateway::Config::new(vec![format!("http://{}", self.worker_addr)]);
        config.mode = self.mode;
        (self.tweak)(&mut config);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            sharedconn_gateway::run(listener, config, async {
                let _ = stopped.await;
            })
            .await
            .expect("gateway failed");
        });
        Running { stop, task }
    }

    /// Stops gateway `i`: its sockets close with 1001.
    pub async fn stop_gateway(&mut self, i: usize) {
        if let Some(g) = self.gateways[i].take() {
            g.stop().await;
        }
    }

    /// Starts gateway `i` again on its old port and waits until it is linked.
    pub async fn start_gateway(&mut self, i: usize) {
        let listener = bind_again(self.gateway_addrs[i]).await;
        self.gateways[i] = Some(self.spawn_gateway(listener));
        self.wait_ready(i).await;
    }

    /// Stops the worker; gateways close their sockets with 1012.
    pub async fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
    }

    /// Starts the worker again on its old port and data directory, and waits
    /// until every running gateway has linked to it again.
    pub async fn start_worker(&mut self) {
        let listener = bind_again(self.worker_addr).await;
        self.worker = Some(self.spawn_worker(listener));
        for i in 0..self.gateways.len() {
            if self.gateways[i].is_some() {
                self.wait_ready(i).await;
            }
        }
    }

    /// Stops the worker, deletes its message log, and starts it again.
    pub async fn wipe_worker(&mut self) {
        self.stop_worker().await;
        for entry in std::fs::read_dir(self.data_dir.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        self.start_worker().await;
    }

    /// Polls `/healthz` of gateway `i` until it answers 200.
    pub async fn wait_ready(&self, i: usize) {
        let addr = self.gateway_addrs[i];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if http_get(addr, "/healthz").await.map(|(s, _)| s) == Some(200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {i} not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.gateways.len() {
            self.stop_gateway(i).await;
        }
        self.stop_worker().await;
    }
}

async fn bind_again(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get_with_headers(addr, path)
        .await
        .map(|(status, _, body)| (status, body))
}

/// A minimal HTTP/1.1 GET: (status, headers with lowercase names, body).
pub async fn http_get_with_headers(
    addr: SocketAddr,
    path: &str,
) -> Option<(u16, Vec<(String, String)>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Some((status, headers, body.to_owned()))
}

/// The names in a userlist frame, which must have the seed's shape:
/// `"Users":[{"User":"ann"},{"User":"bob"}]`.
pub fn userlist_names(frame: &Value) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "User")]
        user: String,
    }
    let entries: Vec<Entry> = serde_json::from_value(frame["Users"].clone())
        .unwrap_or_else(|e| panic!("userlist not in the seed's shape ({e}): {frame}"));
    entries.into_iter().map(|e| e.user).collect()
}

pub fn b64(text: &str) -> String {
    STANDARD.encode(text.as_bytes())
}

pub fn unb64(text: &str) -> String {
    String::from_utf8(STANDARD.decode(text).expect("server sent bad base64"))
        .expect("server sent non-UTF-8 text")
}

/// A chat client over a real WebSocket.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// From the Status frame.
    pub wsid: String,
    /// The message log's name, from the Status frame.
    pub log: String,
}

/// How a socket ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Closed(u16),
    Dropped,
}

impl Client {
    /// Connects and reads the Status frame, which must come first.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Client::after_handshake(ws).await
    }

    /// Connects with a small TCP receive buffer (a client that reads slowly
    /// fills it quickly), then reads the Status frame.
    pub async fn connect_with_recv_buffer(url: &str, bytes: u32) -> Client {
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake failed");
        Client::after_handshake(ws).await
    }

    async fn after_handshake(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        let mut client = Client {
            ws,
            wsid: String::new(),
            log: String::new(),
        };
        let status = client.next().await;
        assert_eq!(
            status["Type"], "Status",
            "first frame must be Status: {status}"
        );
        client.wsid = status["WSID"].as_str().expect("WSID").to_owned();
        client.log = status["Log"].as_str().expect("Log").to_owned();
        client
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("send failed");
    }

    pub async fn alias(&mut self, name: &str) {
        self.send_text(json!({ "User": name }).to_string()).await;
    }

    /// Posts `text` (base64 of UTF-8) claiming to be `author`.
    pub async fn say_as(&mut self, author: &str, text: &str) {
        self.send_text(json!({ "Message": b64(text), "Author": author }).to_string())
            .await;
    }

    pub async fn say(&mut self, text: &str) {
        self.say_as("whoever", text).await;
    }

    /// The next text frame, parsed. Panics on timeout or close.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame within the wait")
                .expect("socket ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("frame is not JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame of the given `Type`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next().await;
            if v["Type"] == kind {
                return v;
            }
        }
    }

    /// Reads until a user list satisfying `pred` arrives; returns its names.
    pub async fn userlist_until(&mut self, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        loop {
            let v = self.next_of("userlist").await;
            let users = userlist_names(&v);
            if pred(&users) {
                return users;
            }
        }
    }

    /// The next `n` Chat frames as (ID, author, text).
    pub async fn chats(&mut self, n: usize) -> Vec<(u64, String, String)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.next_of("Chat").await;
            out.push((
                v["ID"].as_u64().expect("ID"),
                v["Author"].as_str().unwrap().to_owned(),
                unb64(v["Message"].as_str().unwrap()),
            ));
        }
        out
    }

    /// Reads until the socket ends; returns the close code if one came.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("socket did not end within the wait")
            {
                Some(Ok(Message::Close(frame))) => {
                    return Ended::Closed(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }
}

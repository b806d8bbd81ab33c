//! The gateway's edge: the strict handshake, the `Origin` allow-list, wss,
//! running out of file descriptors, and the all-in-one binary's failures.
//! Real sockets throughout; the last tests run the built `sharedconn`
//! binary as a child process.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sharedconn_gateway::origin::AllowedOrigins;
use sharedconn_gateway::tls::Tls;
use support::{Client, Cluster, WAIT, b64, http_get, unb64};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::{self, Message};

/// A valid `Sec-WebSocket-Key` (RFC 6455's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends a request head, reads the response head: (status, head).
async fn raw_request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, head: &str) -> (u16, String) {
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            buf.push(byte[0]);
        }
    })
    .await
    .expect("no response head within the wait");
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    (status, head)
}

/// An upgrade request to `/ws` with the usual headers, some replaced or left
/// out: `("Origin", Some(..))` adds or replaces, `("Host", None)` removes.
fn upgrade_head(addr: SocketAddr, changes: &[(&str, Option<&str>)]) -> String {
    let host = addr.to_string();
    let mut headers: Vec<(String, String)> = [
        ("Host", host.as_str()),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (name, value) in changes {
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            headers.push((name.to_string(), v.to_string()));
        }
    }
    let mut head = "GET /ws HTTP/1.1\r\n".to_owned();
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head + "\r\n"
}

async fn upgrade_status(addr: SocketAddr, changes: &[(&str, Option<&str>)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    raw_request(&mut s, &upgrade_head(addr, changes)).await
}

#[tokio::test]
async fn a_bad_handshake_gets_a_plain_answer() {
    let cluster = Cluster::builder().start().await;
    let addr = cluster.gateway_addr(0);
    assert_eq!(upgrade_status(addr, &[]).await.0, 101);

    // RFC 6455 §4.4: a version we do not speak gets 426 naming the one we do.
    let (status, head) = upgrade_status(addr, &[("Sec-WebSocket-Version", Some("8"))]).await;
    assert_eq!(status, 426, "{head}");
    assert!(head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
    let (status, _) = upgrade_status(addr, &[("Sec-WebSocket-Version", None)]).await;
    assert_eq!(status, 426);

    for key in ["not base64!", "c2hvcnQ=", "dGhlIHNhbXBsZSBub25jZSEhIQ=="] {
        let (status, head) = upgrade_status(addr, &[("Sec-WebSocket-Key", Some(key))]).await;
        assert_eq!(status, 400, "key {key:?}: {head}");
    }
    assert_eq!(
        upgrade_status(addr, &[("Sec-WebSocket-Key", None)]).await.0,
        400
    );
    let (status, head) = upgrade_status(addr, &[("Host", None)]).await;
    assert_eq!(status, 400, "{head}");

    // The gateway is still serving.
    Client::connect(&cluster.ws_url(0)).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn only_allowed_origins_may_open_a_socket() {
    let cluster = Cluster::builder().start().await;
    let addr = cluster.gateway_addr(0);
    let same_host = format!("http://{addr}");
    let (status, head) = upgrade_status(addr, &[("Origin", Some("http://evil.example"))]).await;
    assert_eq!(status, 403, "{head}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = upgrade_head(addr, &[("Origin", Some("http://evil.example"))]);
    raw_request(&mut s, &req).await;
    let mut body = [0u8; 19];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&body, b"origin not allowed\n");
    // No Origin (not a browser), and the gateway's own page.
    assert_eq!(upgrade_status(addr, &[]).await.0, 101);
    assert_eq!(
        upgrade_status(addr, &[("Origin", Some(&same_host))])
            .await
            .0,
        101
    );
    cluster.shutdown().await;

    let cluster = Cluster::builder()
        .gateway_config(|c| {
            c.allowed_origins = AllowedOrigins::parse(&["https://app.example"]).unwrap();
        })
        .start()
        .await;
    let addr = cluster.gateway_addr(0);
    for (origin, expected) in [
        ("https://app.example", 101),
        ("https://app.example:443", 101),
        ("http://app.example", 403),
        ("http://evil.example", 403),
    ] {
        assert_eq!(
            upgrade_status(addr, &[("Origin", Some(origin))]).await.0,
            expected,
            "{origin}"
        );
    }
    cluster.shutdown().await;

    let cluster = Cluster::builder()
        .gateway_config(|c| c.allowed_origins = AllowedOrigins::Any)
        .start()
        .await;
    let addr = cluster.gateway_addr(0);
    assert_eq!(
        upgrade_status(addr, &[("Origin", Some("http://evil.example"))])
            .await
            .0,
        101
    );
    cluster.shutdown().await;
}

/// A self-signed certificate for `localhost`, written as PEM files in `dir`:
/// (cert path, key path, the certificate for the client to trust).
fn self_signed(
    dir: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    CertificateDer<'static>,
) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().clone())
}

fn connector(trusted: CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(trusted).unwrap();
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("tls handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_chat_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, trusted) = self_signed(dir.path());
    let worker_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_url = format!("http://{}", worker_listener.local_addr().unwrap());
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(sharedconn_worker::run(
        worker_listener,
        sharedconn_worker::Config::new(dir.path().join("data")),
        async {
            let _ = worker_stopped.await;
        },
    ));
    let mut config = sharedconn_gateway::Config::new(vec![worker_url]);
    config.tls = Some(Tls::from_pem_files(&cert, &key).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_gateway, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(sharedconn_gateway::run(listener, config, async {
        let _ = gateway_stopped.await;
    }));

    let tls = connector(trusted);
    // /healthz over https, until the gateway is linked to its worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = tls_connect(&tls, addr).await;
        let (status, _) = raw_request(
            &mut s,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "gateway not ready over https");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Plain http on the TLS port gets nowhere.
    assert_eq!(http_get(addr, "/healthz").await, None);

    let url = format!("wss://localhost:{}/ws", addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(&url, tls_connect(&tls, addr).await)
        .await
        .expect("wss handshake");
    let status = next_json(&mut ws).await;
    assert_eq!(status["Type"], "Status", "{status}");
    ws.send(Message::Text(json!({ "User": "ann" }).to_string().into()))
        .await
        .unwrap();
    // Longer than one TLS record, to cross record boundaries both ways.
    let text = "sécurisé ".repeat(3000);
    ws.send(Message::Text(
        json!({ "Message": b64(&text), "Author": "ann" })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let chat = loop {
        let v = next_json(&mut ws).await;
        if v["Type"] == "Chat" {
            break v;
        }
    };
    assert_eq!(chat["Author"], "ann");
    assert_eq!(unb64(chat["Message"].as_str().unwrap()), text);

    // Shutdown closes the wss socket with 1001, through TLS.
    let _ = stop_gateway.send(());
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close")
        {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    gateway.await.unwrap().unwrap();
    let _ = stop_worker.send(());
    worker.await.unwrap().unwrap();
}

/// The next text frame, parsed.
async fn next_json<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no frame within the wait")
            .expect("socket ended")
            .expect("socket error");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[test]
fn tls_files_are_checked_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path());
    let missing = dir.path().join("missing.pem");
    let err = Tls::from_pem_files(&missing, &key).unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("missing.pem"),
        "{err}"
    );
    let err = Tls::from_pem_files(&key, &key).unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("key.pem"),
        "{err}"
    );
    let err = Tls::from_pem_files(&cert, &cert).unwrap_err().to_string();
    assert!(
        err.contains("private key") && err.contains("cert.pem"),
        "{err}"
    );
    // A key that is not the certificate's.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = self_signed(other.path());
    let err = Tls::from_pem_files(&cert, &other_key)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not make a usable pair"), "{err}");
}

/// The `sharedconn` binary, running as a child process.
struct Sharedconn {
    child: std::process::Child,
    /// Everything it wrote to stderr so far.
    log: Arc<Mutex<String>>,
    addr: Option<SocketAddr>,
}

impl Sharedconn {
    /// Starts it on a free port with `data_dir`; `nofile` sets both the soft
    /// and the hard open-file limit of the child.
    fn start(data_dir: &Path, nofile: Option<u64>) -> Sharedconn {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sharedconn"));
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: only setrlimit, which is async-signal-safe, between
            // fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start sharedconn");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Sharedconn {
            child,
            log,
            addr: None,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the "running" line, then for `/healthz` to answer 200.
    async fn ready(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let found = self
                .log()
                .lines()
                .find_map(|l| l.split("sharedconn is running: open http://").nth(1))
                .map(|rest| rest.trim_end_matches('/').parse::<SocketAddr>().unwrap());
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sharedconn exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "not running:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        loop {
            if http_get(addr, "/healthz").await.map(|(s, _)| s) == Some(200) {
                break;
            }
            assert!(Instant::now() < deadline, "not healthy:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.addr = Some(addr);
        addr
    }

    /// Waits up to `within` for it to exit by itself.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, and it must stop cleanly.
    async fn stop(mut self) {
        // SAFETY: a plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.exited(Duration::from_secs(15)).await;
        assert!(status.success(), "{status}:\n{}", self.log());
    }
}

impl Drop for Sharedconn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_second_instance_on_the_same_data_dir_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Sharedconn::start(dir.path(), None);
    first.ready().await;

    let started = Instant::now();
    let mut second = Sharedconn::start(dir.path(), None);
    let status = second.exited(Duration::from_secs(10)).await;
    let log = second.log();
    assert!(!status.success(), "{status}:\n{log}");
    assert!(log.to_lowercase().contains("lock"), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // The first one never noticed.
    let addr = first.addr.unwrap();
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);
    first.stop().await;
}

/// With an open-file limit of 128, the gateway takes 128 less its reserve in
/// WebSockets; the next upgrade gets 503 while `/healthz` still answers.
/// When even the reserve runs out, new connections get 503 at once rather
/// than waiting in the accept queue, and the listener recovers after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_open_file_limit_upgrades_get_503_and_health_answers() {
    const NOFILE: u64 = 128;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Sharedconn::start(dir.path(), Some(NOFILE));
    let addr = server.ready().await;
    let url = format!("ws://{addr}/ws");
    let log = server.log();
    assert!(log.contains("open-file limit"), "{log}");

    let budget = (NOFILE - sharedconn_gateway::accept::FD_RESERVE) as usize;
    let mut sockets = Vec::new();
    let refused = loop {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
            .await
            .expect("an upgrade hung")
        {
            Ok((ws, _)) => sockets.push(ws),
            Err(tungstenite::Error::Http(response)) => break response.status().as_u16(),
            Err(e) => panic!("after {} sockets: {e}\n{}", sockets.len(), server.log()),
        }
        assert!(sockets.len() <= budget, "more sockets than the budget");
    };
    assert_eq!(refused, 503);
    assert_eq!(sockets.len(), budget);
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 200);

    // Now use up the reserve with keep-alive connections.
    let mut held = Vec::new();
    let mut shed = 0;
    for _ in 0..NOFILE {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (status, _) = match tokio::time::timeout(
            Duration::from_secs(3),
            raw_request(
                &mut s,
                &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
            ),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => panic!(
                "no answer after {} held, {shed} refused:\n{}",
                held.len(),
                server.log()
            ),
        };
        match status {
            200 => {
                // Read the body too, so the connection stays reusable.
                let mut body = [0u8; 3];
                s.read_exact(&mut body).await.unwrap();
                held.push(s);
            }
            503 => shed += 1,
            other => panic!("status {other}"),
        }
    }
    assert!(shed > 0, "never ran out of descriptors");
    let started = Instant::now();
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
        .await
        .expect("an upgrade hung past the open-file limit")
    {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // Freed descriptors serve again: first `/healthz`, then upgrades, once
    // the gateway has seen its sockets' clients go (each session notices
    // its own close; `/healthz` needs only a free descriptor).
    drop(held);
    drop(sockets);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/healthz").await.map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "no recovery:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(&url))
            .await
            .expect("an upgrade hung after the sockets were freed")
        {
            Ok(_) => break,
            Err(tungstenite::Error::Http(response)) if response.status() == 503 => {
                assert!(
                    Instant::now() < deadline,
                    "upgrades refused:\n{}",
                    server.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("upgrade after recovery: {e}\n{}", server.log()),
        }
    }
    server.stop().await;
}

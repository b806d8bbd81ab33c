//! The chat page in a real browser: headless Debian `chromium`, driven through
//! `chromedriver` (WebDriver) against a real cluster of one worker and two gateways.
//!
//! Everything is checked through the DOM the user sees: the headline, the online list,
//! the message list, the status line, the layout. Two pages (desktop and phone width)
//! talk through different gateways, a third page comes and goes, one gateway is stopped
//! and restarted under a page that must notice, reconnect by itself and catch up on what
//! it missed without duplicates, and finally the worker restarts under both pages.
//!
//! A second test drives the tutorial's own page logic (a page of ours written from the
//! tutorial's description, served by the test) against the gateway, next to our page:
//! the seed page must read the online list and pass Latin-1 text through intact.
//!
//! Needs `chromium` and `chromedriver` on PATH (`apt-get install -y chromium
//! chromium-driver`, or `.ci/test-deps`); without them the tests fail and say so.
//! Screenshots at desktop and phone width land in `target/browser-artifacts/`.

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use support::{Cluster, Mode};

/// How long a page gets to reach an expected state. Generous: the machine may be busy
/// compiling, and the page's reconnect backoff alone can take up to ~5 s.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting check looks at the page again.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How long chromedriver gets to start listening.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Messages each page sends in the burst step.
const BURST: usize = 12;
/// Longer input is pasted rather than typed key by key (which takes ~4 ms a key).
const MAX_TYPED_CHARS: usize = 500;

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_in_a_real_browser() {
    let started = Instant::now();
    let artifacts = artifacts_dir();
    let mut driver = ChromeDriver::start(&artifacts, "chromedriver.log");
    eprintln!(
        "browser: chromedriver up on {} after {:?}",
        driver.url,
        started.elapsed()
    );

    let mut cluster = Cluster::builder()
        .mode(Mode::Shared)
        .gateways(2)
        .start()
        .await;

    let mut pages = Vec::new();
    let outcome =
        std::panic::AssertUnwindSafe(scenario(&mut cluster, &driver, &artifacts, &mut pages))
            .catch_unwind()
            .await;

    // Close the browsers before chromedriver goes, also when the scenario failed, so no
    // chromium is left behind.
    for page in pages.drain(..) {
        page.close().await;
    }
    driver.stop();
    eprintln!("browser: finished in {:?}", started.elapsed());
    match outcome {
        Ok(()) => cluster.shutdown().await,
        // The cluster's tasks end with the test's runtime.
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The user story, step by step. Pages opened here are pushed to `pages` so the caller
/// can close them whatever happens.
async fn scenario(
    cluster: &mut Cluster,
    driver: &ChromeDriver,
    artifacts: &Path,
    pages: &mut Vec<Page>,
) {
    let t = Instant::now();
    let step = |what: &str| eprintln!("browser: {what} ({:?})", t.elapsed());

    // Two pages on different gateways: alice at desktop width, bob at phone width.
    pages.push(Page::open(driver, "alice", &cluster.gateway_url(0), Viewport::Desktop).await);
    pages.push(Page::open(driver, "bob", &cluster.gateway_url(1), Viewport::Phone).await);
    let (alice, bob) = (&pages[0], &pages[1]);

    // The page runs under the gateway's Content-Security-Policy, which allows its inline
    // script and style by hash and nothing else.
    alice.assert_allowed_by_csp(cluster.gateway_addr(0)).await;

    let alice_wsid = alice.wait_connected().await;
    let bob_wsid = bob.wait_connected().await;
    assert_ne!(
        alice_wsid, bob_wsid,
        "two sockets must not share a WebSocket ID"
    );
    for page in [alice, bob] {
        assert_eq!(
            page.js::<String>("return document.activeElement && document.activeElement.id")
                .await,
            "inputline",
            "{}: the input line should have the focus on load",
            page.name
        );
    }
    step("both pages connected");

    // Before picking a name: each page says it is connected but unnamed, and how to pick
    // a name; a post goes out as "default" and is marked as the poster's own only in the
    // poster's page.
    for page in [alice, bob] {
        page.wait_js(
            "the page says no name is picked yet",
            "const hint = document.getElementById('namehint');
             return !hint.hidden && hint.getClientRects().length > 0
                 && hint.textContent.includes('alias NAME')
                 && document.getElementById('me').textContent === 'no name yet'
                 && document.getElementById('inputline').placeholder.includes('alias NAME');",
        )
        .await;
    }
    alice.screenshot(artifacts, "desktop-unnamed.png").await;
    bob.type_line("said before picking a name").await;
    let unnamed = alice.wait_messages(1).await;
    let unnamed_in_bob = bob.wait_messages(1).await;
    assert_eq!(unnamed_in_bob, unnamed);
    let (in_alice, in_bob) = (&unnamed[0], &unnamed_in_bob[0]);
    assert_eq!(
        (in_alice.author.as_str(), in_alice.text.as_str()),
        ("default", "said before picking a name")
    );
    assert!(
        in_bob.own,
        "bob's page marks bob's unnamed post as his: {in_bob:?}"
    );
    assert!(
        !in_alice.own,
        "alice's page marks bob's post as hers: {in_alice:?}"
    );
    bob.screenshot(artifacts, "phone-unnamed.png").await;
    step("unnamed state shown, own unnamed post marked");

    // Renaming: both online lists show both names.
    alice.type_line("alias alice").await;
    bob.type_line("alias bob").await;
    for page in [alice, bob] {
        page.wait_users(&["alice", "bob"], &[]).await;
    }
    alice
        .wait_js(
            "the name hint is gone and the header shows the name",
            "return document.getElementById('namehint').hidden
                 && document.getElementById('me').textContent === 'alice'",
        )
        .await;
    // A name the server would refuse is refused in the page, and the old name stays.
    alice
        .js_value("document.getElementById('inputline').value = 'alias ev\\u202Eil'")
        .await;
    alice
        .input()
        .await
        .send_keys(&Key::Enter.to_string())
        .await
        .expect("press Enter");
    alice
        .wait_js(
            "the status line refuses the name",
            "return document.getElementById('status').textContent.includes('not changed')",
        )
        .await;
    assert_eq!(
        alice
            .js::<String>("return document.getElementById('me').textContent")
            .await,
        "alice"
    );
    alice
        .js_value("document.getElementById('inputline').value = ''")
        .await;
    step("aliases shown in both online lists");

    // Messages from both pages, interleaved without waiting, through both gateways.
    let hostile = r#"<img src=x onerror="window.__pwned=1"> and <b>bold</b>"#;
    let sent: Vec<(&Page, &str)> = vec![
        (alice, "hello from alice"),
        (bob, "hi alice, bob here"),
        (alice, "日本語のメッセージです。こんにちは、世界"),
        (bob, "emoji 🎉👍🏽 and a family 👨‍👩‍👧 in one line"),
        (alice, hostile),
        (bob, "last one, sent with the button"),
    ];
    for (i, (page, text)) in sent.iter().enumerate() {
        if i == sent.len() - 1 {
            page.type_and_click_send(text).await;
        } else {
            page.type_line(text).await;
        }
    }
    let expected: Vec<(&str, &str)> = sent.iter().map(|(p, text)| (p.name, *text)).collect();
    let seen_by_alice = alice.wait_messages(unnamed.len() + expected.len()).await;
    let seen_by_bob = bob.wait_messages(unnamed.len() + expected.len()).await;
    assert_eq!(
        seen_by_alice, seen_by_bob,
        "both pages must show the same messages in the same order"
    );
    assert_ordered_unique(alice.name, &seen_by_alice);
    let tail = &seen_by_alice[seen_by_alice.len() - expected.len()..];
    // Each page's own messages keep the order they were typed in.
    for name in ["alice", "bob"] {
        let shown: Vec<&str> = tail
            .iter()
            .filter(|m| m.author == name)
            .map(|m| m.text.as_str())
            .collect();
        let typed: Vec<&str> = expected
            .iter()
            .filter(|(a, _)| *a == name)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(shown, typed, "{name}'s messages, in typing order");
    }
    let mut tail_sorted: Vec<(String, String)> = tail
        .iter()
        .map(|m| (m.author.clone(), m.text.clone()))
        .collect();
    let mut expected_sorted: Vec<(String, String)> = expected
        .iter()
        .map(|(a, t)| (a.to_string(), t.to_string()))
        .collect();
    tail_sorted.sort();
    expected_sorted.sort();
    assert_eq!(
        tail_sorted, expected_sorted,
        "every message arrives once, intact (UTF-8, emoji, markup as text)"
    );
    for m in tail {
        assert_sent_stamp(m);
    }
    // Own messages look different: alice's in alice's page, bob's in bob's page.
    for (page, msgs) in [(alice, &seen_by_alice), (bob, &seen_by_bob)] {
        for m in &msgs[msgs.len() - expected.len()..] {
            assert_eq!(
                m.own,
                m.author == page.name,
                "{}: message {} by {} has the wrong `own` marking",
                page.name,
                m.id,
                m.author
            );
        }
    }
    step("messages shown in order in both pages");

    // The hostile message is text: no element made of it, nothing ran.
    for page in [alice, bob] {
        page.assert_no_markup_ran().await;
    }
    step("markup shown literally, no script ran");

    // A message too large for the gateway's frame limit is refused by the page, with the
    // text kept, instead of getting the socket closed.
    alice.fill(&"長".repeat(30_000)).await;
    alice
        .input()
        .await
        .send_keys(&Key::Enter.to_string())
        .await
        .expect("press Enter");
    alice
        .wait_js(
            "the status line refuses the long message",
            "return document.getElementById('status').textContent.startsWith('message too long')",
        )
        .await;
    assert_eq!(
        alice
            .js::<u64>("return document.getElementById('inputline').value.length")
            .await,
        30_000,
        "the refused text stays in the input line"
    );
    assert_eq!(
        alice.wait_connected().await,
        alice_wsid,
        "still the same socket"
    );
    alice
        .js_value("document.getElementById('inputline').value = ''")
        .await;
    step("oversized message refused in the page");

    // A burst from both pages at once: every page still shows one and the same order,
    // and each page's messages keep their typing order. It also fills the message list
    // past one screen for the layout checks.
    let before_burst = alice.wait_messages(seen_by_alice.len()).await.len();
    tokio::join!(type_burst(alice), type_burst(bob));
    let shown = alice.wait_messages(before_burst + 2 * BURST).await;
    assert_eq!(
        bob.wait_messages(shown.len()).await,
        shown,
        "same order in both pages"
    );
    assert_ordered_unique(alice.name, &shown);
    for name in ["alice", "bob"] {
        let texts: Vec<String> = shown[before_burst..]
            .iter()
            .filter(|m| m.author == name)
            .map(|m| m.text.clone())
            .collect();
        assert_eq!(texts, burst(name), "{name}'s burst, in order");
    }
    step("bursts from both pages in one order");

    // Layout at both widths: side list on the desktop, list above the chat on the phone,
    // and nothing wider than the screen.
    alice.check_layout().await;
    bob.check_layout().await;
    alice.screenshot(artifacts, "desktop-1280x800.png").await;
    bob.screenshot(artifacts, "phone-390x844.png").await;
    step("screenshots saved");

    // A third page comes and goes, under a name made of markup: it shows as text in both
    // online lists and on its message, and leaves both lists when the page closes.
    const CAROL: &str = r#"carol <img src=y onerror="window.__pwned=2">"#;
    pages.push(Page::open(driver, "carol", &cluster.gateway_url(0), Viewport::Desktop).await);
    let (alice, bob, carol) = (&pages[0], &pages[1], &pages[2]);
    carol.wait_connected().await;
    carol.type_line(&format!("alias {CAROL}")).await;
    for page in [alice, bob, carol] {
        page.wait_users(&["alice", "bob", CAROL], &[]).await;
    }
    carol.type_line("hi, carol here").await;
    let shown = bob.wait_messages(shown.len() + 1).await;
    let last = shown.last().expect("a message");
    assert_eq!(
        (last.author.as_str(), last.text.as_str()),
        (CAROL, "hi, carol here")
    );
    assert_eq!(alice.wait_messages(shown.len()).await, shown);
    for page in [alice, bob, carol] {
        page.assert_no_markup_ran().await;
    }
    let carol = pages.pop().expect("carol's page");
    carol.close().await;
    let (alice, bob) = (&pages[0], &pages[1]);
    for page in [alice, bob] {
        page.wait_users(&["alice", "bob"], &[CAROL]).await;
    }
    step("closed page left the online lists");

    // Stop alice's gateway: her page says so, bob's list loses her, and bob keeps talking
    // through the other gateway.
    alice.record_headlines().await;
    cluster.stop_gateway(0).await;
    alice.wait_disconnected("server going away").await;
    bob.wait_users(&["bob"], &["alice"]).await;
    alice
        .screenshot(artifacts, "desktop-disconnected.png")
        .await;
    step("gateway 0 stopped, page shows disconnected");

    let missed = [
        "said while alice was away 1",
        "said while alice was away 2 — 留守中",
    ];
    for text in missed {
        bob.type_line(text).await;
    }
    let before_restart = bob.wait_messages(shown.len() + missed.len()).await;

    cluster.start_gateway(0).await;
    let new_wsid = alice.wait_connected().await;
    assert_ne!(
        new_wsid, alice_wsid,
        "a reconnect is a new socket with a new ID"
    );
    // The alias comes back with the reconnect, without the user typing it again.
    bob.wait_users(&["alice", "bob"], &[]).await;
    let caught_up = alice.wait_messages(before_restart.len()).await;
    assert_eq!(
        caught_up, before_restart,
        "after reconnecting, alice's page has exactly the messages bob's page has"
    );
    assert_ordered_unique(alice.name, &caught_up);
    step("page reconnected by itself and caught up");

    // And the reconnected page still talks under its alias.
    alice.type_line("back again").await;
    let after = bob.wait_messages(caught_up.len() + 1).await;
    let last = after.last().expect("a message");
    assert_eq!(
        (last.author.as_str(), last.text.as_str()),
        ("alice", "back again")
    );
    assert_eq!(alice.wait_messages(after.len()).await, after);
    step("reconnected page sends under its alias");

    // Restart the worker under both pages: no socket closes. The gateways hold
    // the sockets and re-attach them to the new worker, with their aliases and
    // their place in the log; a line typed meanwhile is held and stored once.
    for page in [alice, bob] {
        page.record_headlines().await;
    }
    cluster.stop_worker().await;
    alice.type_line("typed while the worker was away").await;
    cluster.start_worker().await;
    assert_eq!(
        alice.wait_connected().await,
        new_wsid,
        "alice's socket stayed open"
    );
    assert_eq!(
        bob.wait_connected().await,
        bob_wsid,
        "bob's socket stayed open"
    );
    let held = alice.wait_messages(after.len() + 1).await;
    let last = held.last().expect("a message");
    assert_eq!(
        (last.author.as_str(), last.text.as_str()),
        ("alice", "typed while the worker was away")
    );
    let after = held;
    for page in [alice, bob] {
        page.wait_users(&["alice", "bob"], &[]).await;
    }
    bob.type_line("the worker is back").await;
    let everything = alice.wait_messages(after.len() + 1).await;
    assert_eq!(bob.wait_messages(everything.len()).await, everything);
    assert_ordered_unique(alice.name, &everything);
    assert_eq!(
        &everything[..after.len()],
        &after[..],
        "history kept, no duplicates"
    );
    let last = everything.last().expect("a message");
    assert_eq!(
        (last.author.as_str(), last.text.as_str()),
        ("bob", "the worker is back")
    );
    for page in [alice, bob] {
        page.wait_js(
            "the page never showed disconnected",
            "return !window.__headlines.includes('CHAT - disconnected')",
        )
        .await;
    }
    alice
        .screenshot(artifacts, "desktop-after-reconnect.png")
        .await;
    step("a worker restart: both pages stayed connected and lost nothing");

    // A wiped message log starts its ids at 1 again, under a new Log name in
    // the Status frame: the pages must drop what they hold from the old log,
    // or they would hide the new messages as duplicates of old ids.
    cluster.wipe_worker().await;
    alice.wait_connected().await;
    bob.wait_connected().await;
    bob.type_line("a fresh log").await;
    for page in [alice, bob] {
        page.wait_js(
            "only the new log's message is shown",
            "const m = document.querySelectorAll('#chat .msg');
             return m.length === 1 && m[0].dataset.id === '1'
                 && m[0].querySelector('.text').textContent === 'a fresh log';",
        )
        .await;
    }
    step("a wiped log: both pages dropped the old messages and show the new one");
}

// ---------------------------------------------------------------------------------------
// The tutorial's page logic against the gateway.

/// A page that does what the tutorial's page does, written for this test from the
/// tutorial's description: it connects to `/csp/user/Chat.Server.cls` on the gateway,
/// renames with `alias NAME`, posts `btoa(line)` (base64 of Latin-1), reads `Status`,
/// `userlist` (`Users[i].User`) and `Chat` (`atob(Message)`, a raw Latin-1 decode). Two
/// departures that change nothing the test checks: the gateway's address comes from the
/// query string (the page is served by the test, not by the gateway), and text is put
/// in the page with `textContent` (the tutorial builds HTML strings), with no `alert()`
/// on error (which would block WebDriver).
const SEED_PAGE: &str = r#"<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>Chat (the tutorial's page logic)</title>
</head>
<body>
<h1 id="headline">CHAT</h1>
<h2>Online users</h2>
<ul id="userlist"></ul>
<ul id="chat"></ul>
<input id="inputline" type="text">
<button id="send" type="button">Send</button>
<script>
var alias = "";
var host = new URLSearchParams(window.location.search).get("gateway") || window.location.host;
var ws = new WebSocket((window.location.protocol === "https:" ? "wss://" : "ws://") + host +
  "/csp/user/Chat.Server.cls");

ws.onopen = function () {
  document.getElementById("headline").textContent = "CHAT - CONNECTED";
};
ws.onerror = function () {
  document.getElementById("headline").textContent = "CHAT - error";
};
ws.onclose = function () {
  ws = null;
  document.getElementById("headline").textContent = "CHAT - disconnected";
};
ws.onmessage = function (event) {
  var data = JSON.parse(event.data);
  switch (data.Type) {
    case "Status":
      document.getElementById("headline").textContent = "CHAT - connected - " + data.WSID;
      break;
    case "userlist":
      var list = document.getElementById("userlist");
      list.replaceChildren();
      for (var i = 0; i < data.Users.length; i++) {
        list.append(wrapuser(data.Users[i].User));
      }
      break;
    case "Chat":
      document.getElementById("chat").append(wrapmessage(data));
      break;
  }
};

function wrapuser(name) {
  var li = document.createElement("li");
  li.textContent = name;
  return li;
}

function wrapmessage(data) {
  var li = document.createElement("li");
  li.className = "msg";
  var author = document.createElement("b");
  author.className = "author";
  author.textContent = data.Author;
  var sent = document.createElement("i");
  sent.className = "sent";
  sent.textContent = data.Sent;
  var text = document.createElement("span");
  text.className = "text";
  text.textContent = atob(data.Message);
  li.append(author, " ", sent, " ", text);
  return li;
}

function send() {
  var input = document.getElementById("inputline");
  var line = input.value;
  if (line.startsWith("alias ")) {
    alias = line.split(" ")[1];
    if (alias === "") alias = "default";
    ws.send(JSON.stringify({ User: alias }));
  } else {
    var message = btoa(line);
    if (ws && message !== "") ws.send(JSON.stringify({ Message: message, Author: alias }));
  }
  input.value = "";
}

document.getElementById("send").onclick = send;
document.getElementById("inputline").onkeydown = function (event) {
  if (event.key === "Enter") send();
};
</script>
</body>
</html>
"#;

/// Serves [`SEED_PAGE`] over plain HTTP/1.1 on a loopback port, for any path, until the
/// test's runtime ends. Returns `http://127.0.0.1:port`.
async fn serve_seed_page() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind the seed page's server");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Read the request head; the body (there is none) and the path do not
                // matter: every request gets the page.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{SEED_PAGE}",
                    SEED_PAGE.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorials_page_in_a_real_browser() {
    let started = Instant::now();
    let artifacts = artifacts_dir();
    let mut driver = ChromeDriver::start(&artifacts, "chromedriver-seed.log");
    // The tutorial's page is served from its own origin (another port), as
    // an operator would list it in --allowed-origins.
    let cluster = Cluster::builder()
        .mode(Mode::Shared)
        .gateways(2)
        .gateway_config(|c| c.allowed_origins = sharedconn_gateway::origin::AllowedOrigins::Any)
        .start()
        .await;
    let seed_url = serve_seed_page().await;

    let mut pages = Vec::new();
    let outcome = std::panic::AssertUnwindSafe(seed_scenario(
        &cluster, &driver, &seed_url, &artifacts, &mut pages,
    ))
    .catch_unwind()
    .await;
    for page in pages.drain(..) {
        page.close().await;
    }
    driver.stop();
    eprintln!("browser (seed page): finished in {:?}", started.elapsed());
    match outcome {
        Ok(()) => cluster.shutdown().await,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Two tutorial pages on two gateways and one of our pages: names show in every list,
/// a Latin-1 line from a tutorial page reads right everywhere, and a closed page leaves
/// the lists.
async fn seed_scenario(
    cluster: &Cluster,
    driver: &ChromeDriver,
    seed_url: &str,
    artifacts: &Path,
    pages: &mut Vec<Page>,
) {
    let t = Instant::now();
    let step = |what: &str| eprintln!("browser (seed page): {what} ({:?})", t.elapsed());
    for (name, gateway) in [("ann", 0), ("bob", 1)] {
        let url = format!("{seed_url}/?gateway={}", cluster.gateway_addr(gateway));
        pages.push(Page::open_url(driver, name, &url, Viewport::Desktop).await);
    }
    pages.push(Page::open(driver, "ours", &cluster.gateway_url(0), Viewport::Desktop).await);
    let (ann, bob, ours) = (&pages[0], &pages[1], &pages[2]);
    for page in [ann, bob, ours] {
        page.wait_connected().await;
    }
    step("two tutorial pages and ours connected");

    ann.type_line("alias ann").await;
    bob.type_line("alias bob").await;
    ours.type_line("alias ours").await;
    // Every entry is readable: the tutorial page shows `Users[i].User`, which is
    // "undefined" (or empty) when the list has another shape.
    for page in [ann, bob, ours] {
        page.wait_users(&["ann", "bob", "ours"], &["", "undefined", "null"])
            .await;
    }
    step("names readable in every online list");

    // btoa("café crème") is Latin-1 bytes: the tutorial pages show it with atob, our page
    // falls back to Latin-1 because it is not UTF-8.
    const LATIN1: &str = "café crème";
    ann.type_line(LATIN1).await;
    for page in [ann, bob] {
        page.wait_js(
            "the tutorial page shows ann's Latin-1 line",
            &format!(
                "const m = [...document.querySelectorAll('#chat .msg')].pop();
                 return m !== undefined && m.querySelector('.author').textContent === 'ann'
                     && m.querySelector('.text').textContent === {};",
                json!(LATIN1)
            ),
        )
        .await;
    }
    let shown = ours.wait_messages(1).await;
    let last = shown.last().expect("a message");
    assert_eq!((last.author.as_str(), last.text.as_str()), ("ann", LATIN1));
    assert!(!last.own, "ann's line is not ours: {last:?}");
    // And our page's own Latin-1-range text, sent as UTF-8, reads right in our page.
    ours.type_line("déjà vu").await;
    let shown = ours.wait_messages(2).await;
    let last = shown.last().expect("a message");
    assert_eq!(
        (last.author.as_str(), last.text.as_str()),
        ("ours", "déjà vu")
    );
    assert!(last.own);
    ours.screenshot(artifacts, "desktop-with-tutorial-pages.png")
        .await;
    step("a Latin-1 line reads right in the tutorial pages and in ours");

    let bob = pages.remove(1);
    bob.close().await;
    let (ann, ours) = (&pages[0], &pages[1]);
    for page in [ann, ours] {
        page.wait_users(&["ann", "ours"], &["bob"]).await;
    }
    step("a closed tutorial page left the other lists");
}

/// The texts a page sends in the burst step.
fn burst(name: &str) -> Vec<String> {
    (0..BURST).map(|i| format!("{name} burst {i}")).collect()
}

async fn type_burst(page: &Page) {
    for text in burst(page.name) {
        page.type_line(&text).await;
    }
}

// ---------------------------------------------------------------------------------------
// Checks on what the pages show.

/// One `.msg` element of `#chat`, as the user sees it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Shown {
    id: i64,
    author: String,
    sent: String,
    datetime: String,
    text: String,
    own: bool,
}

impl PartialEq for Shown {
    /// The same message as any page shows it; `own` differs from page to page by design.
    fn eq(&self, other: &Shown) -> bool {
        (
            self.id,
            &self.author,
            &self.sent,
            &self.datetime,
            &self.text,
        ) == (
            other.id,
            &other.author,
            &other.sent,
            &other.datetime,
            &other.text,
        )
    }
}

fn assert_ordered_unique(page: &str, msgs: &[Shown]) {
    for pair in msgs.windows(2) {
        assert!(
            pair[0].id < pair[1].id,
            "{page}: messages out of order or duplicated: {} then {} in {msgs:#?}",
            pair[0].id,
            pair[1].id
        );
    }
}

/// `Sent` is `YYYY-MM-DD HH:MM:SS`; the page shows at least the time of day.
fn assert_sent_stamp(m: &Shown) {
    let shape = |s: &str, pattern: &str| {
        s.len() == pattern.len()
            && s.chars().zip(pattern.chars()).all(|(c, p)| match p {
                '9' => c.is_ascii_digit(),
                _ => c == p,
            })
    };
    assert!(
        shape(&m.datetime, "9999-99-99 99:99:99"),
        "message {} has no proper Sent stamp: {m:?}",
        m.id
    );
    let time_of_day = &m.datetime[11..];
    assert!(
        m.sent.ends_with(time_of_day),
        "message {} should show its time {time_of_day}: {m:?}",
        m.id
    );
}

// ---------------------------------------------------------------------------------------
// One browser page.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Viewport {
    Desktop,
    Phone,
}

struct Page {
    /// Also the alias this page's user picks.
    name: &'static str,
    viewport: Viewport,
    client: Client,
}

impl Page {
    /// Starts a browser session and loads the chat page from `base_url` (`http://host:port`).
    async fn open(
        driver: &ChromeDriver,
        name: &'static str,
        base_url: &str,
        viewport: Viewport,
    ) -> Page {
        let url = format!("{}/", base_url.trim_end_matches('/'));
        Page::open_url(driver, name, &url, viewport).await
    }

    /// Starts a browser session and loads `url`.
    async fn open_url(
        driver: &ChromeDriver,
        name: &'static str,
        url: &str,
        viewport: Viewport,
    ) -> Page {
        let mut options = json!({
            "binary": driver.chromium.to_string_lossy(),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--no-first-run",
                "--lang=en-US",
                format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
            ],
        });
        if viewport == Viewport::Phone {
            options["mobileEmulation"] = json!({
                "deviceMetrics": { "width": PHONE.0, "height": PHONE.1, "pixelRatio": 2 },
            });
        }
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .unwrap_or_else(|e| panic!("{name}: chromedriver could not start chromium: {e}"));
        let page = Page {
            name,
            viewport,
            client,
        };
        if viewport == Viewport::Desktop {
            page.fit_viewport(DESKTOP).await;
        }
        page.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{name}: could not load {url}: {e}"));
        page
    }

    /// The page's inline `<script>` and `<style>` are allowed by the hashes in the
    /// Content-Security-Policy the gateway at `gateway` serves it with, and that policy
    /// is in force (an injected inline script does not run). On a mismatch, says which
    /// hashes to put in `crates/gateway/src/http.rs`.
    async fn assert_allowed_by_csp(&self, gateway: SocketAddr) {
        let (status, headers, _) = support::http_get_with_headers(gateway, "/")
            .await
            .expect("GET / from the gateway");
        assert_eq!(status, 200);
        let csp = headers
            .iter()
            .find(|(name, _)| name == "content-security-policy")
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("the page has no Content-Security-Policy: {headers:?}"));
        // The browser hashes what it parsed, exactly as CSP does.
        let hashes = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 const hash = async (el) => {
                     const digest = await crypto.subtle.digest('SHA-256',
                         new TextEncoder().encode(el.textContent));
                     return \"'sha256-\" + btoa(String.fromCharCode(...new Uint8Array(digest)))
                         + \"'\";
                 };
                 Promise.all([hash(document.querySelector('script')),
                              hash(document.querySelector('style'))])
                     .then(([script, style]) => done({ script, style }),
                           (e) => done({ error: String(e) }));",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("{}: hashing the page: {e}", self.name));
        for part in ["script", "style"] {
            let hash = hashes[part]
                .as_str()
                .unwrap_or_else(|| panic!("{}: hashing the page: {hashes}", self.name));
            assert!(
                csp.contains(hash),
                "\n\nthe page's inline <{part}> hashes to {hash}, which the gateway's \
                 Content-Security-Policy does not allow, so the browser will not apply it.\n\
                 Put {hash} in CONTENT_SECURITY_POLICY (crates/gateway/src/http.rs).\n\
                 The policy now: {csp}\n\n"
            );
        }
        let hole = self
            .js_value(
                "const s = document.createElement('script');
                 s.textContent = 'window.__cspHole = 1';
                 document.body.append(s);
                 s.remove();
                 return window.__cspHole === undefined ? null : window.__cspHole;",
            )
            .await;
        assert!(
            hole.is_null(),
            "{}: an injected inline script ran; the CSP is not in force",
            self.name
        );
    }

    /// Sizes the window so the page itself (not the window) is `width` x `height`.
    async fn fit_viewport(&self, (width, height): (u32, u32)) {
        for _ in 0..3 {
            let (inner_w, inner_h): (u32, u32) =
                serde_json::from_value(self.js_value("return [innerWidth, innerHeight]").await)
                    .expect("viewport size");
            if (inner_w, inner_h) == (width, height) {
                return;
            }
            let (outer_w, outer_h) = self.client.get_window_size().await.expect("window size");
            self.client
                .set_window_size(
                    (outer_w as i64 + i64::from(width) - i64::from(inner_w)) as u32,
                    (outer_h as i64 + i64::from(height) - i64::from(inner_h)) as u32,
                )
                .await
                .expect("set window size");
        }
    }

    async fn close(self) {
        let name = self.name;
        if let Err(e) = self.client.close().await {
            eprintln!("browser: closing {name}'s page: {e}");
        }
    }

    async fn js_value(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{}: script failed: {e}\n{script}", self.name))
    }

    async fn js<T: serde::de::DeserializeOwned>(&self, script: &str) -> T {
        let value = self.js_value(script).await;
        serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{}: unexpected script result {value}: {e}", self.name))
    }

    /// Polls `script` (which returns a truthy value when done) until it holds, or fails
    /// the test with a picture of the page.
    async fn wait_js(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let value = self.js_value(script).await;
            let done = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if done {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out after {PAGE_TIMEOUT:?} waiting until {what}\npage state: {:#}",
                    self.name,
                    self.state().await
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// What a failure message should show about the page.
    async fn state(&self) -> Value {
        self.client
            .execute(
                "return {
                    headline: document.getElementById('headline').textContent,
                    headlines: window.__headlines,
                    status: document.getElementById('status').textContent,
                    users: [...document.querySelectorAll('#userlist li')].map(li => li.textContent),
                    messages: [...document.querySelectorAll('#chat .msg')].map(m =>
                        m.dataset.id + ' ' + m.querySelector('.author').textContent + ': ' +
                        m.querySelector('.text').textContent),
                }",
                vec![],
            )
            .await
            .unwrap_or_else(|e| json!(format!("(page state unavailable: {e})")))
    }

    /// User text (messages, aliases) never became elements and never ran: `#chat` and
    /// `#userlist` hold only the page's own element kinds, and `window.__pwned` (what
    /// the hostile texts try to set) is unset.
    async fn assert_no_markup_ran(&self) {
        let pwned = self.js_value("return window.__pwned").await;
        assert!(
            pwned.is_null(),
            "{}: markup in user text ran script",
            self.name
        );
        let foreign: Vec<String> = self
            .js("return [...document.querySelectorAll(
                    '#chat :not(li, div, span, time), #userlist :not(li)')]
                    .map(e => e.outerHTML)")
            .await;
        assert!(
            foreign.is_empty(),
            "{}: user text became elements: {foreign:?}",
            self.name
        );
    }

    /// Waits for `CHAT - connected - <WSID>` and returns the WSID.
    async fn wait_connected(&self) -> String {
        let wsid: String = serde_json::from_value(
            self.wait_js(
                "headline shows `CHAT - connected - <WSID>`",
                "const h = document.getElementById('headline').textContent;
                 const p = 'CHAT - connected - ';
                 return h.startsWith(p) && h.length > p.length ? h.slice(p.length) : null;",
            )
            .await,
        )
        .expect("wsid");
        wsid
    }

    /// Records every headline and status-line text from now on in `window.__headlines`
    /// and `window.__statuses`, so a short-lived state (disconnected, then already
    /// reconnecting) cannot be missed by polling.
    async fn record_headlines(&self) {
        self.js_value(
            "const record = (id, log) => {
                 const el = document.getElementById(id);
                 window[log] = [el.textContent];
                 new MutationObserver(() => window[log].push(el.textContent))
                     .observe(el, { childList: true, characterData: true, subtree: true });
             };
             record('headline', '__headlines');
             record('status', '__statuses');",
        )
        .await;
    }

    /// Waits until the headline has shown `CHAT - disconnected` (since
    /// `record_headlines`) and the status line has given `reason` for it.
    async fn wait_disconnected(&self, reason: &str) {
        self.wait_js(
            "headline shows `CHAT - disconnected`",
            "return window.__headlines.includes('CHAT - disconnected')",
        )
        .await;
        self.wait_js(
            &format!("status line says {reason:?}"),
            &format!(
                "return window.__statuses.some(s => s.startsWith({}))",
                json!(reason)
            ),
        )
        .await;
    }

    /// Waits until the online list contains every name in `present` and none in `absent`.
    async fn wait_users(&self, present: &[&str], absent: &[&str]) {
        let script = format!(
            "const users = [...document.querySelectorAll('#userlist li')].map(li => li.textContent);
             const present = {};
             const absent = {};
             return present.every(u => users.includes(u)) && !absent.some(u => users.includes(u));",
            json!(present),
            json!(absent),
        );
        self.wait_js(
            &format!("the online list has {present:?} and not {absent:?}"),
            &script,
        )
        .await;
    }

    /// Waits until at least `count` messages are shown, then returns all of them.
    async fn wait_messages(&self, count: usize) -> Vec<Shown> {
        self.wait_js(
            &format!("{count} messages are shown"),
            &format!("return document.querySelectorAll('#chat .msg').length >= {count}"),
        )
        .await;
        // Let a frame that is still on its way land, so two pages are compared at rest.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.js(
            "return [...document.querySelectorAll('#chat .msg')].map(m => ({
                id: Number(m.dataset.id),
                author: m.querySelector('.author').textContent,
                sent: m.querySelector('.sent').textContent,
                datetime: m.querySelector('.sent').getAttribute('datetime') || '',
                text: m.querySelector('.text').textContent,
                own: m.classList.contains('own'),
            }))",
        )
        .await
    }

    async fn input(&self) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Id("inputline"))
            .await
            .unwrap_or_else(|e| panic!("{}: no #inputline: {e}", self.name))
    }

    /// Puts `text` in the input line: real key presses where chromedriver can type the
    /// characters (it cannot type outside the Basic Multilingual Plane, e.g. emoji) and
    /// the text is short enough to type quickly, the value set directly otherwise.
    async fn fill(&self, text: &str) -> fantoccini::elements::Element {
        let input = self.input().await;
        if text.chars().count() <= MAX_TYPED_CHARS && text.chars().all(|c| (c as u32) < 0x10000) {
            input
                .send_keys(text)
                .await
                .expect("type into the input line");
        } else {
            self.client
                .execute(
                    "const i = document.getElementById('inputline');
                     i.value = arguments[0];
                     i.dispatchEvent(new Event('input', { bubbles: true }));",
                    vec![json!(text)],
                )
                .await
                .expect("set the input line");
        }
        input
    }

    /// Types a line and presses Enter; the input must be empty afterwards (sent).
    async fn type_line(&self, text: &str) {
        let input = self.fill(text).await;
        input
            .send_keys(&Key::Enter.to_string())
            .await
            .expect("press Enter");
        self.wait_input_cleared(text).await;
    }

    /// Types a line and clicks the Send button.
    async fn type_and_click_send(&self, text: &str) {
        self.fill(text).await;
        self.client
            .find(Locator::Id("send"))
            .await
            .expect("#send")
            .click()
            .await
            .expect("click #send");
        self.wait_input_cleared(text).await;
    }

    async fn wait_input_cleared(&self, text: &str) {
        self.wait_js(
            &format!("the input line is cleared after sending {text:?}"),
            "return document.getElementById('inputline').value === ''",
        )
        .await;
    }

    /// The page fills the screen without scrolling itself (only the message list
    /// scrolls, and it shows the newest message), header, messages and input line do
    /// not overlap, and the user list sits beside the chat on a desktop and above it on
    /// a phone.
    async fn check_layout(&self) {
        let (width, height) = match self.viewport {
            Viewport::Desktop => DESKTOP,
            Viewport::Phone => PHONE,
        };
        let placement = match self.viewport {
            Viewport::Desktop => "users.left >= chat.right - 1",
            Viewport::Phone => "users.bottom <= chat.top + 1",
        };
        let script = format!(
            "const r = (el) => el.getBoundingClientRect();
             const chat = r(document.getElementById('chat'));
             const users = r(document.getElementById('userlist'));
             const header = r(document.querySelector('header'));
             const footer = r(document.querySelector('footer'));
             const input = r(document.getElementById('inputline'));
             const msgs = document.querySelectorAll('#chat .msg');
             const newest = msgs.length ? r(msgs[msgs.length - 1]) : null;
             const root = document.documentElement;
             return {{
                'viewport is {width}x{height}': innerWidth === {width} && innerHeight === {height},
                'page does not scroll sideways': root.scrollWidth <= innerWidth,
                'page does not scroll down': root.scrollHeight <= innerHeight,
                'header above the messages': header.bottom <= chat.top + 1,
                'messages above the input line': chat.bottom <= footer.top + 1,
                'input line on screen': input.top >= 0 && input.bottom <= innerHeight,
                'newest message in view': newest !== null &&
                    newest.bottom <= chat.bottom + 1 && newest.bottom > chat.top,
                'user list placement ({placement})': {placement},
             }};"
        );
        let checks = self.js_value(&script).await;
        let failed: Vec<&String> = checks
            .as_object()
            .expect("layout checks")
            .iter()
            .filter(|(_, ok)| **ok != json!(true))
            .map(|(name, _)| name)
            .collect();
        assert!(
            failed.is_empty(),
            "{}: layout at {width}x{height} is off: {failed:?}",
            self.name
        );
    }

    async fn screenshot(&self, dir: &Path, file: &str) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("{}: screenshot: {e}", self.name));
        let path = dir.join(file);
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("browser: screenshot {}", path.display());
    }
}

// ---------------------------------------------------------------------------------------
// chromedriver, started and stopped by the test.

struct ChromeDriver {
    child: Option<Child>,
    url: String,
    chromium: PathBuf,
}

impl ChromeDriver {
    /// Starts chromedriver on a free local port; fails the test when the browser or the
    /// driver is not installed.
    fn start(artifacts: &Path, log_name: &str) -> ChromeDriver {
        let missing: Vec<&str> = ["chromium", "chromedriver"]
            .into_iter()
            .filter(|tool| find_on_path(tool).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "\n\nthe browser test needs {} on PATH, which {} not installed.\n\
             Install them with: apt-get install -y chromium chromium-driver\n\
             (or run .ci/test-deps)\n\n",
            missing.join(" and "),
            if missing.len() == 1 { "is" } else { "are" },
        );
        let chromium = find_on_path("chromium").expect("checked above");
        let chromedriver = find_on_path("chromedriver").expect("checked above");

        let port = free_port();
        let log = std::fs::File::create(artifacts.join(log_name))
            .unwrap_or_else(|e| panic!("create {log_name}: {e}"));
        let mut command = Command::new(&chromedriver);
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // Its own process group, so stopping it also stops every chromium it started.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", chromedriver.display()));
        let mut driver = ChromeDriver {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            chromium,
        };

        let deadline = Instant::now() + DRIVER_START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = driver
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "chromedriver exited at startup ({status}); see target/browser-artifacts/{log_name}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within {DRIVER_START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }

    /// Kills chromedriver and whatever is left in its process group.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The group id is the child's pid (process_group(0) above).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .map(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
                .unwrap_or(false)
        })
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `target/browser-artifacts`, next to the `tmp` dir cargo gives integration tests.
fn artifacts_dir() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let dir = target.join("browser-artifacts");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

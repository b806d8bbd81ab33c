//! The seed's chat, end to end: real sockets, real gRPC, a real worker and
//! real gateways, in both connection modes.

#[macro_use]
mod support;

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::SinkExt;
use serde_json::json;

use support::{Client, Cluster, Ended, Mode, http_get};
use tokio_tungstenite::tungstenite::Message;

both_modes!(
    status_comes_first_with_a_unique_id,
    aliases_reach_every_list,
    messages_reach_everyone_in_one_order,
    unicode_round_trips,
    author_is_the_alias_the_server_holds,
    bad_frames_get_an_error_and_the_socket_stays_usable,
    binary_frame_closes_with_1003,
    oversize_frame_closes_with_1009,
    closed_window_leaves_the_list,
    worker_restart_keeps_the_sockets_the_log_and_the_ids,
    slow_reader_does_not_delay_the_others,
    a_slow_reader_catches_up_in_order,
    a_silent_client_is_pinged_then_closed,
    a_name_held_by_someone_online_is_refused,
    a_mass_close_and_churn_touch_nobody_else,
    a_half_sent_frame_is_timed_out,
    new_socket_gets_recent_history_then_live,
    reconnect_with_since_replays_only_what_was_missed,
    gateway_shutdown_closes_with_1001,
    flooding_client_is_slowed_not_dropped,
    no_worker_means_a_clear_refusal_until_it_is_back,
    a_client_that_pings_and_never_reads_is_still_cut,
    the_seed_pages_wire_format,
    aliases_with_controls_or_bidi_overrides_are_refused,
    a_frame_with_user_and_message_is_refused,
);

async fn status_comes_first_with_a_unique_id(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut ids = HashSet::new();
    for i in 0..6 {
        let c = Client::connect(&cluster.ws_url(i % 2)).await;
        assert!(ids.insert(c.wsid.clone()), "WSID {} issued twice", c.wsid);
    }
    // The seed page's own path works too.
    let seed_url = format!("ws://{}/csp/user/Chat.Server.cls", cluster.gateway_addr(0));
    let c = Client::connect(&seed_url).await;
    assert!(ids.insert(c.wsid.clone()));
    cluster.shutdown().await;
}

async fn aliases_reach_every_list(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut bob = Client::connect(&cluster.ws_url(1)).await;
    ann.alias("ann").await;
    bob.alias("bob").await;
    let both = |u: &[String]| u.contains(&"ann".into()) && u.contains(&"bob".into());
    ann.userlist_until(both).await;
    bob.userlist_until(both).await;
    // Empty means "default"; renaming replaces, it does not add.
    ann.alias("").await;
    let list = bob.userlist_until(|u| u.contains(&"default".into())).await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(!list.contains(&"ann".into()));
    cluster.shutdown().await;
}

async fn messages_reach_everyone_in_one_order(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect(&cluster.ws_url(i % 2)).await;
        c.alias(&format!("user{i}")).await;
        clients.push(c);
    }
    const EACH: usize = 15;
    for round in 0..EACH {
        for (i, c) in clients.iter_mut().enumerate() {
            c.say(&format!("m{i}-{round}")).await;
        }
    }
    let mut orders = Vec::new();
    for c in &mut clients {
        let got = c.chats(EACH * clients_len()).await;
        let ids: Vec<u64> = got.iter().map(|(id, _, _)| *id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids not increasing: {ids:?}"
        );
        orders.push(got);
    }
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "two clients saw different orders");
    }
    // Every message arrived exactly once, the sender's own included.
    let texts: HashSet<&str> = orders[0].iter().map(|(_, _, t)| t.as_str()).collect();
    assert_eq!(texts.len(), EACH * clients_len());
    // Each sender's messages keep the order it sent them in.
    for i in 0..clients_len() {
        let mine: Vec<&str> = orders[0]
            .iter()
            .filter(|(_, a, _)| *a == format!("user{i}"))
            .map(|(_, _, t)| t.as_str())
            .collect();
        let sent: Vec<String> = (0..EACH).map(|r| format!("m{i}-{r}")).collect();
        assert_eq!(mine, sent);
    }
    cluster.shutdown().await;
}

fn clients_len() -> usize {
    4
}

async fn unicode_round_trips(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    let mut b = Client::connect(&cluster.ws_url(0)).await;
    a.alias("さくら 🌸").await;
    a.userlist_until(|u| u.contains(&"さくら 🌸".into())).await;
    let text = "こんにちは、世界 🌸🚀 — ñ, ü, 中文, עברית, \"quotes\" <tags> \\ \u{0}";
    a.say(text).await;
    for c in [&mut a, &mut b] {
        let got = c.chats(1).await;
        assert_eq!(got[0].1, "さくら 🌸");
        assert_eq!(got[0].2, text);
    }
    cluster.shutdown().await;
}

async fn author_is_the_alias_the_server_holds(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut bob = Client::connect(&cluster.ws_url(0)).await;
    // Before any alias the author is "default", whatever the frame claims.
    ann.say_as("bob", "first").await;
    assert_eq!(bob.chats(1).await[0].1, "default");
    ann.alias("ann").await;
    bob.alias("bob").await;
    ann.say_as("bob", "I am not bob").await;
    let got = bob.chats(1).await;
    assert_eq!(
        (got[0].1.as_str(), got[0].2.as_str()),
        ("ann", "I am not bob")
    );
    cluster.shutdown().await;
}

async fn bad_frames_get_an_error_and_the_socket_stays_usable(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut bad = Client::connect(&cluster.ws_url(0)).await;
    let mut other = Client::connect(&cluster.ws_url(0)).await;
    let cases = [
        ("{not json", "bad_json"),
        ("[1,2,3]", "bad_shape"),
        (r#"{"Hello":"x"}"#, "bad_shape"),
        (r#"{"User":42}"#, "bad_alias"),
        (r#"{"Message":"%%% not base64"}"#, "bad_message"),
        (r#"{"Message":"/w"}"#, "bad_message"),
        (r#"{"Message":""}"#, "bad_message"),
        (r#"{"User":"x\u202e"}"#, "bad_alias"),
        (r#"{"User":"x","Message":"eA=="}"#, "ambiguous_frame"),
    ];
    for (frame, code) in cases {
        bad.send_text(frame).await;
        let v = bad.next_of("Error").await;
        assert_eq!(v["Code"], code, "for {frame}: {v}");
        assert!(v["Error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Still usable, and nobody else heard about any of it.
    bad.say("still here").await;
    assert_eq!(bad.chats(1).await[0].2, "still here");
    let v = other.next_of("Chat").await;
    assert_eq!(support::unb64(v["Message"].as_str().unwrap()), "still here");
    cluster.shutdown().await;
}

/// What the tutorial's own page sends and reads: `btoa` of Latin-1 text,
/// passed on byte for byte, and the online list as `[{"User":..}]`.
async fn the_seed_pages_wire_format(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut bob = Client::connect(&cluster.ws_url(1)).await;
    ann.alias("ann").await;
    bob.alias("bob").await;
    bob.userlist_until(|u| u.len() == 2).await;
    // A list of objects, each with a `User` field, as the seed page reads it.
    ann.alias("ann2").await;
    let list = loop {
        let v = bob.next_of("userlist").await;
        if support::userlist_names(&v).contains(&"ann2".to_owned()) {
            break v;
        }
    };
    let mut users = list["Users"].as_array().expect("Users is an array").clone();
    users.sort_by_key(|u| u.to_string());
    assert_eq!(
        users,
        vec![json!({ "User": "ann2" }), json!({ "User": "bob" })],
        "{list}"
    );
    // btoa("café crème"): Latin-1 bytes, which are not UTF-8.
    let latin1 = STANDARD.encode(b"caf\xe9 cr\xe8me");
    assert!(std::str::from_utf8(&STANDARD.decode(&latin1).unwrap()).is_err());
    ann.send_text(json!({ "Message": latin1, "Author": "ann2" }).to_string())
        .await;
    for c in [&mut ann, &mut bob] {
        let v = c.next_of("Chat").await;
        assert_eq!(v["Message"], latin1.as_str(), "passed on unchanged: {v}");
        assert_eq!(v["Author"], "ann2");
    }
    cluster.shutdown().await;
}

/// Control characters and bidi overrides in a name are refused, not
/// stripped: the rename does not happen, the old name stays, and the socket
/// is still usable.
async fn aliases_with_controls_or_bidi_overrides_are_refused(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut watcher = Client::connect(&cluster.ws_url(0)).await;
    ann.alias("ann").await;
    watcher.userlist_until(|u| u == ["ann"]).await;
    for bad in [
        "ann\u{202E}nib",
        "\u{2066}admin\u{2069}",
        "a\u{1b}[2Jb",
        "line\nbreak",
        "nul\u{0}",
        "c1\u{9b}x",
        "del\u{7f}",
    ] {
        ann.alias(bad).await;
        let v = ann.next_of("Error").await;
        assert_eq!(v["Code"], "bad_alias", "for {bad:?}: {v}");
    }
    // The name is unchanged: a post is still ann's, and a rename that is
    // fine still works.
    ann.say("still ann").await;
    let got = watcher.chats(1).await;
    assert_eq!((got[0].1.as_str(), got[0].2.as_str()), ("ann", "still ann"));
    ann.alias("  ann again\t").await;
    watcher.userlist_until(|u| u == ["ann again"]).await;
    cluster.shutdown().await;
}

/// `{"User":..,"Message":..}` used to rename and drop the post without a
/// word. Now neither half is done and the sender is told.
async fn a_frame_with_user_and_message_is_refused(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut watcher = Client::connect(&cluster.ws_url(0)).await;
    ann.alias("ann").await;
    watcher.userlist_until(|u| u == ["ann"]).await;
    ann.send_text(json!({ "User": "mallory", "Message": support::b64("hi") }).to_string())
        .await;
    let v = ann.next_of("Error").await;
    assert_eq!(v["Code"], "ambiguous_frame", "{v}");
    assert!(v["Error"].as_str().is_some_and(|e| !e.is_empty()));
    // Usable, still ann, and the refused post never reached anyone.
    ann.say("after").await;
    let got = watcher.chats(1).await;
    assert_eq!((got[0].1.as_str(), got[0].2.as_str()), ("ann", "after"));
    assert_eq!(ann.chats(1).await[0].2, "after");
    cluster.shutdown().await;
}

async fn binary_frame_closes_with_1003(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut c = Client::connect(&cluster.ws_url(0)).await;
    let mut other = Client::connect(&cluster.ws_url(0)).await;
    c.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(c.ended().await, Ended::Closed(1003));
    other.say("unaffected").await;
    assert_eq!(other.chats(1).await[0].2, "unaffected");
    cluster.shutdown().await;
}

async fn oversize_frame_closes_with_1009(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).start().await;
    let mut c = Client::connect(&cluster.ws_url(0)).await;
    let mut other = Client::connect(&cluster.ws_url(0)).await;
    let big = format!(r#"{{"Message":"{}"}}"#, "A".repeat(70 * 1024));
    c.send_text(big).await;
    assert_eq!(c.ended().await, Ended::Closed(1009));
    // Just under the limit is fine.
    let text = "x".repeat(40 * 1024);
    other.say(&text).await;
    assert_eq!(other.chats(1).await[0].2, text);
    cluster.shutdown().await;
}

async fn closed_window_leaves_the_list(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut bob = Client::connect(&cluster.ws_url(1)).await;
    ann.alias("ann").await;
    bob.alias("bob").await;
    bob.userlist_until(|u| u.len() == 2).await;
    ann.ws.close(None).await.unwrap();
    let list = bob.userlist_until(|u| !u.contains(&"ann".into())).await;
    assert_eq!(list, vec!["bob".to_owned()]);
    // A socket dropped without a close handshake leaves too.
    let mut cat = Client::connect(&cluster.ws_url(0)).await;
    cat.alias("cat").await;
    bob.userlist_until(|u| u.contains(&"cat".into())).await;
    drop(cat);
    bob.userlist_until(|u| !u.contains(&"cat".into())).await;
    cluster.shutdown().await;
}

/// A worker stopped and started again (an upgrade) closes no socket: the
/// gateway holds the sockets and what their clients send, and re-attaches
/// them with their alias and their place in the log.
async fn worker_restart_keeps_the_sockets_the_log_and_the_ids(mode: Mode) {
    let mut cluster = Cluster::builder().mode(mode).start().await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    let mut w = Client::connect(&cluster.ws_url(0)).await;
    a.alias("ann").await;
    w.userlist_until(|u| u == ["ann"]).await;
    for t in ["one", "two", "three"] {
        a.say(t).await;
    }
    let before = a.chats(3).await;
    assert_eq!(w.chats(3).await, before);
    cluster.stop_worker().await;
    // Sent while no worker runs: held by the gateway, stored once later.
    a.say("four").await;
    cluster.start_worker().await;
    let after = a.chats(1).await;
    assert_eq!(
        after[0],
        (before[2].0 + 1, "ann".to_owned(), "four".to_owned()),
        "the same socket, alias kept, ids continue"
    );
    assert_eq!(w.chats(1).await, after, "the other socket too");
    w.say("five").await;
    assert_eq!(a.chats(1).await[0].0, after[0].0 + 1);
    let b = Client::connect(&cluster.ws_url(0)).await;
    assert_eq!(b.log, a.log, "the same log after a restart");
    // A wiped log is a new log: the open sockets get a Status with its new
    // name, and ids start over, so clients holding old ids know to drop them.
    cluster.wipe_worker().await;
    let status = a.next_of("Status").await;
    assert_ne!(status["Log"], a.log.as_str());
    assert_eq!(status["WSID"], a.wsid.as_str(), "the same socket");
    a.say("fresh").await;
    assert_eq!(a.chats(1).await[0].0, 1);
    cluster.shutdown().await;
}

async fn slow_reader_does_not_delay_the_others(mode: Mode) {
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| {
            c.socket_queue = 32;
            c.frames_per_sec = 10_000;
            c.frame_burst = 10_000;
            c.stall_timeout = std::time::Duration::from_secs(2);
        })
        .start()
        .await;
    // Never reads, with a tiny receive buffer: the gateway's writes to it
    // block, its queue overflows (it falls behind), and after the stall
    // timeout with no progress it is cut.
    let mut slow = Client::connect_with_recv_buffer(&cluster.ws_url(0), 4096).await;
    let mut fast = Client::connect(&cluster.ws_url(0)).await;
    let mut sender = Client::connect(&cluster.ws_url(0)).await;
    const N: usize = 300;
    let text = "z".repeat(30 * 1024);
    let reader = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(N);
        for _ in 0..N {
            let v = fast.next_of("Chat").await;
            ids.push(v["ID"].as_u64().unwrap());
        }
        ids
    });
    // Paced by the sender's own echo, so a reader that keeps up never has
    // more than a few frames queued.
    let mut sent = Vec::with_capacity(N);
    for i in 0..N {
        sender.say(&format!("{i} {text}")).await;
        sent.push(sender.next_of("Chat").await["ID"].as_u64().unwrap());
    }
    let got = reader.await.expect("the fast reader was held up");
    assert_eq!(got, sent, "the fast reader got every message, in order");
    // The slow socket made no progress and was cut; it held nobody up.
    // (Reading it earlier would be progress: it would catch up instead.)
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let ended = slow.ended().await;
    assert!(
        matches!(ended, Ended::Closed(1008) | Ended::Dropped),
        "{ended:?}"
    );
    cluster.shutdown().await;
}

/// A socket that does not read for a while falls behind (its queue is
/// dropped) and is not closed: once it reads again, the gateway fetches what
/// it missed from the log, and it sees every message, in order, once.
async fn a_slow_reader_catches_up_in_order(mode: Mode) {
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| {
            c.socket_queue = 16;
            c.frames_per_sec = 10_000;
            c.frame_burst = 10_000;
        })
        .start()
        .await;
    let mut slow = Client::connect_with_recv_buffer(&cluster.ws_url(0), 4096).await;
    let mut sender = Client::connect(&cluster.ws_url(0)).await;
    const N: usize = 300;
    let text = "y".repeat(30 * 1024);
    let mut sent = Vec::with_capacity(N);
    for i in 0..N {
        sender.say(&format!("{i} {text}")).await;
        sent.push(sender.next_of("Chat").await["ID"].as_u64().unwrap());
    }
    // 9 MB went by: far more than its queue and socket buffers hold.
    let got: Vec<u64> = slow.chats(N).await.into_iter().map(|c| c.0).collect();
    assert_eq!(got, sent, "every message, in order, once");
    sender.say("live again").await;
    assert_eq!(slow.chats(1).await[0].2, "live again");
    cluster.shutdown().await;
}

/// The gateway pings a silent client; one that never answers is closed
/// (1001) and leaves the list, one that answers stays.
async fn a_silent_client_is_pinged_then_closed(mode: Mode) {
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| {
            c.ping_interval = std::time::Duration::from_millis(300);
            c.pong_timeout = std::time::Duration::from_millis(300);
        })
        .start()
        .await;
    let mut ghost = Client::connect(&cluster.ws_url(0)).await;
    let mut alive = Client::connect(&cluster.ws_url(0)).await;
    ghost.alias("ghost").await;
    alive.alias("alive").await;
    // The live client reads (tungstenite answers pings as it reads); the
    // ghost reads nothing, so it answers nothing.
    let names = alive.userlist_until(|u| u.len() == 2).await;
    assert_eq!(names, ["ghost", "alive"]);
    let users = alive
        .userlist_until(|u| !u.contains(&"ghost".to_owned()))
        .await;
    assert_eq!(users, ["alive"]);
    assert_eq!(ghost.ended().await, Ended::Closed(1001));
    alive.say("still here").await;
    assert_eq!(alive.chats(1).await[0].2, "still here");
    cluster.shutdown().await;
}

/// A client that starts a frame and never finishes it is closed (1008)
/// after the frame timeout, instead of holding its buffer for ever.
async fn a_half_sent_frame_is_timed_out(mode: Mode) {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| c.frame_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut half = Client::connect(&cluster.ws_url(0)).await;
    // A masked text frame announcing 1000 bytes, of which 10 are sent.
    let mut frame = vec![0x81, 0x80 | 126, 0x03, 0xe8, 1, 2, 3, 4];
    frame.extend_from_slice(&[b'x'; 10]);
    match half.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.write_all(&frame).await.unwrap(),
        _ => unreachable!("plain ws"),
    }
    assert_eq!(half.ended().await, Ended::Closed(1008));
    let mut other = Client::connect(&cluster.ws_url(0)).await;
    other.say("unaffected").await;
    assert_eq!(other.chats(1).await[0].2, "unaffected");
    cluster.shutdown().await;
}

/// Nobody can take the name of someone online (and post as them); the
/// name is free again once its holder leaves.
async fn a_name_held_by_someone_online_is_refused(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).gateways(2).start().await;
    let mut ann = Client::connect(&cluster.ws_url(0)).await;
    let mut mallory = Client::connect(&cluster.ws_url(1)).await;
    ann.alias("ann").await;
    mallory.userlist_until(|u| u == ["ann"]).await;
    mallory.alias("ann").await;
    let v = mallory.next_of("Error").await;
    assert_eq!(v["Code"], "alias_taken", "{v}");
    ann.alias("ann").await; // Renaming to one's own name is fine.
    drop(ann);
    mallory.userlist_until(|u| u.is_empty()).await;
    mallory.alias("ann").await;
    mallory.userlist_until(|u| u == ["ann"]).await;
    cluster.shutdown().await;
}

/// 5,000 sockets dropping at once, then 20,000 connect/close cycles (in
/// private mode, as many streams ending together, which h2 must not take
/// for abuse): the honest clients notice nothing.
async fn a_mass_close_and_churn_touch_nobody_else(mode: Mode) {
    // Ann and Bob are not read during the churn, so nothing answers the
    // gateway's pings for them (a browser answers at once); on a slow
    // machine the churn outlasted ping interval + pong timeout (45 s).
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| c.ping_interval = std::time::Duration::from_secs(3600))
        .start()
        .await;
    let url = cluster.ws_url(0);
    let mut ann = Client::connect(&url).await;
    let mut bob = Client::connect(&url).await;
    let mut crowd = Vec::new();
    for _ in 0..5000 {
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        crowd.push(ws);
    }
    drop(crowd);
    for _ in 0..400 {
        let cycles = (0..50).map(|_| async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .unwrap();
            let _ = ws.close(None).await;
        });
        futures_util::future::join_all(cycles).await;
    }
    ann.say("after the crowd").await;
    assert_eq!(bob.chats(1).await[0].2, "after the crowd");
    bob.say("still here").await;
    assert_eq!(ann.chats(2).await[1].2, "still here");
    cluster.shutdown().await;
}

async fn new_socket_gets_recent_history_then_live(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).history(5).start().await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    for i in 0..8 {
        a.say(&format!("h{i}")).await;
    }
    let all = a.chats(8).await;
    let mut b = Client::connect(&cluster.ws_url(0)).await;
    let history = b.chats(5).await;
    assert_eq!(
        history,
        all[3..].to_vec(),
        "the 5 most recent, oldest first"
    );
    a.say("live").await;
    let live = b.chats(1).await;
    assert_eq!(live[0].0, all[7].0 + 1);
    cluster.shutdown().await;
}

async fn reconnect_with_since_replays_only_what_was_missed(mode: Mode) {
    let cluster = Cluster::builder().mode(mode).history(2).start().await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    for i in 0..6 {
        a.say(&format!("s{i}")).await;
    }
    let all = a.chats(6).await;
    let since = all[1].0;
    let url = format!("{}?since={since}", cluster.ws_url(0));
    let mut b = Client::connect(&url).await;
    assert_eq!(b.chats(4).await, all[2..].to_vec());
    a.say("after").await;
    assert_eq!(b.chats(1).await[0].2, "after");
    cluster.shutdown().await;
}

async fn a_client_that_pings_and_never_reads_is_still_cut(mode: Mode) {
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| {
            c.socket_queue = 32;
            c.frames_per_sec = 1_000_000;
            c.frame_burst = 1_000_000;
            c.stall_timeout = std::time::Duration::from_secs(1);
        })
        .start()
        .await;
    let mut ghost = Client::connect_with_recv_buffer(&cluster.ws_url(0), 4096).await;
    let mut watcher = Client::connect(&cluster.ws_url(0)).await;
    ghost.alias("ghost").await;
    watcher
        .userlist_until(|u| u.contains(&"ghost".into()))
        .await;
    // Pings with big payloads and never a read, until our pongs have filled
    // its window and the gateway stops reading it (its sends stall).
    let stalled = tokio::spawn(async move {
        let payload = vec![b'p'; 125];
        for _ in 0..200_000 {
            let ping = Message::Ping(payload.clone().into());
            let sent =
                tokio::time::timeout(std::time::Duration::from_millis(500), ghost.ws.send(ping))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                return (ghost, true);
            }
        }
        (ghost, false)
    });
    let (_ghost, stalled) = stalled.await.unwrap();
    assert!(stalled, "the gateway kept reading the ghost's pings");
    // Now its queue overflows: more than its socket buffers can take too, in
    // case a busy machine made its sends stall before our pongs did.
    let text = "z".repeat(30 * 1024);
    for i in 0..200 {
        watcher.say(&format!("{i} {text}")).await;
        watcher.next_of("Chat").await;
    }
    // The ghost made no progress for the stall timeout: it is cut and leaves
    // the list (as a newcomer sees it; the watcher skipped lists while
    // reading chats).
    let deadline = tokio::time::Instant::now() + support::WAIT;
    loop {
        let url = format!("{}?since=999999", cluster.ws_url(0));
        let mut newcomer = Client::connect(&url).await;
        let users = newcomer.userlist_until(|_| true).await;
        if !users.contains(&"ghost".into()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ghost is still listed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_too_long_is_announced_as_a_gap() {
    let cluster = Cluster::builder()
        .gateway_config(|c| {
            c.frames_per_sec = 100_000;
            c.frame_burst = 100_000;
        })
        .start()
        .await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    const N: u64 = 1005; // more than the 500 replayed
    for i in 0..N {
        a.say(&format!("g{i}")).await;
    }
    let all = a.chats(N as usize).await;
    let since = all[0].0;
    let url = format!("{}?since={since}", cluster.ws_url(0));
    let mut b = Client::connect(&url).await;
    // 1004 missed, 500 replayed: the first 504 are announced, not sent.
    let gap = b.next().await;
    assert_eq!(gap["Type"], "Gap", "{gap}");
    assert_eq!(gap["After"], since);
    assert_eq!(gap["Missed"], 504);
    let replay = b.chats(500).await;
    assert_eq!(replay[0].0, since + 505);
    assert_eq!(replay.last().unwrap().0, all.last().unwrap().0);
    cluster.shutdown().await;
}

async fn gateway_shutdown_closes_with_1001(mode: Mode) {
    let mut cluster = Cluster::builder().mode(mode).start().await;
    let mut a = Client::connect(&cluster.ws_url(0)).await;
    cluster.stop_gateway(0).await;
    assert_eq!(a.ended().await, Ended::Closed(1001));
    cluster.shutdown().await;
}

async fn flooding_client_is_slowed_not_dropped(mode: Mode) {
    let cluster = Cluster::builder()
        .mode(mode)
        .gateway_config(|c| {
            c.frames_per_sec = 100;
            c.frame_burst = 20;
        })
        .start()
        .await;
    let mut flooder = Client::connect(&cluster.ws_url(0)).await;
    let mut other = Client::connect(&cluster.ws_url(0)).await;
    const N: usize = 200;
    // Written as fast as the socket takes them: the gateway reads them no
    // faster than its rate limit, and the rest waits in TCP buffers.
    let flood = tokio::spawn(async move {
        for i in 0..N {
            flooder.say(&format!("flood {i}")).await;
        }
        flooder
    });
    // Wait until the flood is under way, then speak up.
    let first = other.next_of("Chat").await;
    other.say("me too").await;
    let mut seen = vec![support::unb64(first["Message"].as_str().unwrap())];
    let mut mine = None;
    while seen.len() < N {
        let v = other.next_of("Chat").await;
        let text = support::unb64(v["Message"].as_str().unwrap());
        if text == "me too" {
            mine = Some(seen.len());
        } else {
            seen.push(text);
        }
    }
    let _flooder = flood.await.unwrap();
    // Nothing of the flood was lost or reordered...
    let expected: Vec<String> = (0..N).map(|i| format!("flood {i}")).collect();
    assert_eq!(seen, expected);
    // ...and the other client was not queued behind all of it.
    let mine = mine.expect("the other client's message never arrived");
    assert!(mine < N - 1, "arrived after the whole flood ({mine})");
    cluster.shutdown().await;
}

async fn no_worker_means_a_clear_refusal_until_it_is_back(mode: Mode) {
    let mut cluster = Cluster::builder().mode(mode).start().await;
    cluster.stop_worker().await;
    let addr = cluster.gateway_addr(0);
    // The gateway says so to its load balancer.
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while http_get(addr, "/healthz").await.map(|r| r.0) != Some(503) {
        assert!(tokio::time::Instant::now() < deadline, "healthz still 200");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // No worker is linked, and the gateway refuses before upgrading.
    let err = tokio_tungstenite::connect_async(cluster.ws_url(0))
        .await
        .expect_err("upgrade must be refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    cluster.start_worker().await;
    let mut c = Client::connect(&cluster.ws_url(0)).await;
    c.say("back").await;
    assert_eq!(c.chats(1).await[0].2, "back");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_sends_its_request_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::builder()
        .gateway_config(|c| c.header_read_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(cluster.gateway_addr(0))
        .await
        .unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The gateway answers 408 or just closes; either way the read ends.
    tokio::time::timeout(support::WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the half-sent request was not dropped")
        .ok();
    // Meanwhile everyone else is served.
    Client::connect(&cluster.ws_url(0)).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn http_routes() {
    let cluster = Cluster::builder().start().await;
    let addr = cluster.gateway_addr(0);
    let (status, headers, body) = support::http_get_with_headers(addr, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("<html"), "the chat page");
    // The page is served locked down: it may not be framed, sniffed as
    // another type, or load and run anything but its own inline code.
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
    };
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let csp = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "connect-src 'self' ws: wss:",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP lacks {directive:?}: {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(
        http_get(addr, "/healthz").await.unwrap(),
        (200, "ok\nlinked workers: 1\n".into())
    );
    assert_eq!(http_get(addr, "/nope").await.unwrap().0, 404);
    // A plain GET on the WebSocket path is refused with a reason.
    let (status, body) = http_get(addr, "/ws").await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("WebSocket"));
    cluster.shutdown().await;
}

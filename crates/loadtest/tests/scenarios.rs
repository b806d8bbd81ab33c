//! The measuring logic, proven against the baseline server over real sockets:
//! a correct broadcast server must come out with zero loss, zero duplicates
//! and one order, and every join storm must complete.

use std::net::SocketAddr;
use std::process::Command;

use sharedconn_loadtest::baseline::{self, BaselineConfig};
use sharedconn_loadtest::cli::{ChatArgs, ClientArgs, IdleArgs, JoinArgs};
use sharedconn_loadtest::procstat::Watched;
use sharedconn_loadtest::scenario::{self, Setup};
use tokio::sync::oneshot;

/// A baseline on port 0 in this process; dropping the sender stops it.
async fn start_baseline() -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = baseline::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        baseline::run(listener, BaselineConfig::default(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, server)
}

fn client_args() -> ClientArgs {
    ClientArgs {
        source_first: "127.0.0.1".parse().unwrap(),
        source_count: 4,
        connect_timeout: 10.0,
    }
}

fn setup(addr: SocketAddr) -> Setup {
    Setup::new(
        &[format!("ws://{addr}/ws")],
        // This process is the server here; measuring it exercises /proc.
        vec![Watched::new("baseline", std::process::id())],
        &client_args(),
        true,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_against_the_baseline_is_lossless_and_ordered() {
    let (addr, stop, server) = start_baseline().await;
    let args = ChatArgs {
        clients: 20,
        senders: 4,
        rate: 200.0,
        duration: 1.0,
        pad: 10,
        connect_rate: 1000.0,
        connect_concurrency: 16,
        settle: 0.2,
        drain: 5.0,
        non_readers: 0,
    };
    let report = scenario::chat::run(&setup(addr), &args).await.unwrap();
    assert_eq!(report.connect.connected, 20, "{:?}", report.connect);
    assert_eq!(report.sent, 200);
    assert_eq!(report.deliveries_expected, 200 * 20);
    assert_eq!(
        report.deliveries_received,
        report.deliveries_expected,
        "{}",
        text(&report)
    );
    assert_eq!(report.loss, 0);
    assert_eq!(report.duplicates, 0);
    assert!(report.one_order, "{}", text(&report));
    assert_eq!(report.error_frames, 0);
    assert!(
        report.closed_by_server.is_empty(),
        "{:?}",
        report.closed_by_server
    );
    assert_eq!(report.latency.count, report.deliveries_received);
    assert!(report.latency.p50_us > 0 && report.latency.max_us >= report.latency.p99_us);
    assert!(report.deliveries_per_sec > 0.0);
    assert!(
        report
            .processes
            .iter()
            .any(|p| p.role == "baseline" && p.rss_peak_bytes > 0)
    );
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_readers_are_held_open_and_not_counted_as_receivers() {
    let (addr, stop, server) = start_baseline().await;
    let args = ChatArgs {
        clients: 10,
        senders: 2,
        rate: 100.0,
        duration: 1.0,
        pad: 0,
        connect_rate: 1000.0,
        connect_concurrency: 16,
        settle: 0.2,
        drain: 5.0,
        non_readers: 3,
    };
    let report = scenario::chat::run(&setup(addr), &args).await.unwrap();
    assert_eq!(report.connect.connected, 10, "{:?}", report.connect);
    // Only the readers are expected to receive.
    assert_eq!(report.deliveries_expected, report.sent * 10);
    assert_eq!(report.loss, 0, "{}", text(&report));
    let nr = &report.non_readers;
    assert_eq!((nr.requested, nr.connect.connected), (3, 3), "{nr:?}");
    // Far from any stall timeout: all still open, none closed.
    assert_eq!((nr.open_at_end, nr.closed), (3, 0), "{nr:?}");
    // The baseline has no /metrics.
    assert_eq!(report.gateway_closes, None);
    assert!(text(&report).contains("non-readers         3 of 3 connected"));
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_storm_against_the_baseline_completes() {
    let (addr, stop, server) = start_baseline().await;
    let args = JoinArgs {
        clients: 100,
        concurrency: 64,
        timeout: 20.0,
    };
    let report = scenario::join::run(&setup(addr), &args).await.unwrap();
    assert_eq!(report.connect.connected, 100, "{:?}", report.connect);
    assert_eq!(report.complete, 100);
    assert!(report.all_complete_secs.is_some());
    assert!(report.userlist_frames >= 100);
    assert!(report.connect.per_sec > 0.0);
    let _ = stop.send(());
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_every_socket() {
    let (addr, stop, server) = start_baseline().await;
    let args = IdleArgs {
        clients: 50,
        hold: 0.3,
        connect_rate: 1000.0,
        connect_concurrency: 16,
        alias: false,
        procs: 1,
        child: false,
    };
    let report = scenario::idle::run(&setup(addr), &args).await.unwrap();
    assert_eq!(report.connect.connected, 50);
    assert_eq!(report.open_at_end, 50);
    assert!(report.rss_per_socket_bytes.contains_key("baseline"));
    let _ = stop.send(());
    server.await.unwrap();
}

#[test]
fn non_loopback_targets_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["-q", "chat", "--url", "ws://10.1.2.3:80/ws"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.0/8"));
}

#[test]
fn compare_runs_a_started_baseline_and_writes_json_and_svg() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "-q",
            "compare",
            "--modes",
            "baseline",
            "--repeat",
            "2",
            "--out-dir",
        ])
        .arg(out_dir.path())
        .args([
            "chat",
            "--clients",
            "10",
            "--senders",
            "2",
            "--rate",
            "50",
            "--duration",
            "0.5",
            "--settle",
            "0.1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deliveries/s"), "{stdout}");
    let files: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let json = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let svg = files
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "svg"))
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["report"]["loss"], 0, "{run}");
        assert_eq!(run["report"]["one_order"], true, "{run}");
        assert!(
            run["report"]["server_cpu_us_per_delivery"].is_number(),
            "{run}"
        );
    }
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("latency"));
}

#[test]
fn idle_spreads_over_child_processes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, stop, server) = rt.block_on(start_baseline());
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "-q",
            "idle",
            "--url",
            &format!("ws://{addr}/ws"),
            "--clients",
            "60",
            "--procs",
            "3",
        ])
        .args(["--hold", "0.3", "--source-count", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("open at end         60"), "{stdout}");
    assert!(stdout.contains("3 loadtest process(es)"), "{stdout}");
    let _ = stop.send(());
    rt.block_on(server).unwrap();
}

fn text(r: &sharedconn_loadtest::report::ChatReport) -> String {
    sharedconn_loadtest::report::Report::Chat(Box::new(r.clone())).to_text()
}

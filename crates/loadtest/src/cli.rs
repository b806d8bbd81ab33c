//! Command line: the scenarios, `compare`, and the `baseline` server.
//!
//! The scenario flags live in their own structs ([`ChatArgs`], [`IdleArgs`],
//! [`JoinArgs`]) so `loadtest chat ...` and `loadtest compare chat ...` take
//! the same ones; where the load goes is [`TargetArgs`] for a single run and
//! is decided by `compare` itself otherwise.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator for sharedconn: compares shared mode, private mode and a no-hop baseline",
    long_about = "Load generator for sharedconn. Scenarios (chat, idle, join) run against given \
                  ws:// URLs on this machine; `compare` starts the servers itself (or uses given \
                  URLs) and runs the same scenario against each mode, printing a table and \
                  writing JSON and an SVG chart. `baseline` runs the reference broadcast server."
)]
pub struct Cli {
    /// No progress bar.
    #[arg(long, short, global = true, env = "LOADTEST_QUIET")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Broadcast chat: C clients, S of them sending at an aggregate rate R for D seconds.
    Chat {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: ChatArgs,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Hold C idle connections for H seconds; report RSS per socket.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: IdleArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Join storm: C clients connect and set aliases as fast as they can.
    Join {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        args: JoinArgs,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run one scenario against baseline, shared and private mode; table, JSON and SVG.
    Compare(CompareArgs),
    /// Worker failover: Redis + 2 workers + 1 gateway, chat going, one worker
    /// killed (or stopped, or drained); how fast its sockets resume, and what
    /// the chat lost.
    Failover(FailoverArgs),
    /// The no-hop reference server: single-process broadcast chat, same client protocol.
    Baseline {
        /// Address to listen on.
        #[arg(
            long,
            env = "LOADTEST_BASELINE_LISTEN",
            default_value = "127.0.0.1:8090"
        )]
        listen: SocketAddr,
        /// Connections admitted at once; later ones get 503.
        #[arg(
            long,
            env = "LOADTEST_BASELINE_MAX_CONNECTIONS",
            default_value_t = 200_000
        )]
        max_connections: usize,
    },
}

/// Where the load goes, and what to measure there.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// WebSocket URL of the server (ws://127.0.0.1:PORT/ws). Repeat to spread
    /// clients round-robin over several gateways. Only 127.0.0.0/8 is accepted.
    #[arg(
        long = "url",
        env = "LOADTEST_URL",
        value_delimiter = ',',
        required = true
    )]
    pub urls: Vec<String>,
    /// PID of a gateway process to measure (CPU, RSS); repeatable.
    #[arg(
        long = "gateway-pid",
        env = "LOADTEST_GATEWAY_PID",
        value_delimiter = ','
    )]
    pub gateway_pids: Vec<u32>,
    /// PID of a worker process to measure; repeatable.
    #[arg(
        long = "worker-pid",
        env = "LOADTEST_WORKER_PID",
        value_delimiter = ','
    )]
    pub worker_pids: Vec<u32>,
    /// PID of a baseline server process to measure; repeatable.
    #[arg(
        long = "baseline-pid",
        env = "LOADTEST_BASELINE_PID",
        value_delimiter = ','
    )]
    pub baseline_pids: Vec<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How clients connect.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct ClientArgs {
    /// First 127.0.0.x source address for client sockets.
    #[arg(long, env = "LOADTEST_SOURCE_FIRST", default_value = "127.0.0.1")]
    pub source_first: Ipv4Addr,
    /// How many consecutive source addresses to spread clients over.
    #[arg(long, env = "LOADTEST_SOURCE_COUNT", default_value_t = 8)]
    pub source_count: u32,
    /// Seconds one client may take to connect, upgrade and get its Status frame.
    #[arg(long, env = "LOADTEST_CONNECT_TIMEOUT", default_value_t = 10.0)]
    pub connect_timeout: f64,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct ChatArgs {
    /// Connected clients (every one receives every message).
    #[arg(long, short = 'c', default_value_t = 50)]
    pub clients: usize,
    /// How many of the clients send.
    #[arg(long, short = 's', default_value_t = 5)]
    pub senders: usize,
    /// Aggregate messages per second over all senders. Keep rate/senders under
    /// the gateway's --max-frames-per-sec (about 100 by default).
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, short = 'd', default_value_t = 3.0)]
    pub duration: f64,
    /// Filler bytes added to each message's text.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Client connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seconds to wait after everyone connected before sending (lets userlist traffic settle).
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Most seconds to wait after sending for the last deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Extra clients, beyond --clients, that connect like the others (after
    /// them, at the same pace), read their Status frame and then never read
    /// again, with a small TCP receive buffer: what a socket that stops
    /// reading costs the servers. Not counted as receivers of the chat.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub non_readers: usize,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct IdleArgs {
    /// Connections to hold.
    #[arg(long, short = 'c', default_value_t = 200)]
    pub clients: usize,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
    /// Client connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Also set an alias on every socket (costs userlist traffic).
    #[arg(long)]
    pub alias: bool,
    /// Spread the clients over this many loadtest processes (each has its own
    /// open-file limit); needed beyond about 19,800 sockets here.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Run as one of the processes of `--procs` (internal).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub child: bool,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct JoinArgs {
    /// Clients joining.
    #[arg(long, short = 'c', default_value_t = 200)]
    pub clients: usize,
    /// Handshakes in flight at once ("as fast as they can", without
    /// overflowing the server's accept backlog).
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Most seconds to wait for every user list to be complete.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// What happens to the victim worker in `failover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL: the gateway sees the TCP reset at once.
    Kill,
    /// SIGSTOP: a hang, found by the link's HTTP/2 keepalive (--link-timeout-ms).
    Stop,
    /// SIGTERM: the worker drains, asking the gateway to move its sockets.
    Term,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::Term => "term",
        }
    }
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct FailoverArgs {
    /// Gateway modes to measure, one fresh cluster each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "shared,private")]
    pub modes: Vec<String>,
    /// Faults to inject, one fresh cluster each per mode.
    #[arg(long, value_delimiter = ',', default_value = "kill")]
    pub faults: Vec<Fault>,
    /// Rounds of every (mode, fault).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Sockets; the first half is attached to the victim worker (the only
    /// worker up while they connect), the second half to the other.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub clients: usize,
    /// Senders, alternating between the two halves.
    #[arg(long, short = 's', default_value_t = 4)]
    pub senders: usize,
    /// Aggregate posts per second.
    #[arg(long, short = 'r', default_value_t = 20.0)]
    pub rate: f64,
    /// Seconds of steady chat before the fault (the "before" CPU window).
    #[arg(long, default_value_t = 4.0)]
    pub before: f64,
    /// Seconds of chat after the fault (the failover window).
    #[arg(long, default_value_t = 6.0)]
    pub after: f64,
    /// The gateway's --link-timeout-ms (HTTP/2 keepalive: how soon a hung worker is found).
    #[arg(long, default_value_t = 2000)]
    pub link_timeout_ms: u64,
    /// Client connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Most seconds to wait after sending for the last deliveries.
    #[arg(long, default_value_t = 20.0)]
    pub drain: f64,
    /// Seconds between the last connect and the first post, so the joins'
    /// online lists (a 10,000-name list to each of 10,000 sockets) are not
    /// measured as chat latency.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Extra argument for the gateway (repeatable).
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Extra argument for both workers (repeatable).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Where `gateway` and `worker` are (default: next to this binary).
    #[arg(long, env = "LOADTEST_BIN_DIR")]
    #[serde(skip)]
    pub bin_dir: Option<PathBuf>,
    /// Where JSON and server logs go (default: `loadtest` in the cargo
    /// target directory this binary was built in, or `$CARGO_TARGET_DIR`).
    #[arg(long, default_value_os_t = default_out_dir())]
    #[serde(skip)]
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The things `compare` measures side by side.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The loadtest's own single-process broadcast server.
    Baseline,
    /// gateway --mode shared + worker.
    Shared,
    /// gateway --mode private + worker.
    Private,
    /// `--cluster-gateways` gateways --mode shared, `--cluster-workers`
    /// workers sharing one chat through a redis-server backplane.
    SharedCluster,
    /// The same cluster with gateways in --mode private.
    PrivateCluster,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Shared => "shared",
            Mode::Private => "private",
            Mode::SharedCluster => "shared-cluster",
            Mode::PrivateCluster => "private-cluster",
        }
    }

    /// The gateways' `--mode` (`None` for the baseline).
    pub fn transport(self) -> Option<&'static str> {
        match self {
            Mode::Baseline => None,
            Mode::Shared | Mode::SharedCluster => Some("shared"),
            Mode::Private | Mode::PrivateCluster => Some("private"),
        }
    }

    /// Several workers behind a Redis backplane.
    pub fn is_cluster(self) -> bool {
        matches!(self, Mode::SharedCluster | Mode::PrivateCluster)
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Modes to run, in this order each round.
    #[arg(long, value_delimiter = ',', default_value = "baseline,shared,private")]
    pub modes: Vec<Mode>,
    /// Rounds; the table shows medians, and ratios are taken within a round.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Chat only: run once per aggregate rate in this list (a sweep), instead of the scenario's --rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Where `gateway` and `worker` are (default: next to this binary, e.g. target/release).
    #[arg(long, env = "LOADTEST_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Use this running baseline instead of starting one.
    #[arg(long)]
    pub baseline_url: Vec<String>,
    /// Use this running shared-mode gateway instead of starting one (repeatable).
    #[arg(long)]
    pub shared_url: Vec<String>,
    /// Use this running private-mode gateway instead of starting one (repeatable).
    #[arg(long)]
    pub private_url: Vec<String>,
    /// PIDs of processes behind given URLs, as MODE:ROLE=PID (e.g. shared:gateway=1234).
    #[arg(long = "pid")]
    pub pids: Vec<String>,
    /// Gateway processes to start per mode; clients are spread over them.
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Gateways of the cluster modes (shared-cluster, private-cluster).
    #[arg(long, default_value_t = 2)]
    pub cluster_gateways: usize,
    /// Workers of the cluster modes, sharing one chat through one
    /// redis-server (started here, append-only file fsynced on every write).
    #[arg(long, default_value_t = 2)]
    pub cluster_workers: usize,
    /// --max-frames-per-sec for started gateways (default: 4x the per-sender rate, at least 1000).
    #[arg(long)]
    pub max_frames_per_sec: Option<u32>,
    /// Extra argument for started gateways (repeatable).
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Extra argument for started workers (repeatable).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Seconds a started server may take to answer /healthz.
    #[arg(long, default_value_t = 30.0)]
    pub startup_timeout: f64,
    /// Where JSON, SVG and server logs go (default: `loadtest` in the cargo
    /// target directory this binary was built in, or `$CARGO_TARGET_DIR`).
    #[arg(long, default_value_os_t = default_out_dir())]
    pub out_dir: PathBuf,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub scenario: ScenarioCmd,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ScenarioCmd {
    Chat(ChatArgs),
    Idle(IdleArgs),
    Join(JoinArgs),
}

impl ScenarioCmd {
    pub fn name(&self) -> &'static str {
        match self {
            ScenarioCmd::Chat(_) => "chat",
            ScenarioCmd::Idle(_) => "idle",
            ScenarioCmd::Join(_) => "join",
        }
    }
}

/// `$CARGO_TARGET_DIR/loadtest` when set; else `loadtest` beside the
/// profile directory this binary runs from (`target/release/loadtest` →
/// `target/loadtest`); else `target/loadtest` here.
pub fn default_out_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("loadtest");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("loadtest")))
        .unwrap_or_else(|| PathBuf::from("target/loadtest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn compare_takes_scenario_flags() {
        let cli = Cli::parse_from([
            "loadtest",
            "compare",
            "--modes",
            "baseline,shared",
            "--repeat",
            "3",
            "chat",
            "--clients",
            "10",
            "--rate",
            "50",
        ]);
        let Command::Compare(args) = cli.command else {
            panic!("not compare")
        };
        assert_eq!(args.modes, vec![Mode::Baseline, Mode::Shared]);
        let ScenarioCmd::Chat(chat) = args.scenario else {
            panic!("not chat")
        };
        assert_eq!((chat.clients, chat.rate, chat.non_readers), (10, 50.0, 0));
    }

    #[test]
    fn compare_passes_non_readers_to_chat() {
        let cli = Cli::parse_from([
            "loadtest",
            "compare",
            "--modes",
            "shared",
            "chat",
            "--clients",
            "20",
            "--non-readers",
            "5",
        ]);
        let Command::Compare(args) = cli.command else {
            panic!("not compare")
        };
        let ScenarioCmd::Chat(chat) = args.scenario else {
            panic!("not chat")
        };
        assert_eq!((chat.clients, chat.non_readers), (20, 5));
    }
}

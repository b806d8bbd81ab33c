//! `loadtest compare`: the same scenario against the no-hop baseline, shared
//! mode and private mode, in one invocation, so the ratios between them are
//! measured under the same machine conditions.
//!
//! Each run gets fresh server processes (clean memory, no history), started
//! here or given by URL. Modes take turns within a round (baseline, shared,
//! private, baseline, ...), so slow drifts of a shared, noisy machine hit all
//! modes alike; the table shows the median of each metric over the rounds,
//! and each ratio is the median of the per-round ratios (each measured
//! minutes apart at most). Output: a table on stdout, all runs as JSON, and an
//! SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Serialize;
use tracing::{info, warn};

use crate::chart::{self, Chart, Panel, Series};
use crate::cli::{ChatArgs, CompareArgs, Mode, ScenarioCmd};
use crate::launch::{LaunchConfig, Stack};
use crate::procstat::Watched;
use crate::report::{Report, median, text_table};
use crate::scenario::{self, Setup};

/// One scenario run against one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub mode: Mode,
    pub round: usize,
    /// The chat rate of a sweep step.
    pub rate: Option<f64>,
    pub report: Option<Report>,
    pub error: Option<String>,
}

/// One metric's medians and ratios across modes.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub median: BTreeMap<Mode, f64>,
    /// Median over rounds of (mode / baseline) measured within one round.
    pub ratio_to_baseline: BTreeMap<Mode, f64>,
}

/// The table of one sweep step (or of the only step).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: Option<f64>,
    pub rows: Vec<Row>,
}

/// Facts about the machine, for reading numbers later.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub mem_total_mib: Option<u64>,
    pub kernel: Option<String>,
    pub loadavg_at_start: Option<String>,
}

impl Machine {
    pub fn collect() -> Machine {
        use procfs::Current;
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: procfs::CpuInfo::current()
                .ok()
                .and_then(|c| c.model_name(0).map(str::to_string)),
            mem_total_mib: procfs::Meminfo::current()
                .ok()
                .map(|m| m.mem_total / (1024 * 1024)),
            // One-line files kept as the kernel wrote them ("6.8.0-45-generic",
            // "0.52 0.58 0.59 1/467 12345"), not parsed.
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            loadavg_at_start: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|s| s.trim().to_string()),
        }
    }
}

/// Everything `compare` found, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub scenario: &'static str,
    pub parameters: serde_json::Value,
    pub modes: Vec<Mode>,
    pub repeat: usize,
    pub machine: Machine,
    pub steps: Vec<Step>,
    /// Chat: per mode, the highest median deliveries/s among the steps where
    /// no delivery was lost (median loss 0): the max sustained throughput a
    /// rate sweep found.
    pub max_sustained_deliveries_per_sec: BTreeMap<Mode, f64>,
    /// The same for posts stored per second (through Redis in a cluster).
    pub max_sustained_posts_per_sec: BTreeMap<Mode, f64>,
    pub runs: Vec<Run>,
}

/// Runs the comparison and writes its outputs; returns the report.
pub async fn run(args: &CompareArgs, quiet: bool) -> anyhow::Result<CompareReport> {
    ensure!(!args.modes.is_empty(), "--modes is empty");
    ensure!(
        (1..=50).contains(&args.repeat),
        "--repeat must be between 1 and 50"
    );
    ensure!(
        (1..=64).contains(&args.gateways),
        "--gateways must be between 1 and 64"
    );
    ensure!(
        (1..=64).contains(&args.cluster_gateways) && (1..=16).contains(&args.cluster_workers),
        "--cluster-gateways must be between 1 and 64, --cluster-workers between 1 and 16"
    );
    let mut modes = Vec::new();
    for m in &args.modes {
        if !modes.contains(m) {
            modes.push(*m);
        }
    }
    crate::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let external = externals(args)?;
    let exe = std::env::current_exe().context("finding the loadtest binary")?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => exe.parent().map(PathBuf::from).unwrap_or_default(),
    };
    let stamp = stamp();
    let log_dir = args.out_dir.join("logs").join(&stamp);
    let rates: Vec<Option<f64>> = match &args.scenario {
        ScenarioCmd::Chat(_) if !args.rates.is_empty() => {
            args.rates.iter().map(|&r| Some(r)).collect()
        }
        ScenarioCmd::Chat(c) => vec![Some(c.rate)],
        _ => {
            ensure!(
                args.rates.is_empty(),
                "--rates applies to the chat scenario only"
            );
            vec![None]
        }
    };
    let machine = Machine::collect();
    let scenario_name = args.scenario.name();

    let mut runs = Vec::new();
    for &rate in &rates {
        let max_frames = args.max_frames_per_sec.or_else(|| match &args.scenario {
            ScenarioCmd::Chat(c) => {
                let per_sender = rate.unwrap_or(c.rate) / c.senders.max(1) as f64;
                Some(((per_sender * 4.0).ceil() as u32).max(1000))
            }
            _ => None,
        });
        let launch = LaunchConfig {
            bin_dir: bin_dir.clone(),
            loadtest_exe: exe.clone(),
            gateways: args.gateways,
            max_frames_per_sec: max_frames,
            gateway_args: args.gateway_args.clone(),
            worker_args: args.worker_args.clone(),
            startup_timeout: Duration::from_secs_f64(args.startup_timeout.clamp(1.0, 600.0)),
            log_dir: log_dir.clone(),
            cluster_workers: args.cluster_workers,
        };
        for round in 0..args.repeat {
            for &mode in &modes {
                let tag = format!(
                    "{scenario_name}{}-r{round}-{}",
                    rate.map(|r| format!("-{r}")).unwrap_or_default(),
                    mode.name()
                );
                info!(mode = mode.name(), round, rate, "run starting");
                let outcome = run_one(args, mode, rate, &launch, &external, &tag, quiet).await;
                let run = match outcome {
                    Ok(report) => {
                        eprintln!("--- {tag}\n{}", report.to_text());
                        Run {
                            mode,
                            round,
                            rate,
                            report: Some(report),
                            error: None,
                        }
                    }
                    Err(e) => {
                        warn!(
                            mode = mode.name(),
                            round,
                            error = format!("{e:#}"),
                            "run failed"
                        );
                        Run {
                            mode,
                            round,
                            rate,
                            report: None,
                            error: Some(format!("{e:#}")),
                        }
                    }
                };
                runs.push(run);
            }
        }
    }

    let steps: Vec<Step> = rates
        .iter()
        .map(|&rate| step(&runs, &modes, rate))
        .collect();
    let sustained = max_sustained(&steps, &modes, "deliveries_per_sec");
    let sustained_posts = max_sustained(&steps, &modes, "posts_per_sec");
    let report = CompareReport {
        scenario: scenario_name,
        parameters: parameters(args),
        modes: modes.clone(),
        repeat: args.repeat,
        machine,
        steps,
        max_sustained_deliveries_per_sec: sustained,
        max_sustained_posts_per_sec: sustained_posts,
        runs,
    };
    println!("{}", table(&report));

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let base = args
        .out_dir
        .join(format!("compare-{scenario_name}-{stamp}"));
    let json_path = base.with_extension("json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = base.with_extension("svg");
    let svg = chart::render(&chart_of(&report)).context("drawing the chart")?;
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    println!("json:  {}", json_path.display());
    println!("chart: {}", svg_path.display());
    println!("logs:  {}", log_dir.display());
    if report.runs.iter().all(|r| r.report.is_none()) {
        bail!("every run failed; see the errors above");
    }
    Ok(report)
}

async fn run_one(
    args: &CompareArgs,
    mode: Mode,
    rate: Option<f64>,
    launch: &LaunchConfig,
    external: &Externals,
    tag: &str,
    quiet: bool,
) -> anyhow::Result<Report> {
    let stack = match external.get(&mode) {
        Some((urls, watched)) => Stack::external(urls.clone(), watched.clone()),
        None => {
            // Several baselines only make sense for idle (separate rooms are
            // fine for holding sockets, not for a broadcast).
            let processes = match (&args.scenario, mode) {
                (_, Mode::SharedCluster | Mode::PrivateCluster) => args.cluster_gateways,
                (ScenarioCmd::Idle(_), _) | (_, Mode::Shared | Mode::Private) => args.gateways,
                _ => 1,
            };
            Stack::start(mode, launch, processes, tag).await?
        }
    };
    let result = async {
        let setup = Setup::new(&stack.urls, stack.watched.clone(), &args.client, quiet)?;
        Ok::<_, anyhow::Error>(match &args.scenario {
            ScenarioCmd::Chat(c) => {
                let c = ChatArgs {
                    rate: rate.unwrap_or(c.rate),
                    ..c.clone()
                };
                Report::Chat(Box::new(scenario::chat::run(&setup, &c).await?))
            }
            ScenarioCmd::Idle(a) => Report::Idle(scenario::idle::run(&setup, a).await?),
            ScenarioCmd::Join(a) => Report::Join(scenario::join::run(&setup, a).await?),
        })
    }
    .await;
    stack.stop().await;
    result
}

/// Servers given by URL, per mode, with the processes to measure.
type Externals = BTreeMap<Mode, (Vec<String>, Vec<Watched>)>;

/// `--baseline-url` & co. with their `--pid MODE:ROLE=PID`s.
fn externals(args: &CompareArgs) -> anyhow::Result<Externals> {
    let mut out = Externals::new();
    for (mode, urls) in [
        (Mode::Baseline, &args.baseline_url),
        (Mode::Shared, &args.shared_url),
        (Mode::Private, &args.private_url),
    ] {
        if !urls.is_empty() {
            out.entry(mode).or_default().0 = urls.clone();
        }
    }
    for spec in &args.pids {
        let parsed = spec.split_once(':').and_then(|(mode, rest)| {
            let (role, pid) = rest.split_once('=')?;
            Some((mode, role, pid.parse::<u32>().ok()?))
        });
        let Some((mode, role, pid)) = parsed else {
            bail!("--pid {spec}: expected MODE:ROLE=PID, e.g. shared:gateway=1234");
        };
        let mode = <Mode as clap::ValueEnum>::from_str(mode, true)
            .map_err(|e| anyhow::anyhow!("--pid {spec}: {e}"))?;
        ensure!(
            ["gateway", "worker", "baseline"].contains(&role),
            "--pid {spec}: role must be gateway, worker or baseline"
        );
        let Some(entry) = out.get_mut(&mode) else {
            bail!("--pid {spec}: no --{}-url given for that mode", mode.name());
        };
        entry.1.push(Watched::new(role, pid));
    }
    Ok(out)
}

fn parameters(args: &CompareArgs) -> serde_json::Value {
    let scenario = match &args.scenario {
        ScenarioCmd::Chat(a) => serde_json::to_value(a),
        ScenarioCmd::Idle(a) => serde_json::to_value(a),
        ScenarioCmd::Join(a) => serde_json::to_value(a),
    }
    .unwrap_or_default();
    serde_json::json!({
        "scenario": scenario,
        "rates": args.rates,
        "gateways": args.gateways,
        "cluster_gateways": args.cluster_gateways,
        "cluster_workers": args.cluster_workers,
        "max_frames_per_sec": args.max_frames_per_sec,
        "gateway_args": args.gateway_args,
        "worker_args": args.worker_args,
        "client": args.client,
    })
}

/// Medians and within-round ratios of every metric at one sweep step.
fn step(runs: &[Run], modes: &[Mode], rate: Option<f64>) -> Step {
    let at_rate: Vec<&Run> = runs.iter().filter(|r| r.rate == rate).collect();
    // Metric order: as the first successful report lists them.
    let mut keys: Vec<(&'static str, &'static str, &'static str)> = Vec::new();
    for run in &at_rate {
        if let Some(report) = &run.report {
            for m in report.metrics() {
                if !keys.iter().any(|k| k.0 == m.key) {
                    keys.push((m.key, m.label, m.unit));
                }
            }
        }
    }
    let rows = keys
        .into_iter()
        .map(|(key, label, unit)| {
            let mut med = BTreeMap::new();
            let mut ratio = BTreeMap::new();
            for &mode in modes {
                let values: Vec<f64> = at_rate
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| value_of(r, key))
                    .collect();
                if let Some(m) = median(&values) {
                    med.insert(mode, m);
                }
                if mode == Mode::Baseline {
                    continue;
                }
                let ratios: Vec<f64> = at_rate
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| {
                        let base = at_rate
                            .iter()
                            .find(|b| b.mode == Mode::Baseline && b.round == r.round)?;
                        let (v, b) = (value_of(r, key)?, value_of(base, key)?);
                        (b != 0.0).then_some(v / b)
                    })
                    .collect();
                if let Some(m) = median(&ratios) {
                    ratio.insert(mode, m);
                }
            }
            Row {
                key,
                label,
                unit,
                median: med,
                ratio_to_baseline: ratio,
            }
        })
        .collect();
    Step { rate, rows }
}

/// The metric `key` of one run, if the run succeeded and has it.
fn value_of(run: &Run, key: &str) -> Option<f64> {
    run.report
        .as_ref()?
        .metrics()
        .into_iter()
        .find(|m| m.key == key)?
        .value
}

/// Per mode, the best median `key` (deliveries/s, posts/s) among lossless steps.
fn max_sustained(steps: &[Step], modes: &[Mode], key: &str) -> BTreeMap<Mode, f64> {
    let mut out = BTreeMap::new();
    for &mode in modes {
        let best = steps
            .iter()
            .filter_map(|s| {
                let get = |key: &str| {
                    s.rows
                        .iter()
                        .find(|r| r.key == key)?
                        .median
                        .get(&mode)
                        .copied()
                };
                (get("loss")? == 0.0).then_some(get(key)?)
            })
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            });
        if let Some(best) = best {
            out.insert(mode, best);
        }
    }
    out
}

/// The side-by-side table.
pub fn table(report: &CompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} — {} — medians of {} round(s); ratios are per-round mode/baseline, median over rounds",
        report.scenario,
        describe(&report.parameters, report.scenario),
        report.repeat
    );
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), {} MiB RAM, load at start {}",
        report.machine.cpus,
        report.machine.cpu_model.as_deref().unwrap_or("?"),
        report.machine.mem_total_mib.unwrap_or(0),
        report.machine.loadavg_at_start.as_deref().unwrap_or("?")
    );
    let ratio_modes: Vec<Mode> = report
        .modes
        .iter()
        .copied()
        .filter(|m| *m != Mode::Baseline && report.modes.contains(&Mode::Baseline))
        .collect();
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for step in &report.steps {
        if let Some(rate) = step.rate {
            let _ = writeln!(out, "\nrate {rate} msg/s");
        }
        let header = std::iter::once("metric".to_string())
            .chain(report.modes.iter().map(|m| m.name().to_string()))
            .chain(ratio_modes.iter().map(|m| format!("{}/base", m.name())));
        let mut t = text_table(header);
        for row in &step.rows {
            let label = if row.unit.is_empty() || row.label.ends_with(row.unit) {
                row.label.to_string()
            } else {
                format!("{} ({})", row.label, row.unit)
            };
            let medians = report
                .modes
                .iter()
                .map(|m| or_dash(row.median.get(m).map(|v| chart::fmt_num(*v))));
            let ratios = ratio_modes
                .iter()
                .map(|m| or_dash(row.ratio_to_baseline.get(m).map(|v| format!("{v:.2}x"))));
            t.add_row(std::iter::once(label).chain(medians).chain(ratios));
        }
        let _ = writeln!(out, "{t}");
    }
    if report.steps.len() > 1 && !report.max_sustained_deliveries_per_sec.is_empty() {
        let _ = writeln!(
            out,
            "\nmax sustained deliveries/s (best lossless step, medians):"
        );
        let base = report
            .max_sustained_deliveries_per_sec
            .get(&Mode::Baseline)
            .copied();
        let mut t = text_table(["mode", "deliveries/s", "/base", "posts/s"]);
        for (mode, v) in &report.max_sustained_deliveries_per_sec {
            let ratio = match base {
                Some(b) if b > 0.0 && *mode != Mode::Baseline => format!("{:.2}x", v / b),
                _ => "-".into(),
            };
            let posts = report.max_sustained_posts_per_sec.get(mode);
            t.add_row([
                mode.name().to_string(),
                chart::fmt_num(*v),
                ratio,
                or_dash(posts.map(|p| chart::fmt_num(*p))),
            ]);
        }
        let _ = writeln!(out, "{t}");
    }
    let failed: Vec<&Run> = report.runs.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\nfailed runs:");
        for r in failed {
            let _ = writeln!(
                out,
                "  {} round {}{}: {}",
                r.mode.name(),
                r.round,
                r.rate.map(|x| format!(" rate {x}")).unwrap_or_default(),
                r.error.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

fn describe(params: &serde_json::Value, scenario: &str) -> String {
    let p = &params["scenario"];
    match scenario {
        "chat" => {
            let rates = match params["rates"].as_array() {
                Some(list) if !list.is_empty() => list
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                _ => p["rate"].to_string(),
            };
            let non_readers = match p["non_readers"].as_u64() {
                Some(n) if n > 0 => format!(", {n} non-readers"),
                _ => String::new(),
            };
            format!(
                "{} clients, {} senders, {rates} msg/s, {} s{non_readers}",
                p["clients"], p["senders"], p["duration"]
            )
        }
        "idle" => format!("{} sockets held {} s", p["clients"], p["hold"]),
        _ => format!("{} clients, {} in flight", p["clients"], p["concurrency"]),
    }
}

/// The chart for a comparison: medians as the marks, and the lowest to the
/// highest round as whiskers when there were several rounds.
fn chart_of(report: &CompareReport) -> Chart {
    let modes = &report.modes;
    // One mode's series over (sweep step, metric key) points.
    let series = |mode: Mode, points: &[(&Step, &str)]| -> Series {
        let (values, spread) = points
            .iter()
            .map(|&(step, key)| {
                let median = step
                    .rows
                    .iter()
                    .find(|r| r.key == key)
                    .and_then(|r| r.median.get(&mode).copied());
                let rounds: Vec<f64> = report
                    .runs
                    .iter()
                    .filter(|r| r.mode == mode && r.rate == step.rate)
                    .filter_map(|r| value_of(r, key))
                    .filter(|v| v.is_finite())
                    .collect();
                let spread = (rounds.len() > 1).then(|| {
                    let low = rounds.iter().copied().fold(f64::INFINITY, f64::min);
                    let high = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (low, high)
                });
                (median, spread)
            })
            .unzip();
        Series {
            name: mode.name().to_string(),
            values,
            spread,
        }
    };
    // Each mode at one step, over several metrics.
    let series_of = |step: &Step, keys: &[&str]| -> Vec<Series> {
        let points: Vec<(&Step, &str)> = keys.iter().map(|&k| (step, k)).collect();
        modes.iter().map(|&m| series(m, &points)).collect()
    };
    let mut panels = Vec::new();
    let first = report.steps.first();
    match report.scenario {
        "chat" if report.steps.len() > 1 => {
            let categories: Vec<String> = report
                .steps
                .iter()
                .map(|s| format!("{} msg/s", chart::fmt_num(s.rate.unwrap_or(0.0))))
                .collect();
            // Each mode at one metric, over the steps.
            let across = |key: &str| -> Vec<Series> {
                let points: Vec<(&Step, &str)> = report.steps.iter().map(|s| (s, key)).collect();
                modes.iter().map(|&m| series(m, &points)).collect()
            };
            panels.push(Panel::Lines {
                title: "Throughput achieved vs offered rate".into(),
                y_label: "deliveries/s".into(),
                categories: categories.clone(),
                series: across("deliveries_per_sec"),
            });
            panels.push(Panel::Lines {
                title: "Latency p99 vs offered rate".into(),
                y_label: "latency p99 (ms)".into(),
                categories: categories.clone(),
                series: across("p99_ms"),
            });
            panels.push(Panel::Lines {
                title: "Server CPU per delivery vs offered rate".into(),
                y_label: "CPU per delivery (µs)".into(),
                categories,
                series: across("cpu_us_per_delivery"),
            });
        }
        "chat" => {
            if let Some(step) = first {
                panels.push(Panel::Lines {
                    title: "End-to-end latency percentiles".into(),
                    y_label: "latency (ms)".into(),
                    categories: ["p50", "p90", "p99", "p99.9", "max"]
                        .map(String::from)
                        .to_vec(),
                    series: series_of(step, &["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]),
                });
                panels.push(Panel::Bars {
                    title: "Throughput".into(),
                    y_label: "deliveries/s".into(),
                    categories: vec!["deliveries/s".into()],
                    series: series_of(step, &["deliveries_per_sec"]),
                });
                panels.push(Panel::Bars {
                    title: "Server CPU per delivered message (gateway + worker, or baseline)"
                        .into(),
                    y_label: "CPU per delivery (µs)".into(),
                    categories: vec!["CPU per delivery".into()],
                    series: series_of(step, &["cpu_us_per_delivery"]),
                });
            }
        }
        "idle" => {
            if let Some(step) = first {
                panels.push(Panel::Bars {
                    title: "RSS per idle socket".into(),
                    y_label: "RSS per socket (bytes)".into(),
                    categories: vec!["gateway".into(), "worker".into(), "baseline".into()],
                    series: series_of(
                        step,
                        &[
                            "gateway_rss_per_socket",
                            "worker_rss_per_socket",
                            "baseline_rss_per_socket",
                        ],
                    ),
                });
            }
        }
        _ => {
            if let Some(step) = first {
                panels.push(Panel::Bars {
                    title: "Join storm: time until every user list is complete".into(),
                    y_label: "time (s)".into(),
                    categories: vec!["all complete".into(), "p50 complete".into()],
                    series: series_of(step, &["all_complete_s", "complete_p50_s"]),
                });
                panels.push(Panel::Bars {
                    title: "Connects per second".into(),
                    y_label: "connects/s".into(),
                    categories: vec!["connects/s".into()],
                    series: series_of(step, &["connects_per_sec"]),
                });
            }
        }
    }
    Chart {
        title: format!("sharedconn loadtest: {}", report.scenario),
        subtitle: format!(
            "{}; medians of {} round(s); {} CPUs, {}",
            describe(&report.parameters, report.scenario),
            report.repeat,
            report.machine.cpus,
            report.machine.cpu_model.as_deref().unwrap_or("?")
        ),
        panels,
    }
}

/// `YYYYmmdd-HHMMSS` (UTC), for output names.
pub fn stamp() -> String {
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "now".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ChatReport, Latency};

    fn chat_run(mode: Mode, round: usize, p99_ms: u64) -> Run {
        let latency = Latency {
            count: 100,
            p50_us: 1_000,
            p90_us: 2_000,
            p99_us: p99_ms * 1_000,
            p999_us: 50_000,
            max_us: 90_000,
            mean_us: 1_500.0,
        };
        Run {
            mode,
            round,
            rate: None,
            report: Some(Report::Chat(Box::new(ChatReport {
                deliveries_per_sec: 1_000.0,
                latency,
                ..ChatReport::default()
            }))),
            error: None,
        }
    }

    /// Baseline p99 3, 5 and 4 ms over three rounds, shared 6, 6 and 9 ms.
    fn three_rounds() -> CompareReport {
        let modes = vec![Mode::Baseline, Mode::Shared];
        let mut runs = Vec::new();
        for (round, (base, shared)) in [(3, 6), (5, 6), (4, 9)].into_iter().enumerate() {
            runs.push(chat_run(Mode::Baseline, round, base));
            runs.push(chat_run(Mode::Shared, round, shared));
        }
        CompareReport {
            scenario: "chat",
            parameters: serde_json::json!({
                "scenario": {"clients": 10, "senders": 2, "rate": 50.0, "duration": 1.0},
                "rates": [],
            }),
            modes: modes.clone(),
            repeat: 3,
            machine: Machine {
                cpus: 2,
                cpu_model: None,
                mem_total_mib: None,
                kernel: None,
                loadavg_at_start: None,
            },
            steps: vec![step(&runs, &modes, None)],
            max_sustained_deliveries_per_sec: BTreeMap::new(),
            max_sustained_posts_per_sec: BTreeMap::new(),
            runs,
        }
    }

    fn latency_series(chart: &Chart) -> &[Series] {
        let Panel::Lines {
            y_label, series, ..
        } = &chart.panels[0]
        else {
            panic!("the first chat panel is the latency lines");
        };
        assert_eq!(y_label, "latency (ms)");
        series
    }

    #[test]
    fn chart_marks_medians_with_the_spread_of_rounds() {
        let chart = chart_of(&three_rounds());
        let series = latency_series(&chart);
        // p50, p90, p99, ...: p99 is the third point.
        assert_eq!(series[0].name, "baseline");
        assert_eq!(series[0].values[2], Some(4.0));
        assert_eq!(series[0].spread[2], Some((3.0, 5.0)));
        assert_eq!(series[1].values[2], Some(6.0));
        assert_eq!(series[1].spread[2], Some((6.0, 9.0)));
        assert!(chart::render(&chart).unwrap().contains("lowest to highest"));
    }

    #[test]
    fn one_round_has_no_spread() {
        let mut report = three_rounds();
        report.runs.retain(|r| r.round == 0);
        report.repeat = 1;
        let chart = chart_of(&report);
        let series = latency_series(&chart);
        assert!(series.iter().all(|s| s.spread.iter().all(Option::is_none)));
    }

    #[test]
    fn table_has_medians_and_within_round_ratios() {
        let text = table(&three_rounds());
        let p99 = text
            .lines()
            .find(|l| l.contains("latency p99 (ms)"))
            .expect("a p99 row");
        // Per round 6/3, 6/5, 9/4: the median ratio is 2.
        let cells: Vec<&str> = p99.split('|').map(str::trim).collect();
        assert_eq!(cells[1..5], ["latency p99 (ms)", "4", "6", "2.00x"]);
        assert!(text.contains("| deliveries/s "), "{text}");
    }
}

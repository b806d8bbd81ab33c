//! `loadtest`: see `loadtest --help` and the crate docs.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Context;
use clap::Parser;
use sharedconn_loadtest::cli::{Cli, Command};
use sharedconn_loadtest::report::Report;
use sharedconn_loadtest::scenario::{self, Setup};
use sharedconn_loadtest::{baseline, compare};
use tracing::info;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Chat { target, args, json } => {
            let setup = Setup::from_target_args(&target, quiet)?;
            let report = Report::Chat(Box::new(scenario::chat::run(&setup, &args).await?));
            finish(&report, json.as_deref())
        }
        Command::Idle { target, args, json } => {
            let setup = Setup::from_target_args(&target, quiet)?;
            let report = Report::Idle(scenario::idle::run(&setup, &args).await?);
            if args.child {
                // The parent reads the child's report from its protocol line.
                return Ok(());
            }
            finish(&report, json.as_deref())
        }
        Command::Join { target, args, json } => {
            let setup = Setup::from_target_args(&target, quiet)?;
            let report = Report::Join(scenario::join::run(&setup, &args).await?);
            finish(&report, json.as_deref())
        }
        Command::Compare(args) => compare::run(&args, quiet).await.map(|_| ()),
        Command::Failover(args) => scenario::failover::run(&args, quiet).await.map(|_| ()),
        Command::Baseline {
            listen,
            max_connections,
        } => {
            let limit =
                sharedconn_loadtest::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
            let listener = baseline::bind(listen).with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr()?;
            info!(%addr, open_files = limit, "baseline listening");
            let config = baseline::BaselineConfig {
                max_connections,
                ..Default::default()
            };
            baseline::run(listener, config, shutdown_signal()).await?;
            info!("baseline stopped");
            Ok(())
        }
    }
}

fn finish(report: &Report, json: Option<&Path>) -> anyhow::Result<()> {
    print!("{}", report.to_text());
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("json: {}", path.display());
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

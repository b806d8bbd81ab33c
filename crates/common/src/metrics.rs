//! The process-wide Prometheus recorder.
//!
//! Library code records through the `metrics` macros and never installs
//! anything: with no recorder those calls cost next to nothing, which is
//! what tests that do not look at metrics get. Each binary calls
//! [`install`] once at start; the gateway's `/metrics` and the worker's
//! metrics listener answer with [`render`]. The recorder is global, so a
//! process running a gateway and a worker (the all-in-one `sharedconn`)
//! reports both from either page.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::warn;

/// Buckets of every histogram whose name ends in `_seconds`: 0.5 ms to 10 s,
/// roughly doubling, so a group commit (a millisecond or so on a fast disk)
/// and a Redis that stalls for seconds both land in a bucket of their own.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
/// How often histogram samples are folded into their buckets when nobody
/// scrapes. Samples wait in a buffer until then, so without this a process
/// that is never scraped would keep every sample it ever took.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global recorder. Call
/// it before starting a gateway or a worker: handles taken before it record
/// nowhere. Calling it again does nothing; if another recorder was installed
/// first, metrics are not rendered (and that is logged).
pub fn install() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .expect("the bucket list is not empty");
        match builder.install_recorder() {
            Ok(handle) => {
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(UPKEEP_EVERY);
                            upkeep.run_upkeep();
                        }
                    });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start the metrics upkeep thread");
                }
                Some(handle)
            }
            Err(e) => {
                warn!(error = %e, "cannot install the metrics recorder; /metrics stays empty");
                None
            }
        }
    });
}

/// Every metric in the Prometheus text format, or `None` when [`install`]
/// was not called (a library user that did not ask for metrics).
pub fn render() -> Option<String> {
    let handle = HANDLE.get()?.as_ref()?;
    // Folds pending histogram samples and publishes new help texts.
    handle.run_upkeep();
    Some(handle.render())
}

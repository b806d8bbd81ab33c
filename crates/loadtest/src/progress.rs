//! The progress bar of long runs, on stderr, drawn only when stderr is a
//! terminal (so logs and CI output stay clean) and never with `--quiet`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar for one phase of one run.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps for phase `phase`; hidden when `quiet`.
    pub fn new(quiet: bool, phase: &str, len: u64) -> Progress {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr_with_hz(4)
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
            )
            .expect("static template is valid"),
        );
        bar.set_prefix(phase.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar }
    }

    pub fn set_phase(&self, phase: &str, len: u64) {
        self.bar.set_prefix(phase.to_string());
        self.bar.set_length(len);
        self.bar.set_position(0);
    }

    pub fn set(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    pub fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

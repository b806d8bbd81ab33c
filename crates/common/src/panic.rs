//! A panic ends the process.
//!
//! tokio catches a panic in a spawned task and carries on, so a worker whose
//! runtime task or link handler panicked would keep its port open, pass its
//! health check and serve nothing. The binaries install [`exit_on_panic`]
//! instead: the panic is logged through `tracing` and the process exits with
//! status 101 (a panicking `main`'s status), so a supervisor restarts it. The
//! libraries never install it: tests that run them in-process keep the
//! default behaviour.

/// The exit status after a panic, as for a panic in `main`.
pub const PANIC_EXIT_CODE: i32 = 101;

/// Replaces the panic hook: log the panic (message, place, thread,
/// backtrace when `RUST_BACKTRACE` asks for one) and exit with
/// [`PANIC_EXIT_CODE`]. Call it from `main`, after logging is set up.
pub fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|l| l.to_string())
            .unwrap_or_else(|| "unknown".into());
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        tracing::error!(%location, thread, %backtrace, "panic: {message}; exiting");
        // No unwinding past this point: the state the panic left behind is
        // not to be trusted, and a supervisor restarts a process that exits.
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// Set in the child: install the hook and panic in a spawned task.
    const CHILD: &str = "SHAREDCONN_PANIC_HOOK_CHILD";

    #[test]
    fn a_panic_in_a_spawned_task_ends_the_process() {
        if std::env::var_os(CHILD).is_some() {
            crate::init_tracing();
            super::exit_on_panic();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::spawn(async { panic!("boom in a task") }).await;
                // Without the hook the task's panic is caught and we get here.
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            });
            return;
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "panic::tests::a_panic_in_a_spawned_task_ends_the_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(super::PANIC_EXIT_CODE), "{stderr}");
        assert!(
            stderr.contains("panic: boom in a task; exiting"),
            "{stderr}"
        );
    }
}

//! The process's open-file limit (`RLIMIT_NOFILE`).
//!
//! Every WebSocket is a file descriptor, and the usual soft limit (1024) is far
//! below what a gateway holds; the hard limit is what an administrator (or
//! docker's `ulimits`) allows. Each binary raises the soft limit to the hard
//! one at start, and the gateway sizes its socket budget from the result.

use tracing::{info, warn};

/// The soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Linux's default `fs.nr_open`: the most a process may ask for when the hard
/// limit is unlimited.
const UNLIMITED_CAP: u64 = 1 << 20;

/// The current limit, or `None` where there is none to read.
pub fn nofile_limit() -> Option<NofileLimit> {
    #[cfg(unix)]
    {
        let lim = get()?;
        Some(NofileLimit {
            soft: as_u64(lim.rlim_cur),
            hard: as_u64(lim.rlim_max),
        })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the soft limit to the hard limit, logs both, and returns the limit
/// now in force. A failure is logged, not fatal: the process still runs, with
/// fewer sockets.
pub fn raise_nofile_limit() -> Option<NofileLimit> {
    let before = nofile_limit()?;
    #[cfg(unix)]
    if before.soft < before.hard {
        let mut lim = get()?;
        lim.rlim_cur = if lim.rlim_max == libc::RLIM_INFINITY {
            UNLIMITED_CAP as libc::rlim_t
        } else {
            lim.rlim_max
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            let error = std::io::Error::last_os_error();
            warn!(soft = before.soft, hard = before.hard, %error, "cannot raise the open-file limit");
            return Some(before);
        }
    }
    let now = nofile_limit().unwrap_or(before);
    info!(
        soft = now.soft,
        hard = now.hard,
        was = before.soft,
        "open-file limit"
    );
    Some(now)
}

#[cfg(unix)]
fn get() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

#[cfg(unix)]
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
fn as_u64(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let now = raise_nofile_limit().expect("a unix limit");
        assert!(now.soft <= now.hard);
        assert_eq!(now.soft, now.hard.min(UNLIMITED_CAP));
        assert_eq!(nofile_limit(), Some(now));
    }
}

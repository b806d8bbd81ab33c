//! The few Linux calls the tool needs that std does not offer: the open-file
//! limit, signals to the processes `compare` starts, and
//! `IP_BIND_ADDRESS_NO_PORT` for spreading clients over source addresses.
//!
//! Every `unsafe` block here is a plain libc call on integers or on a struct
//! owned by the caller; none keeps a pointer past the call.

use std::io;
use std::os::fd::AsRawFd;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and returns
/// the new soft limit. Processes spawned afterwards inherit it, which is what
/// `compare` relies on for the gateways it starts.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, exclusively borrowed rlimit for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets a socket bound to `(ip, 0)` take its port at `connect` time, so the
/// ephemeral range is shared per (source, destination) pair instead of being
/// reserved per source address. Without it one source address caps out at
/// one ephemeral range of sockets, whatever the destinations.
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is open for the duration of the call (borrowed), and the
    // option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! Accepting connections when file descriptors run short.
//!
//! Every socket is a file descriptor. Two things keep the gateway answering
//! near the process's open-file limit:
//!
//! - [`socket_budget`]: WebSockets are admitted only up to the limit less a
//!   reserve, so past that point an upgrade gets a plain 503 from the
//!   admission check while `/healthz`, the page and the links to workers
//!   still find descriptors in the reserve.
//! - [`Spare`]: if the reserve is used up all the same (say, by idle HTTP
//!   connections), `accept` fails with `EMFILE` and the connection would wait
//!   in the kernel's queue until the client gives up. One descriptor kept
//!   aside is let go to accept that connection, answer it 503 and close it;
//!   then it is taken back.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Descriptors kept out of the WebSocket budget: the listener, the runtime's
/// own, the links to workers (and, in the all-in-one, the worker's files and
/// gRPC server side), health checks and page loads in flight.
pub const FD_RESERVE: u64 = 64;

/// How many WebSockets fit: `max_connections`, or fewer when the open-file
/// limit `nofile` (the soft limit) would run out first.
pub fn socket_budget(max_connections: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return max_connections;
    };
    // A tiny limit (a test, a misconfigured container) still leaves half of
    // it for sockets rather than none.
    let reserve = FD_RESERVE.min(nofile / 2);
    let fit = usize::try_from(nofile - reserve).unwrap_or(usize::MAX);
    max_connections.min(fit.max(1))
}

/// Whether an `accept` error means the process (or the system) is out of
/// file descriptors.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// How long a shed connection may take to send its request before the 503
/// goes out anyway.
const SHED_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a refused connection is drained before it is closed.
const SHED_DRAIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause before accepting again when not even the spare is free.
const BACKOFF: Duration = Duration::from_millis(50);
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 43\r\n\
connection: close\r\n\r\n\
gateway is out of sockets, try again later\n";

/// The descriptor kept aside for [`Spare::shed`].
pub struct Spare {
    file: Option<std::fs::File>,
    /// Told when a refused connection is closed: its descriptor is free to
    /// be the spare again.
    freed: Arc<Notify>,
}

impl Spare {
    pub fn new() -> Self {
        Spare {
            file: open_spare(),
            freed: Arc::new(Notify::new()),
        }
    }

    /// Takes the spare back if it was let go and a descriptor is free again.
    /// Called before every accept, so a descriptor freed by a refused
    /// connection goes back to the spare instead of to the next client: a
    /// no-op while the spare is held.
    pub fn refill(&mut self) {
        if self.file.is_none() {
            self.file = open_spare();
        }
    }

    /// Called when `accept` failed for want of descriptors: lets the spare
    /// go, accepts one waiting connection and answers it 503 (plain HTTP
    /// only: on TLS it is just closed, which the client sees at once too),
    /// then takes the spare back as soon as a descriptor is free.
    pub async fn shed(&mut self, listener: &TcpListener, tls: bool) {
        self.refill();
        if self.file.take().is_none() {
            // Nothing to let go: wait for a refusal in flight to end, or
            // for anything else to free a descriptor.
            let _ = tokio::time::timeout(BACKOFF, self.freed.notified()).await;
            return;
        }
        // Bounded: the client may have given up already, and the accept loop
        // must get back to its shutdown signal.
        match tokio::time::timeout(BACKOFF, listener.accept()).await {
            Err(_) => {}
            Ok(Ok((stream, peer))) => {
                debug!(%peer, "out of file descriptors, connection refused with 503");
                let freed = self.freed.clone();
                tokio::spawn(async move {
                    refuse(stream, tls).await;
                    freed.notify_one();
                });
            }
            Ok(Err(e)) => {
                warn!(error = %e, "accept failed even with the spare descriptor");
                tokio::time::sleep(BACKOFF).await;
            }
        }
        self.file = open_spare();
    }
}

impl Default for Spare {
    fn default() -> Self {
        Self::new()
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Reads what the client sent (so closing does not reset the connection
/// before it reads the answer), answers 503 and closes.
async fn refuse(mut stream: TcpStream, tls: bool) {
    if !tls {
        let mut buf = [0u8; 2048];
        let _ = tokio::time::timeout(SHED_READ_TIMEOUT, stream.read(&mut buf)).await;
        let _ = stream.write_all(SHED_RESPONSE).await;
        let _ = stream.shutdown().await;
        // Drain briefly: what is unread when the socket closes makes the
        // kernel send a reset, which can overtake the answer.
        let _ = tokio::time::timeout(SHED_DRAIN_TIMEOUT, async {
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_a_reserve() {
        assert_eq!(socket_budget(100_000, None), 100_000);
        assert_eq!(socket_budget(100_000, Some(1024)), 1024 - 64);
        assert_eq!(socket_budget(10, Some(1024)), 10);
        assert_eq!(socket_budget(100_000, Some(100)), 50);
        assert_eq!(socket_budget(100_000, Some(1)), 1);
        assert_eq!(socket_budget(100_000, Some(u64::MAX)), 100_000);
    }

    #[test]
    fn the_shed_answer_is_well_formed() {
        let text = std::str::from_utf8(SHED_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }

    #[test]
    fn emfile_is_recognised() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(
            libc::ECONNRESET
        )));
    }
}

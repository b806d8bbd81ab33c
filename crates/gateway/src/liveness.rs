//! Finds a worker that went silent, and only such a worker.
//!
//! hyper's keepalive ends a connection when the answer to its ping has not
//! been *read* in time, and it looks at the clock before it reads. On a
//! gateway so busy that the connection's task waits its turn for longer than
//! that (a 10,000-socket private join storm on two cores), the answer was
//! there, unread in the kernel, and a live worker was declared dead: its
//! sockets moved, and new ones were refused for want of a worker.
//!
//! So the gateway keeps hyper's pings, which give a live worker something to
//! say every few tens of milliseconds, and judges silence itself, on a thread
//! of its own that no busy runtime delays: a connection is dead when nothing
//! came from the worker for the silence bound, that is nothing was read *and*
//! nothing waits in the kernel to be read. The watchdog then shuts the socket
//! down; hyper reads its end, and every stream on it fails as it would if
//! the worker's process were gone.
//!
//! - [`Connector`] dials a worker for tonic and puts each connection under
//!   watch ([`Watched`] notes every read);
//! - [`Watchdog`] owns the thread that looks at every watched connection.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::codegen::Service;
use tracing::{debug, warn};

/// How long a worker may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Looks at every watched connection, a few dozen times per silence bound.
#[derive(Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

struct Inner {
    silence: Duration,
    /// Connections made since the thread last looked.
    fresh: Mutex<Vec<Weak<Watch>>>,
}

/// One connection to a worker, as the watchdog sees it.
struct Watch {
    worker: SocketAddr,
    /// A second handle on the socket, to look into its receive queue and to
    /// shut it down; it closes with the connection (the last `Arc`).
    socket: std::net::TcpStream,
    /// Something was read since the watchdog last looked.
    heard: AtomicBool,
}

/// The watchdog's own record of a connection.
struct Entry {
    watch: Weak<Watch>,
    last_heard: Instant,
    /// Data waited unread past the bound: the gateway, not the worker, is
    /// behind (logged once per spell).
    behind: bool,
}

impl Watchdog {
    /// Starts the thread; a connection that hears nothing for `silence` is
    /// shut down within `silence` and one look more (`silence / 20`). The
    /// thread ends once every handle on the watchdog is dropped.
    pub fn start(silence: Duration) -> io::Result<Self> {
        let inner = Arc::new(Inner {
            silence,
            fresh: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("link-watchdog".into())
            .spawn(move || watch_loop(weak, silence / 20))?;
        Ok(Watchdog { inner })
    }

    /// A connector for tonic that dials `worker` and watches what it dials.
    pub fn connector(&self, worker: SocketAddr) -> Connector {
        Connector {
            worker,
            watchdog: self.clone(),
        }
    }

    /// Puts a freshly dialled connection under watch.
    fn watch(&self, worker: SocketAddr, stream: TcpStream) -> io::Result<Watched> {
        // A second handle (dup) shares the socket and its non-blocking mode.
        let std_stream = stream.into_std()?;
        let socket = std_stream.try_clone()?;
        let io = TcpStream::from_std(std_stream)?;
        let watch = Arc::new(Watch {
            worker,
            socket,
            heard: AtomicBool::new(true),
        });
        self.inner
            .fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&watch));
        Ok(Watched { io, watch })
    }
}

fn watch_loop(inner: Weak<Inner>, every: Duration) {
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        std::thread::sleep(every);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let fresh = std::mem::take(&mut *inner.fresh.lock().unwrap_or_else(|e| e.into_inner()));
        entries.extend(fresh.into_iter().map(|watch| Entry {
            watch,
            last_heard: now,
            behind: false,
        }));
        entries.retain_mut(|entry| look(entry, now, inner.silence));
    }
}

/// Looks at one connection; returns whether to keep watching it.
fn look(entry: &mut Entry, now: Instant, silence: Duration) -> bool {
    let Some(watch) = entry.watch.upgrade() else {
        return false;
    };
    if watch.heard.swap(false, Ordering::Relaxed) {
        entry.last_heard = now;
        entry.behind = false;
        return true;
    }
    let silent = now.duration_since(entry.last_heard);
    if silent < silence {
        return true;
    }
    match watch.socket.peek(&mut [0u8; 1]) {
        // The worker spoke; the gateway has not read it yet.
        Ok(n) if n > 0 => {
            if !entry.behind {
                entry.behind = true;
                debug!(worker = %watch.worker, silent_ms = silent.as_millis() as u64,
                    "worker's data waits unread: the gateway is behind, the worker is live");
                crate::metrics::link_read_behind();
            }
            true
        }
        // Closed by the worker: the reader will see it.
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            warn!(
                worker = %watch.worker,
                silent_ms = silent.as_millis() as u64,
                "worker sent nothing within the link timeout: closing the connection"
            );
            let _ = watch.socket.shutdown(Shutdown::Both);
            false
        }
        Err(_) => false,
    }
}

/// A connection under watch: every read that brings something is noted.
pub struct Watched {
    io: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Dials one worker for tonic (whatever the URI says: a link is made per
/// resolved address), with Nagle off, and watches each connection.
#[derive(Clone)]
pub struct Connector {
    worker: SocketAddr,
    watchdog: Watchdog,
}

impl<U> Service<U> for Connector {
    type Response = TokioIo<Watched>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: U) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(this.worker))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "worker did not accept"))??;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(this.watchdog.watch(this.worker, stream)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const SILENCE: Duration = Duration::from_millis(300);

    /// A watched connection to a listener on loopback, and the listener's end.
    async fn pair(watchdog: &Watchdog) -> (Watched, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connector = watchdog.connector(addr);
        let (dialled, accepted) =
            tokio::join!(Service::<()>::call(&mut connector, ()), listener.accept());
        (dialled.unwrap().into_inner(), accepted.unwrap().0)
    }

    /// Reads until the connection ends; returns how long that took.
    async fn time_to_end(mut watched: Watched) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        while watched.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        started.elapsed()
    }

    #[tokio::test]
    async fn a_worker_that_sends_nothing_is_cut_within_the_bound() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (watched, _worker) = pair(&watchdog).await;
        let took = tokio::time::timeout(SILENCE * 4, time_to_end(watched))
            .await
            .expect("a silent worker's connection was never closed");
        assert!(took >= SILENCE, "closed after {took:?}, before the bound");
        // The bound, a look, and room for a loaded test machine.
        assert!(took < SILENCE * 2, "closed only after {took:?}");
    }

    #[tokio::test]
    async fn a_worker_that_keeps_talking_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        let mut buf = [0u8; 64];
        for _ in 0..10 {
            worker.write_all(b"pong").await.unwrap();
            assert_eq!(watched.read(&mut buf).await.unwrap(), 4);
            tokio::time::sleep(SILENCE / 3).await;
        }
        worker.write_all(b"still here").await.unwrap();
        assert!(watched.read(&mut buf).await.unwrap() > 0);
    }

    /// The case hyper's keepalive gets wrong: the gateway does not get round
    /// to reading, and the worker's answer waits in the kernel.
    #[tokio::test]
    async fn a_worker_whose_answer_waits_unread_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        worker.write_all(b"pong").await.unwrap();
        tokio::time::sleep(SILENCE * 3).await;
        let mut buf = [0u8; 64];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 4);
        // Once read, silence counts again from there.
        let took = tokio::time::timeout(SILENCE * 4, time_to_end(watched))
            .await
            .expect("the connection was never closed once silent");
        assert!(took >= SILENCE / 2, "closed after {took:?}");
    }
}

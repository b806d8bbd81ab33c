//! Finds a worker that went silent, and only such a worker.
//!
//! hyper's keepalive ends a connection when the answer to its ping has not
//! been *read* in time, and it looks at the clock before it reads. On a
//! gateway so busy that the connection's task waits its turn for longer than
//! that (a 10,000-socket private join storm on two cores), the answer was
//! there, unread in the kernel, and a live worker was declared dead: its
//! sockets moved, and new ones were refused for want of a worker. The same
//! busy task may also send its ping late, and a worker that was never asked
//! has nothing to answer.
//!
//! So the gateway keeps hyper's pings, and judges silence itself, on a thread
//! of its own that no busy runtime delays. A worker is silent when a ping has
//! gone out on the connection and, for the silence bound, its answer was not
//! read *and* nothing waits in the kernel to be read (the answer may be
//! there, behind what the gateway has not read yet). Only the answer counts:
//! what is read meanwhile may have been sent long before the ping. A worker
//! is silent too when what the gateway wrote has waited that long with none
//! of it taken by the worker's kernel: its receive buffer is full (it stopped
//! reading) or the link is cut, and the gateway's HTTP/2 task, blocked on
//! the write, would not even send its ping. The watchdog then shuts the
//! socket down; hyper reads its end, and every stream on it fails as it
//! would if the worker's process were gone.
//!
//! The bound holds from the moment the ping is written: a gateway so busy
//! that hyper pings late finds the hang that much later.
//!
//! - [`Connector`] dials a worker for tonic and puts each connection under
//!   watch ([`Watched`] counts the pings it writes and the answers it reads);
//! - [`Watchdog`] owns the thread that looks at every watched connection.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Pings written, and their answers read. hyper has one ping out at a
    /// time, so a ping waits for its answer while they differ.
    pings: AtomicU64,
    pongs: AtomicU64,
    /// Odd while a read is under way (its answer may not be counted yet).
    reads: AtomicU64,
}

/// The watchdog's own record of a connection.
struct Entry {
    watch: Weak<Watch>,
    /// Since when a ping has waited for its answer, as far as the watchdog
    /// has seen (it looks a twentieth of the bound late at most).
    asked_since: Option<Instant>,
    /// Answers read when it last looked.
    pongs: u64,
    /// Bytes the worker's kernel had acknowledged when it last looked, and
    /// since when none more while some waited to go.
    acked: u64,
    stalled_since: Option<Instant>,
    /// Data waited unread past the bound: the gateway, not the worker, is
    /// behind (logged once per spell).
    behind: bool,
}

impl Watchdog {
    /// Starts the thread; a connection that hears nothing for `silence`
    /// after a ping is shut down within `silence` and two looks more (one
    /// look is `silence / 20`). The thread ends once every handle on the
    /// watchdog is dropped.
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
        let socket = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
        let watch = Arc::new(Watch {
            worker,
            socket,
            pings: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        });
        self.inner
            .fresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&watch));
        Ok(Watched {
            io: stream,
            watch,
            written: FrameWalker::client(),
            read: FrameWalker::server(),
        })
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
            asked_since: None,
            pongs: 0,
            acked: 0,
            stalled_since: None,
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
    if let Some(stalled) = stalled_for(entry, &watch.socket, now)
        && stalled >= silence
    {
        // Nothing written reached the worker's process for the whole bound:
        // whatever waits unread here, it is not reading.
        warn!(
            worker = %watch.worker,
            stalled_ms = stalled.as_millis() as u64,
            "worker took nothing written to it within the link timeout: closing the connection"
        );
        let _ = watch.socket.shutdown(Shutdown::Both);
        return false;
    }
    // A read under way may be taking the answer: judged at the next look.
    let reads = watch.reads.load(Ordering::Acquire);
    if reads % 2 == 1 {
        return true;
    }
    // Answers first: a ping written after them is then never missed.
    let pongs = watch.pongs.load(Ordering::Acquire);
    let pings = watch.pings.load(Ordering::Acquire);
    if pongs != entry.pongs {
        // Answered since the last look: whatever waits now was asked since.
        entry.pongs = pongs;
        entry.asked_since = None;
        entry.behind = false;
    }
    if pings <= pongs {
        return true;
    }
    let since = *entry.asked_since.get_or_insert(now);
    let silent = now.duration_since(since);
    if silent < silence {
        return true;
    }
    match watch.socket.peek(&mut [0u8; 1]) {
        // The worker answered; the gateway has not read it yet.
        Ok(n) if n > 0 => {
            if !entry.behind {
                entry.behind = true;
                debug!(
                    worker = %watch.worker,
                    silent_ms = silent.as_millis() as u64,
                    "worker's answer waits unread: the gateway is behind, the worker is live"
                );
                crate::metrics::link_read_behind();
            }
            true
        }
        // Closed by the worker: the reader will see it.
        Ok(_) => false,
        // Nothing waits, unless a read took the answer since the counts.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if watch.reads.load(Ordering::Acquire) != reads {
                return true;
            }
            warn!(
                worker = %watch.worker,
                silent_ms = silent.as_millis() as u64,
                "worker did not answer a ping within the link timeout: closing the connection"
            );
            let _ = watch.socket.shutdown(Shutdown::Both);
            false
        }
        Err(_) => false,
    }
}

/// How long bytes have waited to go to the worker with none of them taken
/// by its kernel (`None`: nothing waits, or progress since the last look).
fn stalled_for(entry: &mut Entry, socket: &std::net::TcpStream, now: Instant) -> Option<Duration> {
    let Some((acked, queued)) = send_state(socket) else {
        entry.stalled_since = None;
        return None;
    };
    if queued == 0 || acked != entry.acked {
        entry.acked = acked;
        entry.stalled_since = None;
        return None;
    }
    Some(now.duration_since(*entry.stalled_since.get_or_insert(now)))
}

/// Bytes of the connection the worker's kernel has acknowledged, and bytes
/// still queued to go to it (sent and unacknowledged, or not sent yet).
#[cfg(target_os = "linux")]
fn send_state(socket: &std::net::TcpStream) -> Option<(u64, u32)> {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    // SAFETY: plain libc calls on our own socket, each given a buffer of the
    // size it is told (the kernel fills at most `len` bytes of `info`).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    // A kernel too old to count acknowledged bytes (before 4.1) says less.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    if got != 0 || (len as usize) < needed {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: as above; SIOCOUTQ (TIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return None;
    }
    Some((info.tcpi_bytes_acked, queued.max(0) as u32))
}

#[cfg(not(target_os = "linux"))]
fn send_state(_socket: &std::net::TcpStream) -> Option<(u64, u32)> {
    None
}

/// Walks one direction of an HTTP/2 connection, to see the pings in it.
///
/// The bytes are (from a client only) the preface and then whole frames,
/// each a 9-byte header (24-bit length, type, flags, stream) and its
/// payload; a read or a write may end anywhere in either.
struct FrameWalker {
    /// Bytes to pass over before the next frame header.
    skip: usize,
    header: [u8; 9],
    /// Bytes of `header` seen so far.
    have: usize,
    /// The ACK flag of the pings counted: `ASKING` or `ANSWERING`.
    counts: u8,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which opens every client connection.
const CLIENT_PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Which pings a walker counts.
const ASKING: u8 = 0;
const ANSWERING: u8 = ACK;

impl FrameWalker {
    /// For what the gateway writes (it opens with the preface): counts the
    /// pings that ask.
    fn client() -> Self {
        FrameWalker {
            skip: CLIENT_PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            counts: ASKING,
        }
    }

    /// For what the worker writes: counts the pings that answer.
    fn server() -> Self {
        FrameWalker {
            skip: 0,
            counts: ANSWERING,
            ..FrameWalker::client()
        }
    }

    /// Walks `bytes`, the next ones; returns how many of the pings it counts
    /// they completed.
    fn walk(&mut self, mut bytes: &[u8]) -> u64 {
        let mut pings = 0;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER_LEN {
                let [l0, l1, l2, kind, flags, ..] = self.header;
                pings += u64::from(kind == PING && flags & ACK == self.counts);
                self.skip = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                self.have = 0;
            }
        }
        pings
    }

    fn walk_vectored(&mut self, bufs: &[io::IoSlice<'_>], mut written: usize) -> u64 {
        let mut pings = 0;
        for buf in bufs {
            if written == 0 {
                break;
            }
            let n = buf.len().min(written);
            pings += self.walk(&buf[..n]);
            written -= n;
        }
        pings
    }
}

/// A connection under watch: the pings it writes and the answers it reads
/// are counted.
pub struct Watched {
    io: TcpStream,
    watch: Arc<Watch>,
    written: FrameWalker,
    read: FrameWalker,
}

impl Watched {
    fn wrote(&mut self, pings: u64) {
        if pings > 0 {
            self.watch.pings.fetch_add(pings, Ordering::Release);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        this.watch.reads.fetch_add(1, Ordering::AcqRel);
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let pongs = this.read.walk(&buf.filled()[before..]);
        if pongs > 0 {
            this.watch.pongs.fetch_add(pongs, Ordering::Release);
        }
        this.watch.reads.fetch_add(1, Ordering::Release);
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let pings = this.written.walk(&buf[..n]);
            this.wrote(pings);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            let pings = this.written.walk_vectored(bufs, n);
            this.wrote(pings);
        }
        polled
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

    /// Long enough that a test's own task, delayed by a loaded machine,
    /// does not fall silent itself: at 300 ms, a slow reader's 75 ms pause
    /// once outlasted the bound while the whole suite ran on two cores.
    const SILENCE: Duration = Duration::from_secs(1);

    /// An HTTP/2 frame: its header and `payload`.
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut bytes = len.to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags, 0, 0, 0, 0]);
        bytes.extend(payload);
        bytes
    }

    fn ping() -> Vec<u8> {
        frame(PING, 0, &[7; 8])
    }

    fn pong() -> Vec<u8> {
        frame(PING, ACK, &[7; 8])
    }

    /// A watched connection to a listener on loopback that has written the
    /// client preface, and the listener's end (which has read it).
    async fn pair(watchdog: &Watchdog) -> (Watched, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut connector = watchdog.connector(addr);
        let (dialled, accepted) =
            tokio::join!(Service::<()>::call(&mut connector, ()), listener.accept());
        let mut watched = dialled.unwrap().into_inner();
        let mut worker = accepted.unwrap().0;
        watched
            .write_all(&[b'P'; CLIENT_PREFACE_LEN])
            .await
            .unwrap();
        worker
            .read_exact(&mut [0; CLIENT_PREFACE_LEN])
            .await
            .unwrap();
        (watched, worker)
    }

    /// Reads until the connection ends; returns how long that took.
    async fn time_to_end(watched: &mut Watched) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        while watched.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        started.elapsed()
    }

    /// Waits for the connection to be cut; fails if it takes past the bound
    /// (two looks are a tenth of it; the rest is room for a loaded machine).
    async fn cut_within_the_bound(watched: &mut Watched) -> Duration {
        cut_within(watched, SILENCE * 3 / 2).await
    }

    async fn cut_within(watched: &mut Watched, bound: Duration) -> Duration {
        let took = tokio::time::timeout(SILENCE * 4, time_to_end(watched))
            .await
            .expect("a silent worker's connection was never closed");
        assert!(took < bound, "closed only after {took:?}");
        took
    }

    /// Writes until the kernel takes no more: the worker's receive buffer
    /// and the gateway's send buffer are full.
    async fn fill(watched: &mut Watched) {
        let chunk = frame(0x0, 0, &[0; 16 << 10]);
        while tokio::time::timeout(Duration::from_millis(50), watched.write_all(&chunk))
            .await
            .is_ok()
        {}
    }

    /// A hung worker the gateway cannot even ping: what it writes waits, so
    /// hyper's ping would wait behind it.
    #[tokio::test]
    async fn a_worker_that_takes_nothing_written_is_cut_within_the_bound() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, _worker) = pair(&watchdog).await;
        fill(&mut watched).await;
        // The kernel may take a little more after the last write gave up,
        // so the stall starts up to a few looks later.
        let took = cut_within(&mut watched, SILENCE * 2).await;
        assert!(took >= SILENCE / 2, "closed after {took:?}");
    }

    /// A worker that takes what is written, if slowly, is not hung: what
    /// was written takes it about three times the bound to read. It reads
    /// more than a segment each time (a loopback segment is 64 KiB), so
    /// that each read opens the window at once: the kernel holds back an
    /// update for less (avoiding a silly window), and the gateway's kernel
    /// would then wait for its backed-off window probe. Its pauses are a
    /// tenth of the bound, so that a loaded machine stretching one sleep
    /// several times over still keeps it well within.
    #[tokio::test]
    async fn a_worker_that_reads_slowly_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        fill(&mut watched).await;
        let mut buf = vec![0u8; 128 << 10];
        let started = Instant::now();
        let mut last_taken = started;
        for _ in 0..40 {
            tokio::time::sleep(SILENCE / 10).await;
            // Taking a little makes room: the gateway's queue moves on.
            // Once all is taken, nothing waits and nothing is judged.
            match worker.try_read(&mut buf) {
                Ok(n) => {
                    assert!(n > 0, "the gateway closed the connection");
                    last_taken = Instant::now();
                }
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        // Else the worker took it all within the bound, and this tested
        // nothing.
        assert!(
            last_taken - started > SILENCE * 3 / 2,
            "the backlog lasted only {:?}",
            last_taken - started
        );
        worker.write_all(b"still here").await.unwrap();
        assert!(watched.read(&mut buf).await.unwrap() > 0);
    }

    #[tokio::test]
    async fn a_worker_that_does_not_answer_a_ping_is_cut_within_the_bound() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, _worker) = pair(&watchdog).await;
        watched.write_all(&ping()).await.unwrap();
        let took = cut_within_the_bound(&mut watched).await;
        assert!(took >= SILENCE, "closed after {took:?}, before the bound");
    }

    /// What the gateway reads after its ping may have been sent before it
    /// (a backlog it was slow to read): only the answer counts.
    #[tokio::test]
    async fn data_read_after_a_ping_is_not_its_answer() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        watched.write_all(&ping()).await.unwrap();
        let data = frame(0x0, 0, &[1; 40]);
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            worker.write_all(&data).await.unwrap();
            watched.read_exact(&mut buf[..data.len()]).await.unwrap();
            tokio::time::sleep(SILENCE / 4).await;
        }
        cut_within_the_bound(&mut watched).await;
    }

    #[tokio::test]
    async fn a_worker_that_answers_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        let mut buf = [0u8; 64];
        for _ in 0..10 {
            watched.write_all(&ping()).await.unwrap();
            worker.read_exact(&mut buf[..17]).await.unwrap();
            worker.write_all(&pong()).await.unwrap();
            watched.read_exact(&mut buf[..17]).await.unwrap();
            tokio::time::sleep(SILENCE / 3).await;
        }
        worker.write_all(b"still here").await.unwrap();
        assert!(watched.read(&mut buf).await.unwrap() > 0);
    }

    /// Silence with no question asked is not a hang: the gateway was too
    /// busy to ping.
    #[tokio::test]
    async fn a_worker_never_asked_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        // Frames that are not pings, one of them with a ping's type byte in
        // its payload.
        watched
            .write_all(&frame(0x0, 0, &[0, 0, 8, PING, 0, 0, 0, 0, 0]))
            .await
            .unwrap();
        watched.write_all(&pong()).await.unwrap();
        tokio::time::sleep(SILENCE * 3).await;
        worker.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(watched.read(&mut buf).await.unwrap() > 0);
    }

    /// The case hyper's keepalive gets wrong: the gateway does not get round
    /// to reading, and the worker's answer waits in the kernel.
    #[tokio::test]
    async fn a_worker_whose_answer_waits_unread_is_kept() {
        let watchdog = Watchdog::start(SILENCE).unwrap();
        let (mut watched, mut worker) = pair(&watchdog).await;
        watched.write_all(&ping()).await.unwrap();
        worker.write_all(&pong()).await.unwrap();
        tokio::time::sleep(SILENCE * 3).await;
        let mut buf = [0u8; 64];
        watched.read_exact(&mut buf[..17]).await.unwrap();
        // A ping unanswered from here counts from here.
        watched.write_all(&ping()).await.unwrap();
        let took = cut_within_the_bound(&mut watched).await;
        assert!(took >= SILENCE, "closed after {took:?}");
    }

    #[test]
    fn pings_are_counted_wherever_the_bytes_split_them() {
        let mut bytes = vec![b'P'; CLIENT_PREFACE_LEN];
        bytes.extend(frame(0x4, 0, &[0; 12])); // settings
        bytes.extend(frame(0x0, 0, &[PING; 20])); // data that looks like pings
        bytes.extend(pong()); // an answer to the worker's ping
        let asks_at = bytes.len();
        bytes.extend(ping());
        bytes.extend(frame(0x0, 0, &[PING; 3]));
        let header_end = asks_at + FRAME_HEADER_LEN;
        for split in 1..bytes.len() {
            let mut walker = FrameWalker::client();
            let first = walker.walk(&bytes[..split]);
            let second = walker.walk(&bytes[split..]);
            // The ping counts in the bytes that complete its header.
            assert_eq!(first, u64::from(split >= header_end), "split at {split}");
            assert_eq!(first + second, 1, "split at {split}");
            assert_eq!((walker.skip, walker.have), (0, 0), "split at {split}");
        }
        let mut walker = FrameWalker::client();
        let slices = [
            io::IoSlice::new(&bytes[..30]),
            io::IoSlice::new(&bytes[30..]),
        ];
        assert_eq!(walker.walk_vectored(&slices, asks_at), 0);
        assert_eq!(walker.walk(&bytes[asks_at..]), 1);

        // What a worker sends: no preface; its answers are the ACKs.
        let answers = [pong(), frame(0x0, 0, &[PING; 9]), ping(), pong()].concat();
        for split in 1..answers.len() {
            let mut walker = FrameWalker::server();
            let pongs = walker.walk(&answers[..split]) + walker.walk(&answers[split..]);
            assert_eq!(pongs, 2, "split at {split}");
        }
    }
}

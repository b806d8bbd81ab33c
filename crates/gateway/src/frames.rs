//! The socket's two halves: tungstenite reads the client's frames, and
//! [`FrameWriter`] writes ours.
//!
//! Server frames are unmasked, so a frame on the wire is a few header bytes
//! followed by the payload unchanged. The writer hands the payload — one
//! allocation shared by every socket that receives it — to the kernel by
//! reference with vectored writes. Nothing is copied into a per-socket
//! buffer, which keeps a broadcast cheap and leaves no buffer behind when a
//! big frame (a long online list) has gone out.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::io::{ReadIo, WriteIo};

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// Control frame payloads are at most 125 bytes (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// The read half, as tungstenite wants it: a stream that also writes.
/// Writes are dropped: tungstenite's automatic replies (pong, close) are
/// sent by the session through [`FrameWriter`] instead. It counts the bytes
/// read, so the session can tell a frame left half-sent.
pub struct ReadHalf {
    io: ReadIo,
    read: u64,
}

impl ReadHalf {
    pub fn new(io: ReadIo) -> Self {
        ReadHalf { io, read: 0 }
    }

    /// Bytes read from the client so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl AsyncWrite for ReadHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A final frame's header: FIN, opcode, unmasked length.
fn header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

pub struct FrameWriter {
    io: WriteIo,
    /// A write was cut off part-way (cancelled); the stream is mid-frame and
    /// nothing more may be written to it.
    broken: bool,
}

impl FrameWriter {
    pub fn new(io: WriteIo) -> Self {
        FrameWriter { io, broken: false }
    }

    /// Writes text frames in one vectored write (or as few as the kernel
    /// allows). If the future is dropped part-way, the writer is broken.
    pub async fn text(&mut self, frames: &[Utf8Bytes]) -> io::Result<()> {
        let headers: Vec<([u8; 10], usize)> =
            frames.iter().map(|f| header(OP_TEXT, f.len())).collect();
        let mut slices = Vec::with_capacity(frames.len() * 2);
        for ((h, n), f) in headers.iter().zip(frames) {
            slices.push(IoSlice::new(&h[..*n]));
            slices.push(IoSlice::new(f.as_bytes()));
        }
        self.write_all(&mut slices).await
    }

    /// Asks the client for a pong (keepalive).
    pub async fn ping(&mut self) -> io::Result<()> {
        let (h, n) = header(OP_PING, 0);
        self.write_all(&mut [IoSlice::new(&h[..n])]).await
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        let payload = &payload[..payload.len().min(MAX_CONTROL)];
        let (h, n) = header(OP_PONG, payload.len());
        self.write_all(&mut [IoSlice::new(&h[..n]), IoSlice::new(payload)])
            .await
    }

    /// Sends a close frame (unless the stream is mid-frame) and shuts the
    /// write side down.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if !self.broken {
            let mut payload = code.to_be_bytes().to_vec();
            // Cut the reason at a character boundary within the limit.
            let mut end = reason.len().min(MAX_CONTROL - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
            let (h, n) = header(OP_CLOSE, payload.len());
            self.write_all(&mut [IoSlice::new(&h[..n]), IoSlice::new(&payload)])
                .await?;
        }
        self.io.shutdown().await
    }

    async fn write_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "socket is mid-frame",
            ));
        }
        while !bufs.is_empty() {
            let n = self.io.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
            // Part of a frame is out: if this future is dropped now, the
            // stream is mid-frame. Cleared once the whole batch is out.
            self.broken = !bufs.is_empty();
        }
        // A no-op on plain TCP; TLS may hold the tail of a record until
        // flushed when the socket was full.
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::header;

    #[test]
    fn header_lengths() {
        assert_eq!(header(1, 5).0[..2], [0x81, 5]);
        assert_eq!(header(1, 126).0[..4], [0x81, 126, 0, 126]);
        assert_eq!(header(1, 70_000).1, 10);
        assert_eq!(header(8, 2).0[..2], [0x88, 2]);
    }
}

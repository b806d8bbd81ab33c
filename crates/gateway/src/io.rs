//! A client connection, plain TCP or TLS, and its two halves.
//!
//! hyper serves a [`ServerIo`]; after a WebSocket upgrade the session splits it
//! into a [`ReadIo`] that tungstenite reads and a [`WriteIo`] that our frame
//! writer writes. Plain TCP splits for free (`into_split`); a TLS stream has
//! one state for both directions, so its halves share it behind tokio's lock
//! (only the session task uses either half, so the lock is never contended).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// One accepted connection. The TLS state is boxed: a plain socket, the
/// common case at 100k idle sockets, stays the size of a `TcpStream`.
pub enum ServerIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub enum ReadIo {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

pub enum WriteIo {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl ServerIo {
    pub fn into_split(self) -> (ReadIo, WriteIo) {
        match self {
            ServerIo::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadIo::Plain(r), WriteIo::Plain(w))
            }
            ServerIo::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadIo::Tls(r), WriteIo::Tls(w))
            }
        }
    }
}

/// Forwards each `AsyncRead` / `AsyncWrite` call to whichever variant is there.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => $e,
            Self::Tls($s) => $e,
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncRead for ReadIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

macro_rules! forward_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                each!(self, s => Pin::new(s).poll_write(cx, buf))
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each!(self, s => Pin::new(s).poll_flush(cx))
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each!(self, s => Pin::new(s).poll_shutdown(cx))
            }
        }
    };
}

forward_write!(ServerIo);
forward_write!(WriteIo);

//! One load client's connection: TCP from a chosen 127.0.0.x source, the
//! WebSocket handshake, and the Status frame that opens every session.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::net::Target;
use crate::wire::{self, FrameKind};

pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer per client socket. tungstenite zero-fills the whole read
/// buffer before every read and keeps it for the socket's life, so its
/// default of 128 KiB would cost a 128 KiB memset per read and that much RSS
/// per client. 8 KiB holds dozens of chat frames per read and still reads a
/// large userlist in few calls.
pub const CLIENT_READ_BUFFER: usize = 8 * 1024;

/// Frames a client accepts, generously above any userlist of a 100k storm.
const CLIENT_MAX_MESSAGE: usize = 64 << 20;

/// The tungstenite settings of a load client.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        // Frames a client sends are small and each is flushed at once.
        .write_buffer_size(0)
        .max_message_size(Some(CLIENT_MAX_MESSAGE))
        .max_frame_size(Some(CLIENT_MAX_MESSAGE))
}

/// Connects from `source`, completes the WebSocket handshake and reads the
/// Status frame, all within `timeout`. Returns the socket and the WSID.
pub async fn connect(
    target: &Target,
    source: Ipv4Addr,
    timeout: Duration,
) -> anyhow::Result<(Ws, String)> {
    connect_with_recv_buffer(target, source, timeout, None).await
}

/// [`connect`], with the socket's receive buffer (`SO_RCVBUF`) set to
/// `recv_buffer` bytes before connecting, when given: it must be set before
/// the handshake, as it fixes the TCP window scale. A small one makes a
/// client that stops reading stall the server's writes after a few KiB.
pub async fn connect_with_recv_buffer(
    target: &Target,
    source: Ipv4Addr,
    timeout: Duration,
    recv_buffer: Option<u32>,
) -> anyhow::Result<(Ws, String)> {
    // Where a connection that took too long was stuck (see `STEPS`).
    let step = AtomicUsize::new(0);
    tokio::time::timeout(timeout, connect_inner(target, source, recv_buffer, &step))
        .await
        .with_context(|| {
            format!(
                "no Status frame within {timeout:?} (stuck in {})",
                STEPS[step.load(Ordering::Relaxed)]
            )
        })?
}

/// The steps of a connection, as a timeout names the one it was stuck in.
const STEPS: [&str; 3] = [
    "the TCP connect",
    "the WebSocket handshake",
    "the wait for Status after the handshake",
];

async fn connect_inner(
    target: &Target,
    source: Ipv4Addr,
    recv_buffer: Option<u32>,
    step: &AtomicUsize,
) -> anyhow::Result<(Ws, String)> {
    let socket = TcpSocket::new_v4().context("socket")?;
    crate::sys::set_bind_address_no_port(&socket).context("IP_BIND_ADDRESS_NO_PORT")?;
    if let Some(bytes) = recv_buffer {
        socket.set_recv_buffer_size(bytes).context("SO_RCVBUF")?;
    }
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
        .with_context(|| format!("bind {source}"))?;
    let tcp = socket
        .connect(SocketAddr::V4(target.addr))
        .await
        .with_context(|| format!("connect {} from {source}", target.addr))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    step.store(1, Ordering::Relaxed);
    let (mut ws, _response) = client_async_with_config(target.url.as_str(), tcp, Some(ws_config()))
        .await
        .context("websocket handshake")?;
    step.store(2, Ordering::Relaxed);
    let wsid = read_status(&mut ws).await?;
    Ok((ws, wsid))
}

/// Reads the first frame, which must be Status.
async fn read_status(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if wire::frame_kind(&text) != FrameKind::Status {
                    bail!("first frame is not Status: {}", truncate(&text, 120));
                }
                return wire::status_wsid(&text).with_context(|| {
                    format!("Status frame without WSID: {}", truncate(&text, 120))
                });
            }
            Some(Ok(Message::Close(frame))) => bail!("closed before Status: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading Status"),
            None => bail!("closed before Status"),
        }
    }
}

pub fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

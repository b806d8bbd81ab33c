//! The gateway's one error type, and where errors become close codes.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid worker address {0:?}: {1}")]
    WorkerAddress(String, String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("tls: {0}")]
    Tls(String),
}

/// Why a socket is being closed by us; the single place that picks the
/// WebSocket close code and the text the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The gateway is shutting down.
    GoingAway,
    /// No worker could take the socket right now.
    NoWorker,
    /// The link to the socket's worker broke (worker restart or cut).
    WorkerLost,
    /// The client did not read fast enough and its queue overflowed.
    TooSlow,
    /// The client sent a binary frame.
    Binary,
    /// The client sent a frame over the size limit.
    TooBig,
    /// The client sent text that is not UTF-8.
    BadText,
    /// The client broke the WebSocket protocol.
    Protocol,
    /// The client answered no ping for the keepalive timeout.
    Unresponsive,
    /// The client began a frame and did not finish it in time.
    FrameTimeout,
}

impl CloseReason {
    pub fn code(self) -> CloseCode {
        match self {
            CloseReason::GoingAway => CloseCode::Away,
            CloseReason::NoWorker => CloseCode::Again,
            CloseReason::WorkerLost => CloseCode::Restart,
            CloseReason::TooSlow => CloseCode::Policy,
            CloseReason::Binary => CloseCode::Unsupported,
            CloseReason::TooBig => CloseCode::Size,
            CloseReason::BadText => CloseCode::Invalid,
            CloseReason::Protocol => CloseCode::Protocol,
            CloseReason::Unresponsive => CloseCode::Away,
            CloseReason::FrameTimeout => CloseCode::Policy,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::GoingAway => "gateway going away",
            CloseReason::NoWorker => "no worker available, try again",
            CloseReason::WorkerLost => "worker restarting, reconnect",
            CloseReason::TooSlow => "client too slow, messages not read",
            CloseReason::Binary => "binary frames are not supported",
            CloseReason::TooBig => "frame too large",
            CloseReason::BadText => "text frame is not valid UTF-8",
            CloseReason::Protocol => "websocket protocol error",
            CloseReason::Unresponsive => "no answer to ping",
            CloseReason::FrameTimeout => "frame not completed in time",
        }
    }
}

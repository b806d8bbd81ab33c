//! The gRPC edge: turns `Link` streams into runtime [`Input`]s.
//!
//! Protobuf types stop here. Each stream gets a [`StreamId`]; its first event
//! must be `Hello` (with the cluster's link token, when one is set), after
//! which every event is forwarded in order. When the stream ends, for
//! whatever reason, the runtime hears `StreamDown`: the sockets that were
//! open on it are detached, not closed, since their gateway may re-attach
//! them here or to another worker.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sharedconn_proto::gateway_event::Event;
use sharedconn_proto::worker_server::{Worker, WorkerServer};
use sharedconn_proto::{GatewayEvent, Mode, WorkerCommand};
use std::future::Future;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::app::OpenInfo;
use crate::router::{Backlog, MAX_QUEUED_BYTES_PRIVATE, MAX_QUEUED_BYTES_SHARED, Peer, StreamId};
use crate::runtime::Input;

/// Commands queued towards one stream. A shared stream carries every socket
/// of a gateway, so this absorbs a burst of broadcasts while HTTP/2 flushes;
/// when it is full the stream is cut (see `Router::push`).
pub const STREAM_QUEUE: usize = 8192;
/// A private stream carries one socket, so it needs far less.
pub const PRIVATE_STREAM_QUEUE: usize = 1024;
/// Private mode opens one stream per browser socket on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1 << 20;
/// Streams that may be reset on one connection before h2 calls it abuse: as
/// many as one gateway's sockets may close at once.
pub const MAX_RESET_STREAMS: usize = 1 << 20;
/// Largest gRPC message we accept: a frame is at most 64 KiB by default at
/// the gateway, plus framing.
const MAX_MESSAGE: usize = 1 << 20;

/// The gRPC service; `token` is the shared secret every `Hello` must carry
/// (none: any gateway may link, for a worker on loopback or a private network).
pub fn service(inbox: mpsc::Sender<Input>, token: Option<String>) -> WorkerServer<LinkService> {
    WorkerServer::new(LinkService {
        inbox,
        next_stream: Arc::new(AtomicU64::new(1)),
        token,
    })
    .max_decoding_message_size(MAX_MESSAGE)
}

pub struct LinkService {
    inbox: mpsc::Sender<Input>,
    next_stream: Arc<AtomicU64>,
    token: Option<String>,
}

type CommandStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WorkerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for LinkService {
    type LinkStream = CommandStream;

    async fn link(
        &self,
        request: Request<Streaming<GatewayEvent>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let mut events = request.into_inner();
        let hello = match events.message().await? {
            Some(GatewayEvent {
                event: Some(Event::Hello(hello)),
            }) => hello,
            _ => return Err(Status::invalid_argument("the first event must be Hello")),
        };
        if let Some(token) = &self.token
            && !constant_time_eq(token.as_bytes(), hello.token.as_bytes())
        {
            warn!(
                gateway_tag = format!("{:08x}", hello.gateway_tag),
                "link refused: wrong link token"
            );
            return Err(Status::unauthenticated("wrong link token"));
        }
        let peer = Peer {
            tag: hello.gateway_tag,
            boot: hello.boot_id,
        };
        let mode = Mode::try_from(hello.mode).unwrap_or(Mode::Unspecified);
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let capacity = match mode {
            Mode::Private => PRIVATE_STREAM_QUEUE,
            _ => STREAM_QUEUE,
        };
        let (tx, rx) = mpsc::channel(capacity);
        let (cut, cut_rx) = oneshot::channel();
        let backlog = Arc::new(Backlog::new(match mode {
            Mode::Private => MAX_QUEUED_BYTES_PRIVATE,
            _ => MAX_QUEUED_BYTES_SHARED,
        }));
        if self
            .inbox
            .send(Input::StreamUp {
                stream,
                peer,
                resuming: hello.resuming,
                tx,
                backlog: backlog.clone(),
                cut,
            })
            .await
            .is_err()
        {
            return Err(Status::unavailable("worker is shutting down"));
        }
        // Logged as linked by the runtime, once it takes the stream (it
        // refuses one while draining, or when another gateway holds the tag).
        debug!(
            stream,
            gateway_tag = format!("{:08x}", hello.gateway_tag),
            ?mode,
            resuming = hello.resuming,
            "link stream opened"
        );
        tokio::spawn(forward(stream, peer, events, self.inbox.clone()));
        Ok(Response::new(Box::pin(Commands {
            queue: ReceiverStream::new(rx),
            backlog,
            cut: Some(cut_rx),
        })))
    }
}

/// A stream's response: its queued commands, unless the runtime cuts the
/// stream (it fell too far behind, or its gateway may not link), which ends
/// it at once with the status it is given.
struct Commands {
    queue: ReceiverStream<WorkerCommand>,
    /// Shared with the router, which adds what it queues.
    backlog: Arc<Backlog>,
    cut: Option<oneshot::Receiver<Status>>,
}

impl tokio_stream::Stream for Commands {
    type Item = Result<WorkerCommand, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(cut) = &mut self.cut {
            match Pin::new(cut).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.cut = None;
                    self.queue.close();
                    return Poll::Ready(Some(Err(status)));
                }
                // The router let the stream go without cutting it.
                Poll::Ready(Err(_)) => self.cut = None,
                Poll::Pending => {}
            }
        }
        let next = Pin::new(&mut self.queue).poll_next(cx);
        if let Poll::Ready(Some(WorkerCommand {
            command: Some(command),
        })) = &next
        {
            self.backlog.sent(command);
        }
        next.map(|c| c.map(Ok))
    }
}

/// Forwards one stream's events to the runtime, then reports it down.
async fn forward(
    stream: StreamId,
    peer: Peer,
    mut events: Streaming<GatewayEvent>,
    inbox: mpsc::Sender<Input>,
) {
    loop {
        let input = match events.message().await {
            Ok(Some(GatewayEvent { event: Some(event) })) => match event {
                // A gateway opens only IDs it issued (high half: its tag).
                Event::Open(o) if (o.ws_id >> 32) as u32 != peer.tag => Input::Refuse {
                    stream,
                    ws: o.ws_id,
                },
                Event::Open(o) => Input::Open {
                    stream,
                    ws: o.ws_id,
                    open: OpenInfo {
                        since: o.since,
                        resume: o.resume,
                        log: o.log,
                        state: o.state,
                        opened_ms: o.opened_ms,
                        boot: peer.boot,
                        version: o.version,
                    },
                },
                Event::Frame(f) => Input::Frame {
                    stream,
                    ws: f.ws_id,
                    seq: f.seq,
                    text: f.text,
                },
                Event::Synced(_) => Input::Synced { stream },
                Event::Fetch(f) => Input::Fetch {
                    stream,
                    ws: f.ws_id,
                    after: f.after,
                    max_messages: f.max_messages as usize,
                    max_bytes: f.max_bytes as usize,
                },
                Event::Close(c) => Input::Close {
                    stream,
                    ws: c.ws_id,
                },
                Event::Hello(_) => continue,
            },
            Ok(Some(GatewayEvent { event: None })) => continue,
            Ok(None) => break,
            Err(status) => {
                debug!(stream, %status, "stream ended with an error");
                break;
            }
        };
        if inbox.send(input).await.is_err() {
            return;
        }
    }
    let _ = inbox.send(Input::StreamDown { stream }).await;
}

/// Compares secrets in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

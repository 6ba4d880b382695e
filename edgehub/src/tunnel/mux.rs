//! Streams multiplexed over one hub link, with credit-based flow control per stream.
//!
//! Each side grants its peer a receive window per stream (sent in the open and its answer) and
//! grants more with WINDOW frames as its reader consumes data, so a stream whose reader stalls
//! stops its sender without slowing the other streams of the link, and no buffer grows beyond
//! the window. Data written locally also takes bytes of a link-wide budget until the link's
//! writer has handed it to the socket, so a slow link bounds what the writers can queue.
//!
//! The cloud also relays streams between two nodes: the two legs are tied together by stream
//! id in both links' tables, frames pass through with only their id rewritten, and the relay
//! checks that neither side sends more than the other granted.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::PollSemaphore;
use tracing::debug;

use super::frame::{self, Frame, FrameError};
use super::open::{OpenError, OpenRefusal, OpenRequest, OpenResponse, RefusalKind, OPEN};
use crate::message::{module, op, Message};

#[derive(Clone, Debug)]
pub struct MuxConfig {
    /// Bytes a peer may send on one stream before this side grants more.
    pub window: u32,
    /// Streams open at once on this link (both directions, relayed ones included).
    pub max_streams: usize,
    /// How long an open waits for its answer.
    pub open_timeout: Duration,
    /// Bytes of locally written data that may wait for the link's writer.
    pub link_budget: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            window: 256 * 1024,
            max_streams: 1024,
            open_timeout: Duration::from_secs(5),
            link_budget: 4 << 20,
        }
    }
}

/// Which end of the link this multiplexer is; it decides the parity of the ids it allocates,
/// so both ends can open streams without agreeing on ids first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Cloud,
    Edge,
}

impl Side {
    fn first_id(self) -> u32 {
        match self {
            Side::Cloud => 1,
            Side::Edge => 2,
        }
    }

    fn module(self) -> &'static str {
        match self {
            Side::Cloud => module::CLOUDHUB,
            Side::Edge => module::EDGEHUB,
        }
    }

    /// Whether `id` is one the peer allocates.
    fn is_peer_id(self, id: u32) -> bool {
        id != 0 && id.is_multiple_of(2) == (self == Side::Cloud)
    }
}

/// A websocket message for the link's writer. The permit (bytes of the link budget) is
/// released when the writer drops it after the write.
pub struct Outgoing {
    message: WsMessage,
    permit: Option<OwnedSemaphorePermit>,
}

/// Bytes of the link budget, given back when dropped.
pub struct BudgetPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Outgoing {
    /// The message, and the budget it holds: drop that once the message is written.
    pub fn into_parts(self) -> (WsMessage, BudgetPermit) {
        (self.message, BudgetPermit(self.permit))
    }

    pub fn message(&self) -> &WsMessage {
        &self.message
    }
}

/// An open request from the peer, waiting to be accepted or refused.
#[derive(Debug)]
pub struct Incoming {
    pub request: OpenRequest,
    msg_id: String,
}

/// Why a stream message or frame from the peer was rejected. The link's owner decides what a
/// bad message costs the peer (the cloud closes a node's link over one).
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed stream message: {0}")]
    Message(String),
}

enum Inbound {
    Data(Bytes),
    Fin,
    Reset(String),
}

/// What a writer may still send on a stream, and its waker when that is nothing.
#[derive(Default)]
struct SendCredit {
    bytes: AtomicI64,
    reset: AtomicBool,
    waker: AtomicWaker,
    /// Wakes whoever waits for the stream to be aborted (see [`TunnelReader`]).
    aborted: tokio::sync::Notify,
}

impl SendCredit {
    fn grant(&self, n: i64) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
        self.waker.wake();
    }

    fn reset(&self) {
        self.reset.store(true, Ordering::Release);
        self.waker.wake();
        self.aborted.notify_waiters();
    }
}

struct Local {
    inbound: mpsc::UnboundedSender<Inbound>,
    /// Bytes the peer may still send before this side grants more.
    receivable: i64,
    send: Arc<SendCredit>,
    opening: Option<oneshot::Sender<OpenResponse>>,
}

/// One leg of a relayed stream.
struct Relay {
    peer: Weak<Shared>,
    peer_id: u32,
    /// Bytes this leg's node may still send (granted by the other node's WINDOW frames).
    sendable: Arc<AtomicI64>,
    /// What this leg's WINDOW frames grant the other node.
    grants: Arc<AtomicI64>,
    fin_in: bool,
    fin_out: bool,
    /// Set on the target's leg until the target answers the open.
    opening: Option<oneshot::Sender<OpenResponse>>,
}

enum Entry {
    Local(Local),
    Relay(Relay),
}

struct Shared {
    cfg: MuxConfig,
    side: Side,
    next_id: AtomicU32,
    streams: Mutex<HashMap<u32, Entry>>,
    out: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Semaphore>,
    closed: AtomicBool,
}

/// The streams of one link. Cheap to clone; every clone is the same multiplexer.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux")
            .field("side", &self.shared.side)
            .field("streams", &self.open_streams())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send_frame(&self, raw: Bytes) {
        let _ = self.out.send(Outgoing {
            message: WsMessage::Binary(raw),
            permit: None,
        });
    }

    fn send_message(&self, msg: Message) {
        let _ = self.out.send(Outgoing {
            message: WsMessage::text(msg.to_json()),
            permit: None,
        });
    }

    fn reset(&self, id: u32, reason: &str) {
        self.send_frame(Frame::Reset(id, reason.to_string()).encode());
    }

    fn alloc_id(&self) -> u32 {
        // Ids step by two (the peer has the other parity); 0 is never used.
        loop {
            let id = self.next_id.fetch_add(2, Ordering::Relaxed);
            if id != 0 && !self.lock().contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes a stream entry and tells whoever holds the other end (local reader and writer,
    /// or the relay's other leg) that it was reset.
    fn abort(&self, id: u32, reason: &str, tell_peer: bool) {
        let entry = self.lock().remove(&id);
        if tell_peer {
            self.reset(id, reason);
        }
        match entry {
            Some(Entry::Local(local)) => {
                let _ = local.inbound.send(Inbound::Reset(reason.to_string()));
                local.send.reset();
            }
            Some(Entry::Relay(relay)) => {
                if let Some(peer) = relay.peer.upgrade() {
                    peer.abort(relay.peer_id, reason, true);
                }
            }
            None => {}
        }
    }
}

impl Mux {
    /// A multiplexer and the queue its link's writer must drain into the websocket.
    pub fn new(cfg: MuxConfig, side: Side) -> (Mux, mpsc::UnboundedReceiver<Outgoing>) {
        let (out, rx) = mpsc::unbounded_channel();
        // The budget must admit one whole frame, or a writer could wait for ever.
        let budget = cfg.link_budget.max(frame::MAX_DATA);
        let shared = Arc::new(Shared {
            next_id: AtomicU32::new(side.first_id()),
            cfg,
            side,
            streams: Mutex::new(HashMap::new()),
            out,
            budget: Arc::new(Semaphore::new(budget)),
            closed: AtomicBool::new(false),
        });
        (Mux { shared }, rx)
    }

    pub fn open_streams(&self) -> usize {
        self.shared.lock().len()
    }

    /// Whether two handles are the same multiplexer.
    pub fn same(a: &Mux, b: &Mux) -> bool {
        Arc::ptr_eq(&a.shared, &b.shared)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.shared.out.is_closed()
    }

    pub fn config(&self) -> &MuxConfig {
        &self.shared.cfg
    }

    fn check_capacity(&self) -> Result<(), OpenError> {
        if self.is_closed() {
            return Err(OpenError::LinkDown);
        }
        let n = self.open_streams();
        if n >= self.shared.cfg.max_streams {
            return Err(OpenError::TooManyStreams(n));
        }
        Ok(())
    }

    /// Opens a stream to the peer and waits for its answer.
    pub async fn open(&self, mut request: OpenRequest) -> Result<TunnelStream, OpenError> {
        self.check_capacity()?;
        let shared = &self.shared;
        let id = shared.alloc_id();
        request.stream = id;
        request.window = shared.cfg.window;
        let (tx, rx) = mpsc::unbounded_channel();
        let (answer_tx, answer_rx) = oneshot::channel();
        let send = Arc::new(SendCredit::default());
        shared.lock().insert(
            id,
            Entry::Local(Local {
                inbound: tx,
                receivable: i64::from(shared.cfg.window),
                send: send.clone(),
                opening: Some(answer_tx),
            }),
        );
        // From here the stream exists; the guard removes it if this future is dropped or the
        // open fails, so an abandoned open cannot leak an entry.
        let mut guard = OpenGuard {
            shared: shared.clone(),
            id,
            armed: true,
        };
        shared.send_message(request.message(shared.side.module()));
        let answer = match tokio::time::timeout(shared.cfg.open_timeout, answer_rx).await {
            Err(_) => return Err(OpenError::Timeout(shared.cfg.open_timeout)),
            Ok(Err(_)) => return Err(OpenError::LinkDown),
            Ok(Ok(answer)) => answer,
        };
        if let Some(refusal) = answer.error {
            // The peer has no stream to reset.
            guard.armed = false;
            shared.lock().remove(&id);
            return Err(OpenError::Refused {
                kind: refusal.kind,
                message: refusal.message,
            });
        }
        guard.armed = false;
        send.grant(i64::from(answer.window));
        Ok(TunnelStream::new(shared.clone(), id, rx, send))
    }

    /// Takes a stream message (group `stream`) from the peer. An open request is returned
    /// for the caller to [`accept`](Self::accept) or [`refuse`](Self::refuse); an answer
    /// completes the matching [`open`](Self::open) or relay.
    pub fn on_message(&self, msg: &Message) -> Result<Option<Incoming>, MuxError> {
        match (msg.operation(), msg.resource()) {
            (op::QUERY, OPEN) => {
                let request: OpenRequest = msg
                    .content_as()
                    .map_err(|e| MuxError::Message(format!("open request: {e}")))?;
                Ok(Some(Incoming {
                    request,
                    msg_id: msg.header.id.clone(),
                }))
            }
            (op::RESPONSE, OPEN) => {
                let answer: OpenResponse = msg
                    .content_as()
                    .map_err(|e| MuxError::Message(format!("open answer: {e}")))?;
                let waiter = match self.shared.lock().get_mut(&answer.stream) {
                    Some(Entry::Local(local)) => local.opening.take(),
                    Some(Entry::Relay(relay)) => relay.opening.take(),
                    None => None,
                };
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(answer);
                    }
                    // A late answer to an open that timed out: the guard has reset it.
                    None => debug!(stream = answer.stream, "answer to an unknown open"),
                }
                Ok(None)
            }
            (operation, resource) => Err(MuxError::Message(format!(
                "unknown stream message {operation} {resource}"
            ))),
        }
    }

    /// Checks that the peer may open `incoming` on this link at all (id and capacity).
    fn admit(&self, incoming: &Incoming) -> Result<(), OpenRefusal> {
        let id = incoming.request.stream;
        if !self.shared.side.is_peer_id(id) || self.shared.lock().contains_key(&id) {
            return Err(OpenRefusal {
                kind: RefusalKind::Invalid,
                message: format!("stream id {id} is not a free id of the opener"),
            });
        }
        if let Err(e) = self.check_capacity() {
            return Err(OpenRefusal {
                kind: RefusalKind::Busy,
                message: e.to_string(),
            });
        }
        Ok(())
    }

    /// Accepts a stream the peer opened.
    pub fn accept(&self, incoming: Incoming) -> Result<TunnelStream, OpenRefusal> {
        if let Err(refusal) = self.admit(&incoming) {
            self.refuse(incoming, refusal.kind, &refusal.message);
            return Err(refusal);
        }
        let shared = &self.shared;
        let id = incoming.request.stream;
        let (tx, rx) = mpsc::unbounded_channel();
        let send = Arc::new(SendCredit::default());
        send.grant(i64::from(incoming.request.window));
        // The entry exists before the answer leaves, so data the opener sends right after
        // reading the answer always finds it.
        shared.lock().insert(
            id,
            Entry::Local(Local {
                inbound: tx,
                receivable: i64::from(shared.cfg.window),
                send: send.clone(),
                opening: None,
            }),
        );
        shared.send_message(
            OpenResponse {
                stream: id,
                window: shared.cfg.window,
                error: None,
            }
            .message(shared.side.module(), &incoming.msg_id),
        );
        Ok(TunnelStream::new(shared.clone(), id, rx, send))
    }

    /// Refuses a stream the peer opened.
    pub fn refuse(&self, incoming: Incoming, kind: RefusalKind, message: &str) {
        let shared = &self.shared;
        shared.send_message(
            OpenResponse {
                stream: incoming.request.stream,
                window: 0,
                error: Some(OpenRefusal {
                    kind,
                    message: message.to_string(),
                }),
            }
            .message(shared.side.module(), &incoming.msg_id),
        );
    }

    /// Relays `incoming` (opened by this link's peer) to `target`'s peer as `request`: the
    /// two legs are tied together and frames pass through by id. Answers the opener either way.
    pub async fn relay(
        &self,
        incoming: Incoming,
        target: &Mux,
        mut request: OpenRequest,
    ) -> Result<(), OpenError> {
        if let Err(refusal) = self.admit(&incoming) {
            self.refuse(incoming, refusal.kind, &refusal.message);
            return Err(OpenError::Refused {
                kind: refusal.kind,
                message: refusal.message,
            });
        }
        if let Err(e) = target.check_capacity() {
            let kind = match e {
                OpenError::LinkDown => RefusalKind::NodeOffline,
                _ => RefusalKind::Busy,
            };
            self.refuse(incoming, kind, &e.to_string());
            return Err(e);
        }
        let a_id = incoming.request.stream;
        let b_id = target.shared.alloc_id();
        // The opener's window travels end to end: the far side may send that much at once.
        let to_target = Arc::new(AtomicI64::new(0));
        let to_opener = Arc::new(AtomicI64::new(i64::from(incoming.request.window)));
        request.stream = b_id;
        request.window = incoming.request.window;
        self.shared.lock().insert(
            a_id,
            Entry::Relay(Relay {
                peer: Arc::downgrade(&target.shared),
                peer_id: b_id,
                sendable: to_target.clone(),
                grants: to_opener.clone(),
                fin_in: false,
                fin_out: false,
                opening: None,
            }),
        );
        let (answer_tx, answer_rx) = oneshot::channel();
        // Both legs exist before the open leaves: data the target sends right after its answer
        // is relayed to the opener, which takes data for a stream it is still opening.
        target.shared.lock().insert(
            b_id,
            Entry::Relay(Relay {
                peer: Arc::downgrade(&self.shared),
                peer_id: a_id,
                sendable: to_opener,
                grants: to_target.clone(),
                fin_in: false,
                fin_out: false,
                opening: Some(answer_tx),
            }),
        );
        target
            .shared
            .send_message(request.message(target.shared.side.module()));
        let answer = tokio::time::timeout(target.shared.cfg.open_timeout, answer_rx).await;
        let fail = |kind: RefusalKind, message: String, err: OpenError| {
            self.shared.lock().remove(&a_id);
            target.shared.lock().remove(&b_id);
            self.refuse(
                Incoming {
                    request: incoming.request.clone(),
                    msg_id: incoming.msg_id.clone(),
                },
                kind,
                &message,
            );
            Err(err)
        };
        let answer = match answer {
            Err(_) => {
                target.shared.reset(b_id, "open timed out");
                let e = OpenError::Timeout(target.shared.cfg.open_timeout);
                return fail(RefusalKind::Unreachable, e.to_string(), e);
            }
            Ok(Err(_)) => {
                return fail(
                    RefusalKind::NodeOffline,
                    "the target node's link closed".into(),
                    OpenError::LinkDown,
                )
            }
            Ok(Ok(answer)) => answer,
        };
        if let Some(refusal) = answer.error {
            let e = OpenError::Refused {
                kind: refusal.kind,
                message: refusal.message.clone(),
            };
            return fail(refusal.kind, refusal.message, e);
        }
        to_target.fetch_add(i64::from(answer.window), Ordering::AcqRel);
        if !self.shared.lock().contains_key(&a_id) {
            // The opener's link closed meanwhile (which also reset the target's leg).
            return Err(OpenError::LinkDown);
        }
        self.shared.send_message(
            OpenResponse {
                stream: a_id,
                window: answer.window,
                error: None,
            }
            .message(self.shared.side.module(), &incoming.msg_id),
        );
        Ok(())
    }

    /// Takes a binary frame from the peer. A frame whose header names a stream is that
    /// stream's business (a bad one resets it); one without a readable header is an error the
    /// link's owner should end the link over.
    pub fn on_binary(&self, raw: Bytes) -> Result<(), MuxError> {
        // Decoding validates the frame; the payload stays a view of `raw`.
        let frame = match Frame::decode(raw.clone()) {
            Ok(f) => f,
            Err(e) => {
                if let Some(id) = e.stream() {
                    self.shared.abort(id, &e.to_string(), true);
                    return Ok(());
                }
                return Err(e.into());
            }
        };
        let id = frame.id();
        let mut streams = self.shared.lock();
        match streams.get_mut(&id) {
            None => {
                // Frames in flight when a stream ended locally: nothing to do.
                debug!(stream = id, "frame for an unknown stream");
            }
            Some(Entry::Local(local)) => match frame {
                Frame::Data(_, data) => {
                    local.receivable -= data.len() as i64;
                    if local.receivable < 0 {
                        drop(streams);
                        self.shared
                            .abort(id, "peer exceeded the stream window", true);
                    } else if local.inbound.send(Inbound::Data(data)).is_err() {
                        // The reader is gone: the stream's drop sends the reset.
                    }
                }
                Frame::Window(_, n) => local.send.grant(i64::from(n)),
                Frame::Fin(_) => {
                    let _ = local.inbound.send(Inbound::Fin);
                }
                Frame::Reset(_, reason) => {
                    drop(streams);
                    self.shared.abort(id, &reason, false);
                }
            },
            Some(Entry::Relay(relay)) => {
                let Some(peer) = relay.peer.upgrade() else {
                    drop(streams);
                    self.shared.abort(id, "relay peer gone", true);
                    return Ok(());
                };
                let peer_id = relay.peer_id;
                let mut remove = false;
                match &frame {
                    Frame::Data(_, data) => {
                        let left = relay
                            .sendable
                            .fetch_sub(data.len() as i64, Ordering::AcqRel)
                            - data.len() as i64;
                        if left < 0 {
                            drop(streams);
                            self.shared
                                .abort(id, "node exceeded the stream window", true);
                            return Ok(());
                        }
                    }
                    Frame::Window(_, n) => {
                        relay.grants.fetch_add(i64::from(*n), Ordering::AcqRel);
                    }
                    Frame::Fin(_) => {
                        relay.fin_in = true;
                        remove = relay.fin_out;
                    }
                    Frame::Reset(..) => remove = true,
                }
                if remove {
                    streams.remove(&id);
                }
                drop(streams);
                let (fin, reset) = (
                    matches!(frame, Frame::Fin(_)),
                    matches!(frame, Frame::Reset(..)),
                );
                // The decoded frame shares the buffer; without it the header can be rewritten
                // in place, and the payload is never copied.
                drop(frame);
                if fin {
                    peer.note_fin_out(peer_id);
                }
                if reset {
                    peer.lock().remove(&peer_id);
                }
                peer.send_frame(frame::with_stream_id(raw, peer_id));
            }
        }
        Ok(())
    }

    /// Ends every stream: the link is gone. Relayed streams are reset on their other link.
    pub fn close(&self, reason: &str) {
        self.shared.closed.store(true, Ordering::Release);
        let entries: Vec<(u32, Entry)> = self.shared.lock().drain().collect();
        for (_, entry) in entries {
            match entry {
                Entry::Local(local) => {
                    let _ = local.inbound.send(Inbound::Reset(reason.to_string()));
                    local.send.reset();
                    // Dropping `opening` tells a waiting open that the link is down.
                }
                Entry::Relay(relay) => {
                    if let Some(peer) = relay.peer.upgrade() {
                        peer.abort(relay.peer_id, reason, true);
                    }
                }
            }
        }
    }
}

impl Shared {
    /// The relay leg `id` forwarded a FIN from its other leg; drop the pair once both ended.
    fn note_fin_out(&self, id: u32) {
        let mut streams = self.lock();
        if let Some(Entry::Relay(relay)) = streams.get_mut(&id) {
            relay.fin_out = true;
            if relay.fin_in {
                streams.remove(&id);
            }
        }
    }
}

/// Removes an open's entry (and resets it at the peer) unless the open completed.
struct OpenGuard {
    shared: Arc<Shared>,
    id: u32,
    armed: bool,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.lock().remove(&self.id);
            self.shared.reset(self.id, "open abandoned");
        }
    }
}

/// One tunnelled stream: a byte stream like a TCP connection, with half-close.
pub struct TunnelStream {
    shared: Arc<Shared>,
    id: u32,
    reading: Reading,
    writing: Writing,
    /// Set once a better way to the same peer is up (a direct path): the stream finishes
    /// what it carries but is not kept for more requests.
    superseded: Option<Arc<AtomicBool>>,
}

/// The receiving half's state.
struct Reading {
    inbound: mpsc::UnboundedReceiver<Inbound>,
    current: Bytes,
    /// Consumed bytes not yet granted back to the peer.
    consumed: u32,
    state: ReadState,
}

/// The sending half's state.
struct Writing {
    send: Arc<SendCredit>,
    budget: PollSemaphore,
    fin_sent: bool,
}

enum ReadState {
    Open,
    Eof,
    Reset(String),
}

impl TunnelStream {
    fn new(
        shared: Arc<Shared>,
        id: u32,
        inbound: mpsc::UnboundedReceiver<Inbound>,
        send: Arc<SendCredit>,
    ) -> TunnelStream {
        let budget = PollSemaphore::new(shared.budget.clone());
        TunnelStream {
            shared,
            id,
            reading: Reading {
                inbound,
                current: Bytes::new(),
                consumed: 0,
                state: ReadState::Open,
            },
            writing: Writing {
                send,
                budget,
                fin_sent: false,
            },
            superseded: None,
        }
    }

    /// Marks the stream as one to give up for new requests once `flag` is set.
    pub fn superseded_by(&mut self, flag: Arc<AtomicBool>) {
        self.superseded = Some(flag);
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether the stream is open both ways with nothing waiting to be read: a kept
    /// connection that may carry another request.
    pub fn is_idle_open(&self) -> bool {
        let r = &self.reading;
        r.current.is_empty()
            && matches!(r.state, ReadState::Open)
            && r.inbound.is_empty()
            && !r.inbound.is_closed()
            && !self.writing.fin_sent
            && !self.writing.send.reset.load(Ordering::Acquire)
            && !self.shared.closed.load(Ordering::Acquire)
            && !self
                .superseded
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

fn reset_error(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("stream reset: {reason}"),
    )
}

impl Reading {
    fn poll_read(
        &mut self,
        shared: &Shared,
        id: u32,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.current.is_empty() {
                let n = self.current.len().min(buf.remaining());
                buf.put_slice(&self.current.split_to(n));
                self.consumed += n as u32;
                self.grant_consumed(shared, id);
                return Poll::Ready(Ok(()));
            }
            match &self.state {
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Reset(reason) => return Poll::Ready(Err(reset_error(reason))),
                ReadState::Open => {}
            }
            match self.inbound.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Inbound::Data(data))) => self.current = data,
                Poll::Ready(Some(Inbound::Fin)) => self.state = ReadState::Eof,
                Poll::Ready(Some(Inbound::Reset(reason))) => self.state = ReadState::Reset(reason),
                Poll::Ready(None) => self.state = ReadState::Reset("link closed".into()),
            }
        }
    }

    fn grant_consumed(&mut self, shared: &Shared, id: u32) {
        // Granting in quarter-window steps keeps WINDOW frames rare without letting the
        // sender run dry while the reader keeps up.
        if self.consumed > 0 && self.consumed >= shared.cfg.window / 4 {
            if let Some(Entry::Local(local)) = shared.lock().get_mut(&id) {
                local.receivable += i64::from(self.consumed);
            }
            shared.send_frame(Frame::Window(id, self.consumed).encode());
            self.consumed = 0;
        }
    }

    fn ended_cleanly(&self) -> bool {
        matches!(self.state, ReadState::Eof) && self.current.is_empty()
    }
}

impl Writing {
    fn poll_write(
        &mut self,
        shared: &Shared,
        id: u32,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.send.reset.load(Ordering::Acquire) {
            return Poll::Ready(Err(reset_error("by the peer")));
        }
        if self.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        let mut credit = self.send.bytes.load(Ordering::Acquire);
        if credit <= 0 {
            self.send.waker.register(cx.waker());
            credit = self.send.bytes.load(Ordering::Acquire);
            if self.send.reset.load(Ordering::Acquire) {
                return Poll::Ready(Err(reset_error("by the peer")));
            }
            if credit <= 0 {
                return Poll::Pending;
            }
        }
        let n = buf.len().min(credit as usize).min(frame::MAX_DATA);
        let permit = match self.budget.poll_acquire_many(cx, n as u32) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(Err(reset_error("link closed"))),
            Poll::Ready(Some(p)) => p,
        };
        self.send.bytes.fetch_sub(n as i64, Ordering::AcqRel);
        let sent = shared.out.send(Outgoing {
            message: WsMessage::Binary(Frame::encode_data(id, &buf[..n])),
            permit: Some(permit),
        });
        if sent.is_err() {
            return Poll::Ready(Err(reset_error("link closed")));
        }
        Poll::Ready(Ok(n))
    }

    fn shutdown(&mut self, shared: &Shared, id: u32) {
        if !self.fin_sent {
            self.fin_sent = true;
            shared.send_frame(Frame::Fin(id).encode());
        }
    }
}

/// Resolves once the far side reset the stream (while nobody needs to read it).
async fn aborted(send: &SendCredit) -> io::Error {
    loop {
        let notified = send.aborted.notified();
        tokio::pin!(notified);
        // Registered before the flag is checked, so a reset in between is not missed.
        notified.as_mut().enable();
        if send.reset.load(Ordering::Acquire) {
            return reset_error("by the far side");
        }
        notified.await;
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reading.poll_read(&this.shared, this.id, cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing.poll_write(&this.shared, this.id, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is queued for the link's writer, which flushes as it goes.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writing.shutdown(&this.shared, this.id);
        Poll::Ready(Ok(()))
    }
}

/// The receiving half of a [`TunnelStream`], for [`crate::io::join`].
pub struct TunnelReader<'a> {
    shared: &'a Shared,
    id: u32,
    reading: &'a mut Reading,
    send: Arc<SendCredit>,
}

/// The sending half of a [`TunnelStream`].
pub struct TunnelWriter<'a> {
    shared: &'a Shared,
    id: u32,
    writing: &'a mut Writing,
}

impl AsyncRead for TunnelReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.reading.poll_read(this.shared, this.id, cx, buf)
    }
}

impl AsyncWrite for TunnelWriter<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writing.poll_write(this.shared, this.id, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writing.shutdown(this.shared, this.id);
        Poll::Ready(Ok(()))
    }
}

impl crate::io::Sink for TunnelWriter<'_> {}

impl crate::io::Source for TunnelReader<'_> {
    fn aborted(&self) -> impl std::future::Future<Output = io::Error> + Send + '_ {
        aborted(&self.send)
    }
}

impl crate::io::Duplex for TunnelStream {
    type Reader<'a> = TunnelReader<'a>;
    type Writer<'a> = TunnelWriter<'a>;

    fn halves(&mut self) -> (TunnelReader<'_>, TunnelWriter<'_>) {
        let send = self.writing.send.clone();
        (
            TunnelReader {
                shared: &self.shared,
                id: self.id,
                reading: &mut self.reading,
                send,
            },
            TunnelWriter {
                shared: &self.shared,
                id: self.id,
                writing: &mut self.writing,
            },
        )
    }

    // Dropping a stream that did not end cleanly both ways resets it at the peer already.
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let entry = self.shared.lock().remove(&self.id);
        // A stream that ended cleanly both ways needs no reset; any other end does, so the
        // peer stops sending and releases its side.
        let clean = self.writing.fin_sent && self.reading.ended_cleanly();
        if entry.is_some() && !clean {
            self.shared.reset(self.id, "closed");
        }
    }
}

#[cfg(test)]
mod tests;

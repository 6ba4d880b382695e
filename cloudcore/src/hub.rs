//! cloudhub: the websocket server every edge node keeps one connection to.
//!
//! A connection is authenticated during the HTTP upgrade (path names the node, the bearer
//! token must be that node's), so a refused node never sees a byte of metadata. The node then
//! says which version it has; the hub answers with nothing, the missed changes, or a snapshot,
//! and afterwards streams every new change. Each change is encoded once and the same bytes go
//! to every node. One task per node: a slow node only slows itself, and the websocket's
//! send buffer is its backpressure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgehub::message::{
    group, module, op, resource, Ack, Message, SnapshotChunk, SnapshotEntry, SyncMode, SyncRequest,
    SyncResponse,
};
use edgehub::model::CLUSTER_SCOPE;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{NodeAuthError, NodeTokens};
use crate::config::HubConfig;
use crate::direct::{Credential, Direct};
use crate::nodes::{NodeRegistry, Session};
use crate::objects::{ApplyError, Objects};
use crate::store::{Change, ChangeOp, Since, Store};
use crate::tunnel::Tunnels;
use edgehub::accept::{limit_hit, Slot, Slots};
use edgehub::tunnel::{Mux, Outgoing};

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The node did something the cloud refuses; the reason is sent in the close frame.
    #[error("refused: {0}")]
    Rejected(String),
    #[error("store: {0}")]
    Store(String),
    #[error("a write to the node did not finish within {0:?}")]
    WriteTimeout(Duration),
    /// Not an error: the session was told to stop (kicked, shutting down) mid-write.
    #[error("stopped: {}", .0.reason)]
    Stopped(End),
}

/// A snapshot encoded as hub messages, shared by every node that needs one at that version.
struct EncodedSnapshot {
    version: u64,
    chain: String,
    count: u64,
    chunks: Vec<Utf8Bytes>,
}

pub struct Hub {
    cfg: HubConfig,
    store: Arc<dyn Store>,
    objects: Arc<Objects>,
    tokens: Arc<NodeTokens>,
    nodes: Arc<NodeRegistry>,
    tunnels: Arc<Tunnels>,
    direct: Arc<Direct>,
    /// Held while building, so a thousand fresh nodes build one snapshot, not a thousand.
    snapshot: tokio::sync::Mutex<Option<Arc<EncodedSnapshot>>>,
    /// Connections not yet authenticated, in all and per address.
    handshakes: Slots,
}

type Sink<S> = SplitSink<WebSocketStream<S>, WsMessage>;
type Stream<S> = SplitStream<WebSocketStream<S>>;

/// Why a session ended without an error of its own, and the close code that says so.
#[derive(Debug)]
struct End {
    code: CloseCode,
    reason: &'static str,
}

impl End {
    fn new(code: CloseCode, reason: &'static str) -> Self {
        End { code, reason }
    }
}

/// Stream messages written in one go before a flush.
const MAX_WRITE_BATCH: usize = 64;

const KICKED: &str = "node removed, revoked or connected again";

/// A node is sent at most one snapshot per this interval, across reconnects: a node (buggy or
/// hostile) that keeps asking cannot make the cloud stream snapshots back to back.
const SNAPSHOT_PACE: Duration = Duration::from_secs(2);
/// Likewise for repeated sync requests within one session.
const QUERY_PACE: Duration = Duration::from_secs(2);

/// What the reader task passes on. Keepalives and acks are handled by the reader itself, so
/// they are never stuck behind a long write, and the queue can only hold sync requests.
enum Inbound {
    Message(Box<Message>),
    Closed(&'static str),
    Failed(SessionError),
}

/// Milliseconds on a monotonic clock: silence is measured on it, so a wall-clock step (NTP)
/// can neither drop every node at once nor keep a dead one online.
fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as i64
}

/// Reads the node's frames until the connection ends: stamps `seen` on every frame, records
/// acks and keepalives itself, and queues what the session must answer.
async fn read_loop<S>(
    mut stream: Stream<S>,
    tx: mpsc::Sender<Inbound>,
    seen: Arc<AtomicI64>,
    nodes: Arc<NodeRegistry>,
    session: Session,
    tunnels: Arc<Tunnels>,
    mux: Mux,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let item = match stream.next().await {
            None => Inbound::Closed("connection lost"),
            Some(Err(e)) => {
                if matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)) {
                    limit_hit("hub", "message_size");
                }
                Inbound::Failed(e.into())
            }
            Some(Ok(frame)) => {
                seen.store(mono_ms(), Ordering::Relaxed);
                match frame {
                    WsMessage::Text(t) => match Message::from_json(t.as_str()) {
                        Ok(m) if m.operation() == op::KEEPALIVE => continue,
                        // Stream messages are handled here, never queued behind a long write.
                        Ok(m) if m.route.group == group::STREAM => {
                            match tunnels.on_message(&session.node, &mux, &m) {
                                Ok(()) => continue,
                                Err(e) => Inbound::Failed(SessionError::Protocol(e.to_string())),
                            }
                        }
                        Ok(m) if m.operation() == op::RESPONSE && m.resource() == resource::ACK => {
                            match m.content_as::<Ack>() {
                                Ok(ack) => {
                                    nodes.acked(&session, ack.resource_version);
                                    metrics::counter!("cloudcore_hub_acks_total").increment(1);
                                    continue;
                                }
                                Err(e) => Inbound::Failed(SessionError::Protocol(format!(
                                    "malformed ack: {e}"
                                ))),
                            }
                        }
                        Ok(m) => Inbound::Message(Box::new(m)),
                        Err(e) => Inbound::Failed(SessionError::Protocol(e.to_string())),
                    },
                    WsMessage::Close(_) => Inbound::Closed("closed by node"),
                    WsMessage::Binary(raw) => match mux.on_binary(raw) {
                        Ok(()) => continue,
                        Err(e) => Inbound::Failed(SessionError::Protocol(e.to_string())),
                    },
                    _ => continue, // ping/pong: answered by tungstenite, counted as a sign of life
                }
            }
        };
        let last = !matches!(item, Inbound::Message(_));
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The sending half of a node's connection. Every write is bounded by `write_timeout` and
/// abandoned the moment the session is kicked or cloudcore shuts down, so a node that stops
/// reading can never pin its session, its socket or the snapshot it was being sent.
struct Outbound<'a, S> {
    sink: Sink<S>,
    write_timeout: Duration,
    kicked: &'a CancellationToken,
    shutdown: &'a CancellationToken,
}

impl<S> Outbound<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn guarded(
        kicked: &CancellationToken,
        shutdown: &CancellationToken,
        limit: Duration,
        write: impl std::future::Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), SessionError> {
        match until_stopped(kicked, shutdown, tokio::time::timeout(limit, write)).await? {
            Ok(r) => r.map_err(SessionError::from),
            Err(_) => Err(SessionError::WriteTimeout(limit)),
        }
    }

    /// Queues a message; it goes out at the next flush (or when the buffer fills).
    async fn feed(&mut self, msg: WsMessage) -> Result<(), SessionError> {
        Self::guarded(
            self.kicked,
            self.shutdown,
            self.write_timeout,
            self.sink.feed(msg),
        )
        .await
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        Self::guarded(
            self.kicked,
            self.shutdown,
            self.write_timeout,
            self.sink.flush(),
        )
        .await
    }

    /// Waits for `fut` unless the session is kicked or cloudcore shuts down first.
    async fn interruptible<T>(
        &self,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, SessionError> {
        until_stopped(self.kicked, self.shutdown, fut).await
    }

    async fn send(&mut self, msg: WsMessage) -> Result<(), SessionError> {
        Self::guarded(
            self.kicked,
            self.shutdown,
            self.write_timeout,
            self.sink.send(msg),
        )
        .await
    }
}

/// `fut`'s output, or `Stopped` as soon as the session is kicked or cloudcore shuts down.
async fn until_stopped<T>(
    kicked: &CancellationToken,
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, SessionError> {
    tokio::select! {
        _ = kicked.cancelled() => Err(SessionError::Stopped(End::new(CloseCode::Policy, KICKED))),
        _ = shutdown.cancelled() => Err(SessionError::Stopped(End::new(CloseCode::Away, "cloudcore is shutting down"))),
        v = fut => Ok(v),
    }
}

fn text(bytes: &Bytes) -> Utf8Bytes {
    // Hub messages are JSON made by serde_json, so always UTF-8; fall back to a copy anyway.
    Utf8Bytes::try_from(bytes.clone())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned().into())
}

/// A close frame. Control frames carry at most 125 bytes, 2 of them the code, so a longer
/// reason is cut (on a character boundary) rather than make the frame invalid.
fn close(code: CloseCode, reason: &str) -> WsMessage {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }))
}

/// The change as a hub Message, encoded once.
fn wire(change: &Change) -> Utf8Bytes {
    text(change.wire.get_or_init(|| {
        let operation = match change.op {
            ChangeOp::Insert => op::INSERT,
            ChangeOp::Update => op::UPDATE,
            ChangeOp::Delete => op::DELETE,
        };
        let msg = Message::new(
            module::CLOUDHUB,
            module::EDGEHUB,
            group::META,
            operation,
            &change.key.resource(),
        )
        .with_version(change.version);
        let msg = match RawValue::from_string(change.json.to_string()) {
            Ok(raw) => Message {
                content: Some(raw),
                ..msg
            },
            // Stored objects are valid JSON; never send a change without its object.
            Err(_) => msg,
        };
        Bytes::from(msg.to_json())
    }))
}

impl Hub {
    pub fn new(
        cfg: HubConfig,
        store: Arc<dyn Store>,
        objects: Arc<Objects>,
        tokens: Arc<NodeTokens>,
        nodes: Arc<NodeRegistry>,
        tunnels: Arc<Tunnels>,
        direct: Arc<Direct>,
    ) -> Self {
        Hub {
            store,
            objects,
            tokens,
            nodes,
            tunnels,
            direct,
            snapshot: tokio::sync::Mutex::new(None),
            handshakes: Slots::new(cfg.max_handshakes, cfg.max_handshakes_per_peer),
            cfg,
        }
    }

    /// Forgets the encoded snapshot as soon as the store has moved past it, until `shutdown`.
    /// A stale one is never sent again (the next fresh node gets one built anew), and a
    /// 10,000-Service mesh's is ~4 MiB that would otherwise stay until the next fresh node.
    pub async fn drop_stale_snapshots(self: Arc<Self>, shutdown: CancellationToken) {
        let mut versions = self.store.subscribe();
        while edgehub::process::changed(&mut versions, &shutdown).await {
            let version = *versions.borrow_and_update();
            let mut cached = self.snapshot.lock().await;
            if cached.as_ref().is_some_and(|s| s.version < version) {
                *cached = None;
            }
        }
    }

    /// Accepts connections until `shutdown`, then closes every session and waits for them.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        while let Some((tcp, peer)) =
            edgehub::accept::next_connection(&listener, "hub", &shutdown).await
        {
            // Before anything is read: unauthenticated clients get bounded slots.
            let slot = match self.handshakes.try_take(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    limit_hit("hub", refused.label());
                    debug!(%peer, limit = refused.label(), "hub connection refused");
                    continue;
                }
            };
            let hub = self.clone();
            let span = tracing::info_span!("hub_conn", %peer, node = tracing::field::Empty);
            tracker.spawn(
                hub.connection(
                    tcp,
                    peer,
                    tls.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                    slot,
                )
                .instrument(span),
            );
        }
        // Stop accepting first: connections that queue while sessions close would only hang.
        drop(listener);
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            warn!(open = tracker.len(), "hub sessions did not close in time");
        }
        info!("hub stopped");
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        // Freed when this task ends: the session, once authenticated, runs as a task of its own.
        _handshake: Slot,
    ) {
        let _ = tcp.set_nodelay(true);
        let handshakes = async {
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(self.cfg.handshake_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            // A client certificate the TLS layer verified against the mesh CA.
                            let client = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| edgehub::identity::fingerprint(c));
                            self.upgrade(stream, peer, client, shutdown.clone(), tracker)
                                .await
                        }
                        Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                        Err(_) => {
                            limit_hit("hub", "handshake_timeout");
                            debug!("TLS handshake timed out")
                        }
                    }
                }
                None => {
                    self.upgrade(tcp, peer, None, shutdown.clone(), tracker)
                        .await
                }
            }
        };
        // Handshakes in progress end with cloudcore; established sessions close themselves.
        tokio::select! {
            _ = shutdown.cancelled() => debug!("shutting down during the handshake"),
            _ = handshakes => {}
        }
    }

    /// Checks the path and the node's certificate (`client`: the fingerprint of the one it
    /// presented) or token; the answer becomes the HTTP response on failure.
    fn authorize(
        &self,
        req: &Request,
        client: Option<&str>,
    ) -> Result<(String, Credential), (StatusCode, String)> {
        let path = req.uri().path();
        let node = path
            .strip_prefix("/v1/nodes/")
            .and_then(|rest| rest.strip_suffix("/events"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!(
                        "no such endpoint {}: use /v1/nodes/NODE/events",
                        edgehub::untrusted::clip(path, edgehub::untrusted::MAX_WORD)
                    ),
                )
            })?;
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // The certificate cloudcore issued this node and still publishes: no token needed.
        // A node must still have a token (joined, not revoked) to log in either way.
        if let Some(fp) = client {
            if self.tokens.has_token(node) && self.direct.certificate_login(node, fp) {
                return Ok((node.to_string(), Credential::Certificate(fp.to_string())));
            }
        }
        match self.tokens.verify(node, token) {
            Ok(()) => Ok((
                node.to_string(),
                Credential::Token(token.unwrap_or_default().to_string()),
            )),
            Err(e) => {
                let status = match e {
                    NodeAuthError::WrongToken => StatusCode::FORBIDDEN,
                    NodeAuthError::Missing | NodeAuthError::UnknownNode => StatusCode::UNAUTHORIZED,
                };
                Err((
                    status,
                    format!(
                        "node {}: {}",
                        edgehub::untrusted::clip(node, edgehub::untrusted::MAX_WORD),
                        e.as_str()
                    ),
                ))
            }
        }
    }

    // The handshake callback's error type is tungstenite's HTTP response; its size is not ours.
    #[allow(clippy::result_large_err)]
    async fn upgrade<S>(
        self: &Arc<Self>,
        stream: S,
        peer: SocketAddr,
        client: Option<String>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut node = None;
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            match self.authorize(req, client.as_deref()) {
                Ok(n) => {
                    node = Some(n);
                    Ok(resp)
                }
                Err((status, reason)) => {
                    warn!(%peer, %reason, status = status.as_u16(), "refused a node connection");
                    metrics::counter!("cloudcore_hub_refused_total", "status" => status.as_u16().to_string()).increment(1);
                    let mut resp = ErrorResponse::new(Some(format!("{reason}\n")));
                    *resp.status_mut() = status;
                    Err(resp)
                }
            }
        };
        // Memory per connection is what a fleet of thousands pays: tungstenite keeps the
        // capacity of its largest read and write for the life of the connection, so reads
        // start small and writes go straight to the socket (whose own buffer batches them)
        // instead of gathering 64 KiB first. Snapshot chunks are small for the same reason.
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.cfg.max_message_size))
            .max_frame_size(Some(self.cfg.max_message_size))
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(8 << 20);
        let accepted = tokio::time::timeout(
            self.cfg.handshake_timeout,
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)),
        )
        .await;
        let ws = match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => return debug!(error = %e, "websocket handshake failed"),
            Err(_) => {
                limit_hit("hub", "handshake_timeout");
                return debug!("websocket handshake timed out");
            }
        };
        let Some((node, credential)) = node else {
            return;
        };
        tracing::Span::current().record("node", node.as_str());
        let session = self.nodes.connect(&node, peer);
        // A revoke that landed between the handshake check and this registration.
        if !self.tokens.has_token(&node) {
            self.nodes
                .disconnect(&session, "token revoked while connecting");
            return;
        }
        info!(
            certificate = matches!(credential, Credential::Certificate(_)),
            "node connected"
        );
        let direct_out = self.direct.attach(&session, credential);
        // The session runs as a task of its own and this one ends: a task keeps the memory of
        // its largest phase for its whole life, and the TLS and websocket handshakes are far
        // larger than a session (measured: 12.9 KB per connected node otherwise).
        let hub = self.clone();
        tracker.spawn(
            async move {
                let reason = match hub.session(ws, &session, &shutdown, direct_out).await {
                    Ok(reason) => reason.to_string(),
                    Err(e) => {
                        warn!(error = %e, "node session failed");
                        e.to_string()
                    }
                };
                hub.direct.detach(&session);
                hub.nodes.disconnect(&session, &reason);
                info!(%reason, "node disconnected");
            }
            .instrument(tracing::Span::current()),
        );
    }

    async fn session<S>(
        &self,
        ws: WebSocketStream<S>,
        session: &Session,
        shutdown: &CancellationToken,
        mut direct_out: crate::direct::ToNode,
    ) -> Result<&'static str, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        // A reader task of its own: keepalives and acks are taken in even while a long write
        // (a snapshot over a slow link) is in progress, so a healthy node is never timed out.
        let seen = Arc::new(AtomicI64::new(mono_ms()));
        let (tx, mut inbound) = mpsc::channel(4);
        let (mux, mut link_out) = self.tunnels.attach(&session.node);
        let mut reader = tokio::spawn(read_loop(
            stream,
            tx,
            seen.clone(),
            self.nodes.clone(),
            session.clone(),
            self.tunnels.clone(),
            mux.clone(),
        ));
        let mut out = Outbound {
            sink,
            write_timeout: self.cfg.node_timeout,
            kicked: &session.kicked,
            shutdown,
        };
        let result = self
            .converse(
                &mut out,
                &mut inbound,
                &mut link_out,
                &mut direct_out,
                &seen,
                session,
                shutdown,
            )
            .await;
        self.tunnels
            .detach(&session.node, &mux, "the node's link closed");
        let (code, reason, outcome) = match result {
            Ok(end) | Err(SessionError::Stopped(end)) => {
                (end.code, end.reason.to_string(), Ok(end.reason))
            }
            Err(SessionError::Rejected(why)) => (
                CloseCode::Policy,
                why.clone(),
                Err(SessionError::Rejected(why)),
            ),
            Err(e @ SessionError::Protocol(_)) => (CloseCode::Invalid, e.to_string(), Err(e)),
            Err(e) => (CloseCode::Error, e.to_string(), Err(e)),
        };
        // Say why, then let the node answer the close so the socket drains instead of being
        // reset with data still in flight.
        let _ =
            tokio::time::timeout(Duration::from_secs(1), out.sink.send(close(code, &reason))).await;
        if tokio::time::timeout(Duration::from_secs(2), &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
        outcome
    }

    // The session's three queues (node messages, stream frames, direct-path messages) are
    // separate borrows the loop selects over; a struct around them would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn converse<S>(
        &self,
        out: &mut Outbound<'_, S>,
        inbound: &mut mpsc::Receiver<Inbound>,
        link_out: &mut mpsc::UnboundedReceiver<Outgoing>,
        direct_out: &mut crate::direct::ToNode,
        seen: &AtomicI64,
        session: &Session,
        shutdown: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Subscribe before answering, so a change committed meanwhile is not missed.
        let mut versions = self.store.subscribe();
        let first = out.interruptible(tokio::time::timeout(self.cfg.node_timeout, inbound.recv()));
        let first = match first.await? {
            Err(_) => return Ok(End::new(CloseCode::Policy, "no sync request")),
            Ok(None) => return Ok(End::new(CloseCode::Normal, "connection lost")),
            Ok(Some(Inbound::Message(m))) => *m,
            Ok(Some(Inbound::Closed(reason))) => return Ok(End::new(CloseCode::Normal, reason)),
            Ok(Some(Inbound::Failed(e))) => return Err(e),
        };
        if first.operation() != op::QUERY || first.resource() != resource::SYNC {
            return Err(SessionError::Protocol(
                "the first message must be a sync request".into(),
            ));
        }
        let sync: SyncRequest = first
            .content_as()
            .map_err(|e| SessionError::Protocol(format!("malformed sync request: {e}")))?;
        {
            // Under the admission lock that node deletion also takes: a node deleted or
            // revoked while it was connecting must not re-create its Node object.
            let (objects, tokens) = (self.objects.clone(), self.tokens.clone());
            let (node, labels) = (session.node.clone(), sync.labels.clone());
            let kicked = session.kicked.clone();
            let admitted = tokio::task::spawn_blocking(move || {
                let _admission = objects.admission();
                if kicked.is_cancelled() || !tokens.has_token(&node) {
                    return Ok(false);
                }
                objects.admit_node(&node, &labels)
            })
            .await
            .map_err(|e| SessionError::Store(e.to_string()))?
            .map_err(|e| match e {
                ApplyError::Invalid { err, .. } => {
                    SessionError::Rejected(format!("invalid node labels: {err}"))
                }
                other => SessionError::Store(other.to_string()),
            })?;
            if !admitted {
                return Ok(End::new(CloseCode::Policy, "node removed or revoked"));
            }
        }
        let mut sent = self.answer(out, session, &first.header.id, &sync).await?;
        let mut last_query = Instant::now();

        let mut keepalive = tokio::time::interval(self.cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let keepalive_msg = Bytes::from(
            Message::new(
                module::CLOUDHUB,
                module::EDGEHUB,
                group::HUB,
                op::KEEPALIVE,
                &format!("{CLUSTER_SCOPE}/node/{}", session.node),
            )
            .to_json(),
        );
        let timeout_ms = self.cfg.node_timeout.as_millis() as i64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::new(CloseCode::Away, "cloudcore is shutting down")),
                _ = session.kicked.cancelled() => return Ok(End::new(CloseCode::Policy, KICKED)),
                msg = inbound.recv() => match msg {
                    None => return Ok(End::new(CloseCode::Normal, "connection lost")),
                    Some(Inbound::Closed(reason)) => return Ok(End::new(CloseCode::Normal, reason)),
                    Some(Inbound::Failed(e)) => return Err(e),
                    Some(Inbound::Message(m)) => self.on_message(out, session, *m, &mut sent, &mut last_query).await?,
                },
                Some(first) = link_out.recv() => {
                    // Stream frames and answers: write what is queued, then flush once.
                    let mut budget = Vec::new();
                    let mut next = Some(first);
                    while let Some(o) = next.take() {
                        let (message, permit) = o.into_parts();
                        out.feed(message).await?;
                        budget.push(permit);
                        if budget.len() < MAX_WRITE_BATCH {
                            next = link_out.try_recv().ok();
                        }
                    }
                    out.flush().await?;
                }
                Some(msg) = direct_out.recv() => {
                    out.send(WsMessage::text(msg.to_json())).await?;
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return Ok(End::new(CloseCode::Away, "store closed"));
                    }
                    sent = self.catch_up(out, session, sent).await?;
                }
                _ = keepalive.tick() => {
                    let silent_ms = mono_ms() - seen.load(Ordering::Relaxed);
                    if silent_ms > timeout_ms {
                        return Ok(End::new(CloseCode::Away, "keepalive timeout"));
                    }
                    out.send(WsMessage::Text(text(&keepalive_msg))).await?;
                    self.nodes.seen_at(session, crate::nodes::now_ms() - silent_ms);
                }
            }
        }
    }

    async fn on_message<S>(
        &self,
        out: &mut Outbound<'_, S>,
        session: &Session,
        msg: Message,
        sent: &mut u64,
        last_query: &mut Instant,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match (msg.operation(), msg.resource()) {
            (op::QUERY, resource::SYNC) => {
                // A node that lost track asks again. An answer can be a long delta, so
                // repeated asks are paced rather than answered back to back.
                if let Some(wait) = QUERY_PACE.checked_sub(last_query.elapsed()) {
                    out.interruptible(tokio::time::sleep(wait)).await?;
                }
                *last_query = Instant::now();
                let sync: SyncRequest = msg
                    .content_as()
                    .map_err(|e| SessionError::Protocol(format!("malformed sync request: {e}")))?;
                *sent = self.answer(out, session, &msg.header.id, &sync).await?;
            }
            _ if msg.route.group == group::DIRECT => self.direct.on_message(session, msg),
            (operation, res) => debug!(operation, resource = res, "ignoring an unknown message"),
        }
        Ok(())
    }

    /// Answers a sync request and sends what the node misses; returns the version the node
    /// will have once it applied it.
    async fn answer<S>(
        &self,
        out: &mut Outbound<'_, S>,
        session: &Session,
        request_id: &str,
        sync: &SyncRequest,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let store_id = self.store.store_id().to_string();
        let since = if sync.store_id.as_deref() == Some(store_id.as_str()) {
            self.store
                .changes_since(sync.resource_version, Some(&sync.chain))
        } else {
            Since::Gone
        };
        let (mode, to) = match since {
            Since::Current => {
                out.feed(self.response(
                    request_id,
                    SyncMode::Current,
                    sync.resource_version,
                    sync.resource_version,
                    0,
                    &sync.chain,
                ))
                .await?;
                out.flush().await?;
                (SyncMode::Current, sync.resource_version)
            }
            Since::Changes(changes) => {
                let (to, chain) = changes
                    .last()
                    .map(|c| (c.version, c.chain.as_str()))
                    .unwrap_or((sync.resource_version, sync.chain.as_str()));
                out.feed(self.response(
                    request_id,
                    SyncMode::Delta,
                    sync.resource_version,
                    to,
                    changes.len() as u64,
                    chain,
                ))
                .await?;
                for c in &changes {
                    out.feed(WsMessage::Text(wire(c))).await?;
                }
                out.flush().await?;
                metrics::counter!("cloudcore_hub_changes_sent_total")
                    .increment(changes.len() as u64);
                (SyncMode::Delta, to)
            }
            Since::Gone => (
                SyncMode::Snapshot,
                self.send_snapshot(out, session, request_id, sync.resource_version)
                    .await?,
            ),
        };
        metrics::counter!("cloudcore_hub_syncs_total", "mode" => mode.as_str()).increment(1);
        info!(
            mode = mode.as_str(),
            from = sync.resource_version,
            to,
            "node synced"
        );
        self.nodes
            .synced(session, mode.as_str(), &sync.agent_version);
        // A node resuming in this store has committed what it reported; one that gets a
        // snapshot has nothing of this store yet.
        let committed = if mode == SyncMode::Snapshot {
            0
        } else {
            sync.resource_version
        };
        self.nodes.acked(session, committed);
        Ok(to)
    }

    fn response(
        &self,
        request_id: &str,
        mode: SyncMode,
        from_version: u64,
        to_version: u64,
        count: u64,
        chain: &str,
    ) -> WsMessage {
        let resp = SyncResponse {
            mode,
            store_id: self.store.store_id().to_string(),
            from_version,
            to_version,
            count,
            chain: chain.to_string(),
        };
        let msg = Message::new(
            module::CLOUDHUB,
            module::EDGEHUB,
            group::META,
            op::RESPONSE,
            resource::SYNC,
        )
        .with_parent(request_id)
        .with_version(to_version)
        .with_content(&resp);
        WsMessage::text(msg.to_json())
    }

    /// Sends the changes after `sent`, or a snapshot when they are no longer kept.
    async fn catch_up<S>(
        &self,
        out: &mut Outbound<'_, S>,
        session: &Session,
        sent: u64,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.store.changes_since(sent, None) {
            Since::Current => Ok(sent),
            Since::Changes(changes) => {
                let mut last = sent;
                for c in &changes {
                    out.feed(WsMessage::Text(wire(c))).await?;
                    last = c.version;
                }
                out.flush().await?;
                metrics::counter!("cloudcore_hub_changes_sent_total")
                    .increment(changes.len() as u64);
                Ok(last)
            }
            Since::Gone => {
                // The node fell behind the history while connected (it reads too slowly).
                warn!(node = %session.node, sent, "node fell behind the change history; sending a snapshot");
                self.send_snapshot(out, session, "", sent).await
            }
        }
    }

    async fn send_snapshot<S>(
        &self,
        out: &mut Outbound<'_, S>,
        session: &Session,
        request_id: &str,
        from: u64,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(wait) = self.nodes.snapshot_wait(&session.node, SNAPSHOT_PACE) {
            debug!(?wait, "pacing a repeated snapshot");
            out.interruptible(tokio::time::sleep(wait)).await?;
        }
        let snap = out.interruptible(self.encoded_snapshot()).await??;
        out.feed(self.response(
            request_id,
            SyncMode::Snapshot,
            from,
            snap.version,
            snap.count,
            &snap.chain,
        ))
        .await?;
        for chunk in &snap.chunks {
            out.feed(WsMessage::Text(chunk.clone())).await?;
        }
        out.flush().await?;
        metrics::counter!("cloudcore_hub_snapshots_sent_total").increment(1);
        Ok(snap.version)
    }

    async fn encoded_snapshot(&self) -> Result<Arc<EncodedSnapshot>, SessionError> {
        let mut cached = self.snapshot.lock().await;
        if let Some(s) = cached
            .as_ref()
            .filter(|s| s.version == self.store.version())
        {
            return Ok(s.clone());
        }
        let store = self.store.clone();
        let chunk_bytes = self.cfg.snapshot_chunk_bytes;
        let built = tokio::task::spawn_blocking(move || -> Result<EncodedSnapshot, String> {
            let snap = store.snapshot().map_err(|e| e.to_string())?;
            let count = snap.records.len() as u64;
            let pieces = chunk_snapshot(&snap.records, chunk_bytes);
            let last = pieces.len().saturating_sub(1);
            let chunks = pieces
                .into_iter()
                .enumerate()
                .map(|(i, piece)| {
                    let entries = piece
                        .iter()
                        .map(|r| {
                            Ok(SnapshotEntry {
                                resource: r.key.resource(),
                                object: RawValue::from_string(r.json.to_string())
                                    .map_err(|e| e.to_string())?,
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    encode_chunk(snap.version, entries, i == last)
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(EncodedSnapshot {
                version: snap.version,
                chain: snap.chain.clone(),
                count,
                chunks,
            })
        })
        .await
        .map_err(|e| SessionError::Store(e.to_string()))?
        .map_err(SessionError::Store)?;
        let built = Arc::new(built);
        *cached = Some(built.clone());
        Ok(built)
    }
}

/// Splits records into chunks of about `max_bytes` of JSON each (at least one record, and one
/// empty chunk for an empty store). Bounded by bytes, not count: a websocket keeps the capacity
/// of its largest write, so chunk size is per-node memory for as long as the node stays.
fn chunk_snapshot(
    records: &[crate::store::Record],
    max_bytes: usize,
) -> Vec<&[crate::store::Record]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, r) in records.iter().enumerate() {
        let len = r.json.len() + r.key.name.len() + r.key.namespace.len() + 32;
        if i > start && size + len > max_bytes {
            chunks.push(&records[start..i]);
            start = i;
            size = 0;
        }
        size += len;
    }
    if start < records.len() || chunks.is_empty() {
        chunks.push(&records[start..]);
    }
    chunks
}

fn encode_chunk(
    version: u64,
    entries: Vec<SnapshotEntry>,
    last: bool,
) -> Result<Utf8Bytes, String> {
    let msg = Message::new(
        module::CLOUDHUB,
        module::EDGEHUB,
        group::META,
        op::RESPONSE,
        resource::SNAPSHOT,
    )
    .with_version(version)
    .with_content(&SnapshotChunk { entries, last });
    Ok(msg.to_json().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Record;
    use edgehub::model::{Kind, ObjectKey};

    fn rec(i: usize, size: usize) -> Record {
        Record {
            key: ObjectKey::new(Kind::Service, "default", format!("s{i}")),
            version: i as u64,
            json: "x".repeat(size).into(),
        }
    }

    #[test]
    fn close_reasons_fit_in_a_control_frame() {
        let long = format!("invalid node labels: {}", "é".repeat(100));
        let WsMessage::Close(Some(frame)) = close(CloseCode::Policy, &long) else {
            panic!("not a close frame")
        };
        assert!(frame.reason.len() <= 123, "{}", frame.reason.len());
        assert!(long.starts_with(frame.reason.as_str()));
        let WsMessage::Close(Some(frame)) = close(CloseCode::Away, "short") else {
            panic!("not a close frame")
        };
        assert_eq!(frame.reason.as_str(), "short");
    }

    #[test]
    fn snapshot_chunks_are_bounded_by_bytes() {
        let records: Vec<Record> = (0..100).map(|i| rec(i, 1000)).collect();
        let chunks = chunk_snapshot(&records, 32 << 10);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 100);
        assert!(chunks
            .iter()
            .all(|c| c.iter().map(|r| r.json.len()).sum::<usize>() <= 32 << 10));
        // An object larger than the bound still goes, alone.
        let big = vec![rec(0, 10), rec(1, 100_000), rec(2, 10)];
        assert_eq!(
            chunk_snapshot(&big, 1000)
                .iter()
                .map(|c| c.len())
                .collect::<Vec<_>>(),
            vec![1, 1, 1]
        );
        // An empty store is one empty chunk.
        assert_eq!(chunk_snapshot(&[], 1000).len(), 1);
    }
}

//! cloudhub: the websocket server every edge node keeps one connection to.
//!
//! A connection is authenticated during the HTTP upgrade (path names the node, the bearer
//! token must be that node's), so a refused node never sees a byte of metadata. The node then
//! says which version it has; the hub answers with nothing, the missed changes, or a snapshot,
//! and afterwards streams every new change. Each change is encoded once and the same bytes go
//! to every node. One task per node: a slow node only slows itself, and the websocket's
//! send buffer is its backpressure.

use std::net::SocketAddr;
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
use tokio::time::{sleep_until, Instant};
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
use crate::nodes::{NodeRegistry, Session};
use crate::objects::Objects;
use crate::store::{Change, ChangeOp, Since, Store};

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("store: {0}")]
    Store(String),
}

/// A snapshot encoded as hub messages, shared by every node that needs one at that version.
struct EncodedSnapshot {
    version: u64,
    count: u64,
    chunks: Vec<Utf8Bytes>,
}

pub struct Hub {
    cfg: HubConfig,
    store: Arc<dyn Store>,
    objects: Arc<Objects>,
    tokens: Arc<NodeTokens>,
    nodes: Arc<NodeRegistry>,
    /// Held while building, so a thousand fresh nodes build one snapshot, not a thousand.
    snapshot: tokio::sync::Mutex<Option<Arc<EncodedSnapshot>>>,
}

type Sink<S> = SplitSink<WebSocketStream<S>, WsMessage>;
type Stream<S> = SplitStream<WebSocketStream<S>>;

fn text(bytes: &Bytes) -> Utf8Bytes {
    // Hub messages are JSON made by serde_json, so always UTF-8; fall back to a copy anyway.
    Utf8Bytes::try_from(bytes.clone())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned().into())
}

fn close(code: CloseCode, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
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
    ) -> Self {
        Hub {
            cfg,
            store,
            objects,
            tokens,
            nodes,
            snapshot: tokio::sync::Mutex::new(None),
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
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let hub = self.clone();
                        let span = tracing::info_span!("hub_conn", %peer, node = tracing::field::Empty);
                        tracker.spawn(hub.connection(tcp, peer, tls.clone(), shutdown.clone()).instrument(span));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "hub accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
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
    ) {
        let _ = tcp.set_nodelay(true);
        match tls {
            Some(acceptor) => {
                match tokio::time::timeout(self.cfg.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => self.upgrade(stream, peer, shutdown).await,
                    Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    Err(_) => debug!("TLS handshake timed out"),
                }
            }
            None => self.upgrade(tcp, peer, shutdown).await,
        }
    }

    /// Checks the path and the node's token; the answer becomes the HTTP response on failure.
    fn authorize(&self, req: &Request) -> Result<String, (StatusCode, String)> {
        let path = req.uri().path();
        let node = path
            .strip_prefix("/v1/nodes/")
            .and_then(|rest| rest.strip_suffix("/events"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint {path}: use /v1/nodes/NODE/events"),
                )
            })?;
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match self.tokens.verify(node, token) {
            Ok(()) => Ok(node.to_string()),
            Err(e) => {
                let status = match e {
                    NodeAuthError::WrongToken => StatusCode::FORBIDDEN,
                    NodeAuthError::Missing | NodeAuthError::UnknownNode => StatusCode::UNAUTHORIZED,
                };
                Err((status, format!("node {node}: {}", e.as_str())))
            }
        }
    }

    // The handshake callback's error type is tungstenite's HTTP response; its size is not ours.
    #[allow(clippy::result_large_err)]
    async fn upgrade<S>(&self, stream: S, peer: SocketAddr, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut node = None;
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            match self.authorize(req) {
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
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.cfg.max_message_size))
            .max_frame_size(Some(self.cfg.max_message_size))
            .read_buffer_size(4096)
            .write_buffer_size(64 << 10)
            .max_write_buffer_size(8 << 20);
        let accepted = tokio::time::timeout(
            self.cfg.handshake_timeout,
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)),
        )
        .await;
        let ws = match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => return debug!(error = %e, "websocket handshake failed"),
            Err(_) => return debug!("websocket handshake timed out"),
        };
        let Some(node) = node else { return };
        tracing::Span::current().record("node", node.as_str());
        let session = self.nodes.connect(&node, peer);
        info!("node connected");
        let reason = match self.session(ws, &session, &shutdown).await {
            Ok(reason) => reason.to_string(),
            Err(e) => {
                warn!(error = %e, "node session failed");
                e.to_string()
            }
        };
        self.nodes.disconnect(&session, &reason);
        info!(%reason, "node disconnected");
    }

    async fn session<S>(
        &self,
        ws: WebSocketStream<S>,
        session: &Session,
        shutdown: &CancellationToken,
    ) -> Result<&'static str, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        // Subscribe before answering, so a change committed meanwhile is not missed.
        let mut versions = self.store.subscribe();

        let first = match tokio::time::timeout(self.cfg.node_timeout, stream.next()).await {
            Err(_) => return Ok("no sync request"),
            Ok(None) => return Ok("closed by node"),
            Ok(Some(frame)) => frame?,
        };
        let request = match &first {
            WsMessage::Text(t) => Message::from_json(t.as_str()).ok(),
            _ => None,
        };
        let Some(request) =
            request.filter(|m| m.operation() == op::QUERY && m.resource() == resource::SYNC)
        else {
            let _ = sink
                .send(close(CloseCode::Policy, "expected a sync request"))
                .await;
            return Err(SessionError::Protocol(
                "first message was not a sync request".into(),
            ));
        };
        let sync: SyncRequest = match request.content_as() {
            Ok(s) => s,
            Err(e) => {
                let _ = sink
                    .send(close(CloseCode::Invalid, "malformed sync request"))
                    .await;
                return Err(SessionError::Protocol(format!(
                    "malformed sync request: {e}"
                )));
            }
        };
        {
            let objects = self.objects.clone();
            let (node, labels) = (session.node.clone(), sync.labels.clone());
            tokio::task::spawn_blocking(move || objects.ensure_node(&node, Some(&labels)))
                .await
                .map_err(|e| SessionError::Store(e.to_string()))?
                .map_err(|e| SessionError::Store(e.to_string()))?;
        }
        let mut sent = self
            .answer(&mut sink, session, &request.header.id, &sync)
            .await?;

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
        let mut deadline = Instant::now() + self.cfg.node_timeout;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let _ = sink.send(close(CloseCode::Away, "cloudcore is shutting down")).await;
                    return Ok("cloudcore shutting down");
                }
                _ = session.kicked.cancelled() => {
                    let _ = sink.send(close(CloseCode::Policy, "node removed, revoked or connected again")).await;
                    return Ok("kicked");
                }
                _ = sleep_until(deadline) => {
                    let _ = sink.send(close(CloseCode::Away, "keepalive timeout")).await;
                    return Ok("keepalive timeout");
                }
                changed = versions.changed() => {
                    if changed.is_err() {
                        return Ok("store closed");
                    }
                    sent = self.catch_up(&mut sink, session, sent).await?;
                }
                _ = keepalive.tick() => {
                    sink.send(WsMessage::Text(text(&keepalive_msg))).await?;
                }
                frame = stream.next() => {
                    let Some(frame) = frame else { return Ok("connection lost") };
                    deadline = Instant::now() + self.cfg.node_timeout;
                    match frame? {
                        WsMessage::Text(t) => {
                            let msg = match Message::from_json(t.as_str()) {
                                Ok(m) => m,
                                Err(e) => {
                                    let _ = sink.send(close(CloseCode::Invalid, "malformed message")).await;
                                    return Err(SessionError::Protocol(e.to_string()));
                                }
                            };
                            self.on_message(&mut sink, &mut stream, session, msg, &mut sent).await?;
                        }
                        WsMessage::Binary(_) => debug!("ignoring a binary frame: no streams are open"),
                        WsMessage::Close(_) => return Ok("closed by node"),
                        _ => self.nodes.seen(session),
                    }
                }
            }
        }
    }

    async fn on_message<S>(
        &self,
        sink: &mut Sink<S>,
        _stream: &mut Stream<S>,
        session: &Session,
        msg: Message,
        sent: &mut u64,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match (msg.operation(), msg.resource()) {
            (op::RESPONSE, resource::ACK) => match msg.content_as::<Ack>() {
                Ok(ack) => {
                    self.nodes.acked(session, ack.resource_version);
                    metrics::counter!("cloudcore_hub_acks_total").increment(1);
                }
                Err(e) => return Err(SessionError::Protocol(format!("malformed ack: {e}"))),
            },
            (op::KEEPALIVE, _) => self.nodes.seen(session),
            (op::QUERY, resource::SYNC) => {
                // The node lost track (e.g. its store was reset) and asks again.
                let sync: SyncRequest = msg
                    .content_as()
                    .map_err(|e| SessionError::Protocol(format!("malformed sync request: {e}")))?;
                *sent = self.answer(sink, session, &msg.header.id, &sync).await?;
            }
            (operation, res) => debug!(operation, resource = res, "ignoring an unknown message"),
        }
        Ok(())
    }

    /// Answers a sync request and sends what the node misses; returns the version the node
    /// will have once it applied it.
    async fn answer<S>(
        &self,
        sink: &mut Sink<S>,
        session: &Session,
        request_id: &str,
        sync: &SyncRequest,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let store_id = self.store.store_id().to_string();
        let since = if sync.store_id.as_deref() == Some(store_id.as_str()) {
            self.store.changes_since(sync.resource_version)
        } else {
            Since::Gone
        };
        let (mode, to) = match since {
            Since::Current => {
                self.respond(
                    sink,
                    request_id,
                    SyncMode::Current,
                    sync.resource_version,
                    sync.resource_version,
                    0,
                )
                .await?;
                (SyncMode::Current, sync.resource_version)
            }
            Since::Changes(changes) => {
                let to = changes
                    .last()
                    .map(|c| c.version)
                    .unwrap_or(sync.resource_version);
                self.respond(
                    sink,
                    request_id,
                    SyncMode::Delta,
                    sync.resource_version,
                    to,
                    changes.len() as u64,
                )
                .await?;
                for c in &changes {
                    sink.feed(WsMessage::Text(wire(c))).await?;
                }
                sink.flush().await?;
                metrics::counter!("cloudcore_hub_changes_sent_total")
                    .increment(changes.len() as u64);
                (SyncMode::Delta, to)
            }
            Since::Gone => (
                SyncMode::Snapshot,
                self.send_snapshot(sink, request_id, sync.resource_version)
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
        Ok(to)
    }

    async fn respond<S>(
        &self,
        sink: &mut Sink<S>,
        request_id: &str,
        mode: SyncMode,
        from_version: u64,
        to_version: u64,
        count: u64,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let resp = SyncResponse {
            mode,
            store_id: self.store.store_id().to_string(),
            from_version,
            to_version,
            count,
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
        sink.feed(WsMessage::text(msg.to_json())).await?;
        Ok(())
    }

    /// Sends the changes after `sent`, or a snapshot when they are no longer kept.
    async fn catch_up<S>(
        &self,
        sink: &mut Sink<S>,
        session: &Session,
        sent: u64,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.store.changes_since(sent) {
            Since::Current => Ok(sent),
            Since::Changes(changes) => {
                let mut last = sent;
                for c in &changes {
                    sink.feed(WsMessage::Text(wire(c))).await?;
                    last = c.version;
                }
                sink.flush().await?;
                metrics::counter!("cloudcore_hub_changes_sent_total")
                    .increment(changes.len() as u64);
                Ok(last)
            }
            Since::Gone => {
                // The node fell behind the history while connected (it reads too slowly).
                warn!(node = %session.node, sent, "node fell behind the change history; sending a snapshot");
                self.send_snapshot(sink, "", sent).await
            }
        }
    }

    async fn send_snapshot<S>(
        &self,
        sink: &mut Sink<S>,
        request_id: &str,
        from: u64,
    ) -> Result<u64, SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let snap = self.encoded_snapshot().await?;
        self.respond(
            sink,
            request_id,
            SyncMode::Snapshot,
            from,
            snap.version,
            snap.count,
        )
        .await?;
        for chunk in &snap.chunks {
            sink.feed(WsMessage::Text(chunk.clone())).await?;
        }
        sink.flush().await?;
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
        let chunk_size = self.cfg.snapshot_chunk.max(1);
        let built = tokio::task::spawn_blocking(move || -> Result<EncodedSnapshot, String> {
            let snap = store.snapshot().map_err(|e| e.to_string())?;
            let count = snap.records.len() as u64;
            let mut chunks = Vec::with_capacity(snap.records.len() / chunk_size + 1);
            let mut pieces = snap.records.chunks(chunk_size).peekable();
            if pieces.peek().is_none() {
                chunks.push(encode_chunk(snap.version, Vec::new(), true)?);
            }
            while let Some(piece) = pieces.next() {
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
                chunks.push(encode_chunk(
                    snap.version,
                    entries,
                    pieces.peek().is_none(),
                )?);
            }
            Ok(EncodedSnapshot {
                version: snap.version,
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

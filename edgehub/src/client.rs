//! The edge side of the hub: one websocket to the cloud that authenticates, resumes from the
//! node's committed version, applies what it is sent through [`MetaManager`], acknowledges
//! only what is durable, keeps the link alive, and reconnects with jittered backoff.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::message::{group, Message, MessageError, SyncMode};
use crate::metamanager::{MetaError, MetaManager};
use crate::model::ObjectKey;
use crate::session::{
    ChangeBatch, Received, SessionConfig, SessionError, SessionEvent, SnapshotCommit, SyncSession,
};
use crate::tls::{self, TlsError};
use crate::tunnel::{Mux, Outgoing, RefusalKind, Side, TunnelHandle};

/// The hub's default port, used when a cloud URL names none.
pub const DEFAULT_HUB_PORT: u16 = 10000;

/// How many received messages are committed in one SQLite transaction at most.
const MAX_BATCH: usize = 1024;

/// The websocket's first read buffer: one tunnel DATA frame.
const READ_BUFFER_BYTES: usize = 32 << 10;

#[derive(Clone, Debug)]
pub struct HubClientConfig {
    pub node_name: String,
    /// `ws://host[:port]` or `wss://host[:port]`; tried in turn.
    pub urls: Vec<String>,
    pub token: String,
    /// CA certificate(s) that sign the cloud's certificate; required for `wss://`.
    pub ca_cert: Option<PathBuf>,
    /// The node's certificate, presented to a TLS hub (which then needs no token).
    pub identity: Option<Arc<crate::identity::Identity>>,
    pub labels: BTreeMap<String, String>,
    pub keepalive_interval: Duration,
    /// The link is dropped when nothing arrived from the cloud for this long.
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Largest message accepted from the cloud.
    pub max_message_size: usize,
}

impl HubClientConfig {
    pub fn new(node_name: &str, urls: Vec<String>, token: &str) -> Self {
        HubClientConfig {
            node_name: node_name.to_string(),
            urls,
            token: token.to_string(),
            ca_cert: None,
            identity: None,
            labels: BTreeMap::new(),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            // Objects are at most 1 MiB and snapshot chunks about 32 KiB.
            max_message_size: 4 << 20,
        }
    }
}

/// What went wrong with one connection; the client logs it and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("invalid cloud URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS handshake with {addr}: {source}")]
    TlsHandshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the cloud refused node {node}: HTTP {status}: {body}")]
    Refused {
        node: String,
        status: u16,
        body: String,
    },
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("the cloud closed the connection{0}")]
    Closed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error(transparent)]
    Store(#[from] MetaError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// The last sync answer the node got, for `/debug/sync` and `edgemesh status`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastSync {
    pub mode: SyncMode,
    pub from_version: u64,
    pub to_version: u64,
    /// Changes (delta) or objects (snapshot) the cloud announced.
    pub count: u64,
    pub at_ms: i64,
}

/// Connection and sync state, shared with the admin API.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    pub node_name: String,
    pub connected: bool,
    /// True once the node caught up with the cloud on the current connection.
    pub synced: bool,
    pub cloud_url: Option<String>,
    pub connected_since_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    pub connects: u64,
    pub disconnects: u64,
    pub last_sync: Option<LastSync>,
    pub snapshots: u64,
    pub deltas: u64,
    pub changes_applied: u64,
    pub duplicates_skipped: u64,
    pub batches_committed: u64,
    pub acked_version: u64,
    pub last_change_at_ms: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A parsed cloud URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl CloudUrl {
    pub fn parse(url: &str) -> Result<CloudUrl, HubError> {
        let bad = |reason: &str| HubError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") | Some("http") => false,
            Some("wss") | Some("https") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("give only scheme, host and port; the path is fixed"));
        }
        Ok(CloudUrl {
            tls,
            host,
            port: uri.port_u16().unwrap_or(DEFAULT_HUB_PORT),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn events_url(&self, node: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}/v1/nodes/{node}/events", self.authority())
    }
}

/// Writes what `session` queued to a hub websocket, then flushes once.
pub async fn transmit<S>(session: &mut SyncSession, sink: &mut S) -> Result<(), tungstenite::Error>
where
    S: futures_util::Sink<WsMessage, Error = tungstenite::Error> + Unpin,
{
    let mut queued = false;
    while let Some(msg) = session.poll_transmit() {
        sink.feed(WsMessage::text(msg.to_json())).await?;
        queued = true;
    }
    if queued {
        sink.flush().await?;
    }
    Ok(())
}

/// A session that synced and lasted this long was a working link: the next connect starts
/// from the shortest backoff, so a node whose cloud replica died is elsewhere within seconds.
const LASTED: Duration = Duration::from_secs(2);

/// Where a node starts in its `cloud.url` list: spread by node name, so a fleet does not all
/// land on the first URL.
pub fn first_url(node: &str, urls: usize) -> usize {
    let digest = ring::digest::digest(&ring::digest::SHA256, node.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_be_bytes(first) % urls.max(1) as u64) as usize
}

/// The URL after `current`: any other one, at random.
fn failover_url(current: usize, urls: usize) -> usize {
    if urls < 2 {
        return 0;
    }
    (current % urls + 1 + rand::random_range(0..urls - 1)) % urls
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
}

pub struct HubClient {
    cfg: Arc<HubClientConfig>,
    meta: Arc<MetaManager>,
    status: Arc<Mutex<SyncStatus>>,
    /// Set when this node's copy turned out not to be the cloud's history: the next sync
    /// request presents no store, so the cloud answers with a snapshot.
    force_snapshot: std::sync::atomic::AtomicBool,
    /// Streams over the hub link, when this agent tunnels traffic.
    tunnel: Option<TunnelHandle>,
    /// Node certificate and direct-path messages (group `direct`).
    direct: Option<Arc<crate::direct::DirectAgent>>,
}

/// Messages of the link's stream queue written in one go before a flush.
const MAX_WRITE_BATCH: usize = 64;

/// Closes the link's streams when the session ends, however it ends.
struct LinkGuard<'a>(&'a Option<TunnelHandle>);

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        if let Some(tunnel) = self.0 {
            tunnel.install(None);
        }
    }
}

/// The next message of the stream queue, or never when this link carries no streams.
async fn next_outgoing(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Outgoing>>,
) -> Option<Outgoing> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next message of the direct agent's queue, or never without one.
async fn next_direct(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<Message>>,
) -> Option<Message> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl HubClient {
    pub fn new(cfg: HubClientConfig, meta: Arc<MetaManager>) -> Self {
        let status = SyncStatus {
            node_name: cfg.node_name.clone(),
            ..SyncStatus::default()
        };
        HubClient {
            cfg: Arc::new(cfg),
            meta,
            status: Arc::new(Mutex::new(status)),
            force_snapshot: std::sync::atomic::AtomicBool::new(false),
            tunnel: None,
            direct: None,
        }
    }

    /// Carries the node's certificate requests and direct-path messages over the hub link.
    pub fn with_direct(mut self, direct: Arc<crate::direct::DirectAgent>) -> Self {
        self.direct = Some(direct);
        self
    }

    /// Carries tunnelled streams over the hub link: opened through `tunnel`, accepted by its
    /// acceptor.
    pub fn with_tunnel(mut self, tunnel: TunnelHandle) -> Self {
        self.tunnel = Some(tunnel);
        self
    }

    /// Shared status, updated as the client works.
    pub fn status(&self) -> Arc<Mutex<SyncStatus>> {
        self.status.clone()
    }

    fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// Runs until `shutdown` is cancelled: connect, sync, reconnect.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.backoff_base, self.cfg.backoff_max);
        let mut next_url = first_url(&self.cfg.node_name, self.cfg.urls.len());
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let Some(url) = self
                .cfg
                .urls
                .get(next_url % self.cfg.urls.len().max(1))
                .cloned()
            else {
                warn!("no cloud URL configured; running from the local store only");
                shutdown.cancelled().await;
                break;
            };
            let span = tracing::info_span!("hub", node = %self.cfg.node_name, cloud = %url);
            let started = Instant::now();
            let result = self.session(&url, &shutdown).instrument(span).await;
            let was_synced = {
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                if s.connected {
                    s.disconnects += 1;
                }
                let was = s.synced;
                s.connected = false;
                s.synced = false;
                s.connected_since_ms = None;
                was
            };
            match result {
                Ok(SessionEnd::Shutdown) => break,
                Err(e) => {
                    if matches!(
                        e,
                        HubError::Store(MetaError::HistoryMismatch { .. })
                            | HubError::Session(SessionError::HistoryMismatch { .. })
                    ) {
                        self.force_snapshot
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    warn!(cloud = %url, error = %e, "hub connection ended");
                    metrics::counter!("edgemesh_hub_disconnects_total").increment(1);
                    self.update(|s| {
                        s.last_error = Some(e.to_string());
                        s.last_error_at_ms = Some(now_ms());
                    });
                }
            }
            // Only a session that synced and then lasted counts as a working link. One that
            // fails straight after connecting (refused, a bad object, a protocol error) keeps
            // backing off, so a fleet cannot hammer the cloud twice a second.
            if was_synced && started.elapsed() > LASTED {
                backoff.reset();
            }
            // Every URL is the same cloud (replicas share one store and this node resumes by
            // delta on any of them), so a link that ended moves on: off a replica that died or
            // closed its sessions, spread over the others rather than all onto the next one.
            next_url = failover_url(next_url, self.cfg.urls.len());
            let delay = backoff.next_delay();
            debug!(?delay, "reconnecting after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        info!("hub client stopped");
    }

    async fn session(
        &self,
        url: &str,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, HubError> {
        let cloud = CloudUrl::parse(url)?;
        let addr = cloud.authority();
        let tcp = tokio::time::timeout(
            self.cfg.connect_timeout,
            TcpStream::connect((cloud.host.as_str(), cloud.port)),
        )
        .await
        .map_err(|_| HubError::ConnectTimeout(addr.clone()))?
        .map_err(|source| HubError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        if cloud.tls {
            let ca = self
                .cfg
                .ca_cert
                .as_deref()
                .ok_or_else(|| HubError::BadUrl {
                    url: url.to_string(),
                    reason: "wss:// needs cloud.ca_cert".into(),
                })?;
            let auth = self.cfg.identity.as_ref().and_then(|i| i.client_auth());
            let connector = tokio_rustls::TlsConnector::from(tls::client_config_with_auth(
                "cloud.ca_cert",
                ca,
                auth,
            )?);
            let name =
                rustls::pki_types::ServerName::try_from(cloud.host.clone()).map_err(|_| {
                    HubError::BadUrl {
                        url: url.to_string(),
                        reason: "invalid TLS server name".into(),
                    }
                })?;
            let stream =
                tokio::time::timeout(self.cfg.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| HubError::ConnectTimeout(addr.clone()))?
                    .map_err(|source| HubError::TlsHandshake {
                        addr: addr.clone(),
                        source,
                    })?;
            self.handshake_and_sync(&cloud, stream, shutdown).await
        } else {
            self.handshake_and_sync(&cloud, tcp, shutdown).await
        }
    }

    async fn handshake_and_sync<S>(
        &self,
        cloud: &CloudUrl,
        stream: S,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, HubError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let url = cloud.events_url(&self.cfg.node_name);
        let mut request = url.as_str().into_client_request()?;
        // No token: a node that joined logs in with its certificate (TLS hubs only).
        if !self.cfg.token.is_empty() {
            let bearer =
                HeaderValue::from_str(&format!("Bearer {}", self.cfg.token)).map_err(|_| {
                    HubError::Protocol("cloud.token contains invalid characters".into())
                })?;
            request.headers_mut().insert(header::AUTHORIZATION, bearer);
        }
        // The read buffer keeps the largest size it ever grew to for the link's life (its
        // capacity doubles when a burst finds it too small): starting at 32 KiB, one tunnel
        // DATA frame, rather than tungstenite's 128 KiB, it stayed at 64 KiB after a sync of
        // 10,000 Services where the default grew to 512 KiB.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(self.cfg.max_message_size))
            .max_frame_size(Some(self.cfg.max_message_size));
        let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
        let (ws, _response) = match tokio::time::timeout(self.cfg.connect_timeout, handshake).await
        {
            Err(_) => return Err(HubError::ConnectTimeout(cloud.authority())),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .unwrap_or_default();
                return Err(HubError::Refused {
                    node: self.cfg.node_name.clone(),
                    status: resp.status().as_u16(),
                    body,
                });
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(pair)) => pair,
        };
        info!("connected to the cloud hub");
        metrics::counter!("edgemesh_hub_connects_total").increment(1);
        self.update(|s| {
            s.connected = true;
            s.connects += 1;
            s.cloud_url = Some(url.clone());
            s.connected_since_ms = Some(now_ms());
        });
        self.sync_loop(ws, shutdown).await
    }

    async fn sync_loop<S>(
        &self,
        ws: WebSocketStream<S>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, HubError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        let mut point = self.with_store(|meta| meta.sync_point()).await?;
        if self
            .force_snapshot
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            point.store_id = None;
        }
        debug!(version = point.version, store_id = ?point.store_id, "sync requested");
        let cfg = SessionConfig {
            node_name: self.cfg.node_name.clone(),
            labels: self.cfg.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            keepalive_interval: self.cfg.keepalive_interval,
            keepalive_timeout: Some(self.cfg.keepalive_timeout),
        };
        let mut session = SyncSession::new(&cfg, point, Instant::now());
        self.flush_session(&mut session, &mut sink).await?;
        // A snapshot's objects, kept until its last chunk.
        let mut staged: Vec<(ObjectKey, String)> = Vec::new();
        let timer = sleep_until(session.next_timer());
        tokio::pin!(timer);

        let (mux, mut link_out) = match &self.tunnel {
            Some(tunnel) => {
                let (mux, out) = Mux::new(tunnel.config().clone(), Side::Edge);
                tunnel.install(Some(mux.clone()));
                (Some(mux), Some(out))
            }
            None => (None, None),
        };
        let _link = LinkGuard(&self.tunnel);
        let mut direct_out = self.direct.as_ref().map(|d| d.attach());

        loop {
            timer.as_mut().reset(session.next_timer());
            let first = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = sink.send(WsMessage::Close(None)).await;
                    return Ok(SessionEnd::Shutdown);
                }
                Some(out) = next_outgoing(&mut link_out) => {
                    // Stream frames: write what is queued, then flush once.
                    let mut budget = Vec::new();
                    let (message, permit) = out.into_parts();
                    sink.feed(message).await?;
                    budget.push(permit);
                    if let Some(rx) = link_out.as_mut() {
                        while budget.len() < MAX_WRITE_BATCH {
                            let Ok(out) = rx.try_recv() else { break };
                            let (message, permit) = out.into_parts();
                            sink.feed(message).await?;
                            budget.push(permit);
                        }
                    }
                    sink.flush().await?;
                    continue;
                }
                Some(msg) = next_direct(&mut direct_out) => {
                    sink.send(WsMessage::text(msg.to_json())).await?;
                    continue;
                }
                _ = &mut timer => {
                    session.on_timer(Instant::now())?;
                    self.flush_session(&mut session, &mut sink).await?;
                    continue;
                }
                frame = stream.next() => frame,
            };
            session.received(Instant::now());
            // Take everything that is already here, so one transaction commits a whole burst.
            let mut ended: Option<HubError> = None;
            let mut frame = Some(first);
            while let Some(f) = frame.take() {
                match f {
                    None => {
                        ended = Some(HubError::Closed(String::new()));
                        break;
                    }
                    Some(Err(e)) => {
                        ended = Some(e.into());
                        break;
                    }
                    Some(Ok(WsMessage::Text(text))) => {
                        let msg = Message::from_json(text.as_str())?;
                        if msg.route.group == group::STREAM {
                            self.on_stream_message(mux.as_ref(), &msg)?;
                        } else if msg.route.group == group::DIRECT {
                            match &self.direct {
                                Some(d) => d.on_message(&msg),
                                None => debug!("ignoring a direct message: no direct agent"),
                            }
                        } else if let Received::Snapshot { objects, complete } =
                            session.handle(msg)?
                        {
                            staged.extend(
                                objects
                                    .into_iter()
                                    .map(|(key, raw)| (key, String::from(Box::<str>::from(raw)))),
                            );
                            if let Some(done) = complete {
                                self.apply_snapshot(done, std::mem::take(&mut staged))
                                    .await?;
                                session.store_committed()?;
                                self.flush_session(&mut session, &mut sink).await?;
                            }
                        }
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let reason = frame
                            .map(|f| format!(": {} {}", u16::from(f.code), f.reason))
                            .unwrap_or_default();
                        ended = Some(HubError::Closed(reason));
                        break;
                    }
                    Some(Ok(WsMessage::Binary(raw))) => match &mux {
                        Some(mux) => mux
                            .on_binary(raw)
                            .map_err(|e| HubError::Protocol(e.to_string()))?,
                        None => debug!("ignoring a binary frame: this agent tunnels nothing"),
                    },
                    Some(Ok(_)) => {} // ping/pong are answered by tungstenite
                }
                if session.pending() < MAX_BATCH {
                    frame = stream.next().now_or_never();
                }
            }
            if let Some(batch) = session.take_batch() {
                self.commit(batch).await?;
                session.store_committed()?;
            }
            self.flush_session(&mut session, &mut sink).await?;
            if let Some(e) = ended {
                return Err(e);
            }
        }
    }

    /// A stream open from the cloud goes to the acceptor; an answer to one of ours completes it.
    fn on_stream_message(&self, mux: Option<&Mux>, msg: &Message) -> Result<(), HubError> {
        let Some(mux) = mux else {
            debug!("ignoring a stream message: this agent tunnels nothing");
            return Ok(());
        };
        let incoming = mux
            .on_message(msg)
            .map_err(|e| HubError::Protocol(e.to_string()))?;
        if let Some(incoming) = incoming {
            match self.tunnel.as_ref().and_then(|t| t.acceptor()) {
                Some(acceptor) => acceptor.incoming(mux, incoming),
                None => mux.refuse(
                    incoming,
                    RefusalKind::Forbidden,
                    "this node accepts no streams",
                ),
            }
        }
        Ok(())
    }

    /// Sends what the session queued and takes its events into the status.
    async fn flush_session<S>(
        &self,
        session: &mut SyncSession,
        sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    ) -> Result<(), HubError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        transmit(session, sink).await?;
        while let Some(event) = session.poll_event() {
            self.record(event);
        }
        Ok(())
    }

    fn record(&self, event: SessionEvent) {
        match event {
            SessionEvent::Answered(resp) => {
                info!(
                    mode = resp.mode.as_str(),
                    from = resp.from_version,
                    to = resp.to_version,
                    count = resp.count,
                    "sync answer"
                );
                self.update(|s| {
                    match resp.mode {
                        SyncMode::Snapshot => s.snapshots += 1,
                        SyncMode::Delta => s.deltas += 1,
                        SyncMode::Current => {}
                    }
                    s.last_sync = Some(LastSync {
                        mode: resp.mode,
                        from_version: resp.from_version,
                        to_version: resp.to_version,
                        count: resp.count,
                        at_ms: now_ms(),
                    });
                });
            }
            SessionEvent::Synced(_) => self.update(|s| s.synced = true),
            SessionEvent::BatchCommitted {
                applied,
                duplicates,
                ..
            } => {
                metrics::counter!("edgemesh_hub_changes_applied_total").increment(applied as u64);
                self.update(|s| {
                    s.changes_applied += applied as u64;
                    s.duplicates_skipped += duplicates as u64;
                    s.batches_committed += 1;
                    s.last_change_at_ms = Some(now_ms());
                });
            }
            SessionEvent::SnapshotCommitted { version, objects } => {
                info!(version, objects, "snapshot applied");
                self.update(|s| {
                    s.batches_committed += 1;
                    s.last_change_at_ms = Some(now_ms());
                });
            }
            SessionEvent::Acked(version) => self.update(|s| s.acked_version = version),
        }
    }

    /// Commits a batch and its version in one transaction. The store checks the batch against
    /// what it holds, so a copy that is not where the session thinks it is never gets acked.
    async fn commit(&self, batch: ChangeBatch) -> Result<(), HubError> {
        let (version, chain) = (batch.version, batch.chain.clone());
        let applied = self
            .with_store(move |meta| {
                let expect = batch.expect.as_ref().map(|(v, c)| (*v, c.as_str()));
                meta.apply_changes(&batch.store_id, &batch.changes, expect)
            })
            .await?;
        if applied.version != version || applied.chain != chain {
            return Err(HubError::Protocol(format!(
                "the store is at version {} but the sync session expected {version}",
                applied.version
            )));
        }
        Ok(())
    }

    async fn apply_snapshot(
        &self,
        done: SnapshotCommit,
        objects: Vec<(ObjectKey, String)>,
    ) -> Result<(), HubError> {
        self.with_store(move |meta| {
            meta.replace_all(&done.store_id, done.version, &done.chain, &objects)
        })
        .await?;
        Ok(())
    }

    /// Runs store work (SQLite, blocking) on the blocking pool.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&MetaManager) -> Result<T, MetaError> + Send + 'static,
    ) -> Result<T, HubError> {
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || f(&meta))
            .await
            .map_err(|e| HubError::Protocol(format!("store task failed: {e}")))?
            .map_err(HubError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{op, resource, Ack, SyncRequest};
    use crate::session::wire::{answer, chain_after, change, chunk};

    #[test]
    fn nodes_spread_over_the_urls_and_fail_over_to_another() {
        let mut per_url = [0usize; 3];
        for i in 0..300 {
            per_url[first_url(&format!("edge-{i}"), 3)] += 1;
        }
        assert!(
            per_url.iter().all(|n| (60..=140).contains(n)),
            "{per_url:?}"
        );
        assert_eq!(first_url("edge-1", 1), 0);
        assert_eq!(first_url("edge-1", 0), 0);
        let mut seen = [false; 3];
        for _ in 0..200 {
            let next = failover_url(1, 3);
            assert_ne!(next, 1);
            seen[next] = true;
        }
        assert!(seen[0] && seen[2], "both others are used");
        assert_eq!(failover_url(0, 1), 0);
    }

    #[test]
    fn cloud_urls() {
        let u = CloudUrl::parse("ws://10.0.0.1").expect("valid");
        assert_eq!(
            u,
            CloudUrl {
                tls: false,
                host: "10.0.0.1".into(),
                port: 10000
            }
        );
        assert_eq!(
            u.events_url("edge-1"),
            "ws://10.0.0.1:10000/v1/nodes/edge-1/events"
        );
        let u = CloudUrl::parse("wss://cloud.example:443/").expect("valid");
        assert!(u.tls);
        assert_eq!(u.port, 443);
        let u = CloudUrl::parse("ws://[fd00::1]:9000").expect("valid");
        assert_eq!(u.events_url("n"), "ws://[fd00::1]:9000/v1/nodes/n/events");
        for bad in ["", "cloud:10000", "ftp://x", "ws://x/some/path"] {
            assert!(CloudUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// The cloud's end of an in-memory link for the driver tests.
    struct FakeHub {
        ws: WebSocketStream<tokio::io::DuplexStream>,
    }

    impl FakeHub {
        async fn send(&mut self, msg: Message) {
            self.ws
                .send(WsMessage::text(msg.to_json()))
                .await
                .expect("send to the node");
        }

        /// The node's next message that is not a keepalive.
        async fn recv(&mut self) -> Message {
            loop {
                let frame = self.ws.next().await.expect("open").expect("a frame");
                if let WsMessage::Text(t) = frame {
                    let msg = Message::from_json(t.as_str()).expect("a message");
                    if msg.operation() != op::KEEPALIVE {
                        return msg;
                    }
                }
            }
        }

        async fn ack(&mut self) -> u64 {
            let msg = self.recv().await;
            assert_eq!(msg.resource(), resource::ACK);
            msg.content_as::<Ack>().expect("an ack").resource_version
        }
    }

    /// A client connected to a [`FakeHub`] over an in-memory link; the client's session runs
    /// in a task and returns how it ended.
    async fn connect(
        client: Arc<HubClient>,
    ) -> (
        FakeHub,
        tokio::task::JoinHandle<Result<SessionEnd, HubError>>,
    ) {
        let (node_io, hub_io) = tokio::io::duplex(1 << 20);
        let cloud = CloudUrl::parse("ws://cloud.test").expect("url");
        let session = tokio::spawn(async move {
            client
                .handshake_and_sync(&cloud, node_io, &CancellationToken::new())
                .await
        });
        let ws = tokio_tungstenite::accept_async(hub_io)
            .await
            .expect("handshake");
        (FakeHub { ws }, session)
    }

    /// The hub client drives the session: every ack arrives after its commit, a reconnect
    /// resumes from the store and skips redeliveries, and a silent cloud ends the link after
    /// `keepalive_timeout` (on the paused clock).
    #[tokio::test(start_paused = true)]
    async fn the_client_acks_what_it_committed_and_resumes_from_its_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Arc::new(MetaManager::open(dir.path()).expect("open"));
        let client = Arc::new(HubClient::new(
            HubClientConfig::new("edge-1", Vec::new(), "token"),
            meta.clone(),
        ));

        let (mut hub, session) = connect(client.clone()).await;
        let request: SyncRequest = hub.recv().await.content_as().expect("sync request");
        assert_eq!((request.store_id, request.resource_version), (None, 0));
        let c1 = chain_after("", &[(1, op::INSERT, "a")]);
        hub.send(answer(SyncMode::Snapshot, "s1", 0, 1, &c1)).await;
        hub.send(chunk(1, &["a"], true)).await;
        assert_eq!(hub.ack().await, 1);
        assert_eq!(
            meta.sync_point().expect("point").version,
            1,
            "acked after commit"
        );
        hub.send(change(2, op::UPDATE, "b")).await;
        assert_eq!(hub.ack().await, 2);
        let point = meta.sync_point().expect("point");
        assert_eq!(point.version, 2);
        assert_eq!(point.chain, chain_after(&c1, &[(2, op::UPDATE, "b")]));
        assert!(client.status().lock().expect("status").synced);

        // Silence: keepalives go out, then the link is given up after 30 s.
        let silent = Instant::now();
        let end = session.await.expect("task");
        assert!(
            matches!(
                end,
                Err(HubError::Session(SessionError::KeepaliveTimeout(_)))
            ),
            "{:?}",
            end.err()
        );
        assert_eq!(silent.elapsed(), Duration::from_secs(30));
        drop(hub);

        // Resume: the store's point is presented; a redelivery is skipped.
        let (mut hub, session) = connect(client.clone()).await;
        let request: SyncRequest = hub.recv().await.content_as().expect("sync request");
        assert_eq!(
            (request.store_id.as_deref(), request.resource_version),
            (Some("s1"), 2)
        );
        assert_eq!(request.chain, point.chain);
        let c3 = chain_after(&point.chain, &[(3, op::INSERT, "c")]);
        hub.send(answer(SyncMode::Delta, "s1", 2, 3, &c3)).await;
        hub.send(change(2, op::UPDATE, "b")).await;
        hub.send(change(3, op::INSERT, "c")).await;
        assert_eq!(hub.ack().await, 3);
        assert_eq!(meta.sync_point().expect("point").chain, c3);
        let status = client.status().lock().expect("status").clone();
        assert_eq!(
            (status.snapshots, status.deltas, status.acked_version),
            (1, 1, 3)
        );
        assert_eq!((status.changes_applied, status.duplicates_skipped), (2, 1));
        assert_eq!(meta.view().services.len(), 3);

        // A gap is a protocol error: nothing of it is committed or acked.
        hub.send(change(5, op::UPDATE, "e")).await;
        let end = session.await.expect("task");
        assert!(
            matches!(end, Err(HubError::Session(SessionError::Gap { .. }))),
            "{:?}",
            end.err()
        );
        assert_eq!(meta.sync_point().expect("point").version, 3);
    }
}

//! A simulated edge node: one real websocket to the hub, authenticated with the node's own
//! token, running the same sync session as the real node (`edgehub::session`: sync request,
//! snapshot / delta / live changes, redeliveries, gaps, the history chain, one ack per
//! committed batch, keepalives), but keeping its copy in memory only.
//!
//! Thousands of these run in one process, so the per-message work is kept small: one JSON parse
//! of the envelope (the content stays raw), no pretty-printing, no logging.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edgehub::client::transmit;
use edgehub::message::{op, Message, SyncMode};
use edgehub::metamanager::SyncPoint;
use edgehub::model::{Object, ObjectKey};
use edgehub::session::{
    ChangeBatch, Received, SessionConfig, SessionEvent, SnapshotCommit, SyncSession,
};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// Most received changes committed (and acked) as one batch, as `edgehub::client` does.
const MAX_BATCH: usize = 1024;

pub type Ws = WebSocketStream<TcpStream>;
type Sink = SplitSink<Ws, WsMessage>;

/// Opens an authenticated hub websocket for `node`.
pub async fn connect(hub: SocketAddr, node: &str, token: &str, timeout: Duration) -> Result<Ws> {
    let attempt = async {
        let tcp = TcpStream::connect(hub)
            .await
            .with_context(|| format!("connect to the hub at {hub}"))?;
        let _ = tcp.set_nodelay(true);
        let mut request = format!("ws://{hub}/v1/nodes/{node}/events").into_client_request()?;
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        );
        let config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20)
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        match tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .unwrap_or_default();
                Err(anyhow!(
                    "the hub refused node {node}: HTTP {}: {body}",
                    resp.status()
                ))
            }
            Err(e) => Err(anyhow!("websocket handshake for node {node}: {e}")),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| anyhow!("node {node}: connect timed out after {timeout:?}"))?
}

/// The session settings of a simulated node: no labels, and a silent hub is never given up
/// (the benchmark's own phase timeouts catch that).
fn session_config(node: &str, keepalive: Duration) -> SessionConfig {
    SessionConfig {
        node_name: node.to_string(),
        labels: BTreeMap::new(),
        agent_version: concat!("edgemesh-bench/", env!("CARGO_PKG_VERSION")).to_string(),
        keepalive_interval: keepalive,
        keepalive_timeout: None,
    }
}

/// State shared by every node of one fleet and the controller.
pub struct Fleet {
    pub base: Instant,
    /// Per node: the last version it acked.
    pub acked: Vec<AtomicU64>,
    pub synced: AtomicUsize,
    pub failed: AtomicUsize,
    /// Sync answers by mode: current, delta, snapshot.
    pub modes: [AtomicUsize; 3],
    first_error: Mutex<Option<String>>,
    pub stop: CancellationToken,
}

impl Fleet {
    pub fn new(base: Instant, nodes: usize) -> Self {
        Fleet {
            base,
            acked: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            synced: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            modes: Default::default(),
            first_error: Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn fail(&self, e: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct NodeSpec {
    pub idx: usize,
    pub name: String,
    pub token: String,
    pub store_id: Option<String>,
    pub version: u64,
    /// The history chain at `version`, when the node resumes.
    pub chain: Option<String>,
}

pub struct NodeOpts {
    pub hub: SocketAddr,
    /// Record the receive and ack time of every change.
    pub record: bool,
    /// Keep the objects (key → JSON); otherwise only count them.
    pub keep_objects: bool,
    pub keepalive: Duration,
    pub connect_timeout: Duration,
}

/// One change as a node saw it: its version, when its frame arrived, when its batch was acked
/// (nanoseconds since the fleet's base instant).
#[derive(Clone, Copy)]
pub struct Sample {
    pub version: u64,
    pub recv_ns: u64,
    pub ack_ns: u64,
}

#[derive(Default)]
pub struct NodeReport {
    pub samples: Vec<Sample>,
    pub objects: usize,
    pub version: u64,
    /// The node's history chain at `version`.
    pub chain: String,
}

/// The node's copy of the metadata: the objects (or only their count) and a snapshot's
/// objects until its last chunk.
struct Replica {
    keep: bool,
    objects: HashMap<ObjectKey, String>,
    count: usize,
    staged: Vec<(ObjectKey, String)>,
}

impl Replica {
    fn new(keep: bool) -> Self {
        Replica {
            keep,
            objects: HashMap::new(),
            count: 0,
            staged: Vec::new(),
        }
    }

    fn stage(&mut self, objects: Vec<(ObjectKey, Box<RawValue>)>) {
        if self.keep {
            self.staged.extend(
                objects
                    .into_iter()
                    .map(|(key, raw)| (key, String::from(Box::<str>::from(raw)))),
            );
        }
    }

    fn replace(&mut self, done: &SnapshotCommit) {
        self.objects = std::mem::take(&mut self.staged).into_iter().collect();
        self.count = done.objects as usize;
    }

    fn apply(&mut self, batch: ChangeBatch) {
        for c in batch.changes {
            if c.is_delete() {
                if !self.keep || self.objects.remove(&c.key).is_some() {
                    self.count = self.count.saturating_sub(1);
                }
            } else if self.keep {
                if self.objects.insert(c.key, c.body).is_none() {
                    self.count += 1;
                }
            } else if c.operation == op::INSERT {
                self.count += 1;
            }
        }
    }
}

/// Runs one node until the fleet stops; failures are counted in the fleet.
pub async fn run_node(
    spec: NodeSpec,
    opts: Arc<NodeOpts>,
    fleet: Arc<Fleet>,
    permit: Option<OwnedSemaphorePermit>,
) -> NodeReport {
    let idx = spec.idx;
    match session(spec, &opts, &fleet, permit).await {
        Ok(r) => r,
        Err(e) => {
            fleet.fail(&e.context(format!("node #{idx}")));
            NodeReport::default()
        }
    }
}

/// The node's share of the fleet's bookkeeping.
struct Seat<'a> {
    fleet: &'a Fleet,
    idx: usize,
    /// Held until the node synced, so at most `connect_concurrency` nodes sync at a time.
    permit: Option<OwnedSemaphorePermit>,
    synced: bool,
}

impl Seat<'_> {
    /// Sends what the session queued and takes its events into the fleet.
    async fn flush(&mut self, sink: &mut Sink, session: &mut SyncSession) -> Result<()> {
        transmit(session, sink).await?;
        while let Some(event) = session.poll_event() {
            match event {
                SessionEvent::Acked(version) => {
                    if let Some(a) = self.fleet.acked.get(self.idx) {
                        a.fetch_max(version, Ordering::Release);
                    }
                }
                SessionEvent::Synced(mode) if !self.synced => {
                    self.synced = true;
                    let i = match mode {
                        SyncMode::Current => 0,
                        SyncMode::Delta => 1,
                        SyncMode::Snapshot => 2,
                    };
                    self.fleet.modes[i].fetch_add(1, Ordering::Relaxed);
                    self.fleet.synced.fetch_add(1, Ordering::Release);
                    self.permit.take();
                }
                _ => {}
            }
        }
        Ok(())
    }
}

async fn session(
    spec: NodeSpec,
    opts: &NodeOpts,
    fleet: &Fleet,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<NodeReport> {
    let ws = tokio::select! {
        _ = fleet.stop.cancelled() => return Ok(NodeReport::default()),
        ws = connect(opts.hub, &spec.name, &spec.token, opts.connect_timeout) => ws?,
    };
    let (mut sink, mut stream) = ws.split();
    let period = opts.keepalive.max(Duration::from_millis(100));
    let point = SyncPoint {
        store_id: spec.store_id,
        version: spec.version,
        chain: spec.chain.unwrap_or_default(),
    };
    let now = tokio::time::Instant::now();
    let mut session = SyncSession::new(&session_config(&spec.name, period), point, now);
    // Spread keepalives over the interval so a large fleet does not send them in bursts.
    let offset =
        Duration::from_millis((spec.idx as u64).wrapping_mul(7919) % period.as_millis() as u64);
    session.schedule_keepalive(now + offset + period / 2);
    let mut seat = Seat {
        fleet,
        idx: spec.idx,
        permit,
        synced: false,
    };
    seat.flush(&mut sink, &mut session).await?;
    let mut replica = Replica::new(opts.keep_objects);
    let mut samples = Vec::new();
    let mut batch_samples: Vec<Sample> = Vec::new();
    let timer = tokio::time::sleep_until(session.next_timer());
    tokio::pin!(timer);
    loop {
        if timer.deadline() != session.next_timer() {
            timer.as_mut().reset(session.next_timer());
        }
        let first = tokio::select! {
            biased;
            _ = fleet.stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(WsMessage::Close(None))).await;
                return Ok(NodeReport {
                    samples,
                    objects: replica.count,
                    version: session.version(),
                    chain: session.chain().to_string(),
                });
            }
            _ = &mut timer => {
                session.on_timer(tokio::time::Instant::now())?;
                seat.flush(&mut sink, &mut session).await?;
                continue;
            }
            frame = stream.next() => frame,
        };
        // When the frame at hand arrived (the first one just now; later ones were already
        // buffered and are stamped as they are taken).
        let mut recv_ns = fleet.now_ns();
        let mut ended: Option<anyhow::Error> = None;
        let mut frame = Some(first);
        while let Some(f) = frame.take() {
            match f {
                None => {
                    ended = Some(anyhow!("the hub closed the connection"));
                    break;
                }
                Some(Err(e)) => {
                    ended = Some(anyhow!("websocket: {e}"));
                    break;
                }
                Some(Ok(WsMessage::Text(text))) => {
                    match session.handle(Message::from_json(text.as_str())?)? {
                        Received::Buffered { version } if opts.record => {
                            batch_samples.push(Sample {
                                version,
                                recv_ns,
                                ack_ns: 0,
                            })
                        }
                        Received::Snapshot { objects, complete } => {
                            replica.stage(objects);
                            if let Some(done) = complete {
                                replica.replace(&done);
                                session.store_committed()?;
                                seat.flush(&mut sink, &mut session).await?;
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(WsMessage::Close(cf))) => {
                    let reason = cf
                        .map(|f| format!(": {} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default();
                    ended = Some(anyhow!("the hub closed the connection{reason}"));
                    break;
                }
                Some(Ok(_)) => {}
            }
            if session.pending() < MAX_BATCH {
                frame = stream.next().now_or_never();
                recv_ns = fleet.now_ns();
            }
        }
        if let Some(batch) = session.take_batch() {
            replica.apply(batch);
            session.store_committed()?;
        }
        seat.flush(&mut sink, &mut session).await?;
        if !batch_samples.is_empty() {
            let ack_ns = fleet.now_ns();
            samples.extend(batch_samples.drain(..).map(|s| Sample { ack_ns, ..s }));
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
}

/// What one fresh node saw of a full snapshot.
pub struct SnapshotRun {
    pub store_id: String,
    pub version: u64,
    /// The history chain at `version` (empty when the cloud sends none).
    pub chain: String,
    pub connect: Duration,
    /// From sending the sync request until the last chunk was received and every object in it
    /// parsed.
    pub sync: Duration,
    pub bytes: usize,
    pub chunks: usize,
    /// Parsed objects, ready for `MetaManager::replace_all`.
    pub objects: Vec<(ObjectKey, String)>,
    pub services: usize,
    pub nodes: usize,
    pub other: usize,
}

/// Connects one fresh node (no store id, version 0), receives the full snapshot and parses
/// every object into memory with `Object::from_json`; acks it and disconnects.
pub async fn snapshot_once(
    hub: SocketAddr,
    node: &str,
    token: &str,
    parse: bool,
    timeout: Duration,
) -> Result<SnapshotRun> {
    let t0 = Instant::now();
    let ws = connect(hub, node, token, timeout).await?;
    let connect_time = t0.elapsed();
    let (mut sink, mut stream) = ws.split();
    // Keepalives are not due within the run's timeout.
    let mut session = SyncSession::new(
        &session_config(node, timeout),
        SyncPoint::default(),
        tokio::time::Instant::now(),
    );
    let run = async {
        let start = Instant::now();
        transmit(&mut session, &mut sink).await?;
        let mut out = SnapshotRun {
            store_id: String::new(),
            version: 0,
            chain: String::new(),
            connect: connect_time,
            sync: Duration::ZERO,
            bytes: 0,
            chunks: 0,
            objects: Vec::new(),
            services: 0,
            nodes: 0,
            other: 0,
        };
        let done = loop {
            let frame = stream
                .next()
                .await
                .ok_or_else(|| anyhow!("the hub closed the connection during the snapshot"))??;
            let WsMessage::Text(text) = frame else {
                if let WsMessage::Close(cf) = frame {
                    bail!("the hub closed the connection during the snapshot: {cf:?}");
                }
                continue;
            };
            out.bytes += text.len();
            let received = session.handle(Message::from_json(text.as_str())?)?;
            while let Some(event) = session.poll_event() {
                if let SessionEvent::Answered(resp) = event {
                    if resp.mode != SyncMode::Snapshot {
                        bail!(
                            "a fresh node got a {} answer, not a snapshot",
                            resp.mode.as_str()
                        );
                    }
                    out.objects.reserve(resp.count.min(1 << 22) as usize);
                }
            }
            let Received::Snapshot { objects, complete } = received else {
                continue;
            };
            out.chunks += 1;
            for (key, object) in objects {
                if parse {
                    Object::from_json(key.kind, object.get())
                        .map_err(|e| anyhow!("snapshot object {key} does not parse: {e}"))?;
                }
                match key.kind {
                    edgehub::model::Kind::Service => out.services += 1,
                    edgehub::model::Kind::Node => out.nodes += 1,
                    _ => out.other += 1,
                }
                out.objects
                    .push((key, String::from(Box::<str>::from(object))));
            }
            if let Some(done) = complete {
                out.sync = start.elapsed();
                break done;
            }
        };
        out.store_id = done.store_id;
        out.version = done.version;
        out.chain = done.chain;
        // The objects are in memory, which is all this node's store is.
        session.store_committed()?;
        transmit(&mut session, &mut sink).await?;
        let _ = sink.send(WsMessage::Close(None)).await;
        anyhow::Ok(out)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| anyhow!("snapshot for node {node} timed out after {timeout:?}"))?
}

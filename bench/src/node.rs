//! A simulated edge node: one real websocket to the hub, authenticated with the node's own
//! token, speaking the sync protocol the way `edgehub::client` does (sync request, snapshot /
//! delta / live changes, one ack per received batch), but keeping its copy in memory only.
//!
//! Thousands of these run in one process, so the per-message work is kept small: one JSON parse
//! of the envelope (the content stays raw), no pretty-printing, no logging.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edgehub::message::{
    chain_next, group, module, op, resource, Ack, Message, SnapshotChunk, SyncMode, SyncRequest,
    SyncResponse,
};
use edgehub::model::{Object, ObjectKey, CLUSTER_SCOPE};
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

/// Most received messages handled (and acked) as one batch, as `edgehub::client` does.
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

pub fn sync_request(store_id: Option<String>, version: u64, chain: Option<&str>) -> String {
    SyncRequest {
        store_id,
        resource_version: version,
        chain: chain.unwrap_or_default().to_string(),
        labels: BTreeMap::new(),
        agent_version: concat!("edgemesh-bench/", env!("CARGO_PKG_VERSION")).to_string(),
    }
    .message()
    .to_json()
}

pub fn ack_message(version: u64) -> String {
    Ack::message(version).to_json()
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
    /// Keep the objects (resource → raw JSON); otherwise only count them.
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

struct Staged {
    version: u64,
    chain: String,
    entries: Vec<(String, Box<RawValue>)>,
    count: usize,
}

struct Change {
    version: u64,
    operation: &'static str,
    resource: String,
    /// The object; for a delete, the object as it was (it is part of the chain).
    body: Box<RawValue>,
}

struct State {
    store_id: Option<String>,
    snapshot: Option<Staged>,
    /// Version and chain a delta ends at.
    delta_target: Option<(u64, String)>,
    committed: u64,
    chain: String,
    synced: bool,
    objects: HashMap<String, Box<RawValue>>,
    count: usize,
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

async fn session(
    spec: NodeSpec,
    opts: &NodeOpts,
    fleet: &Fleet,
    mut permit: Option<OwnedSemaphorePermit>,
) -> Result<NodeReport> {
    let ws = tokio::select! {
        _ = fleet.stop.cancelled() => return Ok(NodeReport::default()),
        ws = connect(opts.hub, &spec.name, &spec.token, opts.connect_timeout) => ws?,
    };
    let (mut sink, mut stream) = ws.split();
    sink.send(WsMessage::text(sync_request(
        spec.store_id.clone(),
        spec.version,
        spec.chain.as_deref(),
    )))
    .await?;
    let mut st = State {
        store_id: None,
        snapshot: None,
        delta_target: None,
        committed: spec.version,
        chain: spec.chain.clone().unwrap_or_default(),
        synced: false,
        objects: HashMap::new(),
        count: 0,
    };
    let mut samples = Vec::new();
    // Spread keepalives over the interval so a large fleet does not send them in bursts.
    let period = opts.keepalive.max(Duration::from_millis(100));
    let offset =
        Duration::from_millis((spec.idx as u64).wrapping_mul(7919) % period.as_millis() as u64);
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + offset + period / 2, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keepalive_msg = Message::new(
        module::EDGEHUB,
        module::CLOUDHUB,
        group::HUB,
        op::KEEPALIVE,
        &format!("{CLUSTER_SCOPE}/node/{}", spec.name),
    )
    .to_json();
    let mut batch: Vec<Change> = Vec::new();
    let mut batch_samples: Vec<Sample> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = fleet.stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(WsMessage::Close(None))).await;
                return Ok(NodeReport {
                    samples,
                    objects: st.count,
                    version: st.committed,
                    chain: st.chain,
                });
            }
            _ = keepalive.tick() => {
                sink.send(WsMessage::text(keepalive_msg.clone())).await?;
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
                    let msg = Message::from_json(text.as_str())?;
                    let before = batch.len();
                    match handle(&mut st, opts, msg, &mut batch)? {
                        Handled::Snapshot => {
                            // A snapshot replaces everything before it.
                            batch.clear();
                            batch_samples.clear();
                            ack(&mut sink, fleet, spec.idx, st.committed).await?;
                            mark_synced(fleet, &mut st, &mut permit, 2);
                        }
                        Handled::Current => mark_synced(fleet, &mut st, &mut permit, 0),
                        Handled::Nothing => {
                            if opts.record && batch.len() > before {
                                if let Some(c) = batch.last() {
                                    batch_samples.push(Sample {
                                        version: c.version,
                                        recv_ns,
                                        ack_ns: 0,
                                    });
                                }
                            }
                        }
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
            if batch.len() < MAX_BATCH {
                frame = stream.next().now_or_never();
                recv_ns = fleet.now_ns();
            }
        }
        if !batch.is_empty() {
            let last = commit(&mut st, opts, &mut batch)?;
            ack(&mut sink, fleet, spec.idx, last).await?;
            if let Some((target, chain)) = st.delta_target.take_if(|(t, _)| last >= *t) {
                if last == target && !chain.is_empty() && chain != st.chain {
                    bail!("history mismatch at version {target}: the delta ended at another chain");
                }
                mark_synced(fleet, &mut st, &mut permit, 1);
            }
            if !batch_samples.is_empty() {
                let ack_ns = fleet.now_ns();
                samples.extend(batch_samples.drain(..).map(|s| Sample { ack_ns, ..s }));
            }
        }
        if let Some(e) = ended {
            return Err(e);
        }
    }
}

fn mark_synced(
    fleet: &Fleet,
    st: &mut State,
    permit: &mut Option<OwnedSemaphorePermit>,
    mode: usize,
) {
    if !st.synced {
        st.synced = true;
        fleet.modes[mode].fetch_add(1, Ordering::Relaxed);
        fleet.synced.fetch_add(1, Ordering::Release);
        permit.take();
    }
}

async fn ack(sink: &mut Sink, fleet: &Fleet, idx: usize, version: u64) -> Result<()> {
    sink.send(WsMessage::text(ack_message(version))).await?;
    if let Some(a) = fleet.acked.get(idx) {
        a.fetch_max(version, Ordering::Release);
    }
    Ok(())
}

enum Handled {
    Nothing,
    /// The node is up to date (sync answer `current`).
    Current,
    /// A snapshot completed and replaced the node's copy.
    Snapshot,
}

/// Handles one message; changes go into `batch`.
fn handle(
    st: &mut State,
    opts: &NodeOpts,
    msg: Message,
    batch: &mut Vec<Change>,
) -> Result<Handled> {
    match (msg.route.operation.as_str(), msg.route.resource.as_str()) {
        (op::RESPONSE, resource::SYNC) => {
            let resp: SyncResponse = msg.content_as()?;
            match resp.mode {
                SyncMode::Snapshot => {
                    st.snapshot = Some(Staged {
                        version: resp.to_version,
                        chain: resp.chain,
                        entries: Vec::new(),
                        count: 0,
                    })
                }
                SyncMode::Delta => st.delta_target = Some((resp.to_version, resp.chain)),
                SyncMode::Current => {
                    st.store_id = Some(resp.store_id);
                    return Ok(Handled::Current);
                }
            }
            st.store_id = Some(resp.store_id);
            Ok(Handled::Nothing)
        }
        (op::RESPONSE, resource::SNAPSHOT) => {
            let chunk: SnapshotChunk = msg.content_as()?;
            let staged = st
                .snapshot
                .as_mut()
                .ok_or_else(|| anyhow!("snapshot chunk without a sync answer"))?;
            staged.count += chunk.entries.len();
            if opts.keep_objects {
                staged
                    .entries
                    .extend(chunk.entries.into_iter().map(|e| (e.resource, e.object)));
            }
            if !chunk.last {
                return Ok(Handled::Nothing);
            }
            let staged = st.snapshot.take().ok_or_else(|| anyhow!("no snapshot"))?;
            st.objects = staged.entries.into_iter().collect();
            st.count = staged.count;
            st.committed = staged.version;
            st.chain = staged.chain;
            Ok(Handled::Snapshot)
        }
        (op::INSERT | op::UPDATE | op::DELETE, res) => {
            if st.store_id.is_none() || st.snapshot.is_some() {
                bail!("change {res} before the sync answer completed");
            }
            let version = msg.version()?;
            let operation = match msg.route.operation.as_str() {
                op::INSERT => op::INSERT,
                op::UPDATE => op::UPDATE,
                _ => op::DELETE,
            };
            let body = msg
                .content
                .ok_or_else(|| anyhow!("change {} has no content", msg.route.resource))?;
            batch.push(Change {
                version,
                operation,
                resource: msg.route.resource,
                body,
            });
            Ok(Handled::Nothing)
        }
        _ => Ok(Handled::Nothing), // keepalives and anything unknown
    }
}

/// Applies a batch to the in-memory copy (skipping redelivered versions); returns the new
/// committed version.
fn commit(st: &mut State, opts: &NodeOpts, batch: &mut Vec<Change>) -> Result<u64> {
    for c in batch.drain(..) {
        if c.version <= st.committed {
            continue; // redelivery
        }
        if c.version != st.committed + 1 {
            bail!(
                "change {} has version {}, but the node is at {}: a change is missing",
                c.resource,
                c.version,
                st.committed
            );
        }
        st.committed = c.version;
        st.chain = chain_next(&st.chain, c.version, c.operation, &c.resource, c.body.get());
        if c.operation == op::DELETE {
            let existed = if opts.keep_objects {
                st.objects.remove(&c.resource).is_some()
            } else {
                true
            };
            if existed {
                st.count = st.count.saturating_sub(1);
            }
        } else if opts.keep_objects {
            if st.objects.insert(c.resource, c.body).is_none() {
                st.count += 1;
            }
        } else if c.operation == op::INSERT {
            st.count += 1;
        }
    }
    Ok(st.committed)
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
    let request = sync_request(None, 0, None);
    let run = async {
        let start = Instant::now();
        sink.send(WsMessage::text(request)).await?;
        let mut store_id = None;
        let mut version = None;
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
        loop {
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
            let msg = Message::from_json(text.as_str())?;
            match (msg.operation(), msg.resource()) {
                (op::RESPONSE, resource::SYNC) => {
                    let resp: SyncResponse = msg.content_as()?;
                    if resp.mode != SyncMode::Snapshot {
                        bail!(
                            "a fresh node got a {} answer, not a snapshot",
                            resp.mode.as_str()
                        );
                    }
                    out.objects.reserve(resp.count.min(1 << 22) as usize);
                    out.chain = resp.chain;
                    store_id = Some(resp.store_id);
                    version = Some(resp.to_version);
                }
                (op::RESPONSE, resource::SNAPSHOT) => {
                    if version.is_none() {
                        bail!("snapshot chunk before the sync answer");
                    }
                    out.chunks += 1;
                    let chunk: SnapshotChunk = msg.content_as()?;
                    for entry in chunk.entries {
                        let key = ObjectKey::parse_resource(&entry.resource).ok_or_else(|| {
                            anyhow!("snapshot entry with invalid resource {:?}", entry.resource)
                        })?;
                        if parse {
                            Object::from_json(key.kind, entry.object.get()).map_err(|e| {
                                anyhow!("snapshot object {} does not parse: {e}", entry.resource)
                            })?;
                        }
                        match key.kind {
                            edgehub::model::Kind::Service => out.services += 1,
                            edgehub::model::Kind::Node => out.nodes += 1,
                            _ => out.other += 1,
                        }
                        out.objects.push((key, String::from(entry.object.get())));
                    }
                    if chunk.last {
                        out.sync = start.elapsed();
                        break;
                    }
                }
                _ => {}
            }
        }
        out.store_id = store_id.unwrap_or_default();
        out.version = version.unwrap_or_default();
        sink.send(WsMessage::text(ack_message(out.version))).await?;
        let _ = sink.send(WsMessage::Close(None)).await;
        anyhow::Ok(out)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| anyhow!("snapshot for node {node} timed out after {timeout:?}"))?
}

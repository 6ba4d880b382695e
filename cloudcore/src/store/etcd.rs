//! The store on etcd: several cloudcore replicas share one etcd cluster.
//!
//! Layout under `store.etcd.prefix` (P):
//!
//! | key | value |
//! |---|---|
//! | `P meta/store_id` | the store's random identity |
//! | `P meta/head` | `VERSION CHAIN`: the last committed version and the history chain there |
//! | `P obj/KIND/NS/NAME` | `VERSION\n` + the object's canonical JSON |
//! | `P log/FIRST` (20 digits) | the changes of one write, as JSON, for resuming nodes |
//! | `P token/NODE` | SHA-256 of the node's token |
//! | `P router/KIND/ID` | a rule endpoint or rule |
//! | `P presence/…`, `P replica/…`, `P stats/…` | the replicas' runtime state (see `cluster`) |
//!
//! Every write of objects is one transaction that compares `meta/head` with the revision this
//! replica last saw and, in the same step, writes the objects, their change record and the
//! new head. Versions therefore stay dense and the history chain single, whichever replica
//! writes: a replica that lost the race catches up and plans again. Reads never go to etcd:
//! one watch per replica keeps a mirror of everything under P (objects, the recent changes,
//! tokens, router records, presence), and a write returns once the mirror has it, so a
//! replica reads its own writes. A compacted or broken watch lists everything again.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use edgehub::model::{Kind, ObjectKey};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    plan, Change, ChangeOp, Recent, Record, RouterKind, Since, Snapshot, Store, StoreError, View,
    Write,
};
use crate::config::EtcdConfig;

/// Keys of one family of the replicas' runtime state, mirrored for the `cluster` module.
pub const CLUSTER_FAMILIES: [&str; 3] = ["presence/", "replica/", "stats/"];

/// Keys fetched per page when listing: pages keep each answer far below gRPC's 4 MiB.
const PAGE: i64 = 256;

/// Bytes a transaction costs beyond its keys and values (headers, compares, framing).
const TXN_OVERHEAD: usize = 4096;

/// Per-operation framing in a transaction.
const OP_OVERHEAD: usize = 32;

/// One change as its log record keeps it.
#[derive(Serialize, Deserialize)]
struct LogEntry {
    v: u64,
    op: String,
    kind: String,
    ns: String,
    name: String,
    chain: String,
    body: String,
}

/// What a replica knows of the store: everything under the prefix, as of `revision`.
#[derive(Default)]
struct Mirror {
    /// etcd revision this mirror reflects.
    revision: i64,
    /// Revision at which `meta/head` was last written (what a write compares against).
    head_rev: i64,
    version: u64,
    chain: String,
    objects: BTreeMap<(String, String, String), Record>,
    recent: Recent,
    tokens: BTreeMap<String, String>,
    /// Router records with the revision they were last written at (for compare-and-swap).
    router: BTreeMap<(String, String), (String, i64)>,
    /// Keys (relative to the prefix) of the families in [`CLUSTER_FAMILIES`].
    cluster: BTreeMap<String, Bytes>,
}

impl View for Mirror {
    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
        Ok(self.objects.get(&tuple(key)).cloned())
    }

    fn has_token(&self, node: &str) -> Result<bool, StoreError> {
        Ok(self.tokens.contains_key(node))
    }
}

fn tuple(key: &ObjectKey) -> (String, String, String) {
    (
        key.kind.resource_type().to_string(),
        key.namespace.clone(),
        key.name.clone(),
    )
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

struct Inner {
    client: Client,
    prefix: String,
    cfg: EtcdConfig,
    history: usize,
    history_bytes: usize,
    store_id: String,
    mirror: RwLock<Mirror>,
    version: watch::Sender<u64>,
    /// The etcd revision the mirror reflects, for writers waiting to read their write.
    revision: watch::Sender<i64>,
    tokens: watch::Sender<u64>,
    router: watch::Sender<u64>,
    cluster: watch::Sender<u64>,
    /// Whether the watch is running (cleared while it is broken).
    watching: AtomicBool,
    /// Why the watch last failed, for `/readyz`.
    watch_error: Mutex<Option<String>>,
}

pub struct EtcdStore {
    inner: Arc<Inner>,
    /// The runtime etcd's client and watch run on: the `Store` methods are synchronous and
    /// may be called from any thread, also one of the main runtime's own.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime may not block inside another one.
            rt.shutdown_background();
        }
    }
}

/// The client options: TLS from the config, and keepalives that notice a dead member within
/// seconds so the watch moves to another one.
fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if cfg.endpoints.iter().any(|e| e.starts_with("https://")) {
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: format!("config key `{key}`: {e}"),
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &cfg.ca_cert {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(
                "store.etcd.ca_cert",
                ca,
            )?));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("store.etcd.cert", cert)?,
                read("store.etcd.key", key)?,
            ));
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

impl EtcdStore {
    /// Connects, creates the store's identity on first use, lists everything and starts the
    /// watch. Fails when etcd does not answer within `store.etcd.startup_timeout`.
    pub fn open(
        cfg: &EtcdConfig,
        history: usize,
        history_bytes: usize,
    ) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start etcd's runtime: {e}")))?;
        let mut prefix = cfg.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let opts = connect_options(cfg)?;
        let cfg = cfg.clone();
        let inner = runtime.block_on(async move {
            let client = Client::connect(&cfg.endpoints, Some(opts))
                .await
                .map_err(|e| StoreError::Unavailable(format!("config key `store.etcd.endpoints`: {e}")))?;
            let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
            let store_id = loop {
                match init_identity(&client, &prefix, cfg.request_timeout).await {
                    Ok(id) => break id,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        debug!(error = %e, "etcd not answering yet");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        return Err(StoreError::Unavailable(format!(
                            "config key `store.etcd.endpoints`: no answer from {} within {:?} (store.etcd.startup_timeout): {e}",
                            cfg.endpoints.join(", "),
                            cfg.startup_timeout
                        )))
                    }
                }
            };
            let inner = Arc::new(Inner {
                client,
                prefix,
                cfg,
                history: history.max(1),
                history_bytes,
                store_id,
                mirror: RwLock::new(Mirror::default()),
                version: watch::Sender::new(0),
                revision: watch::Sender::new(0),
                tokens: watch::Sender::new(0),
                router: watch::Sender::new(0),
                cluster: watch::Sender::new(0),
                watching: AtomicBool::new(false),
                watch_error: Mutex::new(None),
            });
            while let Err(e) = inner.relist().await {
                if tokio::time::Instant::now() >= deadline {
                    return Err(StoreError::Unavailable(format!(
                        "config key `store.etcd.endpoints`: cannot list the store: {e}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tokio::spawn(inner.clone().follow());
            Ok::<_, StoreError>(inner)
        })?;
        info!(
            version = inner.mirror().version,
            store_id = %inner.store_id,
            "etcd store open"
        );
        Ok(EtcdStore {
            inner,
            runtime: Some(runtime),
        })
    }

    /// Runs `fut` on etcd's runtime and waits for it from this (any) thread.
    fn call<T>(&self, fut: impl Future<Output = T> + Send + 'static) -> T
    where
        T: From<StoreErrorOnPanic> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let Some(rt) = &self.runtime else {
            return T::from(StoreErrorOnPanic);
        };
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| T::from(StoreErrorOnPanic))
    }

    /// Runs `fut` on etcd's runtime, awaited from any runtime (for the `cluster` module).
    pub fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<T>> {
        self.runtime.as_ref().map(|rt| rt.spawn(fut))
    }

    /// A client for the `cluster` module's leases and presence keys; use it on [`Self::spawn`].
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The full key of `rel` under the prefix.
    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.inner.prefix)
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.cfg.request_timeout
    }

    /// Changes whenever a key of [`CLUSTER_FAMILIES`] changes.
    pub fn subscribe_cluster(&self) -> watch::Receiver<u64> {
        self.inner.cluster.subscribe()
    }

    /// The mirrored keys of one family (relative key without the family, value, lease).
    pub fn cluster_entries(&self, family: &str) -> Vec<(String, Bytes)> {
        let m = self.inner.mirror();
        m.cluster
            .range(family.to_string()..)
            .take_while(|(k, _)| k.starts_with(family))
            .map(|(k, v)| (k[family.len()..].to_string(), v.clone()))
            .collect()
    }

    /// Whether the watch is running.
    pub fn watching(&self) -> bool {
        self.inner.watching.load(Ordering::Acquire)
    }
}

/// What a synchronous call answers when etcd's runtime is gone (only while shutting down).
struct StoreErrorOnPanic;

impl<T> From<StoreErrorOnPanic> for Result<T, StoreError> {
    fn from(_: StoreErrorOnPanic) -> Self {
        Err(StoreError::Unavailable("etcd's runtime has stopped".into()))
    }
}

/// Longest one attempt of a request may take before it is sent again (to another member).
const ATTEMPT: Duration = Duration::from_secs(2);

/// Whether a failed request may be sent again: the member was unreachable or went away. Every
/// request of this store is safe to repeat: writes compare the head they were planned on, so a
/// repeat of one that landed fails its compare and the writer finds its own change.
fn retryable(e: &etcd_client::Error) -> bool {
    // gRPC codes: 2 unknown, 4 deadline exceeded, 14 unavailable.
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(i32::from(s.code()), 2 | 4 | 14),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Runs `op` until it answers or `within` is spent, sending it again after errors that say a
/// member was down or unreachable (the client's balancer keeps trying a dead member for a
/// while) and after attempts that hang.
async fn retrying<T, F, Fut>(within: Duration, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left.min(ATTEMPT), op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if retryable(&e) => e.to_string(),
            Ok(Err(e)) => return Err(etcd_err(e)),
            Err(_) => format!("no answer within {:?}", left.min(ATTEMPT)),
        };
        if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline {
            return Err(StoreError::Unavailable(format!(
                "etcd did not answer within {within:?}: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One transaction, sent again while members are unreachable (see [`retrying`]).
async fn send_txn(
    client: &Client,
    within: Duration,
    txn: etcd_client::Txn,
) -> Result<etcd_client::TxnResponse, StoreError> {
    retrying(within, || {
        let txn = txn.clone();
        let mut kv = client.kv_client();
        async move { kv.txn(txn).await }
    })
    .await
}

/// The store id, created together with an empty head by the first replica ever to start.
async fn init_identity(
    client: &Client,
    prefix: &str,
    timeout: Duration,
) -> Result<String, StoreError> {
    let id_key = format!("{prefix}meta/store_id");
    let head_key = format!("{prefix}meta/head");
    let new_id = edgehub::message::new_message_id();
    let txn = etcd_client::Txn::new()
        .when([Compare::create_revision(
            id_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(id_key.clone(), new_id.clone(), None),
            TxnOp::put(head_key, "0 ", None),
        ])
        .or_else([TxnOp::get(id_key, None)]);
    let resp = send_txn(client, timeout, txn).await?;
    if resp.succeeded() {
        info!(store_id = %new_id, "created a new store in etcd");
        return Ok(new_id);
    }
    for r in resp.op_responses() {
        if let etcd_client::TxnOpResponse::Get(g) = r {
            if let Some(kv) = g.kvs().first() {
                return Ok(String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
    }
    Err(StoreError::Corrupt {
        key: "meta/store_id".into(),
        reason: "exists but cannot be read".into(),
    })
}

/// `VERSION CHAIN` of `meta/head`.
fn parse_head(value: &[u8]) -> Result<(u64, String), StoreError> {
    let text = String::from_utf8_lossy(value);
    let (v, chain) = text.split_once(' ').unwrap_or((&text, ""));
    let v = v.parse().map_err(|_| StoreError::Corrupt {
        key: "meta/head".into(),
        reason: format!("{text:?} is not VERSION CHAIN"),
    })?;
    Ok((v, chain.to_string()))
}

/// `VERSION\nJSON` of an object key.
fn parse_object(rel: &str, value: &[u8]) -> Result<Record, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: rel.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = rel.splitn(3, '/');
    let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(corrupt("not KIND/NS/NAME"));
    };
    let kind = Kind::from_resource_type(kind).ok_or_else(|| corrupt("unknown kind"))?;
    let text = std::str::from_utf8(value).map_err(|_| corrupt("not UTF-8"))?;
    let (v, json) = text.split_once('\n').ok_or_else(|| corrupt("no version"))?;
    Ok(Record {
        key: ObjectKey::new(kind, ns, name),
        version: v.parse().map_err(|_| corrupt("bad version"))?,
        json: json.into(),
    })
}

fn parse_log(rel: &str, value: &[u8]) -> Result<Vec<Change>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: rel.to_string(),
        reason,
    };
    let entries: Vec<LogEntry> =
        serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
    entries
        .into_iter()
        .map(|e| {
            let kind = Kind::from_resource_type(&e.kind)
                .ok_or_else(|| corrupt(format!("unknown kind {}", e.kind)))?;
            Ok(Change {
                version: e.v,
                op: ChangeOp::parse(&e.op)
                    .ok_or_else(|| corrupt(format!("unknown op {}", e.op)))?,
                key: ObjectKey::new(kind, e.ns, e.name),
                json: e.body.into(),
                chain: e.chain,
                wire: Default::default(),
            })
        })
        .collect()
}

/// Appends a write's changes to the mirror's log if they continue it; false on a gap.
fn extend_log(recent: &mut Recent, changes: Vec<Change>, max: usize, bytes: usize) -> bool {
    for c in changes {
        let (last, _) = recent.head();
        if !recent.is_empty() && c.version <= last {
            continue; // already applied (a relist raced the watch)
        }
        if !recent.is_empty() && c.version != last + 1 {
            return false;
        }
        recent.push(Arc::new(c), max, bytes);
    }
    true
}

/// The end of the range of keys starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Inner {
    fn mirror(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.mirror.read().unwrap_or_else(|p| p.into_inner())
    }

    fn mirror_mut(&self) -> std::sync::RwLockWriteGuard<'_, Mirror> {
        self.mirror.write().unwrap_or_else(|p| p.into_inner())
    }

    fn rel<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }

    /// Reads everything under the prefix at one revision, page by page, and replaces the
    /// mirror with it.
    async fn relist(&self) -> Result<(), StoreError> {
        let kv = self.client.kv_client();
        let end = range_end(&self.prefix);
        let mut start = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut fresh = Mirror::default();
        let mut log: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = retrying(self.cfg.request_timeout, || {
                let (start, opts, mut kv) = (start.clone(), opts.clone(), kv.clone());
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for item in resp.kvs() {
                let Some(rel) = self.rel(item.key()) else {
                    continue;
                };
                if rel.starts_with("log/") {
                    log.push((rel.to_string(), item.value().to_vec()));
                } else {
                    self.apply_put(&mut fresh, rel, item)?;
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        // The log's contiguous tail that ends at the head: what resuming nodes may get.
        let mut batches = Vec::new();
        for (rel, value) in &log {
            match parse_log(rel, value) {
                Ok(changes) => batches.push(changes),
                Err(e) => {
                    warn!(error = %e, "unreadable change record; nodes behind it get a snapshot")
                }
            }
        }
        let mut changes: Vec<Change> = batches.into_iter().flatten().collect();
        changes.retain(|c| c.version <= fresh.version);
        let mut keep = changes.len();
        let mut expected = fresh.version;
        while keep > 0 && expected > 0 && changes[keep - 1].version == expected {
            keep -= 1;
            expected -= 1;
        }
        for c in changes.drain(..).skip(keep) {
            fresh
                .recent
                .push(Arc::new(c), self.history, self.history_bytes);
        }
        fresh.revision = revision;
        let count = fresh.objects.len();
        let version = fresh.version;
        *self.mirror_mut() = fresh;
        self.publish(true, true, true);
        info!(revision, version, objects = count, "etcd store listed");
        Ok(())
    }

    /// Puts one listed or watched key (other than the log) into `m`.
    fn apply_put(&self, m: &mut Mirror, rel: &str, item: &KeyValue) -> Result<(), StoreError> {
        if rel == "meta/head" {
            let (version, chain) = parse_head(item.value())?;
            m.version = version;
            m.chain = chain;
            m.head_rev = item.mod_revision();
        } else if let Some(obj) = rel.strip_prefix("obj/") {
            let rec = parse_object(obj, item.value())?;
            m.objects.insert(tuple(&rec.key), rec);
        } else if let Some(node) = rel.strip_prefix("token/") {
            m.tokens.insert(
                node.to_string(),
                String::from_utf8_lossy(item.value()).into_owned(),
            );
        } else if let Some((kind, id)) = rel.strip_prefix("router/").and_then(|r| r.split_once('/'))
        {
            m.router.insert(
                (kind.to_string(), id.to_string()),
                (
                    String::from_utf8_lossy(item.value()).into_owned(),
                    item.mod_revision(),
                ),
            );
        } else if CLUSTER_FAMILIES.iter().any(|f| rel.starts_with(f)) {
            m.cluster
                .insert(rel.to_string(), Bytes::copy_from_slice(item.value()));
        }
        Ok(())
    }

    fn publish(&self, tokens: bool, router: bool, cluster: bool) {
        let (version, revision) = {
            let m = self.mirror();
            (m.version, m.revision)
        };
        self.version.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
        if tokens {
            self.tokens.send_modify(|g| *g += 1);
        }
        if router {
            self.router.send_modify(|g| *g += 1);
        }
        if cluster {
            self.cluster.send_modify(|g| *g += 1);
        }
        self.revision.send_if_modified(|r| {
            let changed = *r < revision;
            *r = (*r).max(revision);
            changed
        });
    }

    fn set_watch_error(&self, e: Option<String>) {
        self.watching.store(e.is_none(), Ordering::Release);
        *self.watch_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// The one watch of this replica, for ever: re-established after errors (from where it
    /// stopped), and preceded by a fresh list when etcd compacted past that point.
    async fn follow(self: Arc<Self>) {
        let mut relist = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            if relist {
                if let Err(e) = self.relist().await {
                    self.set_watch_error(Some(e.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                relist = false;
            }
            match self.watch_once().await {
                Ok(()) => {}
                Err(WatchEnd::Compacted(rev)) => {
                    warn!(
                        compacted = rev,
                        "the watch fell behind etcd's compaction; listing again"
                    );
                    relist = true;
                }
                Err(WatchEnd::Gap) => {
                    warn!("the change log has a gap; listing again");
                    relist = true;
                }
                Err(WatchEnd::Failed(e)) => {
                    debug!(error = %e, "etcd watch broke");
                    self.set_watch_error(Some(e));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
            backoff = Duration::from_millis(100);
        }
    }

    async fn watch_once(&self) -> Result<(), WatchEnd> {
        let from = self.mirror().revision + 1;
        let opts = WatchOptions::new()
            .with_range(range_end(&self.prefix))
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = self
            .client
            .watch_client()
            .max_decoding_message_size(64 << 20)
            .watch(self.prefix.clone(), Some(opts))
            .await
            .map_err(|e| WatchEnd::Failed(e.to_string()))?;
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(WatchEnd::Failed("the watch stream ended".into())),
                Err(e) => return Err(WatchEnd::Failed(e.to_string())),
            };
            if resp.compact_revision() > 0 {
                return Err(WatchEnd::Compacted(resp.compact_revision()));
            }
            if resp.canceled() {
                return Err(WatchEnd::Failed(format!(
                    "watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            self.set_watch_error(None);
            let header_rev = resp.header().map_or(0, |h| h.revision());
            if resp.events().is_empty() {
                // A progress notification: nothing under the prefix changed up to there.
                if header_rev > 0 && !resp.created() {
                    let mut m = self.mirror_mut();
                    m.revision = m.revision.max(header_rev);
                    drop(m);
                    self.publish(false, false, false);
                }
                continue;
            }
            self.apply_events(resp.events())?;
        }
    }

    fn apply_events(&self, events: &[etcd_client::Event]) -> Result<(), WatchEnd> {
        let (mut tokens, mut router, mut cluster) = (false, false, false);
        {
            let mut m = self.mirror_mut();
            for ev in events {
                let Some(item) = ev.kv() else { continue };
                let Some(rel) = self.rel(item.key()) else {
                    continue;
                };
                tokens |= rel.starts_with("token/");
                router |= rel.starts_with("router/");
                cluster |= CLUSTER_FAMILIES.iter().any(|f| rel.starts_with(f));
                match ev.event_type() {
                    EventType::Put if rel.starts_with("log/") => match parse_log(rel, item.value())
                    {
                        Ok(changes) => {
                            if !extend_log(&mut m.recent, changes, self.history, self.history_bytes)
                            {
                                return Err(WatchEnd::Gap);
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "unreadable change record");
                            return Err(WatchEnd::Gap);
                        }
                    },
                    EventType::Put => {
                        if let Err(e) = self.apply_put(&mut m, rel, item) {
                            warn!(key = rel, error = %e, "unreadable key in etcd; ignored");
                        }
                    }
                    EventType::Delete => {
                        if let Some(obj) = rel.strip_prefix("obj/") {
                            let mut parts = obj.splitn(3, '/');
                            if let (Some(k), Some(ns), Some(name)) =
                                (parts.next(), parts.next(), parts.next())
                            {
                                m.objects.remove(&(
                                    k.to_string(),
                                    ns.to_string(),
                                    name.to_string(),
                                ));
                            }
                        } else if let Some(node) = rel.strip_prefix("token/") {
                            m.tokens.remove(node);
                        } else if let Some((kind, id)) =
                            rel.strip_prefix("router/").and_then(|r| r.split_once('/'))
                        {
                            m.router.remove(&(kind.to_string(), id.to_string()));
                        } else {
                            m.cluster.remove(rel);
                        }
                    }
                }
                m.revision = m.revision.max(item.mod_revision());
            }
            // Head and log move in one transaction; a head the log does not reach is a gap.
            if !m.recent.is_empty() && m.recent.head().0 != m.version {
                return Err(WatchEnd::Gap);
            }
        }
        self.publish(tokens, router, cluster);
        Ok(())
    }

    /// Waits until the mirror reflects `revision` (a write's own), bounded.
    async fn caught_up(&self, revision: i64) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(self.cfg.request_timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn txn_too_large(&self, ops: usize, bytes: usize) -> Option<StoreError> {
        let (max_ops, max_bytes) = (self.cfg.max_txn_ops, self.cfg.max_txn_bytes);
        if ops > max_ops {
            return Some(StoreError::TooLarge(format!(
                "this write needs {ops} etcd operations; one etcd transaction takes at most {max_ops} (etcd --max-txn-ops, store.etcd.max_txn_ops): apply fewer objects at once"
            )));
        }
        if bytes > max_bytes {
            return Some(StoreError::TooLarge(format!(
                "this write is {bytes} bytes in etcd (objects and their change records); one etcd transaction takes at most {max_bytes} (etcd --max-request-bytes, store.etcd.max_txn_bytes): apply fewer or smaller objects at once"
            )));
        }
        None
    }

    /// One try at committing `changes` on top of the head this replica saw (`head_rev`);
    /// when the head moved (or a guarded token went), the mirror has caught up before this
    /// returns.
    async fn commit(
        &self,
        head_rev: i64,
        changes: &[Change],
        guards: &[String],
    ) -> Result<Commit, StoreError> {
        let p = &self.prefix;
        let head_key = format!("{p}meta/head");
        let mut compares = vec![Compare::mod_revision(
            head_key.clone(),
            CompareOp::Equal,
            head_rev,
        )];
        for node in guards {
            compares.push(Compare::version(
                format!("{p}token/{node}"),
                CompareOp::Greater,
                0,
            ));
        }
        let mut ops = Vec::with_capacity(changes.len() + 3);
        let mut bytes = TXN_OVERHEAD;
        let mut log = Vec::with_capacity(changes.len());
        for c in changes {
            let key = format!(
                "{p}obj/{}/{}/{}",
                c.key.kind.resource_type(),
                c.key.namespace,
                c.key.name
            );
            bytes += key.len() + OP_OVERHEAD;
            if c.op == ChangeOp::Delete {
                ops.push(TxnOp::delete(key, None));
            } else {
                let value = format!("{}\n{}", c.version, c.json);
                bytes += value.len();
                ops.push(TxnOp::put(key, value, None));
            }
            log.push(LogEntry {
                v: c.version,
                op: c.op.as_str().to_string(),
                kind: c.key.kind.resource_type().to_string(),
                ns: c.key.namespace.clone(),
                name: c.key.name.clone(),
                chain: c.chain.clone(),
                body: c.json.to_string(),
            });
        }
        let (first, last) = match (changes.first(), changes.last()) {
            (Some(f), Some(l)) => (f.version, l),
            _ => return Ok(Commit::At(self.mirror().revision)),
        };
        let log = serde_json::to_vec(&log).map_err(|e| StoreError::Corrupt {
            key: "log".into(),
            reason: e.to_string(),
        })?;
        bytes += log.len() + 64;
        ops.push(TxnOp::put(format!("{p}log/{first:020}"), log, None));
        ops.push(TxnOp::put(
            head_key.clone(),
            format!("{} {}", last.version, last.chain),
            None,
        ));
        let floor = last.version.saturating_sub(self.history as u64);
        if floor > 0 {
            ops.push(TxnOp::delete(
                format!("{p}log/"),
                Some(DeleteOptions::new().with_range(format!("{p}log/{:020}", floor + 1))),
            ));
        }
        if let Some(e) = self.txn_too_large(ops.len(), bytes) {
            return Err(e);
        }
        let txn = etcd_client::Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(head_key, None)]);
        let sends = std::sync::atomic::AtomicUsize::new(0);
        let resp = retrying(self.cfg.request_timeout, || {
            sends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let txn = txn.clone();
            let mut kv = self.client.kv_client();
            async move { kv.txn(txn).await }
        })
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if !resp.succeeded() {
            // Someone else wrote first: plan again once the mirror has their write.
            self.caught_up(revision).await;
            return Ok(Commit::HeadMoved {
                resent: sends.load(std::sync::atomic::Ordering::Relaxed) > 1,
            });
        }
        Ok(Commit::At(revision))
    }

    /// A plain put or delete of a key outside the versioned objects, read back through the
    /// mirror before it returns.
    async fn put_plain(&self, key: String, value: Option<String>) -> Result<bool, StoreError> {
        let kv = self.client.kv_client();
        let timeout = self.cfg.request_timeout;
        let (revision, existed) = match value {
            Some(v) => {
                let r = retrying(timeout, || {
                    let (key, v, mut kv) = (key.clone(), v.clone(), kv.clone());
                    async move { kv.put(key, v, None).await }
                })
                .await?;
                (r.header().map_or(0, |h| h.revision()), true)
            }
            None => {
                let r = retrying(timeout, || {
                    let (key, mut kv) = (key.clone(), kv.clone());
                    async move { kv.delete(key, None).await }
                })
                .await?;
                (r.header().map_or(0, |h| h.revision()), r.deleted() > 0)
            }
        };
        self.caught_up(revision).await;
        Ok(existed)
    }
}

/// How one try at a write ended.
enum Commit {
    /// Committed at this etcd revision.
    At(i64),
    /// The head had moved. `resent`: the transaction was sent more than once (an answer was
    /// lost), so the write that moved the head may have been this one.
    HeadMoved { resent: bool },
}

enum WatchEnd {
    Compacted(i64),
    Gap,
    Failed(String),
}

/// Tries a write takes before it gives up to a write storm of other replicas (each try
/// catches up first, so this is only reached under sustained contention).
const WRITE_ATTEMPTS: usize = 64;

impl EtcdStore {
    /// The mirror's changes at the planned versions, if they carry the planned chains (so are
    /// this write's own, committed by an earlier send).
    fn landed(&self, planned: &[(u64, String)]) -> Option<Vec<Arc<Change>>> {
        let (first, last) = (planned.first()?.0, planned.last()?.0);
        let m = self.inner.mirror();
        let kept = m.recent.range(first, last)?;
        kept.iter()
            .zip(planned)
            .all(|(c, (v, chain))| c.version == *v && c.chain == *chain)
            .then_some(kept)
    }
}

impl Store for EtcdStore {
    fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    fn version(&self) -> u64 {
        *self.inner.version.borrow()
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError> {
        self.inner.mirror().get(key)
    }

    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Record>, StoreError> {
        let m = self.inner.mirror();
        let k = kind.resource_type().to_string();
        Ok(m.objects
            .range((k.clone(), String::new(), String::new())..)
            .take_while(|((kk, _, _), _)| *kk == k)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|want| want == ns))
            .map(|(_, r)| r.clone())
            .collect())
    }

    fn write_at(
        &self,
        base: Option<u64>,
        writes: Vec<Write>,
    ) -> Result<Vec<Arc<Change>>, StoreError> {
        let guards: Vec<String> = writes
            .iter()
            .filter_map(|w| match w {
                Write::RequireToken { node } => Some(node.clone()),
                _ => None,
            })
            .collect();
        for _ in 0..WRITE_ATTEMPTS {
            let (changes, head_rev) = {
                let m = self.inner.mirror();
                if let Some(base) = base.filter(|b| *b != m.version) {
                    return Err(StoreError::Stale {
                        base,
                        actual: m.version,
                    });
                }
                (plan(&*m, writes.clone(), m.version, &m.chain)?, m.head_rev)
            };
            if changes.is_empty() {
                return Ok(Vec::new());
            }
            let planned: Vec<(u64, String)> = changes
                .iter()
                .map(|c| (c.version, c.chain.clone()))
                .collect();
            let inner = self.inner.clone();
            let guards = guards.clone();
            let result = self.call(async move {
                let committed = inner.commit(head_rev, &changes, &guards).await?;
                if let Commit::At(rev) = committed {
                    // Read-your-writes: the caller and the hub see the change once this returns.
                    if !inner.caught_up(rev).await {
                        warn!(
                            revision = rev,
                            "committed, but the watch has not delivered it yet"
                        );
                    }
                }
                Ok::<_, StoreError>(match committed {
                    Commit::At(_) => Ok(changes),
                    Commit::HeadMoved { resent } => Err(resent),
                })
            });
            match result {
                Ok(Ok(changes)) => return Ok(changes.into_iter().map(Arc::new).collect()),
                Ok(Err(resent)) => {
                    // A compare that failed because an earlier send of this very write landed
                    // (its answer was lost): the mirror now holds exactly these changes. Only
                    // then: another replica's identical write (the same delete) has the same
                    // versions and chain, and is not this one.
                    if resent {
                        if let Some(mine) = self.landed(&planned) {
                            return Ok(mine);
                        }
                    }
                    continue;
                }
                Err(e) => {
                    if matches!(e, StoreError::Unavailable(_)) {
                        metrics::counter!("cloudcore_store_write_errors_total").increment(1);
                    }
                    return Err(e);
                }
            }
        }
        let actual = self.version();
        Err(StoreError::Stale {
            base: base.unwrap_or(actual),
            actual,
        })
    }

    fn changes_since(&self, version: u64, chain: Option<&str>) -> Since {
        let m = self.inner.mirror();
        m.recent.since(version, chain, m.version, &m.chain)
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let m = self.inner.mirror();
        Ok(Snapshot {
            store_id: self.inner.store_id.clone(),
            version: m.version,
            chain: m.chain.clone(),
            records: m.objects.values().cloned().collect(),
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    fn subscribe_tokens(&self) -> watch::Receiver<u64> {
        self.inner.tokens.subscribe()
    }

    /// Every replica writes tokens.
    fn tokens_change_elsewhere(&self) -> bool {
        true
    }

    fn subscribe_router(&self) -> watch::Receiver<u64> {
        self.inner.router.subscribe()
    }

    fn kept_changes(&self) -> Vec<Arc<Change>> {
        self.inner.mirror().recent.all()
    }

    fn restore(&self, dump: &super::export::Dump) -> Result<(), StoreError> {
        if dump.changes.is_empty() && dump.version > 0 {
            return Err(StoreError::Open {
                path: self.inner.prefix.clone(),
                reason: "the dump has no change history; export it again from a running store"
                    .into(),
            });
        }
        let p = self.inner.prefix.clone();
        let mut puts: Vec<(String, String)> = Vec::new();
        for r in &dump.records {
            let k = &r.key;
            puts.push((
                format!(
                    "{p}obj/{}/{}/{}",
                    k.kind.resource_type(),
                    k.namespace,
                    k.name
                ),
                format!("{}\n{}", r.version, r.json),
            ));
        }
        for c in &dump.changes {
            let entry = [LogEntry {
                v: c.version,
                op: c.op.as_str().to_string(),
                kind: c.key.kind.resource_type().to_string(),
                ns: c.key.namespace.clone(),
                name: c.key.name.clone(),
                chain: c.chain.clone(),
                body: c.json.to_string(),
            }];
            let json = serde_json::to_string(&entry).map_err(|e| StoreError::Corrupt {
                key: "log".into(),
                reason: e.to_string(),
            })?;
            puts.push((format!("{p}log/{:020}", c.version), json));
        }
        for (node, hash) in &dump.tokens {
            puts.push((format!("{p}token/{node}"), hash.clone()));
        }
        for (kind, id, json) in &dump.router {
            puts.push((format!("{p}router/{}/{id}", kind.as_str()), json.clone()));
        }
        let inner = self.inner.clone();
        let (store_id, head) = (
            dump.store_id.clone(),
            format!("{} {}", dump.version, dump.chain),
        );
        self.call(async move {
            let (max_ops, max_bytes) = (
                inner.cfg.max_txn_ops.max(2) - 1,
                inner.cfg.max_txn_bytes / 2,
            );
            let mut batch: Vec<TxnOp> = Vec::new();
            let mut bytes = 0;
            let client = inner.client.clone();
            let timeout = inner.cfg.request_timeout;
            let send = |ops: Vec<TxnOp>| {
                let client = client.clone();
                async move {
                    let txn = etcd_client::Txn::new().and_then(ops);
                    send_txn(&client, timeout, txn.clone()).await
                }
            };
            for (k, v) in puts {
                if !batch.is_empty()
                    && (batch.len() >= max_ops || bytes + k.len() + v.len() > max_bytes)
                {
                    send(std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
                bytes += k.len() + v.len() + OP_OVERHEAD;
                batch.push(TxnOp::put(k, v, None));
            }
            if !batch.is_empty() {
                send(batch).await?;
            }
            // Last, in one step: the identity and head, only over an empty store.
            let head_key = format!("{p}meta/head");
            let txn = etcd_client::Txn::new()
                .when([Compare::value(head_key.clone(), CompareOp::Equal, "0 ")])
                .and_then([
                    TxnOp::put(format!("{p}meta/store_id"), store_id, None),
                    TxnOp::put(head_key, head, None),
                ]);
            let resp = send_txn(&client, timeout, txn.clone()).await?;
            if !resp.succeeded() {
                return Err(StoreError::Open {
                    path: p,
                    reason: "the store was written to during the import".into(),
                });
            }
            Ok(())
        })
    }

    fn health(&self) -> Result<String, String> {
        let m = self.inner.mirror();
        if self.inner.watching.load(Ordering::Acquire) {
            Ok(format!(
                "etcd, watching at revision {} (version {})",
                m.revision, m.version
            ))
        } else {
            let why = self
                .inner
                .watch_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "not started".into());
            Err(format!("etcd watch down: {why}"))
        }
    }

    fn put_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let key = format!("{}token/{node}", inner.prefix);
        let hash = hash.to_string();
        self.call(async move { inner.put_plain(key, Some(hash)).await })
            .map(|_| ())
    }

    fn delete_token_hash(&self, node: &str) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let key = format!("{}token/{node}", inner.prefix);
        self.call(async move { inner.put_plain(key, None).await })
    }

    fn token_hashes(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .inner
            .mirror()
            .tokens
            .iter()
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect())
    }

    fn put_router(&self, kind: RouterKind, id: &str, json: &str) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let key = format!("{}router/{}/{id}", inner.prefix, kind.as_str());
        let json = json.to_string();
        self.call(async move { inner.put_plain(key, Some(json)).await })
            .map(|_| ())
    }

    fn get_router(&self, kind: RouterKind, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .inner
            .mirror()
            .router
            .get(&(kind.as_str().to_string(), id.to_string()))
            .map(|(json, _)| json.clone()))
    }

    fn list_router(&self, kind: RouterKind) -> Result<Vec<(String, String)>, StoreError> {
        let m = self.inner.mirror();
        Ok(m.router
            .iter()
            .filter(|((k, _), _)| k == kind.as_str())
            .map(|((_, id), (json, _))| (id.clone(), json.clone()))
            .collect())
    }

    fn update_router(
        &self,
        kind: RouterKind,
        id: &str,
        f: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<Option<String>, StoreError> {
        let key = format!("{}router/{}/{id}", self.inner.prefix, kind.as_str());
        for _ in 0..WRITE_ATTEMPTS {
            let (current, rev) = {
                let m = self.inner.mirror();
                match m.router.get(&(kind.as_str().to_string(), id.to_string())) {
                    Some((json, rev)) => (Some(json.clone()), *rev),
                    None => (None, 0),
                }
            };
            let Some(new) = f(current.as_deref()) else {
                return Ok(None);
            };
            let compare = if rev == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
            };
            let txn = etcd_client::Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.clone(), new.clone(), None)]);
            let inner = self.inner.clone();
            let done = self.call(async move {
                let client = inner.client.clone();
                let resp = send_txn(&client, inner.cfg.request_timeout, txn.clone()).await?;
                let revision = resp.header().map_or(0, |h| h.revision());
                inner.caught_up(revision).await;
                Ok::<_, StoreError>(resp.succeeded())
            })?;
            if done {
                return Ok(Some(new));
            }
        }
        Err(StoreError::Stale { base: 0, actual: 0 })
    }

    fn delete_router(&self, kind: RouterKind, id: &str) -> Result<bool, StoreError> {
        let inner = self.inner.clone();
        let key = format!("{}router/{}/{id}", inner.prefix, kind.as_str());
        self.call(async move { inner.put_plain(key, None).await })
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;

//! This replica's lease in etcd and the presence of the nodes it holds.
//!
//! The replica keeps one lease (`cluster.lease_ttl`, renewed every `cluster.heartbeat`). Under
//! it live `replica/NAME` (where other replicas reach this one) and `presence/NODE` for every
//! node connected here, so a replica that dies drops out with all its nodes when the lease
//! runs out. A replica that cannot renew its lease for a whole TTL closes its sessions and
//! refuses new ones until it has a lease again: its nodes move to replicas that have one.
//! A lease renewal that is only slow changes nothing, so established streams keep running.
//!
//! Every replica reads the others' presence from its mirror: a node now present elsewhere, and
//! more recently than its session here began, is kicked here (it reconnected to another
//! replica before this one noticed it was gone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::nodes::{ClusterHealth, NodeRegistry, Presence, PresenceEvent};
use crate::store::etcd::EtcdStore;

/// What `replica/NAME` holds: how other replicas reach this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaInfo {
    pub advertise_url: String,
    pub started_ms: i64,
}

/// Presence puts sent to etcd in one transaction (below etcd's 128 operations).
const PUT_BATCH: usize = 100;

/// The lease and what the replica knows of it.
pub(crate) struct Lease {
    /// The lease id; 0 while there is none.
    id: AtomicI64,
    /// Why there is none, for `/readyz`.
    problem: Mutex<Option<String>>,
}

impl Lease {
    pub(crate) fn new() -> Self {
        Lease {
            id: AtomicI64::new(0),
            problem: Mutex::new(Some("no lease yet".into())),
        }
    }

    pub(crate) fn id(&self) -> i64 {
        self.id.load(Ordering::Acquire)
    }

    fn set(&self, id: i64, problem: Option<String>) {
        self.id.store(id, Ordering::Release);
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }
}

/// `/readyz`'s cluster check: a lease, and a watch that follows etcd.
pub(crate) struct Health {
    pub(crate) lease: Arc<Lease>,
    pub(crate) store: Arc<EtcdStore>,
    pub(crate) name: String,
}

impl ClusterHealth for Health {
    fn check(&self) -> Result<String, String> {
        let problem = self
            .lease
            .problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match problem {
            Some(p) => Err(format!("replica {}: {p}", self.name)),
            None if !self.store.watching() => {
                Err(format!("replica {}: the etcd watch is down", self.name))
            }
            None => Ok(format!(
                "replica {} holds lease {:x}",
                self.name,
                self.lease.id()
            )),
        }
    }
}

pub(crate) struct PresenceKeeper {
    pub(crate) cfg: ClusterConfig,
    pub(crate) name: String,
    pub(crate) store: Arc<EtcdStore>,
    pub(crate) nodes: Arc<NodeRegistry>,
    pub(crate) lease: Arc<Lease>,
}

fn now_ms() -> i64 {
    crate::nodes::now_ms()
}

impl PresenceKeeper {
    fn key(&self, rel: &str) -> String {
        self.store.key(rel)
    }

    /// Grants a lease and registers the replica under it; retried until it works.
    async fn acquire(&self, shutdown: &CancellationToken) -> Option<i64> {
        let ttl = self.cfg.lease_ttl.as_secs().max(2) as i64;
        let info = ReplicaInfo {
            advertise_url: self.cfg.advertise_url.clone().unwrap_or_default(),
            started_ms: now_ms(),
        };
        let info = serde_json::to_string(&info).unwrap_or_default();
        let timeout = self.store.request_timeout();
        let mut backoff = Duration::from_millis(200);
        loop {
            let client = self.store.client();
            let attempt = async {
                let lease = client.lease_client().grant(ttl, None).await?.id();
                client
                    .kv_client()
                    .put(
                        self.key(&format!("replica/{}", self.name)),
                        info.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                Ok::<_, etcd_client::Error>(lease)
            };
            let failed = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(id)) => return Some(id),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            debug!(error = %failed, "cannot get a lease");
            self.lease
                .set(0, Some(format!("cannot get a lease from etcd: {failed}")));
            shutdown
                .run_until_cancelled(tokio::time::sleep(backoff))
                .await?;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Keeps the lease alive until it is lost (`Err`) or `shutdown` (`Ok`). The lease counts
    /// as lost once no renewal succeeded for a whole TTL, or etcd says it expired. A renewal
    /// that failed (a member went away, an election) is tried again within a fraction of a
    /// second, on whichever member answers.
    async fn renew(&self, id: i64, shutdown: &CancellationToken) -> Result<(), String> {
        let ttl = self.cfg.lease_ttl;
        let mut last_ok = Instant::now();
        let mut keeper = None;
        let mut wait = self.cfg.heartbeat;
        loop {
            if shutdown
                .run_until_cancelled(tokio::time::sleep(wait))
                .await
                .is_none()
            {
                return Ok(());
            }
            if last_ok.elapsed() > ttl {
                return Err(format!("no lease renewal for {:?}", last_ok.elapsed()));
            }
            let budget = self
                .cfg
                .heartbeat
                .min(ttl.saturating_sub(last_ok.elapsed()))
                .max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(budget, async {
                if keeper.is_none() {
                    let client = self.store.client();
                    keeper = Some(client.lease_client().keep_alive(id).await?);
                    return Ok(Some(ttl.as_secs() as i64));
                }
                let Some((k, stream)) = keeper.as_mut() else {
                    return Ok(None);
                };
                k.keep_alive().await?;
                Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
            })
            .await;
            match attempt {
                Ok(Ok(Some(left))) if left > 0 => {
                    last_ok = Instant::now();
                    wait = self.cfg.heartbeat;
                }
                Ok(Ok(Some(_))) => return Err("etcd says the lease expired".into()),
                Ok(Err(e)) if e.to_string().contains("lease not found") => {
                    return Err("etcd says the lease expired".into())
                }
                other => {
                    if let Ok(Err(e)) = other {
                        debug!(error = %e, "lease renewal failed; retrying");
                    }
                    keeper = None;
                    wait = Duration::from_millis(200);
                }
            }
        }
    }

    /// The lease loop: acquire, renew, and on loss close every session and start over.
    pub(crate) async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let Some(id) = self.acquire(&shutdown).await else {
                return;
            };
            self.lease.set(id, None);
            self.nodes.refuse(false);
            info!(lease = format!("{id:x}"), "replica registered in etcd");
            match self.renew(id, &shutdown).await {
                Ok(()) => {
                    // Leaving: the lease takes this replica's presence keys with it.
                    let client = self.store.client();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.lease_client().revoke(id),
                    )
                    .await;
                    return;
                }
                Err(why) => {
                    warn!(reason = %why, "lost the etcd lease: closing every node session until a new one is granted");
                    self.lease.set(0, Some(format!("lease lost: {why}")));
                    self.nodes.refuse(true);
                }
            }
        }
    }

    /// Writes connects (batched) and removes disconnects (only while the key is still this
    /// session's) as the registry reports them; after a new lease, every session again.
    pub(crate) async fn write_presence(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<PresenceEvent>,
        shutdown: CancellationToken,
    ) {
        let mut lease_seen = 0i64;
        let mut pending: HashMap<String, Option<Presence>> = HashMap::new();
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    None => return,
                    Some(ev) => take(&mut pending, ev),
                },
                _ = retry.tick() => {}
            }
            while let Ok(ev) = events.try_recv() {
                take(&mut pending, ev);
            }
            let lease = self.lease.id();
            if lease == 0 {
                continue;
            }
            if lease != lease_seen {
                // A new lease: everything connected now is present again under it.
                for (node, p) in self.nodes.local_sessions() {
                    pending.entry(node).or_insert(Some(p));
                }
                lease_seen = lease;
            }
            if let Err(e) = self.flush(&mut pending, lease).await {
                debug!(error = %e, left = pending.len(), "presence write failed; retrying");
            }
        }
    }

    async fn flush(
        &self,
        pending: &mut HashMap<String, Option<Presence>>,
        lease: i64,
    ) -> Result<(), String> {
        let timeout = self.store.request_timeout();
        let mut kv = self.store.client().kv_client();
        let puts: Vec<(String, Presence)> = pending
            .iter()
            .filter_map(|(n, p)| p.clone().map(|p| (n.clone(), p)))
            .collect();
        for chunk in puts.chunks(PUT_BATCH) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(node, p)| {
                    TxnOp::put(
                        self.key(&format!("presence/{node}")),
                        serde_json::to_string(p).unwrap_or_default(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            tokio::time::timeout(timeout, kv.txn(Txn::new().and_then(ops)))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            for (node, p) in chunk {
                if pending.get(node) == Some(&Some(p.clone())) {
                    pending.remove(node);
                }
            }
        }
        let gone: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for node in gone {
            // Only while the key is still this replica's: the node may be elsewhere by now.
            let key = self.key(&format!("presence/{node}"));
            let mine = self
                .store
                .cluster_entries("presence/")
                .into_iter()
                .find(|(n, _)| *n == node)
                .map(|(_, v)| v);
            if let Some(value) = mine.filter(|v| {
                serde_json::from_slice::<Presence>(v).is_ok_and(|p| p.replica == self.name)
            }) {
                let txn = Txn::new()
                    .when([Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        value.to_vec(),
                    )])
                    .and_then([TxnOp::delete(key, None)]);
                tokio::time::timeout(timeout, kv.txn(txn))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())?;
            }
            pending.remove(&node);
        }
        Ok(())
    }

    /// Follows the other replicas' presence: nodes held elsewhere are shown as such, and a
    /// node that moved away while its session here lingers is kicked here.
    pub(crate) async fn follow_presence(self: Arc<Self>, shutdown: CancellationToken) {
        let mut changes = self.store.subscribe_cluster();
        loop {
            let mut remote = HashMap::new();
            for (node, value) in self.store.cluster_entries("presence/") {
                let Ok(p) = serde_json::from_slice::<Presence>(&value) else {
                    continue;
                };
                if p.replica == self.name {
                    continue;
                }
                if let Some((_, since)) = self.nodes.local(&node) {
                    if p.since_ms >= since && self.nodes.kick(&node) {
                        info!(%node, to = %p.replica, "node moved to another replica: closed its session here");
                    }
                }
                remote.insert(node, p);
            }
            self.nodes.set_remote(remote);
            if !edgehub::process::changed(&mut changes, &shutdown).await {
                return;
            }
        }
    }
}

fn take(pending: &mut HashMap<String, Option<Presence>>, ev: PresenceEvent) {
    match ev {
        PresenceEvent::Connected { node, presence } => {
            pending.insert(node, Some(presence));
        }
        PresenceEvent::Disconnected { node, conn_id } => {
            // A disconnect of an older session than the one waiting to be written is moot.
            match pending.get(&node) {
                Some(Some(p)) if p.conn_id != conn_id => {}
                _ => {
                    pending.insert(node, None);
                }
            }
        }
    }
}

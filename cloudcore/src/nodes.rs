//! Runtime state of edge nodes: who is connected, from where, since when, what they acked.
//! This is not stored (it changes with every keepalive); the API merges it into Node objects.
//!
//! With several replicas (store on etcd) each one knows its own sessions in full; nodes held
//! by other replicas are known from their presence in etcd ([`NodeRegistry::set_remote`]),
//! and every connect and disconnect is reported to whoever keeps this replica's presence
//! ([`NodeRegistry::report_to`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What `GET /api/v1/nodes` shows as a node's `status`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub online: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    pub acked_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect_reason: Option<String>,
    /// The cloudcore replica that holds the node's connection (several replicas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// A node's session on another replica, as that replica published it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    pub replica: String,
    pub conn_id: u64,
    pub address: String,
    pub since_ms: i64,
}

/// What the presence keeper is told (the etcd store's replicas only).
#[derive(Debug)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub enum PresenceEvent {
    Connected { node: String, presence: Presence },
    Disconnected { node: String, conn_id: u64 },
}

/// This replica's standing in the cluster, for `/readyz`.
pub trait ClusterHealth: Send + Sync {
    fn check(&self) -> Result<String, String>;
}

#[derive(Default)]
struct Entry {
    status: NodeStatus,
    conn_id: u64,
    kick: Option<CancellationToken>,
    /// When the node was last sent a snapshot (kept across reconnects).
    last_snapshot: Option<std::time::Instant>,
}

#[derive(Default)]
pub struct NodeRegistry {
    nodes: Mutex<HashMap<String, Entry>>,
    next_conn: AtomicU64,
    /// Kept as a running count: recounting on every (re)connect is quadratic when thousands
    /// of nodes reconnect at once.
    online: AtomicU64,
    /// This replica's name and where its connects and disconnects go (several replicas).
    replica: OnceLock<(String, mpsc::UnboundedSender<PresenceEvent>)>,
    /// Nodes connected to other replicas.
    remote: RwLock<HashMap<String, Presence>>,
    /// Cleared while this replica has no lease: new sessions are closed at once.
    refusing: AtomicBool,
    cluster: OnceLock<std::sync::Arc<dyn ClusterHealth>>,
}

/// A connection's claim on its node name; `NodeRegistry::disconnect` takes it back.
#[derive(Clone)]
pub struct Session {
    pub node: String,
    pub conn_id: u64,
    pub kicked: CancellationToken,
}

impl NodeRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection for `node`; an older connection of the same node is kicked
    /// (a node that reconnects before the cloud noticed the old link died).
    pub fn connect(&self, node: &str, addr: SocketAddr) -> Session {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let kicked = CancellationToken::new();
        if self.refusing.load(Ordering::Acquire) {
            // No lease: the node must go to a replica that has one.
            kicked.cancel();
            return Session {
                node: node.to_string(),
                conn_id,
                kicked,
            };
        }
        {
            let mut nodes = self.lock();
            let e = nodes.entry(node.to_string()).or_default();
            if let Some(old) = e.kick.take() {
                old.cancel();
            }
            if !e.status.online {
                self.online.fetch_add(1, Ordering::Relaxed);
            }
            e.conn_id = conn_id;
            e.kick = Some(kicked.clone());
            let now = now_ms();
            e.status.online = true;
            e.status.address = Some(addr.to_string());
            e.status.connected_since_ms = Some(now);
            e.status.last_seen_ms = Some(now);
            e.status.disconnect_reason = None;
            e.status.replica = self.replica.get().map(|(name, _)| name.clone());
            // Under the lock, so the gauge follows the order of events, and the presence
            // keeper hears of connects and disconnects in their order.
            self.publish_online();
            if let Some((name, events)) = self.replica.get() {
                let _ = events.send(PresenceEvent::Connected {
                    node: node.to_string(),
                    presence: Presence {
                        replica: name.clone(),
                        conn_id,
                        address: addr.to_string(),
                        since_ms: now,
                    },
                });
            }
        }
        Session {
            node: node.to_string(),
            conn_id,
            kicked,
        }
    }

    /// Marks the node offline unless a newer connection took over.
    pub fn disconnect(&self, session: &Session, reason: &str) {
        {
            let mut nodes = self.lock();
            if let Some(e) = nodes.get_mut(&session.node) {
                if e.conn_id == session.conn_id {
                    if e.status.online {
                        self.online.fetch_sub(1, Ordering::Relaxed);
                    }
                    e.status.online = false;
                    e.status.connected_since_ms = None;
                    e.status.disconnect_reason = Some(reason.to_string());
                    e.kick = None;
                    e.status.replica = None;
                    if let Some((_, events)) = self.replica.get() {
                        let _ = events.send(PresenceEvent::Disconnected {
                            node: session.node.clone(),
                            conn_id: session.conn_id,
                        });
                    }
                }
            }
            self.publish_online();
        }
    }

    /// Makes this registry one replica's: sessions carry `name`, and connects and
    /// disconnects are sent to `events` (the presence keeper).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn report_to(&self, name: &str, events: mpsc::UnboundedSender<PresenceEvent>) {
        let _ = self.replica.set((name.to_string(), events));
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn replica_name(&self) -> Option<&str> {
        self.replica.get().map(|(n, _)| n.as_str())
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn set_cluster_health(&self, health: std::sync::Arc<dyn ClusterHealth>) {
        let _ = self.cluster.set(health);
    }

    /// The cluster check of `/readyz`; `None` for a single cloudcore.
    pub fn cluster_health(&self) -> Option<Result<String, String>> {
        self.cluster.get().map(|c| c.check())
    }

    /// Replaces what is known of nodes on other replicas.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn set_remote(&self, remote: HashMap<String, Presence>) {
        *self.remote.write().unwrap_or_else(|p| p.into_inner()) = remote;
    }

    /// The replica holding `node` when that is another one.
    pub fn remote(&self, node: &str) -> Option<Presence> {
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// This replica's session of `node`: its id and when it started, if connected here.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn local(&self, node: &str) -> Option<(u64, i64)> {
        let nodes = self.lock();
        let e = nodes.get(node)?;
        e.status
            .online
            .then(|| (e.conn_id, e.status.connected_since_ms.unwrap_or(0)))
    }

    /// Nodes connected here, with their session ids.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn local_sessions(&self) -> Vec<(String, Presence)> {
        let Some(name) = self.replica_name() else {
            return Vec::new();
        };
        self.lock()
            .iter()
            .filter(|(_, e)| e.status.online)
            .map(|(n, e)| {
                (
                    n.clone(),
                    Presence {
                        replica: name.to_string(),
                        conn_id: e.conn_id,
                        address: e.status.address.clone().unwrap_or_default(),
                        since_ms: e.status.connected_since_ms.unwrap_or(0),
                    },
                )
            })
            .collect()
    }

    /// Closes every session and, while `refusing`, every new one at once (a replica that lost
    /// its lease; its nodes must move to one that has one).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::Release);
        if refusing {
            for e in self.lock().values_mut() {
                if let Some(k) = e.kick.take() {
                    k.cancel();
                }
            }
        }
    }

    fn publish_online(&self) {
        metrics::gauge!("cloudcore_hub_online_nodes")
            .set(self.online.load(Ordering::Relaxed) as f64);
    }

    fn with(&self, session: &Session, f: impl FnOnce(&mut NodeStatus)) {
        if let Some(e) = self.lock().get_mut(&session.node) {
            if e.conn_id == session.conn_id {
                f(&mut e.status);
            }
        }
    }

    pub fn seen_at(&self, session: &Session, ms: i64) {
        self.with(session, |s| s.last_seen_ms = Some(ms));
    }

    pub fn acked(&self, session: &Session, version: u64) {
        self.with(session, |s| {
            // Acks arrive in order on one connection; a snapshot can move a node backwards.
            s.acked_version = version;
            s.last_seen_ms = Some(now_ms());
        });
    }

    pub fn synced(&self, session: &Session, mode: &str, agent_version: &str) {
        // The version string comes from the node: keep it short.
        let agent: String = agent_version.chars().take(64).collect();
        self.with(session, |s| {
            s.last_sync = Some(mode.to_string());
            s.agent_version = Some(agent);
        });
    }

    /// How long the node must wait before its next snapshot, to keep snapshots at least
    /// `pace` apart per node; claims the slot.
    pub fn snapshot_wait(
        &self,
        node: &str,
        pace: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let now = std::time::Instant::now();
        let mut nodes = self.lock();
        let e = nodes.entry(node.to_string()).or_default();
        let next = e.last_snapshot.map(|t| t + pace).filter(|next| *next > now);
        e.last_snapshot = Some(next.unwrap_or(now));
        next.map(|n| n - now)
    }

    /// Closes the node's connection, if any; true if one was open.
    pub fn kick(&self, node: &str) -> bool {
        match self.lock().get_mut(node).and_then(|e| e.kick.take()) {
            Some(k) => {
                k.cancel();
                true
            }
            None => false,
        }
    }

    /// Forgets a deleted node.
    pub fn remove(&self, node: &str) {
        let mut nodes = self.lock();
        if let Some(e) = nodes.remove(node) {
            if e.status.online {
                self.online.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(k) = e.kick {
                k.cancel();
            }
        }
        self.publish_online();
    }

    /// The node's status: this replica's own when it holds the node, else what the replica
    /// that holds it published (online, where from, since when).
    pub fn status(&self, node: &str) -> NodeStatus {
        let local = self.lock().get(node).map(|e| e.status.clone());
        if local.as_ref().is_some_and(|s| s.online) {
            return local.unwrap_or_default();
        }
        match self.remote(node) {
            Some(p) => NodeStatus {
                online: true,
                address: Some(p.address),
                connected_since_ms: Some(p.since_ms),
                replica: Some(p.replica),
                disconnect_reason: None,
                ..local.unwrap_or_default()
            },
            None => local.unwrap_or_default(),
        }
    }

    pub fn online_count(&self) -> usize {
        self.online.load(Ordering::Relaxed) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_paced_per_node_across_reconnects() {
        let reg = NodeRegistry::default();
        let pace = std::time::Duration::from_secs(60);
        assert_eq!(reg.snapshot_wait("a", pace), None);
        let wait = reg.snapshot_wait("a", pace).expect("second one waits");
        assert!(wait > std::time::Duration::from_secs(59));
        // A third queues behind the second.
        assert!(reg.snapshot_wait("a", pace).expect("waits") > std::time::Duration::from_secs(119));
        assert_eq!(
            reg.snapshot_wait("b", pace),
            None,
            "other nodes are not held up"
        );
    }

    #[test]
    fn a_newer_connection_takes_over_and_the_old_one_cannot_mark_offline() {
        let reg = NodeRegistry::default();
        let addr: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let first = reg.connect("a", addr);
        let second = reg.connect("a", addr);
        assert!(first.kicked.is_cancelled());
        assert!(!second.kicked.is_cancelled());
        reg.disconnect(&first, "old link");
        assert!(reg.status("a").online);
        reg.acked(&second, 7);
        assert_eq!(reg.status("a").acked_version, 7);
        assert!(reg.kick("a"));
        assert!(second.kicked.is_cancelled());
        reg.disconnect(&second, "kicked");
        let s = reg.status("a");
        assert!(!s.online);
        assert_eq!(s.disconnect_reason.as_deref(), Some("kicked"));
        assert_eq!(reg.online_count(), 0);
    }
}

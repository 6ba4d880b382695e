//! The cloud's desired state: objects, a monotonically increasing resource version, and a
//! bounded log of recent changes from which nodes resume.
//!
//! [`Store`] is the seam between cloudcore and its backends: [`sqlite::SqliteStore`] is the
//! embedded default, `etcd::EtcdStore` (cargo feature `etcd`) is shared by several replicas.
//! Both turn a batch of [`Write`]s into [`Change`]s the same way ([`plan`]), so versions, the
//! history chain and the answers to resuming nodes do not depend on the backend.
//! Implementations are synchronous: callers on the async runtime run them on the blocking
//! pool.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use edgehub::model::{Kind, Object, ObjectKey};
use tokio::sync::watch;

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod export;
pub mod sqlite;

/// One stored object at its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: ObjectKey,
    pub version: u64,
    /// Canonical JSON, exactly as it is sent to nodes.
    pub json: Arc<str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOp {
    Insert,
    Update,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Insert => "insert",
            ChangeOp::Update => "update",
            ChangeOp::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeOp> {
        Some(match s {
            "insert" => ChangeOp::Insert,
            "update" => ChangeOp::Update,
            "delete" => ChangeOp::Delete,
            _ => return None,
        })
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Change {
    pub version: u64,
    pub op: ChangeOp,
    pub key: ObjectKey,
    /// The object after the change; for a delete, the object as it was.
    pub json: Arc<str>,
    /// The history chain after this change (see `edgehub::message::chain_next`).
    pub chain: String,
    /// The change encoded as a hub Message, made once and shared by every node's session.
    pub wire: OnceLock<Bytes>,
}

impl Change {
    /// A change following `prev_chain`.
    pub fn new(
        version: u64,
        op: ChangeOp,
        key: ObjectKey,
        json: Arc<str>,
        prev_chain: &str,
    ) -> Self {
        let chain =
            edgehub::message::chain_next(prev_chain, version, op.as_str(), &key.resource(), &json);
        Change {
            version,
            op,
            key,
            json,
            chain,
            wire: OnceLock::new(),
        }
    }

    /// Memory this change holds in the in-memory log: its JSON, and once encoded its message.
    pub fn weight(&self) -> usize {
        2 * self.json.len() + 256
    }
}

/// A write inside an atomic batch.
#[allow(clippy::large_enum_variant)] // see `Object`
#[derive(Clone, Debug)]
pub enum Write {
    /// Create or replace. With `expect_version`, fail with [`StoreError::Conflict`] unless the
    /// stored object is at that version (optimistic concurrency, as `resourceVersion` in
    /// Kubernetes). Writing an object identical to the stored one is a no-op.
    Put {
        object: Object,
        expect_version: Option<u64>,
    },
    Delete {
        key: ObjectKey,
    },
    /// Fails the batch with [`StoreError::Revoked`] unless the node has a token: a node
    /// admitted on one replica while another revokes it must not re-create its Node object.
    RequireToken {
        node: String,
    },
}

/// What the store answers a node that has `version`.
#[derive(Debug)]
pub enum Since {
    /// Nothing happened since.
    Current,
    /// Every change after the version, in order.
    Changes(Vec<Arc<Change>>),
    /// The history no longer reaches back that far (or the node is ahead of the store).
    Gone,
}

/// A consistent copy of every object at one version.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub store_id: String,
    pub version: u64,
    /// The history chain at `version`.
    pub chain: String,
    pub records: Vec<Record>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(ObjectKey),
    #[error("{key} is at resourceVersion {actual}, not {expected}")]
    Conflict {
        key: ObjectKey,
        expected: u64,
        actual: u64,
    },
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("stored object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The caller decided on the store as it was at `base`, and it has moved on since: read
    /// again and retry (see [`Store::write_at`]).
    #[error("the store moved from version {base} to {actual} meanwhile")]
    Stale { base: u64, actual: u64 },
    #[error("node {0} has no token (revoked)")]
    Revoked(String),
    /// The batch does not fit in one transaction of the backend; the message names the limit.
    #[error("{0}")]
    TooLarge(String),
    /// The backend cannot be reached or failed; the write may or may not have been applied
    /// only where the message says so.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

pub trait Store: Send + Sync + 'static {
    /// Random identity of this store, fixed at creation: a node whose copy came from another
    /// store (a restored backup, a new cluster) is sent a snapshot instead of a delta.
    fn store_id(&self) -> &str;

    /// The version of the last committed change.
    fn version(&self) -> u64;

    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError>;

    /// Objects of one kind, optionally in one namespace, ordered by namespace and name.
    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Record>, StoreError>;

    /// Applies the writes atomically; each effective write gets the next version. Returns the
    /// changes made (no-op puts make none).
    fn write(&self, writes: Vec<Write>) -> Result<Vec<Arc<Change>>, StoreError> {
        self.write_at(None, writes)
    }

    /// [`Store::write`] for a caller that decided on the store as it was at version `base`
    /// (a cluster IP it found free): fails with [`StoreError::Stale`] when another write, from
    /// this process or another replica, came in between.
    fn write_at(
        &self,
        base: Option<u64>,
        writes: Vec<Write>,
    ) -> Result<Vec<Arc<Change>>, StoreError>;

    /// The changes after `version`. With `chain`, the caller's history must be the store's
    /// at that version (a node resuming), else the answer is [`Since::Gone`]; without, the
    /// caller is the hub continuing what it sent itself.
    fn changes_since(&self, version: u64, chain: Option<&str>) -> Since;

    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Receives the current version after every commit (also those of other replicas).
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Changes whenever node tokens change (also through another replica).
    fn subscribe_tokens(&self) -> watch::Receiver<u64>;

    /// Whether node tokens change elsewhere too (another replica): only then must a process
    /// follow [`Store::subscribe_tokens`] to know them; alone, it made every change itself.
    fn tokens_change_elsewhere(&self) -> bool;

    /// Changes whenever router records change (also through another replica).
    fn subscribe_router(&self) -> watch::Receiver<u64>;

    /// Whether the store can take writes now, and what it is (for `/readyz`).
    fn health(&self) -> Result<String, String>;

    /// The changes kept for resuming nodes, oldest first.
    fn kept_changes(&self) -> Vec<Arc<Change>>;

    /// Fills an empty store with a dump (`cloudcore store import`), identity and history
    /// included; the store is to be opened again afterwards.
    fn restore(&self, dump: &export::Dump) -> Result<(), StoreError>;

    /// Node tokens are kept as hashes only, outside the versioned objects (never synced).
    fn put_token_hash(&self, node: &str, hash: &str) -> Result<(), StoreError>;
    fn delete_token_hash(&self, node: &str) -> Result<bool, StoreError>;
    fn token_hashes(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Router records (rule endpoints and rules) as JSON by kind and id. Like tokens they live
    /// outside the versioned objects: nodes are never sent them, and writing them makes no
    /// change in the log.
    fn put_router(&self, kind: RouterKind, id: &str, json: &str) -> Result<(), StoreError>;
    fn get_router(&self, kind: RouterKind, id: &str) -> Result<Option<String>, StoreError>;
    /// Every record of one kind as `(id, json)`, ordered by id.
    fn list_router(&self, kind: RouterKind) -> Result<Vec<(String, String)>, StoreError>;
    /// Read-modify-write of one record, atomic against every other writer (other replicas'
    /// counter flushes): `f` gets the stored JSON and returns what to store (`None`: nothing).
    /// Returns what was stored.
    fn update_router(
        &self,
        kind: RouterKind,
        id: &str,
        f: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<Option<String>, StoreError>;
    /// Whether a record was there to delete.
    fn delete_router(&self, kind: RouterKind, id: &str) -> Result<bool, StoreError>;
}

/// What [`plan`] reads: the stored state a batch is checked against.
pub trait View {
    fn get(&self, key: &ObjectKey) -> Result<Option<Record>, StoreError>;
    fn has_token(&self, node: &str) -> Result<bool, StoreError>;
}

/// Turns a batch into the changes it makes on top of `version` and `chain`: preconditions
/// checked, identical puts dropped, versions and chain assigned. Nothing is written.
pub fn plan(
    view: &dyn View,
    writes: Vec<Write>,
    mut version: u64,
    chain: &str,
) -> Result<Vec<Change>, StoreError> {
    let mut chain = chain.to_string();
    let mut changes: Vec<Change> = Vec::with_capacity(writes.len());
    // Objects written earlier in this batch, as later writes of it must see them.
    let current = |changes: &[Change], key: &ObjectKey| -> Result<Option<Record>, StoreError> {
        match changes.iter().rev().find(|c| &c.key == key) {
            Some(c) if c.op == ChangeOp::Delete => Ok(None),
            Some(c) => Ok(Some(Record {
                key: key.clone(),
                version: c.version,
                json: c.json.clone(),
            })),
            None => view.get(key),
        }
    };
    for write in writes {
        match write {
            Write::Put {
                mut object,
                expect_version,
            } => {
                let key = object.key();
                let existing = current(&changes, &key)?;
                if let Some(expected) = expect_version {
                    let actual = existing.as_ref().map(|r| r.version).unwrap_or(0);
                    if actual != expected {
                        return Err(StoreError::Conflict {
                            key,
                            expected,
                            actual,
                        });
                    }
                }
                if let Some(old) = &existing {
                    if same_content(&old.json, &object) {
                        continue;
                    }
                }
                version += 1;
                object.meta_mut().resource_version = version.to_string();
                let op = if existing.is_some() {
                    ChangeOp::Update
                } else {
                    ChangeOp::Insert
                };
                let change = Change::new(version, op, key, object.to_json().into(), &chain);
                chain.clone_from(&change.chain);
                changes.push(change);
            }
            Write::Delete { key } => {
                let existing =
                    current(&changes, &key)?.ok_or_else(|| StoreError::NotFound(key.clone()))?;
                version += 1;
                let change = Change::new(version, ChangeOp::Delete, key, existing.json, &chain);
                chain.clone_from(&change.chain);
                changes.push(change);
            }
            Write::RequireToken { node } => {
                if !view.has_token(&node)? {
                    return Err(StoreError::Revoked(node));
                }
            }
        }
    }
    Ok(changes)
}

/// Whether two objects are equal apart from their resource version.
fn same_content(stored: &str, new: &Object) -> bool {
    let Ok(mut old) = Object::from_json(new.kind(), stored) else {
        return false;
    };
    old.meta_mut().resource_version.clear();
    let mut new = new.clone();
    new.meta_mut().resource_version.clear();
    old == new
}

/// The in-memory tail of the change log, bounded by count and by bytes: what resuming nodes
/// are answered from, so they never make the backend read.
#[derive(Default)]
pub struct Recent {
    changes: VecDeque<Arc<Change>>,
    bytes: usize,
}

impl Recent {
    pub fn push(&mut self, change: Arc<Change>, max_len: usize, max_bytes: usize) {
        self.bytes += change.weight();
        self.changes.push_back(change);
        // Always keep the newest change: it carries the head of the chain.
        while self.changes.len() > 1 && (self.changes.len() > max_len || self.bytes > max_bytes) {
            if let Some(old) = self.changes.pop_front() {
                self.bytes -= old.weight();
            }
        }
    }

    /// The version and chain of the newest change kept.
    pub fn head(&self) -> (u64, &str) {
        self.changes
            .back()
            .map(|c| (c.version, c.chain.as_str()))
            .unwrap_or((0, ""))
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn all(&self) -> Vec<Arc<Change>> {
        self.changes.iter().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes with versions in `from..=to`, if all of them are kept.
    pub fn range(&self, from: u64, to: u64) -> Option<Vec<Arc<Change>>> {
        let first = self.changes.front()?.version;
        if from < first || to > self.head().0 || from > to {
            return None;
        }
        let skip = (from - first) as usize;
        Some(
            self.changes
                .iter()
                .skip(skip)
                .take((to - from + 1) as usize)
                .cloned()
                .collect(),
        )
    }

    /// What a node at `since` (with `chain`, when it is resuming) is answered, given that the
    /// store is at `current` with history chain `head`.
    pub fn since(&self, since: u64, chain: Option<&str>, current: u64, head: &str) -> Since {
        if since == current {
            return match chain {
                Some(c) if c != head => Since::Gone,
                _ => Since::Current,
            };
        }
        if since > current {
            return Since::Gone;
        }
        let Some(first) = self.changes.front() else {
            return Since::Gone;
        };
        if since + 1 < first.version || self.head().0 != current {
            return Since::Gone;
        }
        let skip = (since + 1 - first.version) as usize;
        if let Some(c) = chain {
            // The chain at `since` is that of the change before the first one sent.
            let at_since = match skip {
                0 if first.version == 1 => "",
                0 => return Since::Gone, // not kept: cannot verify, so resync
                n => self.changes[n - 1].chain.as_str(),
            };
            if at_since != c {
                return Since::Gone;
            }
        }
        Since::Changes(self.changes.iter().skip(skip).cloned().collect())
    }
}

/// The kinds of router records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouterKind {
    Endpoint,
    Rule,
}

impl RouterKind {
    pub fn parse(s: &str) -> Option<RouterKind> {
        match s {
            "endpoint" => Some(RouterKind::Endpoint),
            "rule" => Some(RouterKind::Rule),
            _ => None,
        }
    }

    /// The stored name of the kind (the `kind` column).
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::Endpoint => "endpoint",
            RouterKind::Rule => "rule",
        }
    }
}

/// Objects the store tests write.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Write;
    use edgehub::model::{Node, Object};

    /// Node `name` with label `zone`.
    pub fn node(name: &str, zone: &str) -> Object {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("zone".to_string(), zone.to_string());
        Object::Node(Node::new(name, labels))
    }

    /// An unconditional put.
    pub fn put(o: Object) -> Write {
        Write::Put {
            object: o,
            expect_version: None,
        }
    }
}

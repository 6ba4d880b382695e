//! The cloud's desired state: objects, a monotonically increasing resource version, and a
//! bounded log of recent changes from which nodes resume.
//!
//! [`Store`] is the seam for other backends (etcd for HA); [`sqlite::SqliteStore`] is the
//! embedded default. Implementations are synchronous: callers on the async runtime run them
//! on the blocking pool.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use edgehub::model::{Kind, Object, ObjectKey};
use tokio::sync::watch;

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
    fn write(&self, writes: Vec<Write>) -> Result<Vec<Arc<Change>>, StoreError>;

    /// The changes after `version`. With `chain`, the caller's history must be the store's
    /// at that version (a node resuming), else the answer is [`Since::Gone`]; without, the
    /// caller is the hub continuing what it sent itself.
    fn changes_since(&self, version: u64, chain: Option<&str>) -> Since;

    fn snapshot(&self) -> Result<Snapshot, StoreError>;

    /// Receives the current version after every commit.
    fn subscribe(&self) -> watch::Receiver<u64>;

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
    /// Whether a record was there to delete.
    fn delete_router(&self, kind: RouterKind, id: &str) -> Result<bool, StoreError>;
}

/// The kinds of router records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouterKind {
    Endpoint,
    Rule,
}

impl RouterKind {
    /// The stored name of the kind (the `kind` column).
    pub fn as_str(self) -> &'static str {
        match self {
            RouterKind::Endpoint => "endpoint",
            RouterKind::Rule => "rule",
        }
    }
}
